"""Typed run configuration: defaults, ``--set key=value`` overrides, validation, hash.

A run config is data::

    {"task": {"name": "bandit", "n_arms": 8}, "algo": {"name": "ppo", "clip_eps": 0.2},
     "model": {"n_layer": 2, "n_embd": 64}, "seed": 0, "steps": 300, "beta": 0.1, ...}

Layers, later wins: ``RunConfig`` field defaults, the algorithm's ``defaults``, the task's
``run_defaults``, then the user's overrides. ``task`` and ``algo`` parameters are
validated by the registered task's and algorithm's own pydantic models, which forbid
unknown keys, so a typo is an error naming the key.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .algorithms.spec import AlgoConfig, AlgorithmSpec
from .core.errors import ConfigError
from .models.policy import ModelConfig
from .registry import ALGORITHMS, TASKS
from .toy_tasks.base import Task

__all__ = [
    "Backend",
    "ConfigError",
    "Resolved",
    "RunConfig",
    "config_hash",
    "load_backend",
    "register_backend",
    "resolve",
]


# upper bounds of the integer settings: far beyond any toy run, low enough that no step counter, seed stream or
# SQLite integer overflows (a value past them is a ConfigError naming the key, not a traceback at run time);
# floats may be anything finite (a huge beta or lr is a legitimate way to make a run diverge)
MAX_STEPS = 100_000_000  # update rounds, measurement periods
MAX_COUNT = 100_000_000  # batch, group, pair and demonstration counts
MAX_SEED = (
    2**32 - 1
)  # seeds: the generators are seeded with seed + offsets, and the probes with seed * 1_000_003 + step
STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)  # every config: no unknown key, no inf or nan float


class RunConfig(BaseModel):
    model_config = STRICT

    task: dict[str, Any] = Field(description="task name and its parameters")
    algo: dict[str, Any] = Field(description="algorithm name and its parameters")
    model: ModelConfig = Field(default_factory=ModelConfig)
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seeds initial weights, prompts, sampling and data")
    steps: int = Field(
        200, ge=0, le=MAX_STEPS, description="gradient-update rounds (one rollout or one minibatch each)"
    )
    beta: float = Field(0.1, ge=0, description="KL coefficient of E[r] - beta KL(pi || pi_ref); defines pi*")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "linear", description="decay of the learning rate to 0 over the steps (TRL's default: linear)"
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient-norm clip")
    batch_size: int = Field(
        64, ge=1, le=MAX_COUNT, description="online: completions sampled per step (prompts x group_size)"
    )
    group_size: int = Field(8, ge=1, le=MAX_COUNT, description="online: completions per prompt")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the rollouts")
    reward_model: str | None = Field(
        None,
        description="reward-model checkpoint to optimise instead of the gold reward, or 'fit': train a Bradley-Terry "
        "reward model inside the run first (phase 2 of RLHF; workbench/training/pipeline.py)",
    )
    rm_steps: int = Field(
        200, ge=1, le=MAX_STEPS, description="reward_model='fit': Bradley-Terry steps (64 pairs each)"
    )
    rm_pairs: int = Field(
        1024,
        ge=1,
        le=MAX_COUNT,
        description="reward_model='fit': preference pairs, uniform completions, one sampled label each",
    )
    rm_pairs_from: Literal["uniform", "sft"] = Field(
        "uniform",
        description="reward_model='fit': the completions of the reward model's pairs: 'uniform', or two samples from "
        "the SFT policy (phase 1's result, the RL phase's pi_ref; the initial policy without sft_warmup_steps)",
    )
    rm_calibrate: Literal["off", "report", "optimise"] = Field(
        "off",
        description="reward_model='fit': fit gold ~ a * score + b on held-out pairs after phase 2 and log "
        "rm/calibration_* and rm/heldout_accuracy; 'report': the proxy metrics in gold units; 'optimise': the RL "
        "phase also optimises a * score + b (a scale against beta KL, so a different optimum)",
    )
    sft_warmup_steps: int = Field(
        0,
        ge=0,
        le=MAX_STEPS,
        description="online runs: SFT steps on demonstrations first (phase 1 of RLHF); the result is pi_ref",
    )
    pretrain_steps: int = Field(
        0,
        ge=0,
        le=MAX_STEPS,
        description="policy runs: steps of NLL on the task's pretraining text first (no solutions, no answer "
        "information; workbench/training/pretrain.py), seeded by the run seed alone: the base policy, the "
        "same for every method, is the starting policy and pi_ref",
    )
    eval_every: int = Field(10, ge=1, le=MAX_STEPS, description="steps between exact/eval measurements")
    probe_every: int = Field(
        100,
        ge=0,
        le=MAX_STEPS,
        description="steps between gradient and credit probes (grad/..., credit/...; "
        "workbench.analysis.probe); 0 = off",
    )
    probe_minibatches: int = Field(
        16, ge=2, le=100_000, description="K, independent minibatch gradients drawn per probe"
    )
    n_logged_samples: int = Field(4, ge=0, le=100_000, description="completions written to samples.jsonl per eval")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present, else CPU")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="bf16: the policy's forward passes and sampling under torch.autocast(bfloat16); parameters, "
        "optimizer state and the log-probs the losses read stay float32, exact metrics are always float32 "
        "(workbench/models/precision.py)",
    )
    cpu_threads: int = Field(
        1, ge=1, le=4096, description="torch threads on CPU; tiny models run fastest on one (parallelise runs instead)"
    )
    save_checkpoint: bool = Field(True, description="write the final model to checkpoint/")
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(
        default_factory=list,
        description="trackers each finished run is exported to, offline, from its metrics.jsonl "
        "(workbench/results/export.py; the training never sees them); not part of the run id",
    )
    backend: Literal["workbench", "trl"] = Field(
        "workbench",
        description="who trains: the workbench loops, or TRL's own trainer for the same run (sft, rm, "
        "dpo, ipo, grpo, rloo; see workbench/backends/trl.py); same run folder and metric names",
    )


@dataclass
class Resolved:
    run: RunConfig
    task: Task
    spec: AlgorithmSpec
    algo_cfg: AlgoConfig  # an instance of ``spec.Config``

    def to_dict(self) -> dict:
        d = self.run.model_dump()
        d["task"] = {"name": self.task.name, **self.task.cfg.model_dump()}
        d["algo"] = {"name": self.spec.name, **self.algo_cfg.model_dump()}
        return d

    @property
    def config_hash(self) -> str:
        return config_hash(_without_new_defaults(self.to_dict()))


# fields added after runs were stored: at their default they stay out of the hash, so old run ids still match
_HASH_EXEMPT_DEFAULTS = {
    ("backend",): "workbench",
    ("model", "impl"): "hf",
    ("rm_steps",): 200,
    ("rm_pairs",): 1024,
    ("sft_warmup_steps",): 0,
    ("pretrain_steps",): 0,  # the base policy pretrained inside the run (issue 15)
    ("rm_pairs_from",): "uniform",  # the in-run reward model's pairs from the SFT policy (issue 16)
    ("rm_calibrate",): "off",  # the in-run reward model calibrated to gold units (issue 16)
    ("probe_every",): 100,
    ("probe_minibatches",): 16,
    ("precision",): "fp32",
    ("task", "peak_centre"): None,  # the bandit's explicit gaussian reward and reference prior (issue 16)
    ("task", "prior_centre"): None,
    ("task", "prior_spread"): 1.0,
    ("algo", "pairs_from"): None,  # preference pairs sampled from a checkpoint's policy (issue 16)
    ("task", "eos"): False,  # the end-of-sequence action of sequence and arithmetic (issue 14)
    ("algo", "label_smoothing"): 0.0,  # cDPO's label smoothing on DPO (issue 17)
    ("algo", "importance_sampling_level"): "token",  # GRPO's GSPO switch (issue 17)
    ("report_to",): [],  # trackers a finished run is exported to (issue 18); left out of the hash at any value below
}
NOT_HASHED = ("report_to",)  # where a run is reported, not how it trains: never part of its id


def _without_new_defaults(d: dict) -> dict:
    d = copy.deepcopy(d)
    for path, default in _HASH_EXEMPT_DEFAULTS.items():
        parent = d
        for k in path[:-1]:
            parent = parent.get(k, {})
        if parent.get(path[-1], default) == default:
            parent.pop(path[-1], None)
    for key in NOT_HASHED:
        d.pop(key, None)
    return d


def config_hash(d: dict) -> str:
    """sha256 of the canonical JSON (sorted keys, no whitespace), first 16 hex digits."""
    return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def parse_value(text: str) -> Any:
    """``--set`` values: JSON when it parses (numbers, true/false, null, lists), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"cannot set {key!r}: {p!r} is not a section")
    d[parts[-1]] = value


