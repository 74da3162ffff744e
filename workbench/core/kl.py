"""KL estimators (Schulman 2020, "Approximating KL divergence").

All three take ``log_ratio = log p(x) - log q(x)`` for samples ``x ~ q`` and estimate
KL(q || p) = E_q[log q - log p]:

    k1 = -log_ratio                          unbiased, can be negative, high variance
    k2 = log_ratio^2 / 2                     biased, low variance, >= 0
    k3 = exp(log_ratio) - 1 - log_ratio      unbiased, >= 0, low variance

In RL for language models q = pi (the samples' policy) and p = pi_ref, so
``log_ratio = ref_logp - logp``. Metric names say where the estimate acts:
``kl/k1_reward`` (subtracted from the reward), ``kl/k3_loss`` (added to the loss).
"""

from __future__ import annotations

from torch import Tensor


def k1(log_ratio: Tensor) -> Tensor:
    return -log_ratio


def k2(log_ratio: Tensor) -> Tensor:
    return 0.5 * log_ratio**2


def k3(log_ratio: Tensor) -> Tensor:
    # expm1 keeps k3 >= 0 in floating point: exp(x) - 1 cancels and goes negative for small |x|
    return log_ratio.expm1() - log_ratio


ESTIMATORS = {"k1": k1, "k2": k2, "k3": k3}


def kl_estimate(logp: Tensor, ref_logp: Tensor, estimator: str) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi. Shape as the inputs."""
    return ESTIMATORS[estimator](ref_logp - logp)
