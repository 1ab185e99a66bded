"""Reference products of the contiguous grouped ops by 128-row tiles: work ∝ M + 128·G, not G·M.

The plain references take one dense product per group over all rows and keep each row's own by
selection: G times the useful work, most of a CPU step at MoE sizes (64 experts). Rows sorted by
group let a 128-row tile meet only the groups whose rows it holds, at most ``ceil(M/128) + G - 1``
(tile, group) pairs in all; each pair is one tile's product with its group's weights. Selection
stays per row, so one group's inf or NaN (rows or weights) stays out of the others', as in the
kernels, which never read weights for rows they do not own.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_deepgemm import _primitive

TILE = 128


def worth_tiling(m, g):
  """Static choice: tiles where they save at least half the work (small problems keep the G
  dense products, fewer and larger steps)."""
  if not (_primitive.known(m) and _primitive.known(g)) or m == 0 or g == 0:
    return False
  return g * m >= 2 * (-(-m // TILE) + g) * TILE


def tile_group_pairs(sizes, m):
  """(tile, group, valid), each ``[ceil(m/128) + G]``: the (tile, group) pairs in which a group
  holds rows, for sanitized ``sizes`` (non-negative, ending by row ``m``); the rest padding."""
  g = sizes.shape[0]
  ends = jax.lax.cumsum(sizes)  # (not jnp.cumsum: see _primitive.register_lowerings)
  first = (ends - sizes) // TILE
  count = jnp.where(sizes > 0, (ends - 1) // TILE - first + 1, 0)  # tiles group g touches
  last_pair = jax.lax.cumsum(count)  # one past each group's last pair
  p = jnp.arange(-(-m // TILE) + g, dtype=last_pair.dtype)
  # The group of pair p: how many groups' pairs end at or before it (G: padding). (Not
  # jnp.searchsorted: it fails inside a shard_map over some of the mesh's axes, jax 0.10.)
  group = jnp.sum(p[:, None] >= last_pair[None, :], axis=1, dtype=p.dtype)
  valid = group < g
  group = jnp.minimum(group, g - 1)
  tile = jnp.where(valid, first[group] + p - (last_pair[group] - count[group]), 0)
  return tile, group, valid


def _padded(v, rows, fill=0):
  return jnp.pad(v, [(0, rows - v.shape[0])] + [(0, 0)] * (v.ndim - 1), constant_values=fill)


def m_grouped_product(x, w, sizes, row_group):
  """f32 ``[M, N]``: row r of ``x [M, K]`` times ``w[row_group[r]] [N, K]``ᵀ (zero past the
  groups); ``sizes`` sanitized, ``row_group`` their rows' groups."""
  (m, _), (g, n, _) = x.shape, w.shape
  rows = -(-m // TILE) * TILE
  x, row_group = _padded(x, rows), _padded(row_group, rows, g)
  tiles, groups, valid = tile_group_pairs(sizes, m)

  def one_pair(d, pair):
    tile, grp, ok = pair
    r0 = tile * TILE
    prod = jnp.dot(jax.lax.dynamic_slice_in_dim(x, r0, TILE), w[grp].T,
                   precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    mine = ok & (jax.lax.dynamic_slice_in_dim(row_group, r0, TILE) == grp)
    old = jax.lax.dynamic_slice_in_dim(d, r0, TILE)
    return jax.lax.dynamic_update_slice_in_dim(d, jnp.where(mine[:, None], prod, old), r0, 0), None

  # Inside shard_map the carry must vary over the manual axes its updates vary over.
  init = _primitive.match_vma(jnp.zeros((rows, n), jnp.float32), x, w, row_group, tiles)[0]
  d, _ = jax.lax.scan(one_pair, init, (tiles, groups, valid))
  return d[:m]


def k_grouped_product(x, y, sizes, token_group):
  """f32 ``[G, N, K]``: per group g, ``x[tokens of g]ᵀ · y[tokens of g]`` for ``x [T, N]``,
  ``y [T, K]``; ``sizes`` sanitized, ``token_group`` their tokens' groups."""
  (t, n), k, g = x.shape, y.shape[1], sizes.shape[0]
  rows = -(-t // TILE) * TILE
  x, y, token_group = _padded(x, rows), _padded(y, rows), _padded(token_group, rows, g)
  tiles, groups, valid = tile_group_pairs(sizes, t)

  def one_pair(d, pair):
    tile, grp, ok = pair
    r0 = tile * TILE
    mine = (ok & (jax.lax.dynamic_slice_in_dim(token_group, r0, TILE) == grp))[:, None]
    # Both operands selected (not multiplied by a mask), as the kernel zeroes both: a NaN token
    # of one group stays out of the others (0 * NaN).
    x_t = jnp.where(mine, jax.lax.dynamic_slice_in_dim(x, r0, TILE), 0.0)
    y_t = jnp.where(mine, jax.lax.dynamic_slice_in_dim(y, r0, TILE), 0.0)
    part = jnp.dot(x_t.T, y_t, precision=jax.lax.Precision.HIGHEST,
                   preferred_element_type=jnp.float32)
    acc = jax.lax.dynamic_index_in_dim(d, grp, keepdims=False)
    return jax.lax.dynamic_update_index_in_dim(d, acc + part, grp, 0), None

  init = _primitive.match_vma(jnp.zeros((g, n, k), jnp.float32), x, y, token_group, tiles)[0]
  d, _ = jax.lax.scan(one_pair, init, (tiles, groups, valid))
  return d
