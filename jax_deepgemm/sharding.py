"""Sharding rules for the GEMMs under plain ``jax.jit``: sharded operands stay sharded.

XLA cannot look inside our ops, so without rules it all-gathers every sharded operand and
runs the whole op on every device. Here each op gets ``jax.experimental.custom_partitioning``
rules: a Shardy sharding rule (Shardy is JAX's default partitioner), an
``infer_sharding_from_operands`` for GSPMD (``jax_use_shardy_partitioner=False``), and a
``partition`` that runs the op on each device's shards:

=====================================  ===========================  ============================
op                                     sharded axes stay local      partial products + all-reduce
=====================================  ===========================  ============================
``fp8_gemm_nt``                        M, N                         K
``m_grouped_fp8_gemm_nt_contiguous``   M, N                         K, G (b's experts)
``k_grouped_fp8_gemm_tn_contiguous``   G, N, K                      T (tokens)
``m_grouped_fp8_gemm_nt_masked``       G, M, N                      K
=====================================  ===========================  ============================

* Group sizes are global. When the grouped ops have their token rows (M or T) or their
  experts (G) sharded, each device derives its own groups from the global sizes and its
  shard's position: the rows of its window, the experts it holds (the rows of the others
  contribute zeros and the all-reduce sums them back).
* The 128-element scale blocks must not straddle shards: K, N (``fp8_gemm_nt`` and the
  M-grouped op) and T (K-grouped op) stay sharded only when each shard holds whole blocks
  (the axis' size is a multiple of 128 times the number of shards); otherwise the partitioner
  gathers that axis. M may be split anywhere (XLA pads uneven splits).
* The all-reduce of a K split sums FP32 partial products, then rounds to ``out_dtype`` once,
  as the unsharded op does; the values differ from it only by the order of FP32 additions.
* The FP8 casts (``quant_kernels``) quantize each 128-group on its own: split on group
  boundaries they run on each device's shard with no communication, bitwise as unsharded.
  Every axis may be split, but the grouped ones only in whole 128-blocks (else gathered):
  C of ``per_token_cast`` (``[..., R, C]``), N and K of ``per_block_cast`` (``[..., N, K]``)
  and ``per_block_dual_cast``, T of ``token_axis_cast`` (``[..., T, N]``; its ``q`` may be
  ``[..., N, T]``), T and C of ``dual_cast`` (``[..., T, C]``). So a
  data-parallel layer (tokens split, weights replicated) casts its shards in place, forward
  and backward.

This is installed when ``jax_deepgemm`` is imported: the primitives' lowering becomes a
``custom_partitioning`` call whenever a computation spans several devices. On one device, and
inside ``jax.shard_map`` (where the code is already per device), the plain op is lowered.

With Explicit mesh axes (``jax.sharding.AxisType.Explicit``, sharding in types) the same plans
type each result: an op whose operands are sharded over explicit axes gets the result sharding
its partitioning produces (e.g. ``fp8_gemm_nt`` of rows split over ``d``: ``out[M@d, N]``), so
the ops that follow stay sharded instead of taking a replicated type and an all-gather.
"""
from __future__ import annotations

import contextlib
import functools
import math
import re

import jax
import jax.numpy as jnp
from jax._src import dispatch  # custom_partitioning needs the devices at lowering time
from jax._src.sharding_impls import parse_flatten_op_sharding
from jax.experimental.custom_partitioning import custom_partitioning
from jax.interpreters import mlir
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jax_deepgemm import _ffi, _primitive
from jax_deepgemm.gemm import fp8_gemm_nt_p
from jax_deepgemm.grouped_contiguous import (MAX_KERNEL_GROUPS, clip_rows,
                                             m_grouped_contiguous_p, sanitize_group_sizes)
from jax_deepgemm.grouped_masked import keep_rows_past, masked_p
from jax_deepgemm.k_grouped import OP as K_GROUPED_OP, k_grouped_p
from jax_deepgemm.quant_kernels import (dual_cast_p, per_block_cast_p, per_block_dual_cast_p,
                                        per_token_cast_p, token_axis_cast_p,
                                        warm_up_division_probes)

