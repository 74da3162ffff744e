"""The errors every layer may raise and the top layer turns into exit codes and messages."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad configuration; ``str()`` is a message for a person, no traceback needed."""


class Diverged(RuntimeError):
    """A run's loss or gradient norm went non-finite at ``step``: the run is marked, not fatal."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"diverged at step {step}: {reason}")
        self.step, self.reason = step, reason
