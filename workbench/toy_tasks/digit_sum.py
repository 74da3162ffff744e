"""``digit_sum``: emit digits that add up to a target, then stop; short and long answers are equally right.

The prompt names a target s in {1..S} (the word ``sum<s>``); the actions are the digits 1..D
(words ``"1"``..``"D"``, action index d - 1 for digit d) and the end-of-sequence action ``<end>``
(index D), always on: the point of the task is that *length is free*. A completion has
max_len = T tokens; its *answer* a is the tokens before the first EOS (every token after it is
padding, base module doc) and its *length* |y| is the counted tokens, the answer plus its EOS
(k + 1 for an answer of k digits; T for a truncated completion, one with no EOS). The answer is
*correct* when it ended (an EOS within the T tokens) and its digits sum to s:

    correct(x, y) = 1[y has an EOS] * 1[sum_l a_l == s]
    r(x, y)       = correct(x, y)                                    (default)
    r(x, y)       = 1[y has an EOS] * max(0, 1 - |sum_l a_l - s| / s)  (``partial = true``)

so the reward depends on the digits' sum only, never on how many there are: for s = 4 and
D = 3 the answers ``3 1``, ``2 2``, ``1 1 2`` and ``1 1 1 1`` (lengths 3, 3, 4 and 5 with their
EOS) all score 1. Answers of 1 to T - 1 digits can end within max_len, so every target must
satisfy s <= D (T - 1) (a configuration error otherwise). The process reward pays r at the last
counted token (the EOS), nothing elsewhere: its sum is r. Enumerable while the canonical
completions sum_{k<T} D^k + D^T stay under 100,000 (364 with the defaults D = 3, T = 5).

The demonstrations (SFT targets) are the *shortest* correct answer with its digits in
non-increasing order: floor(s / D) copies of D, then s mod D when it is not 0, then EOS
(``3 1 <end>`` for s = 4, D = 3).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from .base import Task, TaskConfig


class DigitSumConfig(TaskConfig):
    max_digit: int = Field(3, ge=1, le=9, description="D, the digits 1..D are the actions (plus <end>)")
    max_len: int = Field(5, ge=2, le=16, description="T, tokens per completion (answers of up to T - 1 digits)")
    max_target: int = Field(6, ge=1, description="S, the targets (one prompt each) are 1..S; S <= D (T - 1)")
    partial: bool = Field(False, description="partial credit max(0, 1 - |sum - s| / s) instead of exact match")


class DigitSum(Task):
    name = "digit_sum"
    Config = DigitSumConfig

    def __init__(self, cfg: DigitSumConfig):
        super().__init__(cfg)
        reachable = cfg.max_digit * (cfg.max_len - 1)
        if cfg.max_target > reachable:
            raise ValueError(
                f"max_target {cfg.max_target} must be <= max_digit * (max_len - 1) = {reachable}: "
                "every target needs an answer that ends within max_len"
            )

    @property
    def prompt_words(self) -> list[str]:
        return [f"sum{s}" for s in range(1, self.cfg.max_target + 1)]

    @property
    def action_words(self) -> list[str]:
        return [str(d) for d in range(1, self.cfg.max_digit + 1)] + ["<end>"]

    @property
    def eos_action(self) -> int:
        return self.cfg.max_digit

    @property
    def prompt_len(self) -> int:
        return 1

    @property
    def completion_len(self) -> int:
        return self.cfg.max_len

    def sample_prompts(self, n: int, generator: torch.Generator) -> Tensor:
        return torch.randint(0, self.cfg.max_target, (n, 1), generator=generator)

    def eval_prompts(self) -> Tensor:
        return torch.arange(self.cfg.max_target)[:, None]

    def targets(self, prompts: Tensor) -> Tensor:
        """``(B,)`` the target s of each prompt (prompt index s - 1)."""
        return prompts[:, 0] + 1

    def answer_sums(self, completions: Tensor) -> Tensor:
        """``(B,)`` the sum of the answer's digits (the tokens before the first EOS; all T when truncated)."""
        is_eos = (completions == self.eos_action).long()
        answer = (is_eos.cumsum(-1) == 0).long()
        return ((completions + 1) * answer).sum(-1)

    def reward(self, prompts: Tensor, completions: Tensor) -> Tensor:
        s = self.targets(prompts).to(completions.device)
        total = self.answer_sums(completions)
        ended = (~self.truncated(completions)).float()
        if self.cfg.partial:
            return ended * (1 - (total - s).abs().float() / s.float()).clamp(min=0)
        return ended * (total == s).float()

    def process_reward(self, prompts: Tensor, completions: Tensor) -> Tensor:
        out = torch.zeros(completions.shape, device=completions.device)
        rows = torch.arange(completions.shape[0], device=completions.device)
        out[rows, self.lengths(completions) - 1] = self.reward(prompts, completions)  # paid at the EOS
        return out

    def demonstrations(self, prompts: Tensor) -> Tensor:
        """The shortest correct answer, digits non-increasing: floor(s / D) D's, then s mod D if not 0, then EOS."""
        D = self.cfg.max_digit
        s = self.targets(prompts)
        q, rem = s // D, s % D
        pos = torch.arange(self.completion_len, device=prompts.device)[None, :]
        out = torch.full((len(s), self.completion_len), self.eos_action, dtype=torch.long, device=prompts.device)
        out = torch.where(pos < q[:, None], D - 1, out)
        return torch.where((pos == q[:, None]) & (rem[:, None] > 0), (rem - 1)[:, None], out)
