"""DPO and IPO, offline on a fixed preference set or online on the policy's own samples.

With h = [log pi(y_c|x) - log pi_ref(y_c|x)] - [log pi(y_r|x) - log pi_ref(y_r|x)]:

    DPO (sigmoid, Rafailov et al. 2023, arXiv 2305.18290):
        L = -[ p log sigmoid(beta h) + (1 - p) log sigmoid(-beta h) ]
    cDPO, label smoothing eps (Mitchell 2023, "A note on DPO with noisy preferences"; the
    smoothed sigmoid loss of TRL's CPOTrainer, which TRL 1.16's DPOTrainer no longer applies):
    the label is taken as flipped with probability eps,
        p_eps = (1 - eps) p + eps (1 - p)      in place of p above
    robust DPO (rDPO, Chowdhury et al. 2024, arXiv 2403.00409; TRL's loss_type "robust"): the
    unbiased loss under labels flipped with probability eps,
        l(h) = [ -(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h) ] / (1 - 2 eps)
        L    = p l(h) + (1 - p) l(-h)  =  DPO's loss with p replaced by (p - eps) / (1 - 2 eps)
    so rDPO undoes exactly the flips cDPO assumes (cDPO's p_eps in, p out).
    IPO (Azar et al. 2023, arXiv 2310.12036), token-averaged log-ratios as in TRL:
        L = (h_avg - 1 / (2 beta))^2

p is the probability that ``chosen`` wins (1 with hard labels: TRL's sigmoid loss). With
soft Bradley-Terry labels p = sigmoid(r_c - r_r) over every pair, the minimiser of the
DPO loss is exactly pi* = pi_ref exp(r / beta) / Z: the RLHF optimum (claim C6).

Online DPO samples G = 2 completions per prompt from the current policy, ranks them by
the reward (gold or a reward model) and applies the same loss; ties carry no loss.

The offline preference set (``PreferenceOptions``) pairs every completion (``pairs='all'``),
draws uniform pairs (``'random'``, optionally restricted by ``coverage``) or draws both
completions of a pair from pi_ref, the run's initial policy (``'reference'``, ``n_pairs``
pairs: the on-policy data of the DPO paper, so pairs (a, b) occur with probability
pi_ref(a|x) pi_ref(b|x)), or from the policy of a checkpoint (``pairs_from``: e.g. an SFT run's,
while pi_ref stays the run's initial policy); labels come from the gold reward through the
Bradley-Terry model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field, model_validator
from torch import Tensor

from .spec import AlgoConfig, AlgorithmSpec, Batch, PolicyOutput, Rollout


class PreferenceOptions(BaseModel):
    """How the fixed preference set is built from the task's Bradley-Terry labeller."""

    pairs: Literal["auto", "all", "random", "reference"] = Field(
        "auto",
        description="'all': every pair of completions (enumerable tasks); 'random': n_pairs uniform pairs; "
        "'reference': n_pairs pairs of two completions sampled from pi_ref (the run's initial policy); "
        "'auto': all if at most 20,000 pairs",
    )
    n_pairs: int = Field(2048, ge=1, le=100_000_000, description="pairs drawn when pairs='random' or 'reference'")
    labels: Literal["soft", "sampled"] = Field(
        "soft", description="'soft': store P(chosen wins); 'sampled': draw a winner"
    )
    bt_temperature: float = Field(1.0, ge=0, description="label noise: P = sigmoid(dr / temperature); 0 = noiseless")
    coverage: float = Field(1.0, gt=0, le=1, description="fraction of the action set that appears in the pairs")
    pairs_from: str | None = Field(
        None, description="pairs='reference': a checkpoint folder whose policy samples the pairs instead of pi_ref"
    )

    @model_validator(mode="after")
    def _reference_pairs_cover_all(self):
        if self.pairs == "reference" and self.coverage < 1:
            raise ValueError("coverage < 1 restricts uniform pairs; pairs='reference' draws from pi_ref's support")
        if self.pairs_from is not None and self.pairs != "reference":
            raise ValueError("pairs_from names the policy that samples the pairs: set pairs = 'reference'")
        return self


def pair_policy(cfg: PreferenceOptions) -> str | None:
    """The checkpoint the preference pairs are sampled from (``AlgorithmSpec.data_policy``); None: pi_ref."""
    return cfg.pairs_from


class DPOConfig(AlgoConfig, PreferenceOptions):
    loss_type: Literal["sigmoid", "ipo", "robust"] = Field(
        "sigmoid", description="DPO (sigmoid), IPO (squared) or robust DPO (rDPO, flip rate label_smoothing)"
    )
    batch_size: int = Field(64, ge=1, le=100_000_000, description="preference pairs per gradient step (offline)")
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="eps, the label flip rate: with loss_type 'sigmoid' cDPO's smoothing, with 'robust' rDPO's "
        "correction (TRL's DPOConfig.label_smoothing); 0: plain DPO",
    )

    @model_validator(mode="after")
    def _smoothing_has_a_loss(self):
        if self.label_smoothing and self.loss_type == "ipo":
            raise ValueError("label_smoothing applies to loss_type 'sigmoid' (cDPO) or 'robust' (rDPO), not 'ipo'")
        return self


