#!/usr/bin/env bash
# Create .venv and install the project with its test tools (idempotent).
# PYTHON selects the interpreter (default python3, >= 3.10).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch/torchvision come from the declared ranges; install your CUDA build first if you need one.
.venv/bin/python -m pip install --quiet -e ".[test]"
.venv/bin/python -c "import torch, torchvision, timm, transformers, submitit; print('torch', torch.__version__, '| cuda available:', torch.cuda.is_available())"
