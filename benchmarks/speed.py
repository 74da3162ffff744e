"""Workbench vs TRL throughput on the same runs, in one invocation.

    python benchmarks/speed.py                      # every section, 5 interleaved repeats
    python benchmarks/speed.py --sections grpo dpo  # some of them
    python benchmarks/speed.py --quick              # 2 repeats, fewer steps (a smoke check)

Each section builds ONE resolved run config and trains it twice per repeat: with the
workbench loop (``workbench.training.train``, ``model.impl = "native"``) and with TRL's own
trainer (built by ``workbench.backends.trl.build_trainer`` for the same config,
i.e. the same task, weights, tokenizer, prompts, batch, steps, learning rate and KL
coefficient; TRL runs on a Hugging Face ``GPT2LMHeadModel``, no workbench callback).
Repeats alternate which system goes first. Throughput is measured after a warm-up from
per-update timestamps taken at the end of each update, before either system logs it (a
wrapper around the workbench loop's ``online_step``/``offline_step``, a ``TrainerCallback``
``on_step_end`` for TRL), and each figure is the median over repeats. The wall-clock figure
is the one that counts; the same rate per CPU-second of the process is printed next to it,
as a check that is less sensitive to other processes on the machine.

Sections
    grpo      GRPO, 4 prompts x 8 completions x 8 tokens per update, beta 0.04, 2-layer 64-wide GPT-2
    grpo_8x   the same with 8x the batch: 32 prompts x 8 completions
    dpo       DPO update time, 64 preference pairs per update
    sft       SFT update time, 64 demonstrations per update
    study     8 seeds of the grpo config: one ``train`` after another in one process, 2 processes
              of 4 seeds one by one, and 2 processes of 4 seeds stacked as a batch dimension
              (``workbench.training.stacked.train_seeds``); the figure is completions/s over the study's
              wall time (model building and the evaluations at the start and end included)
              against TRL's single-run completions/s from the grpo section. In brackets: the
              CPU seconds of the busiest process (the wall time the study would take on cores
              no other process uses) against TRL's completions per CPU-second.

Both systems use the same number of torch threads per process (``--threads``, default 1;
the study's parallel run uses 2 processes x 1 thread on a 2-core machine). The workbench's
gradient probes (``probe_every``) are off: like the evaluations, they are measurements,
not training, and TRL has no counterpart.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from workbench.config import RunConfig, resolve  # noqa: E402

TASK = {"name": "sequence", "vocab_size": 8, "length": 8, "n_prompts": 64}  # 8 tokens per completion
MODEL = {"model.n_layer": 2, "model.n_embd": 64, "model.n_head": 4}


def run_config(algo: str, steps: int, threads: int, seed: int = 0, **sets):
    """The resolved config of one section; the workbench side uses the native GPT-2."""
    overrides = {
        **MODEL,
        "steps": steps,
        "seed": seed,
        "eval_every": 10**9,
        "save_checkpoint": False,
        "cpu_threads": threads,
        "device": "cpu",
        "model.impl": "native",
        **sets,
    }
    if "probe_every" in RunConfig.model_fields:
        overrides["probe_every"] = 0
    return resolve({"task": TASK, "algo": {"name": algo}}, overrides)


def online(prompts: int, steps: int, threads: int, seed: int = 0):
    return run_config("grpo", steps, threads, seed, batch_size=8 * prompts, group_size=8, beta=0.04, lr=1e-3)


def offline(algo: str, steps: int, threads: int):
    return run_config(
        algo,
        steps,
        threads,
        beta=0.1,
        **{"algo.batch_size": 64, "algo.labels": "sampled"} if algo == "dpo" else {"algo.batch_size": 64},
    )


# -- one timed run per system ---------------------------------------------------------------------


def stamp() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def per_update_rate(stamps: list[tuple[float, float]], warmup: int) -> tuple[float, float]:
    """Updates per second (wall clock, process CPU time) from the end of update ``warmup - 1`` to the last."""
    n = len(stamps) - warmup
    return n / (stamps[-1][0] - stamps[warmup - 1][0]), n / (stamps[-1][1] - stamps[warmup - 1][1])


def time_workbench(res, warmup: int) -> tuple[float, float]:
    """``workbench.training.train`` on ``res``, stamped at the end of every update (before the row is logged)."""
    from workbench.training import loop as loop

    stamps: list[tuple[float, float]] = []
    steps = {"online_step": loop.online_step, "offline_step": loop.offline_step}

    def stamped(fn):
        def wrapper(*args, **kw):
            out = fn(*args, **kw)
            stamps.append(stamp())
            return out

        return wrapper

    try:
        for name, fn in steps.items():
            setattr(loop, name, stamped(fn))
        with tempfile.TemporaryDirectory() as d:
            loop.train(res, d, progress=False)
    finally:
        for name, fn in steps.items():
            setattr(loop, name, fn)
    return per_update_rate(stamps, warmup)


def time_trl(res, warmup: int) -> tuple[float, float]:
    """TRL's trainer for ``res``, stamped at ``on_step_end`` (before TRL logs)."""
    from transformers import TrainerCallback

    from workbench.backends.trl import build_trainer

    stamps: list[tuple[float, float]] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(stamp())

    torch.set_num_threads(res.run.cpu_threads)
    torch.manual_seed(res.run.seed)
    with tempfile.TemporaryDirectory() as d:
        trainer, *_ = build_trainer(res, Path(d), callbacks=[Stamp()])
        trainer.train()
    return per_update_rate(stamps, warmup)


