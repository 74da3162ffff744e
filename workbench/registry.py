"""The registries: plain dicts filled by explicit imports.

A new algorithm is one file in ``workbench/algorithms/`` plus one line here; a new task
is one file in ``workbench/toy_tasks/`` plus one line here.
"""

from __future__ import annotations

from .algorithms import dpo, grpo, ppo, reinforce, reward_model, rloo, sft
from .algorithms.spec import AlgorithmSpec
from .toy_tasks import Arithmetic, Bandit, Sequence, Task

ALGORITHMS: dict[str, AlgorithmSpec] = {
    s.name: s
    for s in [
        sft.SPEC,
        reward_model.SPEC,
        reinforce.SPEC,
        rloo.SPEC,
        ppo.SPEC,
        grpo.SPEC,
        dpo.SPEC,
        dpo.IPO_SPEC,
        dpo.ONLINE_SPEC,
    ]
}

TASKS: dict[str, type[Task]] = {t.name: t for t in [Bandit, Sequence, Arithmetic]}
