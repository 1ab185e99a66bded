"""Training-step benchmark of the FP8 layers: forward + backward against bf16 XLA.

For every shape, in one process, the time of ``jax.value_and_grad`` (w.r.t. x and w) of
``sum(layer(x, w) * cotangent)``, i.e. one forward GEMM plus the two backward GEMMs (dgrad
``dY·Wᵀ`` and wgrad ``Xᵀ·dY``) with their quantization and casts; all of x, w, the cotangent
bf16, the loss and both gradients returned (nothing is dead code):

  op "fp8_grouped_linear_fwd_bwd" (x [M, K], w [G, K, N], equal group sizes M/G, int32 on device)
    jax_deepgemm     ``jax_deepgemm.fp8_grouped_linear(x, w, group_sizes)`` (DeepSeek-V3's
                     recipe: FP8 forward and dgrad, K-grouped FP8 wgrad on token-axis scales)
    ragged_dot_bf16  ``jax.lax.ragged_dot(x, w, group_sizes)`` in bf16 and its autodiff (XLA's
                     GPU compiler expands ragged dots into dense masked dots unless cuDNN's
                     ragged-dot fusion is enabled: see bench_grouped.py; ``config`` says what it
                     compiled to)
  op "fp8_linear_fwd_bwd" (x [M, K], w [K, N])
    jax_deepgemm     ``jax_deepgemm.fp8_linear(x, w)``
    xla_bf16_dot     ``x @ w`` in bf16 (cuBLAS) and its autodiff

Shapes: grouped G x rows (N, K) = 4x8192 (4096, 7168), 4x8192 (7168, 2048), 8x4096 (7168, 2048);
dense M 4096, K 16384, N 7168.

TFLOPS = 3 · 2·M·N·K / t (forward + dgrad + wgrad). ``ratio_vs_*`` = t_bf16 / t_ours (> 1: ours
is faster). ``grad_diff``: DeepGEMM's 1 - 2Σxy / Σ(x² + y²) between the FP8 and the bf16
gradients on the same inputs (the larger of dx's and dw's; the FP8 recipe's error, ~1e-3, not a
bug check). A failed implementation gets a record with ``time_us`` null and ``error`` ("OOM" or the
message). Timing: ``_timing.bench`` via bench_grouped.measure (see bench_grouped.py).

  python benchmarks/bench_train.py                 # writes results/train.json
  python benchmarks/bench_train.py --quick --no-write   # CPU smoke run
  python benchmarks/bench_train.py --only dense         # fp8_linear only
  python benchmarks/bench_train.py --kernel-times       # + the kernels of one call, us each
"""
from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

import _timing as T  # first: it makes a source checkout importable
import jax_deepgemm as jd
import bench_grouped as BG  # shared helpers: measure, Runner, records

OP_GROUPED = "fp8_grouped_linear_fwd_bwd"
OP_DENSE = "fp8_linear_fwd_bwd"
BF16 = jnp.bfloat16
F32 = jnp.float32

# (groups, rows per group, N, K) and (M, N, K)
GROUPED_SHAPES = [(4, 8192, 4096, 7168), (4, 8192, 7168, 2048), (8, 4096, 7168, 2048)]
DENSE_SHAPES = [(4096, 7168, 16384)]
QUICK_GROUPED = [(4, 64, 256, 384), (8, 32, 128, 256)]
QUICK_DENSE = [(128, 256, 512)]


def fwd_bwd_flops(m, n, k):
  """``3·2·M·N·K``: the forward GEMM, dgrad and wgrad, each 2·M·N·K (grouped: M = all rows, in
  groups; dgrad and wgrad both needed, since the step differentiates x and w)."""
  return 3 * 2.0 * m * n * k


# ------------------------------------------------------------------ the implementations

def fwd_bwd(layer):
  """``(x, w, ct, *rest) -> (loss, (dx, dw))`` for ``loss = sum(layer(x, w, *rest) * ct)``."""
  def step(x, w, ct, *rest):
    def loss(x, w):
      return jnp.sum(layer(x, w, *rest).astype(F32) * ct.astype(F32))
    return jax.value_and_grad(loss, argnums=(0, 1))(x, w)
  return step


def ragged_dot_bf16(x, w, group_sizes):
  return jax.lax.ragged_dot(x, w, group_sizes)


def xla_bf16_dot(x, w):
  return x @ w


GROUPED_IMPLS = {"jax_deepgemm": fwd_bwd(jd.fp8_grouped_linear),
                 "ragged_dot_bf16": fwd_bwd(ragged_dot_bf16)}
DENSE_IMPLS = {"jax_deepgemm": fwd_bwd(jd.fp8_linear), "xla_bf16_dot": fwd_bwd(xla_bf16_dot)}


# ------------------------------------------------------------------ inputs

def grouped_inputs(g, rows, n, k):
  m = g * rows

  @jax.jit
  def make(key):
    kx, kw, kc = jax.random.split(key, 3)
    x = jax.random.normal(kx, (m, k), BF16)
    w = (jax.random.normal(kw, (g, k, n), F32) * k ** -0.5).astype(BF16)
    ct = jax.random.normal(kc, (m, n), BF16)
    return x, w, ct, jnp.full((g,), rows, jnp.int32)
  return make


def dense_inputs(m, n, k):
  @jax.jit
  def make(key):
    kx, kw, kc = jax.random.split(key, 3)
    x = jax.random.normal(kx, (m, k), BF16)
    w = (jax.random.normal(kw, (k, n), F32) * k ** -0.5).astype(BF16)
    ct = jax.random.normal(kc, (m, n), BF16)
    return x, w, ct
  return make


