"""Gradients against exact truth: closed forms on bandits, unbiasedness on a sequence task, fast paths.

Every interval test is seeded and uses 4.5 standard errors; each has a negative control
(the wrong formula) that the same test rejects, so the interval is narrow enough to matter.
"""

from __future__ import annotations

import math

import pytest
import torch

from workbench.analysis.exact import ExactEvaluator, exact_logprobs
from workbench.analysis.gradients import (
    dataset_gradient,
    exact_rl_gradient,
    flatten,
    gradient_stats,
    lm_params,
    minibatch_gradients,
    offline_losses,
    online_losses,
    sample_batches,
)
from workbench.analysis.probe import Estimators, make_objective
from workbench.config import resolve
from workbench.core.stats import trace_cov
from workbench.models.policy import build_policy

CPU = torch.device("cpu")
TINY = {"model.n_layer": 1, "model.n_embd": 16, "model.n_head": 2}
Z = 4.5


def setup(task: dict, algo: str = "reinforce", beta: float = 0.2, noise: float = 0.5, seed: int = 0, **sets):
    """A tiny policy moved away from its reference (so the KL term matters), its reference, exact evaluator."""
    res = resolve({"task": task, "algo": {"name": algo}}, {**TINY, "beta": beta, **sets})
    pol = build_policy(res.task, res.run.model, seed, res.spec.value_head(res.algo_cfg), CPU)
    ref = pol.frozen_copy()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in pol.model.parameters():
            p.add_(noise * torch.randn(p.shape, generator=g))
    exact = ExactEvaluator(res.task, ref, beta) if res.task.enumerable else None
    return res, pol, ref, exact


# ------------------------------------------------------------------- two-armed bandit: closed-form variance


def arm_scores(pol, res):
    """Per arm a: log pi(a), and the exact score vector s_a = grad_theta log pi(a) (autograd, 2 arms)."""
    params = list(lm_params(pol).values())
    prompt = torch.zeros(1, 1, dtype=torch.long)
    logp, scores = [], []
    for a in range(2):
        lp = pol(prompt, torch.tensor([[a]]), values=False).logp.sum()
        scores.append(flatten(torch.autograd.grad(lp, params)).double())
        logp.append(lp.item())
    return torch.tensor(logp, dtype=torch.float64), scores


def closed_form_variance(
    p0: float, R: list[float], s: list[torch.Tensor], B: int, baseline: str
) -> tuple[float, float]:
    """Exact tr Cov of the minibatch REINFORCE loss gradient, and the exact std of d = ||g - E g||^2.

    Per sample, the loss gradient is -(R_a - b) s_a with a ~ pi, R_a = r_a - beta log(pi(a)/pi_ref(a)).
    With 2 arms a batch is summarised by n, the count of arm 0, n ~ Binomial(B, p0):
        none: g(n) = -(1/B) [n R_0 s_0 + (B - n) R_1 s_1]
        mean: g(n) = -(1/B) [n (R_0 - Rbar) s_0 + (B - n)(R_1 - Rbar) s_1],  Rbar = (n R_0 + (B - n) R_1) / B
    and the moments are sums over n. (No baseline also has the textbook form
    (1/B)(E[R^2 s s^T] - mu mu^T), checked below.)
    """
    probs, gs = [], []
    for n in range(B + 1):
        probs.append(math.comb(B, n) * p0**n * (1 - p0) ** (B - n))
        b = (n * R[0] + (B - n) * R[1]) / B if baseline == "mean" else 0.0
        gs.append(-(n * (R[0] - b) * s[0] + (B - n) * (R[1] - b) * s[1]) / B)
    P = torch.tensor(probs, dtype=torch.float64)
    G = torch.stack(gs)
    mu = (P[:, None] * G).sum(0)
    d = ((G - mu) ** 2).sum(1)
    tr = (P * d).sum().item()
    return tr, math.sqrt(max((P * d**2).sum().item() - tr**2, 0.0))


