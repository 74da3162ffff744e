"""`workbench train`: files written, metric names, and clear errors on bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from workbench.cli import main

TINY = ["--set", "model.n_layer=1", "--set", "model.n_embd=16", "--set", "model.n_head=2", "--quiet"]


def test_train_writes_config_and_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--task",
            "sequence",
            "--algo",
            "grpo",
            "--steps",
            "3",
            "--out",
            str(out),
            *TINY,
            "--set",
            "eval_every=2",
            "--set",
            "task.length=3",
        ]
    )
    assert code == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["algo"]["name"] == "grpo" and cfg["config"]["task"]["length"] == 3
    assert cfg["config"]["algo"]["aggregation"] == "sequence_mean"  # resolved defaults are recorded
    assert len(cfg["config_hash"]) == 16 and cfg["model"]["class"] == "GPT2LMHeadModel"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert [r["samples"] for r in rows] == [64, 128, 192, 192]
    for k in ("reward/exact", "kl/exact", "kl/exact_to_optimal", "entropy/exact", "reward/eval"):
        assert k in rows[0] and k in rows[2] and k in rows[3] and k not in rows[1]
    assert "kl/k3_loss" in rows[1] and "kl/k1_monitor" in rows[1] and "reward/mean" in rows[1]
    assert json.loads((out / "status.json").read_text())["status"] == "done"
    assert (out / "checkpoint" / "model.safetensors").exists()
    assert json.loads(capsys.readouterr().out)["status"] == "done"


def test_every_logged_metric_is_documented(tmp_path):
    doc = Path("docs/metrics.md").read_text()
    seen = set()
    for algo in ["ppo", "grpo", "reinforce", "rloo", "dpo", "sft", "online_dpo", "rm"]:
        out = tmp_path / algo
        extra = ["--set", "group_size=2"] if algo in ("online_dpo", "rloo", "grpo") else []
        assert (
            main(["train", "--task", "bandit", "--algo", algo, "--steps", "2", "--out", str(out), *TINY, *extra]) == 0
        )
        for line in (out / "metrics.jsonl").read_text().splitlines():
            seen |= set(json.loads(line))
    missing = sorted(k for k in seen if f"`{k}`" not in doc)
    assert not missing, f"undocumented metrics: {missing}"


@pytest.mark.parametrize(
    "args, fragments",
    [
        (
            ["--task", "bandt", "--algo", "ppo"],
            ["unknown task 'bandt'", "allowed: arithmetic, bandit, digit_sum, scratch_add, sequence, tool_use"],
        ),
        (["--task", "bandit", "--algo", "ppx"], ["unknown algorithm 'ppx'", "grpo", "ppo"]),
        (
            ["--task", "bandit", "--algo", "ppo", "--set", "algo.clip_epz=0.1"],
            ["unknown key 'algo.clip_epz'", "clip_eps"],
        ),
        (["--task", "bandit", "--algo", "ppo", "--set", "task.n_arm=3"], ["unknown key 'task.n_arm'", "n_arms"]),
        (["--task", "bandit", "--algo", "ppo", "--set", "lrr=3"], ["unknown key 'lrr'", "lr"]),
        (
            ["--task", "bandit", "--algo", "ppo", "--set", "model.n_layers=3"],
            ["unknown key 'model.n_layers'", "n_layer"],
        ),
        (["--task", "bandit", "--algo", "ppo", "--set", "lr=fast"], ["lr:", "'fast'"]),
        (["--task", "bandit", "--algo", "grpo", "--set", "group_size=1"], ["group_size >= 2"]),
        (["--task", "sequence", "--algo", "ppo", "--set", "task.decisive_position=9"], ["decisive_position 9"]),
        (["--task", "bandit", "--algo", "ppo", "--set", "novalue"], ["key=value"]),
    ],
)
def test_bad_input_exits_2_with_a_message_and_no_traceback(args, fragments, tmp_path):
    cmd = [sys.executable, "-m", "workbench.cli", "train", *args, "--out", str(tmp_path / "x"), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in proc.stderr, (f, proc.stderr)
    assert not (tmp_path / "x").exists()  # nothing half-written


def test_diverged_run_is_marked_not_fatal(tmp_path):
    out = tmp_path / "div"
    code = main(
        [
            "train",
            "--task",
            "bandit",
            "--algo",
            "reinforce",
            "--steps",
            "5",
            "--out",
            str(out),
            *TINY,
            "--set",
            "beta=1e30",
        ]
    )
    assert code == 3
    status = json.loads((out / "status.json").read_text())
    # step 0 is on-policy at pi = pi_ref (KL exactly 0); the first update makes beta * KL overflow
    assert status["status"] == "diverged" and status["step"] == 1 and "non-finite" in status["reason"]
    assert (out / "metrics.jsonl").exists()
