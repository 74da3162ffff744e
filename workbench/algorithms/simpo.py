"""SimPO (Meng, Xia and Chen 2024, arXiv 2405.14734): a length-normalised implicit reward and a
target margin, no reference model.

With the average log-likelihood of a completion under the policy alone,

    rbar(y) = (1 / |y|) sum_t m_t log pi(y_t | x, y_<t)          (B,)   |y| = sum_t m_t

and h = rbar(y_c) - rbar(y_r),

    L = -[ p log sigmoid(beta_s h - gamma) + (1 - p) log sigmoid(-beta_s h - gamma) ]

beta_s (``cfg.beta``) scales the implicit reward beta_s rbar and gamma (``cfg.gamma``) is the
target reward margin. p is the probability that ``chosen`` wins: p = 1 (hard labels, TRL's
``CPOTrainer`` with ``loss_type="simpo"``, ``cpo_alpha=0``) is the paper's loss; with soft
Bradley-Terry labels the loss is its expectation over the label (the margin applies to
whichever completion wins), so soft and sampled labels have the same expected gradient.

No reference model and no KL: the run's ``beta`` plays no part. The minimiser is therefore not
pi* = pi_ref exp(r / beta) / Z. On a one-token bandit with soft Bradley-Terry labels (temperature
1) over every pair and gamma = 0, the population loss is DPO's with pi_ref uniform and beta_s in
place of beta, so the optimum is softmax(r / beta_s), whatever pi_ref
(``workbench.analysis.exact.simpo_bandit_optimum``); with gamma > 0 it has no closed form and
``workbench.analysis.exact.population_optimum`` finds it numerically.

The data are the offline preference set of DPO (``PreferenceOptions``: pairs, labels, noise).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from .dpo import PreferenceOptions, masked_preference_dataset, pair_policy
from .spec import AlgoConfig, AlgorithmSpec


class SimPOConfig(AlgoConfig, PreferenceOptions):
    batch_size: int = Field(64, ge=1, le=100_000_000, description="preference pairs per gradient step")
    beta: float = Field(
        2.0, gt=0, description="beta_s, the scale of the implicit reward beta_s rbar(y) (SimPO paper: 2.0-2.5)"
    )
    gamma: float = Field(0.5, ge=0, description="gamma, the target reward margin (TRL's CPOConfig.simpo_gamma: 0.5)")


def average_logp(logp: Tensor, mask: Tensor) -> Tensor:
    """rbar(y) = sum_t m_t logp_t / sum_t m_t: ``(..., B, T)`` -> ``(..., B)``."""
    return (logp * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def simpo_loss(
    logp_c: Tensor, logp_r: Tensor, mask_c: Tensor, mask_r: Tensor, p_chosen: Tensor, cfg: SimPOConfig
) -> tuple[Tensor, Tensor, dict]:
    """Per-token log-probs ``(B, T)`` of chosen and rejected under the policy, their masks, ``p_chosen (B,)``.

    Returns ``(loss, per_sequence_loss (B, 1), stats)``.
    """
    r_c, r_r = average_logp(logp_c, mask_c), average_logp(logp_r, mask_r)  # rbar(y_c), rbar(y_r)  (B,)
    h = r_c - r_r
    per_seq = -(
        p_chosen * F.logsigmoid(cfg.beta * h - cfg.gamma)  # chosen wins, margin gamma
        + (1 - p_chosen) * F.logsigmoid(-cfg.beta * h - cfg.gamma)  # rejected wins, margin gamma
    )
    loss = per_seq.mean()
    stats = {
        "loss/simpo": loss.item(),
        "rewards/chosen": (cfg.beta * r_c).mean().item(),  # implicit reward beta_s rbar, as TRL's CPOTrainer logs
        "rewards/rejected": (cfg.beta * r_r).mean().item(),
        "rewards/accuracies": (h > 0).float().mean().item(),
        "rewards/margins": (cfg.beta * h).mean().item(),
    }
    return loss, per_seq[:, None], stats


def forward(policy, ref, batch) -> dict:
    """One policy pass over chosen and rejected together, ``(..., 2B, T)``; no reference pass."""
    prompts = torch.cat([batch["prompts"], batch["prompts"]], dim=-2)
    comps = torch.cat([batch["chosen"], batch["rejected"]], dim=-2)
    return {"logp": policy(prompts, comps, values=False).logp}


def pair_views(outputs: dict, batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``forward``'s log-probs split into the chosen and rejected halves, with their masks: each ``(B, T)``."""
    logp = outputs["logp"]
    B = batch["prompts"].shape[0]
    ones = torch.ones_like(logp[:B])
    mask_c, mask_r = batch.get("mask_chosen", ones), batch.get("mask_rejected", ones)  # (B, T) 0 after an EOS
    return logp[:B], logp[B:], mask_c, mask_r


def loss(outputs: dict, batch, cfg: SimPOConfig, beta: float):
    return simpo_loss(*pair_views(outputs, batch), batch["p_chosen"], cfg)


def regulariser(cfg: SimPOConfig, beta: float) -> str:
    return (
        f"SimPO on {cfg.labels} Bradley-Terry labels: no reference model, no KL "
        f"(reward scale beta_s {cfg.beta:g}, margin gamma {cfg.gamma:g})"
    )


SPEC = AlgorithmSpec(
    name="simpo",
    Config=SimPOConfig,
    kind="offline",
    unit="pairs",
    summary="SimPO: length-normalised log-likelihood margin, no reference model",
    data_policy=pair_policy,
    dataset=masked_preference_dataset,
    forward=forward,
    loss=loss,
    regulariser=regulariser,
)
