#!/usr/bin/env bash
# The one prepared script for a GPU session (H100/H200): correctness of the CUDA path, PyTorch's
# timings and ours on the same card, and where our time goes per kernel, most important first:
#   (a) invdiff selftest (every kernel and whole networks against the CPU path), the TMA
#       kernels' checks in a run of their own first (TMA_BROKEN below), the candidate stride-2
#       TMA forms' in another after it;
#   (b) PyTorch + diffusers: dense bf16 matmul peak, fp32 b1 forward + DPS step, bf16 b1 forward +
#       DPS step, bf16 b8 and b32 forward (also writes the weights and I/O that (e) checks against);
#   (c) invdiff bench: fp32 b1 (forward + DPS step), fp32 b8, bf16 b1 (forward + DPS step), bf16
#       b8 and b32 forward, bf16 b8 with --batch-invariant, with the measured peak passed as
#       --peak-tflops;
#   (d) per-step profiles: bf16 b8 forward, bf16 b1 forward + VJP (bench --profile);
#   (t) kernel timelines of the graph replays under CUPTI (bench --trace, with out/lib's
#       libcupti): bf16 b1 forward and DPS step, bf16 b8 forward; how long the GPU ran kernels
#       and how long none, per pass, in the summary; the Chrome traces in devcheck.tar.gz;
#   (n) when out/invdiff-next exists (a second build, e.g. a branch): its selftest, its bf16 bench
#       rows and the same two profiles, compared by kind with (d);
#   (v) run-time variants (VARIANTS, "name:VAR=value,VAR=value;..."; default: the v0.4 to v0.10
#       programs, every candidate on, then each entry of scripts/candidates.sh alone:
#       each default off, the stream count, each candidate) of out/invdiff-next if it exists, else
#       out/invdiff: for each its bf16 b1 (forward + DPS step), b8 and b32 rows; for `v04`
#       also its whole-network selftest rows, for `fold_all` its fp32 b1 rows, and for `all`
#       (else the last one) also its whole selftest (each one's with VARIANT_SELFTEST=each;
#       only its network groups with VARIANT_SELFTEST=networks, when phase (a) ran the rest),
#       the b1 DPS profile and the 1000-step restoration;
#   (k) when out/kernels_cuda exists: the per-shape kernel benchmark, bf16 b8 forward, and, if
#       that build has it, its --sweep (every tensor-core launch under each pipeline, split and
#       wgmma form, and every GroupNorm in each form: three launches, one pass, each also with
#       loads ahead, a backward pass's three launches also one at a time; bf16 b8 forward,
#       bf16 b1 forward + VJP, the GroupNorms of the latter first on their own (SWEEPS=norms:
#       only those); JSON in devcheck.tar.gz);
#   (e) full-size parity against diffusers (strict fp32; again with the fold on in fp32), a
#       1000-step bf16 DPS restoration of the real sample, and 10-step DPS / 2-step PiGDM
#       trajectories, GPU against CPU: all on the weights and references phase (b) writes,
#       so (e) needs (b) in the same call (without it, each says it was skipped);
#   (s) last, in the time left: what each step's warps wait on, from CUPTI's PC sampling
#       (bench --stalls): bf16 b1 DPS step, bf16 b8 forward; by kind in the summary, per step
#       and per SASS offset in the JSON in devcheck.tar.gz (scripts/stall_sass.py reads it).
# PHASES (a comma list of the letters above, default all) runs only those phases, e.g.
# `PHASES=a,c,v VARIANTS="mine:INVDIFF_X=1"` for a short check of one combination.
# Expected wall time on an H100/H200 about 6-7 minutes (355 s on an H200 on 2026-11-27 with 19
# variants of three bench calls each, a bench call 2-5 s; the default list now has 53, more than a
# deadline of 510 s leaves room for, so name the variants wanted in VARIANTS); each
# phase's estimate is beside it;
# a deadline (DEADLINE, default 510 s) skips what no longer fits and every command has a
# timeout, so one hang cannot eat the session. Run it with the device tool's timeout_s at 600,
# or, with less device time left, a shorter VARIANTS list and DEADLINE.
#
# Prepare on the development machine (the GPU machine has no Rust and no network):
#   scripts/prepare_device.sh [OTHER_TREE]   # out/: invdiff, kernels_cuda, the diffusers wheels,
#                                            # and OTHER_TREE's binary as out/invdiff-next
# then run `scripts/device_check.sh` there with `out` carried. What travels must stay under 64 MiB:
# the tree ~21 MB, wheels 6.4 MB, and the binaries gzipped in out/bins.tar.gz (invdiff and
# kernels_cuda ~30 MB each unpacked, 14 MB together packed; ~42 MB in all on 2026-11-26).
#
# Results: $OUT (or /tmp/devcheck-out) holds at most 8 files (all the device tool brings back),
# rewritten after every phase so that a run cut short still returns what it measured:
#   summary.txt                  the compact summary, also printed at the end
#   devcheck.tar.gz              every log and JSON of the run (work folder /tmp/devcheck)
#   selftest.txt                 invdiff selftest
#   torch.json                   PyTorch: "bf16 matmul 8192^3 tflops", "<dtype> b<N> fwd|dps ms"
#   bench.jsonl                  our bench JSONs, one per line: {"name": ..., "result": {...}}
#   profile_bf16_b8_fwd.json, profile_bf16_b1_dps.json
#                                per-step profiles (invdiff bench --profile --json); read one by
#                                shape with `cargo bench --bench kernels_cuda -- --dry-run
#                                [--record --batch 1] --baseline FILE`
#   kernels_bf16_b8.json         the kernel benchmark's rows (only with out/kernels_cuda)
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-out/invdiff}
NEXT=${NEXT:-out/invdiff-next}
KBENCH=${KBENCH:-out/kernels_cuda}
RES=${OUT:-/tmp/devcheck-out}
W=${WORK:-/tmp/devcheck}
DEADLINE=${DEADLINE:-510}
STEPS=${STEPS:-20}
# scripts/prepare_device.sh packs the binaries (they are too large to travel as they are).
if [ -f out/bins.tar.gz ]; then
    tar -xzf out/bins.tar.gz -C out
