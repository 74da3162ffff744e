"""The dashboard on a store written by a real small study: every page through Streamlit's AppTest
(widgets operated, values checked against the store), and end to end in headless Chromium.

The study (built once per session, about 30 s on 2 cores): PPO and DPO (coverage 0.5 and 1.0)
x 2 seeds x 10 steps on an enumerable bandit, with the in-training probes on, plus one
checkpoint probe (``probe_gradients.parquet``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import workbench.results as store

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "dashboard" / "app.py"
PAGES = ["studies", "compare", "frontier", "gradients", "credit", "convergence", "claims"]
STUDY = "dash"
CLI = [sys.executable, "-m", "workbench.cli"]

pytestmark = pytest.mark.timeout(300)

STUDY_TOML = f"""
name = "{STUDY}"
description = "dashboard test study"
claims = ["C6", "C13"]
seeds = [0, 1]

[[tasks]]
name = "bandit"
n_arms = 4
n_contexts = 2

[budget]
steps = 10
batch_size = 16

[settings]
beta = 0.1
eval_every = 5
probe_every = 5
probe_minibatches = 4
model = {{ n_layer = 1, n_embd = 16, n_head = 2 }}

[[algorithms]]
name = "ppo"

[[algorithms]]
name = "dpo"
grid = {{ "algo.coverage" = [0.5, 1.0] }}
"""


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="session")
def results(tmp_path_factory) -> Path:
    """A results folder written by ``workbench run`` (and one ``workbench probe``): read-only for the tests."""
    base = tmp_path_factory.mktemp("dashboard_store")
    study = base / f"{STUDY}.toml"
    study.write_text(STUDY_TOML)
    res = base / "results"
    out = subprocess.run(
        [*CLI, "run", str(study), "--results", str(res), "--workers", "2", "--quiet"],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    ppo = store.load_runs(res, STUDY).query("algo == 'ppo'")["run_id"].iloc[0]
    out = subprocess.run(
        [
            *CLI,
            "probe",
            ppo,
            "--results",
            str(res),
            "--what",
            "gradients",
            "--batch-sizes",
            "8",
            "16",
            "--minibatches",
            "4",
            "--objectives",
            "reinforce",
            "rloo",
            "ppo",
            "dpo",
        ],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return res


@pytest.fixture
def copy_of(results, tmp_path):
    """A writable copy of the study's store (to damage, extend or report on)."""

    def make() -> Path:
        dst = tmp_path / "results"
        shutil.copytree(results, dst, ignore=shutil.ignore_patterns("checkpoint"))
        return dst

    return make


OTHER = "other"  # a second study over the DPO runs, under other labels


def extend(res: Path) -> Path:
    """Add a report to the study (the Claims page's evidence and buttons) and a second study, ``other``, with
    its own task and algorithm labels (so filters chosen in one study match nothing in the other) and report."""
    runs = store.load_runs(res, STUDY)
    records = [
        {
            "run_id": r["run_id"],
            "task": r["task"],
            "algo": r["algo"],
            "seed": int(r["seed"]),
            "steps": int(r["steps"]),
            "unit": r["unit"],
            "config": json.loads(r["config"]),
            "task_label": "bandit-4",
            "algo_label": "dpo-b",
            "grid": r["grid"],
        }
        for r in runs.to_dict("records")
        if r["algo"] == "dpo"
    ]
    with store.Store(res) as s:
        s.register_study(OTHER, "other.toml", "the DPO runs again, labelled differently", ["C6"], "x", records)
    for study, algo, claims in (
        (STUDY, "ppo", {"C6": "supported", "C13": "not measured"}),
        (OTHER, "dpo-b", {"C6": "supported"}),
    ):
        rep = res / "reports" / study
        rep.mkdir(parents=True)
        (rep / "report.md").write_text("# report\n")
        rule = {
            "claim": "C6",
            "metric": "kl/exact_to_optimal",
            "kind": "below",
            "a": algo,
            "b": None,
            "where": {},
            "statement": f"{algo} ends near pi*.",
            "threshold": 1.0,
            "margin": None,
            "verdict": "supported",
            "estimate": 0.01,
            "ci_low": 0.0,
            "ci_high": 0.02,
            "n": 2,
            "figure": None,
        }
        (rep / "verdicts.json").write_text(
            json.dumps(
                {
                    "study": study,
                    "claims": list(claims),
                    "verdicts": claims,
                    "rules": [rule],
                    "report": {"md": "report.md"},
                    "bibtex_id": "x",
                }
            )
        )
    return res


@pytest.fixture(scope="session")
def extended(results, tmp_path_factory) -> Path:
    """The study's store with reports and a second study (``extend``): read-only for the tests."""
    dst = tmp_path_factory.mktemp("dashboard_extended") / "results"
    shutil.copytree(results, dst, ignore=shutil.ignore_patterns("checkpoint"))
    return extend(dst)


# -- AppTest helpers -----------------------------------------------------------------------------


def app(results: Path, page: str | None = None, monkeypatch=None):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("WORKBENCH_RESULTS", str(results))
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.run()
    if page:
        at.switch_page(f"views/{page}.py")
        at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def table(at, *columns: str) -> pd.DataFrame:
    """The first table shown (a data grid or a static table) that has all of ``columns``."""
    shown = [d.value for d in at.dataframe] + [
        t.value.reset_index() if t.value.index.name else t.value for t in at.table
    ]
    for df in shown:
        if all(c in df.columns for c in columns):
            return df
    raise AssertionError(f"no table with columns {columns}; tables: {[list(df.columns) for df in shown]}")


def charts(at) -> list[pd.DataFrame]:
    """The data of each Vega-Lite chart on the page (AppTest gets the spec and its Arrow datasets)."""
    out = []
    for e in at.main:
        if getattr(e, "type", "") == "vega_lite_chart":
            frames = [pa.ipc.open_stream(d.data.data).read_pandas() for d in e.proto.datasets]
            # a lines chart also carries its hover table (one column per line): the marks' data have ``line``
            marked = [f for f in frames if "line" in f] or frames
            out.append(pd.concat(marked, ignore_index=True))
    return out


def specs(at) -> list[dict]:
    """The Vega-Lite spec of each chart on the page."""
    return [json.loads(e.proto.spec) for e in at.main if getattr(e, "type", "") == "vega_lite_chart"]


def texts(at) -> str:
    parts = [
        x.value for kind in ("title", "markdown", "caption", "info", "warning", "subheader") for x in getattr(at, kind)
    ]
    return "\n".join(str(p) for p in parts)


def final(results: Path) -> pd.DataFrame:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", store.LoadWarning)
        df = store.load_final(results, STUDY)
    df["coverage"] = [g.get("algo.coverage") for g in df["grid"]]
    return df


# -- colours, smoothing, log scales (no Streamlit) ------------------------------------------------


def board():
    """The dashboard's ``board`` package (the app puts its folder on the path the same way)."""
    sys.path.insert(0, str(ROOT / "dashboard"))
    import board
    import board.charts
    import board.colours
    import board.stats  # noqa: F401

    return board


