"""M-grouped FP8 GEMM benchmark (MoE forward / decode): jax_deepgemm vs XLA's bf16 GEMMs.

For every case, in one process:
  op "m_grouped_contiguous" (experts' tokens sorted and concatenated, ``ragged_dot``'s layout)
    jax_deepgemm     ``m_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, group_sizes)`` on
                     pre-quantized inputs: a e4m3 [M, K] (1x128 scales), b e4m3 [G, N, K]
                     (128x128 scales), group_sizes int32 [G] on device -> bf16 [M, N].
    ragged_dot_bf16  ``jax.lax.ragged_dot(x, w, group_sizes)``, x bf16 [M, K], w bf16 [G, K, N]
                     -> bf16. XLA's GPU compiler either expands it into a dense masked dot
                     over all G groups (G times the work; ``[G, M, K]`` temporaries, so large G
                     runs out of memory: recorded as "OOM") or, with
                     ``XLA_FLAGS=--xla_gpu_experimental_use_ragged_dot_fusion=true`` on a new
                     enough XLA + cuDNN, hands it to cuDNN's grouped GEMM; the record's
                     ``config`` says what it compiled to.
  op "m_grouped_masked" (decode layout [G, M_max, K]; masked_m = expected_m = M_max, or in the
  "dg" cases DeepGEMM's protocol: M_max 4096, masked_m drawn per group as
  int(expected_m * U(0.7, 1.3)), fixed seed)
    jax_deepgemm     ``m_grouped_fp8_gemm_nt_masked(a, sa, b, sb, masked_m, expected_m)``.
                     The "dg" cases also record our kernel's time into a caller's ``out``
                     (``kernel_us_into_out``; ``..._chill_into_out`` under ``--chill-gb``): rows
                     past masked_m untouched, as DeepGEMM's kernel leaves them.
    xla_bf16_einsum  ``einsum("gmk,gnk->gmn")`` in bf16 (a batched cuBLAS GEMM over all M_max
                     rows: in the "dg" cases ~4x the counted work).
    ragged_dot_bf16  ``jax.lax.ragged_dot`` in bf16 on the same rows packed [G * M_max, K] with
                     group sizes masked_m (what a ragged_dot user would run; the issue's
                     "x vs ragged_dot" bar is over every grouped shape, masked ones included).

Cases (G groups x rows per group, N, K):
  4x8192 (4096, 7168), 4x8192 (7168, 2048), 8x4096 (7168, 2048), 32x512 (2048, 7168),
  256x64 (2048, 7168); DeepSeek-V3-like routing, 256 experts top-8 over 4096 and 16384 tokens
  (M = tokens * 8 rows; group sizes from a Zipf-skewed top-k routing: expert e has weight
  1/rank(e)^s, ``--zipf-s``, default 0.5, 0 = uniform; each token picks 8 distinct experts by the
  Gumbel-top-k trick; fixed seed) at (4096, 7168) and (7168, 2048); and an unaligned variant,
  8 groups of about 4096 rows whose sizes are not multiples of 128 (7168, 2048). Routed sizes
  are used as they come (not padded to 128 either). Masked: 1x1024, 2x512, 4x256 at (4096, 7168),
  every row valid, and the same under DeepGEMM's protocol ("dg 1x1024" ...: the bars' figures).

Records: m = total rows = sum(group_sizes) (the useful work), n, k, groups. TFLOPS = 2·m·N·K / t
(useful rows only, whatever the implementation computes). GB/s = bytes / t with bytes =
M·K + G·N·K + scales + 2·M·N (ours), 2·(M·K + G·N·K + M·N) (bf16). ``ratio_vs_ragged_dot`` /
``ratio_vs_xla_bf16`` = t_baseline / t_ours (> 1: ours is faster). ``diff`` (DeepGEMM's
1 - 2Σxy / Σ(x² + y²)) of our output against f32 HIGHEST dots of the dequantized inputs, over up
to 4 groups (first, largest, middle, last non-empty); > 1e-5 prints a warning. A failed
implementation gets a record with ``time_us`` null and ``error`` ("OOM" or the message).

jax_deepgemm's ``config`` is "ffi_kernel..." when its Hopper kernel ran and "reference:..." when
the op took its pure-JAX reference lowering (dequantize + f32 ragged_dot: slow, and as
memory-hungry as ragged_dot); the latter prints a warning on GPU.

Timing: ``_timing.bench`` (rotating input sets, median of bursts), after one compiled trial call
per implementation; if bench would take longer than ``--budget`` seconds (default 8) for it (a
very slow call, e.g. a reference lowering or XLA's dense expansion), the median of a few single
calls (each reads far more than L2) is recorded instead (``timing: "single_calls"``), and the
diff check is skipped. Results are written after every case, so a crash keeps what was measured.

  python benchmarks/bench_grouped.py                  # all cases, writes results/grouped.json
  python benchmarks/bench_grouped.py --quick --no-write   # CPU smoke run
  python benchmarks/bench_grouped.py --filter route --zipf-s 0   # routing cases, uniform routing
  python benchmarks/bench_grouped.py --filter masked --skip-baseline
  python benchmarks/bench_grouped.py --chill-gb 8     # also our kernel time under DeepGEMM's
                                                      # protocol (kernel_us_chill)
  python benchmarks/bench_grouped.py --mn-major-scales    # sa handed MN-major (below)

Kernel times count every kernel of the call. Our inputs come from another jit, so ``sa`` arrives
row-major and the call transposes it (a ~1.7 us kernel on an H100) before the GEMM, which a
per-token cast in the same jit spares (its scales are written MN-major). ``--mn-major-scales``
hands ours ``sa`` MN-major, ``[ceil(K/128), rows]``, as DeepGEMM's protocol hands its kernel:
the GEMM is then the call's only kernel (records say ``sa_layout``).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import math
import os
import re
import statistics
import sys
import time
import traceback

import numpy as np

import jax
import jax.numpy as jnp

import _timing as T  # first: it makes a source checkout importable
import jax_deepgemm as jd
from jax_deepgemm import _ffi as jd_ffi

OP_CONTIGUOUS = "m_grouped_contiguous"
OP_MASKED = "m_grouped_masked"
DIFF_WARN = 1e-5
KERNEL_TIMES_BELOW_US = 100.0  # --kernel-times auto: calls this short are dispatch-sensitive
BF16 = jnp.bfloat16
F32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST


def ceil_div(a, b):
  return -(-a // b)


def gemm_flops(rows, n, k):
  """``2·rows·N·K``: the useful work of a grouped GEMM over ``rows`` rows in groups (contiguous:
  sum(group_sizes); masked: sum(masked_m), the valid rows, not G·expected_m)."""
  return 2.0 * rows * n * k


def grouped_bytes(rows, groups, n, k):
  """Bytes moved at least, ``(ours, bf16 baselines)``, for ``rows`` rows of A against ``groups``
  weights: ours reads e4m3 A [rows, K] and B [G, N, K], f32 scales [rows, ceil(K/128)] and
  [G, ceil(N/128), ceil(K/128)], and writes bf16 [rows, N]; the bf16 GEMMs the same in bf16,
  without scales. (Group sizes or masked_m, G int32s, are left out.)"""
  kb, nb = ceil_div(k, 128), ceil_div(n, 128)
  ours = rows * k + groups * n * k + 4 * rows * kb + 4 * groups * nb * kb + 2 * rows * n
  return ours, 2 * (rows * k + groups * k * n + rows * n)


# ======================================================================= shared helpers
# (bench_train.py and bench_moe.py import these)

_OOM_MARKERS = ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory", "OUT_OF_MEMORY", "OOM",
                "Failed to allocate", "MemoryError")


def error_kind(e: BaseException) -> str:
  """``"OOM"`` for an out-of-memory error, else ``"Type: first line of the message"``."""
  text = f"{type(e).__name__}: {e}"
  if isinstance(e, MemoryError) or any(s in text for s in _OOM_MARKERS):
    return "OOM"
  first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
  return first if len(first) <= 300 else first[:297] + "..."


_BACKENDS = (
    (r"__cublas\$lt\$matmul\$f8", "cublaslt_f8"),
    (r'custom_call_target="jax_deepgemm_', "ffi_kernel"),
    (r"__triton_gemm|__triton_nested_gemm_fusion", "triton"),
    (r"__cudnn\$fusion", "cudnn"),
    (r'__cublas\$lt\$matmul"', "cublaslt"),
    (r"__cublas\$gemm", "cublas"),
)


def hlo_backends(hlo: str) -> str:
  """What the GEMMs of a compiled HLO became, e.g. ``"ffi_kernel+cublas"`` (or ``"dot"`` on CPU)."""
  found = [name for pat, name in _BACKENDS if re.search(pat, hlo)]
  if not found:
    found = ["dot"] if re.search(r"\bdot\(", hlo) else ["other"]
  return "+".join(dict.fromkeys(found))


def ours_config(backends: str | None) -> str | None:
  """Our ops' lowering as seen in the HLO: the FFI kernel, or the reference (pure-JAX) path."""
  if backends is None:
    return None
  return backends if "ffi_kernel" in backends else f"reference:{backends}"


