"""Summaries of a study's results for a terminal: ``summarize`` gives, per task x algorithm x grid
point, the run counts and the mean / std over seeds of the final metrics; ``format_summary``
prints it (``workbench run``, ``workbench status``); ``text_table`` lays out any plain table.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import pandas as pd

from ..results import LoadWarning, load_final
from .plan import grid_label

SUMMARY_METRICS = (
    "reward/exact",
    "kl/exact",
    "kl/exact_to_optimal",
    "reward/eval",
)  # reward/eval: non-enumerable tasks


def summarize(results, study: str) -> Any:
    """Per task x algorithm x grid point: run counts and mean / std over seeds of the final metrics.

    Only runs that finished ``done`` enter the statistics; diverged and failed runs are counted.
    Runs whose files cannot be read are counted as ``unreadable`` (not done), left out of the
    statistics and listed in ``df.attrs["issues"]``.
    """

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LoadWarning)  # reported through attrs["issues"]
        final = load_final(results, study)
    final["grid_label"] = final["grid"].map(grid_label)
    unreadable = {i["run_id"] for i in final.attrs.get("issues", [])}  # finished, but its metrics do not load
    keys = ["task_label", "algo_label", "grid_label"]
    rows = []
    for key, g in final.groupby(keys, sort=False):
        bad = g["run_id"].isin(unreadable)
        ok = g[(g["status"] == "done") & ~bad]
        row = dict(zip(keys, key))
        row.update({s: int(((g["status"] == s) & ~bad).sum()) for s in ("done", "diverged", "failed")}, runs=len(g))
        row["unreadable"] = int(bad.sum())
        for m in SUMMARY_METRICS:
            vals = ok[m].dropna() if m in ok else pd.Series(dtype=float)
            row[f"{m}:mean"] = vals.mean() if len(vals) else float("nan")
            row[f"{m}:std"] = vals.std(ddof=1) if len(vals) > 1 else float("nan")
        rows.append(row)
    df = pd.DataFrame(rows)
    if not len(df):
        return df
    unused = [m for m in SUMMARY_METRICS if df[f"{m}:mean"].isna().all()]
    if "reward/exact" not in unused:  # exact beats sampled: show the sampled reward only without enumeration
        unused.append("reward/eval")
    df = df.drop(columns=[c for m in unused for c in (f"{m}:mean", f"{m}:std")])
    df.attrs["issues"] = final.attrs.get("issues", [])
    return df


def format_summary(df) -> str:
    """A text table: mean ± std (sample std over seeds) of each final metric."""

    if df is None or not len(df):
        return "(no runs)"
    metrics = [m for m in SUMMARY_METRICS if f"{m}:mean" in df]
    show_grid = (df["grid_label"] != "").any()
    head = ["task", "algorithm"] + (["grid"] if show_grid else []) + ["done"] + metrics
    body = []
    for _, r in df.iterrows():
        extra = "".join(f" {r[s]} {s}" for s in ("diverged", "failed", "unreadable") if r.get(s, 0))
        cells = (
            [r["task_label"], r["algo_label"]]
            + ([r["grid_label"]] if show_grid else [])
            + [f"{r['done']}/{r['runs']}{extra}"]
        )
        for m in metrics:
            mean, std = r[f"{m}:mean"], r[f"{m}:std"]
            cells.append(
                "-" if math.isnan(mean) else f"{mean:.4f} ± {std:.4f}" if not math.isnan(std) else f"{mean:.4f}"
            )
        body.append(cells)
    return text_table(head, body)


def text_table(head: list[str], rows: list[list]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])
