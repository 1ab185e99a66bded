"""Sharding rules (jax_deepgemm.sharding): the ops under plain jax.jit with sharded operands.

Every case runs in a child process with 8 CPU devices (a 2 x 4 mesh), once per partitioner
(Shardy, JAX's default, and GSPMD), and checks the collectives XLA compiles in and that the
values are the unsharded op's. (The last case shows the counting catches an all-gather.)
"""
import functools
import re

import numpy as np
import pytest

import multidevice

PARTITIONERS = ["shardy", "gspmd"]
CASES = ["case_rules_in_lowering", "case_gemm", "case_m_grouped", "case_k_grouped", "case_masked",
         "case_casts", "case_layers_data_parallel", "case_unaligned_falls_back_to_gather",
         "case_explicit_axes", "case_explicit_types", "case_explicit_moe",
         "case_explicit_vmap_over_a_split_axis",
         "case_grouped_sizes_split_and_partial_manual",
         "case_k_grouped_experts_split_past_the_group_table"]


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


def _bits(x):
  x = np.asarray(x)
  return x.view(np.dtype(f"u{x.dtype.itemsize}"))


def _check_cast(mesh, fn, x, spec, out_specs, *, gathered=False):
  """Jits the cast ``fn`` on ``x`` placed with ``spec``: it lowers through our rules, runs
  with no collectives (``gathered``: all-gathers only), and its outputs, with the specs
  ``out_specs`` (None: unchecked), are bitwise the unsharded cast's."""
  import jax
  from jax.sharding import NamedSharding
  want = jax.jit(fn)(x)
  placed = jax.device_put(x, NamedSharding(mesh, spec))
  lowered = jax.jit(fn).lower(placed)
  assert "CustomSPMDPartitioning" in lowered.as_text()
  compiled = lowered.compile()
  counts = multidevice.collectives(compiled.as_text())
  assert sum(counts.values()) == (counts["all-gather"] if gathered else 0), (counts, spec)
  assert counts["all-gather"] >= 1 or not gathered, (counts, spec)
  got = compiled(placed)
  for g, w, s in zip(got, want, out_specs):
    if s is not None:
      assert g.sharding.is_equivalent_to(NamedSharding(mesh, s), g.ndim), (spec, g.sharding)
    assert g.shape == w.shape and g.dtype == w.dtype
    np.testing.assert_array_equal(_bits(g), _bits(w))


def _partitioned_casts(text):
  """How many casts (custom calls with an e4m3 result) lower through custom partitioning."""
  return len(re.findall(r"@CustomSPMDPartitioning\(.*->\s*\(tensor<[^>]*xf8E4M3FN>", text))


