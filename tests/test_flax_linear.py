"""jax_deepgemm.flax.Fp8Linear: an nnx.Linear drop-in whose matmul is the FP8 GEMM."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import multidevice
import oracle
import jax_deepgemm as jd
from jax_deepgemm.flax import Fp8Linear
from helpers import randn, w_cast_dtypes


def _pair(k, n, **kw):
  # Same seed: the same initial parameters in both.
  return Fp8Linear(k, n, rngs=nnx.Rngs(3), **kw), nnx.Linear(k, n, rngs=nnx.Rngs(3), **kw)


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_matches_nnx_linear_values_and_grads(rng, dtype):
  fp8, ref = _pair(300, 136, dtype=dtype, bias_init=nnx.initializers.normal(1.0))
  for name in ("kernel", "bias"):
    np.testing.assert_array_equal(getattr(fp8, name)[...], getattr(ref, name)[...])
  x = randn(rng, (2, 5, 300), jnp.float32)
  r = randn(rng, (2, 5, 136), jnp.float32)
  y, y_ref = fp8(x), ref(x)
  assert y.dtype == y_ref.dtype and y.shape == y_ref.shape == (2, 5, 136)
  assert 0 < oracle.calc_diff(y, y_ref) < 2e-3  # FP8 rounding, not exact

  loss = lambda m, x: jnp.sum(m(x).astype(jnp.float32) * r)
  (gm, gx), (gm_ref, gx_ref) = (nnx.grad(loss, argnums=(0, 1))(m, x) for m in (fp8, ref))
  assert gx.dtype == x.dtype and oracle.calc_diff(gx, gx_ref) < 2e-3
  for name in ("kernel", "bias"):
    g, g_ref = getattr(gm, name)[...], getattr(gm_ref, name)[...]
    assert g.dtype == g_ref.dtype and oracle.calc_diff(g, g_ref) < 2e-3, name


def test_state_moves_between_fp8_and_nnx_linear(rng):
  fp8, ref = _pair(256, 128, use_bias=False)
  ref.kernel[...] = randn(rng, (256, 128), jnp.float32, scale=0.05)
  assert jax.tree.structure(nnx.state(fp8)) == jax.tree.structure(nnx.state(ref))
  nnx.update(fp8, nnx.state(ref))
  np.testing.assert_array_equal(fp8.kernel[...], ref.kernel[...])
  x = randn(rng, (64, 256), jnp.bfloat16)
  assert oracle.calc_diff(fp8(x), ref(x)) < 2e-3


def test_trains_under_nnx_jit(rng):
  model = nnx.Sequential(Fp8Linear(128, 256, rngs=nnx.Rngs(0), dtype=jnp.bfloat16),
                         jax.nn.gelu,
                         Fp8Linear(256, 128, rngs=nnx.Rngs(1), dtype=jnp.bfloat16))
  opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
  x = randn(rng, (256, 128), jnp.float32)
  target = jnp.tanh(x @ randn(rng, (128, 128), jnp.float32, scale=128 ** -0.5))

  @nnx.jit
  def step(model, opt, x, t):
    loss_fn = lambda m: jnp.mean((m(x).astype(jnp.float32) - t) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  losses = [float(step(model, opt, x, target)) for _ in range(30)]
  assert all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0], losses


def test_refuses_what_an_fp8_gemm_cannot_honour():
  Precision = jax.lax.Precision
  for precision in (Precision.HIGHEST, Precision.HIGH, "highest", "tensorfloat32",
                    (Precision.DEFAULT, Precision.HIGHEST), jax.lax.DotAlgorithmPreset.F32_F32_F32):
    with pytest.raises(ValueError, match=r"precision=.* cannot be honoured: the matmul is the FP8"):
      Fp8Linear(128, 128, rngs=nnx.Rngs(0), precision=precision)
  with pytest.raises(ValueError, match="dot_general is not supported"):
    Fp8Linear(128, 128, rngs=nnx.Rngs(0), dot_general=lambda *a, **k: None)
  layer = Fp8Linear(128, 64, rngs=nnx.Rngs(0))
  # Inputs promote with the parameters as in nnx.Linear: FP8 ones refuse to (JAX's rule).
  with pytest.raises(jax.dtypes.TypePromotionError):
    layer(jnp.ones((4, 128), jnp.float8_e5m2))
  assert layer(jnp.ones((4, 128), jnp.int32)).dtype == jnp.float32
  layer = Fp8Linear(128, 64, rngs=nnx.Rngs(0), preferred_element_type=jnp.float32,
                    dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(1), (4, 128))
  y = layer(x)
  assert y.dtype == jnp.float32
  # The GEMM's f32 result from the bf16-promoted operands, not a bf16 one cast up (the
  # kernel's FP8 cast reads the f32 parameter itself: test_kernel_cast_reads_the_parameter).
  bf = lambda v: v.astype(jnp.bfloat16)
  want = jd.fp8_linear(bf(x), layer.kernel[...], bf(layer.bias[...]),
                       preferred_element_type=jnp.float32)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(want))
  assert (np.asarray(y) != np.asarray(y.astype(jnp.bfloat16), np.float32)).any()


@pytest.mark.parametrize("param_dtype,dtype", [(jnp.float32, jnp.bfloat16),
                                                (jnp.bfloat16, jnp.float32),
                                                (jnp.float64, jnp.bfloat16)])
def test_kernel_cast_reads_the_parameter(rng, param_dtype, dtype):
  with jax.enable_x64(param_dtype == jnp.float64):
    _kernel_cast_reads_the_parameter(rng, param_dtype, dtype)


def _kernel_cast_reads_the_parameter(rng, param_dtype, dtype):
  # The FP8 cast reads the kernel in its parameter dtype: f32 parameters computing in bf16
  # are not converted to a bf16 copy first (XLA would write it and the cast read it again),
  # and bf16 ones computing in f32 not to an f32 copy (the same values, twice the bytes).
  # f64 ones, which no cast kernel reads, are converted. The kernel's gradient is computed in
  # the compute dtype, as for such a copy.
  layer = Fp8Linear(256, 128, rngs=nnx.Rngs(0), param_dtype=param_dtype, dtype=dtype)
  x = randn(rng, (5, 256), dtype)
  r = randn(rng, (5, 128), jnp.float32)
  loss = lambda m, x: jnp.sum(m(x).astype(jnp.float32) * r)
  gdef, state = nnx.split(layer)
  step = lambda state, x: jax.grad(lambda s: loss(nnx.merge(gdef, s), x))(state)
  read = dtype if param_dtype == jnp.float64 else param_dtype
  assert w_cast_dtypes(step, state, x) == [jnp.dtype(read).name]
  kernel = layer.kernel[...]
  np.testing.assert_array_equal(layer(x), jd.fp8_linear(x, kernel.astype(read),
                                                        layer.bias[...].astype(dtype)))
  g = nnx.grad(loss)(layer, x).kernel[...]
  # W's gradient depends on x and dy only: the same GEMM in the compute dtype, converted.
  copy = jax.grad(lambda w: jnp.sum(jd.fp8_linear(x, w, layer.bias[...].astype(dtype))
                                    .astype(jnp.float32) * r))(kernel.astype(dtype))
  assert g.dtype == jnp.dtype(param_dtype)
  np.testing.assert_array_equal(g, copy.astype(param_dtype))


@pytest.mark.parametrize("precision", [
    None, jax.lax.Precision.DEFAULT, "default", "bfloat16",
    (jax.lax.Precision.DEFAULT, jax.lax.Precision.DEFAULT), jax.lax.DotAlgorithmPreset.DEFAULT])
def test_default_precision_is_accepted(rng, precision):
  # nnx.Linear passes precision to its dot, where DEFAULT (in any spelling) asks for nothing
  # more than None does: a model written with it swaps to Fp8Linear unchanged.
  fp8, ref = _pair(256, 128, precision=precision)
  x = randn(rng, (8, 256), jnp.float32)
  np.testing.assert_array_equal(fp8(x), Fp8Linear(256, 128, rngs=nnx.Rngs(3))(x))
  assert fp8.precision == ref.precision and oracle.calc_diff(fp8(x), ref(x)) < 2e-3


def test_out_sharding_types_the_result_as_nnx_linear():
  multidevice.run(__file__, "case_out_sharding", devices=8)


def case_out_sharding():
  # nnx.Linear's out_sharding (its dot_general's) on a 2x4 CPU mesh: Fp8Linear's result and
  # gradients carry the same shardings, with nnx.Linear's values (FP8 rounding apart).
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  assert jax.device_count() == 8, jax.devices()
  mesh = jax.make_mesh((2, 4), ("x", "y"), axis_types=(AxisType.Explicit,) * 2)
  rng = np.random.default_rng(0)
  x2, x3 = randn(rng, (16, 256), jnp.float32), randn(rng, (2, 8, 256), jnp.float32)
  bias = nnx.initializers.normal(1.0)

  def check(fp8, ref, x, out_sharding, grad=False):
    got, want = (m(x, out_sharding=out_sharding) for m in (fp8, ref))
    assert jax.typeof(got).sharding == jax.typeof(want).sharding, (jax.typeof(got), out_sharding)
    assert got.sharding == want.sharding and got.dtype == want.dtype, (got.sharding, want.sharding)
    assert oracle.calc_diff(got, want) < 2e-3
    if grad:  # (reshard's transpose types the cotangents as the primals)
      loss = lambda m, x: jnp.sum(m(x, out_sharding=out_sharding) ** 2)
      (gm, gx), (gm_ref, gx_ref) = (nnx.grad(loss, argnums=(0, 1))(m, x) for m in (fp8, ref))
      for g, g_ref in ((gx, gx_ref), (gm.kernel[...], gm_ref.kernel[...]),
                       (gm.bias[...], gm_ref.bias[...])):
        assert jax.typeof(g).sharding == jax.typeof(g_ref).sharding, (jax.typeof(g), out_sharding)
        assert oracle.calc_diff(g, g_ref) < 2e-3

  with jax.set_mesh(mesh):
    # Row-parallel (K split in x and the kernel, where nnx.Linear needs out_sharding), and
    # column-parallel (the kernel's N split) gathered or moved to other axes.
    row = _pair(256, 128, bias_init=bias, kernel_metadata={"out_sharding": ("y", None)})
    # (N = 4 x 128: whole 128-blocks per shard, which the GEMM keeps split.)
    col = _pair(256, 512, bias_init=bias, kernel_metadata={"out_sharding": (None, "y")})
    assert jax.typeof(row[0].kernel[...]).sharding.spec == P("y", None)
    xr, xc = jax.device_put(x2, P("x", "y")), jax.device_put(x2, P("x", None))
    for out_sharding in (P("x", None), P("x", "y"), P(None, "y"), P(),
                         NamedSharding(mesh, P("y", "x"))):
      check(*row, xr, out_sharding, grad=out_sharding == P("x", "y"))
      check(*col, xc, out_sharding)
    check(*col, jax.device_put(x3, P(None, "x")), P(None, "x", "y"), grad=True)
    check(*col, xc, NamedSharding(jax.sharding.AbstractMesh((), ()), P()))  # means None
    jitted = nnx.jit(lambda m, x: m(x, out_sharding=P(None, "y")))
    got, want = jitted(row[0], xr), jitted(row[1], xr)
    assert got.sharding == want.sharding == NamedSharding(mesh, P(None, "y"))

  # No mesh context: operands placed on the mesh, out_sharding a NamedSharding.
  fp8, ref = (m for m in _pair(256, 128, bias_init=bias))
  for m in (fp8, ref):
    m.kernel.set_value(jax.device_put(ref.kernel[...], NamedSharding(mesh, P("y", None))))
  check(fp8, ref, jax.device_put(x2, NamedSharding(mesh, P("x", "y"))),
        NamedSharding(mesh, P(None, "y")))

  # Auto axes: as in nnx.Linear, P() is fine and an axis name is refused (by JAX).
  auto = jax.make_mesh((2, 4), ("x", "y"), axis_types=(AxisType.Auto,) * 2)
  fp8, ref = _pair(256, 128)
  with jax.set_mesh(auto):
    check(fp8, ref, x2, P())
    for m in (fp8, ref):
      with pytest.raises(ValueError, match="cannot contain axis names that are of type Auto"):
        m(x2, out_sharding=P("x"))
  for m in (fp8, ref):  # a PartitionSpec needs a mesh context
    with pytest.raises(ValueError, match="not under a mesh context"):
      m(x2, out_sharding=P("x"))


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("param_dtype,dtype,x_dtype", [
    (jnp.float32, None, jnp.float32), (jnp.float32, None, jnp.bfloat16),
    (jnp.bfloat16, None, jnp.float32), (jnp.bfloat16, None, jnp.bfloat16),
    (jnp.float32, jnp.bfloat16, jnp.float32), (jnp.bfloat16, jnp.float32, jnp.bfloat16),
    (jnp.float16, None, jnp.float16), (jnp.float32, jnp.float16, jnp.bfloat16)])
@pytest.mark.parametrize("pet", [None, jnp.float32, jnp.bfloat16])
def test_dtypes_are_nnx_linears(rng, use_bias, param_dtype, dtype, x_dtype, pet):
  # The output, dx, dkernel and dbias dtypes of nnx.Linear with the same arguments. (nnx.Linear
  # adds the bias after its preferred_element_type dot, so the result promotes with the bias:
  # pet=bf16 with an f32 bias gives f32.)
  fp8, ref = _pair(256, 128, use_bias=use_bias, param_dtype=param_dtype, dtype=dtype,
                   preferred_element_type=pet, bias_init=nnx.initializers.normal(1.0))
  x = randn(rng, (3, 256), x_dtype)
  r = randn(rng, (3, 128), jnp.float32)
  loss = lambda m, x: jnp.sum(m(x).astype(jnp.float32) * r)
  got, want = ((m(x), *nnx.grad(loss, argnums=(0, 1))(m, x)) for m in (fp8, ref))
  (y, gm, gx), (y_ref, gm_ref, gx_ref) = got, want
  assert y.dtype == y_ref.dtype and gx.dtype == gx_ref.dtype == x.dtype
  assert oracle.calc_diff(y, y_ref) < 2e-2 and oracle.calc_diff(gx, gx_ref) < 2e-2
  for name in ("kernel", "bias") if use_bias else ("kernel",):
    g, g_ref = getattr(gm, name)[...], getattr(gm_ref, name)[...]
    assert g.dtype == g_ref.dtype == jnp.dtype(param_dtype), name
    assert oracle.calc_diff(g, g_ref) < 2e-2, name


if __name__ == "__main__":
  multidevice.main(globals())
