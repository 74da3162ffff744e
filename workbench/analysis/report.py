"""``workbench report STUDY``: a finished study as a document someone can cite.

Reads the study only through the store's loader and writes to ``--out`` (default
``<results>/reports/<study>/``)::

    report.md  report.html (self-contained)  report.pdf  report.bib  verdicts.json
    figures/<name>.png and .svg       tables/<name>.csv

Contents: verdicts per claim (``workbench.analysis.verdicts``) with the figure and the
interval that decided each; final metrics per group with 95% bootstrap intervals over
seeds; Holm-corrected pairwise tests; learning curves with 95% bands over seeds;
provenance; how to cite. Tables and figures are byte-stable: re-running the report on the
same results rewrites the same files (seeded bootstrap, PNG/SVG without dates).
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd

from .. import __version__
from .verdicts import at_step, bootstrap_ci, claim_verdicts, evaluate_rule, pairwise, rule_groups, summarise

DEFAULT_METRICS = ("reward/exact", "kl/exact", "kl/exact_to_optimal", "reward/eval")
PACKAGES = ("torch", "transformers", "trl", "numpy", "pandas", "scipy", "matplotlib", "seaborn", "pyarrow")
VERDICT_COLOURS = {"supported": "#1a7f37", "contradicted": "#cf222e", "inconclusive": "#9a6700", "not measured": "#57606a"}


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in s).strip("_")


# -- figures --------------------------------------------------------------------------------------


def _matplotlib():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    if grid.nunique() > 1:
        label = label + " [" + grid + "]"
    if df["task_label"].nunique() > 1:
        label = df["task_label"].astype(str) + ": " + label
    return label


def curve_figure(metrics: pd.DataFrame, runs: pd.DataFrame, metric: str, figdir: Path) -> dict | None:
    """``metric`` over update steps per group: mean and 95% bootstrap band over seeds."""
    import seaborn as sns

    plt = _matplotlib()
    if metric not in metrics:
        return None
    df = metrics[["run_id", "step", metric]].dropna()
    if df.empty:
        return None
    lab = runs.drop_duplicates("run_id").set_index("run_id")["group"]
    df = df.assign(group=df["run_id"].map(lab)).dropna(subset=["group"]).sort_values(["group", "run_id", "step"])
    fig, ax = plt.subplots(figsize=(7, 4))
    sns.lineplot(data=df, x="step", y=metric, hue="group", errorbar=("ci", 95), n_boot=1000, seed=0, ax=ax)
    ax.set_title(f"{metric}: mean and 95% CI over seeds")
    ax.set_xlabel("update step")
    if metric.startswith("kl/") and (df[metric] > 0).all() and df[metric].max() / max(df[metric].min(), 1e-12) > 100:
        ax.set_yscale("log")
    ax.legend(fontsize=7, loc="best")
    out = _save(fig, figdir, f"curve_{_slug(metric)}")
    plt.close(fig)
    return out


def rule_figure(final: pd.DataFrame, result: dict, index: int, figdir: Path) -> dict | None:
    """Final ``metric`` of the rule's groups (at ``step`` for a rule with one): each seed, the mean and its 95% interval."""
    plt = _matplotlib()
    m = result["metric"]
    groups = [(name, g[m].dropna().to_numpy(float) if m in g else np.array([])) for name, g in rule_groups(final, result)]
    if not any(len(x) for _, x in groups):
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for i, (_, x) in enumerate(groups):
        ax.scatter(np.full(len(x), i) + np.linspace(-0.08, 0.08, len(x)), x, s=14, color="#888")
        if len(x):
            lo, hi = bootstrap_ci(x)
            if math.isfinite(lo):
                ax.errorbar([i], [x.mean()], yerr=[[x.mean() - lo], [hi - x.mean()]], fmt="o", color="k", capsize=5)
            else:
                ax.plot([i], [x.mean()], "o", color="k")
    if result.get("threshold") is not None:
        ax.axhline(result["threshold"], ls="--", color=VERDICT_COLOURS["inconclusive"], lw=1)
    ax.set_xticks(range(len(groups)), [name for name, _ in groups], fontsize=8)
    ax.set_ylabel(m if result.get("step") is None else f"{m} at step {result['step']}")
    ax.set_title(f"{result['claim']}: {result['verdict']}", color=VERDICT_COLOURS[result["verdict"]])
    out = _save(fig, figdir, f"verdict_{index}_{result['claim']}_{_slug(m)}")
    plt.close(fig)
    return out