def compare(name: str, res, warmup: int, repeats: int, unit: float, unit_name: str) -> dict:
    """Interleaved repeats; ``unit`` converts updates/s into the reported unit (completions or updates)."""
    runs = {"workbench": [], "trl": []}
    for r in range(repeats):
        for system in ["workbench", "trl"] if r % 2 == 0 else ["trl", "workbench"]:
            wall, cpu = (time_workbench if system == "workbench" else time_trl)(res, warmup)
            runs[system].append((wall * unit, cpu * unit))
    out = {"section": name, "unit": unit_name}
    for system, xs in runs.items():
        out[system] = statistics.median(x[0] for x in xs)
        out[f"{system}_cpu"] = statistics.median(x[1] for x in xs)
        out[f"{system}_runs"] = [x[0] for x in xs]
    out["ratio"] = out["workbench"] / out["trl"]
    out["ratio_cpu"] = out["workbench_cpu"] / out["trl_cpu"]
    print(
        f"{name:8s} workbench {out['workbench']:7.1f}  TRL {out['trl']:7.1f} {unit_name}  ratio {out['ratio']:.2f}x   "
        f"[per CPU-second: {out['workbench_cpu']:.1f} vs {out['trl_cpu']:.1f}, {out['ratio_cpu']:.2f}x]   "
        f"(runs: workbench {fmt(out['workbench_runs'])}; TRL {fmt(out['trl_runs'])})",
        flush=True,
    )
    return out


def fmt(xs: list[float]) -> str:
    return ", ".join(f"{x:.0f}" for x in xs)


# -- the study: 8 seeds ----------------------------------------------------------------------------


def _train_seeds(args: tuple) -> float:
    """Worker: train the grpo config for each seed, one ``train`` after another or stacked (``train_seeds``).
    Returns the CPU seconds this process spent."""
    seeds, steps, batched = args
    from workbench.training import train, train_seeds

    torch.set_num_threads(1)
    t = time.process_time()
    with tempfile.TemporaryDirectory() as d:
        reses = [online(4, steps, 1, seed=s) for s in seeds]
        if batched:
            train_seeds(reses, [Path(d) / str(s) for s in seeds])
        else:
            for res in reses:
                train(res, Path(d) / str(res.run.seed), progress=False)
    return time.process_time() - t