fi
if [ ! -x "$BIN" ]; then
    echo "device_check: no $BIN; build it and copy it there first (see the header of this script)" >&2
    exit 2
fi
rm -rf "$W" && mkdir -p "$W" "$RES"
summary=()

# Files under $RES, rewritten after each phase.
sync_out() {
    printf '%s\n' "${summary[@]}" > "$RES/summary.txt"
    tar -czf "$RES/devcheck.tar.gz" -C "$W" . 2>/dev/null
}
note() { summary+=("$1"); echo "== $1"; printf '%s\n' "${summary[@]}" > "$RES/summary.txt"; }
# run LIMIT LOG CMD...: CMD with a timeout of LIMIT seconds or what is left before the deadline
# (less a reserve for the summary), output appended to $W/LOG; 124 = timed out, 125 = skipped.
run() {
    local limit=$1 log=$2
    shift 2
    local t=$((DEADLINE - SECONDS - 15))
    ((t > limit)) && t=$limit
    if ((t < 10)); then
        echo "skipped (deadline): $*" >> "$W/$log"
        return 125
    fi
    echo "\$ $* [timeout ${t}s, at ${SECONDS}s]" >> "$W/$log"
    timeout -k 5 "$t" "$@" >> "$W/$log" 2>&1
}
py() { python3 - "$@"; }
# want PHASE: whether PHASES (default every phase, "a,b,c,d,t,n,v,k,e,s") names it.
want() { [[ ",${PHASES:-a,b,c,d,t,n,v,k,e,s}," == *",$1,"* ]]; }

# One-line readings of the JSON files (python3 is there for PyTorch anyway).
torch_line() {
    py "$1" <<'PY' 2>&1
import json, sys
r = json.load(open(sys.argv[1]))
print("; ".join(f"{k} {v:.1f}" for k, v in r.items()))
PY
}
peak_of() {
    py "$1" <<'PY' 2>/dev/null
import json, sys
print(round(json.load(open(sys.argv[1]))["bf16 matmul 8192^3 tflops"], 1))
PY
}
jsonl_line() { # jsonl_line NAME FILE
    py "$1" "$2" <<'PY'
import json, sys
print(json.dumps({"name": sys.argv[1], "result": json.load(open(sys.argv[2]))}))
PY
}
brief() { # one line from a bench JSON
    py "$1" <<'PY' 2>&1
import json, sys
r = json.load(open(sys.argv[1]))
out = []
for k, pre, name in (("ms_per_forward", "", "fwd"), ("ms_per_dps_step", "dps_", "dps")):
    if k in r:
        f = r.get(pre + "fraction_of_peak")
        out.append(f"{name} {r[k]:.2f} ms, {r[pre + 'images_per_s']:.1f} img/s, "
                   f"{r[pre + 'tflops_per_s']:.1f} TFLOP/s" + (f", {100 * f:.1f}% of peak" if f else ""))
print("; ".join(out))
PY
}
profile_line() {
    py "$1" <<'PY' 2>&1
import json, sys
r = json.load(open(sys.argv[1]))
for key in ("profile_forward", "profile_dps"):
    p = r.get(key)
    if not p:
        continue
    graph = p["graph_forward_ms"] + (p["graph_backward_ms"] or 0)
    steps = sum(s["ms"] for s in p["steps"])
    kinds = sorted(p["by_kind"], key=lambda g: -g["ms"])[:6]
    print(f"graph {graph:.2f} ms, sum of steps {steps:.2f} ms, late chunks {p['late_chunks']}; "
          + ", ".join(f"{g['kind']} {g['ms']:.2f} ({100 * g['ms'] / steps:.0f}%)" for g in kinds))
PY
}
compare_kinds() { # compare_kinds A.json B.json: ms by kind, this build against the next
    py "$1" "$2" <<'PY' 2>&1
import json, sys
def kinds(path):
    r = json.load(open(path))
    p = r.get("profile_forward") or r.get("profile_dps")
    return {g["kind"]: g["ms"] for g in p["by_kind"]}
a, b = kinds(sys.argv[1]), kinds(sys.argv[2])
rows = sorted(a, key=lambda k: -a[k])[:8]
print("; ".join(f"{k} {a[k]:.2f} -> {b.get(k, float('nan')):.2f}" for k in rows))
PY
}

