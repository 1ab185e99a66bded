"""A DeepSeek-style mixture-of-experts layer for ``flax.nnx`` on top of the FP8 grouped GEMM.

``MoE(hidden, expert_width, num_experts, top_k, rngs=...)`` maps ``x [..., hidden]`` to
``(y [..., hidden], aux_loss)``. Each token is routed to ``top_k`` of ``num_experts`` SwiGLU
experts (``down(silu(gate(x)) * up(x))``); their outputs are mixed with the router's weights and,
optionally, added to a dense shared-expert SwiGLU MLP (DeepSeek-V2/V3's "shared experts").

Layout (no capacity factor, no token dropping, static shapes throughout)::

  x [T, H] --router (f32)--> scores [T, E] --top_k--> ids, weights [T, k]
  token-choices [T*k] sorted by expert id (stable) --gather--> x_sorted [R, H]
                                   (FP8: read in place by x_sorted's cast, never written)
  group_sizes [E]: rows per expert           (a device array: nothing syncs with the host)
  x_sorted --grouped GEMM (gate|up)--> [R, 2W] --silu(gate) * up--> [R, W]
           --grouped GEMM (down)--> y_sorted [R, H]
  y_sorted --inverse gather--> [T, k, H] --weighted sum over k (f32)--> + shared --> y [T, H]

``R = T*k``, or, with ``pad_expert_rows``, each expert's rows padded with zero rows to a multiple
of 128 within a static ``R = T*k + 127 * min(E, T*k)`` (see ``_routing.expert_rows``).

Parameters: ``router [H, E]``, ``w_gate_up [E, H, 2W]`` (gate in columns ``[:W]``, up in
``[W:]``) and ``w_down [E, W, H]`` (the ``jax.lax.ragged_dot`` weight layout ``[G, K, N]``), and,
with ``num_shared_experts > 0``, ``shared_gate_up [H, 2S]`` and ``shared_down [S, H]`` with ``S =
num_shared_experts * expert_width``. Gate and up are one GEMM (as Megatron's fused ``fc1``):
x_sorted is read and quantized once, and the backward pass runs one dgrad GEMM of K = 2W, with
no add of two [R, H] dgrads. (With W not a multiple of 128, one 128-column weight block, and one
1x128 group of the backward's dY, spans the last gate and first up columns: they share a scale.)

Two expert implementations, same parameters, same routing:

* ``experts_impl="fp8"``: :func:`jax_deepgemm.fp8_grouped_linear` (DeepSeek-V3's FP8 recipe: 1x128
  activation scales, 128x128 weight scales, FP8 dgrad and K-grouped FP8 wgrad) for the experts
  and :func:`jax_deepgemm.fp8_linear` for the shared experts.
* ``experts_impl="bf16"``: ``jax.lax.ragged_dot`` / ``jnp.dot`` in the compute ``dtype`` with f32
  accumulation: the baseline to compare FP8 against (with ``dtype=jnp.float32`` it is exact
  enough to check against a dense reference).

The auxiliary load-balancing loss is Switch/DeepSeek's ``E * Σ_e f_e P_e`` (``f_e``: the fraction
of token-choices routed to ``e``, no gradient; ``P_e``: the mean router probability of ``e``),
scaled by ``aux_loss_coef``; it is 1 * coef for perfectly balanced routing.

``Fp8Linear`` is ``nnx.Linear`` with the FP8 GEMM (:func:`jax_deepgemm.fp8_linear`) as its
matmul: the same parameters, so a model can swap one for the other.

Expert parallelism: ``MoE(..., mesh=mesh, expert_axis="expert")`` splits the routed experts
over ``expert_axis`` and the tokens over every axis of ``mesh``, and exchanges tokens with
``all_to_all`` inside ``jax.shard_map`` (see :mod:`jax_deepgemm.expert_parallel`). Same
parameters, same results as without a mesh; the token count must divide by the mesh size.
"""
from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
from flax import nnx
from jax import custom_batching
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jax_deepgemm import _primitive, expert_parallel
from jax_deepgemm._routing import expert_rows, gather
from jax_deepgemm.linear import (_cast_source, _fp8_grouped_linear, _fp8_linear, _of_rows,
                                 quantize_weight)
from jax_deepgemm.quant import is_wide_float

_SCORES = ("softmax", "sigmoid")
_IMPLS = ("fp8", "bf16")


def _specs(*xs):
  return tuple(jax.typeof(x).sharding.spec for x in xs)


