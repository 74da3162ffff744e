"""Studies: several algorithms on the same task(s), seeds and budget, run resumably into a store.

A study file (``studies/*.toml``, format in ``docs/studies.md``)::

    name = "quickstart"
    claims = ["C6", "C13"]          # ids from docs/claims.md that the study tests
    seeds = [0, 1, 2]

    [[tasks]]                       # one table per task: its name and parameters
    name = "bandit"
    n_arms = 8

    [budget]                        # the same for every run
    steps = 200                     # gradient-update rounds
    batch_size = 64                 # per round: completions (online) or demos / pairs (offline)

    [settings]                      # run settings shared by every run (beta, lr, model, ...)
    beta = 0.1

    [[algorithms]]                  # one table per algorithm: its name and parameters
    name = "ppo"
    clip_eps = 0.2
    settings = { lr = 3e-4 }        # optional per-algorithm run settings (not model, not budget)
    grid = { "algo.clip_eps" = [0.1, 0.2] }   # optional grids (also a study-level [grid])

Identical conditions: for a given seed every algorithm gets the same initial weights and
reference model (the model settings are study-wide), the same prompt stream (seeded by the
run seed), and the same budget: ``steps`` update rounds of ``batch_size`` completions,
demonstrations or preference pairs. Each run records what it consumed (``samples`` in its
metrics, ``step``/``samples``/``unit`` in the index).

A run's id is the hash of its resolved config, so a run is done once whatever study asks
for it. ``run_study`` claims runs atomically in the index, executes them through an
executor, publishes ``metrics.parquet`` and marks them done / diverged / failed; killed
and restarted, it picks up where it stopped.
"""

from __future__ import annotations

import copy
import itertools
import os
import shutil
import sys
import threading
import time
import traceback
import typing
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from ..config import MAX_COUNT, MAX_SEED, MAX_STEPS, ConfigError, Resolved, RunConfig, resolve
from ..models.policy import ModelConfig
from ..reporting.verdicts import Statistics, VerdictRule
from ..results.store import (
    Heartbeat,
    Owner,
    Store,
    StoreFault,
    is_stale,
    load_final,
    publish_metrics,
    publish_text,
    read_progress,
    spec_hash,
    storage_fault,
)

CLAIM_IDS = tuple(f"C{i}" for i in range(1, 14))
# run settings a study fixes elsewhere: the budget, the seeds, the task and algorithm tables, the command line
_NOT_SETTINGS = {"task", "algo", "seed", "steps", "batch_size", "device"}
# what a LocalProcessExecutor's fork server imports once, so that each run's process starts warm
WORKER_PRELOAD = (
    "workbench.studies.study",
    "workbench.training.loop",
    "transformers.models.auto.modeling_auto",
    "transformers.models.gpt2.modeling_gpt2",
    "transformers.models.llama.modeling_llama",
    "transformers.tokenization_utils_fast",
)
SUMMARY_METRICS = (
    "reward/exact",
    "kl/exact",
    "kl/exact_to_optimal",
    "reward/eval",
)  # reward/eval: non-enumerable tasks


class StudyError(ConfigError):
    """A bad study file; ``str()`` names the file, the key path and what is allowed."""


# a study's name names files and folders (studies/<name>.toml, reports/<name>/) and is typed on command lines
MAX_STUDY_NAME = 100
STUDY_NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"  # not '.', '..' or '.hidden', not '-option', no '/'


def study_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a study's name (for a message), or None when it can."""
    import re

    if not name:
        return "a study name cannot be empty"
    if len(name) > MAX_STUDY_NAME:
        return f"a study name has at most {MAX_STUDY_NAME} characters (got {len(name)})"
    if not re.fullmatch(STUDY_NAME_PATTERN, name):
        return f"a study name is letters, digits, '_', '.' and '-', starting with a letter, digit or '_' (got {name!r})"
    return None


# -- the study file schema ----------------------------------------------------------------------


def _settings_model(name: str, exclude: set[str], doc: str) -> type[BaseModel]:
    fields = {k: (f.annotation, copy.copy(f)) for k, f in RunConfig.model_fields.items() if k not in exclude}
    return create_model(name, __config__=ConfigDict(extra="forbid", allow_inf_nan=False), __doc__=doc, **fields)


Settings = _settings_model("Settings", _NOT_SETTINGS, "Run settings shared by every run of the study.")
AlgorithmSettings = _settings_model(
    "AlgorithmSettings",
    _NOT_SETTINGS | {"model"},
    "Run settings of one algorithm's runs; not the model (every algorithm starts from the same weights).",
)
GridValues = Annotated[list[Any], Field(min_length=1)]


