"""GRPO (Shao et al. 2024, arXiv 2402.03300), with the Dr. GRPO options (arXiv 2503.20783).

    A_i    = (r_i - mean_g(r)) / (std_g(r) + eps)      group-relative advantage, (B,)
             (std over the group, the batch, or not at all: ``scale_rewards``)
    rho_it = exp(log pi(y_it) - log pi_old(y_it))      importance ratio, (B, T)
    kl_it  = pi_ref/pi - log(pi_ref/pi) - 1             k3 estimator, in the loss
    L_it   = -min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i) + beta kl_it

aggregated as ``sequence_mean`` (the paper, TRL "grpo"), ``token_mean`` (TRL
"bnpo"/"dapo") or ``constant`` (Dr. GRPO: divide by B x max length). std is the unbiased
group std and eps = 1e-4, as in TRL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from ..core.kl import kl_estimate
from ..core.ops import Aggregation, aggregate, group_view
from .spec import AlgoConfig, AlgorithmSpec, Batch, PolicyOutput, Rollout


class GRPOConfig(AlgoConfig):
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="divide by the group std, the batch std, or nothing (Dr. GRPO)"
    )
    aggregation: Aggregation = Field(
        "sequence_mean", description="sequence_mean (GRPO), token_mean (DAPO), constant (Dr. GRPO)"
    )
    clip_eps_low: float = Field(0.2, ge=0, description="eps_low of the ratio clip")
    clip_eps_high: float = Field(0.2, ge=0, description="eps_high of the ratio clip (DAPO: larger)")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k3", description="KL estimator in the loss (the paper: k3)")
    kl_ratio_correction: bool = Field(
        False, description="multiply kl_it by rho_it (TRL's use_bias_correction_kl, its default); the paper: off"
    )
    eps: float = Field(1e-4, gt=0, description="eps added to the std")
    epochs: int = Field(1, ge=1, le=10_000, description="passes over each rollout (TRL num_iterations)")
    minibatches: int = Field(1, ge=1, le=100_000, description="minibatches per pass")


def grpo_advantages(rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """rewards ``(B,)`` -> advantages ``(B,)``: A_i = (r_i - mean_g) / (std + eps)."""
    r = group_view(rewards, group_size)  # (B/G, G)
    centered = r - r.mean(dim=1, keepdim=True)  # r_i - mean_g(r)
    if scale == "group":
        centered = centered / (r.std(dim=1, keepdim=True) + eps)  # / (std_g + eps)
    elif scale == "batch":
        centered = centered / (rewards.std() + eps)
    return centered.reshape(-1)


@dataclass(frozen=True, kw_only=True)
class GRPOBatch(Batch):
    advantages: Tensor  # (B, T) A_i on every completion token of row i
    old_logp: Tensor  # (B, T) log pi_old
    ref_logp: Tensor  # (B, T) log pi_ref


def prepare(roll: Rollout, cfg: GRPOConfig, beta: float) -> GRPOBatch:
    A = grpo_advantages(roll.step_rewards.sum(-1), roll.group_size, cfg.scale_rewards, cfg.eps)
    return GRPOBatch(advantages=A[:, None] * roll.mask, old_logp=roll.old_logp, ref_logp=roll.ref_logp, mask=roll.mask)


def grpo_loss(out: PolicyOutput, batch: GRPOBatch, cfg: GRPOConfig, beta: float) -> tuple[Tensor, Tensor, dict]:
    """``out.logp`` and the batch's tensors ``(B, T)``. Returns ``(loss, per_token_loss (B, T), stats)``."""
    logp, old_logp, advantages, mask = out.logp, batch.old_logp, batch.advantages, batch.mask
    ratio = torch.exp(logp - old_logp)  # rho_it
    clipped = torch.clamp(ratio, 1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high)
    per_token = -torch.min(ratio * advantages, clipped * advantages)  # -min(rho A, clip(rho) A)
    stats = {}
    if beta != 0.0:
        kl = kl_estimate(logp, batch.ref_logp, cfg.kl_estimator)  # kl_it
        if cfg.kl_ratio_correction:
            kl = kl * ratio  # rho_it kl_it: unbiased off-policy (TRL default)
        per_token = per_token + beta * kl  # + beta kl_it
        stats[f"kl/{cfg.kl_estimator}_loss"] = ((kl * mask).sum(-1)).mean().item()
    loss = aggregate(per_token, mask, cfg.aggregation)
    low = (ratio < 1 - cfg.clip_eps_low) & (advantages < 0)
    high = (ratio > 1 + cfg.clip_eps_high) & (advantages > 0)
    stats["loss/policy"] = loss.item()
    stats["clip/ratio"] = ((low | high).float() * mask).sum().item() / mask.sum().clamp(min=1).item()
    return loss, per_token * mask, stats


def regulariser(cfg: GRPOConfig, beta: float) -> str:
    if beta == 0:
        return "no KL penalty"
    return (
        f"KL {cfg.kl_estimator} in the loss"
        + (" (ratio-corrected)" if cfg.kl_ratio_correction else "")
        + f", beta {beta:g}"
    )


SPEC = AlgorithmSpec(
    name="grpo",
    Config=GRPOConfig,
    kind="online",
    summary="group-relative policy optimisation",
    prepare=prepare,
    loss=grpo_loss,
    epochs=lambda cfg: cfg.epochs,
    minibatches=lambda cfg: cfg.minibatches,
    min_group_size=2,
    regulariser=regulariser,
)
