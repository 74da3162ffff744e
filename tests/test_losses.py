"""Hand-checked values of every loss, advantage function and their identities.

Every expected number is written out with scalar arithmetic (``math``) or as a literal
derived by hand in a comment; the function under test is called once per case.
Tensors are float64 so the comparisons can be tight.
"""

from __future__ import annotations

import math

import pytest
import torch

from workbench.algorithms import dpo, grpo, ppo, reinforce, rloo
from workbench.algorithms.dpo import DPOConfig, OnlineDPOConfig, dpo_loss
from workbench.algorithms.grpo import GRPOBatch, GRPOConfig, grpo_advantages, grpo_loss
from workbench.algorithms.ppo import PPOBatch, PPOConfig, ppo_loss
from workbench.algorithms.reinforce import ReinforceBatch, ReinforceConfig, reinforce_loss, returns_to_go
from workbench.algorithms.reward_model import RewardModelConfig, reward_model_loss
from workbench.algorithms.rloo import RLOOConfig, rloo_advantages
from workbench.algorithms.sft import SFTConfig, sft_loss
from workbench.algorithms.spec import PolicyOutput, Rollout
from workbench.core.ops import aggregate, gae, masked_whiten

D = torch.float64
TOL = dict(rel=1e-9, abs=1e-12)


def t(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=D)


def logsig(x: float) -> float:
    """log sigmoid(x) on a scalar."""
    return -math.log1p(math.exp(-x))


def k3s(lr: float) -> float:
    """k3 on a scalar log-ratio."""
    return math.exp(lr) - 1 - lr


def assert_close(actual: torch.Tensor, expected, tol: float = 1e-9) -> None:
    expected = torch.as_tensor(expected, dtype=D)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual.to(D), expected, rtol=tol, atol=tol)


def out(logp: torch.Tensor, values: torch.Tensor | None = None) -> PolicyOutput:
    """The policy's output as a loss reads it: log-probs (and a critic's values)."""
    return PolicyOutput(logp=logp, logits=None, values=values)


def make_rollout(step_rewards, mask=None, old_logp=None, ref_logp=None, group_size=1, old_values=None) -> Rollout:
    step_rewards = t(step_rewards)
    B, T = step_rewards.shape
    z = torch.zeros(B, T, dtype=D)
    return Rollout(
        prompts=torch.zeros(B, 1, dtype=torch.long),
        completions=torch.zeros(B, T, dtype=torch.long),
        mask=t(mask) if mask is not None else torch.ones(B, T, dtype=D),
        old_logp=t(old_logp) if old_logp is not None else z.clone(),
        ref_logp=t(ref_logp) if ref_logp is not None else z.clone(),
        scores=step_rewards.sum(-1),
        step_rewards=step_rewards,
        gold=step_rewards.sum(-1),
        group_size=group_size,
        old_values=t(old_values) if old_values is not None else None,
    )


# ---------------------------------------------------------------------------------------- aggregate

PER_TOKEN = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
AGG_MASK = [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]


@pytest.mark.parametrize(
    "how, max_len, expected",
    [
        ("token_mean", None, (1 + 2 + 4) / 3),  # 3 unmasked tokens
        ("sequence_mean", None, ((1 + 2) / 2 + 4 / 1) / 2),  # per-row means, then the mean over rows
        ("constant", None, (1 + 2 + 4) / (2 * 3)),  # B x T
        ("constant", 5, (1 + 2 + 4) / (2 * 5)),  # B x max_len
        ("sequence_sum", None, ((1 + 2) + 4) / 2),
    ],
)
def test_aggregate_modes(how, max_len, expected):
    assert aggregate(t(PER_TOKEN), t(AGG_MASK), how, max_len).item() == pytest.approx(expected, **TOL)


