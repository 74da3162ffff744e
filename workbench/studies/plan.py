"""Loading a study file, validating it and expanding it into runs.

``load_study`` parses a study file against its schema (``workbench.studies.schema``) and checks
what pydantic cannot see: registry names, task and algorithm parameters, grid keys, labels, and
verdict rules that pool several conditions or compare raw reward / KL between methods that
regularise differently; every size the file declares (``[sizes.<size>]``) is checked merged over
the file, and the study is returned at the size asked for (``apply_size``), named
``<study>@<size>`` at any size but the default. ``expand`` turns a study into its runs
(``PlannedRun``): tasks x algorithms x study grid x algorithm grid x seeds. ``legacy_plan`` and
``unit_of`` serve the results index's rebuild (``workbench.results.index.rebuild_index``) for
results written before plan manifests.

Identical conditions: for a given seed every algorithm gets the same initial weights and
reference model (the model settings are study-wide), the same prompt stream (seeded by the
run seed), and the same budget: ``steps`` update rounds of ``batch_size`` completions,
demonstrations or preference pairs. Each run records what it consumed (``samples`` in its
metrics, ``step``/``samples``/``unit`` in the index).

A run's id is the hash of its resolved config, so a run is done once whatever study asks
for it.
"""

from __future__ import annotations

import copy
import itertools
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from ..config import ConfigError, Resolved, RunConfig, resolve
from ..models.policy import ModelConfig
from ..registry import ALGORITHMS, TASKS
from ..results import metric_names, spec_hash
from .schema import (
    DEFAULT_SIZE,
    MAX_SIZE_NAME,
    MAX_STUDY_NAME,
    SIZE_NAME_PATTERN,
    SIZE_SEPARATOR,
    STUDY_NAME_PATTERN,
    AlgorithmEntry,
    AlgorithmSettings,
    Settings,
    StudyConfig,
)


class StudyError(ConfigError):
    """A bad study file; ``str()`` names the file, the key path and what is allowed."""


def study_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a study's name (for a message), or None when it can.

    A study run at a size other than its default is named ``<study>@<size>`` (``sized_name``).
    """

    base, at, size = name.partition(SIZE_SEPARATOR)
    if at:
        return _plain_name_problem(base) or size_name_problem(size)
    return _plain_name_problem(name)


def _plain_name_problem(name: str) -> str | None:
    if not name:
        return "a study name cannot be empty"
    if len(name) > MAX_STUDY_NAME:
        return f"a study name has at most {MAX_STUDY_NAME} characters (got {len(name)})"
    if not re.fullmatch(STUDY_NAME_PATTERN, name):
        return f"a study name is letters, digits, '_', '.' and '-', starting with a letter, digit or '_' (got {name!r})"
    return None


def size_name_problem(size: str) -> str | None:
    """Why ``size`` cannot name a study size (``--size``, ``[sizes.<size>]``, ``<study>@<size>``), or None."""

    if len(size) > MAX_SIZE_NAME:
        return f"a size name has at most {MAX_SIZE_NAME} characters (got {len(size)})"
    if not re.fullmatch(SIZE_NAME_PATTERN, size):
        return f"a size name is letters, digits, '_' and '-', starting with a letter, digit or '_' (got {_short(size)})"
    return None


def sized_name(base: str, size: str) -> str:
    """The name study ``base`` runs under at ``size``: ``base`` at the default size, else ``base@size``."""
    return base if size == DEFAULT_SIZE else f"{base}{SIZE_SEPARATOR}{size}"


def split_study_name(name: str) -> tuple[str, str]:
    """``quickstart@gpu`` -> ``("quickstart", "gpu")``; ``quickstart`` -> ``("quickstart", "default")``."""
    base, at, size = name.partition(SIZE_SEPARATOR)
    return (base, size) if at else (name, DEFAULT_SIZE)


@dataclass
class Study:
    config: StudyConfig  # at ``size``: the file with [sizes.<size>] merged over it
    path: Path
    text: str
    warnings: list[str] = field(default_factory=list)  # what is allowed but likely wrong (verdict metrics no run logs)
    size: str = DEFAULT_SIZE

    @property
    def base_name(self) -> str:
        """The study's name at its default size: ``name`` in the file, else the file name (less any ``@<size>``)."""
        return self.config.name or split_study_name(self.path.stem)[0]

    @property
    def name(self) -> str:
        """What the results index calls it: ``base_name``, or ``<base_name>@<size>`` at another size."""
        return sized_name(self.base_name, self.size)

    @property
    def sizes(self) -> list[str]:
        """The sizes the file declares: ``default`` (the file as written), then each ``[sizes.<size>]``."""
        return [DEFAULT_SIZE, *self.config.sizes]


