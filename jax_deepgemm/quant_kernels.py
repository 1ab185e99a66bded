"""The FP8 casts as primitives: fused CUDA kernels on Hopper, plain JAX everywhere else.

Six primitives, three with two outputs ``(q, scale)`` (``quant.py`` is the public API):

====================================  ========================  ==================================
primitive                             x                         q, scale
====================================  ========================  ==================================
``jax_deepgemm_per_token_cast``       ``[..., C]``              ``[..., C]``, ``[..., ceil(C/128)]``
``jax_deepgemm_per_block_cast``       ``[..., N, K]``           ``[..., N, K]``,
                                                                ``[..., ceil(N/128), ceil(K/128)]``
                                                                (both transposed with
                                                                ``transpose``)
``jax_deepgemm_per_block_dual_cast``  ``[..., N, K]``           three: ``q [..., N, K]``, its
                                                                transpose ``qt [..., K, N]`` and
                                                                ``[..., ceil(N/128), ceil(K/128)]``
``jax_deepgemm_token_axis_cast``      ``[..., T, N]``           ``[..., T, N]`` (or ``[..., N, T]``
                                                                with ``transpose``),
                                                                ``[..., ceil(T/128), N]``
``jax_deepgemm_dual_cast``            ``[..., T, C]``           four: per-token ``q [..., T, C]``,
                                                                ``s [..., T, ceil(C/128)]`` and
                                                                token-axis ``qt [..., C, T]``,
                                                                ``st [..., ceil(T/128), C]``
====================================  ========================  ==================================

``jax_deepgemm_gathered_dual_cast(x [..., S, C], rows [..., T], row_scale, keep_rows)`` is the
dual cast of the rows ``rows`` of ``x`` (the MoE's dispatch gather, read in place instead of
written first), each optionally times its f32 ``row_scale [..., T]`` first (the combine's
routing weights, in the backward; ``[..., 0]``: none).

The dual cast's optional second operand, int32 ``keep_rows`` (``x``'s leading axes), casts rows
``t >= keep_rows`` as zeros: ``fp8_grouped_linear``'s rows past its groups, whatever they hold,
then cannot reach the token-axis scales that rows of its last group share with them.

The reference lowering (every platform, and CUDA without our kernels) is the pure-JAX code
below. On Hopper with the extension (``_ffi.use_kernels()``) each op is one kernel that reads
``x`` once and writes ``q`` and the scales once (``csrc/kernels/quant.cuh``); leading axes are
folded into rows / matrices, so a vmapped cast is still one kernel call.

The kernels are bitwise equal to the reference *as XLA compiles it for the GPU*: XLA turns
``amax / 448`` into ``amax * fl(1/448)`` and lowers f32 division to PTX ``div.full.f32``, and
the kernels do the same (see quant.cuh). XLA on CPU additionally rewrites ``x / scale`` into
``x * (1 / scale)``; the kernels can quantize that way too, and which way XLA compiles the
reference on this GPU is probed once per op (``JAX_DEEPGEMM_QUANT_DIVISION=div|recip``
forces one).

By default (``_ffi.mn_major_scales``; ``JAX_DEEPGEMM_MN_MAJOR_SCALES=0`` turns it off) the
per-token casts write their scales MN-major and declare it (``output_layouts``): the same values,
in the bytes the GEMMs read.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import ShapedArray
from jax.extend.core import Primitive
from jax.interpreters import ad, batching
from jax.sharding import ManualAxisType, NamedSharding, PartitionSpec

from jax_deepgemm import _ffi, _primitive

logger = logging.getLogger("jax_deepgemm")

FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = 128
# Groups whose amax is below this get this floor, so all-zero groups don't divide by zero.
AMAX_FLOOR = 1e-4
# Input dtypes the kernels take (others, e.g. float64, use the reference).
KERNEL_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
F32 = jnp.dtype(jnp.float32)


def ceil_div(a: int, b: int) -> int:
  return -(-a // b)


# ----------------------------------------------------------------------------- reference

def _amax(a, axis):
  """max |a| over ``axis``, NaN if any is: XLA's CPU reductions of many elements drop NaNs
  (a NaN in a 128x128 block gave a finite scale), its GPU ones and our kernels do not. The
  NaNs are added in, not selected: a NaN constant got folded into the scale's arithmetic on
  the host (0x7FC00000), where the GPU computes the kernels' canonical NaN (0x7FFFFFFF)."""
  a = jnp.abs(a)
  return jnp.max(a, axis=axis) + jnp.sum(jnp.where(jnp.isnan(a), a, 0.0), axis=axis)


