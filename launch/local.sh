#!/usr/bin/env bash
# Train on one machine with every GPU (or N CPU processes):
#   launch/local.sh [NPROC] +experiment=NAME [key=value ...]
# NPROC defaults to the number of visible GPUs, or 1 without a GPU. SIGTERM or SIGUSR1 to this
# process (`kill`, `docker stop`, a scheduler) reaches every rank, even one still starting: the
# ranks finish their step, save a checkpoint and exit 0 (moetrain.torchrun).
set -euo pipefail
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then nproc=$1; shift; else
  nproc=$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi
exec python -m moetrain.torchrun --standalone --nproc_per_node "$nproc" -m moetrain.train "$@"
