"""PPO for language models (Schulman et al. 2017, arXiv 1707.06347; Ouyang et al. 2022).

Token actions, a value head on the policy trunk, and the KL penalty in the reward:

    r_t    = -beta kl_t + score * 1[t = T-1]     (process rewards: + r_t^step instead)
             kl_t = k(log pi_ref - log pi_old), k1 by default; or kl in the loss instead
    delta_t = r_t + gamma V(s_{t+1}) - V(s_t);  A_t = sum_l (gamma lam)^l delta_{t+l}   (GAE)
    R_t    = A_t + V_old(s_t)                     value targets
    rho_t  = exp(log pi(y_t|s_t) - log pi_old(y_t|s_t))
    L^clip = max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))
    L^V    = 1/2 max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2)
    L_t    = L^clip_t + c_v L^V_t  (+ beta kl_t in the loss variant)

Several epochs of minibatch updates per rollout; advantages whitened per rollout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import Field
from torch import Tensor

from ..core.kl import kl_estimate
from ..core.ops import Aggregation, aggregate, explained_variance, gae, masked_whiten
from .reinforce import KLEstimator, KLPlace, kl_shaped_rewards
from .spec import AlgoConfig, AlgorithmSpec, Batch, PolicyOutput, Rollout, kl_penalty


class PPOConfig(AlgoConfig):
    clip_eps: float = Field(0.2, ge=0, description="eps of the ratio clip; a large value disables clipping")
    clip_value: float = Field(0.2, ge=0, description="eps_v of the value clip")
    vf_coef: float = Field(0.5, ge=0, description="c_v, weight of the value loss")
    gamma: float = Field(1.0, ge=0, le=1, description="discount over tokens")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    kl_in: KLPlace = Field("reward", description="KL penalty in the per-token reward (InstructGPT) or in the loss")
    kl_estimator: KLEstimator = Field("k1", description="KL estimator")
    whiten_advantages: bool = Field(True, description="whiten advantages per rollout")
    use_value_head: bool = Field(True, description="False: no critic, V = 0 (advantages are returns-to-go)")
    epochs: int = Field(4, ge=1, le=10_000, description="passes over each rollout")
    minibatches: int = Field(4, ge=1, le=100_000, description="minibatches per pass")
    aggregation: Aggregation = Field("token_mean", description="loss aggregation")


@dataclass(frozen=True, kw_only=True)
class PPOBatch(Batch):
    advantages: Tensor  # (B, T) A_t, whitened when configured
    raw_advantages: Tensor  # (B, T) A_t before whitening
    returns: Tensor  # (B, T) R_t, the value targets
    old_values: Tensor  # (B, T) V_old(s_t) (zeros without a critic)
    old_logp: Tensor  # (B, T)
    ref_logp: Tensor  # (B, T)


def prepare(roll: Rollout, cfg: PPOConfig, beta: float) -> PPOBatch:
    r, kl = kl_shaped_rewards(roll, beta, cfg.kl_in, cfg.kl_estimator)  # r_t
    values = roll.old_values if (cfg.use_value_head and roll.old_values is not None) else torch.zeros_like(r)
    adv, ret = gae(r, values, roll.mask, cfg.gamma, cfg.lam)  # A_t, R_t
    raw_adv = adv
    if cfg.whiten_advantages:
        adv = masked_whiten(adv, roll.mask) * roll.mask
    return PPOBatch(
        advantages=adv,
        raw_advantages=raw_adv,
        returns=ret,
        old_values=values,
        old_logp=roll.old_logp,
        ref_logp=roll.ref_logp,
        mask=roll.mask,
        kl=kl,
        kl_metric=f"kl/{cfg.kl_estimator}_{cfg.kl_in}",
    )


def ppo_loss(out: PolicyOutput, batch: PPOBatch, cfg: PPOConfig, beta: float) -> tuple[Tensor, Tensor, dict]:
    """``out.logp``, ``out.values`` (None without a critic) and the batch's tensors ``(B, T)``.

    Returns ``(loss, per_token_loss, stats)``.
    """
    logp, values, advantages, mask = out.logp, out.values, batch.advantages, batch.mask
    old_values, returns = batch.old_values, batch.returns
    ratio = torch.exp(logp - batch.old_logp)  # rho_t
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1 - cfg.clip_eps, 1 + cfg.clip_eps)
    per_token = torch.max(pg1, pg2)  # L^clip
    stats = {"clip/ratio": (((pg2 > pg1).float() * mask).sum() / mask.sum().clamp(min=1)).item()}
    with torch.no_grad():  # the split of clip/ratio: rho below 1 - eps with A < 0, above 1 + eps with A > 0
        n = mask.sum().clamp(min=1)
        stats["clip/low_ratio"] = ((((ratio < 1 - cfg.clip_eps) & (advantages < 0)).float() * mask).sum() / n).item()
        stats["clip/high_ratio"] = ((((ratio > 1 + cfg.clip_eps) & (advantages > 0)).float() * mask).sum() / n).item()
    if values is not None and cfg.use_value_head:
        v_clip = old_values + torch.clamp(values - old_values, -cfg.clip_value, cfg.clip_value)
        vf = 0.5 * torch.max((values - returns) ** 2, (v_clip - returns) ** 2)  # L^V
        per_token = per_token + cfg.vf_coef * vf
        stats["loss/value"] = aggregate(vf, mask, cfg.aggregation).item()
        stats["value/explained_variance"] = explained_variance(values.detach(), returns, mask)
    if cfg.kl_in == "loss" and beta != 0.0:
        kl = kl_estimate(logp, batch.ref_logp, cfg.kl_estimator)
        per_token = per_token + beta * kl
        stats[f"kl/{cfg.kl_estimator}_loss"] = ((kl * mask).sum(-1)).mean().item()
    loss = aggregate(per_token, mask, cfg.aggregation)
    stats["loss/policy"] = aggregate(torch.max(pg1, pg2), mask, cfg.aggregation).item()
    stats["loss/total"] = loss.item()
    return loss, per_token * mask, stats


SPEC = AlgorithmSpec(
    name="ppo",
    Config=PPOConfig,
    kind="online",
    summary="PPO with value head, GAE and clipping",
    prepare=prepare,
    loss=ppo_loss,
    value_head=lambda cfg: cfg.use_value_head,
    policy_loss_only=lambda cfg: cfg.model_copy(update={"vf_coef": 0.0}),
    epochs=lambda cfg: cfg.epochs,
    minibatches=lambda cfg: cfg.minibatches,
    defaults={"group_size": 1},
    kl_in_reward=lambda cfg: cfg.kl_in == "reward",
    regulariser=kl_penalty,
)
