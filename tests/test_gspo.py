"""GSPO (Zheng et al. 2025, arXiv 2507.18071): GRPO with ``importance_sampling_level = "sequence"``.

    s_i = exp((1/|y_i|) sum_t m_it (log pi - log pi_old)),  L = -1/B sum_i min(s_i A_i, clip(s_i) A_i)

Checked three ways: a batch small enough to do by hand (value and gradient), TRL 1.16's own
``GRPOTrainer.compute_loss`` with ``importance_sampling_level="sequence"`` (value and every parameter's
gradient at 1e-5 in float32), and short training runs that raise the exact gold reward.
"""

from __future__ import annotations

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from test_trl_parity import (  # noqa: E402, F401  (grpo_model_dir: the fixture, used by name)
    TASK,
    TOL,
    G,
    T,
    action_token_ids,
    assert_same_grads,
    full_vocab,
    grads_of,
    grpo_model_dir,
    grpo_trainer,
    varied_lengths,
)

from workbench.algorithms import grpo  # noqa: E402
from workbench.config import resolve  # noqa: E402
from workbench.core.types import PolicyOutput  # noqa: E402
from workbench.models.policy import Policy  # noqa: E402
from workbench.training import train  # noqa: E402

SEQ = grpo.GRPOConfig(importance_sampling_level="sequence")


def _loss(logp, old_logp, adv, mask, cfg, beta=0.0, ref_logp=None):
    batch = grpo.GRPOBatch(
        advantages=adv[:, None] * mask,
        old_logp=old_logp,
        ref_logp=old_logp if ref_logp is None else ref_logp,
        mask=mask,
    )
    return grpo.grpo_loss(PolicyOutput(logp=logp, logits=None, values=None), batch, cfg, beta)


def test_gspo_loss_and_gradient_equal_hand_computed_values():
    """Three rows, eps 0.2 both sides, beta 0, ``sequence_mean``:

    row 1: log-ratios (0.1, 0.3), A = +1: s = e^0.2 = 1.2214 > 1.2, clipped -> L_1 = -1.2, no gradient;
    row 2: log-ratios (-0.5, pad), A = -1: s = e^-0.5 = 0.6065 < 0.8, clipped -> L_2 = +0.8, no gradient;
    row 3: log-ratios (0.05, -0.05), A = +2: s = 1 -> L_3 = -2; dL_3/dlogp_t = -A s / |y| = -1.
    loss = (-1.2 + 0.8 - 2) / 3 = -0.8; d loss / d logp = row 3 only, -1/3 per token.
    """
    old = torch.tensor([[-1.0, -2.0], [-1.5, -0.7], [-0.3, -0.9]])
    delta = torch.tensor([[0.1, 0.3], [-0.5, 0.4], [0.05, -0.05]])  # row 2's second token is padding
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    adv = torch.tensor([1.0, -1.0, 2.0])
    logp = (old + delta).requires_grad_()
    loss, per_token, stats = _loss(logp, old, adv, mask, SEQ)
    assert loss.item() == pytest.approx(-0.8, abs=1e-6)
    loss.backward()
    expected = torch.tensor([[0.0, 0.0], [0.0, 0.0], [-1 / 3, -1 / 3]])
    torch.testing.assert_close(logp.grad, expected, rtol=0, atol=1e-6)
    # per-token loss: each counted token of row i carries L_i
    torch.testing.assert_close(per_token.detach(), torch.tensor([[-1.2, -1.2], [0.8, 0.0], [-2.0, -2.0]]))
    # clip statistics over tokens: row 1 (2 tokens) high, row 2 (1 token) low, of 5 counted tokens
    assert stats["clip/high_ratio"] == pytest.approx(2 / 5)
    assert stats["clip/low_ratio"] == pytest.approx(1 / 5)
    assert stats["clip/ratio"] == pytest.approx(3 / 5)
    # the token-level ratio gives another value on the same batch: row 1 becomes (-e^0.1, -1.2)
    tok, _, _ = _loss((old + delta), old, adv, mask, grpo.GRPOConfig())
    hand_tok = ((-math.exp(0.1) - 1.2) / 2 + 0.8 + (-2 * math.exp(0.05) - 2 * math.exp(-0.05)) / 2) / 3
    assert tok.item() == pytest.approx(hand_tok, abs=1e-6)
    assert abs(tok.item() - loss.item()) > 1e-3