def timing_config(args) -> dict:
  """``_timing.bench`` keyword arguments from the common flags (modest defaults, --quick tiny)."""
  return T.timing_from_args(args, warmup=2, iters=10, min_time_s=0.3)


def add_common_args(p: argparse.ArgumentParser, default_out: str, chill: bool = True) -> None:
  p.add_argument("--quick", action="store_true", help="tiny shapes, short timing (CPU smoke)")
  p.add_argument("--out", default=default_out,
                 help=f"results/<OUT>.json (default: {default_out})")
  p.add_argument("--no-write", action="store_true", help="do not write the results file")
  T.add_timing_args(p, iters=10, min_time_s=0.3)
  p.add_argument("--budget", type=float, default=8.0,
                 help="seconds one implementation's timing may take before falling back to a few "
                      "single calls (default 8)")
  if chill:
    p.add_argument("--chill-gb", type=float, default=0.0,
                   help="also record our kernel time the way DeepGEMM's figures were taken: each "
                        "call after writing this many GB (DeepGEMM: 8), so the GEMM starts at a "
                        "high clock, not at the power cap of back-to-back GEMMs (kernel_us_chill)")


def kernel_breakdown(runner, name: str, what: str, fn, make_inputs, *, n_sets: int, reps: int,
                     top: int = 12) -> dict:
  """Record fields of ``fn``'s kernels from a profile (``kernel_us``, ``kernel_per_call_us``,
  ...), printing the ``top`` largest per ``what`` (e.g. "fwd+bwd call"); {} without a GPU."""
  kt, _ = runner.attempt(f"{name}] [kernel times",
                         lambda: T.kernel_times(fn, make_inputs, n_sets=n_sets, reps=reps))
  if not kt:
    return {}
  print(f"[{name}] kernels of one {what}: {T.fmt(kt.total_us)} us in "
        f"{kt.launches_per_call:.0f} launches, {T.fmt(kt.gap_us)} us idle between "
        f"them; the largest (us per {what.split()[-1]}):", flush=True)
  for kname, us in kt.top(top):
    print(f"    {us:9.1f}  {kname[:110]}", flush=True)
  return dict(kt.extras(), kernel_per_call_us=kt.per_call_us)


