"""Algorithms: one file each, a pure ``<name>_loss`` plus an ``AlgorithmSpec`` for the loops."""
