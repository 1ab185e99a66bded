"""fp8_gemm_nt on the default backend (the reference on CPU, the kernel on Hopper)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_deepgemm as jd
import oracle
from helpers import quant_act, quant_w, randn

SHAPES = [(1, 128, 128), (7, 130, 300), (127, 256, 16), (128, 1, 384), (64, 200, 130),
          (300, 512, 1000)]


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float32])
def test_matches_float64(rng, m, n, k, out_dtype):
  a, sa = quant_act(rng, m, k)
  b, sb = quant_w(rng, n, k)
  d = jax.jit(jd.fp8_gemm_nt, static_argnames="out_dtype")(a, sa, b, sb, out_dtype=out_dtype)
  assert d.shape == (m, n) and d.dtype == out_dtype
  want = oracle.gemm_nt(a, sa, b, sb)
  assert oracle.calc_diff(d, want) < 1e-5
  oracle.assert_elementwise(d, want, oracle.gemm_nt_abs(a, sa, b, sb), out_dtype)


def test_elementwise_check_can_fail(rng):
  # One element off by 5% of the output's typical size passes calc_diff and fails here.
  a, sa = quant_act(rng, 300, 1000)
  b, sb = quant_w(rng, 512, 1000)
  want, mag = oracle.gemm_nt(a, sa, b, sb), oracle.gemm_nt_abs(a, sa, b, sb)
  d = np.array(jd.fp8_gemm_nt(a, sa, b, sb).astype(jnp.float32))
  oracle.assert_elementwise(d, want, mag, jnp.bfloat16)
  d[123, 45] += 0.05 * np.sqrt(np.mean(want ** 2))
  assert oracle.calc_diff(d, want) < 1e-5
  with pytest.raises(AssertionError, match=r"1 of 153600 elements off, first at \(123, 45\)"):
    oracle.assert_elementwise(d, want, mag, jnp.bfloat16)


@pytest.mark.parametrize("bias_dtype", [jnp.float32, jnp.bfloat16])
def test_bias(rng, bias_dtype):
  a, sa = quant_act(rng, 33, 256)
  b, sb = quant_w(rng, 190, 256)
  bias = randn(rng, (190,), bias_dtype, scale=10.0)
  d = jd.fp8_gemm_nt(a, sa, b, sb, bias=bias)
  want = oracle.gemm_nt(a, sa, b, sb, bias=bias)
  assert oracle.calc_diff(d, want) < 1e-5
  oracle.assert_elementwise(d, want, oracle.gemm_nt_abs(a, sa, b, sb), jnp.bfloat16)


def test_accumulate_into_c(rng):
  a, sa = quant_act(rng, 65, 384)
  b, sb = quant_w(rng, 129, 384)
  c = randn(rng, (65, 129), scale=50.0)
  f = jax.jit(lambda c, *x: jd.fp8_gemm_nt(*x, c=c), donate_argnums=0)
  want = oracle.gemm_nt(a, sa, b, sb, c=c)
  d = f(c, a, sa, b, sb)
  assert d.dtype == jnp.float32
  assert oracle.calc_diff(d, want) < 1e-5
  # Accumulation must really add: without c the answer differs.
  assert oracle.calc_diff(jd.fp8_gemm_nt(a, sa, b, sb, out_dtype=jnp.float32), want) > 1e-3


def test_bias_and_c_together(rng):
  a, sa = quant_act(rng, 9, 128)
  b, sb = quant_w(rng, 140, 128)
  bias, c = randn(rng, (140,)), randn(rng, (9, 140))
  d = jd.fp8_gemm_nt(a, sa, b, sb, bias=bias, c=c)
  assert oracle.calc_diff(d, oracle.gemm_nt(a, sa, b, sb, bias=bias, c=c)) < 1e-5


def test_bias_under_rank_promotion_raise(rng):
  # The reference added bias [N] to [M, N] by rank promotion: under
  # jax_numpy_rank_promotion='raise' (a common strictness setting) fp8_gemm_nt(bias=...) and
  # fp8_linear(x, w, bias) raised "Operands could not be broadcast together".
  a, sa = quant_act(rng, 9, 256)
  b, sb = quant_w(rng, 140, 256)
  bias = randn(rng, (140,))
  x, w = randn(rng, (2, 5, 256)), randn(rng, (256, 140), scale=0.1)
  with jax.numpy_rank_promotion("raise"):
    d = jax.jit(lambda *z: jd.fp8_gemm_nt(*z[:4], bias=z[4]))(a, sa, b, sb, bias)
    y = jax.jit(jd.fp8_linear)(x, w, bias)
  assert oracle.calc_diff(d, oracle.gemm_nt(a, sa, b, sb, bias=bias)) < 1e-5
  want = oracle.f64(x) @ oracle.f64(w) + oracle.f64(bias)
  assert y.shape == (2, 5, 140) and oracle.calc_diff(y, want) < 1e-3


def test_vmap_over_activations_folds_into_m(rng):
  a, sa = quant_act(rng, 3 * 20, 256)
  b, sb = quant_w(rng, 130, 256)
  a3, sa3 = a.reshape(3, 20, 256), sa.reshape(3, 20, 2)
  d = jax.vmap(jd.fp8_gemm_nt, in_axes=(0, 0, None, None))(a3, sa3, b, sb)
  assert oracle.calc_diff(d.reshape(60, 130), oracle.gemm_nt(a, sa, b, sb)) < 1e-5
  jaxpr = str(jax.make_jaxpr(jax.vmap(jd.fp8_gemm_nt, in_axes=(0, 0, None, None)))(a3, sa3, b, sb))
  assert "scan" not in jaxpr  # one folded GEMM, not a loop


def test_vmap_over_both_operands(rng):
  xs = [quant_act(rng, 17, 256) for _ in range(3)]
  ws = [quant_w(rng, 70, 256) for _ in range(3)]
  a, sa = (jnp.stack(t) for t in zip(*xs))
  b, sb = (jnp.stack(t) for t in zip(*ws))
  d = jax.jit(jax.vmap(jd.fp8_gemm_nt))(a, sa, b, sb)
  for i in range(3):
    assert oracle.calc_diff(d[i], oracle.gemm_nt(*xs[i], *ws[i])) < 1e-5


def test_vmap_weights_only_with_bias_axis1(rng):
  a, sa = quant_act(rng, 5, 128)
  ws = [quant_w(rng, 40, 128) for _ in range(2)]
  b, sb = (jnp.stack(t, axis=1) for t in zip(*ws))  # batch on axis 1
  bias = randn(rng, (40,))
  d = jax.vmap(lambda b, sb: jd.fp8_gemm_nt(a, sa, b, sb, bias=bias), in_axes=(1, 1))(b, sb)
  for i in range(2):
    assert oracle.calc_diff(d[i], oracle.gemm_nt(a, sa, *ws[i], bias=bias)) < 1e-5


def test_nested_vmap(rng):
  a, sa = quant_act(rng, 2 * 3 * 4, 128)
  b, sb = quant_w(rng, 8, 128)
  f = jax.vmap(jax.vmap(jd.fp8_gemm_nt, in_axes=(0, 0, None, None)), in_axes=(0, 0, None, None))
  d = f(a.reshape(2, 3, 4, 128), sa.reshape(2, 3, 4, 1), b, sb)
  assert oracle.calc_diff(d.reshape(24, 8), oracle.gemm_nt(a, sa, b, sb)) < 1e-5


def test_errors_at_trace_time(rng):
  a, sa = quant_act(rng, 8, 256)
  b, sb = quant_w(rng, 16, 256)
  f = jax.jit(jd.fp8_gemm_nt)
  with pytest.raises(TypeError, match="a must be float8_e4m3fn"):
    f(a.astype(jnp.bfloat16), sa, b, sb)
  with pytest.raises(TypeError, match="sb must be float32"):
    f(a, sa, b, sb.astype(jnp.bfloat16))
  with pytest.raises(ValueError, match="K differs"):
    f(a, sa, b[:, :128], sb)
  with pytest.raises(ValueError, match=r"sa must have shape \(8, 2\)"):
    f(a, sa[:, :1], b, sb)
  with pytest.raises(ValueError, match=r"sb must have shape \(1, 2\)"):
    f(a, sa, b, sb.T)
  with pytest.raises(ValueError, match="a must be 2-D"):
    f(a[None], sa, b, sb)
  with pytest.raises(ValueError, match=r"bias must have shape \(16,\)"):
    jd.fp8_gemm_nt(a, sa, b, sb, bias=jnp.zeros((15,)))
  with pytest.raises(TypeError, match="c must be float32"):
    jd.fp8_gemm_nt(a, sa, b, sb, c=jnp.zeros((8, 16), jnp.bfloat16))
  with pytest.raises(TypeError, match="produces float32"):
    jd.fp8_gemm_nt(a, sa, b, sb, c=jnp.zeros((8, 16)), out_dtype=jnp.bfloat16)
  with pytest.raises(TypeError, match="out_dtype"):
    jd.fp8_gemm_nt(a, sa, b, sb, out_dtype=jnp.float16)
  with pytest.raises(TypeError, match="fp8_gemm_nt: out_dtype must be bfloat16 or float32, "
                     "got 'garbage'"):
    jd.fp8_gemm_nt(a, sa, b, sb, out_dtype="garbage")
  with pytest.raises(TypeError, match="fp8_gemm_nt: out_dtype must be bfloat16 or float32"):
    jd.fp8_gemm_nt(a, sa, b, sb, c=jnp.zeros((8, 16)), out_dtype="garbage")  # with c too


NOT_ARRAYS = [None, "x", {}, object(), [[1.0], [2.0, 3.0]]]  # (the last a ragged list)


def _gemm_calls(rng):
  """Each GEMM op's valid arguments as (op, call(**args), {operand name: value})."""
  a, sa = quant_act(rng, 16, 256)
  b, sb = quant_w(rng, 2, 32, 256)
  a3, sa3 = a.reshape(2, 8, 256), sa.reshape(2, 8, 2)
  t, st = quant_act(rng, 64, 16, axis=0)
  gs = jnp.asarray([10, 6], jnp.int32)
  return [
      ("fp8_gemm_nt", lambda **k: jd.fp8_gemm_nt(k["a"], k["sa"], k["b"], k["sb"],
                                                 bias=k["bias"], c=k["c"]),
       dict(a=a, sa=sa, b=b[0], sb=sb[0], bias=jnp.zeros((32,)), c=jnp.zeros((16, 32)))),
      ("m_grouped_fp8_gemm_nt_contiguous",
       lambda **k: jd.m_grouped_fp8_gemm_nt_contiguous(k["a"], k["sa"], k["b"], k["sb"], gs),
       dict(a=a, sa=sa, b=b, sb=sb)),
      ("m_grouped_fp8_gemm_nt_masked",
       lambda **k: jd.m_grouped_fp8_gemm_nt_masked(k["a"], k["sa"], k["b"], k["sb"], gs),
       dict(a=a3, sa=sa3, b=b, sb=sb)),
      ("k_grouped_fp8_gemm_tn_contiguous",
       lambda **k: jd.k_grouped_fp8_gemm_tn_contiguous(k["a"], k["sa"], k["b"], k["sb"], gs,
                                                       c=k["c"]),
       dict(a=t, sa=st, b=t, sb=st, c=jnp.zeros((2, 16, 16)))),
  ]


def test_operands_that_are_no_arrays_are_named(rng):
  # None, a string, a dict, ... where an array belongs gave JAX's unnamed conversion errors
  # ("None is not a valid value for jnp.array", a ValueError); a TypeError naming the op and
  # the operand now. NumPy arrays and (rectangular) lists of numbers still convert.
  for op, call, args in _gemm_calls(rng):
    want = np.asarray(call(**args), np.float32)
    for name in args:
      for bad in NOT_ARRAYS[name in ("bias", "c"):]:  # (None: no bias, no c)
        with pytest.raises(TypeError, match=f"^{op}: {name} must be an array of numbers, "
                           f"got {type(bad).__name__}"):
          call(**dict(args, **{name: bad}))
      as_numpy = dict(args, **{name: np.asarray(args[name])})
      np.testing.assert_array_equal(np.asarray(call(**as_numpy), np.float32), want)
    if "c" in args:
      as_list = dict(args, c=np.asarray(args["c"]).tolist())
      np.testing.assert_array_equal(np.asarray(call(**as_list), np.float32), want)
