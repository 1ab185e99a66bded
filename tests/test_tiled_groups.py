"""The tiled reference of the contiguous grouped ops (what CPU and non-Hopper GPUs run at MoE
sizes): its (tile, group) pairs, and both ops through it against float64."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_deepgemm as jd
import oracle
from helpers import quant_act, quant_w, randn
from jax_deepgemm import _tiled_groups
from jax_deepgemm.grouped_contiguous import sanitize_group_sizes

# m = 530 rows: 5 tiles, the last partial. Boundaries inside tiles, on tile edges (128, 256),
# empty groups first, last and in between, a group spanning three tiles, sums short of and past m.
SIZES = {
    "edges": [128, 0, 128, 0, 274],
    "inside": [5, 200, 0, 90, 235, 0],
    "wide": [0, 0, 400, 1, 0],
    "short": [3, 0, 7, 0, 1],
    "past": [300, 0, 300, 300],
    "empty": [0, 0, 0],
    "one_per_row": [1] * 20,
}
M = 530


@pytest.fixture(params=["tiled", "dense"])
def path(request, monkeypatch):
  # Both references on any problem size (the choice is static, by size); not the kernels.
  if jax.default_backend() == "gpu" and jd.use_kernels():
    pytest.skip("the GPU runs the kernels, not the references (JAX_DEEPGEMM_FORCE_REFERENCE=1)")
  monkeypatch.setattr(_tiled_groups, "worth_tiling", lambda m, g: request.param == "tiled")
  jax.clear_caches()  # the choice is made while lowering: no executable of the other may serve
  yield request.param
  jax.clear_caches()


@pytest.mark.parametrize("case", list(SIZES))
def test_pairs_are_exactly_the_tiles_each_group_touches(case):
  sizes = sanitize_group_sizes(jnp.asarray(SIZES[case], jnp.int32), M)
  tile, group, valid = map(np.asarray, jax.jit(_tiled_groups.tile_group_pairs,
                                               static_argnums=1)(sizes, M))
  assert tile.shape == group.shape == valid.shape == (-(-M // 128) + len(SIZES[case]),)
  ends = np.cumsum(np.asarray(sizes))
  want = {(r // 128, g) for g in range(len(ends))
          for r in range(ends[g] - np.asarray(sizes)[g], ends[g])}
  got = list(zip(tile[valid].tolist(), group[valid].tolist()))
  assert len(got) == len(set(got)) and set(got) == want
  assert valid.tolist() == sorted(valid.tolist(), reverse=True)  # padding only at the end


def test_worth_tiling_only_where_it_saves_work():
  assert _tiled_groups.worth_tiling(16384, 64)
  assert _tiled_groups.worth_tiling(4096, 8)
  assert not _tiled_groups.worth_tiling(158, 6)  # small: G dense products, fewer steps
  assert not _tiled_groups.worth_tiling(4096, 1)
  assert not _tiled_groups.worth_tiling(0, 4) and not _tiled_groups.worth_tiling(300, 0)


@pytest.mark.parametrize("case", list(SIZES))
def test_contiguous_reference_matches_float64(rng, path, case):
  sizes = SIZES[case]
  n, k = 72, 256
  a, sa = quant_act(rng, M, k)
  b, sb = quant_w(rng, len(sizes), n, k)
  d = jax.jit(jd.m_grouped_fp8_gemm_nt_contiguous, static_argnames="out_dtype")(
      a, sa, b, sb, jnp.asarray(sizes, jnp.int32), out_dtype=jnp.float32)
  want = oracle.grouped_contiguous(a, sa, b, sb, sizes)
  mag = oracle.abs_terms(oracle.grouped_contiguous, a, sa, b, sb, sizes)
  oracle.assert_elementwise(d, want, mag, d.dtype)  # each row its own expert's, or zero
  if np.abs(want).max() > 0:
    assert oracle.calc_diff(d, want) < 1e-5
  else:
    assert float(jnp.abs(d).max()) == 0.0


def test_contiguous_reference_keeps_nan_weights_in_their_rows(rng, path):
  sizes = [200, 0, 130, 200]
  a, sa = quant_act(rng, M, 128)
  b, sb = quant_w(rng, 4, 32, 128)
  for g in (1, 2):  # an empty expert's and a used one's weights
    sb = sb.at[g].set(jnp.nan)
  d = jd.m_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, jnp.asarray(sizes, jnp.int32))
  nan_rows = np.isnan(np.asarray(d, np.float32)).any(axis=1)
  assert nan_rows.tolist() == [200 <= r < 330 for r in range(M)]


@pytest.mark.parametrize("case", list(SIZES))
def test_k_grouped_reference_matches_float64(rng, path, case):
  sizes = SIZES[case]
  n, k = 40, 136
  a, sa = quant_act(rng, M, n, axis=0)
  b, sb = quant_act(rng, M, k, axis=0)
  c = randn(rng, (len(sizes), n, k))
  d = jax.jit(jd.k_grouped_fp8_gemm_tn_contiguous)(a, sa, b, sb, jnp.asarray(sizes, jnp.int32),
                                                    c=c)
  want = oracle.k_grouped(a, sa, b, sb, sizes, c=c)
  assert oracle.calc_diff(d, want) < 1e-5
  for g, (lo, hi) in enumerate(zip(*oracle.offsets(sizes, M))):
    if hi == lo:  # an empty (or clipped-away) group: c exactly
      np.testing.assert_array_equal(np.asarray(d[g]), np.asarray(c[g]))


def test_k_grouped_reference_keeps_nan_tokens_in_their_group(rng, path):
  a, sa = quant_act(rng, M, 16, axis=0)
  b, sb = quant_act(rng, M, 24, axis=0)
  # A NaN element (its scale finite) of a token of group 1 (tokens 200-329), in a 128-token tile
  # that group 2 shares. (A NaN input would make its whole scale block NaN, group 2's tokens too.)
  b = b.at[300, 3].set(jnp.nan)
  d = jd.k_grouped_fp8_gemm_tn_contiguous(a, sa, b, sb, jnp.asarray([200, 130, 200], jnp.int32))
  assert np.isnan(np.asarray(d)).any(axis=(1, 2)).tolist() == [False, True, False]


def test_tiled_reference_under_vmap_and_grad_of_the_layer(rng, path):
  # The grouped layer's forward and both backward GEMMs through the reference, batched.
  g, n, k = 5, 32, 128
  x = randn(rng, (2, M, k))
  w = randn(rng, (g, k, n), scale=0.1)
  sizes = jnp.asarray([[100, 0, 230, 100, 100], [0, 530, 0, 0, 0]], jnp.int32)

  def loss(x, w, s):
    return jnp.sum(jd.fp8_grouped_linear(x, w, s) ** 2)

  dx, dw = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(0, None, 0)))(x, w, sizes)
  for i in range(2):
    want_dx, want_dw = jax.grad(
        lambda x, w: jnp.sum(jax.lax.ragged_dot(x, w, sizes[i],
                                                precision=jax.lax.Precision.HIGHEST) ** 2),
        argnums=(0, 1))(x[i], w)
    assert oracle.calc_diff(dx[i], want_dx) < 2e-3
    assert oracle.calc_diff(dw[i], want_dw) < 2e-3
