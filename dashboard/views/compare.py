"""Compare: any metric over steps or samples, per algorithm, mean and 95% band over seeds."""

import streamlit as st
from board import charts, data, stats, ui

MAX_POINTS = 400  # per line; longer curves keep every k-th logged step
PREFERRED = ("reward/exact", "reward/mean", "objective/exact", "kl/exact", "kl/exact_to_optimal", "reward/eval")

ctx = ui.current()
st.title("Compare")
st.caption(
    "One metric across the study's runs: the mean over seeds per algorithm (and hyperparameter setting), "
    "with a 95% t confidence band. Metric names are documented in docs/metrics.md."
)

names = data.metric_names(ctx.root, ctx.study, ctx.sig)
if not names:
    ui.no_data(
        f"No metrics logged yet in study {ctx.study}.", "Runs publish their metrics as they finish; come back soon."
    )
    st.stop()
runs = ctx.runs()

c1, c2, c3, c4 = st.columns([3, 1, 1, 1])
default = next((n for n in PREFERRED if n in names), names[0])
wanted = st.session_state.pop("compare_goto", None)  # set by the Claims page's "open in Compare"
if wanted in names:
    st.session_state["compare_metric"] = wanted
metric = c1.selectbox("Metric", names, index=names.index(default), key="compare_metric")
x = c2.radio(
    "x axis",
    ["step", "samples"],
    horizontal=True,
    key="compare_x",
    help="samples: completions (online), demonstrations or preference pairs (offline) consumed",
)
log_x = c3.checkbox("log x", key="compare_log_x")
log_y = c4.checkbox("log y", key="compare_log_y")

shown = ui.filters(runs, "compare")
split = st.multiselect(
    "Separate lines by",
    ui.grid_keys(runs),
    default=ui.varying(runs),
    key="compare_split",
    help="hyperparameters that get their own line; the others are pooled with the seeds",
)
if not len(shown):
    st.info("No run passes the filters.")
    st.stop()

m, issues = data.metrics(ctx.root, ctx.study, (metric,), ctx.sig, tuple(sorted(set(shown["run_id"]))))
ui.show_issues(issues)
line_of = ui.line_labels(shown, split)
curve, stride = stats.curves(m, line_of, metric, MAX_POINTS)
dropped = 0
for flag, col in ((log_x, x), (log_y, "mean")):
    if flag:
        bad = curve[col] <= 0
        dropped += int(bad.sum())
        curve = curve[~bad]
if not len(curve):
    st.info(f"No run among those shown logged {metric}.")
    st.stop()

st.altair_chart(charts.lines(curve, x, metric, log_x, log_y), width="stretch", key="compare_chart")
notes = [f"{len(shown.drop_duplicates('run_id'))} runs, {curve['line'].nunique()} lines"]
if stride > 1:
    notes.append(f"every {stride}th logged step shown (at most {MAX_POINTS} points a line)")
if dropped:
    notes.append(f"{dropped} non-positive points left out of the log scale")
if curve["clipped"].any():
    notes.append(f"{metric} cannot be negative: its band is clipped at 0 where the t interval reaches below")
st.caption("; ".join(notes) + ". Band: 95% t interval over seeds (none with a single seed), as in the report.")

last = curve.sort_values("step").groupby("line").tail(1).sort_values("mean", ascending=False)
st.markdown(f"**{metric} at the last logged step** (mean, 95% band, seeds)")
st.dataframe(
    last[["line", "step", "samples", "mean", "lo", "hi", "n"]],
    hide_index=True,
    key="compare_last",
    column_config={c: st.column_config.NumberColumn(format="%.4g") for c in ("mean", "lo", "hi", "samples")},
)
st.download_button(
    "Download the data shown (CSV)",
    curve.to_csv(index=False).encode(),
    key="compare_download",
    file_name=f"{ctx.study}_{metric.replace('/', '_')}.csv",
    mime="text/csv",
)
