#!/usr/bin/env python3
"""One kernel's SASS with the PC samples `invdiff bench --stalls FILE` took at each instruction.

    stall_sass.py STALLS_JSON PASS KERNEL SASS_TXT [--min PCT] [--crc CRC]

STALLS_JSON is bench's file, PASS `forward` or `dps`, KERNEL the kernel's name as the JSON
gives it (or a part that names one kernel), SASS_TXT the kernel's disassembly from the same
build, e.g.

    cuobjdump -sass -fun KERNEL target/release/build/invdiff-*/out/norm.fatbin > k.sass

(cuobjdump is in PyPI's nvidia-cuda-cuobjdump). Each instruction line of the SASS gets its
samples, its share of the kernel's and its states; `--min PCT` prints only the instructions
with at least that share (default 0: all of them). Two modules may hold kernels of one name
(norm and norm_approx): the JSON tells them apart by `cubin_crc`, which `--crc` picks.
"""
import argparse
import json
import re
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("stalls")
    ap.add_argument("pass_", metavar="PASS")
    ap.add_argument("kernel")
    ap.add_argument("sass")
    ap.add_argument("--min", type=float, default=0.0, metavar="PCT")
    ap.add_argument("--crc", type=int, help="the kernel's module, as the JSON's cubin_crc")
    a = ap.parse_args()

    report = json.load(open(a.stalls))
    if a.pass_ not in report:
        sys.exit(f"{a.stalls} has passes {sorted(report)}, not {a.pass_}")
    r = report[a.pass_]
    found = [k for k in r["kernels"] if k["kernel"] == a.kernel]
    found = found or [k for k in r["kernels"] if a.kernel in k["kernel"]]
    if a.crc is not None:
        found = [k for k in found if k["cubin_crc"] == a.crc]
    if len(found) != 1:
        names = [(k["kernel"], k["cubin_crc"]) for k in found or r["kernels"][:20]]
        sys.exit(f"{len(found)} kernels match {a.kernel!r}"
                 f"{'' if a.crc is None else f' in module {a.crc}'}: {names}")
    k = found[0]
    states = r["states"]
    at = {}
    for offset, state, samples in k["pcs"]:
        at.setdefault(offset, {})[states[state]] = samples
    total = max(k["samples"], 1)
    print(f"{k['kernel']}: {k['samples']} samples; "
          + ", ".join(f"{c['state']} {100 * c['samples'] / total:.1f}%"
                      for c in k["states"] if not c["state"].endswith("_not_issued")))
    line = re.compile(r"/\*([0-9a-f]{4,})\*/")
    seen = 0
    inside = False
    for text in open(a.sass):
        # The first function listed only: cuobjdump prints the sm_90 and the sm_90a code, the same
        # instructions at the same offsets in the modules that have both.
        if "Function :" in text or "code for" in text:
            if inside:
                break
            inside = "Function :" in text
            continue
        m = inside and line.search(text)
        if not m:
            continue
        counts = at.get(int(m.group(1), 16), {})
        n = sum(counts.values())
        seen += n
        if 100 * n / total < a.min:
            continue
        mix = ", ".join(f"{s} {c}" for s, c in sorted(counts.items(), key=lambda x: -x[1]))
        print(f"{n:7d} {100 * n / total:5.1f}%  {text.strip()[:90]:90s}  {mix}")
    if seen != k["samples"]:
        print(f"note: {k['samples'] - seen} samples at offsets this SASS does not list "
              "(another build's, or another kernel's disassembly?)", file=sys.stderr)


if __name__ == "__main__":
    main()
