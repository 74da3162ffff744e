"""The dashboard's reads: the loader of ``workbench.results``, cached.

Every function takes the results folder and a *signature* of the index (the size and
modification time of ``index.sqlite`` and its WAL): Streamlit's cache keys on it, so a
page re-reads the store only after something wrote to the index (a run claimed, finished,
or its heartbeat refreshed while it runs). Large metric frames are cached once per
process as resources (no copy per rerun; callers must not modify them); small tables as
data. The loader's ``LoadWarning`` is silenced here: the issues come back with the data
and the pages show them.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pandas as pd
import streamlit as st

import workbench.results as store
from workbench.results import loader

ONLINE_UNIT = "completions"  # a run that counts sampled completions learns online (RL); demos / pairs: offline


def results() -> Path:
    """The results folder: ``$WORKBENCH_RESULTS`` (``workbench dashboard --results`` sets it), else ./results."""
    return store.results_dir(None).resolve()


def signature(root: Path) -> tuple:
    """What changes whenever the index is written: (mtime, size) of the database and its WAL."""
    out = []
    for name in (store.INDEX, store.INDEX + "-wal"):
        try:
            s = os.stat(root / name)
            out.append((s.st_mtime_ns, s.st_size))
        except FileNotFoundError:
            out.append(None)
    return tuple(out)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", store.LoadWarning)
        return fn(*args, **kwargs)


def has_index(root: Path) -> bool:
    return (root / store.INDEX).exists()


@st.cache_data(show_spinner=False, max_entries=64)
def studies(root: Path, sig: tuple) -> pd.DataFrame:
    return store.load_studies(root)


@st.cache_data(show_spinner=False, max_entries=64)
def runs(root: Path, study: str | None, sig: tuple) -> pd.DataFrame:
    """One row per (study, run), plus ``online``, ``grid_label`` and ``batch_size`` from the config."""
    import json

    df = store.load_runs(root, study)
    df["online"] = df["unit"] == ONLINE_UNIT
    df["grid_label"] = df["grid"].map(grid_label)
    df["algo_label"] = df["algo_label"].fillna(df["algo"])
    df["task_label"] = df["task_label"].fillna(df["task"])
    cfg = [json.loads(c) if isinstance(c, str) else {} for c in df["config"]]
    df["batch_size"] = [c.get("batch_size") for c in cfg]
    df["beta"] = [c.get("beta") for c in cfg]
    return df


def grid_label(grid: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in grid.items()) if isinstance(grid, dict) else ""


@st.cache_data(show_spinner=False, max_entries=64)
def metric_names(root: Path, study: str | None, sig: tuple) -> list[str]:
    return loader.metric_names(root, study)


@st.cache_resource(show_spinner=False, max_entries=16)
def metrics(
    root: Path,
    study: str | None,
    columns: tuple[str, ...],
    sig: tuple,
    run_ids: tuple[str, ...] | None = None,
    unpublished: bool = True,
) -> tuple[pd.DataFrame, list]:
    """``(frame, issues)``: ``run_id``, ``step``, ``samples`` and ``columns`` of the runs (all, or ``run_ids``);
    read-only, shared.

    Pages pass the runs their filters show: a first render reads only those files.
    """
    df = _quiet(store.load_metrics, root, study, run_ids=run_ids, unpublished=unpublished, columns=list(columns))
    return df, df.attrs.get("issues", [])


@st.cache_resource(show_spinner=False, max_entries=16)
def final(root: Path, study: str | None, columns: tuple[str, ...], sig: tuple) -> tuple[pd.DataFrame, list]:
    """``(frame, issues)``: one row per (study, run) with the last logged value of each of ``columns``.

    A diverged or failed run's values are blanked: its last logged value predates the failure
    (often the untrained policy's) and must not reach a figure or a table.
    """
    df = _quiet(store.load_final, root, study, columns=list(columns))
    if "status" in df:
        gone = df["status"].isin(["diverged", "failed"])
        df.loc[gone, [c for c in columns if c in df]] = float("nan")
    if "online" not in df:
        extra = runs(root, study, sig)[["run_id", "online", "grid_label", "batch_size", "beta"]].drop_duplicates(
            "run_id"
        )
        df = df.merge(extra, on="run_id", how="left")
    return df, df.attrs.get("issues", [])


@st.cache_data(show_spinner=False, ttl=2, max_entries=32)
def run_files(root: Path, run_id: str, sig: tuple) -> dict:
    return store.load_run(root, run_id)


@st.cache_data(show_spinner=False, ttl=2, max_entries=32)
def run_metrics(root: Path, run_id: str, sig: tuple) -> tuple[pd.DataFrame, list]:
    """All metrics of one run, in progress or published (cached 2 s: a live run's file grows)."""
    df = _quiet(store.load_metrics, root, run_ids=[run_id], unpublished=True)
    return df, df.attrs.get("issues", [])


@st.cache_data(show_spinner=False, max_entries=16)
def credit(root: Path, study: str | None, sig: tuple) -> tuple[pd.DataFrame, list]:
    df = _quiet(store.load_credit, root, study)
    return df, df.attrs.get("issues", [])


@st.cache_data(show_spinner=False, max_entries=16)
def probes(root: Path, what: str, study: str | None, sig: tuple) -> tuple[pd.DataFrame, list]:
    df = _quiet(store.load_probes, root, what, study)
    return df, df.attrs.get("issues", [])


@st.cache_data(show_spinner=False, max_entries=16)
def policies(root: Path, run_ids: tuple[str, ...], sig: tuple) -> dict:
    return store.load_policies(root, run_ids)


def reports_signature(root: Path) -> tuple:
    files = sorted((root / "reports").glob(f"*/{store.VERDICTS}"))
    return tuple((str(f), f.stat().st_mtime_ns) for f in files)


@st.cache_data(show_spinner=False, max_entries=8)
def verdicts(root: Path, sig: tuple) -> tuple[pd.DataFrame, list]:
    df = store.load_verdicts(root)
    return df, df.attrs.get("issues", [])
