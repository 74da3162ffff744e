"""``arithmetic``: n-digit addition with an exact-match reward.

Prompt: the digits of a, ``+``, the digits of b, ``=`` (zero-padded, so every prompt has
2n + 2 tokens); completion: the n + 1 digits of a + b, zero-padded. Reward 1 for an exact
match, else 0; the process reward pays 1/(n+1) per correct digit (it sums to the fraction
of correct digits, not to the exact-match reward: a genuinely different, denser signal).
With n = 2 there are 10,000 prompts and 1,000 completions each; the task is treated as
not enumerable (``eval_prompts`` is a fixed sample, evaluated by sampling).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from .base import Task, TaskConfig

DIGITS = [str(d) for d in range(10)]


class ArithmeticConfig(TaskConfig):
    n_digits: int = Field(2, ge=1, le=6, description="n, digits per operand")
    n_eval_prompts: int = Field(64, ge=1, le=1_000_000, description="size of the fixed evaluation prompt set")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the evaluation prompt set")


class Arithmetic(Task):
    name = "arithmetic"
    Config = ArithmeticConfig
    process_is_split = False  # per-digit credit is a denser proxy of exact match

    @property
    def prompt_words(self) -> list[str]:
        return DIGITS + ["+", "="]

    @property
    def action_words(self) -> list[str]:
        return DIGITS

    @property
    def prompt_len(self) -> int:
        return 2 * self.cfg.n_digits + 2

    @property
    def completion_len(self) -> int:
        return self.cfg.n_digits + 1

    @property
    def enumerable(self) -> bool:
        return False

    def _digits(self, x: Tensor, n: int) -> Tensor:
        powers = 10 ** torch.arange(n - 1, -1, -1, device=x.device)
        return (x[:, None] // powers) % 10  # (B, n), most significant first

    def _number(self, digits: Tensor) -> Tensor:
        n = digits.shape[1]
        powers = 10 ** torch.arange(n - 1, -1, -1, device=digits.device)
        return (digits * powers).sum(dim=1)

    def sample_prompts(self, n: int, generator: torch.Generator) -> Tensor:
        hi = 10**self.cfg.n_digits
        a = torch.randint(0, hi, (n,), generator=generator)
        b = torch.randint(0, hi, (n,), generator=generator)
        plus, eq = torch.full((n, 1), 10), torch.full((n, 1), 11)
        return torch.cat([self._digits(a, self.cfg.n_digits), plus, self._digits(b, self.cfg.n_digits), eq], dim=1)

    def eval_prompts(self) -> Tensor:
        return self.sample_prompts(self.cfg.n_eval_prompts, torch.Generator().manual_seed(self.cfg.seed))

    def demonstrations(self, prompts: Tensor) -> Tensor:
        n = self.cfg.n_digits
        total = self._number(prompts[:, :n]) + self._number(prompts[:, n + 1 : 2 * n + 1])
        return self._digits(total, n + 1)

    def process_reward(self, prompts: Tensor, completions: Tensor) -> Tensor:
        return (completions == self.demonstrations(prompts)).float() / self.completion_len

    def reward(self, prompts: Tensor, completions: Tensor) -> Tensor:
        return (completions == self.demonstrations(prompts)).all(dim=1).float()
