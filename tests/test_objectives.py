"""KTO, SimPO, ORPO, cDPO and robust DPO: hand-computed losses, exact fixed points, learning, plumbing.

TRL parity of the same losses is in ``tests/test_trl_parity_objectives.py``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from workbench.algorithms import dpo, kto, orpo, simpo
from workbench.analysis import exact
from workbench.config import ConfigError, resolve
from workbench.models.policy import build_policy
from workbench.registry import ALGORITHMS
from workbench.training import train


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# -- hand-computed losses ----------------------------------------------------------------------


def test_kto_loss_by_hand():
    """rho = (0.5, -0.2, 0.1), mismatched rho' = (0.4, 0.2, 0.3) so z_ref = 0.3, beta 1, w_D 1, w_U 2, labels 1 0 1:
    L = [(1 - s(0.2)) + 2 (1 - s(0.5)) + (1 - s(-0.2))] / 3 = [1 + 2 s(-0.5)] / 3."""
    logp = torch.tensor([[0.3, 0.2], [-0.2, 7.0], [0.4, -0.3]], requires_grad=True)  # 7.0 is masked out
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    kl_logp = torch.tensor([[0.4, 0.0], [0.2, 5.0], [0.3, 0.0]], requires_grad=True)  # 5.0 masked out
    zeros = torch.zeros(3, 2)
    cfg = kto.KTOConfig(desirable_weight=1.0, undesirable_weight=2.0)
    loss, per_row, stats = kto.kto_loss(logp, zeros, mask, kl_logp, zeros, mask, torch.tensor([1.0, 0, 1]), cfg, 1.0)
    assert loss.item() == pytest.approx((1 + 2 * sig(-0.5)) / 3, abs=1e-6)
    assert per_row[:, 0].tolist() == pytest.approx([1 - sig(0.2), 2 * (1 - sig(0.5)), 1 - sig(-0.2)], abs=1e-6)
    assert stats["kto/kl"] == pytest.approx(0.3, abs=1e-6)
    assert stats["rewards/chosen"] == pytest.approx(0.3, abs=1e-6)  # beta rho over the desirable rows
    assert stats["rewards/rejected"] == pytest.approx(-0.2, abs=1e-6)
    loss.backward()
    assert kl_logp.grad is None or kl_logp.grad.abs().sum() == 0  # z_ref carries no gradient
    # d/d rho of w (1 - s(beta (rho - z))) = -w s'(.): row 0's tokens each get -(s(0.2) s(-0.2)) / 3
    assert logp.grad[0].tolist() == pytest.approx([-sig(0.2) * sig(-0.2) / 3] * 2, abs=1e-6)
    assert logp.grad[1, 1].item() == 0.0


def test_kto_reference_point_is_clamped_at_zero():
    """A negative mismatched mean gives z_ref = 0 (TRL's clamp): L = 1 - s(rho) for one desirable row."""
    logp, zeros, ones = torch.tensor([[0.5], [0.5]]), torch.zeros(2, 1), torch.ones(2, 1)
    kl_logp = torch.tensor([[-1.0], [-2.0]])
    cfg = kto.KTOConfig()
    loss, _, stats = kto.kto_loss(logp, zeros, ones, kl_logp, zeros, ones, torch.tensor([1.0, 1.0]), cfg, 2.0)
    assert stats["kto/kl"] == 0.0
    assert loss.item() == pytest.approx(1 - sig(1.0), abs=1e-6)


def test_kto_pairs_each_row_with_the_previous_rows_completion():
    """``kto.forward`` scores prompt i with completion i - 1 (row 0 with the last) for z_ref, as TRL rotates."""
    seen = []

    class Recorder:
        def __call__(self, prompts, comps, values=None):
            seen.append(comps.clone())
            return type("Out", (), {"logp": torch.zeros(comps.shape, dtype=torch.float)})()

    comps = torch.tensor([[0], [1], [2]])
    kto.forward(Recorder(), Recorder(), {"prompts": torch.zeros(3, 1, dtype=torch.long), "completions": comps})
    assert seen[0].flatten().tolist() == [0, 1, 2] and seen[2].flatten().tolist() == [2, 0, 1]


def test_simpo_loss_by_hand():
    """rbar_c = -1.5, rbar_r = -3 (a masked token ignored), beta_s 2, gamma 0.5: h = 1.5, beta_s h - gamma = 2.5.
    Row 1 soft, p = 0.7, rbar_c = rbar_r = -1: L = -(0.7 log s(-0.5) + 0.3 log s(-0.5)) = -log s(-0.5)."""
    logp_c = torch.tensor([[-1.0, -2.0], [-1.0, -1.0]])
    logp_r = torch.tensor([[-3.0, -9.0], [-0.5, -1.5]])
    mask_c, mask_r = torch.ones(2, 2), torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    cfg = simpo.SimPOConfig(beta=2.0, gamma=0.5)
    loss, per_seq, stats = simpo.simpo_loss(logp_c, logp_r, mask_c, mask_r, torch.tensor([1.0, 0.7]), cfg)
    expected = [math.log1p(math.exp(-2.5)), -math.log(sig(-0.5))]
    assert per_seq[:, 0].tolist() == pytest.approx(expected, abs=1e-6)
    assert loss.item() == pytest.approx(sum(expected) / 2, abs=1e-6)
    assert stats["rewards/chosen"] == pytest.approx(2.0 * (-1.5 - 1.0) / 2, abs=1e-6)  # beta_s rbar_c, mean


def test_orpo_loss_by_hand():
    """One token: P_c = 0.5, P_r = 0.2, odds 1 and 0.25, log OR = log 4, L_OR = log 1.25; NLL = log 2;
    lambda 0.1: L = log 2 + 0.1 log 1.25."""
    logp_c, logp_r, ones = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.2)]]), torch.ones(1, 1)
    loss, _, stats = orpo.orpo_loss(logp_c, logp_r, ones, ones, torch.ones(1), orpo.ORPOConfig(lam=0.1))
    assert loss.item() == pytest.approx(math.log(2) + 0.1 * math.log(1.25), abs=1e-6)
    assert stats["orpo/log_odds_ratio"] == pytest.approx(math.log(4), abs=1e-6)
    assert stats["orpo/nll"] == pytest.approx(math.log(2), abs=1e-6)
    # soft label p = 0.25: the winner's NLL weighted 1/4 and 3/4, the odds ratio either way
    loss, _, _ = orpo.orpo_loss(logp_c, logp_r, ones, ones, torch.tensor([0.25]), orpo.ORPOConfig(lam=0.1))
    nll = 0.25 * math.log(2) + 0.75 * -math.log(0.2)
    l_or = -(0.25 * math.log(sig(math.log(4))) + 0.75 * math.log(sig(-math.log(4))))
    assert loss.item() == pytest.approx(nll + 0.1 * l_or, abs=1e-6)


