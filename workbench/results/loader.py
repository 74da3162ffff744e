"""Reading many runs: the one loader every reader of a results folder goes through.

Owns the reads across runs: the index's studies and runs (``load_studies``, ``load_runs``),
their metrics (``load_metrics``, ``load_final``, ``metric_names``, ``query``), and a run's
other files (``load_run``, ``load_credit``, ``load_probes``, ``load_policies``) and the
reports' verdicts (``load_verdicts``). A corrupt or missing file is reported (``LoadWarning``,
``df.attrs["issues"]``) and its run skipped instead of failing the whole load; a damaged
index is set aside and rebuilt first (``workbench.results.index.ensure_index``).
"""

from __future__ import annotations

import datetime
import json
import sqlite3
import time
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from .files import (
    FINISHED,
    INDEX,
    POLICY,
    _jsonl_columnar,
    _metrics_frame,
    _parse_jsonl,
    _read_jsonl,
    read_progress,
    read_status,
    results_dir,
)
from .index import STATUSES, _connect_reader, _ensure_index_warn, is_stale


class LoadWarning(UserWarning):
    """A run's files could not be read; the run was skipped."""


def _open_index(results) -> sqlite3.Connection:
    path = results_dir(results) / INDEX
    if not path.exists():
        raise FileNotFoundError(f"no results index at {path}")
    _ensure_index_warn(results)
    db = _connect_reader(path)
    if (
        db.execute("SELECT count(*) FROM sqlite_master WHERE name IN ('studies', 'runs', 'study_runs')").fetchone()[0]
        < 3
    ):
        db.close()
        raise FileNotFoundError(f"results index at {path} is being created")
    return db


def load_studies(results=None) -> pd.DataFrame:
    """One row per study: name, path, description, claims (list), n_runs and a count per status."""
    db = _open_index(results)
    try:
        df = pd.read_sql_query("SELECT * FROM studies ORDER BY name", db)
        counts = pd.read_sql_query(
            "SELECT sr.study, r.status, COUNT(*) AS n FROM study_runs sr JOIN runs r USING (run_id) "
            "GROUP BY sr.study, r.status",
            db,
        )
    finally:
        db.close()
    df["claims"] = df["claims"].map(json.loads)
    wide = counts.pivot(index="study", columns="status", values="n") if len(counts) else pd.DataFrame()
    for s in STATUSES:
        df[s] = df["name"].map(wide.get(s, {})).fillna(0).astype(int)
    return df


def load_runs(results=None, study: str | None = None) -> pd.DataFrame:
    """One row per (study, run): labels, grid point, task, algo, seed, status, step, samples, path, ...

    ``stale`` is True for a 'running' run whose owner is gone (it will be reclaimed). Without
    ``study``, runs of every study (a run shared by two studies appears twice) and runs of none.
    """
    db = _open_index(results)
    try:
        where = "WHERE sr.study = ?" if study else ""
        df = pd.read_sql_query(
            "SELECT sr.study, sr.task_label, sr.algo_label, sr.grid, r.* FROM runs r"
            f" LEFT JOIN study_runs sr ON sr.run_id = r.run_id {where} ORDER BY sr.study, sr.position, r.run_id",
            db,
            params=(study,) if study else None,
        )
    finally:
        db.close()
    root = results_dir(results)
    df["path"] = [str(root / "runs" / r) for r in df["run_id"]]
    now = time.time()
    df["stale"] = [row["status"] == "running" and is_stale(row, now) for row in df.to_dict("records")]
    df["grid"] = df["grid"].map(lambda g: json.loads(g) if isinstance(g, str) else {})
    return df


