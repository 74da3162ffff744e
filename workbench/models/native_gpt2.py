"""A minimal plain-PyTorch GPT-2 with an explicit KV cache: the fast path for toy tasks.

Same parameter names and shapes as ``transformers.GPT2LMHeadModel`` (``transformer.wte``,
``transformer.h.<i>.attn.c_attn`` with Conv1D ``(in, out)`` weights, ..., ``lm_head`` tied to
``wte``), so one ``state_dict`` loads into either, and checkpoints convert both ways: a
directory written by ``NativeGPT2.save_pretrained`` is a Hugging Face checkpoint that
``GPT2LMHeadModel.from_pretrained`` (and so TRL) reads, and ``NativeGPT2.from_pretrained``
reads one that Hugging Face wrote. ``tests/test_native_gpt2.py`` checks identical logits.

Per block, with x (B, L, d), H heads of width D = d / H:

    q, k, v = split(LN_1(x) W_attn + b_attn)                         (B, H, L, D) each
    a       = softmax(q k^T / sqrt(D) + causal mask) v                (B, H, L, D)
    x       = x + merge(a) W_proj + b_proj
    x       = x + gelu_tanh(LN_2(x) W_fc + b_fc) W_mproj + b_mproj

and logits = LN_f(x) wte^T. What makes it fast on a CPU is what it leaves out: no mask
building, no output capturing, no cache objects with hooks; a decode step is the dozen
matmuls above on ``(B, 1, d)`` against the cached ``(B, H, L, D)`` keys and values.

The call signature mirrors the Hugging Face one the ``Policy`` uses:
``model(input_ids, cache=None, use_cache=False, output_hidden_states=False)`` returns an
object with ``.logits (B, L, V)``, ``.cache`` (a ``KVCache``) and ``.hidden_states``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

WEIGHTS = "model.safetensors"


class KVCache:
    """Keys and values of every layer in preallocated buffers ``(B, capacity, H, D)``; the first
    ``length`` positions are filled. A forward pass given the cache writes its new positions in
    place and returns the same object."""

    def __init__(self, keys: list[Tensor], values: list[Tensor], length: int = 0):
        self.keys, self.values, self.length = keys, values, length

    @classmethod
    def empty(cls, n_layer: int, B: int, H: int, capacity: int, D: int, like: Tensor) -> KVCache:
        new = lambda: like.new_empty(B, capacity, H, D)  # noqa: E731
        return cls([new() for _ in range(n_layer)], [new() for _ in range(n_layer)])

    def repeat_interleave(self, n: int, rows: slice = slice(None), capacity: int | None = None) -> KVCache:
        """``rows`` of this cache, each repeated ``n`` times (row i -> rows i*n .. i*n+n-1): the children
        of prefix-tree nodes. ``capacity``: positions of the new buffers (default: the same)."""
        B, cap, H, D = self.keys[0][rows].shape
        out = KVCache.empty(len(self.keys), B * n, H, capacity or cap, D, like=self.keys[0])
        for src, dst in zip(self.keys + self.values, out.keys + out.values, strict=True):
            dst[:, : self.length] = src[rows, : self.length].repeat_interleave(n, 0)
        out.length = self.length
        return out


@dataclass
class NativeOutput:
    logits: Tensor  # (B, L, V)
    cache: KVCache | None
    hidden_states: tuple[Tensor, ...] | None  # embeddings, each block's output, LN_f(last) (as Hugging Face)


class Conv1D(nn.Module):
    """``y = x W + b`` with ``W`` stored ``(in, out)``, as GPT-2's Conv1D."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: Tensor) -> Tensor:
        return _linear(x, self)


