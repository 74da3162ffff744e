"""What an algorithm plugs into the training loops: a typed config, pure functions, declared capabilities.

An online algorithm gives

    prepare(rollout, cfg, beta) -> batch        a frozen ``Batch`` subclass: advantages and whatever
                                                its loss reads, computed once per rollout, no gradients
    loss(out, batch, cfg, beta) -> (loss, per_token_loss, stats)
                                                on each minibatch; ``out`` is the policy's
                                                ``PolicyOutput`` on that minibatch

and an offline algorithm gives ``dataset(task, cfg, generator, ref)`` (``ref``: the policy its data
may be sampled from: the run's frozen initial policy, ``None`` where a run has none, or the
checkpoint its ``data_policy(cfg)`` names, loaded by ``workbench.runtime.data``) and

    forward(model, ref, batch) -> outputs       the model passes (a dict of tensors), no loss
    loss(outputs, batch, cfg, beta) -> (loss, per_row_loss, stats)

or a single ``step(model, ref, batch, cfg, beta)``; given forward and loss, ``step`` is their
composition. Split in two, a stack of runs (``workbench.training.stacked``) shares one forward
pass (tensors with a leading run dimension) and takes each run's loss on its own slice.

What a loop must know about an algorithm (does it need a value head, how many passes over a
rollout, must pairs stay whole, what a unit of ``samples`` is) is declared on its
``AlgorithmSpec``, never discovered from its config's attributes or its batch's contents. Adding
an algorithm: one file here with its Config, functions and ``SPEC``, one line in
``workbench/registry.py`` (or ``registry.register``), its tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from ..core.types import Batch, PolicyOutput, Rollout

__all__ = ["AlgoConfig", "AlgorithmSpec", "Batch", "PolicyOutput", "Rollout", "kl_penalty"]


class AlgoConfig(BaseModel):
    """Base of every algorithm's typed config; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # an inf or nan parameter is a ConfigError


def kl_penalty(cfg: Any, beta: float) -> str:
    """The regulariser of an RL method with ``kl_estimator`` and ``kl_in`` fields."""
    return "no KL penalty" if beta == 0 else f"KL {cfg.kl_estimator} in the {cfg.kl_in}, beta {beta:g}"


def _one(cfg: Any) -> int:
    return 1


def _never(cfg: Any) -> bool:
    return False


@dataclass(frozen=True)
class AlgorithmSpec:
    name: str
    Config: type[AlgoConfig]
    kind: Literal["online", "offline"]
    summary: str
    trains: Literal["policy", "reward_model"] = "policy"
    # online
    prepare: Callable[[Rollout, Any, float], Batch] | None = None
    loss: Callable[[PolicyOutput, Any, Any, float], tuple[Any, Any, dict]] | None = None
    # offline (``loss`` above takes the outputs of ``forward`` and the batch dict)
    dataset: Callable[..., dict] | None = None
    forward: Callable[..., dict] | None = None
    step: Callable[..., tuple[Any, Any, dict]] | None = None
    # capabilities, declared
    min_group_size: int = 1
    unit: Literal["completions", "pairs", "demos"] = "completions"  # what one unit of a run's ``samples`` is
    value_head: Callable[[Any], bool] = _never  # does this config train a critic (a value head on the policy)
    epochs: Callable[[Any], int] = _one  # passes over each rollout
    minibatches: Callable[[Any], int] = _one  # minibatches per pass
    kl_in_reward: Callable[[Any], bool] = _never  # does the KL penalty act in the reward (so in the advantages)
    keeps_pairs: bool = False  # the loss pairs adjacent rows: every minibatch is the whole rollout
    # the config whose loss is the policy's alone (PPO: no value loss), for gradient probes of pi
    policy_loss_only: Callable[[Any], Any] = lambda cfg: cfg
    defaults: dict = field(default_factory=dict)  # run-level defaults this algorithm prefers
    # offline: the checkpoint folder whose policy samples the dataset (None: the run's pi_ref, passed as ``ref``)
    data_policy: Callable[[Any], str | None] = lambda cfg: None
    # what keeps the policy near pi_ref, in words, from the algorithm's config and the run's beta. Two runs
    # whose regularisers read differently are not compared on raw reward or KL (workbench.studies checks rules)
    regulariser: Callable[[Any, float], str] = lambda cfg, beta: "none"
    # a method that does not train: best-of-n of the starting policy, n = best_of(cfg) (``workbench.algorithms.bon``).
    # The loop makes no parameter updates and the evaluation measures that transformed policy; no prepare/loss
    best_of: Callable[[Any], int] | None = None

    def __post_init__(self) -> None:
        if self.kind == "offline" and self.step is None and self.forward is not None and self.loss is not None:
            forward, loss = self.forward, self.loss
            object.__setattr__(
                self, "step", lambda model, ref, batch, cfg, beta: loss(forward(model, ref, batch), batch, cfg, beta)
            )
        need = ("prepare", "loss") if self.kind == "online" else ("dataset", "step")
        need = () if self.best_of is not None else need  # nothing to train
        missing = [n for n in need if getattr(self, n) is None]
        if missing:
            raise TypeError(f"algorithm {self.name!r} ({self.kind}) must give {', '.join(missing)}")
