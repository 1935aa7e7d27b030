#!/usr/bin/env bash
# Fetch, on a machine with PyPI, the wheels the GPU machine lacks for scripts/gpu_check.sh, into
# .gpu_wheels/ (ignored by git; name it in the device call's `carry`). The GPU machine has
# torch, triton, pytest, PyYAML, packaging, numpy, safetensors and sentencepiece, not Hydra:
#   hydra-core, omegaconf       the config tree (moetrain.config, scripts/bench_train.py)
#   antlr4-python3-runtime      omegaconf's grammar runtime (4.9.*; sdist only: built here)
#   torchao                     FP8 training (train.fp8; the PyPI wheel: its FP8 rowwise path is
#                               Triton + torch._scaled_grouped_mm, no torchao CUDA extension)
# The versions are the ones installed in the active environment (what CI tests), else pinned.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.gpu_wheels
PY="${PYTHON:-python3}"
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || echo "$2"; }
HYDRA=$(version hydra-core 1.3.2)
OMEGACONF=$(version omegaconf 2.3.0)
ANTLR=$(version antlr4-python3-runtime 4.9.3)
TORCHAO=$(version torchao 0.18.0)
rm -rf "$DEST"
mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
    --platform any -d "$DEST" "hydra-core==$HYDRA" "omegaconf==$OMEGACONF"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --abi abi3 --platform manylinux_2_28_x86_64 -d "$DEST" "torchao==$TORCHAO"
# pure Python, published as an sdist only: build the wheel here
"$PY" -m pip wheel -q --no-deps -w "$DEST" "antlr4-python3-runtime==$ANTLR"
ls -l "$DEST"
du -sh "$DEST"