def chill_extras(runner, name: str, fn, make_inputs, chill_gb: float, flops: float) -> dict:
  """``kernel_us_chill`` (and its TFLOPS) of ``fn`` under DeepGEMM's protocol, or {}.

  Only the op's kernels count (``_timing.kernel_times`` names them from the op's own
  executable)."""
  if chill_gb <= 0:
    return {}
  chilled, _ = runner.attempt(
      f"{name}] [chilled kernel times",
      lambda: T.kernel_times(fn, make_inputs, n_sets=8, chill_bytes=int(chill_gb * 1e9)))
  if not chilled:
    return {}
  out = chilled.chill_extras(chill_gb, flops)
  print(f"[{name}] kernel time after a {chill_gb:g} GB fill (DeepGEMM's protocol): "
        f"{T.fmt(chilled.total_us)} us {T.fmt(out['tflops_kernel_chill'])} TFLOPS", flush=True)
  return out


def measure(fn, make_inputs, timing: dict, budget_s: float):
  """Times ``fn(*make_inputs(key))``; returns ``(Timing, backends of the compiled HLO)``.

  One trial call first (compiled ahead of time, so its HLO names the GEMM backends, and an
  out-of-memory shape fails here before several input sets exist). If ``_timing.bench`` would
  then need more than ``budget_s`` seconds, the median of a few single calls (at most 5, within
  about ``budget_s``) is returned instead (``Timing.mode == "single_calls"``); a first call
  slower than ``budget_s`` is the only sample.
  """
  inputs = tuple(make_inputs(jax.random.fold_in(jax.random.PRNGKey(0), 0)))
  jax.block_until_ready(inputs)
  compiled = jax.jit(fn).lower(*inputs).compile()
  try:
    backends = hlo_backends(compiled.as_text())
  except Exception:  # pylint: disable=broad-except  (as_text is informational only)
    backends = "?"
  set_bytes = max(1, T.tree_nbytes(inputs))

  def one_call():
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*inputs))
    return time.perf_counter() - t0

  def single_calls(times):
    print(f"  (slow call, {times[-1]:.2f} s: timed {len(times)} single call(s) instead of "
          "bench's rotation)", flush=True)
    us = [x * 1e6 for x in times]
    t = T.Timing(time_us=statistics.median(us), min_us=min(us), max_us=max(us), n_rot=1,
                 inner=1, iters=len(us), set_bytes=set_bytes, host_bound=False)
    t.mode = "single_calls"
    return t, backends

  t_first = one_call()
  if t_first > budget_s:
    return single_calls([t_first])
  t1 = one_call()

  rotate = timing.get("rotate_bytes", T.DEFAULT_ROTATE_BYTES)
  max_rot = timing.get("max_rot", T.DEFAULT_MAX_ROT)
  n_rot = min(max(2, math.ceil(rotate / set_bytes)), max(2, max_rot))
  calls = 1 + timing.get("warmup", 3) + 8  # compile run, warmup, bench's calibration probe
  estimate = calls * n_rot * t1 + max(timing.get("min_time_s", 1.0),
                                      timing.get("iters", 25) * n_rot * t1)
  if estimate <= budget_s:
    del inputs, compiled
    gc.collect()
    t = T.bench(fn, make_inputs, **timing)
    t.mode = "bench"
    return t, backends

  times = [t1]
  reps = max(1, min(5, int((budget_s - t_first) / max(t1, 1e-9))))
  while len(times) < reps:
    times.append(one_call())
  return single_calls(times)


def slow(t, budget_s: float) -> bool:
  """True when one call took more than half the budget (skip optional extra checks then)."""
  return t is not None and t.time_us * 1e-6 > budget_s / 2