@pytest.mark.parametrize(
    "loss_type, expected",
    [
        ("sigmoid", 0.9 * math.log1p(math.exp(-1)) + 0.1 * math.log1p(math.exp(1))),  # cDPO
        ("robust", (0.9 * math.log1p(math.exp(-1)) - 0.1 * math.log1p(math.exp(1))) / 0.8),  # rDPO
    ],
)
def test_label_smoothing_by_hand(loss_type, expected):
    """h = 2, beta 0.5 (beta h = 1), hard label, eps 0.1."""
    lc, z = torch.tensor([[1.5, 0.5]]), torch.zeros(1, 2)
    lr = torch.tensor([[0.0, 0.0]])
    cfg = dpo.DPOConfig(loss_type=loss_type, label_smoothing=0.1)
    loss, _, _ = dpo.dpo_loss(lc, lr, z, z, torch.ones(1, 2), torch.ones(1, 2), torch.ones(1), cfg, 0.5)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_default_dpo_is_unchanged_by_label_smoothing():
    """eps = 0 takes the plain branch (bitwise the old sums) and leaves a default run's config hash as it was."""
    g = torch.Generator().manual_seed(0)
    lc, lr, rc, rr = (torch.randn(5, 3, generator=g) for _ in range(4))
    p, m = torch.rand(5, generator=g), torch.ones(5, 3)
    loss, _, _ = dpo.dpo_loss(lc, lr, rc, rr, m, m, p, dpo.DPOConfig(), 0.1)
    h = (lc - rc).sum(-1) - (lr - rr).sum(-1)
    plain = -(p * torch.nn.functional.logsigmoid(0.1 * h) + (1 - p) * torch.nn.functional.logsigmoid(-0.1 * h))
    assert torch.equal(loss, plain.mean())
    raw = {"task": {"name": "bandit"}, "algo": {"name": "dpo"}}
    a, b = resolve(raw), resolve({**raw, "algo": {"name": "dpo", "label_smoothing": 0.0}})
    assert a.config_hash == b.config_hash
    assert resolve({**raw, "algo": {"name": "dpo", "label_smoothing": 0.1}}).config_hash != a.config_hash
    with pytest.raises(ConfigError, match="label_smoothing"):
        resolve({**raw, "algo": {"name": "dpo", "loss_type": "ipo", "label_smoothing": 0.1}})


