#!/usr/bin/env bash
# Set up everything the tests need on a fresh Debian/Ubuntu machine (SLURM + MariaDB + munge
# packages for the real single-node cluster the tests start, and .venv), then run the suite.
# Arguments are passed to pytest (e.g. -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = "0" ] || command -v sudo >/dev/null 2>&1; then
    bash .ci/install_system_deps.sh
fi
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" = "5" ]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
exit "$rc"
