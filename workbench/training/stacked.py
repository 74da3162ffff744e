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

import time
from pathlib import Path

import torch

from ..algorithms.spec import Rollout
from ..config import ConfigError, Resolved
from ..models.native_gpt2 import NativeGPT2
from ..models.policy import Policy, PolicyOutput, build_policy, describe, resolve_device
from .loop import Evaluator, RunWriter, _rollout_stats, eval_generator, lr_factor, score


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
    if spec.epochs(acfg) != 1 or spec.minibatches(acfg) != 1 or spec.value_head:
        problems.append("one update per rollout and no value head (not PPO)")
    if problems:
        raise ConfigError(
            f"seeds as a batch dimension need {', '.join(problems)}; {spec.name!r} runs: use train() per seed"
        )


def train_seeds(reses: list[Resolved], outs: list[str | Path], progress: bool = False) -> list[dict]:
    """Train every run in ``reses`` (same config, different seeds) together; run i writes ``outs[i]``.

    Returns one ``{"status", "step", "final"}`` per run, as ``train`` does.
    """
    check_batchable(reses)
    r0 = reses[0]
    run, task = r0.run, r0.task
    S, outs = len(reses), [Path(o) for o in outs]
    device = resolve_device(run.device)
    if device.type == "cpu":
        torch.set_num_threads(run.cpu_threads)
    torch.manual_seed(run.seed)
    seeds = [r.run.seed for r in reses]
    gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]  # as train(): sampling
    data_gens = [torch.Generator().manual_seed(s + 1_000_003) for s in seeds]  # the prompt streams
    eval_gens = [eval_generator(s, device) for s in seeds]  # as train(): the measurements' own streams

    singles = [build_policy(task, run.model, s, False, device) for s in seeds]
    refs = [p.frozen_copy() for p in singles]
    tok = singles[0].tokenizer
    policy = Policy(NativeGPT2.stack([p.model for p in singles]), tok, task).to(device)  # (S, ...) parameters
    ref = Policy(NativeGPT2.stack([p.model for p in refs]), tok, task).to(device).requires_grad_(False)
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=run.lr, weight_decay=run.weight_decay, fused=device.type in ("cpu", "cuda"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(run.lr_schedule, run.steps))

    writers = [RunWriter(o) for o in outs]
    for r, w, p in zip(reses, writers, singles, strict=True):
        w.config({"config": r.to_dict(), "config_hash": r.config_hash, "model": describe(p), "batched_seeds": seeds})
    evaluators = [Evaluator(r, rf, device) for r, rf in zip(reses, refs, strict=True)]
    probers = [None] * S
    if run.probe_every:
        from ..analysis.probe import Prober

        probers = [
            Prober(r, rf, ev.exact, device, o) for r, rf, ev, o in zip(reses, refs, evaluators, outs, strict=True)
        ]
    rm = None
    if run.reward_model:
        from ..models.policy import build_reward_model

        rm = build_reward_model(task, run.model, run.seed, path=run.reward_model).to(device).requires_grad_(False)
    del singles

    status = [{"status": "done", "step": run.steps} for _ in range(S)]
    alive = list(range(S))
    final: list[dict] = [{} for _ in range(S)]
    t0 = time.perf_counter()
    for step in range(run.steps + 1):
        rows = {s: {"step": step} for s in alive}
        measure = step % run.eval_every == 0 or step == run.steps
        probe = run.probe_every and (step % run.probe_every == 0 or step == run.steps)
        if measure or probe:
            for s in alive:
                view = seed_policy(policy, s, task)
                if measure:
                    rows[s].update(evaluators[s](view, step, writers[s], eval_gens[s]))
                if probe:
                    rows[s].update(probers[s](view, step))
        if step < run.steps:
            stats = stacked_online_step(reses, policy, ref, rm, opt, gens, data_gens, alive, device)
            lr = sched.get_last_lr()[0]
            sched.step()
            for s in list(alive):
                if "diverged" in stats[s]:
                    status[s] = {"status": "diverged", "step": step, "reason": stats[s]["diverged"]}
                    alive.remove(s)
                    rows.pop(s)
                else:
                    rows[s].update(stats[s], lr=lr)
        for s, row in rows.items():
            row["samples"] = min(step + 1, run.steps) * run.batch_size
            row["time/elapsed_s"] = time.perf_counter() - t0
            writers[s].log(row)
            final[s].update(row)
        if not alive:
            break
    for s in range(S):
        if status[s]["status"] == "done":
            view = seed_policy(policy, s, task)
            if reses[s].run.save_checkpoint:
                view.save(outs[s] / "checkpoint")
            if evaluators[s].exact is not None:
                from ..analysis.exact import exact_logprobs
                from ..results.store import publish_policy

                with torch.no_grad():
                    publish_policy(outs[s], exact_logprobs(view, task, evaluators[s].exact.prompts).cpu().numpy())
        writers[s].status(status[s])
        writers[s].close()
    return [{**st, "final": f} for st, f in zip(status, final, strict=True)]


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
        stats[s] = {**st, **_rollout_stats(roll, batch)}
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
