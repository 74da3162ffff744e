"""The toy-task interface shared by every task.

A task owns its tokens, its prompt stream, its gold reward and its data. Everything is
expressed in *indices*, never strings, so the training loop never round-trips through a
tokenizer:

- prompts are ``(B, Tp)`` indices into ``task.prompt_words``;
- completions are ``(B, T)`` indices into ``task.action_words`` (the action set the policy
  samples from; its logits are restricted to these tokens);
- ``reward`` returns ``(B,)``; ``process_reward`` returns ``(B, T)`` per-step rewards. Where
  ``process_is_split`` is true their sum over ``T`` equals the outcome reward (so outcome-
  and process-reward runs optimise the same total); otherwise it is a denser proxy.

Every prompt has the same length and every completion tensor has ``completion_len`` tokens.
Without an end-of-sequence action (``eos_action is None``, the default) every token counts and
no padding exists. A task with an EOS action (``eos = true`` on ``sequence`` and
``arithmetic``) ends a completion at its first EOS: the *answer* is the tokens before it, the
EOS itself counts (the policy chose to stop), and every later position is padding, always
written as the EOS action (``canonical``). ``completion_mask`` is 1 up to and including the
first EOS, 0 after; a completion with no EOS in its ``completion_len`` tokens (max_len) is
*truncated* (``truncated``), all its tokens count. ``lengths`` is the number of counted tokens.

When the completion space is small the task is *enumerable*: the exact expected reward, KL
and optimal policy are computed by summing over all completions of every prompt in
``eval_prompts()``. Without EOS the space is ``A ** T``; with EOS it is the canonical
completions: every answer of k < T non-EOS tokens followed by EOS (and padding), and every
truncated one, sum_{k<T} (A-1)^k + (A-1)^T.
"""

from __future__ import annotations

import itertools
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

MAX_ENUMERABLE = 100_000  # completions per prompt above which a task is not enumerated


