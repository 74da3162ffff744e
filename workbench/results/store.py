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

import errno
import hashlib
import json
import os
import socket
import sqlite3
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO

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


# -- faults of the storage: full disk, read-only folder, no permission -----------------------------

# errors that are the storage's, not the run's: anywhere, and (permissions) inside the results folder
_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
_PERMISSION_ERRNOS = {errno.EACCES, errno.EPERM}
# SQLite primary result codes: PERM, READONLY, IOERR, FULL, CANTOPEN
_SQLITE_STORAGE = {3, 8, 10, 13, 14}
_SQLITE_STORAGE_WORDS = ("disk is full", "readonly database", "unable to open database", "disk i/o error")


class StoreFault(Exception):
    """The results folder cannot be written: a full disk, a read-only folder, no permission.

    ``str()`` is one line naming the path. Nothing is lost: what was written stays, the runs
    in flight are released, and ``workbench run`` resumes once the space or permission is back.
    """

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"cannot write {self.path}: {reason}")


def storage_fault(exc: BaseException, path=None, root=None) -> StoreFault | None:
    """``exc`` as a ``StoreFault`` when the storage is at fault (it, or what it was raised from), else ``None``.

    A full disk, a quota, a read-only file system: anywhere. No permission (EACCES, EPERM):
    where ``root`` is given, only for a path inside it (a checkpoint the run cannot read is
    the run's problem). SQLite's full / read-only / cannot-open / I/O errors name ``path``.
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, StoreFault):
            return e
        if isinstance(e, OSError) and (e.errno in _SPACE_ERRNOS or e.errno in _PERMISSION_ERRNOS):
            where = e.filename if e.filename is not None else path
            inside = root is None or where is None or _inside(where, root)
            if e.errno in _SPACE_ERRNOS or inside:
                return StoreFault(where if where is not None else "?", e.strerror or str(e))
        if isinstance(e, sqlite3.OperationalError):
            code = getattr(e, "sqlite_errorcode", None)
            if (code is not None and code & 0xFF in _SQLITE_STORAGE) or any(
                w in str(e).lower() for w in _SQLITE_STORAGE_WORDS
            ):
                return StoreFault(path if path is not None else INDEX, str(e))
        e = e.__cause__ or e.__context__
    text = " ".join(str(x) for x in (exc, exc.__cause__, exc.__context__) if x is not None)
    for words in _SPACE_WORDS:  # errors that carry the OS error as text only (safetensors, torch's writers)
        if words in text:
            return StoreFault(path if path is not None else "?", words)
    return None


_SPACE_WORDS = ("No space left on device", "Disk quota exceeded", "Read-only file system")


def _inside(path, root) -> bool:
    try:
        Path(os.path.abspath(path)).relative_to(os.path.abspath(root))
        return True
    except (ValueError, TypeError):
        return False


RESERVE = ".reserve"  # <results>/.reserve: space kept back so that a full disk still lets a runner release its runs
RESERVE_BYTES = 256 * 1024


def _keep_reserve(root: Path) -> None:
    """Write the reserve file if it is missing (quietly: no space is no reason to stop here)."""
    path = root / RESERVE
    if path.exists():
        return
    try:
        with open(path, "wb") as f:
            f.write(b"\0" * RESERVE_BYTES)
    except OSError:
        path.unlink(missing_ok=True)


def free_reserve(results) -> bool:
    """Delete the reserve file (a full disk: the index can then record releases). Returns whether there was one."""
    try:
        (results_dir(results) / RESERVE).unlink()
        return True
    except OSError:
        return False


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


def file_mode() -> int:
    """The mode ``open()`` gives a new file: 0666 less the process umask (read without changing it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)  # no /proc: the only portable way to read it is to set it
    os.umask(umask)
    return 0o666 & ~umask


