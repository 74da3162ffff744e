"""The KV-cached prefix tree with terminal EOS nodes (``Policy._expand_eos``) against the teacher-forced pass."""

import pytest
import torch

from workbench.analysis.exact import _canonical_logprobs, exact_logprobs
from workbench.models.policy import build_policy
from workbench.toy_tasks.arithmetic import Arithmetic, ArithmeticConfig
from workbench.toy_tasks.sequence import Sequence, SequenceConfig

CPU = torch.device("cpu")


class EosFirst(Sequence):
    """The sequence task with EOS as action 0: the terminal leaf comes first among its siblings."""

    @property
    def action_words(self) -> list[str]:
        return ["<end>"] + [f"s{v}" for v in range(self.cfg.vocab_size)]

    @property
    def eos_action(self) -> int | None:
        return 0


class SmallArithmetic(Arithmetic):
    """Arithmetic is never enumerated in runs; with one digit (1111 canonical completions) it can be here."""

    @property
    def enumerable(self) -> bool:
        return True


def _tasks():
    return {
        "sequence": Sequence(SequenceConfig(vocab_size=2, length=3, n_prompts=2, eos=True)),
        "arithmetic": SmallArithmetic(ArithmeticConfig(n_digits=1, n_eval_prompts=3, eos=True)),
        "eos_first": EosFirst(SequenceConfig(vocab_size=2, length=3, n_prompts=2, eos=True)),
    }


@pytest.mark.parametrize("name", ["sequence", "arithmetic", "eos_first"])
@pytest.mark.parametrize("chunk", [4096, 5])
def test_prefix_tree_with_eos_equals_the_teacher_forced_pass(tiny_model_cfg, name, chunk):
    task = _tasks()[name]
    native = tiny_model_cfg.model_copy(update={"impl": "native"})
    pol = build_policy(task, native, 0, value_head=False, device=CPU)
    assert pol.has_prefix_tree
    prompts = task.eval_prompts()
    with torch.no_grad():
        tree = pol.completion_logprobs(prompts, chunk=chunk)
        forced = _canonical_logprobs(pol, task, prompts, chunk=4096)
        picked = exact_logprobs(pol, task, chunk=chunk)  # exact.py picks the tree for a native model
    assert tree.dtype == torch.float32 and tree.shape == (len(prompts), task.n_completions)
    torch.testing.assert_close(tree, forced, atol=1e-5, rtol=0)  # same values in the order of all_completions
    assert torch.equal(picked, tree)
    torch.testing.assert_close(tree.exp().sum(-1), torch.ones(len(prompts)), atol=1e-5, rtol=0)


def test_prefix_tree_with_eos_is_differentiable(tiny_model_cfg):
    task = _tasks()["sequence"]
    native = tiny_model_cfg.model_copy(update={"impl": "native"})
    pol = build_policy(task, native, 0, value_head=False, device=CPU)
    prompts = task.eval_prompts()
    grads = []
    for fn in (lambda: pol.completion_logprobs(prompts), lambda: _canonical_logprobs(pol, task, prompts, 4096)):
        pol.zero_grad(set_to_none=True)
        logp = fn()
        (logp.exp() * torch.arange(logp.shape[1]).float()).sum().backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in pol.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_hf_model_keeps_the_teacher_forced_pass(tiny_model_cfg):
    task = _tasks()["sequence"]
    pol = build_policy(task, tiny_model_cfg.model_copy(update={"impl": "hf"}), 0, value_head=False, device=CPU)
    assert not pol.has_prefix_tree
    with torch.no_grad():
        assert torch.equal(exact_logprobs(pol, task), _canonical_logprobs(pol, task, task.eval_prompts(), 4096))
