"""Runs on a Ray cluster: ``workbench run STUDY --executor ray [--address ADDR]`` (the ``workbench[ray]`` extra).

``RayExecutor`` is an executor (``workbench.studies.executors``): ``max_workers``, ``submit``, ``map``,
``shutdown``. Each submitted call (one run, ``execute_run``, or a stacked unit, ``execute_unit``) is one
Ray task with declared resources: ``num_cpus`` (default 1) and a share of a GPU when its runs need one.

- **The driver alone writes the results folder.** A worker trains into a scratch folder of its own
  (each ``RunTask.run_dir`` is redirected there), sends the finished run folders back as bytes with
  the outcome, and deletes its scratch. The driver installs each folder atomically enough: the files
  go into a hidden folder beside the run's (``runs/.<run_id>.ray-<token>``, which the index rebuild
  ignores), are fsynced, and are renamed into place; a killed driver leaves either the old folder or
  the new one, never a half-written one that looks finished. The study runner (in the driver) keeps
  the SQLite index as with any executor: nothing on another machine touches it, which matters
  because SQLite's WAL mode is unsafe on a network filesystem (``docs/results.md``).
- **Failures.** An exception in the run comes back as a failed ``Future`` (``WorkerError`` with the
  worker's traceback; the run folder, with its ``error.txt``, is installed too); a worker or node that
  dies, or a task cancelled, is ``WorkerDied``. Ray does not retry tasks (``max_retries=0``): the next
  ``workbench run`` retries failed runs, exactly as with the process pool.
- **Resources.** ``num_gpus=None`` (default) asks for a GPU share for a unit whose runs have
  ``device = "cuda"``, or ``"auto"`` on a cluster that has GPUs: ``min(1, cluster GPUs / max_workers)``,
  so ``max_workers`` units share the GPUs as the process pool's workers share a machine's. A number
  asks for that share for every unit (0: CPU only; an ``"auto"`` run then trains on the CPU, since
  Ray hides the GPUs from a task that did not ask for one).
- **Cluster.** ``address=None`` starts a local Ray instance of ``max_workers * num_cpus`` CPUs with no
  dashboard, on the loopback address (its node address is 127.0.0.1; Ray's gRPC servers then bind
  127.0.0.1 too), shut down with the executor or with the driver; ``address`` ("auto", "HOST:PORT")
  joins a running cluster, whose every node needs the workbench installed (the same version).
- **Process reuse.** Ray keeps a worker process for the next task (a fresh process per run would
  import torch every time). A run sets its own seed, threads and generators, so a reused process
  gives the same numbers bitwise (``tests/test_ray_executor.py`` checks every final metric against
  the process pool's).

Ray is imported inside functions only: it is a heavy optional dependency (the ``ray`` extra).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import secrets
import shutil
import socket
import tempfile
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from ..results import fsync_dir, storage_fault
from .execute import RunTask
from .executors import WorkerDied, WorkerError, _MapMixin

SCRATCH_PREFIX = "workbench-ray-"  # a worker's scratch folder: <tmp>/workbench-ray-<pid>-<random>/runs/<run_id>
_UNPACK = ".ray-"  # runs/.<run_id>.ray-<token>: a folder being installed (hidden: the index rebuild skips it)


def ray_available() -> str | None:
    """``None`` when Ray can be imported, else why not (one line)."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:  # not imported here: the executor sets Ray's environment first
        return "Ray is not installed; install the extra: pip install 'workbench[ray]'"
    return None


