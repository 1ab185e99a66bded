"""The dual cast's ``keep_rows`` (what keeps fp8_grouped_linear's rows past its groups out of
the token-axis scales): its meaning, vmap, and its sharding rule (rows split over devices).

On a GPU the same checks run the kernel (tests/test_gpu_quant.py compares it bitwise)."""
import numpy as np
import pytest

import multidevice


def _bits(x):
  return np.asarray(x).view(np.uint8 if np.asarray(x).dtype.itemsize == 1 else np.uint32)


def _bind(x, keep):
  from jax_deepgemm.quant_kernels import dual_cast_p
  return dual_cast_p.bind(x, keep, use_ue8m0=False)


def _garbage(rng, x, keep):
  """``x [A, T, C]`` with every row past ``keep[a]`` NaN, inf or huge."""
  x = np.array(x, np.float32)
  for a, k in enumerate(keep):
    x[a, k:] = np.where(rng.random(x[a, k:].shape) < 0.5, np.nan, 3e38)
    x[a, k:, :1] = np.inf
  return x


def test_keep_rows_casts_the_rows_past_it_as_zeros():
  import jax
  import jax.numpy as jnp
  import jax_deepgemm as jd
  rng = np.random.default_rng(0)
  keep = np.array([0, 1, 129, 300], np.int32)
  x = _garbage(rng, rng.standard_normal((4, 300, 200)), keep)
  zeroed = np.where(np.arange(300)[None, :, None] < keep[:, None, None], x, 0)
  got = jax.jit(_bind)(jnp.asarray(x, jnp.bfloat16), jnp.asarray(keep))
  want = jax.jit(jd.per_token_cast_to_fp8_and_transpose)(jnp.asarray(zeroed, jnp.bfloat16))
  for g, w in zip(got, want):
    np.testing.assert_array_equal(_bits(g), _bits(w))
  # vmap over keep_rows alone (x shared), and over both.
  xs = jnp.asarray(x[3], jnp.float32)
  many = jax.jit(jax.vmap(_bind, in_axes=(None, 0)))(xs, jnp.asarray(keep))
  both = jax.jit(jax.vmap(_bind, in_axes=(1, 0)))(jnp.swapaxes(jnp.asarray(x), 0, 1),
                                                  jnp.asarray(keep))
  for i, k in enumerate(keep):
    want = jd.per_token_cast_to_fp8_and_transpose(xs.at[k:].set(0))
    for g, w in zip(many, want):
      np.testing.assert_array_equal(_bits(g[i]), _bits(w))
    want = jd.per_token_cast_to_fp8_and_transpose(jnp.asarray(zeroed[i]))
    for g, w in zip(both, want):
      np.testing.assert_array_equal(_bits(g[i]), _bits(w))
  with pytest.raises(ValueError, match="keep_rows must be int32"):
    _bind(jnp.zeros((2, 128, 128)), jnp.zeros((3,), jnp.int32))


@pytest.mark.parametrize("partitioner", ["shardy", "gspmd"])
def test_keep_rows_sharded(partitioner):
  multidevice.run(__file__, "case_sharded", partitioner, devices=8)


def case_sharded(partitioner):
  # Rows split over 4 devices in whole 128-blocks, the batch over 2: each device's keep_rows
  # is the global one less its first row; no collectives, bitwise the unsharded cast.
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  import jax_deepgemm as jd
  jax.config.update("jax_use_shardy_partitioner", partitioner == "shardy")
  mesh = jax.make_mesh((2, 4), ("x", "y"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rng = np.random.default_rng(1)
  keep = np.array([300, 129], np.int32)  # ends in device 2's rows, in device 1's
  x = jnp.asarray(_garbage(rng, rng.standard_normal((2, 512, 256)), keep), jnp.bfloat16)
  want = jax.jit(_bind)(x, jnp.asarray(keep))
  placed = (jax.device_put(x, NamedSharding(mesh, P("x", "y"))),
            jax.device_put(jnp.asarray(keep), NamedSharding(mesh, P("x"))))
  compiled = jax.jit(_bind).lower(*placed).compile()
  assert sum(multidevice.collectives(compiled.as_text()).values()) == 0
  for g, w in zip(compiled(*placed), want):
    np.testing.assert_array_equal(_bits(g), _bits(w))
  # The layer with its rows split: rows past the groups (NaN) leave dW finite and as with
  # zeros there (both split: the wgrad sums the devices' partial products).
  w = jnp.asarray(rng.standard_normal((3, 256, 128)) / 16, jnp.float32)
  gs = jnp.asarray([100, 0, 200], jnp.int32)
  x2 = jnp.asarray(rng.standard_normal((512, 256)), jnp.float32)
  r = jnp.asarray(rng.standard_normal((512, 128)), jnp.float32)
  grads = jax.jit(lambda x, w, r: jax.vjp(jd.fp8_grouped_linear, x, w, gs)[1](r)[:2])
  rows = NamedSharding(mesh, P("y"))
  got = grads(jax.device_put(x2.at[300:].set(jnp.nan), rows), w,
              jax.device_put(r.at[300:].set(jnp.nan), rows))
  want = grads(jax.device_put(x2.at[300:].set(0), rows), w,
               jax.device_put(r.at[300:].set(0), rows))
  for g, v in zip(got, want):
    assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_array_equal(np.asarray(g), np.asarray(v))


if __name__ == "__main__":
  multidevice.main(globals())
