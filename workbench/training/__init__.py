"""The training loops (single run, stacked seeds), the RLHF pipeline, and ``train``, the entry point."""

from .run import train, train_seeds

__all__ = ["train", "train_seeds"]
