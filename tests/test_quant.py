import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_deepgemm as jd
from helpers import randn
from oracle import f64


@pytest.mark.parametrize("shape", [(1, 128), (7, 300), (3, 5, 129), (4, 1)])
def test_per_token_roundtrip(rng, shape):
  x = randn(rng, shape)
  q, s = jd.per_token_cast_to_fp8(x)
  assert q.dtype == jnp.float8_e4m3fn and q.shape == x.shape
  assert s.dtype == jnp.float32 and s.shape == shape[:-1] + (-(-shape[-1] // 128),)
  xd = np.asarray(jd.dequantize_per_token(q, s))
  # e4m3: 3 mantissa bits (relative error ≤ 2^-4), subnormal step 2^-9 (times the scale).
  step = np.asarray(jd.dequantize_per_token(jnp.ones_like(q), s)) * 2.0**-9
  assert (np.abs(xd - np.asarray(x)) <= 2.0**-4 * np.abs(np.asarray(x)) + step).all()
  assert np.abs(f64(q)).max() <= 448.0


def test_per_token_axis0_groups_tokens(rng):
  x = randn(rng, (300, 5))
  q, s = jd.per_token_cast_to_fp8(x, axis=0)
  assert s.shape == (3, 5)
  # Same as quantizing the transpose along its last axis.
  qt, st = jd.per_token_cast_to_fp8(x.T)
  np.testing.assert_array_equal(f64(q), f64(qt).T)
  np.testing.assert_array_equal(np.asarray(s), np.asarray(st).T)


@pytest.mark.parametrize("shape", [(128, 128), (130, 300), (2, 257, 64)])
def test_per_block_roundtrip(rng, shape):
  w = randn(rng, shape)
  q, s = jd.per_block_cast_to_fp8(w)
  assert s.shape == shape[:-2] + (-(-shape[-2] // 128), -(-shape[-1] // 128))
  wd = np.asarray(jd.dequantize_per_block(q, s))
  step = np.asarray(jd.dequantize_per_block(jnp.ones_like(q), s)) * 2.0**-9
  assert (np.abs(wd - np.asarray(w)) <= 2.0**-4 * np.abs(np.asarray(w)) + step).all()


def test_block_scales_transpose_exactly(rng):
  w = randn(rng, (300, 200))
  q, s = jd.per_block_cast_to_fp8(w)
  qt, st = jd.per_block_cast_to_fp8(w.T)
  np.testing.assert_array_equal(f64(q).T, f64(qt))
  np.testing.assert_array_equal(np.asarray(s).T, np.asarray(st))


def test_ue8m0_scales_are_powers_of_two(rng):
  x = randn(rng, (9, 256))
  q, s = jd.per_token_cast_to_fp8(x, use_ue8m0=True)
  s = np.asarray(s)
  np.testing.assert_array_equal(np.exp2(np.round(np.log2(s))), s)
  assert np.abs(f64(q)).max() <= 448.0
  xd = np.asarray(jd.dequantize_per_token(q, s))
  np.testing.assert_allclose(xd, np.asarray(x), rtol=2.0**-3, atol=1e-6)


def test_zero_group_does_not_divide_by_zero():
  x = jnp.zeros((2, 256)).at[1, 130].set(3.0)
  q, s = jd.per_token_cast_to_fp8(x)
  assert np.isfinite(np.asarray(s)).all() and np.isfinite(f64(q)).all()
  assert float(jd.dequantize_per_token(q, s)[1, 130]) == pytest.approx(3.0, rel=1e-6)
  assert float(jnp.abs(jd.dequantize_per_token(q, s)[0]).max()) == 0.0


def test_jit_and_bad_input():
  x = jnp.ones((4, 128), jnp.bfloat16)
  jax.jit(jd.per_token_cast_to_fp8)(x)
  with pytest.raises(TypeError, match="per_token_cast_to_fp8"):
    jd.per_token_cast_to_fp8(jnp.ones((4, 128), jnp.int32))
  with pytest.raises(ValueError, match="per_block_cast_to_fp8"):
    jd.per_block_cast_to_fp8(jnp.ones((128,)))


def test_axis_out_of_range():
  with pytest.raises(ValueError, match="out of range"):
    jd.per_token_cast_to_fp8(jnp.ones((4, 128)), axis=2)
