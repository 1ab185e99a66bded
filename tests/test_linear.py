"""fp8_linear / fp8_grouped_linear: values and gradients against float64 autodiff."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_deepgemm as jd
import oracle
from helpers import randn


def f64(x):
  return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("m,k,n", [(7, 300, 130), (128, 256, 256)])
def test_linear_value_and_grads(rng, dtype, m, k, n):
  x = randn(rng, (m, k), dtype)
  w = randn(rng, (k, n), dtype, scale=k ** -0.5)
  b = randn(rng, (n,), dtype)
  r = randn(rng, (m, n), jnp.float32)  # cotangent
  loss = lambda x, w, b: jnp.sum(jd.fp8_linear(x, w, b).astype(jnp.float32) * r)
  y = jax.jit(jd.fp8_linear)(x, w, b)
  assert y.dtype == dtype and y.shape == (m, n)
  assert oracle.calc_diff(y, f64(x) @ f64(w) + f64(b)) < 1e-3
  dx, dw, db = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, w, b)
  assert (dx.dtype, dw.dtype, db.dtype) == (dtype, dtype, dtype)
  rr = f64(r)
  assert oracle.calc_diff(dx, rr @ f64(w).T) < 2e-3
  assert oracle.calc_diff(dw, f64(x).T @ rr) < 2e-3
  assert oracle.calc_diff(db, rr.sum(0)) < 1e-4


@pytest.mark.parametrize("use_bias", [False, True])
def test_linear_preferred_element_type(rng, use_bias):
  # bf16 operands, f32 result: the GEMM's f32 output itself (plus the bias in f32), not a
  # bf16 result cast up; the bf16 result is its rounding. Gradients keep the inputs' dtypes.
  m, k, n = 70, 384, 200
  x = randn(rng, (m, k), jnp.bfloat16)
  w = randn(rng, (k, n), jnp.bfloat16, scale=k ** -0.5)
  b = randn(rng, (n,), jnp.bfloat16) if use_bias else None
  y32 = jax.jit(lambda x, w, b: jd.fp8_linear(x, w, b, preferred_element_type=jnp.float32))(
      x, w, b)
  y16 = jax.jit(jd.fp8_linear)(x, w, b)
  assert y32.dtype == jnp.float32 and y16.dtype == jnp.bfloat16
  rounded = np.asarray(y32.astype(jnp.bfloat16), np.float32)
  if jd.use_kernels() or jax.default_backend() == "cpu":
    np.testing.assert_array_equal(rounded, np.asarray(y16, np.float32))
  else:  # the reference on a GPU: XLA's dots, compiled per program, may round a tie apart
    assert (rounded != np.asarray(y16, np.float32)).mean() < 1e-3
  assert (np.asarray(y32) != np.asarray(y32.astype(jnp.bfloat16), np.float32)).mean() > 0.9
  want = f64(x) @ f64(w) + (0.0 if b is None else f64(b))
  assert oracle.calc_diff(y32, want) < 1e-3
  r = randn(rng, (m, n), jnp.float32)
  loss = lambda x, w, b: jnp.sum(jd.fp8_linear(x, w, b, preferred_element_type=jnp.float32) * r)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2) if use_bias else (0, 1)))(x, w, b)
  assert all(g.dtype == jnp.bfloat16 for g in grads)
  rr = f64(r)
  assert oracle.calc_diff(grads[0], rr @ f64(w).T) < 2e-3
  assert oracle.calc_diff(grads[1], f64(x).T @ rr) < 2e-3
  if use_bias:
    assert oracle.calc_diff(grads[2], rr.sum(0)) < 1e-4
  for bad in (jnp.int32, jnp.float8_e4m3fn, "nonsense"):
    with pytest.raises(TypeError, match="fp8_linear: preferred_element_type"):
      jd.fp8_linear(x, w, preferred_element_type=bad)


def test_linear_leading_dims_vmap_checkpoint(rng):
  x = randn(rng, (2, 3, 5, 128), jnp.bfloat16)
  w = randn(rng, (128, 64), jnp.bfloat16, scale=0.1)
  y = jd.fp8_linear(x, w)
  assert y.shape == (2, 3, 5, 64)
  yv = jax.vmap(jd.fp8_linear, in_axes=(0, None))(x, w)
  np.testing.assert_array_equal(f64(yv), f64(y))
  g1 = jax.grad(lambda w: jnp.sum(jd.fp8_linear(x, w).astype(jnp.float32) ** 2))(w)
  g2 = jax.grad(lambda w: jnp.sum(jax.checkpoint(jd.fp8_linear)(x, w).astype(jnp.float32) ** 2))(w)
  np.testing.assert_array_equal(f64(g1), f64(g2))


def _residuals(f, *args):
  """The arrays ``jax.vjp`` keeps for the backward pass of ``f(*args)``."""
  _, vjp_fn = jax.vjp(f, *args)
  return [(tuple(r.shape), jnp.dtype(r.dtype)) for r in jax.tree_util.tree_leaves(vjp_fn)]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_backward_keeps_fp8_activations_not_x(rng, dtype):
  # The forward saves X cast along tokens, [K, M] e4m3, instead of X [M, K] itself.
  m, k, n = 130, 384, 256
  x, w = randn(rng, (m, k), dtype), randn(rng, (k, n), dtype)
  res = _residuals(jd.fp8_linear, x, w)
  assert ((m, k), jnp.dtype(dtype)) not in res
  assert ((k, m), jnp.dtype(jnp.float8_e4m3fn)) in res
  gs = jnp.asarray([100, 0, 30], jnp.int32)
  w3 = randn(rng, (3, k, n), dtype)
  res = _residuals(lambda x, w: jd.fp8_grouped_linear(x, w, gs), x, w3)
  assert ((m, k), jnp.dtype(dtype)) not in res
  assert ((k, m), jnp.dtype(jnp.float8_e4m3fn)) in res


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_backward_keeps_fp8_weights_not_w(rng, dtype):
  # The forward saves W's [K, N] block cast (dgrad's operand, from the same read of W as the
  # forward GEMM's [N, K] one) instead of W; the backward does not cast W again.
  m, k, n = 130, 384, 256
  x, w = randn(rng, (m, k), dtype), randn(rng, (k, n), dtype)
  res = _residuals(jd.fp8_linear, x, w)
  assert ((k, n), jnp.dtype(dtype)) not in res
  assert ((k, n), jnp.dtype(jnp.float8_e4m3fn)) in res and ((3, 2), jnp.dtype(jnp.float32)) in res
  gs = jnp.asarray([100, 0, 30], jnp.int32)
  w3 = randn(rng, (3, k, n), dtype)
  res = _residuals(lambda x, w: jd.fp8_grouped_linear(x, w, gs), x, w3)
  assert ((3, k, n), jnp.dtype(dtype)) not in res
  assert ((3, k, n), jnp.dtype(jnp.float8_e4m3fn)) in res


ROUTING = [30, 0, 1, 129, 0, 40]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_grouped_value_and_grads(rng, dtype):
  g, k, n = len(ROUTING), 256, 136
  m = sum(ROUTING) + 5  # 5 trailing rows outside every group
  x = randn(rng, (m, k), dtype)
  w = randn(rng, (g, k, n), dtype, scale=k ** -0.5)
  gs = jnp.asarray(ROUTING, jnp.int32)
  r = randn(rng, (m, n), jnp.float32)
  loss = lambda x, w: jnp.sum(jd.fp8_grouped_linear(x, w, gs).astype(jnp.float32) * r)
  y = jax.jit(jd.fp8_grouped_linear)(x, w, gs)
  want = jax.lax.ragged_dot(x.astype(jnp.float32), w.astype(jnp.float32), gs,
                            precision=jax.lax.Precision.HIGHEST)
  assert y.dtype == dtype and oracle.calc_diff(y, want) < 1e-3
  dx, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
  xx, ww, rr = f64(x), f64(w), f64(r)
  dx_ref, dw_ref = np.zeros_like(xx), np.zeros_like(ww)
  start = 0
  for i, s in enumerate(ROUTING):
    dx_ref[start:start + s] = rr[start:start + s] @ ww[i].T
    dw_ref[i] = xx[start:start + s].T @ rr[start:start + s]
    start += s
  assert oracle.calc_diff(dx, dx_ref) < 2e-3
  assert oracle.calc_diff(dw, dw_ref) < 2e-3
  assert float(jnp.abs(dw[1].astype(jnp.float32)).max()) == 0.0  # empty expert
  assert float(jnp.abs(dx[start:].astype(jnp.float32)).max()) == 0.0  # rows in no group


def test_two_layer_network_trains_under_jit(rng):
  x = randn(rng, (64, 128), jnp.float32)
  target = randn(rng, (64, 32), jnp.float32)
  params = {"w1": randn(rng, (128, 256), jnp.float32, scale=128 ** -0.5),
            "w2": randn(rng, (4, 256, 32), jnp.float32, scale=256 ** -0.5)}
  gs = jnp.asarray([10, 20, 0, 34], jnp.int32)

  def loss(p):
    h = jax.nn.gelu(jd.fp8_linear(x, p["w1"]))
    return jnp.mean((jd.fp8_grouped_linear(h, p["w2"], gs) - target) ** 2)

  @jax.jit
  def step(p):
    l, g = jax.value_and_grad(loss)(p)
    return jax.tree.map(lambda a, b: a - 0.05 * b, p, g), l

  losses = []
  for _ in range(20):
    params, l = step(params)
    losses.append(float(l))
  assert losses[-1] < 0.8 * losses[0]


def test_errors():
  with pytest.raises(ValueError, match="fp8_linear"):
    jd.fp8_linear(jnp.ones((4, 128)), jnp.ones((64, 32)))
  with pytest.raises(TypeError, match="fp8_linear"):
    jd.fp8_linear(jnp.ones((4, 128), jnp.int32), jnp.ones((128, 32)))
  with pytest.raises(ValueError, match=r"group_sizes must have shape \(2,\)"):
    jd.fp8_grouped_linear(jnp.ones((4, 128)), jnp.ones((2, 128, 32)), jnp.ones((3,), jnp.int32))
  # The ops' exception type for a float group_sizes (it was a ValueError here).
  with pytest.raises(TypeError, match="fp8_grouped_linear: group_sizes must be an integer"):
    jd.fp8_grouped_linear(jnp.ones((4, 128)), jnp.ones((2, 128, 32)), jnp.ones((2,)))
  # A bias of another kind than x and w: refused, not silently cast (a complex one lost its
  # imaginary part).
  for dt in (jnp.int32, jnp.bool_, jnp.complex64, jnp.float8_e4m3fn):
    with pytest.raises(TypeError, match="fp8_linear: bias must be bf16"):
      jd.fp8_linear(jnp.ones((4, 128)), jnp.ones((128, 32)), jnp.ones((32,), dt))
  # Any 8-bit float is rejected, not re-quantized (its output would keep its few bits).
  for dt in (jnp.float8_e4m3fn, jnp.float8_e5m2, jnp.float8_e4m3fnuz):
    with pytest.raises(TypeError, match="fp8_linear: x must be bf16"):
      jd.fp8_linear(jnp.ones((4, 128), dt), jnp.ones((128, 32)))
    with pytest.raises(TypeError, match="fp8_grouped_linear: w must be bf16"):
      jd.fp8_grouped_linear(jnp.ones((4, 128)), jnp.ones((2, 128, 32), dt),
                            jnp.ones((2,), jnp.int32))


def test_operands_that_are_no_arrays_are_named():
  # As in the ops: a TypeError naming the layer and the operand (it was JAX's unnamed
  # "None is not a valid value for jnp.array", a ValueError). Lists of numbers still convert.
  x, w = jnp.ones((4, 128)), jnp.ones((128, 32))
  for bad in (None, "x", {"a": 1}):
    with pytest.raises(TypeError, match="fp8_linear: x must be an array of numbers"):
      jd.fp8_linear(bad, w)
    with pytest.raises(TypeError, match="fp8_linear: w must be an array of numbers"):
      jd.fp8_linear(x, bad)
    with pytest.raises(TypeError, match="fp8_linear: bias must be an array of numbers"):
      jd.fp8_linear(x, w, "b" if bad is None else bad)
    with pytest.raises(TypeError, match="fp8_grouped_linear: x must be an array of numbers"):
      jd.fp8_grouped_linear(bad, w[None], [4])
    with pytest.raises(TypeError, match="fp8_grouped_linear: w must be an array of numbers"):
      jd.fp8_grouped_linear(x, bad, [4])
  assert jd.fp8_linear(x.tolist(), w, [0.0] * 32).shape == (4, 32)


def test_forward_mode_and_second_derivatives_raise(rng):
  # First-order reverse mode only (README): the layers' custom_vjp has no forward mode, and
  # the ops their backward runs have no derivative; both say so.
  x = randn(rng, (16, 128), jnp.float32)
  w = randn(rng, (128, 32), jnp.float32, scale=0.1)
  loss = lambda x: jnp.sum(jd.fp8_linear(x, w) ** 2)
  with pytest.raises(TypeError, match="custom_vjp"):
    jax.jvp(loss, (x,), (x,))
  with pytest.raises(NotImplementedError, match="second derivatives are not supported"):
    jax.hessian(loss)(x)
  a, sa = jd.per_token_cast_to_fp8(x)
  b, sb = jd.per_block_cast_to_fp8(w.T)
  with pytest.raises(NotImplementedError, match="fp8_gemm_nt: the op has no derivative"):
    jax.jvp(lambda a: jd.fp8_gemm_nt(a, sa, b, sb), (a,), (a,))
  # Ops on values that are not differentiated still run inside a gradient.
  g = jax.grad(lambda s: s * jnp.sum(jd.fp8_gemm_nt(a, sa, b, sb, out_dtype=jnp.float32)))(2.0)
  assert np.isfinite(float(g))


def test_linear_empty_k_and_m():
  # K = 0 gives zeros (and zero gradients), M = 0 an empty result, as x @ w does.
  w = jnp.ones((0, 256))
  y, (dx, dw) = jax.value_and_grad(lambda x, w: jnp.sum(jd.fp8_linear(x, w)),
                                   argnums=(0, 1))(jnp.ones((3, 5, 0)), w)
  assert y == 0.0 and dx.shape == (3, 5, 0) and dw.shape == (0, 256)
  assert jd.fp8_linear(jnp.ones((2, 0, 128)), jnp.ones((128, 8))).shape == (2, 0, 8)
  y = jd.fp8_linear(jnp.ones((3, 0)), w)
  assert y.shape == (3, 256) and not np.asarray(y).any()


@pytest.mark.parametrize("fill", [np.nan, np.inf, 3e38])
def test_grouped_rows_past_the_groups_may_hold_anything(rng, fill):
  # jnp.take's NaN fill of padding rows (or garbage) past sum(group_sizes) must not reach
  # dW through the token-axis scale of the 128-row block the last group ends in (rows 169..
  # 199 share rows 128..168's block): the result and both gradients are those of zero rows.
  g, k, n, m = len(ROUTING), 256, 136, 260
  w = randn(rng, (g, k, n), jnp.float32, scale=k ** -0.5)
  gs = jnp.asarray(ROUTING, jnp.int32)  # sum 200
  x = randn(rng, (m, k), jnp.float32)
  r = randn(rng, (m, n), jnp.float32).at[200:].set(fill)  # dY past the groups too
  bad, clean = x.at[200:].set(fill), x.at[200:].set(0)
  grads = jax.jit(lambda x, r: jax.vjp(jd.fp8_grouped_linear, x, w, gs)[1](r)[:2])
  (dx0, dw0), (dx1, dw1) = grads(bad, r), grads(clean, r.at[200:].set(0))
  assert np.isfinite(np.asarray(dw0)).all() and np.isfinite(np.asarray(dx0)).all()
  np.testing.assert_array_equal(np.asarray(dw0), np.asarray(dw1))
  np.testing.assert_array_equal(np.asarray(dx0), np.asarray(dx1))
  assert float(jnp.abs(dx0[200:]).max()) == 0.0
  np.testing.assert_array_equal(np.asarray(jd.fp8_grouped_linear(bad, w, gs)[:200]),
                                np.asarray(jd.fp8_grouped_linear(clean, w, gs)[:200]))
  # Against float64: the last group's dW is still right.
  xx, rr = f64(clean), f64(r[:200])
  assert oracle.calc_diff(dw0[5], xx[160:200].T @ rr[160:200]) < 2e-3


@pytest.mark.parametrize("align", [1, 128])
def test_grouped_of_rows_is_the_layer_between_the_gathers(rng, align):
  # fp8_grouped_linear_of_rows (a MoE's dispatch and combine gathers, read in place by X's and
  # dY's casts): values and gradients bitwise those of the gathers (with their custom
  # transposes) around the plain layer; k = 3 choices per token, an empty expert, padding rows
  # (align 128) and rows past the groups; with w_fp8 too. Its jaxpr casts x and dy gathered.
  from jax_deepgemm._routing import expert_rows, gather
  from jax_deepgemm.linear import fp8_grouped_linear_of_rows
  t, k, e, kk, n = 150, 3, 5, 260, 200
  ids = jnp.asarray(rng.choice([0, 1, 3, 4], size=t * k), jnp.int32)  # expert 2: empty
  order, inverse, gs, _ = expert_rows(ids, e, align)
  ins, outs = (order // k, inverse.reshape(t, k), k), (inverse, order)
  x = randn(rng, (t, kk), jnp.bfloat16)
  w = randn(rng, (e, kk, n), jnp.float32, scale=kk ** -0.5)
  ct = randn(rng, (max(t * k, order.shape[0]), n), jnp.bfloat16)  # (its first rows: dY)
  def plain(x, w, w8=None, i=ins, o=outs):
    y = jd.fp8_grouped_linear(x if i is None else gather(x, *i), w, gs, w_fp8=w8)
    return y if o is None else gather(y, o[0], o[1][:, None], 1)
  def fused(x, w, w8=None, i=ins, o=outs):
    return fp8_grouped_linear_of_rows(x, w, gs, w_fp8=w8, in_rows=i, out_rows=o)
  run = lambda f, *a, **kw: jax.jit(lambda *a: (lambda y, b: (y, b(ct[:y.shape[0]])))(
      *jax.vjp(lambda *a: f(*a, **kw), *a)))(*a)
  w8 = jd.quantize_weight(w)
  xs = randn(rng, (order.shape[0], kk), jnp.bfloat16)  # (in_rows=None: the sorted rows)
  for f_args, kw in [((x, w), {}), ((x, w, w8), {}), ((x, w), dict(o=None)),
                     ((xs, w), dict(i=None))]:
    got, want = run(fused, *f_args, **kw), run(plain, *f_args, **kw)
    for g, v in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(g.astype(jnp.float32)),
                                    np.asarray(v.astype(jnp.float32)))
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda x: fused(x, w).astype(jnp.float32).sum()))(x))
  assert jaxpr.count("jax_deepgemm_gathered_dual_cast") == 2
  with pytest.raises(ValueError, match=r"in_rows must be int32 in_idx \[M\] and in_inv"):
    fused(x, w, i=(ins[0].astype(jnp.int16), ins[1], k))
  with pytest.raises(ValueError, match=r"in_rows' k must be a positive int"):
    fused(x, w, i=(ins[0], ins[1], 0))
  with pytest.raises(ValueError, match=r"in_inv \[S, k\] = \[150, 2\]"):
    fused(x, w, i=(ins[0], ins[1], 2))
  with pytest.raises(ValueError, match=r"out_rows must be int32 out_idx \[P\] and out_inv"):
    fused(x, w, o=(inverse, order[:-1]))
  with pytest.raises(ValueError, match=r"fp8_grouped_linear_of_rows: x \[M, K\] and w"):
    fused(x, w[:, :7])


@pytest.mark.parametrize("align", [1, 128])
def test_grouped_of_rows_combine_is_the_weighted_sum_of_the_gathered_rows(rng, align):
  # out_rows with weights (a MoE's combine): y[t] = sum_j weights[t, j] * Y[idx[t*k + j]] in
  # f32, rounded to x's dtype; dY's cast reads dy's rows times their weights in place. Values
  # and x's and w's gradients bitwise those of the gather and an explicit weighted sum (XLA's
  # f32 multiply and round of the weighted cotangent, as the kernel has it); the weights'
  # gradient to f32 rounding (its reduce is XLA's in both). An empty expert, padding rows.
  from jax_deepgemm._routing import expert_rows, gather
  from jax_deepgemm.linear import fp8_grouped_linear_of_rows
  t, k, e, kk, n = 150, 3, 5, 260, 200
  ids = jnp.asarray(rng.choice([0, 1, 3, 4], size=t * k), jnp.int32)  # expert 2: empty
  order, inverse, gs, _ = expert_rows(ids, e, align)
  ins = (order // k, inverse.reshape(t, k), k)
  x = randn(rng, (t, kk), jnp.bfloat16)
  w = randn(rng, (e, kk, n), jnp.float32, scale=kk ** -0.5)
  weights = jax.nn.softmax(randn(rng, (t, k), jnp.float32), axis=-1)
  ct = randn(rng, (t, n), jnp.bfloat16)
  def plain(x, w, weights):
    y = jd.fp8_grouped_linear(gather(x, *ins), w, gs)
    y_tk = gather(y, inverse, order[:, None], 1).reshape(t, k, n).astype(jnp.float32)
    acc = weights[:, :1] * y_tk[:, 0]
    for j in range(1, k):
      acc = acc + weights[:, j:j + 1] * y_tk[:, j]
    return acc.astype(x.dtype)
  def fused(x, w, weights):
    return fp8_grouped_linear_of_rows(x, w, gs, in_rows=ins, out_rows=(inverse, order, weights))
  run = lambda f: jax.jit(lambda *a: (lambda y, b: (y, b(ct)))(*jax.vjp(f, *a)))(x, w, weights)
  (y0, (dx0, dw0, dp0)), (y1, (dx1, dw1, dp1)) = run(fused), run(plain)
  assert y0.shape == (t, n) and y0.dtype == x.dtype and dp0.dtype == jnp.float32
  for g, v in ((y0, y1), (dx0, dx1), (dw0, dw1)):
    np.testing.assert_array_equal(np.asarray(g.astype(jnp.float32)),
                                  np.asarray(v.astype(jnp.float32)))
  np.testing.assert_allclose(np.asarray(dp0), np.asarray(dp1), rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(dp0).max()) > 0
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda x: fused(x, w, weights).astype(
      jnp.float32).sum()))(x))
  assert jaxpr.count("jax_deepgemm_gathered_dual_cast") == 2
  with pytest.raises(ValueError, match=r"out_rows' weights must be float \[T, k\] with "
                                       r"T·k = 450"):
    fused(x, w, weights[:, :2])
  with pytest.raises(ValueError, match=r"out_rows' weights must be float"):
    fused(x, w, (weights > 0.3).astype(jnp.int32))
  with pytest.raises(ValueError, match=r"out_rows must be \(out_idx, out_inv\) or"):
    fp8_grouped_linear_of_rows(x, w, gs, in_rows=ins, out_rows=(inverse,))


def test_grouped_groups_of_whole_blocks_keep_a_nan_to_their_own_dw(rng):
  # The token-axis scales are per 128 rows: groups of whole blocks (the MoE layer's padded
  # layout) share none, so a NaN row reaches only its own group's dW; a group ending inside
  # the NaN row's block gets it too (the documented price of unaligned groups).
  k, n = 256, 136
  w = randn(rng, (3, k, n), jnp.float32, scale=k ** -0.5)
  x = randn(rng, (512, k), jnp.float32).at[200].set(np.nan)  # block 1: rows 128..255
  r = randn(rng, (512, n), jnp.float32)
  dw = jax.jit(lambda x, gs: jax.vjp(jd.fp8_grouped_linear, x, w, gs)[1](r)[1])
  aligned = np.asarray(dw(x, jnp.asarray([128, 256, 128], jnp.int32)))
  assert np.isnan(aligned[1]).any() and np.isfinite(aligned[[0, 2]]).all()
  unaligned = np.asarray(dw(x, jnp.asarray([140, 244, 128], jnp.int32)))
  assert np.isnan(unaligned[0]).any() and np.isfinite(unaligned[2]).all()


def test_grouped_huge_unsigned_sizes_do_not_wrap(rng):
  # 3e9 as uint32 would wrap negative in an int32 cast; it must saturate at M instead.
  x = randn(rng, (64, 128), jnp.float32)
  w = randn(rng, (2, 128, 32), jnp.float32, scale=0.1)
  big = jd.fp8_grouped_linear(x, w, jnp.asarray([3_000_000_000, 5], jnp.uint32))
  ref = jd.fp8_grouped_linear(x, w, jnp.asarray([64, 0], jnp.int32))
  np.testing.assert_array_equal(np.asarray(big), np.asarray(ref))
  # Host int64 sizes past int32 (asarray alone would wrap 2**33 to 0 without x64).
  host = jd.fp8_grouped_linear(x, w, np.array([2**33, 5], np.int64))
  np.testing.assert_array_equal(np.asarray(host), np.asarray(ref))
  assert np.abs(np.asarray(ref)).min(axis=1).max() > 0  # every row computed
  # Narrow types: M = 300 does not fit int8, whose sizes must still mean what they say.
  x3 = randn(rng, (300, 128), jnp.float32)
  got = jd.fp8_grouped_linear(x3, w, jnp.asarray([100, 100], jnp.int8))
  want = jd.fp8_grouped_linear(x3, w, jnp.asarray([100, 100], jnp.int32))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _count(jaxpr, name):
  # Primitive applications named `name`, sub-jaxprs (remat, custom_vjp, pjit) included.
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == name
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      n += _count(sub, name)
  return n


@pytest.mark.parametrize("grouped", [False, True])
def test_remat_policy_can_save_the_fp8_casts(rng, grouped):
  # Under jax.checkpoint the forward's casts are recomputed in the backward, unless the
  # policy saves them by name (jd.FP8_RESIDUALS): then X and W are each cast once.
  x = randn(rng, (256, 128), jnp.bfloat16)
  if grouped:
    w = randn(rng, (2, 128, 64), jnp.bfloat16, scale=0.1)
    layer = lambda x, w: jd.fp8_grouped_linear(x, w, jnp.asarray([100, 156], jnp.int32))
  else:
    w = randn(rng, (128, 64), jnp.bfloat16, scale=0.1)
    layer = jd.fp8_linear
  block = lambda x, w: jnp.sum(jnp.tanh(layer(x, w).astype(jnp.float32)))
  counts, grads = {}, {}
  for name, policy in [("nothing", jax.checkpoint_policies.nothing_saveable),
                       ("fp8", jax.checkpoint_policies.save_only_these_names(*jd.FP8_RESIDUALS))]:
    g = jax.grad(jax.checkpoint(block, policy=policy), argnums=(0, 1))
    jaxpr = jax.make_jaxpr(g)(x, w).jaxpr
    gemm = ("jax_deepgemm_m_grouped_fp8_gemm_nt_contiguous" if grouped
            else "jax_deepgemm_fp8_gemm_nt")
    counts[name] = (_count(jaxpr, "jax_deepgemm_dual_cast"),
                    _count(jaxpr, "jax_deepgemm_per_block_dual_cast"), _count(jaxpr, gemm))
    grads[name] = jax.jit(g)(x, w)
  # Forward: X's and W's casts and the GEMM; backward: dY's cast and the dgrad GEMM. Without
  # saving, the backward recomputes the forward's casts and GEMM once more.
  assert counts == {"nothing": (3, 2, 3), "fp8": (2, 1, 2)}, counts
  # The same bits, where the ops compute deterministically (CPU; the kernels). The reference on
  # a GPU (non-Hopper, or JAX_DEEPGEMM_FORCE_REFERENCE=1) is XLA's f32 dots, whose fusions and
  # algorithms differ between the two graphs: a recomputed y can differ in its last bf16 bit,
  # which moves dY's fp8 scales (seen on an H100: diffs of one fp8 step), so there FP8-close.
  exact = jax.default_backend() != "gpu" or jd.use_kernels()
  for a, b in zip(grads["nothing"], grads["fp8"]):
    if exact:
      np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    else:
      assert oracle.calc_diff(a, b) < 2e-3
