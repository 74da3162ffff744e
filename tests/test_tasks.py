"""Generic tests every registered task must pass, plus each task's own facts."""

import itertools
import math

import pytest
import torch

from workbench.registry import TASKS
from workbench.toy_tasks.arithmetic import Arithmetic, ArithmeticConfig
from workbench.toy_tasks.bandit import Bandit, BanditConfig
from workbench.toy_tasks.sequence import Sequence, SequenceConfig

VARIANTS = {
    "bandit": [
        {},
        {"reward_shape": "far_peak", "n_contexts": 3},
        {"reward_shape": "peak"},
        {"reward_shape": "linear"},
        {"reward_shape": "gaussian", "peak_centre": 6.5, "peak_width": 2.0, "prior": "gaussian", "n_contexts": 2},
    ],
    "sequence": [{}, {"variant": "process"}, {"variant": "decisive", "decisive_position": 2}, {"threshold": 3}],
    "arithmetic": [{}, {"n_digits": 1}],
    "digit_sum": [{}, {"partial": True}, {"max_digit": 2, "max_len": 4, "max_target": 4}],
    "scratch_add": [{}, {"demos": "answer", "max_scratch": 0}, {"n_digits": 3, "max_scratch": 8}],
    "tool_use": [{}, {"n_keys": 2, "n_values": 4, "call_cost": 0.0}, {"max_calls": 2}],
}
CASES = [(name, kw) for name in TASKS for kw in VARIANTS.get(name, [{}])]


def make(name, kw):
    cls = TASKS[name]
    return cls(cls.Config(**kw))


def test_every_task_has_variants_listed():
    assert set(VARIANTS) == set(TASKS)


@pytest.mark.parametrize("name,kw", CASES)
def test_task_contract(name, kw):
    task = make(name, kw)
    g = torch.Generator().manual_seed(0)
    prompts = task.sample_prompts(32, g)
    assert prompts.shape == (32, task.prompt_len) and prompts.dtype == torch.long
    assert prompts.min() >= 0 and prompts.max() < len(task.prompt_words)
    comps = task.random_completions(32, g)
    r = task.reward(prompts, comps)
    assert r.shape == (32,) and torch.isfinite(r).all()
    pr = task.process_reward(prompts, comps)
    if pr is not None:
        assert pr.shape == (32, task.completion_len)
        if task.process_is_split:
            torch.testing.assert_close(pr.sum(1), r)
    # demonstrations are at least as good as any sampled completion
    demo = task.demonstrations(prompts)
    assert demo.shape == comps.shape
    assert (task.reward(prompts, demo) >= r - 1e-6).all()
    # the prompt stream is seeded
    again = task.sample_prompts(32, torch.Generator().manual_seed(0))
    assert torch.equal(again, prompts)
    # vocabulary: prompt and action words are in it, no duplicates
    assert len(set(task.vocab)) == len(task.vocab)
    assert set(task.prompt_words) | set(task.action_words) == set(task.vocab)
    assert "->" in task.render(prompts[0], comps[0])


@pytest.mark.parametrize("name,kw", [c for c in CASES if make(*c).enumerable])
def test_enumeration_is_complete_and_ordered(name, kw):
    task = make(name, kw)
    comps = task.all_completions()
    if task.eos_action is not None:  # the canonical completions: every distinct padded one (tests/test_eos.py)
        assert torch.equal(comps, torch.unique(task.canonical(task.full_grid()), dim=0))
        assert comps.shape == (task.n_completions, task.completion_len)
        return
    assert comps.shape == (task.n_actions**task.completion_len, task.completion_len)
    assert len({tuple(c) for c in comps.tolist()}) == len(comps)
    assert comps.tolist() == [list(t) for t in itertools.product(range(task.n_actions), repeat=task.completion_len)]


@pytest.mark.parametrize("name,kw", CASES)
def test_preferences_follow_bradley_terry(name, kw):
    task = make(name, kw)
    g = torch.Generator().manual_seed(1)
    soft = task.preferences(256, g, pairs="random", labels="soft")
    rc, rr = task.reward(soft.prompts, soft.chosen), task.reward(soft.prompts, soft.rejected)
    assert (rc >= rr).all()  # soft labels name the more likely winner as chosen
    torch.testing.assert_close(soft.p_chosen, torch.sigmoid(rc - rr))
    hard = task.preferences(256, g, pairs="random", labels="sampled", temperature=0.0)
    rc, rr = task.reward(hard.prompts, hard.chosen), task.reward(hard.prompts, hard.rejected)
    assert (rc >= rr).all() and (hard.p_chosen == 1).all()  # noiseless labels never invert