# -- provenance -----------------------------------------------------------------------------------


def _git(*args: str) -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
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
        "hardware": {"platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
                     "cpu_count": __import__("os").cpu_count(), "run_devices": devices},  # fmt: skip
        "command": " ".join(command if command is not None else sys.argv),
        "budget_consumed": {
            "runs": int(runs["run_id"].nunique()),
            "update_steps": int(pd.to_numeric(runs.get("final_step", runs.get("step")), errors="coerce").fillna(0).sum()),
            "samples": int(pd.to_numeric(runs.get("final_samples", runs.get("samples")), errors="coerce").fillna(0).sum()),
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
    lo, hi = r["ci_low"], r["ci_high"]
    if not (isinstance(lo, float) and math.isfinite(lo)):
        return "n/a"
    return f"[{lo:.4g}, {hi:.4g}]"


def _rule_text(r: dict) -> str:
    where = "".join(f", {k}={v}" for k, v in (r.get("where") or {}).items())
    side = {s: r[s] + "".join(f" [{k}={v}]" for k, v in (r.get(f"{s}_where") or {}).items()) for s in ("a", "b") if r.get(s)}
    if r["kind"] in ("below", "above"):
        core = f"{r['metric']} of {side['a']} {r['kind']} {r['threshold']}"
    elif r["kind"] == "equivalent":
        core = f"|{r['metric']}({side['a']}) - {r['metric']}({side['b']})| < {r['margin']}"
    elif r["kind"] == "noninferior":
        core = f"{r['metric']}: {side['a']} > {side['b']} - {r['margin']}"
    else:
        core = f"{r['metric']}: {side['a']} {'>' if r['kind'] == 'greater' else '<'} {side['b']}"
    at = f", at step {r['step']}" if r.get("step") is not None else ""
    return core + where + at


def build_report(study: str, results=None, out: str | Path | None = None, command: list[str] | None = None) -> Path:
    """Write the report of ``study``; returns the output folder."""
    from ..store import load_final, load_metrics, load_studies, results_dir
    from ..study import load_study

    root = results_dir(results)
    studies = load_studies(root)
    if study not in set(studies["name"]):
        raise ValueError(f"no study {study!r} in {root}; studies there: {', '.join(studies['name']) or 'none'}")
    srow = studies[studies["name"] == study].iloc[0].to_dict()
    spec = load_study(root / "studies" / f"{study}.toml").config
    out = Path(out) if out else root / "reports" / study
    figdir, tabdir = out / "figures", out / "tables"
    figdir.mkdir(parents=True, exist_ok=True)
    tabdir.mkdir(parents=True, exist_ok=True)

    final = load_final(root, study)
    issues = list(final.attrs.get("issues", []))
    finished = final[final["status"].isin(["done", "diverged"])].copy()
    finished["group"] = _group_label(finished) if len(finished) else []
    metrics = load_metrics(root, study) if len(finished) else pd.DataFrame()
    metric_names = list(getattr(spec, "report", None).metrics) if getattr(spec, "report", None) else list(DEFAULT_METRICS)
    metric_names = [m for m in metric_names if m in finished]

    # tables
    summary = summarise(finished, metric_names, ["group"]) if metric_names else pd.DataFrame()
    pw = pd.concat([pairwise(finished, m, "group") for m in metric_names], ignore_index=True) if metric_names else pd.DataFrame()
    rules = list(getattr(spec, "verdicts", []) or [])
    frames = {r.step: finished if r.step is None else at_step(finished, metrics, r.step) for r in rules}
    rule_results = [evaluate_rule(frames[r.step], r) for r in rules]
    for r in rule_results:
        if r["claim"] not in spec.claims:
            raise ValueError(f"verdict rule on {r['claim']}, which study {study!r} does not list in claims")
    verdicts = claim_verdicts(rule_results)
    for c in spec.claims:
        verdicts.setdefault(c, "not measured")
    runs_table = finished[["group", "seed", "status", "run_id"] + metric_names].sort_values(["group", "seed"])
    summary.to_csv(tabdir / "final_metrics.csv", index=False, float_format="%.6g")
    pw.to_csv(tabdir / "pairwise_tests.csv", index=False, float_format="%.6g")
    runs_table.to_csv(tabdir / "runs.csv", index=False, float_format="%.6g")
    rr = pd.DataFrame(rule_results)
    if len(rr):
        rr = rr.assign(**{c: rr[c].map(lambda w: json.dumps(w, sort_keys=True)) for c in ("where", "a_where", "b_where")})
    rr.to_csv(tabdir / "verdict_rules.csv", index=False, float_format="%.6g")

    # figures
    figures = [f for m in metric_names if (f := curve_figure(metrics, finished, m, figdir))]
    for i, r in enumerate(rule_results):
        f = rule_figure(frames[r["step"]], r, i, figdir)
        r["figure"] = f["png"] if f else None
        if f:
            figures.append(f)

    content = (summary.to_csv(index=False, float_format="%.6g") + json.dumps(rule_results, sort_keys=True, default=str)).encode()
    digest = hashlib.sha256(content).hexdigest()
    prov = provenance(final, srow, command)
    year = _year(final)
    bib_id = f"workbench_{_slug(study)}_{digest[:10]}"
    bib = (
        f"@misc{{{bib_id},\n  title = {{{{workbench study report: {study}}}}},\n  author = {{{{workbench developers}}}},\n"
        f"  year = {{{year}}},\n  note = {{Claims {', '.join(spec.claims)}; {prov['budget_consumed']['runs']} runs; "
        f"content sha256 {digest[:16]}; workbench {__version__}"
        + (f", commit {prov['git_commit'][:12]}" if prov["git_commit"] else "")
        + "},\n  howpublished = {Generated by \\texttt{workbench report}},\n}\n"
    )
    (out / "report.bib").write_text(bib)
    verdict_doc = {
        "study": study, "claims": spec.claims, "verdicts": verdicts, "rules": rule_results,
        "report": {"md": "report.md", "html": "report.html", "pdf": "report.pdf"}, "bibtex_id": bib_id,
    }  # fmt: skip
    (out / "verdicts.json").write_text(json.dumps(verdict_doc, indent=2, sort_keys=True, default=str))

    md = _markdown(study, srow, spec, verdicts, rule_results, summary, pw, figures, prov, bib, issues, finished)
    (out / "report.md").write_text(md)
    page = _html(study, srow, spec, verdicts, rule_results, summary, pw, figures, prov, bib, issues, out)
    (out / "report.html").write_text(page)
    _pdf(page, out / "report.pdf")
    return out


def _year(final: pd.DataFrame) -> int:
    import datetime

    t = pd.to_numeric(final.get("finished_at"), errors="coerce").dropna() if "finished_at" in final else pd.Series([], dtype=float)
    ts = t.max() if len(t) else 0
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).year if ts else datetime.date.today().year