def test_aggregate_fully_masked_row():
    mask = t([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert aggregate(t(PER_TOKEN), mask, "token_mean").item() == pytest.approx((1 + 2) / 2, **TOL)
    # the empty row counts as a zero in the mean over rows (its length is clamped to 1)
    assert aggregate(t(PER_TOKEN), mask, "sequence_mean").item() == pytest.approx(((1 + 2) / 2 + 0) / 2, **TOL)
    assert aggregate(t(PER_TOKEN), mask, "sequence_sum").item() == pytest.approx((3 + 0) / 2, **TOL)


def test_aggregate_unknown_mode():
    with pytest.raises(ValueError):
        aggregate(t(PER_TOKEN), t(AGG_MASK), "bogus")


# ---------------------------------------------------------------------------------------- SFT


def test_sft_loss_token_mean():
    probs = [[0.5, 0.25, 0.1], [0.8, 0.2, 0.9]]
    logp = t(probs).log()
    mask = t([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    loss, per_token, stats = sft_loss(logp, mask, SFTConfig())
    expected = -(math.log(0.5) + math.log(0.25) + math.log(0.8) + math.log(0.2) + math.log(0.9)) / 5
    assert loss.item() == pytest.approx(expected, **TOL)
    assert stats["loss/sft"] == pytest.approx(expected, **TOL)
    assert_close(per_token, [[-math.log(0.5), -math.log(0.25), 0.0], [-math.log(0.8), -math.log(0.2), -math.log(0.9)]])


def test_sft_loss_sequence_mean():
    logp = t([[0.5, 0.25, 0.1], [0.8, 0.2, 0.9]]).log()
    mask = t([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    loss, _, _ = sft_loss(logp, mask, SFTConfig(aggregation="sequence_mean"))
    row0 = -(math.log(0.5) + math.log(0.25)) / 2
    row1 = -(math.log(0.8) + math.log(0.2) + math.log(0.9)) / 3
    assert loss.item() == pytest.approx((row0 + row1) / 2, **TOL)


# ---------------------------------------------------------------------------------------- reward model

R_C = [1.0, -0.5, 0.3]
R_R = [0.2, 0.5, 0.3]  # d = r_c - r_r = [0.8, -1.0, 0.0]


def test_reward_model_hard_labels():
    loss, per_seq, stats = reward_model_loss(t(R_C), t(R_R), t([1.0, 1.0, 1.0]), RewardModelConfig())
    expected = [-logsig(0.8), -logsig(-1.0), -logsig(0.0)]  # -log sigmoid(r_c - r_r)
    assert loss.item() == pytest.approx(sum(expected) / 3, **TOL)
    assert_close(per_seq, [[e] for e in expected])
    assert -logsig(0.0) == pytest.approx(math.log(2))
    assert stats["rm/accuracy"] == pytest.approx(1 / 3)
    assert stats["rm/margin"] == pytest.approx((0.8 - 1.0 + 0.0) / 3)


def test_reward_model_soft_labels():
    p = [0.7, 0.4, 0.5]
    d = [0.8, -1.0, 0.0]
    loss, _, _ = reward_model_loss(t(R_C), t(R_R), t(p), RewardModelConfig())
    expected = sum(-(pi * logsig(di) + (1 - pi) * logsig(-di)) for pi, di in zip(p, d)) / 3
    assert loss.item() == pytest.approx(expected, **TOL)


def test_reward_model_margin():
    p = [1.0, 0.4, 0.5]
    d = [0.8, -1.0, 0.0]
    m = 0.5
    loss, _, _ = reward_model_loss(t(R_C), t(R_R), t(p), RewardModelConfig(margin=m))
    expected = sum(-(pi * logsig(di - m) + (1 - pi) * logsig(-di - m)) for pi, di in zip(p, d)) / 3
    # first pair by hand: -log sigmoid(0.8 - 0.5) = log(1 + e^-0.3)
    assert -logsig(0.3) == pytest.approx(math.log(1 + math.exp(-0.3)))
    assert loss.item() == pytest.approx(expected, **TOL)


# ---------------------------------------------------------------------------------------- DPO / IPO
# chosen:   logp - ref = [[0.2, -0.5], [0.2, (masked)]]  -> lr_c = [-0.3, 0.2]
# rejected: logp - ref = [[-0.5, 0.5], [0.1, -0.5]]      -> lr_r = [0.0, -0.4]
# h = lr_c - lr_r = [-0.3, 0.6]

DPO_ARGS = dict(
    logp_c=t([[-1.0, -2.0], [-0.5, -0.3]]),
    logp_r=t([[-2.0, -1.0], [-1.0, -1.5]]),
    ref_logp_c=t([[-1.2, -1.5], [-0.7, -0.4]]),
    ref_logp_r=t([[-1.5, -1.5], [-1.1, -1.0]]),
    mask_c=t([[1.0, 1.0], [1.0, 0.0]]),
    mask_r=t([[1.0, 1.0], [1.0, 1.0]]),
)


def test_dpo_sigmoid_hard_labels():
    beta = 0.5
    loss, per_seq, stats = dpo_loss(**DPO_ARGS, p_chosen=t([1.0, 1.0]), cfg=DPOConfig(), beta=beta)
    expected = [-logsig(0.5 * -0.3), -logsig(0.5 * 0.6)]
    assert loss.item() == pytest.approx(sum(expected) / 2, **TOL)
    assert_close(per_seq, [[expected[0]], [expected[1]]])
    assert stats["rewards/accuracies"] == pytest.approx(0.5)
    assert stats["rewards/margins"] == pytest.approx(0.5 * (-0.3 + 0.6) / 2)
    assert stats["rewards/chosen"] == pytest.approx(0.5 * (-0.3 + 0.2) / 2)
    assert stats["rewards/rejected"] == pytest.approx(0.5 * (0.0 - 0.4) / 2)


def test_dpo_sigmoid_soft_labels():
    beta = 0.5
    loss, _, _ = dpo_loss(**DPO_ARGS, p_chosen=t([0.25, 0.9]), cfg=DPOConfig(), beta=beta)
    row0 = -(0.25 * logsig(-0.15) + 0.75 * logsig(0.15))
    row1 = -(0.9 * logsig(0.3) + 0.1 * logsig(-0.3))
    assert loss.item() == pytest.approx((row0 + row1) / 2, **TOL)


def test_ipo_loss():
    beta = 0.5  # 1 / (2 beta) = 1
    loss, per_seq, _ = dpo_loss(**DPO_ARGS, p_chosen=t([1.0, 1.0]), cfg=DPOConfig(loss_type="ipo"), beta=beta)
    # token-averaged: h_avg = [-0.3/2 - 0.0/2, 0.2/1 - (-0.4)/2] = [-0.15, 0.4]
    expected = [(-0.15 - 1.0) ** 2, (0.4 - 1.0) ** 2]  # [1.3225, 0.36]
    assert_close(per_seq, [[1.3225], [0.36]])
    assert loss.item() == pytest.approx(sum(expected) / 2, **TOL)
    assert loss.item() == pytest.approx(0.84125, **TOL)


def test_online_dpo_picks_winner_and_drops_ties():
    # two prompts x G=2, T=1; prompt 0: second sample wins; prompt 1: a tie (no loss)
    roll = make_rollout([[0.0], [1.0], [2.0], [2.0]], ref_logp=[[-1.0], [-1.0], [-1.0], [-1.0]], group_size=2)
    batch = dpo.prepare_online(roll, OnlineDPOConfig(), beta=1.0)
    assert_close(batch.first_wins, [0.0, 0.0])
    assert_close(batch.weight, [1.0, 0.0])

    logp = t([[-2.0], [-0.5], [-1.0], [-1.0]])
    loss, per_seq, _ = dpo.online_dpo_loss(out(logp), batch, OnlineDPOConfig(), beta=1.0)
    # chosen = sample 1: lr_c = -0.5 + 1 = 0.5; rejected = sample 0: lr_r = -2 + 1 = -1; h = 1.5
    assert loss.item() == pytest.approx(-logsig(1.5), **TOL)
    assert_close(per_seq, [[-logsig(1.5)], [0.0]])


# ---------------------------------------------------------------------------------------- REINFORCE loss

RF_LOGP = [[-1.0, -0.5], [-2.0, -0.1]]
RF_ADV = [[2.0, 1.0], [-1.0, 0.5]]
RF_MASK = [[1.0, 1.0], [1.0, 0.0]]
RF_REF = [[-1.5, -0.5], [-1.0, -0.3]]  # ref - logp = [[-0.5, 0.0], [1.0, -0.2]]
RF_BATCH = ReinforceBatch(advantages=t(RF_ADV), ref_logp=t(RF_REF), mask=t(RF_MASK))


def test_reinforce_loss_kl_in_reward():
    loss, per_token, stats = reinforce_loss(out(t(RF_LOGP)), RF_BATCH, ReinforceConfig(), beta=0.3)
    # -A log pi: [[2.0, 0.5], [-2.0, (0.05 masked)]]; sequence_sum: rows 2.5 and -2.0
    assert_close(per_token, [[2.0, 0.5], [-2.0, 0.0]])
    assert loss.item() == pytest.approx((2.5 - 2.0) / 2, **TOL)
    assert not any(k.startswith("kl/") for k in stats)  # beta is ignored here: the KL is in the reward


def test_reinforce_loss_kl_in_loss_k3():
    beta = 0.1
    cfg = ReinforceConfig(kl_in="loss", kl_estimator="k3")
    logp = t(RF_LOGP).requires_grad_(True)
    loss, _, stats = reinforce_loss(out(logp), RF_BATCH, cfg, beta)
    row0 = 2.0 + 0.5 + beta * (k3s(-0.5) + k3s(0.0))
    row1 = -2.0 + beta * k3s(1.0)  # second token masked
    assert loss.item() == pytest.approx((row0 + row1) / 2, **TOL)
    assert stats["kl/k3_loss"] == pytest.approx((k3s(-0.5) + k3s(1.0)) / 2, **TOL)
    # d/dlogp [-A logp + beta (e^{ref-logp} - 1 - (ref-logp))] = -A + beta (1 - e^{ref-logp}), / B
    (g,) = torch.autograd.grad(loss, logp)
    expected = [
        [(-2.0 + beta * (1 - math.exp(-0.5))) / 2, (-1.0 + beta * (1 - math.exp(0.0))) / 2],
        [(1.0 + beta * (1 - math.exp(1.0))) / 2, 0.0],
    ]
    assert_close(g, expected)


def test_reinforce_loss_kl_in_loss_k1_token_mean():
    beta = 0.5
    cfg = ReinforceConfig(kl_in="loss", kl_estimator="k1", aggregation="token_mean")
    loss, _, _ = reinforce_loss(out(t(RF_LOGP)), RF_BATCH, cfg, beta)
    # k1 = -(ref - logp) = [[0.5, 0.0], [-1.0, .]]
    expected = (2.0 + beta * 0.5 + 0.5 + beta * 0.0 + -2.0 + beta * -1.0) / 3
    assert loss.item() == pytest.approx(expected, **TOL)


# ---------------------------------------------------------------------------------------- GRPO loss
# ratios rho = [[1.5, 0.9, 0.7], [1.1, 0.5, 1.3]], A = [+1, -2] per row, eps = 0.2, last token of row 1 masked
#   row 0 (A=+1): min(1.5, 1.2) = 1.2 (clipped)  min(0.9, 0.9) = 0.9  min(0.7, 0.8) = 0.7  -> L = -1.2 -0.9 -0.7
#   row 1 (A=-2): min(-2.2, -2.2) = -2.2         min(-1.0, -1.6) = -1.6 (clipped)          -> L = 2.2, 1.6

GRPO_RHO = [[1.5, 0.9, 0.7], [1.1, 0.5, 1.3]]
GRPO_OLD = [[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]]
GRPO_ADV = [[1.0, 1.0, 1.0], [-2.0, -2.0, -2.0]]
GRPO_MASK = [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]


def grpo_logp() -> torch.Tensor:
    return (t(GRPO_OLD) + t(GRPO_RHO).log()).requires_grad_(True)


def grpo_batch(ref_logp=None) -> GRPOBatch:
    """The hand batch above; the reference is ``old_logp`` unless given."""
    ref_logp = t(GRPO_OLD) if ref_logp is None else ref_logp
    return GRPOBatch(advantages=t(GRPO_ADV), old_logp=t(GRPO_OLD), ref_logp=ref_logp, mask=t(GRPO_MASK))


@pytest.mark.parametrize(
    "aggregation, expected",
    [
        ("sequence_mean", ((-1.2 - 0.9 - 0.7) / 3 + (2.2 + 1.6) / 2) / 2),
        ("token_mean", (-1.2 - 0.9 - 0.7 + 2.2 + 1.6) / 5),  # = 0.2
        ("constant", (-1.2 - 0.9 - 0.7 + 2.2 + 1.6) / (2 * 3)),  # = 1/6
    ],
)
def test_grpo_loss_aggregations(aggregation, expected):
    cfg = GRPOConfig(aggregation=aggregation)
    loss, per_token, stats = grpo_loss(out(grpo_logp()), grpo_batch(), cfg, 0.0)
    assert loss.item() == pytest.approx(expected, **TOL)
    assert_close(per_token.detach(), [[-1.2, -0.9, -0.7], [2.2, 1.6, 0.0]])
    assert stats["clip/ratio"] == pytest.approx(2 / 5)  # (0,0) high-clipped, (1,1) low-clipped
    assert "kl/k3_loss" not in stats


def test_grpo_loss_token_mean_value():
    cfg = GRPOConfig(aggregation="token_mean")
    loss, _, _ = grpo_loss(out(grpo_logp()), grpo_batch(), cfg, 0.0)
    assert loss.item() == pytest.approx(0.2, **TOL)


def test_grpo_clipped_tokens_have_no_gradient():
    cfg = GRPOConfig(aggregation="token_mean")
    logp = grpo_logp()
    loss, _, _ = grpo_loss(out(logp), grpo_batch(), cfg, 0.0)
    (g,) = torch.autograd.grad(loss, logp)
    # d(-rho A)/dlogp = -rho A where unclipped, 0 where the clipped branch is taken or masked; / 5 tokens
    assert_close(g, [[0.0, -0.9 * 1.0 / 5, -0.7 * 1.0 / 5], [-1.1 * -2.0 / 5, 0.0, 0.0]])


def test_grpo_asymmetric_clip():
    cfg = GRPOConfig(aggregation="token_mean", clip_eps_low=0.2, clip_eps_high=0.6)
    loss, _, _ = grpo_loss(out(grpo_logp()), grpo_batch(), cfg, 0.0)
    # now rho = 1.5 < 1.6 is not clipped for A = +1: row 0 = -1.5 -0.9 -0.7
    assert loss.item() == pytest.approx((-1.5 - 0.9 - 0.7 + 2.2 + 1.6) / 5, **TOL)


def test_grpo_loss_k3_penalty():
    beta = 0.05
    lr = [[0.1, -0.2, 0.3], [0.0, 0.5, -1.0]]  # ref - logp
    logp = grpo_logp()
    ref = logp.detach() + t(lr)
    cfg = GRPOConfig(aggregation="sequence_mean", kl_estimator="k3")
    loss, _, stats = grpo_loss(out(logp), grpo_batch(ref), cfg, beta)
    row0 = (-1.2 + beta * k3s(0.1) - 0.9 + beta * k3s(-0.2) - 0.7 + beta * k3s(0.3)) / 3
    row1 = (2.2 + beta * k3s(0.0) + 1.6 + beta * k3s(0.5)) / 2
    assert loss.item() == pytest.approx((row0 + row1) / 2, **TOL)
    assert stats["kl/k3_loss"] == pytest.approx((k3s(0.1) + k3s(-0.2) + k3s(0.3) + k3s(0.0) + k3s(0.5)) / 2, **TOL)
    # k3 by hand for one token: e^0.5 - 1 - 0.5
    assert k3s(0.5) == pytest.approx(1.6487212707001282 - 1.5)


# ---------------------------------------------------------------------------------------- PPO loss
# rho = [[1.5, 0.9], [0.6, 1.0]], A = [[1, -0.5], [-1, 2]], eps = 0.2, token (1,1) masked
#   L^clip = max(-A rho, -A clip(rho)):  (0,0) max(-1.5, -1.2) = -1.2   (0,1) 0.45   (1,0) max(0.6, 0.8) = 0.8
# values V, old values V_old, returns R, eps_v = 0.2:
#   (0,0) V=0.5 R=1.0: (V-R)^2 = 0.25; V_clip = 0.2 + 0.2 = 0.4: 0.36   -> 1/2 max = 0.18
#   (0,1) V=1.0 R=0.0: 1.0;           V_clip = 1.1 - 0.1 = 1.0: 1.0     -> 0.5
#   (1,0) V=0.0 R=-0.2: 0.04;         V_clip = 0.4 - 0.2 = 0.2: 0.16    -> 0.08

PPO = dict(
    logp=t([[math.log(1.5), math.log(0.9)], [math.log(0.6), 0.0]]),
    old_logp=torch.zeros(2, 2, dtype=D),
    ref_logp=torch.zeros(2, 2, dtype=D),
    advantages=t([[1.0, -0.5], [-1.0, 2.0]]),
    values=t([[0.5, 1.0], [0.0, 3.0]]),
    old_values=t([[0.2, 1.1], [0.4, 0.0]]),
    returns=t([[1.0, 0.0], [-0.2, 0.0]]),
    mask=t([[1.0, 1.0], [1.0, 0.0]]),
)


def ppo_inputs(
    logp, values, old_logp, ref_logp, advantages, old_values, returns, mask
) -> tuple[PolicyOutput, PPOBatch]:
    """A ``PPO`` dict as ``ppo_loss``'s ``(out, batch)``; ``raw_advantages``, unread by the loss, = ``advantages``."""
    batch = PPOBatch(
        advantages=advantages,
        raw_advantages=advantages,
        returns=returns,
        old_values=old_values,
        old_logp=old_logp,
        ref_logp=ref_logp,
        mask=mask,
    )
    return out(logp, values), batch


def test_ppo_loss_clipped_surrogate_and_value():
    cfg = PPOConfig(clip_eps=0.2, clip_value=0.2, vf_coef=0.5, aggregation="token_mean")
    loss, per_token, stats = ppo_loss(*ppo_inputs(**PPO), cfg=cfg, beta=0.0)
    expected_tokens = [[-1.2 + 0.5 * 0.18, 0.45 + 0.5 * 0.5], [0.8 + 0.5 * 0.08, 0.0]]
    assert_close(per_token, expected_tokens)
    assert loss.item() == pytest.approx((-1.11 + 0.7 + 0.84) / 3, **TOL)
    assert stats["loss/value"] == pytest.approx((0.18 + 0.5 + 0.08) / 3, **TOL)
    assert stats["loss/policy"] == pytest.approx((-1.2 + 0.45 + 0.8) / 3, **TOL)
    assert stats["clip/ratio"] == pytest.approx(2 / 3)


def test_ppo_vf_coef_and_no_critic():
    cfg = PPOConfig(vf_coef=2.0, aggregation="token_mean")
    loss, _, _ = ppo_loss(*ppo_inputs(**PPO), cfg=cfg, beta=0.0)
    assert loss.item() == pytest.approx((-1.2 + 2 * 0.18 + 0.45 + 2 * 0.5 + 0.8 + 2 * 0.08) / 3, **TOL)
    args = dict(PPO, values=None)
    loss, _, stats = ppo_loss(*ppo_inputs(**args), cfg=cfg, beta=0.0)
    assert loss.item() == pytest.approx((-1.2 + 0.45 + 0.8) / 3, **TOL)
    assert "loss/value" not in stats


def test_ppo_kl_in_loss():
    beta = 0.2
    cfg = PPOConfig(vf_coef=0.0, kl_in="loss", kl_estimator="k1", aggregation="sequence_sum")
    args = dict(PPO, ref_logp=PPO["logp"] + t([[0.3, -0.1], [0.2, 5.0]]))  # ref - logp; k1 = -(ref - logp)
    loss, _, _ = ppo_loss(*ppo_inputs(**args), cfg=cfg, beta=beta)
    row0 = -1.2 + beta * -0.3 + 0.45 + beta * 0.1
    row1 = 0.8 + beta * -0.2
    assert loss.item() == pytest.approx((row0 + row1) / 2, **TOL)


def test_ppo_value_gradient_is_zero_when_clipped_branch_wins():
    cfg = PPOConfig(vf_coef=1.0, clip_eps=100.0, aggregation="sequence_sum")
    values = PPO["values"].clone().requires_grad_(True)
    loss, _, _ = ppo_loss(*ppo_inputs(**dict(PPO, values=values)), cfg=cfg, beta=0.0)
    (g,) = torch.autograd.grad(loss, values)
    # (0,0): clipped branch wins -> 0;  (0,1): tie, both branches give V - R = 1.0 (clip inactive) -> 1.0 / B
    # (1,0): clipped branch wins -> 0;  (1,1): masked
    assert g[0, 0].item() == 0.0 and g[1, 0].item() == 0.0 and g[1, 1].item() == 0.0
    assert g[0, 1].item() == pytest.approx(1.0 / 2, **TOL)


# ---------------------------------------------------------------------------------------- advantages

REWARDS6 = [1.0, 2.0, 4.0, 0.0, 0.0, 3.0]  # two groups of 3


def test_grpo_advantages_group():
    A = grpo_advantages(t(REWARDS6), 3, "group", eps=1e-4)
    # group 0: mean 7/3, deviations [-4/3, -1/3, 5/3], unbiased var (16 + 1 + 25)/9 / 2 = 7/3
    # group 1: mean 1, deviations [-1, -1, 2], unbiased var (1 + 1 + 4) / 2 = 3
    s0, s1 = math.sqrt(7 / 3) + 1e-4, math.sqrt(3) + 1e-4
    assert_close(A, [-4 / 3 / s0, -1 / 3 / s0, 5 / 3 / s0, -1 / s1, -1 / s1, 2 / s1])


def test_grpo_advantages_batch():
    A = grpo_advantages(t(REWARDS6), 3, "batch", eps=0.01)
    # batch mean 5/3; squared deviations 4/9 + 1/9 + 49/9 + 25/9 + 25/9 + 16/9 = 120/9; unbiased var = 120/45 = 8/3
    s = math.sqrt(8 / 3) + 0.01
    assert_close(A, [-4 / 3 / s, -1 / 3 / s, 5 / 3 / s, -1 / s, -1 / s, 2 / s])


def test_grpo_advantages_none_and_constant_group():
    A = grpo_advantages(t(REWARDS6), 3, "none")
    assert_close(A, [-4 / 3, -1 / 3, 5 / 3, -1.0, -1.0, 2.0])
    # a group whose rewards are all equal: zero advantage, no division by zero (std 0 + eps)
    A = grpo_advantages(t([0.5, 0.5, 1.0, 0.0]), 2, "group", eps=1e-4)
    # group 1: deviations [0.5, -0.5], unbiased std sqrt(0.5)
    s = math.sqrt(0.5) + 1e-4
    assert_close(A, [0.0, 0.0, 0.5 / s, -0.5 / s])


def test_grpo_advantages_bad_group_size():
    with pytest.raises(ValueError):
        grpo_advantages(t(REWARDS6), 4)


def test_rloo_advantages():
    A = rloo_advantages(t(REWARDS6), 3)
    # A_i = R_i - mean of the other two
    expected = [1 - (2 + 4) / 2, 2 - (1 + 4) / 2, 4 - (1 + 2) / 2, 0 - (0 + 3) / 2, 0 - (0 + 3) / 2, 3 - (0 + 0) / 2]
    assert_close(A, expected)
    assert_close(A, [-2.0, -0.5, 2.5, -1.5, -1.5, 3.0])


def test_rloo_prepare_with_kl_in_reward():
    # two samples of one prompt, T = 2; k1 = old - ref = [[0.2, -0.1], [0.0, 0.4]], beta = 0.5
    roll = make_rollout(
        [[0.0, 1.0], [0.0, 3.0]],
        old_logp=[[-1.0, -0.5], [-0.5, -0.5]],
        ref_logp=[[-1.2, -0.4], [-0.5, -0.9]],
        group_size=2,
    )
    batch = rloo.prepare(roll, RLOOConfig(), beta=0.5)
    R0 = 1.0 - 0.5 * (0.2 - 0.1)  # 0.95
    R1 = 3.0 - 0.5 * (0.0 + 0.4)  # 2.8
    assert_close(batch.advantages, [[R0 - R1, R0 - R1], [R1 - R0, R1 - R0]])


def test_rloo_is_scaled_group_mean_baseline():
    # identity: R_i - (S - R_i)/(k - 1) = k/(k - 1) (R_i - S/k)
    g = torch.Generator().manual_seed(0)
    for k in (2, 3, 5):
        R = torch.randn(4 * k, generator=g, dtype=D)
        group_mean_adv = grpo_advantages(R, k, "none")
        assert_close(rloo_advantages(R, k), k / (k - 1) * group_mean_adv)
    # and on the hand example, k = 3: 3/2 * [-4/3, -1/3, 5/3, -1, -1, 2]
    assert_close(rloo_advantages(t(REWARDS6), 3), [1.5 * a for a in [-4 / 3, -1 / 3, 5 / 3, -1.0, -1.0, 2.0]])


def test_returns_to_go():
    G = returns_to_go(t([[1.0, 2.0, 3.0], [0.5, 0.0, 7.0]]), t([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]))
    assert_close(G, [[1 + 2 + 3, 2 + 3, 3], [0.5 + 0.0, 0.0, 0.0]])


# scores at the last token: [1, 0, 2, 4]; groups of 2: (1, 0), (2, 4)
RF_STEP = [[0.0, 1.0], [0.0, 0.0], [0.0, 2.0], [0.0, 4.0]]


@pytest.mark.parametrize(
    "baseline, expected",
    [
        ("none", [[1.0, 1.0], [0.0, 0.0], [2.0, 2.0], [4.0, 4.0]]),
        ("mean", [[1 - 7 / 4] * 2, [0 - 7 / 4] * 2, [2 - 7 / 4] * 2, [4 - 7 / 4] * 2]),  # batch mean 7/4
        ("group_mean", [[0.5, 0.5], [-0.5, -0.5], [-1.0, -1.0], [1.0, 1.0]]),  # group means 0.5 and 3
    ],
)
def test_reinforce_prepare_baselines(baseline, expected):
    roll = make_rollout(RF_STEP, group_size=2)
    batch = reinforce.prepare(roll, ReinforceConfig(baseline=baseline), beta=0.0)
    assert_close(batch.advantages, expected)


def test_reinforce_prepare_kl_in_reward():
    old = [[-1.0, -0.5], [-0.2, -0.3], [-1.0, -1.0], [-0.5, -0.5]]
    ref = [[-1.2, -0.4], [-0.2, -0.5], [-0.7, -1.0], [-0.5, -0.9]]
    # k1 = old - ref = [[0.2, -0.1], [0.0, 0.2], [-0.3, 0.0], [0.0, 0.4]]; beta = 0.5
    # r = step - beta k1 = [[-0.1, 1.05], [0.0, -0.1], [0.15, 2.0], [0.0, 3.8]]
    roll = make_rollout(RF_STEP, old_logp=old, ref_logp=ref, group_size=2)
    batch = reinforce.prepare(roll, ReinforceConfig(baseline="none"), beta=0.5)
    assert_close(batch.advantages, [[-0.1 + 1.05, 1.05], [-0.1, -0.1], [0.15 + 2.0, 2.0], [3.8, 3.8]])
    assert batch.kl_metric == "kl/k1_reward"
    assert_close(batch.kl, [[0.2, -0.1], [0.0, 0.2], [-0.3, 0.0], [0.0, 0.4]])
    # group mean of G: group 0 = [(0.95 - 0.1)/2, (1.05 - 0.1)/2], group 1 = [(2.15 + 3.8)/2, (2.0 + 3.8)/2]
    batch = reinforce.prepare(roll, ReinforceConfig(baseline="group_mean"), beta=0.5)
    b0, b1 = [0.425, 0.475], [2.975, 2.9]
    assert_close(
        batch.advantages,
        [
            [0.95 - b0[0], 1.05 - b0[1]],
            [-0.1 - b0[0], -0.1 - b0[1]],
            [2.15 - b1[0], 2.0 - b1[1]],
            [3.8 - b1[0], 3.8 - b1[1]],
        ],
    )
    # with the KL in the loss the returns carry no KL
    batch = reinforce.prepare(roll, ReinforceConfig(baseline="none", kl_in="loss"), beta=0.5)
    assert_close(batch.advantages, [[1.0, 1.0], [0.0, 0.0], [2.0, 2.0], [4.0, 4.0]])


def test_reinforce_prepare_bad_group_size():
    roll = make_rollout(RF_STEP[:3], group_size=2)
    with pytest.raises(ValueError):
        reinforce.prepare(roll, ReinforceConfig(baseline="group_mean"), beta=0.0)


def test_gae_hand_unrolled():
    gamma, lam = 0.9, 0.8
    rewards = t([[0.1, -0.2, 1.0], [0.0, 1.0, 0.0]])
    values = t([[0.5, 0.3, 0.8], [0.2, 0.4, 9.0]])  # 9.0 sits under the mask: V = 0 there
    mask = t([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma, lam)
    # row 0
    d2 = 1.0 + gamma * 0.0 - 0.8  # 0.2
    d1 = -0.2 + gamma * 0.8 - 0.3  # 0.22
    d0 = 0.1 + gamma * 0.3 - 0.5  # -0.13
    a2 = d2
    a1 = d1 + gamma * lam * a2  # 0.364
    a0 = d0 + gamma * lam * a1  # 0.13208
    # row 1: the episode ends after t = 1
    e1 = 1.0 + gamma * 0.0 - 0.4  # 0.6
    e0 = 0.0 + gamma * 0.4 - 0.2  # 0.16
    b1 = e1
    b0 = e0 + gamma * lam * b1  # 0.592
    assert_close(adv, [[a0, a1, a2], [b0, b1, 0.0]])
    assert_close(adv, [[0.13208, 0.364, 0.2], [0.592, 0.6, 0.0]])
    assert_close(ret, [[a0 + 0.5, a1 + 0.3, a2 + 0.8], [b0 + 0.2, b1 + 0.4, 0.0]])


def test_gae_lambda_zero_is_td_error():
    rewards, values = t([[0.1, -0.2, 1.0]]), t([[0.5, 0.3, 0.8]])
    adv, _ = gae(rewards, values, torch.ones(1, 3, dtype=D), gamma=0.9, lam=0.0)
    assert_close(adv, [[0.1 + 0.9 * 0.3 - 0.5, -0.2 + 0.9 * 0.8 - 0.3, 1.0 - 0.8]])


def test_masked_whiten():
    x = t([[1.0, 2.0, 3.0], [4.0, 100.0, -50.0]])
    mask = t([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    out = masked_whiten(x, mask)
    # masked entries 1..4: mean 2.5, squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5, unbiased var 5/3
    s = math.sqrt(5 / 3 + 1e-8)
    assert_close(out[mask.bool()], [(1 - 2.5) / s, (2 - 2.5) / s, (3 - 2.5) / s, (4 - 2.5) / s])
    out = masked_whiten(x, mask, shift_mean=False)
    assert_close(out[mask.bool()], [(1 - 2.5) / s + 2.5, (2 - 2.5) / s + 2.5, (3 - 2.5) / s + 2.5, (4 - 2.5) / s + 2.5])


# ---------------------------------------------------------------------------------------- identities


def test_gae_with_unit_gamma_lambda_and_zero_values_is_returns_to_go():
    g = torch.Generator().manual_seed(1)
    rewards = torch.randn(3, 5, generator=g, dtype=D)
    for mask in (torch.ones(3, 5, dtype=D), t([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])):
        adv, ret = gae(rewards, torch.zeros(3, 5, dtype=D), mask, gamma=1.0, lam=1.0)
        rtg = returns_to_go(rewards, mask)
        assert_close(adv, rtg)
        assert_close(ret, rtg)
    # on a hand example: G = [3.5, 2.5, 0.5]
    adv, _ = gae(t([[1.0, 2.0, 0.5]]), torch.zeros(1, 3, dtype=D), torch.ones(1, 3, dtype=D), 1.0, 1.0)
    assert_close(adv, [[3.5, 2.5, 0.5]])


def test_ppo_prepare_without_critic_is_returns_to_go_of_kl_shaped_reward():
    # old - ref = k1 = [[0.2, -0.4]]; beta = 0.5 -> r = [-0.1, 3.0 + 0.2] -> G = [3.1, 3.2]
    roll = make_rollout([[0.0, 3.0]], old_logp=[[-1.0, -1.0]], ref_logp=[[-1.2, -0.6]])
    cfg = PPOConfig(use_value_head=False, gamma=1.0, lam=1.0, whiten_advantages=False)
    batch = ppo.prepare(roll, cfg, beta=0.5)
    assert_close(batch.advantages, [[3.1, 3.2]])
    assert_close(batch.returns, [[3.1, 3.2]])


@pytest.mark.parametrize("aggregation", ["sequence_mean", "token_mean", "constant", "sequence_sum"])
def test_on_policy_grpo_equals_reinforce_group_mean(aggregation):
    B, T, V, G = 6, 3, 5, 3
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(B, T, V, generator=g, dtype=D, requires_grad=True)
    tokens = torch.randint(V, (B, T), generator=g)
    scores = [1.0, 0.0, 0.5, 2.0, -1.0, 0.0]
    step = [[0.0, 0.0, s] for s in scores]

    def logp_of(lg):
        return lg.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)

    logp = logp_of(logits)
    ref = torch.randn(B, T, generator=g, dtype=D)
    roll = make_rollout(step, old_logp=logp.detach(), ref_logp=ref, group_size=G)

    gcfg = GRPOConfig(scale_rewards="none", aggregation=aggregation)
    gb = grpo.prepare(roll, gcfg, beta=0.0)
    g_loss, _, _ = grpo_loss(out(logp), gb, gcfg, 0.0)
    (g_grpo,) = torch.autograd.grad(g_loss, logits)

    rcfg = ReinforceConfig(baseline="group_mean", aggregation=aggregation)
    rb = reinforce.prepare(roll, rcfg, beta=0.0)
    r_loss, _, _ = reinforce_loss(out(logp_of(logits)), rb, rcfg, 0.0)
    (g_rf,) = torch.autograd.grad(r_loss, logits)

    # both advantages are r_i - mean_group(r) on every token: groups (1, 0, 0.5) mean 0.5, (2, -1, 0) mean 1/3
    expected_adv = [[a] * T for a in [0.5, -0.5, 0.0, 2 - 1 / 3, -1 - 1 / 3, 0 - 1 / 3]]
    assert_close(gb.advantages, expected_adv)
    assert_close(rb.advantages, expected_adv)
    assert g_grpo.abs().max() > 1e-3
    torch.testing.assert_close(g_grpo, g_rf, rtol=1e-10, atol=1e-12)
