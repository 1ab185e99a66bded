import jax.numpy as jnp
import numpy as np

import jax_deepgemm as jd


def randn(rng, shape, dtype=jnp.float32, scale=1.0):
  # Varying magnitudes per row so the 1x128 / 128x128 scales differ.
  x = rng.standard_normal(shape) * scale
  if len(shape) >= 1 and shape[0] > 0:
    x = x * np.exp(rng.uniform(-2, 2, size=(shape[0],) + (1,) * (len(shape) - 1)))
  return jnp.asarray(x, dtype)


def quant_act(rng, m, k, axis=-1):
  return jd.per_token_cast_to_fp8(randn(rng, (m, k), jnp.bfloat16), axis=axis)


def quant_w(rng, *shape):
  return jd.per_block_cast_to_fp8(randn(rng, shape))