# Setup (~10 s).
python3 -m pip install -q --no-index --no-deps --target /tmp/site out/*.whl > "$W/setup.txt" 2>&1 \
    && export PYTHONPATH=/tmp/site
nvidia-smi >> "$W/setup.txt" 2>&1
# For --stalls: whether the driver keeps the performance counters to administrators, and the
# kernel (a sandboxed one may not expose them).
{ uname -r; grep -i profil /proc/driver/nvidia/params; id; } >> "$W/setup.txt" 2>&1
"$BIN" doctor >> "$W/setup.txt" 2>&1
note "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | head -n 1)"
note "binary: $(ls -l "$BIN" | awk '{print $5}') bytes; next: $([ -x "$NEXT" ] && echo yes || echo no); kernels_cuda: $([ -x "$KBENCH" ] && echo yes || echo no)"

# (a) Every kernel and the whole network against the CPU path (~50 s for 2738 rows at v0.8 on
# an H200, after a 6 s run of the TMA kernels' 858 rows).
selftest() { # selftest NAME BINARY [ARGS...]; sets selftest_rc
    local t0=$SECONDS
    run 300 "$1.txt" "$2" selftest --device cuda "${@:3}"
    selftest_rc=$?
    note "$1 (exit $selftest_rc, $((SECONDS - t0)) s): $(tail -n 1 "$W/$1.txt")"
    while read -r l; do note "  $l"; done < <(grep FAILED "$W/$1.txt" | head -n 8 | cut -c 1-120)
}
# The TMA kernels (INVDIFF_WGMMA_TMA, a default since v0.6) in a run of their own first:
# a kernel that faults ends every check after it in its process. If they fail, the main run
# and every later phase leave them out (TMA_BROKEN). Without phase (a) nothing checks them
# first.
TMA_BROKEN=0
STRIDED_BROKEN=0
if want a; then
    selftest selftest_tma "$BIN" --only "tensor-core convolutions"
    if { [ "$selftest_rc" -ne 0 ] && [ "$selftest_rc" -ne 1 ]; } \
        || grep -qE '(TMA loads|stopped by an error).*FAILED' "$W/selftest_tma.txt"; then
        TMA_BROKEN=1
        note "TMA kernels failed their checks: left out of every later phase"
    fi
    if [ "$TMA_BROKEN" = 1 ]; then
        INVDIFF_WGMMA_TMA=0 selftest selftest "$BIN"
    else
        selftest selftest "$BIN"
        # The candidate TMA copies at input stride 2 (INVDIFF_TMA_STRIDED, stop 39): the same
        # group with those forms tried, in a run of its own (~6 s), so that a fault in them
        # leaves the stride-1 TMA kernels' verdict above alone; if they fail, the variants
        # run without that switch (STRIDED_BROKEN).
        INVDIFF_TMA_STRIDED=1 selftest selftest_tma_strided "$BIN" --only "tensor-core convolutions"
        if { [ "$selftest_rc" -ne 0 ] && [ "$selftest_rc" -ne 1 ]; } \
            || grep -qE '(TMA loads|stopped by an error).*FAILED' "$W/selftest_tma_strided.txt"; then
            STRIDED_BROKEN=1
            note "stride-2 TMA forms failed their checks: INVDIFF_TMA_STRIDED=1 left out of every variant"
        fi
    fi
    cp "$W/selftest.txt" "$RES/selftest.txt"
    sync_out
fi
if [ "$TMA_BROKEN" = 1 ]; then
    export INVDIFF_WGMMA_TMA=0
fi

# (b) PyTorch on the same card (~45 s): its matmul peak first, results saved after each case.
PEAK_ARG=()
if want b; then
    t0=$SECONDS
    run 200 torch.txt python3 scripts/torch_baseline.py --save-model /tmp/m --dump-io /tmp/io --matmul-peak \
        --cases fp32:1:dps bf16:1:dps bf16:8 bf16:32 --reps 20 --json "$W/torch.json"
    rc=$?
    cp "$W/torch.json" "$RES/torch.json" 2>/dev/null
    line="no result (see torch.txt)"
    [ -s "$W/torch.json" ] && line=$(torch_line "$W/torch.json")
    note "torch (exit $rc, $((SECONDS - t0)) s): $line"
    PEAK=$(peak_of "$W/torch.json")
    [ -n "$PEAK" ] && PEAK_ARG=(--peak-tflops "$PEAK")
    note "peak passed to our bench: ${PEAK:-none, so the figure built into invdiff if it knows the card}"
    sync_out
fi

# (c) Our timings, device-resident, CUDA events (~35 s).
bench() { # bench NAME BINARY ARGS...
    local name=$1 bin=$2 t0=$SECONDS
    shift 2
    run 120 bench.txt "$bin" bench --device cuda --steps "$STEPS" ${PEAK_ARG[@]+"${PEAK_ARG[@]}"} \
        --json "$W/bench_$name.json" "$@"
    local rc=$?
    if [ -s "$W/bench_$name.json" ]; then
        jsonl_line "$name" "$W/bench_$name.json" >> "$RES/bench.jsonl"
        local line
        line=$(brief "$W/bench_$name.json")
        note "ours $name (exit $rc, $((SECONDS - t0)) s): $line"
    else
        note "ours $name: exit $rc, no result (see bench.txt)"
    fi
}
if want c; then
    bench fp32_b1 "$BIN" --precision fp32 --batch 1 --what both
    bench fp32_b8 "$BIN" --precision fp32 --batch 8 --what forward
    bench bf16_b1 "$BIN" --precision bf16 --batch 1 --what both
    bench bf16_b8 "$BIN" --precision bf16 --batch 8 --what forward
    bench bf16_b32 "$BIN" --precision bf16 --batch 32 --what forward
    bench bf16_b8_batch_invariant "$BIN" --precision bf16 --batch 8 --what forward --batch-invariant
    sync_out
fi

# (d) Where the time goes: every step timed (~25 s).
profile() { # profile NAME BINARY ARGS...
    local name=$1 bin=$2 t0=$SECONDS
    shift 2
    run 150 "profile_$name.txt" "$bin" bench --device cuda --precision bf16 --steps "$STEPS" --profile \
        ${PEAK_ARG[@]+"${PEAK_ARG[@]}"} --json "$W/profile_$name.json" "$@"
    local rc=$?
    local line="no result (see profile_$name.txt)"
    [ -s "$W/profile_$name.json" ] && line=$(profile_line "$W/profile_$name.json")
    note "profile $name (exit $rc, $((SECONDS - t0)) s): $line"
}
if want d; then
    profile bf16_b8_fwd "$BIN" --batch 8 --what forward
    profile bf16_b1_dps "$BIN" --batch 1 --what dps
    for f in profile_bf16_b8_fwd.json profile_bf16_b1_dps.json; do
        cp "$W/$f" "$RES/$f" 2>/dev/null
    done
    sync_out
fi

# CUPTI_LIB: the folder holding CUPTI (and the perf libraries its PC sampling loads), out/lib
# (scripts/prepare_device.sh; the perf libraries unpacked from nvperf.tar.xz), else PyTorch's
# packages; looked for once.
CUPTI_LIB=
cupti_lib() {
    [ -n "$CUPTI_LIB" ] && return
    CUPTI_LIB=$PWD/out/lib
    if [ -f "$CUPTI_LIB/nvperf.tar.xz" ] && [ ! -e "$CUPTI_LIB/libnvperf_host.so" ]; then
        py "$CUPTI_LIB" <<'PY' || note "CUPTI: could not unpack out/lib/nvperf.tar.xz"
import sys, tarfile
with tarfile.open(sys.argv[1] + "/nvperf.tar.xz") as t:
    t.extractall(sys.argv[1])
PY
    fi
    if [ ! -e "$CUPTI_LIB/libcupti.so.13" ] || [ ! -e "$CUPTI_LIB/libnvperf_host.so" ]; then
        CUPTI_LIB=$(find / -xdev \( -path /proc -prune \) -o -name libcupti.so.13 -print -quit 2>/dev/null)
        CUPTI_LIB=${CUPTI_LIB%/*}
        note "CUPTI: no out/lib/libcupti.so.13 with libnvperf_host.so; using ${CUPTI_LIB:-none found}"
    fi
}

# (t) Kernel timelines of the graph replays (~20 s).
trace() { # trace NAME ARGS...
    local name=$1 t0=$SECONDS
    shift
    cupti_lib
    LD_LIBRARY_PATH="$CUPTI_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" run 90 "trace_$name.txt" "$BIN" \
        bench --device cuda --precision bf16 --steps "$STEPS" --trace "$W/trace_$name.json" "$@"
    local rc=$?
    note "trace $name (exit $rc, $((SECONDS - t0)) s): $(grep -E '^trace \(|^  [a-z].*: [0-9]+ kernels|rror' "$W/trace_$name.txt" | tr -s ' ' | paste -sd '|' -)"
}
if want t; then
    trace bf16_b1 --batch 1 --what both
    trace bf16_b8_fwd --batch 8 --what forward
    sync_out
fi

# (n) A second build, when there is one (~100 s).
if want n && [ -x "$NEXT" ]; then
    selftest next_selftest "$NEXT"
    sync_out
    bench next_bf16_b1 "$NEXT" --precision bf16 --batch 1 --what both
    bench next_bf16_b8 "$NEXT" --precision bf16 --batch 8 --what forward
    bench next_bf16_b32 "$NEXT" --precision bf16 --batch 32 --what forward
    profile next_bf16_b8_fwd "$NEXT" --batch 8 --what forward
    profile next_bf16_b1_dps "$NEXT" --batch 1 --what dps
    for p in bf16_b8_fwd bf16_b1_dps; do
        if [ -s "$W/profile_$p.json" ] && [ -s "$W/profile_next_$p.json" ]; then
            line=$(compare_kinds "$W/profile_$p.json" "$W/profile_next_$p.json")
            note "by kind, ms, this -> next, $p: $line"
        fi
    done
    sync_out
fi

# The weights PyTorch saved in (b), for the restorations (random weights either way).
MODEL_ARG=()
[ -f /tmp/m/config.json ] && MODEL_ARG=(--model /tmp/m)

# A whole 1000-step DPS restoration in bf16 on the real sample (issue 6 asks <= 6 s; ~15 s), by
# BINARY, on the weights phase (b) saved: restore1000 NAME BINARY (NAME empty for the defaults).
restore1000() {
    local tag=${1:+_$1} label=${1:+, $1}
    if [ ${#MODEL_ARG[@]} -eq 0 ]; then
        note "restore: 1000 DPS steps, bf16$label: skipped (phase b saves the weights it runs on)"
        return
    fi
    run 90 "restore1000$tag.txt" "$2" restore "${MODEL_ARG[@]}" --method dps \
        --measurement tests/data/ffhq-deblur/0.safetensors --steps 1000 --seed 3 --precision bf16 \
        --output "/tmp/restore1000$tag.png" --report "$W/restore1000$tag.json" --device cuda
    note "restore: 1000 DPS steps, bf16$label (exit $?): $(grep -E 'image\(s\) in|rror' "$W/restore1000$tag.txt" | tail -n 1)"
}

# (v) Run-time variants of the newest build (~10 s each, ~40 s for the last).
VBIN=$BIN
[ -x "$NEXT" ] && VBIN=$NEXT
# The v0.4 program (every later default off: what the defaults gain, in this run), the v0.5
# one (v0.6's to v0.11's changes undone), the v0.6 one (v0.7's to v0.11's undone), the v0.7 one
# (v0.8's to v0.11's undone), the v0.8 one (v0.9's to v0.11's undone), the v0.9 one (v0.10's
# and v0.11's undone), the v0.10 one (v0.11's undone), every candidate on (ALL), then each entry of scripts/candidates.sh alone (the list tune.sh reads too: the candidates, each default turned
# off, the stream count).
# (V04 spells out every default: src/switches.rs's test reads that line for each.)
V11_OFF=INVDIFF_CLASS_CONCURRENCY=0,INVDIFF_GEMM_WARP_K=0,INVDIFF_CONCAT_SUMS_AHEAD=0
V10_OFF=$V11_OFF,INVDIFF_GN_ADD_RESIDUAL=0,INVDIFF_GN_HALF_DY=0
V09_OFF=$V10_OFF,INVDIFF_CONCAT_FROM_PRODUCERS=0,INVDIFF_EPI_HALF_COPIES=0
V08_OFF=$V09_OFF,INVDIFF_STAGED_UNSPLIT=0,INVDIFF_EPI_STAGED=0,INVDIFF_SHORTCUT_FUSED=0,INVDIFF_CONCAT_GRAD_SPLIT=0,INVDIFF_GN_HALF_INPUT_RECORDING=0
V04=INVDIFF_GN_ONE_PASS=0,INVDIFF_HALF_CONCAT=0,INVDIFF_HALF_COPY=0,INVDIFF_ALIAS_GRADS=0,INVDIFF_ROW_EPILOGUE=0,INVDIFF_ATTN_TF32=0,INVDIFF_WGMMA_TALL=0,INVDIFF_GEMM_SMALL_TILES=0,INVDIFF_UPSAMPLE_FOLD=0,INVDIFF_STREAMS=1,INVDIFF_GN_ILP=0,INVDIFF_WGMMA_LEAN=0,INVDIFF_WGMMA_TMA=0,INVDIFF_HALF_COPY_SMALL=0,INVDIFF_EPI_PREFETCH=0,INVDIFF_GN_PRODUCER_SUMS=0,INVDIFF_GN_HALF_INPUT=0,INVDIFF_HALF_COPY_FUSED=0,INVDIFF_STAGED_UNSPLIT=0,INVDIFF_EPI_STAGED=0,INVDIFF_SHORTCUT_FUSED=0,INVDIFF_CONCAT_GRAD_SPLIT=0,INVDIFF_GN_HALF_INPUT_RECORDING=0,INVDIFF_CONCAT_FROM_PRODUCERS=0,INVDIFF_EPI_HALF_COPIES=0,INVDIFF_GN_ADD_RESIDUAL=0,INVDIFF_GN_HALF_DY=0,INVDIFF_CLASS_CONCURRENCY=0,INVDIFF_GEMM_WARP_K=0,INVDIFF_CONCAT_SUMS_AHEAD=0
V05=INVDIFF_GN_ILP=0,INVDIFF_WGMMA_LEAN=0,INVDIFF_WGMMA_TMA=0,INVDIFF_HALF_COPY_SMALL=0,INVDIFF_EPI_PREFETCH=0,INVDIFF_ATTN_TF32=1,INVDIFF_GN_PRODUCER_SUMS=0,INVDIFF_GN_HALF_INPUT=0,INVDIFF_HALF_COPY_FUSED=0,$V08_OFF
V06=INVDIFF_GN_PRODUCER_SUMS=0,INVDIFF_GN_HALF_INPUT=0,INVDIFF_HALF_COPY_FUSED=0,$V08_OFF
V07=$V08_OFF
V08=$V09_OFF
V09=$V10_OFF
V10=$V11_OFF
ALL=INVDIFF_ATTN_FLASH=1,INVDIFF_ATTN_ROWS=1,INVDIFF_ATTN_TF32=1,INVDIFF_GN_HALF_DY=1,INVDIFF_GN_FROM_REDUCTION=1,INVDIFF_NARROW_MMA=1,INVDIFF_FEW_IN_MMA=1,INVDIFF_TMA_STRIDED=1,INVDIFF_GN_BWD_SUMS_PAIRS=1,INVDIFF_CLASS_HALF_COPIES=1,INVDIFF_REDUCE_HALF_COPIES=1,INVDIFF_APPROX_SILU=1
# shellcheck source=scripts/candidates.sh
. scripts/candidates.sh
VARIANTS=${VARIANTS-v04:$V04;v05:$V05;v06:$V06;v07:$V07;v08:$V08;v09:$V09;v10:$V10;all:$ALL;$(IFS=';'; echo "${CANDIDATES[*]}")}
variants=()
want v && IFS=';' read -r -a variants <<< "$VARIANTS"
# The variant that also gets the whole selftest, the b1 DPS profile and the 1000-step
# restoration: `all` where there is one, else the last.
full=""
for v in ${variants[@]+"${variants[@]}"}; do
    full=${v%%:*}
    [ "$full" = all ] && break
done
ran_full=""
for v in ${variants[@]+"${variants[@]}"}; do
    name=${v%%:*}
    vars=${v#*:}
    if [ "$STRIDED_BROKEN" = 1 ]; then
        vars=$(echo "$vars" | sed -e 's/INVDIFF_TMA_STRIDED=1//' -e 's/,,/,/' -e 's/^,//' -e 's/,$//')
        if [ -z "$vars" ]; then
            note "variant $name: skipped (the stride-2 TMA forms failed their checks)"
            continue
        fi
    fi
    wrapper="$W/variant_$name"
    printf '#!/bin/sh\nexec env %s "%s" "$@"\n' "${vars//,/ }" "$(realpath "$VBIN")" > "$wrapper"
    chmod +x "$wrapper"
    note "variant $name: ${vars//,/ } on $VBIN"
    # The kernel rows are the same in every run; what a variant changes is the whole-network
    # rows: all of them for $full (all together) unless VARIANT_SELFTEST=each, the network
    # groups alone for the v0.4 program (and for $full with VARIANT_SELFTEST=networks).
    if [ "${VARIANT_SELFTEST:-full}" = each ] \
        || { [ "$name" = "$full" ] && [ "${VARIANT_SELFTEST:-full}" != networks ]; }; then
        selftest "selftest_$name" "$wrapper"
    elif [ "$name" = v04 ] || [ "$name" = "$full" ]; then
        selftest "selftest_$name" "$wrapper" --only networks
    fi
    bench "${name}_bf16_b1" "$wrapper" --precision bf16 --batch 1 --what both
    bench "${name}_bf16_b8" "$wrapper" --precision bf16 --batch 8 --what forward
    bench "${name}_bf16_b32" "$wrapper" --precision bf16 --batch 32 --what forward
    # The fold in fp32 too (the default precision; off there by default), beside fp32_b1 of
    # phase (c).
    if [ "$name" = fold_all ]; then
        bench "${name}_fp32_b1" "$wrapper" --precision fp32 --batch 1 --what both
    fi
    sync_out
    [ "$name" = "$full" ] && ran_full=$name
done
if [ ${#variants[@]} -gt 0 ]; then
    # One table: each variant's bf16 figures against the same binary's defaults (this run).
    base=bf16
    [ "$VBIN" = "$NEXT" ] && base=next_bf16
    py "$W" "$base" "${variants[@]}" <<'PY' > "$W/variants.txt" 2>&1
import json, os, sys
w, base_name, names = sys.argv[1], sys.argv[2], [v.split(":", 1)[0] for v in sys.argv[3:]]
def fig(name, key):
    try:
        return json.load(open(os.path.join(w, f"bench_{name}.json")))[key]
    except (OSError, KeyError, ValueError):
        return None
cols = [("b1", "ms_per_forward", "fwd b1"), ("b1", "ms_per_dps_step", "dps b1"),
        ("b8", "ms_per_forward", "fwd b8"), ("b32", "ms_per_forward", "fwd b32")]
for v in names:
    cells, changes = [], []
    for b, key, label in cols:
        base, new = fig(f"{base_name}_{b}", key), fig(f"{v}_bf16_{b}", key)
        if base and new:
            changes.append(new / base - 1)
            cells.append(f"{label} {base:.2f} -> {new:.2f} ms ({100 * changes[-1]:+.1f}%)")
    # A first reading for the defaults (1% is about the run-to-run spread of these rows);
    # the selftest rows decide whether a switch may be flipped at all.
    verdict = ""
    if changes:
        faster, slower = min(changes) < -0.01, max(changes) > 0.01
        verdict = {(True, False): "faster", (False, True): "slower", (True, True): "mixed",
                   (False, False): "within 1%"}[(faster, slower)]
    launches = [fig(f"{v}_bf16_b1", k) for k in ("launches_per_forward", "launches_per_dps_step")]
    count = f"; b1 launches {launches[0]} / {launches[1]}" if None not in launches else ""
    # A variant timed in fp32 too (the fold), against fp32_b1 of phase (c).
    for key, label in (("ms_per_forward", "fp32 fwd b1"), ("ms_per_dps_step", "fp32 dps b1")):
        base, new = fig("fp32_b1", key), fig(f"{v}_fp32_b1", key)
        if base and new:
            cells.append(f"{label} {base:.2f} -> {new:.2f} ms ({100 * (new / base - 1):+.1f}%)")
    print(f"{v}: " + ("; ".join(cells) or "no figures") + count + (f" [{verdict}]" if verdict else ""))
PY
    while read -r l; do note "  $l"; done < "$W/variants.txt"
fi
if [ -n "$ran_full" ]; then
    profile "${ran_full}_bf16_b1_dps" "$W/variant_$ran_full" --batch 1 --what dps
    if [ -s "$W/profile_bf16_b1_dps.json" ] && [ -s "$W/profile_${ran_full}_bf16_b1_dps.json" ]; then
        note "by kind, ms, default -> $ran_full, bf16_b1_dps: $(compare_kinds "$W/profile_bf16_b1_dps.json" "$W/profile_${ran_full}_bf16_b1_dps.json")"
    fi
    restore1000 "$ran_full" "$W/variant_$ran_full"
    sync_out
fi

# (k) The kernel benchmark by shape, when its binary came along (~15 s).
if want k && [ -x "$KBENCH" ]; then
    t0=$SECONDS
    run 90 kernels.txt "$KBENCH" --batch 8 --precision bf16 --iters "$STEPS" ${PEAK_ARG[@]+"${PEAK_ARG[@]}"} \
        --save "$W/kernels_bf16_b8.json"
    note "kernels_cuda bf16 b8 (exit $?, $((SECONDS - t0)) s): $(grep -m 1 -E '^(graph replay|direct launches)' "$W/kernels.txt" | cut -c 1-160)"
    cp "$W/kernels_bf16_b8.json" "$RES/" 2>/dev/null
    sync_out
    # The GroupNorms alone first (seconds; a backward pass's three launches also one at a
    # time), so that a cut-short convolution sweep loses none of them.
    t0=$SECONDS
    run 60 sweep_norms_bf16_b1record.txt "$KBENCH" --sweep --norms-only --batch 1 --record --precision bf16 \
        --iters 10 --save "$W/sweep_norms_bf16_b1record.json"
    note "kernels_cuda --sweep --norms-only --batch 1 --record (exit $?, $((SECONDS - t0)) s): $(grep -m 1 -E '^(GroupNorms per call|kernels_cuda: )' "$W/sweep_norms_bf16_b1record.txt" | cut -c 1-160)"
    sync_out
    # The convolution sweeps take minutes (171 s at batch 1 at stop 27, when the limit was
    # 180 s): SWEEPS=norms leaves them out, so that phase (e) after this one still fits the
    # deadline.
    for args in "--batch 8" "--batch 1 --record"; do
        [ "${SWEEPS:-all}" = norms ] && break
        t0=$SECONDS
        name="sweep_bf16_$(echo "$args" | tr -d ' -' | sed 's/batch/b/')"
        # shellcheck disable=SC2086
        run 240 "$name.txt" "$KBENCH" --sweep $args --precision bf16 --iters 10 --save "$W/$name.json"
        note "kernels_cuda --sweep $args (exit $?, $((SECONDS - t0)) s): $(grep -m 1 -E '^(tensor-core launches|kernels_cuda: )' "$W/$name.txt" | cut -c 1-160)"
        sync_out
    done
fi

# (e) Full size against diffusers on the same weights (strict fp32), ten steps of DPS and two of
# PiGDM on a real sample, GPU against CPU with the same seed (~45 s).
if want e; then
    if [ -f /tmp/io/in.safetensors ] && [ -f /tmp/io/expect.safetensors ]; then
        run 120 parity.txt "$BIN" eps --model /tmp/m --input /tmp/io/in.safetensors \
            --output /tmp/io/ours.safetensors --device cuda
        run 60 parity_compare.txt "$BIN" compare /tmp/io/ours.safetensors /tmp/io/expect.safetensors --tolerance 1e-5
        note "full-size parity vs diffusers (exit $?): $(grep -v '^\$' "$W/parity_compare.txt" | tr '\n' ';')"
        # The fold moves fp32 results by rounding; this row decides whether it may be on there.
        INVDIFF_UPSAMPLE_FOLD=1 run 120 parity_fold.txt "$BIN" eps --model /tmp/m \
            --input /tmp/io/in.safetensors --output /tmp/io/ours_fold.safetensors --device cuda
        run 60 parity_fold_compare.txt "$BIN" compare /tmp/io/ours_fold.safetensors /tmp/io/expect.safetensors --tolerance 1e-5
        note "full-size parity vs diffusers, fold on in fp32 (exit $?): $(grep -v '^\$' "$W/parity_fold_compare.txt" | tr '\n' ';')"
    else
        note "full-size parity vs diffusers: skipped (the PyTorch phase wrote no reference)"
    fi
    restore1000 "" "$BIN"
    if [ ${#MODEL_ARG[@]} -eq 0 ]; then
        note "trajectories GPU vs CPU: skipped (phase b saves the weights they run on)"
    else
        # ΠGDM over 2 steps: on random weights its update amplifies rounding chaotically, so 10
        # steps drift apart (6.6e-2 on the v0.4 H200, as PyTorch's own f32 and f64 runs do) while
        # each step agrees to ~1e-6 (PERF.md).
        for m in dps pigdm; do
            steps=10
            [ $m = pigdm ] && steps=2
            for d in cuda cpu; do
                run 150 "traj_${m}_$d.txt" "$BIN" restore "${MODEL_ARG[@]}" --method $m \
                    --measurement tests/data/ffhq-deblur/0.safetensors --steps $steps --seed 3 \
                    --output "/tmp/traj_${m}_$d.safetensors" --device $d
            done
            run 60 "traj_$m.txt" "$BIN" compare "/tmp/traj_${m}_cuda.safetensors" "/tmp/traj_${m}_cpu.safetensors" --tolerance 1e-4
            note "trajectory $m GPU vs CPU (exit $?): $(grep -v '^\$' "$W/traj_$m.txt" | head -n 2 | tr '\n' ';')"
        done
    fi
fi

# (s) What each step's warps wait on, from CUPTI's PC sampling (bench --stalls; each step
# launched and sampled on its own: 717 ranges for the b1 DPS step, 207 for b8; not yet run on
# a GPU, so its time is a guess, 20-100 s). Last, in the time the deadline leaves. The summary
# takes the kinds' lines; the JSON (every step's states and hottest instructions, every
# kernel's sampled SASS offsets) is in devcheck.tar.gz.
# Sampling stops starting steps 25 s before the command's limit, so that what it sampled is
# written; the second call is skipped when CUPTI refused the first.
stalls() { # stalls NAME LIMIT PERIOD ARGS...
    local name=$1 limit=$2 period=$3 t0=$SECONDS left
    shift 3
    left=$((DEADLINE - SECONDS - 15))
    ((left < limit)) && limit=$left
    cupti_lib
    LD_LIBRARY_PATH="$CUPTI_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" run "$limit" "stalls_$name.txt" "$BIN" \
        bench --device cuda --precision bf16 --steps 1 --stall-period "$period" \
        --stall-seconds $((limit > 35 ? limit - 25 : 10)) --stalls "$W/stalls_$name.json" "$@"
    local rc=$?
    note "stalls $name (exit $rc, $((SECONDS - t0)) s): $(grep -E '^stalls \([a-z]+, CUPTI|^  CUPTI counted|^  [a-z0-9].*%  |rror' "$W/stalls_$name.txt" | head -16 | tr -s ' ' | paste -sd '|' -) | last progress: $(grep -E '^stalls \([a-z]+\): [0-9]+/' "$W/stalls_$name.txt" | tail -n 1)"
}
if want s; then
    stalls bf16_b1_dps 90 10 --batch 1 --what dps
    sync_out
    if grep -q 'CUPTI' "$W/stalls_bf16_b1_dps.txt" && ! grep -q '^stalls: wrote' "$W/stalls_bf16_b1_dps.txt"; then
        note "stalls bf16_b8_fwd: skipped (the first call did not finish; see above)"
    else
        stalls bf16_b8_fwd 45 12 --batch 8 --what forward
    fi
    sync_out
fi

note "done in ${SECONDS} s"
sync_out
echo
echo "==================== summary"
printf '%s\n' "${summary[@]}"
