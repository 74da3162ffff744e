"""The SQLite index of a results folder: studies, runs, claims and leases, and its repair.

Owns ``<results>/index.sqlite`` (WAL mode; the tables in ``_SCHEMA``), ``Store`` (the one
writer: ``register_study``, ``claim``, ``heartbeat``, ``finish``, ``release``), the owners of
claims (``Owner``, ``Heartbeat``, ``pid_alive``, ``is_stale``) and a damaged index's repair
(``index_problem``, ``ensure_index``, ``repair_index``, ``rebuild_index``).

A run's status lives here: ``queued -> running -> done | diverged | failed``. ``register_study``
also writes the study's plan manifest, ``<results>/studies/<study>.plan.json`` (its arguments),
from which ``rebuild_index`` registers the study again without re-expanding its study file.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import sqlite3
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from .files import (
    FINISHED,
    INDEX,
    StoreFault,
    _keep_reserve,
    consumption,
    file_mode,
    free_reserve,
    publish_text,
    published,
    results_dir,
    storage_fault,
)

STATUSES = ("queued", "running", "done", "failed", "diverged")
HEARTBEAT_S = 5.0  # how often an owner refreshes the heartbeat of the runs it holds
LEASE_S = 60.0  # a 'running' run whose heartbeat is older than this is reclaimed
BUSY_TIMEOUT_MS = 30_000
_JITTER = random.Random()  # its own generator: the global one is left alone (seeded code may use it)

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


def spec_hash(run_ids: Iterable[str]) -> str:
    """A study's ``spec_hash``: the hash of its sorted run ids."""
    return hashlib.sha256(json.dumps(sorted(run_ids)).encode()).hexdigest()[:16]


# -- a study's plan manifest: the arguments of ``Store.register_study`` ------------------------------

PLAN_SUFFIX = ".plan.json"  # <results>/studies/<study>.plan.json
PLAN_KEYS = ("name", "path", "description", "claims", "spec_hash", "runs")
_RUN_KEYS = ("run_id", "task", "algo", "seed", "steps", "unit", "config", "task_label", "algo_label", "grid")


def plan_path(results, name: str) -> Path:
    """Where ``register_study`` writes study ``name``'s plan manifest."""
    return results_dir(results) / "studies" / f"{name}{PLAN_SUFFIX}"


def _check_plan(args) -> None:
    """``ValueError`` (one line) unless ``args`` holds the arguments of ``register_study``."""
    if not isinstance(args, dict):
        raise ValueError(f"a plan is an object of {', '.join(PLAN_KEYS)}, not {type(args).__name__}")
    missing = [k for k in PLAN_KEYS if k not in args]
    if missing:
        raise ValueError(f"the plan has no {', '.join(missing)}")
    if not isinstance(args["runs"], list) or not all(isinstance(r, dict) for r in args["runs"]):
        raise ValueError("the plan's runs are not a list of objects")
    for i, r in enumerate(args["runs"]):
        lacking = [k for k in _RUN_KEYS if k not in r]
        if lacking:
            raise ValueError(f"runs[{i}] has no {', '.join(lacking)}")


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


def ensure_index(
    results=None,
    legacy: Callable[[Path], dict] | None = None,
    unit_of: Callable[[str], str | None] | None = None,
) -> str | None:
    """Check the index (again whenever its file changed); a damaged one is set aside and rebuilt.

    Returns the one-line notice of a rebuild (``repair_index``, given ``legacy`` and ``unit_of``), else ``None``.
    """
    path = results_dir(results) / INDEX
    try:
        sig = _signature(path)
    except FileNotFoundError:
        return None
    if _CHECKED.get(str(path)) == sig:
        return None
    problem = index_problem(path)
    notice = repair_index(results, problem, legacy, unit_of) if problem is not None else None
    with suppress(OSError):
        _CHECKED[str(path)] = _signature(path)
    return notice


def _ensure_index_warn(results) -> None:
    notice = ensure_index(results)
    if notice:
        warnings.warn(notice, IndexRepaired, stacklevel=3)


@contextmanager
def _repair_lock(root: Path):
    import fcntl  # POSIX only

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


