"""GRPO (Shao et al. 2024, arXiv 2402.03300), with the Dr. GRPO options (arXiv 2503.20783) and GSPO's
sequence-level ratio (Zheng et al. 2025, arXiv 2507.18071).

    A_i    = (r_i - mean_g(r)) / (std_g(r) + eps)      group-relative advantage, (B,)
             (std over the group, the batch, or not at all: ``scale_rewards``)
    rho_it = exp(log pi(y_it) - log pi_old(y_it))      importance ratio, (B, T)    importance_sampling_level "token"
    s_i    = exp((1/|y_i|) sum_t m_it (log pi(y_it) - log pi_old(y_it)))
                                                        GSPO's sequence ratio, (B,) "sequence"; rho_it = s_i
    kl_it  = pi_ref/pi - log(pi_ref/pi) - 1             k3 estimator, in the loss
    L_it   = -min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i) + beta kl_it

aggregated as ``sequence_mean`` (the paper, TRL "grpo"), ``token_mean`` (TRL
"bnpo"/"dapo") or ``constant`` (Dr. GRPO: divide by B x max length). std is the unbiased
group std and eps = 1e-4, as in TRL.

GSPO (``importance_sampling_level = "sequence"``) is TRL 1.16's ``importance_sampling_level="sequence"``:
|y_i| = sum_t m_it (at least 1), the gradient flows through s_i into every token of row i (no stop-gradient:
TRL 1.16's ``_compute_loss`` has none), the whole sequence is clipped at once, and with
``kl_ratio_correction`` the KL is multiplied by s_i. With ``aggregation = "sequence_mean"`` (TRL
``loss_type="grpo"``) the loss is the paper's -1/B sum_i min(s_i A_i, clip(s_i) A_i) (+ the KL's row means);
GSPO's paper clips with small ranges (eps 3e-4 / 4e-4), set through ``clip_eps_low`` / ``clip_eps_high``.
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
    importance_sampling_level: Literal["token", "sequence"] = Field(
        "token",
        description="token: rho_it per token (GRPO); sequence: GSPO's length-normalised s_i per row (arXiv 2507.18071, "
        "TRL importance_sampling_level)",
    )


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
    if cfg.importance_sampling_level == "sequence":
        log_s = ((logp - old_logp) * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)  # (B,) log s_i
        ratio = torch.exp(log_s)[:, None].expand_as(logp)  # (B, T) rho_it = s_i
    else:
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
    stats["loss/policy"] = loss.item()
    stats.update(clip_stats(ratio.detach(), advantages, mask, cfg.clip_eps_low, cfg.clip_eps_high))
    return loss, per_token * mask, stats


def clip_stats(ratio: Tensor, advantages: Tensor, mask: Tensor, eps_low: float, eps_high: float) -> dict:
    """Shares of the counted tokens ``(B, T)`` whose clip is active: low (rho < 1 - eps_low, A < 0), high
    (rho > 1 + eps_high, A > 0), and either (``clip/ratio``), as TRL's ``clip_ratio/low_mean``, ``high_mean``,
    ``region_mean`` (which, at the sequence level, are shares of sequences: ours stay shares of tokens)."""
    low = (ratio < 1 - eps_low) & (advantages < 0)
    high = (ratio > 1 + eps_high) & (advantages > 0)
    n = mask.sum().clamp(min=1).item()
    return {
        "clip/ratio": ((low | high).float() * mask).sum().item() / n,
        "clip/low_ratio": (low.float() * mask).sum().item() / n,
        "clip/high_ratio": (high.float() * mask).sum().item() / n,
    }


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
