"""``backend = "trl"``: the same run trained by TRL's own trainers, into the same run folder.

Smoke runs of a few updates on a tiny model: files written, workbench metric names (and
the exact metrics of our evaluator) logged, parameters changed, completions kept in the
task's action space; PPO and other algorithms without a TRL counterpart are refused with
a message.
"""

from __future__ import annotations

import json

import pytest
import torch

from workbench.backends.trl import NoTRLCounterpart
from workbench.config import ConfigError, _without_new_defaults, config_hash, resolve
from workbench.models.policy import ModelConfig, build_model, build_policy, build_reward_model
from workbench.training import train

TASK = {"name": "sequence", "vocab_size": 3, "length": 3, "n_prompts": 2}
TINY = {"model.n_layer": 1, "model.n_embd": 16, "model.n_head": 2}
SMALL = {**TINY, "steps": 3, "eval_every": 2, "batch_size": 8, "group_size": 4, "lr": 1e-2, "beta": 0.04}
PREFS = {"algo.labels": "sampled", "algo.batch_size": 8}
OVERRIDES = {"sft": {"algo.batch_size": 8}, "dpo": PREFS, "ipo": PREFS, "rm": PREFS, "grpo": {}, "rloo": {}}
EXPECTED = {  # workbench names each backend run must log
    "grpo": {"reward/mean", "reward/std", "reward/gold_mean", "kl/k3_loss", "loss/policy", "clip/ratio", "grad/norm"},
    "rloo": {"reward/mean", "reward/std", "reward/gold_mean", "kl/k1_reward", "grad/norm"},
    "sft": {"loss/sft", "grad/norm"},
    "dpo": {"loss/dpo", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "grad/norm"},
    "ipo": {"loss/dpo", "rewards/margins", "grad/norm"},
    "rm": {"loss/rm", "rm/accuracy", "rm/margin", "rm/gold_correlation", "grad/norm"},
}
EXACT = {"reward/exact", "kl/exact", "entropy/exact", "objective/exact"}


