"""Best-of-n as a method (``workbench.algorithms.bon``): a run logs the exact best-of-n policy of its start."""

import itertools
import json
import math

import numpy as np
import pytest
import torch

from workbench.algorithms import bon
from workbench.analysis.exact import best_of_n_frontier, exact_logprobs
from workbench.cli import main
from workbench.config import ConfigError, resolve
from workbench.models.policy import build_policy
from workbench.registry import ALGORITHMS
from workbench.runtime.context import setup_device
from workbench.studies import expand, load_study
from workbench.training import stack_key, train

TINY = {"n_layer": 1, "n_embd": 16, "n_head": 2}


def _res(task: dict, n: int, **run):
    return resolve({"task": task, "algo": {"name": "bon", "n": n}, "model": TINY, "steps": 5, **run})


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _start(res):
    """The run's starting policy (= pi_ref), built as ``train`` builds it, and the gold reward table."""
    setup_device(res.run)
    policy = build_policy(res.task, res.run.model, res.run.seed, False, torch.device("cpu"))
    task = res.task
    prompts, comps = task.eval_prompts(), task.all_completions()
    P, N = len(prompts), len(comps)
    with torch.no_grad():
        logp = exact_logprobs(policy, task, prompts).cpu()
    r = task.reward(prompts.repeat_interleave(N, 0), comps.repeat(P, 1)).view(P, N).float()
    return logp, r


def _brute_force(logp: torch.Tensor, r: torch.Tensor, n: int) -> torch.Tensor:
    """P_bon by summing pi(y_1)...pi(y_n) over every n-tuple, the first best draw kept: ``(P, N)``."""
    p = logp.double().exp()
    P, N = p.shape
    q = torch.zeros(P, N, dtype=torch.float64)
    for x in range(P):
        for tup in itertools.product(range(N), repeat=n):
            rs = [r[x, y].item() for y in tup]
            q[x, tup[rs.index(max(rs))]] += math.prod(p[x, y].item() for y in tup)
    return q


@pytest.mark.parametrize(
    "task,n",
    [
        ({"name": "bandit", "n_arms": 5, "n_contexts": 2, "reward_shape": "gaussian", "peak_centre": 3.0}, 3),
        ({"name": "sequence", "vocab_size": 2, "length": 2, "n_prompts": 2}, 4),
    ],
)
def test_a_bon_run_logs_the_exact_best_of_n_of_its_starting_policy(tmp_path, task, n):
    res = _res(task, n, seed=3)
    out = tmp_path / "run"
    result = train(res, out, progress=False)
    assert result["status"] == "done"
    rows = _rows(out)
    assert [r["step"] for r in rows] == [0, 5]  # no updates: measured at the start and at the end
    logp, r = _start(res)
    want = best_of_n_frontier(logp, r, [n])[0]
    q = _brute_force(logp, r, n)  # by hand, independent of best_of_n_logprobs
    reward_bf = (q * r.double()).sum(-1).mean().item()
    kl_bf = (q * (q.log() - logp.double())).sum(-1).mean().item()
    for row in rows:
        assert row["bon/n"] == n
        assert row["bon/kl_bound"] == pytest.approx(math.log(n) - (n - 1) / n)
        assert row["reward/exact"] == pytest.approx(want["reward"], abs=1e-5)
        assert row["reward/exact"] == pytest.approx(reward_bf, abs=1e-5)
        assert row["kl/exact"] == pytest.approx(want["kl"], abs=1e-5)
        assert row["kl/exact"] == pytest.approx(kl_bf, abs=1e-5)
        assert row["objective/exact"] == pytest.approx(row["reward/exact"] - res.run.beta * row["kl/exact"], abs=1e-6)
        assert row["kl/exact"] <= row["bon/kl_bound"] + 1e-9
        assert row["samples"] == n * len(res.task.eval_prompts())
    published = np.load(out / "policy.npy")  # the measured policy: best-of-n's, not the start's
    assert np.allclose(np.exp(published), q.numpy(), atol=1e-5)


def test_n_equal_one_is_the_starting_policy_and_a_grid_over_n_gives_one_point_per_n(tmp_path):
    task = {"name": "bandit", "n_arms": 6, "reward_shape": "linear"}
    finals = {}
    for n in (1, 2, 8):
        finals[n] = train(_res(task, n), tmp_path / f"n{n}", progress=False)["final"]
    logp, r = _start(_res(task, 1))
    assert finals[1]["reward/exact"] == pytest.approx((logp.exp() * r).sum(-1).mean().item(), abs=1e-6)
    assert finals[1]["kl/exact"] == pytest.approx(0.0, abs=1e-6)
    assert finals[1]["reward/exact"] < finals[2]["reward/exact"] < finals[8]["reward/exact"]
    assert finals[1]["kl/exact"] < finals[2]["kl/exact"] < finals[8]["kl/exact"]

    study = tmp_path / "bon_grid.toml"
    study.write_text(
        """
name = "bon_grid"
claims = ["C12"]
seeds = [0, 1]

[[tasks]]
name = "bandit"
n_arms = 6

[budget]
steps = 4
batch_size = 16

[settings]
model = { n_layer = 1, n_embd = 16, n_head = 2 }

[[algorithms]]
name = "bon"
grid = { "algo.n" = [1, 4, 16] }

[[algorithms]]
name = "rloo"
"""
    )
    plan = [p for p in expand(load_study(study)) if p.algo_label == "bon"]
    assert sorted((p.grid["algo.n"], p.seed) for p in plan) == [(n, s) for n in (1, 4, 16) for s in (0, 1)]
    assert len({p.run_id for p in plan}) == 6
    assert all(stack_key(p.res) is None for p in plan)  # best-of-n trains alone, never in a stack