class RayExecutor(_MapMixin):
    """Units of runs as Ray tasks; the driver installs the run folders they send back.

    ``max_workers``: units in flight at once (the study runner submits no more). ``address``: a
    running cluster ("auto", "HOST:PORT"); ``None`` starts a local instance (also when ``RAY_ADDRESS``
    is unset). ``num_cpus``/``num_gpus``: what each unit declares (module docstring). ``scratch``:
    where workers make their scratch folders (default: the system temp folder of each worker).
    """

    def __init__(
        self,
        max_workers: int = 1,
        address: str | None = None,
        *,
        num_cpus: float = 1,
        num_gpus: float | None = None,
        scratch: str | None = None,
    ):
        self.max_workers = max(1, int(max_workers))
        self.num_cpus, self.num_gpus, self.scratch = num_cpus, num_gpus, scratch
        address = address or os.environ.get("RAY_ADDRESS") or None
        if address is None:
            # a local instance advertises (and its servers bind) the loopback address only: Ray's switch for
            # single-machine clusters, read when ray is imported
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        import ray  # heavy optional dependency (the `ray` extra): loaded only for --executor ray

        self._owns = not ray.is_initialized()  # we connected (or started a local instance): we disconnect
        if self._owns:
            kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING"}
            if address is None:
                kwargs["num_cpus"] = max(1, math.ceil(self.max_workers * num_cpus))
            else:
                _reachable(address)
                kwargs["address"] = address
            ray.init(**kwargs)
        self.address = address
        self._remote = ray.remote(max_retries=0)(_remote_call)
        self._gpus_in_cluster = float(ray.cluster_resources().get("GPU", 0))
        self._jobs: dict[Any, tuple[Future, list[tuple[Path, Path | None]]]] = {}  # ref -> future, run folders
        self._cv = threading.Condition()
        self._closing = False
        self._ray_down = False
        self._thread: threading.Thread | None = None

    # -- the interface ----------------------------------------------------------------------------
    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Future:
        tasks = _run_tasks(args)
        fut: Future = Future()
        fut.set_running_or_notify_cancel()
        try:
            gpus = self._gpus_for(tasks)
        except RuntimeError as e:  # a run needs a GPU the cluster does not have: the run fails, and says why
            fut.set_exception(WorkerError(str(e)))
            return fut
        with self._cv:
            if self._closing:
                raise RuntimeError("cannot submit after shutdown")
            ref = self._remote.options(num_cpus=self.num_cpus, num_gpus=gpus).remote(fn, args, self.scratch)
            self._jobs[ref] = (fut, [(Path(t.run_dir), _root_of(t)) for t in tasks])
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="workbench-ray", daemon=True)
                self._thread.start()
            self._cv.notify_all()
        return fut

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False, kill: bool = False) -> None:
        """Stop taking work; ``cancel_futures``/``kill``: cancel the Ray tasks in flight (killing their workers).

        With ``wait``, returns once every unit in flight has ended (and its folders are installed), then
        disconnects from Ray (and stops a local instance this executor started).
        """
        import ray  # heavy optional dependency (the `ray` extra)

        with self._cv:
            self._closing = True
            if (cancel_futures or kill) and not self._ray_down:
                for ref, (fut, _) in list(self._jobs.items()):
                    with contextlib.suppress(Exception):  # already finished, or Ray already gone
                        ray.cancel(ref, force=True)
                    self._jobs.pop(ref)
                    if not fut.done():
                        fut.set_exception(WorkerDied("the Ray task was cancelled (the study stopped)"))
            self._cv.notify_all()
            thread = self._thread
        if not wait:
            return
        if thread is not None:
            thread.join()
        with self._cv:
            down, self._ray_down = self._ray_down, True
        if self._owns and not down:
            ray.shutdown()

    # -- which resources a unit asks for ---------------------------------------------------------
    def _gpus_for(self, tasks: list[RunTask]) -> float:
        if self.num_gpus is not None:
            return float(self.num_gpus)
        devices = {t.config.get("device", "auto") for t in tasks}
        if "cuda" not in devices and not ("auto" in devices and self._gpus_in_cluster > 0):
            return 0.0
        if self._gpus_in_cluster <= 0:
            import ray  # heavy optional dependency (the `ray` extra)

            self._gpus_in_cluster = float(ray.cluster_resources().get("GPU", 0))  # nodes may have joined since
            if self._gpus_in_cluster <= 0:
                raise RuntimeError("a run asks for device cuda, but the Ray cluster has no GPU")
        return min(1.0, self._gpus_in_cluster / self.max_workers)

    # -- the driver's side: results back, folders installed ---------------------------------------
    def _loop(self) -> None:
        import ray  # heavy optional dependency (the `ray` extra)

        while True:
            with self._cv:
                if not self._jobs:
                    if self._closing:
                        return
                    self._cv.wait(0.5)
                    continue
                refs = list(self._jobs)
            try:
                ready, _ = ray.wait(refs, num_returns=1, timeout=0.5)
            except Exception as e:  # Ray shut down under us (a kill), or the connection to the cluster is lost
                with self._cv:
                    lost = [self._jobs.pop(ref) for ref in refs if ref in self._jobs]
                for fut, _ in lost:
                    if not fut.done():
                        fut.set_exception(WorkerDied(f"lost the Ray cluster: {type(e).__name__}: {e}"[:2000]))
                continue
            for ref in ready:
                with self._cv:
                    job = self._jobs.pop(ref, None)
                if job is None:
                    continue
                try:
                    self._complete(ref, *job)
                except Exception as e:  # never leave a future unsettled: the runner waits on it
                    if not job[0].done():
                        job[0].set_exception(e)

    def _complete(self, ref, fut: Future, folders: list[tuple[Path, Path | None]]) -> None:
        import ray  # heavy optional dependency (the `ray` extra)

        try:
            kind, payload, packed, host = ray.get(ref)
        except Exception as e:  # the worker or its node died, or the task was cancelled
            if not fut.done():
                fut.set_exception(WorkerDied(f"the Ray task ended without a result: {type(e).__name__}: {e}"[:2000]))
            return
        try:
            for (run_dir, _), files in zip(folders, packed):
                if files is not None:
                    install(files, run_dir)
        except OSError as e:
            run_dir, root = folders[0] if folders else (None, None)
            fault = storage_fault(e, run_dir, root)
            if fault is None or kind != "ok":
                fut.set_exception(e if kind == "ok" else WorkerError(payload))
            else:  # the results folder cannot be written: the runner stops and releases the runs, as with a pool
                one = {"status": "fault", "path": fault.path, "reason": fault.reason}
                fut.set_result([dict(one) for _ in payload] if isinstance(payload, list) else one)
            return
        if kind == "ok":
            fut.set_result(payload)
        else:
            head, _, tb = payload.partition("\n\n")
            fut.set_exception(WorkerError(f"{head}\n\n(on Ray node {host})\n{tb}"))