def test_colour_table_covers_every_registered_algorithm_and_plugins_get_a_stable_colour():
    import zlib

    from workbench.registry import BUILT_IN

    colours = board().colours
    built_in = {s.name for s in BUILT_IN}  # (not ALGORITHMS: a plugin an earlier test registered is not in the table)
    assert built_in <= set(colours.FIXED), built_in - set(colours.FIXED)
    assert len(set(colours.PALETTE)) == len(colours.PALETTE) == 20
    assert len({colours.colour_of(a) for a in colours.ORDER}) == len(colours.ORDER)  # no two share a colour
    assert colours.colour_of("sft") == "#4e79a7" and colours.colour_of("ppo") == "#f28e2b"
    # a plugin's name: one of the slots the table leaves free, by CRC-32 (the same in every process)
    spare = colours.PALETTE[len(colours.ORDER) :]
    assert colours.colour_of("my_plugin") == spare[zlib.crc32(b"my_plugin") % len(spare)]
    assert colours.colour_of("my_plugin") not in colours.FIXED.values()
    assert colours.domain_range(["zeta_plugin", "dpo", "sft"])[0] == ["sft", "dpo", "zeta_plugin"]
    assert colours.samples_title({"ppo": "completions", "dpo": "pairs"}) == (
        "samples: completions (ppo); preference pairs (dpo)"
    )
    assert colours.titled("kl/exact") == "kl/exact (nats)" and colours.titled("reward/exact") == "reward/exact"
    # the tool-use study's measures get their units (docs/metrics.md): rates of episodes, calls per episode
    assert colours.unit_of("tool/exact_success_when_needed") == colours.unit_of("tool/success_rate")
    assert colours.unit_of("tool/exact_calls_when_not_needed") == colours.unit_of("tool/calls_mean")
    assert colours.unit_of("episode/exact_turns_mean") == "turns per episode"


def test_the_sample_viewer_sets_observation_and_scratch_tokens_apart():
    import torch

    from workbench.config import resolve

    board()
    from board import samples

    # a tool-use episode as the task renders it: the observation the environment wrote in brackets
    res = resolve({"task": {"name": "tool_use", "n_keys": 2, "n_values": 3}, "algo": "sft"})
    task = res.task
    prompt = task.eval_prompts()[0]
    call, key = task.action_words.index("call"), task.action_words.index("k0")
    obs, answer = task.action_words.index("v2"), task.action_words.index("v1")
    end = task.action_words.index("<end>")
    text = task.render(prompt, torch.tensor([call, key, obs, answer, end]))
    kind = samples.span_kind("tool_use")
    parts = samples.segments(text, kind)
    assert kind == "observation" and [p for p, _ in parts] == ["prompt", "arrow", "policy", "observation", "policy"]
    assert parts[2:] == [("policy", "call k0"), ("observation", "v2"), ("policy", "v1 <end>")]
    html = samples.sample_html(text, 1.0, kind)
    assert html.count('class="wb-observation"') == 1 and "&lt;end&gt;" in html and "<end>" not in html
    assert "(reward 1)" in html
    # the scratch-addition task brackets the scratch; a task without brackets has no set-apart span
    parts = samples.segments("1 2 + 9 -> [1 2 1] = 2 1 <end>", samples.span_kind("scratch_add"))
    assert parts[2:] == [("scratch", "1 2 1"), ("policy", "= 2 1 <end>")]
    assert [p for p, _ in samples.segments("ctx0 -> arm3", "bracketed")] == ["prompt", "arrow", "policy"]
    assert samples.segments("a b", "bracketed") == [("policy", "a b")]  # no prompt part


def test_smoothing_log_scales_and_the_heatmap_colour_top():
    b = board()
    # EMA with the start-up bias removed, by hand: w = 0.5, x = [1, 3]: s = 0.5 -> 0.5 / 0.5 = 1;
    # s = 0.25 + 1.5 = 1.75 -> 1.75 / 0.75 = 2.333...; a NaN neither moves nor counts
    assert b.stats.smooth(np.array([1.0, np.nan, 3.0]), 0.5)[[0, 2]] == pytest.approx([1.0, 7 / 3])
    assert b.stats.smooth(np.array([1.0, 3.0]), 0.0).tolist() == [1.0, 3.0]
    curve = pd.DataFrame({"line": ["a", "a", "b"], "step": [0, 1, 0], "mean": [1.0, 3.0, 5.0]})
    assert b.stats.smooth_curves(curve, "step", 0.5)["mean"].tolist() == pytest.approx([1.0, 7 / 3, 5.0])
    # a log scale keeps the positive points, says how many it dropped, and lifts a band's end at 0 to the bottom
    df = pd.DataFrame({"step": [0, 1, 2], "mean": [0.0, 0.5, 0.2], "lo": [0.0, 0.0, 0.1], "hi": [0.0, 1.0, 0.3]})
    out, dropped = b.charts.log_ready(df, ["mean"], band=("lo", "hi"))
    assert dropped == 1 and out["step"].tolist() == [1, 2] and out["lo"].tolist() == [0.1, 0.1]
    # one outlier (5.05) does not set the colour scale; two comparable large values do
    assert b.stats.colour_top([5.05, 0.1, 0.08, 0.05]) == (0.1, 1)
    assert b.stats.colour_top([0.3, 0.2, 0.1]) == (0.3, 0)


def test_the_browser_warm_up_chart_is_the_compare_chart_drawn_small():
    """The browser draws ``warm_up_chart.json`` off screen to compile Vega's code before the first real chart
    (``ui.preload_frontend``); it must stay the spec ``charts.lines`` makes (with its hover layers), or it warms
    code paths the pages no longer use. Regenerate: ``json.dump(charts.warm_up_spec(), f, sort_keys=True,
    separators=(",", ":"))``."""
    import importlib

    import streamlit as st

    b = board()
    ui = importlib.import_module("board.ui")
    text = (ROOT / "dashboard" / "board" / "warm_up_chart.json").read_text()
    spec = json.loads(text)
    assert spec == json.loads(json.dumps(b.charts.warm_up_spec()))
    assert [layer["mark"]["type"] for layer in spec["layer"]] == ["area", "line", "rule", "point"]
    near = spec["params"][0]
    assert near["select"]["nearest"] and spec["layer"][3]["transform"] == [
        {"filter": {"param": near["name"], "empty": False}}
    ]
    assert spec["usermeta"] == b.charts.SVG  # drawn as the pages draw (SVG)
    # the page script carries the spec as written and names only files this Streamlit has
    html = ui._preload_html()
    files = json.loads(re.search(r"files = (\[.*?\])", html).group(1))
    js = Path(st.__file__).parent / "static" / "static" / "js"
    assert files and all((js / f).exists() for f in files)
    assert text in html


# -- every page ----------------------------------------------------------------------------------


def test_empty_store_shows_the_quickstart(tmp_path, monkeypatch):
    at = app(tmp_path / "nothing", monkeypatch=monkeypatch)
    assert "No results in" in at.info[0].value
    assert any("workbench run studies/quickstart.toml" in c.value for c in at.code)