def _all_reduced(hlo):
  """The sizes of the arrays the compiled HLO all-reduces (XLA may combine all-reduces)."""
  sizes = []
  for result in re.findall(r"=\s*(.+?)\s+all-reduce(?:-start)?\(", hlo):
    sizes += [int(np.prod([int(d) for d in dims.split(",") if d]))
              for dims in re.findall(r"\w+\[([\d,]*)\]", result)]
  return sorted(sizes)


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
  # The casts likewise (case_casts checks how they split).
  x = helpers.randn(rng, (64, 256), jnp.bfloat16)
  x_rows = jax.device_put(x, NamedSharding(mesh, P("x")))
  for cast in (jd.per_token_cast_to_fp8, jd.per_block_cast_to_fp8,
               jd.per_token_cast_transpose_to_fp8, jd.per_block_cast_to_fp8_and_transpose):
    assert _partitioned_casts(jax.jit(cast).lower(x_rows).as_text()) == 1
    assert marker not in jax.jit(cast).lower(x).as_text()
  cast_per_device = jax.shard_map(jd.per_token_cast_to_fp8, mesh=mesh, in_specs=P("x"),
                                  out_specs=(P("x"), P("x")))
  assert marker not in jax.jit(cast_per_device).lower(x_rows).as_text()
  for g, w in zip(jax.jit(cast_per_device)(x_rows), jd.per_token_cast_to_fp8(x)):
    np.testing.assert_array_equal(_bits(g), _bits(w))


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
  # K split with a bias under jax_numpy_rank_promotion='raise' (set globally: XLA's
  # partitioning callback does not see a `with` block's setting): each device added the bias
  # [N] to its summed [M, N] by rank promotion, which failed the partitioning.
  import jax
  jax.config.update("jax_numpy_rank_promotion", "raise")
  try:
    _check(mesh, lambda *xs: f32(*xs[:4], bias=xs[4]), (a, sa, b, sb, bias), k_split + (P(),),
           expect={"all-reduce": 1}, rtol=1e-5, atol=3e-5)
  finally:
    jax.config.update("jax_numpy_rank_promotion", "allow")


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
  # The CPU reference's f32 ragged_dot may block K differently for fewer rows (seen on a
  # 2-core CI machine: 1.1e-6 of max|want| on 32 rows per device), hence the atol.
  _check(mesh, op, args, (P("x"), P("x"), P(), P(), P()), expect={}, out_spec=P("x"),
         rtol=1e-5, atol=3e-5)
  _check(mesh, op, args, (P(("x", "y")), P(("x", "y")), P(), P(), P()), expect={},
         rtol=1e-5, atol=3e-5)
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
  # int32 sizes reach the rule unclipped (the op no longer clips int32): negative, over M and
  # summing past int32. Each device must clip them as the unsharded op does.
  wild = jnp.asarray([5, -3, 60, 2**31 - 1, -(2**31), 2**31 - 1, 9, 1], jnp.int32)
  for specs in ((P("x"), P("x"), P(), P(), P()), (P("x"), P("x"), P("y"), P("y"), P())):
    _check(mesh, op, args[:4] + (wild,), specs, expect={"all-reduce": len(specs[2])},
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
  want = np.asarray(op(a[:250], sa[:250], b, sb, gs250))
  np.testing.assert_allclose(np.asarray(lowered.compile()(*args[:4], gs250)), want,
                             rtol=1e-5, atol=3e-5 * float(np.abs(want).max()))


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
  # Unclipped int32 masked_m (the op hands them over as they are) with rows split: each
  # shard's count must not wrap around (-2^31 minus its first row).
  wild = jnp.asarray([2**31 - 1, -(2**31), 17, 99], jnp.int32)
  _check(mesh, op, args[:4] + (wild,), (P("x", "y"), P("x", "y"), P("x"), P("x"), P("x")),
         expect={}, out_spec=P("x", "y"))
  # K split: partial products, one all-reduce.
  k_split = P(None, None, "y")
  _check(mesh, op, args, (k_split,) * 4 + (P(),), expect={"all-reduce": 1}, rtol=1e-5,
         atol=3e-5)
  # With `out` (rows past masked_m are its own: random, so a wrong row shows): split like the
  # result, local; with K split, taken once after the all-reduce.
  out = jnp.asarray(rng.standard_normal((g, m, n)), jnp.float32)
  op_out = lambda *x: op(*x[:5], out=x[5])
  args_out = args[:4] + (wild, out)
  _check(mesh, op_out, args_out, (P("x", "y"), P("x", "y"), P("x"), P("x"), P("x"),
                                  P("x", "y")), expect={}, out_spec=P("x", "y"))
  _check(mesh, op_out, args_out, (P(), P(), P(None, "x"), P(None, "x"), P(), P(None, None, "x")),
         expect={}, out_spec=P(None, None, "x"))
  _check(mesh, op_out, args_out, (k_split,) * 4 + (P(), P()), expect={"all-reduce": 1},
         rtol=1e-5, atol=3e-5)


def case_casts(partitioner):
  # The FP8 casts quantize each 1x128 / 128x128 / 128x1 group on its own: split on group
  # boundaries they run on each device's shard with no communication, bitwise the same.
  import jax
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P
  import jax_deepgemm as jd
  mesh = _setup(partitioner)
  rng, helpers, _ = _data(7)
  x = helpers.randn(rng, (256, 512), jnp.bfloat16)
  xb = helpers.randn(rng, (4, 256, 512))  # a batch (experts) of matrices, f32
  ue8m0 = dict(use_ue8m0=True)
  # Per token, [..., R, C] -> [..., R, C], [..., R, C/128]: leading axes and rows split
  # anywhere, C in whole 128-blocks (4 shards of 512: one block each).
  token = jd.per_token_cast_to_fp8
  for spec in (P("x", "y"), P(("x", "y")), P(None, "x")):
    _check_cast(mesh, token, x, spec, (spec, spec))
  _check_cast(mesh, functools.partial(token, **ue8m0), xb, P("x", "y"), (P("x", "y"),) * 2)
  _check_cast(mesh, token, xb, P("y", None, "x"), (P("y", None, "x"),) * 2)
  # vmapped: the batch is a leading axis of the one cast.
  _check_cast(mesh, jax.vmap(token), xb, P("y", "x"), (P("y", "x"),) * 2)
  # Per 128x128 block, [..., N, K] -> [..., N, K], [..., N/128, K/128]: N and K in whole
  # blocks, leading axes anywhere.
  block = jd.per_block_cast_to_fp8
  _check_cast(mesh, block, x, P("x", "y"), (P("x", "y"),) * 2)
  _check_cast(mesh, functools.partial(block, **ue8m0), x, P(None, "y"), (P(None, "y"),) * 2)
  _check_cast(mesh, block, xb, P("y", "x"), (P("y", "x"),) * 2)
  _check_cast(mesh, block, xb, P("x", None, "y"), (P("x", None, "y"),) * 2)
  # Transposed, [..., N, K] -> [..., K, N], [..., K/128, N/128]: both outputs swap.
  block_t = functools.partial(block, transpose=True)
  _check_cast(mesh, block_t, x, P("x", "y"), (P("y", "x"),) * 2)
  _check_cast(mesh, block_t, xb, P("x", None, "y"), (P("x", "y"),) * 2)
  # Along tokens, [..., T, N] -> q [..., T, N] (or [..., N, T] transposed), s [..., T/128, N]:
  # T in whole blocks (here 1 or 2 per shard), N anywhere.
  xt = helpers.randn(rng, (1024, 96), jnp.bfloat16)
  along = functools.partial(token, axis=0)
  _check_cast(mesh, along, xt, P("y", "x"), (P("y", "x"),) * 2)
  _check_cast(mesh, functools.partial(along, **ue8m0), xt, P(None, "y"), (P(None, "y"),) * 2)
  transposed = jd.per_token_cast_transpose_to_fp8
  tokens = ("x", "y")
  _check_cast(mesh, transposed, xt, P(tokens), (P(None, tokens), P(tokens)))
  _check_cast(mesh, transposed, xt, P("y", "x"), (P("x", "y"), P("y", "x")))
  _check_cast(mesh, functools.partial(transposed, **ue8m0), xb, P("y", "x"),
              (P("y", None, "x"), P("y", "x")))
  _check_cast(mesh, transposed, xb, P("x", None, "y"), (P("x", "y"), P("x", None, "y")))
  # Both casts at once, [..., T, C] -> q [..., T, C], s [..., T, C/128], qt [..., C, T],
  # st [..., T/128, C]: T and C in whole blocks (x: 2 and 4 blocks), leading axes anywhere.
  dual = jd.per_token_cast_to_fp8_and_transpose
  _check_cast(mesh, dual, x, P("x", "y"), (P("x", "y"),) * 2 + (P("y", "x"), P("x", "y")))
  _check_cast(mesh, dual, x, P(None, "y"), (P(None, "y"),) * 2 + (P("y"), P(None, "y")))
  _check_cast(mesh, functools.partial(dual, **ue8m0), xb, P("y", "x"),
              (P("y", "x"),) * 2 + (P("y", None, "x"), P("y", "x")))
  _check_cast(mesh, dual, xb, P("x", None, "y"), (P("x", None, "y"),) * 2 + (P("x", "y"),
                                                                            P("x", None, "y")))
  # Both block casts at once, [..., N, K] -> q [..., N, K], s [..., N/128, K/128] and the
  # transposed qt [..., K, N], st [..., K/128, N/128]: N and K in whole blocks, as per block.
  block_dual = jd.per_block_cast_to_fp8_and_transpose
  _check_cast(mesh, block_dual, x, P("x", "y"), (P("x", "y"),) * 2 + (P("y", "x"),) * 2)
  _check_cast(mesh, functools.partial(block_dual, **ue8m0), x, P(None, "y"),
              (P(None, "y"),) * 2 + (P("y"),) * 2)
  _check_cast(mesh, block_dual, xb, P("y", "x"), (P("y", "x"),) * 2 + (P("y", None, "x"),) * 2)
  _check_cast(mesh, block_dual, xb, P("x", None, "y"),
              (P("x", None, "y"),) * 2 + (P("x", "y"),) * 2)


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

  # The whole training step, value_and_grad under one jit: every cast (forward: x and w, each
  # both ways in one dual cast; backward: dY's dual cast) runs through our rules,
  # nothing is gathered, and the one collective all-reduces the weight gradient (XLA combines the
  # loss' scalar sum into it; uncombined it would be a second all-reduce of one element).
  from jax.sharding import NamedSharding
  layers = [(lambda w, x: jnp.sum(jd.fp8_linear(x, w) ** 2), w),
            (lambda w, x: jnp.sum(jd.fp8_grouped_linear(x, w, gs) ** 2), wg)]
  for loss, weight in layers:
    step = jax.jit(jax.value_and_grad(loss, (0, 1)))
    placed = (jax.device_put(weight, NamedSharding(mesh, P())),
              jax.device_put(x, NamedSharding(mesh, tokens)))
    lowered = step.lower(*placed)
    assert _partitioned_casts(lowered.as_text()) == 3
    hlo = lowered.compile().as_text()
    counts = multidevice.collectives(hlo)
    assert counts["all-gather"] == 0 and counts["all-reduce"] in (1, 2), counts
    assert sum(counts.values()) == counts["all-reduce"], counts
    assert _all_reduced(hlo) == [1, weight.size], _all_reduced(hlo)
    got, want = step(*placed), jax.jit(jax.value_and_grad(loss, (0, 1)))(weight, x)
    assert got[1][1].sharding.is_equivalent_to(NamedSharding(mesh, tokens), 2)
    for g, w_ in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w_), rtol=1e-5,
                                 atol=3e-5 * float(np.abs(np.asarray(w_)).max()))