def run_trl(tmp_path, algo: str, **sets):
    res = resolve({"task": TASK, "algo": {"name": algo}}, {**SMALL, **OVERRIDES[algo], "backend": "trl", **sets})
    out = tmp_path / algo
    result = train(res, out, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return res, out, result, rows


@pytest.mark.parametrize("algo", ["grpo", "rloo", "sft", "dpo", "rm"])
def test_trl_backend_writes_a_workbench_run(algo, tmp_path):
    res, out, result, rows = run_trl(tmp_path, algo)
    assert result["status"] == "done"
    for f in ("config.json", "metrics.jsonl", "samples.jsonl", "status.json", "checkpoint/config.json"):
        assert (out / f).exists(), f
    assert json.loads((out / "status.json").read_text())["status"] == "done"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config_hash"] == res.config_hash and cfg["backend"]["name"] == "trl"
    assert [r["step"] for r in rows] == [0, 1, 2, 3]  # one row per update, then the final measurement
    assert rows[-1]["samples"] == 3 * 8  # completions or pairs or demonstrations, 8 per update
    logged = set().union(*rows)
    assert EXPECTED[algo] <= logged, EXPECTED[algo] - logged
    assert {"step", "samples", "lr", "time/elapsed_s"} <= logged
    if algo != "rm":  # our evaluator on the trainer's model, at steps 0, 2 and 3
        for r in rows:
            assert (set(r) >= EXACT) == (r["step"] in (0, 2, 3))
        assert rows[0]["kl/exact"] == pytest.approx(0.0, abs=1e-6)  # the reference is the initial model
        assert rows[-1]["kl/exact"] > 1e-4  # and the policy moved
    # parameters changed: the saved checkpoint differs from the initial weights of the seed
    if algo == "rm":
        before = build_reward_model(res.task, res.run.model, res.run.seed).model.state_dict()
        after = build_reward_model(res.task, res.run.model, 0, path=str(out / "checkpoint")).model.state_dict()
    else:
        before = build_model(res.task, res.run.model, res.run.seed)[0].state_dict()
        after = build_policy(
            res.task, ModelConfig(path=str(out / "checkpoint")), 0, False, torch.device("cpu")
        ).model.state_dict()
    assert before.keys() == after.keys()
    assert any(not torch.allclose(before[k], after[k]) for k in before)


def test_same_metric_names_as_the_workbench_run(tmp_path):
    """The core GRPO curves of both backends share their names, so reports overlay them."""
    _, _, _, trl_rows = run_trl(tmp_path, "grpo", **{"model.impl": "native"})  # TRL gets the same weights as HF
    res = resolve({"task": TASK, "algo": {"name": "grpo"}}, SMALL)
    train(res, tmp_path / "wb", progress=False)
    wb_rows = [json.loads(line) for line in (tmp_path / "wb" / "metrics.jsonl").read_text().splitlines()]
    core = {"reward/mean", "reward/std", "reward/gold_mean", "kl/k3_loss", "loss/policy", "grad/norm", "lr", "samples"}
    assert core | EXACT <= set().union(*wb_rows) & set().union(*trl_rows)
    # the same initial policy, measured exactly, whichever backend trains it
    for key in EXACT:
        assert trl_rows[0][key] == pytest.approx(wb_rows[0][key], abs=1e-5)
    assert [r["samples"] for r in trl_rows] == [r["samples"] for r in wb_rows]


@pytest.mark.parametrize(
    "algo, sets, fragment",
    [
        ("ppo", {}, "TRL 1.16 has no PPO in its core"),
        ("reinforce", {}, "no plain REINFORCE"),
        ("online_dpo", {"group_size": 2}, "no online DPO"),
        ("dpo", {}, "algo.labels = 'sampled'"),
        ("grpo", {"algo.kl_estimator": "k1"}, "k3"),
    ],
)
def test_what_trl_cannot_run_is_a_config_error(algo, sets, fragment):
    with pytest.raises(ConfigError, match=fragment) as e:
        resolve({"task": TASK, "algo": {"name": algo}}, {"backend": "trl", **sets})
    # no counterpart at all (a study can list it as such) vs a setting TRL cannot express
    assert isinstance(e.value, NoTRLCounterpart) == (algo in ("ppo", "reinforce", "online_dpo"))


def test_default_backend_and_impl_leave_the_config_hash_unchanged():
    res = resolve({"task": TASK, "algo": {"name": "grpo"}}, {})
    d = res.to_dict()
    assert d["backend"] == "workbench" and d["model"]["impl"] == "hf"
    del d["backend"], d["model"]["impl"]
    assert res.config_hash == config_hash(
        _without_new_defaults(d)
    )  # run ids stored before these fields existed still match
    assert resolve({"task": TASK, "algo": {"name": "grpo"}}, {"backend": "trl"}).config_hash != res.config_hash
    assert resolve({"task": TASK, "algo": {"name": "grpo"}}, {"model.impl": "native"}).config_hash != res.config_hash


EOS_TASK = {**TASK, "eos": True}


@pytest.mark.parametrize("algo", ["grpo", "rloo", "sft", "dpo"])
def test_trl_backend_with_eos_pads_as_trl_does(algo, tmp_path):
    """``task.eos = true``: TRL's EOS token is the task's EOS action, so its online trainers stop each completion
    there and mask what follows; SFT demonstrations and DPO pairs reach TRL cut after their EOS (the losses on
    such padded batches are pinned against ours in ``tests/test_trl_parity.py``)."""
    res = resolve({"task": EOS_TASK, "algo": {"name": algo}}, {**SMALL, **OVERRIDES[algo], "backend": "trl"})
    result = train(res, tmp_path / algo, progress=False)
    assert result["status"] == "done"
    rows = [json.loads(line) for line in (tmp_path / algo / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and rows[-1]["kl/exact"] > 1e-4
    if algo in ("grpo", "rloo"):  # completions of different lengths, none longer than completion_len
        logged = [r for r in rows if "trl/completions/min_length" in r]
        assert logged and max(r["trl/completions/max_length"] for r in logged) <= res.task.completion_len
        assert min(r["trl/completions/min_length"] for r in logged) < max(
            r["trl/completions/max_length"] for r in logged
        )


def test_trl_codec_pads_completions_with_the_eos_action():
    from workbench.backends.trl import Codec

    res = resolve({"task": EOS_TASK, "algo": {"name": "grpo"}}, {**TINY, "backend": "trl"})
    task = res.task
    tok = build_model(task, res.run.model, 0)[1]
    codec = Codec(task, tok)
    eos, ids = task.eos_action, codec.action_ids
    comps = torch.tensor([[0, eos, eos, eos], [1, 2, 0, 1], [eos, eos, eos, eos]])
    assert codec.completions([ids[c].tolist() for c in ([0, eos], [1, 2, 0, 1], [eos])]).tolist() == comps.tolist()
    assert [codec.counted(c) for c in comps] == [[0, eos], [1, 2, 0, 1], [eos]]
    assert codec.completion_text(comps[0]) == " s0 <end>"


def test_trl_reward_model_with_eos_is_a_config_error():
    with pytest.raises(ConfigError, match="task.eos = false"):
        resolve({"task": EOS_TASK, "algo": {"name": "rm"}}, {"backend": "trl", **PREFS})