def _verdict_rows(verdicts, rule_results) -> pd.DataFrame:
    rows = []
    for claim, v in verdicts.items():
        rs = [r for r in rule_results if r["claim"] == claim]
        if not rs:
            rows.append({"claim": claim, "verdict": v, "rule": "(no rule)", "estimate": math.nan, "95% CI": "n/a", "n": 0, "figure": ""})
        for r in rs:
            rows.append({"claim": claim, "verdict": v, "rule": _rule_text(r), "estimate": r["estimate"],
                         "95% CI": _interval(r), "n": r["n"], "figure": r.get("figure") or ""})  # fmt: skip
    return pd.DataFrame(rows)


def _markdown(study, srow, spec, verdicts, rule_results, summary, pw, figures, prov, bib, issues, finished) -> str:
    parts = [f"# Study report: {study}\n", f"{srow.get('description') or ''}\n",
             f"Claims tested: {', '.join(spec.claims)}. Seeds: {', '.join(map(str, prov['seeds']))}. "
             f"Runs: {prov['budget_consumed']['runs']} ({', '.join(f'{k}: {v}' for k, v in sorted(prov['budget_consumed']['status'].items()))}).\n"]  # fmt: skip
    parts.append("## Verdicts\n")
    parts.append("A verdict follows the 95% bootstrap interval over seeds: supported when the whole interval lies on the "
                 "claim's side, contradicted when it lies on the other side, inconclusive otherwise.\n")  # fmt: skip
    parts.append(_md_table(_verdict_rows(verdicts, rule_results)))
    for r in rule_results:
        if r.get("statement"):
            parts.append(f"- **{r['claim']}** ({_rule_text(r)}): {r['statement']}\n")
    parts.append("\n## Final metrics (mean, std and 95% bootstrap CI over seeds)\n")
    parts.append(_md_table(summary))
    parts.append("\n## Pairwise tests (Welch's t-test, Holm-corrected across all comparisons of a metric)\n")
    parts.append(_md_table(pw))
    parts.append("\n## Figures\n")
    parts += [f"![{f['name']}]({f['png']})\n" for f in figures]
    if issues:
        parts.append("\n## Runs skipped by the loader\n")
        parts += [f"- `{i['run_id']}`: {i['problem']}\n" for i in issues]
    parts.append("\n## Provenance\n```json\n" + json.dumps(prov, indent=2, sort_keys=True) + "\n```\n")
    parts.append("\n## How to cite\n```bibtex\n" + bib + "```\nand the workbench itself: see `CITATION.cff`.\n")
    return "\n".join(parts)


