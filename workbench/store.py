"""The results store: run folders, the SQLite index, atomic publishing, and the one loader.

Layout (documented in ``docs/results.md``)::

    <results>/                      --results, else $WORKBENCH_RESULTS, else ./results
      index.sqlite                  studies, runs, study_runs, events (WAL mode)
      studies/<study>.toml          the study file as last run
      runs/<run_id>/                run_id = config hash of the resolved run config
        config.json                 written by train(): config, config_hash, model summary
        metrics.jsonl               appended line by line while the run trains
        metrics.parquet             published atomically once the run has ended
        samples.jsonl               a few rendered completions per evaluation
        status.json                 {"status": "done" | "diverged", "step", "reason"}
        checkpoint/                 safetensors weights + config + tokenizer
        error.txt                   the traceback of a failed run

A run's status lives in the index: ``queued -> running -> done | diverged | failed``.
``metrics.parquet`` is the commit point: a run whose folder holds it (and a ``status.json``
saying done or diverged) has finished, whatever the index says, so a process killed between
publishing and updating the index loses nothing.

Everything outside this module reads results through the loader at the bottom
(``load_studies``, ``load_runs``, ``load_metrics``, ``load_final``, ``query``): it reports
and skips corrupt files instead of failing the whole load.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import tempfile
import threading
import time
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterable

import pandas as pd

INDEX = "index.sqlite"
STATUSES = ("queued", "running", "done", "failed", "diverged")
FINISHED = ("done", "diverged")  # a run in one of these is never run again
HEARTBEAT_S = 5.0  # how often an owner refreshes the heartbeat of the runs it holds
LEASE_S = 60.0  # a 'running' run whose heartbeat is older than this is reclaimed
BUSY_TIMEOUT_MS = 30_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    name TEXT PRIMARY KEY, path TEXT, description TEXT, claims TEXT, spec_hash TEXT,
    n_runs INTEGER, created_at REAL, updated_at REAL
);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, task TEXT, algo TEXT, seed INTEGER, steps INTEGER, unit TEXT,
    status TEXT NOT NULL DEFAULT 'queued' CHECK (status IN ('queued', 'running', 'done', 'failed', 'diverged')),
    step INTEGER, samples INTEGER, reason TEXT,
    owner TEXT, host TEXT, pid INTEGER, heartbeat_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL, started_at REAL, finished_at REAL, config TEXT
);
CREATE TABLE IF NOT EXISTS study_runs (
    study TEXT NOT NULL REFERENCES studies(name), run_id TEXT NOT NULL REFERENCES runs(run_id),
    position INTEGER, task_label TEXT, algo_label TEXT, grid TEXT,
    PRIMARY KEY (study, run_id)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL, run_id TEXT, owner TEXT, event TEXT, detail TEXT
);
CREATE INDEX IF NOT EXISTS events_run ON events(run_id);
"""


def results_dir(arg: str | os.PathLike | None = None) -> Path:
    """``--results``, else ``$WORKBENCH_RESULTS``, else ``./results``."""
    return Path(arg or os.environ.get("WORKBENCH_RESULTS") or "results")


