"""``tool_use``: multi-turn episodes in which the policy may call a lookup tool before it answers (issue 15, C11).

Prompt ``(kind, argument)``, 2 tokens, drawn uniformly from the K + V eval prompts:

- ``lookup k_i``: the answer is ``table[k_i]``, a value of a hidden table drawn per task seed;
- ``echo v_j``: the answer is ``v_j``, written in the prompt (the tool does not help).

Actions (indices): the values ``v0..v{V-1}`` (0..V-1), the keys ``k0..k{K-1}`` (V..V+K-1), ``call``
(V+K) and ``<end>`` (V+K+1, the EOS action). A *complete call* is ``call`` followed by a key ``k``; the
*environment* then writes the observation ``table[k]`` (a value token) at the next position: a forced
token, not sampled (``observe``). The policy continues, and its episode reads

    direct:    v <end> padding                                  1 turn
    with tool: call k [table[k]] v <end> padding                2 turns ([.] the observation)

The *answer* is the action tokens after the last observation (all of them without a call) and before
the first EOS; it is *correct* when it is exactly one value token equal to the target. The success
reward is paid at the end of the episode, less a cost c per complete call:

    success(x, y) = 1[answer == target(x)]                  (echo)
                  = 1[answer == table[k]] 1[y called k]     (lookup k: only an answer grounded in a lookup of
                                                             k counts: the table stands for facts the policy
                                                             cannot know, so a direct guess is never credited)
    r(x, y)       = success(x, y) - c * calls(y)

so the best episode calls the tool exactly when it is needed (lookup: r = 1 - c; echo: r = 1).

**Observation positions** belong to the environment: ``action_mask`` is 0 there (and after the EOS),
so the rollout's ``mask`` gives them zero loss, zero KL and zero advantage in every method, and the
exact enumeration gives them probability 1 (``all_completions`` holds only the *feasible* episodes, the
observations written in). ``completion_mask``, ``lengths`` and ``truncated`` count observation tokens
as part of the episode (the reward sits on the EOS). ``canonical`` writes the correct observation at
every observation position before the EOS padding, so every token sequence maps to the feasible
episode the environment would have produced; ``reward`` reads sequences through it.

Max length T = 3 * max_calls + 2 (each call takes ``call k [obs]``, then an answer and EOS). With the
defaults (K = 2, V = 3, one call) the full grid is 7^5 = 16,807 sequences, 8,059 of them feasible
episodes: exact metrics and exact per-token credit (``analysis.credit``) both run.

Demonstrations (the SFT expert): ``call k [table[k]] table[k] <end>`` for a lookup, ``v <end>`` for an
echo. ``episode_stats`` gives ``tool/*`` and ``episode/*`` (docs/metrics.md).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from .base import Task, TaskConfig

LOOKUP, ECHO = 0, 1  # prompt word indices of the two query kinds


class ToolUseConfig(TaskConfig):
    n_keys: int = Field(2, ge=1, le=16, description="K, keys of the hidden lookup table (lookup prompts)")
    n_values: int = Field(3, ge=2, le=16, description="V, values (answers, observations; echo prompts)")
    max_calls: int = Field(1, ge=1, le=3, description="complete calls that fit: max_len T = 3 * max_calls + 2")
    call_cost: float = Field(0.1, ge=0, le=1, description="c, reward subtracted per complete call")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the hidden table (not of training)")


class ToolUse(Task):
    name = "tool_use"
    Config = ToolUseConfig
    has_observations = True

    def __init__(self, cfg: ToolUseConfig):
        super().__init__(cfg)
        g = torch.Generator().manual_seed(cfg.seed)
        self.table = torch.randint(0, cfg.n_values, (cfg.n_keys,), generator=g)  # (K,) table[k], a value index
        K, V = cfg.n_keys, cfg.n_values
        self.call_action, self.first_key = V + K, V

    # -- vocabulary -------------------------------------------------------------------------
    @property
    def prompt_words(self) -> list[str]:
        return ["lookup", "echo"] + self._keys + self._values

    @property
    def _keys(self) -> list[str]:
        return [f"k{i}" for i in range(self.cfg.n_keys)]

    @property
    def _values(self) -> list[str]:
        return [f"v{i}" for i in range(self.cfg.n_values)]

    @property
    def action_words(self) -> list[str]:
        return self._values + self._keys + ["call", "<end>"]

    @property
    def eos_action(self) -> int:
        return self.cfg.n_values + self.cfg.n_keys + 1

    @property
    def prompt_len(self) -> int:
        return 2

    @property
    def completion_len(self) -> int:
        return 3 * self.cfg.max_calls + 2

    # -- prompts ----------------------------------------------------------------------------
    def eval_prompts(self) -> Tensor:
        """``(K + V, 2)``: ``lookup k_i`` for every key, then ``echo v_j`` for every value (prompt word indices)."""
        K, V = self.cfg.n_keys, self.cfg.n_values
        lookups = torch.stack([torch.full((K,), LOOKUP), 2 + torch.arange(K)], 1)
        echoes = torch.stack([torch.full((V,), ECHO), 2 + K + torch.arange(V)], 1)
        return torch.cat([lookups, echoes])

    def sample_prompts(self, n: int, generator: torch.Generator) -> Tensor:
        ps = self.eval_prompts()
        return ps[torch.randint(0, len(ps), (n,), generator=generator)]

    def needs_tool(self, prompts: Tensor) -> Tensor:
        """``(B,)`` bool: the query is a lookup (the answer is not in the prompt)."""
        return prompts[:, 0] == LOOKUP

    def targets(self, prompts: Tensor) -> Tensor:
        """``(B,)`` the value index of the correct answer: ``table[k]`` for a lookup, ``v`` for an echo."""
        K, arg = self.cfg.n_keys, prompts[:, 1].cpu() - 2
        lookup = self.table[arg.clamp(0, K - 1)]
        return torch.where(self.needs_tool(prompts).cpu(), lookup, (arg - K).clamp(min=0)).to(prompts.device)

    # -- the environment ----------------------------------------------------------------------
    def _is_key(self, y: Tensor) -> Tensor:
        return (y >= self.first_key) & (y < self.call_action)

    def observe(self, prefix: Tensor) -> Tensor:
        """``(..., t)`` the episode so far -> ``(...)`` the observation the environment writes at position t,
        -1 where the policy acts (no complete call just before t, or the episode has ended)."""
        t = prefix.shape[-1]
        none = torch.full(prefix.shape[:-1], -1, dtype=torch.long, device=prefix.device)
        if t < 2:
            return none
        ended = (prefix == self.eos_action).any(-1)
        call = (prefix[..., t - 2] == self.call_action) & self._is_key(prefix[..., t - 1]) & ~ended
        # an observation is a value, never ``call`` or a key: a call's two tokens are always the policy's
        key = (prefix[..., t - 1] - self.first_key).clamp(0, self.cfg.n_keys - 1)
        return torch.where(call, self.table.to(prefix.device)[key], none)

    def _observed(self, completions: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, T)`` the sequence with every observation written in (left to right, before the first EOS),
        and ``(B, T)`` bool: the observation positions."""
        y = completions.clone()
        obs = torch.zeros(y.shape, dtype=torch.bool, device=y.device)
        for t in range(2, y.shape[1]):
            f = self.observe(y[:, :t])
            obs[:, t] = f >= 0
            y[:, t] = torch.where(obs[:, t], f, y[:, t])
        return y, obs

    def observation_mask(self, completions: Tensor) -> Tensor:
        """``(B, T)`` float: 1 at the positions the environment writes."""
        return self._observed(completions)[1].float()

    # -- end of sequence, with observations ----------------------------------------------------
    def completion_mask(self, completions: Tensor) -> Tensor:
        """``(B, T)`` 1 up to and including the first EOS of the observed episode (observations counted)."""
        return super().completion_mask(self._observed(completions)[0])

    def action_mask(self, completions: Tensor) -> Tensor:
        """``(B, T)`` 1 at the policy's own tokens: ``completion_mask`` with the observation positions zeroed."""
        y, obs = self._observed(completions)
        return super().completion_mask(y) * (~obs).float()

    def last_action(self, completions: Tensor) -> Tensor:
        """``(B,)`` the last position the policy chose (a truncated episode may end on an observation, which is
        masked: its reward would be lost to every loss that reads the per-step rewards through the mask)."""
        m = self.action_mask(completions)  # (B, T)
        T = m.shape[-1]
        return (T - 1 - m.flip(-1).argmax(-1)).long()  # the last t with m_t = 1 (every episode has one: t = 0)

    def truncated(self, completions: Tensor) -> Tensor:
        return super().truncated(self._observed(completions)[0])

    def canonical(self, completions: Tensor) -> Tensor:
        """``(B, T)`` the feasible episode: the correct observations written in, EOS padding after the first EOS."""
        return super().canonical(self._observed(completions)[0])

    @property
    def n_completions(self) -> int:
        return len(self._feasible())

    @property
    def enumerable(self) -> bool:
        A, T = self.n_actions, self.completion_len
        return (A - 1) ** T <= 100_000 and self.n_completions <= 100_000  # the count walks the tree: bound it first

    def all_completions(self) -> Tensor:
        """``(N, T)`` every feasible episode (observations written in, EOS padding), in lexicographic order."""
        if not self.enumerable:
            raise ValueError(f"task {self.name!r} is not enumerable at this size")
        return self._feasible()

    def _feasible(self) -> Tensor:
        if getattr(self, "_feasible_cache", None) is None:
            A, T = self.n_actions, self.completion_len
            rows = torch.zeros(1, 0, dtype=torch.long)
            for _t in range(T):
                f = self.observe(rows)  # (n,) forced observation or -1
                ended = (rows == self.eos_action).any(-1) if rows.shape[1] else torch.zeros(len(rows), dtype=torch.bool)
                fixed = torch.where(ended, self.eos_action, f)  # padding after the EOS, or the observation
                free = fixed < 0
                grown = [torch.cat([rows[~free], fixed[~free, None]], 1)]
                n_free = int(free.sum())
                grown.append(
                    torch.cat([rows[free].repeat_interleave(A, 0), torch.arange(A).repeat(n_free)[:, None]], 1)
                )
                rows = torch.cat(grown)
            powers = A ** torch.arange(T - 1, -1, -1)
            self._feasible_cache = rows[(rows * powers).sum(-1).argsort()]
        return self._feasible_cache

    # -- reward -------------------------------------------------------------------------------
    def parse(self, completions: Tensor) -> dict[str, Tensor]:
        """Per episode ``(B,)``: ``calls`` (complete calls), ``answer`` (the value index, -1 when the answer is
        not exactly one value token), ``called_key`` (bool ``(B, K)``: keys looked up)."""
        y, obs = self._observed(completions)
        counted = super().completion_mask(y) > 0  # (B, T)
        is_eos = y == self.eos_action
        B, T = y.shape
        pos = torch.arange(T, device=y.device).expand(B, T)
        last_obs = torch.where(obs & counted, pos, -1).max(-1).values  # (B,) -1 without a call
        first_eos = torch.where(is_eos, pos, T).min(-1).values  # (B,) T when truncated
        start = last_obs + 1
        one_token = (first_eos - start == 1) & (first_eos < T)
        tok = y.gather(1, start.clamp(max=T - 1)[:, None])[:, 0]
        answer = torch.where(one_token & (tok < self.cfg.n_values), tok, -1)
        calls = (obs & counted).sum(-1)
        keys = (y - self.first_key).clamp(0, self.cfg.n_keys - 1)
        key_before_obs = torch.zeros(B, T, dtype=torch.bool, device=y.device)
        key_before_obs[:, :-1] = obs[:, 1:] & counted[:, 1:]  # the key token right before each observation
        onehot = torch.nn.functional.one_hot(keys, self.cfg.n_keys).bool()  # (B, T, K)
        called = (onehot & key_before_obs[..., None]).any(1)  # (B, K)
        return {"calls": calls, "answer": answer, "called_key": called}

    def success(self, prompts: Tensor, completions: Tensor) -> Tensor:
        """``(B,)`` float: 1[answer == target], and for a lookup the key of the prompt was looked up."""
        p = self.parse(completions)
        target = self.targets(prompts).to(completions.device)
        right = p["answer"] == target
        key = (prompts[:, 1] - 2).clamp(0, self.cfg.n_keys - 1).to(completions.device)
        grounded = p["called_key"].gather(1, key[:, None])[:, 0]
        lookup = self.needs_tool(prompts).to(completions.device)
        return (right & (grounded | ~lookup)).float()

    def reward(self, prompts: Tensor, completions: Tensor) -> Tensor:
        """``(B,)`` r = success - c * calls (module doc)."""
        calls = self.parse(completions)["calls"].float()
        return self.success(prompts, completions) - self.cfg.call_cost * calls

    def demonstrations(self, prompts: Tensor) -> Tensor:
        """``(B, T)`` the expert: ``call k [table[k]] table[k] <end>`` for a lookup, ``v <end>`` for an echo."""
        B, T, eos = len(prompts), self.completion_len, self.eos_action
        target = self.targets(prompts).cpu()
        key = self.first_key + (prompts[:, 1].cpu() - 2).clamp(0, self.cfg.n_keys - 1)
        out = torch.full((B, T), eos, dtype=torch.long)
        lookup = self.needs_tool(prompts).cpu()
        out[:, 0] = torch.where(lookup, self.call_action, target)
        out[lookup, 1] = key[lookup]
        out[lookup, 2] = target[lookup]  # the observation
        out[lookup, 3] = target[lookup]  # the answer, copied from it
        return out.to(prompts.device)

    # -- pretraining text (the base policy) ----------------------------------------------------
    def pretraining_text(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``(n, 2)`` prompts and ``(n, T)`` episodes that hold the format and no solution.

        Drawn in this order from ``generator``: the prompts (``sample_prompts``), whether the episode
        calls (a fair coin), a key k ~ U{keys} and an answer a ~ U{values}. A calling episode reads
        ``call k [table[k]] a <end>``, the other ``a <end>``: the key is not the prompt's and the answer
        is independent of the prompt and of the observation, so the text teaches the syntax of a call
        and of an answer, not when to call, which key to look up, or to copy the observation (and the
        observation itself carries no loss: ``action_mask``, as in training).
        """
        T, eos = self.completion_len, self.eos_action
        prompts = self.sample_prompts(n, generator)
        calls = torch.rand(n, generator=generator) < 0.5  # (n,)
        keys = torch.randint(0, self.cfg.n_keys, (n,), generator=generator)  # (n,) independent of the prompt
        answers = torch.randint(0, self.cfg.n_values, (n,), generator=generator)  # (n,)
        text = torch.full((n, T), eos, dtype=torch.long)
        text[:, 0] = torch.where(calls, self.call_action, answers)
        text[calls, 1] = self.first_key + keys[calls]
        text[calls, 2] = self.table[keys[calls]]  # the observation the environment writes
        text[calls, 3] = answers[calls]
        return prompts, text

    # -- logging ------------------------------------------------------------------------------
    def turns(self, completions: Tensor) -> Tensor:
        """``(B, T)`` long: the turn of each token (1 before the first observation, 2 after it, ...), 0 where
        the token is not the policy's (observations, padding)."""
        _, obs = self._observed(completions)
        return (obs.long().cumsum(-1) + 1) * self.action_mask(completions).long()

    def episode_stats(self, prompts: Tensor, completions: Tensor, weights: Tensor | None = None) -> dict[str, float]:
        """``tool/*`` and ``episode/*`` means over episodes (``weights (B,)``: a distribution, else uniform);
        the split by whether the tool is needed is left out when no episode of that kind is present."""
        B = len(completions)
        w = torch.full((B,), 1.0 / B, dtype=torch.float64) if weights is None else weights.double().cpu()
        calls = self.parse(completions)["calls"].double().cpu()
        succ = self.success(prompts, completions).double().cpu()
        need = self.needs_tool(prompts).cpu()
        out = {
            "tool/calls_mean": (w * calls).sum().item(),
            "tool/success_rate": (w * succ).sum().item(),
            "episode/turns_mean": (w * (1 + calls)).sum().item(),
        }
        for name, sel in (("when_needed", need), ("when_not_needed", ~need)):
            if w[sel].sum() > 0:
                out[f"tool/calls_{name}"] = ((w * calls)[sel].sum() / w[sel].sum()).item()
                out[f"tool/success_{name}"] = ((w * succ)[sel].sum() / w[sel].sum()).item()
        return out

    def render(self, prompt: Tensor, completion: Tensor) -> str:
        """``lookup k1 -> call k1 [v2] v2 <end>``: observation tokens in brackets, the padding left out."""
        y, obs = self._observed(completion[None])
        n = int(self.lengths(completion[None])[0])
        words = [
            f"[{self.action_words[a]}]" if o else self.action_words[a]
            for a, o in zip(y[0, :n].tolist(), obs[0, :n].tolist(), strict=True)
        ]
        return f"{' '.join(self.prompt_words[i] for i in prompt.tolist())} -> {' '.join(words)}"
