"""Small statistics used by the measurements: means with standard errors, covariance traces.

Every estimate the probes report comes with its standard error, so a comparison with an
exact value reads as "within z standard errors" (tests use z = 4 to 5):

    mean_se(x)      = (mean x, std(x) / sqrt(n))
    trace_cov(G)    = tr Cov(g) = (1/(K-1)) sum_k ||g_k - gbar||^2 for K vectors g_k, (K, D),
                      with the standard error of that mean of squared deviations
    cosine, pearson similarity and correlation, safe on zero vectors and constant samples
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


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
    return torch.where(den > 0, (a * b).sum(-1) / den.clamp(min=1e-300), torch.zeros_like(den))


def pearson(x: Tensor, y: Tensor) -> float:
    """Pearson correlation of two flat samples; NaN when either is constant."""
    x, y = x.double().reshape(-1), y.double().reshape(-1)
    x, y = x - x.mean(), y - y.mean()
    den = (x.norm() * y.norm()).item()
    return (x @ y).item() / den if den > 1e-12 else math.nan