def test_studies_page_lists_runs_with_status_and_budget_and_opens_a_run(results, monkeypatch):
    at = app(results, monkeypatch=monkeypatch)
    assert at.title[0].value == "Studies"
    studies = table(at, "name", "n_runs")
    row = studies[studies["name"] == STUDY].iloc[0]
    assert (row["n_runs"], row["done"], row["failed"]) == (6, 6, 0)
    runs = table(at, "algorithm", "status", "consumed")
    assert len(runs) == 6 and set(runs["status"]) == {"done"}
    assert set(runs["algorithm"]) == {"ppo", "dpo"} and set(runs["step"]) == {"10"}
    consumed = dict(zip(runs["algorithm"], runs["consumed"]))
    assert consumed["ppo"] == "160 completions"  # 10 rounds x 16 completions
    assert runs[runs["algorithm"] == "dpo"]["consumed"].str.endswith(" pairs").all()
    assert "10 update rounds x 16 completions = up to 160 completions per run" in texts(at)

    ppo = runs[runs["algorithm"] == "ppo"]["run_id"].iloc[0]
    at.selectbox(key="run").set_value(ppo).run()
    assert not at.exception
    assert "status **done**" in texts(at)
    last = table(at, "reward/exact")
    m = store.load_metrics(results, run_ids=[ppo])
    assert last["reward/exact"].iloc[0] == pytest.approx(m["reward/exact"].dropna().iloc[-1])
    at.multiselect(key="run_metrics").set_value(["kl/exact"]).run()
    assert list(table(at, "kl/exact").columns) == ["kl/exact"]
    assert len(charts(at)) == 1
    # the sample viewer: the completions of the last evaluation step, one line each, any step on a slider
    logged = pd.read_json(Path(store.load_run(results, ppo)["path"]) / "samples.jsonl", lines=True)
    shown = [h for h in at.get("html") if "wb-policy" in h.proto.body]
    assert len(shown) == 1 and shown[0].proto.body.count('class="wb-policy"') == (logged["step"] == 10).sum()
    at.select_slider(key="sample_step").set_value(0).run()
    shown = [h for h in at.get("html") if "wb-policy" in h.proto.body]
    assert shown[0].proto.body.count('class="wb-policy"') == (logged["step"] == 0).sum()


def test_a_finished_study_is_read_in_the_background_and_its_pages_open_from_the_cache(results, monkeypatch):
    """The first page (Studies) starts a thread that reads what Compare, Frontier, Gradients and the Convergence
    map open with, through the pages' own cached functions and arguments (board.defaults): opening them then
    reads no metrics file again."""
    import threading

    import streamlit as st

    import workbench.results as store

    def join_prewarm():
        for t in threading.enumerate():
            if t.name == "workbench-prewarm-study":
                t.join(timeout=120)

    join_prewarm()  # an earlier test's background reads must not land in this test's count or caches
    reads = []
    for name in ("load_metrics", "load_final"):
        real = getattr(store, name)
        monkeypatch.setattr(store, name, lambda *a, _real=real, _n=name, **k: reads.append(_n) or _real(*a, **k))
    st.cache_data.clear()
    st.cache_resource.clear()
    at = app(results, None, monkeypatch)
    join_prewarm()
    warmed = list(reads)
    assert warmed.count("load_metrics") == 2 and warmed.count("load_final") == 2, warmed  # both metrics, both finals
    for page in ("compare", "frontier", "gradients", "convergence"):
        at.switch_page(f"views/{page}.py")
        at.run()
        assert not at.exception, (page, [e.message for e in at.exception])
    assert reads == warmed, reads[len(warmed) :]  # every page opened from what the thread read


def test_compare_page_mean_band_filters_and_scales(results, monkeypatch):
    at = app(results, "compare", monkeypatch)
    assert at.selectbox(key="compare_metric").value == "reward/exact"
    assert at.multiselect(key="compare_grid_algo.coverage").value == [0.5]  # one setting per algorithm to start
    last = table(at, "line", "mean", "lo", "hi", "n").set_index("line")
    f = final(results)
    assert set(last.index) == {"ppo", "dpo algo.coverage=0.5"}
    ppo = f[f["algo"] == "ppo"]["reward/exact"]
    assert last.loc["ppo", "mean"] == pytest.approx(ppo.mean())
    assert last.loc["ppo", "n"] == 2
    half = 12.706204736174698 * ppo.std(ddof=1) / np.sqrt(2)  # t_{0.975, 1}
    assert last.loc["ppo", "hi"] - last.loc["ppo", "mean"] == pytest.approx(half, rel=1e-6)
    dpo = f[(f["algo"] == "dpo") & (f["coverage"] == 0.5)]["reward/exact"]
    assert last.loc["dpo algo.coverage=0.5", "mean"] == pytest.approx(dpo.mean())
    (chart,) = charts(at)
    assert set(chart["line"]) == {"ppo", "dpo algo.coverage=0.5"} and set(chart["step"]) == {0, 5, 10}

    # hyperparameter filter: both coverages, DPO only -> one line per coverage
    at.multiselect(key="compare_algo").set_value(["dpo"]).run()
    at.multiselect(key="compare_grid_algo.coverage").set_value([0.5, 1.0]).run()
    last = table(at, "line", "mean").set_index("line")
    assert set(last.index) == {"dpo algo.coverage=0.5", "dpo algo.coverage=1.0"}
    full = f[(f["algo"] == "dpo") & (f["coverage"] == 1.0)]["reward/exact"]
    assert last.loc["dpo algo.coverage=1.0", "mean"] == pytest.approx(full.mean())

    # another metric, over samples, on log scales
    at.selectbox(key="compare_metric").set_value("kl/exact").run()
    at.radio(key="compare_x").set_value("samples").run()
    at.checkbox(key="compare_log_y").check().run()
    assert not at.exception
    (chart,) = charts(at)
    m = store.load_metrics(results, STUDY, columns=["kl/exact"]).dropna()
    m = m.merge(f[["run_id", "algo", "coverage"]], on="run_id").query("algo == 'dpo' and step > 0")
    assert (chart["mean"] > 0).all()
    # step 0 has pi = pi_ref: kl/exact is 0 (left out of the log scale) or float32 noise of ~1e-8
    trained = chart[chart["mean"] > 1e-6]
    assert sorted(trained["samples"]) == pytest.approx(
        sorted(m.groupby(["coverage", "step"])["samples"].mean())
    )  # pairs consumed
    assert len(trained) == len(chart) - 2 or "left out of the log scale" in texts(at)
    assert at.get("download_button")


def test_frontier_page_shows_the_exact_optimum_and_where_methods_end(results, monkeypatch):
    at = app(results, "frontier", monkeypatch)
    f = final(results)
    opt = table(at, "beta", "optimal/kl", "optimal/reward")
    assert list(opt["beta"]) == [0.1]
    assert opt["optimal/kl"].iloc[0] == pytest.approx(f["optimal/kl"].mean())
    assert opt["optimal/reward"].iloc[0] == pytest.approx(f["optimal/reward"].mean())
    ends = table(at, "method", "kl/exact", "reward/exact").set_index("method")
    assert set(ends.index) == {"ppo", "dpo algo.coverage=0.5", "dpo algo.coverage=1.0"}
    assert ends.loc["ppo", "reward/exact"] == pytest.approx(f[f["algo"] == "ppo"]["reward/exact"].mean())
    assert ends.loc["ppo", "KL(pi || pi*)"] == pytest.approx(f[f["algo"] == "ppo"]["kl/exact_to_optimal"].mean())
    assert (ends["objective gap to pi*"] > -1e-6).all()  # pi* maximises reward - beta KL
    at.checkbox(key="frontier_paths").check().run()
    at.selectbox(key="frontier_y").set_value("objective/exact").run()
    assert not at.exception
    ends = table(at, "method", "objective/exact").set_index("method")
    assert ends.loc["ppo", "objective/exact"] == pytest.approx(f[f["algo"] == "ppo"]["objective/exact"].mean())


