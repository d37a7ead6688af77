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
# The versions the tests last passed with (constraints.txt); pyproject.toml declares ranges, so
# `pip install -e ".[test]"` in your own environment (with your CUDA build of torch) works too.
# setuptools' editable build prints an informational UserWarning box on every install; it
# says nothing about this project, so it is silenced for this one command.
PYTHONWARNINGS="ignore::UserWarning" \
    .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[test]"
.venv/bin/python -c "import torch, torchvision, timm, transformers, submitit; print('torch', torch.__version__, '| cuda available:', torch.cuda.is_available())"
