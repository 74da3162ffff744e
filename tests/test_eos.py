"""Completions that end when the policy says so (issue 14): the EOS action, masks, exact truth with variable length."""

import itertools
import json
import math

import pytest
import torch

from workbench.analysis.credit import ExactCredit
from workbench.analysis.exact import ExactEvaluator, exact_logprobs, kl
from workbench.config import resolve
from workbench.core.ops import aggregate, gae
from workbench.models.native_gpt2 import NativeGPT2
from workbench.models.policy import Policy, build_policy
from workbench.runtime.rollout import rollout, rollout_stats
from workbench.toy_tasks.arithmetic import Arithmetic, ArithmeticConfig
from workbench.toy_tasks.sequence import Sequence, SequenceConfig
from workbench.training import train

CPU = torch.device("cpu")


def small_task(**kw) -> Sequence:
    return Sequence(SequenceConfig(vocab_size=2, length=3, n_prompts=2, eos=True, **kw))  # A = 3, max_len 4


def brute_force_logp(pol, task, prompt, comps) -> torch.Tensor:
    """log pi(y|x) of each canonical completion, scored on its counted tokens only (no padding fed at all)."""
    out = []
    with torch.no_grad():
        for c in comps:
            n = int(task.lengths(c[None])[0])
            out.append(pol(prompt[None], c[None, :n]).logp.sum())
    return torch.stack(out)


# -- the task API ---------------------------------------------------------------------------------------


