"""Reward-model over-optimisation: gold and proxy reward against d = sqrt(KL) (Gao et al. 2022, arXiv 2210.10760).

A policy optimised against a learned proxy reward moves away from its start pi_init; with
d = sqrt(KL(pi || pi_init)), the gain of the gold reward over pi_init follows

    R_RL(d)  = d (alpha - beta log d)        under RL                 (peak at d* = exp(alpha / beta - 1))
    R_bon(d) = d (alpha - beta d)            under best-of-n          (peak at d* = alpha / (2 beta))

while the proxy's own gain keeps rising. Both forms are linear in (alpha, beta): ordinary least
squares without intercept (R(0) = 0 by construction) on the columns

    RL:   [d, -d log d]        (d log d = 0 at d = 0)
    bon:  [d, -d^2]

    R^2 = 1 - sum_i (R_i - R_hat_i)^2 / sum_i (R_i - mean(R))^2

Here R is ``reward/gold_gain`` (or ``reward/proxy_gain``, the calibrated reward model's gain in gold
units) and d = sqrt(``kl/exact``), the KL from the RL phase's start, one point per run and
measurement step (RL), or per n (best-of-n: ``pool_best_of_n``, its draws ranked by the same proxy).

``overoptimisation_points`` turns a study's long metrics frame into those points;
``fit_table`` fits both forms per method and reward; ``overoptimisation_figure`` draws gold and
proxy reward against d per method with the fitted curves. The report adds the section when the
study declares ``[report] overoptimisation = true``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

FORMS = ("rl", "bon")
GOLD, PROXY, KL, BON_N = "reward/gold_gain", "reward/proxy_gain", "kl/exact", "bon/n"


@dataclass(frozen=True)
class Fit:
    """A least-squares fit of one functional form: ``R(d) = d (alpha - beta log d)`` (rl) or ``d (alpha - beta d)``
    (bon); ``peak_d`` and ``peak`` are the fitted curve's maximum (nan when beta <= 0: no maximum)."""

    form: str
    alpha: float
    beta: float
    r2: float
    n: int
    peak_d: float
    peak: float


def _columns(d: np.ndarray, form: str) -> np.ndarray:
    """``(n, 2)`` design matrix of ``form``: R = X @ (alpha, beta)."""
    if form == "rl":
        dlogd = np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0)  # d log d -> 0 as d -> 0
        return np.stack([d, -dlogd], axis=1)
    if form == "bon":
        return np.stack([d, -(d**2)], axis=1)
    raise ValueError(f"unknown form {form!r}; allowed: {', '.join(FORMS)}")


def predict(form: str, alpha: float, beta: float, d) -> np.ndarray:
    """``R(d)`` of ``form`` at ``d`` (array-like, d >= 0)."""
    d = np.asarray(d, dtype=float)
    return _columns(d.reshape(-1), form) @ np.array([alpha, beta])


def fit(d, r, form: str) -> Fit:
    """Least-squares ``(alpha, beta)`` of ``form`` ("rl" or "bon") to points ``(d_i, R_i)`` (finite ones only)."""
    d, r = np.asarray(d, dtype=float).reshape(-1), np.asarray(r, dtype=float).reshape(-1)
    if d.shape != r.shape:
        raise ValueError(f"d and r differ in length: {d.shape} vs {r.shape}")
    if (d < 0).any():
        raise ValueError("d = sqrt(KL) must be >= 0")
    ok = np.isfinite(d) & np.isfinite(r)
    d, r = d[ok], r[ok]
    X = _columns(d, form)  # (n, 2)
    if len(d) < 2 or np.linalg.matrix_rank(X) < 2:
        return Fit(form, math.nan, math.nan, math.nan, len(d), math.nan, math.nan)
    (alpha, beta), *_ = np.linalg.lstsq(X, r, rcond=None)
    res = r - X @ np.array([alpha, beta])
    tot = ((r - r.mean()) ** 2).sum()
    r2 = 1.0 - (res**2).sum() / tot if tot > 0 else math.nan
    if beta > 0:
        e = alpha / beta - 1.0
        peak_d = (math.exp(e) if e < 700 else math.inf) if form == "rl" else alpha / (2.0 * beta)
        peak = float(predict(form, alpha, beta, [peak_d])[0]) if math.isfinite(peak_d) else math.nan
    else:
        peak_d = peak = math.nan
    return Fit(form, float(alpha), float(beta), float(r2), len(d), float(peak_d), peak)


