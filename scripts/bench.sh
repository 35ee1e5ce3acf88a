#!/usr/bin/env bash
# The project's main job (README): builds invdiff, with its CUDA kernels when nvcc can be had,
# and benchmarks the built-in google/ddpm-ema-celebahq-256 architecture (deterministic random
# weights, no download) on the best device here. Extra arguments go to `invdiff bench`.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${NVCC:-}" ]; then
    if NVCC="$(scripts/install_nvcc.sh)"; then
        export NVCC
    else
        echo "bench.sh: could not install nvcc; building without CUDA kernels (CPU only)" >&2
        unset NVCC
    fi
fi
cargo build --release --locked
target/release/invdiff doctor
exec target/release/invdiff bench "$@"
