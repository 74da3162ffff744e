"""Inference across seeds and verdicts on claims, computed from a study's final metrics.

A study states, as data, what would support each claim it tests (``[[verdicts]]`` in its
TOML). A rule compares a metric's final value across seeds:

    below / above     mean_a < threshold (> threshold)
    greater / less    mean_a - mean_b > 0 (< 0), seeds paired when both groups share them
    equivalent        |mean_a - mean_b| < margin
    noninferior       mean_a - mean_b > -margin (a is at most ``margin`` worse than b)

and each gets a 95% bootstrap confidence interval of its statistic (the mean for
below/above, the difference of means otherwise). The verdict follows the interval only:

    supported     the whole interval lies on the claim's side
    contradicted  the whole interval lies on the other side
    inconclusive  the interval straddles the boundary (or too few seeds to have one)

A group is the runs of one algorithm label, narrowed by ``where`` (grid values, or
``task`` = a task label); ``a_where`` / ``b_where`` narrow one side only, so one algorithm
can be compared with itself across tasks or grid points (``a = b = "reinforce"``,
``a_where = {task = "process"}``, ``b_where = {task = "outcome"}``). A rule reads each
run's final value of the metric, or with ``step`` the value logged at that update step
(``step = 0``: every run of a seed at the same initial parameters).

A claim's verdict combines its rules: contradicted if any rule is, supported if all are,
else inconclusive. A rule whose metric no run logged yields ``not measured`` and no
verdict: a claim is never decided by a run that did not measure it.

Pairwise comparisons between all groups use Welch's t-test with Holm's step-down
correction for the number of comparisons.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

CONFIDENCE = 0.95
N_RESAMPLES = 9999
SEED = 0  # the bootstrap is seeded: the same results give the same report


class VerdictRule(BaseModel):
    """One test of a claim on a study's final metrics."""

    model_config = ConfigDict(extra="forbid")

    claim: str = Field(description="claim id from CLAIMS.md, e.g. 'C6'")
    metric: str = Field(description="metric name (docs/metrics.md), final value per run")
    kind: Literal["below", "above", "greater", "less", "equivalent", "noninferior"] = Field(description="what supports the claim")
    a: str = Field(description="group label: an algorithm label of the study")
    b: str | None = Field(None, description="second group label, for greater/less/equivalent/noninferior")
    where: dict[str, object] = Field(default_factory=dict, description="grid values or task label both groups must have")
    a_where: dict[str, object] = Field(default_factory=dict, description="more filters for group a only, merged over 'where'")
    b_where: dict[str, object] = Field(default_factory=dict, description="more filters for group b only, merged over 'where'")
    step: int | None = Field(None, ge=0, description="read the metric at this update step instead of its final value")
    threshold: float | None = Field(None, description="for below/above")
    margin: float | None = Field(None, gt=0, description="for equivalent: |difference| below this; noninferior: a worse than b by less")
    statement: str = Field("", description="what the rule checks, in words, for the report")

    @model_validator(mode="after")
    def _needs(self) -> VerdictRule:
        if self.kind in ("below", "above") and self.threshold is None:
            raise ValueError(f"a '{self.kind}' rule needs 'threshold'")
        if self.kind in ("greater", "less", "equivalent", "noninferior") and self.b is None:
            raise ValueError(f"a '{self.kind}' rule needs 'b'")
        if self.kind in ("equivalent", "noninferior") and self.margin is None:
            raise ValueError(f"an '{self.kind}' rule needs 'margin'")
        if self.b is None and self.b_where:
            raise ValueError("'b_where' needs 'b'")
        if self.b is not None and self.a == self.b and self.where_a == self.where_b:
            raise ValueError(f"groups a and b are the same runs ({self.a!r}); tell them apart with a_where / b_where")
        return self

    @property
    def where_a(self) -> dict:
        return {**self.where, **self.a_where}

    @property
    def where_b(self) -> dict:
        return {**self.where, **self.b_where}


