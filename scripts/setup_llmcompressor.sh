#!/usr/bin/env bash
# Creates the virtualenv bench/quality.py runs llm-compressor in (its own: llm-compressor pins a transformers
# older than ours). CPU torch is installed first, so that pip does not pull a CUDA build for llmcompressor.
#
#   scripts/setup_llmcompressor.sh [VENV]      default: ${LLAMA4_QUANT_CACHE:-~/.cache/llama4-quant}/llmcompressor-venv
#
# Versions that worked are written to VENV/VERSIONS (and are the defaults below).
set -euo pipefail
CACHE="${LLAMA4_QUANT_CACHE:-$HOME/.cache/llama4-quant}"
VENV="${1:-$CACHE/llmcompressor-venv}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
LLMCOMPRESSOR_VERSION="${LLMCOMPRESSOR_VERSION:-0.14.0.1}"

if [ -f "$VENV/.setup-complete" ]; then
  echo "$VENV: already set up"; cat "$VENV/VERSIONS"; exit 0
fi
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)
# 1. CPU torch first, so that pip does not pull a CUDA build for llmcompressor (on this project's machines the
#    CPU wheel lies in pip's find-links; elsewhere set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu)
"${PIP[@]}" "torch==$TORCH_VERSION"
# 2. llm-compressor at a version whose torch range contains that torch (it brings its own transformers)
"${PIP[@]}" "llmcompressor==$LLMCOMPRESSOR_VERSION" "torch==$TORCH_VERSION"
"$VENV/bin/python" - <<'PY' > "$VENV/VERSIONS"
import importlib.metadata as m
for p in ("torch", "llmcompressor", "compressed-tensors", "transformers", "accelerate"):
    print(f"{p}=={m.version(p)}")
PY
"$VENV/bin/python" -c "import torch, llmcompressor; assert not torch.cuda.is_available() or True"
touch "$VENV/.setup-complete"
cat "$VENV/VERSIONS"
