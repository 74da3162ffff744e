"""KL estimators k1, k2, k3 (Schulman 2020) on hand values, non-negativity and Monte Carlo unbiasedness."""

from __future__ import annotations

import math

import pytest
import torch

from workbench.core.kl import ESTIMATORS, k1, k2, k3, kl_estimate

D = torch.float64


def t(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=D)


# ---------------------------------------------------------------------------------------- hand values


@pytest.mark.parametrize(
    "lr, e1, e2, e3",
    [
        (0.0, 0.0, 0.0, 0.0),
        (0.5, -0.5, 0.125, math.exp(0.5) - 1.5),  # e^0.5 - 1 - 0.5 = 0.1487212707...
        (-1.0, 1.0, 0.5, math.exp(-1.0)),  # e^-1 - 1 + 1
        (2.0, -2.0, 2.0, math.exp(2.0) - 3.0),  # 4.3890560989...
        (-3.0, 3.0, 4.5, math.exp(-3.0) + 2.0),
    ],
)
def test_estimators_on_hand_values(lr, e1, e2, e3):
    x = t([lr])
    assert k1(x).item() == pytest.approx(e1, rel=1e-12, abs=1e-15)
    assert k2(x).item() == pytest.approx(e2, rel=1e-12, abs=1e-15)
    assert k3(x).item() == pytest.approx(e3, rel=1e-12, abs=1e-15)


def test_literal_values():
    assert k3(t([0.5])).item() == pytest.approx(0.14872127070012814, rel=1e-12)
    assert k3(t([-1.0])).item() == pytest.approx(0.36787944117144233, rel=1e-12)
    assert k3(t([2.0])).item() == pytest.approx(4.38905609893065, rel=1e-12)


def test_kl_estimate_uses_ref_minus_logp():
    logp = t([[-1.0, -0.2]])
    ref = t([[-1.5, -0.2 + 0.3]])  # ref - logp = [-0.5, 0.3]
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), t([[0.5, -0.3]]))
    torch.testing.assert_close(kl_estimate(logp, ref, "k2"), t([[0.125, 0.045]]))
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"), t([[math.exp(-0.5) - 0.5, math.exp(0.3) - 1.3]]))
    assert set(ESTIMATORS) == {"k1", "k2", "k3"}


def test_k3_gradient():
    # d/dx (e^x - 1 - x) = e^x - 1
    x = t([-1.0, 0.0, 0.7]).requires_grad_(True)
    (g,) = torch.autograd.grad(k3(x).sum(), x)
    torch.testing.assert_close(g, t([math.exp(-1.0) - 1, 0.0, math.exp(0.7) - 1]))


# ---------------------------------------------------------------------------------------- k3 >= 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_k3_nonnegative_sweep(dtype):
    xs = [
        torch.linspace(-20.0, 20.0, 400_001, dtype=torch.float64),
        torch.linspace(-1e-3, 1e-3, 20_001, dtype=torch.float64),  # tiny log-ratios, where cancellation bites
        torch.logspace(-30, 1, 10_001, dtype=torch.float64),
        -torch.logspace(-30, 1, 10_001, dtype=torch.float64),
    ]
    for x in xs:
        v = k3(x.to(dtype))
        assert torch.isfinite(v).all()
        assert (v >= 0).all(), f"k3 < 0 at {x[v < 0][:5].tolist()} ({dtype}), min {v.min().item()}"
    assert k2(torch.linspace(-20.0, 20.0, 1001, dtype=dtype)).min() >= 0


def test_k3_at_least_its_second_order_term_scale():
    # e^x - 1 - x >= x^2/2 for x >= 0 and >= x^2/2 + x^3/6 for all x (Taylor remainder is positive)
    x = torch.linspace(-20.0, 20.0, 40_001, dtype=D)
    assert (k3(x) >= x**2 / 2 + x**3 / 6 - 1e-12 * (1 + x.abs() ** 3)).all()


# ---------------------------------------------------------------------------------------- Monte Carlo

P = [0.1, 0.2, 0.3, 0.25, 0.15]
Q = [0.3, 0.1, 0.2, 0.15, 0.25]
KL_Q_P = sum(q * math.log(q / p) for p, q in zip(P, Q))  # KL(q || p) = sum_x q log(q/p)


def samples_log_ratio(n: int = 200_000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.multinomial(t(Q), n, replacement=True, generator=g)  # x ~ q
    return t(P).log()[x] - t(Q).log()[x]  # log p(x) - log q(x)


def test_exact_kl_by_hand():
    terms = [
        0.3 * math.log(0.3 / 0.1),
        0.1 * math.log(0.1 / 0.2),
        0.2 * math.log(0.2 / 0.3),
        0.15 * math.log(0.15 / 0.25),
        0.25 * math.log(0.25 / 0.15),
    ]
    assert pytest.approx(sum(terms), rel=1e-12) == KL_Q_P
    assert 0.1 < KL_Q_P < 0.3  # 0.19...


def test_k1_k3_exact_expectations():
    # E_q[k1] = KL; E_q[k3] = E_q[p/q] - 1 + KL = 1 - 1 + KL = KL
    lr = t(P).log() - t(Q).log()
    q = t(Q)
    assert (q * k1(lr)).sum().item() == pytest.approx(KL_Q_P, rel=1e-12)
    assert (q * k3(lr)).sum().item() == pytest.approx(KL_Q_P, rel=1e-12)


@pytest.mark.parametrize("name", ["k1", "k3"])
def test_monte_carlo_unbiased(name):
    lr = samples_log_ratio()
    est = ESTIMATORS[name](lr)
    n = est.numel()
    mean = est.mean().item()
    se = est.std().item() / math.sqrt(n)
    assert se > 0
    assert abs(mean - KL_Q_P) < 4 * se, (name, mean, KL_Q_P, se)


def test_k3_lower_variance_than_k1_here():
    lr = samples_log_ratio()
    assert k3(lr).std() < k1(lr).std()


def test_monte_carlo_k2():
    lr = samples_log_ratio()
    est = k2(lr)
    mean = est.mean().item()
    assert math.isfinite(mean) and mean >= 0
    # k2 is biased: its expectation is E_q[(log p/q)^2] / 2, computed exactly here
    exact_k2 = sum(q * 0.5 * math.log(p / q) ** 2 for p, q in zip(P, Q))
    se = est.std().item() / math.sqrt(est.numel())
    assert abs(mean - exact_k2) < 4 * se
    assert abs(mean - KL_Q_P) < abs(exact_k2 - KL_Q_P) + 4 * se  # within its bias of the KL