BLOCK = 128
F32 = jnp.dtype(jnp.float32)


# ----------------------------------------------------------------------------- helpers
def _dims(mesh, shape):
  """The mesh axes each dimension of ``shape`` (a ShapeDtypeStruct) is split over.

  A sharding no PartitionSpec over the mesh's axes can say is gathered: Shardy may split a
  mesh axis into sub-axes (e.g. 2 of an axis' 4 shards on a dimension of 2 blocks), so the
  shardings reach us undecoded and are decoded here.
  """
  ndim = len(shape.shape)
  s = shape.sharding
  if s is None:  # GSPMD has not sharded this operand (yet)
    return [()] * ndim
  if isinstance(s, NamedSharding):
    spec = tuple(s.spec)
  else:
    try:
      spec = tuple(parse_flatten_op_sharding(s._to_xla_hlo_sharding(ndim), mesh)[0])
    except (KeyError, ValueError, NotImplementedError, StopIteration, AssertionError):
      # (AssertionError: JAX's decoder asserts where a sub-axis split does not factor into
      # the mesh's axes, e.g. K over "x" in x and over "y" in w, the cast seeing both.)
      return [()] * ndim
  spec += (None,) * (ndim - len(spec))
  return [_primitive.spec_axes(e) for e in spec]


def _size(mesh, axes):
  return math.prod(mesh.shape[a] for a in axes)


def _split(mesh, axes, n):
  """``axes`` if a dimension of ``n`` elements splits evenly over them, else ()."""
  return axes if axes and n > 0 and n % _size(mesh, axes) == 0 else ()