def bootstrap_ci(x: np.ndarray, stat=np.mean, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat`` over the samples ``x`` (seeded). NaNs for n < 2."""
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) < 2:
        return (math.nan, math.nan)
    if np.all(x == x[0]):
        return (float(x[0]), float(x[0]))
    from scipy.stats import bootstrap

    res = bootstrap((x,), stat, confidence_level=confidence, n_resamples=N_RESAMPLES, method="percentile",
                    random_state=np.random.default_rng(SEED))  # fmt: skip
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def summarise(final: pd.DataFrame, metrics: list[str], by: list[str]) -> pd.DataFrame:
    """Mean, std, n and 95% bootstrap CI of each metric's final value per group."""
    rows = []
    for key, g in final.groupby(by, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        for m in metrics:
            if m not in g:
                continue
            x = g[m].to_numpy(dtype=float)
            x = x[np.isfinite(x)]
            if not len(x):
                continue
            lo, hi = bootstrap_ci(x)
            rows.append({**dict(zip(by, key)), "metric": m, "n": len(x), "mean": x.mean(),
                         "std": x.std(ddof=1) if len(x) > 1 else math.nan, "ci_low": lo, "ci_high": hi})  # fmt: skip
    return pd.DataFrame(rows)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error control), in the input order."""
    p = np.asarray(pvalues, dtype=float)
    order = np.argsort(p)
    m = len(p)
    adj = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adj[i] = running
    return adj.tolist()


def pairwise(final: pd.DataFrame, metric: str, group: str = "algo_label") -> pd.DataFrame:
    """Welch's t-test between every pair of groups on one metric, Holm-corrected."""
    from scipy.stats import ttest_ind

    groups = {k: g[metric].dropna().to_numpy(float) for k, g in final.groupby(group) if metric in g}
    groups = {k: x for k, x in groups.items() if len(x)}  # a group that never logged the metric is not compared
    names = sorted(groups)
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            xa, xb = groups[a], groups[b]
            if len(xa) < 2 or len(xb) < 2 or (np.var(xa) == 0 and np.var(xb) == 0):
                p = 0.0 if xa.mean() != xb.mean() and len(xa) > 1 and len(xb) > 1 else math.nan
            else:
                with warnings.catch_warnings():  # near-identical seeds: scipy warns, the p-value stands
                    warnings.simplefilter("ignore", RuntimeWarning)
                    p = float(ttest_ind(xa, xb, equal_var=False).pvalue)
            rows.append({"metric": metric, "a": a, "b": b, "mean_a": xa.mean(), "mean_b": xb.mean(),
                         "difference": xa.mean() - xb.mean(), "p": p})  # fmt: skip
    df = pd.DataFrame(rows)
    if len(df):
        ok = df["p"].notna()
        df["p_holm"] = math.nan
        df.loc[ok, "p_holm"] = holm(df.loc[ok, "p"].tolist())
    return df


def _select(final: pd.DataFrame, label: str, where: dict) -> pd.DataFrame:
    g = final[final["algo_label"] == label]
    for k, v in where.items():
        if k == "task":
            g = g[g["task_label"] == v]
        else:
            g = g[g["grid"].map(lambda d, k=k, v=v: isinstance(d, dict) and d.get(k) == v)]
    return g


def rule_groups(final: pd.DataFrame, rule: VerdictRule | dict) -> list[tuple[str, pd.DataFrame]]:
    """``[(name, runs)]`` of the rule's group a (and b): the label, plus the side's own filters when it has any."""
    r = rule.model_dump() if isinstance(rule, VerdictRule) else rule
    out = []
    for side in ("a", "b"):
        if r.get(side) is None:
            continue
        own = r.get(f"{side}_where") or {}
        name = r[side] + (" [" + ", ".join(f"{k}={v}" for k, v in own.items()) + "]" if own else "")
        out.append((name, _select(final, r[side], {**(r.get("where") or {}), **own})))
    return out


def at_step(runs: pd.DataFrame, metrics: pd.DataFrame, step: int) -> pd.DataFrame:
    """``runs`` (one row per run, with its labels) whose metric columns hold the values logged at ``step``.

    ``metrics`` is the long frame of ``store.load_metrics``; a metric a run did not log at
    that step is NaN (so a rule on it is 'not measured', never decided by another step).
    """
    if "step" not in metrics.columns:  # nothing logged
        return runs.iloc[0:0]
    names = [c for c in metrics.columns if c not in ("run_id", "step", "samples")]
    keep = runs.drop(columns=[c for c in names if c in runs.columns])
    at = metrics[metrics["step"] == step].drop_duplicates("run_id", keep="last")[["run_id", *names]]
    return keep.merge(at, on="run_id", how="left")


def evaluate_rule(final: pd.DataFrame, rule: VerdictRule) -> dict:
    """The rule's statistic, its 95% interval and the verdict it implies.

    ``final``: one row per run with its metrics (final values, or ``at_step`` for a rule with ``step``).
    """
    groups = rule_groups(final, rule)
    ga = groups[0][1]
    out = {"claim": rule.claim, "metric": rule.metric, "kind": rule.kind, "a": rule.a, "b": rule.b,
           "where": rule.where, "a_where": rule.a_where, "b_where": rule.b_where, "step": rule.step,
           "statement": rule.statement, "threshold": rule.threshold, "margin": rule.margin}  # fmt: skip
    xa = ga[rule.metric].to_numpy(float) if rule.metric in ga else np.array([])
    xa_seeds = ga["seed"].to_numpy() if len(ga) else np.array([])
    keep = np.isfinite(xa)
    xa, xa_seeds = xa[keep], xa_seeds[keep]
    if rule.b is None:
        if not len(xa):
            return {**out, "verdict": "not measured", "estimate": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": 0}
        est, (lo, hi) = float(xa.mean()), bootstrap_ci(xa)
        boundary, side = rule.threshold, (-1 if rule.kind == "below" else 1)
        n = len(xa)
    else:
        gb = groups[1][1]
        xb = gb[rule.metric].to_numpy(float) if rule.metric in gb else np.array([])
        xb_seeds = gb["seed"].to_numpy() if len(gb) else np.array([])
        keep = np.isfinite(xb)
        xb, xb_seeds = xb[keep], xb_seeds[keep]
        if not len(xa) or not len(xb):
            return {**out, "verdict": "not measured", "estimate": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": 0}
        est = float(xa.mean() - xb.mean())
        common = sorted(set(xa_seeds.tolist()) & set(xb_seeds.tolist()))
        if len(common) >= 2 and len(common) == len(xa) == len(xb):  # same seeds: paired differences
            da = dict(zip(xa_seeds.tolist(), xa))
            db = dict(zip(xb_seeds.tolist(), xb))
            lo, hi = bootstrap_ci(np.array([da[s] - db[s] for s in common]))
        else:
            lo, hi = _two_sample_ci(xa, xb)
        n = min(len(xa), len(xb))
        if rule.kind == "equivalent":
            m = rule.margin
            if not (math.isfinite(lo) and math.isfinite(hi)):
                verdict = "inconclusive"
            elif -m < lo and hi < m:
                verdict = "supported"
            elif lo >= m or hi <= -m:
                verdict = "contradicted"
            else:
                verdict = "inconclusive"
            return {**out, "verdict": verdict, "estimate": est, "ci_low": lo, "ci_high": hi, "n": n}
        if rule.kind == "noninferior":
            boundary, side = -rule.margin, 1
        else:
            boundary, side = 0.0, (1 if rule.kind == "greater" else -1)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        verdict = "inconclusive"
    elif (side > 0 and lo > boundary) or (side < 0 and hi < boundary):
        verdict = "supported"
    elif (side > 0 and hi < boundary) or (side < 0 and lo > boundary):
        verdict = "contradicted"
    else:
        verdict = "inconclusive"
    return {**out, "verdict": verdict, "estimate": est, "ci_low": lo, "ci_high": hi, "n": n}


def _two_sample_ci(xa: np.ndarray, xb: np.ndarray) -> tuple[float, float]:
    if len(xa) < 2 or len(xb) < 2:
        return (math.nan, math.nan)
    from scipy.stats import bootstrap

    res = bootstrap((xa, xb), lambda a, b, axis=-1: a.mean(axis) - b.mean(axis), confidence_level=CONFIDENCE,
                    n_resamples=N_RESAMPLES, method="percentile", random_state=np.random.default_rng(SEED))  # fmt: skip
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def claim_verdicts(rule_results: list[dict]) -> dict[str, str]:
    """Combine rule verdicts per claim: any contradicted -> contradicted; all supported -> supported."""
    out: dict[str, str] = {}
    for claim in dict.fromkeys(r["claim"] for r in rule_results):
        vs = [r["verdict"] for r in rule_results if r["claim"] == claim and r["verdict"] != "not measured"]
        if not vs:
            out[claim] = "not measured"
        elif "contradicted" in vs:
            out[claim] = "contradicted"
        elif all(v == "supported" for v in vs):
            out[claim] = "supported"
        else:
            out[claim] = "inconclusive"
    return out