def test_specs_are_registered_with_honest_regularisers():
    for name, cfg in (("kto", kto.KTOConfig()), ("simpo", simpo.SimPOConfig()), ("orpo", orpo.ORPOConfig())):
        spec = ALGORITHMS[name]
        assert spec.kind == "offline" and spec.forward is not None and spec.loss is not None
        text = spec.regulariser(cfg, 0.1)
        assert ("no reference model" in text) == (name != "kto"), text
        assert ("beta 0.1" in text) == (name == "kto"), text  # the run's beta acts in KTO only
    assert "cDPO" in ALGORITHMS["dpo"].regulariser(dpo.DPOConfig(label_smoothing=0.1), 0.1)
    assert "robust" in ALGORITHMS["dpo"].regulariser(dpo.DPOConfig(loss_type="robust", label_smoothing=0.1), 0.1)
    with pytest.raises(ConfigError, match="batch_size"):
        resolve({"task": {"name": "bandit"}, "algo": {"name": "kto", "batch_size": 1}})  # z_ref needs 2 rows
    with pytest.raises(ConfigError, match="gamma"):
        resolve({"task": {"name": "bandit"}, "algo": {"name": "simpo", "gama": 1.0}})  # a typo names the key


def test_kto_dataset_splits_pairs_into_desirable_and_undesirable_rows():
    res = resolve({"task": {"name": "bandit", "n_arms": 4}, "algo": {"name": "kto"}})
    d = ALGORITHMS["kto"].dataset(res.task, res.algo_cfg, torch.Generator().manual_seed(0))
    N = len(d["prompts"]) // 2
    assert N == 6 and d["desirable"].tolist() == [1.0] * N + [0.0] * N  # every pair of 4 arms, split
    r = res.task.reward(d["prompts"], d["completions"])
    assert (r[:N] >= r[N:]).all()  # soft labels: the desirable row is the pair's higher gold reward


# -- exact fixed points ------------------------------------------------------------------------


def bandit(n_arms=8, **task):
    res = resolve({"task": {"name": "bandit", "n_arms": n_arms, **task}, "algo": {"name": "dpo"}})
    t = res.task
    P, comps = len(t.eval_prompts()), t.all_completions()
    rewards = t.reward(t.eval_prompts().repeat_interleave(len(comps), 0), comps.repeat(P, 1)).view(P, -1).double()
    ref = torch.log_softmax(torch.randn(P, len(comps), generator=torch.Generator().manual_seed(3)).double(), -1)
    return t, rewards, ref


def optimum(task, ref, name, beta=0.1, **kw):
    spec = ALGORITHMS[name]
    cfg = spec.Config(**kw)
    batch = spec.dataset(task, cfg, torch.Generator().manual_seed(0))
    method = "adam" if name == "kto" else "lbfgs"
    return exact.population_optimum(
        task, spec, cfg, beta, ref, batch, method=method, steps=400 if name == "kto" else 200
    )


