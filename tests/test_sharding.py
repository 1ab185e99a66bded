"""Sharding rules (jax_deepgemm.sharding): the ops under plain jax.jit with sharded operands.

Every case runs in a child process with 8 CPU devices (a 2 x 4 mesh), once per partitioner
(Shardy, JAX's default, and GSPMD), and checks the collectives XLA compiles in and that the
values are the unsharded op's. (The last case shows the counting catches an all-gather.)
"""
import functools

import numpy as np
import pytest

import multidevice

PARTITIONERS = ["shardy", "gspmd"]
CASES = ["case_rules_in_lowering", "case_gemm", "case_m_grouped", "case_k_grouped", "case_masked",
         "case_layers_data_parallel", "case_unaligned_falls_back_to_gather"]


@pytest.mark.parametrize("partitioner", PARTITIONERS)
@pytest.mark.parametrize("case", CASES)
def test_sharding(case, partitioner):
  multidevice.run(__file__, case, partitioner)


# ----------------------------------------------------------------------------- child side
def _setup(partitioner):
  import jax
  jax.config.update("jax_use_shardy_partitioner", partitioner == "shardy")
  assert jax.device_count() == 8, jax.devices()
  return jax.make_mesh((2, 4), ("x", "y"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _check(mesh, fn, args, specs, *, expect, out_spec=None, rtol=1e-6, atol=0.0):
  """Jits ``fn`` on ``args`` placed with ``specs``; checks its collectives and values.

  ``expect``: the exact count of every collective (missing ones must be 0). ``atol`` is
  relative to the largest |value|: a split contraction adds its FP32 terms in another order,
  which moves results by a few ulps of the terms' magnitude, not of the (smaller) sum.
  """
  import jax
  from jax.sharding import NamedSharding
  want = jax.jit(fn)(*args)  # one device, no sharding
  placed = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)]
  jitted = jax.jit(fn)
  got_counts = multidevice.collectives(jitted.lower(*placed).compile().as_text())
  assert got_counts == {c: expect.get(c, 0) for c in multidevice.COLLECTIVES}, (got_counts,
                                                                                  expect, specs)
  got = jitted(*placed)
  if out_spec is not None:
    assert got.sharding.is_equivalent_to(NamedSharding(mesh, out_spec), got.ndim), got.sharding
  want = np.asarray(want, np.float32)
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=rtol,
                             atol=atol * float(np.abs(want).max()))


def _data(seed=0):
  import jax.numpy as jnp
  import helpers
  return np.random.default_rng(seed), helpers, jnp


def case_rules_in_lowering(partitioner):
  # On several devices each op lowers to a custom-partitioning call (our rules decide how it
  # splits; on GPU the kernel is an opaque custom call XLA could only run whole). On one
  # device, and inside shard_map, it is the plain op.
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  import jax_deepgemm as jd
  mesh = _setup(partitioner)
  rng, helpers, _ = _data()
  a, sa = helpers.quant_act(rng, 64, 256)
  b, sb = helpers.quant_w(rng, 512, 256)
  placed = [jax.device_put(v, NamedSharding(mesh, s))
            for v, s in zip((a, sa, b, sb), (P("x"), P("x"), P("y"), P("y")))]
  marker = "CustomSPMDPartitioning"
  assert marker in jax.jit(jd.fp8_gemm_nt).lower(*placed).as_text()
  assert marker not in jax.jit(jd.fp8_gemm_nt).lower(a, sa, b, sb).as_text()
  per_device = jax.shard_map(jd.fp8_gemm_nt, mesh=mesh, in_specs=(P("x"), P("x"), P(), P()),
                             out_specs=P("x"))
  assert marker not in jax.jit(per_device).lower(*placed[:2], b, sb).as_text()
  np.testing.assert_array_equal(np.asarray(jax.jit(per_device)(*placed[:2], b, sb)),
                                np.asarray(jd.fp8_gemm_nt(a, sa, b, sb)))
  del jnp