def _explicit_mesh_and_data():
  import jax
  from jax.sharding import AxisType
  mesh = jax.make_mesh((2, 4), ("x", "y"), axis_types=(AxisType.Explicit,) * 2)
  rng, helpers, _ = _data(5)
  return jax, mesh, lambda *shape: helpers.randn(rng, shape, scale=0.05)


def case_explicit_axes(partitioner):
  # Explicit mesh axes (sharding in types): the layers and their gradients run on layouts that
  # typing the ops' results alone broke (3-D activations split on two axes, whose typed rows
  # JAX cannot split back by itself; row-parallel, unaligned-column and expert-split weights,
  # whose cotangents came out typed unlike the primals), with the unsharded values.
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  import jax_deepgemm as jd
  _setup(partitioner)
  jax, mesh, randn = _explicit_mesh_and_data()
  # Losses linear in y: dY is then the same array however y's sums were ordered (a loss like
  # sum(y**2) would re-quantize dY, and a rounding difference can move a whole FP8 group).
  ct = randn(1024, 256)
  loss = lambda x, w: jnp.sum(jd.fp8_linear(x, w) * ct)
  gs = jnp.asarray([200, 300, 124, 400], jnp.int32)
  gloss = lambda x, w: jnp.sum(jd.fp8_grouped_linear(x, w, gs) * ct)
  cases = [
      (jax.grad(loss, (0, 1)), (randn(1024, 512), randn(512, 256)), (P("x"), P("y"))),
      (jax.grad(loss, (0, 1)), (randn(1024, 256), randn(256, 256)), (P("x"), P(None, "y"))),
      (jax.grad(gloss, (0, 1)), (randn(1024, 256), randn(4, 256, 256)), (P("x"), P("y"))),
      (jd.fp8_linear, (randn(4, 256, 256), randn(256, 512)), (P("x", "y"), P())),
      (jax.vmap(lambda x, w: jd.fp8_linear(x, w)), (randn(4, 256, 256), randn(4, 256, 128)),
       (P("x", "y"), P("x"))),
      # A replicated x with a split weight (its cotangent typed replicated too); rows the
      # token-axis cast gathers (256 over 8 is not whole 128-blocks) with N split; vmap
      # under grad with the batch split (the K-grouped op's map over it).
      (jax.grad(loss, (0, 1)), (randn(1024, 256), randn(256, 256)), (P(), P("x"))),
      (jax.grad(lambda x, w: jnp.sum(jd.fp8_linear(x, w) * ct[:256]), (0, 1)),
       (randn(256, 256), randn(256, 256)), (P(("x", "y")), P(None, "x"))),
      (jax.grad(lambda x, w: jnp.sum(jax.vmap(jd.fp8_linear, (0, None))(x, w)), (0, 1)),
       (randn(4, 64, 256), randn(256, 256)), (P("x"), P())),
      # Leading dimensions split after an unsplit one (sequence-parallel [B, S@x, K]), which
      # JAX refuses to fold into rows: folded with the split ones first. (dX only: dW's
      # 128-token quantization groups follow the folded row order.)
      (jd.fp8_linear, (randn(2, 4, 128, 256), randn(256, 256)), (P(None, "x", "y"), P())),
      (jax.grad(lambda x, w: jnp.sum(jd.fp8_linear(x, w) * ct.reshape(2, 512, 256))),
       (randn(2, 512, 256), randn(256, 256)), (P(None, "x"), P())),
      # K split over "x" in x and over "y" in w (the casts saw a sharding JAX cannot decode).
      (jax.grad(lambda x, w: jnp.sum(jd.fp8_linear(x, w) * ct[:256]), (0, 1)),
       (randn(256, 256), randn(256, 256)), (P(None, "x"), P("y"))),
      (jd.fp8_linear, (randn(256, 256), randn(256, 256)), (P("x", "y"), P("x"))),
      # Batched weights (a group per batch element) with rows split after the batch.
      (jax.vmap(jd.fp8_linear), (randn(4, 256, 256), randn(4, 256, 128)), (P(None, "x"), P())),
      (jax.vmap(lambda x, w: jd.fp8_gemm_nt(*jd.per_token_cast_to_fp8(x),
                                            *jd.per_block_cast_to_fp8(w, transpose=True)),
                (1, None)), (randn(512, 2, 256), randn(256, 128)), (P("x"), P())),
  ]
  for i, (fn, args, specs) in enumerate(cases):
    want = jax.jit(fn)(*args)
    if i % 2:  # arrays placed on the mesh, no mesh context
      got = jax.jit(fn)(*[jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)])
    else:
      with jax.set_mesh(mesh):
        got = jax.jit(fn)(*[jax.device_put(a, s) for a, s in zip(args, specs)])
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5,
                                 atol=3e-5 * float(np.abs(np.asarray(w)).max()))
  with jax.set_mesh(mesh):  # ... and the result keeps x's leading types
    x = jax.device_put(randn(2, 4, 128, 256), P(None, "x", "y"))
    y = jax.eval_shape(jd.fp8_linear, x, jax.device_put(randn(256, 256), P()))
  assert tuple(y.sharding.spec) == (None, "x", "y", None), y.sharding
  with jax.set_mesh(mesh):
    x = jax.device_put(randn(4, 256, 256), P(None, "x"))
    y = jax.eval_shape(jax.vmap(jd.fp8_linear), x, jax.device_put(randn(4, 256, 128), P()))
  assert tuple(y.sharding.spec) == (None, "x", None), y.sharding