def _rows_spec(x):
  """The Explicit axes x's rows are split over (None: unsplit or untyped)."""
  spec = _primitive.explicit_spec(jax.typeof(x))
  return None if spec is None else spec[0]


def _ragged_dot_f32(x, w, group_sizes):
  return jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=jnp.float32)


def _vmap_batching_all(f, depth=0):
  """``f`` whose vmap batches every operand (broadcasting the unbatched ones): ragged_dot's
  batching rule takes no other case ('ragged_dot vmap over any dim but 0 - NYI', e.g. a layer
  vmapped over x alone). ``depth``: the leading batch dimensions every operand has."""
  def batched(*args):
    if depth <= 1:
      return jax.vmap(f)(*args) if depth else f(*args)
    # Nested vmap: the batch dimensions are merged into one, since JAX's ragged_dot with two
    # batch dimensions fails ('vmap in_axes must be an int, ...', jax 0.10 and 0.11).
    lead = args[0].shape[:depth]
    flat = [a.reshape((math.prod(lead),) + a.shape[depth:]) for a in args]
    return jax.tree.map(lambda o: o.reshape(lead + o.shape[1:]), jax.vmap(f)(*flat))

  f_all = custom_batching.custom_vmap(batched)

  @f_all.def_vmap
  def rule(axis_size, in_batched, *args):
    args = [a if b else jnp.broadcast_to(a, (axis_size,) + a.shape)
            for a, b in zip(args, in_batched)]
    # Batched again by a custom_vmap: under nested vmap an outer level then batches this
    # (with its own mix of batched operands), not a bare ragged_dot.
    out = _vmap_batching_all(f, depth + 1)(*args)
    return out, jax.tree.map(lambda _: True, out)
  return f_all


# custom_vmap has no reverse mode, so the gradient is a custom_vjp whose two directions are
# each batched as above.
def _first_order_only(f):
  """``f``, whose derivative raises a named error. Differentiating the gradient below (grad of
  grad) differentiates both of its directions, which custom_vmap cannot ('Linearization failed
  to produce known values for all output primals', JAX's error)."""
  g = jax.custom_jvp(f)

  @g.defjvp
  def jvp(primals, tangents):
    del primals, tangents
    raise NotImplementedError(
        "MoE(experts_impl='bf16'): the grouped GEMMs' gradient has no derivative: "
        "first-order reverse mode only (jax.grad, jax.vjp); forward mode and second "
        "derivatives are not supported, as with experts_impl='fp8'")
  return g


_ragged_fwd = _first_order_only(_vmap_batching_all(_ragged_dot_f32))
_ragged_bwd = _first_order_only(_vmap_batching_all(lambda x, w, g, dy: tuple(
    d.astype(p.dtype) for d, p in
    zip(jax.vjp(lambda x, w: _ragged_dot_f32(x, w, g), x, w)[1](dy), (x, w)))))


@jax.custom_vjp
def _ragged_f32(x, w, group_sizes):
  return _ragged_fwd(x, w, group_sizes)


_ragged_f32.defvjp(lambda x, w, g: (_ragged_fwd(x, w, g), (x, w, g)),
                   lambda res, dy: (*_ragged_bwd(*res, dy), None))


@jax.custom_vjp
def _ragged_dot_on_auto_axes(x, w, group_sizes):
  """``ragged_dot`` (f32 result) under Explicit mesh axes, where JAX infers no result type
  for it nor for its transpose: both run on Auto axes (``auto_axes``), typed as x's rows
  and as the primals."""
  return _ragged_dot_on_auto_axes_fwd(x, w, group_sizes)[0]


def _ragged_dot_on_auto_axes_fwd(x, w, group_sizes):
  y = jax.sharding.auto_axes(_ragged_f32, out_sharding=P(_rows_spec(x), None))(x, w, group_sizes)
  return y, (x, w, group_sizes)


def _ragged_dot_on_auto_axes_bwd(res, dy):
  x, w, group_sizes = res
  grads = lambda x, w, g, dy: jax.vjp(lambda x, w: _ragged_f32(x, w, g), x, w)[1](dy)
  dx, dw = jax.sharding.auto_axes(grads, out_sharding=_specs(x, w))(x, w, group_sizes, dy)
  return dx.astype(x.dtype), dw.astype(w.dtype), None


_ragged_dot_on_auto_axes.defvjp(_ragged_dot_on_auto_axes_fwd, _ragged_dot_on_auto_axes_bwd)