def _scale_from_amax(amax, use_ue8m0):
  scale = jnp.maximum(amax, AMAX_FLOOR) / FP8_MAX
  if use_ue8m0:
    # Power-of-two scales (what UE8M0 hardware scales can represent), rounded up so
    # the quantized values never overflow 448. Done on the bits: GPU exp2/log2 are inexact.
    # NaN and inf stay as they are (rounding NaN's exponent up would carry into the sign: -0.0).
    bits = jax.lax.bitcast_convert_type(scale, jnp.uint32)
    exp = bits & jnp.uint32(0x7F800000)
    up = jnp.where((bits & jnp.uint32(0x007FFFFF)) != 0, exp + jnp.uint32(0x00800000), exp)
    bits = jnp.where(exp == jnp.uint32(0x7F800000), bits, up)
    scale = jax.lax.bitcast_convert_type(bits, jnp.float32)
  return scale


def per_token_cast_reference(x, *, use_ue8m0=False):
  """1x128 groups along the last axis: ``x [..., C]`` → ``(q [..., C], s [..., ceil(C/128)])``."""
  xm = x.astype(jnp.float32)
  n = xm.shape[-1]
  groups = ceil_div(n, BLOCK)
  pad = groups * BLOCK - n
  xp = jnp.pad(xm, [(0, 0)] * (xm.ndim - 1) + [(0, pad)])
  xg = xp.reshape(xm.shape[:-1] + (groups, BLOCK))
  scale = _scale_from_amax(_amax(xg, -1), use_ue8m0)
  q = (xg / scale[..., None]).astype(FP8_DTYPE).reshape(xp.shape)[..., :n]
  return q, scale


def per_block_cast_reference(w, *, use_ue8m0=False, transpose=False):
  """128x128 blocks: ``w [..., N, K]`` → ``(q [..., N, K], s [..., ceil(N/128), ceil(K/128)])``.

  ``transpose``: both outputs transposed on their last two axes (the cast of ``w``'s
  transpose: the blocks are square).
  """
  if transpose:
    q, s = per_block_cast_reference(w, use_ue8m0=use_ue8m0)
    return jnp.swapaxes(q, -1, -2), jnp.swapaxes(s, -1, -2)
  *lead, n, k = w.shape
  nb, kb = ceil_div(n, BLOCK), ceil_div(k, BLOCK)
  wp = jnp.pad(w.astype(jnp.float32),
               [(0, 0)] * len(lead) + [(0, nb * BLOCK - n), (0, kb * BLOCK - k)])
  wb = wp.reshape(*lead, nb, BLOCK, kb, BLOCK)
  scale = _scale_from_amax(_amax(wb, (-3, -1)), use_ue8m0)
  q = (wb / scale[..., :, None, :, None]).astype(FP8_DTYPE)
  return q.reshape(wp.shape)[..., :n, :k], scale


def token_axis_cast_reference(x, *, use_ue8m0=False, transpose=False):
  """128x1 groups along axis -2: ``x [..., T, N]`` → ``(q, s [..., ceil(T/128), N])``.

  ``q`` is ``[..., T, N]``, or its transpose ``[..., N, T]`` when ``transpose``.
  """
  q, s = per_token_cast_reference(jnp.swapaxes(x, -1, -2), use_ue8m0=use_ue8m0)
  return (q if transpose else jnp.swapaxes(q, -1, -2)), jnp.swapaxes(s, -1, -2)


