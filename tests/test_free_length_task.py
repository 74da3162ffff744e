"""``digit_sum`` (issue 14): correct answers come in several lengths, so reward depends on correctness only."""

import json
import math
from collections import Counter

import pytest
import torch

from workbench.analysis.exact import ExactEvaluator, exact_logprobs
from workbench.config import resolve
from workbench.models.policy import build_policy
from workbench.registry import TASKS
from workbench.toy_tasks.digit_sum import DigitSum, DigitSumConfig
from workbench.training import train

CPU = torch.device("cpu")
SMALL = {"name": "digit_sum", "max_digit": 2, "max_len": 4, "max_target": 4}  # A = 3, 31 canonical completions


def task(**kw) -> DigitSum:
    return DigitSum(DigitSumConfig(**kw))


def digits(*ds, T=5, eos=3) -> list[int]:
    """The completion of the digits ``ds`` then EOS padding (defaults D = 3, T = 5: digit d is action d - 1)."""
    return [d - 1 for d in ds] + [eos] * (T - len(ds))


def test_registered_with_eos_always_on():
    t = task()
    assert TASKS["digit_sum"] is DigitSum
    assert t.action_words == ["1", "2", "3", "<end>"] and t.eos_action == 3
    assert t.prompt_words == [f"sum{s}" for s in range(1, 7)] and t.completion_len == 5
    assert t.n_completions == 1 + 3 + 9 + 27 + 81 + 243 and t.enumerable
    with pytest.raises(ValueError, match="max_target"):
        task(max_digit=2, max_len=3, max_target=5)  # 5 > 2 * (3 - 1): unreachable within max_len


def test_rewards_by_hand():
    t = task()
    s4 = torch.tensor([[3]])  # prompt "sum4"
    cases = [
        (digits(3, 1), 1.0, 3),  # short correct answer: 3 + 1 = 4, length 3 with its EOS
        (digits(2, 2), 1.0, 3),
        (digits(1, 1, 2), 1.0, 4),
        (digits(1, 1, 1, 1), 1.0, 5),  # long correct answer: the 4 digits and the EOS fill max_len
        ([2, 0, 3, 1, 1], 1.0, 3),  # padding after the EOS is ignored
        (digits(3), 0.0, 2),  # 3 != 4
        (digits(3, 3), 0.0, 3),  # 6 != 4
        (digits(), 0.0, 1),  # the empty answer sums to 0
        ([0, 0, 0, 0, 0], 0.0, 5),  # truncated (no EOS): never correct
    ]
    comps = torch.tensor([c for c, _, _ in cases])
    prompts = s4.expand(len(cases), -1)
    assert t.reward(prompts, comps).tolist() == [r for _, r, _ in cases]
    assert t.lengths(comps).tolist() == [n for _, _, n in cases]
    assert t.truncated(comps).tolist() == [False] * 8 + [True]
    # the process reward pays r at the EOS only
    pr = t.process_reward(prompts, comps)
    torch.testing.assert_close(pr.sum(1), t.reward(prompts, comps))
    assert pr[3].tolist() == [0.0, 0.0, 0.0, 0.0, 1.0] and pr[0].tolist() == [0.0, 0.0, 1.0, 0.0, 0.0]
    # partial credit: max(0, 1 - |sum - s| / s), 0 when truncated
    p = task(partial=True)
    assert p.reward(prompts, comps).tolist() == [1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.0, 0.0]
    assert p.reward(torch.tensor([[0]]), torch.tensor([digits(3, 3, 3, 3)])).item() == 0.0  # |12 - 1| > 1: clamped


def test_correct_answers_of_several_lengths():
    t = task()
    comps = t.all_completions()
    correct = t.reward(torch.tensor([[3]]).expand(len(comps), -1), comps) == 1  # s = 4
    # 4 = 3+1 = 1+3 = 2+2 (3 tokens), 1+1+2 in 3 orders (4 tokens), 1+1+1+1 (5 tokens)
    assert Counter(t.lengths(comps[correct]).tolist()) == {3: 3, 4: 3, 5: 1}
    for s in range(1, 7):  # every target has a correct answer; from s = 2 on, more than one length
        ok = t.reward(torch.tensor([[s - 1]]).expand(len(comps), -1), comps) == 1
        assert len(set(t.lengths(comps[ok]).tolist())) == min(s, 4) - math.ceil(s / 3) + 1


