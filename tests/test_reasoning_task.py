"""``scratch_add`` (issue 15): scratch before the answer, reward on the answer only."""

import json
import math

import pytest
import torch

from workbench.config import resolve
from workbench.registry import TASKS
from workbench.toy_tasks.scratch_add import ScratchAdd, ScratchAddConfig
from workbench.training import train

E, S = 11, 10  # "<end>" and "=" action indices
P4738 = torch.tensor([[4, 7, 10, 3, 8]])  # "4 7 + 3 8": a + b = 85


def task(**kw) -> ScratchAdd:
    return ScratchAdd(ScratchAddConfig(**kw))


def row(*tokens, T=9) -> list[int]:
    return list(tokens) + [E] * (T - len(tokens))


def test_registered_and_shaped():
    t = task()
    assert TASKS["scratch_add"] is ScratchAdd
    assert t.action_words == [str(d) for d in range(10)] + ["=", "<end>"] and t.eos_action == E
    assert t.prompt_len == 5 and t.completion_len == 4 + 2 + 3 and not t.enumerable
    with pytest.raises(ValueError, match="max_scratch"):
        task(n_digits=3, max_scratch=5)  # worked demonstrations need 2n = 6 scratch tokens
    task(n_digits=3, max_scratch=0, demos="answer")  # answer-only needs no scratch


def test_verifier_by_hand():
    t = task()
    cases = [
        # (completion, reward, answer, scratch length)
        (row(S, 8, 5), 1.0, 85, 0),  # answer right after the start
        (row(5, 1, 8, 0, S, 8, 5), 1.0, 85, 4),  # worked scratch
        (row(1, 2, S, 8, 5), 1.0, 85, 2),  # any scratch: never rewarded, never penalised
        (row(S, 8, 4), 0.0, 84, 0),  # wrong answer
        (row(7, 7, 7, 7, S, 8, 4), 0.0, 84, 4),  # wrong answer after scratch
        (row(S, 0, 8, 5), 0.0, -1, 0),  # leading zero: not well-formed
        (row(8, 5), 0.0, -1, 2),  # no separator: the completion never left the scratch
        (row(8, 5, E, S, 8, 5), 0.0, -1, 2),  # the separator after the EOS does not count
        ([S, 8, 5, 8, 5, 8, 5, 8, 5], 0.0, -1, 0),  # no EOS within max_len (truncated)
        ([5, 1, 8, 0, S, 8, 5, 8, 5], 0.0, -1, 4),  # truncated after a worked scratch
        ([S, 8, 5, E, 3, S, 4, 0, 2], 1.0, 85, 0),  # padding after the EOS is ignored
        (row(S), 0.0, -1, 0),  # empty answer
        (row(S, 8, S, 5), 0.0, -1, 0),  # a second separator inside the answer
        (row(S, 1, 0, 8, 5), 0.0, -1, 0),  # more than n + 1 digits
    ]
    comps = torch.tensor([c for c, *_ in cases])
    prompts = P4738.expand(len(cases), -1)
    assert t.reward(prompts, comps).tolist() == [r for _, r, _, _ in cases]
    assert t.answer(comps).tolist() == [a for _, _, a, _ in cases]
    assert t.scratch_length(comps).tolist() == [k for *_, k in cases]
    assert t.process_reward(prompts, comps) is None
    zero = torch.tensor([[0, 0, 10, 0, 0]])  # 00 + 00 = 0: the answer "0" is well-formed
    assert t.reward(zero, torch.tensor([row(S, 0)])).item() == 1.0
    assert t.render(P4738[0], comps[1]) == "4 7 + 3 8 -> [5 1 8 0] = 8 5 <end>"
    assert t.render(P4738[0], comps[0]) == "4 7 + 3 8 -> [] = 8 5 <end>"


def test_worked_and_answer_demonstrations_score_one():
    worked, answer = task(n_digits=3, max_scratch=6), task(n_digits=3, max_scratch=6, demos="answer")
    # 9 5 7 + 0 6 8 = 1025: 7+8 = 15 (s0 5, c1 1), 5+6+1 = 12 (s1 2, c2 1), 9+0+1 = 10 (s2 0, c3 1)
    p = torch.tensor([[9, 5, 7, 10, 0, 6, 8]])
    assert worked.demonstrations(p).tolist() == [row(5, 1, 2, 1, 0, 1, S, 1, 0, 2, 5, T=12)]
    assert answer.demonstrations(p).tolist() == [row(S, 1, 0, 2, 5, T=12)]
    assert task().demonstrations(P4738).tolist() == [row(5, 1, 8, 0, S, 8, 5)]
    for t in (worked, answer, task(), task(n_digits=1, max_scratch=2, demos="answer")):
        prompts = t.sample_prompts(256, torch.Generator().manual_seed(0))
        demo = t.demonstrations(prompts)
        assert t.reward(prompts, demo).eq(1).all() and torch.equal(demo, t.canonical(demo))
        assert (t.answer(demo) == t.totals(prompts)).all()
        want = 2 * t.cfg.n_digits if t.cfg.demos == "worked" else 0
        assert t.scratch_length(demo).eq(want).all()
    # stripping the worked scratch gives the answer-only demonstration
    prompts = worked.sample_prompts(64, torch.Generator().manual_seed(1))
    assert torch.equal(worked.strip_scratch(worked.demonstrations(prompts)), answer.demonstrations(prompts))


