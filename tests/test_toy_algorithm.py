"""An algorithm defined outside the package: this file's code plus one ``register`` call, trained from the CLI.

``toy_pg`` is a sequence-level policy gradient with a constant baseline,

    A_i = r_i - b                       (B,) one advantage per completion
    L   = -(1/B) sum_i A_i sum_t log pi(y_it | s_it)

Nothing in ``workbench/`` names it: the loops see only its ``AlgorithmSpec``. The same file is
the plugin ``workbench train --plugin tests/test_toy_algorithm.py`` imports in a fresh process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from pydantic import Field
from torch import Tensor

from workbench.algorithms.spec import AlgoConfig, AlgorithmSpec, Batch, PolicyOutput, Rollout
from workbench.registry import register


class ToyConfig(AlgoConfig):
    baseline: float = Field(0.0, description="b, the constant subtracted from every reward")


@dataclass(frozen=True, kw_only=True)
class ToyBatch(Batch):
    advantages: Tensor  # (B, T) A_i on every token of row i


def prepare(roll: Rollout, cfg: ToyConfig, beta: float) -> ToyBatch:
    A = roll.scores - cfg.baseline  # A_i = r_i - b
    return ToyBatch(advantages=A[:, None] * roll.mask, mask=roll.mask)


def toy_loss(out: PolicyOutput, batch: ToyBatch, cfg: ToyConfig, beta: float) -> tuple[Tensor, Tensor, dict]:
    per_token = -batch.advantages * out.logp * batch.mask  # -A_i log pi(y_it)
    loss = per_token.sum(-1).mean()
    return loss, per_token, {"loss/policy": loss.item()}


SPEC = register(
    AlgorithmSpec(
        name="toy_pg",
        Config=ToyConfig,
        kind="online",
        summary="sequence-level policy gradient, constant baseline (a test's plugin)",
        prepare=prepare,
        loss=toy_loss,
        regulariser=lambda cfg, beta: "no KL penalty",
    ),
    replace=True,
)

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--task", "bandit", "--algo", "toy_pg", "--steps", "30", "--quiet", "--set", "model.n_layer=1"]
ARGS += ["--set", "model.n_embd=16", "--set", "model.n_head=2", "--set", "lr=0.05", "--set", "probe_every=0"]
ARGS += ["--set", "task.n_arms=4", "--set", "batch_size=16", "--set", "group_size=1", "--set", "save_checkpoint=false"]


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_loss_is_the_equation():
    logp = torch.tensor([[-0.5, -1.0], [-2.0, -0.25]], requires_grad=True)
    roll_scores, mask = torch.tensor([1.0, 0.0]), torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    batch = ToyBatch(advantages=(roll_scores - 0.25)[:, None] * mask, mask=mask)
    loss, _, stats = toy_loss(PolicyOutput(logp, None, None), batch, ToyConfig(baseline=0.25), 0.0)
    # row 0: -0.75 * (-1.5) = 1.125; row 1: +0.25 * (-2.0) = -0.5 (second token masked); mean 0.3125
    assert loss.item() == pytest.approx(0.3125) and stats["loss/policy"] == pytest.approx(0.3125)


def test_a_registered_algorithm_trains_from_the_cli(tmp_path, capsys):
    from workbench.cli import main
    from workbench.registry import BUILT_IN

    assert "toy_pg" not in {s.name for s in BUILT_IN}  # not part of the package
    out = tmp_path / "toy"
    assert main(["train", *ARGS, "--set", "algo.baseline=0.5", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["status"] == "done"
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert cfg["algo"] == {"name": "toy_pg", "baseline": 0.5}
    r = rows(out)
    assert [x["step"] for x in r] == list(range(31))
    assert all("loss/policy" in x and "grad/norm" in x and "reward/mean" in x for x in r[:-1])
    assert r[-1]["reward/exact"] > r[0]["reward/exact"] + 0.1  # it learns: the exact expected reward rose


def test_a_plugin_algorithm_is_validated_like_a_built_in(tmp_path, capsys):
    from workbench.cli import main

    assert main(["train", *ARGS, "--set", "algo.basline=0.5", "--out", str(tmp_path / "typo")]) == 2
    err = capsys.readouterr().err
    assert "algo.basline" in err and "baseline" in err and "Traceback" not in err


def test_the_plugin_file_in_a_fresh_process(tmp_path):
    out = tmp_path / "fresh"
    cmd = [sys.executable, "-m", "workbench.cli", "train", "--plugin", __file__, *ARGS, "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "done" and len(rows(out)) == 31
    bad = subprocess.run(
        [*cmd[:5], str(tmp_path / "missing.py"), *ARGS, "--out", str(tmp_path / "x")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert bad.returncode == 2 and "--plugin" in bad.stderr and "Traceback" not in bad.stderr
