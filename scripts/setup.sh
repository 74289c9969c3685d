#!/usr/bin/env bash
# Creates ./.venv with deltapack and its test/serving dependencies. Idempotent; safe to re-run.
# torch is pinned to 2.13.0: on this workplace that resolves to a local CPU wheel (any other request pulls GBs of CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev,serve]"
.venv/bin/python -c "import deltapack, torch; print('deltapack', deltapack.__version__, '| torch', torch.__version__)"