def load_metrics(
    results=None,
    study: str | None = None,
    run_ids: Iterable[str] | None = None,
    unpublished: bool = False,
    columns: Iterable[str] | None = None,
) -> pd.DataFrame:
    """Metrics of many runs in one long-by-step frame: ``run_id``, ``step``, ``samples``, metrics...

    Published runs are read from ``metrics.parquet``; with ``unpublished`` the runs that have
    not published yet (running, failed, killed) are read from ``metrics.jsonl``, a running
    run's half-written last line dropped. A corrupt parquet file, a truncated or corrupt
    ``metrics.jsonl`` or a finished run without its parquet is reported (a ``LoadWarning``,
    and ``df.attrs["issues"]``: run_id, path, problem) and the run is skipped.

    ``columns`` limits the metrics read (``run_id``, ``step`` and ``samples`` always come; a
    name no run logged is left out). The published files are read in one DuckDB scan of
    just those columns (500 runs x 2,000 steps, one metric: about 0.2 s); when the scan
    fails, file by file, to name the damaged one.
    """
    df = _load_metrics(results, study, run_ids, unpublished, columns, last=False)
    for i in df.attrs["issues"]:
        warnings.warn(f"skipped run {i['run_id']}: {i['path']}: {i['problem']}", LoadWarning, stacklevel=2)
    return df


def _last(df: pd.DataFrame) -> pd.DataFrame:
    """Per run, the last non-null value of each column in step order (``step``: the last step)."""
    return df.sort_values("step", kind="stable").groupby("run_id", sort=False).last().reset_index()


def _load_metrics(results, study, run_ids, unpublished, columns, last: bool) -> pd.DataFrame:
    """``load_metrics`` without the warnings; with ``last``, one row per run (``_last``), computed in the scan."""
    runs = load_runs(results, study).drop_duplicates("run_id")
    if run_ids is not None:
        runs = runs[runs["run_id"].isin(set(run_ids))]
    want = None if columns is None else {"step", "samples", *columns}
    parquets, frames, issues = [], [], []
    for r in runs.to_dict("records"):  # (iterrows builds a Series a row: 10x slower)
        d = Path(r["path"])
        pq_path = d / "metrics.parquet"
        if pq_path.exists():
            parquets.append((r["run_id"], pq_path))
            continue
        if r["status"] in FINISHED:
            issues.append({"run_id": r["run_id"], "path": str(pq_path), "problem": f"{r['status']} but not published"})
            continue
        if not unpublished or r["status"] == "queued":
            continue
        rows, problem = _read_jsonl(d / "metrics.jsonl")
        live = r["status"] == "running" and not r["stale"]
        if problem and not (live and problem.startswith("truncated")):
            if problem != "missing":
                issues.append({"run_id": r["run_id"], "path": str(d / "metrics.jsonl"), "problem": problem})
            continue
        if rows:
            f = _metrics_frame(rows)
            f = (f if want is None else f[[c for c in f.columns if c in want]]).assign(run_id=r["run_id"])
            frames.append(_last(f) if last else f)
    done, bad = _read_parquets(parquets, want, last)
    frames, issues = [f for f in (done, *frames) if f is not None], issues + bad
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["run_id", "step", "samples"])
    df = df[["run_id", *[c for c in df.columns if c != "run_id"]]]
    df.attrs["issues"] = issues
    return df


def _read_parquets(
    files: list[tuple[str, Path]], want: set[str] | None, last: bool = False
) -> tuple[pd.DataFrame | None, list[dict]]:
    """``(run_id, metrics.parquet)`` pairs -> one frame of the ``want`` columns (all if None), and the issues.

    With ``last``, one row per file: DuckDB's ``arg_max(x, step)`` skips nulls, so it is the
    last value each metric was logged with, as ``_last``.
    """
    import duckdb  # heavy optional: DuckDB loads only for a query

    if not files:
        return None, []
    con = duckdb.connect(":memory:")
    try:
        sel = "*" if want is None else "COLUMNS(lambda c: list_contains($want, c))"
        args = {"paths": [str(p) for _, p in files], **({} if want is None else {"want": sorted(want)})}
        src = f"SELECT file_index, {sel} FROM read_parquet($paths, union_by_name = true)"
        if last:
            src = (
                f"SELECT file_index, max(step) AS step, "
                f"arg_max(COLUMNS(lambda c: c NOT IN ('file_index', 'step')), step)"
                f" FROM ({src}) GROUP BY file_index ORDER BY file_index"
            )
        df = con.execute(src, args).df()
    except Exception:  # noqa: BLE001  a damaged file fails the whole scan: read them one by one
        return _read_parquets_one_by_one(files, want, last)
    finally:
        con.close()
    ids = np.array([rid for rid, _ in files], dtype=object)
    df.insert(0, "run_id", pd.Series(ids[df.pop("file_index").to_numpy()], dtype=object))
    return df, []


