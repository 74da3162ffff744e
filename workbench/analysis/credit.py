"""Credit assignment against the exact per-token advantage (claim C4).

On an enumerable task, for each prompt x and the current policy pi, with per-step rewards
R_t(x, y) (the task's process reward when the run trains on it, else the outcome reward
paid at the last token: what the training loop feeds the methods) and optionally the KL
reward of PPO/REINFORCE, -beta log(pi(y_t|s_t) / pi_ref(y_t|s_t)):

    V(s_T)        = 0                                     s_t = x + y_<t
    Q(s_t, a)     = E[R_t | s_t, a] + V(s_t + a)
    V(s_t)        = sum_a pi(a | s_t) Q(s_t, a)
    A(s_t, a)     = Q(s_t, a) - V(s_t)

computed backwards over the prefix tree (dynamic programming). pi(a | s_t) comes from the
enumerated sequence log-probs by marginalising the later tokens:
log P(y_<=t) = logsumexp over y_>t of log pi(y|x), log pi(y_t | y_<t) = log P(y_<=t) - log P(y_<t).
Arrays are kept as ``(P, A, ..., A)`` tensors, one axis per position, in float64.

With an end-of-sequence action the states after a completion's first EOS are terminal. The
DP runs on the full grid of A ** T token sequences, where the policy's probability of a grid
row is pi(canonical row) x (1/A) per padding position: the padding is drawn uniformly and
pays nothing, so V = 0 after the EOS, Q(s_t, EOS) = E[R_t | s_t, EOS] (the episode ends) and
the advantage of any padding token is 0. An observation position (``tool_use``) is drawn the same
way: ``task.canonical`` writes the environment's token over any grid token there, so its
advantage is 0 too. A sampled (canonical) completion is read at its
own row of the grid (``completion_index``). Needs A ** T <= 100,000.

Each method's per-token advantages (``spec.prepare(rollout).advantages``, ``(B, T)``:
PPO's GAE with its critic, GRPO's and RLOO's per-sequence constants, REINFORCE's
returns minus baseline) are compared with A(s_t, y_t) at the sampled tokens:

    corr            Pearson correlation over all sampled tokens
    mse             mean of (A_method - A_exact)^2 over tokens (on the method's own scale)
    decisive_share  sum_{t in D} |A_method| / sum_t |A_method|, D = the decisive positions:
                    those where changing y_t alone can change the task reward
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.stats import pearson
from ..toy_tasks.base import MAX_ENUMERABLE
from .exact import exact_logprobs


def step_rewards_all(task, prompts: Tensor, comps: Tensor, dense: bool) -> Tensor:
    """``(P, N, T)`` the per-step reward the training loop pays (see ``train.score``, gold reward)."""
    P, N = len(prompts), len(comps)
    pr, cr = prompts.repeat_interleave(N, 0), comps.repeat(P, 1)
    if dense:
        r = task.process_reward(pr, cr).float()
    else:
        r = torch.zeros(cr.shape)
        r[torch.arange(len(cr)), task.last_action(cr)] = task.reward(pr, cr).float()  # at the last own token
    return r.view(P, N, -1)


def _marginals(L: Tensor, T: int) -> list[Tensor]:
    """log P(y_<=t) for t = -1..T-1 from the joint ``L (P, A, ..., A)``; entry t+1 has t+1 position axes."""
    out = [L]
    for _ in range(T):
        out.append(torch.logsumexp(out[-1], dim=-1))
    return out[::-1]  # [log P() (P,), log P(y_0) (P, A), ..., log P(y) (P, A,...,A)]


def conditional_logprobs(logp: Tensor, A: int, T: int) -> Tensor:
    """``(P, N, T)`` log pi(y_t | x, y_<t) for every completion, from the sequence log-probs ``(P, N)``."""
    P = logp.shape[0]
    M = _marginals(logp.double().view(P, *[A] * T), T)
    cols = []
    for t in range(T):
        c = M[t + 1] - M[t][..., None]  # (P, A^(t+1)) as t+1 axes
        cols.append(c.reshape(P, *[A] * (t + 1), *[1] * (T - t - 1)).expand(P, *[A] * T).reshape(P, -1))
    return torch.stack(cols, dim=-1)


def exact_advantages(
    logp: Tensor, step_rewards: Tensor, A: int, T: int, ref_logp: Tensor | None = None, beta: float = 0.0
) -> dict[str, Tensor]:
    """Exact Q, V and A = Q - V at every position of every completion, each ``(P, N, T)`` (float64).

    ``logp (P, N)``: log pi(y|x) of every completion (lexicographic order, ``task.all_completions``);
    ``step_rewards (P, N, T)``: R_t(x, y); with ``ref_logp (P, N)`` and ``beta > 0`` the per-step
    KL reward -beta log(pi(y_t|s_t)/pi_ref(y_t|s_t)) is added (soft Q and V).
    """
    P = logp.shape[0]
    shape = (P, *[A] * T)
    L = logp.double().view(shape)
    M = _marginals(L, T)
    cond = conditional_logprobs(logp, A, T)  # (P, N, T) log pi(y_t | s_t)
    per_step = step_rewards.double()  # R_t, (P, N, T)
    if ref_logp is not None and beta > 0:
        per_step = per_step - beta * (cond - conditional_logprobs(ref_logp, A, T))  # - beta log(pi/pi_ref)
    q_full, v_full = [None] * T, [None] * T
    V_next = None  # V(s_{t+1}) as a tensor over y_<=t, (P, A^(t+1)) in t+1 axes
    for t in reversed(range(T)):
        # E[R_t | y_<=t] = sum_{y_>t} P(y_>t | y_<=t) R_t(y)
        w = (L - M[t + 1].reshape(P, *[A] * (t + 1), *[1] * (T - t - 1))).exp()  # P(y_>t | y_<=t)
        Rt = per_step[..., t].view(shape)
        ER = torch.nan_to_num(w * Rt).sum(dim=tuple(range(t + 2, T + 1))) if t < T - 1 else Rt
        Q = ER if V_next is None else ER + V_next  # (P, A^(t+1)) in t+1 axes
        pi_t = (M[t + 1] - M[t][..., None]).exp()  # pi(y_t | y_<t)
        V = torch.nan_to_num(pi_t * Q).sum(-1)  # (P, A^t) in t axes
        q_full[t] = Q.reshape(P, *[A] * (t + 1), *[1] * (T - t - 1)).expand(shape).reshape(P, -1)
        v_full[t] = V.reshape(P, *[A] * t, *[1] * (T - t)).expand(shape).reshape(P, -1)
        V_next = V
    q, v = torch.stack(q_full, -1), torch.stack(v_full, -1)
    return {"q": q, "v": v, "adv": q - v, "cond_logp": cond}


# -- comparison with the methods' advantages ----------------------------------------------------


def decisive_positions(task, rewards: Tensor) -> Tensor:
    """``(T,)`` bool: positions where changing y_t alone changes the reward for some prompt and completion.

    ``rewards (P, N)``: the task's outcome reward of every completion of every eval prompt.
    """
    A, T = task.n_actions, task.completion_len
    R = rewards.double().view(len(rewards), *[A] * T)
    return torch.tensor([bool((R - R.mean(dim=t + 1, keepdim=True)).abs().max() > 1e-9) for t in range(T)])


def completion_index(comps: Tensor, A: int) -> Tensor:
    """``(B,)`` row of each completion ``(B, T)`` in ``task.all_completions()`` (lexicographic)."""
    T = comps.shape[1]
    powers = A ** torch.arange(T - 1, -1, -1, device=comps.device)
    return (comps * powers).sum(-1)


def prompt_index(prompts: Tensor, eval_prompts: Tensor) -> Tensor:
    """``(B,)`` row of each prompt in ``eval_prompts``; every prompt must be one of them."""
    eq = (prompts[:, None, :].cpu() == eval_prompts[None, :, :].cpu()).all(-1)  # (B, P)
    if not eq.any(1).all():
        raise ValueError(
            "a sampled prompt is not among the eval prompts: exact credit needs the whole prompt distribution"
        )
    return eq.float().argmax(1)


def compare(
    method_adv: Tensor, exact_adv: Tensor, mask: Tensor, decisive: Tensor
) -> tuple[dict[str, float], list[dict]]:
    """Method vs exact advantages at the sampled tokens, each ``(B, T)``.

    Returns the summary ``{corr, mse, decisive_share, decisive_share_exact}`` and one row per
    position (the heatmap data): mean |A| of each, their mean, correlation, MSE and share of
    the total |A| mass at that position.
    """
    m, e = method_adv.double().cpu(), exact_adv.double().cpu()
    mask = mask.double().cpu()
    sel = mask > 0
    d = decisive.to(torch.bool).cpu()

    def share(x: Tensor) -> Tensor:  # (T,) share of sum |A| per position
        mass = (x.abs() * mask).sum(0)
        return mass / mass.sum() if mass.sum() > 0 else torch.full_like(mass, math.nan)

    sm, se = share(m), share(e)
    summary = {
        "corr": pearson(m[sel], e[sel]),
        "mse": (((m - e) ** 2) * mask).sum().item() / mask.sum().clamp(min=1).item(),
        "decisive_share": sm[d].sum().item(),
        "decisive_share_exact": se[d].sum().item(),
    }
    rows = []
    for t in range(m.shape[1]):
        k = sel[:, t]
        rows.append(
            {
                "position": t,
                "decisive": bool(d[t]),
                "method_abs": m[k, t].abs().mean().item(),
                "exact_abs": e[k, t].abs().mean().item(),
                "method_mean": m[k, t].mean().item(),
                "exact_mean": e[k, t].mean().item(),
                "corr": pearson(m[k, t], e[k, t]),
                "mse": ((m[k, t] - e[k, t]) ** 2).mean().item(),
                "share": sm[t].item(),
                "share_exact": se[t].item(),
            }
        )
    return summary, rows


def credit_supported(task) -> bool:
    """Whether ``ExactCredit`` can run on an enumerable task: always without EOS; with EOS while A ** T <= 100,000."""
    return task.eos_action is None or task.n_actions**task.completion_len <= MAX_ENUMERABLE


class ExactCredit:
    """Holds what does not change during a run (rewards, reference log-probs, decisive positions).

    ``advantages(policy, kl_reward)`` gives the exact A ``(P, N, T)`` under the current policy;
    ``at(adv, prompts, comps)`` reads it at sampled tokens ``(B, T)``.
    """

    def __init__(self, task, ref_logp: Tensor, beta: float, dense: bool | None = None):
        self.task, self.beta = task, beta
        self.prompts = task.eval_prompts()
        comps = task.all_completions()
        self.grid = None  # with EOS: (index into all_completions, padding count) of every row of the full grid
        if task.eos_action is not None:
            A, T = task.n_actions, task.completion_len
            if not credit_supported(task):
                raise ValueError(f"exact credit with EOS walks the full grid: A ** T = {A**T} > {MAX_ENUMERABLE}")
            full = task.canonical(task.full_grid())
            idx = torch.searchsorted(completion_index(comps, A), completion_index(full, A))
            self.grid = (idx, (T - task.action_mask(full).sum(-1)).double())  # padding and observations: 1/A each
            comps = full
            ref_logp = self.on_grid(ref_logp)
        self.dense = task.dense_reward if dense is None else dense
        self.step_rewards = step_rewards_all(task, self.prompts, comps, self.dense)  # (P, N, T)
        P, N = len(self.prompts), len(comps)
        gold = task.reward(self.prompts.repeat_interleave(N, 0), comps.repeat(P, 1)).view(P, N)
        self.decisive = decisive_positions(task, gold)
        self.ref_logp = ref_logp.cpu()

    def on_grid(self, logp: Tensor) -> Tensor:
        """log pi over the canonical completions ``(P, N)`` -> over the full grid ``(P, A ** T)`` (tasks with EOS):
        log pi(canonical row) - (padding count) log A."""
        if self.grid is None:
            return logp
        idx, pad = self.grid
        return logp.double()[:, idx] - pad * math.log(self.task.n_actions)

    @torch.no_grad()
    def advantages(self, policy, kl_reward: bool = False, logp: Tensor | None = None) -> Tensor:
        logp = exact_logprobs(policy, self.task, self.prompts).cpu() if logp is None else logp
        logp = self.on_grid(logp)
        A, T = self.task.n_actions, self.task.completion_len
        ref = self.ref_logp if kl_reward else None
        return exact_advantages(logp, self.step_rewards, A, T, ref, self.beta)["adv"]

    def at(self, adv: Tensor, prompts: Tensor, comps: Tensor) -> Tensor:
        rows = prompt_index(prompts, self.prompts)
        cols = completion_index(comps.cpu(), self.task.n_actions)
        return adv[rows, cols]  # (B, T)


def kl_in_reward(spec, cfg, beta: float) -> bool:
    """Whether a method's advantages carry the KL penalty (declared by its spec: ``kl_in="reward"``, beta > 0)."""
    return beta > 0 and spec.kl_in_reward(cfg)
