#!/usr/bin/env bash
# invdiff and PyTorch on this machine's CPU, side by side in one run, alternating so that a
# noisy neighbour hurts both alike: celebahq-256 architecture, random weights, batch 1, forward
# and forward + input gradient. Needs a Python with torch and diffusers ($PYTHON, default
# python3; scripts/requirements-fixtures.txt has the versions).
#   scripts/bench_cpu.sh [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
rounds=${1:-2}
cargo build --release --locked 2>/dev/null
for r in $(seq "$rounds"); do
    echo "== round $r: invdiff"
    target/release/invdiff bench --device cpu --steps 3 --json "/tmp/invdiff_cpu_$r.json"
    echo "== round $r: PyTorch"
    "$PYTHON" scripts/torch_baseline.py --device cpu --batch 1 --dtype fp32 --dps --reps 3 2>/dev/null | tail -n 2
done