def _blocked(mesh, axes, n):
  """``axes`` if each shard of a dimension of ``n`` elements holds whole 128-blocks."""
  return axes if axes and n % BLOCK == 0 and _split(mesh, axes, n // BLOCK) else ()


def _free(axes, *taken):
  """``axes`` unless one of them already splits another factor (then that factor wins)."""
  used = set().union(*map(set, taken))
  return () if used & set(axes) else axes


def _spec(*dims):
  return P(*[None if not d else d[0] if len(d) == 1 else d for d in dims])


def _first(*candidates):
  return next((c for c in candidates if c), ())


def _kernels_on(mesh) -> bool:
  """Whether the ops' shards on ``mesh`` run our kernels, whose limits then apply (not known
  of an abstract mesh, as explicit types give: checked when partitioned)."""
  return (isinstance(mesh, Mesh) and mesh.devices.flat[0].platform == "gpu"
          and _ffi.use_kernels())


def _window(group_sizes, rows, row_axes, experts, expert_axes, total_rows):
  """This device's groups: (start, end) rows of each local expert within the local rows.

  ``group_sizes`` are global, as the op takes them: clipped here (as the kernel and the
  reference lowering clip them) so that they end by the global row count ``total_rows``
  and their running sum cannot overflow. The local rows are rows ``[i * rows, (i + 1) * rows)``
  of the global ones for the device's index ``i`` along ``row_axes``; the local experts are
  ``[j * experts, (j + 1) * experts)``.
  """
  group_sizes = sanitize_group_sizes(group_sizes, total_rows)
  ends = jnp.cumsum(group_sizes)
  starts = ends - group_sizes
  r0 = jax.lax.axis_index(row_axes) * rows if row_axes else 0
  lo = jnp.clip(starts - r0, 0, rows)
  hi = jnp.clip(ends - r0, 0, rows)
  if expert_axes:
    g0 = jax.lax.axis_index(expert_axes) * experts
    lo = jax.lax.dynamic_slice_in_dim(lo, g0, experts)
    hi = jax.lax.dynamic_slice_in_dim(hi, g0, experts)
  return lo, hi


def _rows_here(count, axes, rows):
  """Of the first ``count`` global rows (a dimension split over ``axes``, ``rows`` per device),
  how many this device holds: its rows are ``[i * rows, (i + 1) * rows)`` for its index i."""
  return jnp.clip(count - jax.lax.axis_index(axes) * rows, 0, rows)


def _blocks_rule(name, n):
  """Shardy factors of a dimension of ``n`` elements in 128-blocks and of its scale dimension.

  Returns (dimension, scale dimension, reduction factors if it is contracted, factors that
  must not be split, factor sizes). A multiple of 128 is the compound factor
  ``(<name>b <name>i)``: Shardy may split the block count ``<name>b`` (shared with the
  scales) but never the 128 inside a block. Other sizes (and a single block: Shardy allows
  no size-1 factor in a compound) cannot be split on block boundaries.
  """
  if n % BLOCK == 0 and n // BLOCK > 1:
    return (f"({name}b {name}i)", f"{name}b", (f"{name}b",), (f"{name}i",),
            {f"{name}i": BLOCK})
  return name, f"{name}b", (), (name, f"{name}b"), {}


def _rule(operands, result, reduction=(), replication=(), **sizes):
  """The Einsum-like rule string with its keyword arguments for ``def_partition``."""
  text = ", ".join(operands) + " -> " + result
  # Shardy wants the special factors listed in the order the factors first appear.
  order = list(dict.fromkeys(re.findall(r"\w+", text)))
  key = order.index
  return text, dict(reduction_factors=tuple(sorted(reduction, key=key)),
                    need_replication_factors=tuple(sorted(replication, key=key)), **sizes)


# ----------------------------------------------------------------------------- fp8_gemm_nt
def _gemm_rule(shapes, has_bias, has_c, **_):
  (_, k), (n, _) = shapes[0], shapes[2]
  kd, ks, kred, krep, ksizes = _blocks_rule("k", k)
  nd, ns, _, nrep, nsizes = _blocks_rule("n", n)
  operands = [f"m {kd}", f"m {ks}", f"{nd} {kd}", f"{ns} {ks}"]
  operands += [nd] * has_bias + [f"m {nd}"] * has_c
  return _rule(operands, f"m {nd}", kred, krep + nrep, **ksizes, **nsizes)


def _gemm_plan(mesh, shapes, dims, out_dims, *, out_dtype, has_bias, has_c):
  del out_dims
  (_, k), (n, _) = shapes[0], shapes[2]
  m_ax = dims[0][0]
  n_ax = _free(_blocked(mesh, dims[2][0], n), m_ax)
  k_ax = _free(_blocked(mesh, _first(dims[0][1], dims[2][1]), k), m_ax, n_ax)
  specs = [_spec(m_ax, k_ax), _spec(m_ax, k_ax), _spec(n_ax, k_ax), _spec(n_ax, k_ax)]
  specs += [_spec(n_ax)] * has_bias + [_spec(m_ax, n_ax)] * has_c
  params = dict(out_dtype=out_dtype, has_bias=has_bias, has_c=has_c)

  def local(*args):
    if not k_ax:
      return fp8_gemm_nt_p.local.bind(*args, **params)
    # Each device holds a K-slice: FP32 partial products, summed across the K shards. Bias
    # and C are added once, after the sum. (The bias [N] broadcast explicitly: under
    # jax_numpy_rank_promotion='raise' [M, N] + [N] failed the partitioning.)
    a, sa, b, sb, *rest = args
    d = fp8_gemm_nt_p.local.bind(a, sa, b, sb, out_dtype=F32, has_bias=False, has_c=False)
    d = jax.lax.psum(d, k_ax)
    for extra in rest:
      d = d + jnp.broadcast_to(extra.astype(F32), d.shape)
    return d.astype(out_dtype)

  return specs, _spec(m_ax, n_ax), local


# ----------------------------------------------------------------------------- m-grouped
def _grouped_rule(shapes, **_):
  (_, k), (_, n, _) = shapes[0], shapes[2]
  kd, ks, kred, krep, ksizes = _blocks_rule("k", k)
  nd, ns, _, nrep, nsizes = _blocks_rule("n", n)
  # The group sizes get their own factor `h`: they are global, never split.
  operands = [f"m {kd}", f"m {ks}", f"g {nd} {kd}", f"g {ns} {ks}", "h"]
  return _rule(operands, f"m {nd}", ("g",) + kred, ("h",) + krep + nrep, **ksizes, **nsizes)


def _grouped_plan(mesh, shapes, dims, out_dims, *, out_dtype):
  del out_dims
  (_, k), (g, n, _) = shapes[0], shapes[2]
  m_ax = dims[0][0]
  n_ax = _free(_blocked(mesh, dims[2][1], n), m_ax)
  g_ax = _free(_split(mesh, dims[2][0], g), m_ax, n_ax)
  k_ax = _free(_blocked(mesh, _first(dims[0][1], dims[2][2]), k), m_ax, n_ax, g_ax)
  specs = [_spec(m_ax, k_ax), _spec(m_ax, k_ax), _spec(g_ax, n_ax, k_ax),
           _spec(g_ax, n_ax, k_ax), P()]
  reduce_axes = g_ax + k_ax

  def local(a, sa, b, sb, group_sizes):
    if m_ax or g_ax:
      lo, hi = _window(group_sizes, a.shape[0], m_ax, b.shape[0], g_ax,
                       a.shape[0] * _size(mesh, m_ax))
      group_sizes = hi - lo
    if g_ax:
      # The local experts' rows are contiguous, from row lo[0]: bring them to the top (the
      # op's groups start at row 0), and the (zero) output rows back in place afterwards.
      a, sa = jnp.roll(a, -lo[0], axis=0), jnp.roll(sa, -lo[0], axis=0)
    d = m_grouped_contiguous_p.local.bind(a, sa, b, sb, group_sizes,
                                          out_dtype=F32 if reduce_axes else out_dtype)
    if g_ax:
      d = jnp.roll(d, lo[0], axis=0)
    if reduce_axes:
      d = jax.lax.psum(d, reduce_axes).astype(out_dtype)
    return d

  return specs, _spec(m_ax, n_ax), local


# ----------------------------------------------------------------------------- k-grouped
def _k_grouped_rule(shapes, has_c, token_major, **_):
  td, ts, tred, trep, tsizes = _blocks_rule("t", shapes[0][1 if token_major else 0])
  a, b = (f"n {td}", f"k {td}") if token_major else (f"{td} n", f"{td} k")
  operands = [a, f"{ts} n", b, f"{ts} k", "h"] + ["g n k"] * has_c
  return _rule(operands, "g n k", tred, ("h",) + trep, **tsizes)


def _k_grouped_plan(mesh, shapes, dims, out_dims, *, has_c, token_major, out_dtype):
  ti, ci = (1, 0) if token_major else (0, 1)  # token and column axes of a and b
  t, g = shapes[0][ti], shapes[4][0]
  t_ax = _blocked(mesh, _first(dims[0][ti], dims[2][ti]), t)
  n_ax = _free(_first(dims[0][ci], out_dims[1] if out_dims else ()), t_ax)
  k_ax = _free(_first(dims[2][ci], out_dims[2] if out_dims else ()), t_ax, n_ax)
  g_dims = _first(out_dims[0] if out_dims else (), dims[5][0] if has_c else ())
  g_ax = _free(_split(mesh, g_dims, g), t_ax, n_ax, k_ax)
  local_g = g // _size(mesh, g_ax) if g_ax else g
  if g_ax and local_g + 1 > MAX_KERNEL_GROUPS and _kernels_on(mesh):
    # The local op takes one group more than the shard's experts (below): say so, not "got 1025".
    raise ValueError(
        f"{K_GROUPED_OP}: G = {g} split over mesh axes {g_ax} leaves {local_g} "
        f"experts a device, and the Hopper kernel one more group (the tokens before them): "
        f"over its {MAX_KERNEL_GROUPS}; split G over more devices (at most "
        f"{MAX_KERNEL_GROUPS - 1} experts a device)")
  a_spec, b_spec = ((_spec(n_ax, t_ax), _spec(k_ax, t_ax)) if token_major
                    else (_spec(t_ax, n_ax), _spec(t_ax, k_ax)))
  specs = [a_spec, _spec(t_ax, n_ax), b_spec, _spec(t_ax, k_ax), P()]
  specs += [_spec(g_ax, n_ax, k_ax)] * has_c
  params = dict(token_major=token_major)

  def local(a, sa, b, sb, group_sizes, *c):
    if not (t_ax or g_ax):
      return k_grouped_p.local.bind(a, sa, b, sb, group_sizes, *c, has_c=has_c,
                                    out_dtype=out_dtype, **params)
    lo, hi = _window(group_sizes, a.shape[ti], t_ax, local_g, g_ax,
                     a.shape[ti] * _size(mesh, t_ax))
    sizes = hi - lo
    if g_ax:
      # Rows before the first local expert form a leading dummy group, dropped after. (A roll,
      # as in the M-grouped op, would move rows across the 128-token scale blocks.)
      sizes = jnp.concatenate([lo[:1], sizes])
    # FP32 partial sums when they are summed across the token shards; rounded once, after.
    d = k_grouped_p.local.bind(a, sa, b, sb, sizes, has_c=False,
                               out_dtype=F32 if t_ax else out_dtype, **params)
    if g_ax:
      d = d[1:]
    if t_ax:
      d = jax.lax.psum(d, t_ax)
    return (d + c[0] if has_c else d).astype(out_dtype)

  return specs, _spec(g_ax, n_ax, k_ax), local


# ----------------------------------------------------------------------------- m-grouped masked
def _masked_rule(shapes, has_out=False, lead=0, **_):
  (_, _, k), (_, n, _) = shapes[0][lead:], shapes[2][lead:]
  kd, ks, kred, krep, ksizes = _blocks_rule("k", k)
  nd, ns, _, nrep, nsizes = _blocks_rule("n", n)
  # vmap's batch dimensions (lead) are more groups: their own factors, split like G.
  bs = "".join(f"l{i} " for i in range(lead))
  operands = [f"{bs}g m {kd}", f"{bs}g m {ks}", f"{bs}g {nd} {kd}", f"{bs}g {ns} {ks}", f"{bs}g"]
  operands += [f"{bs}g m {nd}"] * has_out
  return _rule(operands, f"{bs}g m {nd}", kred, krep + nrep, **ksizes, **nsizes)


def _masked_plan(mesh, shapes, dims, out_dims, *, expected_m, out_dtype, has_out, lead):
  del out_dims
  (g, _, k), (_, n, _) = shapes[0][lead:], shapes[2][lead:]
  l_ax = []
  for i in range(lead):
    l_ax.append(_free(_split(mesh, _first(dims[0][i], dims[2][i]), shapes[0][i]), *l_ax))
  da, db = dims[0][lead:], dims[2][lead:]
  g_ax = _free(_split(mesh, _first(da[0], db[0]), g), *l_ax)
  m_ax = _free(da[1], g_ax, *l_ax)
  n_ax = _free(_blocked(mesh, db[1], n), g_ax, m_ax, *l_ax)
  k_ax = _free(_blocked(mesh, _first(da[2], db[2]), k), g_ax, m_ax, n_ax, *l_ax)
  spec = lambda *d: _spec(*l_ax, *d)
  specs = [spec(g_ax, m_ax, k_ax), spec(g_ax, m_ax, k_ax), spec(g_ax, n_ax, k_ax),
           spec(g_ax, n_ax, k_ax), spec(g_ax)] + [spec(g_ax, m_ax, n_ax)] * has_out
  params = dict(expected_m=expected_m, lead=lead)

  def local(a, sa, b, sb, masked_m, *out):
    if m_ax:  # rows [r0, r0 + rows) of every group: the valid ones are those < masked_m
      rows = a.shape[lead + 1]
      # (Clipped to the global M_max first: the op hands int32 sizes over unclipped, and
      # -2^31 - r0 would wrap around to a large positive count.)
      masked_m = clip_rows(masked_m, rows * _size(mesh, m_ax))
      masked_m = _rows_here(masked_m, m_ax, rows)
    if not k_ax:
      return masked_p.local.bind(a, sa, b, sb, masked_m, *out, out_dtype=out_dtype,
                                 has_out=has_out, **params)
    # FP32 partial products summed across the K shards; out's rows once, after the sum.
    d = masked_p.local.bind(a, sa, b, sb, masked_m, out_dtype=F32, has_out=False, **params)
    d = jax.lax.psum(d, k_ax).astype(out_dtype)
    return keep_rows_past(d, masked_m, out[0]) if has_out else d

  return specs, spec(g_ax, m_ax, n_ax), local


# ----------------------------------------------------------------------------- FP8 casts
def _cast_rule(shapes, *, blocked, transposed_scales=False, transpose=False, **_):
  """A cast of ``x``: ``q`` is ``x`` (its last two axes swapped with ``transpose``), the
  scales are ``x`` with each axis in ``blocked`` (negative indices) counted in 128-blocks
  (their last two axes swapped too with ``transpose`` where ``transposed_scales``)."""
  x, s, rep, sizes = [], [], (), {}
  for i, n in enumerate(shapes[0]):
    if i - len(shapes[0]) in blocked:
      d, ds, _, r, sz = _blocks_rule(f"d{i}", n)
      x, s, rep, sizes = x + [d], s + [ds], rep + r, {**sizes, **sz}
    else:
      x, s = x + [f"d{i}"], s + [f"d{i}"]
  q = x[:-2] + x[:-3:-1] if transpose else x
  s = s[:-2] + s[:-3:-1] if transpose and transposed_scales else s
  return _rule([" ".join(x)], f"{' '.join(q)}, {' '.join(s)}", (), rep, **sizes)


def _cast_plan(prim, mesh, shapes, dims, out_dims, *, blocked, transposed_scales=False,
               **params):
  del out_dims
  shape = shapes[0]
  axes = [_blocked(mesh, d, n) if i - len(shape) in blocked else d
          for i, (d, n) in enumerate(zip(dims[0], shape))]
  x = _spec(*axes)  # the scales split as x does: a blocked axis holds whole blocks
  swapped = _spec(*axes[:-2], *axes[:-3:-1])
  q = swapped if params.get("transpose") else x
  s = swapped if params.get("transpose") and transposed_scales else x
  return [x], (q, s), lambda x: prim.local.bind(x, **params)


def _pair_rule(shapes, *, axes, results, **_):
  """A cast of ``x [..., A, B]`` (``axes`` = "AB") with both A and B in 128-blocks: each
  result's last two axes as in ``results``, an upper-case letter an axis of ``x``, the
  lower-case one that axis counted in blocks (the scales'). A second operand (the dual
  cast's ``keep_rows``) has ``x``'s leading axes."""
  lead = [f"d{i}" for i in range(len(shapes[0]) - 2)]
  names, rep, sizes = {}, (), {}
  for a, n in zip(axes, shapes[0][-2:]):
    d, ds, _, r, sz = _blocks_rule(a.lower(), n)
    names, rep, sizes = {**names, a: d, a.lower(): ds}, rep + r, {**sizes, **sz}
  dims = lambda letters: " ".join(lead + [names[c] for c in letters])
  operands = [dims(axes)] + [" ".join(lead)] * (len(shapes) - 1)
  return _rule(operands, ", ".join(map(dims, results)), (), rep, **sizes)


def _pair_plan(prim, mesh, shapes, dims, out_dims, *, axes, results, **params):
  del out_dims
  shape = shapes[0]
  split = list(dims[0][:-2]) + [_blocked(mesh, d, n) for d, n in zip(dims[0][-2:], shape[-2:])]
  x = _spec(*split)  # A and B hold whole 128-blocks (or are not split): the scales split as x
  swapped = _spec(*split[:-2], split[-1], split[-2])
  outs = tuple(x if r[0].upper() == axes[0] else swapped for r in results)
  if len(shapes) == 1:
    return [x], outs, lambda x: prim.local.bind(x, **params)
  a_ax, rows = split[-2], shape[-2] // _size(mesh, split[-2])

  def local(x, keep_rows):
    # (keep_rows counts global rows along A; at most the global count: no wrap below.)
    return prim.local.bind(x, _rows_here(keep_rows, a_ax, rows) if a_ax else keep_rows,
                           **params)

  return [x, _spec(*split[:-2])], outs, local


# ----------------------------------------------------------------------------- install
def _explicit_mesh(avals):
  """The mesh of the first operand whose type is sharded over an Explicit mesh axis, or None."""
  return next((a.sharding.mesh for a in avals if _primitive.explicit_spec(a) is not None), None)


def _typed(aval_rule, plan, multi):
  """``aval_rule`` with each result typed as ``plan`` shards it, where operands are typed
  sharded over Explicit axes (elsewhere, results keep the type ``aval_rule`` gives)."""
  def rule(*avals, **params):
    out = aval_rule(*avals, **params)
    mesh = _explicit_mesh(avals)
    if mesh is None:
      return out
    _, out_spec, _ = plan(mesh, [tuple(a.shape) for a in avals], [_dims(mesh, a) for a in avals],
                          None, **params)
    if not multi:
      return out.update(sharding=NamedSharding(mesh, out_spec))
    return [o.update(sharding=NamedSharding(mesh, s)) for o, s in zip(out, out_spec)]
  return rule


def _auto_axes(mesh):
  """``mesh`` with its Explicit axes Auto: where the ops are traced to run as they are.

  The plain op (lowered inside shard_map over some of the mesh's axes, and for jax.export)
  and each device's code (traced by ``partition``, while XLA compiles) have no sharding to
  keep: XLA partitions the former, the latter runs on local shards. Traced on Explicit axes,
  both failed: the references' reshapes and updates of split dimensions ('This reshape is not
  supported', a ShardingTypeError), and the per-device ops came out typed on the caller's
  ``jax.set_mesh`` (jax 0.11), their sharding constraints left in the partitioned code failing
  the run ('No registered implementation for untyped custom call to Sharding').
  """
  return mesh.update_axis_types({n: jax.sharding.AxisType.Auto for n, t in
                                 zip(mesh.axis_names, mesh.axis_types)
                                 if t == jax.sharding.AxisType.Explicit})


def _on_auto_axes(ctx):
  """``ctx`` with its operands and results typed on Auto axes (``_auto_axes``) where they are
  on Explicit ones, and that mesh (None if no type is on an Explicit axis)."""
  avals = list(ctx.avals_in) + list(ctx.avals_out)
  mesh = next((a.sharding.mesh for a in avals if _primitive.explicit_spec(a) is not None), None)
  if mesh is None:
    return ctx, None
  auto = _auto_axes(mesh)
  def retype(a):
    s = getattr(a, "sharding", None)
    if not isinstance(s, NamedSharding) or s.mesh != mesh:
      return a
    return a.update(sharding=NamedSharding(auto, P()))
  return ctx.replace(avals_in=[retype(a) for a in ctx.avals_in],
                     avals_out=[retype(a) for a in ctx.avals_out]), auto


def _on_auto_mesh(mesh, per_device):
  """``per_device`` traced on ``mesh`` with Auto axes (``_auto_axes``), whatever mesh the
  caller's ``jax.set_mesh`` set (XLA calls ``partition`` while compiling, inside it)."""
  auto = _auto_axes(mesh.abstract_mesh)
  @functools.wraps(per_device)
  def run(*xs):
    with jax.sharding.use_abstract_mesh(auto):
      return per_device(*xs)
  return run


def _install(prim, rule, plan, prepare=None):
  """Lowers ``prim`` through ``custom_partitioning`` with ``rule`` (Shardy) and ``plan``.

  ``plan(mesh, shapes, dims, out_dims, **params)`` returns the operand specs the op runs
  with, the output spec (a tuple of specs, one per result, for a primitive with several
  results; ``out_dims`` is then a list too), and the per-device function (of the local
  shards). ``prepare()``, if given, runs first at every lowering (one-time host work that
  must not happen inside XLA's partitioning callback).
  """
  multi = prim.multiple_results

  def lowering(ctx, *args, **params):
    if prepare is not None:
      prepare()

    def local(*xs):
      out = prim.local.bind(*xs, **params)
      return tuple(out) if multi else out

    if (getattr(ctx.module_context.axis_context, "manual_axes", ())
        or ctx.module_context.lowering_parameters.for_export):
      # Inside shard_map: per-device code already (with some axes left automatic, XLA
      # partitions the plain op). jax.export: custom_partitioning's rules are a Python
      # callback, which an exported module cannot carry; XLA partitions the plain op.
      ctx, mesh = _on_auto_axes(ctx)
      with jax.sharding.use_abstract_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        return mlir.lower_fun(local, multiple_results=multi)(ctx, *args)
    shapes = [tuple(a.shape) for a in ctx.avals_in]

    def make(mesh, arg_shapes, result_shape):
      dims = functools.partial(_dims, mesh)
      out_dims = (None if result_shape is None else [dims(r) for r in result_shape] if multi
                  else dims(result_shape))
      return plan(mesh, shapes, [dims(s) for s in arg_shapes], out_dims, **params)

    def named(mesh, out_spec):
      return (tuple(NamedSharding(mesh, s) for s in out_spec) if multi
              else NamedSharding(mesh, out_spec))

    def infer(mesh, arg_shapes, result_shape):
      del result_shape  # GSPMD asks for the result's sharding: follow the operands.
      return named(mesh, make(mesh, arg_shapes, None)[1])

    def partition(mesh, arg_shapes, result_shape):
      specs, out_spec, per_device = make(mesh, arg_shapes, result_shape)
      return (mesh, _on_auto_mesh(mesh, per_device), named(mesh, out_spec),
              tuple(NamedSharding(mesh, s) for s in specs))

    op = custom_partitioning(local)
    text, factors = rule(shapes, **params)
    op.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=text,
                     decode_shardings=False, **factors)
    return mlir.lower_fun(op, multiple_results=multi)(ctx, *args)

  for platform in (None, "cuda"):  # replaces both of _primitive.define's lowerings
    mlir.register_lowering(prim, lowering, platform=platform)
  dispatch.prim_requires_devices_during_lowering.add(prim)
  prim.def_abstract_eval(_typed(prim.aval_rule, plan, multi))