def grad_diff(ours, base, make_inputs) -> float:
  """The larger of dx's and dw's DeepGEMM diff between two implementations, same inputs."""
  inputs = make_inputs(jax.random.PRNGKey(1234))

  def d(x, y):
    x, y = x.astype(F32), y.astype(F32)
    return jnp.sum(jnp.square(x - y)) / jnp.maximum(jnp.sum(x * x + y * y), 1e-30)

  _, (dx1, dw1) = jax.jit(ours)(*inputs)
  _, (dx2, dw2) = jax.jit(base)(*inputs)
  return max(float(jax.jit(d)(dx1, dx2)), float(jax.jit(d)(dw1, dw2)))


# ------------------------------------------------------------------ main

def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  BG.add_common_args(p, "train", chill=False)
  p.add_argument("--skip-baseline", action="store_true", help="time jax_deepgemm only")
  p.add_argument("--no-diff", action="store_true", help="skip the FP8-vs-bf16 gradient check")
  p.add_argument("--kernel-times", action="store_true",
                 help="also profile one fwd+bwd call of ours: the kernels it runs, us per call "
                      "(kernel_us / kernel_per_call_us in the records)")
  p.add_argument("--only", choices=("grouped", "dense"), default=None,
                 help="time only the grouped or only the dense layer")
  args = p.parse_args(argv)

  timing = BG.timing_config(args)
  grouped = QUICK_GROUPED if args.quick else GROUPED_SHAPES
  dense = QUICK_DENSE if args.quick else DENSE_SHAPES
  cases = ([(OP_GROUPED, (g, rows, n, k)) for g, rows, n, k in grouped if args.only != "dense"]
           + [(OP_DENSE, (m, n, k)) for m, n, k in dense if args.only != "grouped"])

  T.print_header()
  runner = BG.Runner()
  records, rows = [], []

  for op, shape in cases:
    if op == OP_GROUPED:
      g, per, n, k = shape
      m = g * per
      name = f"{g}x{per} n{n} k{k}"
      impls, make = GROUPED_IMPLS, grouped_inputs(g, per, n, k)
      base_impl, ratio_key = "ragged_dot_bf16", "ratio_vs_ragged_dot"
    else:
      m, n, k = shape
      g = 1
      name = f"{m}x{n}x{k}"
      impls, make = DENSE_IMPLS, dense_inputs(m, n, k)
      base_impl, ratio_key = "xla_bf16_dot", "ratio_vs_xla_bf16"
    flops = fwd_bwd_flops(m, n, k)
    print(f"[{op} {name}]", flush=True)

    results = {}
    for impl, fn in impls.items():
      if impl != "jax_deepgemm" and args.skip_baseline:
        continue
      results[impl] = runner.time_impl(f"{name}] [{impl}", fn, make, timing, args.budget)
    t_ours, via_ours, e_ours = results["jax_deepgemm"]
    t_base, via_base, e_base = results.get(base_impl, (None, None, None))

    diff = None
    if t_ours is not None and t_base is not None and not args.no_diff:
      if BG.slow(t_ours, args.budget) or BG.slow(t_base, args.budget):
        print(f"[{name}] grad_diff skipped (slow calls)", flush=True)
      else:
        diff, _ = runner.attempt(
            f"{name}] [grad_diff",
            lambda: grad_diff(impls["jax_deepgemm"], impls[base_impl], make))

    kt = {}
    if args.kernel_times and t_ours is not None:
      kt = BG.kernel_breakdown(runner, name, "fwd+bwd call", impls["jax_deepgemm"], make,
                               n_sets=4, reps=5)

    r = BG.ratio(t_base, t_ours)
    cfg = BG.ours_config(via_ours)
    nbytes = None  # no single meaningful byte count for a training step: gbps is null
    common = dict(op=op, m=m, n=n, k=k, groups=g, flops=flops, rows_per_group=m // g)
    records.append(BG.impl_record(impl="jax_deepgemm", timing=t_ours, error=e_ours, nbytes=nbytes,
                                  config=cfg, grad_diff=diff, **{ratio_key: r}, **kt,
                                  **common))
    if not args.skip_baseline:
      records.append(BG.impl_record(impl=base_impl, timing=t_base, error=e_base, nbytes=nbytes,
                                    config=via_base, **common))

    tf = lambda t: T.tflops(flops, t.time_us) if t else None  # noqa: E731
    row = [op, name, BG.cell(t_ours, t_ours and t_ours.time_us, e_ours),
           BG.cell(t_ours, tf(t_ours), e_ours), cfg or "-", base_impl,
           BG.cell(t_base, t_base and t_base.time_us, e_base), BG.cell(t_base, tf(t_base), e_base),
           via_base or "-", T.fmt(r, 2) if r is not None else "-",
           f"{diff:.1e}" if diff is not None else "-"]
    rows.append(row)
    show = lambda x: x if isinstance(x, str) else T.fmt(x)  # noqa: E731
    print(f"[{name}] ours {show(row[2])} us {show(row[3])} TFLOPS ({row[4]}) | {base_impl} "
          f"{show(row[6])} us {show(row[7])} TFLOPS ({row[8]}) | x {row[9]} | grad_diff {row[10]}",
          flush=True)
    if not args.no_write:  # after every shape: a crash later on keeps what was measured
      T.write_results(args.out, records)

  print()
  T.print_table(rows, ["op", "shape", "ours us", "ours TFLOPS", "ours via", "baseline",
                       "base us", "base TFLOPS", "base via", "x vs base", "grad_diff"],
                title=f"forward+backward on {T.device_name()} (TFLOPS = 3·2MNK / t; x vs base: "
                      "t_base / t_ours, > 1 = ours faster)")

  return T.finish(args.out, args.no_write, records, runner.failures, " (not counting OOMs)")


if __name__ == "__main__":
  sys.exit(main())
