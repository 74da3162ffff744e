"""Verdicts on claims, computed from a study's final metrics over seeds.

A study states, as data, what would support each claim it tests (``[[verdicts]]`` in its
TOML; the rules and ``[statistics]`` are declared by ``VerdictRule`` and ``Statistics`` in
``workbench.studies.schema``). A rule compares a metric's final value across seeds:

    below / above     mean_a < threshold (> threshold)
    greater / less    mean_a - mean_b > 0 (< 0), seeds paired when both groups have the same seeds
    equivalent        |mean_a - mean_b| < margin
    noninferior       mean_a - mean_b > -margin (a is at most ``margin`` worse than b)
    peaks             mean over runs of max_t m(t) - m(T) > margin (T: the last step that logged m), and with
                      ``proxy`` also mean of proxy(T) - proxy(t*) > 0 (t*: the step of m's maximum): the
                      metric rose and fell back while the proxy kept rising (over-optimisation, claim C7)

Each gets an interval of its statistic from ``workbench.core.stats.difference_interval``
(Student t for a mean, paired t for seed-paired differences, Welch otherwise; or a BCa
bootstrap when the study asks for it), at the study's level (95% by default). A rule's
verdict, in this order:

    not measured        a side has no run, or no finished run logged the metric
    unstable            failures = "exclude" and more than a fifth of a side's runs failed or diverged
    insufficient seeds  a side has fewer than ``min_seeds`` usable values (study default 5, never below 3)
    supported           the whole interval lies on the claim's side
    contradicted        the whole interval lies on the other side
    inconclusive        the interval straddles the boundary

Failed and diverged runs never lend a value logged before their failure: with
``failures = "exclude"`` (default) they are dropped and counted, with ``failures =
"worst"`` they take the rule's declared ``worst`` value (for stability claims).

A claim is supported only if every one of its rules is (an intersection-union test: each
rule is a level-alpha test, and the claim's test needs no further correction). A claim
with any rule not measured or short of seeds is ``incomplete``; else ``contradicted`` if
any rule is; else ``unstable`` if any rule is; else ``inconclusive``.

A group is the runs of one algorithm label, narrowed by ``where`` (grid values, or
``task`` = a task label); ``a_where`` / ``b_where`` narrow one side only, so one algorithm
can be compared with itself across tasks or grid points. A rule reads each run's final
value of the metric, or with ``step`` the value logged at that update step.

The report's pairwise table compares groups within one task and grid point only (paired
t when the runs pair by seed, Welch otherwise), Holm-corrected within each metric; groups
without spread get no p-value. Across tasks or grid points, ``aggregate`` gives the
interquartile mean and the probability of improvement with stratified bootstrap intervals
(Agarwal et al. 2021, arXiv 2108.13264).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
from scipy.stats import trim_mean, ttest_ind, ttest_rel

from ..core.stats import LEVEL, difference_interval
from ..studies.schema import Statistics, VerdictRule

SEED = 0  # bootstraps are seeded: the same results give the same report
AGGREGATE_RESAMPLES = 2000
VERDICTS = ("supported", "contradicted", "inconclusive", "unstable", "insufficient seeds", "not measured")
CLAIM_VERDICTS = ("supported", "contradicted", "inconclusive", "unstable", "incomplete", "not measured")
FAILED = ("diverged", "failed")
MAX_FAILED_SHARE = 0.2  # more failed runs than this on a side: the rule is unstable


def summarise(final: pd.DataFrame, metrics: list[str], by: list[str], stats: Statistics | None = None) -> pd.DataFrame:
    """Mean, std, n and the interval of the mean of each metric's final value per group (finite values only)."""
    stats = stats or Statistics()
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
            _, lo, hi = difference_interval(x, level=stats.level, method=stats.interval)
            rows.append(
                {
                    **dict(zip(by, key)),
                    "metric": m,
                    "n": len(x),
                    "mean": x.mean(),
                    "std": x.std(ddof=1) if len(x) > 1 else math.nan,
                    "ci_low": lo,
                    "ci_high": hi,
                }
            )
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


