"""Export finished runs to experiment trackers: TensorBoard, Weights & Biases, MLflow, trackio.

Offline, into a local folder ``dest``, always (nothing is sent anywhere; each tracker's own
tool uploads or serves it later):

- ``tensorboard``: event files, one folder a run: ``dest/<study>/<task>/<algorithm>/seed<k>-<run_id>``
  (``tensorboard --logdir dest``); scalars are stored as float32, TensorBoard's scalar type;
- ``wandb``: offline runs (``mode="offline"``) under ``dest/wandb/`` (``wandb sync dest/wandb/offline-run-*``);
- ``mlflow``: a SQLite tracking store, ``sqlite:///dest/mlflow.db``, artifacts in ``dest/artifacts``
  (``mlflow ui --backend-store-uri sqlite:///dest/mlflow.db``); MLflow 3 refuses its old file store;
- ``trackio``: trackio's local SQLite store, ``TRACKIO_DIR=dest`` (``TRACKIO_DIR=dest trackio show``).

Each run carries the metric names of its ``metrics.jsonl`` (``docs/metrics.md``; ``samples`` too) at
the steps it logged them (a step's missing or non-finite values are left out), its resolved config
as hyperparameters (flattened: ``task.name``, ``algo.clip_eps``, ``model.n_layer``, ``beta``, ...),
and its grouping: the study (TensorBoard folder, W&B project, MLflow experiment, trackio project),
the task and algorithm (W&B and trackio group ``<task>/<algorithm>``: the seeds of one method
together) and the seed; the run id is a tag everywhere (the W&B run id itself).

Runs come through the loader (``workbench.results.loader``): a study's finished runs from the
index (``study_runs``), or one run folder (``folder_run``). A run exported to ``dest`` is marked
there (``dest/.workbench-export/<tracker>/<run_id>``) and skipped when exported again. The
trackers are optional extras; a missing one raises ``MissingExtra`` naming the extra to install.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..core.errors import ConfigError
from .files import FINISHED, read_status
from .loader import load_metrics, load_run_metrics, load_runs

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
MARKS = ".workbench-export"  # dest/.workbench-export/<tracker>/<run_id>: exported already
MAX_PARAM = 6000  # MLflow's longest parameter value


class MissingExtra(ConfigError):
    """A tracker's package is not installed: names the extra that installs it."""

    def __init__(self, tracker: str, why: str):
        super().__init__(
            f"exporting to {tracker} needs the package {PACKAGES[tracker]!r}, which cannot be imported ({why}); "
            f"install it with: pip install 'workbench[{tracker}]'"
        )
        self.tracker = tracker


@contextmanager
def _extra(tracker: str) -> Iterator[None]:
    """Around a tracker's imports: an ``ImportError`` is ``MissingExtra`` (a missing or broken install)."""
    try:
        yield
    except ImportError as e:
        raise MissingExtra(tracker, str(e).splitlines()[0] if str(e) else type(e).__name__) from None


def require(trackers: Iterable[str]) -> None:
    """``MissingExtra`` unless every tracker's package is installed; ``ConfigError`` for an unknown tracker.

    Looks the packages up without importing them (importing trackio fixes its folder, wandb is slow).
    """
    for t in trackers:
        if t not in TRACKERS:
            raise ConfigError(f"unknown tracker {t!r}; trackers: {', '.join(TRACKERS)}")
        try:
            found = importlib.util.find_spec(PACKAGES[t]) is not None
        except (ImportError, ValueError) as e:
            raise MissingExtra(t, str(e)) from None
        if not found:
            raise MissingExtra(t, f"no module named {PACKAGES[t]!r}")


@dataclass
class ExportRun:
    """One finished run as the trackers see it."""

    run_id: str
    study: str | None
    task: str  # the study's task label (else the task's name)
    algorithm: str  # the study's algorithm label, with its grid point (else the algorithm's name)
    seed: int
    status: str
    config: dict  # the resolved run config
    metrics: pd.DataFrame  # step, samples, metric columns (NaN: not logged at that step)
    grid: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.algorithm}-{self.task}-seed{self.seed}"

    @property
    def group(self) -> str:
        return f"{self.task}/{self.algorithm}"

    @property
    def tags(self) -> dict[str, str]:
        out = {"study": self.study or "", "task": self.task, "algorithm": self.algorithm, "seed": str(self.seed)}
        return out | {"run_id": self.run_id, "status": self.status}

    def rows(self) -> Iterator[tuple[int, dict[str, float]]]:
        """(step, {metric: value}) in step order, without missing or non-finite values."""
        cols = [c for c in self.metrics.columns if c not in ("step", "run_id")]
        for rec in self.metrics.sort_values("step", kind="stable").to_dict("records"):
            vals = {c: float(rec[c]) for c in cols if rec[c] is not None and math.isfinite(float(rec[c]))}
            if vals:
                yield int(rec["step"]), vals


