"""Expert parallelism for :class:`jax_deepgemm.flax.MoE`: experts sharded, tokens all-to-all.

``MoE(..., mesh=mesh, expert_axis="expert")`` runs the layer inside ``jax.shard_map`` over
every axis of ``mesh``: the tokens are split over all mesh axes (data parallel), the routed
experts' weights over ``expert_axis`` (each device holds ``num_experts / size(expert_axis)``
consecutive experts, replicated over the other axes), the router and shared experts are
replicated. Per device::

  x [t, H] (local tokens) --router--> ids, weights [t, k] --sort by expert--> per-destination
  slices --all_to_all(expert_axis)--> rows for my experts from every source [ep, C, H]
  --sort by local expert--> grouped FP8 GEMMs (gate|up, down) on the local experts
  --unsort, all_to_all back--> [t, k, H] --weighted sum over k--> (+ shared) --> y [t, H]

No token is dropped and the result is the single-device layer's: every source reserves
``C = t * min(top_k, experts per device)`` rows for every destination, the most it can send
there (a token picks distinct experts, so at most ``min(top_k, experts per device)`` of them
live on one device). The price is memory: the exchanged buffers have ``ep * C`` rows, up to
``ep`` times more than the ``t * top_k`` rows actually sent. (``jax.lax.ragged_all_to_all``
would send only real rows, but XLA:CPU cannot run it in jax 0.10.2, so it is not used here.)

The load-balancing loss uses the global expert counts and router probabilities (``psum`` over
the mesh), so it is the single-device layer's too. Gradients w.r.t. replicated parameters are
summed over the devices by ``shard_map``'s autodiff.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jax_deepgemm import _primitive
from jax_deepgemm._routing import expert_rows, gather


def make_mesh(data: int | None = None, expert: int | None = None, *, devices=None):
  """A ``("data", "expert")`` mesh over ``devices`` (default: all), with automatic axes.

  Give either size (the other fills the devices) or both; by default every device is on
  the expert axis.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  for name, v in (("data", data), ("expert", expert)):
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1):
      raise ValueError(f"make_mesh: {name} must be a positive int, got {v!r}")
  if data is None and expert is None:
    data, expert = 1, n
  elif data is None:
    data = n // expert if expert and n % expert == 0 else 0
  elif expert is None:
    expert = n // data if data and n % data == 0 else 0
  if not data or not expert or data * expert != n:
    raise ValueError(f"make_mesh: data ({data}) x expert ({expert}) must equal the number of "
                     f"devices ({n})")
  return jax.make_mesh((data, expert), ("data", "expert"), devices=devices,
                       axis_types=(AxisType.Auto, AxisType.Auto))


