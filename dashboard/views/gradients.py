"""Gradients: SNR, variance and cosine to the true gradient vs batch size; objectives' cosines over training."""

import numpy as np
import pandas as pd
import streamlit as st
from board import charts, colours, data, defaults, stats, ui

STATS = {  # statistic -> (in-training metric, probe column, log scale by default)
    "SNR  ||E g||^2 / tr Cov(g)": ("grad/snr", "snr", True),
    "total variance  tr Cov(g)": ("grad/total_var", "total_var", True),
    "cosine to the true gradient": ("grad/cos_true", "cos_true", False),
    "cosine of the mean to the truth": ("grad/cos_mean_true", "cos_mean_true", False),
}
HOW = (
    "Gradient measurements come from the probes (`workbench.analysis.probe`): during training every "
    "`probe_every` steps (a `[settings]` entry of the study, default 50; `grad/snr`, `grad/total_var`, "
    "`grad/cos_true`, `grad/cos_sft_rl`, `grad/cos_dpo_rl`), or on a finished run's checkpoint with "
    "`workbench probe RUN_ID --what gradients --results DIR` (every objective at batch sizes 8, 32, 128, "
    "written to `probe_gradients.parquet`). Run a study that measures them, e.g. "
    "`workbench run studies/quickstart.toml`."
)

ctx = ui.current()
st.title("Gradients")
st.caption(
    "RL gradients are Monte Carlo estimates; SFT's and DPO's are minibatch means over fixed data (claims C1, C3, C6). "
    "At fixed parameters, K independent minibatch gradients g_1..g_K give tr Cov(g) (total variance), the SNR "
    "||E g||^2 / tr Cov(g), and the cosine of each g_k to the true gradient (exact by enumeration on enumerable "
    "tasks, the full-dataset gradient for offline objectives)."
)

names = data.metric_names(ctx.root, ctx.study, ctx.sig)
over = defaults.gradient_measurements(names)  # the grad/* metrics over training but grad/norm, cosines first
probe, probe_issues = data.probes(ctx.root, "gradients", ctx.study, ctx.sig)
if not over and not len(probe):
    ui.no_data(f"No gradient measurements in the runs of study {ctx.study} (only `grad/norm`, the update's norm).", HOW)
    st.stop()
runs = ctx.runs().drop_duplicates("run_id")
ui.show_issues(probe_issues)

st.subheader("Noise vs batch size")
c1, c2 = st.columns([3, 1])
label = c1.radio("Statistic", list(STATS), horizontal=True, key="grad_stat", bind=ui.URL)
metric, col, log_default = STATS[label]
# one log switch per statistic: a cosine (which can be negative) does not inherit the SNR's log scale
log_y = c2.checkbox("log y", value=log_default, key=f"grad_log_y_{col}", bind=ui.URL)
y_title = f"{label.split('  ')[0]} ({colours.unit_of(metric) or 'ratio'})"


def batch_chart(agg, source: str) -> None:
    """The statistic against batch size, one line per objective or algorithm; one batch size: said, no chart."""
    if "cos" in col:  # a cosine lies in [-1, 1]: so does its band
        agg = agg.assign(lo=agg["lo"].clip(-1, 1), hi=agg["hi"].clip(-1, 1))
    sizes = sorted(int(b) for b in agg["batch size"].unique())
    dropped = 0
    if log_y:
        agg, dropped = charts.log_ready(agg, ["mean"], band=("lo", "hi"))
    if len(sizes) < 2:
        st.info(
            f"Every {source} in this study used one batch size ({sizes[0] if sizes else '-'}): a curve against batch "
            "size needs two or more. The values at that size are in the table; for several sizes probe a checkpoint: "
            "`workbench probe RUN_ID --what gradients`."
        )
    elif len(agg):
        charts.draw(
            charts.lines(agg, "batch size", y_title, log_x=True, log_y=log_y, x_title="batch size (samples)"),
            width="stretch",
            key="grad_batch_chart",
        )
    if dropped:
        st.caption(f"{dropped} value(s) at or below 0 left out of the log scale.")


if len(probe) and col in probe:
    p = probe[np.isfinite(probe[col].astype(float))]  # an SNR is infinite where the estimator has no variance
    agg = stats.mean_band(p, ["objective", "batch_size"], col).rename(
        columns={"objective": "line", "batch_size": "batch size"}
    )
    agg["algorithm"] = agg["line"]
    batch_chart(agg, "probe")
    st.caption(
        f"From `workbench probe --what gradients` on {p['run_id'].nunique()} checkpoint(s): every objective at "
        "the same parameters; mean and 95% band over the probed runs."
    )
    st.dataframe(agg.drop(columns=["algorithm", "clipped"]), hide_index=True, key="grad_batch_table")
elif metric in names:
    m, issues = data.metrics(ctx.root, ctx.study, (metric,), ctx.sig)
    ui.show_issues(issues)
    m = m[np.isfinite(m[metric])]
    per_run = (
        m.groupby("run_id", as_index=False)[metric]
        .mean()
        .merge(runs[["run_id", "algo", "algo_label", "batch_size"]], on="run_id")
    )
    agg = stats.mean_band(per_run, ["algo_label", "algo", "batch_size"], metric).rename(
        columns={"algo_label": "line", "algo": "algorithm", "batch_size": "batch size"}
    )
    batch_chart(agg, "run")
    sizes = ", ".join(str(int(b)) for b in sorted(agg["batch size"].unique()))
    st.caption(
        f"From the in-training probes: `{metric}` averaged over each run's probes, at the run's own batch size; "
        f"mean and 95% band over seeds. Batch sizes in this study: {sizes}. "
        "For every objective at several batch sizes, probe a checkpoint: `workbench probe RUN_ID --what gradients`."
    )
    st.dataframe(agg.drop(columns=["algorithm", "clipped"]), hide_index=True, key="grad_batch_table")
else:
    st.info(f"No run logged `{metric}`.")

st.subheader("Over training")
if not over:
    st.info("No in-training gradient probes in these runs (`probe_every` = 0).")
    st.stop()
pick = st.selectbox(
    "Measurement",
    over,
    key="grad_over",
    bind=ui.URL,
    help="grad/cos_sft_rl, grad/cos_dpo_rl: cosine between the true "
    "gradient of SFT's / DPO's loss and the exact RL gradient, at the run's parameters",
)
weight = ui.smoothing("grad")
shown = ui.filters(runs, "grad")
m, issues = data.metrics(ctx.root, ctx.study, (pick,), ctx.sig, tuple(sorted(set(shown["run_id"]))))
ui.show_issues(issues)
split = ui.varying(runs)
curve, _ = stats.curves(m, ui.line_labels(shown, split), pick)
if len(curve):
    if pick.startswith("grad/cos"):
        curve = curve.assign(lo=curve["lo"].clip(-1, 1), hi=curve["hi"].clip(-1, 1))
    plot = ui.with_algorithms(stats.smooth_curves(curve, "step", weight), ui.line_table(shown, split))
    charts.draw(
        charts.lines(plot, "step", colours.titled(pick), x_title="step (update rounds)"),
        width="stretch",
        key="grad_over_chart",
    )
    last = curve.sort_values("step").groupby("line").tail(1)
    st.dataframe(pd.DataFrame(last), hide_index=True, key="grad_over_table")
else:
    st.info(f"No run among those shown logged `{pick}`.")