def paired_values(xa: pd.Series, sa: pd.Series, xb: pd.Series, sb: pd.Series):
    """``(a, b)`` aligned by seed when both sides hold the same seeds once each (at least 2), else ``None``."""
    la, lb = list(sa), list(sb)
    if len(la) < 2 or len(set(la)) != len(la) or sorted(la) != sorted(lb):
        return None
    da, db = dict(zip(la, np.asarray(xa, float))), dict(zip(lb, np.asarray(xb, float)))
    order = sorted(la)
    return np.array([da[s] for s in order]), np.array([db[s] for s in order])


def pairwise(
    final: pd.DataFrame, metric: str, group: str = "algo_label", within: tuple[str, ...] = ("condition",)
) -> pd.DataFrame:
    """Tests between the groups of each condition (task and grid point) on one metric, Holm-corrected.

    Paired t when the two groups hold the same seeds, Welch otherwise. Two groups without
    spread get no p-value (``note`` says why) rather than a fake 0. Only finite values.
    """

    within = [c for c in within if c in final]
    rows = []
    for key, cond in final.groupby(within, sort=True) if within else [((), final)]:
        key = key if isinstance(key, tuple) else (key,)
        groups = {}
        for k, g in cond.groupby(group, sort=True):
            if metric in g:
                g = g[np.isfinite(g[metric].to_numpy(float))]
                if len(g):
                    groups[k] = g
        names = sorted(groups)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                ga, gb = groups[a], groups[b]
                xa, xb = ga[metric].to_numpy(float), gb[metric].to_numpy(float)
                pair = paired_values(xa, ga["seed"], xb, gb["seed"])
                test, p, note = ("paired t" if pair else "Welch"), math.nan, ""
                if len(xa) < 2 or len(xb) < 2:
                    note = "fewer than 2 values"
                elif (pair and np.ptp(pair[0] - pair[1]) == 0) or (not pair and np.ptp(xa) == 0 and np.ptp(xb) == 0):
                    note = "no spread: no test"
                else:
                    with warnings.catch_warnings():  # near-identical seeds: scipy warns, the p-value stands
                        warnings.simplefilter("ignore", RuntimeWarning)
                        p = float((ttest_rel(*pair) if pair else ttest_ind(xa, xb, equal_var=False)).pvalue)
                rows.append(
                    {
                        **dict(zip(within, key)),
                        "metric": metric,
                        "a": a,
                        "b": b,
                        "n_a": len(xa),
                        "n_b": len(xb),
                        "mean_a": xa.mean(),
                        "mean_b": xb.mean(),
                        "difference": xa.mean() - xb.mean(),
                        "test": test,
                        "p": p,
                        "note": note,
                    }
                )
    df = pd.DataFrame(rows)
    if len(df):
        ok = df["p"].notna()
        df["p_holm"] = math.nan
        if ok.any():
            df.loc[ok, "p_holm"] = holm(df.loc[ok, "p"].tolist())
    return df