def test_mask_lengths_truncation_and_canonical_padding():
    task = small_task()
    eos = task.eos_action
    assert task.action_words[eos] == "<end>" and task.completion_len == 4
    comps = torch.tensor([[0, eos, 1, 0], [eos, eos, eos, eos], [0, 1, 1, 0], [1, 0, 0, eos]])
    torch.testing.assert_close(
        task.completion_mask(comps),
        torch.tensor([[1.0, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]),
    )
    assert task.lengths(comps).tolist() == [2, 1, 4, 4]
    assert task.truncated(comps).tolist() == [False, False, True, False]
    assert task.canonical(comps)[0].tolist() == [0, eos, eos, eos]
    # without eos: all ones, nothing truncated, completions unchanged
    plain = Sequence(SequenceConfig(vocab_size=2, length=3))
    c = torch.tensor([[0, 1, 1]])
    assert plain.eos_action is None and plain.completion_mask(c).eq(1).all() and plain.canonical(c) is c


def test_canonical_enumeration_is_every_distinct_padded_completion():
    task = small_task()
    grid = torch.tensor(list(itertools.product(range(3), repeat=4)))
    distinct = torch.unique(task.canonical(grid), dim=0)  # sorted lexicographically, as all_completions
    assert torch.equal(task.all_completions(), distinct)
    assert task.n_completions == len(distinct) == 1 + 2 + 4 + 8 + 16


def test_sequence_reward_with_eos():
    task = small_task()
    eos, p = task.eos_action, task.eval_prompts()
    demo = task.demonstrations(p)
    assert task.reward(p, demo).eq(1).all() and not task.truncated(demo).any()
    t, n = task.targets[0], int(task.target_len[0])
    too_long = torch.cat([t[:n], torch.tensor([t[0]] * (4 - n))])[None]  # the target then junk, no EOS: truncated
    assert task.truncated(too_long).all()
    assert task.reward(p[:1], too_long).item() == pytest.approx(n / 4)  # matches / max(k, l)
    empty = torch.full((1, 4), eos)
    assert task.reward(p[:1], empty).item() == 0.0
    # the process reward is the per-step split of the outcome reward and pays nothing after the EOS
    comps = task.all_completions()
    pr = p[:1].expand(len(comps), -1)
    steps = task.process_reward(pr, comps)
    torch.testing.assert_close(steps.sum(-1), task.reward(pr, comps))
    assert (steps * (1 - task.completion_mask(comps))).eq(0).all()


def test_arithmetic_with_eos_answers_without_leading_zeros():
    task = Arithmetic(ArithmeticConfig(n_digits=2, eos=True))
    eos = task.eos_action
    prompts = torch.tensor([[0, 5, 10, 0, 4, 11], [9, 9, 10, 9, 9, 11], [0, 0, 10, 0, 0, 11]])  # 5+4, 99+99, 0+0
    demo = task.demonstrations(prompts)
    assert demo.tolist() == [[9, eos, eos, eos], [1, 9, 8, eos], [0, eos, eos, eos]]
    assert task.reward(prompts, demo).tolist() == [1.0, 1.0, 1.0]
    padded = torch.tensor([[0, 9, eos, eos]])  # the old zero-padded answer is wrong now
    assert task.reward(prompts[:1], padded).item() == 0.0
    assert task.reward(prompts[:1], torch.tensor([[9, eos, 3, 1]])).item() == 1.0  # padding is ignored


def test_a_study_can_set_eos_on_a_task():
    res = resolve({"task": {"name": "sequence", "eos": True}, "algo": {"name": "grpo"}}, {})
    assert res.task.eos_action is not None
    plain = resolve({"task": {"name": "sequence"}, "algo": {"name": "grpo"}}, {})
    explicit = resolve({"task": {"name": "sequence", "eos": False}, "algo": {"name": "grpo"}}, {})
    assert plain.config_hash == explicit.config_hash != res.config_hash  # old run ids unchanged


# -- sampling -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["hf", "native"])
def test_sampler_stops_at_eos_and_pads(tiny_model_cfg, impl):
    task = small_task()
    pol = build_policy(task, tiny_model_cfg.model_copy(update={"impl": impl}), 0, value_head=False, device=CPU)
    prompts = task.eval_prompts().repeat_interleave(256, 0)
    comps, logp = pol.sample(prompts, torch.Generator().manual_seed(0))
    mask = task.completion_mask(comps)
    assert torch.equal(comps, task.canonical(comps))  # padding is the EOS action
    assert (mask < 1).any() and task.truncated(comps).any()  # mixed lengths on this batch
    assert logp[mask == 0].eq(0).all()
    with torch.no_grad():
        forced = pol(prompts, comps).logp
    torch.testing.assert_close(logp * mask, forced * mask, atol=1e-5, rtol=0)


def test_stacked_sampler_stops_each_row_as_each_seed_alone(tiny_model_cfg):
    task = small_task()
    native = tiny_model_cfg.model_copy(update={"impl": "native"})
    singles = [build_policy(task, native, s, value_head=False, device=CPU) for s in (0, 1)]
    stacked = Policy(NativeGPT2.stack([p.model for p in singles]), singles[0].tokenizer, task)
    prompts = task.eval_prompts().repeat_interleave(64, 0)  # (B, Tp)
    comps, logp = stacked.sample(
        prompts.expand(2, -1, -1), [torch.Generator().manual_seed(s) for s in (7, 8)]
    )  # (S, B, T)
    for s, single in enumerate(singles):
        c, lp = single.sample(prompts, torch.Generator().manual_seed(7 + s))
        assert torch.equal(comps[s], c)
        torch.testing.assert_close(logp[s], lp, atol=1e-5, rtol=0)
    assert torch.equal(comps, task.canonical(comps.flatten(0, 1)).view_as(comps))
    assert (task.completion_mask(comps.flatten(0, 1)) < 1).any()


# -- exact truth ----------------------------------------------------------------------------------------


def test_exact_enumeration_with_eos_equals_brute_force(tiny_model_cfg):
    task = small_task()
    pol = build_policy(task, tiny_model_cfg, 0, value_head=False, device=CPU)
    ref = build_policy(task, tiny_model_cfg, 1, value_head=False, device=CPU)
    comps = task.all_completions()
    with torch.no_grad():
        fast = exact_logprobs(pol, task, chunk=7)
    brute = torch.stack([brute_force_logp(pol, task, p, comps) for p in task.eval_prompts()])
    ref_brute = torch.stack([brute_force_logp(ref, task, p, comps) for p in task.eval_prompts()])
    torch.testing.assert_close(fast, brute, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.exp().sum(-1), torch.ones(2), atol=1e-5, rtol=0)  # a distribution per prompt
    ev = ExactEvaluator(task, ref, beta=0.1)
    m = ev.measure(pol)
    P, N = len(task.eval_prompts()), len(comps)
    r = task.reward(task.eval_prompts().repeat_interleave(N, 0), comps.repeat(P, 1)).view(P, N)
    p = brute.exp()
    assert m["reward/exact"] == pytest.approx((p * r).sum(-1).mean().item(), abs=1e-5)
    assert m["kl/exact"] == pytest.approx(kl(brute, ref_brute).mean().item(), abs=1e-5)
    L = task.lengths(comps).float()
    assert m["length/exact"] == pytest.approx((p * L).sum(-1).mean().item(), abs=1e-5)
    correct = (r >= 1).float()
    assert m["length/exact_correct"] == pytest.approx(((p * correct * L).sum() / (p * correct).sum()).item(), abs=1e-5)
    assert "optimal/length" in ev.optimum()


def test_exact_length_equals_the_mean_sampled_length(tiny_model_cfg):
    task = small_task()
    pol = build_policy(task, tiny_model_cfg, 0, value_head=False, device=CPU)
    ev = ExactEvaluator(task, pol, beta=0.1)
    m = ev.measure(pol)
    n = 100_000
    prompts = task.eval_prompts().repeat(n // 2, 1)  # uniform over the eval prompts
    comps, _ = pol.sample(prompts, torch.Generator().manual_seed(1))
    lengths = task.lengths(comps).double()
    se = lengths.std().item() / math.sqrt(n)
    assert abs(lengths.mean().item() - m["length/exact"]) < 3 * se
    trunc = task.truncated(comps).double()
    assert abs(trunc.mean().item() - m["length/exact_truncated_frac"]) < 3 * trunc.std().item() / math.sqrt(n)
    reward = task.reward(prompts, comps).double()
    assert abs(reward.mean().item() - m["reward/exact"]) < 3 * reward.std().item() / math.sqrt(n)


def test_exact_credit_has_terminal_states(tiny_model_cfg):
    """Q(x, y_0) from the DP equals the direct conditional mean of the reward over the canonical completions,
    and every padding position carries no advantage."""
    task = small_task()
    pol = build_policy(task, tiny_model_cfg, 0, value_head=False, device=CPU)
    ev = ExactEvaluator(task, pol, beta=0.1)
    credit = ExactCredit(task, ev.ref_logp, beta=0.1)
    adv = credit.advantages(pol)
    comps = task.all_completions()
    logp = ev.ref_logp.double()  # pol is the reference here
    r = ev.rewards.double()
    for i, x in enumerate(task.eval_prompts()):
        v = (logp[i].exp() * r[i]).sum()
        for a in range(task.n_actions):
            sel = comps[:, 0] == a
            w = logp[i][sel].exp()
            q = (w * r[i][sel]).sum() / w.sum()
            got = credit.at(adv, x[None], comps[sel][:1])[0, 0]
            assert got.item() == pytest.approx((q - v).item(), abs=1e-6)
        at = credit.at(adv, x[None].expand(len(comps), -1), comps)  # (N, T)
        assert at[task.completion_mask(comps) == 0].abs().max() < 1e-9  # padding: terminal states, A = 0
        # at the EOS, Q is the reward of the completion: the episode ends there
        ends = comps[:, 0] == task.eos_action
        q_end = v + at[ends, 0]
        assert q_end.item() == pytest.approx(r[i][ends].item(), abs=1e-6)


# -- masks in the losses --------------------------------------------------------------------------------


def _rollout(res, pol, ref, comps, prompts):
    pol.sample = lambda p, g, t=1.0: (comps, None)  # the rollout of exactly these completions
    try:
        return rollout(res, pol, ref, None, prompts, None, res.run.group_size)
    finally:
        del pol.sample


def _loss_and_grad(pol, fn):
    pol.zero_grad(set_to_none=True)
    loss, per_token, stats = fn()
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in pol.parameters() if p.grad is not None])
    return loss.detach(), per_token.detach(), stats, grads


