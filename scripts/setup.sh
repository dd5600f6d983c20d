#!/usr/bin/env bash
# Create .venv and install aftune with its test dependencies. Idempotent.
# torch is installed first and pinned to the CPU build where one is available (no multi-GB CUDA
# download on a CPU-only machine); set AFTUNE_TORCH to choose another build, e.g. AFTUNE_TORCH="torch".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q "${AFTUNE_TORCH:-torch==2.13.0}"
fi
.venv/bin/python -m pip install -q -e ".[dev]"
