"""Masked GEMM: what the rows past masked_m (zero-filled by the kernel) and a masked_m past
expected_m (a second wave) cost. Back-to-back calls, wall clock; an experiment, not a bar
(results/masked_rows_past_H100_s38.log):

  python benchmarks/masked_rows_past.py
"""
import time, jax, jax.numpy as jnp, numpy as np, jax_deepgemm as jd
N, K = 4096, 7168
def t_us(f, *a, n=200):
  jax.block_until_ready(f(*a))
  t0 = time.perf_counter()
  for _ in range(n): r = f(*a)
  jax.block_until_ready(r)
  return (time.perf_counter() - t0) / n * 1e6
print(jax.devices()[0].device_kind)
for g, mmax, mm, exp in [(1,1024,1024,1024),(1,4096,1024,1024),(1,4096,1127,1024),(1,4096,1127,1152),(1,4096,1127,4096),
                         (4,256,256,256),(4,4096,256,256),(4,4096,231,256),(4,4096,262,256),(4,4096,262,384),(4,4096,4096,4096)]:
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  a, sa = jax.jit(jd.per_token_cast_to_fp8)(jax.random.normal(k1, (g, mmax, K), jnp.bfloat16))
  b, sb = jax.jit(jd.per_block_cast_to_fp8)(jax.random.normal(k2, (g, N, K), jnp.bfloat16))
  m = jnp.full((g,), mm, jnp.int32)
  f = jax.jit(lambda a, sa, b, sb, m: jd.m_grouped_fp8_gemm_nt_masked(a, sa, b, sb, m, expected_m=exp))
  us = t_us(f, a, sa, b, sb, m)
  zero_mb = g * (mmax - mm) * N * 2 / 1e6
  print(f"G={g} M_max={mmax} masked_m={mm} expected_m={exp} config={jd.gemm_config(exp, N, K, groups=g, masked=True)}: "
        f"{us:.1f} us {2*g*mm*N*K/us/1e6:.0f} TFLOPS (zero-filled {zero_mb:.0f} MB)", flush=True)
