"""A small run of every kernel, for compute-sanitizer (M = 7 and an aligned case)."""
import jax
import jax.numpy as jnp
import numpy as np

import jax_deepgemm as jd

rng = np.random.default_rng(0)
for m, n, k in [(7, 130, 300), (128, 256, 512), (1, 1, 16)]:
  a, sa = jd.per_token_cast_to_fp8(jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16))
  b, sb = jd.per_block_cast_to_fp8(jnp.asarray(rng.standard_normal((n, k)), jnp.float32))
  bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
  c = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
  jax.block_until_ready(jax.jit(jd.fp8_gemm_nt)(a, sa, b, sb))
  jax.block_until_ready(jax.jit(lambda *x: jd.fp8_gemm_nt(*x, bias=bias, c=c))(a, sa, b, sb))
print("sanitize case done; kernels used:", jd.use_kernels())
