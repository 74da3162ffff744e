"""Policies: real ``transformers`` causal LMs behind a small interface.

The algorithms never touch a model. They see

- ``policy(prompts, completions) -> PolicyOutput``: per-token log-probs ``logp (B, T)``,
  the action-restricted log-distribution ``logits (B, T, A)`` and, with a value head,
  ``values (B, T)`` where ``values[:, t]`` is V(s_t), s_t = prompt + y_<t;
- ``policy.sample(prompts, generator) -> (completions (B, T), logp (B, T))``, a sampler with an
  explicit KV cache: fixed length, or each row stopping at the task's end-of-sequence action.

Prompts and completions are task *indices* (see ``workbench.toy_tasks.base``); the policy
maps them to token ids once, through index tensors built from the tokenizer. The model's
next-token distribution is restricted to the task's action tokens (logits of other tokens
are dropped before the softmax), so pi(y | x) is a distribution over the task's
completion space and sums to one exactly where the task is enumerable.

The model is a ``GPT2LMHeadModel`` or ``LlamaForCausalLM`` built from a config sized to the
task with a word-level ``PreTrainedTokenizerFast``, or any local checkpoint directory
(``model.path``) whose tokenizer spells every task word as one token. Nothing is
downloaded. ``model.impl = "native"`` swaps the GPT-2 for ``workbench.models.native_gpt2``: the same
parameters and checkpoints in plain PyTorch, which also computes the action tokens'
logits only (``head_ids``); the interface is the same.

A run's ``precision = "bf16"`` runs the policy's passes under autocast (``Policy.autocast``,
``workbench.models.precision``); parameters and the log-probabilities returned stay float32.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..core.types import PolicyOutput
from ..toy_tasks.base import Task
from .native_gpt2 import NativeGPT2, is_native_checkpoint_compatible
from .precision import autocast_dtype, full_precision, policy_autocast

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SPECIALS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}


class ModelConfig(BaseModel):
    """The policy network. Either a tiny model built for the task, or a local checkpoint."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    path: str | None = Field(
        None, description="local checkpoint directory (save_pretrained layout); replaces the tiny model"
    )
    arch: Literal["gpt2", "llama"] = Field("gpt2", description="architecture of the tiny model")
    n_layer: int = Field(2, ge=1, le=1024, description="transformer blocks")
    n_embd: int = Field(64, ge=8, le=65_536, description="hidden width")
    n_head: int = Field(4, ge=1, le=1024, description="attention heads")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="parameter dtype")
    impl: Literal["hf", "native"] = Field(
        "hf",
        description="'hf': the transformers model; 'native': workbench.models.native_gpt2, the same GPT-2 "
        "(same weights, same checkpoints) in plain PyTorch with an explicit KV cache, about 2x faster on toy tasks "
        "(gpt2 only)",
    )


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def build_tokenizer(task: Task):
    """A word-level ``PreTrainedTokenizerFast`` over the specials and the task's words."""
    from tokenizers import Tokenizer, models, pre_tokenizers  # heavy: tokenizers loads only when a tokenizer is built
    from transformers import (
        PreTrainedTokenizerFast,  # heavy: transformers loads only when a model is built or converted
    )

    words = list(SPECIALS.values()) + task.vocab
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token=SPECIALS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIALS)


