"""Where a kernel's warps wait: Nsight Compute's per-SASS-instruction stall samples,
summed by reason, by region (straight-line code and loop bodies) and by instruction.

Why: the launch-level sections (WarpStateStats) say *that* warps wait on global loads;
which instruction waits says *for what* (the state tile at a loop's first instruction,
a look-ahead load at a loop-carried move), and that decides which change can help.
Regions are runs of instructions executed equally often (a loop body runs once per
iteration), so a verify kernel splits into prologue / replay loop / new-token loop.

On the GPU machine (ncu there; its CSV comes back, ~0.5 MB, or gzipped ~20 KB):

  ncu --kernel-name _mamba2_verify_kernel --launch-skip 2 --launch-count 1 \
      --cache-control all --section SourceCounters --section WarpStateStats \
      --import-source no -o rep python3 one_off_script_calling_the_kernel.py
  ncu -i rep.ncu-rep --page source --csv --print-source sass > sass.csv

then anywhere:  python benchmarks/ncu_stalls.py sass.csv[.gz] [--top 20]
"""
from __future__ import annotations

import argparse
import collections
import csv
import gzip

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


def read_rows(path: str) -> list[dict]:
    """The per-instruction rows of an ``ncu --page source --csv --print-source sass`` dump."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        lines = list(csv.reader(f))
    try:
        start = next(i for i, row in enumerate(lines) if SAMPLES in row)
    except StopIteration:
        raise SystemExit(f"{path}: no '{SAMPLES}' column; was it written with --page source "
                         "--csv --print-source sass from a report with SourceCounters?")
    header = lines[start]
    rows = [dict(zip(header, row)) for row in lines[start + 1:] if len(row) == len(header)]
    if not rows:
        raise SystemExit(f"{path}: a '{SAMPLES}' header but no instruction rows")
    return rows


def value(row: dict, key: str) -> float:
    try:
        return float(row.get(key, "").replace(",", ""))
    except ValueError:
        return 0.0


def regions(rows: list[dict]) -> list[tuple[int, int, float]]:
    """(first, last, executions) of each run of equally often executed instructions."""
    out = []
    for i, row in enumerate(rows):
        n = value(row, EXECUTED)
        if out and out[-1][2] == n:
            out[-1] = (out[-1][0], i, n)
        else:
            out.append((i, i, n))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv", help="ncu source-page CSV (SASS), optionally .gz")
    ap.add_argument("--top", type=int, default=15, help="instructions to list (default 15)")
    ap.add_argument("--min-share", type=float, default=0.01,
                    help="list regions of fewer than 4 instructions only above this share")
    args = ap.parse_args()
    rows = read_rows(args.csv)
    reasons = [k for k in rows[0] if k.startswith("stall_") and "Not Issued" not in k]
    total = sum(value(r, SAMPLES) for r in rows) or 1.0
    print(f"{len(rows)} instructions, {total:.0f} stall samples")
    by_reason = collections.Counter({k: sum(value(r, k) for r in rows) for k in reasons})
    print("\nreason            share")
    for k, v in by_reason.most_common(8):
        print(f"{k[6:]:16} {v / total:6.1%}")
    print("\nregion (instructions)   executed   share")
    for a, b, n in regions(rows):
        share = sum(value(rows[i], SAMPLES) for i in range(a, b + 1)) / total
        if b - a >= 3 or share >= args.min_share:
            print(f"{a:5d}-{b:<5d} ({b - a + 1:4d})  {n:9.0f}  {share:6.1%}")
    print("\nshare  index  executed  instruction  (top reasons)")
    for i in sorted(range(len(rows)), key=lambda i: -value(rows[i], SAMPLES))[:args.top]:
        r, s = rows[i], value(rows[i], SAMPLES)
        why = sorted(((value(r, k), k) for k in reasons), reverse=True)[:2]
        print(f"{s / total:5.1%} {i:6d} {value(r, EXECUTED):9.0f}  {r.get('Source', '').strip()[:48]:48}"
              + "  " + " ".join(f"{k[6:]} {v / s:.0%}" for v, k in why if v))


if __name__ == "__main__":
    main()