# -- atomic publishing ----------------------------------------------------------------------


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` so that readers see the old file or the whole new one, never a part.

    ``write(f)`` fills a temporary file in the same folder; it is fsynced, the folder is
    fsynced, ``os.replace`` moves it into place and the folder is fsynced again.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(path.parent)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def publish_text(path: str | os.PathLike, text: str) -> Path:
    return publish(path, lambda f: f.write(text.encode()))


def publish_metrics(run_dir: str | os.PathLike) -> Path:
    """Convert the finished run's ``metrics.jsonl`` to ``metrics.parquet``, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    run_dir = Path(run_dir)
    rows, problem = _read_jsonl(run_dir / "metrics.jsonl")
    if problem:
        raise ValueError(f"{run_dir / 'metrics.jsonl'}: {problem}")
    table = pa.Table.from_pandas(_metrics_frame(rows), preserve_index=False)
    return publish(run_dir / "metrics.parquet", lambda f: pq.write_table(table, f))


def _metrics_frame(rows: list[dict]) -> pd.DataFrame:
    """Rows of ``metrics.jsonl`` -> a frame: ``step``, ``samples``, then metric names sorted; null -> NaN."""
    df = pd.DataFrame.from_records(rows)
    for c in ("step", "samples"):  # present even when nothing was logged (diverged at step 0)
        if c not in df:
            df[c] = pd.Series(dtype="int64")
    metrics = sorted(c for c in df.columns if c not in ("step", "samples"))
    df = df[[c for c in ("step", "samples") if c in df.columns] + metrics]
    return df.astype({c: "float64" for c in metrics})


def _read_jsonl(path: Path) -> tuple[list[dict], str | None]:
    """Complete rows, and what is wrong with the file (``None`` when nothing is).

    A last line without its newline is a write in progress or a truncation; any line that
    does not parse as a JSON object is corruption.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], "missing"
    lines = data.split(b"\n")
    rows, problem = [], None
    if lines and lines[-1] == b"":
        lines.pop()
    elif lines:
        problem = f"truncated: line {len(lines)} has no end ({len(lines[-1])} bytes)"
        lines.pop()
    try:  # every line at once (one parser call: about 2x faster); line by line to find a bad one
        rows = json.loads(b"[" + b",".join(lines) + b"]")
        if len(rows) == len(lines) and all(isinstance(r, dict) for r in rows):
            return rows, problem
    except ValueError:
        pass
    rows = []
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not an object")
        except ValueError as e:
            return rows, f"line {i} is not a JSON object ({e})"
        rows.append(row)
    return rows, problem


def read_status(run_dir: str | os.PathLike) -> dict | None:
    """The run folder's ``status.json``, or ``None`` when absent or unreadable."""
    try:
        return json.loads((Path(run_dir) / "status.json").read_text())
    except (OSError, ValueError):
        return None


def read_progress(run_dir: str | os.PathLike) -> dict | None:
    """The last complete row of a running run's ``metrics.jsonl`` (for progress bars), or ``None``."""
    try:
        with open(Path(run_dir) / "metrics.jsonl", "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            tail = f.read()
    except OSError:
        return None
    for line in reversed(tail.split(b"\n")[:-1]):  # the part after the last newline is incomplete
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def published(run_dir: str | os.PathLike) -> dict | None:
    """``status.json`` of a run that has finished and published its metrics, else ``None``."""
    run_dir = Path(run_dir)
    st = read_status(run_dir)
    if st and st.get("status") in FINISHED and (run_dir / "metrics.parquet").exists():
        return st
    return None


# -- the index --------------------------------------------------------------------------------


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
    db.row_factory = sqlite3.Row
    db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a committed transaction survives a killed process
    return db


@dataclass(frozen=True)
class Owner:
    """Who holds a claim: one ``workbench run`` process."""

    id: str
    host: str
    pid: int

    @staticmethod
    def current() -> Owner:
        host, pid = socket.gethostname(), os.getpid()
        return Owner(f"{host}:{pid}:{uuid.uuid4().hex[:8]}", host, pid)


def pid_alive(pid) -> bool:
    if pid is None or pid != pid or not pid:  # None, NaN (from pandas), 0
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child its parent has not reaped yet is a zombie: dead
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def is_stale(row, now: float | None = None, lease_s: float = LEASE_S) -> bool:
    """A 'running' row whose owner is gone: a dead pid on this host, or a heartbeat older than the lease."""
    now = time.time() if now is None else now
    if row["host"] == socket.gethostname() and not pid_alive(row["pid"]):
        return True
    beat = row["heartbeat_at"]
    return beat is None or beat != beat or now - beat > lease_s


class Store:
    """Writes to a results folder: run folders and the index. Readers use the loader below."""

    def __init__(self, root: str | os.PathLike, create: bool = True):
        self.root = Path(root)
        if create:
            (self.root / "runs").mkdir(parents=True, exist_ok=True)
            (self.root / "studies").mkdir(exist_ok=True)
        elif not (self.root / INDEX).exists():
            raise FileNotFoundError(f"no results index at {self.root / INDEX}")
        self.db = _connect(self.root / INDEX)
        with self._tx() as db:
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    db.execute(stmt)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _tx(self):
        """A write transaction that takes the write lock up front (no lock upgrade deadlocks)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    def _event(self, db, run_id: str, owner: str | None, event: str, detail: str = "") -> None:
        db.execute("INSERT INTO events(at, run_id, owner, event, detail) VALUES (?, ?, ?, ?, ?)",
                   (time.time(), run_id, owner, event, detail))  # fmt: skip

    # -- studies ----------------------------------------------------------------------------
    def register_study(self, name: str, path: str, description: str, claims: list[str], spec_hash: str,
                       runs: list[dict]) -> None:  # fmt: skip
        """Record a study and its runs; new runs enter as 'queued', known runs keep their state.

        Each of ``runs`` has run_id, task, algo, seed, steps, unit, config (dict), task_label,
        algo_label, grid (dict).
        """
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT INTO studies(name, path, description, claims, spec_hash, n_runs, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET path=excluded.path,"
                " description=excluded.description, claims=excluded.claims, spec_hash=excluded.spec_hash,"
                " n_runs=excluded.n_runs, updated_at=excluded.updated_at",
                (name, path, description, json.dumps(claims), spec_hash, len(runs), now, now),
            )
            db.execute("DELETE FROM study_runs WHERE study = ?", (name,))
            for i, r in enumerate(runs):
                db.execute(
                    "INSERT OR IGNORE INTO runs(run_id, task, algo, seed, steps, unit, config, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (r["run_id"], r["task"], r["algo"], r["seed"], r["steps"], r["unit"],
                     json.dumps(r["config"], sort_keys=True), now),
                )  # fmt: skip
                db.execute(
                    "INSERT INTO study_runs(study, run_id, position, task_label, algo_label, grid) VALUES (?, ?, ?, ?, ?, ?)",
                    (name, r["run_id"], i, r["task_label"], r["algo_label"], json.dumps(r["grid"])),  # keys in study order
                )

    def states(self, run_ids: Iterable[str]) -> dict[str, sqlite3.Row]:
        ids = list(run_ids)
        out = {}
        for s in range(0, len(ids), 500):
            chunk = ids[s : s + 500]
            q = f"SELECT * FROM runs WHERE run_id IN ({','.join('?' * len(chunk))})"
            out.update({r["run_id"]: r for r in self.db.execute(q, chunk)})
        return out

    # -- claims -----------------------------------------------------------------------------
    def claim(self, run_id: str, owner: Owner, expected_attempts: int | None = None, lease_s: float = LEASE_S) -> str:
        """Try to take a run for execution, atomically. Returns what happened:

        - ``"claimed"``: it is now 'running' under ``owner``; execute it;
        - ``"recovered"``: a previous attempt had published it; the index now says so;
        - ``"finished"``: done or diverged, published; nothing to do;
        - ``"busy"``: another live owner is running it;
        - ``"failed"``: it failed, and someone attempted it since ``expected_attempts`` was read
          (so two processes never retry the same failure twice).

        Queued runs are claimed; failed runs too when ``attempts == expected_attempts``;
        running runs when their owner is gone (``is_stale``).
        """
        now = time.time()
        run_dir = self.run_dir(run_id)
        with self._tx() as db:
            row = db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                raise KeyError(f"run {run_id} is not in the index")
            status, detail = row["status"], row["status"]
            if status in FINISHED and published(run_dir):
                return "finished"
            if status == "running":
                if not is_stale(row, now, lease_s):
                    return "busy"
                detail = f"reclaimed from {row['owner']}"
            if status == "failed" and expected_attempts is not None and row["attempts"] != expected_attempts:
                return "failed"
            st = published(run_dir)
            if st is not None:  # killed after publishing, before the index heard of it
                db.execute("UPDATE runs SET status=?, step=?, reason=?, owner=NULL, finished_at=? WHERE run_id=?",
                           (st["status"], st.get("step"), st.get("reason"), now, run_id))  # fmt: skip
                self._event(db, run_id, owner.id, "recovered", st["status"])
                return "recovered"
            db.execute(
                "UPDATE runs SET status='running', owner=?, host=?, pid=?, heartbeat_at=?, started_at=?,"
                " finished_at=NULL, reason=NULL, attempts=attempts+1 WHERE run_id=?",
                (owner.id, owner.host, owner.pid, now, now, run_id),
            )
            self._event(db, run_id, owner.id, "claimed", detail)
            return "claimed"

    def heartbeat(self, owner: Owner) -> int:
        """Refresh the heartbeat of every run ``owner`` is running; returns how many."""
        cur = self.db.execute("UPDATE runs SET heartbeat_at=? WHERE owner=? AND status='running'", (time.time(), owner.id))
        return cur.rowcount

    def finish(self, run_id: str, owner: Owner, status: str, step: int | None = None, samples: int | None = None,
               reason: str | None = None) -> bool:  # fmt: skip
        """Record a run's end, if ``owner`` still holds it. Returns whether it did."""
        if status not in ("done", "diverged", "failed"):
            raise ValueError(f"not a final status: {status!r}")
        with self._tx() as db:
            cur = db.execute(
                "UPDATE runs SET status=?, step=?, samples=?, reason=?, owner=NULL, finished_at=?"
                " WHERE run_id=? AND owner=? AND status='running'",
                (status, step, samples, reason, time.time(), run_id, owner.id),
            )
            if cur.rowcount:
                self._event(db, run_id, owner.id, status, reason or "")
            return bool(cur.rowcount)

    def release(self, run_id: str, owner: Owner) -> None:
        """Give a claimed run back (interrupted before it ended): it is 'queued' again."""
        with self._tx() as db:
            cur = db.execute("UPDATE runs SET status='queued', owner=NULL WHERE run_id=? AND owner=? AND status='running'",
                             (run_id, owner.id))  # fmt: skip
            if cur.rowcount:
                self._event(db, run_id, owner.id, "released")


class Heartbeat:
    """A daemon thread refreshing ``owner``'s claims every ``interval`` seconds, on its own connection."""

    def __init__(self, root: str | os.PathLike, owner: Owner, interval: float = HEARTBEAT_S):
        self.root, self.owner, self.interval = Path(root), owner, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="workbench-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        db = Store(self.root, create=False)
        try:
            while not self._stop.wait(self.interval):
                try:
                    db.heartbeat(self.owner)
                except sqlite3.Error as e:  # a missed beat is not fatal; the lease is 12 beats long
                    warnings.warn(f"heartbeat failed: {e}", RuntimeWarning, stacklevel=1)
        finally:
            db.close()


# -- the loader: every reader goes through these ------------------------------------------------


class LoadWarning(UserWarning):
    """A run's files could not be read; the run was skipped."""


def _open_index(results) -> sqlite3.Connection:
    path = results_dir(results) / INDEX
    if not path.exists():
        raise FileNotFoundError(f"no results index at {path}")
    db = _connect(path)
    if db.execute("SELECT count(*) FROM sqlite_master WHERE name IN ('studies', 'runs', 'study_runs')").fetchone()[0] < 3:
        db.close()
        raise FileNotFoundError(f"results index at {path} is being created")
    return db


def load_studies(results=None) -> pd.DataFrame:
    """One row per study: name, path, description, claims (list), n_runs and a count per status."""
    db = _open_index(results)
    try:
        df = pd.read_sql_query("SELECT * FROM studies ORDER BY name", db)
        counts = pd.read_sql_query(
            "SELECT sr.study, r.status, COUNT(*) AS n FROM study_runs sr JOIN runs r USING (run_id) GROUP BY sr.study, r.status", db
        )
    finally:
        db.close()
    df["claims"] = df["claims"].map(json.loads)
    wide = counts.pivot(index="study", columns="status", values="n") if len(counts) else pd.DataFrame()
    for s in STATUSES:
        df[s] = df["name"].map(wide[s] if s in wide else {}).fillna(0).astype(int)
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
            db, params=(study,) if study else None,
        )  # fmt: skip
    finally:
        db.close()
    root = results_dir(results)
    df["path"] = [str(root / "runs" / r) for r in df["run_id"]]
    now = time.time()
    df["stale"] = [row["status"] == "running" and is_stale(row, now) for row in df.to_dict("records")]
    df["grid"] = df["grid"].map(lambda g: json.loads(g) if isinstance(g, str) else {})
    return df


def load_metrics(results=None, study: str | None = None, run_ids: Iterable[str] | None = None,
                 unpublished: bool = False, columns: Iterable[str] | None = None) -> pd.DataFrame:  # fmt: skip
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


def _read_parquets(files: list[tuple[str, Path]], want: set[str] | None, last: bool = False) -> tuple[pd.DataFrame | None, list[dict]]:
    """``(run_id, metrics.parquet)`` pairs -> one frame of the ``want`` columns (all if None), and the issues.

    With ``last``, one row per file: DuckDB's ``arg_max(x, step)`` skips nulls, so it is the
    last value each metric was logged with, as ``_last``.
    """
    import duckdb
    import numpy as np

    if not files:
        return None, []
    con = duckdb.connect(":memory:")
    try:
        sel = "*" if want is None else "COLUMNS(lambda c: list_contains($want, c))"
        args = {"paths": [str(p) for _, p in files], **({} if want is None else {"want": sorted(want)})}
        src = f"SELECT file_index, {sel} FROM read_parquet($paths, union_by_name = true)"
        if last:
            src = (f"SELECT file_index, max(step) AS step, arg_max(COLUMNS(lambda c: c NOT IN ('file_index', 'step')), step)"
                   f" FROM ({src}) GROUP BY file_index ORDER BY file_index")  # fmt: skip
        df = con.execute(src, args).df()
    except Exception:  # noqa: BLE001  a damaged file fails the whole scan: read them one by one
        return _read_parquets_one_by_one(files, want, last)
    finally:
        con.close()
    ids = np.array([rid for rid, _ in files], dtype=object)
    df.insert(0, "run_id", pd.Series(ids[df.pop("file_index").to_numpy()], dtype=object))
    return df, []


def _read_parquets_one_by_one(files, want, last: bool = False) -> tuple[pd.DataFrame | None, list[dict]]:
    import pyarrow.parquet as pq

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
    import duckdb

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


# -- the loader, continued: a run's other files, metric names, report verdicts ----------------------


def metric_names(results=None, study: str | None = None) -> list[str]:
    """Every metric name the runs of ``study`` logged (published, and in progress), sorted.

    Reads parquet footers only, one run per config up to the seed (seeds of one config log
    the same metrics), and the ``metrics.jsonl`` of unpublished runs. Damaged files are
    skipped here (every footer is then read) and reported by ``load_metrics``.
    """
    import duckdb
    import pyarrow.parquet as pq

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
            names.update(n for (n,) in con.execute("SELECT DISTINCT name FROM parquet_schema($p)", {"p": paths}).fetchall())
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
    return {"path": str(d), "config": config, "status": read_status(d), "progress": read_progress(d),
            "samples": pd.DataFrame.from_records(rows) if rows else None, "error": error}  # fmt: skip


VERDICTS = "verdicts.json"  # <results>/reports/<study>/verdicts.json, written by `workbench report STUDY`


def load_verdicts(results=None) -> pd.DataFrame:
    """One row per (study, claim) of every report under ``<results>/reports/<study>/``.

    Reads ``verdicts.json`` as ``workbench.analysis.report`` writes it: ``{"study", "claims",
    "verdicts": {claim: verdict}, "rules": [{"claim", "metric", "statement", "verdict",
    "estimate", "ci_low", "ci_high", "n", "figure", ...}], "report": {"pdf", "html", "md"}}``
    (paths relative to its folder). Columns: study, claim, verdict; the deciding rule's
    summary (statement), metric, value, ci_low, ci_high, figure (absolute path); rules (every
    rule of the claim, figure paths absolute); report (the PDF, else HTML, else Markdown);
    generated_at (the file's time, ISO); path. A file that cannot be read is reported in
    ``df.attrs["issues"]`` (path, problem) and skipped.
    """
    import datetime

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
        report = next((here(files[k]) for k in ("pdf", "html", "md", "file") if files.get(k) and (f.parent / files[k]).exists()), None)
        when = datetime.datetime.fromtimestamp(f.stat().st_mtime, datetime.timezone.utc).isoformat(timespec="seconds")
        for claim, verdict in verdicts.items():
            mine = [{**r, "figure": here(r.get("figure"))} for r in rules if r.get("claim") == claim]
            decided = next((r for r in mine if r.get("verdict") == verdict), mine[0] if mine else {})
            rows.append({
                "study": doc.get("study", f.parent.name), "claim": claim, "verdict": verdict,
                "summary": decided.get("statement") or "", "metric": decided.get("metric"), "value": decided.get("estimate"),
                "ci_low": decided.get("ci_low"), "ci_high": decided.get("ci_high"), "figure": decided.get("figure"),
                "rules": mine, "report": report, "generated_at": when, "path": str(f),
            })  # fmt: skip
    cols = ["study", "claim", "verdict", "summary", "metric", "value", "ci_low", "ci_high", "figure", "rules", "report",
            "generated_at", "path"]  # fmt: skip
    df = pd.DataFrame(rows, columns=cols)
    df.attrs["issues"] = issues
    return df


def load_credit(results=None, study: str | None = None, run_ids: Iterable[str] | None = None) -> pd.DataFrame:
    """The in-training credit-assignment records (``credit.jsonl``) of many runs, one row per (run, probe step, position).

    Columns: run_id, step, method, position, decisive, method_abs, exact_abs, method_mean,
    exact_mean, corr, mse, share, share_exact (``workbench.probe.Prober``). A running run's
    half-written last line is dropped; a corrupt file is reported in ``df.attrs["issues"]``.
    """
    runs = load_runs(results, study).drop_duplicates("run_id")
    if run_ids is not None:
        runs = runs[runs["run_id"].isin(set(run_ids))]
    records, issues = [], []
    for r in runs.to_dict("records"):
        path = Path(r["path"]) / "credit.jsonl"
        if r["status"] == "queued" or not path.exists():
            continue
        rows, problem = _read_jsonl(path)
        if problem and not (problem.startswith("truncated") and r["status"] == "running"):
            issues.append({"run_id": r["run_id"], "path": str(path), "problem": problem})
            continue
        rid = r["run_id"]
        for row in rows:
            row["run_id"] = rid
        records += rows
    df = pd.DataFrame.from_records(records) if records else pd.DataFrame(columns=["run_id", "step", "method", "position"])
    df = df[["run_id", *[c for c in df.columns if c != "run_id"]]]
    df.attrs["issues"] = issues
    return df


def load_probes(results=None, what: str = "gradients", study: str | None = None) -> pd.DataFrame:
    """The checkpoint probes (``probe_<what>.parquet``, ``workbench probe --what``) of a study's runs, with ``run_id``.

    A damaged file is reported in ``df.attrs["issues"]`` and skipped.
    """
    import pyarrow.parquet as pq

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


POLICY = "policy.npy"  # a run's final policy on an enumerable task: log pi(y|x), (P eval prompts, N completions)


def publish_policy(run_dir: str | os.PathLike, logp) -> Path:
    """Write a run's final exact log-probabilities ``(P, N)`` (float32) to ``policy.npy``, atomically."""
    import numpy as np

    arr = np.asarray(logp, dtype=np.float32)
    return publish(Path(run_dir) / POLICY, lambda f: np.save(f, arr))


def load_policies(results=None, run_ids: Iterable[str] = ()) -> dict:
    """``{run_id: log pi (P, N) float array}`` for the runs that wrote ``policy.npy``; others are left out."""
    import numpy as np

    root = results_dir(results) / "runs"
    out = {}
    for rid in run_ids:
        try:
            out[rid] = np.load(root / rid / POLICY)
        except (OSError, ValueError):
            continue
    return out
