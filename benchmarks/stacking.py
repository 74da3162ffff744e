"""Stacked runs vs ``--no-stack``: the same study, the same workers, wall time side by side.

    .venv/bin/python benchmarks/stacking.py                      # the built-in seeds study below
    .venv/bin/python benchmarks/stacking.py --study studies/quickstart.toml --seeds confirm
    .venv/bin/python benchmarks/stacking.py --in-process --eval-every 20 --probe-every 30

``--in-process``: 8 GRPO seeds trained one after another with ``train`` and then as one stack with
``train_seeds``, in this process (no pool, no index): the stack's gain on training and measurements alone.

Each variant runs ``workbench run`` in a fresh results folder (process pool, ``--workers``);
the printed ratio is no-stack / stacked wall time, measured in one invocation. Runs that differ
only in per-run scalars (seed, lr, beta, ...) and can stack (docs/studies.md, "Runs": every online
algorithm, SFT, DPO, IPO; a GPT-2 built for the task) train as one computation; the others train
alone either way, so a study of them shows a ratio near 1.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from study_timing import bandit_study, timed_run  # benchmarks/study_timing.py, beside this file


def in_process(steps: int, eval_every: int, probe_every: int, n_seeds: int = 8) -> None:
    import torch

    from workbench.config import resolve
    from workbench.training import train, train_seeds

    torch.set_num_threads(1)
    raw = {"task": {"name": "bandit", "n_arms": 16, "n_contexts": 8}, "algo": {"name": "grpo"}}
    sets = {"model.impl": "native", "steps": steps, "batch_size": 64, "group_size": 8, "save_checkpoint": False}
    sets.update(eval_every=eval_every, probe_every=probe_every)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        for s in range(n_seeds):
            train(resolve(raw, {**sets, "seed": s}), f"{d}/alone{s}", progress=False)
        alone = time.perf_counter() - t0
        t0 = time.perf_counter()
        train_seeds([resolve(raw, {**sets, "seed": s}) for s in range(n_seeds)], [f"{d}/s{s}" for s in range(n_seeds)])
        stacked = time.perf_counter() - t0
    print(f"{n_seeds} GRPO seeds, {steps} steps, eval_every {eval_every}, probe_every {probe_every} (0 = off)")
    print(f"alone {alone:.1f} s, stacked {stacked:.1f} s, ratio {alone / stacked:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", help="a study file (default: the built-in seeds study)")
    p.add_argument("--steps", type=int, default=200, help="steps per run of the built-in study")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seeds", choices=("all", "explore", "confirm"), default="all")
    p.add_argument(
        "--keep", help="keep the two results folders under this directory (alone/, stacked/), to compare reports"
    )
    p.add_argument("--in-process", action="store_true", help="train and train_seeds in this process (see above)")
    p.add_argument("--eval-every", type=int, default=1000, help="--in-process: exact evaluation period")
    p.add_argument("--probe-every", type=int, default=0, help="--in-process: probe period (0: off)")
    args = p.parse_args()
    if args.in_process:
        return in_process(60 if args.steps == 200 else args.steps, args.eval_every, args.probe_every)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(args.keep) if args.keep else Path(tmp)
        if args.study:
            study = Path(args.study).resolve()
        else:
            study = tmp / "stacking_bench.toml"
            study.write_text(
                bandit_study(
                    "stacking_bench",
                    list(range(8)),
                    "benchmark: 8 seeds of GRPO and RLOO on a bandit, native GPT-2 (benchmarks/stacking.py)",
                    args.steps,
                    ["grpo", "rloo"],
                )
            )
        seeds = ["--seeds", args.seeds]
        print(f"study {study.name}, --workers {args.workers}, --seeds {args.seeds}, os.cpu_count() {os.cpu_count()}")
        alone = timed_run(study, tmp / "alone", args.workers, [*seeds, "--no-stack"])
        print(f"--no-stack  {alone:8.1f} s")
        stacked = timed_run(study, tmp / "stacked", args.workers, seeds)
        print(f"stacked     {stacked:8.1f} s")
        print(f"ratio no-stack / stacked: {alone / stacked:.2f}x (load average now {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
