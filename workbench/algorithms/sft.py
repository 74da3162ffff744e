"""Supervised fine-tuning: masked negative log-likelihood on demonstration completions.

    L = - sum_{i,t} m_it log pi(y_it | x_i, y_i<t) / sum_{i,t} m_it

(the completion-only loss of TRL's ``SFTTrainer``: prompt tokens carry no loss, the mean
is over completion tokens of the whole batch). Targets are the task's demonstrations.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from ..core.ops import Aggregation, aggregate
from .spec import AlgoConfig, AlgorithmSpec


class SFTConfig(AlgoConfig):
    batch_size: int = Field(64, ge=1, le=100_000_000, description="demonstrations per gradient step")
    n_demos: int = Field(4096, ge=1, le=100_000_000, description="size of the fixed demonstration set")
    aggregation: Aggregation = Field("token_mean", description="loss aggregation over tokens (TRL: token mean)")


def sft_loss(logp: Tensor, mask: Tensor, cfg: SFTConfig) -> tuple[Tensor, Tensor, dict]:
    """logp, mask: ``(B, T)``. Returns ``(loss, per_token_loss (B, T), stats)``."""
    per_token = -logp  # -log pi(y_t | s_t)
    loss = aggregate(per_token, mask, cfg.aggregation)
    return loss, per_token * mask, {"loss/sft": loss.item()}


def dataset(task, cfg: SFTConfig, generator: torch.Generator, ref=None):
    prompts = task.sample_prompts(cfg.n_demos, generator)
    demos = task.demonstrations(prompts)
    return {"prompts": prompts, "completions": demos, "mask": task.action_mask(demos)}  # 0 after EOS, at observations


def forward(policy, ref, batch) -> dict:
    return {"logp": policy(batch["prompts"], batch["completions"], values=False).logp}


def loss(outputs: dict, batch, cfg: SFTConfig, beta: float):
    return sft_loss(outputs["logp"], batch.get("mask", torch.ones_like(outputs["logp"])), cfg)


SPEC = AlgorithmSpec(
    name="sft",
    Config=SFTConfig,
    kind="offline",
    unit="demos",
    summary="masked NLL on demonstrations",
    dataset=dataset,
    forward=forward,
    loss=loss,
    regulariser=lambda cfg, beta: "SFT: cross-entropy on demonstrations, no KL",
)
