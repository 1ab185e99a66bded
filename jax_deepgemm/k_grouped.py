"""``k_grouped_fp8_gemm_tn_contiguous``: the MoE weight-gradient GEMM, contracting over tokens.

Layouts: a e4m3 ``[T, N]``, sa float32 ``[ceil(T/128), N]``; b e4m3 ``[T, K]``, sb float32
``[ceil(T/128), K]`` (both quantized along the token axis: ``per_token_cast_to_fp8(x, axis=0)``);
group_sizes int32 ``[G]`` on device; optional c float32 ``[G, N, K]`` → D float32 (or, without
c, bf16) ``[G, N, K]`` with ``D[g] = (c[g] +) A_gᵀ·B_g`` over the tokens of group g. Empty groups
give zeros (or c).
Group sizes follow ``m_grouped_fp8_gemm_nt_contiguous``'s rules (clipped to T).
With ``token_major=True`` a and b come token-major, ``[N, T]`` and ``[K, T]`` (what
``per_token_cast_transpose_to_fp8`` writes, and what the Hopper kernel reads); scales unchanged.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.core import ShapedArray

from jax_deepgemm import _checks, _ffi, _primitive, _tiled_groups
from jax_deepgemm.grouped_contiguous import (MAX_KERNEL_GROUPS, group_of_rows,
                                             sanitize_group_sizes)
from jax_deepgemm.quant import ceil_div, dequantize_per_token

OP = "k_grouped_fp8_gemm_tn_contiguous"


def _abstract_eval(a, sa, b, sb, group_sizes, *c, has_c, token_major, out_dtype):
  _checks.fp8(OP, "a", a)
  _checks.fp8(OP, "b", b)
  la, lb = ("[N, T]", "[K, T]") if token_major else ("[T, N]", "[T, K]")
  _checks.ndim(OP, "a", a, 2, la)
  _checks.ndim(OP, "b", b, 2, lb)
  (t, n), (tb, k) = (a.shape[::-1], b.shape[::-1]) if token_major else (a.shape, b.shape)
  if t != tb:
    raise ValueError(f"{OP}: a is {la} = {a.shape} and b is {lb} = {b.shape}: T differs")
  for name, s, cols in (("sa", sa, n), ("sb", sb, k)):
    _checks.dtype(OP, name, s, jnp.float32)
    _checks.shape(OP, name, s, (ceil_div(t, 128), cols),
                  "one float32 scale per 128 tokens and column: per_token_cast_to_fp8(x, axis=0)")
  if group_sizes.ndim != 1:
    raise ValueError(f"{OP}: group_sizes must be 1-D [G], got shape {group_sizes.shape}")
  _checks.group_sizes(OP, "group_sizes", group_sizes, group_sizes.shape[0])
  g = group_sizes.shape[0]
  if has_c:
    _checks.dtype(OP, "c", c[0], jnp.float32)
    _checks.shape(OP, "c", c[0], (g, n, k))
  return ShapedArray((g, n, k), out_dtype)


def _reference(a, sa, b, sb, group_sizes, *c, has_c, token_major, out_dtype):
  if token_major:
    a, b = a.T, b.T
  x, y = dequantize_per_token(a, sa, axis=0), dequantize_per_token(b, sb, axis=0)
  # Per group, its tokens selected (the others zeroed by selection, so a NaN token of one
  # group stays out of the others) and contracted; a scan over groups, not ragged_dot_general,
  # which infers no types on Explicit mesh axes (inside a shard_map over some axes of one).
  # Both operands are selected, as the kernel masks both: zeroing x's rows alone still let a
  # NaN or inf in y's rows of one group into every other group (0 * NaN).
  # The sizes come sanitized (int32, clipped, summing to T at most), as group_of_rows needs:
  # the public op sanitizes them before binding, and the sharded op's per-device windows are
  # so by construction.
  token_group = group_of_rows(group_sizes, a.shape[0])
  if _tiled_groups.worth_tiling(a.shape[0], group_sizes.shape[0]):
    d = _tiled_groups.k_grouped_product(x, y, group_sizes, token_group)
    return (d + c[0] if has_c else d).astype(out_dtype)

  def one_group(_, g):
    mine = (token_group == g)[:, None]
    x_g, y_g = jnp.where(mine, x, 0.0), jnp.where(mine, y, 0.0)
    return None, jnp.dot(x_g.T, y_g, precision=jax.lax.Precision.HIGHEST,
                         preferred_element_type=jnp.float32)

  _, d = jax.lax.scan(one_group, None,
                      jnp.arange(group_sizes.shape[0], dtype=token_group.dtype))
  d = d.reshape(group_sizes.shape[0], a.shape[1], b.shape[1])  # [G, N, K], also for G = 0
  return (d + c[0] if has_c else d).astype(out_dtype)


def _cuda(a, sa, b, sb, group_sizes, *c, has_c, token_major, out_dtype):
  if not token_major:
    a, b = a.T, b.T
  (n, t), k, g = a.shape, b.shape[0], group_sizes.shape[0]
  if t == 0 or n == 0 or k == 0 or g == 0:
    return _reference(a, sa, b, sb, group_sizes, *c, has_c=has_c, token_major=True,
                      out_dtype=out_dtype)
  if g > MAX_KERNEL_GROUPS:
    raise ValueError(f"{OP}: the Hopper kernel supports at most {MAX_KERNEL_GROUPS} groups, "
                     f"got {g}")
  _ffi.check_k_grouped_config(OP, g, n, k)
  # The kernel wants both operands token-major (FP8 wgmma reads K-major only), T padded
  # to 16 (TMA row pitch; zero tokens belong to no group), scale rows padded to 4.
  tp = -(-t // 16) * 16
  a_t = jnp.pad(a, ((0, 0), (0, tp - t)))
  b_t = jnp.pad(b, ((0, 0), (0, tp - t)))
  sa = jnp.pad(sa, ((0, 0), (0, -(-n // 4) * 4 - n)))
  sb = jnp.pad(sb, ((0, 0), (0, -(-k // 4) * 4 - k)))
  call = jax.ffi.ffi_call("jax_deepgemm_k_grouped_fp8_gemm_tn",
                          jax.ShapeDtypeStruct((g, n, k), out_dtype),
                          input_output_aliases={5: 0} if has_c else None)
  extra = c[0] if has_c else jnp.zeros((0,), jnp.float32)
  return call(a_t, sa, b_t, sb, group_sizes.astype(jnp.int32), extra)


k_grouped_p = _primitive.define(
    "jax_deepgemm_k_grouped_fp8_gemm_tn_contiguous", abstract_eval=_abstract_eval,
    reference=_reference, cuda=_cuda,
    batching_rule=lambda args, dims, **p: _primitive.map_rule(k_grouped_p)(args, dims, **p))


def k_grouped_fp8_gemm_tn_contiguous(a, sa, b, sb, group_sizes, *, c=None,
                                     token_major: bool = False, out_dtype=jnp.float32):
  """For each group g: ``D[g] = (c[g] +) A_gᵀ·B_g``, contracting over the group's tokens.

  Args:
    a: e4m3 ``[T, N]`` and ``sa`` float32 ``[ceil(T/128), N]``, quantized along tokens.
    b: e4m3 ``[T, K]`` and ``sb`` float32 ``[ceil(T/128), K]``, quantized along tokens.
    group_sizes: int32 ``[G]`` device array (tokens per group, in order; zeros allowed).
    c: optional float32 ``[G, N, K]`` to accumulate into.
    token_major: a and b are given as ``[N, T]`` and ``[K, T]`` (e.g. from
      ``per_token_cast_transpose_to_fp8``): on Hopper this saves transposing them.
    out_dtype: float32 (default) or bfloat16 (without c): the kernel rounds its fp32
      accumulator once as it stores, e.g. for a bf16 weight gradient.
  Returns:
    ``[G, N, K]`` in ``out_dtype``.
  """
  out_dtype = _checks.out_dtype(OP, out_dtype, default=jnp.float32)
  if c is not None:
    out_dtype = _checks.accumulating_out_dtype(OP, out_dtype)
  token_major = _checks.static_bool(OP, "token_major", token_major)
  a, sa, b, sb = _checks.arrays(OP, "a sa b sb", a, sa, b, sb)
  group_sizes = _checks.sizes_array(OP, "group_sizes", group_sizes)
  # Sanitized here, once, for every lowering: the kernel's int32 operand (other integer types
  # clipped before they narrow) and the reference's group table, which relies on it.
  # (Otherwise the primitive's checks say what is wrong.)
  if a.ndim == 2 and group_sizes.ndim == 1 and jnp.issubdtype(group_sizes.dtype, jnp.integer):
    group_sizes = sanitize_group_sizes(group_sizes, a.shape[1 if token_major else 0], OP)
  extra = () if c is None else (_checks.array(OP, "c", c),)
  return k_grouped_p.bind(a, sa, b, sb, group_sizes, *extra, has_c=c is not None,
                          token_major=token_major, out_dtype=out_dtype)
