"""Every claim study in studies/ runs, scaled down, and its report decides every claim it lists.

A tiny run decides little, so any decided verdict is accepted; what is checked is the
plumbing: every rule finds its groups and its metric (a typo in a metric name, a label or a
grid value would make the rule 'not measured'), has enough confirmation seeds to decide,
every listed claim gets a verdict, and together the studies cover the claims the workbench
can test.
"""

import json
import math
import re
import tomllib
from pathlib import Path

import pytest

from workbench.reporting.report import build_report
from workbench.studies import load_study, run_study
from workbench.studies.executors import InlineExecutor

STUDIES = sorted(Path(__file__).resolve().parents[1].joinpath("studies").glob("*.toml"))
CLAIMS_TESTED = {f"C{i}" for i in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14)}
DECIDED = {"supported", "contradicted", "inconclusive", "unstable"}
TINY_MODEL = {"n_layer": 1, "n_embd": 16, "n_head": 2}
SMALL_TASKS = {"tool_use": {"n_keys": 1, "n_values": 2}}  # the episode space every exact measure enumerates


def shrink(raw: dict, steps: int = 4) -> dict:
    """The same study at test size: 1 exploration and 3 confirmation seeds (min_seeds = 3), a few steps, a tiny
    model, a small episode space where the task has one (``SMALL_TASKS``), the grid values its rules name."""
    raw = json.loads(json.dumps(raw))
    raw["seeds"] = raw["seeds"][:1]
    raw["confirm_seeds"] = raw["confirm_seeds"][:3]
    raw["statistics"] = {**raw.get("statistics", {}), "min_seeds": 3}
    raw["budget"] = {"steps": steps, "batch_size": 16}
    for task in raw["tasks"]:
        task.update(SMALL_TASKS.get(task["name"], {}))
    s = raw.setdefault("settings", {})
    s["model"] = {**s.get("model", {}), **TINY_MODEL}
    # measured at steps 0 and `steps`, and at steps // 2 too where a rule reads a mid-run step
    every = 2 if any(v.get("step") for v in raw.get("verdicts", [])) else steps
    s["eval_every"] = every
    if s.get("probe_every", 100):  # keep probes on where the study has them
        s["probe_every"], s["probe_minibatches"] = every, 2
    for key, small in (("rm_steps", 5), ("rm_pairs", 32), ("sft_warmup_steps", 2), ("pretrain_steps", 2)):
        for settings in [s] + [a.get("settings", {}) for a in raw["algorithms"]]:
            if key in settings:
                settings[key] = min(settings[key], small)
    named: dict[str, set] = {}  # grid values the rules select
    for v in raw.get("verdicts", []):
        if v.get("step"):  # a mid-run step: one that the small run measures (eval_every = probe_every = 2)
            v["step"] = steps // 2 // 2 * 2
        for w in ("where", "a_where", "b_where"):
            for k, val in v.get(w, {}).items():
                named.setdefault(k, set()).add(json.dumps(val))
    for grid in [raw.get("grid", {})] + [a.get("grid", {}) for a in raw["algorithms"]]:
        for k, vals in grid.items():
            keep = [x for x in vals if json.dumps(x) in named.get(k, set())]
            grid[k] = keep or vals[:1]
    return raw


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v) if not (isinstance(v, float) and math.isinf(v)) else ("inf" if v > 0 else "-inf")
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(type(v))


def to_toml(raw: dict) -> str:
    """A study dict as TOML: scalars first, then [tables] and [[arrays of tables]] with inline values."""
    lines = [
        f"{k} = {_value(v)}"
        for k, v in raw.items()
        if not isinstance(v, (dict, list)) or (isinstance(v, list) and not any(isinstance(x, dict) for x in v))
    ]
    for k, v in raw.items():
        if isinstance(v, dict):
            lines += [f"\n[{k}]"] + [f"{json.dumps(kk)} = {_value(x)}" for kk, x in v.items()]
        elif isinstance(v, list) and any(isinstance(x, dict) for x in v):
            for entry in v:
                lines += [f"\n[[{k}]]"] + [f"{json.dumps(kk)} = {_value(x)}" for kk, x in entry.items()]
    return "\n".join(lines) + "\n"


def test_to_toml_round_trips():
    raw = {
        "name": "x",
        "claims": ["C1"],
        "seeds": [0, 1],
        "budget": {"steps": 2},
        "settings": {"model": {"n_layer": 1}, "lr": 1e-3},
        "grid": {"algo.clip_eps": [0.2, 1e9]},
        "algorithms": [{"name": "ppo", "grid": {"beta": [0.0, 0.1]}, "use_value_head": False}],
        "verdicts": [{"claim": "C1", "a_where": {"task": "t"}, "threshold": float("inf")}],
    }
    assert tomllib.loads(to_toml(raw)) == raw


def test_the_studies_cover_the_claims():
    claims = set()
    for path in STUDIES:
        study = load_study(path)  # valid, every key checked
        claims |= set(study.config.claims)
        decided = {v.claim for v in study.config.verdicts}
        assert decided == set(study.config.claims), (
            f"{path.name}: claims without a rule: {set(study.config.claims) - decided}"
        )
        assert len(study.config.confirm_seeds) >= study.config.statistics.min_seeds >= 5, path.name
        head = path.read_text().split("\n\n")[0]  # the comment on top: measured time on CPU, a size for a GPU
        assert re.search(r"\d+ min", head) and "GPU" in head, (
            f"{path.name}: state the measured time and a GPU size up top"
        )
    assert claims >= CLAIMS_TESTED, f"no study tests {sorted(CLAIMS_TESTED - claims)}"


@pytest.mark.slow
@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_study_runs_small_and_its_report_decides_every_claim(path, tmp_path):
    raw = shrink(tomllib.loads(path.read_text()))
    small = tmp_path / path.name
    small.write_text(to_toml(raw))
    study = load_study(small)
    outcome = run_study(study, tmp_path / "results", InlineExecutor(), progress=False, quiet=True)
    assert outcome.count("failed") == 0, outcome.statuses
    out = build_report(study.name, tmp_path / "results", tmp_path / "report", pdf=False)  # the PDF: test_report
    doc = json.loads((out / "verdicts.json").read_text())
    assert set(doc["verdicts"]) == set(study.config.claims)
    assert doc["confirmation_seeds"] == raw["confirm_seeds"] and doc["exploration"]["seeds"] == raw["seeds"]
    for rule in doc[
        "rules"
    ]:  # a rule without data: a typo in a metric, a label or a grid value, or a metric not logged
        assert rule["verdict"] in DECIDED, (
            f"{path.name}: rule on {rule['metric']} ({rule['statement'][:60]}...): {rule['verdict']}"
        )
        assert rule["n"] >= 3
