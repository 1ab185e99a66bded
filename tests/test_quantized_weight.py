"""quantize_weight + fp8_linear / fp8_grouped_linear(w_fp8=...): W cast once for many calls."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_deepgemm as jd
import multidevice
import oracle
from helpers import casts_of_w, randn

def same(a, b):
  """Bitwise equal pytrees (the same number of leaves, each equal)."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(bool(jnp.array_equal(u, v)) for u, v in zip(la, lb))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_linear_with_w_fp8_is_bitwise_the_plain_layer(rng, dtype):
  m, k, n = 70, 300, 260  # odd K and N: partial 128x128 blocks
  x, w, b = randn(rng, (m, k), dtype), randn(rng, (k, n), dtype, k ** -0.5), randn(rng, (n,), dtype)
  r = randn(rng, (m, n), jnp.float32)
  wq = jd.quantize_weight(w)
  assert isinstance(wq, jd.Fp8Weight)
  assert wq.q.shape == (k, n) and wq.qt.shape == (n, k)
  assert wq.s.shape == wq.st.shape[::-1] == (3, 3)

  def loss(x, w, b, w_fp8=None):
    return jnp.sum(jd.fp8_linear(x, w, b, w_fp8=w_fp8).astype(jnp.float32) * r)

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  assert same(grad(x, w, b, wq), grad(x, w, b))
  assert same(jax.jit(jd.fp8_linear)(x, w, b), jax.jit(
      lambda x, w, b, p: jd.fp8_linear(x, w, b, w_fp8=p))(x, w, b, wq))
  # Against float64 on the dequantized weight: the layer takes W from w_fp8.
  y = jd.fp8_linear(x, w, b, w_fp8=wq)
  w_deq = np.asarray(jd.dequantize_per_block(wq.q, wq.s), np.float64)
  assert oracle.calc_diff(y, np.asarray(jnp.asarray(x, jnp.float32), np.float64) @ w_deq
                          + np.asarray(jnp.asarray(b, jnp.float32), np.float64)) < 1e-3
  # The point: no cast of W in the step (the plain layer casts it once, forward and backward
  # sharing the one-read pair).
  assert casts_of_w(jax.grad(loss, argnums=1), x, w, b, wq) == 0
  assert casts_of_w(jax.grad(loss, argnums=1), x, w, b) == 1


def test_grouped_with_w_fp8_is_bitwise_the_plain_layer(rng):
  g, m, k, n = 4, 300, 256, 200
  sizes = jnp.array([120, 0, 97, 50], jnp.int32)  # an empty group, rows past the sum
  x, w = randn(rng, (m, k), jnp.bfloat16), randn(rng, (g, k, n), jnp.bfloat16, k ** -0.5)
  r = randn(rng, (m, n), jnp.float32)
  wq = jd.quantize_weight(w)

  def loss(x, w, w_fp8=None):
    y = jd.fp8_grouped_linear(x, w, sizes, w_fp8=w_fp8)
    return jnp.sum(y.astype(jnp.float32) * r)

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  assert same(grad(x, w, wq), grad(x, w))
  assert casts_of_w(jax.grad(loss, argnums=1), x, w, wq) == 0


def test_micro_batches_share_one_cast(rng):
  # Gradient accumulation: W cast once before the scan over micro-batches; the summed
  # gradient is the one the plain layer gives, micro-batch by micro-batch.
  mb, m, k, n = 3, 64, 256, 192
  xs, w = randn(rng, (mb, m, k), jnp.bfloat16), randn(rng, (k, n), jnp.float32, k ** -0.5)
  rs = randn(rng, (mb, m, n), jnp.float32)

  def loss(w, x, r, w_fp8=None):
    return jnp.sum(jd.fp8_linear(x, w, w_fp8=w_fp8).astype(jnp.float32) * r)

  @functools.partial(jax.jit, static_argnums=1)
  def accumulated(w, cast_once):
    w_fp8 = jd.quantize_weight(w) if cast_once else None
    def body(acc, xr):
      return acc + jax.grad(loss)(w, *xr, w_fp8), None
    return jax.lax.scan(body, jnp.zeros_like(w), (xs, rs))[0]

  assert same(accumulated(w, True), accumulated(w, False))
  # One cast in all, outside the loop; without w_fp8 the loop body casts (each micro-batch).
  assert casts_of_w(lambda w: accumulated(w, True), w) == 1
  assert casts_of_w(lambda w: accumulated(w, True), w, under="scan") == 0
  assert casts_of_w(lambda w: accumulated(w, False), w, under="scan") == 1


def test_w_fp8_made_inside_the_loss_adds_no_gradient(rng):
  # quantize_weight stops the gradient: W's comes from the layer alone, as without w_fp8.
  x, w = randn(rng, (40, 128), jnp.float32), randn(rng, (128, 136), jnp.float32)
  plain = jax.grad(lambda w: jnp.sum(jd.fp8_linear(x, w) ** 2))(w)
  inside = jax.grad(lambda w: jnp.sum(jd.fp8_linear(x, w, w_fp8=jd.quantize_weight(w)) ** 2))(w)
  assert same(plain, inside)


