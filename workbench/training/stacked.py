"""Runs as a batch dimension: S runs of one shape, differing only in per-run scalars (seed, lr,
beta, max_grad_norm, weight_decay, an online algorithm's float parameters), trained as one computation.

The S policies are stacked (``NativeGPT2.stack``: every parameter gets a leading run
dimension ``(S, ...)``; value heads as a ``StackedLinear``), so one sampling loop, one forward
pass, one backward pass and one optimiser step serve all runs. At toy sizes a step costs
mostly per-operation overhead, not arithmetic, and that overhead is paid once instead of S
times. Nothing else is shared: each run keeps its own generators (so its prompts, samples,
minibatch order and dataset are the ones ``train`` would draw), reference model, config,
loss, gradient clipping, divergence check and run folder, where it writes exactly the files
``train`` writes. The runs' losses are independent, so

    loss = sum_s L_s(theta_s)          d loss / d theta_s = d L_s / d theta_s
    g_s <- g_s min(1, c_s / ||g_s||)   clipping per run, as train's clip_grad_norm_
    AdamW on (S, ...) tensors          elementwise: exactly S independent AdamW steps
                                       (StackedAdamW when the runs' lr or weight decay differ)

and run s's metrics equal those of ``train`` up to float rounding (``tests/test_seeds.py``,
``tests/test_study_stacking.py``). A run whose loss or gradient norm is not finite is marked
diverged at that step, as ``train`` marks it, and the others go on.

Stacks: online algorithms (every epoch and minibatch of PPO, its value head included) and
offline algorithms that split their step into ``forward`` and ``loss`` (SFT, DPO, IPO), on the
workbench backend with a GPT-2 built for the task (no checkpoint ``model.path``), without the
in-run RLHF phases (``reward_model = "fit"``, ``sft_warmup_steps``); a base policy (``pretrain_steps``)
is pretrained run by run before the stack is built, as ``train`` pretrains it. A run with
``model.impl = "hf"`` stacks as the native GPT-2 of the same weights
(``workbench.models.native_gpt2``: the same function, checked against the Hugging Face model in
``tests/test_native_gpt2.py``); its ``config.json`` says so under ``"stacked"``. Anything else
is a ``ConfigError``: train those runs one by one with ``train``.
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
from ..models.native_gpt2 import NativeGPT2, StackedLinear
from ..models.policy import Policy, build_policy, build_reward_model, describe
from ..runtime.context import Measure, RunContext, diverged, done, setup_device
from ..runtime.data import offline_dataset
from ..runtime.rollout import rollout_stats, sampling_stats, score
from ..runtime.update import StackedAdamW, make_optimizer, make_schedule
from .pretrain import PretrainStats, pretrain

# run settings that may differ inside a stack: each run applies its own
PER_RUN = ("seed", "lr", "beta", "max_grad_norm", "weight_decay")


def stack_key(res: Resolved) -> str | None:
    """Runs with the same key can train as one stack (``train_stacked``); None: this run trains alone."""
    try:
        check_batchable([res])
    except ConfigError:
        return None
    return json.dumps(_shared(res), sort_keys=True)


def _shared(res: Resolved) -> dict:
    """What must be equal across a stack: the config without its per-run scalars."""
    d = res.to_dict()
    for k in PER_RUN:
        d.pop(k)
    if res.spec.kind == "online":  # an online algorithm's float parameters act in its own loss only
        d["algo"] = {k: v for k, v in d["algo"].items() if k == "name" or not isinstance(v, float)}
    return d


def check_batchable(reses: list[Resolved]) -> None:
    """Raise ``ConfigError`` unless these runs can train as one stacked computation."""
    if not reses:
        raise ConfigError("no runs to train")
    r0 = reses[0]
    spec, run = r0.spec, r0.run
    if any(_shared(r) != _shared(r0) for r in reses[1:]):
        raise ConfigError(
            f"a stack takes runs whose configs differ only in {', '.join(PER_RUN)} "
            "(and an online algorithm's float parameters)"
        )
    if len({r.config_hash for r in reses}) != len(reses):
        raise ConfigError("the same run twice in one stack")
    problems = []
    if run.backend != "workbench":
        problems.append("backend 'workbench'")
    if run.model.arch != "gpt2" or run.model.path:
        problems.append("a GPT-2 built for the task (model.arch 'gpt2', no model.path)")
    if spec.trains != "policy" or (spec.kind == "offline" and spec.forward is None):
        problems.append("a policy algorithm (an offline one with forward and loss)")
    if run.reward_model == "fit" or run.sft_warmup_steps:
        problems.append("no in-run RLHF phases (reward_model 'fit', sft_warmup_steps)")
    if spec.best_of is not None:
        problems.append("an algorithm that trains (best-of-n only measures)")
    if problems:
        raise ConfigError(f"runs stack only with {'; '.join(problems)}; {spec.name!r} runs: use train() per run")


def train_stacked(
    reses: list[Resolved],
    outs: list[str | Path],
    measures: Callable[[RunContext, Any], list[Measure | None]] = lambda ctx, ref: [],
    progress: bool = False,
) -> list[dict]:
    """Train every run in ``reses`` together; run i writes ``outs[i]``.

    ``measures(ctx, ref)`` gives each run's measurement hooks (``workbench.training.run`` passes the
    evaluation and the probes). Returns one ``{"status", "step", "final"}`` per run, as ``train`` does.
    """
    check_batchable(reses)
    r0 = reses[0]
    run, task, spec = r0.run, r0.task, r0.spec
    S, outs = len(reses), [Path(o) for o in outs]
    device = setup_device(run)
    seed_list = [r.run.seed for r in reses]
    gens = [seeds.sampling(s, device) for s in seed_list]  # as train(): sampling
    data_gens = [seeds.data(s) for s in seed_list]  # the prompt streams and fixed datasets
    shuffle_gens = [seeds.shuffle(s) for s in seed_list]  # minibatch order

    native = run.model.model_copy(update={"impl": "native"})  # an "hf" GPT-2 stacks as the native one
    value_head = spec.value_head(r0.algo_cfg)
    singles = [build_policy(task, native, s, value_head, device, run.precision) for s in seed_list]
    base_losses = [pretrain(r, p, device) for r, p in zip(reses, singles, strict=True)] if run.pretrain_steps else []
    refs = [p.frozen_copy() for p in singles]  # the base policies when pretrained (issue 15), each alone as train's
    tok = singles[0].tokenizer
    policy = Policy(NativeGPT2.stack([p.model for p in singles]), tok, task, precision=run.precision).to(
        device
    )  # (S, ...) parameters
    if value_head:
        policy.value_head = StackedLinear([p.value_head for p in singles]).to(device)
    ref = Policy(NativeGPT2.stack([p.model for p in refs]), tok, task, precision=run.precision)
    ref = ref.to(device).requires_grad_(False)
    params = [p for p in policy.parameters() if p.requires_grad]
    if len({(r.run.lr, r.run.weight_decay) for r in reses}) == 1:
        opt = make_optimizer(params, run, device)
    else:
        opt = StackedAdamW(params, [r.run.lr for r in reses], [r.run.weight_decay for r in reses])
    sched = make_schedule(opt, run)
    base_lr = [r.run.lr if isinstance(opt, StackedAdamW) else 1.0 for r in reses]  # logged lr = base x schedule

    stacked = {
        "runs": [r.config_hash for r in reses],
        "model": "native GPT-2 (model.impl 'hf' stacks as the same network)" if run.model.impl == "hf" else "native",
    }
    ctxs = [RunContext(r, o, device) for r, o in zip(reses, outs, strict=True)]
    for ctx, p, rf in zip(ctxs, singles, refs, strict=True):
        ctx.write_config(describe(p), batched_seeds=seed_list, stacked=stacked)
        ctx.add(*measures(ctx, rf))
    for ctx, loss in zip(ctxs, base_losses):
        ctx.add(PretrainStats(loss))
    rm = None
    if run.reward_model and spec.kind == "online":
        rm = build_reward_model(task, run.model, run.seed, path=run.reward_model).to(device).requires_grad_(False)
    datasets = None
    if spec.kind == "offline":
        datasets = [offline_dataset(r, rf, g, device) for r, g, rf in zip(reses, data_gens, refs, strict=True)]
        if len({len(next(iter(d.values()))) for d in datasets}) != 1:
            raise ConfigError("the runs of a stack drew datasets of different sizes")
    del singles

    status = [done(run.steps) for _ in range(S)]
    alive = list(range(S))
    consumed = 0  # samples per run so far: completions, pairs or demonstrations
    for step in range(run.steps + 1):
        rows = {s: {"step": step} for s in alive}
        last = step == run.steps
        if any(m.due(step, last) for m in ctxs[0].measures):
            for s in alive:
                rows[s].update(ctxs[s].measure(seed_policy(policy, s, task), step))
        if step < run.steps:
            if spec.kind == "online":
                stats, n = stacked_online_step(reses, policy, ref, rm, opt, gens, data_gens, shuffle_gens, alive)
            else:
                stats, n = stacked_offline_step(reses, policy, ref, opt, datasets, shuffle_gens, alive)
            consumed += n
            factor = sched.get_last_lr()[0]
            sched.step()
            for s in list(alive):
                if "diverged" in stats[s]:
                    status[s] = diverged(step, stats[s]["diverged"])
                    alive.remove(s)
                    rows.pop(s)
                else:
                    rows[s].update(stats[s], lr=base_lr[s] * factor)
        for s, row in rows.items():
            row["samples"] = consumed
            ctxs[s].log(row)
        if not alive:
            break
    results = []
    for s in range(S):
        view = seed_policy(policy, s, task) if status[s]["status"] == "done" else None
        results.append(ctxs[s].finish(status[s], view, save=view.save if view is not None else None))
    return results


def seed_policy(policy: Policy, s: int, task) -> Policy:
    """Run ``s`` of a stacked policy as an ordinary ``Policy`` (a copy of its parameters)."""
    view = Policy(policy.model.unstack(s), policy.tokenizer, task)
    if isinstance(policy.value_head, StackedLinear):
        view.value_head = policy.value_head.unstack(s)
    return view.to(policy.device).eval()


def _rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x (S, B, ...)`` -> ``(S, b, ...)``: rows ``idx[s] (b,)`` of run s."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], idx]


def stacked_online_step(reses, policy, ref, rm, opt, gens, data_gens, shuffle_gens, alive) -> tuple[list[dict], int]:
    """One rollout and ``epochs x minibatches`` updates of every run, as ``loop.online_step`` does each.

    Returns per-run stats (``{"diverged": reason}`` on failure) and the completions each sampled.
    """
    r0 = reses[0]
    run, task, spec, acfg0 = r0.run, r0.task, r0.spec, r0.algo_cfg
    S, G, device = len(reses), run.group_size, policy.device
    prompts = torch.stack([task.sample_prompts(run.batch_size // G, g) for g in data_gens])
    prompts = prompts.repeat_interleave(G, 1).to(device)  # (S, B, Tp)
    comps, _ = policy.sample(prompts, gens, run.temperature)  # (S, B, T)
    n_mb, epochs = spec.minibatches(acfg0), spec.epochs(acfg0)
    single = epochs == 1 and n_mb == 1  # one update per rollout: one policy pass serves old_logp and the loss
    with torch.set_grad_enabled(single):
        live = policy(prompts, comps)
    with torch.no_grad():
        ref_logp = ref(prompts, comps).logp  # (S, B, T)
    B, T = comps.shape[1:]
    scores, step_rewards, gold = score(r0, rm, prompts.flatten(0, 1), comps.flatten(0, 1))
    scores, gold, step_rewards = scores.view(S, B), gold.view(S, B), step_rewards.view(S, B, T)
    rolls, batches = [], []
    for s, r in enumerate(reses):
        old = live.logp[s].detach()
        roll = Rollout(
            prompts=prompts[s],
            completions=comps[s],
            mask=task.action_mask(comps[s]),
            old_logp=old,
            ref_logp=ref_logp[s],
            scores=scores[s],
            step_rewards=step_rewards[s],
            gold=gold[s],
            group_size=G,
            old_values=live.values[s].detach() if live.values is not None else None,
            eos_action=task.eos_action,
            episode=task.episode_stats(prompts[s], comps[s]),
        )
        with torch.no_grad():
            batches.append(spec.prepare(roll, r.algo_cfg, r.run.beta))
        rolls.append(roll)
    stats: list[dict] = [{} for _ in range(S)]
    dead = set(range(S)) - set(alive)
    for _ in range(epochs):
        if n_mb > 1 and not spec.keeps_pairs:
            perms = torch.stack([torch.randperm(B, generator=g) for g in shuffle_gens]).to(device)  # (S, B)
        else:
            if n_mb > 1:  # train() draws the permutation, then keeps the pairs whole: the generators advance alike
                for g in shuffle_gens:
                    torch.randperm(B, generator=g)
            perms = torch.arange(B, device=device).expand(S, B)
        for idx in perms.chunk(n_mb, dim=1) if not spec.keeps_pairs else [perms] * len(perms[0].chunk(n_mb)):
            if single:
                out = live
            else:
                out = policy(_rows(prompts, idx), _rows(comps, idx))

            def minibatch_loss(s, r, out=out, idx=idx):
                mb = batches[s] if single else batches[s].select(idx[s], B)
                o = PolicyOutput(out.logp[s], out.logits[s], out.values[s] if out.values is not None else None)
                return spec.loss(o, mb, r.algo_cfg, r.run.beta)

            _stacked_update(reses, policy, opt, _run_losses(reses, minibatch_loss, stats, dead), stats, dead)
    for s in range(S):
        if s not in dead:
            stats[s].update(rollout_stats(rolls[s], batches[s]))
            stats[s].update(sampling_stats(rolls[s], live.logits[s] if live.logits is not None else None))
    return stats, B


def stacked_offline_step(reses, policy, ref, opt, datasets, shuffle_gens, alive) -> tuple[list[dict], int]:
    """One minibatch of every run's fixed dataset, as ``loop.offline_step`` does each."""
    r0 = reses[0]
    spec, device = r0.spec, policy.device
    N = len(next(iter(datasets[0].values())))
    bs = min(r0.algo_cfg.batch_size, N)
    idx = [torch.randperm(N, generator=g)[:bs] if bs < N else torch.arange(N) for g in shuffle_gens]
    batch = {k: torch.stack([d[k][i] for d, i in zip(datasets, idx, strict=True)]).to(device) for k in datasets[0]}
    outputs = spec.forward(policy, ref, batch)  # tensors (S, ...)
    stats: list[dict] = [{} for _ in reses]
    dead = set(range(len(reses))) - set(alive)

    def run_loss(s, r):
        mine = {k: v[s] for k, v in batch.items()}
        return spec.loss({k: v[s] for k, v in outputs.items()}, mine, r.algo_cfg, r.run.beta)

    _stacked_update(reses, policy, opt, _run_losses(reses, run_loss, stats, dead), stats, dead)
    return stats, bs


