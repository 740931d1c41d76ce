#!/usr/bin/env bash
# The prepared GPU check (see deberta_fast/benchmark/gpu_check.py): about 8 minutes on one H100/H200, offline.
#   bash bench/gpu_check.sh              # on the CUDA machine
#   bash bench/gpu_check.sh --dry-run    # anywhere: imports, files, the plan
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m deberta_fast.benchmark.gpu_check "$@"