@pytest.mark.parametrize("algo", ["grpo", "ppo", "reinforce", "rloo"])
def test_padding_never_leaks_into_online_losses(algo):
    sets = {"model.n_layer": 1, "model.n_embd": 16, "model.n_head": 2, "batch_size": 8, "group_size": 4}
    res = resolve(
        {"task": {"name": "sequence", "vocab_size": 2, "length": 3, "eos": True}, "algo": {"name": algo}}, sets
    )
    task, spec, acfg = res.task, res.spec, res.algo_cfg
    pol = build_policy(task, res.run.model, 0, value_head=spec.value_head(acfg), device=CPU)
    ref = pol.frozen_copy()
    with torch.no_grad():  # move the policy off the reference so ratios and KL terms are not trivial
        for p in pol.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    eos = task.eos_action
    prompts = torch.tensor([[0], [0], [0], [0], [1], [1], [1], [1]])
    comps = torch.tensor(
        [[0, eos, eos, eos], [1, 0, eos, eos], [0, 1, 1, 0], [eos, eos, eos, eos]]
        + [[1, eos, eos, eos], [0, 1, eos, eos], [1, 1, 0, eos], [0, 0, eos, eos]]
    )
    junk = torch.where(task.completion_mask(comps) > 0, comps, torch.tensor([[1, 0, 1, 0]]))  # padding changed
    assert not torch.equal(junk, comps)
    results = []
    for c in (comps, junk):
        roll, _ = _rollout(res, pol, ref, c, prompts)
        with torch.no_grad():
            batch = spec.prepare(roll, acfg, res.run.beta)
        loss, per_token, stats, grads = _loss_and_grad(
            pol, lambda c=c, b=batch: spec.loss(pol(prompts, c), b, acfg, 0.1)
        )
        stats.update(rollout_stats(roll, batch))
        results.append((loss, per_token, stats, grads))
    (l0, pt0, s0, g0), (l1, pt1, s1, g1) = results
    torch.testing.assert_close(l0, l1, atol=1e-6, rtol=0)
    torch.testing.assert_close(pt0, pt1, atol=1e-6, rtol=0)
    torch.testing.assert_close(g0, g1, atol=1e-6, rtol=0)
    assert s0.keys() == s1.keys() and "length/mean" in s0
    for k in s0:
        assert s0[k] == pytest.approx(s1[k], abs=1e-6), k


