"""Best-of-n sampling as a method: draw n completions from the starting policy, keep the best by the reward.

WebGPT's rejection sampling (Nakano et al. 2021, arXiv 2112.09332), the best-of-n baseline of
Gao et al. 2022 (arXiv 2210.10760); its KL in Beirami et al. 2024 (arXiv 2401.01879). Nothing
is trained: a ``bon`` run measures the policy

    P_bon(y|x) = pi(y|x) / m(y) * (F(y)^n - F(y-)^n)
    F(y) = sum_{y': r(y') <= r(y)} pi(y'|x),   F(y-) = sum_{y': r(y') < r(y)} pi(y'|x),   m(y) = F(y) - F(y-)

of its starting policy pi (= pi_ref: the run's initial policy), ranking by the gold reward r
(ties broken without looking at y), or, with ``reward_model`` (``"fit"``: the reward model the run
fits itself, ``workbench.training.pipeline``; or a saved one), by that proxy's score: the reward the
run optimises, calibrated when ``rm_calibrate = "optimise"``, the gold reward then only measured
(Gao et al.'s best-of-n; its gold and proxy gains over pi are ``reward/gold_gain`` and
``reward/proxy_gain``). On an enumerable task the evaluation computes P_bon exactly
(``workbench.analysis.exact.best_of_n_logprobs``) and logs its ``reward/exact``, ``kl/exact`` =
KL(P_bon || pi_ref), ``objective/exact``, ``kl/exact_to_optimal``, ...: the names every run logs,
so a bon point sits on the same (KL, reward) axes as a trained policy. Everywhere it also samples:
n draws per eval prompt, the best by the ranking reward kept (the first among ties), its gold reward averaged into
``reward/eval``. It logs ``bon/n`` and ``bon/kl_bound`` = log n - (n - 1)/n, the KL of best-of-n
for a continuous reward distribution and an upper bound otherwise (the exact KL is ``kl/exact``
where the task is enumerable).

The loop (``workbench.training.loop``) makes no parameter updates for it: it measures at step 0
and at ``steps`` (the same policy twice) and counts as ``samples`` the n completions drawn per
eval prompt. Its regulariser is n itself (KL <= log n - (n-1)/n), so it is compared with trained
methods on ``objective/exact`` or at matched ``kl/exact``, never on raw reward alone.
"""

from __future__ import annotations

from pydantic import Field

from .spec import AlgoConfig, AlgorithmSpec


class BonConfig(AlgoConfig):
    n: int = Field(4, ge=1, le=65_536, description="completions drawn per prompt; the best by the reward is kept")


SPEC = AlgorithmSpec(
    name="bon",
    Config=BonConfig,
    kind="online",
    summary="best-of-n of the starting policy (no training): exact P_bon on enumerable tasks, sampled elsewhere",
    best_of=lambda cfg: cfg.n,
    regulariser=lambda cfg, beta: f"best-of-{cfg.n} of pi_ref, no training (KL <= log n - (n-1)/n)",
)
