"""What every way of training a run shares: the rollout, the update step, the run's lifecycle.

``rollout``: sample, score and the no-grad passes for old and reference log-probs.
``update``: the optimiser, its schedule, and one checked gradient step (divergence marks the run).
``context``: ``RunContext``, the lifecycle (device and seeds, run folder, measurement hooks,
checkpoint, status) used by the single-run loop, stacked seeds and the TRL backend alike.
"""
