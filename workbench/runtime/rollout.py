"""One rollout: sample completions, score them, and the no-grad passes every online algorithm needs.

    prompts (B, Tp) -> completions (B, T) -> scores, step rewards, gold (B,), (B, T), (B,)
                    -> old log-probs (and values) of the sampling policy, reference log-probs

``B = prompts x group_size`` with the completions of a prompt on adjacent rows.
"""

from __future__ import annotations

import torch

from ..config import Resolved
from ..core.kl import kl_estimate
from ..core.types import Batch, PolicyOutput, Rollout


def score(res: Resolved, rm, prompts, comps) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(scores (B,), step_rewards (B, T), gold (B,))`` for a batch of completions.

    ``scores`` is what the run optimises: the reward model's score when the run has one, else
    the gold reward; ``step_rewards`` puts it on the last token (or the task's dense process
    reward); ``gold`` is always the task's reward, for logging.
    """
    task = res.task
    gold = task.reward(prompts, comps).float()
    if rm is not None:
        scores = rm(prompts, comps)
        steps = torch.zeros(comps.shape, device=comps.device)
        steps[:, -1] = scores
        return scores, steps, gold
    if task.dense_reward:
        steps = task.process_reward(prompts, comps).float()
    else:
        steps = torch.zeros(comps.shape, device=comps.device)
        steps[:, -1] = gold
    return gold, steps, gold


def rollout(
    res: Resolved, policy, ref, rm, prompts, gen, group_size: int, with_grad: bool = False
) -> tuple[Rollout, PolicyOutput]:
    """Sample with the KV cache, then one policy pass for old log-probs/values and one no-grad reference pass.

    Returns ``(rollout, policy output)``. ``with_grad``: the policy pass keeps its graph, so the
    loss of a single update can reuse it (``old_logp`` is its detached value: rho = 1 exactly,
    as TRL's ``num_iterations = 1``).
    """
    comps, _ = policy.sample(prompts, gen, res.run.temperature)  # (B, T)
    with torch.set_grad_enabled(with_grad):
        out = policy(prompts, comps)
    with torch.no_grad():
        ref_logp = ref(prompts, comps).logp
    scores, step_rewards, gold = score(res, rm, prompts, comps)
    old_logp = out.logp.detach()
    old_values = out.values.detach() if out.values is not None else None
    roll = Rollout(
        prompts=prompts,
        completions=comps,
        mask=torch.ones_like(old_logp),
        old_logp=old_logp,
        ref_logp=ref_logp,
        scores=scores,
        step_rewards=step_rewards,
        gold=gold,
        group_size=group_size,
        old_values=old_values,
    )
    return roll, out


def rollout_stats(roll: Rollout, batch: Batch) -> dict:
    """Reward and sampled-KL figures of one rollout; KL names say estimator and where it acts."""
    out = {
        "reward/mean": roll.scores.mean().item(),
        "reward/std": roll.scores.std().item() if len(roll.scores) > 1 else 0.0,
        "reward/gold_mean": roll.gold.mean().item(),
    }
    for name in ("k1", "k2", "k3"):
        if batch.kl is not None and batch.kl_metric.startswith(f"kl/{name}_"):
            out[batch.kl_metric] = batch.kl.sum(-1).mean().item()  # the estimate the algorithm used, named by where
        else:  # a monitor only: not in the reward nor in the loss
            out[f"kl/{name}_monitor"] = (
                (kl_estimate(roll.old_logp, roll.ref_logp, name) * roll.mask).sum(-1).mean().item()
            )
    if batch.advantages is not None:
        out["adv/mean"] = batch.advantages.mean().item()
        out["adv/std"] = batch.advantages.std().item()
    return out
