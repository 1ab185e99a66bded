"""``python -m jax_deepgemm.demo``: quantize, run every op under jit, compare with bf16.

Prints which path ran (Hopper kernel or pure-JAX reference) and DeepGEMM's diff metric of
each FP8 result against the same product in float32 on the unquantized inputs.
"""
import argparse

import jax
import jax.numpy as jnp
import numpy as np

import jax_deepgemm as jd


def diff(x, y):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return 1.0 - 2.0 * (x * y).sum() / (x * x + y * y).sum()


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--m", type=int, default=512)
  p.add_argument("--n", type=int, default=1024)
  p.add_argument("--k", type=int, default=2048)
  p.add_argument("--groups", type=int, default=4)
  args = p.parse_args()
  m, n, k, g = args.m, args.n, args.k, args.groups
  print(f"device: {jax.devices()[0].device_kind}; Hopper kernels: {jd.use_kernels()}")
  kx, kw, kr = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (m, k), jnp.bfloat16)
  w = jax.random.normal(kw, (g, n, k), jnp.bfloat16) / np.sqrt(k)

  xq, xs = jd.per_token_cast_to_fp8(x)
  wq, ws = jd.per_block_cast_to_fp8(w)
  d = jax.jit(jd.fp8_gemm_nt)(xq, xs, wq[0], ws[0])
  want = jnp.dot(x, w[0].T, preferred_element_type=jnp.float32)
  print(f"fp8_gemm_nt                      [{m}x{k}]·[{n}x{k}]ᵀ  diff vs bf16: {diff(d, want):.2e}")

  sizes = jnp.asarray(np.bincount(np.asarray(jax.random.randint(kr, (m,), 0, g)), minlength=g),
                      jnp.int32)
  d = jax.jit(jd.m_grouped_fp8_gemm_nt_contiguous)(xq, xs, wq, ws, sizes)
  want = jax.lax.ragged_dot(x, jnp.swapaxes(w, 1, 2), sizes, preferred_element_type=jnp.float32)
  print(f"m_grouped_fp8_gemm_nt_contiguous  groups {np.asarray(sizes).tolist()}  diff vs ragged_dot: "
        f"{diff(d, want):.2e}")

  mg = m // g
  masked = jnp.minimum(sizes, mg)
  d = jax.jit(jd.m_grouped_fp8_gemm_nt_masked)(
      xq[:g * mg].reshape(g, mg, k), xs[:g * mg].reshape(g, mg, -1), wq, ws, masked)
  want = jnp.einsum("gmk,gnk->gmn", x[:g * mg].reshape(g, mg, k), w,
                    preferred_element_type=jnp.float32)
  want = jnp.where(jnp.arange(mg)[None, :, None] < masked[:, None, None], want, 0)
  print(f"m_grouped_fp8_gemm_nt_masked      masked_m {np.asarray(masked).tolist()}  diff: "
        f"{diff(d, want):.2e}")

  dy = jax.random.normal(kx, (m, n), jnp.bfloat16)
  xt, xts = jd.per_token_cast_to_fp8(x, axis=0)
  dyt, dyts = jd.per_token_cast_to_fp8(dy, axis=0)
  dw = jax.jit(jd.k_grouped_fp8_gemm_tn_contiguous)(dyt, dyts, xt, xts, sizes)
  ends = np.cumsum(np.asarray(sizes))
  want = jnp.stack([dy[e - s:e].astype(jnp.float32).T @ x[e - s:e].astype(jnp.float32)
                    for s, e in zip(np.asarray(sizes), ends)])
  print(f"k_grouped_fp8_gemm_tn_contiguous  dW [{g}x{n}x{k}]  diff: {diff(dw, want):.2e}")


if __name__ == "__main__":
  main()
