#!/usr/bin/env bash
# Create .venv and install the workbench with its test dependencies (and the `ray` extra, so that
# tests/test_ray_executor.py runs rather than skips; the tracker extras but trackio for tests/test_export.py).
# torch comes first: the CPU build on a machine without a GPU (never a multi-GB CUDA
# build), the default build where `nvidia-smi` sees a GPU. The project's torch range
# (pyproject.toml) is satisfied by it, so `pip install -e .` adds nothing heavier.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    $PIP install -q "torch==2.13.0"                       # GPU: the default (CUDA) build
  elif ! $PIP install -q "torch==2.13.0+cpu" 2>/dev/null; then  # CPU build from local wheels, if any
    $PIP install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
$PIP install -q -e ".[dev,ray,tensorboard,wandb,mlflow]" 2>&1 | grep -v "is ignored" || true  # trackers: tests/test_export.py
.venv/bin/python -c "import torch, transformers, trl, workbench; print('workbench', workbench.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__)"
