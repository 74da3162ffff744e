"""The run's own measurement: exact metrics where the task is enumerable, sampled gold reward otherwise.

``Evaluator`` measures a policy at fixed parameters (``reward/exact``, ``kl/exact``,
``objective/exact``, ... from ``workbench.analysis.exact``; ``reward/eval`` and a few
rendered samples from the evaluation's own generator). ``Evaluation`` is the hook the
training loops call every ``eval_every`` steps; at the end of a finished run on an
enumerable task it publishes the final policy's exact log pi(y|x) (``policy.npy``).

Measurement is float32 whatever the run's ``precision``: the evaluation, sampled metrics
included, runs inside ``full_precision`` (autocast off; ``workbench.models.precision``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import Resolved
from ..core import seeds
from ..models.precision import full_precision
from ..results import publish_policy
from ..results.run_writer import RunWriter
from ..runtime.context import Measure
from .exact import ExactEvaluator, all_scores, best_of_n_kl_bound, best_of_n_logprobs, exact_logprobs


class Evaluator:
    """Measures the policy: exact metrics where enumerable, sampled gold reward on eval prompts otherwise."""

    def __init__(self, res: Resolved, ref, device):
        self.res = res
        task = res.task
        self.exact = ExactEvaluator(task, ref, res.run.beta) if (ref is not None and task.enumerable) else None
        self.prompts = task.eval_prompts().to(device)
        self.device = device
        self.n = res.spec.best_of(res.algo_cfg) if res.spec.best_of is not None else None  # bon: the measured policy
        self.rm = None  # bon: the reward that ranks the draws; None: the gold reward (``rank_by``)
        self.rank_scores = self.exact.rewards if self.exact is not None else None  # (P, N) the exact ranking

    @torch.no_grad()
    def rank_by(self, rm) -> None:
        """Best-of-n ranks by ``rm(prompts, completions)`` (a reward model, or its calibrated score: the reward the
        run optimises) instead of the gold reward; on an enumerable task it scores every completion once."""
        self.rm = rm
        if self.exact is not None:
            self.rank_scores = all_scores(rm, self.res.task, self.device)[0]

    @torch.no_grad()
    def __call__(self, model, step: int, writer: RunWriter, gen) -> dict:
        with full_precision(self.device):  # a bf16 run is measured in float32, as its fp32 twin would be
            return self._measure(model, step, writer, gen)

    def _measure(self, model, step: int, writer: RunWriter, gen) -> dict:
        task, run = self.res.task, self.res.run
        if self.res.spec.trains == "reward_model":
            return self._reward_model_metrics(model)
        out = {"model/n_params": sum(p.numel() for p in model.parameters())} if step == 0 else {}  # with a value head
        if self.exact is not None:
            out.update(self.exact.metrics(self.exact_policy(model)) if self.n else self.exact.measure(model))
            if step == 0:
                out.update(self.exact.optimum())
        if self.n:  # best-of-n (workbench.algorithms.bon): n draws per prompt, the best by the ranking reward kept
            comps, gold = self._best_of_n(model, gen)
            out.update({"bon/n": self.n, "bon/kl_bound": best_of_n_kl_bound(self.n)})
        else:
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

    def exact_policy(self, model) -> torch.Tensor:
        """``(P, N)`` log-probabilities of the measured policy: the model's, or best-of-n of it (``self.n``)."""
        logp = exact_logprobs(model, self.res.task, self.exact.prompts).cpu()
        if not self.n:
            return logp
        logq = best_of_n_logprobs(logp, self.rank_scores, self.n)  # float64, -inf where never kept
        return logq.clamp(min=-1e30).float()  # finite: 0 * (log q - log pi_ref) stays 0 in the KL sums

    def _best_of_n(self, model, gen) -> tuple[torch.Tensor, torch.Tensor]:
        """n samples per eval prompt, the first of the best by the ranking reward (gold, or ``self.rm``) kept:
        ``(P, T)`` and their gold rewards."""
        P, n = len(self.prompts), self.n
        prompts = self.prompts.repeat_interleave(n, 0)  # (P n, Tp)
        comps, _ = model.sample(prompts, gen)  # (P n, T)
        gold = self.res.task.reward(prompts, comps).float().view(P, n)
        rank = gold if self.rm is None else self.rm(prompts, comps).float().view(P, n).to(gold.device)
        best = rank.argmax(dim=1)  # the first maximal draw: a tie is broken without looking at y
        rows = torch.arange(P, device=best.device)
        return comps.view(P, n, -1)[rows, best.to(comps.device)], gold[rows, best]

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


class Evaluation(Measure):
    """``Evaluator`` every ``eval_every`` steps and at the last, on the evaluation's own random stream."""

    def __init__(self, res: Resolved, ref, device, writer: RunWriter):
        self.res, self.evaluator, self.writer = res, Evaluator(res, ref, device), writer
        self.gen = seeds.evaluation(res.run.seed, device)

    @property
    def exact(self) -> ExactEvaluator | None:
        return self.evaluator.exact

    def due(self, step: int, last: bool) -> bool:
        return step % self.res.run.eval_every == 0 or last

    def __call__(self, model, step: int, row: dict) -> dict:
        return self.evaluator(model, step, self.writer, self.gen)

    def finish(self, model, out: Path) -> None:
        """The final policy's exact log pi(y|x) for exact distances between runs (``load_policies``)."""
        if self.exact is not None:
            with torch.no_grad():
                publish_policy(out, self.evaluator.exact_policy(model).numpy())  # best-of-n's where the run is bon
