"""The bottom layer: shared types, tensor maths, seed streams, statistics and errors.

Nothing here imports another workbench package; everything above may import it. Kept free of
top-level imports in this ``__init__`` so that ``workbench.core.stats`` stays light for the dashboard.
"""
