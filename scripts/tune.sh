#!/usr/bin/env bash
# Picks, on this GPU, the switches of scripts/candidates.sh (defaults turned off, the stream
# count, the candidates off by default; PERF.md, v0.8) that make invdiff faster for one
# workload, and writes them as `export` lines:
#
#   scripts/tune.sh [--batch N] [--precision bf16] [--what dps|forward] [--out tuning.env]
#   source tuning.env        # then bench, sample and restore run with them
#
# The default program must pass the whole-network selftest on this card (`invdiff selftest
# --only networks`: the network against the CPU path, within the stated tolerances), and so
# must every candidate set before it is timed. Every timing is the median of REPEATS
# `invdiff bench` calls (default 3), with no other candidate switch set, whatever the shell
# has exported. The search is greedy: the candidates that beat the default by more than MARGIN
# (default 2%) are added one at a time, largest gain first, each kept only if the set with it
# passes the selftest and is faster again by MARGIN. With no winner the file sets nothing.
# INVDIFF_BIN names the binary (default target/release/invdiff of this checkout). About 20 s a
# candidate on a Hopper card (a selftest and three bench calls): ~12 minutes for the 36 entries
# of scripts/candidates.sh, then the greedy search.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

batch=1 precision=bf16 what=dps out=tuning.env
need_value() { [ $# -ge 2 ] || { echo "tune.sh: $1 needs a value (see --help)" >&2 && exit 2; }; }
while [ $# -gt 0 ]; do
    case $1 in
    --batch) need_value "$@" && batch=$2 && shift ;;
    --precision) need_value "$@" && precision=$2 && shift ;;
    --what) need_value "$@" && what=$2 && shift ;;
    --out) need_value "$@" && out=$2 && shift ;;
    -h | --help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { print substr($0, 3) }' "$root/scripts/tune.sh" && exit 0 ;;
    *) echo "tune.sh: unknown argument '$1' (see --help)" >&2 && exit 2 ;;
    esac
    shift
done
case $what in
dps) field=ms_per_dps_step ;;
forward) field=ms_per_forward ;;
*) echo "tune.sh: --what must be dps or forward, not '$what'" >&2 && exit 2 ;;
esac
BIN=${INVDIFF_BIN:-$root/target/release/invdiff}
REPEATS=${REPEATS:-3}
MARGIN=${MARGIN:-0.02}
[[ $REPEATS =~ ^[1-9][0-9]*$ ]] || { echo "tune.sh: REPEATS must be a positive count, not '$REPEATS'" >&2 && exit 2; }
if [ ! -x "$BIN" ]; then
    echo "tune.sh: $BIN not found; build it first (scripts/bench.sh does)" >&2
    exit 2
fi
# Fail now, not after the search, if the result cannot be written.
: >> "$out" || { echo "tune.sh: cannot write $out" >&2 && exit 2; }
# shellcheck source=scripts/candidates.sh
. "$root/scripts/candidates.sh"
# Every candidate variable unset for each run, so that the default is the default.
unset_all=()
for c in "${CANDIDATES[@]}"; do
    vars=${c#*:}
    for kv in ${vars//,/ }; do unset_all+=(-u "${kv%%=*}"); done
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# run VARS CMD...: the binary with only the comma-separated VAR=value list set among the
# candidates' variables, reading nothing from this script's input.
run() {
    local vars=$1
    shift
    # shellcheck disable=SC2046
    env "${unset_all[@]}" $(tr ',' ' ' <<< "$vars") "$BIN" "$@" < /dev/null
}
# ms VARS: the median over REPEATS bench calls (the lower middle one for an even count).
ms() {
    local i t times=()
    for ((i = 0; i < REPEATS; i++)); do
        rm -f "$work/bench.json"
        if ! run "$1" bench --device cuda --precision "$precision" --batch "$batch" \
            --what "$what" --json "$work/bench.json" > "$work/bench.txt" 2>&1; then
            echo "tune.sh: bench failed with '${1:-the defaults}':" >&2
            cat "$work/bench.txt" >&2
            exit 1
        fi
        t=$(grep -o "\"$field\": *[0-9.eE+-]*" "$work/bench.json" 2> /dev/null | sed 's/.*: *//' || true)
        if [ -z "$t" ]; then
            echo "tune.sh: the bench wrote no \"$field\" (with '${1:-the defaults}'); see $BIN bench --help" >&2
            exit 1
        fi
        times+=("$t")
    done
    printf '%s\n' "${times[@]}" | sort -g | sed -n "$(((REPEATS + 1) / 2))p"
}
# passes VARS: the whole-network selftest with VARS set succeeds on this card.
passes() { run "$1" selftest --device cuda --only networks > "$work/selftest.txt" 2>&1; }
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
if ! passes ""; then
    echo "tune.sh: the default program fails its selftest on this card; nothing to tune:" >&2
    tail -n 5 "$work/selftest.txt" >&2
    exit 1
fi
base=$(ms "")
device=$(grep -o '"device": *"[^"]*"' "$work/bench.json" | sed 's/.*: *"//; s/"$//' || true)
echo "  default: $base ms${device:+ on $device}"
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
    # Nothing new (an entry whose every switch the set already has): no call to spend.
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
    echo "# scripts/tune.sh on $(date -u +%Y-%m-%d)${device:+, $device}: $what, batch $batch," \
        "$precision; default $base ms, these $best ms (median of $REPEATS, margin $MARGIN)"
    # Sourcing the file also clears what an earlier one set.
    printf '%s\n' "${unset_all[@]}" | grep -v '^-u$' | sort -u | paste -sd ' ' - | sed 's/^/unset /'
    tr ',' '\n' <<< "$chosen" | sed '/^$/d; s/^/export /'
} > "$out"
echo "tune.sh: $best ms against the default's $base ms; wrote $out"