def build_model(task: Task, cfg: ModelConfig, seed: int):
    """``(model, tokenizer)``: a tiny causal LM sized to the task, or the checkpoint at ``cfg.path``."""
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )  # heavy: transformers loads only when a model is built or converted

    dtype = getattr(torch, cfg.dtype)
    if cfg.impl == "native" and cfg.arch != "gpt2":
        raise ValueError(f"model.impl 'native' is a GPT-2; arch {cfg.arch!r} needs impl 'hf'")
    if cfg.path:
        tokenizer = AutoTokenizer.from_pretrained(cfg.path, local_files_only=True)
        if cfg.impl == "native":
            if not is_native_checkpoint_compatible(cfg.path):
                raise ValueError(f"model.impl 'native' reads GPT-2 checkpoints only; {cfg.path} is not one")
            return NativeGPT2.from_pretrained(cfg.path, dtype=dtype).eval(), tokenizer
        model = AutoModelForCausalLM.from_pretrained(cfg.path, local_files_only=True, dtype=dtype)
        return model.eval(), tokenizer
    tokenizer = build_tokenizer(task)
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in SPECIALS.items() if k != "unk_token"}
    n_pos = max(64, task.prompt_len + task.completion_len + 2)
    if cfg.arch == "gpt2":
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=n_pos,
            n_embd=cfg.n_embd,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            bos_token_id=ids["bos_token"],
            eos_token_id=ids["eos_token"],
            pad_token_id=ids["pad_token"],
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,  # no dropout: logp at sampling == logp at training
        )
        cls = GPT2LMHeadModel
    else:
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.n_embd,
            intermediate_size=4 * cfg.n_embd,
            num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head,
            num_key_value_heads=cfg.n_head,
            max_position_embeddings=n_pos,
            bos_token_id=ids["bos_token"],
            eos_token_id=ids["eos_token"],
            pad_token_id=ids["pad_token"],
        )
        cls = LlamaForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config).to(dtype)
    if cfg.impl == "native":  # the same initial weights as the Hugging Face model of this seed
        model = NativeGPT2.from_hf(model)
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


