"""RLOO: REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024, arXiv 2402.14740).

For the k = G samples of one prompt, with sequence returns R_i = r_i - beta sum_t kl_it
(k1 in the reward, as TRL's RLOO):

    A_i = R_i - (1 / (k - 1)) sum_{j != i} R_j
    L   = -(1/B) sum_i A_i log pi(y_i | x)            (sequence_sum aggregation)

The baseline excludes the sample itself, so the gradient estimate stays unbiased.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from ..core.ops import Aggregation, group_view
from .reinforce import KLEstimator, KLPlace, ReinforceBatch, kl_shaped_rewards, reinforce_loss
from .spec import AlgoConfig, AlgorithmSpec, Rollout, kl_penalty


class RLOOConfig(AlgoConfig):
    kl_in: KLPlace = Field("reward", description="where the beta-KL acts")
    kl_estimator: KLEstimator = Field("k1", description="KL estimator")
    normalize_advantages: bool = Field(False, description="divide advantages by their batch std")
    aggregation: Aggregation = Field("sequence_sum", description="loss aggregation")


def rloo_advantages(returns: Tensor, group_size: int) -> Tensor:
    """returns ``(B,)`` -> leave-one-out advantages ``(B,)``; rows of a group adjacent."""
    R = group_view(returns, group_size)  # (B/k, k)
    k = group_size
    baseline = (R.sum(dim=1, keepdim=True) - R) / (k - 1)  # mean of the other k-1
    return (R - baseline).reshape(-1)


def prepare(roll: Rollout, cfg: RLOOConfig, beta: float) -> ReinforceBatch:
    r, kl = kl_shaped_rewards(roll, beta, cfg.kl_in, cfg.kl_estimator)
    A = rloo_advantages(r.sum(-1), roll.group_size)  # (B,)
    if cfg.normalize_advantages:
        A = A / (A.std() + 1e-8)
    return ReinforceBatch(
        advantages=A[:, None] * roll.mask,
        mask=roll.mask,
        ref_logp=roll.ref_logp,
        kl=kl,
        kl_metric=f"kl/{cfg.kl_estimator}_{cfg.kl_in}",
    )


SPEC = AlgorithmSpec(
    name="rloo",
    Config=RLOOConfig,
    kind="online",
    summary="REINFORCE with leave-one-out baseline",
    prepare=prepare,
    loss=reinforce_loss,
    min_group_size=2,
    kl_in_reward=lambda cfg: cfg.kl_in == "reward",
    regulariser=kl_penalty,
)