class OnlineDPOConfig(AlgoConfig):
    loss_type: Literal["sigmoid", "ipo"] = Field("sigmoid", description="DPO (sigmoid) or IPO (squared)")


def dpo_loss(
    logp_c: Tensor,
    logp_r: Tensor,
    ref_logp_c: Tensor,
    ref_logp_r: Tensor,
    mask_c: Tensor,
    mask_r: Tensor,
    p_chosen: Tensor,
    cfg,
    beta: float,
) -> tuple[Tensor, Tensor, dict]:
    """Per-token log-probs ``(B, T)`` of chosen and rejected under the policy and the reference.

    Returns ``(loss, per_sequence_loss (B, 1), stats)``.
    """
    lr_c = ((logp_c - ref_logp_c) * mask_c).sum(-1)  # log pi/pi_ref (y_c)
    lr_r = ((logp_r - ref_logp_r) * mask_r).sum(-1)  # log pi/pi_ref (y_r)
    h = lr_c - lr_r
    if cfg.loss_type == "sigmoid":
        eps = getattr(cfg, "label_smoothing", 0.0)
        if eps:  # cDPO: p_eps = (1 - eps) p + eps (1 - p); eps = 0 leaves the plain DPO sums untouched
            p_chosen = (1 - eps) * p_chosen + eps * (1 - p_chosen)
        per_seq = -(p_chosen * F.logsigmoid(beta * h) + (1 - p_chosen) * F.logsigmoid(-beta * h))
    elif cfg.loss_type == "robust":
        eps = cfg.label_smoothing

        def robust(h):  # l(h) = [-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)] / (1 - 2 eps)
            return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)

        per_seq = p_chosen * robust(h) + (1 - p_chosen) * robust(-h)
    else:
        h_avg = lr_c / mask_c.sum(-1).clamp(min=1) - lr_r / mask_r.sum(-1).clamp(min=1)
        per_seq = (h_avg - 1 / (2 * beta)) ** 2
    loss = per_seq.mean()
    stats = {
        "loss/dpo": loss.item(),
        "rewards/chosen": (beta * lr_c).mean().item(),  # implicit reward beta log pi/pi_ref, as in TRL
        "rewards/rejected": (beta * lr_r).mean().item(),
        "rewards/accuracies": (h > 0).float().mean().item(),
        "rewards/margins": (beta * h).mean().item(),
    }
    return loss, per_seq[:, None], stats


def preference_dataset(task, cfg: PreferenceOptions, generator: torch.Generator, ref=None):
    """The fixed preference set. ``pairs='reference'`` draws ``n_pairs`` prompts, then two completions
    of each from ``ref`` (pi_ref, the run's initial policy, or the ``pairs_from`` checkpoint's policy:
    ``workbench.runtime.data.offline_dataset`` passes it) with its own sampler, under a generator
    seeded by one draw from ``generator`` (the run's data stream; on ``ref``'s device); every
    other option never touches ``ref``. Labels as for uniform pairs (``Task.label_pairs``).
    """
    pairs = cfg.pairs
    if pairs == "reference":
        if ref is None:
            raise ValueError("pairs='reference' samples from the reference policy, and this run has none")
        prompts = task.sample_prompts(cfg.n_pairs, generator)  # (N, Tp)
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        sample_gen = torch.Generator(device=ref.device).manual_seed(seed)
        comps, _ = ref.sample(torch.cat([prompts, prompts]).to(ref.device), sample_gen)  # (2N, T) y ~ pi_ref
        a, b = comps.cpu().chunk(2)
        data = task.label_pairs(prompts, a, b, generator, cfg.labels, cfg.bt_temperature)
        return {"prompts": data.prompts, "chosen": data.chosen, "rejected": data.rejected, "p_chosen": data.p_chosen}
    if pairs == "auto":
        n_all = (
            len(task.eval_prompts()) * task.n_completions * (task.n_completions - 1) // 2 if task.enumerable else None
        )
        pairs = "all" if n_all is not None and n_all <= 20_000 else "random"
    data = task.preferences(cfg.n_pairs, generator, pairs, cfg.labels, cfg.bt_temperature, cfg.coverage)
    return {"prompts": data.prompts, "chosen": data.chosen, "rejected": data.rejected, "p_chosen": data.p_chosen}


def forward(policy, ref, batch) -> dict:
    """One policy pass and one reference pass over chosen and rejected together: ``(..., 2B, T)``."""
    prompts = torch.cat([batch["prompts"], batch["prompts"]], dim=-2)
    comps = torch.cat([batch["chosen"], batch["rejected"]], dim=-2)
    logp = policy(prompts, comps, values=False).logp
    with torch.no_grad():
        ref_logp = ref(prompts, comps).logp
    return {"logp": logp, "ref_logp": ref_logp}


