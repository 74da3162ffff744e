"""The RLHF pipeline inside one run (workbench/training/pipeline.py): SFT, a Bradley-Terry reward model,
RL against it."""

import json
from pathlib import Path

import pytest
import torch

from workbench.config import ConfigError, resolve
from workbench.training import train
from workbench.training.pipeline import rm_quality

TINY = {"n_layer": 1, "n_embd": 16, "n_head": 2}


def test_rm_quality_by_hand():
    gold = torch.tensor([[0.0, 0.5, 1.0, 1.0]])
    assert rm_quality(gold * 3 - 2, gold) == pytest.approx({"rm/exact_accuracy": 1.0, "rm/gold_correlation": 1.0})
    # 5 pairs with different gold rewards; reversing the scores orders every one of them wrongly
    assert rm_quality(-gold, gold)["rm/exact_accuracy"] == 0.0
    # swap the first two: (0, 1) wrong, the other 4 right
    assert rm_quality(torch.tensor([[0.6, 0.5, 1.0, 1.0]]), gold)["rm/exact_accuracy"] == pytest.approx(4 / 5)


def test_pipeline_run_logs_proxy_and_gold(tmp_path):
    raw = {
        "task": {"name": "bandit", "n_arms": 6, "n_contexts": 2},
        "algo": {"name": "rloo"},
        "steps": 6,
        "batch_size": 16,
        "group_size": 4,
        "eval_every": 3,
        "probe_every": 0,
        "model": TINY,
        "save_checkpoint": False,
        "lr": 3e-3,
        "reward_model": "fit",
        "rm_steps": 20,
        "rm_pairs": 64,
        "sft_warmup_steps": 5,
    }
    res = resolve(raw)
    result = train(res, tmp_path / "run", progress=False)
    assert result["status"] == "done"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    for k in ("pipeline/sft_loss", "pipeline/rm_loss", "rm/exact_accuracy", "rm/gold_correlation", "model/n_params"):
        assert k in first and k not in last, k
    assert 0.0 <= first["rm/exact_accuracy"] <= 1.0
    assert first["kl/exact"] == pytest.approx(
        0.0, abs=1e-6
    )  # pi_ref is the SFT policy: KL is measured from the start of RL
    assert first["reward/proxy_gain"] == first["reward/gold_gain"] == first["rm/overoptimisation"] == 0.0
    assert last["rm/overoptimisation"] == pytest.approx(last["reward/proxy_gain"] - last["reward/gold_gain"])
    assert last["reward/gold_gain"] == pytest.approx(last["reward/exact"] - first["reward/exact"])
    assert "reward/gold_mean" in rows[1] and rows[1]["reward/mean"] != rows[1]["reward/gold_mean"]  # RL saw the proxy
    doc = Path("docs/metrics.md").read_text()
    assert not sorted(k for r in rows for k in r if f"`{k}`" not in doc)


def test_sft_warmup_moves_the_reference(tmp_path):
    base = {
        "task": {"name": "bandit", "n_arms": 6, "n_contexts": 2},
        "algo": {"name": "grpo"},
        "steps": 1,
        "batch_size": 8,
        "group_size": 4,
        "probe_every": 0,
        "model": TINY,
        "save_checkpoint": False,
        "lr": 1e-2,
    }
    r0 = train(resolve(base), tmp_path / "plain", progress=False)["final"]
    r1 = train(resolve({**base, "sft_warmup_steps": 30}), tmp_path / "sft", progress=False)["final"]
    rows = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert (
        rows[0]["reward/exact"]
        > json.loads((tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()[0])["reward/exact"]
    )
    assert r0["model/n_params"] == r1["model/n_params"]


def test_pipeline_needs_an_online_workbench_run():
    with pytest.raises(ConfigError, match="online algorithm"):
        resolve({"task": {"name": "bandit"}, "algo": {"name": "dpo"}, "reward_model": "fit"})
    with pytest.raises(ConfigError, match="online algorithm"):
        resolve({"task": {"name": "bandit"}, "algo": {"name": "sft"}, "sft_warmup_steps": 3})
    plain = resolve({"task": {"name": "bandit"}, "algo": {"name": "ppo"}})
    # the new fields at their defaults stay out of the hash: old run ids still match
    assert (
        plain.config_hash == resolve({"task": {"name": "bandit"}, "algo": {"name": "ppo"}, "rm_steps": 200}).config_hash
    )


def test_runs_of_one_seed_in_a_results_folder_share_the_fitted_reward_model_bit_for_bit(tmp_path, monkeypatch):
    """Inside a results folder the first run that fits a reward model saves it; a run whose fit reads the same
    settings (another algorithm, another step budget) loads it instead of fitting, and every number it logs is
    the one a fresh fit gives. A fit that reads other settings (another seed, other pairs) has another key."""
    from workbench.results import Store
    from workbench.training import pipeline

    task = {"name": "sequence", "vocab_size": 2, "length": 3, "n_prompts": 1}
    common = {"task": task, "model": TINY, "reward_model": "fit", "rm_steps": 6, "rm_pairs": 64, "seed": 4}
    common |= {"rm_calibrate": "optimise", "batch_size": 8, "eval_every": 2}
    ppo = resolve({**common, "algo": "ppo", "steps": 2})
    bon = resolve({**common, "algo": {"name": "bon", "n": 3}, "steps": 5})
    other_seed = resolve({**common, "algo": "ppo", "steps": 2, "seed": 5})
    assert pipeline.fit_key(ppo) == pipeline.fit_key(bon) != pipeline.fit_key(other_seed)
    assert pipeline.fit_key(ppo) != pipeline.fit_key(resolve({**common, "algo": "ppo", "rm_pairs": 32}))

    fresh = {}  # outside a results folder: no cache, every run fits
    for name, res in (("ppo", ppo), ("bon", bon)):
        train(res, tmp_path / "alone" / name, progress=False)
        fresh[name] = [json.loads(x) for x in (tmp_path / "alone" / name / "metrics.jsonl").read_text().splitlines()]
    assert not (tmp_path / "alone" / "cache").exists()

    root = tmp_path / "results"
    Store(root).close()  # a results folder (its index)
    fits = []
    real = pipeline.fit_reward_model
    monkeypatch.setattr(pipeline, "fit_reward_model", lambda *a, **k: fits.append(1) or real(*a, **k))
    for name, res in (("ppo", ppo), ("bon", bon)):
        train(res, root / "runs" / name, progress=False)
    assert len(fits) == 1  # ppo's fit: bon loaded it
    assert [f.stem for f in (root / "cache" / "reward_models").glob("*.pt")] == [pipeline.fit_key(ppo)]
    for name in ("ppo", "bon"):
        rows = [json.loads(x) for x in (root / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        skip = ("time/",)
        strip = [{k: v for k, v in r.items() if not k.startswith(skip)} for r in rows]
        assert strip == [{k: v for k, v in r.items() if not k.startswith(skip)} for r in fresh[name]], name
    # a damaged cache file is fitted again, not trusted
    for f in (root / "cache" / "reward_models").glob("*.pt"):
        f.write_bytes(b"not a checkpoint")
    train(bon, root / "runs" / "bon_again", progress=False)
    assert len(fits) == 2
