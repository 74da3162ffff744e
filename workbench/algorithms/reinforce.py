"""REINFORCE (Williams 1992) on the KL-regularised objective, with an optional baseline.

With the per-token KL estimate kl_t = k(log pi_ref(y_t|s_t) - log pi(y_t|s_t)) and
per-step rewards r_t (the task score at the last token unless the task is dense):

    G_t  = sum_{t' >= t} (r_t' - beta kl_t')               return-to-go, KL in the reward
    b_t  = 0 | mean_i G_it (batch) | mean over the group   baseline
    A_t  = G_t - b_t
    L_t  = -A_t log pi(y_t | s_t)        (+ beta kl_t when the KL acts in the loss instead)

With k1 in the reward this is an unbiased estimate of grad(E[r] - beta KL(pi || pi_ref)),
whose maximiser is pi* = pi_ref exp(r / beta) / Z. The batch-mean baseline includes the
sample itself (the textbook form); RLOO removes that bias. With an end-of-sequence action the
means of b_t are over the rows still generating at t (mask m_it = 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from ..core.kl import kl_estimate
from ..core.ops import Aggregation, aggregate
from .spec import AlgoConfig, AlgorithmSpec, Batch, PolicyOutput, Rollout, kl_penalty

KLPlace = Literal["reward", "loss"]
KLEstimator = Literal["k1", "k2", "k3"]


class ReinforceConfig(AlgoConfig):
    baseline: Literal["none", "mean", "group_mean"] = Field("mean", description="baseline b subtracted from the return")
    kl_in: KLPlace = Field(
        "reward", description="where the beta-KL acts: subtracted from the reward, or added to the loss"
    )
    kl_estimator: KLEstimator = Field("k1", description="KL estimator (k1 in the reward is unbiased)")
    aggregation: Aggregation = Field("sequence_sum", description="loss aggregation; sequence_sum is grad log pi(y|x)")


def returns_to_go(step_rewards: Tensor, mask: Tensor) -> Tensor:
    """G_t = sum_{t' >= t} r_t' over a ``(B, T)`` reward, masked."""
    r = step_rewards * mask
    return r.flip(-1).cumsum(-1).flip(-1) * mask


def kl_shaped_rewards(roll: Rollout, beta: float, kl_in: str, estimator: str) -> tuple[Tensor, Tensor]:
    """``(rewards (B, T), kl (B, T))``: the per-step reward with -beta kl_t added when the KL acts in the reward."""
    kl = kl_estimate(roll.old_logp, roll.ref_logp, estimator) * roll.mask  # kl_t
    r = roll.step_rewards - beta * kl if kl_in == "reward" else roll.step_rewards
    return r, kl


def _mean_over_rows(G: Tensor, mask: Tensor, dim: int) -> Tensor:
    """Mean of ``G`` over ``dim`` (rows), keeping it; over the rows with m_it = 1 when some completion ended early."""
    if bool(mask.all()):
        return G.mean(dim=dim, keepdim=True)
    return (G * mask).sum(dim, keepdim=True) / mask.sum(dim, keepdim=True).clamp(min=1.0)


@dataclass(frozen=True, kw_only=True)
class ReinforceBatch(Batch):
    advantages: Tensor  # (B, T) G_t - b_t (REINFORCE) or the leave-one-out advantage (RLOO)
    ref_logp: Tensor  # (B, T) log pi_ref, for a KL in the loss


def prepare(roll: Rollout, cfg: ReinforceConfig, beta: float) -> ReinforceBatch:
    r, kl = kl_shaped_rewards(roll, beta, cfg.kl_in, cfg.kl_estimator)
    G = returns_to_go(r, roll.mask)  # (B, T)
    if cfg.baseline == "mean":
        b = _mean_over_rows(G, roll.mask, 0)  # (1, T)
    elif cfg.baseline == "group_mean":
        B, T = G.shape
        g = roll.group_size
        if B % g:
            raise ValueError(f"batch {B} is not a multiple of group size {g}")
        b = _mean_over_rows(G.view(-1, g, T), roll.mask.view(-1, g, T), 1)  # mean over the group
        b = b.expand(-1, g, T).reshape(B, T)
    else:
        b = torch.zeros_like(G)
    return ReinforceBatch(
        advantages=(G - b) * roll.mask,
        mask=roll.mask,
        ref_logp=roll.ref_logp,
        kl=kl,
        kl_metric=f"kl/{cfg.kl_estimator}_{cfg.kl_in}",
    )


def reinforce_loss(
    out: PolicyOutput, batch: ReinforceBatch, cfg: ReinforceConfig, beta: float
) -> tuple[Tensor, Tensor, dict]:
    """``out.logp`` and the batch's tensors ``(B, T)``. Returns ``(loss, per_token_loss, stats)``."""
    logp, mask = out.logp, batch.mask
    per_token = -batch.advantages * logp  # -A_t log pi(y_t|s_t)
    stats = {}
    if cfg.kl_in == "loss":
        kl = kl_estimate(logp, batch.ref_logp, cfg.kl_estimator)
        per_token = per_token + beta * kl  # + beta kl_t
        stats[f"kl/{cfg.kl_estimator}_loss"] = (kl * mask).sum(-1).mean().item()
    loss = aggregate(per_token, mask, cfg.aggregation)
    stats["loss/policy"] = loss.item()
    return loss, per_token * mask, stats


SPEC = AlgorithmSpec(
    name="reinforce",
    Config=ReinforceConfig,
    kind="online",
    summary="REINFORCE, optional baseline",
    prepare=prepare,
    loss=reinforce_loss,
    defaults={"group_size": 1},
    kl_in_reward=lambda cfg: cfg.kl_in == "reward",
    regulariser=kl_penalty,
)