def check_mesh(mesh, expert_axis: str, num_experts: int):
  """Validates the MoE's mesh arguments; returns the expert axis' size."""
  if not isinstance(mesh, jax.sharding.Mesh):
    raise TypeError(f"MoE: mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
  if expert_axis not in mesh.axis_names:
    raise ValueError(f"MoE: expert_axis {expert_axis!r} is not an axis of the mesh "
                     f"{dict(mesh.shape)}")
  ep = mesh.shape[expert_axis]
  if num_experts % ep:
    raise ValueError(f"MoE: num_experts ({num_experts}) must be divisible by the size of the "
                     f"expert axis {expert_axis!r} ({ep})")
  return ep


def shard_expert_weights(w, mesh, expert_axis):
  """Places ``w [E, ...]`` with its experts split over ``expert_axis``.

  Also where ``w`` is traced, e.g. a model built under ``nnx.jit`` (sharded init) or stacked
  by ``nnx.vmap`` (the experts are then axis 1): ``device_put`` would leave it replicated there,
  or split the stacked axis.
  """
  sharding = NamedSharding(mesh, P(expert_axis))
  if mesh.axis_types[mesh.axis_names.index(expert_axis)] == AxisType.Explicit:
    return jax.sharding.reshard(w, sharding)
  return jax.lax.with_sharding_constraint(w, sharding)


# ----------------------------------------------------------------------------- the layer
def moe_forward(moe, x2, params, mesh, expert_axis, dtype, weights_fp8=None):
  """The expert-parallel forward of ``moe`` (a ``flax.MoE``) on ``x2 [T, H]``.

  ``params``: the module's parameter arrays by name (``router``, ``w_gate_up``,
  ``w_down`` and, with shared experts, ``shared_*``); ``dtype``: the call's compute dtype (the
  layer's, or with its ``dtype=None`` the promotion of x's and the parameters');
  ``weights_fp8``: optional ``moe.quantize_weights()`` (split over the experts like the weights).
  Returns ``(y [T, H], aux)``.
  """
  shards = math.prod(mesh.shape.values())
  if x2.shape[0] % shards:
    raise ValueError(f"MoE: the {x2.shape[0]} tokens must split evenly over the mesh's "
                     f"{shards} devices {dict(mesh.shape)} (tokens are split over every axis)")
  if x2.shape[0] == 0:
    # No tokens: nothing to route or exchange (and eager autodiff of a shard_map whose
    # operands are all empty fails inside Shardy). The single-device layer's result: an empty
    # y and aux = 0, so every gradient is 0.
    return jnp.zeros_like(x2), jnp.zeros((), jnp.float32)
  return _sharded(moe, x2, params, weights_fp8 or {}, mesh=mesh, expert_axis=expert_axis,
                  dtype=dtype)


# Jitted: called eagerly, a shard_map runs (and differentiates) op by op, and jax 0.11.2's
# XLA:CPU crashed compiling one of those ops (a concatenate with an empty operand in the
# group sizes' running sum of the backward): eager nnx.grad ended in a segfault. The layer is
# a pytree argument, so calls with the same configuration reuse the compiled function.
@functools.partial(jax.jit, static_argnames=("mesh", "expert_axis", "dtype"))
def _sharded(moe, x2, params, weights_fp8, *, mesh, expert_axis, dtype):
  token_axes = tuple(mesh.axis_names)
  names = sorted(params)
  specs = {n: P(expert_axis) if n.startswith("w_") else P() for n in names}
  # A weight's FP8 casts split as the weight (each array's leading axis is the expert's).
  specs_fp8 = {n: type(wf)(*(specs[n],) * len(wf)) for n, wf in weights_fp8.items()}
  body = functools.partial(_local_moe, moe, names=names, dtype=dtype, expert_axis=expert_axis,
                           token_axes=token_axes, ep=mesh.shape[expert_axis],
                           total=x2.shape[0])
  run = jax.shard_map(body, mesh=mesh,
                      in_specs=(P(token_axes), [specs[n] for n in names], specs_fp8),
                      out_specs=(P(token_axes), P()))
  args = (x2, [params[n] for n in names], weights_fp8)
  explicit = {a for a, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Explicit}
  if not explicit:
    return run(*args)
  # Inputs typed over Explicit axes must already have shard_map's layout there (reshard
  # takes only those axes: the rest of the mesh may be Auto); y comes back typed as x.
  on_explicit = lambda spec: NamedSharding(mesh, P(*(
      tuple(a for a in _primitive.spec_axes(e) if a in explicit) or None for e in spec)))
  x_type = on_explicit(jax.typeof(x2).sharding.spec)
  args = (_cotangent_as(x2, x_type),) + args[1:]
  args = jax.reshard(args, (on_explicit(P(token_axes)), [on_explicit(specs[n]) for n in names],
                            jax.tree.map(on_explicit, specs_fp8)))
  y, aux = run(*args)
  return jax.reshard(y, x_type), aux


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _cotangent_as(x, sharding):
  """``x``, whose cotangent is resharded to ``sharding`` (x's type): through the shard_map,
  JAX's transpose of the reshard before it leaves dx split as the shard_map's input."""
  del sharding
  return x


_cotangent_as.defvjp(lambda x, sharding: (x, None),
                     lambda sharding, _, ct: (jax.sharding.reshard(ct, sharding),))


def _local_moe(moe, x, param_list, wf, *, names, dtype, expert_axis, token_axes, ep, total):
  """One device: ``x [t, H]`` local tokens, ``w_* [E/ep, ...]`` local experts (and ``wf``
  their FP8 casts, if given: ``{name: Fp8Weight}``)."""
  p = dict(zip(names, param_list))
  t, h, k, e = x.shape[0], x.shape[1], moe.top_k, moe.num_experts
  e_local = e // ep
  cap = t * min(k, e_local)  # rows reserved per destination: the most a source can send

  probs, ids, weights = moe._route(x, p["router"])
  flat = ids.reshape(-1)
  # pos: each token-choice's row when sorted by expert (unpadded: this is the send order).
  _, pos, counts, _ = expert_rows(flat, e, 1)

  # Send buffer [ep, cap, H]: destination d gets the choices of experts d*e_local ... in
  # expert order, from row 0 of its slice. slot[c] is choice c's row in the flat buffer.
  per_dest = counts.reshape(ep, e_local)
  sent = per_dest.sum(1)
  first = jnp.cumsum(sent) - sent
  dest = flat // e_local
  slot = dest * cap + pos - first[dest]                                     # [t*k]
  choice_at = jnp.full((ep * cap,), t * k, jnp.int32).at[slot].set(
      jnp.arange(t * k, dtype=jnp.int32))                                   # fill: t*k
  token_at = jnp.where(choice_at < t * k, choice_at // k, t)                # fill: t

  xc = x.astype(dtype)
  x_send = gather(xc, token_at, slot.reshape(t, k), k)
  x_recv = jax.lax.all_to_all(x_send.reshape(ep, cap, h), expert_axis, 0, 0)
  recv = jax.lax.all_to_all(per_dest, expert_axis, 0, 0)  # [source, local expert] rows

  # Rows from each source are sorted by local expert; sort all of them by local expert
  # (stable: by source within an expert), the unused rows (expert e_local) last. As in the
  # single-device layer, each expert's rows may be padded to whole token blocks: this
  # device's experts get t*k rows on average.
  ends = jnp.cumsum(recv, axis=1)                                           # [ep, e_local]
  row = jnp.arange(cap, dtype=jnp.int32)
  local_expert = jax.vmap(lambda c: jnp.searchsorted(c, row, side="right"))(ends)
  local_expert = local_expert.reshape(-1).astype(jnp.int32)
  lorder, linverse, group_sizes, _ = expert_rows(local_expert, e_local + 1,
                                                 moe._row_align(t * k, e_local))
  group_sizes = group_sizes[:e_local]

  # (Both gathers, into expert order and back, are read in place by the FP8 layers' casts.)
  hid = moe._silu_glu(moe._grouped(x_recv.reshape(ep * cap, h), p["w_gate_up"], group_sizes,
                                   wf.get("w_gate_up"), in_rows=(lorder, linverse[:, None], 1)))
  y_recv = moe._grouped(hid, p["w_down"], group_sizes, wf.get("w_down"),
                        out_rows=(linverse, lorder))
  y_back = jax.lax.all_to_all(y_recv.reshape(ep, cap, h), expert_axis, 0, 0)
  y_tk = gather(y_back.reshape(ep * cap, h), slot, choice_at[:, None], 1).reshape(t, k, h)
  y = jnp.sum(weights[:, :, None] * y_tk.astype(jnp.float32), axis=1)

  if moe.num_shared_experts:
    hs = moe._silu_glu(moe._dense(xc, p["shared_gate_up"], wf.get("shared_gate_up")))
    y = y + moe._dense(hs, p["shared_down"], wf.get("shared_down")).astype(jnp.float32)

  # The single-device layer's load-balancing loss, from global counts and probabilities.
  f = jax.lax.stop_gradient(jax.lax.psum(counts, token_axes).astype(jnp.float32)
                            / max(total * k, 1))
  prob = jax.lax.psum(jnp.sum(probs, axis=0), token_axes) / max(total, 1)
  aux = moe.aux_loss_coef * e * jnp.sum(f * prob)
  return y.astype(x.dtype), aux.astype(jnp.float32)

