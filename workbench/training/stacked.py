"""Seeds as a batch dimension: S runs of one configuration, differing only in their seed, trained
as one computation.

The S policies are stacked (``NativeGPT2.stack``: every parameter gets a leading seed
dimension ``(S, ...)``), so one sampling loop, one forward pass, one backward pass and one
AdamW step serve all seeds. At toy sizes a step costs mostly per-operation overhead, not
arithmetic, and that overhead is paid once instead of S times. Nothing else is shared: each
seed keeps its own generators (so its prompts and samples are the ones ``train`` would draw),
reference model, loss, gradient clipping, divergence check and run folder, where it writes
exactly the files ``train`` writes. The seeds' losses are independent, so

    loss = sum_s L_s(theta_s)          d loss / d theta_s = d L_s / d theta_s
    g_s <- g_s min(1, c / ||g_s||)     clipping per seed, as train's clip_grad_norm_
    AdamW on (S, ...) tensors          elementwise: exactly S independent AdamW steps

and run s's metrics equal those of ``train`` on seed s up to float rounding
(``tests/test_seeds.py``).

Supported: online algorithms with one update per rollout (GRPO, RLOO, REINFORCE, online
DPO) on ``model.impl = "native"``, workbench backend. Anything else is a ``ConfigError``:
train those seeds one by one with ``train``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, Resolved
from ..core import seeds
from ..core.types import PolicyOutput, Rollout
from ..models.native_gpt2 import NativeGPT2
from ..models.policy import Policy, build_policy, build_reward_model, describe
from ..runtime.context import Measure, RunContext, diverged, done, setup_device
from ..runtime.rollout import rollout_stats, score
from ..runtime.update import make_optimizer, make_schedule


def stack_key(res: Resolved) -> str | None:
    """Runs with the same key can train as one stack (``train_stacked``); None: this run trains alone."""
    try:
        check_batchable([res])
    except ConfigError:
        return None
    d = res.to_dict()
    d.pop("seed")
    return json.dumps(d, sort_keys=True)


def check_batchable(reses: list[Resolved]) -> None:
    """Raise ``ConfigError`` unless these runs can train as one stacked computation."""
    if not reses:
        raise ConfigError("no runs to train")
    r0 = reses[0]
    spec, acfg, run = r0.spec, r0.algo_cfg, r0.run

    def without_seed(r):  # noqa: E306
        d = r.to_dict()
        d.pop("seed")
        return d

    if any(without_seed(r) != without_seed(r0) for r in reses[1:]):
        raise ConfigError("seeds batch only runs whose configs differ in 'seed' alone")
    if len({r.run.seed for r in reses}) != len(reses):
        raise ConfigError("the same seed twice")
    problems = []
    if run.backend != "workbench":
        problems.append("backend 'workbench'")
    if run.model.impl != "native" or run.model.path:
        problems.append("model.impl 'native' and no model.path")
    if spec.kind != "online" or spec.trains != "policy":
        problems.append("an online policy algorithm")
    if spec.epochs(acfg) != 1 or spec.minibatches(acfg) != 1 or spec.value_head(acfg):
        problems.append("one update per rollout and no value head (not PPO)")
    if problems:
        raise ConfigError(
            f"seeds as a batch dimension need {', '.join(problems)}; {spec.name!r} runs: use train() per seed"
        )


def train_stacked(
    reses: list[Resolved],
    outs: list[str | Path],
    measures: Callable[[RunContext, Any], list[Measure | None]] = lambda ctx, ref: [],
    progress: bool = False,
) -> list[dict]:
    """Train every run in ``reses`` (same config, different seeds) together; run i writes ``outs[i]``.

    ``measures(ctx, ref)`` gives each seed's measurement hooks (``workbench.training.run`` passes the
    evaluation and the probes). Returns one ``{"status", "step", "final"}`` per run, as ``train`` does.
    """
    check_batchable(reses)
    r0 = reses[0]
    run, task = r0.run, r0.task
    S, outs = len(reses), [Path(o) for o in outs]
    device = setup_device(run)
    seed_list = [r.run.seed for r in reses]
    gens = [seeds.sampling(s, device) for s in seed_list]  # as train(): sampling
    data_gens = [seeds.data(s) for s in seed_list]  # the prompt streams

    singles = [build_policy(task, run.model, s, False, device) for s in seed_list]
    refs = [p.frozen_copy() for p in singles]
    tok = singles[0].tokenizer
    policy = Policy(NativeGPT2.stack([p.model for p in singles]), tok, task).to(device)  # (S, ...) parameters
    ref = Policy(NativeGPT2.stack([p.model for p in refs]), tok, task).to(device).requires_grad_(False)
    opt = make_optimizer([p for p in policy.parameters() if p.requires_grad], run, device)
    sched = make_schedule(opt, run)

    ctxs = [RunContext(r, o, device) for r, o in zip(reses, outs, strict=True)]
    for ctx, p, rf in zip(ctxs, singles, refs, strict=True):
        ctx.write_config(describe(p), batched_seeds=seed_list)
        ctx.add(*measures(ctx, rf))
    rm = None
    if run.reward_model:
        rm = build_reward_model(task, run.model, run.seed, path=run.reward_model).to(device).requires_grad_(False)
    del singles

    status = [done(run.steps) for _ in range(S)]
    alive = list(range(S))
    for step in range(run.steps + 1):
        rows = {s: {"step": step} for s in alive}
        last = step == run.steps
        if any(m.due(step, last) for m in ctxs[0].measures):
            for s in alive:
                rows[s].update(ctxs[s].measure(seed_policy(policy, s, task), step))
        if step < run.steps:
            stats = stacked_online_step(reses, policy, ref, rm, opt, gens, data_gens, alive, device)
            lr = sched.get_last_lr()[0]
            sched.step()
            for s in list(alive):
                if "diverged" in stats[s]:
                    status[s] = diverged(step, stats[s]["diverged"])
                    alive.remove(s)
                    rows.pop(s)
                else:
                    rows[s].update(stats[s], lr=lr)
        for s, row in rows.items():
            row["samples"] = min(step + 1, run.steps) * run.batch_size
            ctxs[s].log(row)
        if not alive:
            break
    results = []
    for s in range(S):
        view = seed_policy(policy, s, task) if status[s]["status"] == "done" else None
        results.append(ctxs[s].finish(status[s], view, save=view.save if view is not None else None))
    return results


def seed_policy(policy: Policy, s: int, task) -> Policy:
    """Seed ``s`` of a stacked policy as an ordinary ``Policy`` (a copy of its parameters)."""
    return Policy(policy.model.unstack(s), policy.tokenizer, task).to(policy.device).eval()


def stacked_online_step(reses, policy, ref, rm, opt, gens, data_gens, alive, device) -> list[dict]:
    """One rollout and one update of every seed. Returns per-seed stats (``{"diverged": reason}`` on failure)."""
    r0 = reses[0]
    run, task, spec, acfg = r0.run, r0.task, r0.spec, r0.algo_cfg
    S, G = len(reses), run.group_size
    prompts = torch.stack([task.sample_prompts(run.batch_size // G, g) for g in data_gens])
    prompts = prompts.repeat_interleave(G, 1).to(device)  # (S, B, Tp)
    comps, _ = policy.sample(prompts, gens, run.temperature)  # (S, B, T)
    out = policy(prompts, comps)  # with gradients: old_logp is its detached value (one update per rollout)
    with torch.no_grad():
        ref_logp = ref(prompts, comps).logp  # (S, B, T)
    B, T = comps.shape[1:]
    scores, step_rewards, gold = score(r0, rm, prompts.flatten(0, 1), comps.flatten(0, 1))
    scores, gold, step_rewards = scores.view(S, B), gold.view(S, B), step_rewards.view(S, B, T)
    stats: list[dict] = [{} for _ in range(S)]
    losses = []
    for s in range(S):
        old = out.logp[s].detach()
        roll = Rollout(
            prompts=prompts[s],
            completions=comps[s],
            mask=torch.ones_like(old),
            old_logp=old,
            ref_logp=ref_logp[s],
            scores=scores[s],
            step_rewards=step_rewards[s],
            gold=gold[s],
            group_size=G,
        )
        with torch.no_grad():
            batch = spec.prepare(roll, acfg, run.beta)
        loss, _, st = spec.loss(PolicyOutput(out.logp[s], out.logits[s], None), batch, acfg, run.beta)
        if s not in alive:
            continue
        if not torch.isfinite(loss):
            stats[s] = {"diverged": f"non-finite loss {loss.item()}"}
            continue
        losses.append(loss)
        stats[s] = {**st, **rollout_stats(roll, batch)}
    if not losses:
        return stats
    opt.zero_grad(set_to_none=True)
    torch.stack(losses).sum().backward()  # sum_s L_s: each seed's parameters get their own gradient
    grads = [p.grad for p in policy.parameters() if p.grad is not None]
    norms = torch.stack([g.pow(2).flatten(1).sum(1) for g in grads]).sum(0).sqrt()  # (S,) ||g_s||
    coef = (run.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)  # as clip_grad_norm_
    for s in range(S):
        if s not in alive or "diverged" in stats[s]:
            coef[s] = 0.0  # a dead seed's parameters get no gradient
        elif not torch.isfinite(norms[s]):
            stats[s] = {"diverged": f"non-finite gradient norm {norms[s].item()}"}
            coef[s] = 0.0
        else:
            stats[s]["grad/norm"] = norms[s].item()
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.dim() - 1)))).nan_to_num_(0.0)
    opt.step()
    return stats
