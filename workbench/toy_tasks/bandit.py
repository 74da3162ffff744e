"""``bandit``: one-token completions over K arms, optionally under several contexts.

Prompt: one context token ``c<i>``; completion: one arm token ``a<k>``; reward
``R[i, k]`` in [0, 1] from a table fixed by ``reward_shape`` and ``seed``:

- ``linear``:   R[i, k] = k / (K - 1)
- ``peak``:     R[i, k] = exp(-(k - m_i)^2 / (2 w^2)), m_i a seeded arm per context
- ``far_peak``: one arm (the last) pays 1, the rest ``base``
- ``random``:   R[i, k] ~ U(0, 1), seeded
- ``gaussian``: R[i, k] = exp(-((k - c) / w)^2), c = ``peak_centre`` and w = ``peak_width`` in
  arms, given explicitly (c defaults to the middle arm (K - 1) / 2). The same c for every
  context: the contexts then differ only in their tokens, so a run's per-context results are
  replicates of one bandit (``peak`` gives each context its own seeded centre instead).

``prior = "low_arms"`` fits the initial (reference) policy to pi_ref(k) ∝ exp(-k / prior_scale)
before training: its mass sits on the first arms, far from a ``far_peak`` at the last arm
(the setting where offline DPO and online methods part, claim C12). ``prior = "gaussian"``
fits it to pi_ref(k) ∝ exp(-((k - c_ref) / s)^2), c_ref = ``prior_centre`` (default the middle
arm) and s = ``prior_spread`` in arms, the same in every context: with a ``gaussian`` reward,
the distance |c - c_ref| between the reward's peak and the reference's mass, in arms, is a
parameter of the run. Both priors are targets of ``models.policy.fit_prior`` (300 Adam steps),
so the actual pi_ref approximates them; the exact metrics use the fitted pi_ref.

The completion space is K per context, so everything is enumerable and
pi*(k | i) = pi_ref(k | i) exp(R[i, k] / beta) / Z(i) is exact.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from .base import Task, TaskConfig


class BanditConfig(TaskConfig):
    n_arms: int = Field(8, ge=2, le=4096, description="K, the number of arms (one token each)")
    n_contexts: int = Field(1, ge=1, le=1024, description="number of distinct prompts (contexts)")
    reward_shape: Literal["linear", "peak", "far_peak", "random", "gaussian"] = Field(
        "random", description="reward table shape"
    )
    peak_width: float = Field(1.0, gt=0, description="w for the 'peak' and 'gaussian' shapes, in arms")
    peak_centre: float | None = Field(
        None, description="c for the 'gaussian' shape, in arms, the same in every context; None: (K - 1) / 2"
    )
    base: float = Field(0.2, description="reward of the non-peak arms for 'far_peak'")
    prior: Literal["none", "low_arms", "gaussian"] = Field(
        "none", description="shape of the reference policy: random init, mass on the first arms, or a Gaussian bump"
    )
    prior_scale: float = Field(1.0, gt=0, description="'low_arms': pi_ref(k) ∝ exp(-k / prior_scale)")
    prior_centre: float | None = Field(
        None, description="'gaussian': c_ref of pi_ref(k) ∝ exp(-((k - c_ref) / s)^2), in arms; None: (K - 1) / 2"
    )
    prior_spread: float = Field(1.0, gt=0, description="'gaussian': s of the reference prior, in arms")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the reward table (not of training)")


class Bandit(Task):
    name = "bandit"
    Config = BanditConfig

    def __init__(self, cfg: BanditConfig):
        super().__init__(cfg)
        g = torch.Generator().manual_seed(cfg.seed)
        K, C = cfg.n_arms, cfg.n_contexts
        k = torch.arange(K, dtype=torch.float32)
        if cfg.reward_shape == "linear":
            table = (k / (K - 1)).expand(C, K).clone()
        elif cfg.reward_shape == "peak":
            centers = torch.randint(0, K, (C, 1), generator=g).float()
            table = torch.exp(-((k - centers) ** 2) / (2 * cfg.peak_width**2))
        elif cfg.reward_shape == "gaussian":
            c = (K - 1) / 2 if cfg.peak_centre is None else cfg.peak_centre
            table = torch.exp(-(((k - c) / cfg.peak_width) ** 2)).expand(C, K).clone()
        elif cfg.reward_shape == "far_peak":
            table = torch.full((C, K), cfg.base)
            table[:, -1] = 1.0
        else:
            table = torch.rand(C, K, generator=g)
        self.table = table  # (C, K)

    @property
    def prompt_words(self) -> list[str]:
        return [f"c{i}" for i in range(self.cfg.n_contexts)]

    @property
    def action_words(self) -> list[str]:
        return [f"a{k}" for k in range(self.cfg.n_arms)]

    @property
    def prompt_len(self) -> int:
        return 1

    @property
    def completion_len(self) -> int:
        return 1

    def reference_prior(self) -> Tensor | None:
        if self.cfg.prior == "none":
            return None
        k = torch.arange(self.cfg.n_arms, dtype=torch.float32)
        if self.cfg.prior == "gaussian":
            c = (self.cfg.n_arms - 1) / 2 if self.cfg.prior_centre is None else self.cfg.prior_centre
            logits = (-(((k - c) / self.cfg.prior_spread) ** 2)).expand(self.cfg.n_contexts, -1)
            return torch.log_softmax(logits, dim=-1)
        logits = (-k / self.cfg.prior_scale).expand(self.cfg.n_contexts, -1)
        return torch.log_softmax(logits, dim=-1)

    def sample_prompts(self, n: int, generator: torch.Generator) -> Tensor:
        return torch.randint(0, self.cfg.n_contexts, (n, 1), generator=generator)

    def eval_prompts(self) -> Tensor:
        return torch.arange(self.cfg.n_contexts)[:, None]

    def reward(self, prompts: Tensor, completions: Tensor) -> Tensor:
        return self.table[prompts[:, 0].cpu(), completions[:, 0].cpu()].to(completions.device)

    def process_reward(self, prompts: Tensor, completions: Tensor) -> Tensor:
        return self.reward(prompts, completions)[:, None]

    def demonstrations(self, prompts: Tensor) -> Tensor:
        return self.table.argmax(dim=1)[prompts[:, 0].cpu()][:, None].to(prompts.device)
