"""Studies in-process: resumption, divergence, failures, identical conditions, loader, summary.

Runs execute through ``InlineExecutor`` on tiny models; the process-level behaviour
(SIGKILL, two concurrent ``workbench run``) is in ``test_study_processes.py``.
"""

import json
import sqlite3
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch

from workbench.results import LoadWarning, load_final, load_metrics, load_runs, query
from workbench.studies import expand, format_summary, load_study, run_study, summarize
from workbench.studies.executors import InlineExecutor

HEAD = """
name = "{name}"
claims = ["C6"]
seeds = {seeds}

[[tasks]]
name = "bandit"
n_arms = 8

[budget]
steps = {steps}
batch_size = 16

[settings]
eval_every = 4
model = {{ n_layer = 1, n_embd = 16, n_head = 2 }}
"""


def write_study(tmp_path: Path, algos: str, name="tiny", seeds=(0,), steps=6) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(HEAD.format(name=name, seeds=list(seeds), steps=steps) + algos)
    return path


TWO_ALGOS = """
[[algorithms]]
name = "sft"

[[algorithms]]
name = "grpo"
"""


def run(path, results, **kw):
    return run_study(load_study(path), results, InlineExecutor(), progress=False, quiet=True, **kw)


def events(results) -> pd.DataFrame:
    with sqlite3.connect(Path(results) / "index.sqlite") as db:
        return pd.read_sql_query("SELECT * FROM events", db)


def no_time(df: pd.DataFrame) -> pd.DataFrame:
    """Metrics without the wall-clock namespace, in a fixed order."""
    df = df[[c for c in df.columns if not c.startswith("time/")]]
    return df.sort_values(["run_id", "step"]).reset_index(drop=True)


def test_second_run_of_a_study_does_no_work(tmp_path):
    path, results = write_study(tmp_path, TWO_ALGOS, seeds=(0, 1)), tmp_path / "results"
    first = run(path, results)
    assert len(first.executed) == 4 and first.count("done") == 4 and first.ok
    n_events = len(events(results))
    second = run(path, results)
    assert second.executed == [] and sorted(second.already) == sorted(first.executed)
    assert second.count("done") == 4
    assert len(events(results)) == n_events  # nothing claimed, nothing written
    runs = load_runs(results, "tiny")
    assert (runs["attempts"] == 1).all() and (runs["status"] == "done").all()


def test_each_run_folder_has_the_documented_files(tmp_path):
    path, results = write_study(tmp_path, TWO_ALGOS), tmp_path / "results"
    run(path, results)
    for _, r in load_runs(results, "tiny").iterrows():
        d = Path(r["path"])
        assert {p.name for p in d.iterdir()} >= {
            "config.json",
            "metrics.jsonl",
            "metrics.parquet",
            "samples.jsonl",
            "status.json",
            "checkpoint",
        }
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["config_hash"] == r["run_id"] == d.name  # run id = hash of the canonical config
        assert not [p for p in d.iterdir() if p.name.endswith(".tmp")]
    assert (results / "studies" / "tiny.toml").read_text() == path.read_text()