def test_noisy_labels_invert_some_pairs_at_the_bt_rate():
    task = Bandit(BanditConfig(n_arms=2, reward_shape="linear"))  # r = 0 or 1
    g = torch.Generator().manual_seed(0)
    d = task.preferences(20000, g, pairs="random", labels="sampled", temperature=1.0)
    differ = (d.chosen != d.rejected).squeeze(1)
    wrong = (task.reward(d.prompts, d.chosen) < task.reward(d.prompts, d.rejected))[differ].float().mean().item()
    expected = 1 - torch.sigmoid(torch.tensor(1.0)).item()  # P(the worse arm wins) = 1 - sigmoid(1) = 0.2689
    assert abs(wrong - expected) < 0.02


def test_all_pairs_with_coverage():
    task = Bandit(BanditConfig(n_arms=8, n_contexts=2))
    d = task.preferences(0, torch.Generator(), pairs="all", labels="soft")
    assert len(d) == 2 * 28
    d = task.preferences(0, torch.Generator(), pairs="all", labels="soft", coverage=0.5)
    assert len(d) == 2 * 6 and d.chosen.max() < 4 and d.rejected.max() < 4


def test_bandit_shapes():
    far = Bandit(BanditConfig(n_arms=5, reward_shape="far_peak", base=0.2))
    assert far.table[0].tolist() == pytest.approx([0.2, 0.2, 0.2, 0.2, 1.0])
    lin = Bandit(BanditConfig(n_arms=5, reward_shape="linear"))
    assert lin.table[0].tolist() == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    assert Bandit(BanditConfig(seed=3)).table.tolist() == Bandit(BanditConfig(seed=3)).table.tolist()


def test_bandit_gaussian_reward_and_prior_have_explicit_centre_and_width():
    """R[i, k] = exp(-((k - c) / w)^2) and pi_ref(k) ∝ exp(-((k - c_ref) / s)^2), the same in every context."""
    cfg = BanditConfig(n_arms=6, n_contexts=3, reward_shape="gaussian", peak_centre=4.0, peak_width=2.0)
    task = Bandit(cfg.model_copy(update={"prior": "gaussian", "prior_centre": 1.0, "prior_spread": 0.5}))
    want = [math.exp(-(((k - 4.0) / 2.0) ** 2)) for k in range(6)]
    assert task.table.shape == (3, 6) and all(row == pytest.approx(want) for row in task.table.tolist())
    logits = torch.tensor([-(((k - 1.0) / 0.5) ** 2) for k in range(6)])
    assert torch.allclose(task.reference_prior(), torch.log_softmax(logits, -1).expand(3, 6))
    middle = Bandit(BanditConfig(n_arms=5, reward_shape="gaussian", prior="gaussian"))  # c = c_ref = (K - 1) / 2
    assert middle.table[0].argmax().item() == 2 and middle.table[0, 1].item() == pytest.approx(math.exp(-1))
    assert middle.reference_prior()[0].argmax().item() == 2
    assert Bandit(BanditConfig(prior="low_arms")).reference_prior()[0].argmax().item() == 0  # unchanged


def test_sequence_rewards_by_hand():
    task = Sequence(SequenceConfig(vocab_size=3, length=4, n_prompts=1))
    t = task.targets[0]
    comp = t.clone()
    comp[1] = (t[1] + 1) % 3  # one mistake at position 1
    p = torch.zeros(1, 1, dtype=torch.long)
    assert task.reward(p, comp[None]).item() == pytest.approx(0.75)
    assert task.process_reward(p, comp[None])[0].tolist() == pytest.approx([0.25, 0.0, 0.25, 0.25])
    dec = Sequence(SequenceConfig(vocab_size=3, length=4, n_prompts=1, variant="decisive", decisive_position=1))
    assert dec.reward(p, comp[None]).item() == 0.0  # the decisive position is wrong
    assert dec.reward(p, t[None]).item() == 1.0
    thr = Sequence(SequenceConfig(vocab_size=3, length=4, n_prompts=1, threshold=4))
    assert thr.reward(p, comp[None]).item() == 0.0 and thr.reward(p, t[None]).item() == 1.0
    assert Sequence(SequenceConfig(variant="process")).dense_reward and not task.dense_reward


def test_arithmetic_by_hand():
    task = Arithmetic(ArithmeticConfig(n_digits=2))
    # 47 + 38 = 085 ; prompt: 4 7 + 3 8 =
    prompt = torch.tensor([[4, 7, 10, 3, 8, 11]])
    assert task.demonstrations(prompt).tolist() == [[0, 8, 5]]
    assert task.reward(prompt, torch.tensor([[0, 8, 5]])).item() == 1.0
    assert task.reward(prompt, torch.tensor([[0, 8, 4]])).item() == 0.0
    assert task.process_reward(prompt, torch.tensor([[0, 8, 4]]))[0].tolist() == pytest.approx([1 / 3, 1 / 3, 0.0])
    assert task.render(prompt[0], torch.tensor([0, 8, 5])) == "4 7 + 3 8 = -> 0 8 5"
    assert not task.enumerable
