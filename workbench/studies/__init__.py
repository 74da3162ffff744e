"""Studies: several algorithms on the same task(s), seeds and budget, run resumably into a store.

- ``schema``: the study file's typed schema (``StudyConfig``, ``VerdictRule``, ``Statistics``, ...).
- ``plan``: loading and validating a study file, expanding it into runs (``load_study``, ``expand``).
- ``execute``: running a study's runs through an executor into the results store (``run_study``).
- ``summary``: per-condition summaries of a study's results for a terminal (``summarize``).
- ``executors``: where runs execute (a pool of processes, or inline).
"""

from .execute import WORKER_PRELOAD, RunTask, StudyOutcome, execute_run, run_study
from .plan import (
    PlannedRun,
    Study,
    StudyError,
    consumption_unit,
    expand,
    grid_label,
    is_raw_metric,
    legacy_plan,
    load_study,
    metric_warnings,
    seed_warnings,
    study_name_problem,
    unit_of,
)
from .schema import Deviation, Statistics, StudyConfig, VerdictRule
from .summary import SUMMARY_METRICS, format_summary, summarize, text_table

__all__ = [
    "SUMMARY_METRICS",
    "WORKER_PRELOAD",
    "Deviation",
    "PlannedRun",
    "RunTask",
    "Statistics",
    "Study",
    "StudyConfig",
    "StudyError",
    "StudyOutcome",
    "VerdictRule",
    "consumption_unit",
    "execute_run",
    "expand",
    "format_summary",
    "grid_label",
    "is_raw_metric",
    "legacy_plan",
    "load_study",
    "metric_warnings",
    "run_study",
    "seed_warnings",
    "study_name_problem",
    "summarize",
    "text_table",
    "unit_of",
]
