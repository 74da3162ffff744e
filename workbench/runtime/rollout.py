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
    the gold reward; ``step_rewards`` puts it on the last counted token (the EOS, or the last
    token without one; or the task's dense process reward); ``gold`` is always the task's
    reward, for logging.
    """
    task = res.task
    gold = task.reward(prompts, comps).float()
    rows, last = torch.arange(comps.shape[0], device=comps.device), task.last_action(comps)  # (B,) the final own step
    if rm is not None:
        scores = rm(prompts, comps)
        steps = torch.zeros(comps.shape, device=comps.device)
        steps[rows, last] = scores
        return scores, steps, gold
    if task.dense_reward:
        steps = task.process_reward(prompts, comps).float()
    else:
        steps = torch.zeros(comps.shape, device=comps.device)
        steps[rows, last] = gold
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
        mask=res.task.action_mask(comps),  # 1 up to and including the first EOS, 0 at observations (tool_use)
        old_logp=old_logp,
        ref_logp=ref_logp,
        scores=scores,
        step_rewards=step_rewards,
        gold=gold,
        group_size=group_size,
        old_values=old_values,
        eos_action=res.task.eos_action,
        episode=res.task.episode_stats(prompts, comps),  # tool/*, episode/* (tasks with observations)
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
        if bool(roll.mask.all()):
            out["adv/mean"] = batch.advantages.mean().item()
            out["adv/std"] = batch.advantages.std().item()
        else:  # over counted tokens only (padding after EOS carries no advantage)
            adv = batch.advantages[roll.mask > 0]
            out["adv/mean"] = adv.mean().item()
            out["adv/std"] = adv.std().item() if adv.numel() > 1 else 0.0
    if roll.eos_action is not None:
        out.update(length_stats(roll))
    out.update(roll.episode or {})
    return out


def length_stats(roll: Rollout) -> dict:
    """``length/*`` of a rollout of a task with EOS: counted tokens per completion (the answer and its EOS).

    Correct means gold reward 1 (the exact answer); a mean over no completion is left out.
    """
    lengths = roll.mask.sum(-1)  # (B,)
    truncated = (roll.completions != roll.eos_action).all(-1)
    correct = roll.gold >= 1.0
    out = {"length/mean": lengths.mean().item(), "length/truncated_frac": truncated.float().mean().item()}
    if correct.any():
        out["length/correct_mean"] = lengths[correct].mean().item()
    if (~correct).any():
        out["length/incorrect_mean"] = lengths[~correct].mean().item()
    return out


def sampling_stats(roll: Rollout, logits: torch.Tensor | None) -> dict:
    """Diagnostics of the sampling policy on a rollout, computed without gradients (they change no number):

    - ``entropy/sampled``: mean over counted tokens of H(pi_old(. | s_t)), from ``logits (B, T, A)``, the
      sampling pass's log-distribution over the action set (TRL's ``entropy``, over its whole vocabulary);
    - ``reward/frac_zero_std`` (groups of 2 or more): share of groups whose scores are all equal, so that a
      group-relative baseline gives them zero advantage (TRL's ``frac_reward_zero_std``).
    """
    out = {}
    with torch.no_grad():
        if logits is not None:
            h = -(logits.exp() * logits).sum(-1)  # (B, T) H_t
            out["entropy/sampled"] = ((h * roll.mask).sum() / roll.mask.sum().clamp(min=1)).item()
        if roll.group_size > 1:
            r = roll.scores.view(-1, roll.group_size)  # (B/G, G)
            out["reward/frac_zero_std"] = (r == r[:, :1]).all(-1).float().mean().item()
    return out
