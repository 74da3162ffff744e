"""Ray vs the process pool: the same study, the same number of workers, wall time side by side.

    .venv/bin/python benchmarks/ray_vs_pool.py                    # the built-in study below, 2 workers
    .venv/bin/python benchmarks/ray_vs_pool.py --steps 400 --repeats 2
    .venv/bin/python benchmarks/ray_vs_pool.py --study studies/quickstart.toml --seeds explore

Each variant runs ``workbench run`` in a fresh results folder, all on loopback, in one invocation,
repeats interleaved:

- ``pool``: ``--executor process`` (the default);
- ``ray``: ``--executor ray``, the driver starting its own local Ray instance (its start-up counted);
- ``ray --address``: ``--executor ray --address`` to a Ray instance this script started before
  (``ray.init(num_cpus=workers)``, on 127.0.0.1) and keeps between repeats: a cluster already up.

Printed: each wall time, the median of each variant, and the ratios ray / pool (the target is
at most 1.15). The built-in study mixes stacked units (GRPO and RLOO, 4 seeds each) with runs
trained alone (SFT and DPO), 12 units in all for ``--workers`` at a time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from study_timing import bandit_study, timed_run  # benchmarks/study_timing.py, beside this file


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", help="a study file (default: the built-in study)")
    p.add_argument("--steps", type=int, default=200, help="steps per run of the built-in study")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seeds", choices=("all", "explore", "confirm"), default="all")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--no-address", action="store_true", help="skip the variant with a running Ray instance")
    args = p.parse_args()

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # the instance below on 127.0.0.1 (read at import)
    import ray  # heavy optional dependency (the `ray` extra)

    print(
        f"ray {ray.__version__}, --workers {args.workers}, os.cpu_count() {os.cpu_count()}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    address = None
    if not args.no_address:
        ray.init(num_cpus=args.workers, include_dashboard=False, logging_level="WARNING")
        address = ray.get_runtime_context().gcs_address
    variants = {"pool": ["--executor", "process"], "ray": ["--executor", "ray"]}
    if address:
        variants["ray --address"] = ["--executor", "ray", "--address", address]
    times: dict[str, list[float]] = {k: [] for k in variants}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            if args.study:
                study = Path(args.study).resolve()
            else:
                study = tmp / "ray_bench.toml"
                study.write_text(
                    bandit_study(
                        "ray_bench",
                        [0, 1, 2, 3],
                        "benchmark: Ray vs the process pool (benchmarks/ray_vs_pool.py)",
                        args.steps,
                        ["grpo", "rloo", "sft", "dpo"],
                    )
                )
            print(f"study {study.name}, --seeds {args.seeds}")
            for r in range(args.repeats):
                for name, extra in variants.items():
                    results = tmp / f"{name.replace(' ', '_')}-{r}"
                    wall = timed_run(study, results, args.workers, [*extra, "--seeds", args.seeds])
                    times[name].append(wall)
                    print(
                        f"  repeat {r + 1}: {name:<14} {wall:7.1f} s   (load average {os.getloadavg()[0]:.1f})",
                        flush=True,
                    )
    finally:
        if address:
            ray.shutdown()
    med = {k: statistics.median(v) for k, v in times.items()}
    print("median wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in med.items()))
    for name in variants:
        if name != "pool":
            print(f"{name} / pool: {med[name] / med['pool']:.3f}  (target <= 1.15)")


if __name__ == "__main__":
    main()