def repair_index(
    results,
    problem: str,
    legacy: Callable[[Path], dict] | None = None,
    unit_of: Callable[[str], str | None] | None = None,
) -> str | None:
    """Move the damaged index (and its -wal, -shm) aside as ``index.sqlite.corrupt-<time>`` and rebuild it.

    Returns a one-line notice of what happened, or ``None`` when another process had already
    rebuilt it. The rebuild reads the plan manifests (``studies/*.plan.json``) and the run
    folders (``rebuild_index``, which ``legacy`` and ``unit_of`` are passed to).
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
        done = rebuild_index(root, legacy, unit_of)
    skipped = f"; left out: {'; '.join(done['skipped'])}" if done["skipped"] else ""
    return (
        f"the results index {path} was damaged ({problem}); set it aside as {aside.name} and rebuilt it from "
        f"{done['studies']} study file(s) and {done['folders']} run folder(s) "
        f"in {time.perf_counter() - t0:.1f} s{skipped}"
    )


def rebuild_index(
    results,
    legacy: Callable[[Path], dict] | None = None,
    unit_of: Callable[[str], str | None] | None = None,
) -> dict:
    """Fill an index from what the results folder holds (the index must not exist yet).

    Studies from their plan manifests (``studies/<study>.plan.json``, written by
    ``Store.register_study``: its arguments). A study file ``studies/<study>.toml`` without a
    manifest (results from before manifests) is registered from ``legacy(path)`` when given: the
    arguments of ``register_study`` as a dict, or ``ValueError`` with a one-line reason; without
    ``legacy`` it is left out (named in ``skipped``). Runs from their folders: published ones
    are done / diverged with the ``step`` and ``samples`` they logged, ones with ``error.txt``
    failed, others (killed) queued; run folders of no study are added without one, their
    ``unit`` ``unit_of(algo)`` (``None`` without ``unit_of``). Returns counts: ``studies``,
    ``runs``, ``folders``, and ``skipped`` (lines naming what could not be read).
    """
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
        studies = root / "studies"
        manifests = {f.name[: -len(PLAN_SUFFIX)]: f for f in studies.glob(f"*{PLAN_SUFFIX}")}
        copies = {f.stem: f for f in studies.glob("*.toml")}
        for name in sorted(set(manifests) | set(copies)):
            if name in manifests:
                f = manifests[name]
                try:
                    args = json.loads(f.read_text())
                    _check_plan(args)
                except (OSError, ValueError) as e:
                    out["skipped"].append(f"{f.name}: unreadable ({str(e).strip().splitlines()[-1].strip()})")
                    continue
            else:
                f = copies[name]
                if legacy is None:
                    out["skipped"].append(
                        f"{f.name}: no plan manifest (written before {PLAN_SUFFIX} files), not re-expanded here"
                        " (the workbench command line re-expands it; `workbench run` on the study registers it again)"
                    )
                    continue
                try:
                    args = legacy(f)
                    _check_plan(args)
                except ValueError as e:
                    out["skipped"].append(f"{f.name}: {str(e).strip().splitlines()[-1].strip()}")
                    continue
            store.register_study(**{k: args[k] for k in PLAN_KEYS})
            known.update(r["run_id"] for r in args["runs"])
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
                unit = unit_of(algo) if unit_of is not None else None
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


def _is_busy(e: BaseException) -> bool:
    """SQLite's 'database is locked' (SQLITE_BUSY and its extended codes)."""
    code = getattr(e, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF == 5
    return "database is locked" in str(e)


def _to_wal(db: sqlite3.Connection) -> None:
    """``PRAGMA journal_mode=WAL``, waiting up to ``BUSY_TIMEOUT_MS`` for the lock it needs.

    On an index already in WAL mode it writes nothing. On a brand-new index file (rollback mode)
    it writes the file's header: a read transaction upgraded to a write one, and SQLite fails that
    upgrade at once with SQLITE_BUSY, without calling the busy handler (waiting there could
    deadlock), while another connection holds the write lock. Two ``workbench run`` processes
    starting on one fresh results folder do exactly that: both switch the new file to WAL at once,
    and the loser stopped with 'database is locked'. Its statement rolled back and released its
    read lock, so the winner finishes the switch; here the loser tries again (which then finds WAL
    mode and writes nothing) until the busy timeout has passed, then raises SQLite's error.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    delay = 0.002
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if not _is_busy(e) or time.monotonic() >= deadline:
                raise
        time.sleep(min(delay * _JITTER.uniform(0.5, 1.5), max(0.0, deadline - time.monotonic())))
        delay = min(2 * delay, 0.05)


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
    try:
        db.row_factory = sqlite3.Row
        db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        _to_wal(db)
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
    """Writes to a results folder: run folders and the index. Readers use ``workbench.results.loader``."""

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
        algo_label, grid (dict). The arguments are first written, atomically, to the study's plan
        manifest ``studies/<name>.plan.json`` (``plan_path``), from which ``rebuild_index``
        registers the study again.
        """
        plan = {"name": name, "path": path, "description": description, "claims": list(claims)}
        plan |= {"spec_hash": spec_hash, "runs": runs}
        manifest = plan_path(self.root, name)
        try:
            manifest.parent.mkdir(parents=True, exist_ok=True)
            publish_text(manifest, json.dumps(plan, indent=1) + "\n")  # (unsorted: grid keys keep study order)
        except OSError as e:
            fault = storage_fault(e, manifest)
            if fault is None:
                raise
            raise fault from e
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
