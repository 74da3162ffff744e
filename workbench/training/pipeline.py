"""The three-phase RLHF pipeline inside one run (claim C7): SFT, a Bradley-Terry reward model, RL.

Set on an online run with ``sft_warmup_steps`` and/or ``reward_model = "fit"``:

    phase 1  SFT: ``sft_warmup_steps`` steps of masked NLL on the task's demonstrations
             (``run.batch_size`` per step, ``run.lr``). The result is both the starting
             policy and the reference pi_ref of the RL phase, as the SFT model is in
             InstructGPT; every exact KL of the run is measured from it.
    phase 2  reward model: ``rm_steps`` steps of the Bradley-Terry loss (64 pairs per step,
             ``run.lr``) on ``rm_pairs`` preference pairs of uniformly drawn completions
             (``rm_pairs_from = "sft"``: two samples of phase 1's policy, pi_ref, as in InstructGPT),
             each labelled once by sampling P(a > b) = sigmoid(r(a) - r(b)) (finite, noisy
             preferences, as from people). The model is then frozen. Inside a results folder the fit
             is cached (``cached_fit``): runs that read the same settings share it. With ``rm_calibrate``
             it is then calibrated to gold units on ``rm_pairs`` held-out pairs drawn the same
             way (``calibration``); ``rm_calibrate = "optimise"``: phase 3 optimises the calibrated score.
    phase 3  the run's own algorithm against the reward model's score (``reward/mean``),
             the gold reward only measured (``reward/gold_mean``, ``reward/exact``).

A Bradley-Terry model fitted to labels drawn at temperature 1 would estimate r(x, y) + c(x), in
the gold reward's units up to a constant per prompt, which cancels in a gain over the same
prompts; a finite fit need not (issue 16 found proxy gains of 2.8-4.7 on a gold reward in
[0, 1]), so with ``rm_calibrate`` the proxy below is the calibrated score a r_RM + b, in gold
units by a least-squares fit, and without it the raw score. On enumerable tasks the run logs,
at every measurement,

    reward/proxy_exact    E_x sum_y pi(y|x) r_RM(x, y)              (exact)
    reward/proxy_gain     reward/proxy_exact - its value at step 0  (what the RL phase sees)
    reward/gold_gain      reward/exact - its value at step 0        (what it gets)
    rm/overoptimisation   reward/proxy_gain - reward/gold_gain      (Gao et al. 2022, arXiv 2210.10760)

against ``kl/exact``, the KL from the start (the SFT policy). At step 0 it logs the
phases' own figures: ``pipeline/sft_loss``, ``pipeline/rm_loss``, ``rm/exact_accuracy``
(share of all pairs of completions with different gold rewards that the reward model
orders like the gold reward) and ``rm/gold_correlation`` (over every completion); with
``rm_calibrate`` also ``rm/heldout_accuracy``, ``rm/calibration_slope``, ``rm/calibration_intercept``
and ``rm/calibration_r2`` (on the held-out pairs, any task).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..algorithms import dpo, sft
from ..algorithms import reward_model as rm_algo
from ..analysis.exact import all_scores, exact_logprobs
from ..config import Resolved, config_hash
from ..core.seeds import PIPELINE_OFFSET
from ..models.policy import build_reward_model
from ..results import publish
from ..runtime.context import Measure
from ..runtime.update import make_optimizer, update


def wanted(run) -> bool:
    return run.reward_model == "fit" or run.sft_warmup_steps > 0


class Pipeline(Measure):
    """Runs phases 1 and 2 on construction; ``ref`` and ``rm`` then serve phase 3; as a measure, logs proxy vs gold."""

    def __init__(self, res: Resolved, policy, device, cache: Path | None = None):
        self.res, self.task = res, res.task
        run = res.run
        self.stats: dict[str, float] = {}
        if run.sft_warmup_steps:
            self.stats["pipeline/sft_loss"] = sft_warmup(res, policy, device)
        self.ref = policy.frozen_copy()
        self.rm = None  # what phase 3 optimises: the reward model, or its calibrated score
        self.scores = None  # (P, N) the proxy's score of every completion (enumerable tasks)
        if run.reward_model == "fit":
            self.rm, loss = cached_fit(res, device, self.ref, cache)
            self.stats["pipeline/rm_loss"] = loss
            slope, intercept = 1.0, 0.0
            if run.rm_calibrate != "off":
                s, g = heldout_scores(res, self.rm, self.ref, device)
                self.stats["rm/heldout_accuracy"] = pair_accuracy(s[:, 0] - s[:, 1], g[:, 0] - g[:, 1])
                cal = calibration(s, g)  # (n, 2): the pairs' two completions
                self.stats.update({f"rm/calibration_{k}": v for k, v in cal.items()})
                slope, intercept = cal["slope"], cal["intercept"]
            if self.task.enumerable:
                self.scores, gold = all_scores(self.rm, self.task, device)
                self.stats.update(rm_quality(self.scores, gold))
                if run.rm_calibrate != "off":
                    self.scores = slope * self.scores + intercept  # the proxy metrics in gold units
            if run.rm_calibrate == "optimise":
                self.rm = Calibrated(self.rm, slope, intercept)
        self.start: dict[str, float] = {}
        self.gold = gold if self.scores is not None else None  # (P, N) the gold reward of every completion
        self.measured = None  # best-of-n: model -> (P, N) log-probabilities of the policy it measures (``measures``)

    def due(self, step: int, last: bool) -> bool:
        return step % self.res.run.eval_every == 0 or last

    def __call__(self, policy, step: int, row: dict) -> dict:
        return self.measure(policy, step, row)

    @torch.no_grad()
    def measure(self, policy, step: int, row: dict) -> dict:
        """Proxy vs gold at a measurement step (``row`` holds the evaluator's ``reward/exact``)."""
        out = dict(self.stats) if step == 0 else {}
        if self.scores is None or "reward/exact" not in row:
            return out
        p = exact_logprobs(policy, self.task, self.task.eval_prompts()).cpu().exp()  # (P, N)
        if self.measured is not None:  # best-of-n: the gains are those of P_bon over its starting policy pi
            if not self.start:
                self.start = {
                    k: (p * v).sum(-1).mean().item() for k, v in (("proxy", self.scores), ("gold", self.gold))
                }
            p = self.measured(policy).double().exp()
        now = {"proxy": (p * self.scores).sum(-1).mean().item(), "gold": row["reward/exact"]}
        if not self.start:
            self.start = now
        proxy_gain, gold_gain = now["proxy"] - self.start["proxy"], now["gold"] - self.start["gold"]
        out.update(
            {
                "reward/proxy_exact": now["proxy"],
                "reward/proxy_gain": proxy_gain,
                "reward/gold_gain": gold_gain,
                "rm/overoptimisation": proxy_gain - gold_gain,
            }
        )
        return out


def sft_warmup(res: Resolved, policy, device) -> float:
    """Phase 1, in place on ``policy``: SFT on demonstrations. Returns the last loss."""
    run = res.run
    cfg = sft.SFTConfig(batch_size=run.batch_size)
    gen = torch.Generator().manual_seed(run.seed + PIPELINE_OFFSET)
    data = sft.dataset(res.task, cfg, gen)
    opt = make_optimizer([p for p in policy.parameters() if p.requires_grad], run, fused=False)
    loss = torch.tensor(float("nan"))
    for _ in range(run.sft_warmup_steps):
        idx = torch.randint(0, cfg.n_demos, (cfg.batch_size,), generator=gen)
        batch = {k: v[idx].to(device) for k, v in data.items()}
        loss, _, _ = sft.SPEC.step(policy, None, batch, cfg, run.beta)
        update(policy, opt, loss, run.max_grad_norm)
    opt.zero_grad(set_to_none=True)
    return loss.item()


def rm_pairs(res: Resolved, gen: torch.Generator, sft=None) -> dict:
    """``rm_pairs`` sampled-label pairs: uniform completions, or (``rm_pairs_from = "sft"``) two samples of ``sft``,
    the SFT policy, per prompt (``dpo.preference_dataset``'s ``pairs = "reference"`` path)."""
    run = res.run
    pairs = "reference" if run.rm_pairs_from == "sft" else "random"
    opts = dpo.PreferenceOptions(pairs=pairs, n_pairs=run.rm_pairs, labels="sampled", bt_temperature=1.0)
    return dpo.preference_dataset(res.task, opts, gen, ref=sft if pairs == "reference" else None)


def fit_reward_model(res: Resolved, device, sft=None):
    """Phase 2: a Bradley-Terry reward model on ``rm_pairs`` sampled-label pairs (``rm_pairs``; ``sft``: the
    policy that samples them under ``rm_pairs_from = "sft"``). Returns ``(frozen rm, last loss)``."""
    run, task = res.run, res.task
    cfg = rm_algo.RewardModelConfig(pairs="random", n_pairs=run.rm_pairs, labels="sampled", bt_temperature=1.0)
    gen = torch.Generator().manual_seed(run.seed + 2 * PIPELINE_OFFSET)
    data = rm_pairs(res, gen, sft)
    rm = build_reward_model(task, run.model, run.seed).to(device)
    opt = make_optimizer([p for p in rm.parameters() if p.requires_grad], run, fused=False)
    bs = min(cfg.batch_size, run.rm_pairs)
    loss = torch.tensor(float("nan"))
    for _ in range(run.rm_steps):
        idx = torch.randperm(run.rm_pairs, generator=gen)[:bs]
        batch = {k: v[idx].to(device) for k, v in data.items()}
        loss, _, _ = rm_algo.step(rm, None, batch, cfg, run.beta)
        update(rm, opt, loss, run.max_grad_norm)
    return rm.eval().requires_grad_(False), loss.item()


# run settings the reward model's fit never reads (``fit_reward_model``): runs that differ only in these share a fit
NOT_READ_BY_FIT = (
    "algo",
    "steps",
    "eval_every",
    "probe_every",
    "probe_minibatches",
    "report_to",
    "n_logged_samples",
    "save_checkpoint",
    "rm_calibrate",
    "group_size",
    "lr_schedule",
)


def fit_key(res: Resolved) -> str:
    """The hash of every setting phase 2 can read: the run's config without ``NOT_READ_BY_FIT``. Pairs sampled
    from the SFT policy (``rm_pairs_from = "sft"``) or an SFT phase keep everything (the policy they come from
    is built for the run's algorithm), so such runs share a fit only with themselves."""
    d = res.to_dict()
    if res.run.rm_pairs_from == "uniform" and not res.run.sft_warmup_steps:
        d = {k: v for k, v in d.items() if k not in NOT_READ_BY_FIT and k != "batch_size"}
    return config_hash(d)


def cached_fit(res: Resolved, device, sft, cache: Path | None):
    """``fit_reward_model``, or the same fit from ``cache`` (``<results>/cache/reward_models``, None: no cache):
    the PPO, GRPO and best-of-n runs of one seed of ``studies/overoptimisation.toml`` read the same settings, so
    the first fits and saves its weights (published atomically), the others load them, bit for bit the model a fit
    would give (``tests/test_pipeline.py``). A file that cannot be read is fitted again."""
    if cache is None:
        return fit_reward_model(res, device, sft)
    path = cache / f"{fit_key(res)}.pt"
    if path.exists():
        try:
            blob = torch.load(path, map_location=device, weights_only=True)
            rm = build_reward_model(res.task, res.run.model, res.run.seed).to(device)
            rm.load_state_dict(blob["state"])
            return rm.eval().requires_grad_(False), float(blob["loss"])
        except Exception:  # a file from another version, or damaged: fit again and replace it
            pass
    rm, loss = fit_reward_model(res, device, sft)
    path.parent.mkdir(parents=True, exist_ok=True)
    publish(path, lambda f: torch.save({"state": rm.state_dict(), "loss": loss}, f))
    return rm, loss


class Calibrated(torch.nn.Module):
    """The reward model's score in gold units: ``a * rm(prompts, completions) + b`` (``calibration``)."""

    def __init__(self, rm, slope: float, intercept: float):
        super().__init__()
        self.rm, self.slope, self.intercept = rm, slope, intercept

    def forward(self, prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
        return self.slope * self.rm(prompts, completions) + self.intercept


@torch.no_grad()
def heldout_scores(res: Resolved, rm, sft, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores, gold)``, each ``(rm_pairs, 2)``: both completions of ``rm_pairs`` pairs drawn as phase 2's are
    (``rm_pairs``), from a stream of their own (``seed + 3 * PIPELINE_OFFSET``): an independent sample, though on a
    small enumerable task the same completions recur in the training pairs."""
    gen = torch.Generator().manual_seed(res.run.seed + 3 * PIPELINE_OFFSET)
    data = rm_pairs(res, gen, sft)
    prompts = torch.cat([data["prompts"], data["prompts"]])
    comps = torch.cat([data["chosen"], data["rejected"]])
    scores = torch.cat(
        [rm(prompts[i : i + 4096].to(device), comps[i : i + 4096].to(device)).cpu() for i in range(0, len(comps), 4096)]
    )
    gold = res.task.reward(prompts, comps).float()
    return scores.view(2, -1).T, gold.view(2, -1).T


def calibration(scores: torch.Tensor, gold: torch.Tensor) -> dict[str, float]:
    """The map of scores to gold units, ``gold ~ a * score + b``, from pairs ``(n, 2)`` that share a prompt:

        a  = sum_i ds_i dg_i / sum_i ds_i^2            ds_i = s_i1 - s_i2, dg_i = g_i1 - g_i2
        b  = mean(g) - a mean(s)
        r2 = (sum_i ds_i dg_i)^2 / (sum_i ds_i^2 sum_i dg_i^2)

    A Bradley-Terry reward model is identified only up to a constant per prompt, c(x): the slope is
    fitted within pairs, where c(x) cancels (a regression of gold on score pooled over prompts would
    count c(x) as noise and shrink a towards 0). The intercept is then only an average over the
    held-out prompts' constants: gains (differences of calibrated scores on one prompt) are in gold
    units, levels are not. Returns ``{"slope": a, "intercept": b, "r2": r2}``; no score differences
    give a = 0, b = mean(g) and r2 = nan.
    """
    s, g = scores.double().reshape(-1, 2), gold.double().reshape(-1, 2)
    ds, dg = s[:, 0] - s[:, 1], g[:, 0] - g[:, 1]
    ss, gg, sg = (ds * ds).sum(), (dg * dg).sum(), (ds * dg).sum()
    a = (sg / ss).item() if ss > 0 else 0.0
    r2 = (sg * sg / (ss * gg)).item() if ss > 0 and gg > 0 else float("nan")
    return {"slope": a, "intercept": (g.mean() - a * s.mean()).item(), "r2": r2}


def pair_accuracy(score_diff: torch.Tensor, gold_diff: torch.Tensor) -> float:
    """Share of the pairs with different gold rewards whose score difference has the gold difference's sign."""
    differ = gold_diff != 0
    if not differ.any():
        return float("nan")
    return (torch.sign(score_diff[differ]) == torch.sign(gold_diff[differ])).double().mean().item()


def rm_quality(scores: torch.Tensor, gold: torch.Tensor) -> dict[str, float]:
    """``rm/exact_accuracy`` over every pair with different gold rewards, ``rm/gold_correlation`` over every
    completion."""
    right = total = 0.0
    for s, g in zip(scores, gold):  # per prompt: (N, N) sign agreement
        dg = g[:, None] - g[None, :]
        ds = s[:, None] - s[None, :]
        differ = dg != 0
        right += ((torch.sign(ds) == torch.sign(dg)) & differ).sum().item()
        total += differ.sum().item()
    out = {"rm/exact_accuracy": right / total if total else float("nan")}
    s, g = scores.reshape(-1), gold.reshape(-1)
    if s.std() > 0 and g.std() > 0:
        out["rm/gold_correlation"] = torch.corrcoef(torch.stack([s, g]))[0, 1].item()
    return out
