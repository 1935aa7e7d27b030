#!/usr/bin/env bash
# Train on one machine with every GPU (or N CPU processes):
#   launch/local.sh [NPROC] +experiment=NAME [key=value ...]
# NPROC defaults to the number of visible GPUs, or 1 without a GPU.
set -euo pipefail
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then nproc=$1; shift; else
  nproc=$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi
exec torchrun --standalone --nproc_per_node "$nproc" -m moetrain.train "$@"
