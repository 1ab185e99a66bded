"""Summarizes an Nsight Compute SASS source page: where a kernel's warps spend their time.

  ncu -o rep --section SourceCounters ... python3 benchmarks/profile_case.py ...
  ncu -i rep.ncu-rep --page source --csv --print-source sass > src.csv
  python3 benchmarks/ncu_source_summary.py src.csv [--window 120]

Prints the warp-state samples by instruction class (the wgmma wait, QGMMA issue, FP32
promotion math, shared loads, mbarrier polls, ...), the stall reasons over the whole
kernel, and the hottest run of consecutive instructions with each line's main stalls.
A math warp that mostly sits in `wgmma_wait` is fed by a busy tensor core; one that sits
in `fp32`/`lds` is bound by its own promotion (gpu_check.sh's `prof-src` stage runs this).
"""
import argparse
import collections
import csv
import gzip
import re
import sys

CLASSES = (  # (class, regex on the opcode), first match wins
    ("wgmma_wait", r"WARPGROUP\.DEPBAR"),
    ("qgmma", r"[QH]GMMA"),
    ("fp32", r"F(MUL|FMA|ADD)\b"),
    ("lds", r"LDS"),
    ("ldg", r"LDG"),
    ("store", r"ST[GS]\b|STG|STS|UTMASTG|UBLKCP"),
    ("mbarrier", r"SYNCS"),
    ("branch", r"BRA\b"),
    ("barrier", r"BAR\b"),
)
STALLS = ("short_sb", "long_sb", "wait", "dispatch", "selected", "not_selected", "barrier",
          "math", "mio", "lg", "branch_resolving", "no_inst", "membar", "misc", "sleep")


def num(x: str) -> float:
  try:
    return float(x.replace(",", ""))
  except ValueError:
    return 0.0


def opcode(source: str) -> str:
  s = re.sub(r"^@!?U?P\w+\s+", "", source.strip())  # drop a predicate
  return s.split()[0] if s else "?"


def classify(op: str) -> str:
  for name, pattern in CLASSES:
    if re.match(pattern, op):
      return name
  return "other"


def load(path: str):
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", newline="") as f:
    rows = list(csv.reader(f))
  for i, r in enumerate(rows):
    if r and r[0] == "Address":
      hdr = r
      body = [x for x in rows[i + 1:] if len(x) == len(hdr)]
      return hdr, body
  raise SystemExit(f"{path}: no 'Address' header row (expected ncu --page source --csv)")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("csv", help="ncu --page source --csv --print-source sass output (.csv or .csv.gz)")
  p.add_argument("--window", type=int, default=120, help="length of the hottest run shown")
  args = p.parse_args(argv)
  hdr, body = load(args.csv)
  col = {h: i for i, h in enumerate(hdr)}
  samp = col["Warp Stall Sampling (All Samples)"]
  execd = col.get("Instructions Executed")
  stall_cols = {s: col[f"stall_{s}"] for s in STALLS if f"stall_{s}" in col}
  total = sum(num(r[samp]) for r in body)
  if total == 0:
    print("no warp-state samples (profile with --section SourceCounters)")
    return 1

  by_class, by_class_exec = collections.Counter(), collections.Counter()
  for r in body:
    c = classify(opcode(r[1]))
    by_class[c] += num(r[samp])
    if execd is not None:
      by_class_exec[c] += num(r[execd])
  print(f"samples: {int(total)}")
  print(f"{'class':<12} {'samples %':>9} {'executed':>14}")
  for c, v in by_class.most_common():
    print(f"{c:<12} {100 * v / total:>9.1f} {int(by_class_exec[c]):>14}")

  stalls = {s: sum(num(r[i]) for r in body) for s, i in stall_cols.items()}
  print("\nstall reasons (% of samples): " + ", ".join(
      f"{s} {100 * v / total:.1f}" for s, v in sorted(stalls.items(), key=lambda x: -x[1]) if v))

  w = min(args.window, len(body))
  sums = [0.0]
  for r in body:
    sums.append(sums[-1] + num(r[samp]))
  start = max(range(len(body) - w + 1), key=lambda i: sums[i + w] - sums[i])
  print(f"\nhottest {w} instructions ({100 * (sums[start + w] - sums[start]) / total:.1f}% of "
        f"samples), per line: samples, main stalls, SASS")
  for r in body[start:start + w]:
    if execd is not None and num(r[execd]) == 0:
      continue
    s = num(r[samp])
    top = sorted(((num(r[i]), n) for n, i in stall_cols.items()), reverse=True)[:2]
    why = " ".join(f"{n}={int(v)}" for v, n in top if v >= max(0.2 * s, 1))
    print(f"{int(s):>6} {why:<28} {r[1].strip()[:90]}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
