#!/usr/bin/env bash
# One run on a GPU machine (H100/H200) with the binary built elsewhere: correctness of the CUDA
# path against the CPU path and against diffusers, and timings beside PyTorch's on the same card.
#
# Prepare here (the GPU machine has no Rust and no network):
#   export NVCC=$(scripts/install_nvcc.sh) && cargo build --release
#   mkdir -p out && strip -o out/invdiff target/release/invdiff
#   cp path/to/diffusers-*.whl path/to/importlib_metadata-*.whl out/   # diffusers for the baseline
# then run `scripts/device_check.sh` there (with `out` carried). Logs go to $OUT (or /tmp/devcheck).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-out/invdiff}
LOG=${OUT:-/tmp/devcheck}
mkdir -p "$LOG"
summary=()
note() { summary+=("$1"); echo "== $1"; }

python3 -m pip install -q --no-index --no-deps --target /tmp/site out/*.whl && export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$LOG/gpu.txt"
"$BIN" doctor | tee "$LOG/doctor.txt"

# 1. Every kernel and the whole network against the CPU path.
"$BIN" selftest --device cuda > "$LOG/selftest.txt" 2>&1
rc=$?; tail -n 1 "$LOG/selftest.txt"; grep FAILED "$LOG/selftest.txt" | head -n 20
note "selftest: exit $rc, $(tail -n 1 "$LOG/selftest.txt")"

# 2. Full size against diffusers (strict fp32 on this GPU), and PyTorch's timings.
python3 scripts/torch_baseline.py --save-model /tmp/m --dump-io /tmp/io --batch 1 8 \
    --dtype fp32 tf32 bf16 --dps --json "$LOG/torch.json" > "$LOG/torch.txt" 2>&1
note "torch: $(tr '\n' ' ' < "$LOG/torch.txt" | grep -o 'fp32 b1 fwd ms[^a-z]*' | head -c 60)"
"$BIN" eps --model /tmp/m --input /tmp/io/in.safetensors --output /tmp/io/ours.safetensors --device cuda
"$BIN" compare /tmp/io/ours.safetensors /tmp/io/expect.safetensors --tolerance 1e-5 | tee "$LOG/parity.txt"
note "full-size parity vs diffusers (exit ${PIPESTATUS[0]}): $(tr '\n' ';' < "$LOG/parity.txt")"

# 3. Our timings (device-resident, CUDA events).
for b in 1 8; do
    "$BIN" bench --model /tmp/m --device cuda --batch $b --steps 30 --json "$LOG/bench_b$b.json" | tee -a "$LOG/bench.txt"
done
note "ours: $(grep -E 'forward|dps' "$LOG/bench.txt" | tr -s ' ' | tr '\n' ';')"

# 4. Ten steps of DPS and of PiGDM on a real sample: GPU against CPU, same seed.
for m in dps pigdm; do
    for d in cuda cpu; do
        "$BIN" restore --model /tmp/m --method $m --measurement tests/data/ffhq-deblur/0.safetensors \
            --steps 10 --seed 3 --output "/tmp/traj_${m}_$d.safetensors" --device $d > "$LOG/traj_${m}_$d.txt" 2>&1
    done
    "$BIN" compare "/tmp/traj_${m}_cuda.safetensors" "/tmp/traj_${m}_cpu.safetensors" --tolerance 1e-4 | tee "$LOG/traj_$m.txt"
    note "trajectory $m GPU vs CPU (exit ${PIPESTATUS[0]}): $(head -n 1 "$LOG/traj_$m.txt")"
done

cp "$LOG"/*.txt "$LOG"/*.json /dev/null 2>/dev/null
echo; echo "==================== summary"; printf '%s\n' "${summary[@]}"
cat "$LOG/torch.txt" | tail -n 12
