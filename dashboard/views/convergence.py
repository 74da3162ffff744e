"""Convergence map: where RL and supervised methods end at the same policy and where they part (claims C6, C13)."""

import numpy as np
import pandas as pd
import streamlit as st
from board import charts, data, defaults, stats, ui

DIST = defaults.CONVERGENCE_DIST
HOW = (
    "The map needs exact distances: an enumerable task (bandit, short sequences) and beta > 0, where every "
    "measurement logs `kl/exact_to_optimal` = E_x KL(pi || pi*). Vary `beta` and the supervised methods' data "
    "(`algo.coverage`, label noise `algo.bt_temperature`, `algo.n_pairs`) in a study's `grid`, e.g. "
    "`workbench run studies/quickstart.toml`."
)

ctx = ui.current()
st.title("Convergence map")
st.caption(
    "Does a supervised objective end where RL ends? With a KL coefficient beta both target "
    "`pi* = pi_ref exp(r / beta) / Z` (DPO by construction, PPO with the KL in its reward), but finite, partial "
    "or noisy preference data and the absence of on-policy samples can pull them apart. Top: each method's "
    "distance to pi* across the study's grid. Bottom: the distance between an RL method's and each other "
    "method's final policies, seed by seed at the same grid point."
)

final, issues = data.final(ctx.root, ctx.study, (DIST,), ctx.sig)
ui.show_issues(issues)
final = final.drop_duplicates("run_id")
final = final[final["status"] == "done"] if "status" in final else final
if DIST not in final or final[DIST].notna().sum() == 0:
    ui.no_data(f"No exact distance to pi* in the runs of study {ctx.study}.", HOW)
    st.stop()
final = final[final[DIST].notna()].copy()
keys = ui.grid_keys(final)
vary = ui.varying(final)
axis_opts = vary or keys or ["beta"]
c1, c2 = st.columns([2, 3])
axis = c1.selectbox(
    "Across",
    axis_opts,
    index=axis_opts.index("beta") if "beta" in axis_opts else 0,
    key="conv_axis",
    bind=ui.URL,
    help="the grid key along the map's columns; the other grid keys get their own rows",
)
final[axis] = [g.get(axis, b if axis == "beta" else None) for g, b in zip(final["grid"], final["beta"])]
values = sorted(final[axis].dropna().unique())
lacking = final[final[axis].isna()]  # methods without this key do not depend on it: the same at every value
final = pd.concat([final.dropna(subset=[axis]), *(lacking.assign(**{axis: v}) for v in values)], ignore_index=True)
own = [k for k in vary if k != axis]
final["method"] = [
    r["algo_label"] + "".join(f" {k}={r['grid'][k]}" for k in own if k in r["grid"]) for r in final.to_dict("records")
]
final["kind"] = np.where(final["online"], "online (RL)", "offline (supervised)")
several_tasks = final["task_label"].nunique() > 1  # a row per method and task: tasks are never pooled
final["row"] = final["method"] + (" @" + final["task_label"].astype(str) if several_tasks else "")

st.subheader("Distance to pi*")
cell = stats.mean_band(final, ["row", "algo", "kind", axis], DIST)
cell[axis] = cell[axis].astype(str)
noise = int((cell["mean"] < 0).sum())
cell["mean"] = cell["mean"].clip(lower=0)  # KL >= 0: a float32 -1.8e-8 is 0
top, n_over = stats.colour_top(cell["mean"])
charts.draw(
    charts.heatmap(
        cell, axis, "row", "mean", "E_x KL(pi || pi*) (nats)", scheme="viridis", domain=(0, top), algo="algo"
    ),
    width="stretch",
    key="conv_optimal_map",
)
st.caption(
    "Mean over seeds of the final exact KL(pi || pi*) in nats; 0 is the optimum itself."
    + (f" {noise} cell(s) came out below 0 by float rounding and show as 0." if noise else "")
    + (
        f" The colour scale ends at {top:.3g}: {n_over} larger cell(s) take its end colour (their numbers are exact)."
        if n_over
        else ""
    )
    + (
        f" Methods without `{axis}` ({', '.join(dict.fromkeys(lacking['algo_label']))}) are repeated at "
        "each of its values."
        if len(lacking)
        else ""
    )
)

st.subheader("Distance between final policies")
online = list(dict.fromkeys(final.loc[final["online"], "method"]))
if not online:
    st.info("No online (RL) method in this study to compare with.")
    st.stop()
ref_default = next((m for m in online if m.split()[0] == "ppo"), online[0])
ref = c2.selectbox("RL method to compare with", online, index=online.index(ref_default), key="conv_ref", bind=ui.URL)
threshold = st.slider(
    "Same policy when the total variation is below", 0.0, 0.5, 0.05, 0.01, key="conv_threshold", bind=ui.URL
)

