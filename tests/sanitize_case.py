"""A small run of every kernel for compute-sanitizer: M = 7, aligned, more tiles than SMs."""
import os

import jax
import jax.numpy as jnp
import numpy as np

import jax_deepgemm as jd
from jax_deepgemm import _C

rng = np.random.default_rng(0)
# 1100x4000: more tiles than SMs, so CTAs store a tile while they run the next.
for m, n, k in [(7, 130, 300), (128, 256, 512), (1, 1, 16), (1100, 4000, 256)]:
  a, sa = jd.per_token_cast_to_fp8(jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16))
  b, sb = jd.per_block_cast_to_fp8(jnp.asarray(rng.standard_normal((n, k)), jnp.float32))
  bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
  c = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
  jax.block_until_ready(jax.jit(jd.fp8_gemm_nt)(a, sa, b, sb))
  jax.block_until_ready(jax.jit(lambda *x: jd.fp8_gemm_nt(*x, bias=bias, c=c))(a, sa, b, sb))
  # The cast feeding the GEMM in one jit (with MN-major scales, the default, and M % 4 == 0, sa
  # passes in the cast's MN-major layout).
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
  jax.block_until_ready(jax.jit(lambda x: jd.fp8_gemm_nt(*jd.per_token_cast_to_fp8(x), b, sb))(x))
# M-grouped: skewed routing with empty experts and unaligned sizes, all-empty, masked.
# (Skipped when a forced config names a tile the grouped kernels are not built with.)
forced = [kv.strip() for kv in os.environ.get("JAX_DEEPGEMM_GEMM_CONFIG", "").split(",") if kv.strip()]
grouped_built = any(all(kv in cfg.split(",") for kv in forced)
                    for cfg in _C.supported_grouped_gemm_configs().split("; "))
grouped_cases = [(300, 192, 256, [0, 7, 0, 290, 3]), (200, 64, 128, [0, 0, 0]),
                 (129, 320, 384, [129, 0])] if grouped_built else []
for m, n, k, sizes in grouped_cases:
  g = len(sizes)
  a, sa = jd.per_token_cast_to_fp8(jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16))
  b, sb = jd.per_block_cast_to_fp8(jnp.asarray(rng.standard_normal((g, n, k)), jnp.float32))
  gs = jnp.asarray(sizes, jnp.int32)
  jax.block_until_ready(jax.jit(jd.m_grouped_fp8_gemm_nt_contiguous)(a, sa, b, sb, gs))
  mmax = m // g
  am, sam = a[: g * mmax].reshape(g, mmax, k), sa[: g * mmax].reshape(g, mmax, -1)
  mm = jnp.asarray([0, mmax, 5][:g] + [1] * max(0, g - 3), jnp.int32)
  jax.block_until_ready(jax.jit(jd.m_grouped_fp8_gemm_nt_masked)(am, sam, b, sb, mm))
  # Into a donated `out`: only the valid rows written.
  into = jax.jit(lambda o, *x: jd.m_grouped_fp8_gemm_nt_masked(*x, out=o), donate_argnums=0)
  jax.block_until_ready(into(jnp.ones((g, mmax, n), jnp.bfloat16), am, sam, b, sb, mm))
# K-grouped wgrad: group boundaries inside 128-token blocks, an empty group, ragged T,
# chunks of 1..8 blocks; fp32 (with and without c) and bf16 outputs; N 320 (a 192-row tile's
# last warpgroup past N) and K 90 (rows not a multiple of 16 bytes).
for t, n, k, sizes in [(300, 72, 136, [100, 0, 29, 171]), (130, 64, 64, [0, 130]),
                       (2100, 200, 136, [1, 1300, 0, 799]), (600, 320, 64, [250, 0, 350]),
                       (300, 70, 90, [100, 200])]:
  a, sa = jd.per_token_cast_to_fp8(jnp.asarray(rng.standard_normal((t, n)), jnp.bfloat16), axis=0)
  b, sb = jd.per_token_cast_to_fp8(jnp.asarray(rng.standard_normal((t, k)), jnp.bfloat16), axis=0)
  c = jnp.asarray(rng.standard_normal((len(sizes), n, k)), jnp.float32)
  gs = jnp.asarray(sizes, jnp.int32)
  jax.block_until_ready(jax.jit(jd.k_grouped_fp8_gemm_tn_contiguous)(a, sa, b, sb, gs))
  jax.block_until_ready(jax.jit(lambda c: jd.k_grouped_fp8_gemm_tn_contiguous(
      a, sa, b, sb, gs, c=c))(c))
  jax.block_until_ready(jax.jit(lambda *xs: jd.k_grouped_fp8_gemm_tn_contiguous(
      *xs, out_dtype=jnp.bfloat16))(a, sa, b, sb, gs))
print("sanitize case done; kernels used:", jd.use_kernels())