def test_gradients_page_batch_sizes_from_the_probe_and_cosines_over_training(results, monkeypatch):
    at = app(results, "gradients", monkeypatch)
    probe = store.load_probes(results, "gradients", STUDY)
    batch = table(at, "line", "batch size", "mean")
    assert set(batch["line"]) <= {"reinforce", "rloo", "ppo", "dpo"} and set(batch["batch size"]) <= {8, 16}
    row = batch[(batch["line"] == "rloo") & (batch["batch size"] == 16)].iloc[0]
    assert row["mean"] == pytest.approx(probe.query("objective == 'rloo' and batch_size == 16")["snr"].iloc[0])
    at.radio(key="grad_stat").set_value("cosine to the true gradient").run()
    batch = table(at, "line", "batch size", "mean")
    assert batch["mean"].between(-1, 1).all()

    at.selectbox(key="grad_over").set_value("grad/cos_dpo_rl").run()
    over = table(at, "line", "step", "mean").set_index("line")
    m = store.load_metrics(results, STUDY, columns=["grad/cos_dpo_rl"])
    ids = store.load_runs(results, STUDY).query("algo == 'ppo'")["run_id"]
    last = m[m["run_id"].isin(ids)].dropna().sort_values("step").groupby("run_id").tail(1)
    assert over.loc["ppo", "mean"] == pytest.approx(last["grad/cos_dpo_rl"].mean())


def test_credit_page_heatmap_of_exact_and_estimated_advantages(results, monkeypatch):
    at = app(results, "credit", monkeypatch)
    heat = table(at, "t=0")
    assert list(heat.index) == ["ppo · estimated", "ppo · exact"]
    assert heat["t=0"].tolist() == pytest.approx([1.0, 1.0])  # one position: all of |A| is there
    h, *over = charts(at)  # the heatmap, then estimated and exact over training
    assert set(h["row"]) == {"ppo · estimated", "ppo · exact"}
    assert len(over) == 2 and set(over[0]["probe step"]) == {0, 5, 10}  # probe_every = 5
    at.radio(key="credit_view").set_value("mean |A|").run()
    at.radio(key="credit_when").set_value("all (mean)").run()
    heat = table(at, "t=0")
    cr = store.load_credit(results, STUDY)
    assert heat.loc["ppo · exact", "t=0"] == pytest.approx(cr["exact_abs"].mean())
    assert heat.loc["ppo · estimated", "t=0"] == pytest.approx(cr["method_abs"].mean())
    at.radio(key="credit_view").set_value("correlation with the exact A").run()
    assert list(table(at, "t=0").index) == ["ppo · estimated"]
    at.checkbox(key="credit_summaries").check().run()
    assert at.selectbox(key="credit_summary").value == "credit/corr" and len(charts(at)) == 3


def test_convergence_page_exact_distances_between_final_policies(results, monkeypatch):
    at = app(results, "convergence", monkeypatch)
    assert at.selectbox(key="conv_axis").value == "algo.coverage"
    assert at.selectbox(key="conv_ref").value == "ppo"
    cells = table(at, "method", "algo.coverage", "distance", "verdict")
    assert set(cells["algo.coverage"]) == {"0.5", "1.0"} and set(cells["method"]) == {"dpo"}
    runs = store.load_runs(results, STUDY)
    pols = store.load_policies(results, runs["run_id"])
    assert len(pols) == 6  # every run wrote its final policy
    tv = []
    for seed in (0, 1):
        a = runs.query(f"algo == 'ppo' and seed == {seed}")["run_id"].iloc[0]
        b = [
            r
            for r, g, s in zip(runs["run_id"], runs["grid"], runs["seed"])
            if g.get("algo.coverage") == 1.0 and s == seed
        ][0]
        p, q = np.exp(pols[a].astype(float)), np.exp(pols[b].astype(float))
        tv.append(0.5 * np.abs(p - q).sum(-1).mean())
    assert cells.set_index("algo.coverage").loc["1.0", "distance"] == pytest.approx(np.mean(tv), rel=1e-5)
    assert "Exact total variation" in texts(at)
    at.slider(key="conv_threshold").set_value(0.5).run()
    assert set(table(at, "verdict")["verdict"]) <= {"same policy", "part", "unclear"}


def test_claims_page_without_and_with_a_report(copy_of, monkeypatch):
    res = copy_of()
    at = app(res, "claims", monkeypatch)
    claims = table(at, "claim", "statement", "verdicts").set_index("claim")
    assert claims.loc["C6", "studies"] == STUDY and claims.loc["C6", "verdicts"] == "no report yet"
    assert claims.loc["C1", "verdicts"] == "no study"
    assert f"workbench report {STUDY}" in "\n".join(c.value for c in at.code)

    rep = res / "reports" / STUDY
    rep.mkdir(parents=True)
    (rep / "report.md").write_text("# report\n")
    (rep / "report.html").write_text("<h1>report</h1>")
    rule = {
        "claim": "C6",
        "metric": "kl/exact_to_optimal",
        "kind": "below",
        "a": "ppo",
        "b": None,
        "where": {},
        "statement": "PPO ends near pi*.",
        "threshold": 1.0,
        "margin": None,
        "verdict": "supported",
        "estimate": 0.01,
        "ci_low": 0.0,
        "ci_high": 0.02,
        "n": 2,
        "figure": None,
    }
    (rep / "verdicts.json").write_text(
        json.dumps(
            {  # as workbench.reporting.report writes it
                "study": STUDY,
                "claims": ["C6", "C13"],
                "verdicts": {"C6": "supported", "C13": "not measured"},
                "rules": [rule],
                "report": {"md": "report.md", "html": "report.html", "pdf": "report.pdf"},
                "bibtex_id": "x",
            }
        )
    )
    at = app(res, "claims", monkeypatch)
    claims = table(at, "claim", "verdicts").set_index("claim")
    assert claims.loc["C6", "verdicts"] == f"{STUDY}: supported"
    assert claims.loc["C13", "verdicts"] == f"{STUDY}: not measured"
    body = texts(at)
    assert ":green-badge[supported]" in body and "PPO ends near pi*." in body and "(95% CI 0 to 0.02)" in body
    # no PDF was written: the HTML report is the one offered
    assert [b.label for b in at.get("download_button")][:2] == [
        "Download all verdicts (CSV)",
        "Download the report (report.html)",
    ]
    at.button(key="claims_goto_0_0").click().run()  # evidence: open the metric in Compare
    assert at.title[0].value == "Compare" and at.selectbox(key="compare_metric").value == "kl/exact_to_optimal"


