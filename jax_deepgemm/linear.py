"""Differentiable FP8 layers with DeepSeek-V3's recipe, as ``jax.custom_vjp`` rules.

``fp8_linear(x, w, bias)`` is a drop-in for ``x @ w (+ bias)`` (``w [K, N]``, flax.nnx.Linear's
layout) and ``fp8_grouped_linear(x, w, group_sizes)`` for ``jax.lax.ragged_dot(x, w, group_sizes)``
(``w [G, K, N]``). Forward: x per 1x128, w per 128x128, FP8 GEMM. Backward: dgrad ``dY·Wᵀ`` with
the FP8 GEMM (W's 128x128 blocks transpose exactly), wgrad ``Xᵀ·dY`` with both operands
quantized along the token axis and the (K-grouped) wgrad GEMM. Gradients come back in the dtypes
of the inputs. The layers are built on the ops, so they run wherever the ops do (Hopper kernels
on H100/H200, the pure-JAX references elsewhere).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jax_deepgemm import _checks, _primitive
from jax_deepgemm._routing import gather_rows, gather_rows_transpose
from jax_deepgemm.gemm import fp8_gemm_nt
from jax_deepgemm.grouped_contiguous import (m_grouped_fp8_gemm_nt_contiguous,
                                             sanitize_group_sizes)
from jax_deepgemm.k_grouped import k_grouped_fp8_gemm_tn_contiguous
from jax_deepgemm.quant import (is_wide_float, per_block_cast_to_fp8,
                                per_block_cast_to_fp8_and_transpose, per_token_cast_to_fp8,
                                per_token_cast_to_fp8_and_transpose)
from jax_deepgemm.quant_kernels import (KERNEL_DTYPES, ceil_div, dual_cast_p,
                                         gathered_dual_cast_p)


# Names for remat policies (``jax.checkpoint_policies.save_only_these_names``): what the
# backward keeps (X_FP8, W_FP8; DeepSeek-V3 caches its activations in FP8) and the layer's
# output (OUT: the GEMM is our primitive, not a dot, so ``dots_saveable`` does not save it).
# Saving all three, ``FP8_RESIDUALS``, recomputes nothing of the layer in the backward.
X_FP8 = "jax_deepgemm_x_fp8"  # X's e4m3 cast along tokens and its scales
W_FP8 = "jax_deepgemm_w_fp8"  # W's e4m3 [K, N] cast and its scales
OUT = "jax_deepgemm_out"      # the layer's output
FP8_RESIDUALS = (X_FP8, W_FP8, OUT)


class Fp8Weight(NamedTuple):
  """A weight's two 128x128 block casts, made once by ``quantize_weight`` and passed to
  ``fp8_linear`` / ``fp8_grouped_linear`` as ``w_fp8`` (a pytree: it goes through ``jit``,
  ``vmap`` and ``scan`` like the arrays it holds)."""
  q: jax.Array   # W [..., K, N] in e4m3: the backward's dgrad operand
  s: jax.Array   # its scales [..., ceil(K/128), ceil(N/128)], f32
  qt: jax.Array  # Wᵀ [..., N, K] in e4m3: the forward GEMM's operand
  st: jax.Array  # its scales [..., ceil(N/128), ceil(K/128)]


def quantize_weight(w) -> Fp8Weight:
  """W's casts for ``fp8_linear(x, w, w_fp8=...)`` / ``fp8_grouped_linear``, made once.

  The layers cast W on every call (one read of W, two FP8 copies written). With gradient
  accumulation W stays the same over the micro-batches of a step: cast it once before the
  micro-batch loop and pass the result with W to every call, which then casts nothing of W,
  as TransformerEngine's ``is_first_microbatch`` does. ``w_fp8`` must be this function of the
  ``w`` passed with it; the layers check its shapes and dtypes, not its values. No gradient
  flows through it (``stop_gradient``): W's gradient comes from the layers, through ``w``.

  Args:
    w: ``[K, N]`` (``fp8_linear``) or ``[G, K, N]`` (``fp8_grouped_linear``), bf16/f16/f32.
  """
  w = _checks.array("quantize_weight", "w", w)
  if w.ndim < 2:  # (more leading axes are fine: a stack of layers' weights, cast at once)
    raise ValueError(f"quantize_weight: w must be [K, N] or [G, K, N], got shape {w.shape}")
  _check_float("quantize_weight", "w", w)
  return Fp8Weight(*per_block_cast_to_fp8_and_transpose(jax.lax.stop_gradient(w)))


def _check_w_fp8(op, w_fp8, w):
  """``w_fp8`` as ``quantize_weight(w)`` makes it (shapes and dtypes), or None."""
  if w_fp8 is None:
    return None
  if not isinstance(w_fp8, Fp8Weight):
    raise TypeError(f"{op}: w_fp8 must be quantize_weight(w)'s Fp8Weight, got "
                    f"{type(w_fp8).__name__}")
  q, s, qt, st = (_checks.array(op, f"w_fp8.{n}", v) for n, v in zip(Fp8Weight._fields, w_fp8))
  lead, (k, n) = w.shape[:-2], w.shape[-2:]
  blocks = (ceil_div(k, 128), ceil_div(n, 128))
  hint = f"quantize_weight(w) of w {tuple(w.shape)}"
  for name, x, want in (("q", q, (k, n)), ("qt", qt, (n, k))):
    _checks.fp8(op, f"w_fp8.{name}", x)
    _checks.shape(op, f"w_fp8.{name}", x, lead + want, hint)
  for name, x, want in (("s", s, blocks), ("st", st, blocks[::-1])):
    _checks.dtype(op, f"w_fp8.{name}", x, jnp.float32)
    _checks.shape(op, f"w_fp8.{name}", x, lead + want, hint)
  return Fp8Weight(q, s, qt, st)


def _gemm_dtype(dtype):
  # The GEMM writes bf16 or f32: bf16 stays bf16, anything else goes through f32.
  return jnp.bfloat16 if jnp.dtype(dtype) == jnp.bfloat16 else jnp.float32


def _check_float(op, name, x):
  if not is_wide_float(x.dtype):
    raise TypeError(f"{op}: {name} must be bf16, f16, f32 or f64, got {x.dtype}")


def _cast_source(w, dtype):
  """W as a layer that computes in ``dtype`` hands it to the FP8 layers: as it is where the
  cast kernels read its dtype (bf16, f16, f32), else converted to ``dtype``.

  f32 parameters with bf16 compute (Flax's defaults) were converted to a bf16 copy first,
  which XLA writes and the cast reads again (a custom call fuses nothing): for the MoE's
  experts at H 7168, 64 experts, 5.6 GB written and read every step. Cast directly, W rounds
  once, to e4m3, instead of twice. Pass the compute dtype as ``w_grad_dtype`` too, so that
  W's gradient is computed in it, as for the converted copy."""
  return w if jnp.dtype(w.dtype) in KERNEL_DTYPES else w.astype(dtype)


# ----------------------------------------------------------------------------- dense
# w_grad_dtype: None, or the dtype W's gradient is computed in (then converted to W's).
@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _linear(x2, w, bias, w_fp8, types, out_dtype, w_grad_dtype):
  del types, w_grad_dtype
  xq, xs = per_token_cast_to_fp8(x2)
  # W's 128x128 blocks transpose exactly: the cast writes the [N, K] operand directly.
  wtq, wts = (w_fp8.qt, w_fp8.st) if w_fp8 else per_block_cast_to_fp8(w, transpose=True)
  return _linear_gemm(xq, xs, wtq, wts, out_dtype, bias)


def _linear_gemm(xq, xs, wtq, wts, dtype, bias):
  bias32 = None if bias is None else bias.astype(jnp.float32)
  y = fp8_gemm_nt(xq, xs, wtq, wts, bias=bias32, out_dtype=_gemm_dtype(dtype))
  return y.astype(dtype)


def _linear_fwd(x2, w, bias, w_fp8, types, out_dtype, w_grad_dtype):
  del types, w_grad_dtype
  # The backward needs X only as the wgrad operand, cast along tokens: that cast is
  # saved instead of X (DeepSeek-V3 caches FP8 activations), half X's bytes when bf16.
  # Both casts of X come from one read (the per-token one feeds the GEMM here).
  xq, xs, xt, xts = per_token_cast_to_fp8_and_transpose(x2)
  # Likewise W: both block casts from one read (or given), the [N, K] one for the GEMM
  # here, the [K, N] one (dgrad's operand) saved instead of W. (An empty array keeps W's
  # dtype.)
  wq, ws, wtq, wts = w_fp8 or per_block_cast_to_fp8_and_transpose(w)
  y = _linear_gemm(xq, xs, wtq, wts, out_dtype, bias)
  xt, xts, wq, ws = _name_residuals(xt, xts, wq, ws)
  # (Empty arrays carry X's and W's dtypes: dY has the output's.)
  return y, (xt, xts, wq, ws, jnp.zeros((0,), x2.dtype), jnp.zeros((0,), w.dtype), bias)


def _name_residuals(xt, xts, wq, ws):
  return (checkpoint_name(xt, X_FP8), checkpoint_name(xts, X_FP8),
          checkpoint_name(wq, W_FP8), checkpoint_name(ws, W_FP8))


def _linear_bwd(types, out_dtype, w_grad_dtype, res, dy):
  del out_dtype
  xt, xts, wq, ws, x_like, w_like, bias = res  # dy has X's row count
  # dY's two casts from one read: per 1x128 for dgrad, along tokens (written token-major,
  # the layout the wgrad kernel reads) for wgrad.
  dyq, dys, dyt, dyts = per_token_cast_to_fp8_and_transpose(dy)
  # dgrad: dX [M, K] = dY [M, N] · W[K, N]ᵀ; W's blocks quantized as [K, N] (forward).
  dx = fp8_gemm_nt(dyq, dys, wq, ws, out_dtype=_gemm_dtype(x_like.dtype)).astype(x_like.dtype)
  # wgrad: dW [K, N] = Xᵀ · dY, both quantized along tokens (one group of all tokens).
  # (In w_grad_dtype if given, then converted to W's.)
  m = jnp.full((1,), dy.shape[0], jnp.int32)
  gd = w_like.dtype if w_grad_dtype is None else w_grad_dtype
  dw = k_grouped_fp8_gemm_tn_contiguous(xt, xts, dyt, dyts, m, token_major=True,
                                        out_dtype=_gemm_dtype(gd))
  dw = dw[0].astype(gd).astype(w_like.dtype)
  db = None if bias is None else jnp.sum(dy.astype(jnp.float32), axis=0).astype(bias.dtype)
  return _primitive.retyped((dx, dw, db), types) + (None,)  # no gradient through w_fp8


_linear.defvjp(_linear_fwd, _linear_bwd)


def fp8_linear(x, w, bias=None, *, preferred_element_type=None, w_fp8=None):
  """``x @ w (+ bias)`` in FP8 with DeepSeek-V3's fine-grained scales, differentiable.

  Scales are ``max(amax, 1e-4) / 448`` per 128 elements, so tiny gradients (a loss scaled down
  by ~1e-9) lose precision or flush to zero (README, "API").

  Args:
    x: ``[..., K]`` bf16/f16/f32 activations (f64 under ``jax_enable_x64``).
    w: ``[K, N]`` weights (flax.nnx.Linear's kernel layout).
    bias: optional ``[N]``.
    preferred_element_type: the result's dtype (bf16, f16, f32, or f64 under x64), default
      ``x.dtype``: f32 from bf16 inputs keeps the GEMM's f32 result (and bias added in f32)
      unrounded, as ``jnp.dot(x, w, preferred_element_type=jnp.float32)`` does.
    w_fp8: optional ``quantize_weight(w)``, made once for several calls with the same ``w``
      (micro-batches): W is then not cast here, in the forward or the backward.
  Returns:
    ``[..., N]`` in ``preferred_element_type`` or ``x.dtype``.
  """
  return _fp8_linear(x, w, bias, preferred_element_type, w_fp8)


def _fp8_linear(x, w, bias, preferred_element_type, w_fp8, w_grad_dtype=None):
  x, w = _checks.arrays("fp8_linear", "x w", x, w)
  _check_float("fp8_linear", "x", x)
  _check_float("fp8_linear", "w", w)
  if w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[0]:
    raise ValueError(f"fp8_linear: x [..., K] and w [K, N] disagree: {x.shape}, {w.shape}")
  if bias is not None:
    bias = _checks.array("fp8_linear", "bias", bias)
    _check_float("fp8_linear", "bias", bias)
    if bias.shape != (w.shape[1],):
      raise ValueError(f"fp8_linear: bias must have shape ({w.shape[1]},), got {bias.shape}")
  out_dtype = x.dtype
  if preferred_element_type is not None:
    try:
      out_dtype = jnp.dtype(preferred_element_type)
    except TypeError:
      raise TypeError(f"fp8_linear: preferred_element_type must be a float dtype, got "
                      f"{preferred_element_type!r}") from None
    if not is_wide_float(out_dtype):
      raise TypeError(f"fp8_linear: preferred_element_type must be bf16, f16, f32 or f64, got "
                      f"{out_dtype}")
  w_fp8 = _check_w_fp8("fp8_linear", w_fp8, w)
  # (w_fp8 gets no cotangent, so its arrays need not vary like x's in a shard_map.)
  x, w, bias = _primitive.match_vma(x, w, bias)
  order = _primitive.split_first(x, x.ndim - 1)
  x2 = _primitive.fold(x, order)
  y = _linear(x2, w, bias, w_fp8, _primitive.primal_types(x2, w, bias), out_dtype,
              None if w_grad_dtype is None else jnp.dtype(w_grad_dtype))
  y = checkpoint_name(y, OUT)
  return _primitive.unfold_like(y, x, order)


# ----------------------------------------------------------------------------- grouped
# in_rows: None, or (idx, inv) with the static k: the layer of the rows gather_rows(x, idx),
#   which X's cast reads in place (x's gradient: gather_rows_transpose(dx, inv, k)).
# out_rows: None, or (idx, inv): the layer's result is gather_rows(y, idx), and dY's cast reads
#   the rows gather_rows(dy, inv) of that result's cotangent in place; or (idx, inv, weights):
#   the result is combine_rows(y, idx, weights), and dY's cast reads each row's source row of
#   the cotangent times its weight in place.
@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _grouped(x, w, group_sizes, w_fp8, in_rows, out_rows, types, k, w_grad_dtype):
  del types, k, w_grad_dtype
  if in_rows is not None:
    x = gather_rows(x, in_rows[0])
  xq, xs = per_token_cast_to_fp8(x)
  # [G, N, K], written so by the cast
  wtq, wts = (w_fp8.qt, w_fp8.st) if w_fp8 else per_block_cast_to_fp8(w, transpose=True)
  y = _grouped_gemm(xq, xs, wtq, wts, x.dtype, group_sizes)
  return y if out_rows is None else _out_rows(y, out_rows)


def _out_rows(y, out_rows):
  if len(out_rows) == 2:
    return gather_rows(y, out_rows[0])
  return combine_rows(y, out_rows[0], out_rows[2])


def combine_rows(y, idx, weights):
  """``Σ_j weights[:, j] · gather_rows(y, idx)[t·k + j]`` for ``weights [T, k]``: the MoE's
  combine, summed in f32 (the k gathered rows added one after another: an elementwise
  fusion), in y's dtype."""
  t, k = weights.shape
  rows = idx.reshape(t, k)
  weights = weights.astype(jnp.float32)
  acc = weights[:, :1] * gather_rows(y, rows[:, 0]).astype(jnp.float32)
  for j in range(1, k):
    acc = acc + weights[:, j:j + 1] * gather_rows(y, rows[:, j]).astype(jnp.float32)
  return acc.astype(y.dtype)


def _grouped_gemm(xq, xs, wtq, wts, dtype, group_sizes):
  y = m_grouped_fp8_gemm_nt_contiguous(xq, xs, wtq, wts, group_sizes,
                                       out_dtype=_gemm_dtype(dtype))
  return y.astype(dtype)


def _rows_in_groups(group_sizes, m):
  """How many of the M rows belong to a group (<= M: the sanitized sizes saturate at M)."""
  return jnp.sum(sanitize_group_sizes(group_sizes, m, "fp8_grouped_linear"), dtype=jnp.int32)


def _grouped_cast(x, keep, idx=None, scale=None):
  """Both casts of X or dY ``[M, ·]`` (as ``per_token_cast_to_fp8_and_transpose``; with ``idx``,
  of ``gather_rows(x, idx)``, each row times its f32 ``scale`` if given) with the rows at or
  past ``keep`` (those in no group) cast as zeros: whatever those hold (``jnp.take``'s NaN
  fill, garbage) would otherwise set the token-axis scale of the 128-row block the last group
  ends in, and so that group's dW."""
  if idx is None:
    return dual_cast_p.bind(x, keep, use_ue8m0=False)
  scale = jnp.zeros((0,), jnp.float32) if scale is None else scale
  return gathered_dual_cast_p.bind(x, idx, scale, keep, use_ue8m0=False)


def _grouped_fwd(x, w, group_sizes, w_fp8, in_rows, out_rows, types, k, w_grad_dtype):
  del types, k, w_grad_dtype
  # As _linear_fwd: X's token-axis cast and W's [G, K, N] cast are saved instead of X and
  # W, each cast pair from one read (W's: or given).
  # The row count in groups rides in the residuals: dY's cast needs it again.
  idx = None if in_rows is None else in_rows[0]
  keep = _rows_in_groups(group_sizes, x.shape[0] if idx is None else idx.shape[0])
  xq, xs, xt, xts = _grouped_cast(x, keep, idx)
  wq, ws, wtq, wts = w_fp8 or per_block_cast_to_fp8_and_transpose(w)
  y = _grouped_gemm(xq, xs, wtq, wts, x.dtype, group_sizes)
  # A combine's residuals: y and its gather and weights (the weights' gradient reads y's rows).
  comb = None if out_rows is None or len(out_rows) == 2 else (y, out_rows[0], out_rows[2])
  if out_rows is not None:
    y = _out_rows(y, out_rows)
  xt, xts, wq, ws = _name_residuals(xt, xts, wq, ws)
  invs = tuple(None if r is None else r[1] for r in (in_rows, out_rows))
  return y, (xt, xts, wq, ws, jnp.zeros((0,), w.dtype), group_sizes, keep, invs, comb)


def _combine_bwd(dy, y_inv, comb):
  """A combine's backward: the dY cast's source rows and row scales (each layer row's
  token-choice ``y_inv``: its token's row of dy, times its weight; outside ``[0, T·k)``: a
  zero row), and the weights' gradient ``<dy[t], y[idx[t·k + j]]>`` (in f32)."""
  y, idx, weights = comb
  t, k = weights.shape
  inside = (y_inv >= 0) & (y_inv < t * k)
  rows = jnp.where(inside, y_inv // k, -1)
  scale = jnp.take(weights.astype(jnp.float32).reshape(-1), jnp.where(inside, y_inv, 0))
  dyf, rows_of = dy.astype(jnp.float32), idx.reshape(t, k)
  dweights = jnp.stack([jnp.sum(dyf * gather_rows(y, rows_of[:, j]).astype(jnp.float32), axis=-1)
                        for j in range(k)], axis=1)
  return rows, scale, dweights.astype(weights.dtype)


def _grouped_bwd(types, k, w_grad_dtype, res, dy):
  xt, xts, wq, ws, w_like, group_sizes, keep, (x_inv, y_inv), comb = res  # dy: X's dtype
  # dY's two casts from one read (as in _linear_bwd; with out_rows, of its rows y_inv; of a
  # combine, its rows' tokens' rows of dy times their weights).
  d_out_rows = None
  if comb is None:
    dyq, dys, dyt, dyts = _grouped_cast(dy, keep, y_inv)
  else:
    rows, scale, dweights = _combine_bwd(dy, y_inv, comb)
    dyq, dys, dyt, dyts = _grouped_cast(dy, keep, rows, scale)
    d_out_rows = (None, None, dweights)
  # dgrad per group: dX_g = dY_g · W[g]ᵀ, W[g] [K, N] quantized in 128x128 blocks as is.
  dx = m_grouped_fp8_gemm_nt_contiguous(dyq, dys, wq, ws, group_sizes,
                                        out_dtype=_gemm_dtype(dy.dtype)).astype(dy.dtype)
  if x_inv is not None:  # back to x's rows
    dx = gather_rows_transpose(dx, x_inv, k)
  # wgrad per group: dW[g] = X_gᵀ · dY_g over the group's tokens (K-grouped GEMM), the
  # operands cast token-major (X's in the forward).
  # (In w_grad_dtype if given, then converted to W's.)
  gd = w_like.dtype if w_grad_dtype is None else w_grad_dtype
  dw = k_grouped_fp8_gemm_tn_contiguous(xt, xts, dyt, dyts, group_sizes, token_major=True,
                                        out_dtype=_gemm_dtype(gd))
  return _primitive.retyped((dx, dw.astype(gd).astype(w_like.dtype)), types) + (
      None, None, None, d_out_rows)


_grouped.defvjp(_grouped_fwd, _grouped_bwd)


def fp8_grouped_linear(x, w, group_sizes, *, w_fp8=None):
  """FP8 drop-in for ``jax.lax.ragged_dot(x, w, group_sizes)``, differentiable in x and w.

  The scales' 1e-4 amax floor applies as in ``fp8_linear``.

  Args:
    x: ``[M, K]`` bf16/f16/f32 (f64 under ``jax_enable_x64``), rows sorted by group.
    w: ``[G, K, N]``.
    group_sizes: int32 ``[G]`` device array (empty groups fine; rows past the sum give 0
      and get a zero gradient, whatever they hold, e.g. ``jnp.take``'s NaN fill).
      The weight gradient's token-axis cast scales X and dY per 128 rows across groups, so an
      inf or NaN in a row of one group makes dW NaN for the groups sharing its 128-row block,
      where ``ragged_dot`` keeps it to the row's own group. Groups padded with zero rows to
      multiples of 128 share no block, and their weight gradient is faster (no straddling
      token blocks to mask): ``jax_deepgemm.flax.MoE`` lays its experts' rows out so.
    w_fp8: optional ``quantize_weight(w)`` (as in ``fp8_linear``).
  Returns:
    ``[M, N]`` in ``x.dtype``.
  """
  return _fp8_grouped_linear("fp8_grouped_linear", x, w, group_sizes, w_fp8)


def fp8_grouped_linear_of_rows(x, w, group_sizes, *, w_fp8=None, in_rows=None, out_rows=None):
  """``fp8_grouped_linear`` between row gathers (a MoE layer's dispatch and combine), each read
  in place by a cast kernel instead of written first: the result is

      gather_rows(fp8_grouped_linear(gather_rows(x, in_idx), w, group_sizes), out_idx)

  (``_routing.gather_rows``: a zero row where an index is outside the rows), differentiable
  in x and w. The gradients go back through the inverses, as ``_routing.gather`` takes them.

  Args:
    x: ``[S, K]``, or ``[M, K]`` without ``in_rows``.
    in_rows: optional ``(in_idx, in_inv, k)``: int32 ``in_idx [M]`` (x's row for each of the
      layer's M rows), int32 ``in_inv [S, k]`` (the k rows that read each row of x; x's
      gradient is their sum) and the static int ``k``.
    out_rows: optional ``(out_idx, out_inv)``: int32 ``out_idx [P]`` (the layer's row for each
      row of the result) and int32 ``out_inv [M]`` (the result's row that reads each of the
      layer's rows; outside ``[0, P)``: none). Or ``(out_idx, out_inv, weights)`` with float
      ``weights [T, k]``, ``T·k = P`` (a MoE's combine): the result is then ``[T, N]``,

          y[t] = Σ_j weights[t, j] · gather_rows(y_layer, out_idx)[t·k + j]

      summed in f32 and rounded to x's dtype, differentiable in ``weights`` too; dY's cast
      reads each row's token's row of the cotangent times its weight in place (the weighted
      ``[P, N]`` cotangent is never written). The weights must be finite.
  """
  return _of_rows(x, w, group_sizes, w_fp8, in_rows, out_rows)


def _of_rows(x, w, group_sizes, w_fp8, in_rows, out_rows, w_grad_dtype=None):
  op = "fp8_grouped_linear_of_rows"
  x = _checks.array(op, "x", x)
  if in_rows is not None:
    idx, inv, k = in_rows
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
      raise ValueError(f"{op}: in_rows' k must be a positive int (static), got {k!r}")
    idx, inv = _checks.arrays(op, "in_idx in_inv", idx, inv)
    if idx.ndim != 1 or idx.dtype != jnp.int32 or x.ndim != 2 or inv.dtype != jnp.int32 or \
        inv.shape != (x.shape[0], k):
      raise ValueError(f"{op}: in_rows must be int32 in_idx [M] and in_inv [S, k] = "
                       f"[{x.shape[0]}, {k}] for x [S, K] {x.shape}, got {idx.dtype} "
                       f"{idx.shape}, {inv.dtype} {inv.shape}")
    in_rows, m = (idx, inv), idx.shape[0]
  else:
    k, m = 1, x.shape[0] if x.ndim else 0
  if out_rows is not None:
    if not isinstance(out_rows, (tuple, list)) or len(out_rows) not in (2, 3):
      raise ValueError(f"{op}: out_rows must be (out_idx, out_inv) or (out_idx, out_inv, "
                       f"weights), got {type(out_rows).__name__} of "
                       f"{len(out_rows) if isinstance(out_rows, (tuple, list)) else '?'}")
    idx, inv = _checks.arrays(op, "out_idx out_inv", *out_rows[:2])
    if idx.ndim != 1 or idx.dtype != jnp.int32 or inv.shape != (m,) or inv.dtype != jnp.int32:
      raise ValueError(f"{op}: out_rows must be int32 out_idx [P] and out_inv [M] = [{m}], "
                       f"got {idx.dtype} {idx.shape}, {inv.dtype} {inv.shape}")
    if len(out_rows) == 3:
      (weights,) = _checks.arrays(op, "weights", out_rows[2])
      if weights.ndim != 2 or weights.shape[0] * weights.shape[1] != idx.shape[0] or \
          weights.shape[1] < 1 or not jnp.issubdtype(weights.dtype, jnp.floating):
        raise ValueError(f"{op}: out_rows' weights must be float [T, k] with T·k = "
                         f"{idx.shape[0]} (out_idx's length), got {weights.dtype} "
                         f"{weights.shape}")
      out_rows = (idx, inv, weights)
    else:
      out_rows = (idx, inv)
  return _fp8_grouped_linear(op, x, w, group_sizes, w_fp8, in_rows, out_rows, k, w_grad_dtype)


def _fp8_grouped_linear(op, x, w, group_sizes, w_fp8, in_rows=None, out_rows=None, k=1,
                        w_grad_dtype=None):
  x, w = _checks.arrays(op, "x w", x, w)
  group_sizes = _checks.sizes_array(op, "group_sizes", group_sizes)
  _check_float(op, "x", x)
  _check_float(op, "w", w)
  if x.ndim != 2 or w.ndim != 3 or x.shape[1] != w.shape[1]:
    raise ValueError(f"{op}: x [M, K] and w [G, K, N] disagree: {x.shape}, {w.shape}")
  _checks.group_sizes(op, "group_sizes", group_sizes, w.shape[0])
  w_fp8 = _check_w_fp8(op, w_fp8, w)
  # (The gathered casts' results vary as x does: their index operands vary alike.)
  rows, tree = jax.tree.flatten((in_rows, out_rows))
  x, w, group_sizes, *rows = _primitive.match_vma(x, w, group_sizes, *rows)
  in_rows, out_rows = jax.tree.unflatten(tree, rows)
  # The sizes go to the ops as given: each clips them to [0, M] itself without wrapping
  # (the M-grouped kernel clips int32 sizes, the K-grouped op sanitizes its own), so a scan
  # here would only run twice.
  gd = None if w_grad_dtype is None else jnp.dtype(w_grad_dtype)
  return checkpoint_name(_grouped(x, w, group_sizes, w_fp8, in_rows, out_rows,
                                  _primitive.primal_types(x, w), k, gd), OUT)
