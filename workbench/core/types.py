"""The data that crosses layers: a rollout, a policy's output on it, an algorithm's prepared batch.

Shapes: ``B = prompts x group_size`` rows (the completions of one prompt adjacent), ``T``
completion tokens, ``Tp`` prompt tokens, ``A`` actions.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TypeVar

from torch import Tensor


@dataclass
class PolicyOutput:
    logp: Tensor  # (B, T) log pi(y_t | s_t) of the given completion
    logits: Tensor | None  # (B, T, A) log pi(. | s_t) over the action set
    values: Tensor | None  # (B, T) V(s_t), or None without a value head


@dataclass
class Rollout:
    """One batch of on-policy samples. ``B = prompts x group_size``; rows of a group are adjacent."""

    prompts: Tensor  # (B, Tp)
    completions: Tensor  # (B, T)
    mask: Tensor  # (B, T) 1 for completion tokens that count
    old_logp: Tensor  # (B, T) log pi_old(y_t | s_t), the sampling policy
    ref_logp: Tensor  # (B, T) log pi_ref(y_t | s_t)
    scores: Tensor  # (B,) the reward being optimised (gold or reward model), at the last token
    step_rewards: Tensor  # (B, T) the same reward split per step (scores at the last token unless dense)
    gold: Tensor  # (B,) gold reward, for logging
    group_size: int
    old_values: Tensor | None = None  # (B, T) V_old(s_t) with a value head
    eos_action: int | None = None  # the task's end-of-sequence action (mask: 1 up to and including the first EOS)
    episode: dict | None = None  # the task's episode metrics of this rollout (``Task.episode_stats``; tool/*)


B_ = TypeVar("B_", bound="Batch")


@dataclass(frozen=True, kw_only=True)
class Batch:
    """What an online algorithm's ``prepare`` computes once per rollout, without gradients, for its loss.

    Each algorithm subclasses it with the tensors its loss reads. The loop never looks inside:
    ``select`` slices every tensor whose first dimension is the rollout's ``B`` (per-row data)
    and keeps the others whole (per-pair or per-group data). Two fields are common to all:

    - ``advantages``: ``(B, T)`` per-token advantages where the algorithm has them (logged as
      ``adv/mean``, ``adv/std``; compared with the exact advantage by the credit probe);
    - ``kl``: the per-token KL estimate ``(B, T)`` the algorithm applied in its reward, with
      ``kl_metric`` its metric name (``kl/k1_reward``); the loop logs it under that name.
    """

    mask: Tensor  # (B, T)
    advantages: Tensor | None = None
    kl: Tensor | None = None
    kl_metric: str | None = None

    def select(self: B_, idx: Tensor, rows: int) -> B_:
        """The minibatch ``idx`` of a batch of ``rows`` rows."""
        sliced = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor) and v.shape[:1] == (rows,):
                sliced[f.name] = v[idx]
        return replace(self, **sliced)
