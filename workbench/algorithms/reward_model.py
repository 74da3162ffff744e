"""Reward model: Bradley-Terry loss on a scalar-head model (phase two of RLHF).

    P(y_c > y_r | x) = sigmoid(r(x, y_c) - r(x, y_r))
    L = -E[ p log sigmoid(r_c - r_r - margin) + (1 - p) log sigmoid(r_r - r_c - margin) ]

with p the label's probability that ``chosen`` wins (1 for hard labels, which gives TRL
``RewardTrainer``'s ``-log sigmoid(r_c - r_r)``). The trained model is saved as a Hugging
Face sequence-classification checkpoint and serves as the reward for RL runs
(``reward_model = <run>/checkpoint``): SFT, reward model, RL.
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from .dpo import PreferenceOptions, pair_policy, preference_dataset
from .spec import AlgoConfig, AlgorithmSpec


class RewardModelConfig(AlgoConfig, PreferenceOptions):
    batch_size: int = Field(64, ge=1, le=100_000_000, description="preference pairs per gradient step")
    margin: float = Field(0.0, description="margin subtracted inside the sigmoid (TRL: per-example margin)")

    @model_validator(mode="after")
    def _no_reference_pairs(self):
        if self.pairs == "reference" and self.pairs_from is None:  # a reward-model run has no policy of its own
            raise ValueError(
                "pairs='reference' in an rm run samples from a checkpoint: set pairs_from; it has no pi_ref"
            )
        return self


def reward_model_loss(
    r_chosen: Tensor, r_rejected: Tensor, p_chosen: Tensor, cfg: RewardModelConfig
) -> tuple[Tensor, Tensor, dict]:
    """r_chosen, r_rejected, p_chosen: ``(B,)``. Per-sequence loss returned as ``(B, 1)``."""
    d = r_chosen - r_rejected  # r_c - r_r
    per_seq = -(p_chosen * F.logsigmoid(d - cfg.margin) + (1 - p_chosen) * F.logsigmoid(-d - cfg.margin))
    loss = per_seq.mean()
    stats = {"loss/rm": loss.item(), "rm/accuracy": (d > 0).float().mean().item(), "rm/margin": d.mean().item()}
    return loss, per_seq[:, None], stats


def step(rm, ref, batch, cfg: RewardModelConfig, beta: float):
    r_c = rm(batch["prompts"], batch["chosen"])
    r_r = rm(batch["prompts"], batch["rejected"])
    return reward_model_loss(r_c, r_r, batch["p_chosen"], cfg)


SPEC = AlgorithmSpec(
    name="rm",
    Config=RewardModelConfig,
    kind="offline",
    unit="pairs",
    trains="reward_model",
    summary="Bradley-Terry reward model",
    dataset=preference_dataset,
    data_policy=pair_policy,
    step=step,
    regulariser=lambda cfg, beta: "a reward model, not a policy",
)
