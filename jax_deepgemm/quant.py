"""FP8 (e4m3) quantization with DeepSeek-V3's fine-grained scales, in plain JAX.

Activations get one scale per 1x128 group along an axis (``per_token_cast_to_fp8``),
weights one scale per 128x128 block (``per_block_cast_to_fp8``). Scales are float32
``amax / 448`` (optionally rounded up to a power of two, UE8M0-style), so that
``dequantize(x_fp8, scale) ≈ x`` elementwise.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = 128
# Groups whose amax is below this get this floor, so all-zero groups don't divide by zero.
AMAX_FLOOR = 1e-4


def ceil_div(a: int, b: int) -> int:
  return -(-a // b)


def _check_float(name, x):
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == FP8_DTYPE:
    raise TypeError(f"{name}: expected a bf16/f16/f32 array, got {x.dtype}")
  return x


def _scale_from_amax(amax, use_ue8m0):
  scale = jnp.maximum(amax, AMAX_FLOOR) / FP8_MAX
  if use_ue8m0:
    # Power-of-two scales (what UE8M0 hardware scales can represent), rounded up so
    # the quantized values never overflow 448. Done on the bits: GPU exp2/log2 are inexact.
    bits = jax.lax.bitcast_convert_type(scale, jnp.uint32)
    exp = bits & jnp.uint32(0x7F800000)
    bits = jnp.where((bits & jnp.uint32(0x007FFFFF)) != 0, exp + jnp.uint32(0x00800000), exp)
    scale = jax.lax.bitcast_convert_type(bits, jnp.float32)
  return scale


def per_token_cast_to_fp8(x, *, axis: int = -1, use_ue8m0: bool = False):
  """Quantizes ``x`` to e4m3 with one float32 scale per 128 consecutive elements of ``axis``.

  With the default ``axis=-1`` this is the 1x128 per-token-group cast of activations
  ``[..., K]`` → ``(x_fp8 [..., K], scale [..., ceil(K/128)])``. With ``axis=0`` on
  ``[T, N]`` it quantizes along the token axis (128x1 groups), the layout the weight
  gradient GEMM wants: ``scale [ceil(T/128), N]``. A ragged last group is allowed.
  """
  x = _check_float("per_token_cast_to_fp8", x)
  if x.ndim == 0:
    raise ValueError("per_token_cast_to_fp8: expected an array with at least one axis")
  if not -x.ndim <= axis < x.ndim:
    raise ValueError(f"per_token_cast_to_fp8: axis {axis} is out of range for shape {x.shape}")
  axis = axis % x.ndim
  xm = jnp.moveaxis(x, axis, -1).astype(jnp.float32)
  n = xm.shape[-1]
  groups = ceil_div(n, BLOCK)
  pad = groups * BLOCK - n
  xp = jnp.pad(xm, [(0, 0)] * (xm.ndim - 1) + [(0, pad)])
  xg = xp.reshape(xm.shape[:-1] + (groups, BLOCK))
  scale = _scale_from_amax(jnp.max(jnp.abs(xg), axis=-1), use_ue8m0)
  q = (xg / scale[..., None]).astype(FP8_DTYPE).reshape(xp.shape)[..., :n]
  return jnp.moveaxis(q, -1, axis), jnp.moveaxis(scale, -1, axis)


def per_block_cast_to_fp8(w, *, use_ue8m0: bool = False):
  """Quantizes ``w [..., N, K]`` to e4m3 with one float32 scale per 128x128 block.

  Returns ``(w_fp8 [..., N, K], scale [..., ceil(N/128), ceil(K/128)])``. Leading axes
  (e.g. experts ``[G, N, K]``) are kept. Because blocks are square, the scales of
  ``w.T`` are exactly ``scale.T``: the backward pass reuses them.
  """
  w = _check_float("per_block_cast_to_fp8", w)
  if w.ndim < 2:
    raise ValueError(f"per_block_cast_to_fp8: expected [..., N, K], got shape {w.shape}")
  *lead, n, k = w.shape
  nb, kb = ceil_div(n, BLOCK), ceil_div(k, BLOCK)
  wp = jnp.pad(w.astype(jnp.float32),
               [(0, 0)] * len(lead) + [(0, nb * BLOCK - n), (0, kb * BLOCK - k)])
  wb = wp.reshape(*lead, nb, BLOCK, kb, BLOCK)
  scale = _scale_from_amax(jnp.max(jnp.abs(wb), axis=(-3, -1)), use_ue8m0)
  q = (wb / scale[..., :, None, :, None]).astype(FP8_DTYPE)
  return q.reshape(wp.shape)[..., :n, :k], scale


def dequantize_per_token(x_fp8, scale, *, axis: int = -1):
  """Inverse of ``per_token_cast_to_fp8`` (float32 result)."""
  if not -x_fp8.ndim <= axis < x_fp8.ndim:
    raise ValueError(f"dequantize_per_token: axis {axis} is out of range for shape {x_fp8.shape}")
  axis = axis % x_fp8.ndim
  n = x_fp8.shape[axis]
  s = jnp.repeat(scale, BLOCK, axis=axis, total_repeat_length=scale.shape[axis] * BLOCK)
  s = jax.lax.slice_in_dim(s, 0, n, axis=axis)
  return x_fp8.astype(jnp.float32) * s


def dequantize_per_block(w_fp8, scale):
  """Inverse of ``per_block_cast_to_fp8`` (float32 result)."""
  n, k = w_fp8.shape[-2:]
  s = jnp.repeat(jnp.repeat(scale, BLOCK, axis=-2), BLOCK, axis=-1)[..., :n, :k]
  return w_fp8.astype(jnp.float32) * s