class Runner:
  """Runs one implementation at a time; an OOM is recorded, any other error also counts as a
  failure (exit status 1). Nothing stops the run."""

  def __init__(self):
    self.failures = 0

  def attempt(self, label: str, f):
    """``(value, None)``, or ``(None, error_kind)`` if ``f()`` raised."""
    try:
      return f(), None
    except Exception as e:  # pylint: disable=broad-except
      kind = error_kind(e)
      if kind == "OOM":
        msg = f"{type(e).__name__}: {e}".strip().splitlines()[0][:200]
        print(f"[{label}] OOM ({msg})", file=sys.stderr, flush=True)
      else:
        self.failures += 1
        print(f"[{label}] FAILED:", file=sys.stderr)
        traceback.print_exc()
        sys.stderr.flush()
      return None, kind
    finally:
      gc.collect()

  def time_impl(self, label, fn, make_inputs, timing, budget_s):
    """``(Timing | None, backends | None, error | None)``."""
    res, err = self.attempt(label, lambda: measure(fn, make_inputs, timing, budget_s))
    if res is None:
      return None, None, err
    return res[0], res[1], None


def impl_record(*, op, impl, m, n, k, groups, timing, error, flops, nbytes, **extras) -> dict:
  """A result record; a failed implementation (``timing`` None) gets null times and ``error``.
  ``nbytes`` None: no meaningful byte count, ``gbps`` null."""
  if timing is not None:
    rec = T.make_record(op=op, impl=impl, m=m, n=n, k=k, groups=groups, time_us=timing.time_us,
                        flops=flops, nbytes=nbytes or 0, timing=getattr(timing, "mode", "bench"),
                        **timing.extras(), **extras)
    if nbytes is None:
      rec["gbps"] = None
    return rec
  rec = {"op": op, "impl": impl, "m": m, "n": n, "k": k, "groups": groups,
         "device": T.device_name(), "run_id": T.run_id(), "time_us": None, "tflops": None,
         "gbps": None, "error": error or "error"}
  rec.update(extras)
  return rec


def cell(t, value, err):
  """Table cell: the value, or the error kind (OOM / error) when the implementation failed."""
  if t is not None:
    return value
  if err is None:
    return "-"
  return "OOM" if err == "OOM" else "error"


def ratio(t_base, t_ours):
  return t_base.time_us / t_ours.time_us if t_base is not None and t_ours is not None else None


# ======================================================================= cases

@dataclasses.dataclass(frozen=True)
class Contiguous:
  name: str
  sizes: tuple  # rows per group (host ints)
  n: int
  k: int
  routing: str  # "uniform" | "zipf(s=..)" | "unaligned"

  @property
  def groups(self):
    return len(self.sizes)

  @property
  def m(self):
    return int(sum(self.sizes))


@dataclasses.dataclass(frozen=True)
class Masked:
  name: str
  groups: int
  m_max: int
  n: int
  k: int
  expected: int = 0  # 0: every row valid; else DeepGEMM's draw around it

  @property
  def masked_m(self):
    """Valid rows per group (the inputs' masked_m): every row, or as DeepGEMM's masked test
    draws them, int(expected * U(0.7, 1.3)) per group (seeded by the case)."""
    if not self.expected:
      return (self.m_max,) * self.groups
    rng = np.random.default_rng([self.groups, self.expected, self.n, self.k])
    return tuple(min(self.m_max, int(self.expected * u))
                 for u in rng.uniform(0.7, 1.3, self.groups))

  @property
  def expected_m(self):
    return self.expected or self.m_max

  @property
  def m(self):
    """The rows counted (records' m, TFLOPS): the valid ones, sum(masked_m)."""
    return int(sum(self.masked_m))


def routed_sizes(tokens: int, experts: int, top_k: int, zipf_s: float, seed: int = 0):
  """Tokens per expert of a top-k routing: each token picks ``top_k`` distinct experts with
  probabilities ∝ 1/rank^s (Gumbel-top-k; experts' ranks shuffled). Sums to tokens*top_k."""
  rng = np.random.default_rng(seed)
  weights = 1.0 / np.arange(1, experts + 1, dtype=np.float64) ** zipf_s
  logw = np.log(weights[rng.permutation(experts)])
  counts = np.zeros(experts, np.int64)
  for lo in range(0, tokens, 4096):  # chunks: [chunk, experts] floats at a time
    hi = min(tokens, lo + 4096)
    g = logw[None, :] + rng.gumbel(size=(hi - lo, experts))
    ids = np.argpartition(-g, top_k - 1, axis=1)[:, :top_k]
    counts += np.bincount(ids.ravel(), minlength=experts)
  return tuple(int(c) for c in counts)


def unaligned_sizes(groups: int, per_group: int, seed: int = 0):
  """``groups`` sizes near ``per_group``, none a multiple of 128, summing to groups*per_group."""
  rng = np.random.default_rng(seed)
  while True:
    d = rng.integers(1, 128, groups - 1) * rng.choice([-1, 1], groups - 1)
    sizes = [per_group + int(x) for x in d]
    sizes.append(groups * per_group - sum(sizes))
    if all(s > 0 and s % 128 for s in sizes):
      return tuple(sizes)


