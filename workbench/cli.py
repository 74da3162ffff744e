"""Command line: ``workbench train`` (one run).

Exit status: 0 done, 2 bad input (a message, no traceback), 3 the run diverged (marked
in ``status.json``, files kept).
"""

from __future__ import annotations

import argparse
import json
import sys

from .config import ConfigError, parse_value, resolve


def _parse_sets(items: list[str]) -> dict:
    out = {}
    for it in items:
        if "=" not in it:
            raise ConfigError(f"--set expects key=value, got {it!r}")
        k, v = it.split("=", 1)
        out[k.strip()] = parse_value(v)
    return out


def cmd_train(args) -> int:
    from .registry import ALGORITHMS

    overrides = _parse_sets(args.set or [])
    raw = {"task": {"name": args.task}, "algo": {"name": args.algo}, "seed": args.seed}
    if args.steps is not None:
        raw["steps"] = args.steps
    if args.device:
        raw["device"] = args.device
    if args.algo not in ALGORITHMS:
        pass  # resolve() reports it with the allowed names
    res = resolve(raw, overrides)
    from .train import train

    result = train(res, args.out, progress=not args.quiet)
    final = {k: v for k, v in result["final"].items() if k.split("/")[0] in ("reward", "kl", "objective", "entropy")}
    summary = {"status": result["status"], "step": result["step"], "out": args.out, **final}
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0 if result["status"] == "done" else 3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="workbench", description="RL vs supervised objectives on toy LM tasks with exact truth")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train one run and write its folder")
    t.add_argument("--task", required=True, help="task name (bandit, sequence, arithmetic)")
    t.add_argument("--algo", required=True, help="algorithm name (sft, rm, reinforce, rloo, ppo, grpo, dpo, ipo, online_dpo)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", type=int, default=None, help="override the default step budget")
    t.add_argument("--out", required=True, help="run folder to write")
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="dotted override, e.g. algo.clip_eps=0.1, task.n_arms=4, lr=3e-4")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"workbench {args.cmd}: invalid configuration\n{e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