def test_sampled_best_of_n_on_a_task_that_cannot_be_enumerated_improves_gold_reward(tmp_path):
    task = {"name": "arithmetic", "n_digits": 1, "n_eval_prompts": 128}
    assert not resolve({"task": task, "algo": "bon"}).task.enumerable
    finals = {n: train(_res(task, n), tmp_path / f"n{n}", progress=False)["final"] for n in (1, 64)}
    assert "reward/exact" not in finals[64] and "kl/exact" not in finals[64]
    assert finals[64]["bon/kl_bound"] == pytest.approx(math.log(64) - 63 / 64)
    # an untrained policy answers ~1 in 100 right; the best of 64 draws about 1 - 0.99^64 ~ 0.47
    assert finals[1]["reward/eval"] < 0.1
    assert finals[64]["reward/eval"] > finals[1]["reward/eval"] + 0.2


def test_cli_trains_bon_and_bad_configs_name_the_key(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["train", "--task", "bandit", "--algo", "bon", "--set", "algo.n=4", "--steps", "3", "--out", str(out)]
    assert main([*argv, "--quiet", "--set", "model.n_layer=1", "--set", "model.n_embd=16"]) == 0
    assert _rows(out)[-1]["bon/n"] == 4 and _rows(out)[-1]["step"] == 3
    assert ALGORITHMS["bon"] is bon.SPEC and bon.SPEC.best_of(bon.BonConfig(n=7)) == 7
    with pytest.raises(ConfigError, match="unknown key 'algo.m'; allowed here: n"):
        resolve({"task": "bandit", "algo": {"name": "bon", "m": 4}})
    with pytest.raises(ConfigError, match="algo.n"):
        resolve({"task": "bandit", "algo": {"name": "bon", "n": 0}})
    with pytest.raises(ConfigError, match="backend 'trl' is not supported"):
        resolve({"task": "bandit", "algo": "bon", "backend": "trl"})


@pytest.mark.parametrize("calibrate", ["off", "report", "optimise"])
def test_bon_ranked_by_a_fitted_reward_model_is_the_exact_best_of_n_under_its_scores(tmp_path, calibrate):
    """Gao et al.'s best-of-n: the draws ranked by the proxy (the fitted reward model, calibrated or not), the gold
    reward only measured; its gold and proxy gains are P_bon's over the starting policy pi."""
    from workbench.training.pipeline import Pipeline, all_scores

    task = {"name": "sequence", "vocab_size": 2, "length": 3, "n_prompts": 1}
    n = 3
    res = _res(task, n, seed=1, reward_model="fit", rm_steps=3, rm_pairs=64, rm_calibrate=calibrate)
    out = tmp_path / "run"
    assert train(res, out, progress=False)["status"] == "done"
    rows = _rows(out)
    logp, gold = _start(res)
    device = torch.device("cpu")
    policy = build_policy(res.task, res.run.model, res.run.seed, False, device)
    pipe = Pipeline(res, policy, device)  # the same fit as the run's (same seed, same pairs)
    scores, _ = all_scores(pipe.rm, res.task, device)  # what ranks the draws: the reward the run optimises
    assert (scores.argsort(-1) != gold.argsort(-1)).any()  # a 3-step reward model orders unlike the gold reward
    q = _brute_force(logp, scores, n)  # the best of n draws by the proxy's score
    q_gold = _brute_force(logp, gold, n)
    p = logp.double().exp()
    proxy_units = (
        pipe.scores
    )  # the proxy's score of every completion in the units the run reports (gold with calibration)
    for row in rows:
        assert row["reward/exact"] == pytest.approx((q * gold.double()).sum(-1).mean().item(), abs=1e-5)
        assert row["reward/gold_gain"] == pytest.approx(((q - p) * gold.double()).sum(-1).mean().item(), abs=1e-5)
        assert row["reward/proxy_gain"] == pytest.approx(
            ((q - p) * proxy_units.double()).sum(-1).mean().item(), abs=1e-5
        )
        kl = (q * (q.log() - logp.double())).sum(-1).mean().item()
        assert row["kl/exact"] == pytest.approx(kl, abs=1e-5)
    assert not np.allclose(q.numpy(), q_gold.numpy(), atol=1e-3)  # ranking by the proxy is not ranking by gold
    assert np.allclose(np.exp(np.load(out / "policy.npy")), q.numpy(), atol=1e-5)