class TaskConfig(BaseModel):
    """Base of every task's typed parameters; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # an inf or nan parameter is a ConfigError


@dataclass
class PreferenceData:
    """A fixed preference set: ``chosen`` preferred over ``rejected`` with probability ``p_chosen``.

    Shapes: prompts ``(N, Tp)``, chosen/rejected ``(N, T)``, p_chosen ``(N,)``. With hard
    labels ``p_chosen`` is all ones; with soft labels it is the Bradley-Terry probability
    sigmoid((r_c - r_r) / temperature) itself.
    """

    prompts: Tensor
    chosen: Tensor
    rejected: Tensor
    p_chosen: Tensor

    def __len__(self) -> int:
        return self.prompts.shape[0]


class Task(ABC):
    """One toy task. Subclasses set the class attributes and implement the abstract methods."""

    name: str
    Config: type[TaskConfig] = TaskConfig
    process_is_split: bool = True  # process_reward sums to reward
    run_defaults: dict = {}  # run-level defaults for this task, dotted keys (e.g. {"steps": 300})
    has_observations: bool = False  # the environment writes some completion tokens (``observe``; tool_use)

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg

    # -- vocabulary -----------------------------------------------------------------------
    @property
    @abstractmethod
    def prompt_words(self) -> list[str]:
        """Words that appear in prompts; prompt tensors index this list."""

    @property
    @abstractmethod
    def action_words(self) -> list[str]:
        """Words a completion is made of; completion tensors index this list."""

    @property
    @abstractmethod
    def prompt_len(self) -> int: ...

    @property
    @abstractmethod
    def completion_len(self) -> int: ...

    @property
    def vocab(self) -> list[str]:
        """Every word of the task, prompt words first, without duplicates (the tokenizer's vocabulary)."""
        return list(dict.fromkeys(self.prompt_words + self.action_words))

    @property
    def n_actions(self) -> int:
        return len(self.action_words)

    @property
    def eos_action(self) -> int | None:
        """Index of the end-of-sequence action in ``action_words``, or ``None`` (fixed-length completions)."""
        return None

    @property
    def n_completions(self) -> int:
        """Size of the completion space per prompt: A ** T, or with EOS the canonical completions (module doc)."""
        A, T = self.n_actions, self.completion_len
        if self.eos_action is None:
            return A**T
        return sum((A - 1) ** k for k in range(T)) + (A - 1) ** T

    @property
    def enumerable(self) -> bool:
        return self.n_completions <= MAX_ENUMERABLE

    @property
    def dense_reward(self) -> bool:
        """Whether RL methods are trained on ``process_reward`` (per step) instead of ``reward``."""
        return False

    # -- prompts and rewards ----------------------------------------------------------------
    @abstractmethod
    def sample_prompts(self, n: int, generator: torch.Generator) -> Tensor:
        """``(n, Tp)`` prompts drawn from the task's prompt distribution."""

    @abstractmethod
    def eval_prompts(self) -> Tensor:
        """``(P, Tp)`` a fixed prompt set; for enumerable tasks, the whole prompt distribution."""

    @abstractmethod
    def reward(self, prompts: Tensor, completions: Tensor) -> Tensor:
        """Gold (outcome) reward ``(B,)`` for prompts ``(B, Tp)`` and completions ``(B, T)``."""

    def reference_prior(self) -> Tensor | None:
        """``(P, A)`` log-probs of the first completion token per eval prompt that the initial
        (reference) policy is fitted to, or ``None`` to keep the random initialisation."""
        return None

    def process_reward(self, prompts: Tensor, completions: Tensor) -> Tensor | None:
        """Per-step rewards ``(B, T)`` summing to ``reward``; ``None`` if the task has none."""
        return None

    @abstractmethod
    def demonstrations(self, prompts: Tensor) -> Tensor:
        """``(B, T)`` a best completion for each prompt: the SFT targets."""

    @property
    def has_pretraining_text(self) -> bool:
        """Whether the task defines ``pretraining_text`` (a base policy can be pretrained on it: ``pretrain_steps``)."""
        return type(self).pretraining_text is not Task.pretraining_text

    def pretraining_text(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``(n, Tp)`` prompts and ``(n, T)`` completions in the task's tokens that carry no solution: the text a
        base policy is pretrained on (``pretrain_steps``; issue 15). Tasks without one raise."""
        raise NotImplementedError(f"task {self.name!r} has no pretraining text (pretrain_steps needs one)")

    @property
    def sep_action(self) -> int | None:
        """The separator between a scratch and the answer, or ``None``: the task has no scratch. A task with one
        defines ``scratch_length``, ``corrupt_scratch`` and ``answer_target`` (the scratch-ablation evaluation,
        ``workbench.analysis.reasoning``)."""
        return None

    # -- end of sequence ----------------------------------------------------------------------
    def completion_mask(self, completions: Tensor) -> Tensor:
        """``(B, T)`` float: 1 up to and including the first EOS, 0 after; all ones without EOS."""
        if self.eos_action is None:
            return torch.ones(completions.shape, device=completions.device)
        is_eos = (completions == self.eos_action).long()
        before = is_eos.cumsum(-1) - is_eos  # EOS tokens strictly before t
        return (before == 0).float()

    def action_mask(self, completions: Tensor) -> Tensor:
        """``(B, T)`` float: 1 at the tokens the policy chose (the loss, KL and advantage mask); the completion
        mask, less the observation tokens the environment writes in a task with observations (``tool_use``)."""
        return self.completion_mask(completions)

    def observe(self, prefix: Tensor) -> Tensor | None:
        """``(..., t)`` completion prefixes -> ``(...)`` the token the environment forces at position t (-1 where
        the policy samples), or ``None``: the policy samples every token (every task without observations)."""
        return None

    def episode_stats(self, prompts: Tensor, completions: Tensor, weights: Tensor | None = None) -> dict[str, float]:
        """Task-specific episode metrics over ``(B, Tp)``, ``(B, T)`` (``weights (B,)``: a distribution over the
        rows, else uniform); none by default."""
        return {}

    def lengths(self, completions: Tensor) -> Tensor:
        """``(B,)`` long: counted tokens of each completion (the answer plus its EOS; T when truncated)."""
        return self.completion_mask(completions).sum(-1).long()

    def last_action(self, completions: Tensor) -> Tensor:
        """``(B,)`` long: the position of each completion's last own token, where its outcome reward is paid (the
        EOS, or the last token when truncated); a task with observations ends there, never on an observation."""
        return self.lengths(completions) - 1

    def truncated(self, completions: Tensor) -> Tensor:
        """``(B,)`` bool: the completion has no EOS in its T tokens (always false without EOS)."""
        if self.eos_action is None:
            return torch.zeros(completions.shape[0], dtype=torch.bool, device=completions.device)
        return (completions != self.eos_action).all(-1)

    def canonical(self, completions: Tensor) -> Tensor:
        """``(B, T)`` the same completions with every token after the first EOS set to EOS (the padding)."""
        if self.eos_action is None:
            return completions
        return torch.where(self.completion_mask(completions) > 0, completions, self.eos_action)

    # -- generic helpers --------------------------------------------------------------------
    def all_completions(self) -> Tensor:
        """``(N, T)`` every completion in lexicographic order (enumerable tasks only): the ``A ** T`` grid, or
        with EOS the ``n_completions`` canonical completions (``full_grid`` is the whole grid)."""
        if not self.enumerable:
            raise ValueError(f"task {self.name!r} has {self.n_completions} completions per prompt: not enumerable")
        if self.eos_action is None:
            return self.full_grid()
        A, T, eos = self.n_actions, self.completion_len, self.eos_action
        words = [a for a in range(A) if a != eos]
        rows = [(*w, *[eos] * (T - k)) for k in range(T) for w in itertools.product(words, repeat=k)]
        rows += list(itertools.product(words, repeat=T))  # truncated
        return torch.tensor(sorted(rows), dtype=torch.long)

    def full_grid(self) -> Tensor:
        """``(A ** T, T)`` every token sequence in lexicographic order, padding not canonicalised."""
        grid = itertools.product(range(self.n_actions), repeat=self.completion_len)
        return torch.tensor(list(grid), dtype=torch.long)

    def random_completions(self, n: int, generator: torch.Generator) -> Tensor:
        """``(n, T)`` completions drawn uniformly from the action set (canonicalised after an EOS)."""
        return self.canonical(torch.randint(0, self.n_actions, (n, self.completion_len), generator=generator))

    def preferences(
        self,
        n_pairs: int,
        generator: torch.Generator,
        pairs: str = "random",
        labels: str = "sampled",
        temperature: float = 1.0,
        coverage: float = 1.0,
    ) -> PreferenceData:
        """Preference pairs labelled by a Bradley-Terry model over the gold reward.

        P(a > b) = sigmoid((r(a) - r(b)) / temperature); ``temperature`` is the noise knob
        (0 gives noiseless labels). ``pairs="all"`` takes every unordered pair of distinct
        completions of every eval prompt (enumerable tasks; ``n_pairs`` ignored);
        ``"random"`` draws ``n_pairs`` prompts and two uniform completions each, restricted
        to the first ``ceil(coverage * A)`` actions at every position when ``coverage < 1``
        (limited preference coverage). ``labels="soft"`` stores the BT probability itself;
        ``"sampled"`` draws a winner.
        """
        if pairs == "all":
            comps = self.all_completions()
            keep = _covered(comps, self.n_actions, coverage)
            comps = comps[keep]
            i, j = torch.triu_indices(len(comps), len(comps), offset=1)
            ps = self.eval_prompts()
            prompts = ps.repeat_interleave(len(i), dim=0)
            a, b = comps[i].repeat(len(ps), 1), comps[j].repeat(len(ps), 1)
        elif pairs == "random":
            prompts = self.sample_prompts(n_pairs, generator)
            k = max(1, math.ceil(coverage * self.n_actions))
            a = torch.randint(0, k, (n_pairs, self.completion_len), generator=generator)
            b = torch.randint(0, k, (n_pairs, self.completion_len), generator=generator)
            a, b = self.canonical(a), self.canonical(b)  # tokens after an EOS are padding
        else:
            raise ValueError(f"pairs must be 'all' or 'random', got {pairs!r}")
        return self.label_pairs(prompts, a, b, generator, labels, temperature)

    def label_pairs(
        self,
        prompts: Tensor,
        a: Tensor,
        b: Tensor,
        generator: torch.Generator,
        labels: str = "sampled",
        temperature: float = 1.0,
    ) -> PreferenceData:
        """Label given pairs ``(a, b)`` ``(N, T)`` of ``prompts`` ``(N, Tp)`` as ``preferences`` does: the
        Bradley-Terry model over the gold reward, ``labels`` soft or sampled (a draw from ``generator``)."""
        ra, rb = self.reward(prompts, a), self.reward(prompts, b)
        p_a = bradley_terry(ra, rb, temperature)
        if labels == "soft":
            a_wins = p_a >= 0.5
            p_chosen = torch.where(a_wins, p_a, 1 - p_a)
        elif labels == "sampled":
            a_wins = torch.rand(p_a.shape, generator=generator) < p_a
            p_chosen = torch.ones_like(p_a)
        else:
            raise ValueError(f"labels must be 'soft' or 'sampled', got {labels!r}")
        chosen = torch.where(a_wins[:, None], a, b)
        rejected = torch.where(a_wins[:, None], b, a)
        return PreferenceData(prompts, chosen, rejected, p_chosen.float())

    def render(self, prompt: Tensor, completion: Tensor) -> str:
        """Human-readable ``prompt -> completion`` for logs and sample files (the padding after an EOS left out)."""
        p = " ".join(self.prompt_words[i] for i in prompt.tolist())
        n = int(self.lengths(completion[None])[0])
        c = " ".join(self.action_words[i] for i in completion[:n].tolist())
        return f"{p} -> {c}"


def bradley_terry(r_a: Tensor, r_b: Tensor, temperature: float) -> Tensor:
    """P(a preferred over b) = sigmoid((r_a - r_b) / temperature); temperature 0 is a hard comparison."""
    if temperature <= 0:
        return (r_a > r_b).float() + 0.5 * (r_a == r_b).float()
    return torch.sigmoid((r_a - r_b) / temperature)


def _covered(comps: Tensor, n_actions: int, coverage: float) -> Tensor:
    k = max(1, math.ceil(coverage * n_actions))
    return (comps < k).all(dim=1)


def answer_matches(completions: Tensor, eos: int, targets: Tensor, target_len: Tensor) -> tuple[Tensor, Tensor]:
    """Score answers ending at the first EOS against variable-length targets.

    ``completions (B, T)``, ``targets (B, L)`` (entries at or after ``target_len (B,)`` are ignored).
    With k the answer length (tokens before the first EOS; T when truncated) and l the target's,
    returns ``m (B, T)``: m_t = 1[y_t == target_t] for t < min(k, l), else 0, and ``denom (B,)``
    = max(k, l): sum_t m_t / denom is 1 exactly when the answer is the target.
    """
    T = completions.shape[1]
    is_eos = (completions == eos).long()
    k = (is_eos.cumsum(-1) == 0).long().sum(-1)  # answer length
    pos = torch.arange(T, device=completions.device)
    valid = (pos[None, :] < torch.minimum(k, target_len.to(k.device))[:, None]).float()
    targets = torch.nn.functional.pad(targets[:, :T], (0, T - min(T, targets.shape[1])), value=-1)
    m = (completions == targets.to(completions.device)).float() * valid
    return m, torch.maximum(k, target_len.to(k.device)).float()
