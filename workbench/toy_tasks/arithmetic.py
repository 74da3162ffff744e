"""``arithmetic``: n-digit addition with an exact-match reward.

Prompt: the digits of a, ``+``, the digits of b, ``=`` (zero-padded, so every prompt has
2n + 2 tokens); completion: the n + 1 digits of a + b, zero-padded. Reward 1 for an exact
match, else 0; the process reward pays 1/(n+1) per correct digit (it sums to the fraction
of correct digits, not to the exact-match reward: a genuinely different, denser signal).
With n = 2 there are 10,000 prompts and 1,000 completions each; the task is treated as
not enumerable (``eval_prompts`` is a fixed sample, evaluated by sampling).

With ``eos = true`` the answer is a + b written without leading zeros (1 to n + 1 digits),
ended by the EOS action ``<end>`` (index 10); completions have max_len = n + 2 tokens. Reward
1 exactly when the answer (the tokens before the first EOS) is that number, else 0 (a
truncated completion, with no EOS, scores 0); the process reward pays m_l / max(k, l) per
digit, m_l = 1[a_l == d_l] for l < min(k, l), k the answer's length and l the sum's.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from .base import Task, TaskConfig, answer_matches

DIGITS = [str(d) for d in range(10)]


class ArithmeticConfig(TaskConfig):
    n_digits: int = Field(2, ge=1, le=6, description="n, digits per operand")
    n_eval_prompts: int = Field(64, ge=1, le=1_000_000, description="size of the fixed evaluation prompt set")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the evaluation prompt set")
    eos: bool = Field(False, description="answers without leading zeros, ended by an end-of-sequence action")


class Arithmetic(Task):
    name = "arithmetic"
    Config = ArithmeticConfig
    process_is_split = False  # per-digit credit is a denser proxy of exact match

    @property
    def prompt_words(self) -> list[str]:
        return DIGITS + ["+", "="]

    @property
    def action_words(self) -> list[str]:
        return DIGITS + (["<end>"] if self.cfg.eos else [])

    @property
    def eos_action(self) -> int | None:
        return 10 if self.cfg.eos else None

    @property
    def prompt_len(self) -> int:
        return 2 * self.cfg.n_digits + 2

    @property
    def completion_len(self) -> int:
        return self.cfg.n_digits + 2 if self.cfg.eos else self.cfg.n_digits + 1

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
        if self.cfg.eos:
            return self._answer(total)[0]
        return self._digits(total, n + 1)

    def _answer(self, total: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, n + 2)`` the digits of ``total`` without leading zeros, then EOS padding; and their count ``(B,)``."""
        n = self.cfg.n_digits
        digits = self._digits(total, n + 1)  # (B, n + 1) zero-padded
        length = (n + 1) - (digits[:, :-1] == 0).long().cumprod(1).sum(1)  # leading zeros dropped, "0" kept
        pos = torch.arange(n + 2, device=total.device)
        idx = (pos[None, :] + (n + 1 - length)[:, None]).clamp(max=n)
        out = torch.where(pos[None, :] < length[:, None], digits.gather(1, idx), self.eos_action)
        return out, length

    def process_reward(self, prompts: Tensor, completions: Tensor) -> Tensor:
        if self.cfg.eos:
            n = self.cfg.n_digits
            total = self._number(prompts[:, :n]) + self._number(prompts[:, n + 1 : 2 * n + 1])
            target, length = self._answer(total)
            m, denom = answer_matches(completions, self.eos_action, target, length)
            return m / denom[:, None]
        return (completions == self.demonstrations(prompts)).float() / self.completion_len

    def reward(self, prompts: Tensor, completions: Tensor) -> Tensor:
        if self.cfg.eos:  # the answer and its EOS, padding ignored
            mask = self.completion_mask(completions)
            return ((completions == self.demonstrations(prompts)).float() * mask).sum(1).eq(mask.sum(1)).float()
        return (completions == self.demonstrations(prompts)).all(dim=1).float()