def case_explicit_vmap_over_a_split_axis(partitioner):
  # vmap over a dimension split over an Explicit axis, the layers followed by a jitted function
  # (jax.nn.silu): the grouped one's ops map over the batch (lax.map, the batch gathered), and
  # their results were typed unsplit there, on no mesh, where vmap types the batch as split
  # ('Resource axis: x ... is not found in mesh: ()'). Values and gradients are the unsharded
  # ones, the batch still split.
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P
  import jax_deepgemm as jd
  _setup(partitioner)
  jax, mesh, randn = _explicit_mesh_and_data()
  x, ct = randn(4, 128, 256), randn(4, 128, 128)
  gs = jnp.asarray([100, 28], jnp.int32)
  grouped = jax.vmap(lambda x, w: jax.nn.silu(jd.fp8_grouped_linear(x, w, gs)), (0, None))
  dense = jax.vmap(lambda x, w: jax.nn.silu(jd.fp8_linear(x, w)), (0, None))
  for f, w in ((grouped, randn(2, 256, 128)), (dense, randn(256, 128))):
    for fn in (f, jax.grad(lambda x, w: jnp.sum(f(x, w) * ct), (0, 1))):
      want = jax.jit(fn)(x, w)
      with jax.set_mesh(mesh):
        got = jax.jit(fn)(jax.device_put(x, P("x")), jax.device_put(w, P()))
      assert tuple(jax.tree.leaves(got)[0].sharding.spec)[:1] == ("x",), got
      for g, v in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(v), rtol=1e-5,
                                   atol=3e-5 * float(np.abs(np.asarray(v)).max()))