def case_gemm(partitioner):
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P
  import jax_deepgemm as jd
  mesh = _setup(partitioner)
  rng, helpers, _ = _data(1)
  m, n, k = 64, 512, 512  # N and K: 4 blocks of 128, one or more per shard of "y"
  a, sa = helpers.quant_act(rng, m, k)
  b, sb = helpers.quant_w(rng, n, k)
  bias = helpers.randn(rng, (n,))
  c = helpers.randn(rng, (m, n))
  f32 = functools.partial(jd.fp8_gemm_nt, out_dtype=jnp.float32)
  # M and N split: each device multiplies its rows by its columns, no communication.
  _check(mesh, f32, (a, sa, b, sb), (P("x"), P("x"), P("y"), P("y")), expect={},
         out_spec=P("x", "y"))
  _check(mesh, lambda *xs: jd.fp8_gemm_nt(*xs[:4], bias=xs[4]), (a, sa, b, sb, bias),
         (P(("x", "y")), P(("x", "y")), P(), P(), P()), expect={},
         out_spec=P(("x", "y")), rtol=1e-2)  # bf16 output: equal up to one rounding
  # K split: partial products summed with one all-reduce (bias and c added once).
  k_split = (P(None, "y"), P(None, "y"), P(None, "y"), P(None, "y"))
  _check(mesh, f32, (a, sa, b, sb), k_split, expect={"all-reduce": 1}, rtol=1e-5, atol=3e-5)
  _check(mesh, lambda *xs: jd.fp8_gemm_nt(*xs[:4], bias=xs[4], c=xs[5]),
         (a, sa, b, sb, bias, c), k_split + (P(), P()), expect={"all-reduce": 1},
         rtol=1e-5, atol=3e-5)
  # M on one axis, K on the other.
  _check(mesh, f32, (a, sa, b, sb), (P("x", "y"), P("x", "y"), P(None, "y"), P(None, "y")),
         expect={"all-reduce": 1}, out_spec=P("x"), rtol=1e-5, atol=3e-5)


def case_m_grouped(partitioner):
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P
  import jax_deepgemm as jd
  mesh = _setup(partitioner)
  rng, helpers, _ = _data(2)
  m, n, k, g = 256, 512, 512, 8
  a, sa = helpers.quant_act(rng, m, k)
  b, sb = helpers.quant_w(rng, g, n, k)
  # Global group sizes with an empty group, ending before the last rows.
  sizes = rng.multinomial(m - 7, np.ones(g) / g)
  sizes[3] = 0
  gs = jnp.asarray(sizes, jnp.int32)
  op = functools.partial(jd.m_grouped_fp8_gemm_nt_contiguous, out_dtype=jnp.float32)
  args = (a, sa, b, sb, gs)
  # Rows split: each device derives its groups from the global sizes; no communication.
  _check(mesh, op, args, (P("x"), P("x"), P(), P(), P()), expect={}, out_spec=P("x"))
  _check(mesh, op, args, (P(("x", "y")), P(("x", "y")), P(), P(), P()), expect={})
  # N split (b's output features): local.
  _check(mesh, op, args, (P(), P(), P(None, "y"), P(None, "y"), P()), expect={},
         out_spec=P(None, "y"))
  # Experts split: each device computes its experts' rows, one all-reduce adds them up.
  _check(mesh, op, args, (P(), P(), P("y"), P("y"), P()), expect={"all-reduce": 1},
         rtol=1e-5, atol=3e-5)
  _check(mesh, op, args, (P("x"), P("x"), P("y"), P("y"), P()), expect={"all-reduce": 1},
         out_spec=P("x"), rtol=1e-5, atol=3e-5)
  # K split: partial products, one all-reduce.
  _check(mesh, op, args, (P(None, "y"), P(None, "y"), P(None, None, "y"),
                          P(None, None, "y"), P()), expect={"all-reduce": 1},
         rtol=1e-5, atol=3e-5)
  # Rows split unevenly (250 rows over 8 devices: XLA pads the last shard), group sizes
  # ending before the last rows. Only values are checked: moving the uneven operands and
  # result in and out of that layout costs collectives of its own.
  from jax.sharding import NamedSharding
  import jax
  rows = NamedSharding(mesh, P(("x", "y")))
  def uneven(a, sa, *rest):
    a, sa = (jax.lax.with_sharding_constraint(v[:250], rows) for v in (a, sa))
    return jax.lax.with_sharding_constraint(op(a, sa, *rest), rows)
  gs250 = jnp.asarray([40, 0, 70, 33, 0, 51, 29, 20], jnp.int32)  # 243 rows
  lowered = jax.jit(uneven).lower(*args[:4], gs250)
  assert "CustomSPMDPartitioning" in lowered.as_text()
  np.testing.assert_allclose(np.asarray(lowered.compile()(*args[:4], gs250)),
                             np.asarray(op(a[:250], sa[:250], b, sb, gs250)), rtol=1e-6)