_install(fp8_gemm_nt_p, _gemm_rule, _gemm_plan)
_install(m_grouped_contiguous_p, _grouped_rule, _grouped_plan)
_install(k_grouped_p, _k_grouped_rule, _k_grouped_plan)
_install(masked_p, _masked_rule, _masked_plan)
# (per_block_cast with transpose transposes its scales too; the token-axis cast does not.)
for _prim, _blocked_axes, _ts in ((per_token_cast_p, (-1,), False),
                                  (per_block_cast_p, (-2, -1), True),
                                  (token_axis_cast_p, (-2,), False)):
  _install(_prim, functools.partial(_cast_rule, blocked=_blocked_axes, transposed_scales=_ts),
           functools.partial(_cast_plan, _prim, blocked=_blocked_axes, transposed_scales=_ts),
           prepare=warm_up_division_probes)
# Both casts from one read: the dual cast of x [..., T, C] -> q, s (per token), qt, st (along
# tokens, q transposed); the per-block one of w [..., N, K] -> q, qt, s.
for _prim, _axes, _results in ((dual_cast_p, "TC", ("TC", "Tc", "CT", "tC")),
                               (per_block_dual_cast_p, "NK", ("NK", "KN", "nk"))):
  _pair = dict(axes=_axes, results=_results)
  _install(_prim, functools.partial(_pair_rule, **_pair),
           functools.partial(_pair_plan, _prim, **_pair), prepare=warm_up_division_probes)