def hyperparameters(config: dict, prefix: str = "") -> dict[str, bool | int | float | str]:
    """A nested config flattened to ``a.b`` keys; lists and None as JSON text."""
    out: dict = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= hyperparameters(v, key + ".")
        elif isinstance(v, bool | int | float | str):
            out[key] = v
        else:
            out[key] = json.dumps(v, sort_keys=True)
    return out


def _label(algo_label: str, grid: dict) -> str:
    return algo_label + ("[" + ",".join(f"{k}={v}" for k, v in grid.items()) + "]" if grid else "")


def study_runs(results, study: str, run_ids: Iterable[str] | None = None) -> list[ExportRun]:
    """The finished (done or diverged) runs of ``study``, in the study's order; ``ValueError`` when it has none."""
    runs = load_runs(results, study)
    if runs.empty:
        raise ValueError(f"no study {study!r} in the results folder (or it has no runs)")
    runs = runs[runs["status"].isin(FINISHED)]
    if run_ids is not None:
        runs = runs[runs["run_id"].isin(set(run_ids))]
    if runs.empty:
        raise ValueError(f"study {study!r} has no finished run yet: run it first (workbench run)")
    metrics = load_metrics(results, study, run_ids=list(runs["run_id"]))
    by_run = {rid: df.drop(columns="run_id") for rid, df in metrics.groupby("run_id", sort=False)}
    out = []
    for r in runs.to_dict("records"):
        if r["run_id"] not in by_run:  # unreadable: the loader warned (LoadWarning) and skipped it
            continue
        cfg = json.loads(r["config"]) if isinstance(r["config"], str) else {}
        out.append(
            ExportRun(
                r["run_id"],
                study,
                r["task_label"] or r["task"],
                _label(r["algo_label"] or r["algo"], r["grid"]),
                int(r["seed"]),
                r["status"],
                cfg,
                by_run[r["run_id"]],
                r["grid"],
            )
        )
    return out


def folder_run(run_dir, study: str | None = None) -> ExportRun:
    """One finished run folder (``workbench train --out``, no index needed) as an ``ExportRun``.

    ``ValueError`` (one line) when the folder holds no finished run or its files cannot be read.
    """
    d = Path(run_dir)
    status = read_status(d)
    if status is None or status.get("status") not in FINISHED:
        raise ValueError(f"{d}: not a finished run (no status.json saying done or diverged)")
    try:
        info = json.loads((d / "config.json").read_text())
        c = info["config"]
        task, algo, seed = c["task"]["name"], c["algo"]["name"], int(c["seed"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{d / 'config.json'}: unreadable ({e})") from None
    return ExportRun(info.get("config_hash", d.name), study, task, algo, seed, status["status"], c, load_run_metrics(d))


# -- the trackers -------------------------------------------------------------------------------------


def _safe(part: str) -> str:
    """A path component: no separators, no leading dot."""
    return re.sub(r"[^A-Za-z0-9_.=,+\[\]-]", "_", part).lstrip(".") or "_"


def _tensorboard(runs: list[ExportRun], dest: Path) -> None:
    with _extra("tensorboard"):
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.plugins.hparams import summary_v2 as hparams
        from tensorboard.plugins.text import summary_v2 as text
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

    for r in runs:
        logdir = dest / _safe(r.study or "runs") / _safe(r.task) / _safe(r.algorithm) / f"seed{r.seed}-{r.run_id}"
        w = EventFileWriter(str(logdir))
        now = time.time()
        try:
            hp = {k: v for k, v in hyperparameters(r.config).items()} | {f"tag.{k}": v for k, v in r.tags.items()}
            w.add_event(event_pb2.Event(wall_time=now, step=0, summary=hparams.hparams_pb(hp, trial_id=r.run_id)))
            config = json.dumps(r.config, indent=1, sort_keys=True)
            w.add_event(event_pb2.Event(wall_time=now, step=0, summary=text.text_pb("config", config)))
            for step, vals in r.rows():
                values = [summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in vals.items()]
                w.add_event(event_pb2.Event(wall_time=now, step=step, summary=summary_pb2.Summary(value=values)))
        finally:
            w.close()


def _wandb(runs: list[ExportRun], dest: Path) -> None:
    os.environ["WANDB_MODE"] = "offline"  # never online from here, whatever the environment said
    os.environ["WANDB_DIR"] = str(dest)
    os.environ.setdefault("WANDB_SILENT", "true")
    with _extra("wandb"):
        import wandb
    settings = wandb.Settings(mode="offline", console="off", x_disable_stats=True, x_disable_meta=True, silent=True)
    for r in runs:
        run = wandb.init(
            project=r.study or "workbench",
            group=r.group,
            job_type=r.algorithm,
            name=r.name,
            id=r.run_id,
            tags=[f"{k}={v}" for k, v in r.tags.items() if v][:64],
            config=hyperparameters(r.config),
            dir=str(dest),
            mode="offline",
            save_code=False,
            reinit="create_new",
            settings=settings,
        )
        try:
            for step, vals in r.rows():
                run.log(vals, step=step)
        finally:
            run.finish()


def _mlflow(runs: list[ExportRun], dest: Path) -> None:
    with _extra("mlflow"):
        from mlflow import entities, tracking
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # (not its INFO lines on creating the database)
    client = tracking.MlflowClient(tracking_uri=f"sqlite:///{dest.resolve() / 'mlflow.db'}")
    for r in runs:
        name = r.study or "workbench"
        exp = client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp else client.create_experiment(name, (dest / "artifacts").resolve().as_uri())
        tags = {f"workbench.{k}": v for k, v in r.tags.items()} | {"mlflow.runName": r.name, "group": r.group}
        run_id = client.create_run(exp_id, run_name=r.name, tags=tags).info.run_id
        params = [entities.Param(k, str(v)[:MAX_PARAM]) for k, v in hyperparameters(r.config).items()]
        now = int(time.time() * 1000)
        metrics = [entities.Metric(k, v, now, step) for step, vals in r.rows() for k, v in vals.items()]
        for i in range(0, len(params), 100):  # MLflow's limits of one batch
            client.log_batch(run_id, params=params[i : i + 100])
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i : i + 1000])
        client.set_terminated(run_id, "FINISHED" if r.status == "done" else "FAILED")


