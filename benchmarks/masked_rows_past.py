"""Masked GEMM: what the rows past masked_m (zero-filled by the kernel) and a masked_m past
expected_m (a second wave) cost, and the same into a donated `out` (rows past masked_m not
written). Back-to-back calls, wall clock; an experiment, not a bar
(results/masked_rows_past_H100_s38.log, _s39.log):

  python benchmarks/masked_rows_past.py
"""
import time

import jax
import jax.numpy as jnp

import jax_deepgemm as jd

N, K = 4096, 7168
# (G, M_max, masked_m, expected_m): every row valid, then M_max 4096 with masked_m at, below
# and above expected_m, and a larger expected_m hint.
CASES = [(1, 1024, 1024, 1024), (1, 4096, 1024, 1024), (1, 4096, 1127, 1024),
         (1, 4096, 1127, 1152), (1, 4096, 1127, 4096),
         (4, 256, 256, 256), (4, 4096, 256, 256), (4, 4096, 231, 256), (4, 4096, 262, 256),
         (4, 4096, 262, 384), (4, 4096, 4096, 4096)]


def time_us(f, *args, n=200):
  jax.block_until_ready(f(*args))
  t0 = time.perf_counter()
  for _ in range(n):
    r = f(*args)
  jax.block_until_ready(r)
  return (time.perf_counter() - t0) / n * 1e6


def time_into_us(f, buf, *args, n=200):
  """``f(buf, *args)`` with ``buf`` donated, each call's result the next call's buffer (as a
  decode loop carries it)."""
  buf = jax.block_until_ready(f(buf, *args))
  t0 = time.perf_counter()
  for _ in range(n):
    buf = f(buf, *args)
  jax.block_until_ready(buf)
  return (time.perf_counter() - t0) / n * 1e6


def main():
  print(jax.devices()[0].device_kind)
  for g, m_max, rows, expected in CASES:
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    a, sa = jax.jit(jd.per_token_cast_to_fp8)(jax.random.normal(k1, (g, m_max, K), jnp.bfloat16))
    b, sb = jax.jit(jd.per_block_cast_to_fp8)(jax.random.normal(k2, (g, N, K), jnp.bfloat16))
    masked_m = jnp.full((g,), rows, jnp.int32)
    f = jax.jit(lambda *v, e=expected: jd.m_grouped_fp8_gemm_nt_masked(*v, expected_m=e))
    us = time_us(f, a, sa, b, sb, masked_m)
    config = jd.gemm_config(expected, N, K, groups=g, masked=True)
    print(f"G={g} M_max={m_max} masked_m={rows} expected_m={expected} config={config}: "
          f"{us:.1f} us {2 * g * rows * N * K / us / 1e6:.0f} TFLOPS "
          f"(zero-filled {g * (m_max - rows) * N * 2 / 1e6:.0f} MB)", flush=True)
    if rows < m_max:
      into = jax.jit(lambda o, *v, e=expected: jd.m_grouped_fp8_gemm_nt_masked(
          *v, expected_m=e, out=o), donate_argnums=0)
      us = time_into_us(into, jnp.zeros((g, m_max, N), jnp.bfloat16), a, sa, b, sb, masked_m)
      print(f"  into a donated out (rows past masked_m not written): {us:.1f} us "
            f"{2 * g * rows * N * K / us / 1e6:.0f} TFLOPS", flush=True)


if __name__ == "__main__":
  main()
