import re

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


@pytest.mark.parametrize("shape", [(300, 200), (1, 1), (3, 130, 257)])
@pytest.mark.parametrize("use_ue8m0", [False, True])
def test_per_block_transpose_is_the_cast_of_the_transpose(rng, shape, use_ue8m0):
  w = randn(rng, shape)
  q, s = jax.jit(lambda w: jd.per_block_cast_to_fp8(w, use_ue8m0=use_ue8m0, transpose=True))(w)
  qt, st = jd.per_block_cast_to_fp8(jnp.swapaxes(w, -1, -2), use_ue8m0=use_ue8m0)
  assert q.shape == shape[:-2] + shape[:-3:-1] and q.dtype == jnp.float8_e4m3fn
  np.testing.assert_array_equal(f64(q), f64(qt))
  np.testing.assert_array_equal(np.asarray(s), np.asarray(st))
  # vmap over a leading axis folds into the one cast.
  if len(shape) == 3:
    qv, sv = jax.vmap(lambda v: jd.per_block_cast_to_fp8(v, transpose=True))(w)
    q0, s0 = jd.per_block_cast_to_fp8(w, transpose=True)
    np.testing.assert_array_equal(f64(qv), f64(q0))
    np.testing.assert_array_equal(np.asarray(sv), np.asarray(s0))


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
  for dt in (jnp.float8_e4m3fn, jnp.float8_e5m2):  # not re-quantized silently
    with pytest.raises(TypeError, match="per_token_cast_to_fp8"):
      jd.per_token_cast_to_fp8(jnp.ones((4, 128), dt))
    with pytest.raises(TypeError, match="per_block_cast_to_fp8"):
      jd.per_block_cast_to_fp8(jnp.ones((128, 128), dt))


def test_inputs_that_are_no_arrays_are_named(rng):
  # None, a string, a dict, a ragged list gave JAX's unnamed conversion errors (for None a
  # ValueError); a TypeError naming the op and the operand now. Lists of numbers still convert.
  bad_values = [None, "x", {}, object(), [[1.0], [2.0, 3.0]]]
  casts = {"per_token_cast_to_fp8": "x", "per_token_cast_transpose_to_fp8": "x",
           "per_token_cast_to_fp8_and_transpose": "x", "per_block_cast_to_fp8": "w",
           "per_block_cast_to_fp8_and_transpose": "w"}
  x = randn(rng, (3, 130))
  for op, arg in casts.items():
    for bad in bad_values:
      with pytest.raises(TypeError, match=f"^{op}: {arg} must be an array of numbers, "
                         f"got {type(bad).__name__}$"):
        getattr(jd, op)(bad)
    for want, got in zip(getattr(jd, op)(x), getattr(jd, op)(np.asarray(x).tolist())):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  q, s = jd.per_token_cast_to_fp8(x)
  qb, sb = jd.per_block_cast_to_fp8(x)
  for op, args in (("dequantize_per_token", dict(x_fp8=q, scale=s)),
                   ("dequantize_per_block", dict(w_fp8=qb, scale=sb))):
    for name in args:
      for bad in bad_values:
        with pytest.raises(TypeError, match=f"^{op}: {name} must be an array of numbers, "
                           f"got {type(bad).__name__}$"):
          getattr(jd, op)(**dict(args, **{name: bad}))


def test_cast_errors_name_the_operand():
  # The dtype and rank errors named the op only ("expected a bf16/f16/f32 array, got int32",
  # "expected [..., N, K], got shape (128,)"); they name the operand too now, as the GEMMs' do.
  casts = {"per_token_cast_to_fp8": ("x", 1), "per_token_cast_transpose_to_fp8": ("x", 2),
           "per_token_cast_to_fp8_and_transpose": ("x", 2), "per_block_cast_to_fp8": ("w", 2),
           "per_block_cast_to_fp8_and_transpose": ("w", 2)}
  for op, (arg, min_ndim) in casts.items():
    for dt in (jnp.int32, jnp.bool_, jnp.float8_e5m2, jnp.complex64):
      with pytest.raises(TypeError, match=f"^{op}: {arg} must be a bf16, f16, f32 or f64 array, "
                         f"got {jnp.dtype(dt)}$"):
        getattr(jd, op)(jnp.ones((4, 128), dt))
    for shape in [(), (128,)][:min_ndim]:
      want = f"^{op}: {arg} must .*got shape {re.escape(str(shape))}$"
      with pytest.raises(ValueError, match=want):
        getattr(jd, op)(jnp.ones(shape))
    # The dtype error named bf16, f16 and f32 only, though f64 (under jax_enable_x64) is taken.
    with jax.enable_x64(True):
      x = jnp.ones((4, 256), jnp.float64)
      q, s = getattr(jd, op)(x)[:2]
      assert x.dtype == jnp.float64 and q.dtype == jnp.float8_e4m3fn and s.dtype == jnp.float32
  with pytest.raises(ValueError, match=r"^dequantize_per_block: w_fp8 must be \[..., N, K\], "
                     r"got shape \(128,\)$"):
    jd.dequantize_per_block(jnp.ones((128,), jnp.float8_e4m3fn), jnp.ones((1,)))