@pytest.mark.parametrize("algo", ["sft", "dpo"])
def test_padding_never_leaks_into_offline_losses(algo):
    sets = {"model.n_layer": 1, "model.n_embd": 16, "model.n_head": 2}
    res = resolve(
        {"task": {"name": "sequence", "vocab_size": 2, "length": 3, "eos": True}, "algo": {"name": algo}}, sets
    )
    task, spec, acfg = res.task, res.spec, res.algo_cfg
    pol = build_policy(task, res.run.model, 0, value_head=False, device=CPU)
    ref = pol.frozen_copy()
    with torch.no_grad():
        for p in pol.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    data = spec.dataset(task, acfg, torch.Generator().manual_seed(0))
    batch = {k: v[:32] for k, v in data.items()}
    keys = ["completions"] if algo == "sft" else ["chosen", "rejected"]
    assert any(bool((task.completion_mask(batch[k]) < 1).any()) for k in keys)  # some padding to change

    def scramble(b):
        out = dict(b)
        for k in keys:
            noise = torch.randint(0, task.n_actions, b[k].shape, generator=torch.Generator().manual_seed(3))
            out[k] = torch.where(task.completion_mask(b[k]) > 0, b[k], noise)
        return out

    junk = scramble(batch)
    assert any(not torch.equal(junk[k], batch[k]) for k in keys)
    results = [
        _loss_and_grad(pol, lambda b=b: spec.loss(spec.forward(pol, ref, b), b, acfg, 0.1)) for b in (batch, junk)
    ]
    (l0, _, s0, g0), (l1, _, s1, g1) = results
    torch.testing.assert_close(l0, l1, atol=1e-6, rtol=0)
    torch.testing.assert_close(g0, g1, atol=1e-6, rtol=0)
    for k in s0:
        assert s0[k] == pytest.approx(s1[k], abs=1e-6), k


