"""An offline algorithm's fixed dataset, with the policy its pairs are sampled from.

    dataset = spec.dataset(task, cfg, generator, ref=sampler)
    sampler = the run's pi_ref (its frozen initial policy), or the checkpoint spec.data_policy(cfg) names

Used by the single-run loop, stacked runs (one call per run, each with its own pi_ref) and the
probes, so every one of them draws the same dataset from the run's data stream.
"""

from __future__ import annotations

import torch

from ..config import Resolved
from ..models.policy import build_policy
from ..models.precision import full_precision


def offline_dataset(res: Resolved, ref, generator: torch.Generator, device: torch.device) -> dict:
    """``res.spec.dataset`` for one run; a ``data_policy`` checkpoint is loaded on ``device``, frozen."""
    path = res.spec.data_policy(res.algo_cfg)
    sampler = ref
    if path is not None:
        model = res.run.model.model_copy(update={"path": path})
        sampler = build_policy(res.task, model, res.run.seed, False, device, res.run.precision).requires_grad_(False)
    with full_precision(device):  # the same pairs whatever the run's precision, alone, stacked or in a probe
        return res.spec.dataset(res.task, res.algo_cfg, generator, ref=sampler)