def dual_cast_reference(x, keep_rows=None, *, use_ue8m0=False):
  """Both activation casts of ``x [..., T, C]``: ``(q, s, qt, st)``.

  ``q, s`` is the per-token (1x128 along C) cast, ``qt, st`` the token-axis (128x1 along T)
  cast with ``qt`` transposed, ``[..., C, T]``. Rows ``t >= keep_rows`` (int32, ``x``'s
  leading axes; None: every row) are cast as zeros, whatever they hold.
  """
  if keep_rows is not None:
    rows = jax.lax.broadcasted_iota(jnp.int32, x.shape[:-1] + (1,), x.ndim - 2)
    x = jnp.where(rows < keep_rows[..., None, None], x, jnp.zeros((), x.dtype))
  q, s = per_token_cast_reference(x, use_ue8m0=use_ue8m0)
  qt, st = token_axis_cast_reference(x, use_ue8m0=use_ue8m0, transpose=True)
  return q, s, qt, st


def per_block_dual_cast_reference(w, *, use_ue8m0=False):
  """Both block casts of ``w [..., N, K]``: ``(q [..., N, K], qt [..., K, N], s)``.

  ``q, s`` is the per-block cast, ``qt`` its transpose: the transposed cast's ``q`` (the
  blocks are square; its scales are ``s`` transposed).
  """
  q, s = per_block_cast_reference(w, use_ue8m0=use_ue8m0)
  return q, jnp.swapaxes(q, -1, -2), s


# ----------------------------------------------------------------------------- division probe

DIVISION_ENV = "JAX_DEEPGEMM_QUANT_DIVISION"


def hlo_divides_by_reciprocal(hlo: str, size: int) -> bool:
  """True when a compiled HLO text has no f32 ``divide`` of ``size`` elements.

  For a compiled reference cast of ``size`` elements that means XLA quantized with
  ``x * (1 / scale)``; with such a divide left it divides elementwise, ``x / scale``.
  """
  for m in re.finditer(r"f32\[([0-9,]*)\](?:\{[^}]*\})? divide\(", hlo):
    if math.prod(int(d) for d in m.group(1).split(",") if d) == size:
      return False
  return True


_PROBES = {  # a small, unpadded case of each reference
    "token": (per_token_cast_reference, (8, 256)),
    "block": (per_block_cast_reference, (256, 256)),
    "token_axis": (token_axis_cast_reference, (256, 16)),
}


def division_probe(kind: str, device) -> bool:
  """Whether XLA compiles the ``kind`` reference for ``device`` as ``x * (1 / scale)``."""
  ref, shape = _PROBES[kind]
  arg = jax.ShapeDtypeStruct(shape, jnp.float32,
                             sharding=jax.sharding.SingleDeviceSharding(device))
  hlo = jax.jit(ref).lower(arg).compile().as_text()
  return hlo_divides_by_reciprocal(hlo, math.prod(shape))


@functools.lru_cache(maxsize=None)
def _kernel_recip(kind: str) -> bool:
  """The kernels' ``recip`` flag: quantize the way XLA compiles the reference on the GPU."""
  forced = os.environ.get(DIVISION_ENV, "").strip().lower()
  if forced in ("div", "recip"):
    return forced == "recip"
  if forced not in ("", "auto"):
    raise ValueError(f"{DIVISION_ENV} must be 'div', 'recip' or 'auto', got {forced!r}")
  try:
    return division_probe(kind, jax.local_devices(backend="gpu")[0])
  except Exception as e:  # pylint: disable=broad-except
    logger.warning("jax_deepgemm: could not probe how XLA divides (%s); the quantization "
                   "kernels use x / scale (div.full.f32), XLA's GPU lowering today.", e)
    return False


def warm_up_division_probes() -> None:
  """Runs the division probes now, when the kernels are in use (each compiles a small jit).

  ``sharding.py`` calls this while lowering, so that no probe compiles for the first time
  inside XLA's partitioning callback.
  """
  if _ffi.use_kernels():
    for kind in _PROBES:
      _kernel_recip(kind)


