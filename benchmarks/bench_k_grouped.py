"""K-grouped FP8 weight-gradient GEMM benchmark: jax_deepgemm vs XLA's bf16 ragged dot.

For every case (G experts x tokens per expert, output [G, N, K]), in one process:
  jax_deepgemm     ``k_grouped_fp8_gemm_tn_contiguous(a, sa, b, sb, group_sizes,
                   token_major=True)`` on pre-quantized token-major inputs (a e4m3 [N, T],
                   b e4m3 [K, T], 1x128 scales along tokens; what the backward pass of
                   ``fp8_grouped_linear`` feeds it) -> f32 [G, N, K].
  ragged_dot_bf16  ``jax.lax.ragged_dot_general`` with the token axis ragged and contracted
                   (x bf16 [T, N], y bf16 [T, K] -> f32 [G, N, K]), which is what autodiff of
                   ``jax.lax.ragged_dot`` emits for the weight gradient.
Also ``tokens_unaligned``: the same with group sizes that are not multiples of 128.

Both take the group sizes as an int32 operand on the device, as the backward pass does (not
as constants XLA could fold).

Records (issue convention for K-grouped runs): m = total tokens, n and k = the output's two
dimensions, groups = G. TFLOPS = 2·T·N·K / t. GB/s = bytes / t with bytes = T·(N + K) + scales
4·(N + K)·ceil(T/128) + 4·G·N·K (ours: e4m3 operands, f32 scales, f32 out),
2·T·(N + K) + 4·G·N·K (bf16). ``ratio_vs_ragged_dot`` = t_base / t_ours.
``diff``: DeepGEMM's metric of ours against f32 HIGHEST of the dequantized inputs (first group).

  python benchmarks/bench_k_grouped.py               # writes results/k_grouped.json
  python benchmarks/bench_k_grouped.py --quick --no-write
  python benchmarks/bench_k_grouped.py --chill-gb 8  # also DeepGEMM's protocol (kernel_us_chill)
  python benchmarks/bench_k_grouped.py --cases 64x~1024x7168x4096,64x~1024x2048x7168 --bf16-out
                                     # the MoE layer's wgrads (64 experts, top-8 of 8192 tokens)
"""
from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

import _timing as T  # first: it makes a source checkout importable
import bench_grouped as BG
import jax_deepgemm as jd

OP = "k_grouped_wgrad"
# (G, tokens per expert, N, K): the bars are 4 x 8192 and 4 x 4096 at N 7168, K 4096.
CASES = [(4, 8192, 7168, 4096, False), (4, 4096, 7168, 4096, False),
         (4, 8192, 2048, 7168, False), (8, 4096, 7168, 4096, True)]
QUICK = [(2, 200, 64, 96, False), (3, 150, 32, 64, True)]


def sizes_for(g, per, unaligned, seed=0):
  if not unaligned:
    return np.full(g, per, np.int32)
  return np.asarray(BG.unaligned_sizes(g, per, seed), np.int32)


def k_grouped_flops(t, n, k):
  """``2·T·N·K``: every token contributes to its group's N x K output."""
  return 2.0 * t * n * k


