"""Policies: real ``transformers`` causal LMs behind a small interface.

The algorithms never touch a model. They see

- ``policy(prompts, completions) -> PolicyOutput``: per-token log-probs ``logp (B, T)``,
  the action-restricted log-distribution ``logits (B, T, A)`` and, with a value head,
  ``values (B, T)`` where ``values[:, t]`` is V(s_t), s_t = prompt + y_<t;
- ``policy.sample(prompts, generator) -> (completions (B, T), logp (B, T))``, a fixed-length
  sampler with an explicit KV cache.

Prompts and completions are task *indices* (see ``workbench.toy_tasks.base``); the policy
maps them to token ids once, through index tensors built from the tokenizer. The model's
next-token distribution is restricted to the task's action tokens (logits of other tokens
are dropped before the softmax), so pi(y | x) is a distribution over the task's
completion space and sums to one exactly where the task is enumerable.

The model is a ``GPT2LMHeadModel`` or ``LlamaForCausalLM`` built from a config sized to the
task with a word-level ``PreTrainedTokenizerFast``, or any local checkpoint directory
(``model.path``) whose tokenizer spells every task word as one token. Nothing is
downloaded.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .toy_tasks.base import Task

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SPECIALS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}


class ModelConfig(BaseModel):
    """The policy network. Either a tiny model built for the task, or a local checkpoint."""

    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(None, description="local checkpoint directory (save_pretrained layout); replaces the tiny model")
    arch: Literal["gpt2", "llama"] = Field("gpt2", description="architecture of the tiny model")
    n_layer: int = Field(2, ge=1, description="transformer blocks")
    n_embd: int = Field(64, ge=8, description="hidden width")
    n_head: int = Field(4, ge=1, description="attention heads")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="parameter dtype")


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def build_tokenizer(task: Task):
    """A word-level ``PreTrainedTokenizerFast`` over the specials and the task's words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(SPECIALS.values()) + task.vocab
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token=SPECIALS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIALS)


def build_model(task: Task, cfg: ModelConfig, seed: int):
    """``(model, tokenizer)``: a tiny causal LM sized to the task, or the checkpoint at ``cfg.path``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    dtype = getattr(torch, cfg.dtype)
    if cfg.path:
        tokenizer = AutoTokenizer.from_pretrained(cfg.path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(cfg.path, local_files_only=True, dtype=dtype)
        return model.eval(), tokenizer
    tokenizer = build_tokenizer(task)
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in SPECIALS.items() if k != "unk_token"}
    n_pos = max(64, task.prompt_len + task.completion_len + 2)
    if cfg.arch == "gpt2":
        config = GPT2Config(
            vocab_size=len(tokenizer), n_positions=n_pos, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
            bos_token_id=ids["bos_token"], eos_token_id=ids["eos_token"], pad_token_id=ids["pad_token"],
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # no dropout: logp at sampling == logp at training
        )  # fmt: skip
        cls = GPT2LMHeadModel
    else:
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=cfg.n_embd, intermediate_size=4 * cfg.n_embd,
            num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head,
            max_position_embeddings=n_pos, bos_token_id=ids["bos_token"], eos_token_id=ids["eos_token"],
            pad_token_id=ids["pad_token"],
        )  # fmt: skip
        cls = LlamaForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config).to(dtype)
    return model.eval(), tokenizer


def word_ids(tokenizer, words: list[str]) -> list[int]:
    """Token id of each task word; a word the tokenizer splits or does not know is an error."""
    out = []
    unk = tokenizer.unk_token_id
    for w in words:
        tid = tokenizer.convert_tokens_to_ids(w)
        if tid is None or tid == unk:
            enc = tokenizer.encode(" " + w, add_special_tokens=False)
            if len(enc) != 1 or enc[0] == unk:
                raise ValueError(f"task word {w!r} is not a single token of this tokenizer (got {len(enc)} tokens)")
            tid = enc[0]
        out.append(int(tid))
    return out


@dataclass
class PolicyOutput:
    logp: Tensor  # (B, T) log pi(y_t | s_t) of the given completion
    logits: Tensor  # (B, T, A) log pi(. | s_t) over the action set
    values: Tensor | None  # (B, T) V(s_t), or None without a value head


class Policy(nn.Module):
    """A causal LM restricted to the task's action tokens, with an optional scalar value head."""

    def __init__(self, model, tokenizer, task: Task, value_head: bool = False):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.completion_len = task.completion_len
        bos = tokenizer.bos_token_id
        self.register_buffer("prefix_ids", torch.tensor([] if bos is None else [bos], dtype=torch.long), persistent=False)
        self.register_buffer("prompt_ids", torch.tensor(word_ids(tokenizer, task.prompt_words)), persistent=False)
        self.register_buffer("action_ids", torch.tensor(word_ids(tokenizer, task.action_words)), persistent=False)
        hidden = model.config.get_text_config().hidden_size
        self.value_head = nn.Linear(hidden, 1) if value_head else None
        if self.value_head is not None:
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    @property
    def device(self) -> torch.device:
        return self.action_ids.device

    def input_ids(self, prompts: Tensor, completions: Tensor | None = None) -> Tensor:
        """``(B, 1 + Tp [+ T])`` token ids: BOS, prompt, completion."""
        B = prompts.shape[0]
        parts = [self.prefix_ids.expand(B, -1), self.prompt_ids[prompts]]
        if completions is not None:
            parts.append(self.action_ids[completions])
        return torch.cat(parts, dim=1)

    def forward(self, prompts: Tensor, completions: Tensor, values: bool | None = None) -> PolicyOutput:
        """Teacher-forced pass: log-probs of ``completions (B, T)`` given ``prompts (B, Tp)``."""
        want_values = self.value_head is not None if values is None else values
        ids = self.input_ids(prompts, completions)
        T = completions.shape[1]
        out = self.model(input_ids=ids, output_hidden_states=want_values, use_cache=False)
        start = ids.shape[1] - T - 1  # logits at position start + t predict y_t
        logits = out.logits[:, start : start + T, :].index_select(-1, self.action_ids).float()
        logits = F.log_softmax(logits, dim=-1)  # (B, T, A)
        logp = logits.gather(-1, completions.unsqueeze(-1)).squeeze(-1)  # (B, T)
        v = None
        if want_values:
            h = out.hidden_states[-1][:, start : start + T, :]
            v = self.value_head(h).squeeze(-1).float()  # (B, T)
        return PolicyOutput(logp=logp, logits=logits, values=v)

    @torch.no_grad()
    def sample(self, prompts: Tensor, generator: torch.Generator, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
        """Sample ``completion_len`` tokens with a KV cache. Returns ``(completions, logp)``, each ``(B, T)``.

        ``logp`` is log pi at temperature 1 (the policy's own probabilities), whatever
        ``temperature`` was used to draw the tokens.
        """
        ids = self.input_ids(prompts)
        cache = None
        comps, logps = [], []
        for _ in range(self.completion_len):
            out = self.model(input_ids=ids, cache=cache, use_cache=True)
            cache = out.cache
            logits = F.log_softmax(out.logits[:, -1, :].index_select(-1, self.action_ids).float(), dim=-1)  # (B, A)
            probs = torch.softmax(logits / temperature, dim=-1) if temperature != 1.0 else logits.exp()
            y = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
            comps.append(y)
            logps.append(logits.gather(-1, y))
            ids = self.action_ids[y]
        return torch.cat(comps, dim=1), torch.cat(logps, dim=1)

    def frozen_copy(self) -> Policy:
        """A frozen copy without value head: the reference policy."""
        ref = copy.deepcopy(self)
        ref.value_head = None
        ref.requires_grad_(False)
        ref.eval()
        return ref

    def save(self, path: str | Path) -> None:
        """Write a Hugging Face checkpoint directory (+ ``value_head.safetensors``)."""
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        if self.value_head is not None:
            save_file({k: v.contiguous() for k, v in self.value_head.state_dict().items()}, path / "value_head.safetensors")

    def load_value_head(self, path: str | Path) -> bool:
        f = Path(path) / "value_head.safetensors"
        if self.value_head is None or not f.exists():
            return False
        self.value_head.load_state_dict(load_file(f))
        return True


class RewardModel(nn.Module):
    """A Bradley-Terry reward model: ``GPT2ForSequenceClassification`` (1 label) on prompt + completion.

    ``rm(prompts (B, Tp), completions (B, T)) -> (B,)`` scalar scores read at the last token.
    """

    def __init__(self, model, tokenizer, task: Task):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        bos = tokenizer.bos_token_id
        self.register_buffer("prefix_ids", torch.tensor([] if bos is None else [bos], dtype=torch.long), persistent=False)
        self.register_buffer("prompt_ids", torch.tensor(word_ids(tokenizer, task.prompt_words)), persistent=False)
        self.register_buffer("action_ids", torch.tensor(word_ids(tokenizer, task.action_words)), persistent=False)

    input_ids = Policy.input_ids

    def forward(self, prompts: Tensor, completions: Tensor) -> Tensor:
        ids = self.input_ids(prompts, completions)
        return self.model(input_ids=ids).logits[:, -1].float()  # (B,)

    def save(self, path: str | Path) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        Path(path).mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)


