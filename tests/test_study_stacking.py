"""Stacked runs in the study runner: runs that differ only in per-run scalars train as one computation.

The same study run twice, stacked (the default) and with ``stack=1`` (``--no-stack``): every run's
final metrics agree up to float rounding (rel 1e-4, abs 1e-5, as ``tests/test_seeds.py`` for
``train_seeds``; a stacked forward pass sums in another order), the run ids and statuses are
the same. Seeds and grid points that change only scalars (``lr`` here) share a stack; online
(GRPO, PPO with its critic and minibatches) and offline (SFT) algorithms stack; a run that
cannot (one that fits its reward model first) trains alone either way. A run that diverges inside a stack is marked
diverged at the same step as alone, and the others finish.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from workbench.results import load_final
from workbench.studies import load_study, run_study
from workbench.studies.executors import InlineExecutor

STUDY = """
name = "stacking"
claims = ["C6"]
seeds = [0, 1, 2]

[[tasks]]
name = "sequence"
vocab_size = 3
length = 3
n_prompts = 2

[budget]
steps = 4
batch_size = 8

[settings]
eval_every = 2
probe_every = 2
probe_minibatches = 2
lr = 0.01
beta = 0.04
model = { n_layer = 1, n_embd = 16, n_head = 2, impl = "native" }

[[algorithms]]
name = "grpo"
settings = { group_size = 4 }
grid = { lr = [0.01, 0.003] }

[[algorithms]]
name = "ppo"
settings = { group_size = 1 }
epochs = 2
minibatches = 2

[[algorithms]]
name = "sft"

[[algorithms]]
name = "rloo"
label = "rloo_rlhf"
settings = { group_size = 4, reward_model = "fit", rm_steps = 5, rm_pairs = 64 }
"""
SKIP = ("time/",)


def run(tmp_path: Path, name: str, stack: int, study: str = STUDY, n_runs: int = 15) -> Path:
    path = tmp_path / "stacking.toml"
    path.write_text(study)
    results = tmp_path / name
    out = run_study(load_study(path), results, InlineExecutor(), progress=False, quiet=True, stack=stack)
    assert out.ok and len(out.executed) == n_runs
    return results


def finals(results: Path):
    df = load_final(results, "stacking").set_index("run_id").sort_index()
    metrics = [c for c in df.columns if "/" in c and not c.startswith(SKIP)]  # namespaced metrics
    return df[["algo", "seed", "status", "step", "samples", *metrics]]


def batched(results: Path, run_id: str) -> list | None:
    return json.loads((results / "runs" / run_id / "config.json").read_text()).get("batched_seeds")


def assert_close(a, b, rel=1e-4, abs_=1e-5):
    assert list(a.index) == list(b.index)
    for col in a.columns:
        for rid in a.index:
            x, y = a.at[rid, col], b.at[rid, col]
            if isinstance(x, float) and isinstance(y, float):
                if math.isnan(x) or math.isnan(y):
                    assert math.isnan(x) and math.isnan(y), (rid, col, x, y)
                else:
                    assert x == pytest.approx(y, rel=rel, abs=abs_), (rid, col, x, y)
            else:
                assert x == y, (rid, col, x, y)


def test_a_stacked_study_equals_the_unstacked_one(tmp_path):
    stacked, alone = run(tmp_path, "stacked", 16), run(tmp_path, "alone", 1)
    a, b = finals(stacked), finals(alone)
    assert_close(a, b)
    assert set(a["status"]) == {"done"}
    for rid, algo in a["algo"].items():
        if algo == "grpo":  # two learning rates x three seeds: one stack
            assert sorted(batched(stacked, rid)) == [0, 0, 1, 1, 2, 2] and batched(alone, rid) is None
        elif algo in ("ppo", "sft"):  # one stack of three seeds each
            assert batched(stacked, rid) == [0, 1, 2] and batched(alone, rid) is None
        else:  # a run with in-run RLHF phases does not stack: it trains alone either way
            assert algo == "rloo" and batched(stacked, rid) is None


def test_a_run_that_diverges_in_a_stack_is_marked_and_the_others_go_on(tmp_path, monkeypatch):
    """Seed 1's reward is NaN from the first rollout, stacked and alone: it diverges at step 0 both ways."""
    import workbench.runtime.rollout as rollout_mod
    import workbench.training.stacked as stacked_mod

    real = rollout_mod.score

    def alone(res, rm, prompts, comps):  # one run: its own seed decides
        scores, steps, gold = real(res, rm, prompts, comps)
        if res.run.seed == 1 and res.spec.name == "grpo":
            scores, steps = scores * math.nan, steps * math.nan
        return scores, steps, gold

    def stack(res, rm, prompts, comps):  # a stack of seeds 0, 1, 2: rows of seed 1 are the second block
        scores, steps, gold = real(res, rm, prompts, comps)
        if res.spec.name == "grpo":
            B = len(scores) // 3
            scores, steps = scores.clone(), steps.clone()
            scores[B : 2 * B], steps[B : 2 * B] = math.nan, math.nan
        return scores, steps, gold

    monkeypatch.setattr(rollout_mod, "score", alone)
    monkeypatch.setattr(stacked_mod, "score", stack)
    study = STUDY.replace("grid = { lr = [0.01, 0.003] }\n", "")  # the GRPO stack: seeds 0, 1, 2 in order
    stacked, single = run(tmp_path, "stacked", 16, study, 12), run(tmp_path, "alone", 1, study, 12)
    a, b = finals(stacked), finals(single)
    assert_close(a, b)
    grpo = a[a["algo"] == "grpo"]
    assert dict(zip(grpo["seed"], grpo["status"], strict=True)) == {0: "done", 1: "diverged", 2: "done"}
    st = json.loads((stacked / "runs" / grpo.index[grpo["seed"] == 1][0] / "status.json").read_text())
    assert st["status"] == "diverged" and st["step"] == 0 and "non-finite" in st["reason"]
    assert torch.isfinite(torch.tensor(grpo.loc[grpo["seed"] == 0, "reward/exact"].to_numpy())).all()


def test_confirmation_seeds_stack_apart_so_their_numbers_do_not_depend_on_the_exploration_seeds(tmp_path):
    """A stacked run equals its lone twin only up to float rounding, which RL can amplify; a confirmation seed
    therefore never shares a stack with an exploration seed, and ``--seeds confirm`` gives bit for bit the
    numbers that running every seed gives."""
    study = STUDY.replace("seeds = [0, 1, 2]", "seeds = [0, 1]\nconfirm_seeds = [100, 101]")
    study = study[: study.index("[[algorithms]]")] + '[[algorithms]]\nname = "ppo"\nsettings = { group_size = 1 }\n'
    path = tmp_path / "stacking.toml"
    path.write_text(study)
    every, confirm = tmp_path / "every", tmp_path / "confirm"
    assert run_study(load_study(path), every, InlineExecutor(), progress=False, quiet=True, stack=16).ok
    out = run_study(load_study(path), confirm, InlineExecutor(), progress=False, quiet=True, stack=16, seeds="confirm")
    assert out.ok and len(out.executed) == 2
    a, b = finals(every), finals(confirm)
    for rid in a.index:
        assert batched(every, rid) == ([0, 1] if a.at[rid, "seed"] < 100 else [100, 101])
    a, b = a[a["seed"] >= 100], b[b["seed"] >= 100]  # (the exploration seeds stay queued in the second store)
    assert list(a.index) == list(b.index) and set(b["status"]) == {"done"}
    for col in a.columns:  # bit for bit, not up to rounding
        assert a[col].tolist() == b[col].tolist() or (a[col].isna() & b[col].isna()).all(), col
