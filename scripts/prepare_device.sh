#!/usr/bin/env bash
# Stages what scripts/device_check.sh needs into out/ (git-ignored), on the development machine:
# the release binary of this tree, the per-kernel benchmark, the diffusers wheels for PyTorch's
# side, CUPTI for `bench --trace` (out/lib/libcupti.so.13, from NVIDIA's pinned wheel), and
# optionally the binary of a second tree (a branch checked out as a git worktree),
# which device_check.sh then checks and times beside this one as out/invdiff-next. With a second
# tree, the per-kernel benchmark is that tree's (it profiles the newer kernels; what travels
# must stay under 64 MiB).
#
#   scripts/prepare_device.sh [OTHER_TREE]
#
# Then run `scripts/device_check.sh` with the device tool, carrying `out` (timeout_s 600). The
# binaries are packed into out/bins.tar.gz, which device_check.sh unpacks.
# Builds with the pinned nvcc (scripts/install_nvcc.sh unless NVCC is set) and fails if any
# kernel is missing: a GPU run of a build without kernels would only report that.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-/work/shared/gpu/wheels}
if [ -z "${NVCC:-}" ]; then
    NVCC="$(scripts/install_nvcc.sh)"
fi
export NVCC INVDIFF_REQUIRE_KERNELS=1

build() { # build TREE: release binary and the kernel benchmark of TREE
    (cd "$1" && cargo build --release --locked && cargo bench --bench kernels_cuda --no-run --locked) >&2
}

target_of() { # the cargo target directory of tree $1
    (cd "$1" && cargo metadata --format-version 1 --no-deps |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
}
kernel_bench() { # kernel_bench TREE: strip its newest kernels_cuda into out/
    local bench
    bench=$(ls -t "$(target_of "$1")"/release/deps/kernels_cuda-* | grep -v '\.d$' | head -n 1)
    strip -o out/kernels_cuda "$bench"
}

rm -rf out && mkdir -p out
build .
strip -o out/invdiff target/release/invdiff
cp "$WHEELS"/*.whl out/
# CUPTI of the CUDA 13.0 line (the GPU machine has no network), cached in .whl/.
cupti=.whl/nvidia_cuda_cupti-13.0.85-py3-none-manylinux_2_25_x86_64.whl
[ -f "$cupti" ] || python3 -m pip download --quiet --no-deps nvidia-cuda-cupti==13.0.85 -d .whl >&2
mkdir -p out/lib
# libcupti for --trace; with NVIDIA's perf libraries, which CUPTI's PC sampling (--stalls) loads,
# xz-packed (38 MB as they are, 3.8 MB packed; device_check.sh unpacks them with Python).
python3 - "$cupti" <<'PY'
import io, sys, tarfile, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    open("out/lib/libcupti.so.13", "wb").write(z.read("nvidia/cu13/lib/libcupti.so.13"))
    with tarfile.open("out/lib/nvperf.tar.xz", "w:xz") as t:
        for name in ["libnvperf_host.so", "libnvperf_target.so"]:
            data = z.read("nvidia/cu13/lib/" + name)
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755
            t.addfile(info, io.BytesIO(data))
PY
if [ $# -ge 1 ]; then
    build "$1"
    strip -o out/invdiff-next "$(target_of "$1")/release/invdiff"
    kernel_bench "$1"
    echo "out/invdiff-next and out/kernels_cuda: $(git -C "$1" log --oneline -1)"
else
    kernel_bench .
fi
echo "out/invdiff: $(git log --oneline -1)"
# The binaries travel gzipped (each embeds every kernel as SASS and PTX, ~30 MB; device_check.sh
# unpacks them): what travels must stay under 64 MiB with the tree.
bins=()
for b in invdiff invdiff-next kernels_cuda; do
    if [ -e "out/$b" ]; then bins+=("$b"); fi
done
tar -czf out/bins.tar.gz -C out "${bins[@]}"
(cd out && rm -f "${bins[@]}")
du -ch out/* | tail -n 1
