"""GPU vs CPU: each claim study at one size, run once with ``--device cpu`` and once with ``--device cuda``.

    .venv/bin/python benchmarks/gpu_vs_cpu.py                                   # every study, default size
    .venv/bin/python benchmarks/gpu_vs_cpu.py --size gpu --steps 50             # the GPU size, 50 steps a run
    .venv/bin/python benchmarks/gpu_vs_cpu.py --studies gradient_noise dpo_vs_rlhf --seeds confirm --bf16

Each study (``studies/<name>.toml``) runs through ``workbench run`` in a fresh process and a fresh
results folder (``benchmarks/study_timing.timed_run``), on the CPU and then on CUDA, the same
``--workers`` both times; the printed ratio is CPU / CUDA wall time (above 1: the GPU is faster).
``--steps N`` and ``--bf16`` (``precision = "bf16"`` for the CUDA run only: the policy's passes
under bfloat16 autocast, docs/speed.md) are written into a copy of the study file, at the size
run (``[budget]``/``[settings]``, or ``[sizes.<size>.budget]``/``[sizes.<size>.settings]``), so the
study is otherwise the file's. The copies are checked (``load_study``) before anything runs; with
no CUDA device the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import tomllib
from pathlib import Path

from study_timing import ROOT, timed_run  # benchmarks/study_timing.py, beside this file


def toml_value(v) -> str:
    """A TOML value, tables inline (study files hold strings, numbers, booleans, lists and tables only)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON's escapes are TOML basic-string escapes
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"no TOML for {type(v).__name__}: {v!r}")


def study_copy(src: Path, dst: Path, size: str, steps: int | None, precision: str | None) -> Path:
    """``src`` rewritten to ``dst`` (same file name, so the same study name) with ``steps`` and ``precision`` set
    at ``size``."""
    raw = tomllib.loads(src.read_text())
    at = raw if size == "default" else raw.setdefault("sizes", {}).setdefault(size, {})
    if steps is not None:
        at.setdefault("budget", {})["steps"] = steps
    if precision is not None:
        at.setdefault("settings", {})["precision"] = precision
    text = "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in raw.items())
    assert tomllib.loads(text) == raw, src
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(text)
    return dst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--studies", nargs="+", metavar="NAME", help="study names in studies/ (default: every one)")
    p.add_argument("--size", default="default", help="the size to run (workbench run --size; default: the file's)")
    p.add_argument("--steps", type=int, default=None, help="steps per run instead of the study's budget")
    p.add_argument("--seeds", choices=("all", "explore", "confirm"), default="all")
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8), help="runs at once, both devices")
    p.add_argument("--bf16", action="store_true", help='the CUDA run with precision = "bf16"')
    args = p.parse_args()
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be at least 1")
    names = args.studies or sorted(f.stem for f in (ROOT / "studies").glob("*.toml"))
    missing = [n for n in names if not (ROOT / "studies" / f"{n}.toml").is_file()]
    if missing:
        p.error(f"no study file studies/<name>.toml for: {', '.join(missing)}")

    import torch

    from workbench.config import ConfigError
    from workbench.studies import load_study

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = {}
        for n in names:
            src = ROOT / "studies" / f"{n}.toml"
            try:  # the file at that size, then its copies: a bad --size, or changes a study cannot take, stop here
                load_study(src, size=args.size)
                cpu = study_copy(src, tmp / "cpu" / src.name, args.size, args.steps, None)
                cuda = study_copy(src, tmp / "cuda" / src.name, args.size, args.steps, "bf16" if args.bf16 else None)
                for f in (cpu, cuda):
                    load_study(f, size=args.size)
            except ConfigError as e:
                p.error(str(e))
            files[n] = (cpu, cuda)
        if not torch.cuda.is_available():
            print("no CUDA device: GPU vs CPU benchmark skipped")
            return
        print(
            f"{torch.cuda.get_device_name()}, torch {torch.__version__}, os.cpu_count() {os.cpu_count()}; "
            f"--size {args.size}, --steps {args.steps or 'as the file'}, --seeds {args.seeds}, "
            f"--workers {args.workers}, cuda precision {'bf16' if args.bf16 else 'fp32'}",
            flush=True,
        )
        extra = ["--seeds", args.seeds] + (["--size", args.size] if args.size != "default" else [])
        print(f"{'study':<24} {'cpu s':>9} {'cuda s':>9} {'cpu/cuda':>9}", flush=True)
        for n, (cpu_file, cuda_file) in files.items():
            cpu = timed_run(cpu_file, tmp / "results_cpu" / n, args.workers, ["--device", "cpu", *extra])
            cuda = timed_run(cuda_file, tmp / "results_cuda" / n, args.workers, ["--device", "cuda", *extra])
            print(f"{n:<24} {cpu:9.1f} {cuda:9.1f} {cpu / cuda:8.2f}x", flush=True)


if __name__ == "__main__":
    sys.exit(main())
