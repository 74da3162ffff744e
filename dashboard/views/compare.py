"""Compare: any metric over steps or samples, per algorithm, mean and 95% band over seeds."""

import streamlit as st
from board import charts, colours, data, defaults, stats, ui

MAX_POINTS = 400  # per line; longer curves keep every k-th logged step
HEADLINE = (  # the scratch-task and tool-use studies' headline measures: a button each, where logged
    "reasoning/scratch_use",
    "reasoning/accuracy",
    "tool/exact_success_when_needed",
    "tool/exact_calls_when_needed",
    "tool/exact_calls_when_not_needed",
    "tool/success_rate",
    "tool/calls_mean",
)

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

c1, c2, c3, c4, c5 = st.columns([3, 1, 1, 1, 2])
default = defaults.compare_metric(names)
wanted = st.session_state.pop("compare_goto", None)  # set by the Claims page's "open in Compare"
if wanted in names:
    st.session_state["compare_metric"] = wanted
shortcuts = [n for n in HEADLINE if n in names]
if shortcuts:  # the scratch-task and tool-use studies' headline measures, one click away
    for col, n in zip(st.columns(len(shortcuts) + 3)[: len(shortcuts)], shortcuts):
        if col.button(n, key=f"compare_show_{n}", help=f"show {n} (docs/metrics.md)"):
            st.session_state["compare_metric"] = n
metric = c1.selectbox("Metric", names, index=names.index(default), key="compare_metric", bind=ui.URL)
x = c2.radio(
    "x axis",
    ["step", "samples"],
    horizontal=True,
    key="compare_x",
    bind=ui.URL,
    help="step: update rounds; samples: what each run consumed, in its own unit (completions for online "
    "methods, demonstrations for SFT, preference pairs for DPO)",
)
log_x = c3.checkbox("log x", key="compare_log_x", bind=ui.URL)
log_y = c4.checkbox("log y", key="compare_log_y", bind=ui.URL)
weight = ui.smoothing("compare", c5)

shown = ui.filters(runs, "compare")
split = st.multiselect(
    "Separate lines by",
    ui.grid_keys(runs),
    default=ui.varying(runs),
    key="compare_split",
    bind=ui.URL,
    help="hyperparameters that get their own line; the others are pooled with the seeds",
)
if not len(shown):
    st.info("No run passes the filters.")
    st.stop()

m, issues = data.metrics(ctx.root, ctx.study, (metric,), ctx.sig, tuple(sorted(set(shown["run_id"]))))
ui.show_issues(issues)
line_of = ui.line_labels(shown, split)
lines = ui.line_table(shown, split)
exact, stride = stats.curves(m, line_of, metric, MAX_POINTS)  # the values as logged: the table and the CSV
if not len(exact):
    st.info(f"No run among those shown logged {metric}.")
    st.stop()
curve = ui.with_algorithms(stats.smooth_curves(exact, x, weight), lines)
dropped = 0
if log_x or log_y:
    on_log = [c for c, on in ((x, log_x), ("mean", log_y)) if on]
    curve, dropped = charts.log_ready(curve, on_log, band=("lo", "hi") if log_y else None)
if not len(curve):
    st.info(f"Every point of {metric} is 0 or below: nothing to draw on a log scale. Untick log x / log y.")
    st.stop()

units = dict(shown.drop_duplicates("algo")[["algo", "unit"]].itertuples(index=False))
x_title = colours.samples_title(units) if x == "samples" else "step (update rounds)"
charts.draw(
    charts.lines(curve, x, colours.titled(metric), log_x, log_y, x_title=x_title),
    width="stretch",
    key="compare_chart",
)
notes = [f"{len(shown.drop_duplicates('run_id'))} runs, {curve['line'].nunique()} lines"]
if stride > 1:
    notes.append(f"every {stride}th logged step shown (at most {MAX_POINTS} points a line)")
if weight > 0:
    notes.append(f"lines smoothed (moving average, weight {weight:g}); the table below is not")
if dropped:
    notes.append(f"{dropped} point(s) at or below 0 left out of the log scale")
if exact["clipped"].any():
    notes.append(
        f"{metric} cannot be negative: its band is clipped at 0 where the t interval reaches below"
        + (" (drawn to the axis bottom on the log scale)" if log_y else "")
    )
st.caption(
    "; ".join(notes) + ". Band: 95% t interval over seeds (none with a single seed), as in the report. "
    "Colour: the algorithm (the same on every page and study); dash: its setting. Hover for every line's value."
)

curve = exact
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
    ui.csv_of(curve),
    key="compare_download",
    file_name=f"{ctx.study}_{metric.replace('/', '_')}.csv",
    mime="text/csv",
)