def case_explicit_types(partitioner):
  # Each op's result is typed as its partitioning shards it (rows split: the GEMM's result too),
  # so a matmul after fp8_linear stays local (typed replicated, it all-gathered its operand);
  # the gradients are typed as their primals.
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P
  import jax_deepgemm as jd
  _setup(partitioner)
  jax, mesh, randn = _explicit_mesh_and_data()
  x, w, w2 = randn(1024, 256), randn(256, 384), randn(384, 64)
  tokens = P(("x", "y"), None)
  net = jax.jit(lambda x, w, w2: jd.fp8_linear(x, w) @ w2)
  step = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jd.fp8_linear(x, w)), (0, 1)))
  want, want_step = net(x, w, w2), step(x, w)
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, tokens)
    ws, w2s = jax.device_put(w, P()), jax.device_put(w2, P())
    a, sa = jd.per_token_cast_to_fp8(xs)
    bt, sbt = jd.per_block_cast_to_fp8(ws, transpose=True)
    for fn, args, specs in ((jd.per_token_cast_to_fp8, (xs,), (tokens, tokens)),
                            (jd.fp8_gemm_nt, (a, sa, bt, sbt), (tokens,)),
                            (net, (xs, ws, w2s), (tokens,)),
                            (step, (xs, ws), (P(), tokens, P(None, None)))):
      got = [t.sharding.spec for t in jax.tree.leaves(jax.eval_shape(fn, *args))]
      pad = lambda p, n: tuple(p) + (None,) * (n - len(p))
      assert [pad(g, len(s)) for g, s in zip(got, specs)] == [tuple(s) for s in specs], (got, specs)
    counts = multidevice.collectives(net.lower(xs, ws, w2s).compile().as_text())
    assert sum(counts.values()) == 0, counts
    got = net(xs, ws, w2s)
    got_step = step(xs, ws)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
  for g, w_ in zip(jax.tree.leaves(got_step), jax.tree.leaves(want_step)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w_), rtol=1e-5,
                               atol=3e-5 * float(np.abs(np.asarray(w_)).max()))
  # jax.export of the same step (the plain ops are lowered there) with a weight split over
  # "y": traced with its Explicit types, the casts' references failed ('This reshape is not
  # supported ... float32[256@y,384]'). (Shardy only: under GSPMD JAX cannot call back a
  # module exported with sharded arguments, any op's.)
  if partitioner == "shardy":
    from jax import export
    with jax.set_mesh(mesh):
      args = (xs, jax.device_put(w, P("y")))
      got_step = export.export(step, platforms=("cpu",))(*args).call(*args)
    for g, w_ in zip(jax.tree.leaves(got_step), jax.tree.leaves(want_step)):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w_), rtol=1e-5,
                                 atol=3e-5 * float(np.abs(np.asarray(w_)).max()))