def test_aggregations_differ_on_mixed_lengths():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0]])
    got = {how: aggregate(per_token, mask, how).item() for how in ("sequence_mean", "token_mean", "constant")}
    assert got["token_mean"] == pytest.approx(21 / 6)
    assert got["sequence_mean"] == pytest.approx((10 / 4 + 11 / 2) / 2)
    assert got["constant"] == pytest.approx(21 / 8)
    assert len({round(v, 6) for v in got.values()}) == 3


def test_gae_stops_at_eos():
    """T = 3, EOS at t = 1: the padding step's reward and value carry nothing back."""
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[0.0, 1.0, 5.0]])  # 5 on the padding step must not count
    values = torch.tensor([[0.5, 0.2, 9.0]])  # nor V = 9 after the end
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma, lam)
    a1 = 1.0 - 0.2  # delta_1 = r_1 + gamma * 0 - V(s_1): the episode ends at the EOS
    a0 = (0.0 + gamma * 0.2 - 0.5) + gamma * lam * a1
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 0.5, a1 + 0.2, 0.0]]))


# -- a run ----------------------------------------------------------------------------------------------


def test_grpo_trains_on_sequence_with_eos(tmp_path):
    sets = {
        "model.n_layer": 1,
        "model.n_embd": 16,
        "model.n_head": 2,
        "batch_size": 16,
        "group_size": 4,
        "steps": 4,
        "eval_every": 2,
        "save_checkpoint": False,
    }
    res = resolve(
        {"task": {"name": "sequence", "vocab_size": 2, "length": 3, "eos": True}, "algo": {"name": "grpo"}}, sets
    )
    assert train(res, tmp_path / "run", progress=False)["status"] == "done"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "reward/mean" in r]
    assert len(train_rows) == 4
    for r in train_rows:
        assert 1 <= r["length/mean"] <= 4 and 0 <= r["length/truncated_frac"] <= 1
    assert all("length/exact" in r for r in rows if "reward/exact" in r)
    assert "optimal/length" in rows[0]
    assert all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))


def test_reinforce_baseline_averages_the_rows_still_generating():
    from workbench.algorithms import reinforce
    from workbench.core.types import Rollout

    zeros = torch.zeros(2, 3)
    roll = Rollout(
        prompts=torch.zeros(2, 1, dtype=torch.long),
        completions=torch.zeros(2, 3, dtype=torch.long),
        mask=torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]),
        old_logp=zeros,
        ref_logp=zeros,
        scores=torch.tensor([1.0, 3.0]),
        step_rewards=torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 3.0]]),
        gold=torch.tensor([1.0, 3.0]),
        group_size=2,
    )
    for baseline in ("mean", "group_mean"):
        batch = reinforce.prepare(roll, reinforce.ReinforceConfig(baseline=baseline), 0.0)
        # G = [[1, 1, 0], [3, 3, 3]]; b = [2, 2, 3]: at t = 2 only the second row is still generating
        torch.testing.assert_close(batch.advantages, torch.tensor([[-1.0, -1.0, 0.0], [1.0, 1.0, 0.0]]))


