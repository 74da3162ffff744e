"""Each page's opening state where it decides what the page reads first.

Shared by the pages and by the server's prewarm (``ui.prewarm_study``), so that the cache entry
warmed in the background is the one the page asks for when it opens.
"""

from __future__ import annotations

COMPARE_PREFERRED = ("reward/exact", "reward/mean", "objective/exact", "kl/exact", "kl/exact_to_optimal", "reward/eval")
CONVERGENCE_DIST = "kl/exact_to_optimal"


def compare_metric(names: list[str]) -> str:
    """Compare's metric at first: the first of ``COMPARE_PREFERRED`` logged, else the first name."""
    return next((n for n in COMPARE_PREFERRED if n in names), names[0])


def frontier_axes(names: list[str]) -> tuple[list[str], list[str], int, int]:
    """The Frontier's choices of KL (x) and reward (y) metrics, and the index of each one shown at first."""
    xs = [n for n in names if n.startswith("kl/") and not n.endswith("to_optimal")]
    ys = [n for n in names if n.startswith(("reward/", "objective/"))]
    x = xs.index("kl/exact") if "kl/exact" in xs else 0
    y = ys.index("reward/exact") if "reward/exact" in ys else 0
    return xs, ys, x, y


def frontier_columns(x: str, y: str) -> tuple[str, ...]:
    """The final values the Frontier reads for KL ``x`` and reward ``y``."""
    extra = ["optimal/kl", "optimal/reward", "optimal/objective", "objective/exact", "kl/exact_to_optimal"]
    return tuple(dict.fromkeys([x, y, *extra]))


def gradient_measurements(names: list[str]) -> list[str]:
    """The Gradients page's measurements over training, cosines first (the first is shown at first)."""
    grad = [n for n in names if n.startswith("grad/") and n != "grad/norm"]
    return [n for n in grad if n.startswith("grad/cos_")] + [n for n in grad if not n.startswith("grad/cos_")]