# -- loading and validating ---------------------------------------------------------------------


def load_study(path: str | os.PathLike, size: str | None = None) -> Study:
    """Parse and validate a study file, at ``size``. Raises ``StudyError`` with a message for a person.

    ``size``: ``default`` (the file as written) or a size the file declares in ``[sizes.<size>]``;
    None: the size a file named ``<study>@<size>.toml`` names (the copy ``workbench run`` keeps in
    the results folder), else the default. Every declared size is validated whichever is asked for.
    """
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
    problems = _check(cfg) + _size_lines(cfg)
    if cfg.name is None and (why := study_name_problem(path.stem)):
        problems.insert(
            0, f'name: the file name {_short(path.stem)} cannot name the study ({why}); set name = "..." in the file'
        )
    if not problems:
        problems += _sized_lines(raw, cfg)
    if problems:
        raise StudyError(_report(path, problems))
    if size is None and SIZE_SEPARATOR in path.stem:  # <study>@<size>.toml: the copy of a study run at a size
        size = split_study_name(path.stem)[1]
        asked = f"the file name {_short(path.name)} asks for size {_short(size)}"
    else:
        asked = f"--size {_short(size)}"
    if size is None or size == DEFAULT_SIZE:
        return Study(cfg, path, text, seed_warnings(cfg) + metric_warnings(cfg))
    declared = ", ".join([DEFAULT_SIZE, *cfg.sizes])
    if why := size_name_problem(size):
        raise StudyError(f"{path}: {asked}: {why}; sizes of this study: {declared}")
    if size not in cfg.sizes:
        raise StudyError(
            f"{path}: {asked}, which the study does not declare; sizes of this study: {declared} "
            f"(a size is a [sizes.<size>] table in the file)"
        )
    cfg = StudyConfig(**apply_size(raw, size))  # valid: checked above
    return Study(cfg, path, text, seed_warnings(cfg) + metric_warnings(cfg), size)


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
        if e["loc"] and e["loc"][-1] == "[key]":  # a bad key of a table of names (a size name)
            key = _path(((prefix,) if prefix else ()) + tuple(e["loc"][:-1]))
            lines.append(f"{key}: {size_name_problem(str(e['input'])) or e['msg']}")
        elif e["type"] == "extra_forbidden":
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
    cur, keyed = model, False
    for part in loc[:-1]:
        if isinstance(part, int) or keyed:  # a list index, or the key of a table of names (sizes.<size>)
            keyed = False
            continue
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)) or part not in cur.model_fields:
            return None
        annotation = cur.model_fields[part].annotation
        keyed = typing.get_origin(annotation) is dict
        cur = _unwrap(annotation)
    return cur if isinstance(cur, type) and issubclass(cur, BaseModel) else None


def _unwrap(tp):
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (list, tuple) and args:
        return _unwrap(args[0])
    if typing.get_origin(tp) is dict and len(args) == 2:
        return _unwrap(args[1])
    models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
    return models[0] if models else tp


def _check(cfg: StudyConfig) -> list[str]:
    """What pydantic cannot see: registry names, task/algorithm parameters, grid keys, duplicates."""

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
            problems += _extra_lines(e, where, spec.Config, {"name", "label", "tasks", "settings", "grid"})
        if a.tasks is not None:
            task_labels = [t.label or t.name for t in cfg.tasks]
            if not a.tasks:
                problems.append(f"{where}.tasks: empty; list task labels ({', '.join(task_labels)}) or leave it out")
            for lab in a.tasks:
                if lab not in task_labels:
                    problems.append(f"{where}.tasks: unknown task label {lab!r}; allowed: {', '.join(task_labels)}")
        algo_keys = {f"algo.{k}" for k in spec.Config.model_fields if k != "batch_size"}
        problems += _grid_lines(f"{where}.grid", a.grid, set(AlgorithmSettings.model_fields) | algo_keys)
    _check_labels(problems, "algorithms", [a.label or a.name for a in cfg.algorithms])
    labels = [a.label or a.name for a in cfg.algorithms]
    for i, v in enumerate(cfg.verdicts):
        if v.claim not in cfg.claims:
            problems.append(f"verdicts[{i}].claim: {v.claim!r} is not in this study's claims ({', '.join(cfg.claims)})")
        for side, lab in (("a", v.a), ("b", v.b)):
            if lab is not None and lab not in labels:
                problems.append(f"verdicts[{i}].{side}: unknown algorithm label {lab!r}; allowed: {', '.join(labels)}")
    if not problems:
        problems += _span_lines(cfg) or _confound_lines(cfg)
    return problems


