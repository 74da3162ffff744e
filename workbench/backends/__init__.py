"""Other trainers for the same runs: ``backend = "trl"`` in a run config sends ``train()`` to TRL."""
