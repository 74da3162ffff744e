"""Pieces shared by the losses: masked reductions, loss aggregation, whitening, GAE.

Shapes: ``(B, T)`` per token, ``(B,)`` per sequence, ``B = prompts x G``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Aggregation = Literal["token_mean", "sequence_mean", "constant", "sequence_sum"]


def aggregate(per_token: Tensor, mask: Tensor, how: Aggregation, max_len: int | None = None) -> Tensor:
    """Reduce a ``(B, T)`` per-token loss to a scalar.

    token_mean:    sum_{i,t} l_it m_it / sum_{i,t} m_it          (DAPO / TRL "bnpo"/"dapo")
    sequence_mean: (1/B) sum_i [sum_t l_it m_it / sum_t m_it]    (GRPO paper / TRL "grpo")
    constant:      sum_{i,t} l_it m_it / (B * max_len)           (Dr. GRPO / TRL "dr_grpo")
    sequence_sum:  (1/B) sum_i sum_t l_it m_it                   (REINFORCE on log pi(y|x))
    """
    B, T = per_token.shape
    masked = per_token * mask
    if how == "token_mean":
        return masked.sum() / mask.sum().clamp(min=1.0)
    if how == "sequence_mean":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if how == "constant":
        return masked.sum() / (B * (max_len or T))
    if how == "sequence_sum":
        return masked.sum(-1).mean()
    raise ValueError(f"unknown aggregation {how!r}")


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over the masked entries (unbiased variance), as in TRL's ``masked_whiten``."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    var = var * n / (n - 1).clamp(min=1.0)
    out = (x - mean) * torch.rsqrt(var + eps)
    return out if shift_mean else out + mean


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over tokens (Schulman et al. 2016, arXiv 1506.02438).

        delta_t = r_t + gamma V(s_{t+1}) - V(s_t)        V(s_T) = 0 (the episode ends)
        A_t     = delta_t + gamma lam A_{t+1}
        R_t     = A_t + V(s_t)                           value targets

    rewards, values, mask: ``(B, T)``. Returns ``(advantages, returns)``, each ``(B, T)``.

    A mask with holes (observation tokens written by the environment inside an episode, ``tool_use``)
    is a multi-turn episode: the masked positions are no step of the agent, so ``gae_skipping`` steps
    from each counted token to the next counted one (s_{t+1} is the next state the policy acts in).
    """
    if bool((mask[:, 1:] > mask[:, :-1]).any()):  # a 0 followed by a 1 in some row
        return gae_skipping(rewards, values, mask, gamma, lam)
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    values = values * mask
    rewards = rewards * mask  # rewards on tokens that do not count carry nothing back (as returns_to_go)
    for t in reversed(range(T)):
        next_v = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]  # delta_t
        last = delta + gamma * lam * last  # A_t
        adv[:, t] = last
    adv = adv * mask
    return adv, adv + values


def gae_skipping(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """GAE over the counted tokens only: with n(t) the next counted position after t (none: the end),

        delta_t = r_t + gamma V(s_n(t)) - V(s_t),   A_t = delta_t + gamma lam A_n(t)      (m_t = 1)
        A_t = 0, R_t = 0                                                                    (m_t = 0)

    Rewards on masked positions are dropped, as in ``gae``. On a mask without holes it equals ``gae``.
    """
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)  # A at the next counted position
    next_v = torch.zeros_like(last)  # V at the next counted position
    values = values * mask
    rewards = rewards * mask
    for t in reversed(range(T)):
        m = mask[:, t] > 0
        delta = rewards[:, t] + gamma * next_v - values[:, t]  # delta_t
        a = delta + gamma * lam * last  # A_t
        adv[:, t] = torch.where(m, a, torch.zeros_like(a))
        last = torch.where(m, a, last)
        next_v = torch.where(m, values[:, t], next_v)
    return adv, adv + values


def group_view(x: Tensor, group_size: int) -> Tensor:
    """``(B,) -> (B / G, G)``; rows are the G completions of one prompt."""
    if x.shape[0] % group_size:
        raise ValueError(f"batch {x.shape[0]} is not a multiple of group size {group_size}")
    return x.view(-1, group_size)


def explained_variance(pred: Tensor, target: Tensor, mask: Tensor) -> float:
    var_t = masked_mean((target - masked_mean(target, mask)) ** 2, mask)
    var_r = masked_mean((target - pred - masked_mean(target - pred, mask)) ** 2, mask)
    return float(1 - var_r / var_t.clamp(min=1e-12))