def test_demonstrations_are_the_shortest_correct_answer():
    t = task()
    p = t.eval_prompts()
    demo = t.demonstrations(p)
    assert demo.tolist() == [digits(1), digits(2), digits(3), digits(3, 1), digits(3, 2), digits(3, 3)]
    assert t.reward(p, demo).eq(1).all() and torch.equal(demo, t.canonical(demo))
    assert t.render(p[3], demo[3]) == "sum4 -> 3 1 <end>"
    comps = t.all_completions()
    for i, x in enumerate(p):
        ok = t.reward(x[None].expand(len(comps), -1), comps) == 1
        assert t.lengths(demo[i : i + 1]).item() == t.lengths(comps[ok]).min().item()


def test_preferences_rank_correct_answers_first():
    t = task(**{k: v for k, v in SMALL.items() if k != "name"})
    d = t.preferences(0, torch.Generator(), pairs="all", labels="sampled", temperature=0.0)
    rc, rr = t.reward(d.prompts, d.chosen), t.reward(d.prompts, d.rejected)
    assert len(d) == 4 * 31 * 30 // 2 and (rc >= rr).all()
    assert (rc > rr).any()


def test_exact_enumeration_equals_brute_force(tiny_model_cfg):
    t = task(**{k: v for k, v in SMALL.items() if k != "name"})
    pol = build_policy(t, tiny_model_cfg, 0, value_head=False, device=CPU)
    comps = t.all_completions()
    assert len(comps) == t.n_completions == 1 + 2 + 4 + 8 + 16
    with torch.no_grad():
        fast = exact_logprobs(pol, t, chunk=7)
        brute = torch.stack(
            [
                torch.stack([pol(x[None], c[None, : int(t.lengths(c[None])[0])]).logp.sum() for c in comps])
                for x in t.eval_prompts()
            ]
        )
    torch.testing.assert_close(fast, brute, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.exp().sum(-1), torch.ones(4), atol=1e-5, rtol=0)  # a distribution per prompt
    m = ExactEvaluator(t, pol, beta=0.1).measure(pol)
    P, N = 4, len(comps)
    r = t.reward(t.eval_prompts().repeat_interleave(N, 0), comps.repeat(P, 1)).view(P, N)
    p = brute.exp()
    assert m["reward/exact"] == pytest.approx((p * r).sum(-1).mean().item(), abs=1e-5)
    assert m["length/exact"] == pytest.approx((p * t.lengths(comps).float()).sum(-1).mean().item(), abs=1e-5)


def test_grpo_trains_with_length_metrics(tmp_path):
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
    res = resolve({"task": SMALL, "algo": {"name": "grpo"}}, sets)
    assert train(res, tmp_path / "run", progress=False)["status"] == "done"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "reward/mean" in r]
    assert len(train_rows) == 4
    for r in train_rows:
        assert 1 <= r["length/mean"] <= 4 and 0 <= r["length/truncated_frac"] <= 1
    assert all("length/exact" in r for r in rows if "reward/exact" in r)
    assert "optimal/length" in rows[0]
    assert all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))


def test_a_study_file_can_use_it(tmp_path):
    from workbench.studies import expand, load_study

    path = tmp_path / "free_length.toml"
    path.write_text(
        """
name = "free_length"
claims = ["C14"]
seeds = [0]

[[tasks]]
name = "digit_sum"
max_digit = 2
max_len = 4
max_target = 4

[[tasks]]
name = "digit_sum"
label = "partial"
partial = true

[budget]
steps = 2
batch_size = 16

[[algorithms]]
name = "grpo"

[[algorithms]]
name = "sft"
"""
    )
    plan = expand(load_study(path))
    assert len(plan) == 4 and all(isinstance(p.res.task, DigitSum) for p in plan)
    assert all(p.res.task.eos_action is not None for p in plan)
