#!/usr/bin/env bash
# Installs a CUDA 13.0 nvcc from PyPI's NVIDIA wheels into .nvcc/ at the repository root (ignored
# by git) and prints the nvcc path, so that the kernels build on a machine without a GPU or a
# CUDA install:
#     export NVCC=$(scripts/install_nvcc.sh) && cargo build
# Every wheel is pinned to the 13.0 line: the GPU machines' driver is CUDA 13.0 and rejects PTX
# newer than ISA 9.0, and an unpinned nvcc wheel pulls newer nvvm/crt/runtime (and no CCCL
# headers). Running it again is harmless.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.nvcc"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/pip" ]; then
    "$python" -m venv "$venv" >&2
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check \
    nvidia-cuda-nvcc==13.0.88 \
    nvidia-nvvm==13.0.88 \
    nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 \
    nvidia-cuda-cccl==13.0.85 >&2

nvcc="$(ls "$venv"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc | head -n 1)"
"$nvcc" --version | tail -n 1 >&2
echo "$nvcc"