# ----------------------------------------------------------------------------- primitives

def _out_avals(x, *specs):
  """Output avals; inside ``jax.shard_map`` they vary over the manual axes ``x`` varies over."""
  outs = [ShapedArray(shape, dtype) for shape, dtype in specs]
  mat = getattr(x, "manual_axis_type", None)
  if mat is not None and mat.varying:
    outs = [o.update(sharding=NamedSharding(x.sharding.mesh, PartitionSpec()),
                     manual_axis_type=ManualAxisType(varying=mat.varying)) for o in outs]
  return outs


def _define(name, *, abstract_eval, reference, cuda, outputs=2) -> Primitive:
  """A primitive of ``outputs`` results whose operands' leading axes are a batch (``x``, and
  the dual cast's ``keep_rows``, which has only those axes).

  vmap moves the batch axis to the front; differentiation follows the reference (the
  casts were plain JAX and differentiable before they were primitives).
  """
  prim = _primitive.define(name, abstract_eval=abstract_eval, reference=reference, cuda=cuda,
                           multiple_results=True, vma=False)

  def batching_rule(args, dims, **params):
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    args = [_primitive.at_front(a, d, size) for a, d in zip(args, dims)]
    return prim.bind(*args, **params), [0] * outputs

  def jvp_rule(primals, tangents, **params):
    tangents = tuple(ad.instantiate_zeros(t) for t in tangents)
    _, t_out = jax.jvp(functools.partial(reference, **params), tuple(primals), tangents)
    return prim.bind(*primals, **params), list(t_out)

  batching.primitive_batchers[prim] = batching_rule
  ad.primitive_jvps[prim] = jvp_rule
  return prim


def _kernel_ok(x, *offsets) -> bool:
  """Whether the kernel takes ``x``: not empty, a kernel dtype, and every one of ``offsets``
  (the handler's bounds on the kernel's 32-bit element offsets and group counts) below
  INT32_MAX. Past them the handler would fail the run: the reference takes those."""
  if x.size == 0 or jnp.dtype(x.dtype) not in KERNEL_DTYPES:
    return False
  # (Symbolic sizes, under shape-polymorphic export, are left to the handler's own check.)
  return all(not isinstance(v, int) or v < 2**31 - 1 for v in offsets)


def _flags(kind, use_ue8m0):
  return dict(use_ue8m0=np.int32(bool(use_ue8m0)), recip=np.int32(_kernel_recip(kind)))


# --- per-token (1x128 along the last axis)

def _per_token_abstract(x, *, use_ue8m0):
  del use_ue8m0
  return _out_avals(x, (x.shape, FP8_DTYPE),
                    (x.shape[:-1] + (ceil_div(x.shape[-1], BLOCK),), F32))


def _per_token_cuda(x, *, use_ue8m0):
  *lead, c = x.shape
  rows, groups = math.prod(lead), ceil_div(c, BLOCK)
  if not _kernel_ok(x, rows * groups):
    return per_token_cast_reference(x, use_ue8m0=use_ue8m0)
  mn_major = _ffi.mn_major_scales()  # s's bytes [groups, rows], as the GEMMs read them
  call = jax.ffi.ffi_call("jax_deepgemm_per_token_cast",
                          (jax.ShapeDtypeStruct((rows, c), FP8_DTYPE),
                           jax.ShapeDtypeStruct((rows, groups), F32)),
                          output_layouts=(None, (1, 0) if mn_major else None))
  q, s = call(x.reshape(rows, c), s_mn_major=np.int32(mn_major), **_flags("token", use_ue8m0))
  return q.reshape(x.shape), s.reshape(*lead, groups)


per_token_cast_p = _define(
    "jax_deepgemm_per_token_cast", abstract_eval=_per_token_abstract,
    reference=per_token_cast_reference, cuda=_per_token_cuda)


# --- per-block (128x128 over the last two axes)

