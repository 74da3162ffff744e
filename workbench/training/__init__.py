"""The training loops (single run, stacked seeds), the RLHF pipeline, and ``train``, the entry point."""

from .run import stack_key, train, train_seeds

__all__ = ["stack_key", "train", "train_seeds"]
