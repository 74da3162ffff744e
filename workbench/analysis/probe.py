"""Probes: gradient, credit-assignment and KL measurements at fixed parameters.

Two entry points share the code in ``workbench.analysis``:

- ``Prober``: called by the training loop every ``probe_every`` steps; logs ``grad/...``
  and ``credit/...`` for the run's own estimator at the run's batch size, and writes the
  per-position credit data to ``credit.jsonl`` in the run folder;
- ``probe(target, what)``: ``workbench probe RUN_OR_CHECKPOINT --what gradients|credit|kl``
  on a saved checkpoint; every objective at several batch sizes, written as a table
  ``probe_<what>.parquet`` in the run folder (through ``workbench.results.publish`` when that
  module is present) and summarised on stdout.

The objectives compared by ``--what gradients`` (all at the same parameters, the same
beta, and the gold reward even where the run trained against a reward model):

    sft              masked NLL on the demonstrations
    reinforce        REINFORCE without baseline (k1 KL in the reward: unbiased for grad(-J))
    reinforce_mean   REINFORCE with the batch-mean baseline
    rloo             leave-one-out baseline
    grpo             group-normalised advantages, clipped ratio, k3 KL in the loss
    ppo              GAE with the policy's value head (zero if it has none), whitened; policy loss only
    dpo              the run's preference set (``pairs=auto``: every pair where small)

Each uses its algorithm's default config, or the run's own where it is the run's
algorithm. Online estimators are compared with the exact RL gradient g_RL (a large-batch
RLOO estimate where the task is not enumerable), offline ones with their full-dataset
gradient; ``true_cos_rl`` is the cosine of each objective's truth with g_RL (claims C1, C6).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import torch

from ..algorithms.spec import AlgorithmSpec
from ..config import ConfigError, Resolved, RunConfig, resolve
from ..core import seeds
from ..core.kl import ESTIMATORS
from ..core.stats import cosine, mean_se, pearson
from ..models.policy import build_policy, resolve_device
from ..models.precision import full_precision
from ..registry import ALGORITHMS
from ..results import publish, results_dir
from ..runtime.context import Measure
from ..runtime.data import offline_dataset
from ..runtime.rollout import rollout
from .credit import ExactCredit, compare, credit_supported, kl_in_reward
from .exact import ExactEvaluator
from .gradients import (
    dataset_gradient,
    exact_rl_gradient,
    gradient_stats,
    minibatch_gradients,
    offline_losses,
    online_losses,
    sample_batches,
    slice_rollout,
)

OBJECTIVES: dict[str, tuple[str, dict]] = {
    "sft": ("sft", {}),
    "reinforce": ("reinforce", {"baseline": "none"}),
    "reinforce_mean": ("reinforce", {"baseline": "mean"}),
    "rloo": ("rloo", {}),
    "grpo": ("grpo", {}),
    "ppo": ("ppo", {}),
    "dpo": ("dpo", {}),
}
CREDIT_METHODS = ["reinforce", "reinforce_mean", "rloo", "grpo", "ppo"]
WHATS = ("gradients", "credit", "kl")
LARGE_BATCH = 4096  # samples of the RL-gradient estimate where the task is not enumerable


@dataclass
class Objective:
    name: str
    spec: AlgorithmSpec
    cfg: object
    group_size: int


def make_objective(res: Resolved, name: str) -> Objective:
    """An objective by probe name (``OBJECTIVES``) or algorithm name, configured as described above.

    PPO's value loss is dropped (``vf_coef = 0``): it trains the critic, not pi.
    """
    algo, overrides = OBJECTIVES.get(name, (name, {}))
    if algo not in ALGORITHMS:
        allowed = ", ".join([*OBJECTIVES, *sorted(set(ALGORITHMS) - set(OBJECTIVES))])
        raise ConfigError(f"unknown objective {name!r}; allowed: {allowed}")
    spec = ALGORITHMS[algo]
    if spec.trains != "policy":
        raise ConfigError(f"objective {name!r} does not train a policy")
    own = algo == res.spec.name
    base = res.algo_cfg.model_dump() if own else {k[5:]: v for k, v in spec.defaults.items() if k.startswith("algo.")}
    cfg = spec.Config(**{**base, **overrides})
    cfg = spec.policy_loss_only(cfg)
    G = res.run.group_size if own else spec.defaults.get("group_size", RunConfig.model_fields["group_size"].default)
    return Objective(name, spec, cfg, max(G, spec.min_group_size))


def _group(B: int, obj: Objective) -> int | None:
    """The group size used at batch size B: the objective's, reduced to divide B; None if impossible."""
    G = math.gcd(B, obj.group_size)
    return G if obj.spec.min_group_size <= G else None


