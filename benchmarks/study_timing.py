"""Shared by the study benchmarks: the wall time of one ``workbench run`` in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed_run(study: Path, results: Path, workers: int, extra: list[str]) -> float:
    """Seconds for ``workbench run STUDY --results RESULTS --workers N EXTRA...``; exits with its stderr on failure."""
    cmd = [sys.executable, "-m", "workbench.cli", "run", str(study), "--results", str(results), "--quiet"]
    cmd += ["--workers", str(workers), *extra]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # only --address picks a cluster
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return wall
