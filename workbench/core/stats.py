"""Statistics: intervals over seeds (verdicts, report, dashboard) and the probes' small estimators.

One interval method is used everywhere a mean or a difference over seeds is shown or
decides something (``difference_interval``; level 0.95 unless a study says otherwise):

    mean of a (b = None)   xbar +- t_{(1+L)/2, n-1} s / sqrt(n)                   Student t
    paired (a_i - b_i)     dbar +- t_{(1+L)/2, n-1} s_d / sqrt(n)                 paired t
    unpaired               (abar - bbar) +- t_{(1+L)/2, nu} sqrt(s_a^2/n_a + s_b^2/n_b)
                           nu = (s_a^2/n_a + s_b^2/n_b)^2 / [(s_a^2/n_a)^2/(n_a-1) + (s_b^2/n_b)^2/(n_b-1)]
                                                                                   Welch-Satterthwaite
    method = "bca"         the same estimates with a seeded BCa bootstrap interval instead

A percentile bootstrap over 3-5 seeds is too narrow (it covered the mean 76% of the time
at n = 3 and 83% at n = 5 in a simulation here); the t intervals cover at their level on
normal data and close to it on skewed data (``tests/test_intervals.py``).

The probes' estimators:

Every estimate the probes report comes with its standard error, so a comparison with an
exact value reads as "within z standard errors" (tests use z = 4 to 5):

    mean_se(x)      = (mean x, std(x) / sqrt(n))
    trace_cov(G)    = tr Cov(g) = (1/(K-1)) sum_k ||g_k - gbar||^2 for K vectors g_k, (K, D),
                      with the standard error of that mean of squared deviations
    cosine, pearson similarity and correlation, safe on zero vectors and constant samples
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Literal

import numpy as np
from scipy.stats import bootstrap, t

if TYPE_CHECKING:  # the interval functions need no torch (the dashboard imports this module)
    from torch import Tensor

LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 9999
Method = Literal["t", "bca"]

# metrics that cannot be negative: their bands are clipped at 0 in figures (and the figure says so)
NON_NEGATIVE_PREFIXES = (
    "kl/exact",
    "kl/k2",
    "kl/k3",
    "optimal/kl",
    "entropy/",
    "length/",
    "grad/total_var",
    "grad/norm",
    "grad/true_norm",
    "grad/exact_norm",
    "time/",
    "memory/",
)


def is_non_negative(metric: str) -> bool:
    """Whether ``metric`` is non-negative by definition (KL divergences, entropies, variances, lengths, norms)."""
    return metric.startswith(NON_NEGATIVE_PREFIXES)


def t_half_width(std, n, level: float = LEVEL):
    """``t_{(1+level)/2, n-1} * std / sqrt(n)``, elementwise; NaN where n < 2. The band of a mean over n seeds."""
    from scipy.special import stdtrit  # scipy loads on first use: the dashboard imports this module

    n = np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.where(n >= 2, stdtrit(np.maximum(n - 1, 1), 0.5 + level / 2), np.nan)
        return q * np.asarray(std, dtype=float) / np.sqrt(n)


def _clean(x) -> np.ndarray:
    x = np.asarray(x, dtype=float).reshape(-1)
    return x[np.isfinite(x)]


def difference_interval(
    a, b=None, paired: bool = False, level: float = LEVEL, method: Method = "t", seed: int = 0
) -> tuple[float, float, float]:
    """``(estimate, low, high)``: the mean of ``a`` (``b=None``) or the difference of means ``a - b``.

    ``paired``: ``a[i]`` and ``b[i]`` are one seed's two runs (same length), the interval is
    the paired t interval of ``a - b``; otherwise Welch-Satterthwaite. ``method="bca"``
    replaces the t interval by a seeded BCa bootstrap. Non-finite values are dropped (pairs
    with either value non-finite, when paired). Fewer than 2 values on a side: the estimate
    with NaN bounds. All values equal: a zero-width interval at the estimate.
    """
    if b is not None and paired:
        a, b = np.asarray(a, dtype=float).reshape(-1), np.asarray(b, dtype=float).reshape(-1)
        if a.shape != b.shape:
            raise ValueError(f"paired samples need equal lengths (got {a.size} and {b.size})")
        a, b = a - b, None
    if b is None:
        x = _clean(a)
        if not len(x):
            return (math.nan, math.nan, math.nan)
        est = float(x.mean())
        if len(x) < 2:
            return (est, math.nan, math.nan)
        if method == "bca":
            return (est, *_bca((x,), lambda x, axis=-1: x.mean(axis), est, level, seed))
        h = float(t_half_width(x.std(ddof=1), len(x), level))
        return (est, est - h, est + h)
    xa, xb = _clean(a), _clean(b)
    if not len(xa) or not len(xb):
        return (math.nan, math.nan, math.nan)
    est = float(xa.mean() - xb.mean())
    if len(xa) < 2 or len(xb) < 2:
        return (est, math.nan, math.nan)
    if method == "bca":
        return (est, *_bca((xa, xb), lambda a, b, axis=-1: a.mean(axis) - b.mean(axis), est, level, seed))
    va, vb = xa.var(ddof=1) / len(xa), xb.var(ddof=1) / len(xb)
    se = math.sqrt(va + vb)
    if se == 0:
        return (est, est, est)
    nu = (va + vb) ** 2 / (va**2 / (len(xa) - 1) + vb**2 / (len(xb) - 1))  # Welch-Satterthwaite

    h = float(t.ppf(0.5 + level / 2, nu)) * se
    return (est, est - h, est + h)


def _bca(data: tuple, stat, est: float, level: float, seed: int) -> tuple[float, float]:
    if all(np.ptp(d) == 0 for d in data):
        return (est, est)  # no spread to resample

    with warnings.catch_warnings():  # degenerate resamples: scipy warns and returns NaN, which we report as such
        warnings.simplefilter("ignore")
        res = bootstrap(
            data,
            stat,
            confidence_level=level,
            n_resamples=BOOTSTRAP_RESAMPLES,
            method="BCa",
            random_state=np.random.default_rng(seed),
        )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def mean_se(x: Tensor) -> tuple[float, float]:
    """Mean of the samples ``x (n,)`` and its standard error std / sqrt(n)."""
    x = x.double().reshape(-1)
    n = x.numel()
    se = x.std().item() / math.sqrt(n) if n > 1 else math.inf
    return x.mean().item(), se


def trace_cov(G: Tensor) -> tuple[float, float]:
    """``(tr Cov, se)`` over the rows of ``G (K, D)``: the total variance of a random vector.

    The standard error treats the squared deviations d_k = ||g_k - gbar||^2 as i.i.d.
    (first order in 1/K): se = std(d) sqrt(K) / (K - 1).
    """
    G = G.double()
    K = G.shape[0]
    if K < 2:
        return math.nan, math.inf
    d = ((G - G.mean(0)) ** 2).sum(1)  # ||g_k - gbar||^2, (K,)
    return d.sum().item() / (K - 1), d.std().item() * math.sqrt(K) / (K - 1)


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity along the last dimension (0 where either vector is zero)."""
    a, b = a.double(), b.double()
    den = a.norm(dim=-1) * b.norm(dim=-1)
    return ((a * b).sum(-1) / den.clamp(min=1e-300)).where(den > 0, den.new_zeros(()))


def pearson(x: Tensor, y: Tensor) -> float:
    """Pearson correlation of two flat samples; NaN when either is constant."""
    x, y = x.double().reshape(-1), y.double().reshape(-1)
    x, y = x - x.mean(), y - y.mean()
    den = (x.norm() * y.norm()).item()
    return (x @ y).item() / den if den > 1e-12 else math.nan