def case_k_grouped(partitioner):
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  import jax
  import jax_deepgemm as jd
  mesh = _setup(partitioner)
  rng, helpers, _ = _data(3)
  t, n, k, g = 1024, 64, 96, 8  # T = 8 blocks of 128 tokens
  a, sa = helpers.quant_act(rng, t, n, axis=0)
  b, sb = helpers.quant_act(rng, t, k, axis=0)
  gs = jnp.asarray(rng.multinomial(t - 100, np.ones(g) / g), jnp.int32)
  c = helpers.randn(rng, (g, n, k))
  op = jd.k_grouped_fp8_gemm_tn_contiguous
  args = (a, sa, b, sb, gs)
  # Tokens split (data parallel weight gradient): partial sums, one all-reduce.
  _check(mesh, op, args, (P("y"), P("y"), P("y"), P("y"), P()), expect={"all-reduce": 1},
         rtol=1e-5, atol=3e-5)
  _check(mesh, op, args, (P(("x", "y")),) * 4 + (P(),), expect={"all-reduce": 1},
         rtol=1e-5, atol=3e-5)
  # N and K split: local.
  _check(mesh, op, args, (P(None, "x"), P(None, "x"), P(None, "y"), P(None, "y"), P()),
         expect={}, out_spec=P(None, "x", "y"), rtol=1e-5, atol=3e-5)
  # Output experts split (expert-sharded weight gradients): local.
  by_expert = lambda *xs: jax.lax.with_sharding_constraint(op(*xs), NamedSharding(mesh, P("y")))
  _check(mesh, by_expert, args, (P(),) * 5, expect={}, out_spec=P("y"), rtol=1e-5, atol=3e-5)
  # Experts split through c, tokens split too: one all-reduce, c added once.
  _check(mesh, lambda *xs: op(*xs[:5], c=xs[5]), args + (c,), (P("x"),) * 4 + (P(), P("y")),
         expect={"all-reduce": 1}, out_spec=P("y"), rtol=1e-5, atol=3e-5)
  # Token-major operands ([N, T], [K, T]; the backward's layout): tokens split, N split.
  op_t = lambda a, sa, b, sb, gs: op(a, sa, b, sb, gs, token_major=True)
  args_t = (a.T, sa, b.T, sb, gs)
  _check(mesh, op_t, args_t, (P(None, "y"), P("y"), P(None, "y"), P("y"), P()),
         expect={"all-reduce": 1}, rtol=1e-5, atol=3e-5)
  _check(mesh, op_t, args_t, (P("x"), P(None, "x"), P(), P(), P()),
         expect={}, out_spec=P(None, "x"), rtol=1e-5, atol=3e-5)


