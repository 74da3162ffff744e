"""Wall time of training with the in-training probes on (``probe_every`` at its default) vs off.

    .venv/bin/python benchmarks/measurement_overhead.py              # every policy algorithm, default run config
    .venv/bin/python benchmarks/measurement_overhead.py --algos grpo ppo --steps 100

Each algorithm trains the same configuration (the run defaults on ``--task``, an
enumerable task so every measurement is on: exact metrics, gradient statistics, exact
credit assignment) with probes off (``probe_every=0``) and on, alternating the order over
``--repeats`` and keeping the fastest of each, after one short untimed warm-up run (imports,
first-call costs). Runs use one CPU thread (the default ``cpu_threads``), so the process's
CPU time is the work done; it is the figure judged, since other processes on a shared
machine inflate wall time but not it. Wall time is printed alongside. Prints the ratio
on/off per algorithm and exits 1 if any is above ``--max-ratio`` (default 2).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch

from workbench.config import RunConfig, resolve
from workbench.training import train

ALGOS = ["sft", "reinforce", "rloo", "ppo", "grpo", "dpo", "online_dpo"]


def timed(task: str, algo: str, steps: int | None, probe_every: int) -> tuple[float, float]:
    """``(cpu_s, wall_s)`` of one training run."""
    sets = {"probe_every": probe_every, "save_checkpoint": False}
    if steps is not None:
        sets["steps"] = steps
    res = resolve({"task": {"name": task}, "algo": {"name": algo}}, sets)
    with tempfile.TemporaryDirectory() as d:
        c, t = time.process_time(), time.perf_counter()
        out = train(res, d, progress=False)
        cpu, wall = time.process_time() - c, time.perf_counter() - t
    assert out["status"] == "done", out
    return cpu, wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="sequence")
    p.add_argument("--algos", nargs="+", default=ALGOS)
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"default: the run default ({RunConfig.model_fields['steps'].default})",
    )
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-ratio", type=float, default=2.0)
    args = p.parse_args(argv)
    default_every = RunConfig.model_fields["probe_every"].default
    torch.set_num_threads(1)
    print(
        f"task {args.task}, steps {args.steps or RunConfig.model_fields['steps'].default}, "
        f"probe_every {default_every} (default)"
    )
    timed(args.task, args.algos[0], 2, 1)  # warm-up
    print(
        f"{'algo':<12} {'off_cpu_s':>9} {'on_cpu_s':>9} {'ratio':>6} {'off_wall_s':>10} "
        f"{'on_wall_s':>9} {'wall_ratio':>10}"
    )
    ratios, tot = {}, {"off": 0.0, "on": 0.0}
    for algo in args.algos:
        runs: dict[str, list] = {"off": [], "on": []}
        for r in range(args.repeats):
            order = [("off", 0), ("on", default_every)] if r % 2 == 0 else [("on", default_every), ("off", 0)]
            for key, every in order:
                runs[key].append(timed(args.task, algo, args.steps, every))
        off, on = min(runs["off"]), min(runs["on"])  # the fastest (cpu, wall) of each
        ratios[algo] = on[0] / off[0]
        tot["off"] += off[0]
        tot["on"] += on[0]
        cols = f"{off[0]:9.2f} {on[0]:9.2f} {ratios[algo]:6.2f} {off[1]:10.2f} {on[1]:9.2f} {on[1] / off[1]:10.2f}"
        print(f"{algo:<12} {cols}", flush=True)
    worst = max(ratios, key=ratios.get)
    print(f"ratio on/off (CPU time): overall {tot['on'] / tot['off']:.2f}, worst {worst} {ratios[worst]:.2f}")
    if ratios[worst] > args.max_ratio:
        print(
            f"FAIL: {worst} takes {ratios[worst]:.2f}x as long with measurements on (budget {args.max_ratio}x)",
            file=sys.stderr,
        )
        return 1
    print(f"OK: every ratio <= {args.max_ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
