#!/usr/bin/env bash
# The prepared GPU check, as one device call (docs/performance.md, "The GPU check"):
#   bash scripts/gpu_check.sh [gpu_check.py options]      e.g. --only env,bench_moe_layer
# Runs from the repository root with the machine's python3 (its torch and triton); installs the
# wheels carried in .gpu_wheels/ (scripts/fetch_gpu_wheels.sh) into a private folder; writes
# gpu_check.json and gpu_check.log to $OUT (else ./gpu_check_out). Under 8 minutes (--deadline).
set -u
cd "$(dirname "$0")/.." || exit 2
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