# -- sizes: [sizes.<size>] tables merged over the file -------------------------------------------------


def _size_lines(cfg: StudyConfig) -> list[str]:
    """What pydantic cannot see in ``[sizes.<size>]``: the labels it names, their task and algorithm parameters."""

    problems: list[str] = []
    tasks = {t.label or t.name: t for t in cfg.tasks}
    algos = {a.label or a.name: a for a in cfg.algorithms}
    for name, size in cfg.sizes.items():
        where = f"sizes.{name}"
        if name == DEFAULT_SIZE:
            problems.append(f"{where}: '{DEFAULT_SIZE}' is the file as written; give the size another name")
        for label, params in size.tasks.items():
            at = f"{where}.tasks.{label}"
            if label not in tasks:
                problems.append(f"{at}: no task labelled {label!r}; task labels: {', '.join(tasks)}")
                continue
            if tasks[label].name not in TASKS:  # reported by _check
                continue
            cls = TASKS[tasks[label].name].Config
            try:
                cls(**{**(tasks[label].model_extra or {}), **params})
            except ValidationError as e:
                problems += _extra_lines(e, at, cls, set())
        for label, override in size.algorithms.items():
            at = f"{where}.algorithms.{label}"
            if label not in algos:
                problems.append(f"{at}: no algorithm labelled {label!r}; algorithm labels: {', '.join(algos)}")
                continue
            if algos[label].name not in ALGORITHMS:  # reported by _check
                continue
            spec = ALGORITHMS[algos[label].name]
            params = dict(override.model_extra or {})
            if "batch_size" in params:
                problems.append(f"{at}.batch_size: set by budget.batch_size (the same budget for every algorithm)")
                params.pop("batch_size")
            try:
                spec.Config(**{**(algos[label].model_extra or {}), **params})
            except ValidationError as e:
                problems += _extra_lines(e, at, spec.Config, {"settings", "grid"})
            algo_keys = {f"algo.{k}" for k in spec.Config.model_fields if k != "batch_size"}
            problems += _grid_lines(f"{at}.grid", override.grid, set(AlgorithmSettings.model_fields) | algo_keys)
    return problems


def _sized_lines(raw: dict, cfg: StudyConfig) -> list[str]:
    """Each declared size checked as a whole: the file with ``[sizes.<size>]`` merged over it."""

    problems: list[str] = []
    for name in cfg.sizes:
        merged = apply_size(raw, name)
        try:
            lines = _check(StudyConfig(**merged))
        except ValidationError as e:
            lines = _pydantic_lines(e, "", StudyConfig)
        problems += [f"at size {name} (sizes.{name} merged over the file): {line}" for line in lines]
    return problems


def apply_size(raw: dict, size: str) -> dict:
    """The study file's table ``raw`` with its ``[sizes.<size>]`` merged over it (a new dict).

    Lists are replaced (``seeds``, ``confirm_seeds``, a grid key's values); tables are merged key by
    key (``budget``, ``settings`` and its ``model``, ``grid``, a task's parameters by task label, an
    algorithm's parameters, ``settings`` and ``grid`` by algorithm label). ``note`` changes nothing.
    """

    out = copy.deepcopy(raw)
    over = copy.deepcopy(raw["sizes"][size])
    for key in ("seeds", "confirm_seeds"):
        if key in over:
            out[key] = over[key]
    if "budget" in over:
        out["budget"] = {**out.get("budget", {}), **over["budget"]}
    if "settings" in over:
        out["settings"] = _merge_settings(out.get("settings", {}), over["settings"])
    if "grid" in over:
        out["grid"] = {**out.get("grid", {}), **over["grid"]}
    for label, params in over.get("tasks", {}).items():
        entry = next(t for t in out["tasks"] if (t.get("label") or t["name"]) == label)
        entry.update(params)
    for label, params in over.get("algorithms", {}).items():
        entry = next(a for a in out["algorithms"] if (a.get("label") or a["name"]) == label)
        if "settings" in params:
            entry["settings"] = {**entry.get("settings", {}), **params.pop("settings")}
        if "grid" in params:
            entry["grid"] = {**entry.get("grid", {}), **params.pop("grid")}
        entry.update(params)
    return out