def _read_parquets_one_by_one(files, want, last: bool = False) -> tuple[pd.DataFrame | None, list[dict]]:
    import pyarrow.parquet as pq  # heavy optional: pyarrow loads only where parquet is read or written

    frames, issues = [], []
    for rid, path in files:
        try:
            f = pq.ParquetFile(path)
            cols = None if want is None else [c for c in f.schema_arrow.names if c in want]
            df = f.read(columns=cols).to_pandas().assign(run_id=rid)
            frames.append(_last(df) if last else df)
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... on a damaged file
            issues.append({"run_id": rid, "path": str(path), "problem": f"corrupt parquet: {e}"})
    return (pd.concat(frames, ignore_index=True) if frames else None), issues


def load_final(results=None, study: str | None = None, columns: Iterable[str] | None = None) -> pd.DataFrame:
    """One row per run of ``study``: the run's index row joined with its last logged metrics.

    A metric is taken from the last row that has it (exact metrics are logged every
    ``eval_every`` steps and at the end). ``columns`` limits the metrics read.
    """
    runs = load_runs(results, study)
    last = _load_metrics(results, study, None, False, columns, last=True)
    for i in last.attrs["issues"]:
        warnings.warn(f"skipped run {i['run_id']}: {i['path']}: {i['problem']}", LoadWarning, stacklevel=2)
    if len(last):
        last = last.rename(columns={"step": "final_step", "samples": "final_samples"})
        runs = runs.merge(last, on="run_id", how="left")
    runs.attrs["issues"] = last.attrs.get("issues", [])
    return runs


def query(sql: str, results=None, study: str | None = None) -> pd.DataFrame:
    """Run SQL over the tables ``runs``, ``metrics`` and ``studies`` in an in-memory DuckDB.

    (An in-memory database: a ``.duckdb`` file held open for writing blocks every other
    process, even readers.)
    """
    import duckdb  # heavy optional: DuckDB loads only for a query

    runs = load_runs(results, study)
    runs["grid"] = runs["grid"].map(lambda g: json.dumps(g, sort_keys=True))
    metrics = load_metrics(results, study)
    studies = load_studies(results)
    studies["claims"] = studies["claims"].map(",".join)
    con = duckdb.connect(":memory:")
    try:
        for name, df in (("runs", runs), ("metrics", metrics), ("studies", studies)):
            con.register(name, df)
        return con.execute(sql).df()
    finally:
        con.close()


# -- a run's other files, metric names, report verdicts -------------------------------------------


def metric_names(results=None, study: str | None = None) -> list[str]:
    """Every metric name the runs of ``study`` logged (published, and in progress), sorted.

    Reads parquet footers only, one run per config up to the seed (seeds of one config log
    the same metrics), and the ``metrics.jsonl`` of unpublished runs. Damaged files are
    skipped here (every footer is then read) and reported by ``load_metrics``.
    """
    import duckdb  # heavy optional: DuckDB loads only for a query
    import pyarrow.parquet as pq  # heavy optional: pyarrow loads only where parquet is read or written

    runs = load_runs(results, study).drop_duplicates("run_id")
    names: set[str] = set()
    paths, every, configs = [], [], set()
    for r in runs.to_dict("records"):
        d = Path(r["path"])
        if (d / "metrics.parquet").exists():
            every.append(str(d / "metrics.parquet"))
            try:
                key = json.dumps({k: v for k, v in json.loads(r["config"]).items() if k != "seed"}, sort_keys=True)
            except (TypeError, ValueError, AttributeError):
                key = r["run_id"]
            if key not in configs:
                configs.add(key)
                paths.append(every[-1])
        elif r["status"] != "queued":
            rows, _ = _read_jsonl(d / "metrics.jsonl")
            names.update(k for row in rows for k in row)
    if paths:
        con = duckdb.connect(":memory:")
        try:
            names.update(
                n for (n,) in con.execute("SELECT DISTINCT name FROM parquet_schema($p)", {"p": paths}).fetchall()
            )
        except Exception:  # noqa: BLE001  a damaged file: every footer, one by one
            for p in every:
                try:
                    names.update(pq.ParquetFile(p).schema_arrow.names)
                except Exception:  # noqa: BLE001
                    continue
        finally:
            con.close()
    return sorted(names - {"step", "samples", "schema", "duckdb_schema", "run_id"})


