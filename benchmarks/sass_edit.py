"""Edits the scheduling control bits of a kernel's FFMAs in a cubin, for timing experiments.

  nvcc ... -cubin -o k.cubin benchmarks/kernel_bench.cu
  python3 benchmarks/sass_edit.py k.cubin out.cubin MODE
  KB_CUBIN=out.cubin ./kbench 4096x7168x16384

Each sm_90 instruction is 16 bytes; the top 23 bits of its high word hold the control
code (from bit 41 of that word: stall count 4 bits, yield 1, write and read barrier 3 + 3,
wait mask 6, operand-reuse flags 4). ptxas 13.0 alternates the yield bit along the
promotion's FFMA runs and sets reuse flags only where it is 1. Only FFMAs with three
register sources (opcode 0x223) in runs of at least 16 are touched; the changes are
hints, so results stay correct. MODE:
  copy     no change (a control for loading the kernel from a cubin)
  y0       yield bit 0 on every such FFMA, reuse flags cleared
  y1       yield bit 1 on every such FFMA (reuse flags kept)
  noreuse  reuse flags cleared (yield bits kept)
"""
import struct
import sys

YIELD = 1 << 45
REUSE = 0xF << 58
FFMA_RRR = 0x223


def text_sections(elf):
  """(name, file offset, size) of every .text.* section of an ELF64 file."""
  shoff, = struct.unpack_from("<Q", elf, 0x28)
  shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
  def header(i):
    name, _, _, _, off, size = struct.unpack_from("<IIQQQQ", elf, shoff + i * shentsize)
    return name, off, size
  _, stroff, _ = header(shstrndx)
  out = []
  for i in range(shnum):
    name_idx, off, size = header(i)
    name = elf[stroff + name_idx:elf.index(b"\0", stroff + name_idx)].decode()
    if name.startswith(".text."):
      out.append((name, off, size))
  return out


def ffma_runs(elf, off, size, min_run=16):
  """Offsets of FFMA R, R, R, R instructions in runs of >= min_run (other
  instructions may sit between them, up to 2 in a row)."""
  runs, cur, gap = [], [], 0
  for pos in range(off, off + size, 16):
    lo, = struct.unpack_from("<Q", elf, pos)
    if lo & 0xFFF == FFMA_RRR:
      cur.append(pos)
      gap = 0
    else:
      gap += 1
      if gap > 2:
        if len(cur) >= min_run:
          runs.extend(cur)
        cur = []
  if len(cur) >= min_run:
    runs.extend(cur)
  return runs


def main():
  src, dst, mode = sys.argv[1:4]
  elf = bytearray(open(src, "rb").read())
  for name, off, size in text_sections(elf):
    sites = ffma_runs(elf, off, size)
    for pos in sites:
      hi, = struct.unpack_from("<Q", elf, pos + 8)
      if mode == "y0":
        hi &= ~(YIELD | REUSE)
      elif mode == "y1":
        hi |= YIELD
      elif mode == "noreuse":
        hi &= ~REUSE
      elif mode != "copy":
        sys.exit(f"unknown mode {mode!r}")
      struct.pack_into("<Q", elf, pos + 8, hi)
    print(f"{name}: {len(sites)} FFMAs edited ({mode})")
  open(dst, "wb").write(elf)


if __name__ == "__main__":
  main()