def derive_from_scratch(t: ScratchAdd, completions: torch.Tensor) -> torch.Tensor:
    """A scripted policy's answer step: read s_0 c_1 ... s_{n-1} c_n from the scratch, write c_n s_{n-1} .. s_0."""
    n = t.cfg.n_digits
    scratch = completions[:, : 2 * n]
    value = scratch[:, -1] * 10**n + sum(scratch[:, 2 * i] * 10**i for i in range(n))
    ans, _ = t.answer_tokens(value)
    B = len(completions)
    out = torch.cat([scratch, torch.full((B, 1), S), ans], 1)
    return torch.cat([out, torch.full((B, t.completion_len - out.shape[1]), E)], 1)


def scripted_policy(t: ScratchAdd, prompts: torch.Tensor) -> torch.Tensor:
    """Write the carries and column digits in the scratch, then derive the answer from the scratch alone."""
    worked = t.worked_scratch(prompts)
    B = len(prompts)
    return derive_from_scratch(t, torch.cat([worked, torch.full((B, t.completion_len - worked.shape[1]), E)], 1))


def test_scripted_policy_needs_its_scratch():
    t = task(n_digits=3, max_scratch=6)
    g = torch.Generator().manual_seed(0)
    prompts = t.sample_prompts(512, g)
    own = scripted_policy(t, prompts)
    assert t.reward(prompts, own).mean().item() == 1.0
    corrupted = t.corrupt_scratch(own, g)
    # the corruption touches the scratch only: separator, answer and EOS kept
    assert torch.equal(corrupted[:, 6:], own[:, 6:]) and t.scratch_length(corrupted).eq(6).all()
    assert (corrupted[:, :6] != own[:, :6]).any(-1).float().mean() > 0.99
    assert t.reward(prompts, corrupted).mean().item() == 1.0  # the kept answer is still right ...
    ablated = t.reward(prompts, derive_from_scratch(t, corrupted)).mean().item()
    assert ablated < 0.05  # ... but the same procedure run on corrupted scratch answers wrongly
    # stripping: the answer moves to the start and still scores (scratch never rewarded)
    stripped = t.strip_scratch(own)
    assert t.scratch_length(stripped).eq(0).all() and t.reward(prompts, stripped).eq(1).all()


def test_corrupt_and_strip_rows_without_separator():
    t = task()
    comps = torch.tensor([row(8, 5), row(S, 8, 5), [1, 2, 3, 4, 5, 6, 7, 8, 9]])
    stripped = t.strip_scratch(comps)
    assert stripped.tolist() == [row(), row(S, 8, 5), row()]
    c = t.corrupt_scratch(comps, torch.Generator().manual_seed(0))
    assert c[0, 2:].tolist() == row()[2:] and c[1].tolist() == row(S, 8, 5) and (c[2] < 10).all()


def test_grpo_trains(tmp_path):
    sets = {
        "model.n_layer": 1,
        "model.n_embd": 16,
        "model.n_head": 2,
        "batch_size": 16,
        "group_size": 4,
        "steps": 3,
        "eval_every": 3,
        "save_checkpoint": False,
    }
    small = {"name": "scratch_add", "n_digits": 1, "max_scratch": 2, "n_eval_prompts": 8}
    res = resolve({"task": small, "algo": {"name": "grpo"}}, sets)
    assert train(res, tmp_path / "run", progress=False)["status"] == "done"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "reward/mean" in r]
    assert len(train_rows) == 3
    assert all(0 <= r["reward/mean"] <= 1 and 1 <= r["length/mean"] <= 6 for r in train_rows)
    assert all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))


@pytest.mark.parametrize("demos", ["worked", "answer"])
def test_sft_trains_on_either_demonstration(demos, tmp_path):
    sets = {"model.n_layer": 1, "model.n_embd": 16, "model.n_head": 2, "batch_size": 16, "steps": 2}
    sets |= {"eval_every": 2, "save_checkpoint": False}
    small = {"name": "scratch_add", "n_digits": 1, "max_scratch": 2, "demos": demos, "n_eval_prompts": 8}
    res = resolve({"task": small, "algo": {"name": "sft"}}, sets)
    assert train(res, tmp_path / "run", progress=False)["status"] == "done"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))


# -- the scratch-ablation evaluation (workbench.analysis.reasoning) -------------------------------


