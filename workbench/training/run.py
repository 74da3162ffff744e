"""Training one run: which loop trains it and which measurements it gets.

    train(res, out)   backend "workbench": build the model (and the RLHF phases, workbench.training.pipeline),
                      a RunContext with its measures (evaluation, pipeline, probes), then the loop;
                      another backend: the plugin registered under its name (workbench.backends.<name>)

The one place that knows every kind of measurement (``measures``); the loops, single and stacked
(``train_seeds``), know none of them.
"""

from __future__ import annotations

from pathlib import Path

from ..analysis.evaluate import Evaluation
from ..analysis.probe import Prober
from ..analysis.reasoning import ScratchAblation
from ..config import Resolved, load_backend
from ..models.policy import build_policy, build_reward_model, describe
from ..results import store_root
from ..runtime.context import Measure, RunContext, setup_device
from .loop import run_loop
from .pipeline import Pipeline
from .pretrain import PretrainStats, pretrain
from .stacked import stack_key, train_stacked

__all__ = ["measures", "stack_key", "train", "train_seeds"]


def train(res: Resolved, out: str | Path, progress: bool = True) -> dict:
    """Run one configuration to completion. Returns ``{"status", "step", "final": metrics}``."""
    if res.run.backend != "workbench":  # the same run through another trainer (workbench/backends/)
        return load_backend(res.run.backend).train(res, out, progress)
    run, task, spec, acfg = res.run, res.task, res.spec, res.algo_cfg
    device = setup_device(run)
    if spec.trains == "reward_model":
        model, ref = build_reward_model(task, run.model, run.seed).to(device), None
    else:
        model = build_policy(task, run.model, run.seed, spec.value_head(acfg), device, run.precision)
        base_loss = pretrain(res, model, device) if run.pretrain_steps else None  # the base policy (issue 15)
        ref = model.frozen_copy()
    pipe = None
    if ref is not None and (run.reward_model == "fit" or run.sft_warmup_steps):  # RLHF phases 1-2 first
        root = store_root(out)  # inside a results folder, a fitted reward model is shared (Pipeline's cache)
        pipe = Pipeline(res, model, device, cache=root / "cache" / "reward_models" if root else None)
        ref = pipe.ref  # the SFT policy
    rm = pipe.rm if pipe is not None else None
    if run.reward_model and run.reward_model != "fit" and spec.kind == "online":
        rm = build_reward_model(task, run.model, run.seed, path=run.reward_model).to(device).requires_grad_(False)
    ctx = RunContext(res, out, device)
    ctx.write_config(describe(model) if ref is not None else {})
    ctx.add(*measures(ctx, ref, pipe, rm))
    if run.pretrain_steps and ref is not None:
        ctx.add(PretrainStats(base_loss))
    return run_loop(ctx, model, ref, rm, progress)


def measures(ctx: RunContext, ref, pipe: Pipeline | None = None, rm=None) -> list[Measure | None]:
    """A run's measurement hooks, in the order they fill a row: evaluation, the RLHF pipeline's, probes, and on a
    task with a scratch the scratch ablation (``reasoning/*``). Best-of-n with a reward model ``rm`` ranks its
    draws by it (the proxy), and the pipeline's proxy and gold gains are then those of P_bon over its start."""
    res = ctx.res
    evaluation = Evaluation(res, ref, ctx.device, ctx.writer)
    if res.spec.best_of is not None and rm is not None:
        evaluation.evaluator.rank_by(rm)
        if pipe is not None:
            pipe.measured = evaluation.evaluator.exact_policy
    probe = res.run.probe_every and ref is not None and res.spec.best_of is None  # best-of-n has no loss to probe
    ablation = ScratchAblation(res, ctx.device) if ref is not None and res.task.sep_action is not None else None
    return [
        evaluation,
        pipe,
        Prober(res, ref, evaluation.exact, ctx.device, ctx.out) if probe else None,
        ablation,
    ]


def train_seeds(reses: list[Resolved], outs: list[str | Path], progress: bool = False) -> list[dict]:
    """Runs as a batch dimension (``workbench.training.stacked``), with the measures ``train`` gives a run."""
    return train_stacked(reses, outs, measures, progress)
