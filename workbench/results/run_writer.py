"""A run folder as it is written, one flushed line at a time.

    config.json      the resolved config, its hash, the model summary
    metrics.jsonl    one JSON object per logged step: ``step``, ``samples`` and namespaced metrics
    samples.jsonl    a few rendered completions per eval
    status.json      {"status": "done" | "diverged", "step": ..., "reason": ...}

(the measurements add ``credit.jsonl`` and ``policy.npy``; the loops ``checkpoint/``). The
index and the loaders read these files; nothing else is the record of a run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


class RunWriter:
    """Appends metrics and samples to the run folder, one flushed line at a time."""

    def __init__(self, out: Path):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.metrics = open(out / "metrics.jsonl", "w")  # noqa: SIM115 (open for the run; close() closes)
        self.samples = open(out / "samples.jsonl", "w")  # noqa: SIM115

    def config(self, d: dict) -> None:
        write_json(self.out / "config.json", d)

    def log(self, row: dict) -> None:
        row = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in row.items()}  # NaN -> null
        self.metrics.write(json.dumps(row, sort_keys=True) + "\n")
        self.metrics.flush()

    def log_samples(self, rows: list[dict]) -> None:
        for r in rows:
            self.samples.write(json.dumps(r) + "\n")
        self.samples.flush()

    def status(self, d: dict) -> None:
        write_json(self.out / "status.json", d)

    def close(self) -> None:
        self.metrics.close()
        self.samples.close()


def write_json(path: Path, d: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(d, indent=2, sort_keys=True))
    tmp.replace(path)
