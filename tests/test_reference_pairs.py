"""Offline preference pairs sampled from pi_ref (``PreferenceOptions.pairs = "reference"``)."""

import json

import numpy as np
import pytest
import torch
from scipy import stats
from test_seeds import SETS, assert_same_runs

from workbench.algorithms import dpo
from workbench.analysis.exact import exact_logprobs
from workbench.config import ConfigError, resolve
from workbench.core import seeds
from workbench.models.policy import build_policy
from workbench.runtime.data import offline_dataset
from workbench.toy_tasks.base import bradley_terry
from workbench.training import train, train_seeds

BANDIT = {"name": "bandit", "n_arms": 4, "n_contexts": 2, "prior": "gaussian", "prior_centre": 0.5}
SMALL = {"model.n_layer": 1, "model.n_embd": 16, "model.n_head": 2, "probe_every": 0, "save_checkpoint": False}


def reference(res):
    return build_policy(res.task, res.run.model, res.run.seed, False, torch.device("cpu")).frozen_copy()


def pair_p_value(data: dict, pi: torch.Tensor) -> float:
    """Chi-square p-value of the unordered pairs' counts against (2 - [a = b]) pi(a|x) pi(b|x) / C; pi ``(C, K)``."""
    C, K = pi.shape
    a, b = data["chosen"][:, 0], data["rejected"][:, 0]
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    cell = (data["prompts"][:, 0] * K + lo) * K + hi  # (context, min, max)
    observed = torch.bincount(cell, minlength=C * K * K).double().view(C, K, K)
    expected = 2 * torch.triu(pi[:, :, None] * pi[:, None, :], diagonal=1) + torch.diag_embed(pi**2)
    expected = expected / C * len(cell)
    keep = torch.triu(torch.ones(K, K, dtype=torch.bool)).expand(C, K, K)
    return stats.chisquare(observed[keep].numpy(), expected[keep].numpy())[1]


def exact_pi(policy, task) -> torch.Tensor:
    with torch.no_grad():
        pi = exact_logprobs(policy, task).exp().double()  # (C, K)
    return pi / pi.sum(-1, keepdim=True)  # float32 log-probs: renormalised in float64 for the test's sum check


def test_reference_pairs_have_the_frequencies_pi_ref_implies():
    """Unordered pairs {a, b} of context x occur with probability P(x) (2 - [a = b]) pi_ref(a|x) pi_ref(b|x)."""
    res = resolve({"task": BANDIT, "algo": {"name": "dpo", "pairs": "reference", "n_pairs": 40_000}}, SMALL)
    task, ref = res.task, reference(res)
    data = dpo.preference_dataset(task, res.algo_cfg, seeds.data(0), ref=ref)
    assert {k: tuple(v.shape) for k, v in data.items()} == {
        "prompts": (40_000, 1),
        "chosen": (40_000, 1),
        "rejected": (40_000, 1),
        "p_chosen": (40_000,),
    }
    pi = exact_pi(ref, task)  # (C, K) exact pi_ref
    assert pi[:, 0].min() > 0.3  # the gaussian prior at 0.5 arms: pi_ref far from uniform
    p = pair_p_value(data, pi)
    assert p > 1e-3, p
    # labels as for uniform pairs: soft labels store the Bradley-Terry probability of the winner
    r_c, r_r = task.reward(data["prompts"], data["chosen"]), task.reward(data["prompts"], data["rejected"])
    assert torch.allclose(data["p_chosen"], bradley_terry(r_c, r_r, 1.0))
    assert (data["p_chosen"] >= 0.5).all()


