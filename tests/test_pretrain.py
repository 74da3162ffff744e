"""The base policy (``pretrain_steps``, issue 15): pretraining text without solutions, the same base for every
method of a seed, and a measurement that never changes training."""

import json
import math

import pytest
import torch

from workbench.config import ConfigError, _without_new_defaults, config_hash, resolve
from workbench.models.policy import build_policy
from workbench.toy_tasks.scratch_add import ScratchAdd, ScratchAddConfig
from workbench.training import train, train_seeds
from workbench.training.pretrain import pretrain

TINY = {"model.n_layer": 1, "model.n_embd": 16, "model.n_head": 2}
SMALL = {"name": "scratch_add", "n_digits": 1, "max_scratch": 2, "n_eval_prompts": 8}


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_pretraining_text_has_the_format_and_no_solution():
    t = ScratchAdd(ScratchAddConfig(n_digits=2, max_scratch=4))
    prompts, text = t.pretraining_text(20_000, torch.Generator().manual_seed(0))
    again = t.pretraining_text(20_000, torch.Generator().manual_seed(0))
    assert torch.equal(prompts, again[0]) and torch.equal(text, again[1])  # the generator alone decides
    assert torch.equal(text, t.canonical(text)) and (t.answer(text) >= 0).all()  # well-formed, EOS-terminated
    k = t.scratch_length(text)
    assert set(k.tolist()) == {0, 1, 2, 3, 4}  # every scratch length, about equally often
    assert (k.bincount().float() / len(k) - 0.2).abs().max() < 0.02
    worked = (k == 4) & (text[:, :4] == t.worked_scratch(prompts)).all(-1)
    assert not worked.any()  # never a worked solution
    # answers independent of the prompt: right by chance only (1 in 199), and as often for small and large sums
    hit = t.reward(prompts, text)
    assert abs(hit.mean().item() - 1 / 199) < 0.002
    values = t.answer(text).float()
    big = t.totals(prompts) >= 100
    assert abs(values[big].mean() - values[~big].mean()) < 3  # E[v] = 99 whatever the sum (sd of the gap ~0.8)


def test_pretrain_steps_is_checked():
    with pytest.raises(ConfigError, match="pretrain_steps: task 'bandit' has no pretraining text"):
        resolve({"task": {"name": "bandit"}, "algo": {"name": "grpo"}}, {"pretrain_steps": 1})
    with pytest.raises(ConfigError, match="pretrain_steps"):
        resolve({"task": SMALL, "algo": {"name": "sft"}}, {"pretrain_steps": 1, "backend": "trl"})
    res = resolve({"task": SMALL, "algo": {"name": "grpo"}}, {})
    assert res.run.pretrain_steps == 0
    d = res.to_dict()
    d.pop("pretrain_steps")  # a run stored before the field existed
    assert config_hash(_without_new_defaults(d)) == res.config_hash  # the default leaves run ids as they were
    assert resolve({"task": SMALL, "algo": {"name": "grpo"}}, {"pretrain_steps": 1}).config_hash != res.config_hash


def base_weights(algo: str, seed: int, **sets) -> dict:
    res = resolve({"task": SMALL, "algo": {"name": algo}}, {**TINY, "seed": seed, "pretrain_steps": 5, **sets})
    torch.manual_seed(seed)  # as setup_device
    policy = build_policy(res.task, res.run.model, seed, res.spec.value_head(res.algo_cfg), torch.device("cpu"))
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    loss = pretrain(res, policy, torch.device("cpu"))
    assert loss < math.log(12)  # below the uniform policy's NLL over the 12 actions
    after = policy.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in after)
    return after


def test_same_seed_same_base_whatever_the_method():
    grpo = base_weights("grpo", 3)
    for algo, sets in (("ppo", {"lr": 3e-4}), ("sft", {"batch_size": 16}), ("rloo", {"group_size": 4})):
        other = base_weights(algo, 3, **sets)  # another method, learning rate, batch size, a value head
        assert all(torch.equal(grpo[k], other[k]) for k in grpo), algo
    other_seed = base_weights("grpo", 4)
    assert any(not torch.equal(grpo[k], other_seed[k]) for k in grpo)