def test_stacked_seeds_with_eos_match_single_runs(tmp_path):
    from workbench.training.run import train_seeds

    sets = {
        "model.n_layer": 1,
        "model.n_embd": 16,
        "model.n_head": 2,
        "model.impl": "native",
        "batch_size": 16,
        "group_size": 4,
        "steps": 2,
        "eval_every": 2,
        "save_checkpoint": False,
    }
    task = {"name": "sequence", "vocab_size": 2, "length": 3, "eos": True}
    reses = [resolve({"task": task, "algo": {"name": "ppo"}}, {**sets, "seed": s}) for s in (0, 1)]
    train_seeds(reses, [tmp_path / "s0", tmp_path / "s1"])
    for s, r in enumerate(reses):
        train(r, tmp_path / f"single{s}", progress=False)
        stacked, single = (
            [json.loads(x) for x in (tmp_path / f"{d}{s}" / "metrics.jsonl").read_text().splitlines()]
            for d in ("s", "single")
        )
        assert len(stacked) == len(single) == 3
        for a, b in zip(stacked, single, strict=True):
            assert a.keys() == b.keys()
            for k in a:
                if not k.startswith("time/"):
                    assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (k, a["step"])
        assert "length/mean" in stacked[0] and "length/exact" in stacked[0]


def test_the_trl_backend_refuses_eos_for_the_reward_model_only():
    """The policy trainers pad as TRL does (tests/test_trl_backend.py); its reward model reads fixed lengths."""
    pytest.importorskip("trl")
    from workbench.core.errors import ConfigError

    task = {"name": "sequence", "eos": True}
    with pytest.raises(ConfigError, match="task.eos"):
        resolve({"task": task, "algo": {"name": "rm"}}, {"backend": "trl", "algo.labels": "sampled"})
    assert resolve({"task": task, "algo": {"name": "grpo"}}, {"backend": "trl"}).task.eos_action is not None


def test_credit_needs_a_small_full_grid():
    from workbench.analysis.credit import credit_supported

    big = Sequence(SequenceConfig(vocab_size=4, length=7, eos=True))  # 87,381 canonical, 5 ** 8 on the grid
    assert big.enumerable and not credit_supported(big)
    assert credit_supported(small_task()) and credit_supported(Sequence(SequenceConfig(vocab_size=4, length=8)))


def test_a_study_file_can_set_eos(tmp_path):
    from workbench.studies import expand, load_study

    path = tmp_path / "eos.toml"
    path.write_text(
        """
name = "eos"
claims = ["C6"]
seeds = [0]

[[tasks]]
name = "sequence"
eos = true

[[tasks]]
name = "arithmetic"
label = "arith"
eos = true

[budget]
steps = 2
batch_size = 16

[[algorithms]]
name = "grpo"
"""
    )
    plan = expand(load_study(path))
    assert len(plan) == 2 and all(p.res.task.eos_action is not None for p in plan)


def test_render_leaves_the_padding_out():
    task = small_task()
    eos = task.eos_action
    assert task.render(torch.tensor([1]), torch.tensor([0, eos, eos, eos])) == "p1 -> s0 <end>"
    assert task.render(torch.tensor([0]), torch.tensor([0, 1, 1, 0])) == "p0 -> s0 s1 s1 s0"


@pytest.mark.parametrize("length", [12, 23, 24])
def test_an_exact_answer_scores_exactly_one(length):
    """sum_l m_l / max(k, l) summed in float32 fell just below 1 for some target lengths, so exact answers
    counted as incorrect in length/correct_mean and length/exact_correct; the reward divides once."""
    res = resolve(
        {
            "task": {"name": "sequence", "vocab_size": 3, "length": length, "n_prompts": 64, "eos": True},
            "algo": {"name": "grpo"},
        },
        {},
    )
    task = res.task
    prompts = task.eval_prompts()
    assert (task.reward(prompts, task.demonstrations(prompts)) == 1.0).all()
