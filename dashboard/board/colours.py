"""One colour per algorithm on every page and in every study, and the unit of each metric and axis.

The colour follows the algorithm's registry name (``runs.algo``), never a line's label: SFT is the same
colour in every study, whatever its grid or label. ``ORDER`` holds the registry's algorithms in a fixed
order (a test checks that it covers every registered one); a name not in it (a plugin's) gets one of the
slots ``ORDER`` leaves free, chosen by a stable hash of the name (CRC-32, the same in every process).
The dashboard may not import ``workbench.registry`` (training code), hence the table.
"""

from __future__ import annotations

import zlib

# 20 distinct hues: Tableau 10, then ten more that differ from them and from black (the pi* frontier)
PALETTE = [
    "#4e79a7",  # blue
    "#f28e2b",  # orange
    "#e15759",  # red
    "#76b7b2",  # teal
    "#59a14f",  # green
    "#edc948",  # yellow
    "#b07aa1",  # purple
    "#ff9da7",  # pink
    "#9c755f",  # brown
    "#bab0ac",  # grey
    "#2f4b7c",  # navy
    "#8cd17d",  # light green
    "#d37295",  # rose
    "#17becf",  # cyan
    "#b6992d",  # olive
    "#6a3d9a",  # violet
    "#a0cbe8",  # sky
    "#79706e",  # dark grey
    "#ffbe7d",  # peach
    "#8b0000",  # dark red
]
# the registry's algorithms (workbench.registry.ALGORITHMS) and the objectives the gradient probe names
ORDER = [
    "sft",
    "ppo",
    "grpo",
    "dpo",
    "rloo",
    "reinforce",
    "ipo",
    "online_dpo",
    "rft",
    "rm",
    "kto",
    "simpo",
    "orpo",
    "bon",
]
FIXED = {name: PALETTE[i] for i, name in enumerate(ORDER)}
SPARE = PALETTE[len(ORDER) :]


def colour_of(algo: str) -> str:
    """The colour of an algorithm: fixed for the registry's, a stable spare slot for any other name."""
    if algo in FIXED:
        return FIXED[algo]
    return SPARE[zlib.crc32(str(algo).encode()) % len(SPARE)]


def domain_range(algos) -> tuple[list[str], list[str]]:
    """The colour scale's ``domain`` (the algorithms, in ``ORDER``'s order, others by name) and ``range``."""
    names = sorted(set(map(str, algos)), key=lambda a: (ORDER.index(a) if a in ORDER else len(ORDER), a))
    return names, [colour_of(a) for a in names]


# the unit of a metric, by exact name, then by prefix (docs/metrics.md); None: a plain number
UNITS = {
    "time/elapsed_s": "s",
    "grad/snr": "ratio",
    "lr": "learning rate",
    "tool/calls_mean": "calls per episode",
    "tool/success_rate": "share of episodes",
    "reasoning/scratch_length": "tokens",
    "reasoning/answered": "share of samples",
    "reasoning/scratch_use": "accuracy difference",
}
PREFIX_UNITS = {
    "kl/": "nats",
    "optimal/kl": "nats",
    "entropy/": "nats",
    "length/": "tokens",
    "time/": "s",
    "grad/cos": "cosine",
    "credit/corr": "correlation",
    "reasoning/accuracy": "accuracy",
    "tool/exact_success": "share of episodes",
    "tool/optimal_success": "share of episodes",
    "tool/success_when": "share of episodes",
    "tool/exact_calls": "calls per episode",
    "tool/optimal_calls": "calls per episode",
    "tool/calls_when": "calls per episode",
    "episode/": "turns per episode",
}
SAMPLE_UNITS = {"completions": "completions", "demos": "demonstrations", "pairs": "preference pairs"}


def unit_of(metric: str) -> str | None:
    if metric in UNITS:
        return UNITS[metric]
    for prefix, unit in PREFIX_UNITS.items():
        if metric.startswith(prefix):
            return unit
    return None


def titled(metric: str) -> str:
    """An axis title with its unit: ``kl/exact (nats)``."""
    unit = unit_of(metric)
    return f"{metric} ({unit})" if unit else metric


def samples_title(units_by_algo: dict[str, str]) -> str:
    """The samples axis, saying what it counts for each algorithm: ``samples: completions (ppo), preference pairs
    (dpo)``."""
    by_unit: dict[str, list[str]] = {}
    for algo, unit in units_by_algo.items():
        by_unit.setdefault(SAMPLE_UNITS.get(unit, str(unit)), []).append(algo)
    if len(by_unit) == 1:
        return f"samples ({next(iter(by_unit))})"
    return "samples: " + "; ".join(f"{u} ({', '.join(a)})" for u, a in by_unit.items())