class HandPolicy:
    """A hand-written policy for teacher-forced scoring: pi(intended token) = 0.9, each other action 0.1 / 11.

    ``reads_scratch``: after the ``=`` it intends the answer derived from the scratch in the context
    (``derive_from_scratch``), in the scratch the worked solution; otherwise it intends the right answer
    after the first ``=`` whatever came before (it ignores its scratch)."""

    def __init__(self, t: ScratchAdd, reads_scratch: bool):
        self.t, self.reads = t, reads_scratch

    def __call__(self, prompts, comps, values=False):
        t, n, T = self.t, self.t.cfg.n_digits, comps.shape[1]
        if self.reads:
            intended = derive_from_scratch(t, comps)
            intended[:, : 2 * n] = t.worked_scratch(prompts)
        else:
            k = t.scratch_length(comps)
            target, _ = t.answer_target(prompts)
            pos = torch.arange(T)[None, :]
            ans = target.gather(1, (pos - k[:, None] - 1).clamp(0, target.shape[1] - 1))
            intended = torch.where(pos > k[:, None], ans, comps)
        logp = torch.where(comps == intended, math.log(0.9), math.log(0.1 / 11))
        return type("Out", (), {"logp": logp})


def test_with_answer_by_hand():
    from workbench.analysis.reasoning import with_answer

    t = task()
    scratch = torch.tensor([row(5, 1, 8, 0, S, 8, 5), row(1, 2, 3, 4, 5, 6, 7, 8, 9)])
    target, n_target = t.answer_target(torch.tensor([[4, 7, 10, 3, 8], [9, 9, 10, 9, 9]]))  # 85, 198
    assert target.tolist() == [[8, 5, E, E], [1, 9, 8, E]] and n_target.tolist() == [3, 4]
    comps, fits = with_answer(t, scratch, torch.tensor([2, 4]), target, n_target)
    assert comps.tolist() == [row(5, 1, S, 8, 5), [1, 2, 3, 4, S, 1, 9, 8, E]] and fits.tolist() == [True, True]
    comps, fits = with_answer(t, scratch, torch.tensor([0, 5]), target, n_target)
    assert comps[0].tolist() == row(S, 8, 5) and fits.tolist() == [True, False]  # 5 + 1 + 4 > 9: no room


def test_ablation_of_a_policy_that_reads_its_scratch():
    from workbench.analysis.reasoning import scratch_ablation

    t = task(n_digits=3, max_scratch=6)
    prompts = t.sample_prompts(256, torch.Generator().manual_seed(0))
    own = scripted_policy(t, prompts)  # what the scripted policy writes: worked scratch, derived answer
    _, n_target = t.answer_target(prompts)
    m = scratch_ablation(HandPolicy(t, True), t, prompts, own, torch.Generator().manual_seed(1))
    by_hand = (0.9 ** n_target.double()).mean().item()  # every answer token and the EOS intended: 0.9 each
    assert m["reasoning/accuracy"] == pytest.approx(by_hand, rel=1e-5)
    assert m["reasoning/answered"] == 1.0 and m["reasoning/scratch_length"] == 6.0
    assert m["reasoning/accuracy_corrupted"] < 0.05 * by_hand  # the answer derived from random digits is wrong
    assert m["reasoning/accuracy_stripped"] < 0.05 * by_hand
    assert m["reasoning/scratch_use"] == pytest.approx(by_hand - m["reasoning/accuracy_corrupted"])
    assert m["reasoning/scratch_use"] > 0.5


def test_ablation_of_a_policy_that_ignores_its_scratch():
    from workbench.analysis.reasoning import scratch_ablation

    t = task(n_digits=2, max_scratch=4)
    prompts = t.sample_prompts(128, torch.Generator().manual_seed(0))
    k = torch.arange(128) % 3  # scratch of 0, 1, 2 random digits, then the right answer; row 5: never answers
    comps = torch.randint(0, 10, (128, t.completion_len), generator=torch.Generator().manual_seed(2))
    target, n_target = t.answer_target(prompts)
    from workbench.analysis.reasoning import with_answer

    comps, _ = with_answer(t, comps, k, target, n_target)
    comps[5] = torch.tensor(row(1, 2, 3))  # no "=": not answered, counts 0
    m = scratch_ablation(HandPolicy(t, False), t, prompts, comps, torch.Generator().manual_seed(1))
    q = 0.9 ** n_target.double()
    q[5] = 0
    assert m["reasoning/accuracy"] == pytest.approx(q.mean().item(), rel=1e-5)
    assert m["reasoning/accuracy_corrupted"] == m["reasoning/accuracy"] == m["reasoning/accuracy_stripped"]
    assert m["reasoning/scratch_use"] == 0.0 and m["reasoning/answered"] == 127 / 128
    assert m["reasoning/scratch_length"] == pytest.approx((k.sum().item() - k[5].item() + 3) / 128)
