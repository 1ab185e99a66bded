"""A small run of every quantization kernel variant, for compute-sanitizer.

Ragged shapes (aligned and unaligned rows, 1-element edges) in bf16, f16 and f32, each cast
(per-token, per-block, its transpose and both at once, token axis and its transpose, the
dual cast, with keep_rows too, and gathered):

  XLA_PYTHON_CLIENT_ALLOCATOR=platform XLA_PYTHON_CLIENT_PREALLOCATE=false \
    compute-sanitizer --tool memcheck python3 tests/sanitize_quant_case.py
"""
import jax
import jax.numpy as jnp
import numpy as np

import jax_deepgemm as jd

rng = np.random.default_rng(0)
casts = [jd.per_token_cast_to_fp8, lambda x, **kw: jd.per_token_cast_to_fp8(x, axis=0, **kw),
         jd.per_token_cast_transpose_to_fp8, jd.per_block_cast_to_fp8,
         lambda x, **kw: jd.per_block_cast_to_fp8(x, transpose=True, **kw),
         jd.per_token_cast_to_fp8_and_transpose, jd.per_block_cast_to_fp8_and_transpose]
for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
  # Unaligned rows (100, 129, 65 elements), aligned ones, single elements, a batch.
  for shape in [(1, 1), (7, 100), (257, 129), (130, 256), (300, 16), (2, 129, 65)]:
    x = jnp.asarray(rng.standard_normal(shape), dtype)
    for cast in casts:
      use_ue8m0 = dtype == jnp.bfloat16  # (no other memory access)
      jax.block_until_ready(jax.jit(lambda x: cast(x, use_ue8m0=use_ue8m0))(x))
  # The dual cast's keep_rows (fp8_grouped_linear's rows past its groups): none, some, all,
  # past the end, per batch slice.
  from jax_deepgemm.quant_kernels import dual_cast_p
  x = jnp.asarray(rng.standard_normal((3, 257, 129)), dtype)
  keep = jnp.asarray([0, 130, 400], jnp.int32)
  jax.block_until_ready(jax.jit(lambda x, k: dual_cast_p.bind(x, k, use_ue8m0=False))(x, keep))
  # The gathered dual cast: repeated, negative and past-the-end row indices, keep_rows; with
  # and without row scales.
  from jax_deepgemm.quant_kernels import gathered_dual_cast_p
  rows = jnp.asarray(rng.integers(-3, 260, size=(3, 300)), jnp.int32)
  for scale in (jnp.zeros((3, 0), jnp.float32),
                jnp.asarray(rng.uniform(0, 1, size=(3, 300)), jnp.float32)):
    jax.block_until_ready(jax.jit(lambda x, r, f, k: gathered_dual_cast_p.bind(
        x, r, f, k, use_ue8m0=False))(x, rows, scale, keep))
print("sanitize quant case done; kernels used:", jd.use_kernels())