grid_cols = sorted({k for g in final["grid"] for k in g})
for k in grid_cols:
    final[f"g:{k}"] = [g.get(k) for g in final["grid"]]
a_runs = final[final["method"] == ref]
rows = []
for method, b_runs in final[final["method"] != ref].groupby("method", sort=False):
    shared = [f"g:{k}" for k in grid_cols if a_runs[f"g:{k}"].notna().any() and b_runs[f"g:{k}"].notna().any()]
    pairs = a_runs.merge(b_runs, on=["task_label", "seed", *shared], suffixes=("_a", "_b"))
    pairs = pairs.assign(method=method, kind=b_runs["kind"].iloc[0], algo=b_runs["algo"].iloc[0])
    rows.append(pairs)
pairs = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()
pairs = pairs[pairs[f"{axis}_a"] == pairs[f"{axis}_b"]] if len(pairs) else pairs  # one pair per grid point
if not len(pairs):
    st.info(f"No run of another method shares a task, seed and grid point with {ref}.")
    st.stop()
pols = data.policies(ctx.root, tuple(sorted(set(pairs["run_id_a"]) | set(pairs["run_id_b"]))), ctx.sig)
exact = [
    a in pols and b in pols and pols[a].shape == pols[b].shape for a, b in zip(pairs["run_id_a"], pairs["run_id_b"])
]
pairs["tv"] = [
    stats.policy_distances(pols[a], pols[b])["tv"] if ok else np.nan
    for a, b, ok in zip(pairs["run_id_a"], pairs["run_id_b"], exact)
]
bound = stats.pinsker_bound(pairs[f"{DIST}_a"], pairs[f"{DIST}_b"])
pairs["distance"] = np.where(exact, pairs["tv"], bound)
pairs[axis] = pairs[f"{axis}_a"].astype(str)
n_exact = int(np.sum(exact))
pairs["row"] = pairs["method"] + (" @" + pairs["task_label"].astype(str) if several_tasks else "")
cell = stats.mean_band(pairs, ["row", "method", "algo", "kind", axis], "distance")
apart = "part" if n_exact == len(pairs) else "not shown to agree"  # a large bound proves nothing
cell["verdict"] = np.where(
    cell["hi"].fillna(cell["mean"]) < threshold,
    "same policy",
    np.where(cell["lo"].fillna(cell["mean"]) > threshold, apart, "unclear"),
)

what = "E_x TV(pi_RL, pi)" if n_exact == len(pairs) else "TV bound" if n_exact == 0 else "TV (exact or bound)"
MARK = {"same policy": "= same", "part": "≠ part", "not shown to agree": "? bound", "unclear": "? unclear"}
cell["shown"] = [f"{v:.3g} {MARK[k]}" for v, k in zip(cell["mean"], cell["verdict"])]
top, n_over = stats.colour_top(cell["mean"])
charts.draw(
    charts.heatmap(cell, axis, "row", "mean", what, scheme="magma", domain=(0, top), label="shown", algo="algo"),
    width="stretch",
    key="conv_pair_map",
)
st.caption(
    f"Each cell: the mean distance and the verdict at threshold {threshold:g} (= same policy: the 95% band lies "
    "below it; ≠ part: above it; ? unclear: the band straddles it, or only a bound is known)."
    + (f" The colour scale ends at {top:.3g}: {n_over} larger cell(s) take its end colour." if n_over else "")
)
if n_exact == len(pairs):
    st.caption(
        f"Exact total variation between the final policies ({len(pairs)} seed-matched pairs; `policy.npy` of each run)."
    )
else:
    st.caption(
        f"{len(pairs) - n_exact} of {len(pairs)} pairs lack a stored final policy (`policy.npy`): "
        "their distance is the "
        "upper bound TV(a, b) <= sqrt(KL(a || pi*)/2) + sqrt(KL(b || pi*)/2) (Pinsker and the triangle inequality) "
        "from each run's exact KL to pi*. A small bound proves the two policies agree; a large one alone does not "
        "prove they part."
    )
st.markdown(f"**{ref} vs each method** (mean and 95% band over seeds; same policy: band below {threshold:g})")
st.dataframe(
    cell.drop(columns=["shown", "row"] if not several_tasks else ["shown"]).rename(columns={"mean": "distance"}),
    hide_index=True,
    key="conv_table",
    column_config={c: st.column_config.NumberColumn(format="%.4f") for c in ("distance", "lo", "hi")},
)
st.download_button(
    "Download the pairs (CSV)",
    ui.csv_of(pairs.drop(columns=[c for c in pairs if c.startswith("grid")])),
    file_name=f"{ctx.study}_convergence.csv",
    mime="text/csv",
    key="conv_download",
)
