"""Frontier: final reward vs KL(pi || pi_ref) for every method, with the exact pi* frontier."""

import altair as alt
import pandas as pd
import streamlit as st
from board import charts, colours, data, defaults, stats, ui

ctx = ui.current()
st.title("Frontier")
st.caption(
    "Where each method ends in the reward-KL plane (mean over seeds, 95% bands). For a KL coefficient beta "
    "the best any policy can do is `pi*_beta = pi_ref exp(r / beta) / Z`: on an enumerable task every run logs "
    "`KL(pi*_beta || pi_ref)` and `E_pi*[r]` at step 0 (`optimal/kl`, `optimal/reward`), exactly. The dashed "
    "curve joins those optima over the betas this study ran (one diamond per beta; a denser beta grid traces "
    "it more finely). A method on the curve has reached the KL-regularised optimum for its beta."
)

names = data.metric_names(ctx.root, ctx.study, ctx.sig)
exact = "reward/exact" in names and "kl/exact" in names
xs, ys, x_at, y_at = defaults.frontier_axes(names)
if not xs or not ys:
    ui.no_data(f"Study {ctx.study} logged no reward or KL metric yet.")
    st.stop()
c1, c2, c3, c4 = st.columns([2, 2, 1, 1])
x = c1.selectbox("KL (x)", xs, index=x_at, key="frontier_x", bind=ui.URL)
y = c2.selectbox("Reward (y)", ys, index=y_at, key="frontier_y", bind=ui.URL)
log_x = c3.checkbox("log x", key="frontier_log_x", bind=ui.URL)
paths = c4.checkbox(
    "training paths", key="frontier_paths", bind=ui.URL, help="the mean (KL, reward) at each evaluation"
)
if not exact:
    st.info(
        "These runs' task is not enumerable: no exact frontier. Showing sampled estimates (`reward/eval`, the "
        "`kl/k*_monitor` estimators)."
    )

final, issues = data.final(ctx.root, ctx.study, defaults.frontier_columns(x, y), ctx.sig)
ui.show_issues(issues)
final = final.drop_duplicates("run_id")
tasks = sorted(final["task_label"].dropna().unique())
task = st.selectbox("Task", tasks, key="frontier_task", bind=ui.URL) if len(tasks) > 1 else tasks[0]
final = final[final["task_label"] == task]
final["beta"] = final["beta"].astype(float)
other = [k for k in ui.varying(final) if k != "beta"]
final["method"] = [
    r["algo_label"] + "".join(f" {k}={r['grid'][k]}" for k in other if k in r["grid"]) for r in final.to_dict("records")
]

pts = stats.finals(final, ["method", "beta"], list(dict.fromkeys([x, y, "kl/exact_to_optimal", "objective/exact"])))
if x not in pts or y not in pts:
    st.info(f"No run of {task} logged {x} and {y}.")
    st.stop()
pts = pts.dropna(subset=[x, y])
algo_of = dict(zip(final["method"], final["algo"]))
pts["algorithm"] = pts["method"].map(algo_of)
pts["setting"] = [ui.variant(m, a) for m, a in zip(pts["method"], pts["algorithm"])]
pts["beta "] = pts["beta"].map(lambda b: f"beta={b:g}")
shape = "setting" if pts["setting"].nunique() > 1 else "beta "
dropped = 0
plot_pts = pts
if log_x:
    plot_pts, dropped = charts.log_ready(pts, [x], band=(f"{x}:lo", f"{x}:hi"))
X_T, Y_T = colours.titled(x), colours.titled(y)
layers = []
front = pd.DataFrame()
if {"optimal/kl", "optimal/reward"} <= set(final.columns) and x == "kl/exact" and y == "reward/exact":
    opt = final.dropna(subset=["optimal/kl", "optimal/reward"])
    if len(opt):
        front = opt.groupby("beta", as_index=False)[["optimal/kl", "optimal/reward", "optimal/objective"]].mean()
        front["label"] = front["beta"].map(lambda b: f"pi* beta={b:g}")
        plot = front.rename(columns={"optimal/kl": x, "optimal/reward": y})
        layers.append(charts.frontier(plot[plot[x] > 0] if log_x else plot, x, y, log_x))  # under the points