def test_vmap_over_layers(rng):
  # A stack of layers (nnx.vmap / scan over layers): w and its casts batched together.
  x, w = randn(rng, (3, 20, 256), jnp.bfloat16), randn(rng, (3, 256, 130), jnp.bfloat16)
  wq = jax.vmap(jd.quantize_weight)(w)
  y = jax.vmap(lambda x, w, p: jd.fp8_linear(x, w, w_fp8=p))(x, w, wq)
  assert same(y, jax.vmap(jd.fp8_linear)(x, w))


def test_bad_w_fp8_is_a_clear_error(rng):
  x, w = randn(rng, (8, 256), jnp.bfloat16), randn(rng, (256, 128), jnp.bfloat16)
  wq = jd.quantize_weight(w)
  with pytest.raises(TypeError, match=r"fp8_linear: w_fp8 must be quantize_weight\(w\)'s"):
    jd.fp8_linear(x, w, w_fp8=tuple(wq))
  other = jd.quantize_weight(randn(rng, (256, 256), jnp.bfloat16))
  with pytest.raises(ValueError, match=r"fp8_linear: w_fp8.q must have shape \(256, 128\)"):
    jd.fp8_linear(x, w, w_fp8=other)
  with pytest.raises(TypeError, match=r"w_fp8.qt must be float8_e4m3fn"):
    jd.fp8_linear(x, w, w_fp8=wq._replace(qt=wq.qt.astype(jnp.float32)))
  with pytest.raises(TypeError, match=r"w_fp8.st must be float32"):
    jd.fp8_linear(x, w, w_fp8=wq._replace(st=wq.st.astype(jnp.bfloat16)))
  sizes = jnp.array([8], jnp.int32)
  with pytest.raises(ValueError, match=r"fp8_grouped_linear: w_fp8.q must have shape \(1, 256, "):
    jd.fp8_grouped_linear(x, w[None], sizes, w_fp8=wq)  # a dense layer's casts
  with pytest.raises(TypeError, match=r"quantize_weight: w must be"):
    jd.quantize_weight(wq.q)
  for bad in (w[0], w[0, 0]):  # its own name and layout, not the cast's [..., N, K]
    with pytest.raises(ValueError, match=r"quantize_weight: w must be \[K, N\] or \[G, K, N\]"):
      jd.quantize_weight(bad)


@pytest.mark.parametrize("shared", [0, 1])
def test_moe_with_weights_fp8_is_bitwise_the_plain_layer(rng, shared):
  from flax import nnx
  from jax_deepgemm.flax import MoE
  moe = MoE(hidden=256, expert_width=128, num_experts=4, top_k=2, rngs=nnx.Rngs(0),
            num_shared_experts=shared)
  x = randn(rng, (2, 40, 256), jnp.bfloat16)
  wf = moe.quantize_weights()
  assert sorted(wf) == sorted(["w_gate_up", "w_down"] + ["shared_gate_up", "shared_down"] * shared)
  check_moe_cast_once(moe, x, wf, casts=2 + 2 * shared)


def check_moe_cast_once(moe, x, wf, casts):
  """The MoE step with ``wf`` is bitwise the plain one and casts none of the ``casts`` weights
  the plain call casts."""
  from flax import nnx

  def loss(moe, x, wf):
    y, aux = moe(x, weights_fp8=wf)
    return jnp.sum(y.astype(jnp.float32) ** 2) + aux

  grad = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1)))
  (l0, (g0, dx0)), (l1, (g1, dx1)) = grad(moe, x, None), grad(moe, x, wf)
  assert same((l0, dx0), (l1, dx1)) and same(nnx.state(g0), nnx.state(g1))
  assert float(jnp.abs(nnx.state(g1)["w_down"][...]).max()) > 0
  assert casts_of_w(lambda x: moe(x, weights_fp8=wf)[0], x) == 0
  assert casts_of_w(lambda x: moe(x)[0], x) == casts


