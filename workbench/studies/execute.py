"""Running a study: claiming its runs, executing them and recording how each ended.

``run_study`` registers the study's runs in the results index, claims the runs it will execute
atomically there (a lease held by this process's owner record, kept alive by a heartbeat; a
run left 'running' by a dead owner is stale and reclaimed), executes them through an executor
(``workbench.studies.executors``), publishes ``metrics.parquet`` and marks them done /
diverged / failed; killed and restarted, it picks up where it stopped. ``execute_run`` is what a
worker runs for one run; ``WORKER_PRELOAD`` is what a worker process imports before its first run.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm as plain_tqdm
from tqdm.auto import tqdm as auto_tqdm

from .. import training
from ..config import resolve
from ..results import (
    Heartbeat,
    Owner,
    Store,
    StoreFault,
    is_stale,
    publish_metrics,
    publish_text,
    read_progress,
    spec_hash,
    storage_fault,
)
from .plan import PlannedRun, Study, expand

# what a LocalProcessExecutor's fork server imports once, so that each run's process starts warm
WORKER_PRELOAD = (
    "workbench.studies.execute",
    "workbench.training",
    "transformers.models.auto.modeling_auto",
    "transformers.models.gpt2.modeling_gpt2",
    "transformers.models.llama.modeling_llama",
    "transformers.tokenization_utils_fast",
)


# -- executing one run (in a worker) --------------------------------------------------------------


@dataclass(frozen=True)
class RunTask:
    """What an executor needs to run one run: picklable, self-contained."""

    run_id: str
    config: dict
    run_dir: str


def execute_run(task: RunTask) -> dict:
    """Train one run into its (emptied) folder and publish its metrics. Returns the outcome."""
    plain_tqdm.set_lock(
        threading.RLock()
    )  # not tqdm's default multiprocessing lock: a killed worker would leak its semaphore
    from transformers.utils import logging as hf_logging  # heavy: loaded by a worker, not by `workbench status`

    hf_logging.disable_progress_bar()
    res = resolve(task.config)
    if res.config_hash != task.run_id:
        raise RuntimeError(f"config resolves to {res.config_hash}, not run {task.run_id}")
    out = Path(task.run_dir)
    root = out.parent.parent  # the results folder
    try:
        if out.exists():  # a previous, interrupted attempt
            shutil.rmtree(out)
        out.mkdir(parents=True)
        # looked up at each run (training.train), so a replaced train is the one that runs; it sets torch's
        # CPU threads from the config (cpu_threads), whatever --workers is
        result = training.train(res, out, progress=False)
        publish_metrics(out)
    except Exception as e:
        fault = storage_fault(e, out, root)
        if fault is not None:  # the storage's fault, not the run's: the runner stops, releases it and says so
            return {"status": "fault", "path": fault.path, "reason": fault.reason}
        _write_error(out, traceback.format_exc())
        raise
    except BaseException:
        _write_error(out, traceback.format_exc())
        raise
    return {
        "status": result["status"],
        "step": result["step"],
        "samples": result["final"].get("samples"),
        "reason": result.get("reason"),
    }


def execute_unit(tasks: list[RunTask]) -> list[dict]:
    """Train a work unit: one run, or runs that differ only in per-run scalars as one stacked computation.

    Each run of a stack keeps its own generators, loss, clipping, divergence check, run folder
    and metrics (``workbench.training.stacked``); a run that diverges is marked diverged while the
    others go on. Returns one outcome per task, in order, as ``execute_run`` does.
    """
    if len(tasks) == 1:
        return [execute_run(tasks[0])]
    plain_tqdm.set_lock(threading.RLock())  # as execute_run
    reses = [resolve(t.config) for t in tasks]
    for t, res in zip(tasks, reses, strict=True):
        if res.config_hash != t.run_id:
            raise RuntimeError(f"config resolves to {res.config_hash}, not run {t.run_id}")
    outs = [Path(t.run_dir) for t in tasks]
    root = outs[0].parent.parent  # the results folder
    try:
        for out in outs:
            if out.exists():  # a previous, interrupted attempt
                shutil.rmtree(out)
            out.mkdir(parents=True)
        results = training.train_seeds(reses, outs)  # looked up at each unit, as train in execute_run
        for out in outs:
            publish_metrics(out)
    except Exception as e:
        fault = storage_fault(e, outs[0], root)
        if fault is not None:
            return [{"status": "fault", "path": fault.path, "reason": fault.reason} for _ in tasks]
        for out in outs:
            _write_error(out, traceback.format_exc())
        raise
    except BaseException:
        for out in outs:
            _write_error(out, traceback.format_exc())
        raise
    return [
        {"status": r["status"], "step": r["step"], "samples": r["final"].get("samples"), "reason": r.get("reason")}
        for r in results
    ]


def _write_error(out: Path, text: str) -> None:
    """``error.txt``, if the folder takes it (the error that brought us here matters more)."""
    try:
        if out.is_dir():
            (out / "error.txt").write_text(text)
    except OSError:
        pass


# -- running a study -------------------------------------------------------------------------------


@dataclass
class StudyOutcome:
    study: str
    n_runs: int
    executed: list[str] = field(default_factory=list)  # run ids this call trained
    already: list[str] = field(default_factory=list)  # finished before (by an earlier call or another process)
    statuses: dict[str, str] = field(default_factory=dict)  # run id -> final status

    def count(self, status: str) -> int:
        return sum(s == status for s in self.statuses.values())

    @property
    def ok(self) -> bool:
        return self.count("failed") == 0


SeedSet = Literal["all", "explore", "confirm"]


def run_study(
    study: Study,
    results,
    executor,
    *,
    device: str = "auto",
    progress: bool = True,
    quiet: bool = False,
    poll_s: float = 0.5,
    seeds: SeedSet = "all",
    stack: int = 16,
) -> StudyOutcome:
    """Run every run of ``study`` that has not finished, ``executor.max_workers`` at a time.

    Safe to run again (finished runs are skipped), after a kill (runs left 'running' by a
    dead owner are reclaimed), and from several processes at once (claims are atomic).
    Failed runs from earlier calls are retried once per call. ``seeds``: run only the
    exploration (``seeds``) or the confirmation seeds (``confirm_seeds``); every run of the
    study is registered either way, the others stay queued. ``stack``: runs that differ only in
    per-run scalars (seed, lr, beta, ...: ``workbench.training.stack_key``) train as one work unit
    of at most this many runs; 1 (``--no-stack``) trains every run alone.
    """
    plan = expand(study, device)
    store = Store(results)
    try:
        return _run(study, plan, store, executor, progress, quiet, poll_s, seeds, stack)
    finally:
        store.close()


def _run(
    study, plan, store, executor, progress, quiet, poll_s, seeds: SeedSet = "all", stack: int = 16
) -> StudyOutcome:
    cfg = study.config
    records = [p.record() for p in plan]
    store.register_study(
        study.name, str(study.path), cfg.description, list(cfg.claims), spec_hash(p.run_id for p in plan), records
    )
    publish_text(store.root / "studies" / f"{study.name}.toml", study.text)
    keep = {"all": set(cfg.all_seeds), "explore": set(cfg.seeds), "confirm": set(cfg.confirm_seeds)}[seeds]
    plan = [p for p in plan if p.seed in keep]
    outcome = StudyOutcome(study.name, len(plan))
    if trackers := sorted({t for p in plan for t in p.res.run.report_to}):  # report_to: say a missing extra now
        from ..results.export import require  # per command: the trackers are optional and heavy

        require(trackers)
    attempts = {rid: row["attempts"] for rid, row in store.states(p.run_id for p in plan).items()}
    todo = {p.run_id: p for p in plan}
    in_flight: dict[Future, list[PlannedRun]] = {}
    keys = {p.run_id: _unit_key(p, cfg.confirm_seeds) if stack > 1 else None for p in plan}
    owner = Owner.current()
    bars = _Bars(study.name, len(plan), executor.max_workers, progress, quiet)
    try:
        with Heartbeat(store.root, owner):
            while todo or in_flight:
                states = store.states(todo)
                unit: list[PlannedRun] = []  # claimed runs of one stack key, submitted together
                for rid, p in list(todo.items()):
                    if len(in_flight) >= executor.max_workers:
                        break
                    if unit and (keys[rid] is None or keys[rid] != keys[unit[0].run_id]):
                        continue  # another unit's run: next round
                    row = states[rid]
                    if row["status"] == "running" and not is_stale(row):
                        continue  # someone else's; look again later
                    got = store.claim(rid, owner, expected_attempts=attempts.get(rid))
                    if got == "busy":
                        continue
                    del todo[rid]
                    if got == "claimed":
                        bars.started(p)
                        unit.append(p)
                        if keys[rid] is None or len(unit) >= stack:
                            _submit(executor, store, unit, in_flight)
                            unit = []
                    else:  # finished / recovered / failed by another attempt
                        st = store.states([rid])[rid]
                        outcome.already.append(rid)
                        outcome.statuses[rid] = st["status"]
                        bars.finished(p, st["status"], "already " + st["status"])
                if unit:
                    _submit(executor, store, unit, in_flight)
                if in_flight:
                    done, _ = wait(list(in_flight), timeout=poll_s, return_when=FIRST_COMPLETED)
                    for fut in done:
                        _finish_unit(store, owner, in_flight[fut], fut, outcome, bars)
                        del in_flight[fut]  # (after: a run whose end could not be recorded is released below)
                    bars.poll(store, [p for u in in_flight.values() for p in u])
                elif todo:
                    time.sleep(poll_s)  # the rest is running elsewhere
    except BaseException as e:
        executor.shutdown(wait=True, cancel_futures=True, kill=True)
        left = store.release_all([p.run_id for u in in_flight.values() for p in u], owner)
        fault = storage_fault(e, store.root / "index.sqlite") if isinstance(e, Exception) else None
        if fault is not None:  # a full disk, a read-only folder: one line for the person, after the releases
            fault.released, fault.unreleased = sum(map(len, in_flight.values())) - len(left), left
            raise fault from e
        raise
    finally:
        bars.close()
    return outcome


def _unit_key(p: PlannedRun, confirm_seeds) -> tuple | None:
    """The runs that may share a stack: same ``training.stack_key`` and the same kind of seed. A stacked run's
    numbers equal its lone twin's only up to float rounding, which an RL trajectory can amplify (issue 15's
    tool_use: one PPO seed ended at exact reward 0.001 in a stack of 5 seeds, 0.40 in a stack of 8), so a
    confirmation seed never stacks with an exploration seed: its numbers are the same whether the study runs
    ``--seeds confirm`` or all its seeds (the stack's seeds are in each run's ``config.json``, ``batched_seeds``)."""
    key = training.stack_key(p.res)
    return None if key is None else (key, p.seed in set(confirm_seeds))


def _submit(executor, store: Store, unit: list[PlannedRun], in_flight: dict) -> None:
    tasks = [RunTask(p.run_id, p.res.to_dict(), str(store.run_dir(p.run_id))) for p in unit]
    if len(tasks) == 1:  # the unit of one run: execute_run, as before stacking
        in_flight[executor.submit(execute_run, tasks[0])] = unit
    else:
        in_flight[executor.submit(execute_unit, tasks)] = unit


def _finish_unit(store: Store, owner: Owner, unit: list[PlannedRun], fut: Future, outcome: StudyOutcome, bars) -> None:
    """Record how each run of a finished unit ended (a unit that raised fails every run in it)."""
    if len(unit) == 1:
        _finish(store, owner, unit[0], fut, outcome, bars)
        return
    try:
        results = fut.result()
    except Exception as e:
        results = e
    for i, p in enumerate(unit):
        one: Future = Future()
        if isinstance(results, Exception):
            one.set_exception(results)
        else:
            one.set_result(results[i])
        _finish(store, owner, p, one, outcome, bars)


def _finish(store: Store, owner: Owner, p: PlannedRun, fut: Future, outcome: StudyOutcome, bars) -> None:
    try:
        r = fut.result()
        if r["status"] == "fault":  # the worker could not write its folder: stop (the run is released by _run)
            raise StoreFault(r["path"], r["reason"])
        status, step, samples, reason = r["status"], r["step"], r["samples"], r.get("reason")
    except StoreFault:
        raise
    except Exception as e:  # the run raised, or its process died
        status, step, samples, reason = "failed", None, None, str(e).split("\n\n")[0][:500]
        err = store.run_dir(p.run_id) / "error.txt"
        if err.parent.exists() and not err.exists():
            try:
                err.write_text(str(e))
            except OSError as write_error:
                raise (storage_fault(write_error, err) or write_error) from e
    store.finish(p.run_id, owner, status, step, samples, reason)
    if status in ("done", "diverged") and p.res.run.report_to:
        _report(store, outcome.study, p)
    outcome.executed.append(p.run_id)
    outcome.statuses[p.run_id] = status
    detail = {"done": "", "diverged": f" at step {step}: {reason}", "failed": f": {reason}"}[status]
    bars.finished(p, status, status + detail)


def _report(store: Store, study: str, p: PlannedRun) -> None:
    """``report_to``: export the finished run, from its published files, to ``<results>/trackers/<tracker>``.

    Never fails the run or the study: a failed export is said on stderr (``workbench export`` redoes it).
    """
    from ..results.export import export_study  # per command: the trackers are optional and heavy

    for tracker in p.res.run.report_to:
        try:
            export_study(store.root, study, tracker, store.root / "trackers" / tracker, [p.run_id])
        except Exception as e:  # noqa: BLE001  (a tracker's own failure, whatever it is)
            print(f"warning: run {p.run_id}: export to {tracker} failed: {e}", file=sys.stderr)


class _Bars:
    """The study's progress: one bar over its runs, one per run in flight (step, reward, ETA)."""

    def __init__(self, name: str, total: int, workers: int, progress: bool, quiet: bool):
        self.tqdm, self.quiet, self.total, self.n = auto_tqdm, quiet, total, 0
        self.disable = None if progress and not quiet else True  # None: bars only on a terminal
        self.outer = auto_tqdm(
            total=total, desc=f"study {name}", unit="run", position=0, disable=self.disable, dynamic_ncols=True
        )
        self.free = list(range(1, workers + 1))
        self.slots: dict[str, tuple[Any, int]] = {}

    SHOWN = {"reward/mean": "reward", "reward/exact": "exact_reward", "kl/exact": "exact_kl"}

    def started(self, p: PlannedRun) -> None:
        pos = self.free.pop(0) if self.free else len(self.slots) + 1
        bar = self.tqdm(
            total=p.res.run.steps,
            desc=p.name,
            unit="step",
            position=pos,
            leave=False,
            disable=self.disable,
            dynamic_ncols=True,
        )
        bar.shown = {}  # the last value of each shown metric (exact ones come every eval_every steps)
        self.slots[p.run_id] = (bar, pos)

    def poll(self, store: Store, running) -> None:
        for p in running:
            bar, _ = self.slots.get(p.run_id, (None, 0))
            row = read_progress(store.run_dir(p.run_id)) if bar is not None and not bar.disable else None
            if row:
                bar.n = min(row.get("step", 0), bar.total)
                bar.shown.update(
                    {name: f"{row[k]:.3f}" for k, name in self.SHOWN.items() if isinstance(row.get(k), (int, float))}
                )
                bar.set_postfix(bar.shown, refresh=False)
                bar.refresh()

    def finished(self, p: PlannedRun, status: str, message: str) -> None:
        bar, pos = self.slots.pop(p.run_id, (None, 0))
        if bar is not None:
            bar.close()
            self.free = sorted(self.free + [pos])
        self.n += 1
        self.outer.update(1)
        if not self.quiet:
            self.tqdm.write(f"[{self.n}/{self.total}] {p.name} ({p.run_id}): {message}", file=sys.stderr)

    def close(self) -> None:
        for bar, _ in self.slots.values():
            bar.close()
        self.outer.close()