def _per_block_abstract(w, *, use_ue8m0, transpose):
  del use_ue8m0
  *lead, n, k = w.shape
  if transpose:
    n, k = k, n
  return _out_avals(w, (tuple(lead) + (n, k), FP8_DTYPE),
                    (tuple(lead) + (ceil_div(n, BLOCK), ceil_div(k, BLOCK)), F32))


def _per_block_cuda(w, *, use_ue8m0, transpose):
  *lead, n, k = w.shape
  b, nb, kb = math.prod(lead), ceil_div(n, BLOCK), ceil_div(k, BLOCK)
  if not _kernel_ok(w, n * BLOCK, k * BLOCK, b * nb * kb):
    return per_block_cast_reference(w, use_ue8m0=use_ue8m0, transpose=transpose)
  q_shape, s_shape = ((b, k, n), (b, kb, nb)) if transpose else ((b, n, k), (b, nb, kb))
  call = jax.ffi.ffi_call("jax_deepgemm_per_block_cast",
                          (jax.ShapeDtypeStruct(q_shape, FP8_DTYPE),
                           jax.ShapeDtypeStruct(s_shape, F32)))
  q, s = call(w.reshape(b, n, k), transpose=np.int32(bool(transpose)),
              **_flags("block", use_ue8m0))
  return q.reshape(*lead, *q_shape[1:]), s.reshape(*lead, *s_shape[1:])


per_block_cast_p = _define(
    "jax_deepgemm_per_block_cast", abstract_eval=_per_block_abstract,
    reference=per_block_cast_reference, cuda=_per_block_cuda)


# --- token axis (128x1 along axis -2), optionally writing q transposed

def _token_axis_abstract(x, *, use_ue8m0, transpose):
  del use_ue8m0
  *lead, t, n = x.shape
  q_shape = tuple(lead) + ((n, t) if transpose else (t, n))
  return _out_avals(x, (q_shape, FP8_DTYPE), (tuple(lead) + (ceil_div(t, BLOCK), n), F32))


def _token_axis_cuda(x, *, use_ue8m0, transpose):
  *lead, t, n = x.shape
  a, tg = math.prod(lead), ceil_div(t, BLOCK)
  if not _kernel_ok(x, t * BLOCK, n * BLOCK, a * tg * n):
    return token_axis_cast_reference(x, use_ue8m0=use_ue8m0, transpose=transpose)
  call = jax.ffi.ffi_call("jax_deepgemm_token_axis_cast",
                          (jax.ShapeDtypeStruct((a, n, t) if transpose else (a, t, n), FP8_DTYPE),
                           jax.ShapeDtypeStruct((a, tg, n), F32)))
  q, s = call(x.reshape(a, t, n), transpose=np.int32(bool(transpose)),
              **_flags("token_axis", use_ue8m0))
  return (q.reshape(*lead, *((n, t) if transpose else (t, n))), s.reshape(*lead, tg, n))


token_axis_cast_p = _define(
    "jax_deepgemm_token_axis_cast", abstract_eval=_token_axis_abstract,
    reference=token_axis_cast_reference, cuda=_token_axis_cuda)


# --- both activation casts of x [..., T, C] from one read (fp8_linear's forward and backward)

def _dual_abstract(x, keep_rows=None, *, use_ue8m0):
  del use_ue8m0
  *lead, t, c = x.shape
  lead = tuple(lead)
  if keep_rows is not None and (keep_rows.shape != lead or keep_rows.dtype != jnp.int32):
    raise ValueError(f"jax_deepgemm_dual_cast: keep_rows must be int32 {lead} (x's leading "
                     f"axes), got {keep_rows.dtype} {keep_rows.shape}")
  return _out_avals(x, (x.shape, FP8_DTYPE), (lead + (t, ceil_div(c, BLOCK)), F32),
                    (lead + (c, t), FP8_DTYPE), (lead + (ceil_div(t, BLOCK), c), F32))