def _trackio(runs: list[ExportRun], dest: Path) -> None:
    # trackio reads TRACKIO_DIR once, when it is first imported: set it first, and refuse another folder later
    loaded = sys.modules.get("trackio.utils")
    if loaded is not None and Path(loaded.TRACKIO_DIR).resolve() != dest.resolve():
        raise ValueError(
            f"trackio was imported in this process with TRACKIO_DIR={loaded.TRACKIO_DIR}; "
            f"export to trackio in {dest} from a new process (workbench export)"
        )
    os.environ["TRACKIO_DIR"] = str(dest.resolve())
    with _extra("trackio"):
        import trackio
    for r in runs:
        run = trackio.init(
            project=r.study or "workbench",
            name=f"{r.name}-{r.run_id}",
            group=r.group,
            config=hyperparameters(r.config) | {f"tag.{k}": v for k, v in r.tags.items()},
            embed=False,
            auto_log_cpu=False,
            auto_log_gpu=False,
        )
        try:
            for step, vals in r.rows():
                run.log(vals, step=step)
        finally:
            run.finish()


_WRITERS = {"tensorboard": _tensorboard, "wandb": _wandb, "mlflow": _mlflow, "trackio": _trackio}


def export_runs(runs: list[ExportRun], tracker: str, dest) -> dict:
    """Write ``runs`` to ``tracker`` under ``dest`` (created); runs exported there before are skipped.

    Returns ``exported`` and ``skipped`` (run ids) and ``dest``. ``MissingExtra`` without the tracker's package.
    """
    require([tracker])
    dest = Path(dest)
    marks = dest / MARKS / tracker
    todo = [r for r in runs if not (marks / r.run_id).exists()]
    out = {"exported": [r.run_id for r in todo], "skipped": [r.run_id for r in runs if r not in todo], "dest": dest}
    if not todo:
        return out
    marks.mkdir(parents=True, exist_ok=True)
    for r in todo:  # one at a time: a failure part-way leaves the runs before it marked
        _WRITERS[tracker]([r], dest)
        (marks / r.run_id).write_text(json.dumps({"study": r.study, "name": r.name, "exported_at": time.time()}))
    return out


def export_study(results, study: str, tracker: str, dest, run_ids: Iterable[str] | None = None) -> dict:
    """``export_runs`` of ``study``'s finished runs (``study_runs``), all or ``run_ids``."""
    require([tracker])  # before reading anything: the missing extra is the first thing to say
    return export_runs(study_runs(results, study, run_ids), tracker, dest)
