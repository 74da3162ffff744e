"""The exact best-of-n distribution (``workbench.analysis.exact.best_of_n_logprobs``) and its KL to pi."""

import itertools
import math

import pytest
import torch
from scipy import stats

from workbench.analysis.exact import best_of_n_frontier, best_of_n_kl, best_of_n_kl_bound, best_of_n_logprobs


def test_by_hand():
    logp = torch.tensor([[0.3, 0.7]]).log()
    q = best_of_n_logprobs(logp, torch.tensor([[0.0, 1.0]]), 2).exp()
    assert q.tolist()[0] == pytest.approx([0.09, 0.91])  # the worse wins only when both draws are it
    # a tie: the block {y1, y2} with mass 0.5 gets 0.5^2, shared 1:4 as pi; y0 (best) gets 1 - 0.25
    logp = torch.tensor([[0.5, 0.1, 0.4]]).log()
    q = best_of_n_logprobs(logp, torch.tensor([[2.0, 1.0, 1.0]]), 2).exp()
    assert q.tolist()[0] == pytest.approx([0.75, 0.05, 0.2])
    assert best_of_n_logprobs(logp, torch.tensor([[2.0, 1.0, 1.0]]), 1).exp().tolist()[0] == pytest.approx(
        [0.5, 0.1, 0.4]
    )  # n = 1 is pi


@pytest.mark.parametrize("n", [2, 5])
def test_equals_the_empirical_distribution_of_simulated_draws(n):
    """200,000 best-of-n draws (ties broken by the first tied draw) against the exact law: chi-square."""
    g = torch.Generator().manual_seed(n)
    pi = torch.tensor([[0.05, 0.3, 0.1, 0.25, 0.2, 0.1], [0.4, 0.1, 0.1, 0.2, 0.15, 0.05]], dtype=torch.float64)
    rewards = torch.tensor([[0.3, 0.1, 0.9, 0.5, 0.5, 0.2], [1.0, 0.0, 0.2, 0.7, 0.7, 0.7]], dtype=torch.float64)
    exact = best_of_n_logprobs(pi.log(), rewards, n).exp()
    assert torch.allclose(exact.sum(-1), torch.ones(2, dtype=torch.float64))
    M = 200_000
    for x in range(2):
        draws = torch.multinomial(pi[x], M * n, replacement=True, generator=g).view(M, n)  # (M, n) y_1..y_n ~ pi
        best = draws.gather(1, rewards[x][draws].argmax(1, keepdim=True))[:, 0]  # argmax: the first tied draw
        observed = torch.bincount(best, minlength=6).double()
        keep = exact[x] > 0
        _, p = stats.chisquare(observed[keep].numpy(), (exact[x][keep] * M).numpy())
        assert p > 1e-3, (x, p)


def test_kl_is_below_log_n_minus_its_continuum_term_and_reaches_it_in_the_limit():
    """Distinct rewards: KL(P_bon || pi) < log n - (n - 1)/n on a finite set, -> the bound as max pi(y) -> 0."""
    g = torch.Generator().manual_seed(0)
    for n in (2, 4, 16):
        bound = best_of_n_kl_bound(n)
        assert bound == pytest.approx(math.log(n) - (n - 1) / n)
        logp = torch.log_softmax(torch.randn(8, 20, generator=g), -1)
        kl = best_of_n_kl(logp, torch.randn(8, 20, generator=g), n)
        assert (kl > 0).all() and (kl < bound).all()
        # uniform pi on N completions: the gap closes as N grows
        gaps = []
        for N in (10, 100, 100_000):
            uniform = torch.full((1, N), -math.log(N), dtype=torch.float64)
            gaps.append(bound - best_of_n_kl(uniform, torch.randperm(N, generator=g)[None].double(), n).item())
        assert 0 < gaps[2] < gaps[1] < gaps[0] and gaps[2] < 1e-3
    assert best_of_n_kl(torch.tensor([[0.2, 0.8]]).log(), torch.tensor([[1.0, 0.0]]), 1).item() == pytest.approx(0.0)


def test_the_frontier_rises_with_n_from_pi():
    g = torch.Generator().manual_seed(1)
    logp, rewards = torch.log_softmax(torch.randn(3, 12, generator=g), -1), torch.rand(3, 12, generator=g)
    front = best_of_n_frontier(logp, rewards, [1, 2, 4, 64])
    assert front[0]["kl"] == pytest.approx(0.0, abs=1e-9)
    assert front[0]["reward"] == pytest.approx((logp.exp() * rewards).sum(-1).mean().item(), rel=1e-5)
    assert all(a["reward"] < b["reward"] and a["kl"] < b["kl"] <= b["kl_bound"] for a, b in itertools.pairwise(front))
    assert front[-1]["reward"] == pytest.approx(rewards.max(-1).values.mean().item(), abs=1e-3)  # n -> inf: the best


def test_a_completion_pi_never_draws_is_never_kept():
    logp = torch.tensor([[0.0, 0.5, 0.5]], dtype=torch.float64).log()
    q = best_of_n_logprobs(logp, torch.tensor([[3.0, 1.0, 2.0]]), 3).exp()
    assert q.tolist()[0] == pytest.approx([0.0, 0.125, 0.875]) and not q.isnan().any()
    assert best_of_n_kl(logp, torch.tensor([[3.0, 1.0, 2.0]]), 3).isfinite().all()