class Budget(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    steps: int = Field(ge=1, le=MAX_STEPS, description="gradient-update rounds of every run")
    batch_size: int = Field(
        64,
        ge=1,
        le=MAX_COUNT,
        description="per round: completions (online) or demonstrations / preference pairs (offline)",
    )


class TaskEntry(BaseModel):
    """``name`` plus the task's own parameters (checked against the task's config)."""

    model_config = ConfigDict(extra="allow")

    name: str
    label: str | None = Field(None, description="name in tables; defaults to the task name")


class AlgorithmEntry(BaseModel):
    """``name`` plus the algorithm's own parameters (checked against the algorithm's config)."""

    model_config = ConfigDict(extra="allow")

    name: str
    label: str | None = Field(None, description="name in tables; defaults to the algorithm name")
    settings: AlgorithmSettings = Field(default_factory=AlgorithmSettings)  # type: ignore[valid-type]
    grid: dict[str, GridValues] = Field(
        default_factory=dict, description="dotted key -> values: algo.<param> or a run setting"
    )


class Deviation(BaseModel):
    """A setting changed after seeing results: declared, and printed in the report."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    what: str = Field(description="the setting or rule that changed")
    from_: Any = Field(alias="from", description="its value before")
    to: Any = Field(description="its value now")
    why: str = Field(description="what was seen that made the change")


class ReportOptions(BaseModel):
    """What ``workbench report`` plots and tabulates."""

    model_config = ConfigDict(extra="forbid")

    metrics: list[str] = Field(
        default_factory=lambda: ["reward/exact", "kl/exact", "kl/exact_to_optimal", "reward/eval"],
        description="metrics tabulated (final values) and drawn over steps; absent ones are skipped",
    )


class StudyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(
        None, pattern=STUDY_NAME_PATTERN, max_length=MAX_STUDY_NAME, description="defaults to the file name"
    )
    description: str = ""
    claims: list[Literal[CLAIM_IDS]] = Field(
        min_length=1, description="claim ids from docs/claims.md that this study tests"
    )  # type: ignore[valid-type]
    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] = Field(min_length=1)
    tasks: list[TaskEntry] = Field(min_length=1)
    budget: Budget
    settings: Settings = Field(default_factory=Settings)  # type: ignore[valid-type]
    grid: dict[str, GridValues] = Field(
        default_factory=dict, description="dotted key -> values: a run setting, model.<field> or task.<param>"
    )
    algorithms: list[AlgorithmEntry] = Field(min_length=1)
    verdicts: list[VerdictRule] = Field(
        default_factory=list, description="rules deciding each claim from the final metrics (workbench report)"
    )
    report: ReportOptions = Field(default_factory=lambda: ReportOptions())
    confirm_seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] = Field(
        default_factory=list,
        description="seeds never looked at while the study was designed: they alone decide the "
        "verdicts ('seeds' are the exploration seeds); required with [[verdicts]], disjoint from 'seeds'",
    )
    statistics: Statistics = Field(
        default_factory=Statistics, description="how verdicts are decided: min_seeds, interval, level"
    )
    deviations: list[Deviation] = Field(default_factory=list, description="settings changed after seeing results")

    @property
    def all_seeds(self) -> list[int]:
        """Exploration then confirmation seeds: every seed the study runs."""
        return list(self.seeds) + list(self.confirm_seeds)


@dataclass
class Study:
    config: StudyConfig
    path: Path
    text: str
    warnings: list[str] = field(default_factory=list)  # what is allowed but likely wrong (verdict metrics no run logs)

    @property
    def name(self) -> str:
        return self.config.name or self.path.stem


# -- loading and validating ---------------------------------------------------------------------


def load_study(path: str | os.PathLike) -> Study:
    """Parse and validate a study file. Raises ``StudyError`` with a message for a person."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        near = sorted(p.name for p in path.parent.glob("*.toml")) if path.parent.is_dir() else []
        hint = f"; study files in {path.parent}/: {', '.join(near)}" if near else ""
        raise StudyError(f"{path}: no such study file{hint}") from None
    except (IsADirectoryError, UnicodeDecodeError, PermissionError) as e:
        raise StudyError(f"{path}: cannot read the study file ({e.__class__.__name__}: {e})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise StudyError(f"{path}: not valid TOML: {e}") from None
    try:
        cfg = StudyConfig(**raw)
    except ValidationError as e:
        raise StudyError(_report(path, _pydantic_lines(e, "", StudyConfig))) from None
    problems = _check(cfg)
    if cfg.name is None and (why := study_name_problem(path.stem)):
        problems.insert(
            0, f'name: the file name {_short(path.stem)} cannot name the study ({why}); set name = "..." in the file'
        )
    if problems:
        raise StudyError(_report(path, problems))
    return Study(cfg, path, text, seed_warnings(cfg) + metric_warnings(cfg))


def _report(path: Path, lines: list[str], limit: int = 15) -> str:
    more = [f"... and {len(lines) - limit} more"] if len(lines) > limit else []
    return f"{path}: invalid study file\n" + "\n".join(f"  {x}" for x in lines[:limit] + more)


def _path(loc) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _pydantic_lines(err: ValidationError, prefix: str, root: type[BaseModel]) -> list[str]:
    lines = []
    for e in err.errors():
        key = _path(((prefix,) if prefix else ()) + tuple(e["loc"]))
        if e["type"] == "extra_forbidden":
            model = _model_at(root, e["loc"])
            allowed = f"; allowed here: {', '.join(sorted(model.model_fields))}" if model else ""
            lines.append(f"{key}: unknown key{allowed}")
        elif e["type"] == "missing":
            lines.append(f"{key}: required key is missing")
        else:
            lines.append(f"{key}: {e['msg']} (got {_short(e['input'])})")
    return lines


def _short(value, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters (a 300-character name need not be echoed whole)."""
    r = repr(value)
    return (
        r
        if len(r) <= limit
        else f"{r[: limit - 5]}...{r[-1]} ({len(value) if isinstance(value, str) else len(r)} characters)"
    )


def _model_at(model, loc) -> type[BaseModel] | None:
    """The pydantic model that holds the last key of ``loc`` (to list the keys allowed there)."""
    cur = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)) or part not in cur.model_fields:
            return None
        cur = _unwrap(cur.model_fields[part].annotation)
    return cur if isinstance(cur, type) and issubclass(cur, BaseModel) else None


def _unwrap(tp):
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (list, tuple) and args:
        return _unwrap(args[0])
    models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
    return models[0] if models else tp


def _check(cfg: StudyConfig) -> list[str]:
    """What pydantic cannot see: registry names, task/algorithm parameters, grid keys, duplicates."""
    from ..registry import ALGORITHMS, TASKS

    problems: list[str] = []
    if len(set(cfg.seeds)) != len(cfg.seeds):
        problems.append(f"seeds: each seed once (got {cfg.seeds})")
    if len(set(cfg.confirm_seeds)) != len(cfg.confirm_seeds):
        problems.append(f"confirm_seeds: each seed once (got {cfg.confirm_seeds})")
    if both := sorted(set(cfg.seeds) & set(cfg.confirm_seeds)):
        problems.append(
            f"confirm_seeds: must not repeat exploration seeds (both hold {both}); confirmation seeds are "
            "ones never looked at while the study was designed"
        )
    if cfg.verdicts and not cfg.confirm_seeds:
        problems.append(
            "confirm_seeds: required when the study has [[verdicts]]: verdicts are decided on seeds that did "
            "not guide the design (e.g. seeds = [0, 1, 2] to explore, confirm_seeds = [100, 101, 102, 103, 104])"
        )
    task_params: list[set[str]] = []
    for i, t in enumerate(cfg.tasks):
        if t.name not in TASKS:
            problems.append(f"tasks[{i}].name: unknown task {t.name!r}; allowed: {', '.join(sorted(TASKS))}")
            continue
        cls = TASKS[t.name]
        task_params.append(set(cls.Config.model_fields))
        try:
            cls.Config(**(t.model_extra or {}))
        except ValidationError as e:
            problems += _extra_lines(e, f"tasks[{i}]", cls.Config, {"name", "label"})
    _check_labels(problems, "tasks", [t.label or t.name for t in cfg.tasks])
    shared = set(task_params[0]).intersection(*task_params) if task_params else set()
    allowed = (
        set(Settings.model_fields) | {f"model.{k}" for k in ModelConfig.model_fields} | {f"task.{k}" for k in shared}
    )
    problems += _grid_lines("grid", cfg.grid, allowed)
    for i, a in enumerate(cfg.algorithms):
        where = f"algorithms[{i}]"
        if a.name not in ALGORITHMS:
            problems.append(f"{where}.name: unknown algorithm {a.name!r}; allowed: {', '.join(sorted(ALGORITHMS))}")
            continue
        spec = ALGORITHMS[a.name]
        params = dict(a.model_extra or {})
        if "batch_size" in params:
            problems.append(f"{where}.batch_size: set by budget.batch_size (the same budget for every algorithm)")
            params.pop("batch_size")
        try:
            spec.Config(**params)
        except ValidationError as e:
            problems += _extra_lines(e, where, spec.Config, {"name", "label", "settings", "grid"})
        algo_keys = {f"algo.{k}" for k in spec.Config.model_fields if k != "batch_size"}
        problems += _grid_lines(f"{where}.grid", a.grid, set(AlgorithmSettings.model_fields) | algo_keys)
    _check_labels(problems, "algorithms", [a.label or a.name for a in cfg.algorithms])
    labels = [a.label or a.name for a in cfg.algorithms]
    for i, v in enumerate(cfg.verdicts):
        if v.claim not in cfg.claims:
            problems.append(f"verdicts[{i}].claim: {v.claim!r} is not in this study's claims ({', '.join(cfg.claims)})")
        for side in ("a", "b"):
            lab = getattr(v, side)
            if lab is not None and lab not in labels:
                problems.append(f"verdicts[{i}].{side}: unknown algorithm label {lab!r}; allowed: {', '.join(labels)}")
    if not problems:
        problems += _span_lines(cfg) or _confound_lines(cfg)
    return problems


def seed_warnings(cfg: StudyConfig) -> list[str]:
    """Too few confirmation seeds to decide: allowed (the study still runs), but every rule will say so."""
    if cfg.verdicts and len(cfg.confirm_seeds) < cfg.statistics.min_seeds:
        return [
            f"confirm_seeds: {len(cfg.confirm_seeds)} seeds, fewer than statistics.min_seeds = "
            f"{cfg.statistics.min_seeds}: every verdict rule will report 'insufficient seeds'"
        ]
    return []


def is_raw_metric(metric: str) -> bool:
    """Reward and KL figures whose meaning depends on how a method regularises (not ``objective/exact``,
    which is the regularised objective at the run's beta, nor ``kl/exact_to_optimal``, the distance to pi*)."""
    return metric.startswith(("reward/", "kl/")) and metric != "kl/exact_to_optimal"


def _regularisers(cfg: StudyConfig, label: str, where: dict) -> set[str]:
    """How the runs of algorithm ``label`` that ``where`` selects keep near pi_ref (``AlgorithmSpec.regulariser``)."""
    from ..registry import ALGORITHMS

    entry = next(a for a in cfg.algorithms if (a.label or a.name) == label)
    spec = ALGORITHMS[entry.name]
    base = {k[5:]: v for k, v in spec.defaults.items() if k.startswith("algo.")} | dict(entry.model_extra or {})
    beta = entry.settings.model_dump(exclude_unset=True).get(
        "beta",
        cfg.settings.model_dump(exclude_unset=True).get(
            "beta", spec.defaults.get("beta", RunConfig.model_fields["beta"].default)
        ),
    )
    out = set()
    for point in _side_points(cfg, entry, where):
        params = base | {k[5:]: v for k, v in point.items() if k.startswith("algo.")}
        params.pop("batch_size", None)
        try:
            out.add(spec.regulariser(spec.Config(**params), float(point.get("beta", beta))))
        except (ValidationError, ValueError, TypeError):  # a bad grid value: expand() reports it with its key
            continue
    return out


def _side_points(cfg: StudyConfig, entry: AlgorithmEntry, where: dict) -> list[dict]:
    """The grid points (study grid x the algorithm's grid) a rule side's ``where`` selects."""
    points = [{**g, **h} for g in _points(cfg.grid) for h in _points(entry.grid)]
    return [p for p in points if not any(k != "task" and k in p and p[k] != v for k, v in where.items())]


def _span_lines(cfg: StudyConfig) -> list[str]:
    """Rule sides that pool several tasks or grid points: their values are not seeds of one condition."""
    lines = []
    for i, v in enumerate(cfg.verdicts):
        for side, label, where in (("a", v.a, v.where_a), ("b", v.b, v.where_b)):
            if label is None:
                continue
            entry = next(a for a in cfg.algorithms if (a.label or a.name) == label)
            tasks = [
                t.label or t.name for t in cfg.tasks if where.get("task", t.label or t.name) == (t.label or t.name)
            ]
            points = _side_points(cfg, entry, where)
            if len(tasks) * len(points) > 1:
                varying = sorted({k for p in points for k in p} | ({"task"} if len(tasks) > 1 else set()))
                lines.append(
                    f"verdicts[{i}].{side}: {label!r} spans {len(tasks) * len(points)} tasks x grid points; a rule "
                    f"compares seeds of one condition: pin {', '.join(varying)} with where / {side}_where"
                )
    return lines


def _confound_lines(cfg: StudyConfig) -> list[str]:
    """Raw reward / KL comparisons between methods that regularise differently, unless declared ``confounded``."""
    lines = []
    for i, v in enumerate(cfg.verdicts):
        if v.b is None or v.confounded or not is_raw_metric(v.metric):
            continue
        ra, rb = _regularisers(cfg, v.a, v.where_a), _regularisers(cfg, v.b, v.where_b)
        if ra and rb and (len(ra | rb) > 1):
            lines.append(
                f"verdicts[{i}] ({v.metric}: {v.a} vs {v.b}): the two sides regularise differently "
                f"({' / '.join(sorted(ra))} vs {' / '.join(sorted(rb))}), so raw {v.metric} mostly measures the "
                "regulariser; compare 'objective/exact' (the regularised objective at the run's beta) or "
                "'kl/exact_to_optimal', or state why the comparison still holds with confounded = \"...\""
            )
    return lines


def metric_warnings(cfg: StudyConfig) -> list[str]:
    """Metric names in verdict rules and ``[report]`` that no run of the study would log: a typo would
    otherwise show only as 'not measured'. Warnings, not errors (``workbench run`` prints them)."""
    from ..results import metric_names

    out: list[str] = []
    algo_of = {a.label or a.name: a.name for a in cfg.algorithms}
    for i, v in enumerate(cfg.verdicts):
        metric = getattr(v, "metric", None)
        if not isinstance(metric, str):
            continue
        if not metric_names.is_known(metric):
            out.append(f"verdicts[{i}].metric: {metric_names.unknown_message(metric)}; the rule will be 'not measured'")
            continue
        only = metric_names.ONLY_FROM.get(metric)
        sides = [lab for lab in (getattr(v, "a", None), getattr(v, "b", None)) if lab in algo_of]
        lacking = sorted({algo_of[lab] for lab in sides if algo_of[lab] not in (only or {algo_of[lab]})})
        if lacking:
            out.append(
                f"verdicts[{i}].metric: {metric!r} is logged only by {', '.join(sorted(only))}, not by "
                f"{', '.join(lacking)}; the rule will be 'not measured'"
            )
    for j, m in enumerate(cfg.report.metrics):
        if not metric_names.is_known(m):
            out.append(f"report.metrics[{j}]: {metric_names.unknown_message(m)}; it will be skipped")
    return out


def _extra_lines(err: ValidationError, where: str, model: type[BaseModel], entry_keys: set[str]) -> list[str]:
    lines = []
    for e in err.errors():
        key = _path((where,) + tuple(e["loc"]))
        if e["type"] == "extra_forbidden":
            lines.append(
                f"{key}: unknown key; allowed here: "
                f"{', '.join(sorted(set(model.model_fields) | entry_keys - {'batch_size'}))}"
            )
        else:
            lines.append(f"{key}: {e['msg']} (got {_short(e['input'])})")
    return lines


def _grid_lines(where: str, grid: dict, allowed: set[str]) -> list[str]:
    return [
        f"{where}.{k!r}: not a key a grid can vary; allowed here: {', '.join(sorted(allowed))}"
        for k in grid
        if k not in allowed
    ]


def _check_labels(problems: list[str], what: str, labels: list[str]) -> None:
    seen: dict[str, int] = {}
    for i, lab in enumerate(labels):
        if lab in seen:
            problems.append(f"{what}[{i}]: label {lab!r} repeats {what}[{seen[lab]}]; give each a distinct 'label'")
        seen.setdefault(lab, i)


# -- expansion into runs --------------------------------------------------------------------------


@dataclass
class PlannedRun:
    res: Resolved
    task_label: str
    algo_label: str
    grid: dict[str, Any]
    unit: str
    run_id: str = field(init=False)

    def __post_init__(self):
        self.run_id = self.res.config_hash

    @property
    def seed(self) -> int:
        return self.res.run.seed

    @property
    def name(self) -> str:
        g = f"[{grid_label(self.grid)}]" if self.grid else ""
        return f"{self.algo_label}{g}/{self.task_label}/s{self.seed}"

    def record(self) -> dict:
        return {
            "run_id": self.run_id,
            "task": self.res.task.name,
            "algo": self.res.spec.name,
            "seed": self.seed,
            "steps": self.res.run.steps,
            "unit": self.unit,
            "config": self.res.to_dict(),
            "task_label": self.task_label,
            "algo_label": self.algo_label,
            "grid": self.grid,
        }


def grid_label(grid: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in grid.items())


def consumption_unit(spec) -> str:
    """What one unit of a run's ``samples`` is: a sampled completion, a demonstration or a preference pair."""
    if spec.kind == "online":
        return "completions"
    return "pairs" if "pairs" in spec.Config.model_fields else "demos"


def _points(grid: dict[str, list]) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]


def expand(study: Study, device: str = "auto") -> list[PlannedRun]:
    """Every run of the study: tasks x algorithms x study grid x algorithm grid x seeds."""
    from ..registry import ALGORITHMS

    cfg = study.config
    shared = cfg.settings.model_dump(exclude_unset=True)
    plan: list[PlannedRun] = []
    seen: dict[str, str] = {}
    for t_i, task in enumerate(cfg.tasks):
        for a_i, algo in enumerate(cfg.algorithms):
            spec = ALGORITHMS[algo.name]
            params = dict(algo.model_extra or {})
            if "batch_size" in spec.Config.model_fields:  # offline: demos / pairs per step
                params["batch_size"] = cfg.budget.batch_size
            for g_study, g_algo in itertools.product(_points(cfg.grid), _points(algo.grid)):
                point = {**g_study, **g_algo}
                for seed in cfg.all_seeds:
                    raw = {
                        **copy.deepcopy(shared),
                        **algo.settings.model_dump(exclude_unset=True),
                        "task": {"name": task.name, **(task.model_extra or {})},
                        "algo": {"name": algo.name, **params},
                        "seed": seed,
                        "steps": cfg.budget.steps,
                        "batch_size": cfg.budget.batch_size,
                        "device": device,
                    }
                    where = f"tasks[{t_i}] {task.label or task.name!r} x algorithms[{a_i}] {algo.label or algo.name!r}"
                    where += f" at {grid_label(point)}" if point else ""
                    try:
                        res = resolve(raw, point)
                    except ConfigError as e:
                        raise StudyError(
                            _report(study.path, [f"{where}: {line}" for line in str(e).splitlines()])
                        ) from None
                    p = PlannedRun(res, task.label or task.name, algo.label or algo.name, point, consumption_unit(spec))
                    if p.run_id in seen:
                        raise StudyError(
                            _report(study.path, [f"{where}, seed {seed} is the same run as {seen[p.run_id]}"])
                        )
                    seen[p.run_id] = f"{where}, seed {seed}"
                    plan.append(p)
    return plan


# -- executing one run (in a worker) --------------------------------------------------------------


@dataclass(frozen=True)
class RunTask:
    """What an executor needs to run one run: picklable, self-contained."""

    run_id: str
    config: dict
    run_dir: str


def execute_run(task: RunTask) -> dict:
    """Train one run into its (emptied) folder and publish its metrics. Returns the outcome."""
    from tqdm import tqdm

    from ..training.loop import train  # sets torch's CPU threads from the config (cpu_threads), whatever --workers is

    tqdm.set_lock(
        threading.RLock()
    )  # not tqdm's default multiprocessing lock: a killed worker would leak its semaphore
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    res = resolve(task.config)
    if res.config_hash != task.run_id:
        raise RuntimeError(f"config resolves to {res.config_hash}, not run {task.run_id}")
    out = Path(task.run_dir)
    root = out.parent.parent  # the results folder
    try:
        if out.exists():  # a previous, interrupted attempt
            shutil.rmtree(out)
        out.mkdir(parents=True)
        result = train(res, out, progress=False)
        publish_metrics(out)
    except Exception as e:
        fault = storage_fault(e, out, root)
        if fault is not None:  # the storage's fault, not the run's: the runner stops, releases it and says so
            return {"status": "fault", "path": fault.path, "reason": fault.reason}
        _write_error(out, traceback.format_exc())
        raise
    except BaseException:
        _write_error(out, traceback.format_exc())
        raise
    return {
        "status": result["status"],
        "step": result["step"],
        "samples": result["final"].get("samples"),
        "reason": result.get("reason"),
    }


def _write_error(out: Path, text: str) -> None:
    """``error.txt``, if the folder takes it (the error that brought us here matters more)."""
    try:
        if out.is_dir():
            (out / "error.txt").write_text(text)
    except OSError:
        pass


# -- running a study -------------------------------------------------------------------------------


@dataclass
class StudyOutcome:
    study: str
    n_runs: int
    executed: list[str] = field(default_factory=list)  # run ids this call trained
    already: list[str] = field(default_factory=list)  # finished before (by an earlier call or another process)
    statuses: dict[str, str] = field(default_factory=dict)  # run id -> final status

    def count(self, status: str) -> int:
        return sum(s == status for s in self.statuses.values())

    @property
    def ok(self) -> bool:
        return self.count("failed") == 0


SeedSet = Literal["all", "explore", "confirm"]


def run_study(
    study: Study,
    results,
    executor,
    *,
    device: str = "auto",
    progress: bool = True,
    quiet: bool = False,
    poll_s: float = 0.5,
    seeds: SeedSet = "all",
) -> StudyOutcome:
    """Run every run of ``study`` that has not finished, ``executor.max_workers`` at a time.

    Safe to run again (finished runs are skipped), after a kill (runs left 'running' by a
    dead owner are reclaimed), and from several processes at once (claims are atomic).
    Failed runs from earlier calls are retried once per call. ``seeds``: run only the
    exploration (``seeds``) or the confirmation seeds (``confirm_seeds``); every run of the
    study is registered either way, the others stay queued.
    """
    plan = expand(study, device)
    store = Store(results)
    try:
        return _run(study, plan, store, executor, progress, quiet, poll_s, seeds)
    finally:
        store.close()


def _run(study, plan, store, executor, progress, quiet, poll_s, seeds: SeedSet = "all") -> StudyOutcome:
    cfg = study.config
    records = [p.record() for p in plan]
    store.register_study(
        study.name, str(study.path), cfg.description, list(cfg.claims), spec_hash(p.run_id for p in plan), records
    )
    publish_text(store.root / "studies" / f"{study.name}.toml", study.text)
    keep = {"all": set(cfg.all_seeds), "explore": set(cfg.seeds), "confirm": set(cfg.confirm_seeds)}[seeds]
    plan = [p for p in plan if p.seed in keep]
    outcome = StudyOutcome(study.name, len(plan))
    attempts = {rid: row["attempts"] for rid, row in store.states(p.run_id for p in plan).items()}
    todo = {p.run_id: p for p in plan}
    in_flight: dict[Future, PlannedRun] = {}
    owner = Owner.current()
    bars = _Bars(study.name, len(plan), executor.max_workers, progress, quiet)
    try:
        with Heartbeat(store.root, owner):
            while todo or in_flight:
                states = store.states(todo)
                for rid, p in list(todo.items()):
                    if len(in_flight) >= executor.max_workers:
                        break
                    row = states[rid]
                    if row["status"] == "running" and not is_stale(row):
                        continue  # someone else's; look again later
                    got = store.claim(rid, owner, expected_attempts=attempts.get(rid))
                    if got == "busy":
                        continue
                    del todo[rid]
                    if got == "claimed":
                        task = RunTask(rid, p.res.to_dict(), str(store.run_dir(rid)))
                        bars.started(p)
                        in_flight[executor.submit(execute_run, task)] = p
                    else:  # finished / recovered / failed by another attempt
                        st = store.states([rid])[rid]
                        outcome.already.append(rid)
                        outcome.statuses[rid] = st["status"]
                        bars.finished(p, st["status"], "already " + st["status"])
                if in_flight:
                    done, _ = wait(list(in_flight), timeout=poll_s, return_when=FIRST_COMPLETED)
                    for fut in done:
                        _finish(store, owner, in_flight[fut], fut, outcome, bars)
                        del in_flight[fut]  # (after: a run whose end could not be recorded is released below)
                    bars.poll(store, in_flight.values())
                elif todo:
                    time.sleep(poll_s)  # the rest is running elsewhere
    except BaseException as e:
        executor.shutdown(wait=True, cancel_futures=True, kill=True)
        left = store.release_all([p.run_id for p in in_flight.values()], owner)
        fault = storage_fault(e, store.root / "index.sqlite") if isinstance(e, Exception) else None
        if fault is not None:  # a full disk, a read-only folder: one line for the person, after the releases
            fault.released, fault.unreleased = len(in_flight) - len(left), left
            raise fault from e
        raise
    finally:
        bars.close()
    return outcome


def _finish(store: Store, owner: Owner, p: PlannedRun, fut: Future, outcome: StudyOutcome, bars) -> None:
    try:
        r = fut.result()
        if r["status"] == "fault":  # the worker could not write its folder: stop (the run is released by _run)
            raise StoreFault(r["path"], r["reason"])
        status, step, samples, reason = r["status"], r["step"], r["samples"], r.get("reason")
    except StoreFault:
        raise
    except Exception as e:  # the run raised, or its process died
        status, step, samples, reason = "failed", None, None, str(e).split("\n\n")[0][:500]
        err = store.run_dir(p.run_id) / "error.txt"
        if err.parent.exists() and not err.exists():
            try:
                err.write_text(str(e))
            except OSError as write_error:
                raise (storage_fault(write_error, err) or write_error) from e
    store.finish(p.run_id, owner, status, step, samples, reason)
    outcome.executed.append(p.run_id)
    outcome.statuses[p.run_id] = status
    detail = {"done": "", "diverged": f" at step {step}: {reason}", "failed": f": {reason}"}[status]
    bars.finished(p, status, status + detail)


class _Bars:
    """The study's progress: one bar over its runs, one per run in flight (step, reward, ETA)."""

    def __init__(self, name: str, total: int, workers: int, progress: bool, quiet: bool):
        from tqdm.auto import tqdm

        self.tqdm, self.quiet, self.total, self.n = tqdm, quiet, total, 0
        self.disable = None if progress and not quiet else True  # None: bars only on a terminal
        self.outer = tqdm(
            total=total, desc=f"study {name}", unit="run", position=0, disable=self.disable, dynamic_ncols=True
        )
        self.free = list(range(1, workers + 1))
        self.slots: dict[str, tuple[Any, int]] = {}

    SHOWN = {"reward/mean": "reward", "reward/exact": "exact_reward", "kl/exact": "exact_kl"}

    def started(self, p: PlannedRun) -> None:
        pos = self.free.pop(0) if self.free else len(self.slots) + 1
        bar = self.tqdm(
            total=p.res.run.steps,
            desc=p.name,
            unit="step",
            position=pos,
            leave=False,
            disable=self.disable,
            dynamic_ncols=True,
        )
        bar.shown = {}  # the last value of each shown metric (exact ones come every eval_every steps)
        self.slots[p.run_id] = (bar, pos)

    def poll(self, store: Store, running) -> None:
        for p in running:
            bar, _ = self.slots.get(p.run_id, (None, 0))
            row = read_progress(store.run_dir(p.run_id)) if bar is not None and not bar.disable else None
            if row:
                bar.n = min(row.get("step", 0), bar.total)
                bar.shown.update(
                    {name: f"{row[k]:.3f}" for k, name in self.SHOWN.items() if isinstance(row.get(k), (int, float))}
                )
                bar.set_postfix(bar.shown, refresh=False)
                bar.refresh()

    def finished(self, p: PlannedRun, status: str, message: str) -> None:
        bar, pos = self.slots.pop(p.run_id, (None, 0))
        if bar is not None:
            bar.close()
            self.free = sorted(self.free + [pos])
        self.n += 1
        self.outer.update(1)
        if not self.quiet:
            self.tqdm.write(f"[{self.n}/{self.total}] {p.name} ({p.run_id}): {message}", file=sys.stderr)

    def close(self) -> None:
        for bar, _ in self.slots.values():
            bar.close()
        self.outer.close()


# -- the summary -------------------------------------------------------------------------------------


def summarize(results, study: str) -> Any:
    """Per task x algorithm x grid point: run counts and mean / std over seeds of the final metrics.

    Only runs that finished ``done`` enter the statistics; diverged and failed runs are counted.
    Runs whose files cannot be read are counted as ``unreadable`` (not done), left out of the
    statistics and listed in ``df.attrs["issues"]``.
    """
    import warnings

    import pandas as pd

    from ..results.store import LoadWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LoadWarning)  # reported through attrs["issues"]
        final = load_final(results, study)
    final["grid_label"] = final["grid"].map(grid_label)
    unreadable = {i["run_id"] for i in final.attrs.get("issues", [])}  # finished, but its metrics do not load
    keys = ["task_label", "algo_label", "grid_label"]
    rows = []
    for key, g in final.groupby(keys, sort=False):
        bad = g["run_id"].isin(unreadable)
        ok = g[(g["status"] == "done") & ~bad]
        row = dict(zip(keys, key))
        row.update({s: int(((g["status"] == s) & ~bad).sum()) for s in ("done", "diverged", "failed")}, runs=len(g))
        row["unreadable"] = int(bad.sum())
        for m in SUMMARY_METRICS:
            vals = ok[m].dropna() if m in ok else pd.Series(dtype=float)
            row[f"{m}:mean"] = vals.mean() if len(vals) else float("nan")
            row[f"{m}:std"] = vals.std(ddof=1) if len(vals) > 1 else float("nan")
        rows.append(row)
    df = pd.DataFrame(rows)
    if not len(df):
        return df
    unused = [m for m in SUMMARY_METRICS if df[f"{m}:mean"].isna().all()]
    if "reward/exact" not in unused:  # exact beats sampled: show the sampled reward only without enumeration
        unused.append("reward/eval")
    df = df.drop(columns=[c for m in unused for c in (f"{m}:mean", f"{m}:std")])
    df.attrs["issues"] = final.attrs.get("issues", [])
    return df


def format_summary(df) -> str:
    """A text table: mean ± std (sample std over seeds) of each final metric."""
    import math

    if df is None or not len(df):
        return "(no runs)"
    metrics = [m for m in SUMMARY_METRICS if f"{m}:mean" in df]
    show_grid = (df["grid_label"] != "").any()
    head = ["task", "algorithm"] + (["grid"] if show_grid else []) + ["done"] + metrics
    body = []
    for _, r in df.iterrows():
        extra = "".join(f" {r[s]} {s}" for s in ("diverged", "failed", "unreadable") if r.get(s, 0))
        cells = (
            [r["task_label"], r["algo_label"]]
            + ([r["grid_label"]] if show_grid else [])
            + [f"{r['done']}/{r['runs']}{extra}"]
        )
        for m in metrics:
            mean, std = r[f"{m}:mean"], r[f"{m}:std"]
            cells.append(
                "-" if math.isnan(mean) else f"{mean:.4f} ± {std:.4f}" if not math.isnan(std) else f"{mean:.4f}"
            )
        body.append(cells)
    return text_table(head, body)


def text_table(head: list[str], rows: list[list]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])
