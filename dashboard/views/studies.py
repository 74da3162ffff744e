"""Studies: every study and run with its status and budget; live while runs are going; open a run."""

import json

import pandas as pd
import streamlit as st
from board import charts, data, samples, ui

from workbench.results import STATUSES

LIVE_S = 2.0  # refresh period of a study with runs queued or running

ctx = ui.current()
st.title("Studies")


def studies_table(studies: pd.DataFrame) -> None:
    s = studies.copy()
    s["finished"] = s["done"] + s["diverged"]
    s["progress"] = s["finished"] / s["n_runs"].clip(lower=1)
    s["claims"] = s["claims"].map(", ".join)
    st.dataframe(
        s[["name", "claims", "n_runs", *STATUSES, "progress", "description"]],
        hide_index=True,
        key="studies_table",
        column_config={
            "n_runs": "runs",
            "progress": st.column_config.ProgressColumn("finished", format="percent", min_value=0, max_value=1),
        },
    )


def budget(runs: pd.DataFrame) -> str:
    """Steps x batch size per run, in the run's own unit; per algorithm when they differ."""
    parts = []
    for (steps, bs, unit), g in runs.groupby(["steps", "batch_size", "unit"], dropna=False):
        algos = ", ".join(dict.fromkeys(g["algo_label"]))
        total = int(steps) * int(bs) if bs == bs and bs is not None else None
        parts.append(
            f"**{algos}**: {int(steps)} update rounds x {bs} {unit}"
            + (f" = up to {total:,} {unit} per run" if total else "")
        )
    return "; ".join(parts)


def progress_of(r) -> tuple[float | None, float | None]:
    """(step, samples) from the index for finished runs, from the metrics file's last line for running ones."""
    if r["status"] == "running":
        row = data.store.read_progress(r["path"]) or {}
        return row.get("step"), row.get("samples")
    return r["step"], r["samples"]