def load_run(results, run_id: str) -> dict:
    """One run's own files, each ``None`` when absent or unreadable.

    ``config`` (config.json), ``status`` (status.json), ``progress`` (the last complete row
    of metrics.jsonl), ``samples`` (samples.jsonl as a frame: step, text, reward), ``error``
    (error.txt), ``path``.
    """
    d = results_dir(results) / "runs" / run_id
    try:
        config = json.loads((d / "config.json").read_text())
    except (OSError, ValueError):
        config = None
    rows, _ = _read_jsonl(d / "samples.jsonl")
    try:
        error = (d / "error.txt").read_text()
    except OSError:
        error = None
    return {
        "path": str(d),
        "config": config,
        "status": read_status(d),
        "progress": read_progress(d),
        "samples": pd.DataFrame.from_records(rows) if rows else None,
        "error": error,
    }


def load_run_metrics(run_dir) -> pd.DataFrame:
    """One run folder's metrics by step, without an index (``workbench train --out``): ``step``, ``samples``,
    metrics. From ``metrics.parquet`` when published, else ``metrics.jsonl``; ``ValueError`` naming the file
    when neither can be read."""
    d = Path(run_dir)
    if (d / "metrics.parquet").exists():
        try:
            return pd.read_parquet(d / "metrics.parquet")
        except Exception as e:  # noqa: BLE001  (pyarrow's many errors: damaged, truncated)
            raise ValueError(f"{d / 'metrics.parquet'}: unreadable ({e})") from None
    rows, problem = _read_jsonl(d / "metrics.jsonl")
    if problem:
        raise ValueError(f"{d / 'metrics.jsonl'}: {problem}")
    return _metrics_frame(rows)


VERDICTS = "verdicts.json"  # <results>/reports/<study>/verdicts.json, written by `workbench report STUDY`


def load_verdicts(results=None) -> pd.DataFrame:
    """One row per (study, claim) of every report under ``<results>/reports/<study>/``.

    Reads ``verdicts.json`` as ``workbench.reporting.report`` writes it: ``{"study", "claims",
    "verdicts": {claim: verdict}, "rules": [{"claim", "metric", "statement", "verdict",
    "estimate", "ci_low", "ci_high", "n", "figure", ...}], "report": {"pdf", "html", "md"}}``
    (paths relative to its folder). Columns: study, claim, verdict; the deciding rule's
    summary (statement), metric, value, ci_low, ci_high, figure (absolute path); rules (every
    rule of the claim, figure paths absolute); report (the PDF, else HTML, else Markdown);
    generated_at (the file's time, ISO); path. A file that cannot be read is reported in
    ``df.attrs["issues"]`` (path, problem) and skipped.
    """

    root = results_dir(results) / "reports"
    rows, issues = [], []
    for f in sorted(root.glob(f"*/{VERDICTS}")):
        try:
            doc = json.loads(f.read_text())
            verdicts, rules = doc["verdicts"], doc.get("rules") or []
            if not isinstance(verdicts, dict) or not isinstance(rules, list):
                raise ValueError("'verdicts' must map claim -> verdict and 'rules' be a list")
        except (OSError, ValueError, KeyError, TypeError) as e:
            issues.append({"path": str(f), "problem": f"{e.__class__.__name__}: {e}"})
            continue
        here = lambda rel, d=f.parent: str(d / rel) if rel else None  # noqa: E731
        files = doc.get("report") or {}
        files = files if isinstance(files, dict) else {"file": files}
        report = next(
            (here(files[k]) for k in ("pdf", "html", "md", "file") if files.get(k) and (f.parent / files[k]).exists()),
            None,
        )
        when = datetime.datetime.fromtimestamp(f.stat().st_mtime, datetime.UTC).isoformat(timespec="seconds")
        for claim, verdict in verdicts.items():
            mine = [{**r, "figure": here(r.get("figure"))} for r in rules if r.get("claim") == claim]
            decided = next((r for r in mine if r.get("verdict") == verdict), mine[0] if mine else {})
            rows.append(
                {
                    "study": doc.get("study", f.parent.name),
                    "claim": claim,
                    "verdict": verdict,
                    "summary": decided.get("statement") or "",
                    "metric": decided.get("metric"),
                    "value": decided.get("estimate"),
                    "ci_low": decided.get("ci_low"),
                    "ci_high": decided.get("ci_high"),
                    "figure": decided.get("figure"),
                    "rules": mine,
                    "report": report,
                    "generated_at": when,
                    "path": str(f),
                }
            )
    cols = [
        "study",
        "claim",
        "verdict",
        "summary",
        "metric",
        "value",
        "ci_low",
        "ci_high",
        "figure",
        "rules",
        "report",
        "generated_at",
        "path",
    ]
    df = pd.DataFrame(rows, columns=cols)
    df.attrs["issues"] = issues
    return df