def test_identical_conditions_across_algorithms(tmp_path):
    """Same seed -> same initial weights, reference, prompt stream seed and budget; consumption recorded."""
    from workbench.models.policy import build_policy

    algos = TWO_ALGOS + '\n[[algorithms]]\nname = "ppo"\n\n[[algorithms]]\nname = "dpo"\n'
    path, results = write_study(tmp_path, algos, steps=5), tmp_path / "results"
    plan = expand(load_study(path))
    assert [p.res.spec.name for p in plan] == ["sft", "grpo", "ppo", "dpo"]
    assert {p.res.run.steps for p in plan} == {5} and {p.res.run.seed for p in plan} == {0}
    assert all(p.res.run.model == plan[0].res.run.model for p in plan)
    for p in plan:  # the budget: 16 completions (online) or 16 demos / pairs (offline) per step
        assert (p.res.run.batch_size if p.res.spec.kind == "online" else p.res.algo_cfg.batch_size) == 16
    weights = []
    for p in plan:
        pol = build_policy(p.res.task, p.res.run.model, p.res.run.seed, False, torch.device("cpu"))
        weights.append(torch.cat([x.flatten() for x in pol.model.parameters()]))
    assert all(torch.equal(w, weights[0]) for w in weights)
    run(path, results)
    final = load_final(results, "tiny").set_index("algo")
    assert (final["samples"] == 5 * 16).all() and (final["final_samples"] == 5 * 16).all()
    assert (final["step"] == 5).all()
    assert final.loc["sft", "unit"] == "demos" and final.loc["dpo", "unit"] == "pairs"
    assert final.loc["grpo", "unit"] == "completions" and final.loc["ppo", "unit"] == "completions"


def test_same_config_and_seed_give_bitwise_identical_metrics(tmp_path):
    path = write_study(tmp_path, TWO_ALGOS + '\n[[algorithms]]\nname = "ppo"\n', steps=5)
    run(path, tmp_path / "a")
    run(path, tmp_path / "b")
    a, b = no_time(load_metrics(tmp_path / "a", "tiny")), no_time(load_metrics(tmp_path / "b", "tiny"))
    assert len(a) == 3 * 6 and "reward/exact" in a
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert any(c.startswith("time/") for c in load_metrics(tmp_path / "a", "tiny").columns)


def test_divergent_run_is_marked_and_the_study_completes(tmp_path):
    """lr = 1e12 makes the loss non-finite: at step 1 for SFT, inside PPO's first rollout (step 0)."""
    algos = """
[[algorithms]]
name = "sft"
label = "sft-huge-lr"
settings = { lr = 1e12 }

[[algorithms]]
name = "ppo"
label = "ppo-huge-lr"
settings = { lr = 1e12 }

[[algorithms]]
name = "grpo"
"""
    path, results = write_study(tmp_path, algos, seeds=(0, 1)), tmp_path / "results"
    out = run(path, results)
    assert out.ok and out.count("diverged") == 4 and out.count("done") == 2
    runs = load_runs(results, "tiny").set_index("algo_label")
    for label, step in (("sft-huge-lr", 1), ("ppo-huge-lr", 0)):
        bad = runs.loc[label]
        assert (bad["status"] == "diverged").all() and (bad["step"] == step).all()
        assert bad["reason"].str.contains("non-finite").all()
        assert not (Path(bad["path"].iloc[0]) / "checkpoint").exists()
        assert all(json.loads((Path(d) / "status.json").read_text())["step"] == step for d in bad["path"])
    assert (runs.loc["grpo", "status"] == "done").all()
    table = format_summary(summarize(results, "tiny"))
    assert "0/2 2 diverged" in table and "2/2" in table
    assert len(load_metrics(results, "tiny")) == 2 * 1 + 2 * 0 + 2 * 7  # diverged runs publish the rows they logged
    assert run(path, results).executed == []  # diverged is final: not retried


def test_failed_run_is_marked_retried_once_per_call_and_the_study_completes(tmp_path):
    broken = tmp_path / "broken-rm"  # passes validation (a folder with a config.json), fails to load at run time
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    algos = f"""
[[algorithms]]
name = "grpo"
label = "grpo-missing-rm"
settings = {{ reward_model = "{broken}" }}

[[algorithms]]
name = "sft"
"""
    path, results = write_study(tmp_path, algos), tmp_path / "results"
    out = run(path, results)
    assert not out.ok and out.count("failed") == 1 and out.count("done") == 1
    runs = load_runs(results, "tiny").set_index("algo_label")
    assert runs.loc["grpo-missing-rm", "status"] == "failed" and runs.loc["grpo-missing-rm", "reason"]
    assert (Path(runs.loc["grpo-missing-rm", "path"]) / "error.txt").exists()
    again = run(path, results)  # failed runs are retried on the next call, finished ones are not
    assert len(again.executed) == 1 and again.count("failed") == 1
    assert load_runs(results, "tiny").set_index("algo_label").loc["grpo-missing-rm", "attempts"] == 2


