"""ORPO (Hong, Lee and Thorne 2024, arXiv 2403.07691): SFT on the chosen completion plus an
odds-ratio term, no reference model.

With the length-normalised likelihood P(y|x) = exp(rbar(y)), rbar(y) = (1/|y|) sum_t m_t log pi(y_t|s_t),
and odds(y) = P / (1 - P):

    log OR   = log odds(y_c) - log odds(y_r)
             = (rbar_c - rbar_r) - [log(1 - exp rbar_c) - log(1 - exp rbar_r)]
    L_OR     = -log sigmoid(log OR)                                            (B,)
    L_SFT    = -sum_{i,t} m_it log pi(y_c,it | s_it) / sum_{i,t} m_it          token mean over the chosen
    L        = L_SFT + lambda L_OR                                             lambda = cfg.lam

TRL's ``ORPOTrainer`` (``trl.experimental.orpo``, its ``beta`` is lambda) computes exactly this on
hard labels, except that its L_SFT also counts the prompt tokens after the first ("the chosen nll
loss is computed over the full prompt and response"); ours is the paper's completion-only NLL.
``orpo_loss`` takes the log-probs its SFT term averages (``sft_logp``, ``sft_mask``), so the parity
test feeds TRL's choice and the training loop the paper's.

Soft Bradley-Terry labels p: the loss is its expectation over the label, each row's SFT term on
whichever completion wins (weights p and 1 - p in the token mean) and the odds ratio either way.
No reference model and no KL: the run's ``beta`` plays no part and the optimum is not pi*
(``workbench.analysis.exact.population_optimum`` finds it on an enumerable task).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from .dpo import PreferenceOptions, masked_preference_dataset, pair_policy
from .simpo import average_logp, forward, pair_views
from .spec import AlgoConfig, AlgorithmSpec


class ORPOConfig(AlgoConfig, PreferenceOptions):
    batch_size: int = Field(64, ge=1, le=100_000_000, description="preference pairs per gradient step")
    lam: float = Field(0.1, ge=0, description="lambda, the weight of the odds-ratio term (TRL's ORPOConfig.beta: 0.1)")


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def log_odds_ratio(rbar_c: Tensor, rbar_r: Tensor) -> Tensor:
    """log odds(y_c) - log odds(y_r) from length-normalised log-likelihoods ``(B,)``."""
    return (rbar_c - rbar_r) - (log1mexp(rbar_c) - log1mexp(rbar_r))


def orpo_loss(
    logp_c: Tensor,
    logp_r: Tensor,
    mask_c: Tensor,
    mask_r: Tensor,
    p_chosen: Tensor,
    cfg: ORPOConfig,
    sft_logp: tuple[Tensor, Tensor] | None = None,
    sft_mask: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, dict]:
    """Per-token log-probs ``(B, T)`` of chosen and rejected, masks, ``p_chosen (B,)``.

    ``sft_logp``/``sft_mask``: the (chosen, rejected) tokens the SFT term averages, default the
    completions themselves. Returns ``(loss, per_sequence_loss (B, 1), stats)``; the per-sequence
    loss is each row's share of L (its NLL over all the batch's SFT tokens, plus lambda L_OR / B).
    """
    rbar_c, rbar_r = average_logp(logp_c, mask_c), average_logp(logp_r, mask_r)  # (B,)
    log_or = log_odds_ratio(rbar_c, rbar_r)  # log OR(y_c, y_r)
    l_or = -(p_chosen * F.logsigmoid(log_or) + (1 - p_chosen) * F.logsigmoid(-log_or))  # L_OR  (B,)
    (sl_c, sl_r), (sm_c, sm_r) = sft_logp or (logp_c, logp_r), sft_mask or (mask_c, mask_r)
    w_c, w_r = p_chosen[:, None] * sm_c, (1 - p_chosen)[:, None] * sm_r  # the winner's tokens  (B, T)
    n_tokens = (w_c.sum() + w_r.sum()).clamp(min=1e-12)
    nll_rows = -((sl_c * w_c).sum(-1) + (sl_r * w_r).sum(-1)) / n_tokens  # (B,) shares of L_SFT
    l_sft = nll_rows.sum()
    B = logp_c.shape[0]
    per_seq = nll_rows + cfg.lam * l_or / B
    loss = l_sft + cfg.lam * l_or.mean()
    stats = {
        "loss/orpo": loss.item(),
        "orpo/nll": l_sft.item(),  # L_SFT (TRL: nll_loss)
        "orpo/log_odds_ratio": log_or.mean().item(),
        "rewards/chosen": (cfg.lam * rbar_c).mean().item(),  # lambda rbar, as TRL's ORPOTrainer logs
        "rewards/rejected": (cfg.lam * rbar_r).mean().item(),
        "rewards/accuracies": (rbar_c > rbar_r).float().mean().item(),
        "rewards/margins": (cfg.lam * (rbar_c - rbar_r)).mean().item(),
    }
    return loss, per_seq[:, None], stats


def loss(outputs: dict, batch, cfg: ORPOConfig, beta: float):
    """On ``forward``'s pass (SimPO's: one policy pass over chosen and rejected, no reference pass)."""
    return orpo_loss(*pair_views(outputs, batch), batch["p_chosen"], cfg)


def regulariser(cfg: ORPOConfig, beta: float) -> str:
    return (
        f"ORPO on {cfg.labels} Bradley-Terry labels: SFT on the winner plus odds ratio (lambda {cfg.lam:g}), "
        "no reference model, no KL"
    )


SPEC = AlgorithmSpec(
    name="orpo",
    Config=ORPOConfig,
    kind="offline",
    unit="pairs",
    summary="ORPO: SFT on the chosen plus an odds-ratio term, no reference model",
    data_policy=pair_policy,
    dataset=masked_preference_dataset,
    forward=forward,
    loss=loss,
    regulariser=regulariser,
)