def overoptimisation_points(metrics: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run and measurement step that logged ``kl/exact`` and the gold gain: ``group``, ``run_id``,
    ``seed``, ``step``, ``d`` = sqrt(kl/exact), ``gold`` (``reward/gold_gain``), ``proxy`` (``reward/proxy_gain``,
    nan where absent).

    ``metrics``: the long frame of ``workbench.results.load_metrics``; ``runs``: one row per run with ``run_id``,
    ``group`` and ``seed``. A best-of-n run (``bon/*`` metrics, one row per n) gives its own points the same way.
    """
    cols = ["group", "run_id", "seed", "step", "d", "gold", "proxy", "n"]
    if not len(metrics) or KL not in metrics or GOLD not in metrics:
        return pd.DataFrame(columns=cols)
    extra = [c for c in (PROXY, BON_N) if c in metrics]
    df = metrics[["run_id", "step", KL, GOLD] + extra].dropna(subset=[KL, GOLD])
    info = runs.drop_duplicates("run_id").set_index("run_id")
    df = df[df["run_id"].isin(info.index)]
    out = pd.DataFrame(
        {
            "group": df["run_id"].map(info["group"]).to_numpy(),
            "run_id": df["run_id"].to_numpy(),
            "seed": df["run_id"].map(info["seed"]).to_numpy(),
            "step": df["step"].to_numpy(),
            "d": np.sqrt(np.clip(df[KL].to_numpy(float), 0.0, None)),  # exact KL >= 0 up to rounding
            "gold": df[GOLD].to_numpy(float),
            "proxy": df[PROXY].to_numpy(float) if PROXY in df else np.nan,
            "n": df[BON_N].to_numpy(float) if BON_N in df else np.nan,  # best-of-n's n (nan for trained runs)
        }
    )
    return out.sort_values(["group", "seed", "step"]).reset_index(drop=True)[cols]


def pool_best_of_n(points: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Best-of-n's points pooled over n, as Gao et al. draw them: a bon run measures one policy (the same at its
    first and last row), so it gives one point, d = sqrt(KL(P_bon || pi)) and P_bon's gains over pi; every n of
    one algorithm table becomes one group (its ``algo_label``), with ``step`` = n so that a seed's points join in
    order of n. Trained runs' points are returned as they are."""
    is_bon = points["n"].notna()
    if not is_bon.any():
        return points
    label = runs.drop_duplicates("run_id").set_index("run_id")
    label = label["algo_label"] if "algo_label" in label else label["group"]
    bon = points[is_bon].sort_values("step").drop_duplicates("run_id", keep="last")
    bon = bon.assign(group=bon["run_id"].map(label).astype(str), step=bon["n"].astype(int))
    out = pd.concat([points[~is_bon], bon], ignore_index=True)
    return out.sort_values(["group", "seed", "step"]).reset_index(drop=True)


def fit_table(points: pd.DataFrame) -> pd.DataFrame:
    """Both forms fitted to each group's gold and proxy points (all its seeds pooled): one row per group, reward
    ("gold" / "proxy") and form, with alpha, beta, R^2, the number of points and the fitted peak."""
    rows = []
    for group, g in points.groupby("group", sort=True):
        for reward in ("gold", "proxy"):
            if g[reward].notna().sum() < 2:
                continue
            for form in FORMS:
                f = fit(g["d"], g[reward], form)
                rows.append({"group": group, "reward": reward, **asdict(f)})
    return pd.DataFrame(rows)


def peak_summary(points: pd.DataFrame) -> pd.DataFrame:
    """Per group and seed: the gold gain's maximum over the measurements, the step and d where it peaked, its final
    value, and the proxy gain at the gold peak and at the end (what the ``peaks`` verdict rule reads per run)."""
    rows = []
    for (group, seed), g in points.groupby(["group", "seed"], sort=True):
        g = g.sort_values("step")
        i = int(np.nanargmax(g["gold"].to_numpy(float)))
        peak, last = g.iloc[i], g.iloc[-1]
        rows.append(
            {
                "group": group,
                "seed": seed,
                "gold_peak": peak["gold"],
                "peak_step": int(peak["step"]),
                "peak_d": peak["d"],
                "gold_final": last["gold"],
                "final_d": last["d"],
                "proxy_at_peak": peak["proxy"],
                "proxy_final": last["proxy"],
            }
        )
    return pd.DataFrame(rows)


def overoptimisation_figure(points: pd.DataFrame, fits: pd.DataFrame, figdir: Path, form_of=None) -> dict | None:
    """Gold (solid) and proxy (dashed) gain against d = sqrt(KL) per group: each seed's measurements joined in step
    order (a dot where the run ended), and the fitted R_RL (or R_bon, ``form_of(group)``) of the gold points
    dotted. Saved as ``figures/overoptimisation.png`` and ``.svg``."""
    if not len(points):
        return None
    import matplotlib  # heavy optional: matplotlib loads only to draw a report's figures

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy optional: as above

    plt.rcParams["svg.hashsalt"] = "workbench"  # stable SVG ids, as the report's other figures
    form_of = form_of or (lambda group: "rl")
    groups = sorted(points["group"].unique())
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False, sharey=True)
    for ax, group in zip(axes[0], groups):
        g = points[points["group"] == group]
        for reward, colour, ls in (("gold", "#1f77b4", "-"), ("proxy", "#d62728", "--")):
            if not g[reward].notna().any():
                continue
            for j, (_, run) in enumerate(g.sort_values("step").groupby("seed", sort=True)):  # each seed in step order
                ax.plot(run["d"], run[reward], color=colour, ls=ls, lw=0.9, alpha=0.6, label=None if j else reward)
                ax.plot(run["d"].iloc[-1:], run[reward].iloc[-1:], "o", color=colour, ms=3)  # where it ended
        form = form_of(group)
        row = fits[(fits["group"] == group) & (fits["reward"] == "gold") & (fits["form"] == form)] if len(fits) else []
        if len(row) and np.isfinite(row["alpha"].iloc[0]):
            r = row.iloc[0]
            xs = np.linspace(0, g["d"].max(), 100)
            ax.plot(
                xs,
                predict(form, r["alpha"], r["beta"], xs),
                color="k",
                ls=":",
                lw=1.2,
                label=f"fit {form}: a={r['alpha']:.3g}, b={r['beta']:.3g}, R2={r['r2']:.2f}",
            )
        ax.axhline(0, color="#999", lw=0.6)
        ax.set_title(str(group), fontsize=9)
        ax.set_xlabel("d = sqrt(kl/exact)")
        ax.legend(fontsize=6.5, loc="best")
    axes[0][0].set_ylabel("gain over the start (gold units)")
    fig.suptitle("Over-optimisation: gold and proxy reward against d (Gao et al. 2022)", fontsize=10)
    fig.savefig(figdir / "overoptimisation.png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    fig.savefig(figdir / "overoptimisation.svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    return {"name": "overoptimisation", "png": "figures/overoptimisation.png", "svg": "figures/overoptimisation.svg"}


def overoptimisation_section(
    metrics: pd.DataFrame, runs: pd.DataFrame, figdir: Path, tabdir: Path, seeds=None
) -> dict | None:
    """The report's over-optimisation section: points (``seeds`` only, when given and measured), both fits per group and
    reward, each run's peak, the figure. Writes ``tables/overoptimisation_fits.csv`` and
    ``tables/overoptimisation_peaks.csv``; returns ``{"fits", "peaks", "figure", "seeds"}`` or None without points."""
    points = pool_best_of_n(overoptimisation_points(metrics, runs), runs)
    if seeds is not None:  # the deciding seeds; every seed while none of them has finished
        chosen = points[points["seed"].isin(set(seeds))]
        points = chosen if len(chosen) else points
    if not len(points):
        return None
    fits, peaks = fit_table(points), peak_summary(points)
    fits.to_csv(tabdir / "overoptimisation_fits.csv", index=False, float_format="%.6g")
    peaks.to_csv(tabdir / "overoptimisation_peaks.csv", index=False, float_format="%.6g")
    bon = set(points.loc[points["n"].notna(), "group"])
    figure = overoptimisation_figure(points, fits, figdir, lambda group: "bon" if group in bon else "rl")
    return {"fits": fits, "peaks": peaks, "figure": figure, "seeds": sorted(points["seed"].unique().tolist())}


ABOUT = (
    "Gold gain (reward/gold_gain) and proxy gain (reward/proxy_gain: the reward model's score, calibrated to gold "
    "units on held-out pairs when the run sets rm_calibrate) against d = sqrt(kl/exact), the KL from the start of "
    "RL, at every measurement of every run of seeds {seeds}. Fitted by least squares without intercept: "
    "R_RL(d) = d (alpha - beta log d) and R_bon(d) = d (alpha - beta d) (Gao et al. 2022, arXiv 2210.10760), "
    "each group's seeds pooled; peak_d and peak are the fitted curve's maximum (none when beta <= 0)."
)