if paths:
    m, issues = data.metrics(ctx.root, ctx.study, (x, y), ctx.sig)
    m = m[m["run_id"].isin(set(final["run_id"]))].dropna(subset=[x, y])
    m = m.merge(final[["run_id", "method", "beta", "algo"]], on="run_id")
    path = m.groupby(["method", "algo", "beta", "step"], as_index=False)[[x, y]].mean()
    path["track"] = path["method"] + " beta=" + path["beta"].map("{:g}".format)
    if log_x:  # KL = 0 at step 0 (pi = pi_ref): no place on a log axis
        n_path = len(path)
        path = path[path[x] > 0]
        dropped += n_path - len(path)
    X = alt.X(field=charts._q(x), type="quantitative", title=X_T, scale=charts._scale(log_x))
    Y = alt.Y(field=charts._q(y), type="quantitative", title=Y_T, scale=alt.Scale(zero=False))
    layers.insert(
        0,
        alt.Chart(path)
        .mark_line(opacity=0.35)
        .encode(x=X, y=Y, detail="track:N", order="step:Q", color=charts.algo_colour(path["algo"], "algo", False)),
    )
layers.append(
    charts.scatter(
        plot_pts, x, y, shape=shape, log_x=log_x, tooltip=["method", "beta ", x, y], x_title=X_T, y_title=Y_T
    )
)
charts.draw(
    alt.layer(*layers).properties(height=460),
    width="stretch",
    key="frontier_chart",
)
notes = ["Colour: the algorithm (the same on every page); marker: " + ("its setting" if shape == "setting" else "beta")]
if dropped:
    notes.append(f"{dropped} point(s) with KL = 0 (the reference policy itself, e.g. step 0) left out of the log scale")
st.caption("; ".join(notes) + ".")
if len(front):
    st.markdown("**The exact frontier** (pi*_beta, mean over seeds: each seed's reference policy differs slightly)")
    st.dataframe(
        front.drop(columns="label"),
        hide_index=True,
        key="frontier_optimum",
        column_config={c: st.column_config.NumberColumn(format="%.4g") for c in front.columns if c != "beta"},
    )
elif exact:
    st.caption("The frontier is drawn for KL = kl/exact and reward = reward/exact.")

show = pts[["method", "beta", x, f"{x}:lo", f"{x}:hi", y, f"{y}:lo", f"{y}:hi", f"{y}:n"]].rename(
    columns={f"{y}:n": "seeds"}
)
if len(front):
    show = show.merge(front[["beta", "optimal/objective"]], on="beta", how="left")
    if "objective/exact" in pts:
        show["objective gap to pi*"] = show["optimal/objective"].to_numpy() - pts["objective/exact"].to_numpy()
    if "kl/exact_to_optimal" in pts:
        show["KL(pi || pi*)"] = pts["kl/exact_to_optimal"].to_numpy()
    show = show.drop(columns="optimal/objective")
    for c in ("objective gap to pi*", "KL(pi || pi*)"):  # >= 0 exactly; float32 noise would print as -0.0000
        if c in show:
            show[c] = show[c].where(~((show[c] < 0) & (show[c] > -1e-6)), 0.0)
st.markdown("**Where each method ends** (final values, mean and 95% band over seeds)")
table = show.copy()
for c in (x, y):  # each band in one column: the table fits the page
    table[f"{c} 95% band"] = [f"[{lo:.4g}, {hi:.4g}]" for lo, hi in zip(table[f"{c}:lo"], table[f"{c}:hi"])]
    table = table.drop(columns=[f"{c}:lo", f"{c}:hi"])
order = ["method", "beta", x, f"{x} 95% band", y, f"{y} 95% band"]
table = table[order + [c for c in table.columns if c not in order]]
st.dataframe(
    table,
    hide_index=True,
    key="frontier_table",
    width="stretch",
    column_config={
        "method": st.column_config.TextColumn(width="medium"),
        **{
            c: st.column_config.NumberColumn(format="%.4g")
            for c in table.columns
            if c not in ("method", "beta", "seeds") and "band" not in c
        },
    },
)
st.download_button(
    "Download (CSV)",
    ui.csv_of(show),
    file_name=f"{ctx.study}_frontier.csv",
    mime="text/csv",
    key="frontier_download",
)