def _merge_settings(base: dict, over: dict) -> dict:
    out = {**base, **over}
    if isinstance(base.get("model"), dict) and isinstance(over.get("model"), dict):
        out["model"] = {**base["model"], **over["model"]}  # a wider model keeps the file's other model fields
    return out


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
            own = [t.label or t.name for t in cfg.tasks if _runs_on(entry, t)]
            tasks = [lab for lab in own if where.get("task", lab) == lab]
            if not tasks:
                lines.append(
                    f"verdicts[{i}].{side}: {label!r} does not run on task {where.get('task')!r} (its tasks: "
                    f"{', '.join(own)}): the rule would have no runs"
                )
                continue
            points = _side_points(cfg, entry, where)
            if len(tasks) * len(points) > 1:
                varying = sorted({k for p in points for k in p} | ({"task"} if len(tasks) > 1 else set()))
                lines.append(
                    f"verdicts[{i}].{side}: {label!r} spans {len(tasks) * len(points)} tasks x grid points; a rule "
                    f"compares seeds of one condition: pin {', '.join(varying)} with where / {side}_where"
                )
    return lines


def _runs_on(algo: AlgorithmEntry, task) -> bool:
    """Whether the algorithm entry runs on the task entry: its ``tasks`` names the task's label, or is unset."""
    return algo.tasks is None or (task.label or task.name) in algo.tasks


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

    out: list[str] = []
    algo_of = {a.label or a.name: a.name for a in cfg.algorithms}
    for i, v in enumerate(cfg.verdicts):
        metric = v.metric
        if not metric_names.is_known(metric):
            out.append(f"verdicts[{i}].metric: {metric_names.unknown_message(metric)}; the rule will be 'not measured'")
            continue
        only = metric_names.ONLY_FROM.get(metric)
        sides = [lab for lab in (v.a, v.b) if lab in algo_of]
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
    return spec.unit


def _points(grid: dict[str, list]) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]


def expand(study: Study, device: str = "auto") -> list[PlannedRun]:
    """Every run of the study: tasks x algorithms x study grid x algorithm grid x seeds.

    An algorithm entry with ``tasks = [...]`` runs on those task labels only.
    """

    cfg = study.config
    shared = cfg.settings.model_dump(exclude_unset=True)
    plan: list[PlannedRun] = []
    seen: dict[str, str] = {}
    for t_i, task in enumerate(cfg.tasks):
        for a_i, algo in enumerate(cfg.algorithms):
            if not _runs_on(algo, task):
                continue
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


# -- the index's rebuild, for results written before plan manifests -----------------------------------


def legacy_plan(toml_path: str | os.PathLike) -> dict:
    """The arguments of ``Store.register_study`` for a study copy ``<results>/studies/<study>.toml`` (no manifest).

    ``workbench.results.index.rebuild_index`` calls it for results written before plan
    manifests. The study is expanded on the device (auto, cpu or cuda) whose runs match the
    most folders in ``<results>/runs``. A study that cannot be read or expanded raises
    ``ValueError`` with one line saying why.
    """

    toml_path = Path(toml_path)
    runs_dir = toml_path.parent.parent / "runs"
    folders = (
        {d.name for d in runs_dir.iterdir() if d.is_dir() and not d.name.startswith(".")}
        if runs_dir.is_dir()
        else set()
    )
    try:
        study = load_study(toml_path)
    except ConfigError as e:
        raise ValueError(str(e).strip().splitlines()[-1].strip()) from None
    best = None
    for device in ("auto", "cpu", "cuda"):
        try:
            plan = expand(study, device)
        except ConfigError:
            continue
        hits = sum(p.run_id in folders for p in plan)
        if best is None or hits > best[0]:
            best = (hits, plan)
    if best is None:
        raise ValueError("its runs do not resolve")
    plan, cfg = best[1], study.config
    return {
        "name": study.name,
        "path": str(toml_path),
        "description": cfg.description,
        "claims": list(cfg.claims),
        "spec_hash": spec_hash(p.run_id for p in plan),
        "runs": [p.record() for p in plan],
    }


def unit_of(algo: str) -> str | None:
    """What one unit of ``samples`` is for algorithm ``algo`` (its declared ``unit``), or None for an unknown one."""

    return ALGORITHMS[algo].unit if algo in ALGORITHMS else None
