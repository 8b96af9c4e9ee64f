#!/usr/bin/env bash
# Create .venv and install kbfgs with its test and experiment extras.
# On a machine without an NVIDIA GPU, torch==2.13.0 (the CPU build) is installed first so that
# the loose `torch>=2.1` requirement never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
pip_install() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@"; }
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip_install "torch>=2.1"          # GPU machine: the default (CUDA) build
  else
    pip_install "torch==2.13.0"       # CPU machine: the CPU build
  fi
fi
pip_install -e ".[dev]"
.venv/bin/python -c "import kbfgs, torch; print(f'kbfgs {kbfgs.__version__} with torch {torch.__version__} ready in .venv')"