def test_population_optimum_of_dpo_is_pi_star_and_of_simpo_the_closed_form():
    """The brute-force minimiser (full-batch training over tables) finds DPO's known answer pi* (C6), and
    SimPO's with gamma = 0: softmax(r / beta_s), the same whatever pi_ref."""
    task, r, ref = bandit()
    logp, gnorm = optimum(task, ref, "dpo")
    assert gnorm < 1e-6 and exact.kl(logp, exact.optimal_logprobs(ref, r, 0.1)).item() < 1e-8
    target = exact.simpo_bandit_optimum(r, 2.0)
    for reference in (ref, torch.zeros_like(ref) - math.log(ref.shape[-1])):
        logp, gnorm = optimum(task, reference, "simpo", beta=2.0, gamma=0.0)
        assert gnorm < 1e-6 and exact.kl(logp, target).item() < 1e-8
    logp, _ = optimum(task, ref, "simpo", beta=2.0, gamma=0.5)  # the margin moves it: no longer softmax(r/beta_s)
    assert exact.kl(logp, target).item() > 1e-4  # 8e-4 measured


@pytest.mark.parametrize(
    "name, loss, kw",
    [
        ("dpo", "cdpo", {"label_smoothing": 0.2}),
        ("dpo", "rdpo", {"loss_type": "robust", "label_smoothing": 0.1}),
        ("simpo", "simpo", {"beta": 2.0, "gamma": 0.5}),
    ],
)
def test_two_arm_optimum_matches_the_closed_form(name, loss, kw):
    """One pair (two arms, soft label p): the minimiser's beta h equals ``pairwise_optimum``'s closed form."""
    task, r, ref = bandit(n_arms=2, reward_shape="linear")
    logp, gnorm = optimum(task, ref, name, **kw)
    p = sig((r[0, 1] - r[0, 0]).item())  # arm 1 pays 1, arm 0 pays 0
    beta = kw.get("beta", 0.1) if name == "simpo" else 0.1
    h = (logp[0, 1] - logp[0, 0]).item() - (0 if name == "simpo" else (ref[0, 1] - ref[0, 0]).item())
    eps, gamma = kw.get("label_smoothing", 0.0), kw.get("gamma", 0.0)
    assert gnorm < 1e-6
    assert beta * h == pytest.approx(exact.pairwise_optimum(p, beta, loss, eps=eps, gamma=gamma), abs=1e-6)


@pytest.mark.slow
def test_kto_fixed_point_is_stationary_and_not_pi_star(tmp_path):
    """KTO's semi-gradient iteration settles (gradient ~0 at the end) at a policy that is not pi*, and a KTO run
    on the bandit moves towards that fixed point."""
    res = resolve(
        {"task": {"name": "bandit"}, "algo": {"name": "kto"}},
        {"steps": 60, "eval_every": 60, "lr": 3e-3, "model.n_layer": 1, "model.n_embd": 32},
    )
    start = build_policy(res.task, res.run.model, res.run.seed, False, torch.device("cpu"), res.run.precision)
    ref = exact.exact_logprobs(start, res.task).double()
    comps = res.task.all_completions()
    r = res.task.reward(res.task.eval_prompts().repeat_interleave(len(comps), 0), comps.repeat(len(ref), 1))
    fixed, gnorm = exact.population_optimum(
        res.task, ALGORITHMS["kto"], res.algo_cfg, 0.1, ref, _full_batch(res), method="adam", steps=400
    )
    assert gnorm < 1e-2
    assert exact.kl(fixed, exact.optimal_logprobs(ref, r.view(len(ref), -1).double(), 0.1)).item() > 0.05
    out = tmp_path / "kto"
    assert train(res, out, progress=False)["status"] == "done"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["reward/exact"] > rows[0]["reward/exact"]
    trained = _final_logprobs(res, out)
    assert exact.kl(trained, fixed).item() < 0.5 * exact.kl(ref, fixed).item()