def test_runs_of_one_seed_start_from_the_same_base(tmp_path):
    """Through ``train``: the step-0 measurements (a function of the weights and the seed) agree bitwise across
    methods, and differ from a run without pretraining."""
    common = {**TINY, "steps": 2, "eval_every": 2, "save_checkpoint": False, "batch_size": 16, "group_size": 4}
    first = {}
    for algo in ("grpo", "ppo", "sft", "none"):
        sets = {**common, "pretrain_steps": 0 if algo == "none" else 6}
        res = resolve({"task": SMALL, "algo": {"name": "grpo" if algo == "none" else algo}}, sets)
        assert train(res, tmp_path / algo, progress=False)["status"] == "done"
        first[algo] = rows(tmp_path / algo)[0]
    keys = ["reasoning/accuracy", "reasoning/scratch_length", "reasoning/accuracy_corrupted", "reward/eval"]
    for algo in ("ppo", "sft"):
        assert [first[algo][k] for k in keys] == [first["grpo"][k] for k in keys], algo
        assert first[algo]["pretrain/loss"] == first["grpo"]["pretrain/loss"]
    assert "pretrain/loss" not in first["none"]
    assert first["none"]["reasoning/accuracy"] != first["grpo"]["reasoning/accuracy"]


def test_stacked_runs_pretrain_as_train_does(tmp_path):
    sets = {**TINY, "steps": 2, "eval_every": 1, "save_checkpoint": False, "batch_size": 16, "group_size": 4}
    sets |= {"pretrain_steps": 4, "model.impl": "native"}
    reses = [resolve({"task": SMALL, "algo": {"name": "grpo"}}, {**sets, "seed": s}) for s in (0, 1)]
    train_seeds(reses, [tmp_path / "s0", tmp_path / "s1"])
    for s, res in enumerate(reses):
        train(res, tmp_path / f"alone{s}", progress=False)
        stacked, alone = rows(tmp_path / f"s{s}"), rows(tmp_path / f"alone{s}")
        for a, b in zip(stacked, alone, strict=True):
            for k in ("pretrain/loss", "reasoning/accuracy", "reasoning/scratch_use", "reward/mean"):
                if k in b:
                    assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (s, a["step"], k)


def test_the_scratch_ablation_never_changes_training(tmp_path):
    """Measuring every step or every third step: the same training rows (the measure draws from its own streams)."""
    sets = {**TINY, "steps": 3, "save_checkpoint": False, "batch_size": 16, "group_size": 4, "pretrain_steps": 2}
    for every in (1, 3):
        res = resolve({"task": SMALL, "algo": {"name": "grpo"}}, {**sets, "eval_every": every})
        train(res, tmp_path / f"e{every}", progress=False)
    train_keys = ("reward/mean", "loss/policy", "length/mean")
    often, rarely = rows(tmp_path / "e1"), rows(tmp_path / "e3")
    assert sum("reasoning/scratch_use" in r for r in often) == 4 and sum("reasoning/accuracy" in r for r in rarely) == 2
    for a, b in zip(often, rarely, strict=True):
        assert {k: a.get(k) for k in train_keys} == {k: b.get(k) for k in train_keys}


def test_probe_rebuilds_the_base_policy_as_the_reference(tmp_path):
    """``workbench probe`` replays the run's pretraining: the reference of a run that never trained is its policy."""
    from workbench.analysis.probe import load
    from workbench.training.pretrain import start_phases

    sets = {**TINY, "steps": 0, "pretrain_steps": 3, "batch_size": 16, "group_size": 4, "probe_every": 0}
    res = resolve({"task": SMALL, "algo": {"name": "grpo"}}, sets)
    assert train(res, tmp_path / "run", progress=False)["status"] == "done"
    with pytest.raises(ConfigError, match="start phases"):
        load(str(tmp_path / "run"))
    _, policy, ref, _ = load(str(tmp_path / "run"), sft_phase=start_phases)
    prompts, comps = res.task.pretraining_text(32, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(policy(prompts, comps).logp, ref(prompts, comps).logp, atol=1e-6)
        fresh = build_policy(res.task, res.run.model, res.run.seed, False, torch.device("cpu"))
        assert not torch.allclose(fresh(prompts, comps).logp, ref(prompts, comps).logp, atol=1e-3)