def test_gspo_with_kl_equals_hand_computed_value():
    """k3 KL in the loss, with and without the ratio correction (TRL multiplies kl_it by s_i)."""
    old = torch.tensor([[-1.0, -2.0]])
    logp = torch.tensor([[-0.9, -2.1]])  # log-ratios (0.1, -0.1): s = 1
    ref = torch.tensor([[-1.2, -1.8]])
    mask = torch.ones(1, 2)
    adv = torch.tensor([0.5])
    beta = 0.1
    k3 = [math.exp(r - p) - (r - p) - 1 for r, p in zip(ref[0].tolist(), logp[0].tolist(), strict=True)]
    for corr in (False, True):
        cfg = SEQ.model_copy(update={"kl_ratio_correction": corr})
        loss, _, stats = _loss(logp, old, adv, mask, cfg, beta, ref)
        assert loss.item() == pytest.approx(-0.5 + beta * sum(k3) / 2, abs=1e-6)  # s = 1: the correction is x1
        assert stats["kl/k3_loss"] == pytest.approx(sum(k3), abs=1e-6)


def test_default_is_token_level_and_keeps_run_ids():
    assert grpo.GRPOConfig().importance_sampling_level == "token"
    raw = {"task": {"name": "bandit"}, "algo": {"name": "grpo"}}
    base = resolve(raw, {})
    same = resolve(raw, {"algo.importance_sampling_level": "token"})
    other = resolve(raw, {"algo.importance_sampling_level": "sequence"})
    assert base.config_hash == same.config_hash != other.config_hash
    with pytest.raises(Exception, match="importance_sampling_level"):
        resolve(raw, {"algo.importance_sampling_level": "seq"})