def case_explicit_moe(partitioner):
  # The flax MoE layer without mesh= on tokens split over Explicit axes (its routing sort
  # refused them; [B, S@x, H] could not fold): the unsharded values and gradients, and y
  # typed as x.
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import PartitionSpec as P
  from jax_deepgemm.flax import MoE
  _setup(partitioner)
  jax, mesh, randn = _explicit_mesh_and_data()
  x, r = randn(2, 256, 256), randn(2, 256, 256)
  router = randn(256, 4) * 10  # far from routing ties

  def loss(m, x):
    y, aux = m(x)
    return jnp.sum(y * r) + aux, y
  step = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  # (bf16: ragged_dot, which infers no types on Explicit axes, nor does its transpose)
  for impl in ("fp8", "bf16"):
    layer = MoE(256, 128, 4, 2, rngs=nnx.Rngs(0), dtype=jnp.float32, experts_impl=impl)
    layer.router[...] = router
    (_, want), (want_gm, want_gx) = step(layer, x)
    for spec in (P(), P("x"), P(None, "x"), P("x", "y")):
      with jax.set_mesh(mesh):
        xs = jax.device_put(x, spec)
        (_, y), (gm, gx) = step(layer, xs)
      assert tuple(y.sharding.spec) == tuple(spec) + (None,) * (3 - len(spec)), (spec, y.sharding)
      for g, w in zip(jax.tree.leaves((y, gx, nnx.to_pure_dict(gm))),
                      jax.tree.leaves((want, want_gx, nnx.to_pure_dict(want_gm)))):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5,
                                   atol=3e-5 * float(np.abs(np.asarray(w)).max()),
                                   err_msg=f"{impl} {spec}")
  # The hidden dimension split in x and in the router (as nnx.jit re-types an unplaced
  # parameter): the router's dot contracts split dimensions, which needs its result typed.
  layer = MoE(256, 128, 4, 2, rngs=nnx.Rngs(0), dtype=jnp.float32)
  layer.router[...] = router
  forward = nnx.jit(lambda m, x: m(x)[0])
  want = forward(layer, x)
  with jax.set_mesh(mesh):
    layer.router.value = jax.device_put(router, P("y", None))
    xs = jax.device_put(x, P(None, None, "y"))
    y = forward(layer, xs)
    (_, _), (gm, gx) = step(layer, xs)
  assert tuple(y.sharding.spec)[:2] == (None, None), y.sharding  # (H: w_down's, unsplit)
  np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5,
                             atol=3e-5 * float(np.abs(np.asarray(want)).max()))
  assert np.all(np.isfinite(np.asarray(gx)))
  layer = MoE(256, 128, 4, 2, rngs=nnx.Rngs(0), dtype=jnp.float32)
  layer.router[...] = router
  # Expert-parallel (mesh=): its shard_map splits the tokens over the whole mesh; y comes back
  # typed as x (it came back with rows replicated for x split over one axis).
  par = MoE(256, 128, 4, 2, rngs=nnx.Rngs(0), dtype=jnp.float32, mesh=mesh, expert_axis="y")
  par.router[...] = layer.router[...]
  forward = nnx.jit(lambda m, x: m(x)[0])
  want = forward(par, x)
  for spec in (P("x"), P(None, "x")):
    with jax.set_mesh(mesh):
      y = forward(par, jax.device_put(x, spec))
    assert tuple(y.sharding.spec) == tuple(spec) + (None,) * (3 - len(spec)), (spec, y.sharding)
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5,
                               atol=3e-5 * float(np.abs(np.asarray(want)).max()), err_msg=str(spec))


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
  # The casts too: 640 columns over 4 shards would cut the 128-groups; the cast gathers them.
  x = helpers.randn(rng, (256, 640), jnp.bfloat16)
  _check_cast(mesh, jd.per_token_cast_to_fp8, x, P(None, "y"), (None, None), gathered=True)
  # 256 rows, 2 blocks, over 4 shards: Shardy offers the op half of "y" (a sub-axis), which
  # no PartitionSpec names; gathered as well.
  _check_cast(mesh, jd.per_block_cast_to_fp8, x, P("y"), (None, None), gathered=True)
  _check_cast(mesh, jd.per_token_cast_transpose_to_fp8, x, P("y"), (None, None),
              gathered=True)
  _check_cast(mesh, jd.per_token_cast_to_fp8_and_transpose, x, P(None, "y"), (None,) * 4,
              gathered=True)
  _check_cast(mesh, jd.per_block_cast_to_fp8_and_transpose, x, P("y"), (None,) * 4,
              gathered=True)



