"""The registries: plain dicts filled by explicit imports, and ``register`` for algorithms and tasks defined elsewhere.

A new algorithm is one file in ``workbench/algorithms/`` plus one line in ``BUILT_IN`` here (or,
outside the package, one ``register(SPEC)`` call); a new task is one file in
``workbench/toy_tasks/`` plus one line in ``TASKS`` (or ``register_task(cls)``).
"""

from __future__ import annotations

from .algorithms import bon, dpo, grpo, kto, orpo, ppo, reinforce, reward_model, rft, rloo, sft, simpo
from .algorithms.spec import AlgorithmSpec
from .toy_tasks import Arithmetic, Bandit, DigitSum, Sequence, Task
from .toy_tasks.scratch_add import ScratchAdd
from .toy_tasks.tool_use import ToolUse

BUILT_IN = [
    sft.SPEC,
    reward_model.SPEC,
    reinforce.SPEC,
    rloo.SPEC,
    ppo.SPEC,
    grpo.SPEC,
    dpo.SPEC,
    dpo.IPO_SPEC,
    dpo.ONLINE_SPEC,
    rft.SPEC,
    kto.SPEC,
    simpo.SPEC,
    orpo.SPEC,
    bon.SPEC,
]
ALGORITHMS: dict[str, AlgorithmSpec] = {s.name: s for s in BUILT_IN}
TASKS: dict[str, type[Task]] = {t.name: t for t in [Bandit, Sequence, Arithmetic, DigitSum, ScratchAdd, ToolUse]}


def register(spec: AlgorithmSpec, replace: bool = False) -> AlgorithmSpec:
    """Add an algorithm under ``spec.name`` (``replace=True`` to redefine one). Returns ``spec``."""
    if not isinstance(spec, AlgorithmSpec):
        raise TypeError(f"register takes an AlgorithmSpec, got {type(spec).__name__}")
    if spec.name in ALGORITHMS and not replace and ALGORITHMS[spec.name] is not spec:
        raise ValueError(f"an algorithm named {spec.name!r} is already registered")
    ALGORITHMS[spec.name] = spec
    return spec


def register_task(cls: type[Task], replace: bool = False) -> type[Task]:
    """Add a task class under ``cls.name``. Returns ``cls``."""
    if cls.name in TASKS and not replace and TASKS[cls.name] is not cls:
        raise ValueError(f"a task named {cls.name!r} is already registered")
    TASKS[cls.name] = cls
    return cls