def test_dequantize_checks_the_scales(rng):
  q, s = jd.per_token_cast_to_fp8(randn(rng, (256, 384)))
  np.testing.assert_array_equal(np.asarray(jd.dequantize_per_token(np.asarray(q), np.asarray(s))),
                                np.asarray(jd.dequantize_per_token(q, s)))
  for bad in (jnp.concatenate([s, s], 1), s[:, :2], s.T):
    with pytest.raises(ValueError, match=r"dequantize_per_token: scale must have shape \(256, 3\)"):
      jd.dequantize_per_token(q, bad)
  with pytest.raises(TypeError, match="scale must be float32"):
    jd.dequantize_per_token(q, s.astype(jnp.int32))
  qt, st = jd.per_token_cast_to_fp8(randn(rng, (300, 8)), axis=0)
  assert jd.dequantize_per_token(qt, st, axis=0).shape == (300, 8)
  with pytest.raises(ValueError, match=r"shape \(3, 8\)"):
    jd.dequantize_per_token(qt, st[:2], axis=0)
  qb, sb = jd.per_block_cast_to_fp8(randn(rng, (2, 200, 300)))
  assert jd.dequantize_per_block(qb, sb).shape == (2, 200, 300)
  for bad in (jnp.ones((2, 5, 5)), sb[0], sb[:, :1]):
    with pytest.raises(ValueError, match=r"dequantize_per_block: scale must have shape \(2, 2, 3\)"):
      jd.dequantize_per_block(qb, bad)


def test_axis_out_of_range():
  with pytest.raises(ValueError, match="out of range"):
    jd.per_token_cast_to_fp8(jnp.ones((4, 128)), axis=2)


def test_static_arguments_are_checked():
  # Flags and axes are static: a truthy string, a float axis or a traced value is refused by
  # name, not coerced (use_ue8m0="no" would have meant UE8M0 scales) or left to JAX's errors.
  x = jnp.ones((4, 128))
  for bad in (None, 1.0, (0, 1)):
    with pytest.raises(TypeError, match="per_token_cast_to_fp8: axis must be a Python int"):
      jd.per_token_cast_to_fp8(x, axis=bad)
  casts = [("per_token_cast_to_fp8", {}), ("per_token_cast_transpose_to_fp8", {}),
           ("per_token_cast_to_fp8_and_transpose", {}), ("per_block_cast_to_fp8", {}),
           ("per_block_cast_to_fp8_and_transpose", {})]
  for name, kw in casts:
    with pytest.raises(TypeError, match=f"{name}: use_ue8m0 must be a Python bool"):
      getattr(jd, name)(x, use_ue8m0="no", **kw)
    with pytest.raises(TypeError, match=f"{name}: use_ue8m0 must be a Python bool"):
      jax.jit(lambda x, f: getattr(jd, name)(x, use_ue8m0=f))(x, True)
  with pytest.raises(TypeError, match="per_block_cast_to_fp8: transpose must be a Python bool"):
    jd.per_block_cast_to_fp8(x, transpose=1)
  jd.per_token_cast_to_fp8(x, use_ue8m0=np.bool_(True), axis=np.int64(0))  # NumPy scalars are fine


def test_dequantize_wants_e4m3(rng):
  q, s = jd.per_token_cast_to_fp8(randn(rng, (8, 128)))
  with pytest.raises(TypeError, match="dequantize_per_token: x_fp8 must be float8_e4m3fn"):
    jd.dequantize_per_token(q.astype(jnp.bfloat16), s)
  with pytest.raises(TypeError, match="dequantize_per_token: axis must be a Python int"):
    jd.dequantize_per_token(q, s, axis=None)
  qb, sb = jd.per_block_cast_to_fp8(randn(rng, (8, 128)))
  with pytest.raises(TypeError, match="dequantize_per_block: w_fp8 must be float8_e4m3fn"):
    jd.dequantize_per_block(qb.astype(jnp.int32), sb)


