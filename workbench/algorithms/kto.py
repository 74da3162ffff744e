"""KTO (Ethayarajh et al. 2024, arXiv 2402.01306): Kahneman-Tversky optimisation on unpaired
desirable / undesirable completions, with the reference point estimated as TRL's ``KTOTrainer`` does.

With rho(x, y) = log pi(y|x) - log pi_ref(y|x) = sum_t m_t (log pi - log pi_ref)    (B,)

    z_ref = max(0, mean_i rho(x_i, y'_i))      y'_i = y_{i-1}, y'_0 = y_{B-1}: each prompt with another
                                               row's completion (the batch rotated by one), no gradient
    L(x, y) = w_D (1 - sigmoid(beta (rho - z_ref)))     y desirable
              w_U (1 - sigmoid(beta (z_ref - rho)))     y undesirable
    L = mean over the batch's rows

z_ref estimates KL(pi || pi_ref) by the mismatched pairs (Eq. 7 of the paper; TRL's "kl", detached
and clamped at 0, its rotation of the completions by +1 within a batch). beta is the run's beta,
w_D and w_U are ``desirable_weight`` and ``undesirable_weight`` (TRL's defaults 1, 1).

Data: the offline preference set of DPO (``PreferenceOptions``) split into unpaired rows, as
TRL's ``unpair_preference_dataset`` does: each pair's chosen is a desirable row and its rejected
an undesirable one, with the pair's prompt. With soft labels the chosen is the completion of the
higher gold reward (the Bradley-Terry probability is >= 1/2; an exact tie labels the first of the
pair desirable); with ``labels = 'sampled'`` it is the Bradley-Terry draw. The rows are the N
chosen, then the N rejected (TRL's order). A minibatch is a uniform draw of rows, so the rotated
pairs (x_i, y_{i-1}) pair independent rows, as TRL's rotation does on a shuffled dataset; a
full batch (batch_size >= 2N) rotates the rows in this order.

The fixed point is not pi*: the loss saturates (a sigmoid, not a log-sigmoid) and a completion's
label, not its reward, sets the direction. On an enumerable task
``workbench.analysis.exact.population_optimum`` iterates the population gradient, z_ref
recomputed (detached) at each iterate, to the stationary policy, and measures its distance to pi*.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from .dpo import PreferenceOptions, masked_preference_dataset, pair_policy
from .spec import AlgoConfig, AlgorithmSpec


class KTOConfig(AlgoConfig, PreferenceOptions):
    batch_size: int = Field(
        64, ge=2, le=100_000_000, description="labelled completions per gradient step (> 1: z_ref pairs rows)"
    )
    desirable_weight: float = Field(1.0, gt=0, description="w_D, the weight of desirable rows (TRL: 1.0)")
    undesirable_weight: float = Field(1.0, gt=0, description="w_U, the weight of undesirable rows (TRL: 1.0)")


def kto_loss(
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    kl_logp: Tensor,
    ref_kl_logp: Tensor,
    kl_mask: Tensor,
    desirable: Tensor,
    cfg: KTOConfig,
    beta: float,
) -> tuple[Tensor, Tensor, dict]:
    """Per-token log-probs ``(B, T)`` of the rows and of the mismatched (KL) rows under pi and pi_ref,
    their masks, ``desirable (B,)`` 1/0. Returns ``(loss, per_row_loss (B, 1), stats)``.
    """
    rho = ((logp - ref_logp) * mask).sum(-1)  # rho = log pi/pi_ref (y|x)  (B,)
    kl_rho = ((kl_logp - ref_kl_logp) * kl_mask).sum(-1)  # rho(x_i, y'_i)  (B,)
    z_ref = kl_rho.mean().detach().clamp(min=0)  # z_ref, no gradient, >= 0
    good = desirable.bool()
    per_row = torch.where(
        good,
        cfg.desirable_weight * (1 - torch.sigmoid(beta * (rho - z_ref))),  # w_D (1 - sigmoid(beta (rho - z)))
        cfg.undesirable_weight * (1 - torch.sigmoid(beta * (z_ref - rho))),  # w_U (1 - sigmoid(beta (z - rho)))
    )
    loss = per_row.mean()
    stats = {"loss/kto": loss.item(), "kto/kl": z_ref.item(), "kto/desirable_fraction": good.float().mean().item()}
    r = (beta * rho).detach()  # implicit reward beta rho, as TRL logs
    if good.any():
        stats["rewards/chosen"] = r[good].mean().item()
    if (~good).any():
        stats["rewards/rejected"] = r[~good].mean().item()
    if good.any() and (~good).any():
        stats["rewards/margins"] = stats["rewards/chosen"] - stats["rewards/rejected"]
    return loss, per_row[:, None], stats


def unpaired_dataset(task, cfg: KTOConfig, generator: torch.Generator, ref=None) -> dict:
    """The preference set (``masked_preference_dataset``) split into 2N unpaired rows: ``prompts (2N, Tp)``,
    ``completions``, ``mask (2N, T)``, ``desirable (2N,)``: the N chosen rows, then the N rejected ones."""
    d = masked_preference_dataset(task, cfg, generator, ref)
    N = len(d["prompts"])
    return {
        "prompts": torch.cat([d["prompts"], d["prompts"]]),
        "completions": torch.cat([d["chosen"], d["rejected"]]),
        "mask": torch.cat([d["mask_chosen"], d["mask_rejected"]]),
        "desirable": torch.cat([torch.ones(N), torch.zeros(N)]),
    }


def forward(policy, ref, batch) -> dict:
    """Policy pass over the rows; reference pass and both passes over the mismatched rows without gradients.

    The mismatched rows pair prompt i with completion i - 1 (row 0 with the last): ``(..., B, T)``.
    """
    prompts, comps = batch["prompts"], batch["completions"]
    kl_comps = torch.roll(comps, 1, dims=-2)  # y'_i = y_{i-1}
    logp = policy(prompts, comps, values=False).logp
    with torch.no_grad():
        ref_logp = ref(prompts, comps).logp
        kl_logp = policy(prompts, kl_comps, values=False).logp
        ref_kl_logp = ref(prompts, kl_comps).logp
    return {"logp": logp, "ref_logp": ref_logp, "kl_logp": kl_logp, "ref_kl_logp": ref_kl_logp}


def loss(outputs: dict, batch, cfg: KTOConfig, beta: float):
    logp = outputs["logp"]
    mask = batch.get("mask", torch.ones_like(logp))  # (B, T) 0 after an EOS
    kl_mask = torch.roll(mask, 1, dims=-2)
    return kto_loss(
        logp,
        outputs["ref_logp"],
        mask,
        outputs["kl_logp"],
        outputs["ref_kl_logp"],
        kl_mask,
        batch["desirable"],
        cfg,
        beta,
    )


def regulariser(cfg: KTOConfig, beta: float) -> str:
    return (
        f"KTO on winner/loser labels of {cfg.labels} Bradley-Terry pairs, reference point z_ref = batch KL estimate, "
        f"beta {beta:g}"
    )


SPEC = AlgorithmSpec(
    name="kto",
    Config=KTOConfig,
    kind="offline",
    unit="completions",
    summary="KTO on unpaired desirable/undesirable completions (the preference pairs split)",
    data_policy=pair_policy,
    dataset=unpaired_dataset,
    forward=forward,
    loss=loss,
    regulariser=regulariser,
)