class Policy(nn.Module):
    """A causal LM restricted to the task's action tokens, with an optional scalar value head."""

    def __init__(self, model, tokenizer, task: Task, value_head: bool = False, precision: str = "fp32"):
        super().__init__()
        self.model = model
        # the run's precision: "bf16" runs forward passes and sampling under autocast (workbench.models.precision)
        self.autocast_dtype = autocast_dtype(precision)
        self.tokenizer = tokenizer
        self.completion_len = task.completion_len
        self.eos_action = task.eos_action  # sampling stops per row at this action (None: fixed length)
        self.observe = task.observe if task.has_observations else None  # the environment's forced tokens (tool_use)
        bos = tokenizer.bos_token_id
        self.register_buffer(
            "prefix_ids", torch.tensor([] if bos is None else [bos], dtype=torch.long), persistent=False
        )
        self.register_buffer("prompt_ids", torch.tensor(word_ids(tokenizer, task.prompt_words)), persistent=False)
        self.register_buffer("action_ids", torch.tensor(word_ids(tokenizer, task.action_words)), persistent=False)
        # the KV cache's keyword: `cache` from transformers 5.2x (and the native GPT-2), `past_key_values` before
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        hidden = model.config.get_text_config().hidden_size
        self.value_head = nn.Linear(hidden, 1) if value_head else None
        if self.value_head is not None:
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    @property
    def device(self) -> torch.device:
        return self.action_ids.device

    def input_ids(self, prompts: Tensor, completions: Tensor | None = None) -> Tensor:
        """``(B, 1 + Tp [+ T])`` token ids: BOS, prompt, completion (any leading dims: ``(S, B, ...)`` too)."""
        parts = [self.prefix_ids.expand(*prompts.shape[:-1], -1), self.prompt_ids[prompts]]
        if completions is not None:
            parts.append(self.action_ids[completions])
        return torch.cat(parts, dim=-1)

    def forward(self, prompts: Tensor, completions: Tensor, values: bool | None = None) -> PolicyOutput:
        """Teacher-forced pass: log-probs of ``completions (B, T)`` given ``prompts (B, Tp)``."""
        want_values = self.value_head is not None if values is None else values
        T = completions.shape[-1]
        # BOS, prompt, y_<T: the last token y_T predicts nothing scored, and causal attention means
        # no earlier position sees it, so it is not fed. The last T positions then predict y_1..y_T.
        ids = self.input_ids(prompts, completions)[..., :-1]
        with self.autocast():
            out = self.model(
                input_ids=ids, output_hidden_states=want_values, use_cache=False, logits_to_keep=T, **self._head()
            )
            v = None
            if want_values:
                h = out.hidden_states[-1][..., -T:, :]  # the last token of s_t = prompt + y_<t
                v = self.value_head(h).squeeze(-1).float()  # (B, T)
        logits = F.log_softmax(self._action_logits(out.logits[..., -T:, :]), dim=-1)  # (B, T, A) float32
        logp = logits.gather(-1, completions.unsqueeze(-1)).squeeze(-1)  # (B, T)
        return PolicyOutput(logp=logp, logits=logits, values=v)

    def autocast(self):
        """The region of this policy's model calls: autocast to its precision's dtype (none for fp32, and none
        inside ``workbench.models.precision.full_precision``, where exact metrics are computed)."""
        return policy_autocast(self.device, self.autocast_dtype)

    def sample(
        self, prompts: Tensor, generator: torch.Generator | list[torch.Generator], temperature: float = 1.0
    ) -> tuple[Tensor, Tensor]:
        """Sample ``completion_len`` tokens with a KV cache. Returns ``(completions, logp)``, each ``(B, T)``.

        With an EOS action (``task.eos_action``) a row stops at its first EOS: its later tokens are
        padding (the EOS action, log-prob 0), and sampling ends once every row has stopped. A task with
        observations (``task.observe``) writes its forced tokens in place of the draw (log-prob 0).

        ``logp`` is log pi at temperature 1 (the policy's own probabilities), whatever
        ``temperature`` was used to draw the tokens. A stacked model (seeds as a batch
        dimension) takes prompts ``(S, B, Tp)`` and one generator per seed.
        """
        # inference mode: lighter than no_grad per operation, the results are cloned out of it; autocast: the
        # model calls of the run's precision (the log-softmax and the Gumbel-max draw are float32)
        with torch.inference_mode(), self.autocast():
            comps, logp = self._sample(prompts, generator, temperature)
        return comps.clone(), logp.clone()

    def _sample(self, prompts: Tensor, generator, temperature: float) -> tuple[Tensor, Tensor]:
        ids = self.input_ids(prompts)
        T, A = self.completion_len, len(self.action_ids)
        # Gumbel-max: argmax_a (z_a + g_a), g ~ Gumbel(0, 1), is a draw from softmax(z); all noise drawn at once
        shape = (*ids.shape[:-1], T, A)
        if isinstance(generator, torch.Generator):
            u = torch.rand(shape, generator=generator, device=ids.device)
        else:  # seed s draws its noise from its own generator, as it would alone
            u = torch.stack([torch.rand(shape[1:], generator=g, device=ids.device) for g in generator])
        gumbel = -torch.log(-torch.log(u))  # (B, T, A)
        cache = None
        comps, logps = [], []
        native = {"max_length": ids.shape[-1] + T, **self._head()} if self._head() else {}
        eos = self.eos_action
        done = None  # (B, 1) rows that have emitted EOS, with an EOS action
        for t in range(T):
            if done is not None and bool(done.all()):  # every row has stopped: the rest is padding
                pad = torch.full((*done.shape[:-1], T - t), eos, dtype=torch.long, device=done.device)
                comps.append(pad)
                logps.append(torch.zeros(pad.shape, device=done.device))
                break
            out = self.model(input_ids=ids, use_cache=t < T - 1, logits_to_keep=1, **{self._cache_kw: cache}, **native)
            cache = out.cache if hasattr(out, "cache") else out.past_key_values  # the output's name moved as well
            logits = F.log_softmax(self._action_logits(out.logits[..., -1, :]), dim=-1)  # (B, A) log pi(. | s_t)
            z = logits if temperature == 1.0 else logits / temperature
            y = (z + gumbel[..., t, :]).argmax(-1, keepdim=True)  # (B, 1) y_t ~ softmax(z)
            lp = logits.gather(-1, y)
            if self.observe is not None:  # an observation: the environment writes it (log-prob 0, no choice)
                forced = self.observe(torch.cat(comps, dim=-1) if comps else y[..., :0])[..., None]  # (B, 1)
                y, lp = torch.where(forced >= 0, forced, y), lp.masked_fill(forced >= 0, 0.0)
            if eos is not None:
                if done is not None:  # after EOS: padding, which is no choice (log-prob 0)
                    y = y.masked_fill(done, eos)
                    lp = lp.masked_fill(done, 0.0)
                    done = done | (y == eos)
                else:
                    done = y == eos
            comps.append(y)
            logps.append(lp)
            ids = self.action_ids[y]
        return torch.cat(comps, dim=-1), torch.cat(logps, dim=-1)

    @property
    def has_prefix_tree(self) -> bool:
        """Whether ``completion_logprobs`` can enumerate with a KV-cached prefix tree (native GPT-2)."""
        return getattr(self.model, "supports_head_ids", False)

    def completion_logprobs(self, prompts: Tensor, chunk: int = 4096) -> Tensor:
        """``(P, A ** T)`` log pi(y | x) of every completion (lexicographic order) by a KV-cached prefix tree;
        with an EOS action ``(P, N)`` over the canonical completions (``task.all_completions()``, ``_expand_eos``).

        Each node of the tree is a prefix y_<=t; feeding y_t once, on top of its parent's cached
        keys and values, gives log pi(. | x, y_<=t) for all A children. Sum_t P A^t tokens are fed
        instead of A^(T-1) full sequences. At most ``chunk`` rows are expanded at once.
        Differentiable when called with gradients enabled.
        """
        P, A, T = prompts.shape[0], len(self.action_ids), self.completion_len
        ids = self.input_ids(prompts)  # (P, 1 + Tp)
        with self.autocast():  # as every pass of the policy; exact metrics call it inside full_precision
            out = self.model(
                input_ids=ids, use_cache=True, logits_to_keep=1, max_length=ids.shape[1] + T, **self._head()
            )
            cache = out.cache
            lp = F.log_softmax(self._action_logits(out.logits[:, -1]), dim=-1)  # (P, A) log pi(y_1 | x)
            if self.eos_action is not None:  # canonical completions: EOS nodes are terminal
                return self._expand_eos(cache, torch.zeros(P, device=ids.device), lp, 1, chunk).view(P, -1)
            return self._expand(cache, torch.zeros(P, device=ids.device), lp, 1, chunk).view(P, A**T)

    def _expand(self, cache, head: Tensor, lp: Tensor, t: int, chunk: int) -> Tensor:
        """Nodes: N prefixes of length t - 1 (fed, in ``cache``), log pi of each ``head (N,)`` and of the
        next token ``lp (N, A)``. Returns log pi of every completion below them, ``(N * A^(T-t+1),)``."""
        N, A = lp.shape
        heads = (head[:, None] + lp).reshape(-1)  # (N A,) log pi(y_<=t)
        if t == self.completion_len:
            return heads
        parts = []
        step = max(1, chunk // A)
        for s in range(0, N, step):  # children of parents s .. s + step - 1, in order
            rows = slice(s, min(N, s + step))
            n = rows.stop - rows.start
            child = cache.repeat_interleave(A, rows)  # (n A) rows, each its parent's keys/values
            tokens = self.action_ids.repeat(n)[:, None]  # child j of a parent feeds action j
            out = self.model(input_ids=tokens, cache=child, use_cache=True, logits_to_keep=1, **self._head())
            lp_next = F.log_softmax(self._action_logits(out.logits[:, -1]), dim=-1)  # (n A, A)
            parts.append(self._expand(out.cache, heads[s * A : (s + n) * A], lp_next, t + 1, chunk))
        return torch.cat(parts)

    def _expand_eos(self, cache, head: Tensor, lp: Tensor, t: int, chunk: int) -> Tensor:
        """``_expand`` with an EOS action: a child whose token is EOS is terminal (its log pi(y_<=t) is final, the
        padding after it is no choice), only the A - 1 others are fed and expanded. Every canonical completion's
        prefixes are visited once; each parent's completions come out in action order, the EOS leaf at its index
        among them, which is the lexicographic order of ``task.all_completions()``."""
        N, A = lp.shape
        eos = self.eos_action
        heads = head[:, None] + lp  # (N, A) log pi(y_<=t)
        if t == self.completion_len:
            return heads.reshape(-1)
        keep = torch.tensor([a for a in range(A) if a != eos], device=lp.device)  # the non-EOS actions, in order
        K = A - 1
        live = heads.index_select(1, keep)  # (N, K) the children that are expanded
        tokens_k = self.action_ids.index_select(0, keep)
        parts = []
        step = max(1, chunk // K)
        for s in range(0, N, step):  # children of parents s .. s + step - 1, in order
            rows = slice(s, min(N, s + step))
            n = rows.stop - rows.start
            child = cache.repeat_interleave(K, rows)  # (n K) rows, each its parent's keys/values
            tokens = tokens_k.repeat(n)[:, None]
            out = self.model(input_ids=tokens, cache=child, use_cache=True, logits_to_keep=1, **self._head())
            lp_next = F.log_softmax(self._action_logits(out.logits[:, -1]), dim=-1)  # (n K, A)
            sub = self._expand_eos(out.cache, live[rows].reshape(-1), lp_next, t + 1, chunk).view(n, K, -1)
            leaf = heads[rows, eos : eos + 1]  # (n, 1) y_t = EOS: terminal
            parts.append(torch.cat([sub[:, :eos].flatten(1), leaf, sub[:, eos:].flatten(1)], dim=1).reshape(-1))
        return torch.cat(parts)

    def _head(self) -> dict:
        """Models that can (``workbench.models.native_gpt2``) compute the action tokens' logits only."""
        return {"head_ids": self.action_ids} if getattr(self.model, "supports_head_ids", False) else {}

    def _action_logits(self, logits: Tensor) -> Tensor:
        """``(..., V)`` or, from a model given ``head_ids``, already ``(..., A)`` -> ``(..., A)`` in float32."""
        if not getattr(self.model, "supports_head_ids", False):
            logits = logits.index_select(-1, self.action_ids)
        return logits.float()

    def frozen_copy(self) -> Policy:
        """A frozen copy without value head: the reference policy."""
        ref = copy.deepcopy(self)
        ref.value_head = None
        ref.requires_grad_(False)
        ref.eval()
        return ref

    def save(self, path: str | Path) -> None:
        """Write a Hugging Face checkpoint directory (+ ``value_head.safetensors``)."""
        from transformers.utils import (
            logging as hf_logging,  # heavy: transformers loads only when a model is built or converted
        )

        hf_logging.disable_progress_bar()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        if self.value_head is not None:
            save_file(
                {k: v.contiguous() for k, v in self.value_head.state_dict().items()}, path / "value_head.safetensors"
            )

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
        self.register_buffer(
            "prefix_ids", torch.tensor([] if bos is None else [bos], dtype=torch.long), persistent=False
        )
        self.register_buffer("prompt_ids", torch.tensor(word_ids(tokenizer, task.prompt_words)), persistent=False)
        self.register_buffer("action_ids", torch.tensor(word_ids(tokenizer, task.action_words)), persistent=False)

    input_ids = Policy.input_ids

    def forward(self, prompts: Tensor, completions: Tensor) -> Tensor:
        ids = self.input_ids(prompts, completions)
        return self.model(input_ids=ids).logits[:, -1].float()  # (B,)

    def save(self, path: str | Path) -> None:
        from transformers.utils import (
            logging as hf_logging,  # heavy: transformers loads only when a model is built or converted
        )

        hf_logging.disable_progress_bar()
        Path(path).mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)


def build_reward_model(task: Task, cfg: ModelConfig, seed: int, path: str | None = None) -> RewardModel:
    """A sequence-classification model with one output, tiny or loaded from ``path``."""
    from transformers import (  # heavy: transformers loads only when a model is built or converted
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

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


def build_policy(
    task: Task, cfg: ModelConfig, seed: int, value_head: bool, device: torch.device, precision: str = "fp32"
) -> Policy:
    """The run's policy; ``precision`` is the run's (``RunConfig.precision``): "bf16" autocasts its passes."""
    model, tok = build_model(task, cfg, seed)
    policy = Policy(model, tok, task, value_head=value_head, precision=precision).to(device)
    if cfg.path:
        policy.load_value_head(cfg.path)
    elif task.reference_prior() is not None:
        fit_prior(policy, task, seed)
    return policy


_PRIOR_FITS: OrderedDict[str, tuple[dict[str, torch.Tensor], float]] = OrderedDict()
PRIOR_FITS_KEPT = 16  # fitted weights kept per process (a study's runs of one seed share them)


def _fit_key(params: dict[str, torch.Tensor], *inputs) -> str:
    """A digest of everything the fit depends on: the initial weights (bit for bit), the prior, the prompts,
    the fit's settings, and the thread count and device (which can change float rounding)."""
    h = hashlib.sha256(repr((torch.get_num_threads(), [str(x) for x in inputs if not torch.is_tensor(x)])).encode())
    for name, t in list(params.items()) + [(f"input{i}", x) for i, x in enumerate(inputs) if torch.is_tensor(x)]:
        h.update(f"{name}{tuple(t.shape)}{t.dtype}{t.device}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fit_prior(policy: Policy, task: Task, seed: int, steps: int = 300, lr: float = 1e-2) -> float:
    """Fit a fresh tiny model to the task's reference prior, so pi_ref puts its mass where the task says.

    Minimises E_x KL(prior(.|x) || pi(.|x)) over the first completion token (full-batch
    Adam, deterministic); returns the final KL. Used by tasks whose question needs a
    reference policy with a known shape, e.g. a reward peak far from the reference's mass.

    The fit is a pure function of its inputs (it draws no random numbers), so its result is kept
    per process, keyed by a digest of the initial weights, the prior, the prompts and the settings:
    the runs of one seed in a study (every algorithm) start from the same fitted weights, bit for bit,
    and fit them once (``PRIOR_FITS_KEPT`` kept).
    """
    prior = task.reference_prior().to(policy.device)  # (P, A) log-probs of the first token
    prompts = task.eval_prompts().to(policy.device)
    first = torch.zeros(len(prompts), 1, dtype=torch.long, device=policy.device)
    named = {n: p for n, p in policy.named_parameters() if not n.startswith("value_head")}
    key = _fit_key(named, prior, prompts, steps, lr)
    if key in _PRIOR_FITS:
        weights, kl = _PRIOR_FITS[key]
        _PRIOR_FITS.move_to_end(key)
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(weights[n])
        return kl
    opt = torch.optim.Adam(list(named.values()), lr=lr)
    with full_precision(policy.device):  # the initial weights: the same whatever the run's precision
        for _ in range(steps):
            logq = policy(prompts, first, values=False).logits[:, 0]  # (P, A)
            loss = (prior.exp() * (prior - logq)).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    opt.zero_grad(set_to_none=True)  # no gradient left behind: a cached fit leaves none either
    _PRIOR_FITS[key] = ({n: p.detach().clone() for n, p in named.items()}, loss.item())
    while len(_PRIOR_FITS) > PRIOR_FITS_KEPT:
        _PRIOR_FITS.popitem(last=False)
    return loss.item()


def describe(policy: Policy) -> dict:
    """Architecture summary for ``config.json``."""
    n = sum(p.numel() for p in policy.parameters())
    return {
        "class": type(policy.model).__name__,
        "n_params": n,
        "config": json.loads(policy.model.config.to_json_string()),
    }
