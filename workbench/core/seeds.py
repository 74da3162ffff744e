"""The random streams of a run, each seeded from the run's seed and an offset of its own.

A stream per purpose keeps them independent: evaluating more often, probing, or drawing
more data for one purpose never shifts the samples of another (``eval_every`` and
``probe_every`` leave training bitwise unchanged; ``tests/test_faults.py``). Every module
that seeds a generator takes its offset from here.

    sampling      seed                       the rollouts' completions
    data          seed + 1_000_003           the prompt stream and fixed datasets
    shuffle       seed + 2_000_003           minibatch order
    evaluation    seed + 1_592_649_633       reward/eval samples, samples.jsonl
    probe         seed * 1_000_003 + step + 7  gradient and credit probes at ``step``
    pipeline      seed + 3_000_017           SFT demonstrations (x1) and reward-model pairs (x2) of the RLHF phases
    pretraining   seed + 5_000_011           the base policy's pretraining text (``pretrain_steps``)
    scratch       seed + 6_000_023           the scratch-ablation evaluation's samples and corruption
"""

from __future__ import annotations

import torch

DATA_OFFSET = 1_000_003
SHUFFLE_OFFSET = 2_000_003
EVAL_OFFSET = 1_592_649_633
PROBE_STRIDE = 1_000_003
PIPELINE_OFFSET = 3_000_017
PRETRAIN_OFFSET = 5_000_011
SCRATCH_OFFSET = 6_000_023


def sampling(seed: int, device="cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def data(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed + DATA_OFFSET)


def shuffle(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed + SHUFFLE_OFFSET)


def evaluation(seed: int, device="cpu") -> torch.Generator:
    """The generator of a run's evaluation samples (``reward/eval``, ``samples.jsonl``).

    Its own stream, as the probes have theirs: drawing from the training generator would make
    ``eval_every`` change every rollout after the first measurement. The TRL backend and
    stacked seeds use the same stream, so a run measures the same samples however it trains.
    """
    return torch.Generator(device=device).manual_seed(seed + EVAL_OFFSET)


def probe_seed(seed: int, step: int) -> int:
    """The seed of the probe at ``step`` (its rollouts and minibatches)."""
    return seed * PROBE_STRIDE + step + 7


def pretraining(seed: int) -> torch.Generator:
    """The base policy's pretraining text (``workbench.training.pretrain``): the same for every method of a seed."""
    return torch.Generator().manual_seed(seed + PRETRAIN_OFFSET)


def scratch_ablation(seed: int, device="cpu") -> torch.Generator:
    """The scratch-ablation evaluation's samples and corrupted scratch (``workbench.analysis.reasoning``)."""
    return torch.Generator(device=device).manual_seed(seed + SCRATCH_OFFSET)
