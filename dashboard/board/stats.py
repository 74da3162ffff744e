"""Aggregation over seeds: means with t confidence bands, thinned curves, matched pairs of runs.

Pure pandas / numpy, no Streamlit: the pages call these and the tests check them alone. The
band is the report's and the verdicts' interval of a mean (``workbench.core.stats``):

    mean_s      = (1/n) sum_i x_i                      over the n seeds of one line at one step
    half_width  = t_{0.975, n-1} * sd(x) / sqrt(n)     a 95% band (none with one seed)

Bands of metrics that cannot be negative (KL, entropy, variances, lengths) are clipped at 0;
``curves`` and ``finals`` mark the rows where that happened (``clipped``).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from workbench.core.stats import LEVEL, is_non_negative, t_half_width


def mean_band(
    df: pd.DataFrame, keys: list[str], value: str, level: float = LEVEL, metric: str | None = None
) -> pd.DataFrame:
    """Per group of ``keys``: ``mean``, ``lo``, ``hi`` (t band over rows) and ``n`` of ``value``.

    ``metric`` (default ``value``) names what is averaged: a non-negative one has its band
    clipped at 0, and ``clipped`` says where.
    """
    g = df.groupby(keys, sort=True, observed=True)[value].agg(["mean", "std", "count"]).reset_index()
    half = t_half_width(g["std"], g["count"], level)
    g["lo"], g["hi"] = g["mean"] - half, g["mean"] + half
    g["clipped"] = False
    if is_non_negative(metric or value):
        g["clipped"] = g["lo"] < 0
        g["lo"] = g["lo"].clip(lower=0)
    return g.rename(columns={"count": "n"}).drop(columns="std")


def thin(steps: np.ndarray, max_points: int) -> np.ndarray:
    """At most ``max_points`` of the sorted unique ``steps``, evenly spaced, always the first and last."""
    u = np.unique(steps)
    if len(u) <= max_points:
        return u
    k = math.ceil(len(u) / max_points)
    return np.union1d(u[::k], u[-1:])


def curves(m: pd.DataFrame, line_of: pd.Series, metric: str, max_points: int = 400) -> tuple[pd.DataFrame, int]:
    """Mean and band over runs of ``metric`` per (line, step).

    ``m``: run_id, step, samples, metric (long by step). ``line_of``: run_id -> line label;
    runs not in it are dropped. Returns the frame (line, step, samples, mean, lo, hi, n) and
    the stride kept (1: every logged step).
    """
    m = m.loc[m["run_id"].isin(line_of.index), ["run_id", "step", "samples", metric]]
    m = m[m[metric].notna()]
    if not len(m):
        return pd.DataFrame(columns=["line", "step", "samples", "mean", "lo", "hi", "n", "clipped"]), 1
    keep = thin(m["step"].to_numpy(), max_points)
    stride = max(1, round(len(np.unique(m["step"])) / max(len(keep), 1)))
    m = m[m["step"].isin(keep)]
    m = m.assign(line=m["run_id"].map(line_of))
    out = mean_band(m, ["line", "step"], metric)
    samples = m.groupby(["line", "step"], observed=True)["samples"].mean().rename("samples").reset_index()
    out = out.merge(samples, on=["line", "step"])
    return out[["line", "step", "samples", "mean", "lo", "hi", "n", "clipped"]], stride


def finals(final: pd.DataFrame, keys: list[str], metrics: list[str]) -> pd.DataFrame:
    """Mean and band over seeds of each final metric, one row per group of ``keys``."""
    out = None
    for m in metrics:
        if m not in final:
            continue
        g = mean_band(final[final[m].notna()], keys, m).rename(
            columns={"mean": m, "lo": f"{m}:lo", "hi": f"{m}:hi", "n": f"{m}:n", "clipped": f"{m}:clipped"}
        )
        out = g if out is None else out.merge(g, on=keys, how="outer")
    return out if out is not None else pd.DataFrame(columns=keys)


def policy_distances(logp_a: np.ndarray, logp_b: np.ndarray) -> dict[str, float]:
    """Exact distances between two policies given as log pi(y|x), ``(P, N)``, averaged over prompts x.

    tv = E_x 1/2 sum_y |pi_a - pi_b|;  kl_ab = E_x KL(pi_a || pi_b);  kl_ba likewise.
    """
    a, b = np.asarray(logp_a, dtype=np.float64), np.asarray(logp_b, dtype=np.float64)
    pa, pb = np.exp(a), np.exp(b)
    return {
        "tv": float(0.5 * np.abs(pa - pb).sum(-1).mean()),
        "kl_ab": float((pa * (a - b)).sum(-1).mean()),
        "kl_ba": float((pb * (b - a)).sum(-1).mean()),
    }


def pinsker_bound(kl_a: float | np.ndarray, kl_b: float | np.ndarray) -> np.ndarray:
    """Upper bound on E_x TV(pi_a, pi_b) from each one's E_x KL(pi || pi*):

    TV(a, b) <= TV(a, pi*) + TV(pi*, b) <= sqrt(KL(a || pi*) / 2) + sqrt(KL(b || pi*) / 2)
    (triangle inequality, Pinsker, and Jensen over prompts), capped at 1.
    """
    kl_a, kl_b = np.clip(np.asarray(kl_a, float), 0, None), np.clip(np.asarray(kl_b, float), 0, None)
    return np.minimum(np.sqrt(kl_a / 2) + np.sqrt(kl_b / 2), 1.0)


def match_pairs(final: pd.DataFrame, a: str, b: str, shared: list[str]) -> pd.DataFrame:
    """Runs of line ``a`` and line ``b`` (column ``method``) paired by task, seed and the ``shared`` grid keys.

    Each of ``a``'s runs is paired with every run of ``b`` that agrees on those; columns of
    each side get the suffix ``_a`` / ``_b``.
    """
    keys = ["task_label", "seed", *shared]
    left = final[final["method"] == a]
    right = final[final["method"] == b]
    return left.merge(right, on=keys, suffixes=("_a", "_b"))


def smooth(values: np.ndarray, weight: float) -> np.ndarray:
    """An exponential moving average with the start-up bias removed (TensorBoard's smoothing):

    s_t = w s_{t-1} + (1 - w) x_t,  s_{-1} = 0;   shown: s_t / (1 - w^{t+1})   (t counts the points shown)

    ``weight`` 0 returns the values unchanged; NaNs are skipped (they neither move nor count).
    """
    x = np.asarray(values, dtype=float)
    if weight <= 0 or not len(x):
        return x.copy()
    out = np.full_like(x, np.nan)
    s, k = 0.0, 0
    for i, v in enumerate(x):
        if np.isnan(v):
            continue
        s = weight * s + (1 - weight) * v
        k += 1
        out[i] = s / (1 - weight**k)
    return out


def smooth_curves(curve: pd.DataFrame, x: str, weight: float, cols=("mean", "lo", "hi")) -> pd.DataFrame:
    """``smooth`` applied to each line of ``curve`` (in order of ``x``), to ``cols``: for charts only, never to a
    table of exact values."""
    if weight <= 0 or not len(curve):
        return curve
    out = curve.sort_values(["line", x]).copy()
    for c in cols:
        if c in out:
            out[c] = out.groupby("line", observed=True, sort=False)[c].transform(lambda s: smooth(s.to_numpy(), weight))
    return out


def colour_top(values, factor: float = 3.0) -> tuple[float, int]:
    """The top of a heatmap's colour scale and how many cells lie above it.

    The largest value, unless it exceeds ``factor`` times the next largest: then that next value (repeated
    while the condition holds), so that one outlier (5.05 among values below 0.1) does not push every other
    cell to the dark end.
    """
    v = np.sort(np.asarray(pd.Series(values).dropna(), dtype=float))[::-1]
    if not len(v):
        return 1.0, 0
    i = 0
    while i + 1 < len(v) and v[i + 1] > 0 and v[i] > factor * v[i + 1] and i + 1 < len(v) / 2:
        i += 1
    top = float(v[i]) if v[i] > 0 else 1.0
    return top, i
