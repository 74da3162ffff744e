#!/usr/bin/env bash
# Run the policy tests under another transformers version (default: 5.17.0, the lowest pyproject.toml allows),
# installed beside the project's venv in /tmp, not into it.
#   bash scripts/check_transformers.sh [VERSION]
set -euo pipefail
cd "$(dirname "$0")/.."
v=${1:-5.17.0}; shift || true
target=/tmp/workbench-transformers-$v
[ -d "$target/transformers" ] || .venv/bin/python -m pip install -q --target "$target" "transformers==$v" httpx "huggingface-hub>=1.5,<2"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$target"
.venv/bin/python -c "import transformers; print('transformers', transformers.__version__)"
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_policy.py tests/test_native_gpt2.py tests/test_exact.py "$@"
