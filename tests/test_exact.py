"""Exact enumeration: log-probabilities of every completion, pi*, and the logged exact metrics."""

import math

import pytest
import torch

from workbench.analysis.exact import ExactEvaluator, exact_logprobs, kl, optimal_logprobs
from workbench.models.policy import build_policy
from workbench.toy_tasks.bandit import Bandit, BanditConfig
from workbench.toy_tasks.sequence import Sequence, SequenceConfig

CPU = torch.device("cpu")


def test_prefix_enumeration_equals_brute_force(tiny_model_cfg):
    task = Sequence(SequenceConfig(vocab_size=3, length=4, n_prompts=2))
    pol = build_policy(task, tiny_model_cfg, 0, value_head=False, device=CPU)
    fast = exact_logprobs(pol, task, chunk=5)  # chunking must not matter
    comps = task.all_completions()
    with torch.no_grad():
        brute = torch.stack([pol(p.expand(len(comps), -1), comps).logp.sum(-1) for p in task.eval_prompts()])
    torch.testing.assert_close(fast, brute, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.exp().sum(-1), torch.ones(2), atol=1e-5, rtol=0)  # a distribution per prompt


def test_optimal_policy_by_hand():
    ref = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    r = torch.tensor([[0.0, 1.0, 0.0]])
    beta = 0.5
    # pi* ∝ pi_ref exp(r / beta): 0.5, 0.25 e^2, 0.25
    w = [0.5, 0.25 * math.e**2, 0.25]
    z = sum(w)
    torch.testing.assert_close(optimal_logprobs(ref, r, beta).exp(), torch.tensor([[x / z for x in w]]))
    # KL(p || q) by hand
    p, q = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.25, 0.75]])
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl(p.log(), q.log()).item() == pytest.approx(expected, abs=1e-6)


def test_optimal_policy_maximises_the_regularised_objective():
    """pi* beats every perturbation of itself on E[r] - beta KL(pi || pi_ref)."""
    g = torch.Generator().manual_seed(0)
    ref = torch.log_softmax(torch.randn(1, 6, generator=g), -1)
    r = torch.rand(1, 6, generator=g)
    beta = 0.3
    opt = optimal_logprobs(ref, r, beta)

    def objective(logp):
        return ((logp.exp() * r).sum() - beta * kl(logp, ref).sum()).item()

    best = objective(opt)
    for _ in range(50):
        other = torch.log_softmax(opt + 0.3 * torch.randn(1, 6, generator=g), -1)
        assert objective(other) < best


def test_evaluator_metrics(tiny_model_cfg):
    task = Bandit(BanditConfig(n_arms=5, n_contexts=2))
    pol = build_policy(task, tiny_model_cfg, 0, value_head=False, device=CPU)
    ev = ExactEvaluator(task, pol.frozen_copy(), beta=0.2)
    m = ev.measure(pol)
    assert m["kl/exact"] == pytest.approx(0.0, abs=1e-6) and m["kl/exact_ref_to_policy"] == pytest.approx(0.0, abs=1e-6)
    probs = exact_logprobs(pol, task).exp()
    assert m["reward/exact"] == pytest.approx((probs * task.table).sum(-1).mean().item(), abs=1e-6)
    opt = ev.optimum()
    # at pi = pi_ref: KL(pi_ref || pi*) = log E_ref[exp(r/beta)] - E_ref[r]/beta  (averaged over contexts)
    ref = probs
    expected = (torch.log((ref * torch.exp(task.table / 0.2)).sum(-1)) - (ref * task.table).sum(-1) / 0.2).mean().item()
    assert m["kl/exact_to_optimal"] == pytest.approx(expected, rel=1e-4)
    assert opt["optimal/objective"] >= m["objective/exact"]
