"""``workbench report STUDY``: a finished study as a document someone can cite.

Reads the study only through the store's loader and writes to ``--out`` (default
``<results>/reports/<study>/``)::

    report.md  report.html (self-contained)  report.pdf  report.bib  verdicts.json
    figures/<name>.png and .svg       tables/<name>.csv

Contents: verdicts per claim (``workbench.reporting.verdicts``), decided on the study's
confirmation seeds only, with the figure and the interval that decided each; the same rules
on the exploration seeds, shown apart and deciding nothing; the deviations the study
declares; final metrics per group (finished runs only) with done / diverged / failed
counts and t intervals over seeds; tests within each task and grid point, Holm-corrected;
aggregates across conditions (interquartile mean, probability of improvement); learning
curves with t bands over seeds; provenance (with the study file's hash); how to cite.
Tables and figures are byte-stable: re-running the report on the same results rewrites the
same files (seeded bootstraps, PNG/SVG without dates).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import html
import json
import logging
import math
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd

from .. import __version__
from ..core.stats import difference_interval, is_non_negative, t_half_width
from ..results import load_final, load_metrics, load_studies, results_dir
from ..studies import load_study
from .overoptimisation import ABOUT as OVER_ABOUT
from .overoptimisation import overoptimisation_section
from .verdicts import (
    FAILED,
    Statistics,
    aggregate,
    at_step,
    claim_verdicts,
    evaluate_rule,
    pairwise,
    peak_frame,
    rule_groups,
    summarise,
)

DEFAULT_METRICS = ("reward/exact", "kl/exact", "kl/exact_to_optimal", "reward/eval")
PACKAGES = ("torch", "transformers", "trl", "numpy", "pandas", "scipy", "matplotlib", "seaborn", "pyarrow")
VERDICT_COLOURS = {
    "supported": "#1a7f37",
    "contradicted": "#cf222e",
    "inconclusive": "#9a6700",
    "unstable": "#bc4c00",
    "insufficient seeds": "#57606a",
    "incomplete": "#57606a",
    "not measured": "#57606a",
}
CLAIMS_DOC = "docs/claims.md"  # in the workbench repository: each claim in the project's words, and what measures it
RUN_COLUMNS = {
    "run_id",
    "task",
    "algo",
    "seed",
    "steps",
    "unit",
    "config",
    "task_label",
    "algo_label",
    "grid",
    "status",
    "step",
    "samples",
    "reason",
    "final_step",
    "final_samples",
    "path",
    "attempts",
    "owner",
    "started_at",
    "finished_at",
    "heartbeat",
    "group",
    "condition",
}


def claim_link(claim: str) -> str:
    return f"{CLAIMS_DOC}#{claim.lower()}"


def metric_columns(df: pd.DataFrame) -> list[str]:
    """The metric columns of a runs frame (namespaced names such as ``reward/exact``)."""
    return [c for c in df.columns if "/" in str(c) and c not in RUN_COLUMNS]


def without_failed_values(final: pd.DataFrame) -> pd.DataFrame:
    """``final`` with every metric of a run that did not finish ``done`` set to NaN.

    The loader takes each metric's last logged value, which for a diverged or failed run is
    a value from before its failure (often the untrained policy's): it must never reach a
    table, a figure or a verdict.
    """
    out = final.copy()
    bad = out["status"] != "done"
    cols = metric_columns(out)
    if bad.any() and cols:
        out.loc[bad, cols] = math.nan
    return out


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in s).strip("_")


# -- figures --------------------------------------------------------------------------------------


def _matplotlib():
    import matplotlib  # heavy optional: matplotlib loads only to draw a report's figures

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy optional: matplotlib loads only to draw a report's figures

    plt.rcParams["svg.hashsalt"] = "workbench"  # stable SVG ids
    plt.rcParams["figure.dpi"] = 100
    return plt


def _save(fig, figdir: Path, name: str) -> dict:
    png, svg = figdir / f"{name}.png", figdir / f"{name}.svg"
    fig.savefig(png, dpi=110, bbox_inches="tight", metadata={"Software": None})
    fig.savefig(svg, bbox_inches="tight", metadata={"Date": None, "Creator": None})
    return {"name": name, "png": f"figures/{name}.png", "svg": f"figures/{name}.svg"}


def _group_label(df: pd.DataFrame) -> pd.Series:
    """``algo_label`` plus the grid point and task when the study has several of them."""
    label = df["algo_label"].astype(str)
    grid = df["grid"].map(lambda g: ", ".join(f"{k}={v}" for k, v in sorted(g.items())) if isinstance(g, dict) else "")
    if grid.nunique() > 1:  # a group without a grid point keeps its bare label
        label = label + grid.map(lambda g: f" [{g}]" if g else "")
    if df["task_label"].nunique() > 1:
        label = df["task_label"].astype(str) + ": " + label
    return label


def curve_figure(
    metrics: pd.DataFrame, runs: pd.DataFrame, metric: str, figdir: Path, level: float = 0.95
) -> dict | None:
    """``metric`` over update steps per group: mean and t band over seeds (finished runs only)."""
    plt = _matplotlib()
    if metric not in metrics:
        return None
    df = metrics[["run_id", "step", metric]].dropna()
    if df.empty:
        return None
    lab = runs.drop_duplicates("run_id").set_index("run_id")["group"]
    df = df.assign(group=df["run_id"].map(lab)).dropna(subset=["group"])
    if df.empty:
        return None
    g = df.groupby(["group", "step"], sort=True)[metric].agg(["mean", "std", "count"]).reset_index()
    half = np.nan_to_num(t_half_width(g["std"], g["count"], level))
    g["lo"], g["hi"] = g["mean"] - half, g["mean"] + half
    clipped = is_non_negative(metric) and bool((g["lo"] < 0).any())
    if is_non_negative(metric):
        g["lo"] = g["lo"].clip(lower=0)
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, c) in enumerate(g.groupby("group", sort=True)):
        colour = plt.rcParams["axes.prop_cycle"].by_key()["color"][i % 10]
        ax.plot(c["step"], c["mean"], color=colour, label=name, lw=1.4, ls="-" if i < 10 else "--")
        ax.fill_between(c["step"], c["lo"], c["hi"], color=colour, alpha=0.2, lw=0)
    pct = f"{level:.0%}"
    ax.set_title(
        f"{metric}: mean and {pct} t band over seeds" + (" (band clipped at 0)" if clipped else ""), fontsize=10
    )
    ax.set_xlabel("update step")
    ax.set_ylabel(metric)
    if metric.startswith("kl/") and (g["mean"] > 0).all() and g["mean"].max() / max(g["mean"].min(), 1e-12) > 100:
        ax.set_yscale("log")
    ax.legend(fontsize=7, loc="best")
    out = _save(fig, figdir, f"curve_{_slug(metric)}")
    plt.close(fig)
    return out


def rule_figure(final: pd.DataFrame, result: dict, index: int, figdir: Path, stats: Statistics) -> dict | None:
    """Final ``metric`` of the rule's groups (at ``step`` for a rule with one): each seed, the mean and its interval."""
    plt = _matplotlib()
    m = result.get("figure_metric") or result["metric"]  # a peaks rule: its per-run drop
    groups = [
        (name, g.loc[g["status"] == "done", m].dropna().to_numpy(float) if m in g else np.array([]))
        for name, g in rule_groups(final, result)
    ]
    if not any(len(x) for _, x in groups):
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for i, (_, x) in enumerate(groups):
        ax.scatter(np.full(len(x), i) + np.linspace(-0.08, 0.08, len(x)), x, s=14, color="#888")
        if len(x):
            _, lo, hi = difference_interval(x, level=stats.level, method=stats.interval)
            if is_non_negative(m) and math.isfinite(lo):
                lo = max(lo, 0.0)
            if math.isfinite(lo):
                ax.errorbar([i], [x.mean()], yerr=[[x.mean() - lo], [hi - x.mean()]], fmt="o", color="k", capsize=5)
            else:
                ax.plot([i], [x.mean()], "o", color="k")
    line = result.get("margin") if result.get("kind") == "peaks" else result.get("threshold")
    if line is not None:
        ax.axhline(line, ls="--", color=VERDICT_COLOURS["inconclusive"], lw=1)
    ax.set_xticks(range(len(groups)), [name for name, _ in groups], fontsize=8)
    ax.set_ylabel(m if result.get("step") is None else f"{m} at step {result['step']}")
    ax.set_title(
        f"{result['claim']}: {result['verdict']} (mean and {stats.level:.0%} interval of each side)",
        color=VERDICT_COLOURS[result["verdict"]],
        fontsize=9,
    )
    out = _save(fig, figdir, f"verdict_{index}_{result['claim']}_{_slug(m)}")
    plt.close(fig)
    return out


# -- provenance -----------------------------------------------------------------------------------


def _git(*args: str) -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except Exception:
        return None


def provenance(runs: pd.DataFrame, study_row: dict, command: list[str] | None) -> dict:
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            versions[p] = None
    configs = [json.loads(c) for c in runs["config"].dropna()] if "config" in runs else []
    devices = sorted({c.get("device", "?") for c in configs})
    return {
        "workbench_version": __version__,
        "git_commit": commit,
        "git_dirty": bool(dirty) if dirty is not None else None,
        "study": study_row.get("name"),
        "study_spec_hash": study_row.get("spec_hash"),
        "run_config_hashes": sorted(runs["run_id"].unique().tolist()),
        "seeds": sorted(int(s) for s in runs["seed"].dropna().unique()),
        "packages": versions,
        "python": platform.python_version(),
        "hardware": {
            "platform": platform.platform(),
            "machine": platform.machine(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "run_devices": devices,
        },
        "command": " ".join(command if command is not None else sys.argv),
        "budget_consumed": {
            "runs": int(runs["run_id"].nunique()),
            "update_steps": int(
                pd.to_numeric(runs.get("final_step", runs.get("step")), errors="coerce").fillna(0).sum()
            ),
            "samples": int(
                pd.to_numeric(runs.get("final_samples", runs.get("samples")), errors="coerce").fillna(0).sum()
            ),
            "status": runs.drop_duplicates("run_id")["status"].value_counts().to_dict(),
        },
    }


# -- the document ----------------------------------------------------------------------------------


def _md_table(df: pd.DataFrame, floatfmt: str = ".4g") -> str:
    if df.empty:
        return "_(none)_\n"

    def fmt(v):
        if isinstance(v, float):
            return "" if math.isnan(v) else format(v, floatfmt)
        return str(v).replace("|", "\\|")

    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _interval(r: dict) -> str:
    lo, hi = r.get("ci_low"), r.get("ci_high")
    if not (isinstance(lo, float) and math.isfinite(lo)):
        return "n/a"
    return f"[{lo:.4g}, {hi:.4g}]"


def _rule_text(r: dict) -> str:
    where = "".join(f", {k}={v}" for k, v in (r.get("where") or {}).items())
    side = {
        s: r[s] + "".join(f" [{k}={v}]" for k, v in (r.get(f"{s}_where") or {}).items()) for s in ("a", "b") if r.get(s)
    }
    if r["kind"] in ("below", "above"):
        core = f"{r['metric']} of {side['a']} {r['kind']} {r['threshold']}"
    elif r["kind"] == "equivalent":
        core = f"|{r['metric']}({side['a']}) - {r['metric']}({side['b']})| < {r['margin']}"
    elif r["kind"] == "noninferior":
        core = f"{r['metric']}: {side['a']} > {side['b']} - {r['margin']}"
    elif r["kind"] == "peaks":
        core = f"{r['metric']} of {side['a']}: max - final > {r['margin']}"
        core += f", {r['proxy']} final > at the peak" if r.get("proxy") else ""
    else:
        core = f"{r['metric']}: {side['a']} {'>' if r['kind'] == 'greater' else '<'} {side['b']}"
    at = f", at step {r['step']}" if r.get("step") is not None else ""
    return core + where + at


def build_report(
    study: str,
    results=None,
    out: str | Path | None = None,
    command: list[str] | None = None,
    pdf: bool = True,
) -> Path:
    """Write the report of ``study``; returns the output folder. ``pdf=False`` (``workbench report --no-pdf``)
    skips report.pdf, the slowest part (WeasyPrint), and removes one left there by an earlier report."""

    root = results_dir(results)
    studies = load_studies(root)
    if study not in set(studies["name"]):
        raise ValueError(f"no study {study!r} in {root}; studies there: {', '.join(studies['name']) or 'none'}")
    srow = studies[studies["name"] == study].iloc[0].to_dict()
    study_file = root / "studies" / f"{study}.toml"
    loaded = load_study(study_file)
    spec, stats = loaded.config, loaded.config.statistics
    out = Path(out) if out else root / "reports" / study
    figdir, tabdir = out / "figures", out / "tables"
    figdir.mkdir(parents=True, exist_ok=True)
    tabdir.mkdir(parents=True, exist_ok=True)

    final = load_final(root, study)
    issues = list(final.attrs.get("issues", []))
    final = final[final["seed"].isin(list(spec.seeds) + list(spec.confirm_seeds))].copy()
    if len(final):
        final["group"] = _group_label(final)
        final["condition"], final["method"] = _condition(final, set(spec.grid))
    else:
        final["group"], final["condition"], final["method"] = [], [], []
    final = without_failed_values(final)  # a failed run's pre-failure values never reach a table
    finished = final[final["status"] == "done"].copy()
    metrics = load_metrics(root, study) if len(finished) else pd.DataFrame()
    if len(metrics):
        metrics = metrics[metrics["run_id"].isin(set(finished["run_id"]))]
    metric_names = [m for m in spec.report.metrics if m in final]

    # tables (finished runs of every seed: exploration and confirmation)
    summary = _with_counts(
        summarise(finished, metric_names, ["group"], stats) if metric_names else pd.DataFrame(), final
    )
    pw = (
        pd.concat([pairwise(finished, m, "method", ("condition",)) for m in metric_names], ignore_index=True)
        if metric_names
        else pd.DataFrame()
    )
    aggregates = _aggregates(finished, metric_names, stats)

    # verdicts: decided on the confirmation seeds; the exploration seeds are shown apart
    decide = set(spec.confirm_seeds) or set(spec.seeds)
    rules = list(spec.verdicts)
    frames = {r.step: final if r.step is None else at_step(final, metrics, r.step) for r in rules}
    frames = [peak_frame(final, metrics, r) if r.kind == "peaks" else frames[r.step] for r in rules]  # per rule
    rule_results = [evaluate_rule(f[f["seed"].isin(decide)], r, stats) for f, r in zip(frames, rules)]
    explore = (
        [evaluate_rule(f[f["seed"].isin(set(spec.seeds))], r, stats) for f, r in zip(frames, rules)]
        if spec.confirm_seeds
        else []
    )
    for r in rule_results:
        if r["claim"] not in spec.claims:
            raise ValueError(f"verdict rule on {r['claim']}, which study {study!r} does not list in claims")
    verdicts = claim_verdicts(rule_results)
    explore_verdicts = claim_verdicts(explore) if explore else {}
    for c in spec.claims:
        verdicts.setdefault(c, "not measured")
    runs_table = final[["group", "seed", "status", "run_id"] + metric_names].sort_values(["group", "seed"])
    summary.to_csv(tabdir / "final_metrics.csv", index=False, float_format="%.6g")
    pw.to_csv(tabdir / "pairwise_tests.csv", index=False, float_format="%.6g")
    runs_table.to_csv(tabdir / "runs.csv", index=False, float_format="%.6g")
    for name, df in aggregates.items():
        df.to_csv(tabdir / f"{name}.csv", index=False, float_format="%.6g")
    for name, results_ in (("verdict_rules", rule_results), ("verdict_rules_exploration", explore)):
        rr = pd.DataFrame(results_)
        if len(rr):
            rr = rr.assign(
                **{c: rr[c].map(lambda w: json.dumps(w, sort_keys=True)) for c in ("where", "a_where", "b_where")}
            )
        if name == "verdict_rules" or explore:
            rr.to_csv(tabdir / f"{name}.csv", index=False, float_format="%.6g")

    # figures
    figures = [f for m in metric_names if (f := curve_figure(metrics, finished, m, figdir, stats.level))]
    for i, r in enumerate(rule_results):
        fr = frames[i]
        f = rule_figure(fr[fr["seed"].isin(decide)], r, i, figdir, stats)
        r["figure"] = f["png"] if f else None
        if f:
            figures.append(f)
    over = (
        overoptimisation_section(metrics, finished, figdir, tabdir, decide)
        if spec.report.overoptimisation and len(metrics)
        else None
    )
    if over and over["figure"]:
        figures.append(over["figure"])

    content = (
        summary.to_csv(index=False, float_format="%.6g") + json.dumps(rule_results, sort_keys=True, default=str)
    ).encode()
    digest = hashlib.sha256(content).hexdigest()
    prov = provenance(final, srow, command)
    prov["study_file_sha256"] = hashlib.sha256(loaded.text.encode()).hexdigest()
    prov["exploration_seeds"], prov["confirmation_seeds"] = list(spec.seeds), list(spec.confirm_seeds)
    prov["statistics"] = stats.model_dump()
    year = _year(final)
    bib_id = f"workbench_{_slug(study)}_{digest[:10]}"
    bib = (
        f"@misc{{{bib_id},\n"
        f"  title = {{{{workbench study report: {study}}}}},\n  author = {{{{workbench developers}}}},\n"
        f"  year = {{{year}}},\n  note = {{Claims {', '.join(spec.claims)}; {prov['budget_consumed']['runs']} runs; "
        f"content sha256 {digest[:16]}; workbench {__version__}"
        + (f", commit {prov['git_commit'][:12]}" if prov["git_commit"] else "")
        + "},\n  howpublished = {Generated by \\texttt{workbench report}},\n}\n"
    )
    (out / "report.bib").write_text(bib)
    deviations = [d.model_dump(by_alias=True) for d in spec.deviations]
    verdict_doc = {
        "study": study,
        "claims": spec.claims,
        "verdicts": verdicts,
        "rules": rule_results,
        "exploration": {"seeds": list(spec.seeds), "verdicts": explore_verdicts, "rules": explore},
        "confirmation_seeds": sorted(decide),
        "statistics": stats.model_dump(),
        "deviations": deviations,
        "study_file_sha256": prov["study_file_sha256"],
        "claims_doc": {c: claim_link(c) for c in spec.claims},
        "report": {"md": "report.md", "html": "report.html", **({"pdf": "report.pdf"} if pdf else {})},
        "bibtex_id": bib_id,
    }
    (out / "verdicts.json").write_text(json.dumps(verdict_doc, indent=2, sort_keys=True, default=str))

    doc = _Document(
        study,
        srow,
        spec,
        verdicts,
        rule_results,
        explore_verdicts,
        explore,
        summary,
        pw,
        aggregates,
        figures,
        prov,
        bib,
        issues,
        deviations,
        over,
    )
    (out / "report.md").write_text(doc.markdown())
    page = doc.html(out)
    (out / "report.html").write_text(page)
    if pdf:
        _pdf(page, out / "report.pdf")
    else:
        (out / "report.pdf").unlink(missing_ok=True)  # an earlier report's PDF would not match this one
    return out


def _condition(df: pd.DataFrame, study_keys: set[str]) -> tuple[pd.Series, pd.Series]:
    """``(condition, method)`` of each run. A condition is a task and a point of the study's grid: the runs
    of one condition differ only in method and seed. A method is an algorithm label with the values
    of its own grid (``[[algorithms]] grid``), which are part of the method, not of the condition."""

    def label(g, own: bool) -> str:
        items = sorted((k, v) for k, v in (g or {}).items() if (k in study_keys) != own)
        return ", ".join(f"{k}={v}" for k, v in items)

    cond = df["grid"].map(lambda g: label(g, False))
    own = df["grid"].map(lambda g: label(g, True))
    return (
        df["task_label"].astype(str) + cond.map(lambda g: f" [{g}]" if g else ""),
        df["algo_label"].astype(str) + own.map(lambda g: f" [{g}]" if g else ""),
    )


def _with_counts(summary: pd.DataFrame, final: pd.DataFrame) -> pd.DataFrame:
    """The summary with each group's done / diverged / failed run counts (statistics use done runs only)."""
    counts = final.groupby("group")["status"].value_counts().unstack(fill_value=0) if len(final) else pd.DataFrame()
    counts = counts.reindex(columns=["done", *FAILED], fill_value=0).reset_index() if len(counts) else counts
    if summary.empty:
        return counts
    return summary.merge(counts, on="group", how="outer")  # a group whose every run failed still shows its counts


def _aggregates(finished: pd.DataFrame, metric_names: list[str], stats: Statistics) -> dict[str, pd.DataFrame]:
    """IQM and probability of improvement across conditions, when the study has several."""
    if not len(finished) or finished["condition"].nunique() < 2:
        return {}
    iqm, imp = (
        zip(*(aggregate(finished, m, "method", "condition", stats.level) for m in metric_names))
        if metric_names
        else ((), ())
    )
    out = {
        "aggregate_iqm": pd.concat(iqm, ignore_index=True) if iqm else pd.DataFrame(),
        "aggregate_improvement": pd.concat(imp, ignore_index=True) if imp else pd.DataFrame(),
    }
    return {k: v for k, v in out.items() if len(v)}


def _year(final: pd.DataFrame) -> int:

    t = (
        pd.to_numeric(final.get("finished_at"), errors="coerce").dropna()
        if "finished_at" in final
        else pd.Series([], dtype=float)
    )
    ts = t.max() if len(t) else 0
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).year if ts else datetime.date.today().year


def _verdict_rows(verdicts: dict, rule_results: list[dict], level: float) -> pd.DataFrame:
    rows = []
    ci = f"{level:.0%} CI"
    for claim, v in verdicts.items():
        rs = [r for r in rule_results if r["claim"] == claim]
        if not rs:
            rows.append(
                {
                    "claim": claim,
                    "claim verdict": v,
                    "rule": "(no rule)",
                    "rule verdict": "",
                    "estimate": math.nan,
                    ci: "n/a",
                    "n": "",
                    "excluded": "",
                    "figure": "",
                }
            )
        for r in rs:
            rows.append(
                {
                    "claim": claim,
                    "claim verdict": v,
                    "rule": _rule_text(r),
                    "rule verdict": r["verdict"],
                    "estimate": r["estimate"],
                    ci: _interval(r),
                    "n": _n_text(r),
                    "excluded": _failed_text(r),
                    "figure": r.get("figure") or "",
                }
            )
    return pd.DataFrame(rows)


def _n_text(r: dict) -> str:
    return (
        str(r["n_a"]) if r.get("n_b") is None else f"{r['n_a']} / {r['n_b']}" + (" paired" if r.get("paired") else "")
    )


def _failed_text(r: dict) -> str:
    """Failed or diverged runs of each side, and what was done with them."""
    parts = [f"{r[f'failed_{s}']} of {r[f'runs_{s}']}" for s in ("a", "b") if r.get(f"runs_{s}") is not None]
    if not any(r.get(f"failed_{s}") for s in ("a", "b")):
        return "none"
    how = "excluded" if r["failures"] == "exclude" else f"counted as {r['worst']:g}"
    return f"{' / '.join(parts)} failed or diverged, {how}"


ABOUT_VERDICTS = (
    "Verdicts are decided on the confirmation seeds only (seeds not looked at while the study was designed). "
    "Each rule's interval is a {level:.0%} {method} interval over seeds; a rule is supported when the whole interval "
    "lies on the claim's side, contradicted when it lies on the other side, inconclusive otherwise; unstable when "
    "more than a fifth of a side's runs failed or diverged; 'insufficient seeds' below {min_seeds} usable values on a "
    "side; 'not measured' when no finished run logged the metric. A claim is supported only if every one of its rules "
    "is: an intersection-union test, which needs no correction for the number of rules. A claim with a rule not "
    "measured or short of seeds is incomplete. Failed and diverged runs never lend a value logged before they failed. "
    "Each claim is stated, with what measures it, in the workbench's {doc}."
)
METHODS = {"t": "Student t (paired t for runs paired by seed, Welch otherwise)", "bca": "BCa bootstrap"}


class _Document:
    """The report as Markdown and as self-contained HTML, from the same pieces."""

    def __init__(
        self,
        study,
        srow,
        spec,
        verdicts,
        rule_results,
        explore_verdicts,
        explore,
        summary,
        pw,
        aggregates,
        figures,
        prov,
        bib,
        issues,
        deviations,
        over=None,
    ):
        self.__dict__.update(locals())
        del self.__dict__["self"]
        self.stats = spec.statistics
        self.about = ABOUT_VERDICTS.format(
            level=self.stats.level, method=METHODS[self.stats.interval], min_seeds=self.stats.min_seeds, doc=CLAIMS_DOC
        )

    def _notes(self, rule_results) -> list[tuple[str, str, str]]:
        """(claim, rule, note) lines: statements and declared confounds."""
        out = []
        for r in rule_results:
            if r.get("statement"):
                out.append((r["claim"], _rule_text(r), r["statement"]))
            if r.get("confounded"):
                out.append(
                    (r["claim"], _rule_text(r), f"Confounded comparison, declared by the study: {r['confounded']}")
                )
        return out

    def _seeds_line(self) -> str:
        p = self.prov
        return (
            f"Claims tested: {', '.join(self.spec.claims)}. "
            f"Exploration seeds: {', '.join(map(str, p['exploration_seeds']))}; "
            f"confirmation seeds: {', '.join(map(str, p['confirmation_seeds'])) or 'none declared'}. "
            f"Runs: {p['budget_consumed']['runs']} "
            f"({', '.join(f'{k}: {v}' for k, v in sorted(p['budget_consumed']['status'].items()))}). "
            f"Study file sha256: {p['study_file_sha256'][:16]}."
        )

    def markdown(self) -> str:
        lv = self.stats.level
        parts = [
            f"# Study report: {self.study}\n",
            f"{self.srow.get('description') or ''}\n",
            self._seeds_line() + "\n",
        ]
        parts.append("## Verdicts (confirmation seeds)\n")
        parts.append(self.about + "\n")
        parts.append(_md_table(_verdict_rows(self.verdicts, self.rule_results, lv)))
        parts += [
            f"- **[{c}]({claim_link(c)})** ({rule}): {note}\n" for c, rule, note in self._notes(self.rule_results)
        ]
        if self.deviations:
            parts.append("\n## Deviations declared by the study\n")
            parts.append("Settings changed after seeing results, as the study file declares them:\n")
            parts.append(_md_table(pd.DataFrame(self.deviations)))
        if self.explore:
            parts.append("\n## The same rules on the exploration seeds (they decide nothing)\n")
            parts.append(
                "These seeds guided the study's design; they are shown so a reader can see whether the "
                "confirmation agreed.\n"
            )
            parts.append(_md_table(_verdict_rows(self.explore_verdicts, self.explore, lv)))
        parts.append(
            f"\n## Final metrics (finished runs; mean, std and {lv:.0%} {self.stats.interval} interval over seeds; "
            "run counts by status)\n"
        )
        parts.append(_md_table(self.summary))
        parts.append("\n## Tests within each task and grid point\n")
        parts.append(
            "Paired t when the two groups' runs pair by seed, Welch otherwise; Holm-corrected across the "
            "comparisons of each metric. Groups without spread get no p-value.\n"
        )
        parts.append(_md_table(self.pw))
        for name, df in self.aggregates.items():
            parts.append(f"\n## {AGGREGATE_TITLES[name]}\n")
            parts.append(_md_table(df))
        if self.over:
            parts.append("\n## Over-optimisation: gold and proxy reward against d = sqrt(KL)\n")
            parts.append(OVER_ABOUT.format(seeds=", ".join(map(str, self.over["seeds"]))) + "\n")
            parts.append(_md_table(self.over["fits"]))
            parts.append("\nEach run's gold gain at its peak and at the end, and the proxy gain at both:\n")
            parts.append(_md_table(self.over["peaks"]))
        parts.append("\n## Figures\n")
        parts += [f"![{f['name']}]({f['png']})\n" for f in self.figures]
        if self.issues:
            parts.append("\n## Runs skipped by the loader\n")
            parts += [f"- `{i['run_id']}`: {i['problem']}\n" for i in self.issues]
        parts.append("\n## Provenance\n```json\n" + json.dumps(self.prov, indent=2, sort_keys=True) + "\n```\n")
        parts.append(
            "\n## How to cite\n```bibtex\n" + self.bib + "```\nand the workbench itself: see `CITATION.cff`.\n"
        )
        return "\n".join(parts)

    def html(self, out: Path) -> str:
        e = html.escape

        def table(df: pd.DataFrame) -> str:
            if df is None or df.empty:
                return "<p><em>(none)</em></p>"
            return df.to_html(index=False, float_format=lambda v: format(v, ".4g"), na_rep="", border=0, classes="t")

        def verdict_table(verdicts, rule_results) -> str:
            vrows = _verdict_rows(verdicts, rule_results, self.stats.level)
            head = "".join(f"<th>{e(c)}</th>" for c in vrows.columns if c != "figure")
            body = ""
            for r in vrows.to_dict("records"):
                cells = []
                for c, v in r.items():
                    if c == "figure":
                        continue
                    if c == "claim":
                        cells.append(f"<td><a href='{e(claim_link(v))}'>{e(v)}</a></td>")
                    elif c in ("claim verdict", "rule verdict") and v in VERDICT_COLOURS:
                        cells.append(f"<td style='color:{VERDICT_COLOURS[v]};font-weight:bold'>{e(v)}</td>")
                    elif isinstance(v, float):
                        cells.append(f"<td>{'' if math.isnan(v) else format(v, '.4g')}</td>")
                    else:
                        cells.append(f"<td>{e(str(v))}</td>")
                body += "<tr>" + "".join(cells) + "</tr>"
            return f"<table class='t'><tr>{head}</tr>{body}</table>"

        figs = "".join(
            f"<figure><img alt='{e(f['name'])}' src='{_img(out / f['png'])}'/>"
            f"<figcaption>{e(f['name'])}</figcaption></figure>"
            for f in self.figures
        )
        skipped = "".join(f"<li><code>{e(i['run_id'])}</code>: {e(i['problem'])}</li>" for i in self.issues)
        notes = "".join(
            f"<li><b>{e(c)}</b> ({e(rule)}): {e(note)}</li>" for c, rule, note in self._notes(self.rule_results)
        )
        dev = (
            f"<h2>Deviations declared by the study</h2><p>Settings changed after seeing results, as the study file "
            f"declares them:</p>{table(pd.DataFrame(self.deviations))}"
            if self.deviations
            else ""
        )
        exp = (
            f"<h2>The same rules on the exploration seeds (they decide nothing)</h2><p>These seeds guided the study's "
            f"design; they are shown so a reader can see whether the confirmation agreed.</p>"
            f"{verdict_table(self.explore_verdicts, self.explore)}"
            if self.explore
            else ""
        )
        aggs = "".join(f"<h2>{e(AGGREGATE_TITLES[k])}</h2>{table(v)}" for k, v in self.aggregates.items())
        if self.over:
            aggs += (
                "<h2>Over-optimisation: gold and proxy reward against d = sqrt(KL)</h2>"
                f"<p>{e(OVER_ABOUT.format(seeds=', '.join(map(str, self.over['seeds']))))}</p>"
                f"{table(self.over['fits'])}"
                f"<p>Each run's gold gain at its peak and at the end, and the proxy gain at both:</p>"
                f"{table(self.over['peaks'])}"
            )
        lv = self.stats.level
        return f"""<!doctype html><html><head><meta charset="utf-8"><title>workbench report: {e(self.study)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto;font-size:11pt}} \
table{{border-collapse:collapse;font-size:9pt}}
td,th{{border-bottom:1px solid #ddd;padding:2px 6px;text-align:left}} figure{{margin:1em 0;page-break-inside:avoid}}
img{{max-width:100%}} pre{{font-size:8pt;white-space:pre-wrap;background:#f6f8fa;padding:.5em}}</style></head><body>
<h1>Study report: {e(self.study)}</h1><p>{e(self.srow.get("description") or "")}</p>
<p>{e(self._seeds_line())}</p>
<h2>Verdicts (confirmation seeds)</h2><p>{e(self.about)}</p>
{verdict_table(self.verdicts, self.rule_results)}
<ul>{notes}</ul>{dev}{exp}
<h2>Final metrics</h2><p>Finished runs only; mean, std and {lv:.0%} {self.stats.interval} interval over seeds; \
run counts by
status.</p>{table(self.summary)}
<h2>Tests within each task and grid point</h2><p>Paired t when the two groups' runs pair by seed, Welch otherwise;
Holm-corrected across the comparisons of each metric. Groups without spread get no p-value.</p>{table(self.pw)}
{aggs}
<h2>Figures</h2>{figs}
{"<h2>Runs skipped by the loader</h2><ul>" + skipped + "</ul>" if skipped else ""}
<h2>Provenance</h2><pre>{e(json.dumps(self.prov, indent=2, sort_keys=True))}</pre>
<h2>How to cite</h2><pre>{e(self.bib)}</pre><p>and the workbench itself: see <code>CITATION.cff</code>.</p>
</body></html>"""


AGGREGATE_TITLES = {
    "aggregate_iqm": "Across tasks and grid points: interquartile mean (stratified bootstrap interval)",
    "aggregate_improvement": (
        "Across tasks and grid points: probability that a's value exceeds b's (stratified bootstrap interval)"
    ),
}


def _img(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _pdf(page: str, path: Path) -> None:

    from weasyprint import HTML  # heavy optional: WeasyPrint loads only to write the PDF

    logging.getLogger("weasyprint").setLevel(logging.ERROR)
    logging.getLogger("fontTools").setLevel(logging.ERROR)
    HTML(string=page).write_pdf(path, pdf_identifier=b"workbench-report", uncompressed_pdf=False)
