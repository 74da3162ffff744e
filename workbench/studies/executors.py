"""Where runs execute. The interface is what ``concurrent.futures`` offers, and no more:

    executor.max_workers                  how many runs may execute at once
    executor.submit(fn, *args) -> Future  run ``fn(*args)`` somewhere, later
    executor.map(fn, items) -> iterator   results in the order of ``items``
    executor.shutdown(wait, cancel_futures, kill)

``fn`` and its arguments must pickle (by reference for ``fn``): a distributed engine (Ray,
Dask, submitit) slots in by implementing these four names. The study runner keeps all
bookkeeping (claims, the index) on its side and only asks the executor to run
``workbench.studies.execute.execute_run(task)``.

- ``LocalProcessExecutor``: a pool of fresh processes, one process per run (nothing leaks
  from one run to the next: RNG state, thread settings, memory). Workers start from a
  fork server that has imported the heavy modules once, or by ``spawn`` where there is no
  fork server. A worker dies with its parent: a killed ``workbench run`` leaves no orphan
  training on.
- ``InlineExecutor``: runs ``fn`` in the calling process at ``submit`` (tests, debugging).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import threading
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from multiprocessing.connection import wait as mp_wait
from typing import Any, Protocol


class Executor(Protocol):
    max_workers: int

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Future: ...

    def map(self, fn: Callable[..., Any], items: Iterable[Any]) -> Iterator[Any]: ...

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False, kill: bool = False) -> None: ...


class WorkerError(RuntimeError):
    """``fn`` raised in the worker; the message carries the worker's traceback."""


class WorkerDied(RuntimeError):
    """The worker process ended without a result (killed, out of memory, a crash in C code)."""


class _MapMixin:
    def map(self, fn: Callable[..., Any], items: Iterable[Any]) -> Iterator[Any]:
        futures = [self.submit(fn, x) for x in items]
        return (f.result() for f in futures)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.shutdown(wait=True, cancel_futures=exc_type is not None, kill=exc_type is not None)


class InlineExecutor(_MapMixin):
    """Runs each submitted call immediately, in this process."""

    max_workers = 1

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Future:
        fut: Future = Future()
        fut.set_running_or_notify_cancel()
        try:
            fut.set_result(fn(*args))
        except Exception as e:  # the caller sees it through the future, as with a process
            fut.set_exception(e)
        return fut

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False, kill: bool = False) -> None:
        pass


class _Job:
    __slots__ = ("future", "proc", "conn", "alive", "message")

    def __init__(self, future, proc, conn, alive):
        self.future, self.proc, self.conn, self.alive, self.message = future, proc, conn, alive, None


class LocalProcessExecutor(_MapMixin):
    """Up to ``max_workers`` processes at once, a fresh one for every submitted call.

    ``start_method``: "forkserver" (default where available; ``preload`` names modules the
    server imports once, so each run starts without re-importing torch) or "spawn".
    """

    def __init__(self, max_workers: int = 1, start_method: str | None = None, preload: Sequence[str] = ()):
        methods = mp.get_all_start_methods()
        start_method = start_method or ("forkserver" if "forkserver" in methods else "spawn")
        self._ctx = mp.get_context(start_method)
        if start_method == "forkserver" and preload:
            self._ctx.set_forkserver_preload(list(preload))
        self.max_workers = max(1, int(max_workers))
        self._pending: deque[tuple[Future, Callable, tuple]] = deque()
        self._running: list[_Job] = []
        self._cv = threading.Condition()
        self._closing = False
        self._kill = False
        self._thread: threading.Thread | None = None

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Future:
        fut: Future = Future()
        with self._cv:
            if self._closing:
                raise RuntimeError("cannot submit after shutdown")
            self._pending.append((fut, fn, args))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="workbench-executor", daemon=True)
                self._thread.start()
            self._cv.notify_all()
        return fut

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False, kill: bool = False) -> None:
        with self._cv:
            self._closing = True
            if cancel_futures or kill:
                while self._pending:
                    self._pending.popleft()[0].cancel()
            if kill:
                self._kill = True
                for job in self._running:
                    job.proc.kill()
            self._cv.notify_all()
            thread = self._thread
        if wait and thread is not None:
            thread.join()

    # -- the dispatcher thread ----------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while self._pending and len(self._running) < self.max_workers and not self._kill:
                    fut, fn, args = self._pending.popleft()
                    if fut.set_running_or_notify_cancel():
                        self._running.append(self._start(fut, fn, args))
                if self._closing and not self._running and (self._kill or not self._pending):
                    return
                if not self._running:
                    self._cv.wait(0.5)
                    continue
                jobs = list(self._running)
            waitables = [j.proc.sentinel for j in jobs] + [j.conn for j in jobs if j.message is None]
            ready = set(mp_wait(waitables, timeout=0.5))
            for job in jobs:
                if job.message is None and (job.conn in ready or job.proc.sentinel in ready):
                    job.message = self._receive(job.conn)
                if job.proc.sentinel in ready:
                    self._reap(job)

    def _start(self, fut: Future, fn: Callable, args: tuple) -> _Job:
        recv, send = self._ctx.Pipe(duplex=False)  # the result, child -> parent
        alive_r, alive_w = self._ctx.Pipe(duplex=False)  # never written: EOF tells the child its parent is gone
        proc = self._ctx.Process(target=_child_main, args=(send, alive_r, fn, args), daemon=True, name="workbench-run")
        proc.start()
        send.close()
        alive_r.close()
        return _Job(fut, proc, recv, alive_w)

    @staticmethod
    def _receive(conn):
        try:
            return conn.recv() if conn.poll() else None
        except (EOFError, OSError):
            return ("died", None)

    def _reap(self, job: _Job) -> None:
        job.proc.join()
        if job.message in (None, ("died", None)):
            job.message = self._receive(job.conn) or ("died", None)
        job.conn.close()
        job.alive.close()
        kind, payload = job.message
        if kind == "ok":
            job.future.set_result(payload)
        elif kind == "err":
            job.future.set_exception(WorkerError(payload))
        else:
            code = job.proc.exitcode
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit status {code}"
            job.future.set_exception(WorkerDied(f"worker process {job.proc.pid} ended without a result ({how})"))
        with self._cv:
            self._running.remove(job)
            self._cv.notify_all()


def _child_main(conn, alive, fn: Callable, args: tuple) -> None:
    """In the worker: follow the parent into death, ignore Ctrl-C (the parent decides), run ``fn``."""
    _die_with_parent(alive)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        result = ("ok", fn(*args))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent as text
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        result = ("err", f"{type(e).__name__}: {e}\n\n{tb[-8000:]}")
    try:
        conn.send(result)
    finally:
        conn.close()


def _die_with_parent(alive) -> None:
    """Exit as soon as the parent dies, however it dies (SIGKILL included).

    The parent holds the only write end of ``alive`` and never writes: the read end turns
    readable (EOF) exactly when the parent is gone. (The parent pid is no guide: with a
    fork server the worker's parent is the server, which outlives a killed ``workbench run``
    while any worker lives.) PR_SET_PDEATHSIG adds an immediate kill on Linux.
    """
    try:
        import ctypes  # Linux only (prctl)

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        with contextlib.suppress(OSError, EOFError):
            alive.poll(None)
        os._exit(70)

    threading.Thread(target=watch, name="workbench-parent-watch", daemon=True).start()