class Estimators:
    """Draws minibatch gradients of any objective at fixed parameters, and the objectives' truths.

    Rollouts are shared between online objectives with the same (B, G) within one call of
    ``reset``; datasets and the RL truth are cached per parameters (``reset`` clears them).
    """

    def __init__(self, res: Resolved, ref, exact: ExactEvaluator | None, device, seed: int):
        self.res, self.ref, self.exact, self.device = res, ref, exact, device
        self.task, self.beta = res.task, res.run.beta
        self.datasets: dict[str, dict] = {}
        self.reset(seed)

    def reset(self, seed: int) -> None:
        self.prompt_gen = torch.Generator().manual_seed(seed)
        self.sample_gen = torch.Generator(device=self.device).manual_seed(seed + 1)
        self.rollouts: dict[tuple, list] = {}
        self._rl: tuple | None = None
        self._offline_truth: dict[str, torch.Tensor] = {}

    # -- data -------------------------------------------------------------------------------
    def rollouts_for(self, policy, B: int, G: int, K: int) -> list:
        key = (B, G, K)
        if key not in self.rollouts:
            prompts = self.task.sample_prompts(K * B // G, self.prompt_gen).repeat_interleave(G, 0).to(self.device)
            roll, _ = rollout(self.res, policy, self.ref, None, prompts, self.sample_gen, G)
            self.rollouts[key] = [slice_rollout(roll, k * B, (k + 1) * B) for k in range(K)]
        return self.rollouts[key]

    def dataset(self, obj: Objective) -> dict:
        if obj.name not in self.datasets:  # the run's own data stream seed: the same dataset training used
            gen = seeds.data(self.res.run.seed)
            self.datasets[obj.name] = offline_dataset(
                replace(self.res, spec=obj.spec, algo_cfg=obj.cfg), self.ref, gen, self.device
            )
        return self.datasets[obj.name]

    # -- estimators -------------------------------------------------------------------------
    def gradients(self, policy, obj: Objective, B: int, K: int) -> tuple[torch.Tensor, list[dict] | None, list | None]:
        """``(G (K, D), prepared batches, rollouts)``: K minibatch gradients of ``obj`` at batch size B."""
        if obj.spec.kind == "offline":
            batches = sample_batches(self.dataset(obj), B, K, self.prompt_gen, self.device)
            return (
                minibatch_gradients(policy, offline_losses(obj.spec, obj.cfg, self.beta, self.ref, batches)),
                None,
                None,
            )
        G = _group(B, obj)
        if G is None:
            raise ValueError(f"{obj.name}: batch size {B} has no group size >= {obj.spec.min_group_size} dividing it")
        rolls = self.rollouts_for(policy, B, G, K)
        losses, batches = online_losses(obj.spec, obj.cfg, self.beta, rolls)
        return minibatch_gradients(policy, losses), batches, rolls

    # -- truths -----------------------------------------------------------------------------
    def rl_truth(self, policy) -> tuple[torch.Tensor, str]:
        """g_RL = grad(-J): exact by enumeration, else an RLOO estimate over ``LARGE_BATCH`` samples."""
        if self._rl is None:
            if self.exact is not None:
                g = exact_rl_gradient(policy, self.task, self.exact.ref_logp, self.exact.rewards, self.beta)
                self._rl = (g, "exact")
            else:
                obj = make_objective(self.res, "rloo")
                unbiased = {
                    "kl_in": "reward",
                    "kl_estimator": "k1",
                    "normalize_advantages": False,
                    "aggregation": "sequence_sum",
                }
                obj.cfg = obj.cfg.model_copy(update=unbiased)
                G = self.gradients(policy, obj, 512, LARGE_BATCH // 512)[0]
                self._rl = (G.mean(0), f"large_batch_{LARGE_BATCH}")
        return self._rl

    def truth(self, policy, obj: Objective) -> tuple[torch.Tensor, str]:
        if obj.spec.kind == "offline":
            if obj.name not in self._offline_truth:
                data = self.dataset(obj)
                self._offline_truth[obj.name] = dataset_gradient(
                    policy, obj.spec, obj.cfg, self.beta, self.ref, data, self.device
                )
            return self._offline_truth[obj.name], "exact_dataset"
        return self.rl_truth(policy)


# -- during training --------------------------------------------------------------------------


class Prober(Measure):
    """The in-training probe: ``grad/...`` and ``credit/...`` for the run's own estimator.

    Uses its own random generators (seeded by the run's seed and the step), reads the
    parameters without changing them, and never touches ``.grad``: training with probes
    on follows the same trajectory as with probes off.
    """

    def __init__(self, res: Resolved, ref, exact: ExactEvaluator | None, device, out: Path | None = None):
        self.res = res
        self.est = Estimators(res, ref, exact, device, seed=0)
        self.own = make_objective(res, res.spec.name)
        overridden = OBJECTIVES.get(res.spec.name, (None, {}))[
            1
        ]  # a probe-table variant (reinforce: no baseline), not this run's
        self.own.cfg = self.own.cfg.model_copy(update={k: getattr(res.algo_cfg, k) for k in overridden})
        self.exact = exact
        supported = exact is not None and credit_supported(res.task)  # with EOS: the full grid must be small
        self.credit = ExactCredit(res.task, exact.ref_logp, res.run.beta) if supported else None
        self.others = [make_objective(res, n) for n in ("sft", "dpo")] if exact is not None else []
        self.credit_file = Path(out) / "credit.jsonl" if out is not None else None
        if self.credit_file is not None:
            self.credit_file.write_text("")

    def due(self, step: int, last: bool) -> bool:
        return step % self.res.run.probe_every == 0 or last

    def __call__(self, policy, step: int, row: dict | None = None) -> dict:
        with full_precision(policy.device):  # probes and their exact truths are float32 whatever the run's precision
            return self._probe(policy, step)

    def _probe(self, policy, step: int) -> dict:
        t0 = time.perf_counter()
        run = self.res.run
        self.est.reset(seeds.probe_seed(run.seed, step))
        own = self.own
        B = run.batch_size if own.spec.kind == "online" else own.cfg.batch_size
        out: dict[str, float] = {}
        G, batches, rolls = self.est.gradients(policy, own, B, run.probe_minibatches)
        truth = None
        if own.spec.kind == "offline" or self.exact is not None:
            truth, _ = self.est.truth(policy, own)
        s = gradient_stats(G, truth)
        for k in ("norm_mean", "total_var", "snr", "cos_true", "cos_mean_true", "true_norm"):
            if k in s:
                out[f"grad/{k}"] = s[k]
        if self.exact is not None:
            g_rl, _ = self.est.rl_truth(policy)
            out["grad/exact_norm"] = g_rl.norm().item()
            for o in self.others:
                out[f"grad/cos_{o.name}_rl"] = cosine(self.est.truth(policy, o)[0], g_rl).item()
        if self.credit is not None and batches is not None and batches[0].advantages is not None:
            summary, rows = self._credit(policy, own, batches, rolls)
            out.update({f"credit/{k}": v for k, v in summary.items()})
            if self.credit_file is not None:
                with open(self.credit_file, "a") as f:
                    for r in rows:
                        f.write(json.dumps({"step": step, "method": own.name, **_finite(r)}) + "\n")
        out["time/probe_s"] = time.perf_counter() - t0
        return out

    def _credit(self, policy, obj: Objective, batches: list[dict], rolls: list) -> tuple[dict, list[dict]]:
        adv = self.credit.advantages(policy, kl_in_reward(obj.spec, obj.cfg, self.res.run.beta))
        method = torch.cat([b.advantages for b in batches])
        mask = torch.cat([r.mask for r in rolls])
        exact = torch.cat([self.credit.at(adv, r.prompts, r.completions) for r in rolls])
        summary, rows = compare(method, exact, mask, self.credit.decisive)
        if self.res.task.has_observations:  # multi-turn episodes (tool_use): credit per turn
            summary.update(turn_credit(self.res.task, torch.cat([r.completions for r in rolls]), method, exact, mask))
        return summary, rows


def turn_credit(task, comps, method, exact, mask) -> dict[str, float]:
    """``turn{k}_corr`` (method vs exact advantages over the policy's tokens of turn k: before the first
    observation k = 1, after it 2, ...), ``turn{k}_share`` and ``turn{k}_share_exact`` (turn k's share of the
    total |A| mass), from ``(B, T)`` advantages, the mask and ``task.turns`` of the completions."""
    turns = task.turns(comps.cpu())  # (B, T) 0 at observations and padding
    m, e, w = method.double().cpu(), exact.double().cpu(), mask.double().cpu()
    out = {}
    for k in range(1, int(turns.max()) + 1):
        sel = (turns == k) & (w > 0)
        if sel.sum() < 2:
            continue
        out[f"turn{k}_corr"] = pearson(m[sel], e[sel])
        for name, x in (("share", m), ("share_exact", e)):
            total = (x.abs() * w).sum()
            out[f"turn{k}_{name}"] = ((x.abs() * sel).sum() / total).item() if total > 0 else math.nan
    return out


def _finite(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


# -- on a checkpoint --------------------------------------------------------------------------


def _run_config(path: Path) -> dict | None:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return d.get("config") if isinstance(d, dict) and isinstance(d.get("config"), dict) else None


def locate(target: str, results: str | None = None) -> tuple[Path, Path]:
    """``(run folder, checkpoint folder)`` for a run folder, its checkpoint, or a run id in the results store."""
    p = Path(target)
    if not p.exists():
        cand = results_dir(results) / "runs" / target
        if not cand.exists():
            raise ConfigError(f"no run folder, checkpoint or run id {target!r}")
        p = cand
    if _run_config(p / "config.json") is not None:
        run_dir, ckpt = p, p / "checkpoint"
    elif _run_config(p.parent / "config.json") is not None:
        run_dir, ckpt = p.parent, p
    else:
        raise ConfigError(f"{target}: not a run folder (no config.json with a run config) nor a checkpoint inside one")
    if not (ckpt / "config.json").exists():
        raise ConfigError(
            f"{run_dir}: no checkpoint (the run saved none: save_checkpoint = false, or it did not finish)"
        )
    return run_dir, ckpt


def load(target: str, results: str | None = None, device: str = "cpu", sft_phase: Callable | None = None):
    """``(Resolved, policy, ref, run_dir)``: the run's config, its checkpointed policy and its reference.

    A run with an SFT phase (``sft_warmup_steps``) or a base policy (``pretrain_steps``) has their result
    as its reference: ``sft_phase(res, policy, device)`` replays them (``workbench.training.pretrain.start_phases``,
    which ``workbench probe`` passes; the training layer sits above this one).
    """
    from transformers.utils import logging as hf_logging  # heavy; only for a probe of a saved run

    run_dir, ckpt = locate(target, results)
    raw = _run_config(run_dir / "config.json")
    res = resolve(raw, {"device": device})
    if res.spec.trains != "policy":
        raise ConfigError(f"{run_dir}: a {res.spec.name} run trains a reward model; probes need a policy")
    dev = resolve_device(device)
    run = res.run
    if dev.type == "cpu":
        torch.set_num_threads(run.cpu_threads)  # as training: tiny models run fastest on one thread
    hf_logging.disable_progress_bar()
    value_head = res.spec.value_head(res.algo_cfg)
    ckpt_cfg = run.model.model_copy(update={"path": str(ckpt)})
    policy = build_policy(res.task, ckpt_cfg, run.seed, value_head, dev, run.precision)
    # the run's starting policy, rebuilt from its seed; its SFT phase replays in the run's precision
    start = build_policy(res.task, run.model, run.seed, False, dev, run.precision)
    if run.sft_warmup_steps or run.pretrain_steps:  # its reference: its base policy and/or SFT phase, deterministic
        if sft_phase is None:
            raise ConfigError(f"{run_dir}: the run's reference is its start phases; pass sft_phase to replay them")
        sft_phase(res, start, dev)
    ref = start.frozen_copy()
    policy.requires_grad_(True)
    return res, policy, ref, run_dir


@dataclass
class ProbeResult:
    table: pd.DataFrame
    path: Path | None
    summary: str


def probe(
    target: str,
    what: str,
    batch_sizes: list[int] | None = None,
    minibatches: int = 16,
    objectives: list[str] | None = None,
    seed: int = 0,
    device: str = "cpu",
    results: str | None = None,
    write: bool = True,
    sft_phase: Callable | None = None,
) -> ProbeResult:
    """Run one probe on a saved run and write ``probe_<what>.parquet`` into its folder."""
    if what not in WHATS:
        raise ConfigError(f"--what must be one of {', '.join(WHATS)}, got {what!r}")
    res, policy, ref, run_dir = load(target, results, device, sft_phase)
    torch.manual_seed(seed)
    with full_precision(policy.device):  # measurements are float32 whatever the run's precision
        exact = ExactEvaluator(res.task, ref, res.run.beta) if res.task.enumerable else None
        est = Estimators(res, ref, exact, policy.device, seed)
        batch_sizes = batch_sizes or [8, 32, 128]
        if what == "gradients":
            table = gradients_table(policy, res, est, batch_sizes, minibatches, objectives or list(OBJECTIVES))
        elif what == "credit":
            table = credit_table(policy, res, est, batch_sizes, minibatches, objectives or CREDIT_METHODS)
        else:
            table = kl_table(policy, res, est, exact, batch_sizes, minibatches)
    path = _write(run_dir / f"probe_{what}.parquet", table) if write else None
    return ProbeResult(table, path, summarize(what, table, res, path))


def gradients_table(policy, res, est: Estimators, batch_sizes, K: int, names: list[str]) -> pd.DataFrame:
    g_rl, rl_label = est.rl_truth(policy)
    rows = []
    for name in names:
        obj = make_objective(res, name)
        truth, label = est.truth(policy, obj)
        for B in batch_sizes:
            if obj.spec.kind == "online" and _group(B, obj) is None:
                continue
            G, _, _ = est.gradients(policy, obj, B, K)
            s = gradient_stats(G, truth)
            n_rows = min(B, len(next(iter(est.dataset(obj).values())))) if obj.spec.kind == "offline" else B
            rows.append(
                {
                    "objective": name,
                    "algo": obj.spec.name,
                    "batch_size": B,
                    "rows": n_rows,
                    "group_size": _group(B, obj) if obj.spec.kind == "online" else None,
                    "minibatches": K,
                    **s,
                    "truth": label,
                    "true_cos_rl": cosine(truth, g_rl).item(),
                    "rl_truth": rl_label,
                }
            )
    return pd.DataFrame(rows)


def credit_table(policy, res, est: Estimators, batch_sizes, K: int, names: list[str]) -> pd.DataFrame:
    if est.exact is None:
        raise ConfigError(f"task {res.task.name!r} is not enumerable: exact advantages need the whole prefix tree")
    credit = ExactCredit(res.task, est.exact.ref_logp, res.run.beta)
    adv_cache: dict[bool, torch.Tensor] = {}
    rows = []
    for name in names:
        obj = make_objective(res, name)
        if obj.spec.kind != "online":
            raise ConfigError(f"credit compares online methods' advantages; {name!r} is offline")
        kl = kl_in_reward(obj.spec, obj.cfg, res.run.beta)
        if kl not in adv_cache:
            adv_cache[kl] = credit.advantages(policy, kl)
        for B in batch_sizes:
            if _group(B, obj) is None:
                continue
            batches, rolls = _prepared(est, policy, obj, B, K)
            if batches[0].advantages is None:
                raise ConfigError(f"{name!r} uses no per-token advantages")
            method = torch.cat([b.advantages for b in batches])
            exact = torch.cat([credit.at(adv_cache[kl], r.prompts, r.completions) for r in rolls])
            mask = torch.cat([r.mask for r in rolls])
            summary, per_pos = compare(method, exact, mask, credit.decisive)
            base = {"method": name, "batch_size": B, "group_size": _group(B, obj), "kl_in_reward": kl}
            rows.append(
                {
                    **base,
                    "position": -1,
                    "decisive": None,
                    "corr": summary["corr"],
                    "mse": summary["mse"],
                    "share": summary["decisive_share"],
                    "share_exact": summary["decisive_share_exact"],
                }
            )
            rows += [{**base, **r} for r in per_pos]
    return pd.DataFrame(rows)


def _prepared(est: Estimators, policy, obj: Objective, B: int, K: int) -> tuple[list[dict], list]:
    """The prepared batches of K rollouts of size B (no gradients: credit needs only the advantages)."""
    rolls = est.rollouts_for(policy, B, _group(B, obj), K)
    with torch.no_grad():
        return [obj.spec.prepare(r, obj.cfg, est.beta) for r in rolls], rolls


def kl_table(policy, res, est: Estimators, exact: ExactEvaluator | None, batch_sizes, K: int) -> pd.DataFrame:
    """Sampled KL(pi || pi_ref) estimates (sequence sums of k1, k2, k3) against ``kl/exact``."""
    kl_exact = exact.measure(policy)["kl/exact"] if exact is not None else math.nan
    rows = []
    for B in batch_sizes:
        rolls = est.rollouts_for(policy, B, 1, K)
        for name, fn in ESTIMATORS.items():
            per_batch = torch.stack([(fn(r.ref_logp - r.old_logp) * r.mask).sum(-1).mean() for r in rolls])  # (K,)
            per_seq = torch.cat([(fn(r.ref_logp - r.old_logp) * r.mask).sum(-1) for r in rolls])
            m, se = mean_se(per_seq)
            sd = per_batch.double().std().item()
            rows.append(
                {
                    "estimator": name,
                    "batch_size": B,
                    "minibatches": K,
                    "mean": m,
                    "se": se,
                    "batch_std": sd,
                    "exact": kl_exact,
                    "bias": m - kl_exact,
                    "rmse": math.sqrt(((per_batch.double() - kl_exact) ** 2).mean().item()),
                    "negative_share": (per_batch < 0).float().mean().item(),
                    "truth": "exact" if exact is not None else "none",
                }
            )
    return pd.DataFrame(rows)


def _write(path: Path, table: pd.DataFrame) -> Path:
    return publish(path, lambda f: table.to_parquet(f, index=False))


def summarize(what: str, table: pd.DataFrame, res: Resolved, path: Path | None) -> str:
    head = f"probe {what}: {res.spec.name} on {res.task.name}, beta={res.run.beta}" + (f" -> {path}" if path else "")
    cols = {
        "gradients": [
            "objective",
            "batch_size",
            "norm_mean",
            "total_var",
            "snr",
            "cos_true",
            "cos_mean_true",
            "truth",
            "true_cos_rl",
        ],
        "credit": ["method", "batch_size", "corr", "mse", "decisive_share", "decisive_share_exact"],
        "kl": ["estimator", "batch_size", "mean", "se", "exact", "bias", "rmse", "negative_share"],
    }[what]
    if what == "credit":  # the all-token rows; their share is the share on the decisive positions
        table = table[table["position"] == -1].rename(
            columns={"share": "decisive_share", "share_exact": "decisive_share_exact"}
        )
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        return head + "\n" + table[cols].to_string(index=False, float_format=lambda x: f"{x:.4g}")
