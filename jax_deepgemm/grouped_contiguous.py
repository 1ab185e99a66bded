"""``m_grouped_fp8_gemm_nt_contiguous``: the MoE forward GEMM over experts' sorted tokens.

Layouts: a e4m3 ``[M, K]`` (rows sorted by expert), sa float32 ``[M, ceil(K/128)]``;
b e4m3 ``[G, N, K]``, sb float32 ``[G, ceil(N/128), ceil(K/128)]``; group_sizes int32
``[G]`` on device (``jax.lax.ragged_dot``'s convention) → D ``[M, N]``.
Rows ``[offset_g, offset_g + group_sizes[g])`` use expert g's weights. Sizes may be 0 or
any other value: negative sizes count as 0, and sizes are clipped so that the groups end
at row M at the latest. Rows past the last group are zero.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import ShapedArray

from jax_deepgemm import _checks, _ffi, _primitive, _tiled_groups
from jax_deepgemm.gemm import a_scales_operand
from jax_deepgemm.quant import dequantize_per_block, dequantize_per_token

OP = "m_grouped_fp8_gemm_nt_contiguous"


def _abstract_eval(a, sa, b, sb, group_sizes, *, out_dtype):
  _checks.fp8(OP, "a", a)
  _checks.fp8(OP, "b", b)
  _checks.ndim(OP, "a", a, 2, "[M, K]")
  _checks.ndim(OP, "b", b, 3, "[G, N, K]")
  (m, k), (g, n, kb) = a.shape, b.shape
  if k != kb:
    raise ValueError(f"{OP}: a is [M, K] = {a.shape} and b is [G, N, K] = {b.shape}: K differs")
  _checks.token_scales(OP, "sa", sa, m, k)
  _checks.block_scales(OP, "sb", sb, (g,), n, k)
  _checks.group_sizes(OP, "group_sizes", group_sizes, g)
  return ShapedArray((m, n), out_dtype)


def _reference(a, sa, b, sb, group_sizes, *, out_dtype):
  # Each row takes its own expert's product by selection, one expert at a time: ragged_dot's
  # dense lowering masks by multiplying, so one expert's inf or NaN (an empty one's too) made
  # every row NaN, where the kernel never reads the weights of rows it does not own.
  x, w = dequantize_per_token(a, sa), dequantize_per_block(b, sb)
  m, n = a.shape[0], b.shape[1]
  sizes = sanitize_group_sizes(group_sizes, m, OP)
  row_group = group_of_rows(sizes, m)
  if _tiled_groups.worth_tiling(m, b.shape[0]):
    return _tiled_groups.m_grouped_product(x, w, sizes, row_group).astype(out_dtype)

  def one_expert(d, g_w):
    g, w_g = g_w
    d_g = jnp.dot(x, w_g.T, precision=jax.lax.Precision.HIGHEST,
                  preferred_element_type=jnp.float32)
    return jnp.where((row_group == g)[:, None], d_g, d), None

  # Inside shard_map the carry must vary over the manual axes the products vary over.
  init = _primitive.match_vma(jnp.zeros((m, n), jnp.float32), x, w, row_group)[0]
  d, _ = jax.lax.scan(one_expert, init, (jnp.arange(b.shape[0], dtype=row_group.dtype), w))
  return d.astype(out_dtype)


# The kernel's smem group table holds this many groups.
MAX_KERNEL_GROUPS = 1024


def grouped_kernel_call(a, sa, b, sb, sizes, *, masked_stride, expected_m, out_dtype,
                        into=None):
  """The M-grouped kernel on ``a [M, K]`` (rows of all groups) and ``b [G, N, K]``.

  Shared by the contiguous and masked ops (``masked_stride`` 0 or rows per group). ``into``
  (``[M, N]`` of ``out_dtype``): the result takes its buffer, and its rows in no group.
  """
  (m, k), (g, n, _) = a.shape, b.shape
  # (A symbolic G, under shape-polymorphic export, is checked by the kernel's handler.)
  if _primitive.known(g) and g > MAX_KERNEL_GROUPS:
    raise ValueError(f"m_grouped_fp8_gemm_nt: the Hopper kernel supports at most "
                     f"{MAX_KERNEL_GROUPS} groups, got {g}")
  # The handler clips expected_m to masked_stride too; clipped here already, so that any Python
  # int (expected_m is only a hint) fits the int64 attribute.
  expected_m = min(expected_m, masked_stride)
  # (The masked layout's config follows the rows expected per group, by default M_max.)
  _ffi.check_gemm_config("m_grouped_fp8_gemm_nt", expected_m or masked_stride or m, n, k, g,
                         masked=masked_stride > 0, f32_out=out_dtype == jnp.float32)
  if k % 16:  # TMA needs 16-byte row pitches; zeros add nothing to the products.
    pad = -(-k // 16) * 16 - k
    a = jnp.pad(a, ((0, 0), (0, pad)))
    b = jnp.pad(b, ((0, 0), (0, 0), (0, pad)))
  sa_op, sa_layout = a_scales_operand(sa)
  operands = [a, sa_op, b, sb, sizes.astype(jnp.int32)]
  if into is not None:  # written in place (XLA copies it first if it is still needed)
    operands.append(into)
  call = jax.ffi.ffi_call(
      "jax_deepgemm_m_grouped_fp8_gemm_nt" + ("_into" if into is not None else ""),
      jax.ShapeDtypeStruct((m, n), out_dtype),
      input_layouts=(None, sa_layout) + (None,) * (len(operands) - 2),
      input_output_aliases={5: 0} if into is not None else None)
  return call(*operands, masked_stride=np.int64(masked_stride), expected_m=np.int64(expected_m))


def _cuda(a, sa, b, sb, group_sizes, *, out_dtype):
  (m, k), (g, n, _) = a.shape, b.shape
  if m == 0 or n == 0 or k == 0 or g == 0:
    return _reference(a, sa, b, sb, group_sizes, out_dtype=out_dtype)
  if group_sizes.dtype != jnp.int32:  # (the public op hands over int32)
    group_sizes = clip_rows(group_sizes, m)
  # (expected_m steers only the masked layout's config: the contiguous one follows M.)
  return grouped_kernel_call(a, sa, b, sb, group_sizes, masked_stride=0, expected_m=0,
                             out_dtype=out_dtype)


m_grouped_contiguous_p = _primitive.define(
    "jax_deepgemm_m_grouped_fp8_gemm_nt_contiguous", abstract_eval=_abstract_eval,
    reference=_reference, cuda=_cuda,
    batching_rule=lambda args, dims, **p: _primitive.map_rule(m_grouped_contiguous_p)(args, dims, **p))


def clip_rows(sizes, m):
  """Integer ``sizes`` clipped to ``[0, m]``, as int32, without wrapping on the way: types
  that int32 holds (int8/16/32, uint8/16) are widened first, so that ``m`` fits; wider ones
  (uint32, 64-bit) are clipped in their own type, where ``m`` fits, before narrowing."""
  if jnp.iinfo(sizes.dtype).max <= jnp.iinfo(jnp.int32).max:
    sizes = sizes.astype(jnp.int32)
  return jnp.clip(sizes, 0, m).astype(jnp.int32)


def sanitize_group_sizes(group_sizes, m, op="jax_deepgemm"):
  """Negative sizes → 0; sizes clipped so the groups end at row ``m`` at the latest."""
  if not _primitive.known(group_sizes.shape[0]):
    # (The running sum below is an associative_scan, which slices by the length: a symbolic
    # one, under shape-polymorphic export, failed inside it with a bare NotImplementedError.)
    raise ValueError(f"{op}: group_sizes needs a known number of groups G, got the symbolic "
                     f"{group_sizes.shape[0]}; export with a concrete G")
  # Sizes typed as split over Explicit mesh axes are gathered first: the running sum slices
  # them, which JAX refuses on a split dimension (group sizes are global anyway).
  aval = jax.typeof(group_sizes)
  if _primitive.explicit_spec(aval) is not None:
    group_sizes = jax.sharding.reshard(
        group_sizes, jax.sharding.NamedSharding(aval.sharding.mesh, jax.sharding.PartitionSpec()))
  # Each size clipped without wrapping, then a saturating running sum so no prefix
  # overflows int32. (m is an operand of the jitted sum: a symbolic m works, and eager calls
  # compile once per number of groups.)
  return _saturated_sizes(clip_rows(group_sizes, m), jnp.asarray(m, jnp.int32))


@jax.jit
def _saturated_sizes(g, m):
  """Clipped int32 sizes ``g`` → the sizes once their running sum saturates at ``m``.

  Jitted, so that it compiles as one computation: op by op (eagerly, e.g. in an eager
  shard_map body) the associative_scan runs its concatenates alone, and one with an empty
  operand segfaulted XLA:CPU (jax 0.11.2), as ``jnp.diff``'s would for G = 0.
  """
  # min(x + y, m) as x + min(y, m - x): x and y are in [0, m], and x + y wrapped past
  # int32 for m > 2**30 (two sizes of 2**31 - 1 summed to -2).
  ends = jax.lax.associative_scan(lambda x, y: x + jnp.minimum(y, m - x), g)
  return jnp.diff(ends, prepend=jnp.zeros((1,), jnp.int32))


def group_of_rows(sizes, m):
  """Each of ``m`` rows' group under sanitized ``sizes`` (``G`` for rows past the last group):
  how many groups end at or before the row. (Not ``jnp.searchsorted``: it fails inside a
  shard_map over some of the mesh's axes, jax 0.10.)"""
  ends = jax.lax.cumsum(sizes)  # (not jnp.cumsum: see _primitive.register_lowerings)
  rows = jnp.arange(m, dtype=ends.dtype)
  return jnp.sum(rows[:, None] >= ends[None, :], axis=1, dtype=ends.dtype)


def m_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, group_sizes, *, out_dtype=jnp.bfloat16):
  """For each expert g: ``D[rows of g] = A[rows of g] · B[g]ᵀ`` (a drop-in for ``ragged_dot``).

  Args:
    a: e4m3 ``[M, K]`` sorted by expert, ``sa`` float32 ``[M, ceil(K/128)]``.
    b: e4m3 ``[G, N, K]``, ``sb`` float32 ``[G, ceil(N/128), ceil(K/128)]``.
    group_sizes: int32 ``[G]`` device array; zeros (empty experts) and sizes that are not
      multiples of 128 are fine. Rows past ``sum(group_sizes)`` come out zero.
    out_dtype: ``bfloat16`` (default) or ``float32``.
  """
  a, sa, b, sb = _checks.arrays(OP, "a sa b sb", a, sa, b, sb)
  group_sizes = _checks.sizes_array(OP, "group_sizes", group_sizes)
  out_dtype = _checks.out_dtype(OP, out_dtype)
  if b.ndim == 3:
    _checks.group_sizes(OP, "group_sizes", group_sizes, b.shape[0])
  # Other integer types are clipped before they narrow to int32 (huge sizes must not wrap).
  # int32 goes as it is: the kernel clips the sizes and their running sum to [0, M] itself
  # (and the reference lowering does), so no scan kernels run ahead of the GEMM. (Otherwise
  # the primitive's checks say what is wrong: clipping needs integer sizes.)
  if (a.ndim == 2 and group_sizes.ndim == 1 and jnp.issubdtype(group_sizes.dtype, jnp.integer)
      and group_sizes.dtype != jnp.int32):
    group_sizes = clip_rows(group_sizes, a.shape[0])
  return m_grouped_contiguous_p.bind(a, sa, b, sb, group_sizes, out_dtype=out_dtype)
