"""FP8 (e4m3) quantization with DeepSeek-V3's fine-grained scales.

Activations get one scale per 1x128 group along an axis (``per_token_cast_to_fp8``),
weights one scale per 128x128 block (``per_block_cast_to_fp8``); the backward pass's
token-axis cast can write its e4m3 result transposed (``per_token_cast_transpose_to_fp8``), and
``per_token_cast_to_fp8_and_transpose`` does both activation casts from one read
(``per_block_cast_to_fp8_and_transpose`` both weight casts, plain and transposed).
Scales are float32 ``max(amax, 1e-4) / 448`` (optionally rounded up to a power of two,
UE8M0-style), so that ``dequantize(x_fp8, scale) ≈ x`` elementwise.

The casts are primitives (``quant_kernels.py``): one fused CUDA kernel each on Hopper,
bitwise equal to their pure-JAX reference, which runs everywhere else.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jax_deepgemm import _checks
# The casts are primitives (fused CUDA kernels on Hopper); their pure-JAX reference lives there.
from jax_deepgemm.quant_kernels import (AMAX_FLOOR, BLOCK, FP8_DTYPE, FP8_MAX,  # noqa: F401
                                        ceil_div, dual_cast_p, per_block_cast_p,
                                        per_block_dual_cast_p, per_token_cast_p,
                                        token_axis_cast_p)


def is_wide_float(dtype) -> bool:
  """bf16, f16, f32 or f64 (under jax_enable_x64): the inputs the casts and layers take. 8-bit
  floats (any FP8 flavour) are not: casting them again would silently keep their few mantissa
  bits."""
  return jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize >= 2


def _check_float(name, x, arg="x"):
  x = _checks.array(name, arg, x)
  if not is_wide_float(x.dtype):
    raise TypeError(f"{name}: {arg} must be a bf16, f16, f32 or f64 array, got {x.dtype}")
  return x


def per_token_cast_to_fp8(x, *, axis: int = -1, use_ue8m0: bool = False):
  """Quantizes ``x`` to e4m3 with one float32 scale per 128 consecutive elements of ``axis``.

  With the default ``axis=-1`` this is the 1x128 per-token-group cast of activations
  ``[..., K]`` → ``(x_fp8 [..., K], scale [..., ceil(K/128)])``. With ``axis=0`` on
  ``[T, N]`` it quantizes along the token axis (128x1 groups), the layout the weight
  gradient GEMM wants: ``scale [ceil(T/128), N]``. A ragged last group is allowed.

  ``use_ue8m0=True`` rounds each scale up to a power of two (DeepGEMM's UE8M0 scales).
  """
  x = _check_float("per_token_cast_to_fp8", x)
  if x.ndim == 0:
    raise ValueError("per_token_cast_to_fp8: x must have at least one axis, got shape ()")
  axis = _checks.static_axis("per_token_cast_to_fp8", axis)
  if not -x.ndim <= axis < x.ndim:
    raise ValueError(f"per_token_cast_to_fp8: axis {axis} is out of range for shape {x.shape}")
  axis = axis % x.ndim
  use_ue8m0 = _checks.static_bool("per_token_cast_to_fp8", "use_ue8m0", use_ue8m0)
  if axis == x.ndim - 1:
    q, s = per_token_cast_p.bind(x, use_ue8m0=use_ue8m0)
    return q, s
  # Groups along an inner axis: x as [*pre, T, B] (B = the axes after it, flattened).
  pre, t, post = x.shape[:axis], x.shape[axis], x.shape[axis + 1:]
  s_shape = pre + (ceil_div(t, BLOCK),) + post
  if math.prod(post) == 1:  # nothing but size-1 axes after it: the last-axis cast
    q, s = per_token_cast_p.bind(x.reshape(pre + (t,)), use_ue8m0=use_ue8m0)
  else:
    q, s = token_axis_cast_p.bind(x.reshape(pre + (t, math.prod(post))),
                                  use_ue8m0=use_ue8m0, transpose=False)
  return q.reshape(x.shape), s.reshape(s_shape)


def per_token_cast_transpose_to_fp8(x, *, use_ue8m0: bool = False):
  """The token-axis cast of ``x [..., T, N]`` with ``x_fp8`` written transposed.

  Returns ``(x_fp8 [..., N, T], scale [..., ceil(T/128), N])``: for ``[T, N]`` exactly
  ``(q.T, s)`` where ``q, s = per_token_cast_to_fp8(x, axis=0)``, in one pass over ``x``
  on Hopper: the layout of an NT GEMM operand that contracts over tokens (``[N, T]``,
  tokens contiguous), without a separate transpose of the e4m3 array.

  ``use_ue8m0=True`` rounds each scale up to a power of two (DeepGEMM's UE8M0 scales).
  """
  x = _check_float("per_token_cast_transpose_to_fp8", x)
  if x.ndim < 2:
    raise ValueError(f"per_token_cast_transpose_to_fp8: x must be [..., T, N], got shape {x.shape}")
  q, s = token_axis_cast_p.bind(
      x, use_ue8m0=_checks.static_bool("per_token_cast_transpose_to_fp8", "use_ue8m0", use_ue8m0),
      transpose=True)
  return q, s


def per_token_cast_to_fp8_and_transpose(x, *, use_ue8m0: bool = False):
  """Both casts of activations ``x [..., T, C]`` at once: ``(q, s, qt, st)``.

  ``(q [..., T, C], s [..., T, ceil(C/128)])`` is ``per_token_cast_to_fp8(x)`` and
  ``(qt [..., C, T], st [..., ceil(T/128), C])`` is ``per_token_cast_transpose_to_fp8(x)``,
  bitwise; on Hopper one kernel reads ``x`` once for both (what ``fp8_linear``'s forward
  needs of X and its backward of dY: the GEMM operand and the wgrad operand).

  ``use_ue8m0=True`` rounds each scale up to a power of two (DeepGEMM's UE8M0 scales).
  """
  x = _check_float("per_token_cast_to_fp8_and_transpose", x)
  if x.ndim < 2:
    raise ValueError(f"per_token_cast_to_fp8_and_transpose: x must be [..., T, C], got shape "
                     f"{x.shape}")
  q, s, qt, st = dual_cast_p.bind(x, use_ue8m0=_checks.static_bool(
      "per_token_cast_to_fp8_and_transpose", "use_ue8m0", use_ue8m0))
  return q, s, qt, st


def per_block_cast_to_fp8(w, *, use_ue8m0: bool = False, transpose: bool = False):
  """Quantizes ``w [..., N, K]`` to e4m3 with one float32 scale per 128x128 block.

  Returns ``(w_fp8 [..., N, K], scale [..., ceil(N/128), ceil(K/128)])``. Leading axes
  (e.g. experts ``[G, N, K]``) are kept. Because blocks are square, the scales of
  ``w.T`` are exactly ``scale.T``: the backward pass reuses them.

  ``transpose=True`` returns the cast of ``w``'s transpose instead,
  ``(w_fp8 [..., K, N], scale [..., ceil(K/128), ceil(N/128)])``, bitwise equal to
  ``per_block_cast_to_fp8(jnp.swapaxes(w, -1, -2))`` and, on Hopper, one pass over ``w``:
  a ``[K, N]`` weight becomes the ``[N, K]`` operand of ``fp8_gemm_nt`` without a
  separate transpose.

  ``use_ue8m0=True`` rounds each scale up to a power of two (DeepGEMM's UE8M0 scales).
  """
  w = _check_float("per_block_cast_to_fp8", w, "w")
  if w.ndim < 2:
    raise ValueError(f"per_block_cast_to_fp8: w must be [..., N, K], got shape {w.shape}")
  op = "per_block_cast_to_fp8"
  q, s = per_block_cast_p.bind(w, use_ue8m0=_checks.static_bool(op, "use_ue8m0", use_ue8m0),
                               transpose=_checks.static_bool(op, "transpose", transpose))
  return q, s


def per_block_cast_to_fp8_and_transpose(w, *, use_ue8m0: bool = False):
  """Both 128x128 block casts of ``w [..., N, K]`` at once: ``(q, s, qt, st)``.

  ``(q [..., N, K], s [..., ceil(N/128), ceil(K/128)])`` is ``per_block_cast_to_fp8(w)`` and
  ``(qt [..., K, N], st [..., ceil(K/128), ceil(N/128)])`` is
  ``per_block_cast_to_fp8(w, transpose=True)``, bitwise: the blocks are square, so the cast of
  ``w``'s transpose has the same blocks and scales, transposed. On Hopper one kernel reads ``w``
  once and writes ``q`` and ``qt`` (``st`` is ``s``'s small transpose), where the two casts
  read it twice: ``fp8_linear``'s forward GEMM takes ``qt`` and its backward's dgrad ``q``.

  ``use_ue8m0=True`` rounds each scale up to a power of two (DeepGEMM's UE8M0 scales).
  """
  w = _check_float("per_block_cast_to_fp8_and_transpose", w, "w")
  if w.ndim < 2:
    raise ValueError(f"per_block_cast_to_fp8_and_transpose: w must be [..., N, K], got shape "
                     f"{w.shape}")
  q, qt, s = per_block_dual_cast_p.bind(w, use_ue8m0=_checks.static_bool(
      "per_block_cast_to_fp8_and_transpose", "use_ue8m0", use_ue8m0))
  return q, s, qt, jnp.swapaxes(s, -1, -2)


def dequantize_per_token(x_fp8, scale, *, axis: int = -1):
  """Inverse of ``per_token_cast_to_fp8`` (float32 result): ``x_fp8`` times its scales.

  ``axis`` names the axis the cast grouped (as its ``axis``): ``scale`` has
  ``ceil(x_fp8.shape[axis] / 128)`` entries along it and ``x_fp8``'s shape elsewhere.
  """
  x_fp8, scale = _checks.arrays("dequantize_per_token", "x_fp8 scale", x_fp8, scale)
  _checks.fp8("dequantize_per_token", "x_fp8", x_fp8)
  axis = _checks.static_axis("dequantize_per_token", axis)
  if x_fp8.ndim == 0 or not -x_fp8.ndim <= axis < x_fp8.ndim:
    raise ValueError(f"dequantize_per_token: axis {axis} is out of range for shape {x_fp8.shape}")
  axis = axis % x_fp8.ndim
  n = x_fp8.shape[axis]
  expected = x_fp8.shape[:axis] + (ceil_div(n, BLOCK),) + x_fp8.shape[axis + 1:]
  _checks.dtype("dequantize_per_token", "scale", scale, jnp.float32)
  _checks.shape("dequantize_per_token", "scale", scale, expected,
                f"one scale per {BLOCK} along axis {axis}")
  s = jnp.repeat(scale, BLOCK, axis=axis)  # (see _primitive.register_lowerings)
  s = jax.lax.slice_in_dim(s, 0, n, axis=axis)
  return x_fp8.astype(jnp.float32) * s


def dequantize_per_block(w_fp8, scale):
  """Inverse of ``per_block_cast_to_fp8`` (float32 result)."""
  w_fp8, scale = _checks.arrays("dequantize_per_block", "w_fp8 scale", w_fp8, scale)
  _checks.fp8("dequantize_per_block", "w_fp8", w_fp8)
  if w_fp8.ndim < 2:
    raise ValueError(f"dequantize_per_block: w_fp8 must be [..., N, K], got shape {w_fp8.shape}")
  n, k = w_fp8.shape[-2:]
  _checks.dtype("dequantize_per_block", "scale", scale, jnp.float32)
  _checks.shape("dequantize_per_block", "scale", scale,
                w_fp8.shape[:-2] + (ceil_div(n, BLOCK), ceil_div(k, BLOCK)),
                f"one scale per {BLOCK}x{BLOCK} block")
  s = jnp.repeat(jnp.repeat(scale, BLOCK, axis=-2), BLOCK, axis=-1)[..., :n, :k]
  return w_fp8.astype(jnp.float32) * s
