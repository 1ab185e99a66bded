"""``python -m jax_deepgemm.demo``: the casts, the four GEMM ops and both linear layers under jit.

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
  if min(m, n, k, g) < 1 or m < g:
    p.error(f"--m, --n, --k, --groups must be positive and --m >= --groups (the masked layout "
            f"takes --m // --groups rows per group), got {m}, {n}, {k}, {g}")
  print(f"device: {jax.devices()[0].device_kind}; Hopper kernels: {jd.use_kernels()}")
  kx, kw, kr = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (m, k), jnp.bfloat16)
  w = jax.random.normal(kw, (g, n, k), jnp.bfloat16) / np.sqrt(k)

  xq, xs = jax.jit(jd.per_token_cast_to_fp8)(x)
  wq, ws = jax.jit(jd.per_block_cast_to_fp8)(w)
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
  cast_tokens = jax.jit(lambda v: jd.per_token_cast_to_fp8(v, axis=0))
  xt, xts = cast_tokens(x)
  dyt, dyts = cast_tokens(dy)
  dw = jax.jit(jd.k_grouped_fp8_gemm_tn_contiguous)(dyt, dyts, xt, xts, sizes)
  ends = np.cumsum(np.asarray(sizes))
  want = jnp.stack([dy[e - s:e].astype(jnp.float32).T @ x[e - s:e].astype(jnp.float32)
                    for s, e in zip(np.asarray(sizes), ends)])
  print(f"k_grouped_fp8_gemm_tn_contiguous  dW [{g}x{n}x{k}]  diff: {diff(dw, want):.2e}")

  # The layers: forward and both gradients, against the same in bf16 (f32 accumulation).
  def fwd_bwd(layer):  # dy is an argument: a closed-over array would be constant-folded
    loss = lambda x, w, ct: jnp.sum(layer(x, w).astype(jnp.float32) * ct.astype(jnp.float32))
    return lambda x, w: jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, w, dy)
  w0 = jnp.swapaxes(w[0], 0, 1)  # [K, N], flax.nnx.Linear's layout
  bf16_dot = lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32)
  (_, got), (_, want) = fwd_bwd(jd.fp8_linear)(x, w0), fwd_bwd(bf16_dot)(x, w0)
  print(f"fp8_linear (fwd+bwd)              dx diff: {diff(got[0], want[0]):.2e}  "
        f"dw diff: {diff(got[1], want[1]):.2e}")
  wk = jnp.swapaxes(w, 1, 2)  # [G, K, N], ragged_dot's layout
  grouped = lambda x, w: jd.fp8_grouped_linear(x, w, sizes)
  ragged = lambda x, w: jax.lax.ragged_dot(x, w, sizes, preferred_element_type=jnp.float32)
  (_, got), (_, want) = fwd_bwd(grouped)(x, wk), fwd_bwd(ragged)(x, wk)
  print(f"fp8_grouped_linear (fwd+bwd)      dx diff: {diff(got[0], want[0]):.2e}  "
        f"dw diff: {diff(got[1], want[1]):.2e}")


if __name__ == "__main__":
  main()
