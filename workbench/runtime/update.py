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


class StackedAdamW(torch.optim.Optimizer):
    """AdamW over stacked parameters ``(S, ...)`` with a learning rate and weight decay per row s.

    Row s takes exactly ``torch.optim.AdamW``'s step with ``lr = lrs[s] * group["lr"]`` and
    ``weight_decay = weight_decays[s]`` (betas and eps shared):

        theta <- theta (1 - lr wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
        theta <- theta - lr / (1 - b1^k) * m / (sqrt(v / (1 - b2^k)) + eps)

    ``group["lr"]`` starts at 1 and is the schedule's factor (``LambdaLR`` scales it), so a
    stack of runs that differ in ``lr`` shares one schedule.
    """

    def __init__(self, params, lrs: list[float], weight_decays: list[float], betas=(0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, {"lr": 1.0, "betas": betas, "eps": eps})
        self.lrs = torch.tensor(lrs, dtype=torch.float64)
        self.weight_decays = torch.tensor(weight_decays, dtype=torch.float64)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            (b1, b2), eps = group["betas"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"], st["exp_avg"], st["exp_avg_sq"] = 0, torch.zeros_like(p), torch.zeros_like(p)
                st["step"] += 1
                k, m, v, g = st["step"], st["exp_avg"], st["exp_avg_sq"], p.grad
                rows = (-1,) + (1,) * (p.dim() - 1)
                lr = (self.lrs * group["lr"]).to(p.device, p.dtype).view(rows)
                p.mul_(1 - lr * self.weight_decays.to(p.device, p.dtype).view(rows))
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v.sqrt() / math.sqrt(1 - b2**k)).add_(eps)
                p.sub_(lr / (1 - b1**k) * m / denom)