def _dual_cuda(x, keep_rows=None, *, use_ue8m0):
  *lead, t, c = x.shape
  a, tg, cg = math.prod(lead), ceil_div(t, BLOCK), ceil_div(c, BLOCK)
  if not _kernel_ok(x, t * BLOCK, c * BLOCK, a * tg * cg):
    return dual_cast_reference(x, keep_rows, use_ue8m0=use_ue8m0)
  if keep_rows is None:  # every row: a constant (jnp.full for symbolic sizes, export's)
    static = _primitive.known(a) and _primitive.known(t)
    keep_rows = np.full(a, t, np.int32) if static else jnp.full((a,), t, jnp.int32)
  return _dual_call("jax_deepgemm_dual_cast", lead, t, c, use_ue8m0,
                    x.reshape(a, t, c), keep_rows.reshape(a))


def _dual_call(target, lead, t, c, use_ue8m0, *operands):
  """The dual cast kernel's call (``target``: plain or gathered) for ``[*lead, t, c]``
  results, its operands folded to one leading axis."""
  a, tg, cg = math.prod(lead), ceil_div(t, BLOCK), ceil_div(c, BLOCK)
  # MN-major s: its bytes are [cg, a, t], so that the [a * t, cg] the GEMMs take is a bitcast.
  mn_major = _ffi.mn_major_scales()
  call = jax.ffi.ffi_call(target,
                          (jax.ShapeDtypeStruct((a, t, c), FP8_DTYPE),
                           jax.ShapeDtypeStruct((a, t, cg), F32),
                           jax.ShapeDtypeStruct((a, c, t), FP8_DTYPE),
                           jax.ShapeDtypeStruct((a, tg, c), F32)),
                          output_layouts=(None, (2, 0, 1) if mn_major else None, None, None))
  # Each half quantizes as its own op does: the two references are probed separately.
  q, s, qt, st = call(*operands, use_ue8m0=np.int32(bool(use_ue8m0)),
                      recip_token=np.int32(_kernel_recip("token")),
                      recip_axis=np.int32(_kernel_recip("token_axis")),
                      s_mn_major=np.int32(mn_major))
  return (q.reshape(*lead, t, c), s.reshape(*lead, t, cg), qt.reshape(*lead, c, t),
          st.reshape(*lead, tg, c))


dual_cast_p = _define(
    "jax_deepgemm_dual_cast", abstract_eval=_dual_abstract, reference=dual_cast_reference,
    cuda=_dual_cuda, outputs=4)


# --- the dual cast of rows gathered from x [..., S, C] (the MoE's dispatch, read in place)

def gathered_dual_cast_reference(x, rows, row_scale, keep_rows, *, use_ue8m0=False):
  """``dual_cast_reference`` of the rows ``rows [..., T]`` (int32) of ``x [..., S, C]``: row
  ``t`` is ``x[..., rows[t], :]``, a zero row where ``rows[t]`` is outside ``[0, S)``; with
  ``row_scale [..., T]`` (f32; ``[..., 0]``: none), that row times ``row_scale[t]`` in f32,
  rounded to x's dtype (a finite scale: an infinite one may also turn x's padding columns into
  NaN in the kernel)."""
  s = x.shape[-2]
  inside = (rows >= 0) & (rows < s)
  idx = jnp.where(inside, rows, s)[..., None]
  xg = jnp.take_along_axis(x, idx, axis=-2, mode="fill", fill_value=0)
  if row_scale.shape[-1]:
    f = jnp.where(inside, row_scale, 1.0)[..., None]
    xg = (f * xg.astype(jnp.float32)).astype(x.dtype)
  return dual_cast_reference(xg, keep_rows, use_ue8m0=use_ue8m0)


