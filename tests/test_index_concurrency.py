"""Several processes opening one fresh results index at once (the `database is locked` CI flake).

A brand-new ``index.sqlite`` is in rollback mode; ``PRAGMA journal_mode=WAL`` then writes its
header, upgrading a read transaction to a write one, and SQLite fails that upgrade at once with
SQLITE_BUSY (no busy handler) while another connection holds the write lock: two ``workbench run``
processes starting together on one fresh folder. ``_connect`` must wait like every other lock.
"""

import multiprocessing as mp
import sqlite3
import threading
import time

import pytest

from workbench.results import index
from workbench.results.index import Owner, Store, _connect, ensure_index, spec_hash


def _hold_write_lock(path, seconds: float, started: threading.Event) -> threading.Thread:
    """Another connection holding the write lock (RESERVED) of ``path`` for ``seconds``: what a
    process half-way through switching the new file to WAL holds."""

    def hold():
        db = sqlite3.connect(path, isolation_level=None, timeout=0)
        db.execute("BEGIN IMMEDIATE")
        started.set()
        time.sleep(seconds)
        db.execute("ROLLBACK")
        db.close()

    t = threading.Thread(target=hold)
    t.start()
    assert started.wait(5)
    return t


def test_a_new_index_waits_for_the_write_lock_instead_of_failing_at_once(tmp_path):
    path = tmp_path / "index.sqlite"
    holder = _hold_write_lock(path, 0.6, threading.Event())
    t0 = time.perf_counter()
    try:
        db = _connect(path)  # before the fix: 'database is locked' after 0.0 s, the 30 s busy timeout unused
    finally:
        holder.join()
    waited = time.perf_counter() - t0
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA busy_timeout").fetchone()[0] == index.BUSY_TIMEOUT_MS
    finally:
        db.close()
    assert 0.4 < waited < 10, waited  # it waited for the lock, and not for the whole busy timeout


def test_a_lock_held_past_the_busy_timeout_is_still_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(index, "BUSY_TIMEOUT_MS", 300)
    path = tmp_path / "index.sqlite"
    holder = _hold_write_lock(path, 2.0, threading.Event())
    t0 = time.perf_counter()
    try:
        with pytest.raises(sqlite3.OperationalError, match="database is locked"):
            _connect(path)
        waited = time.perf_counter() - t0
    finally:
        holder.join()
    assert 0.25 < waited < 1.9, waited  # waited out the (shortened) timeout, then gave up


def test_other_errors_are_not_retried(tmp_path):
    path = tmp_path / "index.sqlite"
    path.write_bytes(b"not a database at all, " * 100)
    t0 = time.perf_counter()
    with pytest.raises(sqlite3.DatabaseError, match="not a database"):
        _connect(path)
    assert time.perf_counter() - t0 < 1.0


def _runner(root, barrier, queue, n_runs: int) -> None:
    """A `workbench run`'s start-up and index traffic: check, open, register, claim, finish."""
    try:
        barrier.wait()
        ensure_index(root)
        with Store(root) as store:
            runs = [
                dict(
                    run_id=f"r{i}",
                    task="t",
                    algo="a",
                    seed=i,
                    steps=1,
                    unit="u",
                    config={},
                    task_label="t",
                    algo_label="a",
                    grid={},
                )
                for i in range(n_runs)
            ]
            store.register_study("s", "s.toml", "", [], spec_hash(r["run_id"] for r in runs), runs)
            owner = Owner.current()
            store.states(r["run_id"] for r in runs)
            for r in runs:
                if store.claim(r["run_id"], owner) == "claimed":
                    store.heartbeat(owner)
                    assert store.finish(r["run_id"], owner, "done", 1, 1)
        queue.put(None)
    except BaseException as e:  # noqa: BLE001  (reported to the test)
        queue.put(f"{type(e).__name__}: {e}")


def test_processes_opening_one_fresh_results_folder_at_once_all_succeed(tmp_path):
    ctx = mp.get_context("fork")  # (a fork starts in milliseconds: the processes meet at the barrier)
    n_procs, n_runs = 4, 3
    for rep in range(6):
        root = tmp_path / f"results{rep}"
        barrier, queue = ctx.Barrier(n_procs), ctx.Queue()
        procs = [ctx.Process(target=_runner, args=(root, barrier, queue, n_runs)) for _ in range(n_procs)]
        for p in procs:
            p.start()
        errors = [e for e in (queue.get(timeout=60) for _ in procs) if e]
        for p in procs:
            p.join(60)
        assert not errors, errors
        with sqlite3.connect(root / "index.sqlite") as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            events = db.execute("SELECT run_id, owner, event FROM events ORDER BY id").fetchall()
            done = db.execute("SELECT count(*) FROM runs WHERE status='done'").fetchone()[0]
        assert done == n_runs
        for i in range(n_runs):  # (these runs publish no files: a runner finding one done, not busy, takes it again)
            seen = [(owner, event) for rid, owner, event in events if rid == f"r{i}"]
            assert 1 <= len(seen) // 2 <= n_procs and [e for _, e in seen] == ["claimed", "done"] * (len(seen) // 2)
            assert all(seen[k][0] == seen[k + 1][0] for k in range(0, len(seen), 2)), seen  # never held by two