def default_cases(zipf_s: float):
  """All cases, in run order: the ones most likely to run out of memory last."""
  zipf = f"zipf(s={zipf_s:g})" if zipf_s else "uniform_random"
  cases = [
      Contiguous("4x8192", (8192,) * 4, 4096, 7168, "uniform"),
      Contiguous("4x8192", (8192,) * 4, 7168, 2048, "uniform"),
      Contiguous("8x4096", (4096,) * 8, 7168, 2048, "uniform"),
      Contiguous("unaligned 8x~4096", unaligned_sizes(8, 4096), 7168, 2048, "unaligned"),
      Contiguous("32x512", (512,) * 32, 2048, 7168, "uniform"),
  ]
  cases += [Masked(f"{g}x{m}", g, m, 4096, 7168) for g, m in ((1, 1024), (2, 512), (4, 256))]
  cases += [Masked(f"dg {g}x{m}", g, 4096, 4096, 7168, expected=m)
            for g, m in ((1, 1024), (2, 512), (4, 256))]
  cases.append(Contiguous("256x64", (64,) * 256, 2048, 7168, "uniform"))
  for tokens in (4096, 16384):
    sizes = routed_sizes(tokens, 256, 8, zipf_s)
    for n, k in ((4096, 7168), (7168, 2048)):
      cases.append(Contiguous(f"route256top8 t{tokens}", sizes, n, k, zipf))
  return cases


def quick_cases(zipf_s: float):
  zipf = f"zipf(s={zipf_s:g})" if zipf_s else "uniform_random"
  return [
      Contiguous("4x128", (128,) * 4, 256, 512, "uniform"),
      Contiguous("unaligned 4x~200", unaligned_sizes(4, 200), 256, 320, "unaligned"),
      Masked("2x64", 2, 64, 256, 512),
      Masked("dg 2x64", 2, 256, 256, 512, expected=64),
      Contiguous("16x32", (32,) * 16, 128, 256, "uniform"),
      Contiguous("route16top4 t64", routed_sizes(64, 16, 4, zipf_s), 256, 384, zipf),
  ]


# ======================================================================= implementations

def ours_contiguous(a, sa, b, sb, group_sizes):
  return jd.m_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, group_sizes)


def ragged_dot_bf16(x, w, group_sizes):
  return jax.lax.ragged_dot(x, w, group_sizes)  # bf16 x bf16 -> bf16 (f32 accumulation inside)


def ours_masked(a, sa, b, sb, masked_m, *, expected_m):
  return jd.m_grouped_fp8_gemm_nt_masked(a, sa, b, sb, masked_m, expected_m=expected_m)


def ours_masked_into(a, sa, b, sb, masked_m, out, *, expected_m):
  """The "dg" cases as DeepGEMM's kernel runs them: into the caller's buffer, rows past
  masked_m left alone (``out=``)."""
  return jd.m_grouped_fp8_gemm_nt_masked(a, sa, b, sb, masked_m, expected_m=expected_m, out=out)


def with_out(make_inputs, case: "Masked"):
  """``make_inputs`` plus one shared bf16 ``out`` buffer (random: nothing to skip)."""
  out = jax.random.normal(jax.random.PRNGKey(99), (case.groups, case.m_max, case.n), BF16)
  return lambda key: (*make_inputs(key), out)


# Our GEMM kernel's name in profiler traces: the into-out timings count it alone (not the
# copy of `out` that XLA makes for a buffer that is not donated, as a decode loop would).
GEMM_KERNEL = "fp8_gemm_nt_kernel"


def into_out_extras(runner, name, fn, make_inputs, chill_gb, flops) -> dict:
  """``kernel_us_into_out`` (and under ``--chill-gb``, ``kernel_us_chill_into_out``): our
  kernel's time per call writing into ``out``, with TFLOPS over the valid rows."""
  out = {}
  for key, chill in (("into_out", 0), ("chill_into_out", chill_gb)):
    if key == "chill_into_out" and chill_gb <= 0:
      continue
    kt, _ = runner.attempt(f"{name}] [kernel times, {key}", lambda c=chill: T.kernel_times(
        fn, make_inputs, n_sets=8, chill_bytes=int(c * 1e9)))
    us = sum(v for k, v in (kt.per_call_us if kt else {}).items() if GEMM_KERNEL in k)
    if us > 0:
      out[f"kernel_us_{key}"] = us
      out[f"tflops_kernel_{key}"] = T.tflops(flops, us)
      print(f"[{name}] our kernel into out ({key}): {T.fmt(us)} us "
            f"{T.fmt(T.tflops(flops, us))} TFLOPS", flush=True)
  return out


# --mn-major-scales: sa arrives as [ceil(K/128), rows] (rows = M, or G * M_max); the
# transposes below are layouts, not kernels (the GEMMs take sa MN-major).
def ours_contiguous_mn_major(a, sa_t, b, sb, group_sizes):
  return jd.m_grouped_fp8_gemm_nt_contiguous(a, sa_t.T, b, sb, group_sizes)


def ours_masked_mn_major(a, sa_t, b, sb, masked_m, *, expected_m):
  sa = sa_t.T.reshape(a.shape[0], a.shape[1], sa_t.shape[0])
  return jd.m_grouped_fp8_gemm_nt_masked(a, sa, b, sb, masked_m, expected_m=expected_m)