def runs_table(runs: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for r in runs.to_dict("records"):
        step, samples = progress_of(r)
        status = r["status"] + (" (stale: owner gone)" if r["stale"] else "")
        rows.append(
            {
                "algorithm": r["algo_label"],
                "grid": r["grid_label"],
                "task": r["task_label"],
                "seed": r["seed"],
                "status": status,
                "step": "-" if step is None or step != step else f"{int(step)}",  # not started: no step yet
                "steps": r["steps"],
                "progress": (step or 0) / max(r["steps"], 1) if step == step and step is not None else 0.0,
                "consumed": f"{int(samples):,} {r['unit']}" if samples == samples and samples is not None else "-",
                "attempts": r["attempts"],
                "run_id": r["run_id"],
                "reason": r["reason"] or "",
            }
        )
    return pd.DataFrame(rows)


def study_view(live: bool) -> None:
    """Both tables, counts and budget: a fragment that reruns alone every ``LIVE_S`` while live."""
    sig = data.signature(ctx.root)
    runs = data.runs(ctx.root, ctx.study, sig)
    if live != bool(runs["status"].isin(["queued", "running"]).any()):
        st.rerun()  # started or finished: the whole page again, to start or stop the timer
    st.subheader("All studies")
    studies_table(data.studies(ctx.root, sig))
    row = ctx.studies[ctx.studies["name"] == ctx.study].iloc[0]
    st.subheader(f"Study {ctx.study}")
    st.caption(f"{row['description']}  \nclaims: {', '.join(row['claims']) or '-'} · file: `{row['path']}`")
    counts = runs["status"].value_counts()
    cols = st.columns(len(STATUSES) + 1)
    cols[0].metric("runs", len(runs))
    for c, status in zip(cols[1:], STATUSES):
        c.metric(status, int(counts.get(status, 0)))
    if live:
        st.caption(f"live: refreshing every {LIVE_S:g} s while runs are queued or running")
    st.markdown("Budget: " + budget(runs))
    st.dataframe(
        runs_table(runs),
        hide_index=True,
        key="runs_table",
        column_config={
            "progress": st.column_config.ProgressColumn("progress", format="percent", min_value=0, max_value=1)
        },
    )


runs = ctx.runs()
live = bool(runs["status"].isin(["queued", "running"]).any())
st.fragment(run_every=LIVE_S if live else None)(study_view)(live)

st.subheader("Open a run")
labels = {
    r["run_id"]: (
        f"{r['algo_label']}{' [' + r['grid_label'] + ']' if r['grid_label'] else ''} / {r['task_label']} / "
        f"seed {r['seed']} ({r['run_id']})"
    )
    for r in runs.to_dict("records")
}


def _run_to_url() -> None:
    """Keep ``?run=RUN_ID`` in the URL in step with the picker (the id, not the label a bound selectbox would write)."""
    if st.session_state.get("run") is None:
        st.query_params.pop("run", None)
    else:
        st.query_params["run"] = st.session_state["run"]


wanted = st.query_params.get("run")
if wanted is not None and wanted not in labels:  # another study's run, or a stale link
    st.query_params.pop("run", None)
elif wanted is not None and "run" not in st.session_state:  # ?run=RUN_ID opens that run
    st.session_state["run"] = wanted
rid = st.selectbox(
    "Run",
    [None, *labels],
    format_func=lambda r: "(choose a run)" if r is None else labels.get(r, r),
    key="run",
    on_change=_run_to_url,
    help="its id is kept in the URL: ?run=RUN_ID",
)


def sample_viewer(frame: pd.DataFrame, task: str | None) -> None:
    """The completions (episodes) the run rendered at one evaluation step, observation or scratch tokens set apart
    (``board.samples``); the whole table below it."""
    kind = samples.span_kind(task)
    st.markdown("**Samples** rendered at an evaluation step")
    steps = sorted(frame["step"].dropna().astype(int).unique().tolist())
    step = st.select_slider("Step", steps, value=steps[-1], key="sample_step") if len(steps) > 1 else steps[0]
    shown = frame[frame["step"] == step]
    if any(k == kind for t in shown["text"] for k, _ in samples.segments(str(t), kind)):
        st.html(samples.legend_html(kind))
    st.html(
        "".join(
            samples.sample_html(str(t), rw, kind)
            for t, rw in zip(shown["text"], shown.get("reward", [None] * len(shown)))
        )
    )
    with st.expander("Every sample (table)"):
        st.dataframe(frame, hide_index=True)


def run_view(rid: str, live: bool) -> None:
    """One run: status, error, metrics, samples, config; a fragment refreshed every ``LIVE_S`` while it runs."""
    sig = data.signature(ctx.root)
    r = data.runs(ctx.root, ctx.study, sig).query("run_id == @rid").iloc[0]
    if live != (r["status"] in ("queued", "running")):
        st.rerun()
    files = data.run_files(ctx.root, rid, sig)
    st.markdown(
        f"**{labels[rid]}**: status **{r['status']}**"
        + (f" ({r['reason']})" if r["reason"] else "")
        + f" · folder `{files['path']}`"
    )
    if files["error"]:
        st.error("This run failed; its error.txt:")
        st.code(files["error"][-4000:], language="text")
    m, issues = data.run_metrics(ctx.root, rid, sig)
    ui.show_issues(issues)
    if len(m):
        names = [c for c in m.columns if c not in ("run_id", "step", "samples") and m[c].notna().any()]
        default = [n for n in ("reward/exact", "kl/exact", "reward/mean", "loss/sft", "loss/dpo") if n in names][
            :3
        ] or names[:1]
        pick = st.multiselect("Metrics", names, default=default, key="run_metrics", bind=ui.URL)
        if pick:
            long = m.melt(id_vars=["step"], value_vars=pick, var_name="metric", value_name="value").dropna()
            # one small chart per metric, each with its own y axis and unit (KL and reward never share an axis)
            charts.draw(charts.small_multiples(long, "step", r["algo"]), width="stretch", key="run_chart")
            last = {k: m[k].dropna().iloc[-1] for k in pick if m[k].notna().any()}
            st.dataframe(pd.DataFrame([last]), hide_index=True, key="run_last")
    else:
        st.info("No metrics logged yet.")
    if files["samples"] is not None and len(files["samples"]):
        sample_viewer(files["samples"], r.get("task"))
    with st.expander("Config"):
        cfg = files["config"] or {"config": json.loads(r["config"]) if isinstance(r["config"], str) else None}
        st.json(cfg.get("config", cfg), expanded=1)


if rid is not None:
    running = runs.loc[runs["run_id"] == rid, "status"].isin(["queued", "running"]).any()
    st.fragment(run_every=LIVE_S if running else None)(run_view)(rid, bool(running))
