"""The study file's typed schema: what a ``studies/*.toml`` may declare, as pydantic models.

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

    [sizes.gpu]                     # optional: the same study at another size (workbench run FILE --size gpu)
    confirm_seeds = [100, 101, 102, 103, 104, 105, 106, 107, 108, 109]
    budget = { steps = 1000 }
    settings = { model = { n_layer = 4, n_embd = 128 } }
    tasks = { bandit = { n_arms = 64 } }      # by task label: parameters merged over that task's
    algorithms = { ppo = { clip_eps = 0.1 } } # by algorithm label: parameters, settings, grid

``StudyConfig`` is the whole file. ``VerdictRule`` (one ``[[verdicts]]`` table) and ``Statistics``
(``[statistics]``) declare how the study's claims are decided; ``workbench.reporting.verdicts``
evaluates them. ``Size`` (one ``[sizes.<name>]`` table) overrides seeds, budget, settings, grid,
task and algorithm parameters; ``workbench.studies.plan.apply_size`` merges it over the file.
What pydantic cannot check (registry names, task and algorithm parameters, grid keys, rule
labels, size labels) is checked when the file is loaded (``workbench.studies.plan``).
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from ..config import MAX_COUNT, MAX_SEED, MAX_STEPS, RunConfig
from ..core.stats import LEVEL

CLAIM_IDS = tuple(f"C{i}" for i in range(1, 15))
# run settings a study fixes elsewhere: the budget, the seeds, the task and algorithm tables, the command line
_NOT_SETTINGS = {"task", "algo", "seed", "steps", "batch_size", "device"}

# a study's name names files and folders (studies/<name>.toml, reports/<name>/) and is typed on command lines
MAX_STUDY_NAME = 100
STUDY_NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"  # not '.', '..' or '.hidden', not '-option', no '/'

# a study runs at its default size (the file as written) or at a size it declares in [sizes.<size>], under the
# name <study>@<size>; '@' is in no study name, so the two parts are never ambiguous
DEFAULT_SIZE = "default"
SIZE_SEPARATOR = "@"
MAX_SIZE_NAME = 30
SIZE_NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_-]*$"


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


class Statistics(BaseModel):
    """How a study's verdicts are decided (``[statistics]`` in a study file)."""

    model_config = ConfigDict(extra="forbid")

    min_seeds: int = Field(
        5, ge=3, description="usable values a rule needs on each side, else 'insufficient seeds' (never below 3)"
    )
    interval: Literal["t", "bca"] = Field(
        "t", description="t: Student / paired t / Welch intervals; bca: a seeded BCa bootstrap"
    )
    level: float = Field(LEVEL, gt=0.5, lt=1, description="confidence level of every interval")

    @model_validator(mode="after")
    def _bca_needs_seeds(self) -> Statistics:
        if self.interval == "bca" and self.min_seeds < 20:
            raise ValueError(
                "interval = 'bca' needs min_seeds >= 20: a nominal 95% BCa interval covered the mean 75-89% "
                "of the time at 3-10 seeds in a simulation (normal data); use 't' below that"
            )
        return self


