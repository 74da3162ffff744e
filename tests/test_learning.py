"""Slow tests: every algorithm learns, and the KL-regularised methods reach pi* on the bandit."""

import json
import subprocess
import sys

import pytest

from workbench.config import resolve
from workbench.registry import ALGORITHMS, BUILT_IN
from workbench.training import train

POLICY_ALGOS = [spec.name for spec in BUILT_IN if spec.trains == "policy"]  # not the test plugins
SMALL = {"model.n_layer": 1, "model.n_embd": 32, "batch_size": 32, "lr": 3e-3, "save_checkpoint": False}
# SimPO and ORPO learn slowly here at their paper defaults (beta_s 2; lambda 0.1 on Bradley-Terry-noisy labels):
# the settings of tests/test_objectives.py, whose reasons docs/objectives.md gives
LEARNING_SETS = {"simpo": {"algo.beta": 1.0}, "orpo": {"algo.bt_temperature": 0.0, "algo.lam": 1.0}}


def rows(path):
    return [json.loads(line) for line in open(path / "metrics.jsonl")]


def run(tmp_path, algo, steps=30, task=None, **overrides):
    task = task or {"name": "sequence", "length": 4}
    sets = {**SMALL, "steps": steps, "eval_every": steps, **overrides}
    if ALGORITHMS[algo].kind == "online":
        sets.setdefault("group_size", 2 if algo == "online_dpo" else 4)
    res = resolve({"task": task, "algo": {"name": algo}}, sets)
    out = tmp_path / algo
    result = train(res, out, progress=False)
    assert result["status"] == "done"
    return rows(out), out


def test_every_policy_algorithm_is_tested():
    assert set(POLICY_ALGOS) - {"bon"} == {  # bon: a policy measured, not trained (tests/test_best_of_n.py)
        *("sft", "reinforce", "rloo", "ppo", "grpo", "dpo", "ipo", "online_dpo", "rft", "kto", "simpo", "orpo")
    }


TRAINED = [spec.name for spec in BUILT_IN if spec.trains == "policy" and spec.best_of is None]  # bon trains nothing


@pytest.mark.slow
@pytest.mark.parametrize("algo", TRAINED)
def test_algorithm_raises_gold_reward(algo, tmp_path):
    """Same starting policy (seed 0), 30 updates: the exact expected gold reward rises by > 0.15 (from ~0.26)."""
    m, _ = run(tmp_path, algo, **LEARNING_SETS.get(algo, {}))
    start, end = m[0]["reward/exact"], m[-1]["reward/exact"]
    assert start == pytest.approx(0.2574, abs=2e-3)  # every algorithm starts from the same policy
    assert end > start + 0.15, (algo, start, end)


def test_training_is_deterministic_on_cpu(tmp_path):
    a, _ = run(tmp_path / "a", "grpo", steps=6)
    b, _ = run(tmp_path / "b", "grpo", steps=6)
    strip = lambda rs: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rs]  # noqa: E731
    assert strip(a) == strip(b)


@pytest.mark.slow
def test_three_phase_pipeline_sft_rm_rl(tmp_path):
    """SFT -> Bradley-Terry reward model -> RL against it: the learned reward raises the *gold* reward."""
    task = {"name": "sequence", "length": 3, "vocab_size": 3}
    sft_m, sft_dir = run(tmp_path, "sft", steps=5, task=task, save_checkpoint=True)
    rm_sets = {"algo.pairs": "random", "algo.labels": "sampled", "algo.bt_temperature": 0.1}
    rm_sets.update(
        {"model.n_layer": 2, "model.n_embd": 64}
    )  # the one-layer policy model is too small to be a reward model
    rm_m, rm_dir = run(tmp_path, "rm", steps=150, task=task, save_checkpoint=True, **rm_sets)
    assert rm_m[0]["rm/gold_correlation"] < 0.5 < 0.9 < rm_m[-1]["rm/gold_correlation"]
    rl_m, _ = run(
        tmp_path,
        "reinforce",
        steps=40,
        task=task,
        reward_model=str(rm_dir / "checkpoint"),
        **{"model.path": str(sft_dir / "checkpoint")},
    )
    assert rl_m[0]["reward/exact"] == pytest.approx(sft_m[-1]["reward/exact"], abs=1e-5)  # starts from the SFT model
    assert rl_m[-1]["reward/exact"] > rl_m[0]["reward/exact"] + 0.1


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["ppo", "reinforce", "dpo"])
def test_bandit_reaches_optimal_policy_from_cli_defaults(algo, tmp_path):
    """`workbench train --task bandit --algo ppo|reinforce|dpo --seed 0 --out DIR` at its defaults ends
    within KL(pi || pi*) < 0.02 of pi* = pi_ref exp(r/beta)/Z for the run's beta."""
    out = tmp_path / algo
    cmd = [
        sys.executable,
        "-m",
        "workbench.cli",
        "train",
        "--task",
        "bandit",
        "--algo",
        algo,
        "--seed",
        "0",
        "--out",
        str(out),
        "--quiet",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    m = rows(out)
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert cfg["beta"] > 0 and cfg["task"]["name"] == "bandit"
    assert m[0]["kl/exact_to_optimal"] > 0.5  # it starts far from pi*
    assert m[-1]["kl/exact_to_optimal"] < 0.02
    assert json.loads(proc.stdout)["kl/exact_to_optimal"] == m[-1]["kl/exact_to_optimal"]
