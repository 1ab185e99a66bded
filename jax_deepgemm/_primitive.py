"""The little machinery every op module shares to define a primitive with all its rules."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir
from jax.sharding import AxisType, ManualAxisType, NamedSharding, PartitionSpec

from jax_deepgemm import _ffi


def define(name: str, *, abstract_eval, reference, cuda, batching_rule=None,
           multiple_results: bool = False, vma: bool = True) -> Primitive:
  """Creates primitive ``name``.

  ``reference(*args, **params)`` is plain JAX and lowers the op on every platform;
  ``cuda(*args, **params)`` (plain JAX around ``jax.ffi.ffi_call``) lowers it on CUDA
  when our kernels can run there (see ``_ffi.use_kernels``). ``vma=False``: the
  abstract evaluation types shard_map's varying axes itself.
  """
  prim = Primitive(name)
  prim.multiple_results = multiple_results

  @functools.lru_cache(maxsize=None)
  def _jitted(params):
    return jax.jit(functools.partial(prim.bind, **dict(params)))

  def _impl(*args, **params):
    # Eager calls run the jitted op; under jax.disable_jit, jit would call bind again.
    with jax.disable_jit(False):
      return _jitted(tuple(sorted(params.items())))(*args)

  aval_rule = _with_vma(abstract_eval) if vma else abstract_eval
  prim.def_impl(_impl)
  prim.def_abstract_eval(aval_rule)
  prim.aval_rule = aval_rule  # jax_deepgemm.sharding adds explicit-axis output types to it
  prim.reference = reference  # (tests/test_export.py checks what it calls)
  register_lowerings(prim, reference, cuda, multiple_results=multiple_results)
  # The same op with plain lowerings only: jax_deepgemm.sharding gives `prim` partitioning
  # rules and lowers `prim.local` on each shard.
  prim.local = Primitive(name + "_local")
  prim.local.multiple_results = multiple_results
  prim.local.def_abstract_eval(aval_rule)
  prim.local.reference = reference
  register_lowerings(prim.local, reference, cuda, multiple_results=multiple_results)
  if batching_rule is not None:
    batching.primitive_batchers[prim] = batching_rule

  def no_derivative(primals, tangents, **params):
    # Reached by jax.jvp of the op, and by second derivatives of the layers (their
    # backward runs the op): say so, not just that a rule is missing.
    raise NotImplementedError(
        f"{name}: the op has no derivative (its operands are quantized); differentiate "
        "jax_deepgemm.fp8_linear / fp8_grouped_linear instead, in first-order reverse mode "
        "(jax.grad, jax.vjp): forward mode and second derivatives are not supported")
  ad.primitive_jvps[prim] = no_derivative  # (the casts install their own rule)
  return prim


def register_lowerings(prim, reference, cuda, *, multiple_results=False):
  """``reference`` everywhere; on CUDA ``cuda`` when our kernels can run there.

  Lowered for several platforms (``jax.export`` for ("cpu", "cuda")), each rule lowers in
  its own branch, but JAX caches a nested ``jax.jit``'s lowering per module, not per
  platform: a jitted helper that lowers differently on CUDA (``jnp.cumsum``, and
  ``jnp.repeat`` with ``total_repeat_length``, which calls it: jax 0.11 lowers cumsum for
  CUDA to a chlo.scan composite) was lowered for the CUDA branch and called by the CPU one,
  and XLA:CPU aborted compiling it. So the references call ``jax.lax.cumsum`` (a primitive,
  whose lowering JAX caches per platform), never such a helper.
  """
  ref_rule = mlir.lower_fun(reference, multiple_results=multiple_results)
  cuda_rule = mlir.lower_fun(cuda, multiple_results=multiple_results)
  mlir.register_lowering(prim, ref_rule)
  mlir.register_lowering(
      prim, lambda ctx, *a, **p: (cuda_rule if _ffi.use_kernels() else ref_rule)(ctx, *a, **p),
      platform="cuda")


def _with_vma(abstract_eval):
  """Inside ``jax.shard_map`` the output varies over every manual axis an operand varies over.

  (Without this the output would be typed as invariant, and e.g. a ``custom_vjp`` backward
  through the op would fail shard_map's ``check_vma`` type check.)
  """
  def rule(*avals, **params):
    out = abstract_eval(*avals, **params)
    varying = [a for a in avals if a.manual_axis_type.varying]
    if not varying:
      return out
    vma = frozenset().union(*(a.manual_axis_type.varying for a in varying))
    return out.update(sharding=NamedSharding(varying[0].sharding.mesh, PartitionSpec()),
                      manual_axis_type=ManualAxisType(varying=vma))
  return rule


def match_vma(*xs):
  """Inside ``jax.shard_map``, casts every operand to vary over the same manual axes.

  A ``custom_vjp`` must return cotangents typed like its primal inputs (the backward's weight
  gradient varies wherever the activations do), and a ``scan`` carry like the values it takes.
  Casting (``pcast`` to varying, whose transpose is a ``psum``) makes the types agree. Outside
  shard_map this is a no-op. ``None`` entries pass through.
  """
  vma = frozenset().union(*(jax.typeof(x).manual_axis_type.varying
                            for x in xs if x is not None))
  if not vma:
    return xs
  def cast(x):
    if x is None:
      return x
    missing = tuple(sorted(vma - jax.typeof(x).manual_axis_type.varying))
    return jax.lax.pcast(x, missing, to="varying") if missing else x
  return tuple(map(cast, xs))


def spec_axes(entry):
  """The mesh axes one PartitionSpec entry names, as a tuple (None: ())."""
  return () if entry is None else tuple(entry) if isinstance(entry, tuple) else (entry,)


def explicit_spec(aval):
  """``aval``'s PartitionSpec (one entry per dimension) when its type is sharded over an
  Explicit mesh axis (``jax.sharding.AxisType.Explicit``), else None."""
  s = getattr(aval, "sharding", None)
  if not isinstance(s, NamedSharding):
    return None
  explicit = {n for n, t in zip(s.mesh.axis_names, s.mesh.axis_types) if t == AxisType.Explicit}
  if not {ax for e in s.spec for ax in spec_axes(e)} & explicit:
    return None
  return PartitionSpec(*s.spec, *(None,) * (len(aval.shape) - len(s.spec)))


def split_first(x, lead_dims):
  """The order of ``x``'s first ``lead_dims`` dimensions that puts the ones split over
  Explicit mesh axes first, or None when they already are (or nothing is explicit).

  JAX merges leading dimensions on Explicit axes only in that order: folding ``[B, S@x, K]``
  into rows is refused, ``[S@x, B, K]`` is not. Moving them is a local transpose.
  """
  spec = explicit_spec(jax.typeof(x))
  if spec is None:
    return None
  dims = range(lead_dims)
  order = [d for d in dims if spec[d] is not None] + [d for d in dims if spec[d] is None]
  return None if order == sorted(order) else order


def in_order(x, lead_dims):
  """``x`` with its first ``lead_dims`` dimensions foldable in their own order on Explicit
  axes: those split after an unsplit one are gathered (for folds whose row order matters,
  e.g. a group per batch element; ``keep_types`` splits the result again)."""
  spec = explicit_spec(jax.typeof(x))
  if spec is None or split_first(x, lead_dims) is None:
    return x
  first = next(d for d in range(lead_dims) if spec[d] is None)
  spec = [None if first <= d < lead_dims else e for d, e in enumerate(spec)]
  return jax.sharding.reshard(x, NamedSharding(jax.typeof(x).sharding.mesh, PartitionSpec(*spec)))


def keep_types(y, like):
  """``y`` resharded to ``like``'s leading types (y ``[..., N]``, like ``[..., K]``) where
  they differ and that names no axis y's last dimension is split over."""
  ls, yt = explicit_spec(jax.typeof(like)), jax.typeof(y)
  if ls is None or not isinstance(yt.sharding, NamedSharding):
    return y
  ys = tuple(yt.sharding.spec) + (None,) * (y.ndim - len(yt.sharding.spec))
  if tuple(ls[:-1]) == ys[:-1]:
    return y
  if {a for e in ls[:-1] for a in spec_axes(e)} & set(spec_axes(ys[-1])):
    return y
  mesh = jax.typeof(like).sharding.mesh  # (a replicated y's may name no axes)
  return jax.sharding.reshard(y, NamedSharding(mesh, PartitionSpec(*ls[:-1], ys[-1])))


def fold(x, order=None):
  """``x [..., K]`` as rows ``[R, K]``, its leading dimensions first put in ``order``."""
  if order is not None:
    x = jnp.transpose(x, (*order, *range(len(order), x.ndim)))
  return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # (K may be 0)


def unfold_like(y, lead, order=None):
  """``y [R, N]`` (rows folded from ``lead``'s leading dimensions by ``fold(lead, order)``)
  reshaped to ``lead``'s leading shape + ``[N]``, with ``lead``'s types there where possible."""
  ls = explicit_spec(jax.typeof(lead))
  if order is None:
    return _unfold(y, lead.shape[:-1] + y.shape[-1:], ls)
  # (lead's types in the folded order, without transposing lead itself)
  ls = None if ls is None else PartitionSpec(*(ls[d] for d in order), ls[-1])
  y = _unfold(y, tuple(lead.shape[d] for d in order) + y.shape[-1:], ls)
  back = sorted(range(len(order)), key=order.__getitem__)
  return jnp.transpose(y, (*back, len(order)))


def _unfold(y, shape, ls):
  """``y [R, N]`` reshaped to ``shape`` (``[..., N]``, R the product of its leading sizes).

  On Explicit mesh axes JAX cannot split a row dimension typed over several axes by itself:
  the leading dimensions take the types ``ls`` (the explicit_spec of what was folded into R;
  None: untyped, JAX infers them), ``y``'s rows first resharded to their merge where split
  otherwise; else (that merge would name an axis ``y``'s last dimension is split over) none.
  The last dimension keeps ``y``'s type.
  """
  ys = explicit_spec(jax.typeof(y))
  if ys is None or ls is None:
    return y.reshape(shape)
  leading = (None,) * (len(shape) - 1)
  mesh = jax.typeof(y).sharding.mesh
  merged = sum(map(spec_axes, ls[:len(shape) - 1]), ())
  if merged and merged != spec_axes(ys[0]) and not set(merged) & set(spec_axes(ys[-1])):
    # Rows split otherwise than lead's (gathered by the op, or split over more axes, as by a
    # shard_map over the whole mesh): split as lead's merge first, then unfolded.
    y = jax.sharding.reshard(y, NamedSharding(mesh, PartitionSpec(merged, ys[-1])))
    ys = explicit_spec(jax.typeof(y))
  if merged == spec_axes(ys[0]):
    leading = tuple(ls[:len(shape) - 1])
  return jnp.reshape(y, shape, out_sharding=NamedSharding(mesh, PartitionSpec(*leading, ys[-1])))


def primal_types(*primals):
  """The primals' shardings where one of them is typed over Explicit mesh axes (replicated
  ones as such), else Nones: static, for a custom_vjp backward to give its cotangents the
  primals' types (the ops type their results as their partitioning shards them)."""
  avals = [None if p is None else jax.typeof(p) for p in primals]
  mesh = next((a.sharding.mesh for a in avals if a is not None and explicit_spec(a) is not None),
              None)
  if mesh is None:
    return (None,) * len(primals)
  return tuple(None if a is None else
               NamedSharding(mesh, explicit_spec(a) or PartitionSpec(*(None,) * a.ndim))
               for a in avals)


def retyped(cotangents, types):
  """``cotangents`` resharded to ``types`` (``primal_types``) where those are given."""
  return tuple(c if c is None or t is None else jax.sharding.reshard(c, t)
               for c, t in zip(cotangents, types))


def batch_size(args, dims) -> int:
  return next(x.shape[d] for x, d in zip(args, dims) if d is not None)


def known(size) -> bool:
  """Whether a dimension is a number (not symbolic, as under shape-polymorphic export)."""
  return isinstance(size, int)


def at_front(x, d, size):
  """Moves batch axis ``d`` of ``x`` to the front, broadcasting unbatched operands."""
  if d is None:
    return jnp.broadcast_to(x, (size,) + x.shape)
  return jnp.moveaxis(x, d, 0)


def _unsplit_front(x):
  """``x`` with its leading dimension not split over Explicit mesh axes (lax.map scans it)."""
  spec = explicit_spec(jax.typeof(x))
  if spec is None or spec[0] is None:
    return x
  mesh = jax.typeof(x).sharding.mesh
  return jax.sharding.reshard(x, NamedSharding(mesh, PartitionSpec(None, *spec[1:])))


def map_rule(prim: Primitive, batch_size: int | None = None):
  """A batching rule correct for any combination of batched operands: a loop over the batch.

  Ops install faster rules for the natural cases and fall back to this one. With
  ``batch_size`` the loop runs over chunks of that many elements, each chunk batched again
  (through the op's own rule, which then sees a batch of at most ``batch_size``).
  """
  def rule(args, dims, **params):
    mapped = [jnp.moveaxis(x, d, 0) for x, d in zip(args, dims) if d is not None]

    def one(xs):
      # Unbatched operands (weights, typically) pass through: never copied per element.
      it = iter(xs)
      return prim.bind(*[next(it) if d is not None else x for x, d in zip(args, dims)], **params)

    out = jax.lax.map(one, [_unsplit_front(x) for x in mapped], batch_size=batch_size)
    return jax.tree.map(lambda y: _split_front_like(y, mapped[0]), out), 0
  return rule


def _split_front_like(y, x):
  """``y`` with its leading (batch) dimension split as ``x``'s is over Explicit axes. vmap over
  an Explicit axis types batched values with that axis inserted in their spec at the batch
  dimension; a map's results, typed unsplit there (on no mesh when the op's operands were
  replicated), made e.g. a jitted function after the op fail ('x ... not found in mesh: ()')."""
  spec = explicit_spec(jax.typeof(x))
  if spec is None or spec[0] is None:
    return y
  ys = explicit_spec(jax.typeof(y)) or (None,) * y.ndim
  if {a for e in ys[1:] for a in spec_axes(e)} & set(spec_axes(spec[0])):
    return y  # (the axes are taken in y's other dimensions: leave it to JAX)
  mesh = jax.typeof(x).sharding.mesh
  return jax.sharding.reshard(y, NamedSharding(mesh, PartitionSpec(spec[0], *ys[1:])))
