"""``sequence``: completions of length L over V symbols, scored against a hidden target.

Each prompt ``p<i>`` has a seeded target sequence t(i) in {0..V-1}^L. With
m_l = 1[y_l == t_l(i)]:

- ``outcome``:  r = (1/L) sum_l m_l, paid once at the end (a verifier's score);
                with ``threshold`` set, r = 1[sum_l m_l >= threshold] (a pass/fail verifier)
- ``process``:  the same total paid per step, r_l = m_l / L (dense / process reward)
- ``decisive``: r = m_j, one decisive position j decides everything (credit assignment)

``process_reward`` always returns the per-step split of the outcome reward (for
``decisive``: m_j at position j, zero elsewhere); ``process`` only changes which of the
two the RL methods are trained on by default. Enumerable while V ** L <= 100,000.

With ``eos = true`` the policy decides where its answer ends. The action set gains ``<end>``
(the EOS action, index V), completions have max_len = L + 1 tokens (room for a full answer
and its EOS), and target i has a seeded length l(i) in {1..L} (its first l(i) symbols; drawn
after the targets, so they are the same as without EOS). With a = the answer (the tokens
before the first EOS; all L + 1 tokens of a truncated completion), k = |a| and
m_l = 1[a_l == t_l(i)] for l < min(k, l(i)):

- ``outcome``: r = sum_l m_l / max(k, l(i)), 1 exactly when a = t(i) (a wrong length costs
  like wrong symbols; a truncated completion never scores 1);
- ``process``: the same total paid per step, r_l = m_l / max(k, l(i)), nothing after the EOS.

``decisive`` and ``threshold`` are not defined with EOS (a configuration error).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from .base import Task, TaskConfig, answer_matches


class SequenceConfig(TaskConfig):
    vocab_size: int = Field(4, ge=2, le=64, description="V, number of completion symbols")
    length: int = Field(5, ge=1, le=32, description="L, completion length")
    n_prompts: int = Field(2, ge=1, le=1024, description="number of distinct prompts (targets)")
    variant: Literal["outcome", "process", "decisive"] = Field("outcome", description="reward variant, see module doc")
    threshold: int | None = Field(None, ge=1, description="outcome only: pass/fail at this many matches")
    decisive_position: int = Field(0, ge=0, description="j for the 'decisive' variant")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the targets (not of training)")
    eos: bool = Field(False, description="add an end-of-sequence action: variable-length answers (module doc)")


class Sequence(Task):
    name = "sequence"
    Config = SequenceConfig

    def __init__(self, cfg: SequenceConfig):
        super().__init__(cfg)
        if cfg.decisive_position >= cfg.length:
            raise ValueError(f"decisive_position {cfg.decisive_position} must be < length {cfg.length}")
        if cfg.threshold is not None and cfg.threshold > cfg.length:
            raise ValueError(f"threshold {cfg.threshold} must be <= length {cfg.length}")
        g = torch.Generator().manual_seed(cfg.seed)
        self.targets = torch.randint(0, cfg.vocab_size, (cfg.n_prompts, cfg.length), generator=g)  # (P, L)
        if cfg.eos:
            if cfg.variant == "decisive" or cfg.threshold is not None:
                raise ValueError("sequence with eos supports the 'outcome' and 'process' variants without threshold")
            self.target_len = torch.randint(1, cfg.length + 1, (cfg.n_prompts,), generator=g)  # (P,) l(i)

    @property
    def prompt_words(self) -> list[str]:
        return [f"p{i}" for i in range(self.cfg.n_prompts)]

    @property
    def action_words(self) -> list[str]:
        return [f"s{v}" for v in range(self.cfg.vocab_size)] + (["<end>"] if self.cfg.eos else [])

    @property
    def eos_action(self) -> int | None:
        return self.cfg.vocab_size if self.cfg.eos else None

    @property
    def prompt_len(self) -> int:
        return 1

    @property
    def completion_len(self) -> int:
        return self.cfg.length + 1 if self.cfg.eos else self.cfg.length

    @property
    def dense_reward(self) -> bool:
        return self.cfg.variant == "process"

    def sample_prompts(self, n: int, generator: torch.Generator) -> Tensor:
        return torch.randint(0, self.cfg.n_prompts, (n, 1), generator=generator)

    def eval_prompts(self) -> Tensor:
        return torch.arange(self.cfg.n_prompts)[:, None]

    def _matches(self, prompts: Tensor, completions: Tensor) -> Tensor:
        target = self.targets.to(completions.device)[prompts[:, 0]]  # (B, L)
        return (completions == target).float()  # (B, L)

    def process_reward(self, prompts: Tensor, completions: Tensor) -> Tensor:
        if self.cfg.eos:
            i = prompts[:, 0].cpu()
            m, denom = answer_matches(completions, self.eos_action, self.targets[i], self.target_len[i])
            return m / denom[:, None]  # r_l = m_l / max(k, l(i))
        m = self._matches(prompts, completions)
        if self.cfg.variant == "decisive":
            out = torch.zeros_like(m)
            j = self.cfg.decisive_position
            out[:, j] = m[:, j]
            return out
        if self.cfg.threshold is not None:
            # pass/fail has no honest per-step split: pay it at the last step
            out = torch.zeros_like(m)
            out[:, -1] = (m.sum(1) >= self.cfg.threshold).float()
            return out
        return m / self.cfg.length

    def reward(self, prompts: Tensor, completions: Tensor) -> Tensor:
        if self.cfg.eos:  # sum_l m_l / max(k, l(i)) as one division: exactly 1 for the exact answer
            i = prompts[:, 0].cpu()
            m, denom = answer_matches(completions, self.eos_action, self.targets[i], self.target_len[i])
            return m.sum(dim=1) / denom
        return self.process_reward(prompts, completions).sum(dim=1)

    def demonstrations(self, prompts: Tensor) -> Tensor:
        if self.cfg.eos:  # t(i)'s first l(i) symbols, then EOS (and padding)
            i = prompts[:, 0].cpu()
            out = torch.cat([self.targets[i], torch.full((len(i), 1), self.eos_action)], dim=1)
            pos = torch.arange(self.completion_len)
            return torch.where(pos[None, :] < self.target_len[i][:, None], out, self.eos_action).to(prompts.device)
        return self.targets.to(prompts.device)[prompts[:, 0]]
