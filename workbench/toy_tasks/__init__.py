"""Toy tasks, one file each; ``workbench.registry.TASKS`` maps names to classes."""

from .arithmetic import Arithmetic
from .bandit import Bandit
from .base import PreferenceData, Task, TaskConfig
from .digit_sum import DigitSum
from .sequence import Sequence

__all__ = ["Arithmetic", "Bandit", "DigitSum", "PreferenceData", "Sequence", "Task", "TaskConfig"]
