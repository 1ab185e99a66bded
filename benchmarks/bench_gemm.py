"""Dense FP8 GEMM benchmark: jax_deepgemm ``fp8_gemm_nt`` vs XLA's FP8 and BF16 dots.

For every shape (M, N, K), in one process:
  jax_deepgemm   ``fp8_gemm_nt(a, sa, b, sb)`` on pre-quantized inputs (1x128 activation
                 scales, 128x128 weight scales) -> bf16. Quantization is not timed.
  xla_fp8_dot    what XLA gives for an e4m3 GEMM with per-tensor scales (cuBLASLt FP8,
                 ``__cublas$lt$matmul$f8``, or a Triton GEMM if XLA's autotuner prefers
                 it), -> bf16. Two spellings are tried (``--xla-fp8-pattern``):
                   direct:  ``lax.dot_general(a_f8, b_f8, preferred_element_type=bf16)``;
                            per-tensor scales are scalar operands of the cuBLASLt call and
                            cost nothing, so this unscaled dot times the same GEMM;
                   dequant: ``dot(a_f8.astype(bf16) * sa, b_f8.astype(bf16) * sb)``, the
                            quantize-dequantize pattern XLA's GemmRewriter folds into an
                            FP8 cuBLASLt call with ``sa``/``sb`` as its scales;
                   dequant_f32: the same in f32 (f32 dot, then -> bf16), the exact form of
                            XLA's own FP8 rewrite tests.
                 With the default ``best`` all are timed and the fastest is recorded; the
                 record's ``config`` says which, and which backend XLA compiled it to.
                 All run at the default precision, where XLA turns on cuBLASLt's FP8 *fast
                 accumulation* (``CUBLASLT_MATMUL_DESC_FAST_ACCUM``: partial sums stay in the
                 tensor cores' reduced-precision accumulator, never promoted to f32), the
                 imprecision DeepGEMM's per-128-K promotion exists to avoid (records:
                 ``fast_accum``, for cuBLASLt).
  xla_fp8_dot_promoted  the direct dot at ``precision=HIGHEST``, where XLA leaves fast
                 accumulation off: cuBLASLt promotes its partial sums to f32, the accuracy
                 class of ours (still per-tensor scales). Ours' records carry both ratios.
  xla_bf16_dot   ``a_bf16 · b_bf16ᵀ`` -> bf16 (cuBLAS).

TFLOPS = 2·M·N·K / t. GB/s = bytes / t with bytes = M·K + N·K + scales + 2·M·N (ours),
M·K + N·K + 2·M·N (XLA FP8), 2·(M·K + N·K + M·N) (BF16). ``ratio_vs_xla_*`` = t_xla / t_ours
(> 1: ours is faster; ``ratio_vs_xla_fp8_promoted`` likewise). ``diff`` = 1 - 2Σxy / Σ(x² + y²)
(DeepGEMM's measure) of our output
against an f32 HIGHEST-precision dot of the dequantized inputs; > 1e-5 prints a warning.
Timing method: see ``_timing.py``.

  python benchmarks/bench_gemm.py                 # the default shapes, writes results/gemm.json
  python benchmarks/bench_gemm.py --check-hlo     # also show what XLA compiled each dot to
  python benchmarks/bench_gemm.py --quick --no-write   # CPU smoke run
  python benchmarks/bench_gemm.py --shapes 128x2112x7168,4096x7168x2048
  python benchmarks/bench_gemm.py --epilogues     # also bias / accumulate epilogue overheads

``--chill-gb 8``: also kernel times the way DeepGEMM's published figures were taken
(``bench_kineto``: an 8 GB fill before every timed call, so that each GEMM starts at a high
clock instead of at the power cap of back-to-back GEMMs); records ``kernel_us_chill``.

Kernel times (``--kernel-times``, default: shapes with M <= 512): at M = 128 one call's
device work (~10-20 us) is shorter than JAX's dispatch of it, so the burst timing above
measures the host as much as the kernels. There the run also traces every implementation
with ``jax.profiler`` and records ``kernel_us``, the summed time of the kernels one call
runs (ours: the GEMM and the transpose of the row-major ``sa`` it is handed; XLA's: its GEMM
and any fusion around it), and ``kernel_ratio_vs_xla_fp8`` = kernel_us(XLA FP8) / kernel_us(ours).
``--mn-major-scales`` hands ours ``sa`` MN-major instead, as DeepGEMM's protocol hands its
kernel (with MN-major scales, the default unless ``JAX_DEEPGEMM_MN_MAJOR_SCALES=0``, that is no
transpose where M % 4 == 0, as after our own cast in the same jit; records say
``sa_layout``).
"""
from __future__ import annotations

