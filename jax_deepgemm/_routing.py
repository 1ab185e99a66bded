"""The routed rows' layout of the MoE layers: token-choices sorted by expert, optionally with
each expert's rows padded to whole 128-token blocks."""
import functools

import jax
import jax.numpy as jnp


def inverse_permutation(perm):
  """``inv`` with ``inv[perm[i]] = i``."""
  return jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=perm.dtype))


def expert_rows(flat_ids, num_experts, align):
  """The routed rows' layout, sorted by expert (stable: tokens in order within each expert).

  Returns ``order [R]`` (row r holds token-choice ``order[r]``; ``T*k`` marks a padding row),
  ``inverse [T*k]`` (each token-choice's row), ``group_sizes [E]`` (rows per expert, padding
  included) and ``counts [E]`` (token-choices per expert).
  With ``align > 1`` every expert's rows start at a multiple of ``align`` and its group is
  padded with zero rows to one (DeepGEMM's contiguous layout): the weight gradient's token
  blocks then never straddle two experts, so the K-grouped kernel masks nothing, and each
  128-token scale of the token-axis cast covers one expert's tokens only. R is static:
  ``T*k`` plus ``align - 1`` rows for each expert that can be non-empty.
  """
  tk = flat_ids.shape[0]
  order = jnp.argsort(flat_ids, stable=True).astype(jnp.int32)
  group_sizes = jnp.bincount(flat_ids, length=num_experts).astype(jnp.int32)
  if align == 1:
    return order, inverse_permutation(order), group_sizes, group_sizes
  padded = (group_sizes + align - 1) // align * align
  pad = padded - group_sizes
  shift = jnp.cumsum(pad) - pad  # padding rows before each expert's first row
  row = jnp.arange(tk, dtype=jnp.int32) + shift[flat_ids[order]]
  rows = tk + min(num_experts, tk) * (align - 1)
  order_padded = jnp.full((rows,), tk, jnp.int32).at[row].set(order)
  inverse = jnp.zeros((tk,), jnp.int32).at[order].set(row)
  return order_padded, inverse, padded, group_sizes


# Every move of routed rows is a gather ``out[i] = x[idx[i]]`` whose transpose is again a
# gather: each row of x is read ``k`` times, by the rows ``inv[j, :]`` of out (``idx``'s
# inverse). Autodiff of the gather would give a scatter-add instead.
def gather_rows(x, idx):
  """``x[idx]`` along rows, a zero row where ``idx`` is outside ``[0, len(x))``."""
  return jnp.take(x, jnp.where((idx >= 0) & (idx < x.shape[0]), idx, x.shape[0]), axis=0,
                  mode="fill", fill_value=0)


def gather_rows_transpose(dy, inv, k):
  """The transpose of ``gather_rows(x, idx)``: x's row ``j`` gets the sum (in f32) of the
  rows ``inv [len(x), k]`` of ``dy``. With ``k == 1`` an index outside ``[0, len(dy))`` adds
  nothing (a row no row reads); with ``k > 1`` every row of x is read ``k`` times, so ``inv``
  must be in range (plain gathers: fused with bounds-checked ones, the sum took 1211 instead of
  743 us in the MoE's backward, H100)."""
  if k == 1:
    return gather_rows(dy, inv.reshape(-1))
  # k gathered rows added one after another: an elementwise fusion. (A reduce over the k axis
  # of the gathered [len(x), k, H] is a small non-minor reduction, which XLA ran at ~1.2 TB/s.)
  dx = dy[inv[:, 0]].astype(jnp.float32)
  for j in range(1, k):
    dx = dx + dy[inv[:, j]].astype(jnp.float32)
  return dx.astype(dy.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gather(x, idx, inv, k):
  """``gather_rows(x, idx)``, differentiable in x through ``gather_rows_transpose``."""
  return gather_rows(x, idx)


def _gather_fwd(x, idx, inv, k):
  return gather_rows(x, idx), inv


def _gather_bwd(k, inv, dy):
  return gather_rows_transpose(dy, inv, k), None, None


gather.defvjp(_gather_fwd, _gather_bwd)