def build_reward_model(task: Task, cfg: ModelConfig, seed: int, path: str | None = None) -> RewardModel:
    """A sequence-classification model with one output, tiny or loaded from ``path``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if path:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True, num_labels=1)
        return RewardModel(model, tok, task)
    lm, tok = build_model(task, cfg, seed)
    config = copy.deepcopy(lm.config)
    config.num_labels = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_config(config)
    return RewardModel(model.eval(), tok, task)


def build_policy(task: Task, cfg: ModelConfig, seed: int, value_head: bool, device: torch.device) -> Policy:
    model, tok = build_model(task, cfg, seed)
    policy = Policy(model, tok, task, value_head=value_head).to(device)
    if cfg.path:
        policy.load_value_head(cfg.path)
    elif task.reference_prior() is not None:
        fit_prior(policy, task, seed)
    return policy


def fit_prior(policy: Policy, task: Task, seed: int, steps: int = 300, lr: float = 1e-2) -> float:
    """Fit a fresh tiny model to the task's reference prior, so pi_ref puts its mass where the task says.

    Minimises E_x KL(prior(.|x) || pi(.|x)) over the first completion token (full-batch
    Adam, deterministic); returns the final KL. Used by tasks whose question needs a
    reference policy with a known shape, e.g. a reward peak far from the reference's mass.
    """
    prior = task.reference_prior().to(policy.device)  # (P, A) log-probs of the first token
    prompts = task.eval_prompts().to(policy.device)
    first = torch.zeros(len(prompts), 1, dtype=torch.long, device=policy.device)
    params = [p for n, p in policy.named_parameters() if not n.startswith("value_head")]
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        logq = policy(prompts, first, values=False).logits[:, 0]  # (P, A)
        loss = (prior.exp() * (prior - logq)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return loss.item()


def describe(policy: Policy) -> dict:
    """Architecture summary for ``config.json``."""
    n = sum(p.numel() for p in policy.parameters())
    return {"class": type(policy.model).__name__, "n_params": n, "config": json.loads(policy.model.config.to_json_string())}