@pytest.mark.parametrize("beta, correction", [(0.0, False), (0.04, False), (0.04, True)])
def test_gspo_loss_and_gradient_match_trl(beta, correction, grpo_model_dir, tmp_path):  # noqa: F811
    """``grpo_loss`` with ``importance_sampling_level="sequence"`` == ``GRPOTrainer.compute_loss`` with TRL's
    ``importance_sampling_level="sequence"`` and ``loss_type="grpo"`` (the GSPO paper's per-sequence objective;
    TRL warns that the token-summing loss types weight sequences by length). Completions of different lengths,
    asymmetric clip bounds, ``old_logp`` far enough from ``logp`` that both bounds bite on whole sequences."""
    eps_low, eps_high = 0.05, 0.08
    trainer, tok = grpo_trainer(
        grpo_model_dir,
        tmp_path,
        beta=beta,
        loss_type="grpo",
        importance_sampling_level="sequence",
        epsilon=eps_low,
        epsilon_high=eps_high,
        use_bias_correction_kl=correction,
    )
    model = trainer.model.eval()
    policy = full_vocab(Policy(model, tok, TASK))

    g = torch.Generator().manual_seed(5)
    prompts = TASK.sample_prompts(2, g).repeat_interleave(G, dim=0)  # (B, 1), B = 2G
    B = len(prompts)
    comps = TASK.random_completions(B, g)
    lengths = torch.tensor(varied_lengths(B, g))
    mask = (torch.arange(T) < lengths[:, None]).float()  # (B, T)
    comp_ids = torch.where(mask.bool(), action_token_ids(tok)[comps], tok.pad_token_id)
    advantages = grpo.grpo_advantages(TASK.reward(prompts, comps) + torch.arange(B) % 3 * 0.1, G)
    with torch.no_grad():
        logp0 = policy(prompts, comp_ids).logp
    old_logp = (logp0 + 0.3 * torch.randn(B, T, generator=g)) * mask  # TRL's log-probs are 0 off the mask
    ref_logp = (logp0 + 0.5 * torch.randn(B, T, generator=g)) * mask
    inputs = {
        "prompt_ids": policy.input_ids(prompts),
        "prompt_mask": torch.ones(B, 1 + TASK.prompt_len, dtype=torch.long),
        "completion_ids": comp_ids,
        "completion_mask": mask.long(),
        "advantages": advantages,
        "old_per_token_logps": old_logp,
        "num_items_in_batch": mask.sum(),
    }
    if beta:
        inputs["ref_per_token_logps"] = ref_logp
    trl_loss = trainer.compute_loss(model, inputs)
    trl_grads = grads_of(model, trl_loss)

    cfg = grpo.GRPOConfig(
        clip_eps_low=eps_low,
        clip_eps_high=eps_high,
        kl_ratio_correction=correction,
        importance_sampling_level="sequence",
    )
    logp = policy(prompts, comp_ids).logp
    loss, _, stats = _loss(logp, old_logp, advantages, mask, cfg, beta, ref_logp)
    # the batch makes both sequence-level clip bounds bite, and some sequence stay inside them
    s = (((logp - old_logp) * mask).sum(-1) / mask.sum(-1)).exp()
    a = advantages
    assert ((s < 1 - eps_low) & (a < 0)).any() and ((s > 1 + eps_high) & (a > 0)).any()
    assert ((s > 1 - eps_low) & (s < 1 + eps_high) & (a != 0)).any()
    assert stats["clip/low_ratio"] > 0 and stats["clip/high_ratio"] > 0

    torch.testing.assert_close(loss, trl_loss.float(), **TOL)
    assert_same_grads(grads_of(model, loss), trl_grads)
    # the token-level loss differs on this batch, so the match above is GSPO's and not GRPO's
    tok_loss, _, _ = _loss(
        logp.detach(),
        old_logp,
        advantages,
        mask,
        grpo.GRPOConfig(**{**cfg.model_dump(), "importance_sampling_level": "token"}),
        beta,
        ref_logp,
    )
    assert not torch.isclose(tok_loss, loss.detach(), rtol=1e-3, atol=1e-5)


def _exact_reward(tmp_path, task: dict, level: str, steps: int) -> list[float]:
    sets = {
        "model.n_layer": 1,
        "model.n_embd": 32,
        "batch_size": 32,
        "group_size": 4,
        "lr": 3e-3,
        "steps": steps,
        "eval_every": steps,
        "probe_every": 0,
        "save_checkpoint": False,
        "algo.importance_sampling_level": level,
        "algo.epochs": 2,  # a second pass over each rollout: s_i moves off 1 and its clip acts
    }
    res = resolve({"task": task, "algo": {"name": "grpo"}}, sets)
    out = tmp_path / f"{task['name']}_{level}"
    assert train(res, out, progress=False)["status"] == "done"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("clip/ratio", 0) > 0 for r in rows)  # the sequence clip was exercised
    return [r["reward/exact"] for r in rows if "reward/exact" in r]


@pytest.mark.parametrize("task", [{"name": "bandit"}, {"name": "sequence", "length": 4}], ids=["bandit", "sequence"])
def test_gspo_raises_gold_reward(task, tmp_path):
    """30 updates of GSPO from the same start: the exact expected gold reward rises by more than 0.15.

    On the bandit (one token per completion) s_i = rho_i, so GSPO's run is GRPO's, number for number.
    """
    exact = _exact_reward(tmp_path, task, "sequence", 30)
    assert exact[-1] > exact[0] + 0.15, exact
    if task["name"] == "bandit":
        assert _exact_reward(tmp_path, task, "token", 30) == exact
