"""Credit: exact vs estimated per-token advantages by position, per method (claim C4)."""

import altair as alt
import pandas as pd
import streamlit as st
from board import charts, colours, data, stats, ui

VIEWS = {  # what the heatmap shows -> (method column, exact column or None, diverging colours)
    "share of |A| at each position": ("share", "share_exact", False),
    "mean |A|": ("method_abs", "exact_abs", False),
    "mean A": ("method_mean", "exact_mean", True),
    "correlation with the exact A": ("corr", None, True),
    "MSE to the exact A": ("mse", None, False),
}
SUMMARY = [
    "credit/corr",
    "credit/decisive_share",
    "credit/decisive_share_exact",
    "credit/mse",
]  # workbench.analysis.probe.Prober
HOW = (
    "Credit records come from the in-training probes of online methods on enumerable tasks (`probe_every` in a "
    "study's `[settings]`, default 50): each probe compares the advantages the method feeds its loss with the "
    "exact A(s_t, a_t) = Q - V from dynamic programming over the prefix tree, and appends one row per position "
    "to the run's `credit.jsonl`. Run a study of online methods on an enumerable task, e.g. "
    "`workbench run studies/quickstart.toml`."
)


ctx = ui.current()
st.title("Credit")
st.caption(
    "Sparse reward arrives at the last token; each method spreads it over the tokens before (claim C4). "
    "Rows: each method's estimated advantages and the exact ones under the same policy; columns: token positions. "
    "The share of |A| puts methods on one scale (GRPO and RLOO give every token of a sequence the same advantage; "
    "PPO's GAE varies by position). Decisive positions are those where changing the token alone can change the reward."
)

cr, issues = data.credit(ctx.root, ctx.study, ctx.sig)
ui.show_issues(issues)
if not len(cr):
    ui.no_data(f"No per-token credit records in the runs of study {ctx.study}.", HOW)
    st.stop()
runs = ctx.runs().drop_duplicates("run_id")
vary = ui.varying(runs)
line_of = ui.line_labels(runs, vary)
lines = ui.line_table(runs, vary)
cr = cr[cr["run_id"].isin(line_of.index)]
cr = cr.assign(line=cr["run_id"].map(line_of), task=cr["run_id"].map(runs.set_index("run_id")["task_label"]))

c1, c2 = st.columns([3, 2])
view = c1.radio("Show", list(VIEWS), horizontal=True, key="credit_view", bind=ui.URL)
when = c2.radio(
    "Probes",
    ["last", "all (mean)"],
    horizontal=True,
    key="credit_when",
    bind=ui.URL,
    help="last: each run's final probe; all: the mean over every probe during training",
)
every = cr
if when == "last":
    cr = cr[cr["step"] == cr.groupby("run_id")["step"].transform("max")]
est, ex, diverging = VIEWS[view]
scheme = dict(scheme="redblue", domain_mid=0.0) if diverging else dict(scheme="viridis")
if cr.groupby("task")["position"].max().max() == 0:
    st.info(
        "Every completion here is one token long: all of the credit sits at position 0 (its share of |A| is 1.00 by "
        "construction), so the map cannot show how credit spreads over a sequence. A sequence task (e.g. "
        "`sequence`, `digit_sum`) has several positions."
    )


def sourced(field: str, source: str) -> pd.DataFrame:
    h = stats.mean_band(cr.dropna(subset=[field]), ["line", "position"], field).assign(source=source)
    h["row"] = h["line"] + " · " + source
    return ui.with_algorithms(h, lines)


heats = [sourced(est, "estimated")] + ([sourced(ex, "exact")] if ex else [])
# estimated and exact each on their own colour scale: a method's advantages can be orders of magnitude smaller
# than the exact A (e.g. ~1e-9 vs ~1e-3) and would read as blank on a shared one
maps = [
    charts.heatmap(h, "position", "row", "mean", f"{view}: {h['source'].iloc[0]}", algo="algorithm", **scheme)
    for h in heats
    if len(h)
]
charts.draw(
    alt.vconcat(*maps).resolve_scale(color="independent") if len(maps) > 1 else maps[0],
    width="stretch",
    key="credit_heatmap",
)
heat = pd.concat(heats, ignore_index=True).sort_values(["line", "source"])  # estimated, then exact
decisive = {
    t: sorted(int(p) for p in g.loc[g["decisive"] == True, "position"].unique())  # noqa: E712
    for t, g in cr.groupby("task")
}
st.caption(
    f"Mean over {cr['run_id'].nunique()} runs ({when} probe{'s' if when != 'last' else ''}); estimated and exact "
    "each have their own colour scale. Decisive positions (changing the token alone can change the reward), per "
    "task: " + "; ".join(f"{t}: {d if d else 'none recorded'}" for t, d in decisive.items()) + "."
)
table = heat.pivot_table(index="row", columns="position", values="mean", sort=False)
table.columns = [f"t={c}" for c in table.columns]
st.dataframe(table, key="credit_table")

st.subheader("Over training")
names = list(dict.fromkeys(every["line"]))
line = st.selectbox("Method", names, key="credit_line", bind=ui.URL) if len(names) > 1 else names[0]
one = every[every["line"] == line]
cols = st.columns(2 if ex else 1)
for col, (field, source) in zip(cols, [(est, "estimated"), (ex, "exact")]):
    if field is None:
        continue
    grid = stats.mean_band(one.dropna(subset=[field]), ["step", "position"], field).rename(
        columns={"step": "probe step"}
    )
    row_px = 34 if grid["probe step"].nunique() <= 12 else 12
    with col:
        charts.draw(
            charts.heatmap(
                grid, "position", "probe step", "mean", f"{line}: {source}", row_px=row_px, y_type="ordinal", **scheme
            ),
            width="stretch",
        )
st.caption(f"{view} at each probe (rows) and position (columns), mean over {one['run_id'].nunique()} runs of {line}.")

if st.checkbox("Summary metrics over training (credit/*)", key="credit_summaries", bind=ui.URL):
    pick = st.selectbox(
        "Summary",
        SUMMARY,
        key="credit_summary",
        bind=ui.URL,
        help="credit/corr: correlation of the method's and the exact advantages over sampled tokens; "
        "credit/decisive_share: share of |A| on the decisive positions",
    )
    m, issues = data.metrics(ctx.root, ctx.study, (pick,), ctx.sig)
    curve, _ = stats.curves(m, line_of, pick)
    if len(curve):
        curve = ui.with_algorithms(curve, lines)
        charts.draw(
            charts.lines(curve, "step", colours.titled(pick), height=300, x_title="step (update rounds)"),
            width="stretch",
            key="credit_over_chart",
        )
    else:
        st.info(f"No run logged `{pick}`.")