def _reachable(address: str, timeout: float = 10.0) -> None:
    """Raise ``ConnectionError`` at once when nothing listens at ``HOST:PORT`` (Ray itself would retry for minutes)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # "auto", "ray://...": Ray's to resolve
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ConnectionError(
            f"nothing answers at {address} ({e.strerror or e}): is `ray start --head` running there?"
        ) from None


def _run_tasks(args: tuple) -> list[RunTask]:
    """The ``RunTask`` arguments of a call, in order (a task, or a list of them)."""
    out: list[RunTask] = []
    for a in args:
        if isinstance(a, RunTask):
            out.append(a)
        elif isinstance(a, (list, tuple)) and a and all(isinstance(t, RunTask) for t in a):
            out.extend(a)
    return out


def _root_of(task: RunTask) -> Path:
    return Path(task.run_dir).parent.parent  # the results folder


# -- installing a run folder on the driver ---------------------------------------------------------


def install(files: list[tuple[str, bytes | None]], run_dir: str | os.PathLike) -> Path:
    """Write ``files`` (relative path, bytes; ``None`` for a folder) as the folder ``run_dir``, replacing it.

    The files go into a hidden folder beside it, are fsynced, and the folder is renamed into place
    (the old one, if any, is renamed away first and deleted after): a reader, or a driver killed at
    any point, sees the old folder, no folder, or the whole new one. Leftovers of an earlier killed
    install of the same run are deleted first.
    """
    run_dir = Path(run_dir)
    files = [(_safe(rel), data) for rel, data in files]  # refused before anything is written
    parent = run_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    for old in parent.glob(f".{run_dir.name}{_UNPACK}*"):
        shutil.rmtree(old, ignore_errors=True)
    token = secrets.token_hex(6)
    tmp = parent / f".{run_dir.name}{_UNPACK}{token}"
    tmp.mkdir()
    dirs = {tmp}
    for rel, data in files:
        path = tmp / rel
        if data is None:
            path.mkdir(parents=True, exist_ok=True)
            dirs.add(path)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        dirs.add(path.parent)
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(d, tolerant=True)
    old = parent / f".{run_dir.name}{_UNPACK}old-{token}"
    if run_dir.exists():
        os.replace(run_dir, old)
    os.replace(tmp, run_dir)
    fsync_dir(parent, tolerant=True)
    shutil.rmtree(old, ignore_errors=True)
    return run_dir


def _safe(rel: str) -> str:
    parts = Path(rel).parts
    if not parts or Path(rel).is_absolute() or ".." in parts:
        raise ValueError(f"refusing a run file outside its folder: {rel!r}")
    return rel


# -- the worker's side -------------------------------------------------------------------------------


def _remote_call(fn: Callable[..., Any], args: tuple, scratch: str | None):
    """In a Ray worker: ``fn(*args)`` with every run folder in a scratch folder; the folders come back as bytes.

    Returns ``(kind, payload, packed, host)``: kind "ok" (payload: what ``fn`` returned) or "err"
    (payload: the error and its traceback, as the process pool's workers send it); ``packed``: per
    ``RunTask``, in order, its folder's files, or ``None`` when the call never made it.
    """
    if not _run_tasks(args):  # no run folder to redirect: a plain call
        return _call(fn, args) + ([], socket.gethostname())
    _sweep(scratch)
    work = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir=scratch))
    try:
        local = {}

        def redirect(t: RunTask) -> RunTask:
            local[t.run_id] = work / "runs" / t.run_id
            return dataclasses.replace(t, run_dir=str(local[t.run_id]))

        moved = tuple(
            redirect(a)
            if isinstance(a, RunTask)
            else type(a)(redirect(t) for t in a)
            if isinstance(a, (list, tuple)) and a and all(isinstance(t, RunTask) for t in a)
            else a
            for a in args
        )
        kind, payload = _call(fn, moved)
        if kind == "ok":
            payload = _name_scratch(payload, work)
        packed = [_pack(local[t.run_id]) for t in _run_tasks(moved)]
        return kind, payload, packed, socket.gethostname()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _call(fn: Callable[..., Any], args: tuple) -> tuple[str, Any]:
    try:
        return "ok", fn(*args)
    except BaseException as e:  # noqa: BLE001 - everything goes back to the driver as text
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        return "err", f"{type(e).__name__}: {e}\n\n{tb[-8000:]}"


def _pack(folder: Path) -> list[tuple[str, bytes | None]] | None:
    if not folder.is_dir():
        return None
    out: list[tuple[str, bytes | None]] = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        out.append((rel, None) if path.is_dir() else (rel, path.read_bytes()))
    return out


def _name_scratch(payload, work: Path):
    """A storage fault in a worker's scratch folder names the host: it is that node's disk, not the results'."""
    host = socket.gethostname()
    if isinstance(payload, dict) and payload.get("status") == "fault":
        return {**payload, "path": f"{host}:{payload.get('path')} (a Ray worker's scratch folder)"}
    if isinstance(payload, list):
        return [_name_scratch(p, work) for p in payload]
    return payload


def _sweep(scratch: str | None) -> None:
    """Delete the scratch folders of workers that died (killed with their driver) on this machine."""
    base = Path(scratch or tempfile.gettempdir())
    with contextlib.suppress(OSError):
        for d in base.glob(f"{SCRATCH_PREFIX}*-*"):
            pid = d.name[len(SCRATCH_PREFIX) :].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
