"""Rejection-sampling fine-tuning (expert iteration): SFT on the policy's own best samples.

RAFT (Dong et al. 2023, arXiv 2304.06767), ReST's improve step (Gulcehre et al. 2023,
arXiv 2308.08998), expert iteration in STaR (Zelikman et al. 2022, arXiv 2203.14465). Each
prompt x gets G samples y_1..y_G ~ pi_old(.|x) with scores s_1..s_G (the optimised reward,
gold or a reward model); a weight w_i decides which are kept:

    keep = "best":       w_i = 1[s_i = max_g s_g] / #{g : s_g = max_g s_g}    one per group, ties split evenly
    keep = "threshold":  w_i = 1[s_i >= threshold]                           every sample good enough
    L = - sum_{i,t} w_i m_it log pi(y_it | x_i, y_i<t) / sum_{i,t} w_i m_it

the masked NLL of SFT (``workbench.algorithms.sft``: the token mean) on the kept samples,
weighted. No importance ratio and no KL term: the only tie to pi_ref is the starting point
and the filter (one round of best-of-G from pi is a policy at KL <= log G - (G-1)/G from it;
``workbench.analysis.exact.best_of_n_logprobs``). ``epochs`` > 1 re-fits the same kept set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field
from torch import Tensor

from ..core.ops import group_view
from .spec import AlgoConfig, AlgorithmSpec, Batch, PolicyOutput, Rollout


class RFTConfig(AlgoConfig):
    keep: Literal["best", "threshold"] = Field(
        "best", description="keep the best sample of each group (RAFT), or every sample scoring >= threshold"
    )
    threshold: float = Field(0.5, description="'threshold': the lowest score kept")
    epochs: int = Field(1, ge=1, le=10_000, description="passes over each rollout's kept samples")
    minibatches: int = Field(1, ge=1, le=100_000, description="minibatches per pass")


def rft_weights(scores: Tensor, group_size: int, keep: str = "best", threshold: float = 0.5) -> Tensor:
    """scores ``(B,)`` -> weights ``(B,)``: w_i of the module docstring (groups are adjacent rows)."""
    if keep == "threshold":
        return (scores >= threshold).float()  # 1[s_i >= threshold]
    s = group_view(scores, group_size)  # (B/G, G)
    best = (s == s.max(dim=1, keepdim=True).values).float()  # 1[s_i = max_g s_g]
    return (best / best.sum(dim=1, keepdim=True)).reshape(-1)  # ties split evenly: each group weighs 1


@dataclass(frozen=True, kw_only=True)
class RFTBatch(Batch):
    weights: Tensor  # (B,) w_i
    advantages: Tensor  # (B, T) w_i on every completion token: the coefficient of -log pi in the loss


def prepare(roll: Rollout, cfg: RFTConfig, beta: float) -> RFTBatch:
    w = rft_weights(roll.scores, roll.group_size, cfg.keep, cfg.threshold)
    return RFTBatch(weights=w, advantages=w[:, None] * roll.mask, mask=roll.mask)


def rft_loss(out: PolicyOutput, batch: RFTBatch, cfg: RFTConfig, beta: float) -> tuple[Tensor, Tensor, dict]:
    """``out.logp`` ``(B, T)``. Returns ``(loss, per_token_loss (B, T), stats)``; ``beta`` is not used."""
    wm = batch.weights[:, None] * batch.mask  # w_i m_it
    per_token = -out.logp * wm  # -w_i m_it log pi(y_it)
    loss = per_token.sum() / wm.sum().clamp(min=1e-12)  # / sum w_i m_it (0 when nothing is kept)
    stats = {"loss/rft": loss.item(), "rft/kept_fraction": (batch.weights > 0).float().mean().item()}
    return loss, per_token, stats


SPEC = AlgorithmSpec(
    name="rft",
    Config=RFTConfig,
    kind="online",
    summary="rejection-sampling fine-tuning (expert iteration): NLL on the best samples",
    prepare=prepare,
    loss=rft_loss,
    epochs=lambda cfg: cfg.epochs,
    minibatches=lambda cfg: cfg.minibatches,
    regulariser=lambda cfg, beta: "RFT: NLL on the policy's own kept samples, no KL",
)