def test_moe_bad_weights_fp8(rng):
  from flax import nnx
  from jax_deepgemm.flax import MoE
  moe = MoE(hidden=256, expert_width=128, num_experts=4, top_k=2, rngs=nnx.Rngs(0))
  x = randn(rng, (16, 256), jnp.bfloat16)
  wf = moe.quantize_weights()
  with pytest.raises(ValueError, match=r"weights_fp8 must be quantize_weights\(\)'s dict of "):
    moe(x, weights_fp8={"w_gate_up": wf["w_gate_up"]})
  with pytest.raises(ValueError, match=r"fp8_grouped_linear(_of_rows)?: w_fp8.q must have shape"):
    moe(x, weights_fp8={"w_gate_up": wf["w_down"], "w_down": wf["w_gate_up"]})
  bf16 = MoE(hidden=256, expert_width=128, num_experts=4, top_k=2, rngs=nnx.Rngs(0),
             experts_impl="bf16")
  with pytest.raises(ValueError, match="weights_fp8 needs experts_impl='fp8'"):
    bf16(x, weights_fp8=wf)
  with pytest.raises(ValueError, match="experts_impl='bf16' has no FP8 weights"):
    bf16.quantize_weights()
  promoting = MoE(hidden=256, expert_width=128, num_experts=4, top_k=2, rngs=nnx.Rngs(0),
                  dtype=None)
  with pytest.raises(ValueError, match="pass x_dtype"):
    promoting.quantize_weights()
  # dtype=None: the weights' casts follow the call's (f32 weights read as they are).
  wf32 = promoting.quantize_weights(x_dtype=jnp.bfloat16)
  assert same(promoting(x, weights_fp8=wf32), promoting(x))


@pytest.mark.parametrize("dtype,param_dtype", [(jnp.bfloat16, jnp.float32), (None, jnp.float32)])
def test_fp8_linear_module_with_w_fp8(rng, dtype, param_dtype):
  from flax import nnx
  from jax_deepgemm.flax import Fp8Linear
  layer = Fp8Linear(300, 200, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)
  x = randn(rng, (2, 24, 300), jnp.bfloat16)
  if dtype is None:
    with pytest.raises(ValueError, match="pass x_dtype"):
      layer.quantize_weight()
  w8 = layer.quantize_weight(x_dtype=x.dtype)  # (f32 here when dtype is None: x promotes)

  def loss(layer, x, w8):
    return jnp.sum(layer(x, w_fp8=w8).astype(jnp.float32) ** 2)

  grad = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1)))
  (l0, (g0, dx0)), (l1, (g1, dx1)) = grad(layer, x, None), grad(layer, x, w8)
  assert same((l0, dx0), (l1, dx1)) and same(nnx.state(g0), nnx.state(g1))
  assert casts_of_w(lambda x: layer(x, w_fp8=w8), x) == 0


@pytest.mark.parametrize("axes", ["auto", "explicit"])
def test_moe_weights_fp8_expert_parallel(axes):
  # MoE(mesh=...): the casts split over the experts like the weights, bitwise the plain call.
  multidevice.run(__file__, "case_moe_expert_parallel", axes, devices=8)


def case_moe_expert_parallel(axes):
  from flax import nnx
  from jax.sharding import AxisType
  from jax_deepgemm.flax import MoE
  kind = AxisType.Auto if axes == "auto" else AxisType.Explicit
  mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types=(kind, kind))
  moe = MoE(hidden=256, expert_width=128, num_experts=8, top_k=2, rngs=nnx.Rngs(0), mesh=mesh,
            num_shared_experts=1)
  x = randn(np.random.default_rng(3), (64, 256), jnp.bfloat16)
  wf = moe.quantize_weights()
  assert wf["w_down"].q.sharding.spec[0] == "expert", wf["w_down"].q.sharding
  check_moe_cast_once(moe, x, wf, casts=4)  # gate|up, down, and the shared pair
  print("ok")


def test_w_fp8_in_shard_map():
  # Tokens split over a mesh axis, W and its casts replicated (not varying like x: they get no
  # cotangent): W's gradient sums over the shards as without w_fp8.
  multidevice.run(__file__, "case_w_fp8_in_shard_map", devices=2)


def case_w_fp8_in_shard_map():
  from jax.sharding import PartitionSpec as P
  rng = np.random.default_rng(7)
  mesh = jax.make_mesh((2,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
  x, w = randn(rng, (256, 256), jnp.bfloat16), randn(rng, (256, 200), jnp.bfloat16, 0.06)
  wg, sizes = randn(rng, (2, 256, 200), jnp.bfloat16, 0.06), jnp.array([[50, 60], [0, 128]])
  dense = lambda x, w, s, p: jd.fp8_linear(x, w, w_fp8=p)
  grouped = lambda x, w, s, p: jd.fp8_grouped_linear(x, w, s[0], w_fp8=p)
  for lin, weight in ((dense, w), (grouped, wg)):
    def loss(x, w, s, p, lin=lin):
      return jax.lax.psum(jnp.sum(lin(x, w, s, p).astype(jnp.float32) ** 2), "x")
    f = jax.shard_map(loss, mesh=mesh, in_specs=(P("x"), P(), P("x"), P()), out_specs=P())
    grad = jax.jit(jax.grad(f, (0, 1)))
    got = grad(x, weight, sizes, jd.quantize_weight(weight))
    want = grad(x, weight, sizes, None)
    assert same(got, want), "w_fp8 changed the gradients in shard_map"
  print("ok")


if __name__ == "__main__":
  multidevice.main(globals())