def test_reinforce_variance_matches_closed_form_on_two_armed_bandit():
    res, pol, ref, exact = setup({"name": "bandit", "n_arms": 2, "reward_shape": "linear"}, beta=0.3, noise=0.2)
    logp, s = arm_scores(pol, res)
    ref_logp = exact.ref_logp[0].double()
    p0 = logp[0].exp().item()
    assert 0.15 < p0 < 0.85 and (logp - ref_logp).abs().max() > 0.1  # a non-trivial policy, away from pi_ref
    r = res.task.table[0].double()
    R = (r - 0.3 * (logp - ref_logp)).tolist()  # R_a = r_a - beta log(pi/pi_ref): k1 in the reward

    # the textbook form for no baseline, with B = 1
    p = torch.tensor([p0, 1 - p0], dtype=torch.float64)
    mu = sum(p[a] * R[a] * s[a] for a in range(2))
    textbook = sum(p[a] * R[a] ** 2 * s[a] @ s[a] for a in range(2)) - mu @ mu
    assert closed_form_variance(p0, R, s, 1, "none")[0] == pytest.approx(textbook.item(), rel=1e-9)

    B, K = 4, 800
    est = Estimators(res, ref, exact, CPU, seed=1)
    closed = {b: closed_form_variance(p0, R, s, B, b) for b in ("none", "mean")}
    measured = {}
    for name, b in (("reinforce", "none"), ("reinforce_mean", "mean")):
        G, _, _ = est.gradients(pol, make_objective(res, name), B, K)
        measured[b] = trace_cov(G)[0]
    for b in ("none", "mean"):
        tr, sd = closed[b]
        se = sd / math.sqrt(K)
        assert abs(measured[b] - tr) < Z * se, (b, measured[b], tr, se)
        other = closed["mean" if b == "none" else "none"][0]
        assert abs(measured[b] - other) > Z * se, "negative control: the other estimator's variance must be rejected"
    assert closed["mean"][0] < closed["none"][0]  # the baseline reduces the variance here


# ------------------------------------------------------------------- exact gradient


def test_exact_gradient_equals_closed_form_on_bandit():
    """grad(-J) by enumeration == the hand-derived gradient through the policy's log-probs.

    J = (1/C) sum_c sum_k p_ck r_ck - beta p_ck log(p_ck / q_ck); with l = log p as the network's output,
    dJ/dl_ck = (1/C) p_ck (r_ck - beta log(p_ck / q_ck) - beta), and the constant -beta drops out
    because sum_k p_ck dl_ck/dtheta = 0.
    """
    beta = 0.25
    res, pol, ref, exact = setup({"name": "bandit", "n_arms": 5, "n_contexts": 3}, beta=beta)
    g = exact_rl_gradient(pol, res.task, exact.ref_logp, exact.rewards, beta)
    prompts = res.task.eval_prompts()
    C = len(prompts)
    logl = pol(prompts, torch.zeros(C, 1, dtype=torch.long), values=False).logits[:, 0, :]  # (C, K) log pi(.|c)
    p, q, r = logl.detach().exp(), exact.ref_logp, res.task.table
    dJ_dl = p * (r - beta * (logl.detach() - q)) / C
    hand = flatten(torch.autograd.grad(logl, list(lm_params(pol).values()), grad_outputs=-dJ_dl))
    torch.testing.assert_close(g, hand, rtol=1e-4, atol=1e-6)
    assert g.norm() > 1e-3


def projection_z(G: torch.Tensor, true: torch.Tensor, dirs: list[torch.Tensor]) -> list[float]:
    """z-scores of the mean of G's projections on each direction against the truth's."""
    out = []
    for u in dirs:
        x = G.double() @ u.double()
        out.append((x.mean().item() - (true.double() @ u.double()).item()) / (x.std().item() / math.sqrt(len(x))))
    return out


@pytest.mark.parametrize("objective", ["reinforce", "rloo"])
def test_exact_gradient_is_the_mean_of_sampled_policy_gradients(objective):
    """On a sequence task (3 symbols, length 3, 2 prompts) the unbiased estimators (k1 KL in the reward;
    REINFORCE without baseline, RLOO) average to grad(-J) by enumeration: along the true gradient and
    three random directions within 4.5 standard errors, and in squared distance ||gbar - g||^2 within
    3x its expectation tr Cov / K. The same test rejects the gradient of the objective without its KL
    term and that of the objective with the reverse KL(pi_ref || pi)."""
    beta = 0.5
    task = {"name": "sequence", "vocab_size": 3, "length": 3, "n_prompts": 2}
    res, pol, ref, exact = setup(task, beta=beta, noise=0.4, group_size=4)
    true = exact_rl_gradient(pol, res.task, exact.ref_logp, exact.rewards, beta)
    no_kl = exact_rl_gradient(pol, res.task, exact.ref_logp, exact.rewards, 0.0)
    logp, q = exact_logprobs(pol, res.task), exact.ref_logp
    J_rev = (logp.exp() * exact.rewards).sum(-1).mean() - beta * (q.exp() * (q - logp)).sum(-1).mean()
    reverse_kl = flatten(torch.autograd.grad(-J_rev, list(lm_params(pol).values())))
    K, B = 250, 16
    est = Estimators(res, ref, exact, CPU, seed=3)
    G, _, _ = est.gradients(pol, make_objective(res, objective), B, K)
    gen = torch.Generator().manual_seed(0)
    dirs = [true / true.norm()] + [torch.randn(true.shape, generator=gen) for _ in range(3)]
    z = projection_z(G, true, dirs)
    assert max(abs(v) for v in z) < Z, z
    var = trace_cov(G)[0]
    dist = ((G.double().mean(0) - true.double()) ** 2).sum().item()
    assert dist < 3.0 * var / K, (dist, var / K)  # E||gbar - g||^2 = tr Cov / K
    for wrong in (no_kl, reverse_kl):  # negative controls
        z_wrong = projection_z(G, wrong, dirs)
        dist_wrong = ((G.double().mean(0) - wrong.double()) ** 2).sum().item()
        assert max(abs(v) for v in z_wrong) > Z and dist_wrong > 3.0 * var / K, (z_wrong, dist_wrong, var / K)


