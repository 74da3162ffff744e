"""The scratch-ablation evaluation (issue 15, claim C10): does the policy's answer depend on its scratch?

For a task with a scratch before its answer (``Task.sep_action`` set: ``scratch_add``), at every
measurement the policy samples one completion y_i per evaluation prompt x_i (temperature 1, from a
stream of its own, ``workbench.core.seeds.scratch_ablation``). Let z_i be its scratch (the tokens
before its first ``=``), k_i = |z_i| its length, h_i = 1 when y_i reaches an ``=`` before its first
``<end>`` (it answered) and a*_i the right answer's tokens followed by ``<end>``. The reward is 1
exactly when the tokens after the ``=`` are a*_i, so given a context c (prompt, scratch, ``=``)

    q(c) = pi(a*_i | c) = prod_j pi(a*_ij | c, a*_i<j)      (0 when a*_i does not fit in max_len)

is the probability that the policy answers right from c: one teacher-forced pass, no answer
sampling. The metrics, means over the P evaluation prompts:

    reasoning/accuracy            (1/P) sum_i h_i q(x_i, z_i, =)          E[r]: the same expectation as
                                                                           reward/eval, the answer's draw
                                                                           integrated out
    reasoning/accuracy_corrupted  (1/P) sum_i h_i q(x_i, z~_i, =)         z~_i: z_i with every token replaced
                                                                           by a uniform random digit, same length
    reasoning/accuracy_stripped   (1/P) sum_i h_i q(x_i, =)               the scratch removed
    reasoning/scratch_use         accuracy - accuracy_corrupted           > 0: the answer reads the scratch
    reasoning/scratch_length      (1/P) sum_i k_i                         (no ``=``: tokens before ``<end>``)
    reasoning/answered            (1/P) sum_i h_i

The ablations keep h_i: they change the scratch's content (corrupted) or drop it (stripped) and
re-score the same answer step, so a drop from ``accuracy`` is due to the scratch alone. Corrupting
keeps the scratch's length and position (what a policy that only counts tokens would still see);
stripping also moves the answer to the start. A policy that ignores its scratch has scratch_use 0
up to sampling noise of z~; one that derives its answer from the scratch (``tests/test_reasoning_task.py``'s
scripted policy) loses what random digits cannot give.

A measurement never changes training: it draws from its own generators and runs at fixed
parameters in float32 (``full_precision``), as ``workbench.analysis.evaluate`` does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import Resolved
from ..core import seeds
from ..models.precision import full_precision
from ..runtime.context import Measure


def with_answer(task, scratch: Tensor, k: Tensor, target: Tensor, n_target: Tensor) -> tuple[Tensor, Tensor]:
    """``(B, T)`` completions ``z[:k] = a*`` (EOS padding after) and ``(B,)`` whether a* fits in max_len.

    scratch: ``(B, T)`` whose first k tokens are the scratch; k: ``(B,)``; target: ``(B, L)`` a* then EOS
    padding; n_target: ``(B,)`` tokens of a* (its EOS included).
    """
    B, T = scratch.shape
    L = target.shape[1]
    pos = torch.arange(T, device=scratch.device)[None, :]  # (1, T)
    ans = target.gather(1, (pos - k[:, None] - 1).clamp(0, L - 1))  # (B, T) a* from position k + 1
    out = torch.where(pos < k[:, None], scratch, torch.where(pos == k[:, None], task.sep_action, ans))
    out = torch.where(pos > k[:, None] + n_target[:, None], task.eos_action, out)
    return out, k + 1 + n_target <= T


def answer_probability(policy, task, prompts: Tensor, scratch: Tensor, k: Tensor) -> Tensor:
    """``(B,)`` q = pi(a* | x, z[:k], =): the probability that the policy answers right after this scratch."""
    target, n_target = task.answer_target(prompts)  # (B, L), (B,)
    comps, fits = with_answer(task, scratch, k, target.to(scratch.device), n_target.to(scratch.device))
    logp = policy(prompts, comps, values=False).logp  # (B, T)
    pos = torch.arange(comps.shape[1], device=comps.device)[None, :]
    on_answer = (pos > k[:, None]) & (pos <= k[:, None] + n_target[:, None])  # (B, T) a*'s tokens, EOS included
    q = torch.where(on_answer, logp, 0.0).sum(-1).exp()
    return torch.where(fits, q, 0.0)


@torch.no_grad()
def scratch_ablation(policy, task, prompts: Tensor, completions: Tensor, generator: torch.Generator) -> dict:
    """The ``reasoning/*`` metrics (module doc) of ``completions`` ``(B, T)``, the policy's samples for ``prompts``;
    ``generator`` (CPU) draws the corrupted scratch."""
    T = completions.shape[1]
    k = task.scratch_length(completions)  # (B,)
    at_k = completions.gather(1, k.clamp(max=T - 1)[:, None])[:, 0]
    answered = ((k < T) & (at_k == task.sep_action)).float()  # (B,) h: an "=" before the first EOS
    acc = (answered * answer_probability(policy, task, prompts, completions, k)).mean().item()
    corrupted = task.corrupt_scratch(completions, generator)
    acc_corrupted = (answered * answer_probability(policy, task, prompts, corrupted, k)).mean().item()
    acc_stripped = (answered * answer_probability(policy, task, prompts, completions, torch.zeros_like(k))).mean()
    return {
        "reasoning/accuracy": acc,
        "reasoning/accuracy_corrupted": acc_corrupted,
        "reasoning/accuracy_stripped": acc_stripped.item(),
        "reasoning/scratch_use": acc - acc_corrupted,
        "reasoning/scratch_length": k.float().mean().item(),
        "reasoning/answered": answered.mean().item(),
    }


class ScratchAblation(Measure):
    """``scratch_ablation`` on the evaluation prompts every ``eval_every`` steps and at the last."""

    def __init__(self, res: Resolved, device):
        self.res, self.device = res, device
        self.prompts = res.task.eval_prompts().to(device)
        self.gen = seeds.scratch_ablation(res.run.seed, device)  # the samples
        self.noise = seeds.scratch_ablation(res.run.seed + 1)  # the corrupted scratch (CPU), another stream

    def due(self, step: int, last: bool) -> bool:
        return step % self.res.run.eval_every == 0 or last

    @torch.no_grad()
    def __call__(self, model, step: int, row: dict) -> dict:
        with full_precision(self.device):
            comps, _ = model.sample(self.prompts, self.gen)
            return scratch_ablation(model, self.res.task, self.prompts, comps, self.noise)