def k_grouped_bytes(t, groups, n, k, out_bytes=4):
  """Bytes moved at least, ``(ours, bf16 baseline)``: ours reads e4m3 a [N, T] and b [K, T]
  with f32 scales [ceil(T/128), N] and [ceil(T/128), K] and writes f32 [G, N, K]; the bf16
  baseline reads bf16 x [T, N] and y [T, K] and writes the same f32 output."""
  scales = 4 * (n + k) * (-(-t // 128))
  return t * (n + k) + scales + out_bytes * groups * n * k, 2 * t * (n + k) + 4 * groups * n * k


def fp8_inputs(t, n, k, gs):
  gs = np.asarray(gs, np.int32)

  @jax.jit
  def make(key):
    kx, ky = jax.random.split(key)
    x = jax.random.normal(kx, (t, n), jnp.bfloat16)
    y = jax.random.normal(ky, (t, k), jnp.bfloat16)
    a, sa = jd.per_token_cast_transpose_to_fp8(x)
    b, sb = jd.per_token_cast_transpose_to_fp8(y)
    return a, sa, b, sb, jnp.asarray(gs)
  return make


def bf16_inputs(t, n, k, gs):
  gs = np.asarray(gs, np.int32)

  @jax.jit
  def make(key):
    kx, ky = jax.random.split(key)
    return (jax.random.normal(kx, (t, n), jnp.bfloat16),
            jax.random.normal(ky, (t, k), jnp.bfloat16), jnp.asarray(gs))
  return make


def ours(a, sa, b, sb, gs):
  return jd.k_grouped_fp8_gemm_tn_contiguous(a, sa, b, sb, gs, token_major=True)


def ours_bf16(a, sa, b, sb, gs):  # as fp8_grouped_linear's backward runs it for bf16 weights
  return jd.k_grouped_fp8_gemm_tn_contiguous(a, sa, b, sb, gs, token_major=True,
                                             out_dtype=jnp.bfloat16)


def parse_case(spec: str):
  """``GxPERxNxK``, ``~`` before PER for sizes that are not multiples of 128 (e.g.
  ``64x~1024x7168x4096``: the MoE layer's fused gate|up wgrad at 64 experts)."""
  try:
    g, per, n, k = spec.split("x")
    return int(g), int(per.lstrip("~")), int(n), int(k), per.startswith("~")
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected GxPERxNxK (PER may start with ~), got {spec!r}")


def ragged_bf16(x, y, gs):
  dn = jax.lax.RaggedDotDimensionNumbers(
      dot_dimension_numbers=(([0], [0]), ([], [])), lhs_ragged_dimensions=[0],
      rhs_group_dimensions=[])
  return jax.lax.ragged_dot_general(x, y, gs, dn, preferred_element_type=jnp.float32)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  BG.add_common_args(p, "k_grouped")
  p.add_argument("--skip-baseline", action="store_true", help="time jax_deepgemm only")
  p.add_argument("--cases", type=lambda v: [parse_case(c) for c in v.split(",")], default=None,
                 help="comma-separated GxPERxNxK cases instead of the defaults, ~PER: unaligned")
  p.add_argument("--bf16-out", action="store_true",
                 help="ours writes bf16 (fp8_grouped_linear's wgrad for bf16 weights), not f32")
  args = p.parse_args(argv)
  fn = ours_bf16 if args.bf16_out else ours
  timing = BG.timing_config(args)
  T.print_header()
  runner = BG.Runner()
  records, rows = [], []
  for g, per, n, k, unaligned in args.cases or (QUICK if args.quick else CASES):
    gs = sizes_for(g, per, unaligned)
    t = int(gs.sum())
    name = f"{g}x{'~' if unaligned else ''}{per} n{n} k{k}"
    flops = k_grouped_flops(t, n, k)
    tile = jd.k_grouped_config(g, n, k) if jd.use_kernels() else "reference"
    print(f"[{OP} {name}] {tile}", flush=True)
    t_ours, via_ours, e_ours = runner.time_impl(f"{name}] [jax_deepgemm", fn,
                                                fp8_inputs(t, n, k, gs), timing, args.budget)
    t_base = via_base = e_base = None
    if not args.skip_baseline:
      t_base, via_base, e_base = runner.time_impl(f"{name}] [ragged_dot_bf16", ragged_bf16,
                                                  bf16_inputs(t, n, k, gs), timing, args.budget)
    diff = None
    if t_ours is not None:
      a, sa, b, sb, gs_dev = fp8_inputs(t, n, k, gs)(jax.random.PRNGKey(1))
      d = jax.jit(fn)(a, sa, b, sb, gs_dev)[0].astype(jnp.float32)
      t0 = int(gs[0])
      x = jd.dequantize_per_token(a.T, sa, axis=0)[:t0]
      y = jd.dequantize_per_token(b.T, sb, axis=0)[:t0]
      want = jnp.dot(x.T, y, precision=jax.lax.Precision.HIGHEST)
      diff = float(1 - 2 * jnp.sum(d * want) / jnp.sum(d * d + want * want))
    chill = (BG.chill_extras(runner, name, fn, fp8_inputs(t, n, k, gs), args.chill_gb, flops)
             if t_ours is not None else {})
    r = BG.ratio(t_base, t_ours)
    nbytes, nbytes_bf16 = k_grouped_bytes(t, g, n, k, 2 if args.bf16_out else 4)
    common = dict(op=OP, m=t, n=n, k=k, groups=g, flops=flops, tokens_per_group=per,
                  unaligned=unaligned, out_dtype="bfloat16" if args.bf16_out else "float32")
    records.append(BG.impl_record(impl="jax_deepgemm", timing=t_ours, error=e_ours,
                                  nbytes=nbytes, config=f"{BG.ours_config(via_ours)} {tile}",
                                  diff=diff,
                                  ratio_vs_ragged_dot=r, **chill, **common))
    if not args.skip_baseline:
      records.append(BG.impl_record(impl="ragged_dot_bf16", timing=t_base, error=e_base,
                                    nbytes=nbytes_bf16, config=via_base,
                                    **common))
    rows.append([name, g, t, BG.cell(t_ours, float(t_ours) if t_ours else None, e_ours),
                 BG.cell(t_ours, T.tflops(flops, float(t_ours)) if t_ours else None, e_ours),
                 BG.cell(t_base, float(t_base) if t_base else None, e_base),
                 BG.cell(t_base, T.tflops(flops, float(t_base)) if t_base else None, e_base),
                 T.fmt(r, 2) if r else "-", f"{diff:.1e}" if diff is not None else "-"])
    print(f"[{name}] ours {T.fmt(rows[-1][4])} TFLOPS | ragged_dot_bf16 {T.fmt(rows[-1][6])} TFLOPS | "
          f"x {rows[-1][7]} | diff {rows[-1][8]} | SM MHz {T.mhz(t_ours)}/{T.mhz(t_base)} | "
          f"W {T.watts(t_ours)}/{T.watts(t_base)} | of FP8 peak per clock "
          f"{T.per_clock(T.tflops(flops, float(t_ours)) if t_ours else None, t_ours)}",
          flush=True)
  print(f"\nK-grouped wgrad on {T.device_name()} (TFLOPS = 2·T·N·K / t)")
  T.print_table(rows, ["case", "G", "tokens", "ours us", "ours TFLOPS", "base us", "base TFLOPS",
                       "x vs base", "diff"])
  return T.finish(args.out, args.no_write, records, runner.failures)


if __name__ == "__main__":
  sys.exit(main())
