"""Rank the SASS instructions of an Nsight Compute source-page CSV (benchmarks/ncu_bwd_source.sh) by warp-stall
samples and by excess shared-memory wavefronts (bank conflicts), each with its partition (the USETMAXREG-delimited
region of the warp-specialised kernel) and a little context.

    python benchmarks/ncu_source_rank.py bwd-128-4096-0-sass.csv.gz [--top 25]
"""
import argparse
import csv
import gzip
import io


def load(path):
    raw = gzip.open(path, "rt").read() if path.endswith(".gz") else open(path).read()
    lines = raw.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('"Address"'))
    rows = list(csv.DictReader(io.StringIO("\n".join(lines[start:]))))
    region = 0
    for i, row in enumerate(rows):
        if "USETMAXREG" in row["Source"]:
            region += 1
        row["region"], row["index"] = region, i
    return rows


def num(row, key):
    try:
        return float(row.get(key, "0").replace(",", "") or 0)
    except ValueError:
        return 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    rows = load(args.csv)
    stall_key = "Warp Stall Sampling (All Samples)"
    total = sum(num(r, stall_key) for r in rows)
    by_region = {}
    for r in rows:
        by_region[r["region"]] = by_region.get(r["region"], 0) + num(r, stall_key)
    print(f"{len(rows)} instructions, {total:.0f} stall samples; by partition region: "
          + ", ".join(f"{k}: {100 * v / total:.1f}%" for k, v in sorted(by_region.items()) if v))
    print(f"\n== top {args.top} by stall samples (% of all)")
    for r in sorted(rows, key=lambda r: -num(r, stall_key))[:args.top]:
        print(f"{100 * num(r, stall_key) / total:5.1f}%  region {r['region']:2d}  #{r['index']:5d}  {r['Source'].strip()[:90]}")
    ex = "L1 Wavefronts Shared Excessive"
    tot_sh = sum(num(r, "L1 Wavefronts Shared") for r in rows)
    tot_ex = sum(num(r, ex) for r in rows)
    print(f"\n== shared wavefronts {tot_sh:.3g}, excessive {tot_ex:.3g}; top {args.top} by excessive")
    for r in sorted(rows, key=lambda r: -num(r, ex))[:args.top]:
        if num(r, ex) == 0:
            break
        print(f"{num(r, ex):12.0f} of {num(r, 'L1 Wavefronts Shared'):12.0f}  region {r['region']:2d}  #{r['index']:5d}  "
              f"{r['Source'].strip()[:80]}")


if __name__ == "__main__":
    main()
