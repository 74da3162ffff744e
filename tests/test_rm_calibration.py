"""The in-run reward model calibrated to gold units (``rm_calibrate``) and fitted on pairs from the SFT policy
(``rm_pairs_from = "sft"``): workbench/training/pipeline.py, issue 16."""

import json
import math
from pathlib import Path

import pytest
import torch
from test_reference_pairs import exact_pi, pair_p_value

from workbench.algorithms import reward_model as rm_algo
from workbench.config import ConfigError, resolve
from workbench.models.policy import build_policy
from workbench.training import train
from workbench.training.pipeline import Calibrated, Pipeline, all_scores, calibration, pair_accuracy, rm_pairs

TINY = {"n_layer": 1, "n_embd": 16, "n_head": 2}
BANDIT = {"name": "bandit", "n_arms": 4, "n_contexts": 2, "prior": "gaussian", "prior_centre": 0.5}
CPU = torch.device("cpu")


def pipeline_run(**over) -> dict:
    return {
        "task": {"name": "bandit", "n_arms": 6, "n_contexts": 2},
        "algo": {"name": "rloo"},
        "steps": 4,
        "batch_size": 16,
        "group_size": 4,
        "eval_every": 2,
        "probe_every": 0,
        "model": TINY,
        "save_checkpoint": False,
        "lr": 3e-3,
        "reward_model": "fit",
        "rm_steps": 20,
        "rm_pairs": 64,
        "sft_warmup_steps": 5,
        **over,
    }


def test_calibration_recovers_a_known_linear_miscalibration():
    """Scores 3 g + 0.5 (+ small noise): the map back to gold units is g = s / 3 - 1/6. With a constant per
    prompt added (a Bradley-Terry model's free c(x)), the within-pair slope is still 1/3, where a regression
    pooled over prompts would shrink it."""
    gen = torch.Generator().manual_seed(0)
    gold = torch.rand(20_000, 2, generator=gen)  # pairs: two completions of one prompt
    exact = calibration(3 * gold + 0.5, gold)
    assert exact == pytest.approx({"slope": 1 / 3, "intercept": -1 / 6, "r2": 1.0}, abs=1e-9)
    noisy = calibration(3 * gold + 0.5 + 0.05 * torch.randn(20_000, 2, generator=gen), gold)
    assert noisy["slope"] == pytest.approx(1 / 3, abs=3e-3)
    assert noisy["intercept"] == pytest.approx(-1 / 6, abs=3e-3)
    assert 0.99 < noisy["r2"] < 1.0
    c_x = 5 * torch.randn(20_000, 1, generator=gen)  # per prompt, shared by the pair
    shifted = calibration(3 * gold + 0.5 + c_x, gold)
    assert shifted["slope"] == pytest.approx(1 / 3, abs=1e-9) and shifted["r2"] == pytest.approx(1.0, abs=1e-9)
    s, g = (3 * gold + 0.5 + c_x).double().view(-1), gold.double().view(-1)
    pooled = ((s - s.mean()) * (g - g.mean())).sum() / ((s - s.mean()) ** 2).sum()
    assert pooled.item() < 0.1  # what a pooled fit would have said
    # the slope is least squares on the differences: their residuals are orthogonal to the score differences
    s = 3 * gold + 0.5 + 0.05 * torch.randn(20_000, 2, generator=gen)
    c = calibration(s, gold)
    ds, dg = (s[:, 0] - s[:, 1]).double(), (gold[:, 0] - gold[:, 1]).double()
    assert ((dg - c["slope"] * ds) * ds).mean().item() == pytest.approx(0.0, abs=1e-9)
    flat = calibration(torch.ones(5, 2), torch.arange(10.0).view(5, 2))
    assert flat["slope"] == 0.0 and flat["intercept"] == 4.5 and math.isnan(flat["r2"])


def test_pair_accuracy_by_hand():
    gold = torch.tensor([1.0, -0.5, 0.0, 2.0])
    assert pair_accuracy(torch.tensor([0.3, -1.0, 5.0, -0.1]), gold) == pytest.approx(2 / 3)  # tie left out
    assert math.isnan(pair_accuracy(torch.ones(2), torch.zeros(2)))