def mn_major_inputs(make_inputs):
  """``make_inputs`` with sa handed over as ``[ceil(K/128), rows]``."""
  @jax.jit
  def make(key):
    a, sa, *rest = make_inputs(key)
    return (a, sa.reshape(-1, sa.shape[-1]).T, *rest)
  return make


def xla_bf16_einsum(x, w):
  return jnp.einsum("gmk,gnk->gmn", x, w)


def contiguous_fp8_inputs(case: Contiguous):
  m, n, k, g = case.m, case.n, case.k, case.groups
  sizes = np.asarray(case.sizes, np.int32)

  @jax.jit
  def make(key):
    ka, kb = jax.random.split(key)
    a, sa = jd.per_token_cast_to_fp8(jax.random.normal(ka, (m, k), BF16))
    # One expert at a time: no [G, N, K] random-bit or f32 temporaries (256 x 4096 x 7168).
    b, sb = jax.lax.map(lambda kk: jd.per_block_cast_to_fp8(jax.random.normal(kk, (n, k), BF16)),
                        jax.random.split(kb, g))
    return a, sa, b, sb, jnp.asarray(sizes)
  return make


def contiguous_bf16_inputs(case: Contiguous):
  m, n, k, g = case.m, case.n, case.k, case.groups
  sizes = np.asarray(case.sizes, np.int32)

  @jax.jit
  def make(key):
    kx, kw = jax.random.split(key)
    w = jax.lax.map(lambda kk: jax.random.normal(kk, (k, n), BF16), jax.random.split(kw, g))
    return jax.random.normal(kx, (m, k), BF16), w, jnp.asarray(sizes)
  return make


def masked_fp8_inputs(case: Masked):
  g, mm, n, k = case.groups, case.m_max, case.n, case.k

  @jax.jit
  def make(key):
    ka, kb = jax.random.split(key)
    a, sa = jd.per_token_cast_to_fp8(jax.random.normal(ka, (g, mm, k), BF16))
    b, sb = jd.per_block_cast_to_fp8(jax.random.normal(kb, (g, n, k), BF16))
    return a, sa, b, sb, jnp.asarray(case.masked_m, jnp.int32)
  return make


def masked_bf16_inputs(case: Masked):
  g, mm, n, k = case.groups, case.m_max, case.n, case.k

  @jax.jit
  def make(key):
    kx, kw = jax.random.split(key)
    return jax.random.normal(kx, (g, mm, k), BF16), jax.random.normal(kw, (g, n, k), BF16)
  return make


def masked_ragged_inputs(case: Masked):
  """The masked case's rows for ragged_dot: x [G * M_max, K], w [G, K, N], sizes M_max."""
  g, mm, n, k = case.groups, case.m_max, case.n, case.k

  @jax.jit
  def make(key):
    kx, kw = jax.random.split(key)
    return (jax.random.normal(kx, (g * mm, k), BF16), jax.random.normal(kw, (g, k, n), BF16),
            jnp.asarray(case.masked_m, jnp.int32))
  return make


def check_groups(sizes) -> list[int]:
  """Up to 4 non-empty groups to check: first, largest, middle, last."""
  nonempty = [i for i, s in enumerate(sizes) if s > 0]
  if not nonempty:
    return []
  pick = [nonempty[0], max(nonempty, key=lambda i: sizes[i]), nonempty[len(nonempty) // 2],
          nonempty[-1]]
  return sorted(dict.fromkeys(pick))


def contiguous_diff(case: Contiguous) -> float:
  a, sa, b, sb, gs = contiguous_fp8_inputs(case)(jax.random.PRNGKey(1234))
  offsets = np.concatenate([[0], np.cumsum(case.sizes)]).astype(int)
  groups = check_groups(case.sizes)

  @jax.jit
  def diff(a, sa, b, sb, gs):
    d = jd.m_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, gs).astype(F32)
    num = den = jnp.zeros((), F32)
    for g in groups:
      lo, hi = int(offsets[g]), int(offsets[g + 1])
      x = jd.dequantize_per_token(a[lo:hi], sa[lo:hi])
      w = jd.dequantize_per_block(b[g], sb[g])
      y = jnp.dot(x, w.T, precision=HIGHEST, preferred_element_type=F32)
      num = num + jnp.sum(jnp.square(d[lo:hi] - y))
      den = den + jnp.sum(d[lo:hi] ** 2 + y * y)
    return num / jnp.maximum(den, 1e-30)
  return float(diff(a, sa, b, sb, gs))


def masked_diff(case: Masked) -> float:
  a, sa, b, sb, mm = masked_fp8_inputs(case)(jax.random.PRNGKey(1234))

  @jax.jit
  def diff(a, sa, b, sb, mm):
    d = jd.m_grouped_fp8_gemm_nt_masked(a, sa, b, sb, mm, expected_m=case.expected_m)
    y = jnp.einsum("gmk,gnk->gmn", jd.dequantize_per_token(a, sa), jd.dequantize_per_block(b, sb),
                   precision=HIGHEST, preferred_element_type=F32)
    valid = jnp.arange(case.m_max)[None, :, None] < mm[:, None, None]  # the rows computed
    d, y = jnp.where(valid, d.astype(F32), 0), jnp.where(valid, y, 0)
    return jnp.sum(jnp.square(d - y)) / jnp.maximum(jnp.sum(d * d + y * y), 1e-30)
  return float(diff(a, sa, b, sb, mm))


