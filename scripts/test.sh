#!/usr/bin/env bash
# The project's test command (README, CI): installs the pinned nvcc when it is missing so that
# every CUDA kernel is compiled (no GPU needed), then runs the whole test suite in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${NVCC:-}" ]; then
    NVCC="$(scripts/install_nvcc.sh)"
    export NVCC
fi
# With nvcc present, a build without kernels is a failure, not a silent CPU-only build.
export INVDIFF_REQUIRE_KERNELS=1
cargo test --release --locked "$@"