def publish(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` so that readers see the old file or the whole new one, never a part.

    ``write(f)`` fills a temporary file in the same folder; it is fsynced, the folder is
    fsynced, ``os.replace`` moves it into place and the folder is fsynced again.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())  # mkstemp makes it 0600; published files read like their neighbours
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


def published(run_dir: str | os.PathLike, verify: bool = False) -> dict | None:
    """``status.json`` of a run that has finished and published its metrics, else ``None``.

    With ``verify``, ``metrics.parquet`` must also read whole; one that does not is
    published again from ``metrics.jsonl`` when that file is complete (``republished`` is
    then set in the returned dict), else the run counts as unpublished (it is run again).
    """
    run_dir = Path(run_dir)
    st = read_status(run_dir)
    if not (st and st.get("status") in FINISHED and (run_dir / "metrics.parquet").exists()):
        return None
    if verify and not _parquet_reads(run_dir / "metrics.parquet"):
        rows, problem = _read_jsonl(run_dir / "metrics.jsonl")
        if problem or (st["status"] == "done" and (not rows or rows[-1].get("step") != st.get("step"))):
            return None  # not the whole record of the run: run it again
        try:
            publish_metrics(run_dir)
        except (ValueError, OSError) as e:  # metrics.jsonl damaged too (or the folder is not writable): run it again
            if storage_fault(e) is not None:
                raise
            return None
        if not _parquet_reads(run_dir / "metrics.parquet"):
            return None
        st = {**st, "republished": True}
    return st


def _parquet_reads(path: Path) -> bool:
    import pyarrow.parquet as pq

    try:
        pq.read_table(path)
        return True
    except Exception:  # noqa: BLE001  pyarrow raises ArrowInvalid, OSError, ... on a damaged file
        return False


def consumption(run_dir: str | os.PathLike) -> tuple[int | None, int | None]:
    """``(step, samples)`` of the last complete row a run logged (``metrics.jsonl``, else ``metrics.parquet``)."""
    run_dir = Path(run_dir)
    row = read_progress(run_dir)
    if row is None and (run_dir / "metrics.parquet").exists():
        import pyarrow.parquet as pq

        try:
            t = pq.read_table(run_dir / "metrics.parquet", columns=["step", "samples"]).to_pylist()
            row = t[-1] if t else None
        except Exception:  # noqa: BLE001
            row = None
    if not row:
        return None, None
    as_int = lambda v: int(v) if isinstance(v, (int, float)) and v == v else None  # noqa: E731
    return as_int(row.get("step")), as_int(row.get("samples"))


# -- the index --------------------------------------------------------------------------------


def spec_hash(run_ids: Iterable[str]) -> str:
    """A study's ``spec_hash``: the hash of its sorted run ids."""
    return hashlib.sha256(json.dumps(sorted(run_ids)).encode()).hexdigest()[:16]


# -- a damaged index: detected, set aside, rebuilt from the run folders -----------------------------


class IndexRepaired(UserWarning):
    """The index was damaged; it was set aside (``index.sqlite.corrupt-<time>``) and rebuilt."""


def _is_corrupt(e: BaseException) -> bool:
    """SQLite's 'database disk image is malformed' (SQLITE_CORRUPT) or 'file is not a database' (SQLITE_NOTADB)."""
    if not isinstance(e, sqlite3.DatabaseError):
        return False
    code = getattr(e, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (11, 26)
    return any(w in str(e).lower() for w in ("malformed", "not a database"))


def index_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with the index file at ``path`` (SQLite's ``quick_check``), or ``None``: sound or absent."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        db = _connect_reader(path)
        try:
            rows = [str(r[0]) for r in db.execute("PRAGMA quick_check").fetchall()]
        finally:
            db.close()
    except sqlite3.DatabaseError as e:
        if _is_corrupt(e):
            return str(e)
        raise
    return None if rows == ["ok"] else "; ".join(rows[:2])


_CHECKED: dict[str, tuple] = {}  # index path -> (inode, size, mtime) when last found sound by this process


def _signature(path: Path) -> tuple:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


def ensure_index(results=None) -> str | None:
    """Check the index (again whenever its file changed); a damaged one is set aside and rebuilt.

    Returns the one-line notice of a rebuild (``repair_index``), else ``None``.
    """
    path = results_dir(results) / INDEX
    try:
        sig = _signature(path)
    except FileNotFoundError:
        return None
    if _CHECKED.get(str(path)) == sig:
        return None
    problem = index_problem(path)
    notice = repair_index(results, problem) if problem is not None else None
    with suppress(OSError):
        _CHECKED[str(path)] = _signature(path)
    return notice


def _ensure_index_warn(results) -> None:
    notice = ensure_index(results)
    if notice:
        warnings.warn(notice, IndexRepaired, stacklevel=3)


@contextmanager
def _repair_lock(root: Path):
    import fcntl

    try:
        fd = os.open(root / ".index.lock", os.O_RDWR | os.O_CREAT, file_mode())
    except OSError as e:
        raise StoreFault(
            root / ".index.lock", f"{e.strerror}; the damaged index {root / INDEX} cannot be rebuilt here"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def repair_index(results, problem: str) -> str | None:
    """Move the damaged index (and its -wal, -shm) aside as ``index.sqlite.corrupt-<time>`` and rebuild it.

    Returns a one-line notice of what happened, or ``None`` when another process had already
    rebuilt it. The rebuild reads the study copies (``studies/*.toml``) and the run folders
    (``rebuild_index``).
    """
    root = results_dir(results)
    path = root / INDEX
    t0 = time.perf_counter()
    with _repair_lock(root):
        if path.exists() and index_problem(path) is None:
            return None  # rebuilt meanwhile by another process
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside, n = root / f"{INDEX}.corrupt-{stamp}", 1
        while aside.exists():
            aside, n = root / f"{INDEX}.corrupt-{stamp}-{n}", n + 1
        for suffix in ("-wal", "-shm", ""):  # a stale -wal next to a new index would be replayed into it
            src = Path(f"{path}{suffix}")
            if src.exists():
                os.replace(src, Path(f"{aside}{suffix}"))
        done = rebuild_index(root)
    skipped = f"; left out: {'; '.join(done['skipped'])}" if done["skipped"] else ""
    return (
        f"the results index {path} was damaged ({problem}); set it aside as {aside.name} and rebuilt it from "
        f"{done['studies']} study file(s) and {done['folders']} run folder(s) "
        f"in {time.perf_counter() - t0:.1f} s{skipped}"
    )


def rebuild_index(results) -> dict:
    """Fill an index from what the results folder holds (the index must not exist yet).

    Studies from their copies in ``studies/*.toml`` (expanded on the device, auto, cpu or
    cuda, that matches the most run folders); runs from their folders: published ones are
    done / diverged with the ``step`` and ``samples`` they logged, ones with ``error.txt``
    failed, others (killed) queued; run folders of no study are added without one. Returns
    counts: ``studies``, ``runs``, ``folders``, and ``skipped`` (lines naming what could not be read).
    """
    from ..config import ConfigError
    from ..registry import ALGORITHMS
    from ..studies.study import consumption_unit, expand, load_study

    root = results_dir(results)
    runs_dir = root / "runs"
    folders = (
        {d.name for d in runs_dir.iterdir() if d.is_dir() and not d.name.startswith(".")}
        if runs_dir.is_dir()
        else set()
    )
    out: dict = {"studies": 0, "runs": 0, "folders": len(folders), "skipped": []}
    with Store(root) as store:
        known: set[str] = set()
        for f in sorted((root / "studies").glob("*.toml")):
            best = None
            try:
                study = load_study(f)
                for device in ("auto", "cpu", "cuda"):
                    try:
                        plan = expand(study, device)
                    except ConfigError:
                        continue
                    hits = sum(p.run_id in folders for p in plan)
                    if best is None or hits > best[0]:
                        best = (hits, plan)
            except ConfigError as e:
                out["skipped"].append(f"{f.name}: {str(e).strip().splitlines()[-1].strip()}")
                continue
            if best is None:
                out["skipped"].append(f"{f.name}: its runs do not resolve")
                continue
            plan = best[1]
            cfg = study.config
            store.register_study(
                study.name,
                str(f),
                cfg.description,
                list(cfg.claims),
                spec_hash(p.run_id for p in plan),
                [p.record() for p in plan],
            )
            known.update(p.run_id for p in plan)
            out["studies"] += 1
        now = time.time()
        with store._tx() as db:
            for rid in sorted(folders - known):  # a run folder of no study (its study file is gone)
                try:
                    c = json.loads((runs_dir / rid / "config.json").read_text())["config"]
                    task, algo, seed, steps = c["task"]["name"], c["algo"]["name"], c["seed"], c["steps"]
                except (OSError, ValueError, KeyError, TypeError):
                    out["skipped"].append(f"runs/{rid}: no readable config.json")
                    continue
                unit = consumption_unit(ALGORITHMS[algo]) if algo in ALGORITHMS else None
                db.execute(
                    "INSERT OR IGNORE INTO runs(run_id, task, algo, seed, steps, unit, config, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (rid, task, algo, seed, steps, unit, json.dumps(c, sort_keys=True), now),
                )
            for (rid,) in db.execute("SELECT run_id FROM runs").fetchall():
                out["runs"] += 1
                d = runs_dir / rid
                if rid not in folders:
                    continue  # never started: queued
                st = published(d)
                step, samples = consumption(d)
                if st is not None:
                    status, reason, step = st["status"], st.get("reason"), st.get("step", step)
                elif (d / "error.txt").exists():
                    status, reason = "failed", _last_line(d / "error.txt")
                else:  # started and killed: trained again from scratch by the next run
                    status, reason, step, samples = "queued", None, None, None
                db.execute(
                    "UPDATE runs SET status=?, step=?, samples=?, reason=?, attempts=1, finished_at=? WHERE run_id=?",
                    (status, step, samples, reason, None if status == "queued" else now, rid),
                )
                store._event(db, rid, None, "rebuilt", status)
    return out


def _last_line(path: Path) -> str:
    try:
        lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return lines[-1].strip()[:500] if lines else ""


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
    try:
        db.row_factory = sqlite3.Row
        db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a committed transaction survives a killed process
    except BaseException:
        db.close()
        raise
    return db


def _connect_reader(path: Path) -> sqlite3.Connection:
    """``_connect``, or where SQLite cannot open it for reading because the folder is read-only (a WAL
    index needs its -shm file, which it cannot create there), the file as immutable: read as it is."""
    try:
        return _connect(path)
    except sqlite3.OperationalError as e:
        code = getattr(e, "sqlite_errorcode", None)
        if not ((code is not None and code & 0xFF in (8, 14)) or "readonly" in str(e) or "unable to open" in str(e)):
            raise
    db = sqlite3.connect(Path(os.path.abspath(path)).as_uri() + "?immutable=1", uri=True, check_same_thread=False)
    db.row_factory = sqlite3.Row
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
        try:
            if create:
                (self.root / "runs").mkdir(parents=True, exist_ok=True)
                (self.root / "studies").mkdir(exist_ok=True)
                _keep_reserve(self.root)
            elif not (self.root / INDEX).exists():
                raise FileNotFoundError(f"no results index at {self.root / INDEX}")
            _ensure_index_warn(self.root)
            self.db = _connect(self.root / INDEX)
        except (OSError, sqlite3.OperationalError) as e:
            fault = storage_fault(e, self.root / INDEX)
            if fault is None:
                raise
            raise fault from e
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
        """A write transaction that takes the write lock up front (no lock upgrade deadlocks).

        A full disk or a read-only index raises ``StoreFault`` (the transaction rolled back).
        """
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:  # (a failed COMMIT leaves it open)
                    with suppress(sqlite3.Error):
                        self.db.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as e:
            fault = storage_fault(e, self.root / INDEX)
            if fault is None:
                raise
            raise fault from e

    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    def _event(self, db, run_id: str, owner: str | None, event: str, detail: str = "") -> None:
        db.execute(
            "INSERT INTO events(at, run_id, owner, event, detail) VALUES (?, ?, ?, ?, ?)",
            (time.time(), run_id, owner, event, detail),
        )

    # -- studies ----------------------------------------------------------------------------
    def register_study(
        self, name: str, path: str, description: str, claims: list[str], spec_hash: str, runs: list[dict]
    ) -> None:
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
                    (
                        r["run_id"],
                        r["task"],
                        r["algo"],
                        r["seed"],
                        r["steps"],
                        r["unit"],
                        json.dumps(r["config"], sort_keys=True),
                        now,
                    ),
                )
                db.execute(
                    "INSERT INTO study_runs(study, run_id, position, task_label, algo_label, grid) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        name,
                        r["run_id"],
                        i,
                        r["task_label"],
                        r["algo_label"],
                        json.dumps(r["grid"]),
                    ),  # keys in study order
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
        - ``"recovered"``: a previous attempt had published it (or its unreadable
          ``metrics.parquet`` was just published again from ``metrics.jsonl``); the index now says so;
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
            if status == "running":
                if not is_stale(row, now, lease_s):
                    return "busy"
                detail = f"reclaimed from {row['owner']}"
            st = published(run_dir, verify=True)  # an unreadable metrics.parquet is published again, or the run redone
            if status in FINISHED and st is not None and not st.get("republished"):
                return "finished"
            if status == "failed" and expected_attempts is not None and row["attempts"] != expected_attempts:
                return "failed"
            if st is not None:  # killed after publishing, before the index heard of it (or its parquet republished)
                samples = consumption(run_dir)[1]
                db.execute(
                    "UPDATE runs SET status=?, step=?, samples=?, reason=?, owner=NULL, finished_at=? WHERE run_id=?",
                    (st["status"], st.get("step"), samples, st.get("reason"), now, run_id),
                )
                self._event(db, run_id, owner.id, "republished" if st.get("republished") else "recovered", st["status"])
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
        cur = self.db.execute(
            "UPDATE runs SET heartbeat_at=? WHERE owner=? AND status='running'", (time.time(), owner.id)
        )
        return cur.rowcount

    def finish(
        self,
        run_id: str,
        owner: Owner,
        status: str,
        step: int | None = None,
        samples: int | None = None,
        reason: str | None = None,
    ) -> bool:
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

    def release_all(self, run_ids: Iterable[str], owner: Owner) -> list[str]:
        """``release`` each run, whatever fails; returns the ids it could not release.

        On a full disk the reserve file (``.reserve``) is deleted to make room and the
        release tried again. A run left 'running' here is reclaimed by the next runner anyway
        (its owner, this process, will be gone).
        """
        left = []
        for rid in run_ids:
            for attempt in range(2):
                try:
                    self.release(rid, owner)
                    break
                except (StoreFault, sqlite3.Error):
                    if attempt or not free_reserve(self.root):
                        left.append(rid)
                        break
        return left

    def release(self, run_id: str, owner: Owner) -> None:
        """Give a claimed run back (interrupted before it ended): it is 'queued' again."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE runs SET status='queued', owner=NULL WHERE run_id=? AND owner=? AND status='running'",
                (run_id, owner.id),
            )
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
        db = None
        try:
            while not self._stop.wait(self.interval):
                try:
                    db = db or Store(self.root, create=False)
                    db.heartbeat(self.owner)
                except (
                    sqlite3.Error,
                    OSError,
                    StoreFault,
                ) as e:  # a missed beat is not fatal; the lease is 12 beats long
                    if storage_fault(e) is None:  # (a full disk or read-only folder: the runner meets it and says so)
                        warnings.warn(f"heartbeat failed: {e}", RuntimeWarning, stacklevel=1)
        finally:
            if db is not None:
                db.close()


# -- the loader: every reader goes through these ------------------------------------------------


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
        report = next(
            (here(files[k]) for k in ("pdf", "html", "md", "file") if files.get(k) and (f.parent / files[k]).exists()),
            None,
        )
        when = datetime.datetime.fromtimestamp(f.stat().st_mtime, datetime.timezone.utc).isoformat(timespec="seconds")
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