def test_a_corrupt_and_a_running_run_show_warnings_and_the_rest_loads(copy_of, monkeypatch):
    res = copy_of()
    runs = store.load_runs(res, STUDY)
    bad = runs.query("algo == 'ppo'")["run_id"].iloc[0]
    (res / "runs" / bad / "metrics.parquet").write_bytes(b"not parquet")
    # a study still running: one run claimed by this (live) process, halfway through its metrics file
    with store.Store(res) as s:
        cfg = json.loads(runs["config"].iloc[0])
        s.register_study(
            "live",
            "live.toml",
            "running now",
            ["C6"],
            "x",
            [
                {
                    "run_id": "live0000",
                    "task": "bandit",
                    "algo": "ppo",
                    "seed": 9,
                    "steps": 10,
                    "unit": "completions",
                    "config": cfg,
                    "task_label": "bandit",
                    "algo_label": "ppo",
                    "grid": {},
                }
            ],
        )
        assert s.claim("live0000", store.Owner.current()) == "claimed"
    d = res / "runs" / "live0000"
    d.mkdir()
    (d / "metrics.jsonl").write_text('{"step": 0, "samples": 0, "reward/exact": 0.25}\n{"step": 1, "samples": 16, "rew')

    at = app(res, "compare", monkeypatch)
    assert "1 run(s) could not be read and were skipped" in at.warning[0].value
    last = table(at, "line", "mean", "n").set_index("line")
    assert last.loc["ppo", "n"] == 1 and last.loc["dpo algo.coverage=0.5", "n"] == 2  # the rest still loads

    at.sidebar.selectbox(key="study").set_value("live").run()
    at.switch_page("views/studies.py").run()
    assert not at.exception
    runs_shown = table(at, "algorithm", "status", "step")
    assert runs_shown["status"].tolist() == ["running"] and runs_shown["step"].tolist() == ["0"]
    assert "live: refreshing every" in texts(at)


def test_switching_study_starts_the_filters_afresh(extended, monkeypatch):
    at = app(extended, "compare", monkeypatch)
    at.multiselect(key="compare_algo").set_value(["ppo"]).run()
    assert set(table(at, "line", "mean")["line"]) == {"ppo"}
    at.sidebar.selectbox(key="study").set_value(OTHER).run()
    assert not at.exception and "No run passes the filters." not in texts(at)
    assert at.multiselect(key="compare_algo").value == ["dpo-b"] and at.multiselect(key="compare_task").value == [
        "bandit-4"
    ]
    assert set(table(at, "line", "mean")["line"]) == {"dpo-b algo.coverage=0.5"}
    at.sidebar.selectbox(key="study").set_value(STUDY).run()  # and back: the first study's defaults again
    assert at.multiselect(key="compare_algo").value == ["ppo", "dpo"]


def colour_scales(spec) -> dict[str, str]:
    """algorithm -> colour from every colour scale of a chart spec with a fixed domain and range."""
    out: dict[str, str] = {}
    if isinstance(spec, dict):
        scale = spec.get("scale") if isinstance(spec.get("scale"), dict) else {}
        if spec.get("title") == "algorithm" and "domain" in scale and "range" in scale:
            for a, c in zip(scale["domain"], scale["range"]):
                assert out.setdefault(a, c) == c
        for v in spec.values():
            for a, c in colour_scales(v).items():
                assert out.setdefault(a, c) == c, (a, out[a], c)
    elif isinstance(spec, list):
        for v in spec:
            for a, c in colour_scales(v).items():
                assert out.setdefault(a, c) == c
    return out


def test_an_algorithm_has_one_colour_on_compare_frontier_and_convergence_in_both_studies(extended, monkeypatch):
    """The chart specs: DPO is the same colour on every page of both studies (in ``other`` it is labelled dpo-b,
    with other tasks), PPO likewise, and both are the colours of the fixed table."""
    colours = board().colours
    seen: dict[tuple[str, str], dict[str, str]] = {}
    for study in (STUDY, OTHER):
        at = app(extended, monkeypatch=monkeypatch)
        at.sidebar.selectbox(key="study").set_value(study).run()
        for page in ("compare", "frontier", "convergence"):
            at.switch_page(f"views/{page}.py").run()
            assert not at.exception, [e.message for e in at.exception]
            found = colour_scales(specs(at))
            assert found, (study, page)
            seen[study, page] = found
    for (study, page), found in seen.items():
        assert found["dpo"] == colours.colour_of("dpo"), (study, page, found)
        assert set(found) == ({"ppo", "dpo"} if study == STUDY else {"dpo"}), (study, page, found)
        if "ppo" in found:
            assert found["ppo"] == colours.colour_of("ppo") != found["dpo"]
    # the two DPO settings differ by dash on Compare, not by colour
    at = app(extended, "compare", monkeypatch)
    at.multiselect(key="compare_grid_algo.coverage").set_value([0.5, 1.0]).run()
    (spec,) = specs(at)
    assert "strokeDash" in json.dumps(spec) and set(colour_scales(spec)) == {"ppo", "dpo"}


def test_the_run_query_parameter_opens_that_run(results, monkeypatch):
    from streamlit.testing.v1 import AppTest

    ppo = store.load_runs(results, STUDY).query("algo == 'ppo'")["run_id"].iloc[0]
    monkeypatch.setenv("WORKBENCH_RESULTS", str(results))
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.query_params["run"] = ppo
    at.run()
    assert not at.exception and at.selectbox(key="run").value == ppo and "status **done**" in texts(at)
    other = store.load_runs(results, STUDY).query("algo == 'dpo'")["run_id"].iloc[0]
    at.selectbox(key="run").set_value(other).run()
    assert at.query_params["run"] in (other, [other])  # the URL holds the run id, not its label
    at.selectbox(key="run").set_value(None).run()
    assert "run" not in at.query_params
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.query_params["run"] = "not-a-run"
    at.run()
    assert not at.exception and at.selectbox(key="run").value is None and "run" not in at.query_params


