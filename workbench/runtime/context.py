"""One run's lifecycle, written once: the single-run loop, stacked seeds and the TRL backend all use it.

    setup_device(run)                 device, CPU threads, torch's global seed
    ctx = RunContext(res, out, dev)   the run folder's writer (workbench.results.run_writer)
    ctx.add(*measures)                hooks called at fixed parameters: evaluation, pipeline, probes
    ctx.write_config(model_summary)   config.json
    row = {"step": s, **ctx.measure(model, s), **training stats}
    ctx.log(row)                      metrics.jsonl (+ time/elapsed_s)
    ctx.finish(status, model, save)   checkpoint/, the measures' final files, status.json

A measure must never change the training trajectory: it reads the parameters, draws from
its own generators (``workbench.core.seeds``) and leaves ``.grad`` alone. The loops import
no measure; ``workbench.training.run`` decides which ones a run gets.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..config import Resolved
from ..models.policy import resolve_device
from ..results.run_writer import RunWriter


class Measure:
    """A measurement hook. ``due`` says when; ``__call__`` returns metrics for the row; ``finish`` writes files."""

    def due(self, step: int, last: bool) -> bool:
        return last

    def __call__(self, model, step: int, row: dict) -> dict:
        return {}

    def finish(self, model, out: Path) -> None:
        """Called once at the end of a run that finished (not diverged), with the final model."""


def setup_device(run) -> torch.device:
    """The run's device; on CPU its thread count; torch's global seed (initial weights draw from it)."""
    device = resolve_device(run.device)
    if device.type == "cpu":
        torch.set_num_threads(run.cpu_threads)
    torch.manual_seed(run.seed)
    return device


class RunContext:
    def __init__(self, res: Resolved, out: str | Path, device: torch.device):
        self.res, self.out, self.device = res, Path(out), device
        self.writer = RunWriter(self.out)
        self.measures: list[Measure] = []
        self.final: dict = {}
        self.t0 = time.perf_counter()

    def add(self, *measures: Measure | None) -> None:
        self.measures += [m for m in measures if m is not None]

    def write_config(self, model: dict, **extra) -> None:
        res = self.res
        self.writer.config({"config": res.to_dict(), "config_hash": res.config_hash, "model": model, **extra})

    def measure(self, model, step: int) -> dict:
        """Every due measure's metrics, in order; each sees the row so far (the pipeline reads the evaluator's)."""
        row: dict = {}
        last = step == self.res.run.steps
        for m in self.measures:
            if m.due(step, last):
                row.update(m(model, step, row))
        return row

    def log(self, row: dict) -> None:
        row["time/elapsed_s"] = time.perf_counter() - self.t0
        self.writer.log(row)
        self.final.update(row)

    def finish(self, status: dict, model=None, save: Callable[[Path], None] | None = None) -> dict:
        """Checkpoint and final files (a finished run only), status.json; closes the run folder.

        Returns ``{"status", "step", "final": the last value of every metric}``.
        """
        try:
            if status["status"] == "done":
                if self.res.run.save_checkpoint and save is not None:
                    save(self.out / "checkpoint")
                for m in self.measures:
                    m.finish(model, self.out)
            self.writer.status(status)
        finally:
            self.writer.close()
        return {**status, "final": self.final}


def done(steps: int) -> dict:
    return {"status": "done", "step": steps}


def diverged(step: int, reason: str) -> dict:
    return {"status": "diverged", "step": step, "reason": reason}