# ----------------------------------------------------------------------------- Linear
class Fp8Linear(nnx.Linear):
  """``nnx.Linear`` whose matmul is :func:`jax_deepgemm.fp8_linear` (DeepSeek-V3's FP8 recipe).

  A drop-in: same arguments, initializers, parameters (``kernel [in, out]``, ``bias [out]``)
  and metadata as ``nnx.Linear``, so a model's state moves between the two unchanged (e.g. train
  in FP8, evaluate in bf16). The inputs and parameters are promoted to ``dtype`` as
  ``nnx.Linear`` does; the FP8 GEMM then takes them (x per 1x128, the kernel per 128x128 block,
  cast from the parameter itself: f32 parameters are not first rounded to a bf16 copy, which
  XLA would write and the cast read again; the kernel's gradient is still computed in the
  promoted dtype, as ``nnx.Linear``'s is) and returns the promoted dtype, or
  ``preferred_element_type`` (the GEMM writes it: f32 from
  bf16 inputs is the f32 accumulator, not a bf16 result cast up; as in ``nnx.Linear``, whose bias
  is added after the dot, the result promotes with the bias: ``preferred_element_type=bf16``
  with an f32 bias gives f32, the bias added in f32).
  ``precision`` may only be the default (``None`` or ``Precision.DEFAULT``, in any spelling
  ``lax.dot_general`` takes), as an FP8 GEMM cannot honour a higher one; a ``dot_general`` is
  refused. A call's ``out_sharding`` types the result as ``nnx.Linear``'s does (the GEMM runs
  on the operands' shardings, then the result is resharded to it). ``w_fp8``: optional
  ``self.quantize_weight()``, the kernel cast once for several calls (micro-batches).
  """

  def __init__(self, in_features: int, out_features: int, **kwargs):
    precision = kwargs.get("precision")
    if not _default_precision(precision):
      raise ValueError(f"Fp8Linear: precision={precision!r} cannot be honoured: the matmul is "
                       f"the FP8 GEMM (e4m3 operands, f32 accumulation); pass None or "
                       f"jax.lax.Precision.DEFAULT")
    if kwargs.get("dot_general", jax.lax.dot_general) is not jax.lax.dot_general:
      raise ValueError("Fp8Linear: dot_general is not supported (the matmul is the FP8 GEMM)")
    super().__init__(in_features, out_features, **kwargs)

  def quantize_weight(self, x_dtype=None):
    """The kernel's FP8 casts for ``__call__(inputs, w_fp8=...)``, made once for several calls
    with the same kernel (micro-batches; see ``jax_deepgemm.quantize_weight``). ``x_dtype``: the
    inputs' dtype, needed only when ``dtype`` is None (the call casts a bf16, f16 or f32 kernel
    as it is, an f64 one converted to the dtype the call promotes to first)."""
    if self.dtype is None and x_dtype is None:
      raise ValueError("Fp8Linear.quantize_weight: dtype is None, so the call's dtype follows "
                       "the inputs': pass x_dtype, the dtype of the inputs it will be called with")
    x = jnp.zeros((), self.dtype or x_dtype)
    bias = self.bias[...] if self.bias is not None else None
    _, kernel, _ = self.promote_dtype((x, self.kernel[...], bias), dtype=self.dtype)
    return quantize_weight(_cast_source(self.kernel[...], kernel.dtype))

  def __call__(self, inputs, out_sharding=None, *, w_fp8=None):
    param = self.kernel[...]
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias = self.promote_dtype((inputs, param, bias), dtype=self.dtype)
    out = None
    if self.preferred_element_type is not None:
      # nnx.Linear adds the bias to its dot's preferred_element_type result, so its output
      # promotes with the bias (bf16 with an f32 bias gives f32): the same dtype here,
      # written by the GEMM itself (an f32 result from bf16 inputs is not rounded to bf16).
      out = self.preferred_element_type
      out = out if bias is None else jnp.promote_types(out, bias.dtype)
    # The cast reads the kernel in its parameter dtype, and W's gradient is computed in the
    # promoted dtype, as for the promoted copy (see MoE._grouped).
    y = _fp8_linear(inputs, _cast_source(param, kernel.dtype), bias, out, w_fp8,
                    w_grad_dtype=kernel.dtype)
    # nnx.Linear hands out_sharding to its dot_general, whose result takes that type (e.g.
    # row-parallel under Explicit axes, where a split contraction leaves it ambiguous). Our op
    # types its result from the operands' shardings, so it is resharded; reshard checks the
    # sharding as dot_general does (a PartitionSpec needs jax.set_mesh, Auto axis names are
    # refused) and an empty mesh's NamedSharding means none, as there.
    if out_sharding is None or (isinstance(out_sharding, NamedSharding) and
                                out_sharding.mesh.empty):
      return y
    return jax.sharding.reshard(y, out_sharding)


