"""What an algorithm plugs into the training loops: a typed config and pure functions.

An online algorithm gives ``prepare(rollout, cfg, beta) -> batch`` (advantages and
whatever else its loss needs, computed once per rollout without gradients) and
``loss(out, batch, cfg, beta) -> (loss, per_token_loss, stats)`` evaluated on each
minibatch; ``out`` is the policy's ``PolicyOutput`` on that minibatch. An offline algorithm
gives ``dataset(task, cfg, generator)`` and ``step(model, ref, batch, cfg, beta)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor

from ..core.ops import AlgoConfig


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


def kl_penalty(cfg: Any, beta: float) -> str:
    """The regulariser of an RL method with ``kl_estimator`` and ``kl_in`` fields."""
    return "no KL penalty" if beta == 0 else f"KL {cfg.kl_estimator} in the {cfg.kl_in}, beta {beta:g}"


@dataclass
class AlgorithmSpec:
    name: str
    Config: type[AlgoConfig]
    kind: Literal["online", "offline"]
    summary: str
    value_head: bool = False
    trains: Literal["policy", "reward_model"] = "policy"
    prepare: Callable[..., dict[str, Tensor]] | None = None
    loss: Callable[..., tuple[Tensor, Tensor, dict]] | None = None
    dataset: Callable[..., Any] | None = None
    step: Callable[..., tuple[Tensor, Tensor, dict]] | None = None
    min_group_size: int = 1
    # what one unit of a run's ``samples`` is: a sampled completion, a preference pair or a demonstration
    unit: Literal["completions", "pairs", "demos"] = "completions"
    defaults: dict = field(default_factory=dict)  # run-level defaults this algorithm prefers
    # what keeps the policy near pi_ref, in words, from the algorithm's config and the run's beta. Two runs
    # whose regularisers read differently are not compared on raw reward or KL (workbench.studies.study checks rules)
    regulariser: Callable[[Any, float], str] = lambda cfg, beta: "none"

    def epochs(self, cfg: AlgoConfig) -> int:
        return getattr(cfg, "epochs", 1)

    def minibatches(self, cfg: AlgoConfig) -> int:
        return getattr(cfg, "minibatches", 1)