def test_uniform_pairs_are_phase_two_pairs_as_before():
    res = resolve(pipeline_run())
    cfg = rm_algo.RewardModelConfig(pairs="random", n_pairs=64, labels="sampled", bt_temperature=1.0)
    old = rm_algo.preference_dataset(res.task, cfg, torch.Generator().manual_seed(5))
    new = rm_pairs(res, torch.Generator().manual_seed(5))
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)


def test_sft_pairs_have_the_frequencies_the_sft_policy_implies():
    """``rm_pairs_from = "sft"``: unordered pairs {a, b} of context x occur with probability
    P(x) (2 - [a = b]) pi_SFT(a|x) pi_SFT(b|x), not as uniform pairs would."""
    res = resolve(pipeline_run(task=BANDIT, rm_pairs=40_000, rm_pairs_from="sft"))
    sft = build_policy(res.task, res.run.model, res.run.seed, False, CPU).frozen_copy()
    pi = exact_pi(sft, res.task)
    assert pi[:, 0].min() > 0.3  # far from uniform
    data = rm_pairs(res, torch.Generator().manual_seed(1), sft)
    assert data["chosen"].shape == (40_000, 1)
    assert pair_p_value(data, pi) > 1e-3
    uniform = torch.full_like(pi, 1 / pi.shape[1])
    assert pair_p_value(data, uniform) < 1e-10


def test_calibrated_pipeline_reports_and_optimises_gold_units():
    res = resolve(pipeline_run(rm_calibrate="optimise", rm_pairs_from="sft"))
    policy = build_policy(res.task, res.run.model, res.run.seed, False, CPU)
    pipe = Pipeline(res, policy, CPU)
    st = pipe.stats
    for k in ("rm/heldout_accuracy", "rm/calibration_slope", "rm/calibration_intercept", "rm/calibration_r2"):
        assert k in st, k
    a, b = st["rm/calibration_slope"], st["rm/calibration_intercept"]
    assert isinstance(pipe.rm, Calibrated) and (pipe.rm.slope, pipe.rm.intercept) == (a, b)
    raw, _ = all_scores(pipe.rm.rm, res.task, CPU)
    assert torch.allclose(pipe.scores, a * raw + b)  # the proxy metrics in gold units
    p, c = res.task.eval_prompts(), res.task.all_completions()[:1].expand(len(res.task.eval_prompts()), -1)
    assert torch.allclose(pipe.rm(p, c), a * pipe.rm.rm(p, c) + b)  # what the RL phase optimises
    rep = resolve(pipeline_run(rm_calibrate="report"))
    report = Pipeline(rep, build_policy(rep.task, rep.run.model, rep.run.seed, False, CPU), CPU)
    assert not isinstance(report.rm, Calibrated) and "rm/calibration_slope" in report.stats
    a, b = report.stats["rm/calibration_slope"], report.stats["rm/calibration_intercept"]
    assert torch.allclose(report.scores, a * all_scores(report.rm, rep.task, CPU)[0] + b)


def test_calibrated_run_logs_documented_metrics(tmp_path):
    result = train(
        resolve(pipeline_run(rm_calibrate="optimise", rm_pairs_from="sft")), tmp_path / "run", progress=False
    )
    assert result["status"] == "done"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    for k in ("rm/heldout_accuracy", "rm/calibration_slope", "rm/calibration_intercept", "rm/calibration_r2"):
        assert k in first and k not in last, k
    assert 0.0 <= first["rm/heldout_accuracy"] <= 1.0
    assert last["rm/overoptimisation"] == pytest.approx(last["reward/proxy_gain"] - last["reward/gold_gain"])
    doc = Path("docs/metrics.md").read_text()
    assert not sorted(k for r in rows for k in r if f"`{k}`" not in doc)


def test_options_need_a_fitted_reward_model_and_stay_out_of_the_hash():
    for over in ({"rm_calibrate": "report"}, {"rm_pairs_from": "sft"}):
        with pytest.raises(ConfigError, match="reward_model = 'fit'"):
            resolve({"task": {"name": "bandit"}, "algo": {"name": "ppo"}, **over})
    base = pipeline_run()
    same = resolve({**base, "rm_calibrate": "off", "rm_pairs_from": "uniform"})
    assert resolve(base).config_hash == same.config_hash
    assert resolve({**base, "rm_calibrate": "optimise"}).config_hash != same.config_hash
