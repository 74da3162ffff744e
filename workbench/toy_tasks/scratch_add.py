"""``scratch_add``: n-digit addition where the policy may write scratch tokens before its answer (issue 15).

Prompt: the digits of a, ``+``, the digits of b (zero-padded, most significant first: 2n + 1 tokens).
Actions: the digits ``0``..``9`` (indices 0..9, the *scratch tokens* and the answer digits), the separator
``=`` (index 10) and the end-of-sequence action ``<end>`` (index 11). A completion has max_len
T = S + n + 3 tokens, S = ``max_scratch``, and reads

    y = scratch  =  answer  <end>  padding        scratch: any digits (0..S of them, more are allowed
                                                   while the whole still fits in T), answer: digits

The *scratch* is the tokens before the first ``=``; the *answer* is the tokens after that ``=`` and before
the first EOS. The *scratch length* is the number of scratch tokens (0 when the completion starts with
``=``); a completion with no ``=`` among its counted tokens never left the scratch, and its scratch length
is its answer-less length (the tokens before its first EOS; T when truncated). The answer is
*well-formed* when the ``=`` comes before the first EOS, it has 1 to n + 1 tokens, all digits, and no
leading zero (``0`` alone is the number 0); ``answer(y)`` is its value, -1 when not well-formed. The
reward is answer correctness only, the scratch is never rewarded:

    r(x, y) = 1[answer(y) == a + b]        (0 when there is no ``=`` or no EOS within max_len)

There is no process reward. The task is declared not enumerable (12 actions over T = 9 tokens by default,
and 10^(2n) prompts): ``eval_prompts`` is a fixed sample, evaluated by sampling.

Demonstrations (the SFT references of study C10), chosen by ``demos``:

- ``"answer"``: ``= answer <end>`` (no scratch: the answer right after the start);
- ``"worked"``: a worked solution, then the answer. With a_i, b_i the i-th digits from the right
  (i = 0 the units) and c_0 = 0, column i writes its sum digit and its carry out,

      t_i = a_i + b_i + c_i,    s_i = t_i mod 10,    c_{i+1} = floor(t_i / 10)
      scratch = s_0 c_1 s_1 c_2 ... s_{n-1} c_n              (2n tokens, units first)

  and the answer is c_n s_{n-1} ... s_0 without leading zeros: every token of it is copied from the
  scratch, so a policy that writes the carries only has local steps to take (``47 + 38``:
  ``5 1 8 0 = 8 5 <end>``). ``max_scratch`` must be at least 2n with worked demonstrations.

The base policy (``pretrain_steps``, ``workbench.training.pretrain``) is pretrained on ``pretraining_text``:
``scratch = answer <end>`` with a random scratch of 0..S digits and an answer drawn uniformly from the range of
a + b independently of the prompt, so it learns the format and nothing about the sum.

For the scratch-ablation evaluation (``workbench.analysis.reasoning``; ``answer_target``: the right answer's
tokens): ``corrupt_scratch`` replaces every scratch token by a uniform random
digit (the ``=``, the answer and the EOS kept) and ``strip_scratch`` removes the scratch (the ``=`` moved to
the start); the prefix up to and including the ``=`` of either is the context on which a policy re-answers.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from .base import Task, TaskConfig

DIGITS = [str(d) for d in range(10)]
SEP, EOS = 10, 11  # action indices of "=" and "<end>"


class ScratchAddConfig(TaskConfig):
    n_digits: int = Field(2, ge=1, le=6, description="n, digits per operand (answers have 1 to n + 1 digits)")
    max_scratch: int = Field(4, ge=0, le=32, description="S, scratch tokens that fit: max_len T = S + n + 3")
    demos: Literal["answer", "worked"] = Field(
        "worked", description="SFT demonstrations: '= answer <end>', or the worked carries then the answer"
    )
    n_eval_prompts: int = Field(64, ge=1, le=1_000_000, description="size of the fixed evaluation prompt set")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the evaluation prompt set")


class ScratchAdd(Task):
    name = "scratch_add"
    Config = ScratchAddConfig

    def __init__(self, cfg: ScratchAddConfig):
        super().__init__(cfg)
        if cfg.demos == "worked" and cfg.max_scratch < 2 * cfg.n_digits:
            raise ValueError(
                f"max_scratch {cfg.max_scratch} must be >= 2 * n_digits = {2 * cfg.n_digits} "
                "for worked demonstrations (a sum digit and a carry per column)"
            )

    # -- vocabulary -------------------------------------------------------------------------
    @property
    def prompt_words(self) -> list[str]:
        return DIGITS + ["+"]

    @property
    def action_words(self) -> list[str]:
        return DIGITS + ["=", "<end>"]

    @property
    def eos_action(self) -> int:
        return EOS

    @property
    def sep_action(self) -> int:
        return SEP

    @property
    def prompt_len(self) -> int:
        return 2 * self.cfg.n_digits + 1

    @property
    def completion_len(self) -> int:
        return self.cfg.max_scratch + self.cfg.n_digits + 3  # scratch, "=", n + 1 digits, EOS

    @property
    def enumerable(self) -> bool:
        return False

    # -- prompts ----------------------------------------------------------------------------
    def sample_prompts(self, n: int, generator: torch.Generator) -> Tensor:
        k = self.cfg.n_digits
        a = torch.randint(0, 10, (n, k), generator=generator)
        b = torch.randint(0, 10, (n, k), generator=generator)
        return torch.cat([a, torch.full((n, 1), 10), b], dim=1)  # (n, 2k + 1): a + b

    def eval_prompts(self) -> Tensor:
        return self.sample_prompts(self.cfg.n_eval_prompts, torch.Generator().manual_seed(self.cfg.seed))

    def operands(self, prompts: Tensor) -> tuple[Tensor, Tensor]:
        """``(B,)`` a and ``(B,)`` b of each prompt."""
        n = self.cfg.n_digits
        powers = 10 ** torch.arange(n - 1, -1, -1, device=prompts.device)
        return (prompts[:, :n] * powers).sum(1), (prompts[:, n + 1 :] * powers).sum(1)

    def totals(self, prompts: Tensor) -> Tensor:
        """``(B,)`` the true result a + b."""
        a, b = self.operands(prompts)
        return a + b

    # -- parsing ----------------------------------------------------------------------------
    def _positions(self, completions: Tensor) -> tuple[Tensor, Tensor]:
        """``(B,)`` e, the first EOS (T when none), and ``(B,)`` s, the first ``=`` (T when none)."""
        T = completions.shape[1]
        pos = torch.arange(T, device=completions.device).expand_as(completions)
        first = lambda hit: torch.where(hit, pos, T).min(-1).values  # noqa: E731
        return first(completions == EOS), first(completions == SEP)

    def scratch_length(self, completions: Tensor) -> Tensor:
        """``(B,)`` long: tokens before the first ``=``; without an ``=`` before the first EOS, the tokens before it."""
        e, s = self._positions(completions)
        return torch.minimum(s, e)

    def answer(self, completions: Tensor) -> Tensor:
        """``(B,)`` long: the value of the well-formed answer (module doc), -1 where there is none."""
        n, T = self.cfg.n_digits, completions.shape[1]
        e, s = self._positions(completions)
        k = e - s - 1  # answer length; negative or meaningless when s >= e
        pos = torch.arange(T, device=completions.device)[None, :]
        inside = (pos > s[:, None]) & (pos < e[:, None])  # (B, T) the answer's tokens
        digits_only = ((completions < 10) | ~inside).all(-1)  # no second "=" in the answer
        first = completions.gather(1, (s + 1).clamp(max=T - 1)[:, None])[:, 0]
        ok = (s < e) & (e < T) & (k >= 1) & (k <= n + 1) & digits_only & ((first != 0) | (k == 1))
        place = (e[:, None] - 1 - pos).clamp(
            min=0, max=n + 1
        )  # power of ten of each answer token (clamped: no overflow)
        value = torch.where(inside, completions.clamp(max=9) * 10**place, 0).sum(-1)
        return torch.where(ok, value, -1)

    def reward(self, prompts: Tensor, completions: Tensor) -> Tensor:
        """``(B,)`` r = 1[answer(y) == a + b]: answer correctness only."""
        return (self.answer(completions) == self.totals(prompts).to(completions.device)).float()

    # -- demonstrations ---------------------------------------------------------------------
    def worked_scratch(self, prompts: Tensor) -> Tensor:
        """``(B, 2n)`` s_0 c_1 s_1 c_2 ... s_{n-1} c_n: each column's sum digit and carry out, units first."""
        n = self.cfg.n_digits
        a, b = prompts[:, :n].flip(1), prompts[:, n + 1 :].flip(1)  # (B, n) units first
        carry = torch.zeros(len(prompts), dtype=torch.long, device=prompts.device)
        out = []
        for i in range(n):
            t = a[:, i] + b[:, i] + carry  # t_i = a_i + b_i + c_i
            carry = t // 10  # c_{i+1}
            out += [t % 10, carry]  # s_i, c_{i+1}
        return torch.stack(out, 1)

    def answer_tokens(self, totals: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, n + 1)`` the digits of ``totals`` without leading zeros, left-aligned (EOS after), and their count."""
        n = self.cfg.n_digits
        powers = 10 ** torch.arange(n, -1, -1, device=totals.device)
        digits = (totals[:, None] // powers) % 10  # (B, n + 1) zero-padded
        length = (n + 1) - (digits[:, :-1] == 0).long().cumprod(1).sum(1)  # leading zeros dropped, "0" kept
        pos = torch.arange(n + 1, device=totals.device)[None, :]
        idx = (pos + (n + 1 - length)[:, None]).clamp(max=n)
        return torch.where(pos < length[:, None], digits.gather(1, idx), EOS), length

    def demonstrations(self, prompts: Tensor) -> Tensor:
        """``(B, T)`` ``[worked scratch] = answer <end>`` then EOS padding (``demos`` picks the scratch)."""
        B = len(prompts)
        ans, _ = self.answer_tokens(self.totals(prompts))
        scratch = self.worked_scratch(prompts) if self.cfg.demos == "worked" else prompts.new_zeros(B, 0)
        row = torch.cat([scratch, torch.full((B, 1), SEP, device=prompts.device), ans], 1)
        pad = torch.full((B, self.completion_len - row.shape[1]), EOS, device=prompts.device)
        return torch.cat([row, pad], 1)

    # -- pretraining text (the base policy) -------------------------------------------------
    def pretraining_text(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``(n, 2n + 1)`` prompts and ``(n, T)`` texts ``scratch = answer <end>`` that carry no solution.

        Drawn in this order from ``generator``: the prompts (``sample_prompts``), the scratch length
        k ~ U{0..S}, S scratch digits ~ U{0..9} (the first k kept), and the answer's value
        v ~ U{0..2(10^n - 1)} (the range of a + b), written without leading zeros. Every draw is
        independent of the prompt, so the text holds the format (scratch, ``=``, an answer of the
        right length range, ``<end>``) and no information about the sum: its answers are right by
        chance only (1 in 2 (10^n - 1) + 1). (Answers drawn to be always wrong would carry
        information: a policy that fitted them would learn to avoid the sum.) A scratch that
        happens to equal the worked solution (k = 2n, chance 10^-2n) has its first digit changed, so
        the text has no worked solution.
        """
        S, T, cap = self.cfg.max_scratch, self.completion_len, 2 * (10**self.cfg.n_digits - 1)
        prompts = self.sample_prompts(n, generator)
        k = torch.randint(0, S + 1, (n,), generator=generator)  # (n,) scratch lengths
        digits = torch.randint(0, 10, (n, S), generator=generator)  # (n, S)
        values = torch.randint(0, cap + 1, (n,), generator=generator)  # (n,) answers, independent of the prompt
        w = 2 * self.cfg.n_digits
        if w <= S:  # no worked solution: a coincidental one gets its first digit changed
            worked = (k == w) & (digits[:, :w] == self.worked_scratch(prompts)).all(-1)
            digits[:, 0] = torch.where(worked, (digits[:, 0] + 1) % 10, digits[:, 0])
        ans, _ = self.answer_tokens(values)  # (n, n + 1) EOS after the digits
        pos = torch.arange(T)[None, :]  # (1, T)
        scratch = torch.cat([digits, torch.full((n, T - S), EOS)], 1)  # (n, T)
        after = ans.gather(1, (pos - k[:, None] - 1).clamp(0, self.cfg.n_digits))  # the answer from k + 1 on
        text = torch.where(pos < k[:, None], scratch, torch.where(pos == k[:, None], SEP, after))
        text = torch.where(pos > k[:, None] + self.cfg.n_digits + 1, EOS, text)
        return prompts, text

    def answer_target(self, prompts: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, n + 2)`` the right answer's tokens then ``<end>`` (EOS padding after), and ``(B,)`` their count
        (digits + 1): the tokens after the ``=`` that score 1 (the scratch-ablation evaluation)."""
        ans, length = self.answer_tokens(self.totals(prompts))
        return torch.cat([ans, torch.full((len(prompts), 1), EOS, device=prompts.device)], 1), length + 1

    # -- scratch ablations ------------------------------------------------------------------
    def corrupt_scratch(self, completions: Tensor, generator: torch.Generator) -> Tensor:
        """``(B, T)`` every scratch token replaced by a uniform random digit; ``=``, answer and EOS kept."""
        T = completions.shape[1]
        noise = torch.randint(0, 10, completions.shape, generator=generator).to(completions.device)
        scratch = torch.arange(T, device=completions.device)[None, :] < self.scratch_length(completions)[:, None]
        return torch.where(scratch, noise, completions)

    def strip_scratch(self, completions: Tensor) -> Tensor:
        """``(B, T)`` the scratch removed: the ``=`` moved to the start, the answer after it, EOS padding."""
        T = completions.shape[1]
        pos = torch.arange(T, device=completions.device)[None, :]
        src = pos + self.scratch_length(completions)[:, None]
        shifted = completions.gather(1, src.clamp(max=T - 1))
        return self.canonical(torch.where(src < T, shifted, EOS))

    def render(self, prompt: Tensor, completion: Tensor) -> str:
        """``a + b -> [scratch] = answer <end>`` (the padding left out)."""
        p = " ".join(self.prompt_words[i] for i in prompt.tolist())
        n, k = int(self.lengths(completion[None])[0]), int(self.scratch_length(completion[None])[0])
        words = [self.action_words[i] for i in completion[:n].tolist()]
        return f"{p} -> [{' '.join(words[:k])}] {' '.join(words[k:])}".rstrip()