def case_grouped_sizes_split_and_partial_manual(partitioner):
  # (Group sizes typed split over an Explicit axis crashed the K-grouped op and the grouped
  # layer's gradient: their running sum sliced a split dimension. In a shard_map over some of
  # the mesh's axes, the M-grouped reference failed (jnp.searchsorted) and, on an Explicit
  # mesh, the K-grouped one (ragged_dot_general infers no types there).)
  import jax
  import jax.numpy as jnp
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  import jax_deepgemm as jd
  _setup(partitioner)
  rng, helpers, _ = _data(7)
  x, w = helpers.randn(rng, (256, 256)), helpers.randn(rng, (8, 256, 128), scale=0.05)
  ct = helpers.randn(rng, (256, 128))
  gs = jnp.asarray([30, 0, 50, 20, 0, 60, 41, 40], jnp.int32)
  loss = lambda x, w, g: jnp.sum(jd.fp8_grouped_linear(x, w, g) * ct)
  want = jax.grad(loss, (0, 1))(x, w, gs)
  explicit = jax.make_mesh((2, 4), ("x", "y"), axis_types=(AxisType.Explicit,) * 2)
  with jax.set_mesh(explicit):
    g_split = jax.device_put(gs, NamedSharding(explicit, P("y")))
    got = jax.jit(jax.grad(loss, (0, 1)))(x, w, g_split)
    xq, xs = jd.per_token_cast_to_fp8(x, axis=0)
    k_want = jd.k_grouped_fp8_gemm_tn_contiguous(xq, xs, xq, xs, gs)
    k_got = jax.jit(jd.k_grouped_fp8_gemm_tn_contiguous)(xq, xs, xq, xs, g_split)
  for a, b in zip(got + (k_got,), want + (k_want,)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
  # shard_map over "x" only: each "x" shard routes its 128 rows with its own sizes.
  local_gs = jnp.asarray([[10, 0, 30, 20, 0, 60, 8, 0], [0, 64, 0, 0, 32, 0, 0, 32]], jnp.int32)
  ct_local = ct.reshape(2, 128, 128)
  def per_shard(lin):
    def body(x, w, g, c):
      return jax.lax.psum(jnp.sum(lin(x, w, g[0]) * c[0]), "x")
    return body
  want_parts = [jax.grad(lambda x, w: jnp.sum(jd.fp8_grouped_linear(x, w, local_gs[i]) *
                                               ct_local[i]), (0, 1))(x[128 * i:128 * (i + 1)], w)
                for i in range(2)]
  want_dx = jnp.concatenate([p[0] for p in want_parts])
  want_dw = want_parts[0][1] + want_parts[1][1]
  # (Operands split over "y", left automatic, inside the body: typed on Explicit axes there,
  # the plain op traced with those types failed in the casts' and grouped references,
  # 'This reshape is not supported'. K, N, rows and experts split.)
  w2 = helpers.randn(rng, (256, 128), scale=0.05)
  dense_parts = [jax.grad(lambda x, w: jnp.sum(jd.fp8_linear(x, w) * ct_local[i]), (0, 1))(
      x[128 * i:128 * (i + 1)], w2) for i in range(2)]
  want_dense = (jnp.concatenate([p[0] for p in dense_parts]),
                dense_parts[0][1] + dense_parts[1][1])
  for types in ((AxisType.Auto,) * 2, (AxisType.Explicit,) * 2):
    mesh = jax.make_mesh((2, 4), ("x", "y"), axis_types=types)
    split = (jax.sharding.reshard if types[0] == AxisType.Explicit else
             jax.lax.with_sharding_constraint)  # (a bare spec: on the shard_map's mesh)
    on_y = lambda specs, lin: lambda x, w, g: lin(split(x, specs[0]), split(w, specs[1]), g)
    dense = lambda x, w, g: jd.fp8_linear(x, w)
    with jax.set_mesh(mesh):
      for lin, args, want_d in (
          (jd.fp8_grouped_linear, (x, w), (want_dx, want_dw)),
          (on_y((P(None, "y"), P("y")), jd.fp8_grouped_linear), (x, w), (want_dx, want_dw)),
          (on_y((P("y"), P(None, None, "y")), jd.fp8_grouped_linear), (x, w), (want_dx, want_dw)),
          (on_y((P("y"), P(None, "y")), dense), (x, w2), want_dense),
          (on_y((P(None, "y"), P("y")), dense), (x, w2), want_dense)):
        f = jax.shard_map(per_shard(lin), mesh=mesh,
                          in_specs=(P("x"), P(), P("x"), P("x")), out_specs=P(), axis_names={"x"})
        dx, dw = jax.jit(jax.grad(f, (0, 1)))(*args, local_gs, ct_local)
        np.testing.assert_allclose(np.asarray(dx), np.asarray(want_d[0]), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(dw), np.asarray(want_d[1]), rtol=1e-4, atol=1e-4)


def case_k_grouped_experts_split_past_the_group_table(partitioner):
  # With G split, each device's K-grouped op takes one group more than its experts (the tokens
  # before them): 1024 local experts made 1025 groups, which the kernel's lowering refused
  # ("got 1025"). The plan now says why. (On CPU the reference has no such limit: the check is
  # taken as on a GPU. Raised in XLA's partitioning callback, it comes wrapped in a
  # JaxRuntimeError.)
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  import pytest
  import jax_deepgemm as jd
  from jax_deepgemm import sharding
  mesh = _setup(partitioner)
  sharding._kernels_on = lambda mesh: True
  rng, helpers, _ = _data(8)
  a, sa = helpers.quant_act(rng, 256, 8, axis=0)
  op = jd.k_grouped_fp8_gemm_tn_contiguous
  by_expert = lambda *xs: jax.lax.with_sharding_constraint(op(*xs), NamedSharding(mesh, P("y")))
  for experts in (1023, 1024):
    gs = jnp.zeros((4 * experts,), jnp.int32).at[::7].set(3)
    lower = lambda: jax.jit(by_expert).lower(a, sa, a, sa, gs).compile()
    if experts == 1023:
      lower()
    else:
      with pytest.raises((ValueError, jax.errors.JaxRuntimeError),
                         match=r"G = 4096 split over mesh axes \('y',\) leaves 1024 experts a "
                               r"device.*at most 1023"):
        lower()


if __name__ == "__main__":
  multidevice.main(globals())
