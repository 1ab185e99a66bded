"""``m_grouped_fp8_gemm_nt_masked``: the MoE decode GEMM over a fixed ``[G, M_max]`` layout.

Layouts: a e4m3 ``[G, M_max, K]``, sa float32 ``[G, M_max, ceil(K/128)]``; b e4m3
``[G, N, K]``, sb float32 ``[G, ceil(N/128), ceil(K/128)]``; masked_m int32 ``[G]`` on
device → D ``[G, M_max, N]``. Only rows ``< masked_m[g]`` of group g are computed; the
rest come out zero, or as they are in ``out`` when one is given (its buffer is written in
place, as DeepGEMM's kernel writes the caller's). ``expected_m`` (static) only steers the
kernel config.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.core import ShapedArray

from jax_deepgemm import _checks, _primitive
from jax_deepgemm import grouped_contiguous
from jax_deepgemm.grouped_contiguous import clip_rows, grouped_kernel_call
from jax_deepgemm.quant import dequantize_per_block, dequantize_per_token

OP = "m_grouped_fp8_gemm_nt_masked"


def _abstract_eval(*args, expected_m, out_dtype, has_out, lead):
  # `lead` leading dimensions (vmap's batches, each one G more groups) come first on every
  # operand; the public function checked each batch element's shapes already.
  shape = args[0].shape[:lead]
  for name, x in zip(("a", "sa", "b", "sb", "masked_m", "out"), args):
    if x.ndim < lead or x.shape[:lead] != shape:
      raise ValueError(f"{OP}: batched operands disagree on their leading dimensions: a's "
                       f"{shape}, {name}'s {x.shape[:lead]}")
  d = _check(*(ShapedArray(x.shape[lead:], x.dtype) for x in args), out_dtype=out_dtype,
             has_out=has_out)
  return ShapedArray(shape + d.shape, d.dtype)


def _check(a, sa, b, sb, masked_m, *out, out_dtype, has_out):
  _checks.fp8(OP, "a", a)
  _checks.fp8(OP, "b", b)
  _checks.ndim(OP, "a", a, 3, "[G, M_max, K]")
  _checks.ndim(OP, "b", b, 3, "[G, N, K]")
  (g, m, k), (gb, n, kb) = a.shape, b.shape
  if (g, k) != (gb, kb):
    raise ValueError(f"{OP}: a is [G, M_max, K] = {a.shape} and b is [G, N, K] = {b.shape}: "
                     "G or K differs")
  _checks.dtype(OP, "sa", sa, jnp.float32)
  _checks.shape(OP, "sa", sa, (g, m, -(-k // 128)), "one float32 scale per 1x128 group")
  _checks.block_scales(OP, "sb", sb, (g,), n, k)
  _checks.group_sizes(OP, "masked_m", masked_m, g)
  if has_out:
    _checks.dtype(OP, "out", out[0], out_dtype)
    _checks.shape(OP, "out", out[0], (g, m, n), "[G, M_max, N]")
  return ShapedArray((g, m, n), out_dtype)


def _folding(fn):
  """``fn`` of the unbatched operands (``lead`` 0) applied to batched ones: the leading
  dimensions fold into G, on the device's own shards (so no sharding ever has to follow a
  reshape), and unfold in the result."""
  def folded(*args, lead, **params):
    if not lead:
      return fn(*args, **params)
    shape = args[0].shape[:lead]
    # (Sizes spelled out: a -1 cannot be inferred when an operand is empty.)
    flat = [x.reshape((math.prod(x.shape[:lead + 1]),) + x.shape[lead + 1:]) for x in args]
    d = fn(*flat, **params)
    return d.reshape(shape + (args[0].shape[lead],) + d.shape[1:])
  return folded


def _reference_one(a, sa, b, sb, masked_m, *out, expected_m, out_dtype, has_out):
  d = jnp.einsum("gmk,gnk->gmn", dequantize_per_token(a, sa), dequantize_per_block(b, sb),
                 precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
  return keep_rows_past(d.astype(out_dtype), masked_m, out[0] if has_out else None)


def keep_rows_past(d, masked_m, out):
  """``d [..., G, M_max, N]`` with rows ``>= masked_m[..., g]`` from ``out`` (zeros if None)."""
  # Same-rank operands: no rank promotion, so jax_numpy_rank_promotion='raise' holds.
  rows = jnp.arange(d.shape[-2], dtype=jnp.int32).reshape((1,) * (d.ndim - 2) + (-1, 1))
  past = jnp.zeros((), d.dtype) if out is None else out
  return jnp.where(rows < masked_m.astype(jnp.int32)[..., None, None], d, past)


def _batching_rule(args, dims, *, lead, **params):
  if dims[2] is None or dims[3] is None:
    # Shared weights: folding would copy them per batch element; loop instead.
    return _primitive.map_rule(masked_p)(args, dims, lead=lead, **params)
  # Every batch element is G more groups: the batch becomes one more leading dimension, which
  # the kernel's lowering folds into G on each device (sharded over any mesh axes or none), in
  # chunks of as many groups as the kernel's group table holds.
  size = _primitive.batch_size(args, dims)
  # b: [*lead, G, N, K] plus the batch axis: the groups one call folds, without the batch
  core = [n for i, n in enumerate(args[2].shape) if i != dims[2]][:lead + 1]
  groups = math.prod(core) if all(map(_primitive.known, core)) else None
  limit = grouped_contiguous.MAX_KERNEL_GROUPS
  if not (_primitive.known(size) and groups is not None):
    # Symbolic (shape-polymorphic export): the folded groups may exceed the table; a loop.
    return _primitive.map_rule(masked_p)(args, dims, lead=lead, **params)
  if size * groups > limit and size > 1:
    return _primitive.map_rule(masked_p, batch_size=max(1, limit // groups))(
        args, dims, lead=lead, **params)
  xs = [_primitive.at_front(x, d, size) for x, d in zip(args, dims)]
  return masked_p.bind(*xs, lead=lead + 1, **params), 0


def _cuda_one(a, sa, b, sb, masked_m, *out, expected_m, out_dtype, has_out):
  (g, m, k), n = a.shape, b.shape[1]
  if g == 0 or m == 0 or n == 0 or k == 0:
    return _reference_one(a, sa, b, sb, masked_m, *out, expected_m=expected_m,
                          out_dtype=out_dtype, has_out=has_out)
  if not _primitive.known(m):
    # (The kernel takes the rows per group as a compile-time attribute.)
    raise ValueError(f"{OP}: the Hopper kernel needs M_max (a's second dimension) as a "
                     f"number, got the symbolic {m}; export with a concrete M_max")
  # The same kernel as the contiguous layout, with group g at rows [g*M_max, ...).
  d = grouped_kernel_call(a.reshape(g * m, k), sa.reshape(g * m, -1), b, sb, masked_m,
                          masked_stride=m, expected_m=expected_m, out_dtype=out_dtype,
                          into=out[0].reshape(g * m, n) if has_out else None)
  return d.reshape(g, m, n)


_reference = _folding(_reference_one)
_cuda = _folding(_cuda_one)


masked_p = _primitive.define(
    "jax_deepgemm_m_grouped_fp8_gemm_nt_masked", abstract_eval=_abstract_eval,
    reference=_reference, cuda=_cuda,
    batching_rule=_batching_rule)


def m_grouped_fp8_gemm_nt_masked(a, sa, b, sb, masked_m, *, expected_m=None, out_dtype=None,
                                 out=None):
  """For each group g: ``D[g, :masked_m[g]] = A[g, :masked_m[g]] · B[g]ᵀ``; other rows zero,
  or ``out``'s.

  Args:
    a: e4m3 ``[G, M_max, K]``, ``sa`` float32 ``[G, M_max, ceil(K/128)]``.
    b: e4m3 ``[G, N, K]``, ``sb`` float32 ``[G, ceil(N/128), ceil(K/128)]``.
    masked_m: int32 ``[G]`` device array, valid rows per group (clipped to ``[0, M_max]``).
    expected_m: static int, the typical ``masked_m`` (a config hint); default ``M_max``,
      and larger values count as ``M_max``.
    out_dtype: ``bfloat16`` (default) or ``float32``; ``out``'s dtype when ``out`` is given.
    out: optional ``[G, M_max, N]`` of ``out_dtype``: rows ``>= masked_m[g]`` come from it
      instead of being zeroed, and on GPU the result takes its buffer and writes only the
      valid rows (DeepGEMM's semantics). That saves writing ``G·M_max·N`` elements, and pays
      where XLA can hand the buffer over: donated to ``jit`` (``donate_argnums``), or an
      intermediate of the computation that nothing reads afterwards (else XLA copies it).
  """
  a, sa, b, sb = _checks.arrays(OP, "a sa b sb", a, sa, b, sb)
  masked_m = _checks.sizes_array(OP, "masked_m", masked_m)
  if out is not None:
    out = _checks.array(OP, "out", out)
    if out_dtype is None:  # out's dtype, which must be one the kernel writes
      _checks.dtype(OP, "out", out, *_checks.OUT_DTYPES)
      out_dtype = out.dtype
  out_dtype = _checks.out_dtype(OP, out_dtype)
  if expected_m is not None:
    expected_m = _checks.concrete_int(OP, "expected_m", expected_m)  # a Python int in the params
  if a.ndim == 3:
    expected_m = a.shape[1] if expected_m is None else expected_m
    # Other integer types are clipped before they narrow to int32 (huge sizes must not wrap).
    # int32 goes as it is: the kernel and the reference clip it, so no clamp kernel runs
    # ahead of the GEMM (1.2 us on an H100: 2-10% of a decode step's masked GEMM).
    if jnp.issubdtype(masked_m.dtype, jnp.integer) and masked_m.dtype != jnp.int32:
      masked_m = clip_rows(masked_m, a.shape[1])
  extra = () if out is None else (out,)
  return masked_p.bind(a, sa, b, sb, masked_m, *extra, expected_m=expected_m,
                       out_dtype=out_dtype, has_out=out is not None, lead=0)