def test_loader_reports_and_skips_corrupt_files(tmp_path):
    path, results = write_study(tmp_path, TWO_ALGOS, seeds=(0, 1)), tmp_path / "results"
    run(path, results)
    runs = load_runs(results, "tiny")
    ids = list(runs["run_id"])
    corrupt, truncated, missing, healthy = ids
    # 1: a corrupt parquet file
    (Path(runs["path"][0]) / "metrics.parquet").write_bytes(b"PAR1 this is not parquet")
    # 2: a run killed mid-write: no parquet, the jsonl cut inside a line, left 'running' by a dead owner
    d = Path(runs["path"][1])
    (d / "metrics.parquet").unlink()
    text = (d / "metrics.jsonl").read_bytes()
    (d / "metrics.jsonl").write_bytes(text[: len(text) - 40])
    with sqlite3.connect(results / "index.sqlite") as db:
        db.execute("UPDATE runs SET status='running', host='elsewhere', heartbeat_at=0 WHERE run_id=?", (truncated,))
    # 3: finished in the index, its parquet gone
    (Path(runs["path"][2]) / "metrics.parquet").unlink()

    with pytest.warns(LoadWarning) as caught:
        df = load_metrics(results, "tiny", unpublished=True)
    assert set(df["run_id"]) == {healthy}
    assert len(df) == 7 and not df.drop(columns=[c for c in df if c.startswith("time/")]).isna().all().any()
    problems = {i["run_id"]: i["problem"] for i in df.attrs["issues"]}
    assert set(problems) == {corrupt, truncated, missing}
    assert "corrupt parquet" in problems[corrupt]
    assert "truncated" in problems[truncated]
    assert "not published" in problems[missing]
    assert len(caught) == 3 and all(i["path"] in str(w.message) for i, w in zip(df.attrs["issues"], caught))
    with warnings.catch_warnings():  # the summary still shows the runs that load
        warnings.simplefilter("ignore", LoadWarning)
        s = summarize(results, "tiny").set_index("algo_label")
    assert (
        s.loc["grpo", "done"] == 1 and s.loc["grpo", "unreadable"] == 1
    )  # the averaged runs are the ones counted done
    assert "1/2 1 unreadable" in format_summary(summarize(results, "tiny"))


def test_loader_reads_a_live_runs_complete_lines(tmp_path):
    """A running run's half-written last line is a write in progress, not corruption."""
    from workbench.results import Owner, Store

    path, results = write_study(tmp_path, TWO_ALGOS), tmp_path / "results"
    run(path, results)
    rid, d = load_runs(results, "tiny").iloc[0][["run_id", "path"]]
    (Path(d) / "metrics.parquet").unlink()
    (Path(d) / "status.json").unlink()
    with open(Path(d) / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "samp')
    with sqlite3.connect(results / "index.sqlite") as db:
        db.execute("UPDATE runs SET status='queued' WHERE run_id=?", (rid,))
    with Store(results) as store:
        assert store.claim(rid, Owner.current()) == "claimed"  # held by this (live) process
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoadWarning)
        df = load_metrics(results, "tiny", unpublished=True)
    assert df[df["run_id"] == rid]["step"].tolist() == list(range(7))
    assert len(load_metrics(results, "tiny")) == 7  # published runs only by default


def test_query_runs_sql_over_runs_and_metrics(tmp_path):
    path, results = write_study(tmp_path, TWO_ALGOS, seeds=(0, 1)), tmp_path / "results"
    run(path, results)
    df = query(
        "SELECT r.algo, count(DISTINCT m.run_id) AS n, max(m.step) AS last FROM metrics m JOIN runs r USING (run_id) "
        "GROUP BY r.algo ORDER BY r.algo",
        results,
        "tiny",
    )
    assert df.to_dict("list") == {"algo": ["grpo", "sft"], "n": [2, 2], "last": [6, 6]}


