#!/usr/bin/env bash
# Install (idempotent) and run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# The dashboard's browser test drives Debian's Chromium through Playwright (`playwright install`
# would download a browser; this uses the system one). Skipped when it is already there.
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
fi
# cffconvert validates CITATION.cff; it pins an old jsonschema, so it lives in its own venv
if [ ! -x .venv-tools/bin/cffconvert ]; then
  ${PYTHON:-python3} -m venv .venv-tools && .venv-tools/bin/python -m pip install -q cffconvert 2>&1 | grep -v "is ignored" || true
fi
# the code style is part of the tests: ruff (configured in pyproject.toml) formats and lints the tree
# (two commands, not an && list: set -e ignores a failure before the last command of a list)
.venv/bin/ruff format --check --quiet .
.venv/bin/ruff check --quiet .
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