def loss(outputs: dict, batch, cfg: DPOConfig, beta: float):
    logp, ref_logp = outputs["logp"], outputs["ref_logp"]
    B = batch["prompts"].shape[0]
    ones = torch.ones_like(logp[:B])
    mask_c, mask_r = batch.get("mask_chosen", ones), batch.get("mask_rejected", ones)  # (B, T) 0 after an EOS
    return dpo_loss(logp[:B], logp[B:], ref_logp[:B], ref_logp[B:], mask_c, mask_r, batch["p_chosen"], cfg, beta)


def masked_preference_dataset(task, cfg: PreferenceOptions, generator: torch.Generator, ref=None):
    """``preference_dataset`` with the completion masks ``mask_chosen``, ``mask_rejected`` ``(N, T)``
    (``task.completion_mask``: all ones without an end-of-sequence action)."""
    data = preference_dataset(task, cfg, generator, ref)
    return {
        **data,
        "mask_chosen": task.action_mask(data["chosen"]),  # 0 after an EOS and at observations (tool_use)
        "mask_rejected": task.action_mask(data["rejected"]),
    }


@dataclass(frozen=True, kw_only=True)
class OnlineDPOBatch(Batch):
    first_wins: Tensor  # (B/2,) 1 where the first sample of a pair scored higher
    weight: Tensor  # (B/2,) 0 for ties, which carry no loss
    ref_logp: Tensor  # (B, T)


def prepare_online(roll: Rollout, cfg: OnlineDPOConfig, beta: float) -> OnlineDPOBatch:
    s = roll.scores.view(-1, 2)  # (B/2, 2) the two samples of a prompt
    first_wins = (s[:, 0] > s[:, 1]).float()
    tie = (s[:, 0] == s[:, 1]).float()
    return OnlineDPOBatch(first_wins=first_wins, weight=1 - tie, ref_logp=roll.ref_logp, mask=roll.mask)


def online_dpo_loss(
    out: PolicyOutput, batch: OnlineDPOBatch, cfg: OnlineDPOConfig, beta: float
) -> tuple[Tensor, Tensor, dict]:
    """``dpo_loss`` on the pairs of adjacent rows, the better-scored sample as chosen; ties weigh 0."""
    logp = out.logp.view(-1, 2, out.logp.shape[-1])  # (B/2, 2, T)
    ref = batch.ref_logp.view_as(logp)
    mask = batch.mask.view_as(logp)
    w = batch.first_wins.bool()[:, None]

    def pick(x, first):
        return torch.where(w == first, x[:, 0], x[:, 1])

    loss, per_seq, stats = dpo_loss(
        pick(logp, True),
        pick(logp, False),
        pick(ref, True),
        pick(ref, False),
        pick(mask, True),
        pick(mask, False),
        torch.ones_like(batch.weight),
        cfg,
        beta,
    )
    per_seq = per_seq * batch.weight[:, None]  # ties carry no loss
    loss = per_seq.sum() / batch.weight.sum().clamp(min=1)
    stats["loss/dpo"] = loss.item()
    stats["online_dpo/tie_fraction"] = 1 - batch.weight.mean().item()
    return loss, per_seq, stats


def offline_regulariser(cfg: DPOConfig, beta: float) -> str:
    smooth = f", label smoothing {cfg.label_smoothing:g} (cDPO)" if cfg.label_smoothing else ""
    if cfg.loss_type == "robust":
        return (
            f"robust DPO loss (flip rate {cfg.label_smoothing:g}) on {cfg.labels} Bradley-Terry labels, beta {beta:g}"
        )
    return (
        f"{'DPO' if cfg.loss_type == 'sigmoid' else 'IPO'} loss on {cfg.labels} Bradley-Terry labels, "
        f"beta {beta:g}{smooth}"
    )


def online_regulariser(cfg: OnlineDPOConfig, beta: float) -> str:
    return (
        f"{'DPO' if cfg.loss_type == 'sigmoid' else 'IPO'} loss on hard labels (the better of two samples), "
        f"beta {beta:g}"
    )


SPEC = AlgorithmSpec(
    name="dpo",
    Config=DPOConfig,
    kind="offline",
    unit="pairs",
    summary="DPO/IPO on a fixed preference set",
    data_policy=pair_policy,
    dataset=masked_preference_dataset,
    forward=forward,
    loss=loss,
    regulariser=offline_regulariser,
)

IPO_SPEC = AlgorithmSpec(
    name="ipo",
    Config=DPOConfig,
    kind="offline",
    unit="pairs",
    summary="IPO on a fixed preference set",
    data_policy=pair_policy,
    dataset=masked_preference_dataset,
    forward=forward,
    loss=loss,
    defaults={"algo.loss_type": "ipo"},
    regulariser=offline_regulariser,
)

ONLINE_SPEC = AlgorithmSpec(
    name="online_dpo",
    Config=OnlineDPOConfig,
    kind="online",
    summary="DPO on pairs sampled from the policy",
    prepare=prepare_online,
    loss=online_dpo_loss,
    keeps_pairs=True,
    min_group_size=2,
    defaults={"group_size": 2},
    regulariser=online_regulariser,
)