def _gathered_dual_abstract(x, rows, row_scale, keep_rows, *, use_ue8m0):
  del use_ue8m0
  lead, c = tuple(x.shape[:-2]), x.shape[-1]
  if x.ndim < 2 or rows.dtype != jnp.int32 or rows.shape[:-1] != lead or rows.ndim < 1:
    raise ValueError(f"jax_deepgemm_gathered_dual_cast: rows must be int32 [*lead, T] for x "
                     f"[*lead, S, C] {x.shape}, got {rows.dtype} {rows.shape}")
  if row_scale.dtype != F32 or row_scale.shape not in (rows.shape, lead + (0,)):
    raise ValueError(f"jax_deepgemm_gathered_dual_cast: row_scale must be f32 {rows.shape} "
                     f"(rows' shape) or {lead + (0,)} (none), got {row_scale.dtype} "
                     f"{row_scale.shape}")
  if keep_rows.shape != lead or keep_rows.dtype != jnp.int32:
    raise ValueError(f"jax_deepgemm_gathered_dual_cast: keep_rows must be int32 {lead} (x's "
                     f"leading axes), got {keep_rows.dtype} {keep_rows.shape}")
  t = rows.shape[-1]
  # (x, rows and keep_rows vary alike inside shard_map: the callers match them.)
  return _out_avals(x, (lead + (t, c), FP8_DTYPE), (lead + (t, ceil_div(c, BLOCK)), F32),
                    (lead + (c, t), FP8_DTYPE), (lead + (ceil_div(t, BLOCK), c), F32))


def _gathered_dual_cuda(x, rows, row_scale, keep_rows, *, use_ue8m0):
  *lead, s, c = x.shape
  t = rows.shape[-1]
  a, tg, cg = math.prod(lead), ceil_div(t, BLOCK), ceil_div(c, BLOCK)
  if rows.size == 0 or not _kernel_ok(x, t * BLOCK, c * BLOCK, a * tg * cg, s):
    return gathered_dual_cast_reference(x, rows, row_scale, keep_rows, use_ue8m0=use_ue8m0)
  return _dual_call("jax_deepgemm_gathered_dual_cast", lead, t, c, use_ue8m0,
                    x.reshape(a, s, c), rows.reshape(a, t),
                    row_scale.reshape(a, row_scale.shape[-1]), keep_rows.reshape(a))


gathered_dual_cast_p = _define(
    "jax_deepgemm_gathered_dual_cast", abstract_eval=_gathered_dual_abstract,
    reference=gathered_dual_cast_reference, cuda=_gathered_dual_cuda, outputs=4)


# --- both block casts of w [..., N, K] from one read (fp8_linear's forward: qt feeds the
# GEMM, q is the backward's dgrad operand)

def _per_block_dual_abstract(w, *, use_ue8m0):
  del use_ue8m0
  *lead, n, k = w.shape
  lead = tuple(lead)
  return _out_avals(w, (w.shape, FP8_DTYPE), (lead + (k, n), FP8_DTYPE),
                    (lead + (ceil_div(n, BLOCK), ceil_div(k, BLOCK)), F32))


def _per_block_dual_cuda(w, *, use_ue8m0):
  *lead, n, k = w.shape
  b, nb, kb = math.prod(lead), ceil_div(n, BLOCK), ceil_div(k, BLOCK)
  if not _kernel_ok(w, n * BLOCK, k * BLOCK, b * nb * kb):
    return per_block_dual_cast_reference(w, use_ue8m0=use_ue8m0)
  call = jax.ffi.ffi_call("jax_deepgemm_per_block_dual_cast",
                          (jax.ShapeDtypeStruct((b, n, k), FP8_DTYPE),
                           jax.ShapeDtypeStruct((b, k, n), FP8_DTYPE),
                           jax.ShapeDtypeStruct((b, nb, kb), F32)))
  q, qt, s = call(w.reshape(b, n, k), **_flags("block", use_ue8m0))
  return q.reshape(w.shape), qt.reshape(*lead, k, n), s.reshape(*lead, nb, kb)


per_block_dual_cast_p = _define(
    "jax_deepgemm_per_block_dual_cast", abstract_eval=_per_block_dual_abstract,
    reference=per_block_dual_cast_reference, cuda=_per_block_dual_cuda, outputs=3)