def _img(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _html(study, srow, spec, verdicts, rule_results, summary, pw, figures, prov, bib, issues, out: Path) -> str:
    e = html.escape

    def table(df: pd.DataFrame) -> str:
        if df.empty:
            return "<p><em>(none)</em></p>"
        return df.to_html(index=False, float_format=lambda v: format(v, ".4g"), na_rep="", border=0, classes="t")

    vrows = _verdict_rows(verdicts, rule_results)
    vhtml = "".join(
        f"<tr><td>{e(r.claim)}</td><td style='color:{VERDICT_COLOURS[r.verdict]};font-weight:bold'>{e(r.verdict)}</td>"
        f"<td>{e(r.rule)}</td><td>{'' if math.isnan(r.estimate) else format(r.estimate, '.4g')}</td><td>{e(r._5)}</td><td>{r.n}</td></tr>"
        for r in vrows.itertuples()
    )
    figs = "".join(
        f"<figure><img alt='{e(f['name'])}' src='{_img(out / f['png'])}'/><figcaption>{e(f['name'])}</figcaption></figure>"
        for f in figures
    )
    skipped = "".join(f"<li><code>{e(i['run_id'])}</code>: {e(i['problem'])}</li>" for i in issues)
    statements = "".join(f"<li><b>{e(r['claim'])}</b>: {e(r['statement'])}</li>" for r in rule_results if r.get("statement"))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>workbench report: {e(study)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto;font-size:11pt}} table{{border-collapse:collapse;font-size:9pt}}
td,th{{border-bottom:1px solid #ddd;padding:2px 6px;text-align:left}} figure{{margin:1em 0;page-break-inside:avoid}}
img{{max-width:100%}} pre{{font-size:8pt;white-space:pre-wrap;background:#f6f8fa;padding:.5em}}</style></head><body>
<h1>Study report: {e(study)}</h1><p>{e(srow.get('description') or '')}</p>
<p>Claims tested: {e(', '.join(spec.claims))}. Seeds: {e(', '.join(map(str, prov['seeds'])))}.</p>
<h2>Verdicts</h2><p>A verdict follows the 95% bootstrap interval over seeds: supported when the whole interval lies on the
claim's side, contradicted when it lies on the other side, inconclusive otherwise.</p>
<table class="t"><tr><th>claim</th><th>verdict</th><th>rule</th><th>estimate</th><th>95% CI</th><th>n</th></tr>{vhtml}</table>
<ul>{statements}</ul>
<h2>Final metrics</h2>{table(summary)}
<h2>Pairwise tests</h2><p>Welch's t-test, Holm-corrected across the comparisons of each metric.</p>{table(pw)}
<h2>Figures</h2>{figs}
{'<h2>Runs skipped by the loader</h2><ul>' + skipped + '</ul>' if skipped else ''}
<h2>Provenance</h2><pre>{e(json.dumps(prov, indent=2, sort_keys=True))}</pre>
<h2>How to cite</h2><pre>{e(bib)}</pre><p>and the workbench itself: see <code>CITATION.cff</code>.</p>
</body></html>"""


def _pdf(page: str, path: Path) -> None:
    import logging

    from weasyprint import HTML

    logging.getLogger("weasyprint").setLevel(logging.ERROR)
    logging.getLogger("fontTools").setLevel(logging.ERROR)
    HTML(string=page).write_pdf(path, pdf_identifier=b"workbench-report", uncompressed_pdf=False)