# ------------------------------------------------------------------- fast paths equal the plain ones


@pytest.mark.parametrize("algo", ["grpo", "ppo", "reinforce", "online_dpo"])
def test_vmap_minibatch_gradients_equal_loop(algo):
    task = {"name": "sequence", "vocab_size": 3, "length": 3}
    res, pol, ref, exact = setup(task, algo=algo, group_size=2)
    if res.spec.value_head(res.algo_cfg):
        with torch.no_grad():
            pol.value_head.weight.normal_(0, 0.3)  # a critic that is not zero, so values carry gradient
    obj = make_objective(res, algo)
    obj.cfg = obj.cfg.model_copy(update={"vf_coef": 0.5}) if algo == "ppo" else obj.cfg  # through the value head too
    est = Estimators(res, ref, exact, CPU, seed=0)
    losses, _ = online_losses(obj.spec, obj.cfg, res.run.beta, est.rollouts_for(pol, 8, 2, 5))
    fast = minibatch_gradients(pol, losses, method="vmap")
    slow = minibatch_gradients(pol, losses, method="loop")
    assert fast.shape == (5, sum(p.numel() for p in lm_params(pol).values()))
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in pol.parameters())  # .grad untouched


@pytest.mark.parametrize("algo", ["sft", "dpo"])
def test_dataset_gradient_equals_one_backward_over_the_dataset(algo):
    task = {"name": "sequence", "vocab_size": 3, "length": 3}
    res, pol, ref, _ = setup(task, algo=algo, **({"algo.n_demos": 300} if algo == "sft" else {}))
    data = res.spec.dataset(res.task, res.algo_cfg, torch.Generator().manual_seed(0))
    fast = dataset_gradient(pol, res.spec, res.algo_cfg, res.run.beta, ref, data, CPU, chunk=128)  # chunking too
    loss = res.spec.step(pol, ref, data, res.algo_cfg, res.run.beta)[0]
    slow = flatten(torch.autograd.grad(loss, list(lm_params(pol).values())))
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-6)
    # offline minibatch estimators: vmap == loop as well
    batches = sample_batches(data, 4, 3, torch.Generator().manual_seed(1), CPU)
    losses = offline_losses(res.spec, res.algo_cfg, res.run.beta, ref, batches)
    fast, slow = minibatch_gradients(pol, losses, "vmap"), minibatch_gradients(pol, losses, "loop")
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------- statistics


def test_gradient_stats_by_hand():
    G = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 2.0], [2.0, -2.0]])
    true = torch.tensor([1.0, 0.0])
    s = gradient_stats(G, true)
    # gbar = (2, 0); deviations (-1,0), (1,0), (0,2), (0,-2): squared norms 1, 1, 4, 4 -> tr Cov = 10 / 3
    assert s["total_var"] == pytest.approx(10 / 3)
    assert s["mean_norm"] == pytest.approx(2.0)
    assert s["norm_mean"] == pytest.approx((1 + 3 + 2 * math.sqrt(8)) / 4)
    assert s["snr"] == pytest.approx((4 - (10 / 3) / 4) / (10 / 3))
    assert s["cos_mean_true"] == pytest.approx(1.0)
    assert s["cos_true"] == pytest.approx((1 + 1 + 2 * 2 / math.sqrt(8)) / 4)
    assert s["true_norm"] == pytest.approx(1.0)
    assert gradient_stats(torch.ones(3, 2))["snr"] == math.inf  # identical minibatches: no noise at all


def test_sft_is_noise_free_with_one_prompt_and_the_rl_truth_is_exact_everywhere_it_can_be():
    """SFT on one prompt sees the same demonstration in every minibatch: zero variance (ordinary
    gradient descent, claim C1), while REINFORCE's variance is positive at the same parameters."""
    res, pol, ref, exact = setup({"name": "bandit", "n_arms": 4}, algo="sft")
    est = Estimators(res, ref, exact, CPU, seed=0)
    sft = gradient_stats(
        est.gradients(pol, make_objective(res, "sft"), 8, 4)[0], est.truth(pol, make_objective(res, "sft"))[0]
    )
    pg = gradient_stats(est.gradients(pol, make_objective(res, "reinforce"), 8, 4)[0])
    assert sft["total_var"] < 1e-10 and sft["cos_true"] == pytest.approx(1.0, abs=1e-5)
    assert pg["total_var"] > 1e-4
    assert est.rl_truth(pol)[1] == "exact"
    logp = exact_logprobs(pol, res.task)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(1))
