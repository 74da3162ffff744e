"""The two training loops: online (sample, score, update) and offline (fixed dataset).

    online:  prompts -> rollout -> reward -> prepare (advantages) -> epochs x minibatches of loss/step -> log
    offline: fixed dataset -> minibatch -> loss -> step -> log

Algorithms plug in through ``AlgorithmSpec``; neither loop knows any algorithm's maths.
Every ``eval_every`` steps (and at step 0 and at the end) the run measures the policy:
exactly by enumeration on enumerable tasks (``workbench.analysis.exact``), by sampling
on the eval prompts otherwise. Files written to the run folder:

    config.json      the resolved config, its hash, the model summary
    metrics.jsonl    one JSON object per logged step: ``step``, ``samples`` and namespaced metrics
    samples.jsonl    a few rendered completions per eval
    credit.jsonl     per-position credit-assignment data of each probe (``probe_every``; online, enumerable)
    policy.npy       the final policy's exact log pi(y|x), (eval prompts, completions)
                     (enumerable; ``store.load_policies``)
    status.json      {"status": "done" | "diverged", "step": ..., "reason": ...}
    checkpoint/      the final model (Hugging Face layout, safetensors)
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..algorithms.spec import Rollout
from ..analysis.exact import ExactEvaluator
from ..config import Resolved
from ..core.kl import kl_estimate
from ..models.policy import build_policy, build_reward_model, describe, resolve_device


class Diverged(RuntimeError):
    def __init__(self, step: int, reason: str):
        super().__init__(f"diverged at step {step}: {reason}")
        self.step, self.reason = step, reason


class RunWriter:
    """Appends metrics and samples to the run folder, one flushed line at a time."""

    def __init__(self, out: Path):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.metrics = open(out / "metrics.jsonl", "w")  # noqa: SIM115 (open for the run; close() closes)
        self.samples = open(out / "samples.jsonl", "w")  # noqa: SIM115

    def config(self, d: dict) -> None:
        _write_json(self.out / "config.json", d)

    def log(self, row: dict) -> None:
        row = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in row.items()}  # NaN -> null
        self.metrics.write(json.dumps(row, sort_keys=True) + "\n")
        self.metrics.flush()

    def log_samples(self, rows: list[dict]) -> None:
        for r in rows:
            self.samples.write(json.dumps(r) + "\n")
        self.samples.flush()

    def status(self, d: dict) -> None:
        _write_json(self.out / "status.json", d)

    def close(self) -> None:
        self.metrics.close()
        self.samples.close()


def _write_json(path: Path, d: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(d, indent=2, sort_keys=True))
    tmp.replace(path)


def train(res: Resolved, out: str | Path, progress: bool = True) -> dict:
    """Run one configuration to completion. Returns ``{"status", "step", "final": metrics}``."""
    if res.run.backend == "trl":  # the same run through TRL's own trainer (workbench/backends/trl.py)
        from ..backends.trl import train_trl

        return train_trl(res, out, progress)
    run, task, spec, acfg = res.run, res.task, res.spec, res.algo_cfg
    out = Path(out)
    device = resolve_device(run.device)
    if device.type == "cpu":
        torch.set_num_threads(run.cpu_threads)
    torch.manual_seed(run.seed)
    gen = torch.Generator(device=device).manual_seed(run.seed)  # sampling
    eval_gen = eval_generator(run.seed, device)  # the measurements' own samples: eval_every never changes training
    data_gen = torch.Generator().manual_seed(run.seed + 1_000_003)  # the prompt stream and fixed datasets
    shuffle_gen = torch.Generator().manual_seed(run.seed + 2_000_003)  # minibatch order

    if spec.trains == "reward_model":
        model = build_reward_model(task, run.model, run.seed).to(device)
        ref = None
    else:
        value_head = spec.value_head and getattr(acfg, "use_value_head", True)
        model = build_policy(task, run.model, run.seed, value_head, device)
        ref = model.frozen_copy()
    pipe = None
    if ref is not None and (
        run.reward_model == "fit" or run.sft_warmup_steps
    ):  # RLHF phases 1-2 first (workbench/training/pipeline.py)
        from .pipeline import Pipeline

        pipe = Pipeline(res, model, device)
        ref = pipe.ref  # the SFT policy
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=run.lr, weight_decay=run.weight_decay, fused=device.type in ("cpu", "cuda"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(run.lr_schedule, run.steps))

    writer = RunWriter(out)
    cfg_dict = res.to_dict()
    writer.config({"config": cfg_dict, "config_hash": res.config_hash, "model": describe(model) if ref else {}})
    evaluator = Evaluator(res, ref, device)
    prober = None
    if run.probe_every and ref is not None:
        from ..analysis.probe import Prober

        prober = Prober(res, ref, evaluator.exact, device, out)

    rm = pipe.rm if pipe is not None else None
    if run.reward_model and run.reward_model != "fit" and spec.kind == "online":
        rm = build_reward_model(task, run.model, run.seed, path=run.reward_model).to(device).requires_grad_(False)

    dataset = spec.dataset(task, acfg, data_gen) if spec.kind == "offline" else None
    consumed = 0
    status = {"status": "done", "step": run.steps}
    final: dict = {}
    bar = tqdm(total=run.steps, desc=f"{spec.name}/{task.name}/s{run.seed}", disable=not progress, leave=False)
    t0 = time.perf_counter()
    try:
        for step in range(run.steps + 1):
            row = {"step": step}
            if step % run.eval_every == 0 or step == run.steps:
                row.update(evaluator(model, step, writer, eval_gen))
                if pipe is not None:
                    row.update(pipe.measure(model, step, row))  # proxy vs gold reward: reward/proxy_*, rm/...
            if prober is not None and (step % run.probe_every == 0 or step == run.steps):
                row.update(prober(model, step))  # grad/..., credit/...: own generators, parameters untouched
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
            row["time/elapsed_s"] = time.perf_counter() - t0
            writer.log(row)
            final.update(row)
            if step < run.steps:
                bar.update(1)
                bar.set_postfix(
                    {k.split("/")[-1]: f"{row[k]:.3f}" for k in ("reward/mean", "reward/exact", "kl/exact") if k in row}
                )
    except Diverged as d:
        status = {"status": "diverged", "step": d.step, "reason": d.reason}
    finally:
        bar.close()
    if run.save_checkpoint and status["status"] == "done":
        model.save(out / "checkpoint")
    if evaluator.exact is not None and status["status"] == "done":  # exact distances between runs' final policies
        from ..analysis.exact import exact_logprobs
        from ..results.store import publish_policy

        with torch.no_grad():
            publish_policy(out, exact_logprobs(model, task, evaluator.exact.prompts).cpu().numpy())
    writer.status(status)
    writer.close()
    return {**status, "final": final}


EVAL_SEED_OFFSET = 1_592_649_633  # the evaluation's sampling stream, apart from training's (seed) and the others


def eval_generator(seed: int, device="cpu") -> torch.Generator:
    """The generator of a run's evaluation samples (``reward/eval``, ``samples.jsonl``).

    Its own stream, as the probes have theirs: drawing from the training generator would make
    ``eval_every`` change every rollout after the first measurement. The TRL backend and
    stacked seeds use the same stream, so a run measures the same samples however it trains.
    """
    return torch.Generator(device=device).manual_seed(seed + EVAL_SEED_OFFSET)


def lr_factor(schedule: str, steps: int):
    """Multiplier of the learning rate at each update round: constant, linear or cosine decay to 0."""
    if schedule == "linear":
        return lambda s: 1.0 - s / max(steps, 1)
    if schedule == "cosine":
        return lambda s: 0.5 * (1.0 + math.cos(math.pi * s / max(steps, 1)))
    return lambda s: 1.0


class Evaluator:
    """Measures the policy: exact metrics where enumerable, sampled gold reward on eval prompts otherwise."""

    def __init__(self, res: Resolved, ref, device):
        self.res = res
        task = res.task
        self.exact = ExactEvaluator(task, ref, res.run.beta) if (ref is not None and task.enumerable) else None
        self.prompts = task.eval_prompts().to(device)

    @torch.no_grad()
    def __call__(self, model, step: int, writer: RunWriter, gen) -> dict:
        task, run = self.res.task, self.res.run
        if self.res.spec.trains == "reward_model":
            return self._reward_model_metrics(model)
        out = {"model/n_params": sum(p.numel() for p in model.parameters())} if step == 0 else {}  # with a value head
        if self.exact is not None:
            out.update(self.exact.measure(model))
            if step == 0:
                out.update(self.exact.optimum())
        comps, _ = model.sample(self.prompts, gen)
        gold = task.reward(self.prompts, comps)
        out["reward/eval"] = gold.float().mean().item()
        n = min(run.n_logged_samples, len(comps))
        writer.log_samples(
            [
                {"step": step, "text": task.render(self.prompts[i].cpu(), comps[i].cpu()), "reward": gold[i].item()}
                for i in range(n)
            ]
        )
        return out

    def _reward_model_metrics(self, rm) -> dict:
        task = self.res.task
        if not task.enumerable:
            return {}
        comps = task.all_completions().to(self.prompts.device)
        P, N = len(self.prompts), len(comps)
        prompts = self.prompts.repeat_interleave(N, 0)
        scores = rm(prompts, comps.repeat(P, 1)).cpu()
        gold = task.reward(prompts.cpu(), comps.repeat(P, 1).cpu())
        if gold.std() == 0 or scores.std() == 0:
            return {}
        corr = torch.corrcoef(torch.stack([scores, gold]))[0, 1].item()
        return {"rm/gold_correlation": corr}


def score(res: Resolved, rm, prompts, comps) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(scores (B,), step_rewards (B, T), gold (B,))`` for a batch of completions."""
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


