"""The routed rows' layout of the MoE layers: token-choices sorted by expert, optionally with
each expert's rows padded to whole 128-token blocks."""
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