# ----------------------------------------------------------------------------- cast + transpose

def _bits(a):
  a = np.asarray(a)
  return a.view(np.uint8) if a.dtype.itemsize == 1 else a.view(np.uint32)


def _assert_bitwise(got, want):
  for g, w in zip(got, want):
    assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, g.dtype, w.shape, w.dtype)
    np.testing.assert_array_equal(_bits(g), _bits(w))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("shape", [(300, 5), (1, 1), (257, 129), (128, 64), (4, 300, 7)])
@pytest.mark.parametrize("use_ue8m0", [False, True])
def test_per_token_cast_transpose_is_axis0_transposed(rng, dtype, shape, use_ue8m0):
  x = randn(rng, shape, dtype)
  q, s = jd.per_token_cast_to_fp8(x, axis=-2, use_ue8m0=use_ue8m0)
  qt, st = jd.per_token_cast_transpose_to_fp8(x, use_ue8m0=use_ue8m0)
  assert qt.shape == shape[:-2] + (shape[-1], shape[-2]) and qt.dtype == jnp.float8_e4m3fn
  assert st.shape == shape[:-2] + (-(-shape[-2] // 128), shape[-1])
  _assert_bitwise((qt, st), (jnp.swapaxes(q, -1, -2), s))


def test_per_token_cast_transpose_2d_is_q_t(rng):
  x = randn(rng, (300, 130), jnp.bfloat16)
  q, s = jd.per_token_cast_to_fp8(x, axis=0)
  qt, st = jax.jit(jd.per_token_cast_transpose_to_fp8)(x)
  _assert_bitwise((qt, st), (q.T, s))


def test_per_token_cast_transpose_bad_input():
  with pytest.raises(ValueError, match="per_token_cast_transpose_to_fp8"):
    jd.per_token_cast_transpose_to_fp8(jnp.ones((128,)))
  with pytest.raises(TypeError, match="per_token_cast_transpose_to_fp8"):
    jd.per_token_cast_transpose_to_fp8(jnp.ones((4, 128), jnp.int32))


# ----------------------------------------------------------------------------- the primitives

@pytest.mark.parametrize("shape,axis", [((2, 300, 3, 4), 1), ((2, 1, 257, 1), 2), ((5, 7), 0),
                                        ((3, 0, 4), 0), ((0, 5), 1)])
def test_inner_axis_matches_moveaxis_reference(rng, shape, axis):
  from jax_deepgemm.quant_kernels import per_token_cast_reference
  x = randn(rng, shape, jnp.bfloat16)
  q, s = jax.jit(lambda x: jd.per_token_cast_to_fp8(x, axis=axis))(x)
  qr, sr = jax.jit(lambda x: per_token_cast_reference(jnp.moveaxis(x, axis, -1)))(x)
  _assert_bitwise((q, s), (jnp.moveaxis(qr, -1, axis), jnp.moveaxis(sr, -1, axis)))


@pytest.mark.parametrize("in_axis", [0, 1, 2])
def test_casts_vmap(rng, in_axis):
  x = randn(rng, (3, 200, 130), jnp.float32)
  x = jnp.moveaxis(x, 0, in_axis)
  casts = [lambda v: jd.per_token_cast_to_fp8(v), lambda v: jd.per_token_cast_to_fp8(v, axis=0),
           lambda v: jd.per_block_cast_to_fp8(v), lambda v: jd.per_token_cast_transpose_to_fp8(v)]
  for cast in casts:
    got = jax.vmap(cast, in_axes=in_axis)(x)
    want = [jnp.stack(o) for o in zip(*[cast(jnp.take(x, i, axis=in_axis)) for i in range(3)])]
    _assert_bitwise(got, want)


def test_casts_stay_differentiable(rng):
  # The casts were plain JAX before they became primitives; gradients follow the reference.
  from jax_deepgemm.quant_kernels import per_token_cast_reference
  x = randn(rng, (4, 300), jnp.float32)
  got = jax.grad(lambda x: jd.per_token_cast_to_fp8(x)[1].sum())(x)
  want = jax.grad(lambda x: per_token_cast_reference(x)[1].sum())(x)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert np.abs(np.asarray(got)).sum() > 0


# ----------------------------------------------------------------------------- kernel arithmetic

def _model_cast(x, use_ue8m0, recip):
  """NumPy model of the kernels' arithmetic on [R, C] (1x128 groups), division done as given."""
  import ml_dtypes
  x = np.asarray(x, np.float32)
  r, c = x.shape
  g = -(-c // 128)
  xp = np.zeros((r, g * 128), np.float32)
  xp[:, :c] = x
  xg = xp.reshape(r, g, 128)
  amax = np.abs(xg).max(axis=-1)
  # XLA folds / 448 into * fl(1/448); the kernels multiply by the same constant.
  scale = np.maximum(amax, np.float32(1e-4)) * (np.float32(1) / np.float32(448))
  if use_ue8m0:
    bits = scale.view(np.uint32)
    exp = bits & np.uint32(0x7F800000)
    scale = np.where(bits & np.uint32(0x7FFFFF), exp + np.uint32(0x800000), exp).astype(
        np.uint32).view(np.float32)
  v = xg * (np.float32(1) / scale)[..., None] if recip else xg / scale[..., None]
  q = v.astype(ml_dtypes.float8_e4m3fn).reshape(r, g * 128)[:, :c]
  return q, scale


def _splits_division_modes(scale):
  """An x < 448 * scale that x / scale and x * (1 / scale) quantize to different e4m3."""
  import ml_dtypes
  e4m3 = ml_dtypes.float8_e4m3fn
  recip = np.float32(1) / scale
  grid = np.arange(0x38, 0x7E, dtype=np.uint8).view(e4m3).astype(np.float32)  # 1 .. 416
  for mid in (grid[:-1] + grid[1:]) / 2:  # e4m3 rounding boundaries
    x = np.float32(mid * scale)
    for _ in range(8):
      if np.float32(x / scale).astype(e4m3) != np.float32(x * recip).astype(e4m3):
        return x
      x = np.nextafter(x, np.float32(np.inf))
  raise AssertionError("no value tells x / scale from x * (1 / scale)")


@pytest.mark.parametrize("use_ue8m0", [False, True])
def test_kernel_arithmetic_model_matches_cpu_reference(rng, use_ue8m0):
  # On CPU XLA compiles x / scale as x * (1 / scale); the probe the kernels use to pick
  # their division must say so, and the model (scale = max(amax, 1e-4) * fl(1/448), the
  # UE8M0 bit ops, round-to-nearest e4m3) must then reproduce the reference bit for bit.
  from jax_deepgemm.quant_kernels import division_probe
  recip = division_probe("token", jax.devices("cpu")[0])
  x = np.array(randn(rng, (33, 300), jnp.float32, scale=30.0))
  x[0] = 0.0                          # all-zero groups
  x[1, :128] = 1e-6                   # amax below the floor
  x[2, 5] = 3e38                      # huge values
  x[3, 7] = -1e-30                    # tiny ones (-0 after quantization)
  x[4] = np.float32(448.0) * np.exp2(rng.integers(-20, 20, 300)).astype(np.float32)
  if not use_ue8m0:  # (power-of-two scales divide exactly either way)
    x[5, :128] = 0.0
    x[5, 0] = 300.0
    x[5, 1] = _splits_division_modes(np.float32(300.0) * (np.float32(1) / np.float32(448)))
    assert (_model_cast(x, False, True)[0] != _model_cast(x, False, False)[0]).any()
  q, s = jd.per_token_cast_to_fp8(jnp.asarray(x), use_ue8m0=use_ue8m0)
  qm, sm = _model_cast(x, use_ue8m0, recip)
  np.testing.assert_array_equal(np.asarray(s).view(np.uint32), sm.view(np.uint32))
  np.testing.assert_array_equal(np.asarray(q).view(np.uint8), qm.view(np.uint8))


def test_hlo_division_parser():
  from jax_deepgemm.quant_kernels import hlo_divides_by_reciprocal
  div = "%d = f32[8,2,128]{2,1,0} divide(%a, %b)\n%r = f32[8,2]{1,0} divide(%one, %s)"
  rcp = "%r = f32[8,2]{1,0} divide(%one, %s)\n%m = f32[8,2,128]{2,1,0} multiply(%a, %b)"
  assert not hlo_divides_by_reciprocal(div, 2048)
  assert hlo_divides_by_reciprocal(rcp, 2048)


def test_cuda_lowering_calls_the_kernels(monkeypatch):
  # No GPU needed: lower for CUDA as if the kernels could run, and look at the custom calls.
  from jax_deepgemm import _ffi, quant_kernels
  monkeypatch.setattr(_ffi, "use_kernels", lambda: True)
  monkeypatch.setenv(quant_kernels.DIVISION_ENV, "recip")
  quant_kernels._kernel_recip.cache_clear()
  x = jax.ShapeDtypeStruct((3, 300, 130), jnp.bfloat16)
  cases = [
      (lambda x: jd.per_token_cast_to_fp8(x, use_ue8m0=True), "per_token_cast",
       "tensor<900x130xbf16>", "use_ue8m0 = 1"),
      (lambda x: jd.per_token_cast_to_fp8(x, axis=1), "token_axis_cast",
       "tensor<3x300x130xbf16>", "transpose = 0"),
      (jd.per_token_cast_transpose_to_fp8, "token_axis_cast", "tensor<3x130x300xf8E4M3FN>",
       "transpose = 1"),
      (jd.per_block_cast_to_fp8, "per_block_cast", "tensor<3x3x2xf32>", "recip = 1"),
      (jax.vmap(jd.per_token_cast_transpose_to_fp8, in_axes=2), "token_axis_cast",
       "tensor<130x3x300xbf16>", "transpose = 1"),
  ]
  try:
    for fn, target, shape, attr in cases:
      text = jax.jit(fn).trace(x).lower(lowering_platforms=("cuda",)).as_text()
      calls = [l for l in text.splitlines() if "stablehlo.custom_call" in l]
      assert len(calls) == 1 and f"@jax_deepgemm_{target}(" in calls[0], calls
      assert shape in calls[0] and attr in calls[0], calls[0]
  finally:
    quant_kernels._kernel_recip.cache_clear()


# ----------------------------------------------------------------------------- dual cast

def _separate_casts(x, use_ue8m0=False):
  return (*jd.per_token_cast_to_fp8(x, use_ue8m0=use_ue8m0),
          *jd.per_token_cast_transpose_to_fp8(x, use_ue8m0=use_ue8m0))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("shape", [(7, 130), (129, 256), (300, 1000), (1, 1), (2, 129, 130),
                                   (2, 3, 7, 256)])
@pytest.mark.parametrize("use_ue8m0", [False, True])
def test_dual_cast_is_both_casts(rng, dtype, shape, use_ue8m0):
  x = randn(rng, shape, dtype)
  got = jax.jit(lambda x: jd.per_token_cast_to_fp8_and_transpose(x, use_ue8m0=use_ue8m0))(x)
  want = jax.jit(lambda x: _separate_casts(x, use_ue8m0))(x)
  *lead, t, c = shape
  lead = tuple(lead)
  assert [g.shape for g in got] == [shape, lead + (t, -(-c // 128)), lead + (c, t),
                                    lead + (-(-t // 128), c)]
  _assert_bitwise(got, want)


def test_dual_cast_non_finite(rng):
  x = np.array(randn(rng, (130, 300), jnp.float32))
  x[3, 5], x[7, 200], x[9, 130], x[129, 299] = np.nan, np.inf, -np.inf, np.nan
  for dtype in (jnp.float32, jnp.bfloat16):
    for use_ue8m0 in (False, True):
      xd = jnp.asarray(x, dtype)
      got = jd.per_token_cast_to_fp8_and_transpose(xd, use_ue8m0=use_ue8m0)
      _assert_bitwise(got, _separate_casts(xd, use_ue8m0))


def test_ue8m0_keeps_non_finite_scales(rng):
  # Rounding a NaN scale's exponent up carried into the sign bit: the group's scale was -0.0.
  x = np.array(randn(rng, (4, 384), jnp.float32))
  x[1, 5], x[2, 200] = np.nan, np.inf
  for fn in (jd.per_token_cast_to_fp8, jd.per_block_cast_to_fp8,
             lambda x, **kw: jd.per_token_cast_to_fp8(x, axis=0, **kw)):
    _, s = fn(jnp.asarray(x), use_ue8m0=True)
    _, s_plain = fn(jnp.asarray(x))
    s, s_plain = np.asarray(s), np.asarray(s_plain)
    np.testing.assert_array_equal(np.isnan(s), np.isnan(s_plain))
    np.testing.assert_array_equal(np.isinf(s), np.isinf(s_plain))
    assert np.isnan(s).any() and not np.signbit(s).any()
    finite = np.isfinite(s)
    np.testing.assert_array_equal(np.exp2(np.round(np.log2(s[finite]))), s[finite])


@pytest.mark.parametrize("in_axis", [0, 1, 2])
def test_dual_cast_vmap(rng, in_axis):
  x = jnp.moveaxis(randn(rng, (3, 200, 130), jnp.bfloat16), 0, in_axis)
  cast = jd.per_token_cast_to_fp8_and_transpose
  got = jax.vmap(cast, in_axes=in_axis)(x)
  want = [jnp.stack(o) for o in zip(*[cast(jnp.take(x, i, axis=in_axis)) for i in range(3)])]
  _assert_bitwise(got, want)
  _assert_bitwise(got, jax.vmap(_separate_casts, in_axes=in_axis)(x))


def test_dual_cast_differentiable(rng):
  x = randn(rng, (4, 300), jnp.float32)
  got = jax.grad(lambda x: sum(o.sum() for o in jd.per_token_cast_to_fp8_and_transpose(x)[1::2]))(x)
  want = jax.grad(lambda x: sum(o.sum() for o in _separate_casts(x)[1::2]))(x)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_dual_cast_bad_input():
  with pytest.raises(ValueError, match="per_token_cast_to_fp8_and_transpose"):
    jd.per_token_cast_to_fp8_and_transpose(jnp.ones((128,)))
  with pytest.raises(TypeError, match="per_token_cast_to_fp8_and_transpose"):
    jd.per_token_cast_to_fp8_and_transpose(jnp.ones((4, 128), jnp.int32))
  with pytest.raises(TypeError, match="per_token_cast_to_fp8_and_transpose"):
    jd.per_token_cast_to_fp8_and_transpose(jnp.ones((4, 128), jnp.float8_e4m3fn))


def test_dual_cast_cuda_lowering(monkeypatch):
  # One custom call with four results and both recip flags (no GPU needed).
  from jax_deepgemm import _ffi, quant_kernels
  monkeypatch.setattr(_ffi, "use_kernels", lambda: True)
  monkeypatch.setenv(quant_kernels.DIVISION_ENV, "recip")
  quant_kernels._kernel_recip.cache_clear()
  try:
    for fn, x_type in [(jd.per_token_cast_to_fp8_and_transpose, "tensor<3x300x130xbf16>"),
                       (jax.vmap(jd.per_token_cast_to_fp8_and_transpose, in_axes=2),
                        "tensor<130x3x300xbf16>")]:
      x = jax.ShapeDtypeStruct((3, 300, 130), jnp.bfloat16)
      text = jax.jit(fn).trace(x).lower(lowering_platforms=("cuda",)).as_text()
      calls = [l for l in text.splitlines() if "stablehlo.custom_call" in l]
      assert len(calls) == 1 and "@jax_deepgemm_dual_cast(" in calls[0], calls
      for part in (x_type, "recip_token = 1", "recip_axis = 1", "use_ue8m0 = 0"):
        assert part in calls[0], (part, calls[0])
  finally:
    quant_kernels._kernel_recip.cache_clear()


def test_gathered_dual_cast(rng, monkeypatch):
  # The dual cast of x's rows `rows` (a zero row where an index is outside [0, S)), each
  # optionally times its row_scale (rounded to x's dtype), vmapped; on CUDA one custom call
  # taking x, rows, row_scale and keep_rows (no GPU needed); its type checks.
  from jax_deepgemm import _ffi, quant_kernels as qk
  x = randn(rng, (2, 40, 300), jnp.bfloat16)
  rows = jnp.asarray(rng.integers(-3, 45, size=(2, 130)), jnp.int32)
  keep = jnp.asarray([130, 100], jnp.int32)
  scale = jnp.asarray(rng.uniform(0.1, 1.0, size=(2, 130)), jnp.float32)
  none = jnp.zeros((2, 0), jnp.float32)
  bind = jax.jit(lambda x, r, f, k: qk.gathered_dual_cast_p.bind(x, r, f, k, use_ue8m0=False))
  inside = ((rows >= 0) & (rows < 40))[..., None]
  xg = jnp.where(inside, jnp.take_along_axis(x, jnp.clip(rows, 0, 39)[..., None], axis=1), 0)
  for f, rows_x in ((none, xg), (scale, (scale[..., None] * xg.astype(jnp.float32)).astype(
      x.dtype))):
    got = bind(x, rows, f, keep)
    want = qk.dual_cast_reference(rows_x, keep)
    for g, w in zip(got, want):
      np.testing.assert_array_equal(np.asarray(g.astype(jnp.float32)),
                                    np.asarray(w.astype(jnp.float32)))
    many = jax.vmap(bind, in_axes=(None, 0, 0, 0))(x[0], rows, f, keep)
    for g, w in zip(many, bind(jnp.stack([x[0], x[0]]), rows, f, keep)):
      np.testing.assert_array_equal(np.asarray(g.astype(jnp.float32)),
                                    np.asarray(w.astype(jnp.float32)))
  assert not np.array_equal(np.asarray(bind(x, rows, scale, keep)[1]),
                            np.asarray(bind(x, rows, none, keep)[1]))
  with pytest.raises(ValueError, match="rows must be int32"):
    bind(x, rows.astype(jnp.int16), none, keep)
  with pytest.raises(ValueError, match="rows must be int32"):
    bind(x, rows[0], none, keep)
  with pytest.raises(ValueError, match="keep_rows must be int32"):
    bind(x, rows, none, keep[0])
  with pytest.raises(ValueError, match=r"row_scale must be f32 \(2, 130\)"):
    bind(x, rows, scale[:, :5], keep)
  with pytest.raises(ValueError, match="row_scale must be f32"):
    bind(x, rows, scale.astype(jnp.bfloat16), keep)
  monkeypatch.setattr(_ffi, "use_kernels", lambda: True)
  for f in (none, scale):
    text = bind.trace(x, rows, f, keep).lower(lowering_platforms=("cuda",)).as_text()
    calls = [l for l in text.splitlines() if "stablehlo.custom_call" in l]
    assert len(calls) == 1 and "@jax_deepgemm_gathered_dual_cast(" in calls[0], calls
    for part in ("tensor<2x40x300xbf16>", "tensor<2x130xi32>", f"tensor<2x{f.shape[1]}xf32>",
                 "tensor<2xi32>"):
      assert part in calls[0], (part, calls[0])


def test_fp8_linear_casts_each_operand_once(monkeypatch):
  # fp8_linear's forward casts X and W, its backward dY, each with one dual cast; the
  # backward does not cast W again (no GPU needed). Likewise fp8_grouped_linear.
  from jax_deepgemm import _ffi, quant_kernels
  monkeypatch.setattr(_ffi, "use_kernels", lambda: True)
  quant_kernels._kernel_recip.cache_clear()
  x = jax.ShapeDtypeStruct((256, 384), jnp.bfloat16)
  gs = jnp.asarray([100, 156], jnp.int32)
  layers = [(jd.fp8_linear, jax.ShapeDtypeStruct((384, 256), jnp.bfloat16)),
            (lambda x, w: jd.fp8_grouped_linear(x, w, gs),
             jax.ShapeDtypeStruct((2, 384, 256), jnp.bfloat16))]
  try:
    for layer, w in layers:
      f = jax.grad(lambda x, w: layer(x, w).astype(jnp.float32).sum(), argnums=(0, 1))
      text = jax.jit(f).trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
      calls = [l for l in text.splitlines() if "stablehlo.custom_call" in l]
      assert sum("@jax_deepgemm_dual_cast(" in l for l in calls) == 2, calls
      assert sum("@jax_deepgemm_per_block_dual_cast(" in l for l in calls) == 1, calls
      assert not any(f"@jax_deepgemm_{op}(" in l for l in calls
                     for op in ("token_axis_cast", "per_token_cast", "per_block_cast")), calls
  finally:
    quant_kernels._kernel_recip.cache_clear()


# ----------------------------------------------------------------------------- per-block dual cast

def _separate_block_casts(w, use_ue8m0=False):
  return (*jd.per_block_cast_to_fp8(w, use_ue8m0=use_ue8m0),
          *jd.per_block_cast_to_fp8(w, use_ue8m0=use_ue8m0, transpose=True))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("shape", [(300, 200), (129, 1000), (1, 1), (128, 256), (3, 257, 130),
                                   (2, 3, 7, 129)])
@pytest.mark.parametrize("use_ue8m0", [False, True])
def test_block_dual_cast_is_both_casts(rng, dtype, shape, use_ue8m0):
  w = randn(rng, shape, dtype)
  got = jax.jit(lambda w: jd.per_block_cast_to_fp8_and_transpose(w, use_ue8m0=use_ue8m0))(w)
  want = jax.jit(lambda w: _separate_block_casts(w, use_ue8m0))(w)
  *lead, n, k = shape
  lead, nb, kb = tuple(lead), -(-n // 128), -(-k // 128)
  assert [g.shape for g in got] == [shape, lead + (nb, kb), lead + (k, n), lead + (kb, nb)]
  _assert_bitwise(got, want)
  # The primitive's reference: q, its transpose (the transposed reference's q, bitwise), s.
  from jax_deepgemm.quant_kernels import per_block_cast_reference, per_block_dual_cast_reference
  q, qt, s = per_block_dual_cast_reference(w, use_ue8m0=use_ue8m0)
  _assert_bitwise((q, s), per_block_cast_reference(w, use_ue8m0=use_ue8m0))
  _assert_bitwise((qt,), per_block_cast_reference(w, use_ue8m0=use_ue8m0, transpose=True))


def test_block_dual_cast_non_finite(rng):
  w = np.array(randn(rng, (130, 300), jnp.float32))
  w[3, 5], w[7, 200], w[9, 130], w[129, 299] = np.nan, np.inf, -np.inf, np.nan
  for dtype in (jnp.float32, jnp.bfloat16):
    for use_ue8m0 in (False, True):
      wd = jnp.asarray(w, dtype)
      got = jd.per_block_cast_to_fp8_and_transpose(wd, use_ue8m0=use_ue8m0)
      _assert_bitwise(got, _separate_block_casts(wd, use_ue8m0))


@pytest.mark.parametrize("in_axis", [0, 1, 2])
def test_block_dual_cast_vmap(rng, in_axis):
  w = jnp.moveaxis(randn(rng, (3, 200, 130), jnp.bfloat16), 0, in_axis)
  cast = jd.per_block_cast_to_fp8_and_transpose
  got = jax.vmap(cast, in_axes=in_axis)(w)
  want = [jnp.stack(o) for o in zip(*[cast(jnp.take(w, i, axis=in_axis)) for i in range(3)])]
  _assert_bitwise(got, want)
  _assert_bitwise(got, jax.vmap(_separate_block_casts, in_axes=in_axis)(w))


def test_block_dual_cast_differentiable(rng):
  w = randn(rng, (130, 300), jnp.float32)
  got = jax.grad(lambda w: sum(o.sum() for o in jd.per_block_cast_to_fp8_and_transpose(w)[1::2]))(w)
  want = jax.grad(lambda w: sum(o.sum() for o in _separate_block_casts(w)[1::2]))(w)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_block_dual_cast_bad_input():
  with pytest.raises(ValueError, match="per_block_cast_to_fp8_and_transpose"):
    jd.per_block_cast_to_fp8_and_transpose(jnp.ones((128,)))
  with pytest.raises(TypeError, match="per_block_cast_to_fp8_and_transpose"):
    jd.per_block_cast_to_fp8_and_transpose(jnp.ones((4, 128), jnp.int32))
  with pytest.raises(TypeError, match="per_block_cast_to_fp8_and_transpose"):
    jd.per_block_cast_to_fp8_and_transpose(jnp.ones((4, 128), jnp.float8_e4m3fn))


def test_block_dual_cast_cuda_lowering(monkeypatch):
  # One custom call with three results, [B, N, K] in (no GPU needed).
  from jax_deepgemm import _ffi, quant_kernels
  monkeypatch.setattr(_ffi, "use_kernels", lambda: True)
  monkeypatch.setenv(quant_kernels.DIVISION_ENV, "recip")
  quant_kernels._kernel_recip.cache_clear()
  try:
    for fn, x_type in [(jd.per_block_cast_to_fp8_and_transpose, "tensor<3x300x130xbf16>"),
                       (jax.vmap(jd.per_block_cast_to_fp8_and_transpose, in_axes=2),
                        "tensor<130x3x300xbf16>")]:
      w = jax.ShapeDtypeStruct((3, 300, 130), jnp.bfloat16)
      text = jax.jit(fn).trace(w).lower(lowering_platforms=("cuda",)).as_text()
      calls = [l for l in text.splitlines() if "stablehlo.custom_call" in l]
      assert len(calls) == 1 and "@jax_deepgemm_per_block_dual_cast(" in calls[0], calls
      for part in (x_type, "recip = 1", "use_ue8m0 = 0"):
        assert part in calls[0], (part, calls[0])
  finally:
    quant_kernels._kernel_recip.cache_clear()
