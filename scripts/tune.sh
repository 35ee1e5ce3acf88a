#!/usr/bin/env bash
# Picks, on this GPU, the candidate switches (PERF.md, "v0.5 candidates"; scripts/candidates.sh)
# that make invdiff faster for one workload, and writes them as `export` lines:
#
#   scripts/tune.sh [--batch N] [--precision bf16] [--what dps|forward] [--out tuning.env]
#   source tuning.env        # then bench, sample and restore run with them
#
# Each candidate must first pass the whole-network selftest on this card (`invdiff selftest
# --only networks`: the network against the CPU path, within the stated tolerances); only then
# is it timed. Every timing is the median of REPEATS `invdiff bench` calls (default 3). The
# search is greedy: the candidates that beat the default by more than MARGIN (default 2%)
# are added one at a time, largest gain first, each kept only if the set with it passes the
# selftest and is faster again by MARGIN. The default program is the fallback: with no winner
# the file sets nothing. INVDIFF_BIN names the binary (default target/release/invdiff). About
# 20 s a candidate on a Hopper card (a selftest and three bench calls): ~8 minutes in all.
set -euo pipefail
cd "$(dirname "$0")/.."

batch=1 precision=bf16 what=dps out=tuning.env
while [ $# -gt 0 ]; do
    case $1 in
    --batch) batch=$2 && shift ;;
    --precision) precision=$2 && shift ;;
    --what) what=$2 && shift ;;
    --out) out=$2 && shift ;;
    -h | --help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { print substr($0, 3) }' "$0" && exit 0 ;;
    *) echo "tune.sh: unknown argument '$1' (see --help)" >&2 && exit 2 ;;
    esac
    shift
done
case $what in
dps) field=ms_per_dps_step ;;
forward) field=ms_per_forward ;;
*) echo "tune.sh: --what must be dps or forward, not '$what'" >&2 && exit 2 ;;
esac
BIN=${INVDIFF_BIN:-target/release/invdiff}
REPEATS=${REPEATS:-3}
MARGIN=${MARGIN:-0.02}
# shellcheck source=scripts/candidates.sh
. scripts/candidates.sh
if [ ! -x "$BIN" ]; then
    echo "tune.sh: $BIN not found; build it first (scripts/bench.sh does)" >&2
    exit 2
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# ms VARS: the median over REPEATS bench calls with the comma-separated VAR=value list set.
ms() {
    local i times=()
    for ((i = 0; i < REPEATS; i++)); do
        # shellcheck disable=SC2046
        env $(tr ',' ' ' <<< "$1") "$BIN" bench --device cuda --precision "$precision" \
            --batch "$batch" --what "$what" --json "$work/bench.json" > "$work/bench.txt" 2>&1 || {
            echo "tune.sh: bench failed with '$1':" >&2
            cat "$work/bench.txt" >&2
            exit 1
        }
        times+=("$(grep -o "\"$field\": *[0-9.eE+-]*" "$work/bench.json" | sed 's/.*: *//')")
    done
    printf '%s\n' "${times[@]}" | sort -g | sed -n "$(((REPEATS + 1) / 2))p"
}
# passes VARS: the whole-network selftest with VARS set succeeds on this card.
passes() {
    # shellcheck disable=SC2046
    env $(tr ',' ' ' <<< "$1") "$BIN" selftest --device cuda --only networks > "$work/selftest.txt" 2>&1
}
# merge SET VARS: SET with VARS added, a variable already in SET taking its new value.
merge() {
    local set=$1 kv
    for kv in ${2//,/ }; do
        set=$(tr ',' '\n' <<< "$set" | { grep -v "^${kv%%=*}=" || true; } | paste -sd , -)
        set=${set:+$set,}$kv
    done
    echo "$set"
}
# faster A B: A is below B by more than MARGIN of B.
faster() { awk -v a="$1" -v b="$2" -v m="$MARGIN" 'BEGIN { exit !(a < b * (1 - m)) }'; }

echo "tune.sh: $what, batch $batch, $precision, median of $REPEATS calls, margin $MARGIN"
base=$(ms "")
echo "  default: $base ms"
winners=()
for c in "${CANDIDATES[@]}"; do
    name=${c%%:*} vars=${c#*:}
    if ! passes "$vars"; then
        echo "  $name: selftest failed, left out ($(tail -n 1 "$work/selftest.txt"))"
        continue
    fi
    t=$(ms "$vars")
    if faster "$t" "$base"; then
        echo "  $name: $t ms, faster"
        winners+=("$t $vars")
    else
        echo "  $name: $t ms"
    fi
done

chosen="" best=$base
while read -r _ vars; do
    [ -n "$vars" ] || continue
    trial=$(merge "$chosen" "$vars")
    # Nothing new (PDL alone after PDL with the prefetch was kept): no call to spend.
    [ "$(tr ',' '\n' <<< "$trial" | sort)" != "$(tr ',' '\n' <<< "$chosen" | sort)" ] || continue
    if passes "$trial"; then
        t=$(ms "$trial")
        if faster "$t" "$best"; then
            chosen=$trial best=$t
            echo "  + $vars: $t ms, kept"
            continue
        fi
        echo "  + $vars: $t ms, dropped"
    else
        echo "  + $vars: selftest failed with the others, dropped"
    fi
done < <(printf '%s\n' "${winners[@]+"${winners[@]}"}" | sort -g)

{
    echo "# scripts/tune.sh on $(date -u +%Y-%m-%d): $what, batch $batch, $precision;" \
        "default $base ms, these $best ms"
    tr ',' '\n' <<< "$chosen" | sed '/^$/d; s/^/export /'
} > "$out"
echo "tune.sh: $best ms against the default's $base ms; wrote $out"