def test_the_dashboard_imports_only_the_store(results, tmp_path):
    """Run every page in a fresh interpreter; no training code (nor torch) may be imported."""
    script = textwrap.dedent(f"""
        import os, sys
        os.environ["WORKBENCH_RESULTS"] = {str(results)!r}
        from streamlit.testing.v1 import AppTest
        at = AppTest.from_file({str(APP)!r}, default_timeout=60)
        at.run()
        for page in {PAGES!r}:
            at.switch_page(f"views/{{page}}.py")
            at.run()
            assert not at.exception, (page, [e.message for e in at.exception])
        print(sorted(m for m in sys.modules if m == "torch" or m.startswith("workbench")))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(), timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    # the results layer (files, index, loader), and the interval functions the report uses (no torch)
    assert out.stdout.strip().splitlines()[-1] == str(
        [
            "workbench",
            "workbench.core",
            "workbench.core.stats",
            "workbench.results",
            "workbench.results.files",
            "workbench.results.index",
            "workbench.results.loader",
        ]
    )


# -- end to end: `workbench dashboard` in headless Chromium -------------------------------------------

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-dev-shm-usage",
]


def _chromium() -> str | None:
    for c in (
        os.environ.get("CHROMIUM"),
        "/usr/bin/chromium",
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
    ):
        if c and Path(c).exists():
            return c
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(results):
    """``workbench dashboard`` on a free loopback port, shared by this file's browser tests on the study's store;
    stopped (its process group) afterwards."""
    yield from _serve(results)


@pytest.fixture
def extended_server(extended):
    yield from _serve(extended)


def _serve(results: Path):
    port = _free_port()
    proc = subprocess.Popen(
        [*CLI, "dashboard", "--results", str(results), "--port", str(port)],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(
                    f"workbench dashboard did not start:\n{proc.stdout.read() if proc.poll() is not None else ''}"
                )
            time.sleep(0.3)
        yield url, port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_workbench_dashboard_passes_the_repository_settings_and_watches_no_files():
    """``workbench dashboard`` starts Streamlit with every setting of ``.streamlit/config.toml`` as a flag (that file
    is read only from the repository root), among them no file watching and no garbage collection after each run
    (each held the messages of the page being drawn on 2 cores: docs/dashboard.md). The browser tests start the
    server this way, so Streamlit accepting the flags is tested there."""
    import tomllib

    from workbench.cli import DASHBOARD_CONFIG, dashboard_command

    cmd = dashboard_command(APP, 8765)
    flags = dict(zip(cmd[5::2], cmd[6::2]))
    assert cmd[:5] == [sys.executable, "-m", "streamlit", "run", str(APP)] and flags.pop("--server.port") == "8765"
    settings = tomllib.loads(DASHBOARD_CONFIG.read_text())
    assert flags == {
        f"--{section}.{key}": str(v).lower() if isinstance(v, bool) else str(v)
        for section, values in settings.items()
        for key, v in values.items()
    }
    assert flags["--server.fileWatcherType"] == "none" and flags["--runner.postScriptGC"] == "false"
    assert flags["--server.address"] == "127.0.0.1" and flags["--browser.gatherUsageStats"] == "false"


def screenshots(name: str) -> Path:
    """Where a browser test keeps its screenshots: ``$WORKBENCH_SCREENSHOTS/NAME``, else ``test-artifacts/dashboard/
    NAME`` in the repository (ignored by git; kept after the run for CI to collect)."""
    base = Path(os.environ.get("WORKBENCH_SCREENSHOTS") or ROOT / "test-artifacts" / "dashboard")
    out = base / name
    out.mkdir(parents=True, exist_ok=True)
    return out


def settle(page, ready: str | None = None) -> None:
    """Until the script run is over (and ``ready``, a text the page shows last, is there) and the page's text and
    charts have stopped changing for two looks in a row."""
    page.wait_for_timeout(400)
    page.locator('[data-testid="stApp"][data-test-script-state="notRunning"]').wait_for()
    if ready:
        page.get_by_text(ready).first.wait_for()
    # no element still a placeholder, and every chart drawn into its SVG (a busy machine renders late)
    page.wait_for_function(
        """() => !document.querySelector('[data-testid^="stSkeleton"]') && Array.from(document.querySelectorAll(
            '[data-testid="stVegaLiteChart"]')).every(c => c.querySelector('svg .role-mark'))""",
        timeout=60_000,
    )
    shown, same = None, 0
    for _ in range(40):
        now = page.locator('[data-testid="stMain"]').inner_text() + str(drawn(page))
        same = same + 1 if now == shown else 0
        if same == 2:
            break
        shown = now
        page.wait_for_timeout(250)


DRAWN_JS = """(sel) => Array.from(document.querySelectorAll('[data-testid="stVegaLiteChart"]')).map(chart =>
    Array.from(chart.querySelectorAll(sel)).filter(e => {
        const d = e.getAttribute('d');
        if (d !== null && (d === '' || d.includes('NaN'))) return false;
        let g = e;
        for (; g && g.tagName !== 'svg'; g = g.parentElement) {
            const o = g.getAttribute('opacity') ?? g.getAttribute('fill-opacity');
            if (o !== null && parseFloat(o) === 0) return false;
        }
        const b = e.getBBox();
        return b.width > 0 && b.height > 0;
    }).length)"""
MARKS = ".role-mark:not([class*=voronoi]) > path, .role-mark:not([class*=voronoi]) > rect"


def drawn(page, sel: str = MARKS) -> list[int]:
    """For each chart on the page, its data marks drawn with an area (a visible box of width and height > 0): a
    chart whose marks collapsed onto one edge (a log scale fed 0) or went NaN counts none."""
    return page.evaluate(DRAWN_JS, sel)


def assert_drawn(page, where: str) -> None:
    counts = drawn(page)
    assert all(n > 0 for n in counts), f"{where}: a chart drew no marks: {counts}"


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium and Playwright, or a skip that says what is missing (checked before the server starts)."""
    path = _chromium()
    if path is None:
        pytest.skip("no Chromium: apt-get install -y chromium (.ci/run does), or set CHROMIUM=/path/to/chromium")
    try:
        from playwright.sync_api import expect
    except ImportError:
        pytest.skip("playwright is not installed: pip install -e '.[dev]'")
    expect.set_options(timeout=30_000)  # a first page load on 2 busy cores can take longer than the 5 s default
    return path


def test_browser_every_page(chromium, server, results, tmp_path):
    import streamlit as st
    from playwright.sync_api import expect, sync_playwright

    url, port = server
    listening = (
        subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
        if shutil.which("ss")
        else ""
    )
    assert not listening or all(line.split()[3].startswith("127.0.0.1:") for line in listening.splitlines())

    shots = screenshots("every_page")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        # tall: Streamlit scrolls an inner container
        page = browser.new_page(viewport={"width": 1400, "height": 2200}, accept_downloads=True)
        page.set_default_timeout(30_000)
        page.goto(url)

        def heading(text: str):
            expect(page.get_by_role("heading", name=text, level=1)).to_be_visible()

        def shoot(name: str):
            settle(page)
            assert_drawn(page, name)
            page.screenshot(path=str(shots / f"{name}.png"))

        def combo(label: str):
            return page.get_by_role("combobox", name=label, exact=True)

        def go(title: str):
            page.get_by_role("link", name=title).click()
            heading(title)

        heading("Studies")
        expect(page.get_by_text("Study dash")).to_be_visible()
        # the frontend warm-up (ui.preload_frontend): once the page (no chart) is at rest, Streamlit's element code
        # loaded and one chart drawn off screen, then removed
        page.wait_for_function("typeof window.__workbenchPreloaded === 'number'", timeout=60_000)
        if list((Path(st.__file__).parent / "static" / "static" / "js").glob("loadVegaEmbed.*.js")):
            assert page.evaluate("window.__workbenchWarmMarks") > 0
        assert page.locator("div[style*='-10000px']").count() == 0
        expect(combo("Study")).to_have_value(STUDY)  # the sidebar's selectbox is a combobox
        expect(page.get_by_text("160 completions per run")).to_be_visible()
        combo("Run").click()
        page.get_by_role("option").filter(has_text="ppo / bandit / seed 0").click()
        expect(page.get_by_text("status done")).to_be_visible()
        shoot("studies")

        go("Compare")
        expect(combo("Metric")).to_have_value("reward/exact")
        expect(page.get_by_text("reward/exact at the last logged step")).to_be_visible()
        combo("Metric").fill("kl/exact")  # typing filters the (virtualised) list of options
        page.get_by_role("option", name="kl/exact", exact=True).click()
        expect(combo("Metric")).to_have_value("kl/exact")
        expect(page.get_by_text("kl/exact at the last logged step")).to_be_visible()
        expect(page.locator("canvas, svg").first).to_be_visible()
        shoot("compare")
        # hover: no dot until the pointer is over the chart, then one per line at the nearest step
        dots = ".mark-symbol.role-mark > path"
        assert drawn(page, dots) == [0]
        n_lines = int(re.search(r"runs, (\d+) lines", page.locator('[data-testid="stMain"]').inner_text()).group(1))
        box = page.locator('[data-testid="stVegaLiteChart"] svg').first.bounding_box()
        page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.3)
        page.wait_for_function(f"() => ({DRAWN_JS})({json.dumps(dots)})[0] > 0")
        assert 1 <= drawn(page, dots)[0] <= n_lines
        page.mouse.move(0, 0)
        # the CSV is made when the button is clicked (a deferred download): the data shown, as logged
        with page.expect_download() as download:
            page.get_by_role("button", name="Download the data shown (CSV)").click()
        csv = pd.read_csv(download.value.path())
        assert (
            list(csv.columns[:6]) == ["line", "step", "samples", "mean", "lo", "hi"]
            and csv["line"].nunique() == n_lines
        )

        go("Frontier")
        expect(page.get_by_text("The exact frontier")).to_be_visible()
        expect(combo("KL (x)")).to_have_value("kl/exact")
        shoot("frontier")

        go("Gradients")
        expect(page.get_by_role("heading", name="Noise vs batch size")).to_be_visible()
        expect(page.get_by_text("workbench probe --what gradients")).to_be_visible()
        shoot("gradients")

        go("Credit")
        expect(page.get_by_text("share of |A| at each position").first).to_be_visible()
        shoot("credit")

        go("Convergence map")
        expect(page.get_by_role("heading", name="Distance between final policies")).to_be_visible()
        expect(page.get_by_text("Exact total variation")).to_be_visible()
        shoot("convergence")

        go("Claims")
        expect(page.get_by_text("No report yet for dash")).to_be_visible()
        shoot("claims")
        browser.close()
    assert sorted(f.stem for f in shots.glob("*.png")) == sorted(PAGES)
    print(f"screenshots: {shots}")