def case_masked(partitioner):
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P
  import jax_deepgemm as jd
  mesh = _setup(partitioner)
  rng, helpers, _ = _data(6)
  g, m, n, k = 4, 64, 256, 512
  a, sa = jd.per_token_cast_to_fp8(helpers.randn(rng, (g, m, k), jnp.bfloat16))
  b, sb = helpers.quant_w(rng, g, n, k)
  masked = jnp.asarray([64, 0, 17, 40], jnp.int32)
  op = functools.partial(jd.m_grouped_fp8_gemm_nt_masked, expected_m=32, out_dtype=jnp.float32)
  args = (a, sa, b, sb, masked)
  # Groups, rows (each shard masks its own rows) and N split: local.
  _check(mesh, op, args, (P("y"), P("y"), P("y"), P("y"), P("y")), expect={},
         out_spec=P("y"))
  _check(mesh, op, args, (P("x", "y"), P("x", "y"), P("x"), P("x"), P("x")), expect={},
         out_spec=P("x", "y"))
  _check(mesh, op, args, (P(), P(), P(None, "x"), P(None, "x"), P()), expect={},
         out_spec=P(None, None, "x"))
  # K split: partial products, one all-reduce.
  k_split = P(None, None, "y")
  _check(mesh, op, args, (k_split,) * 4 + (P(),), expect={"all-reduce": 1}, rtol=1e-5,
         atol=3e-5)


def case_layers_data_parallel(partitioner):
  # Forward + backward of the differentiable layers with the tokens split over all devices
  # and replicated weights: the only communication is the all-reduce of the weight gradient.
  import jax
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P
  import jax_deepgemm as jd
  mesh = _setup(partitioner)
  rng, helpers, _ = _data(4)
  x = helpers.randn(rng, (2048, 256))
  w = helpers.randn(rng, (256, 384), scale=0.05)
  wg = helpers.randn(rng, (4, 256, 128), scale=0.05)
  gs = jnp.asarray([512, 0, 1024, 512], jnp.int32)  # groups on 128-token boundaries
  tokens = P(("x", "y"))

  def dense(x, w):
    return jax.value_and_grad(lambda w, x: jnp.sum(jd.fp8_linear(x, w) ** 2), (0, 1))(w, x)
  for i, out in enumerate(("loss", "dw", "dx")):
    pick = lambda x, w, i=i: jax.tree.leaves(dense(x, w))[i]
    _check(mesh, pick, (x, w), (tokens, P()), expect={"all-reduce": 1 if i < 2 else 0},
           rtol=1e-5, atol=3e-5)

  # The grouped layer's rows are sorted by group; splitting them over devices keeps each
  # device's groups local (dx) and all-reduces the per-expert weight gradient.
  def grouped(x, w):
    return jax.grad(lambda w, x: jnp.sum(jd.fp8_grouped_linear(x, w, gs) ** 2), (0, 1))(w, x)
  _check(mesh, lambda x, w: grouped(x, w)[0], (x, wg), (tokens, P()),
         expect={"all-reduce": 1}, rtol=1e-5, atol=3e-5)
  _check(mesh, lambda x, w: grouped(x, w)[1], (x, wg), (tokens, P()), expect={},
         out_spec=tokens, rtol=1e-5, atol=3e-5)


def case_unaligned_falls_back_to_gather(partitioner):
  # K = 320 is not whole 128-blocks per shard: the rules gather K (correct, not local).
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P
  import jax_deepgemm as jd
  mesh = _setup(partitioner)
  rng, helpers, _ = _data(5)
  a, sa = helpers.quant_act(rng, 64, 640)
  b, sb = helpers.quant_w(rng, 256, 640)  # K = 640: 5 blocks, not divisible by 4 shards
  f32 = functools.partial(jd.fp8_gemm_nt, out_dtype=jnp.float32)
  import jax
  from jax.sharding import NamedSharding
  placed = [jax.device_put(v, NamedSharding(mesh, P(None, "y") if v.shape[-1] == 640 else P()))
            for v in (a, sa, b, sb)]
  counts = multidevice.collectives(jax.jit(f32).lower(*placed).compile().as_text())
  assert counts["all-gather"] >= 1 and counts["all-reduce"] == 0, counts
  np.testing.assert_allclose(np.asarray(jax.jit(f32)(*placed)), np.asarray(f32(a, sa, b, sb)),
                             rtol=1e-6)


if __name__ == "__main__":
  multidevice.main(globals())