def test_grids_expand_and_summarise_per_point(tmp_path):
    algos = """
[grid]
beta = [0.05, 0.2]

[[algorithms]]
name = "grpo"
grid = { "algo.clip_eps_low" = [0.1, 0.3] }

[[algorithms]]
name = "dpo"
"""
    path, results = write_study(tmp_path, algos, steps=2), tmp_path / "results"
    plan = expand(load_study(path))
    assert len(plan) == 2 * 2 + 2
    assert {(p.res.run.beta, getattr(p.res.algo_cfg, "clip_eps_low", None)) for p in plan} == {
        (0.05, 0.1),
        (0.05, 0.3),
        (0.2, 0.1),
        (0.2, 0.3),
        (0.05, None),
        (0.2, None),
    }
    run(path, results)
    s = summarize(results, "tiny")
    assert len(s) == 6 and set(s["done"]) == {1}
    assert "beta=0.05,algo.clip_eps_low=0.1" in format_summary(s)


def test_checkpoints_are_safetensors_and_load_without_pickle(tmp_path):
    from safetensors.torch import load_file

    path, results = write_study(tmp_path, '[[algorithms]]\nname = "ppo"\n', steps=2), tmp_path / "results"
    run(path, results)
    ckpt = Path(load_runs(results, "tiny")["path"][0]) / "checkpoint"
    names = {p.name for p in ckpt.iterdir()}
    assert "model.safetensors" in names and "value_head.safetensors" in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    state = load_file(ckpt / "model.safetensors")
    assert state and all(isinstance(t, torch.Tensor) for t in state.values())
    torch.save(state, tmp_path / "as_torch.pt")  # the same tensors load with the safe unpickler
    again = torch.load(tmp_path / "as_torch.pt", weights_only=True)
    assert all(torch.equal(again[k], state[k]) for k in state)


def test_no_code_unpickles_arbitrary_objects():
    src = Path(__file__).resolve().parents[1] / "workbench"
    for f in src.rglob("*.py"):
        text = f.read_text()
        assert "pickle.load" not in text and "dill" not in text and "allow_pickle=True" not in text, f
        for chunk in text.split("torch.load(")[1:]:
            assert "weights_only=True" in chunk.split(")")[0], f"{f}: torch.load without weights_only=True"


def test_quickstart_study_is_valid_and_runs_scaled_down(tmp_path):
    study = load_study(Path(__file__).resolve().parents[1] / "studies" / "quickstart.toml")
    plan = expand(study)
    assert [p.algo_label for p in plan[::8]] == ["sft", "ppo", "grpo", "dpo", "ppo_k3loss"] and len(plan) == 40
    assert [p.seed for p in plan[:8]] == [0, 1, 2, 100, 101, 102, 103, 104]  # exploration, then confirmation seeds
    assert study.config.claims and all(p.res.task.enumerable for p in plan)
    study.config.budget.steps = 3  # the same file, three steps, a tiny model
    study.config.settings.model = study.config.settings.model.model_copy(
        update={"n_layer": 1, "n_embd": 16, "n_head": 2}
    )
    study.config.settings.eval_every = 3
    study.config.seeds, study.config.confirm_seeds = [0], [1]
    out = run_study(study, tmp_path / "results", InlineExecutor(), progress=False, quiet=True, seeds="confirm")
    assert out.count("done") == 5 and {p.seed for p in expand(study)} == {0, 1}
    assert {s for s in load_runs(tmp_path / "results", "quickstart").query("status == 'done'")["seed"]} == {1}
    table = format_summary(summarize(tmp_path / "results", "quickstart"))
    for word in ("sft", "ppo", "grpo", "dpo", "reward/exact", "kl/exact", "kl/exact_to_optimal"):
        assert word in table
