#!/usr/bin/env bash
# Run the Hugging Face and TRL tests under the lowest versions pyproject.toml allows
# (constraints/lowest.txt: torch, transformers, trl and the other direct dependencies they
# import), in a venv of its own, never the project's .venv. The venv is reused when present.
#   bash scripts/check_lowest.sh [PYTEST ARGS]
#   WORKBENCH_LOWEST_VENV=/path  (default /tmp/workbench-lowest)   PYTHON=python3.11
# Fresh: about 5 min and 6 GB (PyPI's torch 2.5 with its CUDA libraries); reused: under 1 min.
# docs/versions.md has the versions and what they showed.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${WORKBENCH_LOWEST_VENV:-/tmp/workbench-lowest}
c=constraints/lowest.txt
PY=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
# pandas 2.0.0 and scipy 1.11.1 have wheels up to Python 3.11 only (3.12 would build them from source)
"$venv/bin/python" -c "import sys; sys.exit(sys.version_info[:2] > (3, 11))" \
  || { echo "check_lowest.sh: $venv has Python > 3.11; the lowest pins and the project need 3.11 (set PYTHON, remove $venv)" >&2; exit 2; }
pip="$venv/bin/python -m pip"
quiet() { grep -v "is ignored" || true; }  # this machine's pip config names local indexes that lack most packages

# Every pin installed, and workbench imported from this checkout (a reused venv may point at another)?
check() {
  "$venv/bin/python" -I - "$c" "$PWD/workbench/__init__.py" <<'EOF'  # -I: not from the current folder
import sys
from importlib.metadata import PackageNotFoundError, version

bad = []
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if line:
        name, want = line.split("==")
        try:
            got = version(name)
        except PackageNotFoundError:
            got = "none"
        print(f"{name} {got}")
        if got.split("+")[0] != want:
            bad.append(f"{name}: pinned {want}, installed {got}")
try:
    import workbench

    if workbench.__file__ != sys.argv[2]:
        bad.append(f"workbench imports from {workbench.__file__}, not {sys.argv[2]}")
except ImportError:
    bad.append("workbench is not installed")
sys.exit("\n".join(bad) or None)
EOF
}

if ! check >/dev/null 2>&1; then
  # torch first, as scripts/install.sh does: a CPU build where one can be had (local wheels, then
  # PyTorch's CPU index), else PyPI's default build, which runs on CPU too (CUDA libraries, ~4 GB).
  tv=$(sed -n 's/^torch==//p' "$c")
  if ! "$venv/bin/python" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$tv')" 2>/dev/null; then
    $pip install -q "torch==$tv+cpu" 2>/dev/null \
      || $pip install -q "torch==$tv+cpu" --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
      || $pip install -q "torch==$tv" 2>&1 | quiet
  fi
  # every pinned package at its pin, the test runner, and the project itself without its dependencies
  pkgs=$(sed -n 's/^\([A-Za-z0-9_.-]*\)==.*/\1/p' "$c")
  # shellcheck disable=SC2086
  $pip install -q -c "$c" $pkgs "pytest>=8" "pytest-timeout>=2.3" 2>&1 | quiet
  $pip install -q -e . -c "$c" --no-deps 2>&1 | quiet
fi
check  # a pin that did not hold (a resolver surprise, an earlier run's leftovers) fails here, not silently

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider \
  tests/test_policy.py tests/test_native_gpt2.py tests/test_exact.py tests/test_trl_backend.py tests/test_trl_parity.py "$@"
