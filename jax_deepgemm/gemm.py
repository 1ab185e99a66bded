"""``fp8_gemm_nt``: the dense FP8 GEMM ``D = A·Bᵀ (+ bias) (+ C)``.

Layouts (all row-major, as JAX keeps them):
  a    e4m3 ``[M, K]``    sa  float32 ``[M, ceil(K/128)]``            (1x128 groups)
  b    e4m3 ``[N, K]``    sb  float32 ``[ceil(N/128), ceil(K/128)]``  (128x128 blocks)
  bias ``[N]`` (bf16 or f32), c float32 ``[M, N]`` → D ``[M, N]`` in ``out_dtype``.
Any M, N, K ≥ 1. On Hopper the kernel needs K % 16 == 0 (TMA row pitch); other K are
zero-padded inside the op. The MN-major scale layout the kernel reads is made here too
(``a_scales_operand``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.core import ShapedArray

from jax_deepgemm import _checks, _ffi, _primitive
from jax_deepgemm.quant import dequantize_per_block, dequantize_per_token

OP = "fp8_gemm_nt"
_HI = jax.lax.Precision.HIGHEST


def _split(args, has_bias, has_c):
  a, sa, b, sb, *rest = args
  bias = rest.pop(0) if has_bias else None
  c = rest.pop(0) if has_c else None
  return a, sa, b, sb, bias, c


def _abstract_eval(*args, out_dtype, has_bias, has_c):
  a, sa, b, sb, bias, c = _split(args, has_bias, has_c)
  _checks.fp8(OP, "a", a)
  _checks.fp8(OP, "b", b)
  _checks.ndim(OP, "a", a, 2, "[M, K]")
  _checks.ndim(OP, "b", b, 2, "[N, K]")
  (m, k), (n, kb) = a.shape, b.shape
  if k != kb:
    raise ValueError(f"{OP}: a is [M, K] = {a.shape} and b is [N, K] = {b.shape}: K differs")
  _checks.token_scales(OP, "sa", sa, m, k)
  _checks.block_scales(OP, "sb", sb, (), n, k)
  if bias is not None:
    _checks.dtype(OP, "bias", bias, jnp.float32, jnp.bfloat16)
    _checks.shape(OP, "bias", bias, (n,))
  if c is not None:
    _checks.dtype(OP, "c", c, jnp.float32)
    _checks.shape(OP, "c", c, (m, n))
  return ShapedArray((m, n), out_dtype)


def _reference(*args, out_dtype, has_bias, has_c):
  a, sa, b, sb, bias, c = _split(args, has_bias, has_c)
  d = jnp.dot(dequantize_per_token(a, sa), dequantize_per_block(b, sb).T,
              precision=_HI, preferred_element_type=jnp.float32)
  if bias is not None:
    # (Broadcast explicitly: under jax_numpy_rank_promotion='raise' [M, N] + [N] is an error.)
    d = d + bias.astype(jnp.float32)[None, :]
  if c is not None:
    d = d + c
  return d.astype(out_dtype)


def _round_up(x, m):
  return -(-x // m) * m


def a_scales_operand(sa):
  """``sa [M, KB]`` as the kernels read it, and its ``input_layouts`` entry (None: row-major).

  The kernels load A's scales with TMA, MN-major: ``[KB, MP]``, M padded to 4 (16-byte rows).
  With ``_ffi.mn_major_scales()`` and M % 4 == 0 that is ``sa`` itself in column-major layout,
  declared as the operand's layout: XLA hands over a per-token cast's MN-major scales as they
  are and transposes any others itself. Otherwise: an explicit padded transpose.
  """
  m = sa.shape[0]
  if m % 4 == 0 and _ffi.mn_major_scales():
    return sa, (1, 0)
  return jnp.pad(sa.T, ((0, 0), (0, _round_up(m, 4) - m))), None


def _cuda(*args, out_dtype, has_bias, has_c):
  a, sa, b, sb, bias, c = _split(args, has_bias, has_c)
  (m, k), n = a.shape, b.shape[0]
  if m == 0 or n == 0 or k == 0:
    return _reference(*args, out_dtype=out_dtype, has_bias=has_bias, has_c=has_c)
  _ffi.check_gemm_config(OP, m, n, k, accumulate=has_c, f32_out=out_dtype == jnp.float32)
  if k % 16:  # TMA needs 16-byte row pitches; zeros add nothing to the products.
    a = jnp.pad(a, ((0, 0), (0, _round_up(k, 16) - k)))
    b = jnp.pad(b, ((0, 0), (0, _round_up(k, 16) - k)))
  sa_op, sa_layout = a_scales_operand(sa)
  empty = jnp.zeros((0,), jnp.float32)
  bias = empty if bias is None else bias.astype(jnp.float32)
  call = jax.ffi.ffi_call(
      "jax_deepgemm_fp8_gemm_nt", jax.ShapeDtypeStruct((m, n), out_dtype),
      input_layouts=(None, sa_layout, None, None, None, None),
      input_output_aliases={5: 0} if c is not None else None)
  return call(a, sa_op, b, sb, bias, empty if c is None else c)


def _batching_rule(args, dims, *, out_dtype, has_bias, has_c):
  a, sa, b, sb, bias, c = _split(args, has_bias, has_c)
  da, dsa, db, dsb, dbias, dc = _split(dims, has_bias, has_c)
  size = _primitive.batch_size(args, dims)
  if db is None and dsb is None and dbias is None:
    # Only activations batched: fold the batch into M, one bigger GEMM (a's order of the
    # two for every operand, so their rows stay matched).
    a3 = _primitive.at_front(a, da, size)
    order = _primitive.split_first(a3, 2)
    fold = lambda x, d: _primitive.fold(_primitive.at_front(x, d, size), order)
    a2, sa2 = _primitive.fold(a3, order), fold(sa, dsa)
    c2 = None if c is None else fold(c, dc)
    out = fp8_gemm_nt(a2, sa2, b, sb, bias=bias, c=c2, out_dtype=out_dtype)
    return _primitive.unfold_like(out, a3, order), 0
  if not has_bias and not has_c:
    # Batched weights: one M-grouped GEMM with a group per batch element, in chunks of
    # as many groups as the kernel's group table holds.
    from jax_deepgemm.grouped_contiguous import (MAX_KERNEL_GROUPS,
                                                 m_grouped_fp8_gemm_nt_contiguous)
    if not _primitive.known(size):
      # A symbolic batch (shape-polymorphic export) may exceed the group table: a loop.
      return _primitive.map_rule(fp8_gemm_nt_p)(args, dims, out_dtype=out_dtype,
                                                has_bias=has_bias, has_c=has_c)
    if size > MAX_KERNEL_GROUPS:
      return _primitive.map_rule(fp8_gemm_nt_p, batch_size=MAX_KERNEL_GROUPS)(
          args, dims, out_dtype=out_dtype, has_bias=has_bias, has_c=has_c)
    a3, sa3, b3, sb3 = (_primitive.at_front(x, d, size) for x, d in zip(args, dims))
    # (Rows in batch order, a group each: a split M after an unsplit batch is gathered.)
    a3i, sa3i = _primitive.in_order(a3, 2), _primitive.in_order(sa3, 2)
    out = m_grouped_fp8_gemm_nt_contiguous(
        _primitive.fold(a3i), _primitive.fold(sa3i), b3, sb3,
        jnp.full((size,), a3.shape[1], jnp.int32),
        out_dtype=out_dtype)
    return _primitive.keep_types(_primitive.unfold_like(out, a3i), a3), 0
  return _primitive.map_rule(fp8_gemm_nt_p)(args, dims, out_dtype=out_dtype,
                                            has_bias=has_bias, has_c=has_c)


fp8_gemm_nt_p = _primitive.define(
    "jax_deepgemm_fp8_gemm_nt", abstract_eval=_abstract_eval, reference=_reference,
    cuda=_cuda, batching_rule=_batching_rule)


def fp8_gemm_nt(a, sa, b, sb, *, bias=None, c=None, out_dtype=None):
  """FP8 GEMM ``D = A·Bᵀ (+ bias) (+ C)`` with DeepSeek-V3 fine-grained scales.

  Args:
    a: e4m3 ``[M, K]``, with ``sa`` float32 ``[M, ceil(K/128)]`` from ``per_token_cast_to_fp8``.
    b: e4m3 ``[N, K]``, with ``sb`` float32 ``[ceil(N/128), ceil(K/128)]`` from ``per_block_cast_to_fp8``.
    bias: optional ``[N]`` (bf16 or float32), added to every row in FP32.
    c: optional float32 ``[M, N]``: ``D = C + A·Bᵀ`` in FP32 (the dense weight-gradient
      form; on GPU ``c``'s buffer is reused for ``D`` when XLA can donate it).
    out_dtype: ``bfloat16`` (default) or ``float32`` (default and required when ``c`` is given).
  Returns:
    ``D [M, N]``.
  """
  if c is not None:
    out_dtype = _checks.accumulating_out_dtype(OP, out_dtype)
  out_dtype = _checks.out_dtype(OP, out_dtype)
  args = list(_checks.arrays(OP, "a sa b sb", a, sa, b, sb))
  args += [_checks.array(OP, name, x) for name, x in (("bias", bias), ("c", c)) if x is not None]
  return fp8_gemm_nt_p.bind(*args, out_dtype=out_dtype,
                            has_bias=bias is not None, has_c=c is not None)
