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


def bandit_study(name: str, seeds: list[int], description: str, steps: int, algorithms: list[str]) -> str:
    """The benchmarks' built-in study: a 16-arm, 8-context bandit, native GPT-2 (2 x 64), eval every 20 steps;
    GRPO and RLOO with groups of 8, other algorithms at their defaults."""
    algos = "\n".join(
        f'[[algorithms]]\nname = "{a}"\n' + ("settings = { group_size = 8 }\n" if a in ("grpo", "rloo") else "")
        for a in algorithms
    )
    return f"""name = "{name}"
claims = ["C6"]
seeds = {seeds}
description = "{description}"

[[tasks]]
name = "bandit"
n_arms = 16
n_contexts = 8

[budget]
steps = {steps}
batch_size = 64

[settings]
eval_every = 20
model = {{ n_layer = 2, n_embd = 64, n_head = 4, impl = "native" }}

{algos}"""
