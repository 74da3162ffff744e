"""Mixed precision of a run's policy: ``precision = "bf16"`` runs its forward passes and sampling under
``torch.autocast(device, torch.bfloat16)``; parameters, gradients and AdamW state stay float32, and the
log-probabilities the losses read are float32 (``Policy._action_logits`` casts before the log-softmax).

Measurement is never mixed: ``full_precision(device)`` turns autocast off for every policy inside it,
whatever its run's precision, and the exact metrics (``workbench.analysis.evaluate``, ``exact``,
``probe``) enter it. A flag, not only ``torch.autocast(enabled=False)``, because a policy that
entered its own autocast region inside would switch autocast back on.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Literal

import torch

Precision = Literal["fp32", "bf16"]
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}  # None: no autocast

_FULL_PRECISION = contextvars.ContextVar("workbench_full_precision", default=False)  # per thread, as autocast's state


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a run's ``precision`` (None for fp32)."""
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"precision {precision!r}; allowed: {', '.join(AUTOCAST_DTYPES)}")
    return AUTOCAST_DTYPES[precision]


def policy_autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """The region a policy's own passes run in: autocast to ``dtype``; nothing for fp32 or inside
    ``full_precision``."""
    if dtype is None or _FULL_PRECISION.get():
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def full_precision(device: torch.device | str) -> Iterator[None]:
    """Autocast off inside, for every policy: exact metrics are float32 in every run, whatever its precision."""
    token = _FULL_PRECISION.set(True)
    try:
        with torch.autocast(torch.device(device).type, enabled=False):
            yield
    finally:
        _FULL_PRECISION.reset(token)