# ======================================================================= main

def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  add_common_args(p, "grouped")
  p.add_argument("--kernel-times", choices=("auto", "on", "off"), default="auto",
                 help="also record profiler (CUPTI) kernel times (auto: calls under "
                      f"{KERNEL_TIMES_BELOW_US:g} us, where host dispatch shows in the timing)")
  p.add_argument("--zipf-s", type=float, default=0.5,
                 help="routing skew: expert weight 1/rank^s (default 0.5; 0 = uniform random)")
  p.add_argument("--filter", default=None,
                 help="only cases whose op or name contains this text, e.g. route, masked, 8x4096")
  p.add_argument("--skip-baseline", action="store_true", help="time jax_deepgemm only")
  p.add_argument("--no-diff", action="store_true", help="skip the accuracy check")
  p.add_argument("--mn-major-scales", action="store_true",
                 help="hand ours A's scales MN-major, as DeepGEMM's protocol does, with MN-major "
                      "scales forced on (no transpose of sa in the timed call)")
  args = p.parse_args(argv)
  if args.mn_major_scales:  # read when the GEMMs lower: before anything is traced
    os.environ[jd_ffi.MN_MAJOR_SCALES_ENV] = "1"

  timing = timing_config(args)
  cases = (quick_cases if args.quick else default_cases)(args.zipf_s)
  if args.filter:
    cases = [c for c in cases
             if args.filter in c.name
             or args.filter in (OP_CONTIGUOUS if isinstance(c, Contiguous) else OP_MASKED)]

  T.print_header()
  is_gpu = jax.devices()[0].platform in ("gpu", "cuda")
  runner = Runner()
  records, rows = [], []

  for case in cases:
    m, n, k = case.m, case.n, case.k
    g = case.groups
    name = f"{case.name} n{n} k{k}"
    flops = gemm_flops(m, n, k)
    bytes_ours, bytes_bf16 = grouped_bytes(m, g, n, k)
    if isinstance(case, Contiguous):
      op, base_impl, ratio_key = OP_CONTIGUOUS, "ragged_dot_bf16", "ratio_vs_ragged_dot"
      sizes = np.asarray(case.sizes)
      extras = dict(routing=case.routing, size_min=int(sizes.min()), size_max=int(sizes.max()),
                    imbalance=float(sizes.max() / max(sizes.mean(), 1e-9)),
                    aligned=bool(np.all(sizes % 128 == 0)))
      if g <= 32:
        extras["group_sizes"] = [int(s) for s in case.sizes]
      print(f"[{op} {name}] G={g} M={m} group sizes min/mean/max {sizes.min()}/"
            f"{sizes.mean():.0f}/{sizes.max()} ({case.routing})", flush=True)
      ours_fn, ours_inputs = ours_contiguous, contiguous_fp8_inputs(case)
      if args.mn_major_scales:
        ours_fn, ours_inputs = ours_contiguous_mn_major, mn_major_inputs(ours_inputs)
      base_fn, base_inputs = ragged_dot_bf16, contiguous_bf16_inputs(case)
      diff_fn = lambda case=case: contiguous_diff(case)  # noqa: E731
      more_bases = []
    else:
      op, base_impl, ratio_key = OP_MASKED, "xla_bf16_einsum", "ratio_vs_xla_bf16"
      extras = dict(m_max=case.m_max, masked_m=list(case.masked_m), expected_m=case.expected_m)
      print(f"[{op} {name}] G={g} M_max={case.m_max} masked_m={list(case.masked_m)} "
            f"expected_m={case.expected_m}", flush=True)
      ours_fn = functools.partial(
          ours_masked_mn_major if args.mn_major_scales else ours_masked,
          expected_m=case.expected_m)
      ours_inputs = masked_fp8_inputs(case)
      if args.mn_major_scales:
        ours_inputs = mn_major_inputs(ours_inputs)
      base_fn, base_inputs = xla_bf16_einsum, masked_bf16_inputs(case)
      more_bases = [("ragged_dot_bf16", ragged_dot_bf16, masked_ragged_inputs(case),
                     "ratio_vs_ragged_dot")]
      diff_fn = lambda case=case: masked_diff(case)  # noqa: E731

    t_ours, via_ours, e_ours = runner.time_impl(f"{name}] [jax_deepgemm", ours_fn, ours_inputs,
                                                timing, args.budget)
    t_base = via_base = e_base = None
    if not args.skip_baseline:
      t_base, via_base, e_base = runner.time_impl(f"{name}] [{base_impl}", base_fn, base_inputs,
                                                  timing, args.budget)
    more = []  # (impl, timing, via, error, ratio key) of the further baselines
    for impl, fn, inputs, key in ([] if args.skip_baseline else more_bases):
      more.append((impl, *runner.time_impl(f"{name}] [{impl}", fn, inputs, timing, args.budget),
                   key))
    diff = None
    if t_ours is not None and not args.no_diff and slow(t_ours, args.budget):
      print(f"[{name}] diff skipped (slow call)", flush=True)
    elif t_ours is not None and not args.no_diff:
      diff, _ = runner.attempt(f"{name}] [diff", diff_fn)
      if diff is not None and not diff <= DIFF_WARN:
        print(f"WARNING [{name}]: diff {diff:.3e} > {DIFF_WARN:g}", file=sys.stderr)

    # Short calls (decode): also the profiler's kernel times, free of host dispatch.
    k_ours = k_base = None
    if args.kernel_times == "on" or (args.kernel_times == "auto" and t_ours is not None
                                     and t_ours.time_us < KERNEL_TIMES_BELOW_US):
      k_ours, _ = runner.attempt(f"{name}] [kernel times",
                                 lambda: T.kernel_times(ours_fn, ours_inputs, n_sets=8))
      if t_base is not None:
        k_base, _ = runner.attempt(f"{name}] [kernel times {base_impl}",
                                   lambda: T.kernel_times(base_fn, base_inputs, n_sets=8))
      if k_ours:
        print(f"[{name}] kernel time per call: ours {T.fmt(k_ours.total_us)} us, {base_impl} "
              f"{T.fmt(k_base and k_base.total_us)} us", flush=True)
    kt = lambda x: x.extras() if x else {}  # noqa: E731
    chill = (chill_extras(runner, name, ours_fn, ours_inputs, args.chill_gb, flops)
             if t_ours is not None else {})
    if (is_gpu and t_ours is not None and isinstance(case, Masked) and case.expected
        and not args.mn_major_scales):
      chill.update(into_out_extras(
          runner, name, functools.partial(ours_masked_into, expected_m=case.expected_m),
          with_out(ours_inputs, case), args.chill_gb, flops))

    r = ratio(t_base, t_ours)
    cfg = ours_config(via_ours)
    if is_gpu and cfg is not None and cfg.startswith("reference"):
      print(f"WARNING [{name}]: jax_deepgemm ran its reference lowering ({cfg}), not a kernel",
            file=sys.stderr)
    common = dict(op=op, m=m, n=n, k=k, groups=g, flops=flops, **extras)
    sa_layout = dict(sa_layout="mn_major" if args.mn_major_scales else "row_major")
    records.append(impl_record(impl="jax_deepgemm", timing=t_ours, error=e_ours,
                               nbytes=bytes_ours, config=cfg, diff=diff, **{ratio_key: r},
                               **{key: ratio(t, t_ours) for _, t, _, _, key in more},
                               **kt(k_ours), **chill, **sa_layout, **common))
    if not args.skip_baseline:
      records.append(impl_record(impl=base_impl, timing=t_base, error=e_base, nbytes=bytes_bf16,
                                 config=via_base, **kt(k_base), **common))
    for impl, t, via, e, _ in more:
      records.append(impl_record(impl=impl, timing=t, error=e, nbytes=bytes_bf16, config=via,
                                 **common))

    tf = lambda t: T.tflops(flops, t.time_us) if t else None  # noqa: E731
    row = [op.replace("m_grouped_", ""), name, g, m,
           cell(t_ours, t_ours and t_ours.time_us, e_ours), cell(t_ours, tf(t_ours), e_ours),
           cell(t_ours, t_ours and T.gbps(bytes_ours, t_ours.time_us), e_ours), cfg or "-",
           base_impl, cell(t_base, t_base and t_base.time_us, e_base),
           cell(t_base, tf(t_base), e_base), via_base or "-",
           T.fmt(r, 2) if r is not None else "-", T.fmt(diff, 2) if diff is not None else "-"]
    rows.append(row)
    show = lambda x: x if isinstance(x, str) else T.fmt(x)  # noqa: E731
    print(f"[{name}] ours {show(row[4])} us {show(row[5])} TFLOPS ({row[7]}) | {base_impl} "
          f"{show(row[9])} us {show(row[10])} TFLOPS ({row[11]}) | x {row[12]} | diff {row[13]}",
          flush=True)
    for impl, t, via, e, key in more:
      print(f"[{name}] {impl} {show(cell(t, t and t.time_us, e))} us "
            f"{show(cell(t, tf(t), e))} TFLOPS ({via or '-'}) | x {T.fmt(ratio(t, t_ours), 2)}",
            flush=True)
    if not args.no_write:  # after every case: a crash later on keeps what was measured
      T.write_results(args.out, records)

  print()
  T.print_table(rows, ["op", "case", "G", "M rows", "ours us", "ours TFLOPS", "ours GB/s",
                       "ours via", "baseline", "base us", "base TFLOPS", "base via", "x vs base",
                       "diff"],
                title=f"m-grouped GEMMs on {T.device_name()} (TFLOPS of useful rows; x vs base: "
                      "t_base / t_ours, > 1 = ours faster)")

  return T.finish(args.out, args.no_write, records, runner.failures, " (not counting OOMs)")


if __name__ == "__main__":
  sys.exit(main())