def rollout(res: Resolved, policy, ref, rm, prompts, gen, group_size: int) -> Rollout:
    """Sample with the KV cache, then one no-grad pass for old log-probs/values and one for the reference.

    ``prompts (B, Tp)`` with the ``group_size`` completions of a prompt on adjacent rows.
    """
    return _rollout(res, policy, ref, rm, prompts, gen, group_size, with_grad=False)[0]


def _rollout(res: Resolved, policy, ref, rm, prompts, gen, group_size: int, with_grad: bool):
    """``(rollout, policy output)``; ``with_grad``: the policy pass keeps its graph, so the loss of a
    single update can reuse it (``old_logp`` is its detached value: rho = 1 exactly, as TRL's
    ``num_iterations = 1``)."""
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


def online_step(res: Resolved, policy, ref, rm, opt, gen, data_gen, shuffle_gen, device, step: int) -> tuple[dict, int]:
    run, task, spec, acfg = res.run, res.task, res.spec, res.algo_cfg
    G = run.group_size
    prompts = task.sample_prompts(run.batch_size // G, data_gen).repeat_interleave(G, 0).to(device)  # (B, Tp)
    n_mb = spec.minibatches(acfg)
    single = (
        spec.epochs(acfg) == 1 and n_mb == 1
    )  # one update per rollout: one policy pass serves old_logp and the loss
    roll, live = _rollout(res, policy, ref, rm, prompts, gen, G, with_grad=single)
    prompts, comps = roll.prompts, roll.completions
    with torch.no_grad():
        batch = spec.prepare(roll, acfg, run.beta)
    stats: dict = {}
    B = comps.shape[0]
    for _ in range(spec.epochs(acfg)):
        perm = torch.randperm(B, generator=shuffle_gen).to(device) if n_mb > 1 else torch.arange(B, device=device)
        for idx in perm.chunk(n_mb):
            if "first_wins" in batch:  # pairwise losses keep their pairs whole
                idx = torch.arange(B, device=device)
            if single:
                mb, out = batch, live
            else:
                mb = {k: (v[idx] if v.shape[:1] == (B,) else v) for k, v in batch.items()}
                out = policy(prompts[idx], comps[idx])
            loss, _, s = spec.loss(out, mb, acfg, run.beta)
            stats.update(s)
            stats["grad/norm"] = _update(policy, opt, loss, run.max_grad_norm, step)
    stats.update(_rollout_stats(roll, batch))
    return stats, B


def offline_step(res: Resolved, model, ref, opt, dataset: dict, shuffle_gen, device, step: int) -> tuple[dict, int]:
    acfg = res.algo_cfg
    N = len(next(iter(dataset.values())))
    bs = min(acfg.batch_size, N)
    idx = torch.randperm(N, generator=shuffle_gen)[:bs] if bs < N else torch.arange(N)
    batch = {k: v[idx].to(device) for k, v in dataset.items()}
    loss, _, stats = res.spec.step(model, ref, batch, acfg, res.run.beta)
    stats["grad/norm"] = _update(model, opt, loss, res.run.max_grad_norm, step)
    return stats, bs


def _update(model, opt, loss, max_norm: float, step: int) -> float:
    if not torch.isfinite(loss):
        raise Diverged(step, f"non-finite loss {loss.item()}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if not torch.isfinite(norm):
        raise Diverged(step, f"non-finite gradient norm {norm.item()}")
    opt.step()
    return norm.item()


def _rollout_stats(roll: Rollout, batch: dict) -> dict:
    """Reward and sampled-KL figures of one rollout; KL names say estimator and where it acts."""
    out = {
        "reward/mean": roll.scores.mean().item(),
        "reward/std": roll.scores.std().item() if len(roll.scores) > 1 else 0.0,
        "reward/gold_mean": roll.gold.mean().item(),
    }
    for name in ("k1", "k2", "k3"):
        key = next((k for k in batch if k.startswith(f"kl/{name}_")), None)
        if key is not None:  # the estimate the algorithm used, named by where it acted
            out[key] = (batch[key]).sum(-1).mean().item()
        else:  # a monitor only: not in the reward nor in the loss
            out[f"kl/{name}_monitor"] = (
                (kl_estimate(roll.old_logp, roll.ref_logp, name) * roll.mask).sum(-1).mean().item()
            )
    if "advantages" in batch:
        out["adv/mean"] = batch["advantages"].mean().item()
        out["adv/std"] = batch["advantages"].std().item()
    return out
