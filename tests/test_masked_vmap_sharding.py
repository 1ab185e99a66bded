"""``jax.vmap`` of ``m_grouped_fp8_gemm_nt_masked`` (batched weights: each batch element is G
more groups) with its operands sharded, on 8 CPU devices (a 2 x 4 mesh, as tests/test_sharding.py).

The batching rule used to fold (batch, G) into one dimension at the JAX level. With G split over
a mesh axis and the batch not (expert-parallel groups, vmapped over something else), Explicit
axes refused the reshape (a ShardingTypeError) and Auto ones gathered every operand. The batch
now stays a leading dimension of the primitive, which its partitioning rule splits like G, and
the per-device lowering folds the local shards: no collectives on either kind of axes.
"""
import functools

import numpy as np
import pytest

import multidevice

PARTITIONERS = ["shardy", "gspmd"]
CASES = ["case_explicit", "case_explicit_chunked", "case_auto_batch_split",
         "case_auto_groups_split"]


@pytest.mark.parametrize("partitioner", PARTITIONERS)
@pytest.mark.parametrize("case", CASES)
def test_masked_vmap_sharding(case, partitioner):
  multidevice.run(__file__, case, partitioner)


# ----------------------------------------------------------------------------- child side
def _setup(partitioner, axis_type):
  import jax
  jax.config.update("jax_use_shardy_partitioner", partitioner == "shardy")
  assert jax.device_count() == 8, jax.devices()
  axis_type = getattr(jax.sharding.AxisType, axis_type)
  return jax.make_mesh((2, 4), ("x", "y"), axis_types=(axis_type,) * 2)


def _operands(seed, batch, groups, m=40, n=200, k=320):
  """Fresh data with odd sizes (N, K not multiples of 128) and an empty group or two."""
  import jax.numpy as jnp
  import helpers
  import jax_deepgemm as jd
  rng = np.random.default_rng(seed)
  a, sa = jd.per_token_cast_to_fp8(helpers.randn(rng, (batch, groups, m, k), jnp.bfloat16))
  b, sb = jd.per_block_cast_to_fp8(helpers.randn(rng, (batch, groups, n, k)))
  mm = rng.integers(1, m + 1, (batch, groups))
  mm[0, 1] = mm[-1, -1] = 0
  return a, sa, b, sb, jnp.asarray(mm, jnp.int32)


def _single():
  import jax.numpy as jnp
  import jax_deepgemm as jd
  def op(a, sa, b, sb, mm, *out):  # out: rows past masked_m from it
    return jd.m_grouped_fp8_gemm_nt_masked(a, sa, b, sb, mm, expected_m=16,
                                           out_dtype=jnp.float32, out=out[0] if out else None)
  return op


def _unbatched(args):
  """The op on each batch element alone, on one device: what the vmapped one must equal."""
  import jax
  import jax.numpy as jnp
  op = jax.jit(_single())
  return jnp.stack([op(*(x[i] for x in args)) for i in range(args[0].shape[0])])


def _run(mesh, args, specs, *, in_context, collectives=True, out_spec=None, with_out=False):
  """The jitted vmapped op on ``args`` placed with ``specs`` (in a ``jax.set_mesh`` or by
  NamedSharding): no collectives (if ``collectives``), bitwise the unbatched op's values.
  ``with_out``: also an ``out`` [B, G, M_max, N] of random values, placed as ``a``."""
  import contextlib
  import jax
  from jax.sharding import NamedSharding
  if with_out:
    a, b = args[0], args[2]
    rng = np.random.default_rng(a.shape[0])
    args = args + (jax.numpy.asarray(rng.standard_normal(a.shape[:3] + b.shape[2:3]),
                                     jax.numpy.float32),)
    specs = specs + specs[:1]
  want = _unbatched(args)
  with jax.set_mesh(mesh) if in_context else contextlib.nullcontext():
    placed = [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(args, specs)]
    jitted = jax.jit(jax.vmap(_single()))
    counts = multidevice.collectives(jitted.lower(*placed).compile().as_text())
    got = jitted(*placed)
  if collectives:
    assert not any(counts.values()), (counts, specs)
  if out_spec is not None:
    assert got.sharding.is_equivalent_to(NamedSharding(mesh, out_spec), got.ndim), got.sharding
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  past = np.asarray(args[5])[[0, -1], [1, -1]] if with_out else 0.0  # masked_m 0 there
  np.testing.assert_array_equal(np.asarray(got)[[0, -1], [1, -1]], past)


def case_explicit(partitioner):
  from jax.sharding import PartitionSpec as P
  mesh = _setup(partitioner, "Explicit")
  g_split = _operands(0, 3, 8)  # an odd batch, not split
  b_split = _operands(1, 2, 4)
  rows = (P(None, "x", "y"),) * 2 + (P(None, "x"),) * 3
  for i, (args, specs, clean, out_spec) in enumerate([
      # G split, the batch not: the ShardingTypeError ('This reshape is not supported').
      (g_split, (P(None, "y"),) * 5, True, P(None, "y")),
      (g_split, (P(None, ("x", "y")),) * 5, True, P(None, ("x", "y"))),
      (g_split, rows, True, P(None, "x", "y")),  # ... and a's rows split too
      # The batch split (and G): folded as they come, as before.
      (b_split, (P("x"),) * 5, True, P("x")),
      (b_split, (P("x", "y"),) * 5, True, P("x", "y")),
      # Operands split unlike each other: values only (the partitioner reconciles them).
      (g_split, (P(None, "y"),) * 4 + (P(),), False, None),
      (b_split, (P(None, "y"),) * 2 + (P(None, None, "x"),) * 2 + (P(),), False, None),
  ]):
    _run(mesh, args, specs, in_context=i % 2 == 0, collectives=clean, out_spec=out_spec)


def case_explicit_chunked(partitioner):
  # More folded groups than the kernel's group table: a loop over chunks of the batch, each
  # chunk folded G first.
  from jax.sharding import PartitionSpec as P
  from jax_deepgemm import grouped_contiguous
  mesh = _setup(partitioner, "Explicit")
  grouped_contiguous.MAX_KERNEL_GROUPS = 8  # 3 x 4 groups: chunks of 2 batch elements
  _run(mesh, _operands(2, 3, 4), (P(None, "y"),) * 5, in_context=True, out_spec=P(None, "y"))


def case_auto_batch_split(partitioner):
  # Auto axes have no types to choose an order by: the batch folds first, as vmap batches,
  # so a split batch stays local.
  from jax.sharding import PartitionSpec as P
  mesh = _setup(partitioner, "Auto")
  _run(mesh, _operands(3, 2, 4), (P("x"),) * 5, in_context=False)
  _run(mesh, _operands(4, 2, 8), (P("x", "y"),) * 5, in_context=False)


def case_auto_groups_split(partitioner):
  # ... and a split G, the batch not (it gathered all five operands when the batch folded
  # into G at the JAX level); both split; out split like the result.
  from jax.sharding import PartitionSpec as P
  mesh = _setup(partitioner, "Auto")
  _run(mesh, _operands(5, 3, 8), (P(None, "y"),) * 5, in_context=False)
  _run(mesh, _operands(6, 2, 4), (P("x", "y"),) * 5, in_context=False)
  _run(mesh, _operands(7, 3, 8), (P(None, "y"),) * 5, in_context=False, with_out=True)


if __name__ == "__main__":
  multidevice.main(globals())