def aggregate(
    final: pd.DataFrame,
    metric: str,
    group: str = "algo_label",
    condition: str = "condition",
    level: float = LEVEL,
    resamples: int = AGGREGATE_RESAMPLES,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Across conditions (tasks x grid points): the interquartile mean of each group and the
    probability of improvement between groups, with stratified bootstrap intervals.

        IQM(g)      = mean of the middle 50% of g's values over all conditions and seeds
        P(a > b)    = (1/C) sum_c P(X_a,c > X_b,c)   (Mann-Whitney within condition c, ties count 1/2)

    Seeds are resampled within each condition (stratified bootstrap, Agarwal et al. 2021).
    Returns ``(iqm, improvement)`` frames; only groups and pairs present in at least two conditions.
    """

    df = final[[group, condition, metric]].copy()
    df = df[np.isfinite(df[metric].to_numpy(float))]
    rng = np.random.default_rng(SEED)
    by = {g: {c: x[metric].to_numpy(float) for c, x in d.groupby(condition)} for g, d in df.groupby(group)}
    q = [(1 - level) / 2, (1 + level) / 2]

    def resample(x: np.ndarray) -> np.ndarray:  # (resamples, n): seeds drawn with replacement within one condition
        return x[rng.integers(0, len(x), (resamples, len(x)))]

    iqm_rows = []
    for g, conds in sorted(by.items()):
        if len(conds) < 2:
            continue
        values = np.concatenate(list(conds.values()))
        boots = trim_mean(np.concatenate([resample(x) for x in conds.values()], axis=1), 0.25, axis=1)
        lo, hi = np.quantile(boots, q)
        iqm_rows.append(
            {
                "group": g,
                "metric": metric,
                "conditions": len(conds),
                "n": len(values),
                "iqm": trim_mean(values, 0.25),
                "ci_low": lo,
                "ci_high": hi,
            }
        )
    imp_rows = []
    names = sorted(by)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            common = sorted(set(by[a]) & set(by[b]))
            if len(common) < 2:
                continue
            pairs = [(by[a][c], by[b][c]) for c in common]
            est = np.mean([_prob_greater(x, y) for x, y in pairs])
            boots = np.mean([_prob_greater(resample(x), resample(y)) for x, y in pairs], axis=0)
            lo, hi = np.quantile(boots, q)
            imp_rows.append(
                {
                    "a": a,
                    "b": b,
                    "metric": metric,
                    "conditions": len(common),
                    "p_a_greater": est,
                    "ci_low": lo,
                    "ci_high": hi,
                }
            )
    return pd.DataFrame(iqm_rows), pd.DataFrame(imp_rows)


def _prob_greater(x: np.ndarray, y: np.ndarray):
    """P(X > Y) + P(X = Y)/2 for independent draws from the samples x and y: ``(n,), (m,)`` -> a float,
    or row by row for ``(B, n), (B, m)`` -> ``(B,)``."""
    d = x[..., :, None] - y[..., None, :]
    return (d > 0).mean(axis=(-2, -1)) + 0.5 * (d == 0).mean(axis=(-2, -1))


def _select(final: pd.DataFrame, label: str, where: dict) -> pd.DataFrame:
    if not len(final):
        return final
    keep = (final["algo_label"] == label).to_numpy(bool).copy()
    for k, v in where.items():
        if k == "task":
            keep &= (final["task_label"] == v).to_numpy(bool)
        else:
            keep &= final["grid"].map(lambda d, k=k, v=v: isinstance(d, dict) and d.get(k) == v).to_numpy(bool)
    return final.loc[keep]


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

    ``metrics`` is the long frame of ``workbench.results.load_metrics``; a metric a run did not log at
    that step is NaN (so a rule on it is 'not measured', never decided by another step).
    """
    if "step" not in metrics.columns:  # nothing logged (every run failed before logging, or none ran): keep the runs
        return runs.assign(**{c: math.nan for c in runs.columns if "/" in str(c)})
    names = [c for c in metrics.columns if c not in ("run_id", "step", "samples")]
    keep = runs.drop(columns=[c for c in names if c in runs.columns])
    at = metrics[metrics["step"] == step].drop_duplicates("run_id", keep="last")[["run_id", *names]]
    return keep.merge(at, on="run_id", how="left")


def side_values(runs: pd.DataFrame, rule: VerdictRule) -> dict:
    """One side of a rule: the usable ``values`` and their ``seeds``, and the counts of runs and failures.

    Only runs that finished ``done`` give their metric; failed and diverged runs are
    dropped (``failures = "exclude"``) or take ``rule.worst``; queued or running runs give no
    value but count in ``runs`` (the denominator of the failure share).
    """
    done = runs[runs["status"] == "done"] if "status" in runs else runs
    failed = runs[runs["status"].isin(FAILED)] if "status" in runs else runs.iloc[0:0]
    x = done[rule.metric].to_numpy(float) if rule.metric in done else np.full(len(done), math.nan)
    ok = np.isfinite(x)
    values, seeds = list(x[ok]), list(done["seed"].to_numpy()[ok])
    if rule.failures == "worst":
        values += [float(rule.worst)] * len(failed)
        seeds += list(failed["seed"])
    return {
        "values": np.array(values, dtype=float),
        "seeds": seeds,
        "runs": len(runs),
        "failed": len(failed),
        "measured": int(ok.sum()),
        "finished": len(done) + len(failed),
        "distinct": len(set(seeds)),
    }


def peak_columns(rule: VerdictRule) -> tuple[str, str]:
    """The per-run columns a ``peaks`` rule reads (``peak_frame``): the metric's drop and the proxy's rise."""
    return f"{rule.metric} (max - final)", f"{rule.proxy} (final - at peak)"


def peak_frame(runs: pd.DataFrame, metrics: pd.DataFrame, rule: VerdictRule) -> pd.DataFrame:
    """``runs`` with the two columns of ``peak_columns``, from each run's whole curve in ``metrics`` (the long frame
    of ``workbench.results.load_metrics``):

        drop = max_t m(t) - m(T)          T: the last step that logged m
        rise = proxy(T) - proxy(t*)       t* = the first step of m's maximum (nan without ``proxy``)

    over the steps that logged m (and the proxy, when the rule names one). A run that logged m fewer than twice
    gets nan (no curve to peak)."""
    drop_col, rise_col = peak_columns(rule)
    out = runs.copy()
    out[drop_col], out[rise_col] = math.nan, math.nan
    need = [rule.metric] + ([rule.proxy] if rule.proxy else [])
    if not len(metrics) or any(m not in metrics for m in need):
        return out
    curves = metrics[["run_id", "step", *need]].dropna(subset=need).sort_values(["run_id", "step"])
    drop, rise = {}, {}
    for run_id, c in curves.groupby("run_id", sort=False):
        m = c[rule.metric].to_numpy(float)
        if len(m) < 2:
            continue
        i = int(np.argmax(m))
        drop[run_id] = m[i] - m[-1]
        if rule.proxy:
            p = c[rule.proxy].to_numpy(float)
            rise[run_id] = p[-1] - p[i]
    out[drop_col] = out["run_id"].map(drop).astype(float)
    out[rise_col] = out["run_id"].map(rise).astype(float)
    return out


def _evaluate_peaks(final: pd.DataFrame, rule: VerdictRule, stats: Statistics, out: dict) -> dict:
    """A ``peaks`` rule on ``peak_frame``'s columns: the drop's interval against ``margin`` and, with ``proxy``,
    the rise's interval against 0; supported when both lie wholly above, contradicted when either lies wholly
    below."""
    drop_col, rise_col = peak_columns(rule)
    runs = rule_groups(final, rule)[0][1]
    drop = side_values(runs, rule.model_copy(update={"metric": drop_col}))
    sides = [drop] + ([side_values(runs, rule.model_copy(update={"metric": rise_col}))] if rule.proxy else [])
    out.update(n=len(drop["values"]), n_a=len(drop["values"]), failed_a=drop["failed"], runs_a=drop["runs"])
    out.update(figure_metric=drop_col, proxy=rule.proxy)
    nan = {"estimate": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    if any(s["finished"] == 0 or (s["measured"] == 0 and s["finished"] > s["failed"]) for s in sides):
        return {**out, **nan, "verdict": "not measured"}
    est, lo, hi = difference_interval(drop["values"], level=stats.level, method=stats.interval)
    out.update(estimate=est, ci_low=lo, ci_high=hi)
    verdicts = [_decide(rule.model_copy(update={"kind": "above", "threshold": rule.margin}), lo, hi)]
    if rule.proxy:
        pe, plo, phi = difference_interval(sides[1]["values"], level=stats.level, method=stats.interval)
        out.update(proxy_estimate=pe, proxy_ci_low=plo, proxy_ci_high=phi)
        verdicts.append(_decide(rule.model_copy(update={"kind": "above", "threshold": 0.0}), plo, phi))
    if rule.failures == "exclude" and drop["failed"] > MAX_FAILED_SHARE * drop["runs"]:
        return {**out, "verdict": "unstable"}
    if any(s["distinct"] < stats.min_seeds for s in sides):
        return {**out, "verdict": "insufficient seeds"}
    if all(v == "supported" for v in verdicts):
        return {**out, "verdict": "supported"}
    return {**out, "verdict": "contradicted" if "contradicted" in verdicts else "inconclusive"}


def evaluate_rule(final: pd.DataFrame, rule: VerdictRule, stats: Statistics | None = None) -> dict:
    """The rule's statistic, its interval and the verdict it implies.

    ``final``: one row per run with ``status``, ``seed`` and its metrics (final values, or
    ``at_step`` for a rule with ``step``), for the seeds that decide (the confirmation seeds).
    """
    stats = stats or Statistics()
    sides = [side_values(g, rule) for _, g in rule_groups(final, rule)]
    out = {
        "claim": rule.claim,
        "metric": rule.metric,
        "kind": rule.kind,
        "a": rule.a,
        "b": rule.b,
        "where": rule.where,
        "a_where": rule.a_where,
        "b_where": rule.b_where,
        "step": rule.step,
        "statement": rule.statement,
        "threshold": rule.threshold,
        "margin": rule.margin,
        "failures": rule.failures,
        "worst": rule.worst,
        "confounded": rule.confounded,
        "interval": stats.interval,
        "level": stats.level,
        "min_seeds": stats.min_seeds,
        "paired": False,
        "n": min(len(s["values"]) for s in sides),
        "n_a": len(sides[0]["values"]),
        "n_b": len(sides[1]["values"]) if len(sides) > 1 else None,
        "failed_a": sides[0]["failed"],
        "failed_b": sides[1]["failed"] if len(sides) > 1 else None,
        "runs_a": sides[0]["runs"],
        "runs_b": sides[1]["runs"] if len(sides) > 1 else None,
    }
    if rule.kind == "peaks":  # the final frame carries peak_frame's per-run columns
        return _evaluate_peaks(final, rule, stats, out)
    nan = {"estimate": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    if any(s["finished"] == 0 or (s["measured"] == 0 and s["finished"] > s["failed"]) for s in sides):
        return {**out, **nan, "verdict": "not measured"}
    if rule.b is None:
        est, lo, hi = difference_interval(sides[0]["values"], level=stats.level, method=stats.interval)
    else:
        a, b = sides
        pair = paired_values(a["values"], a["seeds"], b["values"], b["seeds"])
        out["paired"] = pair is not None
        est, lo, hi = difference_interval(
            *(pair or (a["values"], b["values"])), paired=pair is not None, level=stats.level, method=stats.interval
        )
    out.update(estimate=est, ci_low=lo, ci_high=hi)
    if rule.failures == "exclude" and any(s["failed"] > MAX_FAILED_SHARE * s["runs"] for s in sides):
        return {**out, "verdict": "unstable"}
    if any(
        s["distinct"] < stats.min_seeds for s in sides
    ):  # seeds, not values: a side pooling grid points is one seed each
        return {**out, "verdict": "insufficient seeds"}
    return {**out, "verdict": _decide(rule, lo, hi)}


def _decide(rule: VerdictRule, lo: float, hi: float) -> str:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "inconclusive"
    if rule.kind == "equivalent":
        m = rule.margin
        if -m < lo and hi < m:
            return "supported"
        return "contradicted" if (lo >= m or hi <= -m) else "inconclusive"
    if rule.kind in ("below", "above"):
        boundary, side = rule.threshold, (-1 if rule.kind == "below" else 1)
    elif rule.kind == "noninferior":
        boundary, side = -rule.margin, 1
    else:
        boundary, side = 0.0, (1 if rule.kind == "greater" else -1)
    if (side > 0 and lo > boundary) or (side < 0 and hi < boundary):
        return "supported"
    if (side > 0 and hi < boundary) or (side < 0 and lo > boundary):
        return "contradicted"
    return "inconclusive"


def claim_verdict(rule_verdicts: list[str]) -> str:
    """A claim from its rules' verdicts: supported only if every rule is (intersection-union)."""
    vs = list(rule_verdicts)
    if not vs:
        return "not measured"
    if all(v == "supported" for v in vs):
        return "supported"
    if any(v in ("not measured", "insufficient seeds") for v in vs):
        return "incomplete"
    for v in ("contradicted", "unstable"):
        if v in vs:
            return v
    return "inconclusive"


def claim_verdicts(rule_results: list[dict]) -> dict[str, str]:
    """``claim_verdict`` for each claim of ``rule_results``, in their order."""
    claims = dict.fromkeys(r["claim"] for r in rule_results)
    return {c: claim_verdict([r["verdict"] for r in rule_results if r["claim"] == c]) for c in claims}