def browser(p, chromium: str):
    b = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
    return b


def new_page(b, url: str, ready: str | None = None):
    page = b.new_context(viewport={"width": 1400, "height": 2200}).new_page()  # a fresh context: no state
    page.set_default_timeout(30_000)
    page.goto(url)
    page.locator("h1").first.wait_for()
    settle(page, ready)
    return page


def test_browser_a_log_scale_draws_the_lines_of_a_non_negative_metric_whose_band_touches_zero(chromium, server):
    """kl/exact on a log y axis: at step 0 it is 0 (left out, and said so); with 2 seeds the t band of each later
    mean reaches below 0 and is clipped there. Each line and its band must still draw (they drew flat at the top
    edge before: a band at 0 on a log scale)."""
    from playwright.sync_api import sync_playwright

    url, _ = server
    with sync_playwright() as p:
        b = browser(p, chromium)
        page = new_page(
            b, f"{url}/compare?study={STUDY}&compare_metric=kl/exact&compare_log_y=true", "at the last logged step"
        )
        text = page.locator('[data-testid="stMain"]').inner_text()
        assert "left out of the log scale" in text and "its band is clipped at 0" in text
        lines = drawn(page, ".mark-line > path")
        areas = drawn(page, ".mark-area > path")
        page.screenshot(path=str(screenshots("log_scale") / "compare_kl_log_y.png"))
        assert lines == [2] and areas == [2], (lines, areas)  # ppo and dpo coverage 0.5: both lines, both bands
        b.close()


@pytest.mark.timeout(600)
def test_browser_a_shared_url_restores_the_page_state(chromium, server):
    """Operate the widgets of Compare, Frontier, Gradients, Credit and the Convergence map; the URL then opens the
    same view in a fresh browser context (no cookies, no session) and after a reload. Every chart draws."""
    from playwright.sync_api import expect, sync_playwright

    url, _ = server
    shots = screenshots("shared_url")

    def combo(page, label: str):
        return page.get_by_role("combobox", name=label, exact=True)

    def choose(page, label: str, option: str):
        combo(page, label).click()
        page.get_by_role("option", name=option, exact=True).click()
        settle(page)

    def tick(page, role: str, name: str):
        page.get_by_role(role, name=name, exact=True).check(force=True)
        settle(page)

    def slide(page, name: str, presses: int):
        page.get_by_role("slider", name=name).focus()
        for _ in range(presses):
            page.keyboard.press("ArrowRight")
        settle(page)

    def state(page) -> dict:
        """The values of the page's widgets, as a user sees them."""
        return page.evaluate("""() => ({
            combos: Array.from(document.querySelectorAll('[data-testid="stMain"] input[role=combobox]'))
                .map(e => e.value),
            checked: Array.from(document.querySelectorAll('[data-testid="stMain"] input[type=checkbox],'
                + '[data-testid="stMain"] input[type=radio]')).map(e => e.checked),
            sliders: Array.from(document.querySelectorAll('[data-testid="stMain"] [role=slider]'))
                .map(e => e.getAttribute('aria-valuenow')),
            chips: Array.from(document.querySelectorAll('[data-testid="stMain"] [data-testid="stMultiSelect"]'))
                .map(e => e.innerText),
        })""")

    with sync_playwright() as p:
        b = browser(p, chromium)
        views = {}  # page -> (its URL after the widgets were operated, a text it shows last, its state then)
        page = new_page(b, f"{url}/compare?study={STUDY}")
        combo(page, "Metric").fill("kl/exact")
        page.get_by_role("option", name="kl/exact", exact=True).click()
        settle(page)
        tick(page, "radio", "samples")
        tick(page, "checkbox", "log y")
        slide(page, "smoothing", 30)
        page.get_by_role("button", name="Remove dpo").first.click()
        ready = "at the last logged step"
        settle(page, ready)
        assert "lines smoothed" in page.locator('[data-testid="stMain"]').inner_text()
        views["compare"] = (page.url, ready, state(page))

        ready = "Where each method ends"
        page = new_page(b, f"{url}/frontier?study={STUDY}", ready)
        tick(page, "checkbox", "training paths")
        tick(page, "checkbox", "log x")  # KL = 0 at step 0: those path points are left out, the rest draws
        assert "left out of the log scale" in page.locator('[data-testid="stMain"]').inner_text()
        choose(page, "Reward (y)", "objective/exact")
        settle(page, ready)
        views["frontier"] = (page.url, ready, state(page))

        ready = "Over training"
        page = new_page(b, f"{url}/gradients?study={STUDY}", ready)
        tick(page, "radio", "cosine to the true gradient")
        expect(page.get_by_role("checkbox", name="log y", exact=True)).not_to_be_checked()  # its own log switch
        choose(page, "Measurement", "grad/cos_dpo_rl")
        settle(page, ready)
        views["gradients"] = (page.url, ready, state(page))

        ready = "Summary metrics over training"
        page = new_page(b, f"{url}/credit?study={STUDY}", ready)
        tick(page, "radio", "mean |A|")
        tick(page, "radio", "all (mean)")
        tick(page, "checkbox", "Summary metrics over training (credit/*)")
        settle(page, ready)
        views["credit"] = (page.url, ready, state(page))

        ready = "vs each method"
        page = new_page(b, f"{url}/convergence?study={STUDY}", ready)
        slide(page, "Same policy when the total variation is below", 10)
        settle(page, ready)
        views["convergence"] = (page.url, ready, state(page))

        def restored(page, want: dict, what: str) -> None:
            """The page's widgets reach ``want`` (polled: a loaded page draws its widgets over a few hundred ms)."""
            for _ in range(60):
                if state(page) == want:
                    break
                page.wait_for_timeout(500)
            assert state(page) == want, what

        for name, (shared, ready, want) in views.items():
            assert "_" in shared.split("?")[1], shared  # widget keys are in the URL (a study at its default is not)
            again = new_page(b, shared, ready)  # a fresh context: the URL alone restores the view
            restored(again, want, name)
            settle(again)
            assert_drawn(again, name)
            again.screenshot(path=str(shots / f"{name}.png"))
            if name == "compare":
                again.reload()
                again.locator("h1").first.wait_for()
                restored(again, want, f"{name} after a reload")
        b.close()