class VerdictRule(BaseModel):
    """One test of a claim on a study's final metrics."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    claim: str = Field(description="claim id from docs/claims.md, e.g. 'C6'")
    metric: str = Field(description="metric name (docs/metrics.md), final value per run")
    kind: Literal["below", "above", "greater", "less", "equivalent", "noninferior", "peaks"] = Field(
        description="what supports the claim"
    )
    a: str = Field(description="group label: an algorithm label of the study")
    b: str | None = Field(None, description="second group label, for greater/less/equivalent/noninferior")
    where: dict[str, object] = Field(
        default_factory=dict, description="grid values or task label both groups must have"
    )
    a_where: dict[str, object] = Field(
        default_factory=dict, description="more filters for group a only, merged over 'where'"
    )
    b_where: dict[str, object] = Field(
        default_factory=dict, description="more filters for group b only, merged over 'where'"
    )
    step: int | None = Field(None, ge=0, description="read the metric at this update step instead of its final value")
    threshold: float | None = Field(None, description="for below/above")
    margin: float | None = Field(
        None,
        gt=0,
        description="for equivalent: |difference| below this; noninferior: a worse than b by less; peaks: the "
        "metric's maximum over the run above its final value by more",
    )
    proxy: str | None = Field(
        None,
        description="for peaks: a metric that must keep rising after the peak (its final value above its value at "
        "the step where 'metric' peaked), e.g. reward/proxy_gain",
    )
    statement: str = Field("", description="what the rule checks, in words, for the report")
    failures: Literal["exclude", "worst"] = Field(
        "exclude",
        description="failed/diverged runs: 'exclude' (counted; over a fifth of a side -> unstable) or "
        "'worst' (each takes the value 'worst', for stability claims)",
    )
    worst: float | None = Field(None, description="failures = 'worst': the value a failed or diverged run takes")
    confounded: str | None = Field(
        None,
        description="why a raw reward/KL comparison between methods that regularise differently is still made; "
        "printed under the verdict",
    )

    @model_validator(mode="after")
    def _needs(self) -> VerdictRule:
        if self.kind in ("below", "above") and self.threshold is None:
            raise ValueError(f"a '{self.kind}' rule needs 'threshold'")
        if self.kind in ("greater", "less", "equivalent", "noninferior") and self.b is None:
            raise ValueError(f"a '{self.kind}' rule needs 'b'")
        if self.kind in ("equivalent", "noninferior", "peaks") and self.margin is None:
            raise ValueError(f"an '{self.kind}' rule needs 'margin'")
        if self.kind == "peaks" and (self.b is not None or self.step is not None):
            raise ValueError("a 'peaks' rule reads one group's whole curve: no 'b', no 'step'")
        if self.proxy is not None and self.kind != "peaks":
            raise ValueError("'proxy' belongs to a 'peaks' rule")
        if self.b is None and self.b_where:
            raise ValueError("'b_where' needs 'b'")
        if (self.failures == "worst") != (self.worst is not None):
            raise ValueError("failures = 'worst' and a 'worst' value go together")
        if self.b is not None and self.a == self.b and self.where_a == self.where_b:
            raise ValueError(f"groups a and b are the same runs ({self.a!r}); tell them apart with a_where / b_where")
        return self

    @property
    def where_a(self) -> dict:
        return {**self.where, **self.a_where}

    @property
    def where_b(self) -> dict:
        return {**self.where, **self.b_where}


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
    tasks: list[str] | None = Field(
        None, description="the task labels this algorithm runs on (default: every task of the study)"
    )
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
    overoptimisation: bool = Field(
        False,
        description="add the over-optimisation section: gold and proxy gain against d = sqrt(kl/exact), the fits "
        "d (alpha - beta log d) and d (alpha - beta d) (workbench/reporting/overoptimisation.py)",
    )


class BudgetOverride(BaseModel):
    """``[sizes.<size>.budget]``: the budget at that size, key by key over ``[budget]``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="gradient-update rounds of every run")
    batch_size: int | None = Field(
        None, ge=1, le=MAX_COUNT, description="per round: completions (online) or demonstrations / preference pairs"
    )


class AlgorithmOverride(BaseModel):
    """``[sizes.<size>.algorithms.<label>]``: the algorithm's parameters (checked against its config), its
    ``settings`` and ``grid``, each merged key by key over that algorithm table's own."""

    model_config = ConfigDict(extra="allow")

    settings: AlgorithmSettings = Field(default_factory=AlgorithmSettings)  # type: ignore[valid-type]
    grid: dict[str, GridValues] = Field(
        default_factory=dict, description="dotted key -> values: algo.<param> or a run setting"
    )


Seeds = list[Annotated[int, Field(ge=0, le=MAX_SEED)]]


class Size(BaseModel):
    """One ``[sizes.<size>]`` table: what changes when the study runs at that size (``--size <size>``).

    Everything is optional and merged over the file as written: lists (seeds, a grid key's values)
    are replaced, tables (budget, settings, settings.model, a task's or algorithm's parameters) are
    merged key by key. The claims, tasks, algorithms, labels and verdict rules stay the file's.
    """

    model_config = ConfigDict(extra="forbid")

    note: str = Field("", description="what the size is for, and whether it was measured")
    seeds: Seeds | None = Field(None, min_length=1, description="exploration seeds at this size (replaced)")
    confirm_seeds: Seeds | None = Field(None, description="confirmation seeds at this size (replaced)")
    budget: BudgetOverride = Field(default_factory=BudgetOverride)
    settings: Settings = Field(default_factory=Settings)  # type: ignore[valid-type]
    grid: dict[str, GridValues] = Field(
        default_factory=dict, description="dotted key -> values, replacing (or adding) that key of [grid]"
    )
    tasks: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="task label -> parameters merged over that [[tasks]] table's"
    )
    algorithms: dict[str, AlgorithmOverride] = Field(
        default_factory=dict, description="algorithm label -> parameters, settings, grid merged over that table's"
    )


SizeName = Annotated[str, Field(pattern=SIZE_NAME_PATTERN, max_length=MAX_SIZE_NAME)]


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
    sizes: dict[SizeName, Size] = Field(
        default_factory=dict,
        description="other sizes of the same study ([sizes.gpu], ...): overrides applied by `workbench run "
        "--size <size>`, which runs the study under the name <study>@<size>",
    )

    @property
    def all_seeds(self) -> list[int]:
        """Exploration then confirmation seeds: every seed the study runs."""
        return list(self.seeds) + list(self.confirm_seeds)
