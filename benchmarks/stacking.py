"""Stacked runs vs ``--no-stack``: the same study, the same workers, wall time side by side.

    .venv/bin/python benchmarks/stacking.py                      # the built-in seeds study below
    .venv/bin/python benchmarks/stacking.py --study studies/quickstart.toml --seeds confirm

Each variant runs ``workbench run`` in a fresh results folder (process pool, ``--workers``);
the printed ratio is no-stack / stacked wall time, measured in one invocation. Only runs that
differ in their seed alone and can stack (native GPT-2, an online algorithm with one update per
rollout: GRPO, RLOO, REINFORCE, online DPO) train as one computation; the others train alone
either way, so a study of them shows a ratio near 1.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEEDS_STUDY = """
name = "stacking_bench"
claims = ["C2"]
seeds = [0, 1, 2, 3, 4, 5, 6, 7]
description = "benchmark: 8 seeds of GRPO and RLOO on a bandit, native GPT-2 (benchmarks/stacking.py)"

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

[[algorithms]]
name = "grpo"
settings = {{ group_size = 8 }}

[[algorithms]]
name = "rloo"
settings = {{ group_size = 8 }}
"""


def timed_run(study: Path, results: Path, workers: int, extra: list[str]) -> float:
    cmd = [sys.executable, "-m", "workbench.cli", "run", str(study), "--results", str(results), "--quiet"]
    cmd += ["--workers", str(workers), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", help="a study file (default: the built-in seeds study)")
    p.add_argument("--steps", type=int, default=200, help="steps per run of the built-in study")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seeds", choices=("all", "explore", "confirm"), default="all")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.study:
            study = Path(args.study).resolve()
        else:
            study = tmp / "stacking_bench.toml"
            study.write_text(SEEDS_STUDY.format(steps=args.steps))
        seeds = ["--seeds", args.seeds]
        print(f"study {study.name}, --workers {args.workers}, --seeds {args.seeds}, os.cpu_count() {os.cpu_count()}")
        alone = timed_run(study, tmp / "alone", args.workers, [*seeds, "--no-stack"])
        print(f"--no-stack  {alone:8.1f} s")
        stacked = timed_run(study, tmp / "stacked", args.workers, seeds)
        print(f"stacked     {stacked:8.1f} s")
        print(f"ratio no-stack / stacked: {alone / stacked:.2f}x")


if __name__ == "__main__":
    main()
