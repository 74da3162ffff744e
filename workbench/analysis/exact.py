"""Exact quantities by enumeration over every completion of every eval prompt.

For an enumerable task (A ** T completions per prompt, prompts ``x`` from
``task.eval_prompts()`` weighted uniformly):

    reward/exact            E_x sum_y pi(y|x) r(x, y)
    kl/exact                E_x KL(pi(.|x) || pi_ref(.|x))
    kl/exact_ref_to_policy  E_x KL(pi_ref(.|x) || pi(.|x))
    entropy/exact           E_x H(pi(.|x))
    objective/exact         reward/exact - beta kl/exact
    kl/exact_to_optimal     E_x KL(pi(.|x) || pi*(.|x)),  pi* = pi_ref exp(r / beta) / Z(x)

The log-probabilities of all completions come from A ** (T-1) prefixes in one batched
teacher-forced pass each: the last position's distribution scores all A continuations. A
policy with a native GPT-2 walks a KV-cached prefix tree instead (``Policy.completion_logprobs``).

Always in float32: ``exact_logprobs`` turns autocast off (``full_precision``), so a run with
``precision = "bf16"`` is measured exactly as its fp32 twin with the same weights would be.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..models.precision import full_precision


def exact_logprobs(policy, task, prompts: Tensor | None = None, chunk: int = 4096) -> Tensor:
    """``(P, A ** T)`` log pi(y | x) for every eval prompt and every completion (lexicographic order), in float32
    whatever the run's precision."""
    with full_precision(policy.device):  # exact truth is never autocast (workbench.models.precision)
        return _exact_logprobs(policy, task, task.eval_prompts() if prompts is None else prompts, chunk)


def _exact_logprobs(policy, task, prompts: Tensor, chunk: int) -> Tensor:
    if getattr(policy, "has_prefix_tree", False):  # native GPT-2: KV-cached prefix tree (Policy.completion_logprobs)
        return policy.completion_logprobs(prompts.to(policy.device), chunk)
    A, _T = task.n_actions, task.completion_len
    prefixes = task.all_completions()[::A, :]  # (A^(T-1), T): every prefix, last token 0 as a placeholder
    dev = policy.device
    prompts, prefixes = prompts.to(dev), prefixes.to(dev)
    out = []
    for p in prompts:
        rows = []
        for s in range(0, len(prefixes), chunk):
            c = prefixes[s : s + chunk]
            o = policy(p.expand(len(c), -1), c, values=False)
            head = o.logp[:, :-1].sum(-1, keepdim=True)  # log pi(y_<T-1)
            rows.append(head + o.logits[:, -1, :])  # (n, A): + log pi(y_T-1 | prefix)
        out.append(torch.cat(rows).reshape(-1))
    return torch.stack(out)  # (P, A^T)


def optimal_logprobs(ref_logp: Tensor, rewards: Tensor, beta: float) -> Tensor:
    """log pi*(y|x) = log pi_ref(y|x) + r(x,y)/beta - log Z(x); inputs and output ``(P, N)``."""
    logits = ref_logp + rewards / beta
    return logits - torch.logsumexp(logits, dim=-1, keepdim=True)


def kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) per row, from log-probabilities ``(P, N)`` -> ``(P,)``."""
    return (logp.exp() * (logp - logq)).sum(-1)


class ExactEvaluator:
    """Holds what does not change during a run (rewards, reference log-probs) and measures pi."""

    def __init__(self, task, ref_policy, beta: float, rewards: Tensor | None = None):
        self.task = task
        self.beta = beta
        self.prompts = task.eval_prompts()
        comps = task.all_completions()
        P, N = len(self.prompts), len(comps)
        if rewards is None:
            rewards = task.reward(self.prompts.repeat_interleave(N, 0), comps.repeat(P, 1)).view(P, N)
        self.rewards = rewards.float()  # (P, N)
        with torch.no_grad():
            self.ref_logp = exact_logprobs(ref_policy, task, self.prompts).cpu()  # (P, N)
        self.opt_logp = optimal_logprobs(self.ref_logp, self.rewards, beta) if beta > 0 else None

    @torch.no_grad()
    def measure(self, policy) -> dict[str, float]:
        logp = exact_logprobs(policy, self.task, self.prompts).cpu()
        p = logp.exp()
        reward = (p * self.rewards).sum(-1).mean().item()
        kl_ref = kl(logp, self.ref_logp).mean().item()
        out = {
            "reward/exact": reward,
            "kl/exact": kl_ref,
            "kl/exact_ref_to_policy": kl(self.ref_logp, logp).mean().item(),
            "entropy/exact": -(p * logp).sum(-1).mean().item(),
            "objective/exact": reward - self.beta * kl_ref,
        }
        if self.opt_logp is not None:
            out["kl/exact_to_optimal"] = kl(logp, self.opt_logp).mean().item()
        return out

    def optimum(self) -> dict[str, float]:
        """The same quantities for pi* itself: the ceiling of the regularised objective."""
        if self.opt_logp is None:
            return {}
        p = self.opt_logp.exp()
        r = (p * self.rewards).sum(-1).mean().item()
        k = kl(self.opt_logp, self.ref_logp).mean().item()
        return {"optimal/reward": r, "optimal/kl": k, "optimal/objective": r - self.beta * k}