def _full_batch(res):
    return ALGORITHMS[res.spec.name].dataset(res.task, res.algo_cfg, torch.Generator().manual_seed(0))


def _final_logprobs(res, out):
    model = res.run.model.model_copy(update={"path": str(out / "checkpoint")})
    policy = build_policy(res.task, model, res.run.seed, False, torch.device("cpu"), res.run.precision)
    return exact.exact_logprobs(policy, res.task).double()


# -- learning and plumbing ---------------------------------------------------------------------

SMALL = {"model.n_layer": 1, "model.n_embd": 32, "batch_size": 32, "lr": 3e-3, "save_checkpoint": False}
# the configurations the learning test fixes; SimPO at beta_s 1 and ORPO on noiseless labels with lambda 1: at
# their paper defaults (beta_s 2; lambda 0.1 on BT-noisy labels) they rise too, but slowly here (docs/objectives.md)
CONFIGS = {
    "kto": ("kto", {}),
    "simpo": ("simpo", {"algo.beta": 1.0}),
    "orpo": ("orpo", {"algo.bt_temperature": 0.0, "algo.lam": 1.0}),
    "cdpo": ("dpo", {"algo.label_smoothing": 0.1}),
    "rdpo": ("dpo", {"algo.loss_type": "robust", "algo.label_smoothing": 0.1}),
}


@pytest.mark.slow
@pytest.mark.parametrize("task", [{"name": "bandit"}, {"name": "sequence", "length": 4}], ids=["bandit", "sequence"])
@pytest.mark.parametrize("objective", list(CONFIGS))
def test_objective_raises_gold_reward(objective, task, tmp_path):
    """Same starting policy (seed 0), 30 updates: the exact expected gold reward rises by > 0.05 (bandit, from
    0.467) and > 0.15 (sequence, from 0.257)."""
    algo, sets = CONFIGS[objective]
    res = resolve({"task": task, "algo": {"name": algo}}, {**SMALL, "steps": 30, "eval_every": 30, **sets})
    assert train(res, tmp_path, progress=False)["status"] == "done"
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    start, end = rows[0]["reward/exact"], rows[-1]["reward/exact"]
    assert start == pytest.approx(0.467 if task["name"] == "bandit" else 0.2574, abs=3e-3)
    assert end > start + (0.05 if task["name"] == "bandit" else 0.15), (objective, start, end)


@pytest.mark.parametrize("algo", ["kto", "simpo", "orpo"])
def test_cli_trains_and_a_study_lists_it(algo, tmp_path):
    """``workbench train --algo NAME`` runs, and a study file naming it validates."""
    from workbench.cli import main
    from workbench.studies.plan import load_study

    out = tmp_path / "run"
    sets = ["model.n_layer=1", "model.n_embd=16", "model.n_head=2", "eval_every=2", "save_checkpoint=false"]
    argv = ["train", "--task", "bandit", "--algo", algo, "--steps", "2", "--out", str(out), "--quiet"]
    assert main(argv + [a for s in sets for a in ("--set", s)]) == 0
    assert (out / "metrics.jsonl").exists()
    study = tmp_path / "s.toml"
    study.write_text(
        'name = "s"\ndescription = "d"\nclaims = ["C6"]\nseeds = [0]\nconfirm_seeds = [1]\n'
        '[[tasks]]\nname = "bandit"\n'
        f'[budget]\nsteps = 2\nbatch_size = 8\n[[algorithms]]\nname = "{algo}"\n'
    )
    assert [a.name for a in load_study(study).config.algorithms] == [algo]


@pytest.mark.parametrize("algo", ["kto", "simpo", "orpo"])
def test_stacked_runs_equal_separate_runs(algo, tmp_path):
    from test_seeds import assert_same_runs, stack

    from workbench.training import train_seeds

    reses = stack(algo, [{"seed": s} for s in (0, 1)])
    results = train_seeds(reses, [tmp_path / "batched" / str(i) for i in range(2)])
    assert_same_runs(reses, tmp_path / "batched", tmp_path / "alone", results)
