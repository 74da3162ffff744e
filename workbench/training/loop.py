"""The two training loops: online (sample, score, update) and offline (fixed dataset).

    online:  prompts -> rollout -> reward -> prepare (a typed batch) -> epochs x minibatches of loss/step -> log
    offline: fixed dataset -> minibatch -> step -> log

Algorithms plug in through ``AlgorithmSpec`` (their maths and declared capabilities),
measurements through the ``RunContext``'s hooks (``workbench.training.run`` chooses them):
this module imports neither an algorithm nor a probe. Row ``s`` of ``metrics.jsonl`` holds the
measurements of the model before update ``s`` (when due) and the statistics of update ``s``;
the last row (``s = steps``) only measures. The run folder is described in
``workbench.results.run_writer`` and ``docs/results.md``.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..config import Resolved
from ..core import seeds
from ..core.errors import Diverged
from ..runtime.context import RunContext, diverged, done
from ..runtime.data import offline_dataset
from ..runtime.rollout import rollout, rollout_stats, sampling_stats
from ..runtime.update import make_optimizer, make_schedule, update


def run_loop(ctx: RunContext, model, ref, rm, progress: bool = True) -> dict:
    """Train ``model`` for ``run.steps`` update rounds, measuring through ``ctx``. Returns ``ctx.finish``'s dict."""
    res, device = ctx.res, ctx.device
    run, task, spec = res.run, res.task, res.spec
    if spec.best_of is not None:  # nothing to train (best-of-n): the evaluation measures the transformed policy
        return measure_only(ctx, model, spec.best_of(res.algo_cfg) * len(task.eval_prompts()))
    gen = seeds.sampling(run.seed, device)  # sampling
    data_gen = seeds.data(run.seed)  # the prompt stream and fixed datasets
    shuffle_gen = seeds.shuffle(run.seed)  # minibatch order
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], run, device)
    sched = make_schedule(opt, run)
    dataset = offline_dataset(res, ref, data_gen, device) if spec.kind == "offline" else None
    consumed = 0
    status = done(run.steps)
    bar = tqdm(total=run.steps, desc=f"{spec.name}/{task.name}/s{run.seed}", disable=not progress, leave=False)
    try:
        for step in range(run.steps + 1):
            row = {"step": step, **ctx.measure(model, step)}
            if step < run.steps:  # the last iteration only measures
                if spec.kind == "online":
                    stats, n = online_step(res, model, ref, rm, opt, gen, data_gen, shuffle_gen, device, step)
                else:
                    stats, n = offline_step(res, model, ref, opt, dataset, shuffle_gen, device, step)
                consumed += n
                row.update(stats)
                row["lr"] = sched.get_last_lr()[0]
                sched.step()
            row["samples"] = consumed
            ctx.log(row)
            if step < run.steps:
                bar.update(1)
                shown = ("reward/mean", "reward/exact", "kl/exact")
                bar.set_postfix({k.split("/")[-1]: f"{row[k]:.3f}" for k in shown if k in row})
    except Diverged as d:
        status = diverged(d.step, d.reason)
    finally:
        bar.close()
    return ctx.finish(status, model, save=model.save)


def measure_only(ctx: RunContext, model, drawn: int) -> dict:
    """A method without updates (``AlgorithmSpec.best_of``): rows at step 0 and ``steps``, the same parameters.

    ``samples`` is ``drawn``, the completions its measured policy samples (n per eval prompt)."""
    steps = ctx.res.run.steps
    for step in sorted({0, steps}):
        ctx.log({"step": step, **ctx.measure(model, step), "samples": drawn})
    return ctx.finish(done(steps), model, save=model.save)


def online_step(res: Resolved, policy, ref, rm, opt, gen, data_gen, shuffle_gen, device, step: int) -> tuple[dict, int]:
    """One rollout and ``epochs x minibatches`` updates on it. Returns ``(stats, completions sampled)``."""
    run, task, spec, acfg = res.run, res.task, res.spec, res.algo_cfg
    G = run.group_size
    prompts = task.sample_prompts(run.batch_size // G, data_gen).repeat_interleave(G, 0).to(device)  # (B, Tp)
    n_mb, epochs = spec.minibatches(acfg), spec.epochs(acfg)
    single = epochs == 1 and n_mb == 1  # one update per rollout: one policy pass serves old_logp and the loss
    roll, live = rollout(res, policy, ref, rm, prompts, gen, G, with_grad=single)
    prompts, comps = roll.prompts, roll.completions
    with torch.no_grad():
        batch = spec.prepare(roll, acfg, run.beta)
    stats: dict = {}
    B = comps.shape[0]
    for _ in range(epochs):
        perm = torch.randperm(B, generator=shuffle_gen).to(device) if n_mb > 1 else torch.arange(B, device=device)
        for idx in perm.chunk(n_mb):
            if spec.keeps_pairs:  # pairwise losses keep their pairs whole
                idx = torch.arange(B, device=device)
            if single:
                mb, out = batch, live
            else:
                mb, out = batch.select(idx, B), policy(prompts[idx], comps[idx])
            loss, _, s = spec.loss(out, mb, acfg, run.beta)
            stats.update(s)
            stats["grad/norm"] = update(policy, opt, loss, run.max_grad_norm, step)
    stats.update(rollout_stats(roll, batch))
    stats.update(sampling_stats(roll, live.logits))
    return stats, B


def offline_step(res: Resolved, model, ref, opt, dataset: dict, shuffle_gen, device, step: int) -> tuple[dict, int]:
    """One minibatch of the fixed dataset. Returns ``(stats, rows used)``."""
    acfg = res.algo_cfg
    N = len(next(iter(dataset.values())))
    bs = min(acfg.batch_size, N)
    idx = torch.randperm(N, generator=shuffle_gen)[:bs] if bs < N else torch.arange(N)
    batch = {k: v[idx].to(device) for k, v in dataset.items()}
    loss, _, stats = res.spec.step(model, ref, batch, acfg, res.run.beta)
    stats["grad/norm"] = update(model, opt, loss, res.run.max_grad_norm, step)
    return stats, bs