APP_BUTTONS = (
    '[data-testid^="stBaseButton-"]:not([data-testid="stBaseButton-elementToolbar"])'
    ':not([data-testid="stBaseButton-headerNoPadding"])'
)
NAV = {
    "Studies": "",
    "Compare": "compare",
    "Frontier": "frontier",
    "Gradients": "gradients",
    "Credit": "credit",
    "Convergence map": "convergence",
    "Claims": "claims",
}


@pytest.mark.timeout(600)
def test_browser_clicks_every_button_and_link(chromium, extended_server, extended, tmp_path):
    """Every button (the app's own: not Streamlit's table and chart toolbars) and every link of every page, clicked in
    a real browser, with a run open on the Studies page and a report on the Claims page; then the three paths AppTest
    cannot see: Claims' "Open ... in Compare" (st.switch_page with a URL-bound widget), a switch of study on Compare,
    and ?run=RUN_ID. No Streamlit exception may show."""
    from playwright.sync_api import expect, sync_playwright

    url, _ = extended_server
    run_id = store.load_runs(extended, STUDY).query("algo == 'ppo'")["run_id"].iloc[0]
    clicked: list[str] = []
    shots = screenshots("every_button")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 2200}, accept_downloads=True)
        page.set_default_timeout(30_000)

        def settle():  # until the script run a click or a page load started is over, and its elements are drawn
            page.wait_for_timeout(300)
            page.locator('[data-testid="stApp"][data-test-script-state="notRunning"]').wait_for()
            shown = None
            for _ in range(30):
                now = page.locator('[data-testid="stMain"]').inner_text()
                if now == shown:
                    break
                shown = now
                page.wait_for_timeout(300)

        def no_exception(what: str):
            settle()
            shown = page.locator('[data-testid="stException"]')
            assert shown.count() == 0, f"{what}: {shown.first.inner_text()[:1500]}"

        def open_page(path: str, query: str):
            page.goto(f"{url}/{path}?{query}")
            expect(page.locator("h1").first).to_be_visible()
            # the sidebar's Reload is on every page of a store. On a tab's first page the sidebar shows skeletons
            # (its element code still loading) up to ~0.8 s after the heading shows and the script run is over, and
            # the main text is already still: a CI run counted no button on Studies then
            try:
                expect(page.get_by_role("button", name="Reload", exact=True)).to_be_visible()
            except AssertionError as e:
                raise AssertionError(f"/{path}?{query}: no Reload button: {shown_text()}") from e
            no_exception(f"opening /{path}?{query}")

        def shown_text() -> str:
            page.screenshot(path=str(shots / "no_button.png"), full_page=True)  # kept for CI to collect
            side, main = (
                " ".join(page.locator(f'[data-testid="{t}"]').all_inner_texts())[:800] for t in ("stSidebar", "stMain")
            )
            return f"screenshot {shots / 'no_button.png'}; sidebar: {side!r}; main: {main!r}"

        pages = {title: (path, f"study={STUDY}") for title, path in NAV.items()}
        pages["Studies, a run open"] = ("", f"study={STUDY}&run={run_id}")
        pages[f"Claims of {OTHER}"] = ("claims", f"study={OTHER}")
        for title, (path, query) in pages.items():
            open_page(path, query)
            here = page.url.split("#")[0]
            n_buttons = page.locator(APP_BUTTONS).filter(visible=True).count()
            assert n_buttons >= 1, f"{title}: {shown_text()}"
            for i in range(n_buttons):
                if page.url.split("#")[0] != here:  # the last click went to another page
                    open_page(path, query)
                button = page.locator(APP_BUTTONS).filter(visible=True).nth(i)
                name = button.inner_text().strip()
                button.click()
                no_exception(f"{title}: button {name!r}")
                clicked.append(f"{title}: {name}")
            anchors = page.locator('[data-testid="stMain"] a[href]')
            for i in range(anchors.count()):
                if page.url.split("#")[0] != here:
                    open_page(path, query)
                href = anchors.nth(i).get_attribute("href") or ""
                assert href.startswith(("#", url)), f"{title}: a link leaves the dashboard: {href}"
                anchors.nth(i).click(force=True)  # heading anchors show on hover only
                no_exception(f"{title}: link {href}")
                clicked.append(f"{title}: link {href}")
        nav = page.locator('[data-testid="stSidebarNav"] a')  # the same on every page: each once, in turn
        assert nav.count() == len(NAV)
        for i in range(len(NAV)):
            name = nav.nth(i).inner_text().strip().split("\n")[-1]
            nav.nth(i).click()
            expect(page.get_by_role("heading", name=name, level=1)).to_be_visible()
            no_exception(f"link {name}")
            clicked.append(f"link {name}")
        assert any("Open kl/exact_to_optimal in Compare" in c for c in clicked) and any("Reload" in c for c in clicked)
        assert any("Download the report" in c for c in clicked) and "link Convergence map" in clicked
        assert "Compare: Download the data shown (CSV)" in clicked and "Frontier: Download (CSV)" in clicked

        # Claims -> Compare of a study picked in the sidebar (the URL binds ?study=): the metric, the same study
        open_page("", f"study={STUDY}")
        page.get_by_role("combobox", name="Study", exact=True).click()
        page.get_by_role("option", name=OTHER, exact=True).click()
        no_exception("picking a study")
        page.get_by_role("link", name="Claims").click()
        expect(page.get_by_role("heading", name="Claims", level=1)).to_be_visible()
        page.get_by_role("button", name="Open kl/exact_to_optimal in Compare").click()
        expect(page.get_by_role("heading", name="Compare", level=1)).to_be_visible()
        no_exception("Open in Compare")
        expect(page.get_by_role("combobox", name="Metric", exact=True)).to_have_value("kl/exact_to_optimal")
        expect(page.get_by_role("combobox", name="Study", exact=True)).to_have_value(OTHER)
        assert f"study={OTHER}" in page.url

        # switching study on Compare after narrowing the filters: the new study's runs, not "No run passes the filters"
        open_page("compare", f"study={STUDY}")
        page.get_by_role("button", name="Remove dpo").first.click()  # the algorithm filter: ppo only
        no_exception("narrowing the filters")
        page.get_by_role("combobox", name="Study", exact=True).click()
        page.get_by_role("option", name=OTHER, exact=True).click()
        no_exception("switching study")
        expect(page.get_by_text("at the last logged step")).to_be_visible()
        assert page.get_by_text("No run passes the filters").count() == 0

        # ?run=RUN_ID opens that run, and picking another run writes its id to the URL
        open_page("", f"study={STUDY}&run={run_id}")
        expect(page.get_by_role("combobox", name="Run", exact=True)).to_have_value(re.compile(f"\\({run_id}\\)$"))
        expect(page.get_by_text("status done")).to_be_visible()
        page.get_by_role("combobox", name="Run", exact=True).click()
        page.get_by_role("option").filter(has_text="seed 1").first.click()
        no_exception("picking a run")
        chosen = re.search(r"\((\w+)\)$", page.get_by_role("combobox", name="Run", exact=True).input_value()).group(1)
        expect(page).to_have_url(re.compile(f"run={chosen}"))
        browser.close()
    print(f"clicked {len(clicked)}: {clicked}")
