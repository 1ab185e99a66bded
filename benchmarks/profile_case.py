"""One jitted GEMM call per shape, for Nsight Compute (see gpu_check.sh's `prof` stage).

  python benchmarks/profile_case.py 4096x7168x16384 [4096x24576x1536 ...]
  python benchmarks/profile_case.py --grouped 4x8192x4096x7168
  python benchmarks/profile_case.py --k-grouped 4x8192x7168x4096   # G x tokens x N x K
Each case runs 3 times; profile with ncu --launch-skip 2 --launch-count 1 per kernel name.
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

import _timing  # noqa: F401  (makes a source checkout importable)
import jax_deepgemm as jd

rng = np.random.default_rng(0)
grouped = "--grouped" in sys.argv
k_grouped = "--k-grouped" in sys.argv
for spec in [s for s in sys.argv[1:] if not s.startswith("--")]:
  dims = [int(x) for x in spec.split("x")]
  if k_grouped:  # the wgrad GEMM on token-major operands, as fp8_grouped_linear calls it
    g, tg, n, k = dims
    at, sat = jd.per_token_cast_transpose_to_fp8(
        jnp.asarray(rng.standard_normal((g * tg, n)), jnp.bfloat16))
    bt, sbt = jd.per_token_cast_transpose_to_fp8(
        jnp.asarray(rng.standard_normal((g * tg, k)), jnp.bfloat16))
    f = jax.jit(lambda *xs: jd.k_grouped_fp8_gemm_tn_contiguous(*xs, token_major=True))
    args = (at, sat, bt, sbt, jnp.full((g,), tg, jnp.int32))
    for _ in range(3):
      jax.block_until_ready(f(*args))
    print("profiled k-grouped", spec)
    continue
  if grouped:
    g, mg, n, k = dims
    m = g * mg
  else:
    m, n, k = dims
    g = 0
  a, sa = jd.per_token_cast_to_fp8(jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16))
  bshape = (g, n, k) if g else (n, k)
  b, sb = jd.per_block_cast_to_fp8(jnp.asarray(rng.standard_normal(bshape), jnp.float32))
  if g:
    gs = jnp.full((g,), mg, jnp.int32)
    f = jax.jit(jd.m_grouped_fp8_gemm_nt_contiguous)
    args = (a, sa, b, sb, gs)
  else:
    f = jax.jit(jd.fp8_gemm_nt)
    args = (a, sa, b, sb)
  for _ in range(3):
    jax.block_until_ready(f(*args))
  print("profiled", spec, "config", jd.gemm_config(m, n, k, g))