def load_credit(results=None, study: str | None = None, run_ids: Iterable[str] | None = None) -> pd.DataFrame:
    """The in-training credit-assignment records (``credit.jsonl``) of many runs, one row per (run, probe step,
    position).

    Columns: run_id, step, method, position, decisive, method_abs, exact_abs, method_mean,
    exact_mean, corr, mse, share, share_exact (``workbench.analysis.probe.Prober``). A running run's
    half-written last line is dropped; a corrupt file is reported in ``df.attrs["issues"]``.
    """
    runs = load_runs(results, study).drop_duplicates("run_id")
    if run_ids is not None:
        runs = runs[runs["run_id"].isin(set(run_ids))]
    found = []  # (run, its file, the file's bytes): each file read once, for both ways of parsing it
    for r in runs.to_dict("records"):
        path = Path(r["path"]) / "credit.jsonl"
        if r["status"] != "queued" and path.exists():
            found.append((r, path, path.read_bytes()))
    df = _jsonl_columnar([(r["run_id"], data) for r, _, data in found])
    if df is not None:
        df.attrs["issues"] = []
        return df
    records, issues = [], []
    for r, path, data in found:
        rows, problem = _parse_jsonl(data)
        if problem and not (problem.startswith("truncated") and r["status"] == "running"):
            issues.append({"run_id": r["run_id"], "path": str(path), "problem": problem})
            continue
        rid = r["run_id"]
        for row in rows:
            row["run_id"] = rid
        records += rows
    df = (
        pd.DataFrame.from_records(records)
        if records
        else pd.DataFrame(columns=["run_id", "step", "method", "position"])
    )
    df = df[["run_id", *[c for c in df.columns if c != "run_id"]]]
    df.attrs["issues"] = issues
    return df


def load_probes(results=None, what: str = "gradients", study: str | None = None) -> pd.DataFrame:
    """The checkpoint probes (``probe_<what>.parquet``, ``workbench probe --what``) of a study's runs, with ``run_id``.

    A damaged file is reported in ``df.attrs["issues"]`` and skipped.
    """
    import pyarrow.parquet as pq  # heavy optional: pyarrow loads only where parquet is read or written

    runs = load_runs(results, study).drop_duplicates("run_id")
    frames, issues = [], []
    for r in runs.to_dict("records"):
        path = Path(r["path"]) / f"probe_{what}.parquet"
        if not path.exists():
            continue
        try:
            frames.append(pq.read_table(path).to_pandas().assign(run_id=r["run_id"]))
        except Exception as e:  # noqa: BLE001
            issues.append({"run_id": r["run_id"], "path": str(path), "problem": f"corrupt parquet: {e}"})
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["run_id"])
    df.attrs["issues"] = issues
    return df


def load_policies(results=None, run_ids: Iterable[str] = ()) -> dict:
    """``{run_id: log pi (P, N) float array}`` for the runs that wrote ``policy.npy``; others are left out."""

    root = results_dir(results) / "runs"
    out = {}
    for rid in run_ids:
        try:
            out[rid] = np.load(root / rid / POLICY)
        except (OSError, ValueError):
            continue
    return out
