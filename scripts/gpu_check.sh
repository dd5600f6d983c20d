#!/usr/bin/env bash
# scripts/gpu_check.py on a GPU machine that has torch, transformers, accelerate and peft but cannot install
# packages (the device tool's machine): the wheels it lacks travel in .whl/ and are installed into /tmp/site.
# Prepare them on a machine with pip (Python 3.12, x86-64), from the repository root:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform any -d .whl transformers==5.19.0 trl==1.16.0 datasets==5.2.0 \
#     dill==0.4.1 multiprocess==0.70.19 hjson pydantic pydantic_core annotated-types typing-inspection
#   python3 -m pip wheel --no-deps -w .whl deepspeed==0.19.8
#   python3 bench/run_all.py --save-lengths .gpu/gsm8k_lengths.json --no-align --vocabs "" --no-real-model --no-synthetic
# (the last line writes the GSM8K prompt / response lengths, counted with the Gemma 3 tokenizer, that the bench uses)
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>/dev/null
exec python3 scripts/gpu_check.py "$@"