def _fmt_errors(err: ValidationError, where: str, model_for) -> str:
    """One line per error: the dotted key path and what is allowed there."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        key = f"{where}.{loc}" if where else loc
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(sorted(model_for(e["loc"]).model_fields))
            lines.append(f"unknown key {key!r}; allowed here: {allowed}")
        else:
            got = f" (got {e['input']!r})" if e["type"] != "missing" else ""
            lines.append(f"{key}: {e['msg']}{got}")
    return "\n".join(lines)


def resolve(raw: dict, overrides: dict[str, Any] | None = None) -> Resolved:
    """Validate a raw config (plus dotted overrides) against the registries. Raises ``ConfigError``."""
    raw = copy.deepcopy(raw)
    for k, v in (overrides or {}).items():
        set_dotted(raw, k, v)
    task_name = raw.get("task", {}).get("name") if isinstance(raw.get("task"), dict) else raw.get("task")
    algo_name = raw.get("algo", {}).get("name") if isinstance(raw.get("algo"), dict) else raw.get("algo")
    if task_name not in TASKS:
        raise ConfigError(f"unknown task {task_name!r}; allowed: {', '.join(sorted(TASKS))}")
    if algo_name not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {algo_name!r}; allowed: {', '.join(sorted(ALGORITHMS))}")
    spec, task_cls = ALGORITHMS[algo_name], TASKS[task_name]
    if not isinstance(raw.get("task"), dict):
        raw["task"] = {"name": task_name}
    if not isinstance(raw.get("algo"), dict):
        raw["algo"] = {"name": algo_name}

    # defaults: algorithm's, then task's, unless the user set the key
    layered: dict = {}
    for k, v in {**spec.defaults, **task_cls.run_defaults}.items():
        set_dotted(layered, k, v)
    merged = _merge(layered, raw)

    task_params = {k: v for k, v in merged["task"].items() if k != "name"}
    algo_params = {k: v for k, v in merged["algo"].items() if k != "name"}
    try:
        task_cfg = task_cls.Config(**task_params)
    except ValidationError as e:
        raise ConfigError(_fmt_errors(e, "task", lambda loc: task_cls.Config)) from None
    try:
        algo_cfg = spec.Config(**algo_params)
    except ValidationError as e:
        raise ConfigError(_fmt_errors(e, "algo", lambda loc: spec.Config)) from None
    try:
        run = RunConfig(**merged)
    except ValidationError as e:
        model_for = lambda loc: ModelConfig if loc[:1] == ("model",) else RunConfig  # noqa: E731
        raise ConfigError(_fmt_errors(e, "", model_for)) from None
    try:
        task = task_cls(task_cfg)
    except ValueError as e:
        raise ConfigError(f"task {task_name!r}: {e}") from None
    missing = [
        m
        for m in (
            checkpoint_problem("model.path", run.model.path),
            checkpoint_problem("reward_model", None if run.reward_model == "fit" else run.reward_model),
            checkpoint_problem("algo.pairs_from", spec.data_policy(algo_cfg)),
        )
        if m
    ]
    if missing:
        raise ConfigError("\n".join(missing))
    if (run.reward_model == "fit" or run.sft_warmup_steps) and (spec.kind != "online" or run.backend != "workbench"):
        raise ConfigError(
            f"reward_model='fit' and sft_warmup_steps (workbench/training/pipeline.py) need an online algorithm on the "
            f"workbench backend; got {algo_name!r} on {run.backend!r}"
        )
    if run.pretrain_steps and not task.has_pretraining_text:
        raise ConfigError(f"pretrain_steps: task {task_name!r} has no pretraining text (Task.pretraining_text)")
    if run.pretrain_steps and (spec.trains != "policy" or run.backend != "workbench" or run.model.path):
        raise ConfigError(
            f"pretrain_steps (workbench/training/pretrain.py) trains a fresh policy on the workbench backend; "
            f"got {algo_name!r} on {run.backend!r}" + (f" from model.path {run.model.path!r}" if run.model.path else "")
        )
    if (run.rm_pairs_from != "uniform" or run.rm_calibrate != "off") and run.reward_model != "fit":
        raise ConfigError(
            f"rm_pairs_from and rm_calibrate set up the reward model the run fits: set reward_model = 'fit'; "
            f"got reward_model {run.reward_model!r}"
        )
    if spec.best_of is not None and run.backend != "workbench":
        raise ConfigError(
            f"{algo_name!r} ranks the starting policy's samples (by the gold reward, or by reward_model) on the "
            f"workbench backend; backend {run.backend!r} is not supported for it"
        )
    if run.precision != "fp32" and run.backend != "workbench":
        raise ConfigError(
            f"precision {run.precision!r} is the workbench backend's (workbench/models/precision.py); "
            f"the {run.backend!r} backend trains in float32"
        )
    if run.backend != "workbench":
        load_backend(run.backend).check(Resolved(run=run, task=task, spec=spec, algo_cfg=algo_cfg))
    if spec.kind == "online":
        if run.group_size < spec.min_group_size:
            raise ConfigError(f"{algo_name} needs group_size >= {spec.min_group_size}, got {run.group_size}")
        if run.batch_size % run.group_size:
            raise ConfigError(f"batch_size {run.batch_size} must be a multiple of group_size {run.group_size}")
    return Resolved(run=run, task=task, spec=spec, algo_cfg=algo_cfg)


def checkpoint_problem(key: str, path: str | None) -> str | None:
    """Why ``path`` (a ``model.path`` or ``reward_model`` setting) is not a checkpoint folder, or None when it is
    (or unset).

    Checked when a run or study is validated, so a wrong path is exit 2 naming the key, not a
    failure of every run at load time. Relative paths are relative to the working directory.
    """
    if path is None or path == "":
        return None
    p = Path(path).expanduser()
    if not p.exists():
        return (
            f"{key}: no such checkpoint folder: {path!r} "
            "(a directory written by save_pretrained, e.g. <run>/checkpoint)"
        )
    if not p.is_dir():
        return (
            f"{key}: {path!r} is a file, not a checkpoint folder "
            "(a directory written by save_pretrained, e.g. <run>/checkpoint)"
        )
    if not (p / "config.json").is_file():
        return (
            f"{key}: {path!r} has no config.json: not a checkpoint folder "
            "(a directory written by save_pretrained, e.g. <run>/checkpoint)"
        )
    return None


def _merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


@dataclass(frozen=True)
class Backend:
    """Another trainer for the same run: ``check`` refuses (``ConfigError``) what it cannot run as configured;
    ``train(res, out, progress)`` writes the same run folder as the workbench loop and returns its dict."""

    name: str
    check: Callable[[Resolved], None]
    train: Callable[[Resolved, Any, bool], dict]


BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    BACKENDS[backend.name] = backend


def load_backend(name: str) -> Backend:
    """The backend plugin ``name``: ``workbench.backends.<name>``, which registers itself when imported.

    The one import by name in the package (a plugin point, so that this layer never imports a
    backend; ``tests/test_layering.py`` allows it here only).
    """
    if name not in BACKENDS:
        importlib.import_module(f"{__package__}.backends.{name}")
    return BACKENDS[name]