class Attention(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.c_attn = Conv1D(d, 3 * d)
        self.c_proj = Conv1D(d, d)


class MLP(nn.Module):
    def __init__(self, d: int, inner: int):
        super().__init__()
        self.c_fc = Conv1D(d, inner)
        self.c_proj = Conv1D(inner, d)


class Block(nn.Module):
    def __init__(self, d: int, n_head: int, inner: int, eps: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d, eps=eps)
        self.attn = Attention(d, n_head)
        self.ln_2 = nn.LayerNorm(d, eps=eps)
        self.mlp = MLP(d, inner)


class Trunk(nn.Module):
    def __init__(self, config):
        super().__init__()
        d, inner = config.n_embd, config.n_inner or 4 * config.n_embd
        self.wte = nn.Embedding(config.vocab_size, d)
        self.wpe = nn.Embedding(config.n_positions, d)
        self.h = nn.ModuleList(Block(d, config.n_head, inner, config.layer_norm_epsilon) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(d, eps=config.layer_norm_epsilon)


def _linear(x: Tensor, m: Conv1D) -> Tensor:
    """``x W + b``; with stacked weights ``(S, in, out)``, x is ``(S, ..., in)`` and each seed uses its own."""
    if m.weight.dim() == 2:
        return torch.addmm(m.bias, x.reshape(-1, x.shape[-1]), m.weight).view(*x.shape[:-1], -1)
    S = m.weight.shape[0]
    return torch.baddbmm(m.bias.unsqueeze(1), x.reshape(S, -1, x.shape[-1]), m.weight).view(*x.shape[:-1], -1)


def _ln(x: Tensor, m: nn.LayerNorm) -> Tensor:
    if m.weight.dim() == 1:
        return F.layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps)
    shape = (m.weight.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)  # stacked (S, d) -> (S, 1, .., d)
    return torch.addcmul(m.bias.view(shape), F.layer_norm(x, m.normalized_shape, eps=m.eps), m.weight.view(shape))


def gelu_new(x: Tensor) -> Tensor:
    """GPT-2's activation 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), computed as x sigmoid(2u)
    (the same function: 1 + tanh(u) = 2 sigmoid(2u)) in one buffer, since torch's CPU tanh is slow. The
    backward is torch's own ``gelu_backward``. Below 2^18 elements ``F.gelu`` is as fast (measured)."""
    if x.numel() < 262144:
        return F.gelu(x, approximate="tanh")
    if torch.is_grad_enabled() and x.requires_grad:
        return _GeluNew.apply(x)
    return _gelu_as_sigmoid(x)


def _gelu_as_sigmoid(x: Tensor) -> Tensor:
    s = x * x
    s.mul_(0.044715).add_(1.0).mul_(x).mul_(2 * math.sqrt(2 / math.pi))  # 2u = 2 sqrt(2/pi) x (1 + 0.044715 x^2)
    return s.sigmoid_().mul_(x)  # x sigmoid(2u)


class _GeluNew(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return _gelu_as_sigmoid(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return torch.ops.aten.gelu_backward(grad, x, approximate="tanh")


def _block(b: Block, x: Tensor, cache: tuple[Tensor, Tensor, int] | None) -> Tensor:
    """One transformer block on ``x (..., L, d)``; ``cache``: key and value buffers ``(N, capacity, H, D)``
    (N = the product of the leading dims) with ``P`` positions filled, where this call writes
    positions ``P .. P + L - 1``.

    The parameters are read directly (no submodule calls): at toy sizes the per-call
    overhead of ``nn.Module`` is a large part of a decode step.
    """
    *lead, L, d = x.shape
    H = b.attn.n_head
    q, k, v = _linear(_ln(x, b.ln_1), b.attn.c_attn).view(-1, L, 3, H, d // H).unbind(2)  # (N, L, H, D) each
    P = 0
    if cache is not None:
        keys, values, P = cache
        keys[:, P : P + L] = k
        values[:, P : P + L] = v
        k, v = keys[:, : P + L], values[:, : P + L]  # (N, P + L, H, D)
    if L == 1 and P > 0:  # decode: one new token sees every position; elementwise beats a batched tiny matmul
        s = (k * q).sum(-1, keepdim=True) * (1.0 / math.sqrt(d // H))  # (N, P + 1, H, 1) q.k / sqrt(D)
        a = (s.softmax(dim=1) * v).sum(1, keepdim=True)  # (N, 1, H, D)
    else:
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (N, H, L, D)
        if P == 0:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # L new tokens after P cached ones: token i sees positions <= P + i
            mask = torch.ones(L, P + L, dtype=torch.bool, device=x.device).tril(diagonal=P)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        a = a.transpose(1, 2)  # (N, L, H, D)
    x = x + _linear(a.reshape(*lead, L, d), b.attn.c_proj)
    h = gelu_new(_linear(_ln(x, b.ln_2), b.mlp.c_fc))
    return x + _linear(h, b.mlp.c_proj)


class NativeGPT2(nn.Module):
    """GPT-2 language model; ``config`` is a ``transformers.GPT2Config`` (kept for saving and summaries)."""

    supports_head_ids = True  # forward(head_ids=...) computes the logits of those tokens only

    def __init__(self, config):
        super().__init__()
        unsupported = {
            "activation_function": "gelu_new",
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "add_cross_attention": False,
            "tie_word_embeddings": True,
        }
        for key, want in unsupported.items():
            if getattr(config, key, want) != want:
                raise ValueError(f"native GPT-2 supports {key}={want!r} only, got {getattr(config, key)!r}")
        self.config = config
        self.transformer = Trunk(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as GPT2LMHeadModel

    def forward(
        self,
        input_ids: Tensor,
        cache: KVCache | None = None,
        use_cache: bool = False,
        output_hidden_states: bool = False,
        logits_to_keep: int = 0,
        head_ids: Tensor | None = None,
        max_length: int | None = None,
        **unused,
    ) -> NativeOutput:
        """``input_ids (B, L)`` continuing the positions in ``cache`` (if any).

        ``logits_to_keep = n > 0``: logits of the last n positions only (as Hugging Face);
        ``head_ids (A,)``: logits of those token ids only, ``(B, L, A)``; ``max_length``: positions
        a new cache holds (default ``n_positions``; a tight one avoids touching fresh memory).
        """
        tr = self.transformer
        L = input_ids.shape[-1]
        if use_cache and cache is None:
            c = self.config
            cap = max_length or c.n_positions
            N = input_ids.numel() // L
            cache = KVCache.empty(c.n_layer, N, c.n_head, cap, c.n_embd // c.n_head, like=tr.wte.weight)
        P = cache.length if cache is not None else 0
        pos = torch.arange(P, P + L, device=input_ids.device)
        if self.n_stacked is None:
            x = F.embedding(input_ids, tr.wte.weight) + F.embedding(pos, tr.wpe.weight)  # (B, L, d)
        else:  # input_ids (S, B, L): seed s looks up its own tables
            seed = torch.arange(self.n_stacked, device=input_ids.device).view(-1, 1, 1)
            x = tr.wte.weight[seed, input_ids] + tr.wpe.weight[:, pos].unsqueeze(1)  # (S, B, L, d)
        hidden = [x] if output_hidden_states else None
        for i, block in enumerate(tr.h):
            x = _block(block, x, (cache.keys[i], cache.values[i], P) if cache is not None else None)
            if hidden is not None:
                hidden.append(x)
        if cache is not None:
            cache.length = P + L
        x = _ln(x, tr.ln_f)
        if hidden is not None:
            hidden[-1] = x  # as Hugging Face: the last entry is after the final layer norm
        if logits_to_keep:
            x = x[..., -logits_to_keep:, :]
        w = tr.wte.weight if head_ids is None else tr.wte.weight.index_select(-2, head_ids)  # (V or A, d)
        if self.n_stacked is not None:
            w = w.unsqueeze(1)  # (S, 1, A, d): broadcast over the batch
        logits = x @ w.transpose(-1, -2)  # (..., L, V) or (..., L, A)
        return NativeOutput(logits, cache, tuple(hidden) if hidden else None)

    # -- seeds as a batch dimension ------------------------------------------------------------
    n_stacked: int | None = None  # S when the parameters carry a leading seed dimension

    @classmethod
    def stack(cls, models: list[NativeGPT2]) -> NativeGPT2:
        """S models of one config as one: every parameter becomes ``(S, ...)`` and ``forward`` takes
        ``input_ids (S, B, L)``, seed s running on model s. One optimiser step over the stacked
        parameters is exactly S independent steps for elementwise optimisers (AdamW)."""
        stacked = cls(models[0].config)
        for name, _ in list(stacked.named_parameters()):
            owner, leaf = stacked.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
            setattr(owner, leaf, nn.Parameter(torch.stack([m.get_parameter(name).detach() for m in models])))
        stacked.lm_head.weight = stacked.transformer.wte.weight  # tied (unused by forward)
        stacked.n_stacked = len(models)
        return stacked.to(next(models[0].parameters()).dtype)

    def unstack(self, i: int) -> NativeGPT2:
        """Model ``i`` of a stack, as a plain ``NativeGPT2`` (a copy of its parameters)."""
        model = type(self)(self.config)
        model.load_state_dict({k: v[i].detach().clone() for k, v in self.state_dict().items()})
        return model.to(next(self.parameters()).dtype)

    # -- Hugging Face checkpoints --------------------------------------------------------------
    def save_pretrained(self, path: str | Path, **unused) -> None:
        """Write ``config.json`` and ``model.safetensors`` as ``GPT2LMHeadModel.save_pretrained`` does."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.config.architectures = ["GPT2LMHeadModel"]
        self.config.save_pretrained(path)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items() if k != "lm_head.weight"}  # tied
        save_file(state, path / WEIGHTS, metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None) -> NativeGPT2:
        """Read a GPT-2 checkpoint directory written by Hugging Face or by ``save_pretrained``."""
        from transformers import GPT2Config  # heavy: transformers loads only when a model is built or converted

        path = Path(path)
        config = GPT2Config.from_pretrained(path, local_files_only=True)
        model = cls(config)
        model.load_hf_state_dict(load_file(path / WEIGHTS))
        return model.to(dtype) if dtype is not None else model

    def load_hf_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load a ``GPT2LMHeadModel`` (or bare ``GPT2Model``) state dict; ``lm_head`` stays tied to ``wte``."""
        state = {(k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}"): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # old buffers
        state.setdefault("lm_head.weight", state["transformer.wte.weight"])
        self.load_state_dict(state, strict=True)

    @classmethod
    def from_hf(cls, hf_model) -> NativeGPT2:
        """The same network as a ``GPT2LMHeadModel`` instance, with a copy of its weights."""
        model = cls(hf_model.config)
        model.load_hf_state_dict({k: v.detach().clone() for k, v in hf_model.state_dict().items()})
        return model.to(next(hf_model.parameters()).dtype)

    def to_hf(self):
        """A ``GPT2LMHeadModel`` with a copy of these weights (for TRL and other Hugging Face tools)."""
        from transformers import GPT2LMHeadModel  # heavy: transformers loads only when a model is built or converted

        model = GPT2LMHeadModel(self.config).to(next(self.parameters()).dtype)
        model.load_state_dict({k: v.detach().clone() for k, v in self.state_dict().items()})
        return model.eval()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class StackedLinear(nn.Module):
    """S ``nn.Linear`` layers of one shape as one: ``weight (S, out, in)``, ``bias (S, out)``; input
    ``(S, ..., in)`` row block s goes through layer s (a stacked policy's value heads)."""

    def __init__(self, layers: list[nn.Linear]):
        super().__init__()
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in layers]))
        self.bias = nn.Parameter(torch.stack([m.bias.detach() for m in layers]))

    def forward(self, x: Tensor) -> Tensor:
        S = x.shape[0]  # x (S, ..., L, in)
        w = self.weight.view(S, *([1] * (x.dim() - 3)), *self.weight.shape[1:]).transpose(-1, -2)  # (S, 1.., in, out)
        return x @ w + self.bias.view(S, *([1] * (x.dim() - 2)), -1)

    def unstack(self, i: int) -> nn.Linear:
        out, n_in = self.weight.shape[1:]
        layer = nn.Linear(n_in, out).to(self.weight)
        layer.load_state_dict({"weight": self.weight[i].detach().clone(), "bias": self.bias[i].detach().clone()})
        return layer


def is_native_checkpoint_compatible(path: str | Path) -> bool:
    """Whether the checkpoint at ``path`` is a GPT-2 the native model can load."""
    f = Path(path) / "config.json"
    return f.exists() and json.loads(f.read_text()).get("model_type") == "gpt2" and (Path(path) / WEIGHTS).exists()
