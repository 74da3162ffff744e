"""The optimiser, its learning-rate schedule, and one gradient step with the divergence checks."""

from __future__ import annotations

import math

import torch

from ..core.errors import Diverged


def make_optimizer(params, run, device=None, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW with the run's ``lr`` and ``weight_decay`` (fused on CPU and CUDA unless ``fused=False``)."""
    if fused is None:
        fused = device is not None and device.type in ("cpu", "cuda")
    kw = {"fused": True} if fused else {}
    return torch.optim.AdamW(params, lr=run.lr, weight_decay=run.weight_decay, **kw)


def make_schedule(opt, run) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(run.lr_schedule, run.steps))


def lr_factor(schedule: str, steps: int):
    """Multiplier of the learning rate at each update round: constant, linear or cosine decay to 0."""
    if schedule == "linear":
        return lambda s: 1.0 - s / max(steps, 1)
    if schedule == "cosine":
        return lambda s: 0.5 * (1.0 + math.cos(math.pi * s / max(steps, 1)))
    return lambda s: 1.0


def update(model, opt, loss, max_norm: float, step: int | None = None) -> float:
    """zero_grad, backward, clip the gradient norm to ``max_norm``, AdamW step. Returns the norm before clipping.

    With ``step`` given, a non-finite loss or gradient norm raises ``Diverged(step, reason)``
    before the parameters change (the run is marked diverged, not crashed); without it (the
    pipeline's SFT and reward-model phases) the step is taken as is.
    """
    if step is not None and not torch.isfinite(loss):
        raise Diverged(step, f"non-finite loss {loss.item()}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if step is not None and not torch.isfinite(norm):
        raise Diverged(step, f"non-finite gradient norm {norm.item()}")
    opt.step()
    return norm.item()
