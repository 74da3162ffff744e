"""The base policy (issue 15): brief pretraining on text in the task's tokens that carries no solution.

Set on a run with ``pretrain_steps``: before the method trains, the fresh policy takes that many
steps of the masked NLL of SFT (``workbench.algorithms.sft.sft_loss``; prompt tokens carry no loss)

    L = - sum_{i,t} m_it log pi(y_it | x_i, y_i<t) / sum_{i,t} m_it,    (x_i, y_i) ~ task.pretraining_text

on a fresh batch of ``PRETRAIN_BATCH`` texts per step (``Task.pretraining_text``: for ``scratch_add``
random scratch, ``=``, an answer drawn independently of the prompt, ``<end>``), with AdamW at
``PRETRAIN_LR`` (constant), gradient norm clipped to 1. The result is both the starting policy and
the reference pi_ref of the run (every KL is measured from it), as the SFT phase's result is in
``workbench.training.pipeline``.

The same seed gives the same base whatever the method trains next: the text comes from a stream of
its own (``workbench.core.seeds.pretraining``), the batch size and learning rate are constants of this
module, not the run's (a study may give its methods different ``lr`` or ``batch_size``), and only
the language model's parameters are trained (a PPO run's value head is left at its initialisation).
``tests/test_pretrain.py`` checks that GRPO, PPO and SFT runs of one seed start from bitwise the same
weights.
"""

from __future__ import annotations

import torch

from ..algorithms import sft
from ..config import Resolved
from ..core import seeds
from ..runtime.context import Measure

PRETRAIN_BATCH = 64  # texts per step
PRETRAIN_LR = 1e-3  # AdamW, constant, no weight decay
PRETRAIN_MAX_GRAD_NORM = 1.0


def pretrain(res: Resolved, policy, device) -> float:
    """Train ``policy`` in place for ``run.pretrain_steps`` steps on the task's pretraining text. Returns the last
    loss (nan for 0 steps)."""
    run, task = res.run, res.task
    gen = seeds.pretraining(run.seed)
    cfg = sft.SFTConfig(batch_size=PRETRAIN_BATCH)
    params = [p for n, p in policy.named_parameters() if p.requires_grad and not n.startswith("value_head")]
    opt = torch.optim.AdamW(params, lr=PRETRAIN_LR, weight_decay=0.0)
    loss = torch.tensor(float("nan"))
    for _ in range(run.pretrain_steps):
        prompts, comps = task.pretraining_text(PRETRAIN_BATCH, gen)  # (B, Tp), (B, T)
        mask = task.action_mask(comps).to(device)  # (B, T) 0 after the first EOS and at observations (tool_use)
        logp = policy(prompts.to(device), comps.to(device), values=False).logp  # (B, T)
        loss, _, _ = sft.sft_loss(logp, mask, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, PRETRAIN_MAX_GRAD_NORM)
        opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def start_phases(res: Resolved, policy, device) -> None:
    """Replay what a run did to its fresh policy before training (the base policy, then an SFT warm-up): the
    run's reference, for ``workbench probe`` (``workbench.analysis.probe.load``)."""
    from .pipeline import sft_warmup

    if res.run.pretrain_steps:
        pretrain(res, policy, device)
    if res.run.sft_warmup_steps:
        sft_warmup(res, policy, device)


class PretrainStats(Measure):
    """Logs the base policy's last pretraining loss, ``pretrain/loss``, in the row of step 0."""

    def __init__(self, loss: float):
        self.loss = loss

    def due(self, step: int, last: bool) -> bool:
        return step == 0

    def __call__(self, model, step: int, row: dict) -> dict:
        return {"pretrain/loss": self.loss}