import argparse
import gc
import os
import re
import statistics
import sys
import traceback

import jax
import jax.numpy as jnp

import _timing as T  # first: it makes a source checkout importable
import jax_deepgemm as jd
from jax_deepgemm import _ffi as jd_ffi

OP = "fp8_gemm_nt"
NK = [(2112, 7168), (24576, 1536), (7168, 16384), (4096, 7168), (7168, 2048)]
DEFAULT_SHAPES = [(m, n, k) for m in (128, 4096) for n, k in NK] + [(8192, 8192, 8192)]
QUICK_SHAPES = [(128, 256, 512), (200, 384, 320)]
DIFF_WARN = 1e-5
FP8 = jnp.float8_e4m3fn
BF16 = jnp.bfloat16
NT = (((1,), (1,)), ((), ()))  # contract K of a [M, K] with K of b [N, K]


def ceil_div(a, b):
  return -(-a // b)


def gemm_bytes(m, n, k):
  """Bytes each implementation moves at least, ``(ours, xla_fp8, xla_bf16)``: ours reads e4m3
  a [M, K] and b [N, K], f32 scales sa [M, ceil(K/128)] and sb [ceil(N/128), ceil(K/128)], and
  writes bf16 [M, N]; XLA's FP8 dot the same without the scales (per-tensor: two scalars); the
  bf16 dot bf16 a, b and out."""
  kb = ceil_div(k, 128)
  ours = m * k + n * k + 4 * m * kb + 4 * ceil_div(n, 128) * kb + 2 * m * n
  return ours, m * k + n * k + 2 * m * n, 2 * (m * k + n * k + m * n)


# ------------------------------------------------------------------ the implementations

def ours(a, sa, b, sb):
  return jd.fp8_gemm_nt(a, sa, b, sb)


def xla_fp8_direct(a, b, sa, sb):
  del sa, sb  # per-tensor scales: free scalar operands of the cuBLASLt call
  return jax.lax.dot_general(a, b, NT, preferred_element_type=BF16)


def xla_fp8_dequant(a, b, sa, sb):
  a16 = a.astype(BF16) * sa.astype(BF16)
  b16 = b.astype(BF16) * sb.astype(BF16)
  return jax.lax.dot_general(a16, b16, NT, preferred_element_type=BF16)


def xla_fp8_dequant_f32(a, b, sa, sb):
  # The exact form of XLA's GemmRewriter FP8 tests (f32 dequantize, f32 dot), then -> bf16.
  a32 = a.astype(jnp.float32) * sa
  b32 = b.astype(jnp.float32) * sb
  return jax.lax.dot_general(a32, b32, NT, preferred_element_type=jnp.float32).astype(BF16)


# Epilogues (--epilogues): the same GEMM with a bias (bf16 out), and f32 out plain vs
# accumulating into c. XLA copies a non-donated c before the in-place call, so the accumulate
# time is a difference: acc2 (copy + two chained in-place calls) - acc1 (copy + one call).
def ours_bias(a, sa, b, sb, bias):
  return jd.fp8_gemm_nt(a, sa, b, sb, bias=bias)


def ours_f32(a, sa, b, sb, c):
  del c  # same inputs as the accumulate variants
  return jd.fp8_gemm_nt(a, sa, b, sb, out_dtype=jnp.float32)


def ours_acc1(a, sa, b, sb, c):
  return jd.fp8_gemm_nt(a, sa, b, sb, c=c)


def ours_acc2(a, sa, b, sb, c):
  return jd.fp8_gemm_nt(a, sa, b, sb, c=jd.fp8_gemm_nt(a, sa, b, sb, c=c))


XLA_FP8_PATTERNS = {"direct": xla_fp8_direct, "dequant": xla_fp8_dequant,
                    "dequant_f32": xla_fp8_dequant_f32}


def xla_fp8_promoted(a, b, sa, sb):
  """The direct FP8 dot without fast accumulation: XLA enables cuBLASLt's FP8 fast
  accumulation only for dots at DEFAULT precision (stream_executor's ``IsFastAccumEnabled``),
  so at HIGHEST the GEMM promotes its partial sums to f32, as ours does per 128 of K."""
  del sa, sb
  return jax.lax.dot_general(a, b, NT, precision=jax.lax.Precision.HIGHEST,
                             preferred_element_type=BF16)


def xla_bf16(a, b):
  return jax.lax.dot_general(a, b, NT, preferred_element_type=BF16)


# ------------------------------------------------------------------ inputs

def ours_inputs(m, n, k):
  @jax.jit
  def make(key):
    ka, kb = jax.random.split(key)
    a, sa = jd.per_token_cast_to_fp8(jax.random.normal(ka, (m, k), BF16))
    b, sb = jd.per_block_cast_to_fp8(jax.random.normal(kb, (n, k), BF16))
    return a, sa, b, sb
  return make


def ours_mn_major(a, sa_t, b, sb):
  # DeepGEMM's protocol: A's scales arrive MN-major, [ceil(K/128), M]. With MN-major scales
  # (the default) and M % 4 == 0 this transpose is free (a layout).
  return jd.fp8_gemm_nt(a, sa_t.T, b, sb)


def ours_mn_major_inputs(m, n, k):
  base = ours_inputs(m, n, k)

  @jax.jit
  def make(key):
    a, sa, b, sb = base(key)
    return a, sa.T, b, sb
  return make


def epilogue_inputs(m, n, k, extra):
  """ours_inputs plus a bias [N] (extra="bias") or a c [M, N] (extra="c"), float32."""
  base = ours_inputs(m, n, k)

  @jax.jit
  def more(key):
    shape = (n,) if extra == "bias" else (m, n)
    return jax.random.normal(jax.random.fold_in(key, 7), shape, jnp.float32)

  def make(key):
    return (*base(key), more(key))
  return make


def fp8_inputs(m, n, k):
  @jax.jit
  def make(key):
    ka, kb, ks = jax.random.split(key, 3)
    a = jax.random.normal(ka, (m, k), jnp.float32).astype(FP8)
    b = jax.random.normal(kb, (n, k), jnp.float32).astype(FP8)
    sa, sb = jax.random.uniform(ks, (2,), jnp.float32, 0.5, 1.5)
    return a, b, sa, sb
  return make


def bf16_inputs(m, n, k):
  @jax.jit
  def make(key):
    ka, kb = jax.random.split(key)
    return jax.random.normal(ka, (m, k), BF16), jax.random.normal(kb, (n, k), BF16)
  return make


@jax.jit
def calc_diff(a, sa, b, sb):
  """DeepGEMM's ``1 - 2Σxy / Σ(x²+y²)``, written as ``Σ(x-y)² / Σ(x²+y²)`` (same value)."""
  x = jd.fp8_gemm_nt(a, sa, b, sb).astype(jnp.float32)
  y = jnp.dot(jd.dequantize_per_token(a, sa), jd.dequantize_per_block(b, sb).T,
              precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
  return jnp.sum(jnp.square(x - y)) / jnp.maximum(jnp.sum(x * x + y * y), 1e-30)


# ------------------------------------------------------------------ HLO inspection

def hlo_backend(hlo: str) -> str:
  """Names what a compiled GEMM became, from the optimized HLO text."""
  if "__cublas$lt$matmul$f8" in hlo:
    return "cublaslt_f8"
  if re.search(r'custom_call_target="jax_deepgemm_', hlo):
    return "ffi_kernel"
  if "__triton_gemm" in hlo or "__triton_nested_gemm_fusion" in hlo:
    return "triton"
  if "__cudnn$fusion" in hlo:
    return "cudnn"
  if "__cublas$lt$matmul" in hlo:
    return "cublaslt"
  if "__cublas$gemm" in hlo:
    return "cublas"
  if re.search(r"\bdot\(", hlo):
    return "dot"  # e.g. the CPU backend
  return "other"


def fast_accum(backend: str | None, promoted: bool) -> bool | None:
  """Whether an XLA FP8 dot accumulated without promotion: cuBLASLt FP8 GEMMs do at DEFAULT
  precision (XLA sets CUBLASLT_MATMUL_DESC_FAST_ACCUM), not at HIGHEST; None for other
  backends (e.g. Triton), whose accumulation this does not describe."""
  return (not promoted) if backend == "cublaslt_f8" else None


def hlo_gemm_lines(hlo: str, limit: int = 8) -> list[str]:
  """The custom-call / GEMM-fusion lines of an HLO text, shortened (for --check-hlo)."""
  keys = ("custom-call", "__triton", "__cudnn", " dot(")
  out = []
  for line in hlo.splitlines():
    if any(k in line for k in keys):
      line = line.strip()
      out.append(line if len(line) <= 240 else line[:237] + "...")
  return out[:limit]


def _f8_operands(hlo: str) -> bool:
  """True when the GEMM of an HLO reads f8 operands (not upcast copies)."""
  for line in hlo.splitlines():
    if ("custom-call(" in line or " dot(" in line or "__triton" in line) and "f8e4m3fn" in line:
      return True
  return False


# ------------------------------------------------------------------ main

def parse_shapes(text: str):
  shapes = []
  for item in text.replace(";", ",").split(","):
    item = item.strip().lower()
    if not item:
      continue
    parts = item.replace("*", "x").split("x")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
      raise argparse.ArgumentTypeError(f"bad shape {item!r}: expected MxNxK")
    shapes.append(tuple(int(p) for p in parts))
  if not shapes:
    raise argparse.ArgumentTypeError("no shapes given")
  return shapes


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shapes", type=parse_shapes, default=None,
                 help="comma-separated MxNxK list (default: the DeepSeek-V3 set + 8192^3)")
  p.add_argument("--quick", action="store_true", help="two small shapes, short timing (CPU smoke)")
  p.add_argument("--out", default="gemm", help="results/<OUT>.json (default: gemm)")
  p.add_argument("--no-write", action="store_true", help="do not write the results file")
  p.add_argument("--check-hlo", action="store_true",
                 help="print what XLA compiled each GEMM to (look for __cublas$lt$matmul$f8)")
  p.add_argument("--xla-fp8-pattern", choices=("best", *XLA_FP8_PATTERNS), default="best",
                 help="how the XLA FP8 baseline is written (default: time all, keep the fastest)")
  p.add_argument("--skip-xla", action="store_true", help="time jax_deepgemm only")
  p.add_argument("--epilogues", action="store_true",
                 help="also time the bias and accumulate (c) epilogues at M >= 4096 "
                      "(records jax_deepgemm_bias / jax_deepgemm_f32 / jax_deepgemm_c)")
  p.add_argument("--epilogue-rounds", type=lambda v: max(1, int(v)), default=3,
                 help="rounds of the epilogue timings, each timing plain, bias, f32 and "
                      "accumulate back to back (overheads: medians of per-round ratios)")
  p.add_argument("--kernel-times", choices=("auto", "on", "off"), default="auto",
                 help="also record profiler (CUPTI) kernel times: auto = shapes with M <= 512")
  p.add_argument("--mn-major-scales", action="store_true",
                 help="hand our GEMM A's scales MN-major, as DeepGEMM's protocol does, with "
                      "MN-major scales forced on (no transpose of sa in the timed call)")
  p.add_argument("--chill-gb", type=float, default=0.0,
                 help="also record kernel times the way DeepGEMM's published figures were "
                      "taken: each call after writing this many GB (DeepGEMM: 8), so GEMMs "
                      "start at a high clock (kernel_us_chill; implies kernel times)")
  T.add_timing_args(p)
  args = p.parse_args(argv)

  shapes = args.shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
  timing = T.timing_from_args(args)
  patterns = list(XLA_FP8_PATTERNS) if args.xla_fp8_pattern == "best" else [args.xla_fp8_pattern]

  if args.mn_major_scales:  # read when the GEMM lowers: before anything is traced
    os.environ[jd_ffi.MN_MAJOR_SCALES_ENV] = "1"
  timed, timed_inputs = ((ours_mn_major, ours_mn_major_inputs) if args.mn_major_scales
                         else (ours, ours_inputs))
  T.print_header()
  dev = jax.devices()[0]
  kernels = jd.use_kernels()

  records, rows, failures = [], [], 0
  for m, n, k in shapes:
    flops = 2.0 * m * n * k
    bytes_ours, bytes_fp8, bytes_bf16 = gemm_bytes(m, n, k)
    common = dict(op=OP, m=m, n=n, k=k, groups=1, flops=flops)
    shape = f"{m}x{n}x{k}"
    config = jd.gemm_config(m, n, k) if kernels else "reference"
    print(f"[{shape}] config={config}", flush=True)

    def attempt(what, f):
      nonlocal failures
      try:
        return f()
      except Exception:  # keep going: one failing impl should not lose the other results
        failures += 1
        print(f"[{shape}] {what} FAILED:", file=sys.stderr)
        traceback.print_exc()
        return None

    # Correctness of our output, once per shape.
    def _diff():
      a, sa, b, sb = ours_inputs(m, n, k)(jax.random.PRNGKey(1234))
      return float(calc_diff(a, sa, b, sb))
    diff = attempt("diff", _diff)
    if diff is not None and not diff <= DIFF_WARN:
      print(f"WARNING [{shape}]: diff {diff:.3e} > {DIFF_WARN:g}", file=sys.stderr)

    if args.check_hlo:
      def _check():
        a, sa, b, sb = ours_inputs(m, n, k)(jax.random.PRNGKey(0))
        hlo = T.compiled_hlo(ours, a, sa, b, sb)
        print(f"  [check-hlo] jax_deepgemm: {hlo_backend(hlo)}")
        for line in hlo_gemm_lines(hlo):
          print(f"      {line}")
      attempt("check-hlo jax_deepgemm", _check)

    t_ours = attempt("jax_deepgemm", lambda: T.bench(timed, timed_inputs(m, n, k), **timing))
    gc.collect()

    t_fp8, fp8_cfg, pattern_us = None, None, {}
    t_bf16, bf16_cfg = None, None
    t_prom, prom_cfg = None, None
    if not args.skip_xla:
      for name in patterns:
        fn = XLA_FP8_PATTERNS[name]

        def _hlo(fn=fn):
          inputs = fp8_inputs(m, n, k)(jax.random.PRNGKey(0))
          return T.compiled_hlo(fn, *inputs)
        hlo = attempt(f"xla_fp8_dot[{name}] compile", _hlo) or ""
        backend = hlo_backend(hlo) if hlo else "?"
        if args.check_hlo and hlo:
          print(f"  [check-hlo] xla_fp8_dot[{name}]: {backend}  "
                f"(f8 cuBLASLt custom call: {'__cublas$lt$matmul$f8' in hlo}, "
                f"f8 operands reach the GEMM: {_f8_operands(hlo)})")
          for line in hlo_gemm_lines(hlo):
            print(f"      {line}")
        if dev.platform in ("gpu", "cuda") and hlo and backend not in ("cublaslt_f8", "triton", "cudnn"):
          print(f"WARNING [{shape}]: xla_fp8_dot[{name}] compiled to '{backend}', not an FP8 "
                "GEMM; this baseline is then slower than cuBLASLt FP8 could be.",
                file=sys.stderr)
        t = attempt(f"xla_fp8_dot[{name}]",
                    lambda fn=fn: T.bench(fn, fp8_inputs(m, n, k), **timing))
        gc.collect()
        if t is None:
          continue
        pattern_us[name] = t.time_us
        if t_fp8 is None or t.time_us < t_fp8.time_us:
          t_fp8, fp8_cfg = t, f"{name}:{backend}"

      def _prom_hlo():
        inputs = fp8_inputs(m, n, k)(jax.random.PRNGKey(0))
        return hlo_backend(T.compiled_hlo(xla_fp8_promoted, *inputs))
      prom_cfg = attempt("xla_fp8_dot_promoted compile", _prom_hlo)
      if args.check_hlo:
        print(f"  [check-hlo] xla_fp8_dot_promoted: {prom_cfg}")
      if dev.platform in ("gpu", "cuda") and prom_cfg not in (None, "cublaslt_f8", "triton",
                                                              "cudnn"):
        print(f"WARNING [{shape}]: xla_fp8_dot_promoted compiled to '{prom_cfg}', not an FP8 "
              "GEMM.", file=sys.stderr)
      if prom_cfg is not None:
        t_prom = attempt("xla_fp8_dot_promoted",
                         lambda: T.bench(xla_fp8_promoted, fp8_inputs(m, n, k), **timing))
      gc.collect()

      def _bf16_hlo():
        return hlo_backend(T.compiled_hlo(xla_bf16, *bf16_inputs(m, n, k)(jax.random.PRNGKey(0))))
      bf16_cfg = attempt("xla_bf16_dot compile", _bf16_hlo)
      if args.check_hlo:
        print(f"  [check-hlo] xla_bf16_dot: {bf16_cfg}")
      t_bf16 = attempt("xla_bf16_dot", lambda: T.bench(xla_bf16, bf16_inputs(m, n, k), **timing))
      gc.collect()

    k_ours = k_fp8 = k_bf16 = k_prom = None
    if (args.kernel_times == "on" or args.chill_gb > 0
        or (args.kernel_times == "auto" and m <= 512)):
      k_ours = attempt("kernel times jax_deepgemm",
                       lambda: T.kernel_times(timed, timed_inputs(m, n, k)))
      if t_fp8 is not None:
        best = XLA_FP8_PATTERNS[fp8_cfg.split(":")[0]]
        k_fp8 = attempt("kernel times xla_fp8_dot",
                        lambda: T.kernel_times(best, fp8_inputs(m, n, k)))
      if t_prom is not None:
        k_prom = attempt("kernel times xla_fp8_dot_promoted",
                         lambda: T.kernel_times(xla_fp8_promoted, fp8_inputs(m, n, k)))
      if t_bf16 is not None:
        k_bf16 = attempt("kernel times xla_bf16_dot",
                         lambda: T.kernel_times(xla_bf16, bf16_inputs(m, n, k)))
      gc.collect()
    # DeepGEMM's protocol (--chill-gb): the op's kernels only, each call after a large fill.
    c_ours = c_fp8 = c_prom = None
    if args.chill_gb > 0:
      cb = int(args.chill_gb * 1e9)
      if k_ours:
        c_ours = attempt("chilled kernel times jax_deepgemm",
                         lambda: T.kernel_times(timed, timed_inputs(m, n, k), chill_bytes=cb))
      if k_fp8:
        c_fp8 = attempt("chilled kernel times xla_fp8_dot",
                        lambda: T.kernel_times(best, fp8_inputs(m, n, k), chill_bytes=cb))
      if k_prom:
        c_prom = attempt("chilled kernel times xla_fp8_dot_promoted",
                         lambda: T.kernel_times(xla_fp8_promoted, fp8_inputs(m, n, k),
                                                chill_bytes=cb))
      gc.collect()

    def k_extras(kt, chilled=None):
      out = kt.extras() if kt else {}
      if chilled:
        out.update(chilled.chill_extras(args.chill_gb, flops))
      return out
    kr_fp8 = k_fp8.total_us / k_ours.total_us if k_ours and k_fp8 else None

    r_fp8 = t_fp8.time_us / t_ours.time_us if t_ours and t_fp8 else None
    r_bf16 = t_bf16.time_us / t_ours.time_us if t_ours and t_bf16 else None
    r_prom = t_prom.time_us / t_ours.time_us if t_ours and t_prom else None
    if t_ours:
      records.append(T.make_record(impl="jax_deepgemm", time_us=t_ours.time_us, nbytes=bytes_ours,
                                   config=config, ratio_vs_xla_fp8=r_fp8,
                                   sa_layout="mn_major" if args.mn_major_scales else "row_major",
                                   ratio_vs_xla_bf16=r_bf16, ratio_vs_xla_fp8_promoted=r_prom,
                                   diff=diff, **t_ours.extras(),
                                   kernel_ratio_vs_xla_fp8=kr_fp8, **k_extras(k_ours, c_ours),
                                   **common))
    if t_fp8:
      records.append(T.make_record(impl="xla_fp8_dot", time_us=t_fp8.time_us, nbytes=bytes_fp8,
                                   config=fp8_cfg, pattern_time_us=pattern_us,
                                   fast_accum=fast_accum(fp8_cfg.split(":")[-1], promoted=False),
                                   **t_fp8.extras(), **k_extras(k_fp8, c_fp8), **common))
    if t_prom:
      records.append(T.make_record(impl="xla_fp8_dot_promoted", time_us=t_prom.time_us,
                                   nbytes=bytes_fp8, config=prom_cfg,
                                   fast_accum=fast_accum(prom_cfg, promoted=True),
                                   **t_prom.extras(), **k_extras(k_prom, c_prom), **common))
    if t_bf16:
      records.append(T.make_record(impl="xla_bf16_dot", time_us=t_bf16.time_us,
                                   nbytes=bytes_bf16, config=bf16_cfg, **t_bf16.extras(),
                                   **k_extras(k_bf16), **common))

    if args.epilogues and m >= 4096 and t_ours:
      # Each variant's timing drifts with the clock (~3% between runs), so every round
      # times all of them back to back, in reverse order every other round, and the
      # overheads are medians of per-round ratios.
      cin = epilogue_inputs(m, n, k, "c")
      variants = {"plain": (ours, ours_inputs(m, n, k)),  # sa as the epilogue inputs take it
                  "bias": (ours_bias, epilogue_inputs(m, n, k, "bias")),
                  "f32": (ours_f32, cin), "acc1": (ours_acc1, cin), "acc2": (ours_acc2, cin)}
      rounds = []
      for r in range(args.epilogue_rounds):
        order = list(variants) if r % 2 == 0 else list(variants)[::-1]
        rounds.append({v: attempt(v, lambda v=v: T.bench(*variants[v], **timing)) for v in order})
        gc.collect()

      def med(values):
        values = [x for x in values if x is not None]
        return statistics.median(values) if values else None

      def per_round(needs, f):  # f(round) where the round timed all of `needs`
        return [f(r) if all(r[v] for v in needs) else None for r in rounds]
      bias_r = per_round(("plain", "bias"), lambda r: r["bias"].time_us / r["plain"].time_us - 1)
      c_us = per_round(("acc1", "acc2"), lambda r: r["acc2"].time_us - r["acc1"].time_us)
      c_r = per_round(("f32", "acc1", "acc2"),
                      lambda r: (r["acc2"].time_us - r["acc1"].time_us) / r["f32"].time_us - 1)
      t = {v: med([r[v] and r[v].time_us for r in rounds]) for v in variants}
      ep = {"bias": med(bias_r), "c": med(c_r)}
      last = {v: rounds[-1][v] for v in variants}
      if t["bias"] is not None:
        records.append(T.make_record(impl="jax_deepgemm_bias", time_us=t["bias"],
                                     nbytes=bytes_ours + 4 * n, config=config,
                                     overhead_vs_plain=ep["bias"], plain_time_us=t["plain"],
                                     overhead_rounds=bias_r,
                                     **(last["bias"].extras() if last["bias"] else {}), **common))
      if t["f32"] is not None:
        records.append(T.make_record(impl="jax_deepgemm_f32", time_us=t["f32"],
                                     nbytes=bytes_ours + 2 * m * n,
                                     config=jd.gemm_config(m, n, k, out_dtype=jnp.float32)
                                     if kernels else "reference",
                                     **(last["f32"].extras() if last["f32"] else {}), **common))
      if ep["c"] is not None:
        records.append(T.make_record(impl="jax_deepgemm_c", time_us=med(c_us),
                                     nbytes=bytes_ours + 6 * m * n,
                                     config=jd.gemm_config(m, n, k, accumulate=True)
                                     if kernels else "reference",
                                     overhead_vs_plain=ep["c"], plain_time_us=t["f32"],
                                     overhead_rounds=c_r, acc1_time_us=t["acc1"],
                                     acc2_time_us=t["acc2"], **common))

      def pct(x):
        return "n/a" if x is None else f"{x:+.1%}"
      print(f"[{shape}] epilogues ({len(rounds)} rounds, medians): bias {T.fmt(t['bias'])} us "
            f"(vs bf16 plain {T.fmt(t['plain'])}: {pct(ep['bias'])}; rounds "
            f"{', '.join(map(pct, bias_r))}), f32 plain {T.fmt(t['f32'])} us, accumulate "
            f"{T.fmt(med(c_us))} us (vs f32 plain {pct(ep['c'])}; rounds "
            f"{', '.join(map(pct, c_r))})", flush=True)

    def tf(t):
      return T.tflops(flops, t.time_us) if t else None
    row = [shape, config,
           t_ours.time_us if t_ours else None, tf(t_ours),
           T.gbps(bytes_ours, t_ours.time_us) if t_ours else None,
           tf(t_fp8), fp8_cfg or "-", tf(t_bf16),
           r_fp8, r_bf16, T.fmt(diff, 2) if diff is not None else "-",
           k_ours.total_us if k_ours else None,
           T.gbps(bytes_ours, k_ours.total_us) if k_ours else None,
           k_fp8.total_us if k_fp8 else None, kr_fp8]
    rows.append(row)
    if k_ours:
      print(f"[{shape}] kernel time per call: ours {T.fmt(k_ours.total_us)} us "
            f"({T.fmt(T.gbps(bytes_ours, k_ours.total_us), 0)} GB/s; "
            + ", ".join(f"{name[:48]} {T.fmt(us)}" for name, us in k_ours.kernels.items())
            + f") | xla_fp8 {T.fmt(k_fp8 and k_fp8.total_us)} us | xla_bf16 "
            f"{T.fmt(k_bf16 and k_bf16.total_us)} us", flush=True)
    if c_ours or c_fp8:
      def tfk(kt):
        return T.tflops(flops, kt.total_us) if kt else None
      print(f"[{shape}] kernel time after a {args.chill_gb:g} GB fill (DeepGEMM's protocol): "
            f"ours {T.fmt(c_ours and c_ours.total_us)} us {T.fmt(tfk(c_ours))} TFLOPS | xla_fp8 "
            f"{T.fmt(c_fp8 and c_fp8.total_us)} us {T.fmt(tfk(c_fp8))} TFLOPS | xla_fp8 promoted "
            f"{T.fmt(c_prom and c_prom.total_us)} us {T.fmt(tfk(c_prom))} TFLOPS", flush=True)
    print(f"[{shape}] ours {T.fmt(row[2])} us {T.fmt(row[3])} TFLOPS | xla_fp8 {T.fmt(row[5])} "
          f"({row[6]}; promoted, no fast accumulation: "
          f"{T.fmt(T.tflops(flops, t_prom.time_us) if t_prom else None)}) "
          f"| xla_bf16 {T.fmt(row[7])} TFLOPS | diff {row[10]} | SM MHz "
          f"{T.mhz(t_ours)}/{T.mhz(t_fp8)}/{T.mhz(t_bf16)} | W "
          f"{T.watts(t_ours)}/{T.watts(t_fp8)}/{T.watts(t_bf16)} | of FP8 peak per clock "
          f"{T.per_clock(row[3], t_ours)}/{T.per_clock(row[5], t_fp8)}", flush=True)
    if not args.no_write and records:  # after every shape: a later crash keeps what was measured
      T.write_results(args.out, records)

  print()
  T.print_table(
      [[r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7],
        T.fmt(r[8], 2) if r[8] is not None else "-", T.fmt(r[9], 2) if r[9] is not None else "-",
        r[10], r[11], T.fmt(r[12], 0) if r[12] is not None else "-", r[13],
        T.fmt(r[14], 2) if r[14] is not None else "-"] for r in rows],
      ["shape MxNxK", "config", "ours us", "ours TFLOPS", "ours GB/s", "xla_fp8 TFLOPS",
       "xla_fp8 via", "xla_bf16 TFLOPS", "x vs fp8", "x vs bf16", "diff", "kern us",
       "kern GB/s", "xla_fp8 kern us", "kern x vs fp8"],
      title=f"fp8_gemm_nt on {T.device_name()} (x vs ...: t_xla / t_ours, > 1 = ours faster)")

  return T.finish(args.out, args.no_write, records, failures)


if __name__ == "__main__":
  sys.exit(main())