def _run_losses(reses, loss_of, stats: list[dict], dead: set) -> list:
    """Each live run's loss ``loss_of(s, res) -> (loss, per_token, stats)``; a non-finite one joins ``dead``
    (the run is marked diverged at this step, before any parameter changes, as ``update`` does alone)."""
    losses = []
    for s, r in enumerate(reses):
        loss, _, st = loss_of(s, r)
        if s in dead:
            continue
        if not torch.isfinite(loss):
            stats[s] = {"diverged": f"non-finite loss {loss.item()}"}
            dead.add(s)
            continue
        losses.append(loss)
        stats[s].update(st)
    return losses


def _stacked_update(reses, policy, opt, losses, stats, dead: set) -> None:
    """Backward of sum_s L_s, clipping per run, one optimiser step; a run with a non-finite norm joins ``dead``.

    A dead run's parameters get no gradient (its rows are zeroed); its stats keep the reason.
    """
    if not losses:
        return
    opt.zero_grad(set_to_none=True)
    torch.stack(losses).sum().backward()  # sum_s L_s: each run's parameters get their own gradient
    grads = [p.grad for p in policy.parameters() if p.grad is not None]
    norms = torch.stack([g.pow(2).flatten(1).sum(1) for g in grads]).sum(0).sqrt()  # (S,) ||g_s||
    max_norm = torch.tensor([r.run.max_grad_norm for r in reses], device=norms.device, dtype=norms.dtype)
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)  # as clip_grad_norm_
    for s in range(len(reses)):
        if s in dead:
            coef[s] = 0.0
        elif not torch.isfinite(norms[s]):
            stats[s] = {"diverged": f"non-finite gradient norm {norms[s].item()}"}
            dead.add(s)
            coef[s] = 0.0
        else:
            stats[s]["grad/norm"] = norms[s].item()
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.dim() - 1)))).nan_to_num_(0.0)
    opt.step()
