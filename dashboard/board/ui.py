"""Pieces every page uses: the page context, the empty-store help, issue warnings, run filters."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import streamlit as st

from . import data

URL = "query-params"  # every widget's value is kept in the URL under its key: a view can be shared and reloaded
QUICKSTART = "workbench run studies/quickstart.toml --results {root}"


@dataclass
class Context:
    root: Path
    sig: tuple
    study: str | None  # the study picked in the sidebar
    studies: pd.DataFrame

    def runs(self) -> pd.DataFrame:
        return data.runs(self.root, self.study, self.sig)


def _start(work, name: str) -> None:
    """``work`` in a daemon thread that carries this script run's context (Streamlit's caches then log no
    'missing ScriptRunContext' warning for it); an exception there only costs the warm cache."""
    from streamlit.runtime.scriptrunner import add_script_run_ctx, get_script_run_ctx

    def guarded():
        try:
            work()
        except Exception:  # noqa: BLE001 - a page reads the same data again and shows the error itself
            pass

    thread = threading.Thread(target=guarded, name=name, daemon=True)
    add_script_run_ctx(thread, get_script_run_ctx())
    thread.start()


@st.cache_resource(show_spinner=False)
def prewarm() -> None:
    """Import the chart and statistics modules in a background thread, once per server process.

    The first page a researcher opens is usually Studies (no chart); without this, the first page with a
    chart paid for importing altair and its dependencies (about 1 s of a 2-core machine) and for altair's
    first validation against the Vega-Lite schema (0.1-0.2 s) before it drew.
    """

    def work():
        from . import charts, stats  # noqa: F401 - imported for the pages: altair, its schema, numpy's paths

        tiny = pd.DataFrame({"step": [0, 1], "line": "a", "mean": 0.0, "lo": 0.0, "hi": 0.0, "n": 1})
        charts.lines(tiny, "step", "y").to_dict()  # altair's first chart loads and compiles the Vega-Lite schema

    _start(work, "workbench-prewarm")


# Streamlit's frontend fetches and compiles the code of most elements (charts, multiselects, sliders, tables,
# download buttons) the first time a page shows one, and Vega compiles its own code on the first chart: on a 2-core
# machine that put the first page with a chart ~1 s behind its second visit. These are the chunks the pages use
# (Streamlit's names; the hash after the dot varies by version). ``loadVegaEmbed`` exports the one function that
# returns Vega-Embed and the expression interpreter Streamlit draws with.
FRONTEND_CHUNKS = (
    "ArrowVegaLiteChart", "loadVegaEmbed", "embed", "vega-interpreter", "Multiselect", "Slider", "Radio", "Checkbox",
    "Selectbox", "DownloadButton", "DataFrame", "Table", "StreamlitSyntaxHighlighter", "Metric",
)  # fmt: skip
PRELOAD_JS = """<script>(() => {
  if (window.__workbenchPreloaded) return;
  window.__workbenchPreloaded = true;
  const entry = document.querySelector('script[type="module"][src*="static/js/index."]');
  const app = document.querySelector('[data-testid="stApp"]');
  if (!entry || !app) return;
  const base = new URL(".", entry.src).href, files = __FILES__, spec = __SPEC__;
  const warm = async (chart) => {
    const mods = await Promise.all(files.map((f) => import(base + f).catch(() => null)));
    const vega = mods[files.findIndex((f) => f.startsWith("loadVegaEmbed."))];
    const load = vega && Object.values(vega).find((f) => typeof f === "function");
    if (chart || !load || !spec) return;  // a chart on the page has already compiled Vega's code
    const {embed, expressionInterpreter} = await load();
    const box = document.createElement("div");
    box.style.cssText = "position:absolute;left:-10000px;top:0;width:800px;visibility:hidden";
    document.body.appendChild(box);
    try {
      const opts = {renderer: "svg", actions: false, ast: true, expr: expressionInterpreter};
      const view = await embed(box, spec, opts);
      window.__workbenchWarmMarks = box.querySelectorAll(".role-mark > *").length;
      view.finalize();
    } finally {
      box.remove();
    }
  };
  // start once the page is at rest (its script run over, nothing changed for 1 s): never beside its own drawing
  let changed = performance.now();
  const watch = new MutationObserver(() => { changed = performance.now(); });
  watch.observe(app, {subtree: true, childList: true, attributes: true, characterData: true});
  const running = '[data-testid="stApp"][data-test-script-state="running"]';
  const poll = setInterval(() => {
    if (document.querySelector(running) || performance.now() - changed < 1000) return;
    clearInterval(poll);
    watch.disconnect();
    const chart = !!app.querySelector('[data-testid="stVegaLiteChart"]');
    warm(chart).catch(() => null).then(() => { window.__workbenchPreloaded = performance.now(); });
  }, 250);
})();</script>"""
WARM_UP_CHART = Path(__file__).with_name("warm_up_chart.json")


@st.cache_resource(show_spinner=False)
def _preload_html() -> str | None:
    import json

    js = Path(st.__file__).parent / "static" / "static" / "js"
    found = [sorted(js.glob(f"{name}.*.js")) for name in FRONTEND_CHUNKS]
    files = [f[0].name for f in found if len(f) == 1]
    if not files:
        return None
    spec = WARM_UP_CHART.read_text() if WARM_UP_CHART.exists() else "null"
    return PRELOAD_JS.replace("__FILES__", json.dumps(files)).replace("__SPEC__", spec)


def preload_frontend() -> None:
    """Have the browser, once per tab and once the page is at rest, load the frontend code the pages use and,
    where the page drew no chart, draw one small chart off screen (``charts.warm_up_spec``), so that a page's
    first visit waits for its data, not for Streamlit's lazily loaded element code or Vega's first compile.
    Nothing is shown; a failure costs only time."""
    if st.session_state.get("_frontend_preloaded"):
        return  # sent with a session's first script run only (a reload starts a new session)
    st.session_state["_frontend_preloaded"] = True
    html = _preload_html()
    if html:
        st.sidebar.html(html, unsafe_allow_javascript=True)


_RUN_OVER = threading.Condition()
_runs_over = 0  # script runs finished in this server process (``run_over``)
RUN_WAIT_S = 10.0  # the longest the background reads wait for the page being drawn


def run_over() -> None:
    """Called by the app when a script run ends (however it ends): background reads waiting for it go on."""
    global _runs_over
    with _RUN_OVER:
        _runs_over += 1
        _RUN_OVER.notify_all()


def _after_run(seen: int, timeout: float = RUN_WAIT_S) -> None:
    """Wait until a script run has ended since ``_runs_over`` was ``seen`` (at most ``timeout`` seconds)."""
    with _RUN_OVER:
        _RUN_OVER.wait_for(lambda: _runs_over > seen, timeout)


@st.cache_resource(show_spinner=False, max_entries=8)
def prewarm_study(root: Path, study: str, sig: tuple) -> None:
    """Read what each page of a finished study opens with, in a background thread, once per study and index
    state: the metric names, Compare's metric and the Frontier's final values, the credit records, the
    gradient probes and measurement, the Convergence map's distances (through the same cached functions,
    with the arguments the pages pass at first; ``board.defaults``). A page then opens from the cache as on
    a second visit. Skipped while runs are queued or running (the index changes with every heartbeat).

    The reads start when the script run that asked for them is over: on 2 cores they otherwise held a page
    opened by its URL up to 1 s (Frontier's first render, AppTest: 1.1-1.6 s alone, 2.0-2.3 s beside them)."""
    from . import defaults

    seen = _runs_over

    def work():
        _after_run(seen)
        runs = data.runs(root, study, sig)
        if runs["status"].isin(["queued", "running"]).any():
            return
        names = data.metric_names(root, study, sig)
        if not names:
            return
        one = runs.drop_duplicates("run_id")  # in the sidebar's order: the page opened next is read first
        shown = tuple(sorted(set(picked(one, default_picks(one))["run_id"])))
        data.metrics(root, study, (defaults.compare_metric(names),), sig, shown)
        xs, ys, x, y = defaults.frontier_axes(names)
        if xs and ys:
            data.final(root, study, defaults.frontier_columns(xs[x], ys[y]), sig)
        data.probes(root, "gradients", study, sig)
        over = defaults.gradient_measurements(names)
        if over:
            data.metrics(root, study, (over[0],), sig, shown)
        data.credit(root, study, sig)
        data.final(root, study, (defaults.CONVERGENCE_DIST,), sig)

    _start(work, "workbench-prewarm-study")


def sidebar() -> Context | None:
    """The results folder and the study picker (bound to ``?study=`` in the URL); None for an empty store."""
    root = data.results()
    st.sidebar.caption(f"results: `{root}`")
    if not data.has_index(root):
        return None
    sig = data.signature(root)
    studies = data.studies(root, sig)
    if not len(studies):
        return None
    names = list(studies["name"])
    study = st.sidebar.selectbox("Study", names, key="study", bind=URL, help="the study every page shows")
    st.sidebar.button("Reload", key="reload", help="read the store again (pages also reload when runs finish)")
    _forget_the_last_study(study)
    prewarm_study(root, study, sig)
    return Context(root, sig, study, studies)


KEPT = {"study", "reload", "ctx", "compare_goto", "_study_shown"}  # what survives a switch of study


def _forget_the_last_study(study: str) -> None:
    """A switch of study resets every page's widgets (filters, picks, the open run): they were chosen among the
    last study's tasks, algorithms and grid values, and kept, they could leave nothing to show."""
    last = st.session_state.get("_study_shown")
    if last is not None and last != study:
        for k in list(st.session_state.keys()):
            if k not in KEPT:
                del st.session_state[k]
        for k in list(st.query_params.keys()):
            if k != "study":
                try:
                    del st.query_params[k]  # ?run=... named a run of the last study
                except Exception:  # noqa: BLE001 - bound to a widget: its reset above clears it
                    pass
    st.session_state["_study_shown"] = study


def empty_store(root: Path) -> None:
    st.title("workbench dashboard")
    st.info(f"No results in `{root}` yet.")
    st.markdown(
        "Run the quickstart (SFT, PPO, GRPO and DPO on an enumerable bandit, about 2 minutes on 2 CPU cores), "
        "then reload this page:"
    )
    st.code(QUICKSTART.format(root=root), language="bash")
    st.markdown(
        "Or point the dashboard at another results folder: `workbench dashboard --results DIR`. "
        "Every study file in `studies/` runs the same way: `workbench run studies/NAME.toml`."
    )


def show_issues(issues: list[dict], what: str = "run") -> None:
    """A warning naming each skipped run and what is wrong with its files; the rest of the page still loads."""
    if not issues:
        return
    st.warning(f"{len(issues)} {what}(s) could not be read and were skipped; the rest loaded.", icon="⚠️")
    with st.expander("What was skipped"):
        st.dataframe(pd.DataFrame(issues), hide_index=True)


def filters(runs: pd.DataFrame, prefix: str, first_only: bool = True) -> pd.DataFrame:
    """Multiselects for task, algorithm and each hyperparameter of the grid; returns the runs that pass.

    A hyperparameter with several values starts at its first value when ``first_only`` (one
    comparable setting per algorithm), else at all values. A run without a grid key (another
    algorithm's parameter) is not filtered by it.
    """
    defaults = default_picks(runs, first_only)
    cols = st.columns(2)
    picks = {
        "task": cols[0].multiselect("Task", defaults["task"], default=defaults["task"], key=f"{prefix}_task", bind=URL),
        "algo": cols[1].multiselect(
            "Algorithm", defaults["algo"], default=defaults["algo"], key=f"{prefix}_algo", bind=URL
        ),
    }
    keys = grid_keys(runs)
    if keys:
        gcols = st.columns(min(len(keys), 4))
        for i, k in enumerate(keys):
            picks[k] = gcols[i % len(gcols)].multiselect(
                k, grid_values(runs, k), default=defaults[k], key=f"{prefix}_grid_{k}", format_func=str, bind=URL
            )
    return picked(runs, picks)


def default_picks(runs: pd.DataFrame, first_only: bool = True) -> dict[str, list]:
    """What ``filters`` starts at: every task and algorithm; each grid key's first value when ``first_only``
    and it has several, else all its values."""
    out: dict[str, list] = {
        "task": sorted(runs["task_label"].dropna().unique()),
        "algo": list(dict.fromkeys(runs["algo_label"].dropna())),
    }
    for k in grid_keys(runs):
        values = grid_values(runs, k)
        out[k] = values[:1] if first_only and len(values) > 1 else values
    return out


def picked(runs: pd.DataFrame, picks: dict[str, list]) -> pd.DataFrame:
    """The runs whose task, algorithm and grid values are among ``picks`` (a run without a grid key passes it)."""
    out = runs[runs["task_label"].isin(picks["task"]) & runs["algo_label"].isin(picks["algo"])]
    for k, pick in picks.items():
        if k in ("task", "algo"):
            continue
        has = out["grid"].map(lambda g, k=k: k in g)
        out = out[~has | out["grid"].map(lambda g, k=k, pick=pick: g.get(k) in pick)]
    return out


def grid_keys(runs: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(k for g in runs["grid"] for k in g))


def grid_values(runs: pd.DataFrame, key: str) -> list:
    vals = {g[key] for g in runs["grid"] if key in g}
    try:
        return sorted(vals)
    except TypeError:
        return sorted(vals, key=str)


def line_labels(runs: pd.DataFrame, split: list[str]) -> pd.Series:
    """run_id -> the line it belongs to: the algorithm label, plus the grid keys in ``split``; task when several."""
    several_tasks = runs["task_label"].nunique() > 1

    def label(r) -> str:
        parts = [r["algo_label"]]
        parts += [f"{k}={r['grid'][k]}" for k in split if k in r["grid"]]
        if several_tasks:
            parts.append(f"@{r['task_label']}")
        return " ".join(parts)

    runs = runs.drop_duplicates("run_id")
    return pd.Series([label(r) for r in runs.to_dict("records")], index=runs["run_id"].to_numpy(), dtype=object)


def line_table(runs: pd.DataFrame, split: list[str]) -> pd.DataFrame:
    """One row per line of ``line_labels``: ``line``, its ``algorithm`` (the registry name: the colour) and
    ``variant`` (the rest of the label: grid values, task; the dash or marker)."""
    of = line_labels(runs, split)
    algo = runs.drop_duplicates("run_id").set_index("run_id")["algo"]
    t = pd.DataFrame({"line": of.to_numpy(), "algorithm": algo.reindex(of.index).to_numpy()}).drop_duplicates("line")
    t["variant"] = [variant(line, a) for line, a in zip(t["line"], t["algorithm"])]
    return t


def variant(line: str, algo: str) -> str:
    """What tells a line apart from the others of its algorithm: the label after the algorithm's name."""
    line = str(line)
    rest = line[len(algo) :].strip() if line.startswith(str(algo)) else line
    return rest or "default"


def with_algorithms(df: pd.DataFrame, lines: pd.DataFrame) -> pd.DataFrame:
    """``df`` (a column ``line``) with the ``algorithm`` and ``variant`` of each line."""
    return df.merge(lines[["line", "algorithm", "variant"]], on="line", how="left")


def smoothing(prefix: str, container=None) -> float:
    """The smoothing control (off by default): the weight of an exponential moving average over each line's
    points, for charts only."""
    c = container or st
    return c.slider(
        "smoothing",
        0.0,
        0.99,
        0.0,
        0.01,
        key=f"{prefix}_smooth",
        bind=URL,
        help="exponential moving average of each line's points (0: off); tables always show the values as logged",
    )


def varying(runs: pd.DataFrame) -> list[str]:
    """Grid keys with more than one value among ``runs``."""
    return [k for k in grid_keys(runs) if len(grid_values(runs, k)) > 1]


def csv_of(frame: pd.DataFrame):
    """A download button's data: ``frame`` as CSV, made when the button is clicked (Streamlit's deferred
    download), not with every script run."""
    return lambda: frame.to_csv(index=False).encode()


def no_data(message: str, how: str | None = None) -> None:
    st.info(message)
    if how:
        st.markdown(how)


def current() -> Context:
    """The context ``app.py`` set up for this rerun (results folder, index signature, study)."""
    return st.session_state["ctx"]