def study(steps: int, n_seeds: int, procs: int, trl_rate: float | None, trl_cpu_rate: float | None) -> dict:
    """Wall time of 8 seeds x ``steps`` updates: sequential, ``procs`` processes, ``procs`` processes of
    stacked seeds."""
    seeds = list(range(n_seeds))
    chunks = [seeds[i::procs] for i in range(procs)]
    completions = n_seeds * steps * 32
    _train_seeds(([0], 2, False))  # imports and first-call costs outside the timed runs
    t = time.perf_counter()
    cpu = _train_seeds((seeds, steps, False))
    walls, busiest = {"sequential (1 process)": time.perf_counter() - t}, {"sequential (1 process)": cpu}
    ctx = mp.get_context("spawn")
    with ctx.Pool(procs) as pool:
        pool.map(_train_seeds, [([0, 1], 2, True)] * procs)  # start-up and imports outside the timed window
        for batched in (False, True):
            t = time.perf_counter()
            cpus = pool.map(_train_seeds, [(c, steps, batched) for c in chunks])
            how = f"{procs} processes x " + (
                f"{len(chunks[0])} seeds stacked" if batched else f"{len(chunks[0])} seeds one by one"
            )
            walls[how], busiest[how] = time.perf_counter() - t, max(cpus)
    out = {
        "section": "study",
        "seeds": n_seeds,
        "steps": steps,
        "completions": completions,
        "wall_s": walls,
        "busiest_process_cpu_s": busiest,
    }
    print(
        f"study    {n_seeds} seeds x {steps} updates x 32 completions (wall time, model building and "
        f"evaluations included; [CPU seconds of the busiest process: the wall time on idle cores]):",
        flush=True,
    )
    for how, wall in walls.items():
        line = f"           {how:32s} {wall:6.1f} s   {completions / wall:6.0f} completions/s"
        if trl_rate:
            line += f" = {completions / wall / trl_rate:.2f}x TRL's per-seed {trl_rate:.0f}"
        line += f"   [{busiest[how]:.1f} CPU s: {completions / busiest[how]:.0f}/s"
        line += (
            f" = {completions / busiest[how] / trl_cpu_rate:.2f}x TRL's {trl_cpu_rate:.0f} per CPU-second]"
            if trl_cpu_rate
            else "]"
        )
        print(line, flush=True)
    best = min(walls.values())
    out["best_completions_per_s"] = completions / best
    if trl_rate:
        out["ratio_vs_trl_per_seed"] = completions / best / trl_rate
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", nargs="+", default=["grpo", "grpo_8x", "dpo", "sft", "study"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process, both systems")
    ap.add_argument("--quick", action="store_true", help="2 repeats, fewer updates")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    a = ap.parse_args()
    reps = 2 if a.quick else a.repeats
    k = 2 if a.quick else 1
    torch.set_num_threads(a.threads)
    import transformers  # noqa: E401
    import trl

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; "
        f"{os.cpu_count()} CPUs, {a.threads} thread(s) per process; medians of {reps} interleaved repeats; "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    results = []
    trl_rate = trl_cpu_rate = None
    if "grpo" in a.sections:
        r = compare("grpo", online(4, 60 // k, a.threads), 10 // k, reps, 32, "completions/s")
        trl_rate, trl_cpu_rate = r["trl"], r["trl_cpu"]
        results.append(r)
    if "grpo_8x" in a.sections:
        results.append(compare("grpo_8x", online(32, 16 // k, a.threads), 4 // k, reps, 256, "completions/s"))
    if "dpo" in a.sections:
        results.append(compare("dpo", offline("dpo", 60 // k, a.threads), 10 // k, reps, 1, "updates/s"))
    if "sft" in a.sections:
        results.append(compare("sft", offline("sft", 60 // k, a.threads), 10 // k, reps, 1, "updates/s"))
    if "study" in a.sections:
        results.append(study(100 // k, 8, 2, trl_rate, trl_cpu_rate))
    print(f"load average at the end {os.getloadavg()[0]:.1f} (other processes on the machine inflate wall times)")
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
