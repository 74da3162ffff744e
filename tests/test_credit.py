"""Exact credit assignment: the dynamic programme against brute force, Monte Carlo and the decisive task."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from workbench.analysis.credit import (
    ExactCredit,
    compare,
    completion_index,
    conditional_logprobs,
    decisive_positions,
    exact_advantages,
    step_rewards_all,
)
from workbench.analysis.exact import ExactEvaluator, exact_logprobs
from workbench.analysis.probe import Estimators, make_objective
from workbench.config import resolve
from workbench.models.policy import build_policy
from workbench.toy_tasks.bandit import Bandit, BanditConfig
from workbench.toy_tasks.sequence import Sequence, SequenceConfig

CPU = torch.device("cpu")
D = torch.float64
Z = 4.5


def tiny_policy(task, tiny_model_cfg, seed=0, noise=0.5):
    pol = build_policy(task, tiny_model_cfg, seed, value_head=False, device=CPU)
    ref = pol.frozen_copy()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in pol.model.parameters():
            p.add_(noise * torch.randn(p.shape, generator=g))
    return pol, ref


# ------------------------------------------------------------------- the dynamic programme


def test_dp_equals_conditional_expectations_by_brute_force():
    """Q(s_t, a) = E[sum_{t'>=t} R_t' | y_<=t], V(s_t) = E[... | y_<t], summed directly over completions."""
    g = torch.Generator().manual_seed(0)
    P, A, T, beta = 2, 3, 3, 0.3
    logp = torch.log_softmax(torch.randn(P, A**T, generator=g, dtype=D), -1)
    ref = torch.log_softmax(torch.randn(P, A**T, generator=g, dtype=D), -1)
    R = torch.randn(P, A**T, T, generator=g, dtype=D)  # rewards may depend on the whole completion
    out = exact_advantages(logp, R, A, T, ref, beta)
    comps = list(itertools.product(range(A), repeat=T))
    cond, cond_ref = conditional_logprobs(logp, A, T), conditional_logprobs(ref, A, T)
    ret = (R - beta * (cond - cond_ref)).flip(-1).cumsum(-1).flip(-1)  # return-to-go with the KL reward
    p = logp.exp()
    for x in range(P):
        for n, y in enumerate(comps):
            for t in range(T):
                same_q = torch.tensor([z[: t + 1] == y[: t + 1] for z in comps])
                same_v = torch.tensor([z[:t] == y[:t] for z in comps])
                q = (p[x] * ret[x, :, t])[same_q].sum() / p[x][same_q].sum()
                v = (p[x] * ret[x, :, t])[same_v].sum() / p[x][same_v].sum()
                assert out["q"][x, n, t].item() == pytest.approx(q.item(), abs=1e-12)
                assert out["v"][x, n, t].item() == pytest.approx(v.item(), abs=1e-12)
    # conditionals are distributions and multiply back to the sequence probability
    torch.testing.assert_close(cond.sum(-1), logp)
    assert out["adv"].shape == (P, A**T, T)


def continuations(pol, prompt: torch.Tensor, prefix: list[int], n: int, T: int, gen) -> torch.Tensor:
    """``(n, T)`` completions sampled from pi given ``prefix`` (teacher-forced, one position at a time)."""
    comps = torch.zeros(n, T, dtype=torch.long)
    comps[:, : len(prefix)] = torch.tensor(prefix)
    prompts = prompt.expand(n, -1)
    with torch.no_grad():
        for t in range(len(prefix), T):
            logits = pol(prompts, comps, values=False).logits[
                :, t, :
            ]  # log pi(. | x, y_<t): causal, later tokens unseen
            comps[:, t] = torch.multinomial(logits.exp(), 1, generator=gen)[:, 0]
    return comps


def test_dp_advantages_match_monte_carlo(tiny_model_cfg):
    """A(s_t, a) by DP vs Q_MC - V_MC from continuations sampled from the policy itself, with the
    -beta log(pi/pi_ref) reward, at every position of a few sampled completions: within 4.5 standard
    errors. Negative controls: the DP without the KL reward, and Q without subtracting V, are rejected."""
    task = Sequence(SequenceConfig(vocab_size=3, length=3, n_prompts=2, threshold=2))  # pass/fail at 2 matches
    pol, ref = tiny_policy(task, tiny_model_cfg, noise=0.4)
    beta, T, A = 0.5, 3, 3
    ev = ExactEvaluator(task, ref, beta)
    credit = ExactCredit(task, ev.ref_logp, beta)
    adv = credit.advantages(pol, kl_reward=True)  # (P, N, T)
    adv_no_kl = credit.advantages(pol, kl_reward=False)
    logp_all = exact_logprobs(pol, task).detach()
    q_only = exact_advantages(logp_all, credit.step_rewards, A, T, ev.ref_logp, beta)["q"]
    gen = torch.Generator().manual_seed(0)
    n = 3000

    def returns(prompt, comps, t):  # sum_{t' >= t} r_t' - beta log(pi/pi_ref)(y_t')
        with torch.no_grad():
            lp = pol(prompt.expand(len(comps), -1), comps, values=False).logp
            rl = ref(prompt.expand(len(comps), -1), comps).logp
        r = task.process_reward(prompt.expand(len(comps), -1), comps) - beta * (lp - rl)
        return r[:, t:].sum(-1).double()

    checked, rejected_no_kl, rejected_q = 0, 0, 0
    for x in range(2):
        prompt = torch.tensor([[x]])
        y = continuations(pol, prompt, [], 1, T, gen)[0].tolist()  # one sampled completion per prompt
        for t in range(T):
            gq = returns(prompt, continuations(pol, prompt, y[: t + 1], n, T, gen), t)  # a_t = y_t fixed
            gv = returns(prompt, continuations(pol, prompt, y[:t], n, T, gen), t)  # a_t ~ pi
            a_mc = gq.mean() - gv.mean()
            se = math.sqrt(gq.var().item() / n + gv.var().item() / n)
            col = completion_index(torch.tensor([y]), A).item()
            assert abs(adv[x, col, t].item() - a_mc.item()) < Z * se, (x, y, t, adv[x, col, t].item(), a_mc.item(), se)
            rejected_no_kl += abs(adv_no_kl[x, col, t].item() - a_mc.item()) > Z * se
            rejected_q += abs(q_only[x, col, t].item() - a_mc.item()) > Z * se
            checked += 1
    assert checked == 6 and rejected_no_kl >= 3 and rejected_q >= 3, (rejected_no_kl, rejected_q)


# ------------------------------------------------------------------- the decisive-position task


@pytest.mark.parametrize("variant_dense", [False, True])
def test_decisive_task_advantage_is_zero_after_the_decisive_position_for_any_policy(tiny_model_cfg, variant_dense):
    """Decisive task (L = 4, j = 1), reward m_j paid at the end (outcome) or at j (process), no KL reward.

    What is tested, precisely:
    - t > j: A(s_t, a) = 0 exactly, for a transformer policy whose choices depend on the whole prefix
      (the reward is already decided by y_j, whatever comes after);
    - t = j: A is not zero (the choice of y_j decides the reward);
    - t < j: A is *not* zero in general (here the transformer's choice at j depends on y_<j), but it is
      exactly zero for a policy whose distribution at j does not depend on the earlier tokens
      (a product of per-position distributions, fed to the same DP).
    """
    task = Sequence(SequenceConfig(vocab_size=3, length=4, n_prompts=2, variant="decisive", decisive_position=1))
    j, A, T = 1, 3, 4
    pol, _ = tiny_policy(task, tiny_model_cfg, noise=0.8)
    comps = task.all_completions()
    R = step_rewards_all(task, task.eval_prompts(), comps, dense=variant_dense)
    logp = exact_logprobs(pol, task).detach()
    adv = exact_advantages(logp, R, A, T)["adv"]
    assert adv[..., j + 1 :].abs().max() < 1e-12
    assert adv[..., j].abs().max() > 0.1
    assert adv[..., :j].abs().max() > 1e-4  # prefix-dependent policy: earlier tokens carry credit

    g = torch.Generator().manual_seed(1)
    per_pos = torch.log_softmax(
        torch.randn(2, T, A, generator=g, dtype=D), -1
    )  # q_t(a) per prompt, no prefix dependence
    logp_prod = sum(per_pos[:, t, comps[:, t]] for t in range(T))  # (P, N)
    adv_prod = exact_advantages(logp_prod, R, A, T)["adv"]
    assert adv_prod[..., :j].abs().max() < 1e-12 and adv_prod[..., j + 1 :].abs().max() < 1e-12
    assert adv_prod[..., j].abs().max() > 0.1


def test_decisive_positions():
    seq = lambda **k: Sequence(SequenceConfig(vocab_size=2, length=3, n_prompts=2, **k))  # noqa: E731
    for task, expected in [
        (seq(variant="decisive", decisive_position=2), [False, False, True]),
        (seq(), [True, True, True]),
        (seq(threshold=3), [True, True, True]),
        (Bandit(BanditConfig(n_arms=3)), [True]),
    ]:
        comps, prompts = task.all_completions(), task.eval_prompts()
        P, N = len(prompts), len(comps)
        r = task.reward(prompts.repeat_interleave(N, 0), comps.repeat(P, 1)).view(P, N)
        assert decisive_positions(task, r).tolist() == expected


# ------------------------------------------------------------------- comparisons


def test_compare_by_hand():
    exact = torch.tensor([[0.0, 1.0, 0.0], [0.0, -1.0, 0.0]])
    method = torch.tensor([[0.5, 0.5, 0.5], [-0.5, -0.5, -0.5]])  # a per-sequence constant, as GRPO's
    mask = torch.ones(2, 3)
    decisive = torch.tensor([False, True, False])
    s, rows = compare(method, exact, mask, decisive)
    assert s["decisive_share"] == pytest.approx(1 / 3) and s["decisive_share_exact"] == pytest.approx(1.0)
    assert s["mse"] == pytest.approx((0.25 * 4 + 0.25 * 2) / 6)
    # corr over the 6 tokens: exact (0,1,0,0,-1,0), method (.5,.5,.5,-.5,-.5,-.5)
    assert s["corr"] == pytest.approx(1 / math.sqrt(3))
    assert [r["share"] for r in rows] == pytest.approx([1 / 3] * 3)
    assert rows[1]["decisive"] and rows[1]["corr"] == pytest.approx(1.0) and rows[1]["exact_abs"] == pytest.approx(1.0)


def test_methods_advantages_against_exact_on_decisive_task():
    """GRPO's per-sequence advantage spreads its mass evenly over the positions (1/L on the decisive one);
    the exact advantage (no KL reward for GRPO) puts all of it at or before the decisive position."""
    res = resolve(
        {
            "task": {"name": "sequence", "vocab_size": 3, "length": 4, "variant": "decisive", "decisive_position": 2},
            "algo": {"name": "grpo"},
        },
        {"model.n_layer": 1, "model.n_embd": 16, "model.n_head": 2, "group_size": 4},
    )
    pol = build_policy(res.task, res.run.model, 0, False, CPU)
    ref = pol.frozen_copy()
    ev = ExactEvaluator(res.task, ref, res.run.beta)
    credit = ExactCredit(res.task, ev.ref_logp, res.run.beta)
    est = Estimators(res, ref, ev, CPU, seed=0)
    obj = make_objective(res, "grpo")
    rolls = est.rollouts_for(pol, 16, 4, 8)
    with torch.no_grad():
        batches = [obj.spec.prepare(r, obj.cfg, res.run.beta) for r in rolls]
    adv = credit.advantages(pol, kl_reward=False)
    exact = torch.cat([credit.at(adv, r.prompts, r.completions) for r in rolls])
    method = torch.cat([b.advantages for b in batches])
    s, rows = compare(method, exact, torch.ones_like(method), credit.decisive)
    assert s["decisive_share"] == pytest.approx(0.25, abs=1e-6)
    assert rows[3]["exact_abs"] < 1e-9 and s["decisive_share_exact"] > 0.5
    assert s["corr"] > 0.2  # same sign at the decisive position
