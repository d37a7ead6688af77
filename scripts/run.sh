#!/usr/bin/env bash
# Set up (if needed) and run the main job: the embedded default ablation grid (tiny preset,
# synthetic data, CPU, local) followed by the regeneration of results/. Extra arguments are
# passed to ablations/run_grid.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python ablations/run_grid.py "$@"