def _default_precision(precision) -> bool:
  """Whether ``precision`` asks for ``lax.dot_general``'s default: None, ``Precision.DEFAULT``
  (also spelt 'default', 'bfloat16' or 'fastest', or as a pair) or ``DotAlgorithmPreset.DEFAULT``
  (or its name), as nnx.Linear would pass them on."""
  def default(p):
    if isinstance(p, str):
      try:
        p = jax.lax.Precision(p)
      except ValueError:
        return False
    return p is jax.lax.Precision.DEFAULT

  if precision is None or precision in (jax.lax.DotAlgorithmPreset.DEFAULT, "DEFAULT"):
    return True
  if isinstance(precision, (tuple, list)):
    return len(precision) == 2 and all(map(default, precision))
  return default(precision)


# ----------------------------------------------------------------------------- module
class MoE(nnx.Module):
  """Top-k routed SwiGLU experts (+ optional shared experts) with FP8 or bf16 grouped GEMMs.

  Args:
    hidden: model width ``H`` (input and output features).
    expert_width: intermediate width ``W`` of each routed expert.
    num_experts: number of routed experts ``E``.
    top_k: experts per token ``k`` (``1 <= k <= E``).
    rngs: ``nnx.Rngs`` for the initializers.
    score: ``"softmax"`` or ``"sigmoid"`` router scores.
    normalize_topk: renormalize the k chosen scores to sum to 1 (always done for sigmoid).
    num_shared_experts: if > 0, a dense SwiGLU of width ``num_shared_experts * expert_width``
      applied to every token and added to the routed output.
    experts_impl: ``"fp8"`` (jax_deepgemm's FP8 GEMMs) or ``"bf16"`` (``ragged_dot`` in ``dtype``).
    dtype: compute dtype of the expert GEMMs (the router always runs at f32 accuracy and the
      combine sums in f32; with FP8 experts on one device the combined routed output is
      rounded to ``dtype`` before any shared experts' is added); ``None``, as in
      ``nnx.Linear``: the promotion of x's and the parameters' dtypes (bf16 x and bf16
      parameters compute in bf16, bf16 x and f32 parameters in f32).
    param_dtype: dtype of the parameters. The FP8 experts' weight casts read them as they are
      (f32 parameters are not first converted to a ``dtype`` copy, which XLA would write and
      the cast read again: 1.76 ms of an H100's step at H 7168, 32 experts); their
      gradients are computed in ``dtype``, as that copy's were.
    aux_loss_coef: scale of the load-balancing loss returned next to the output.
    mesh: optional ``jax.sharding.Mesh``: run expert-parallel over it (experts split over
      ``expert_axis``, tokens over all its axes); ``num_experts`` must divide by the size of
      ``expert_axis``. The expert weights then carry Flax's sharding metadata
      (``out_sharding=(expert_axis, None, None)``), so ``nnx.get_partition_spec`` and
      ``nnx.get_named_sharding`` give their split; layers stacked by ``nnx.vmap`` need
      ``transform_metadata={nnx.PARTITION_NAME: None}`` for it to name the stacked axis.
    expert_axis: the mesh axis the experts are split over.
    pad_expert_rows: pad each expert's routed rows with zero rows to a multiple of 128
      (DeepGEMM's contiguous layout) so that no 128-token block of the weight gradient spans
      two experts: the K-grouped kernel then masks nothing, and each token-axis FP8 scale
      covers one expert's tokens. ``None`` (default): with ``experts_impl="fp8"`` when the
      padding's static bound (127 rows per expert that can be routed to) is at most twice the
      ``T*k`` routed rows (64 experts: from 4064 rows on, e.g. 508 tokens at top-8), where it
      made the H100's training step 1.06-1.34x faster (README); smaller batches (decode) would
      mostly run padding. With ``mesh``, on each device's rows and experts.
  """

  def __init__(self, hidden: int, expert_width: int, num_experts: int, top_k: int, *,
               rngs: nnx.Rngs, score: str = "softmax", normalize_topk: bool = True,
               num_shared_experts: int = 0, experts_impl: str = "fp8",
               dtype=jnp.bfloat16, param_dtype=jnp.float32, aux_loss_coef: float = 1e-2,
               mesh=None, expert_axis: str = "expert", pad_expert_rows: bool | None = None):
    def count(name, v, what, low):  # (NumPy integers too; stored as Python ints)
      if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < low:
        raise ValueError(f"MoE: {name} must be {what}, got {v!r}")
      return int(v)
    hidden, expert_width, num_experts, top_k = (
        count(name, v, "a positive int", 1)
        for name, v in (("hidden", hidden), ("expert_width", expert_width),
                        ("num_experts", num_experts), ("top_k", top_k)))
    if top_k > num_experts:
      raise ValueError(f"MoE: top_k ({top_k}) must be <= num_experts ({num_experts})")
    num_shared_experts = count("num_shared_experts", num_shared_experts, "an int >= 0", 0)
    if score not in _SCORES:
      raise ValueError(f"MoE: score must be one of {_SCORES}, got {score!r}")
    if experts_impl not in _IMPLS:
      raise ValueError(f"MoE: experts_impl must be one of {_IMPLS}, got {experts_impl!r}")
    if dtype is not None and not is_wide_float(jnp.dtype(dtype)):
      # (An 8-bit float passed as floating and failed in the FP8 GEMM's input check.)
      raise ValueError(f"MoE: dtype must be a floating dtype of 16 bits or more (the compute "
                       f"dtype: bf16, f16, f32 or f64), got {dtype!r}")
    if not is_wide_float(jnp.dtype(param_dtype)):
      # (8-bit float parameters initialised to NaN, silently.)
      raise ValueError(f"MoE: param_dtype must be a floating dtype of 16 bits or more, got "
                       f"{param_dtype!r}")
    try:  # (a number, NumPy's or a 0-d array too; float() alone took "1" and True)
      coef = None if isinstance(aux_loss_coef, (bool, str, bytes)) else float(aux_loss_coef)
    except (TypeError, ValueError):
      coef = None
    if coef is None or not math.isfinite(coef):
      raise ValueError(f"MoE: aux_loss_coef must be a finite number, got {aux_loss_coef!r}")
    if mesh is not None:
      expert_parallel.check_mesh(mesh, expert_axis, num_experts)
    if pad_expert_rows is not None and not isinstance(pad_expert_rows, bool):
      raise ValueError(f"MoE: pad_expert_rows must be None, True or False, got "
                       f"{pad_expert_rows!r}")

    self.hidden, self.expert_width = hidden, expert_width
    self.num_experts, self.top_k = num_experts, top_k
    self.score, self.experts_impl = score, experts_impl
    # Sigmoid scores don't sum to 1 over the experts, so the chosen ones are always normalized
    # (DeepSeek-V3).
    self.normalize_topk = bool(normalize_topk) or score == "sigmoid"
    self.num_shared_experts = num_shared_experts
    self.dtype, self.param_dtype = dtype, param_dtype
    self.aux_loss_coef = coef
    self.mesh, self.expert_axis = mesh, expert_axis
    self.pad_expert_rows = pad_expert_rows

    # Router: small init so the initial routing is close to uniform.
    self.router = nnx.Param(
        nnx.initializers.normal(0.02)(rngs.params(), (hidden, num_experts), param_dtype))
    # Experts: lecun-normal per expert (fan-in = the contracted axis; axis 0 is the expert).
    init = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
    e, w = num_experts, expert_width
    # With a mesh, each device keeps only its experts, and the Params say so to Flax's
    # sharding tools (nnx.get_partition_spec / get_named_sharding, which the sharded-init and
    # checkpoint-restore recipes apply: without it they read P() and replicated the experts).
    # Placed here, not by Flax (eager_sharding=False): `place` also handles traced values.
    place = ((lambda v: v) if mesh is None else
             functools.partial(expert_parallel.shard_expert_weights, mesh=mesh,
                               expert_axis=expert_axis))
    meta = {} if mesh is None else dict(out_sharding=(expert_axis, None, None),
                                        eager_sharding=False)
    # (lecun-normal's scale depends on the fan-in H only: gate and up columns as if separate.)
    self.w_gate_up = nnx.Param(place(init(rngs.params(), (e, hidden, 2 * w), param_dtype)),
                               **meta)
    self.w_down = nnx.Param(place(init(rngs.params(), (e, w, hidden), param_dtype)), **meta)
    if num_shared_experts:
      s = num_shared_experts * expert_width
      dense = nnx.initializers.lecun_normal()
      self.shared_gate_up = nnx.Param(dense(rngs.params(), (hidden, 2 * s), param_dtype))
      self.shared_down = nnx.Param(dense(rngs.params(), (s, hidden), param_dtype))
    else:
      self.shared_gate_up = self.shared_down = None

  # --------------------------------------------------------------------------- GEMMs
  # x comes in the compute dtype (cast once, before the expert GEMMs): the GEMMs run in it.
  # in_rows / out_rows (fp8_grouped_linear_of_rows): the GEMM of the rows gather(x, *in_rows),
  # its result gathered by out_rows (the dispatch and the combine); the FP8 layer's casts read
  # both in place (no gathered copy of x or of the result's cotangent written and read again).
  # out_rows (idx, inv, weights): the combine, y[t] = Σ_j weights[t, j] · y_rows[idx[t·k + j]]
  # (in f32; the FP8 layer's result is rounded to x's dtype).
  # FP8 layers read W in its parameter dtype (_cast_source: f32 parameters are not converted
  # to a bf16 copy first) and compute its gradient in x's dtype, as for that copy.
  def _grouped(self, x, w, group_sizes, w_fp8=None, in_rows=None, out_rows=None):
    if self.experts_impl == "fp8" and _primitive.explicit_spec(jax.typeof(x)) is None:
      # (Typed over Explicit axes, below: the gathered casts have no typed sharding rule.)
      return _of_rows(x, _cast_source(w, x.dtype), group_sizes, w_fp8, in_rows, out_rows,
                      w_grad_dtype=x.dtype)
    if in_rows is not None:
      x = gather(x, *in_rows)
    y = self._grouped_plain(x, w, group_sizes, w_fp8)
    if out_rows is None:
      return y
    y = gather(y, out_rows[0], out_rows[1][:, None], 1)
    if len(out_rows) == 2:
      return y
    weights = out_rows[2]
    y_tk = y.reshape(*weights.shape, y.shape[-1])
    return jnp.sum(weights[:, :, None] * y_tk.astype(jnp.float32), axis=1)

  def _grouped_plain(self, x, w, group_sizes, w_fp8):
    if self.experts_impl == "fp8":
      return _fp8_grouped_linear("fp8_grouped_linear", x, _cast_source(w, x.dtype),
                                 group_sizes, w_fp8, w_grad_dtype=x.dtype)
    w = w.astype(x.dtype)
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and AxisType.Explicit in mesh.axis_types:
      return _ragged_dot_on_auto_axes(x, w, group_sizes).astype(x.dtype)
    return _ragged_f32(x, w, group_sizes).astype(x.dtype)

  def _row_align(self, rows: int, experts: int | None = None) -> int:
    """128 where the ``rows`` routed to ``experts`` (default: all) are padded to whole token
    blocks (``_routing.expert_rows``), else 1."""
    pad = self.pad_expert_rows
    if pad is None:
      experts = self.num_experts if experts is None else experts
      pad = self.experts_impl == "fp8" and min(experts, rows) * 127 <= 2 * rows
    return 128 if pad else 1

  @staticmethod
  def _silu_glu(gate_up):
    """``silu(gate) * up`` of the fused gate|up GEMM's ``[..., 2W]`` output (gate first)."""
    gate, up = jnp.split(gate_up, 2, axis=-1)
    return jax.nn.silu(gate) * up

  def _dense(self, x, w, w_fp8=None):
    if self.experts_impl == "fp8":
      return _fp8_linear(x, _cast_source(w, x.dtype), None, None, w_fp8, w_grad_dtype=x.dtype)
    w = w.astype(x.dtype)
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)

  def _check_shapes(self, params):
    # Parameters replaced after init (nnx.update from another configuration's state) failed
    # deep inside the layer ('mul got incompatible shapes for broadcasting: (4,), (8,)').
    h, w, e = self.hidden, self.expert_width, self.num_experts
    s = self.num_shared_experts * w
    want = dict(router=(h, e), w_gate_up=(e, h, 2 * w), w_down=(e, w, h),
                shared_gate_up=(h, 2 * s), shared_down=(s, h))
    for name, p in params.items():
      if p.shape != want[name]:
        raise ValueError(f"MoE: {name} must have shape {want[name]} (hidden {h}, expert_width "
                         f"{w}, num_experts {e}, num_shared_experts "
                         f"{self.num_shared_experts}), got {p.shape}")

  def _param_values(self):
    names = ["router", "w_gate_up", "w_down"]
    names += ["shared_gate_up", "shared_down"] if self.num_shared_experts else []
    params = {n: getattr(self, n)[...] for n in names}
    self._check_shapes(params)
    return params

  def quantize_weights(self, x_dtype=None):
    """The experts' weights cast to FP8 once, for ``__call__(x, weights_fp8=...)``.

    The layer casts its expert weights on every call (14% of an H100's training step at 8192
    tokens, H 7168, 64 experts). With gradient accumulation the parameters stay the same over
    a step's micro-batches: make this once per step, outside the micro-batch loop, and pass it
    to every call, which then casts none of them (see ``jax_deepgemm.quantize_weight``; no
    gradient flows through it, the parameters' gradients come from the calls as before). It
    must be remade whenever the parameters change.

    Args:
      x_dtype: the dtype of the ``x`` the layer will be called with; needed only when the
        layer's ``dtype`` is None (then the compute dtype follows x's and the parameters'
        dtypes; the casts read bf16, f16 and f32 weights as they are, and f64 ones converted
        to it first, as the call does).
    Returns:
      ``{name: Fp8Weight}`` for ``w_gate_up``, ``w_down`` (and ``shared_gate_up``,
      ``shared_down`` with shared experts).
    """
    if self.experts_impl != "fp8":
      raise ValueError("MoE.quantize_weights: experts_impl='bf16' has no FP8 weights")
    if self.dtype is None and x_dtype is None:
      raise ValueError("MoE.quantize_weights: the layer's dtype is None, so its compute dtype "
                       "follows x: pass x_dtype, the dtype of the x it will be called with")
    params = self._param_values()
    dtype = self._compute_dtype(jnp.zeros((), x_dtype or jnp.float32), params.values())
    return {n: quantize_weight(_cast_source(p, dtype)) for n, p in params.items()
            if n != "router"}

  def _compute_dtype(self, x, params):
    # dtype=None: nnx.Linear's rule (flax's promote_dtype), x with every parameter.
    return self.dtype if self.dtype is not None else jnp.result_type(x, *params)

  def _check_weights_fp8(self, weights_fp8, params):
    """``weights_fp8`` as ``quantize_weights`` makes it (the layers check each one's shapes
    and dtypes against its parameter), as a dict; ``{}`` for None."""
    if weights_fp8 is None:
      return {}
    if self.experts_impl != "fp8":
      raise ValueError("MoE: weights_fp8 needs experts_impl='fp8'")
    want = sorted(n for n in params if n != "router")
    if not isinstance(weights_fp8, dict) or sorted(weights_fp8) != want:
      got = sorted(weights_fp8) if isinstance(weights_fp8, dict) else type(weights_fp8).__name__
      raise ValueError(f"MoE: weights_fp8 must be quantize_weights()'s dict of {want}, got {got}")
    return weights_fp8

  # --------------------------------------------------------------------------- routing
  def _route(self, x2, router=None):
    """f32 router: returns (probs [T, E] for the aux loss, ids [T, k], weights [T, k])."""
    router = self.router[...] if router is None else router
    # Routing decisions are discrete and sensitive to small logit changes, so the router runs
    # at f32 accuracy (no TF32 or single bf16 pass) whatever the compute dtype: as six bf16
    # passes of each operand's three bf16 parts, exact products when x is bf16, on tensor
    # cores (HIGHEST, on FP32 cores, took 0.8 ms of an H100's MoE step at 8192 tokens).
    kw = {}
    xs, rs = (_primitive.explicit_spec(jax.typeof(v)) for v in (x2, router))
    if xs is not None or rs is not None:
      # On Explicit axes a hidden dimension split in both (a re-typed router, say) needs the
      # result's type named: the tokens' rows, the experts whole (the sum is all-reduced).
      mesh = jax.typeof(x2 if xs is not None else router).sharding.mesh
      kw["out_sharding"] = NamedSharding(mesh, P(_rows_spec(x2), None))
    precision = jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X6
    if 1 in (x2.shape[0], *router.shape):
      # XLA may emit a dot with unit dimensions elementwise (two of them did on CPU), which
      # has no X6 algorithm ("not supported by the ElementalIrEmitter"). It is tiny: plain f32.
      precision = jax.lax.Precision.HIGHEST
    logits = jnp.dot(x2.astype(jnp.float32), router.astype(jnp.float32), precision=precision,
                     **kw)
    if self.score == "sigmoid":
      # s / sum(s) of sigmoid scores, taken in log space: sigmoid underflows to 0 below logits
      # of about -100, where it was 0 / 0 = NaN. (log_sigmoid is monotonic: the same top-k.)
      log_scores = jax.nn.log_sigmoid(logits)
      weights, ids = jax.lax.top_k(log_scores, self.top_k)
      return jax.nn.softmax(log_scores, axis=-1), ids, jax.nn.softmax(weights, axis=-1)
    scores = jax.nn.softmax(logits, axis=-1)
    probs = scores
    weights, ids = jax.lax.top_k(scores, self.top_k)
    if self.normalize_topk:
      weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return probs, ids, weights

  def __call__(self, x, *, weights_fp8=None):
    """``y, aux_loss`` of ``x [..., hidden]``; ``weights_fp8``: optional
    ``self.quantize_weights()``, made once for several calls (micro-batches)."""
    x = jnp.asarray(x)
    if not is_wide_float(x.dtype):
      raise TypeError(f"MoE: x must be bf16, f16, f32 or f64, got {x.dtype}")
    if x.ndim < 1 or x.shape[-1] != self.hidden:
      raise ValueError(f"MoE: x must be [..., {self.hidden}], got {x.shape}")
    x_in, spec = x, _primitive.explicit_spec(jax.typeof(x))
    if self.mesh is None and spec is not None and any(spec[:-1]):
      # Tokens split over Explicit mesh axes: the routing sort runs over all of them, so they
      # are gathered here (in order: the result is the unsharded layer's) and split again at
      # the end (keep_types). mesh= runs the layer expert-parallel instead.
      x = jax.sharding.reshard(x, NamedSharding(jax.typeof(x).sharding.mesh,
                                                P(*(None,) * (x.ndim - 1), spec[-1])))
    fold = _primitive.split_first(x, x.ndim - 1)  # (x's split dimensions first, see fold)
    x2 = _primitive.fold(x, fold)
    t, k, e = x2.shape[0], self.top_k, self.num_experts
    params = self._param_values()
    dtype = self._compute_dtype(x2, params.values())
    wf = self._check_weights_fp8(weights_fp8, params)
    if self.mesh is not None:
      y, aux = expert_parallel.moe_forward(self, x2, params, self.mesh, self.expert_axis, dtype,
                                           wf)
      return _primitive.unfold_like(y, x, fold), aux

    probs, ids, weights = self._route(x2)

    # Sort the T*k token-choices by expert. The stable sort keeps tokens in order within each
    # expert; `inverse` maps each token-choice to its row in the sorted layout.
    order, inverse, group_sizes, counts = expert_rows(ids.reshape(-1), e,
                                                      self._row_align(t * k))

    xc = x2.astype(dtype)  # cast before the gather: k copies of fewer bytes
    # Row r of the sorted layout is token order[r] // k (a zero row for padding, order T*k).
    h = self._silu_glu(self._grouped(xc, params["w_gate_up"], group_sizes, wf.get("w_gate_up"),
                                     in_rows=(order // k, inverse.reshape(t, k), k)))
    # Back to token order (token-choice i: the sorted row inverse[i]) with the weighted sum
    # over the k choices, accumulated in f32 (elementwise, not a dot, so no TF32/bf16 matmul
    # precision applies to it on GPU). The FP8 layer's backward then reads dy's rows times
    # their weights in place: the weighted [T·k, H] cotangent is never written.
    y = self._grouped(h, params["w_down"], group_sizes, wf.get("w_down"),
                      out_rows=(inverse, order, weights)).astype(jnp.float32)

    if self.num_shared_experts:
      hs = self._silu_glu(self._dense(xc, params["shared_gate_up"], wf.get("shared_gate_up")))
      y = y + self._dense(hs, params["shared_down"], wf.get("shared_down")).astype(jnp.float32)

    # Load balance: f_e counts routed choices (no gradient), P_e carries the router gradient.
    # (max(.., 1): an empty batch gives aux = 0, not NaN.)
    f = jax.lax.stop_gradient(counts.astype(jnp.float32) / max(t * k, 1))
    p = jnp.sum(probs, axis=0) / max(t, 1)
    aux = self.aux_loss_coef * e * jnp.sum(f * p)

    y = _primitive.keep_types(_primitive.unfold_like(y.astype(x.dtype), x, fold), x_in)
    return y, aux.astype(jnp.float32)