def test_the_same_seed_draws_the_same_pairs_and_other_sources_ignore_ref():
    res = resolve({"task": BANDIT, "algo": {"name": "dpo", "pairs": "reference", "n_pairs": 64}}, SMALL)
    ref = reference(res)
    one = dpo.preference_dataset(res.task, res.algo_cfg, seeds.data(0), ref=ref)
    two = dpo.preference_dataset(res.task, res.algo_cfg, seeds.data(0), ref=ref)
    assert all(torch.equal(one[k], two[k]) for k in one)
    with pytest.raises(ValueError, match="reference policy"):
        dpo.preference_dataset(res.task, res.algo_cfg, seeds.data(0))
    uniform = resolve({"task": BANDIT, "algo": {"name": "dpo", "pairs": "random", "n_pairs": 64}}, SMALL)
    a = dpo.preference_dataset(uniform.task, uniform.algo_cfg, seeds.data(0))
    b = dpo.preference_dataset(uniform.task, uniform.algo_cfg, seeds.data(0), ref=ref)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_what_reference_pairs_cannot_do_is_a_config_error():
    with pytest.raises(ConfigError, match="coverage"):
        resolve({"task": BANDIT, "algo": {"name": "dpo", "pairs": "reference", "coverage": 0.5}})
    with pytest.raises(ConfigError, match="no pi_ref"):
        resolve({"task": BANDIT, "algo": {"name": "rm", "pairs": "reference"}})
    with pytest.raises(ConfigError, match="workbench backend"):
        resolve(
            {"task": BANDIT, "algo": {"name": "dpo", "pairs": "reference", "labels": "sampled"}}, {"backend": "trl"}
        )


def test_a_dpo_run_on_reference_pairs_trains_and_stacks(tmp_path):
    algo = {"name": "dpo", "pairs": "reference", "n_pairs": 256, "labels": "sampled"}
    res = resolve({"task": BANDIT, "algo": algo}, {**SMALL, "steps": 5, "eval_every": 5, "probe_every": 5})
    assert train(res, tmp_path / "one", progress=False)["status"] == "done"  # probes rebuild the dataset too
    rows = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss/dpo"]) for r in rows[:-1])
    task = {"name": "sequence", "vocab_size": 3, "length": 3, "n_prompts": 2}
    reses = [resolve({"task": task, "algo": algo}, {**SETS, "seed": s}) for s in (0, 4)]
    results = train_seeds(reses, [tmp_path / "batched" / str(i) for i in range(2)])
    assert_same_runs(reses, tmp_path / "batched", tmp_path / "alone", results)


def test_pairs_from_a_checkpoint_are_sampled_from_its_policy(tmp_path):
    """``pairs_from``: the pairs follow the checkpoint's policy (here an SFT run's), not the run's pi_ref."""
    sft = resolve(
        {"task": BANDIT, "algo": {"name": "sft"}}, {**SMALL, "steps": 10, "lr": 3e-2, "save_checkpoint": True}
    )
    assert train(sft, tmp_path / "sft", progress=False)["status"] == "done"
    ckpt = str(tmp_path / "sft" / "checkpoint")
    algo = {"name": "dpo", "pairs": "reference", "n_pairs": 40_000, "pairs_from": ckpt}
    res = resolve({"task": BANDIT, "algo": algo}, SMALL)
    ref = reference(res)
    data = offline_dataset(res, ref, seeds.data(0), torch.device("cpu"))
    sampler = build_policy(res.task, res.run.model.model_copy(update={"path": ckpt}), 0, False, torch.device("cpu"))
    pi_sft, pi_ref = exact_pi(sampler, res.task), exact_pi(ref, res.task)
    assert (pi_sft - pi_ref).abs().max() > 0.2  # SFT moved the policy
    assert pair_p_value(data, pi_sft) > 1e-3 and pair_p_value(data, pi_ref) < 1e-6
    # the run trains on them (its probes rebuild the same dataset), and so does a reward model
    sets = {**SMALL, "steps": 3, "eval_every": 3, "probe_every": 3}
    small = {**algo, "n_pairs": 128, "labels": "sampled"}
    for name in ("dpo", "rm"):
        run = resolve({"task": BANDIT, "algo": {**small, "name": name}}, sets)
        assert train(run, tmp_path / name, progress=False)["status"] == "done"
    with pytest.raises(ConfigError, match="algo.pairs_from"):
        resolve({"task": BANDIT, "algo": {**algo, "pairs_from": str(tmp_path / "gone")}})
    with pytest.raises(ConfigError, match="set pairs = 'reference'"):
        resolve({"task": BANDIT, "algo": {**algo, "pairs": "random"}})
