"""M-grouped GEMMs (contiguous and masked) on the default backend."""
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import jax_deepgemm as jd
import oracle
from helpers import quant_act, quant_w, randn

ROUTINGS = {
    "skewed": [1, 0, 130, 7, 0, 20],
    "one_expert": [0, 0, 158, 0, 0, 0],
    "all_empty": [0, 0, 0, 0, 0, 0],
    "partial": [5, 3, 0, 9, 0, 1],  # sums to less than M: trailing rows are zero
    "overflow": [100, 100, 100, 0, 0, 0],  # sums past M: clipped
}


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_contiguous_matches_float64(rng, routing):
  m, n, k, g = 158, 136, 384, 6
  a, sa = quant_act(rng, m, k)
  b, sb = quant_w(rng, g, n, k)
  gs = jnp.asarray(ROUTINGS[routing], jnp.int32)
  d = jax.jit(jd.m_grouped_fp8_gemm_nt_contiguous)(a, sa, b, sb, gs)
  want = oracle.grouped_contiguous(a, sa, b, sb, ROUTINGS[routing])
  assert d.shape == (m, n) and d.dtype == jnp.bfloat16
  if routing == "all_empty":
    assert float(jnp.abs(d.astype(jnp.float32)).max()) == 0.0
  else:
    assert oracle.calc_diff(d, want) < 1e-5
  mag = oracle.abs_terms(oracle.grouped_contiguous, a, sa, b, sb, ROUTINGS[routing])
  oracle.assert_elementwise(d, want, mag, d.dtype)  # no row of another expert
  _, ends = oracle.offsets(ROUTINGS[routing], m)
  assert float(jnp.abs(d[int(ends[-1]):].astype(jnp.float32)).max(initial=0.0)) == 0.0


def test_contiguous_random_routing_f32(rng):
  m, n, k, g = 301, 64, 256, 8
  a, sa = quant_act(rng, m, k)
  b, sb = quant_w(rng, g, n, k)
  gs = np.bincount(rng.integers(0, g, size=m), minlength=g).astype(np.int32)
  d = jd.m_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, gs, out_dtype=jnp.float32)
  assert d.dtype == jnp.float32
  want = oracle.grouped_contiguous(a, sa, b, sb, gs)
  assert oracle.calc_diff(d, want) < 1e-5
  oracle.assert_elementwise(d, want, oracle.abs_terms(oracle.grouped_contiguous, a, sa, b, sb, gs),
                            d.dtype)


def test_contiguous_vmap(rng):
  m, n, k, g = 40, 32, 128, 3
  a, sa = zip(*[quant_act(rng, m, k) for _ in range(2)])
  b, sb = quant_w(rng, g, n, k)
  gs = jnp.asarray([[10, 0, 30], [1, 2, 3]], jnp.int32)
  d = jax.vmap(jd.m_grouped_fp8_gemm_nt_contiguous, in_axes=(0, 0, None, None, 0))(
      jnp.stack(a), jnp.stack(sa), b, sb, gs)
  for i in range(2):
    want = oracle.grouped_contiguous(a[i], sa[i], b, sb, np.asarray(gs[i]))
    assert oracle.calc_diff(d[i], want) < 1e-5


def test_contiguous_errors(rng):
  a, sa = quant_act(rng, 16, 128)
  b, sb = quant_w(rng, 2, 32, 128)
  f = jd.m_grouped_fp8_gemm_nt_contiguous
  with pytest.raises(ValueError, match=r"group_sizes must have shape \(2,\)"):
    f(a, sa, b, sb, jnp.zeros((3,), jnp.int32))
  with pytest.raises(TypeError, match="group_sizes must be an integer"):
    f(a, sa, b, sb, jnp.zeros((2,), jnp.float32))
  with pytest.raises(ValueError, match="b must be 3-D"):
    f(a, sa, b[0], sb[0], jnp.zeros((2,), jnp.int32))
  # Both wrong: the op says which (it was numpy's "Invalid integer data type 'f'").
  with pytest.raises(ValueError, match="m_grouped_fp8_gemm_nt_contiguous: b must be 3-D"):
    f(a, sa, b[0], sb[0], jnp.ones((2,)))
  with pytest.raises(ValueError, match=r"sb must have shape \(2, 1, 1\)"):
    f(a, sa, b, sb[:1], jnp.zeros((2,), jnp.int32))


def test_masked_under_rank_promotion_raise(rng):
  # The reference masked rows [M_max, 1] against masked_m [G, 1, 1] by rank promotion: under
  # jax_numpy_rank_promotion='raise' every masked GEMM raised "could not be broadcast".
  g, m_max, n, k = 3, 40, 136, 256
  a, sa = quant_act(rng, g * m_max, k)
  a, sa = a.reshape(g, m_max, k), sa.reshape(g, m_max, 2)
  b, sb = quant_w(rng, g, n, k)
  masked = [0, 17, 40]
  out = randn(rng, (g, m_max, n)).astype(jnp.bfloat16)
  f = jax.jit(jd.m_grouped_fp8_gemm_nt_masked, static_argnames="expected_m")
  with jax.numpy_rank_promotion("raise"):
    d = f(a, sa, b, sb, jnp.asarray(masked, jnp.int32), expected_m=16)
    d_out = f(a, sa, b, sb, jnp.asarray(masked, jnp.int32), out=out, expected_m=16)
  want = oracle.grouped_masked(a, sa, b, sb, masked)
  assert oracle.calc_diff(d, want) < 1e-5
  for gi, mi in enumerate(masked):
    assert not np.asarray(d[gi, mi:], np.float32).any()
    np.testing.assert_array_equal(np.asarray(d_out[gi, :mi]), np.asarray(d[gi, :mi]))
    np.testing.assert_array_equal(np.asarray(d_out[gi, mi:]), np.asarray(out[gi, mi:]))


@pytest.mark.parametrize("masked", [[0, 5, 64, 1], [64, 64, 64, 64], [0, 0, 0, 0], [3, 70, -1, 2]])
def test_masked_matches_float64(rng, masked):
  g, m_max, n, k = 4, 64, 72, 256
  a, sa = quant_act(rng, g * m_max, k)
  a, sa = a.reshape(g, m_max, k), sa.reshape(g, m_max, 2)
  b, sb = quant_w(rng, g, n, k)
  mm = jnp.asarray(masked, jnp.int32)
  d = jax.jit(jd.m_grouped_fp8_gemm_nt_masked, static_argnames="expected_m")(
      a, sa, b, sb, mm, expected_m=8)
  want = oracle.grouped_masked(a, sa, b, sb, np.clip(masked, 0, m_max))
  assert d.shape == (g, m_max, n)
  if max(masked) <= 0:
    assert float(jnp.abs(d.astype(jnp.float32)).max()) == 0.0
  else:
    assert oracle.calc_diff(d, want) < 1e-5
    mag = oracle.abs_terms(oracle.grouped_masked, a, sa, b, sb, np.clip(masked, 0, m_max))
    oracle.assert_elementwise(d, want, mag, d.dtype)
    for gi, mi in enumerate(masked):
      assert float(jnp.abs(d[gi, max(mi, 0):].astype(jnp.float32)).max(initial=0.0)) == 0.0


def test_masked_vmap_folds_into_groups(rng):
  g, m_max, n, k = 2, 16, 40, 128
  a, sa = quant_act(rng, 3 * g * m_max, k)
  a, sa = a.reshape(3, g, m_max, k), sa.reshape(3, g, m_max, 1)
  b, sb = quant_w(rng, g, n, k)
  mm = jnp.asarray([[1, 16], [0, 7], [16, 16]], jnp.int32)
  b3, sb3 = jnp.stack([b] * 3), jnp.stack([sb] * 3)
  f = jax.vmap(jd.m_grouped_fp8_gemm_nt_masked)
  d = f(a, sa, b3, sb3, mm)
  assert "scan" not in str(jax.make_jaxpr(f)(a, sa, b3, sb3, mm))  # batched weights: folded
  # Shared weights: a loop over the batch, without copying the weights.
  d2 = jax.vmap(jd.m_grouped_fp8_gemm_nt_masked, in_axes=(0, 0, None, None, 0))(a, sa, b, sb, mm)
  for i in range(3):
    want = oracle.grouped_masked(a[i], sa[i], b, sb, mm[i])
    assert oracle.calc_diff(d[i], want) < 1e-5 and oracle.calc_diff(d2[i], want) < 1e-5


@pytest.mark.parametrize("m_max,n,k", [(0, 40, 128), (16, 0, 128), (16, 40, 0)])
def test_masked_vmap_of_empty_operands(rng, m_max, n, k):
  # Batched weights fold the batch into G; with an empty operand (M_max, N or K = 0) that
  # reshape failed ('integer modulo by zero': a -1 size cannot be inferred from 0 elements).
  g = 2
  a, sa = jd.per_token_cast_to_fp8(randn(rng, (3, g, m_max, k), jnp.bfloat16))
  b, sb = jd.per_block_cast_to_fp8(randn(rng, (3, g, n, k)))
  mm = jnp.asarray([[1, 16], [0, 7], [16, 3]], jnp.int32)
  d = jax.vmap(jd.m_grouped_fp8_gemm_nt_masked)(a, sa, b, sb, mm)
  assert d.shape == (3, g, m_max, n) and d.dtype == jnp.bfloat16
  for i in range(3):
    want = jd.m_grouped_fp8_gemm_nt_masked(a[i], sa[i], b[i], sb[i], mm[i])
    np.testing.assert_array_equal(np.asarray(d[i], np.float32), np.asarray(want, np.float32))
  assert not np.asarray(d, np.float32).any()  # K = 0: zero sums; else nothing to compute


@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float32])
def test_masked_out_keeps_rows_past(rng, out_dtype):
  # Rows < masked_m against float64, rows past it out's own values (NaN and inf too: kept,
  # never read); masked_m out of range clipped, an empty group all out's; dtype from out.
  g, m_max, n, k = 5, 40, 200, 320
  a, sa = quant_act(rng, g * m_max, k)
  a, sa = a.reshape(g, m_max, k), sa.reshape(g, m_max, -1)
  b, sb = quant_w(rng, g, n, k)
  masked = np.array([7, 0, 40, -3, 2**31 - 1], np.int32)
  out = rng.standard_normal((g, m_max, n))
  out[0, 9, :3] = [np.nan, np.inf, -np.inf]
  out = jnp.asarray(out, out_dtype)
  d = jax.jit(lambda *x: jd.m_grouped_fp8_gemm_nt_masked(*x[:5], expected_m=8, out=x[5]))(
      a, sa, b, sb, jnp.asarray(masked), out)
  assert d.dtype == out_dtype and d.shape == (g, m_max, n)
  clipped = np.clip(masked, 0, m_max)
  want = oracle.grouped_masked(a, sa, b, sb, clipped)
  rows = np.arange(m_max)[None, :] < clipped[:, None]
  oracle.assert_elementwise(
      np.where(rows[..., None], np.asarray(d, np.float64), want), want,
      oracle.abs_terms(oracle.grouped_masked, a, sa, b, sb, clipped), out_dtype)
  np.testing.assert_array_equal(np.asarray(d, np.float32)[~rows], np.asarray(out, np.float32)[~rows])
  # The same values as the zero-filling op where rows are valid.
  d0 = jd.m_grouped_fp8_gemm_nt_masked(a, sa, b, sb, jnp.asarray(masked), expected_m=8,
                                       out_dtype=out_dtype)
  _same(np.asarray(d, np.float32)[rows], np.asarray(d0, np.float32)[rows])


def _same(got, want):
  """Bitwise where the kernel or the CPU computes both; the reference on a GPU (XLA's dots,
  compiled per program) may add in another order."""
  if jd.use_kernels() or jax.default_backend() == "cpu":
    np.testing.assert_array_equal(got, want)
  else:
    assert oracle.calc_diff(got, want) < 1e-8


def test_masked_out_under_vmap(rng):
  # out batched with the rest (it folds into G with them) or shared by every batch element.
  g, m_max, n, k = 2, 24, 72, 256
  a, sa = quant_act(rng, 3 * g * m_max, k)
  a, sa = a.reshape(3, g, m_max, k), sa.reshape(3, g, m_max, -1)
  b, sb = quant_w(rng, 3 * g, n, k)
  b, sb = b.reshape(3, g, n, k), sb.reshape(3, g, *sb.shape[1:])
  mm = jnp.asarray(rng.integers(0, m_max + 1, (3, g)), jnp.int32)
  outs = jnp.asarray(rng.standard_normal((3, g, m_max, n)), jnp.float32)
  f = lambda *x: jd.m_grouped_fp8_gemm_nt_masked(*x[:5], out=x[5])
  batched = jax.jit(jax.vmap(f))(a, sa, b, sb, mm, outs)
  shared = jax.jit(jax.vmap(f, in_axes=(0,) * 5 + (None,)))(a, sa, b, sb, mm, outs[1])
  for i in range(3):
    args = (a[i], sa[i], b[i], sb[i], mm[i])
    _same(np.asarray(batched[i]), np.asarray(f(*args, outs[i])))
    _same(np.asarray(shared[i]), np.asarray(f(*args, outs[1])))


def test_masked_nested_vmap_keeps_batches_as_leading_dims(rng):
  # vmap of vmap: two leading batch dimensions on the primitive (no reshape at the JAX level),
  # folded into G only where it lowers; values those of the op on each element.
  g, m_max, n, k = 2, 16, 72, 256
  a, sa = quant_act(rng, 2 * 3 * g * m_max, k)
  a, sa = a.reshape(2, 3, g, m_max, k), sa.reshape(2, 3, g, m_max, -1)
  b, sb = quant_w(rng, 2 * 3 * g, n, k)
  b, sb = b.reshape(2, 3, g, n, k), sb.reshape(2, 3, g, *sb.shape[1:])
  mm = jnp.asarray(rng.integers(-2, m_max + 3, (2, 3, g)), jnp.int32)
  f = jax.vmap(jax.vmap(jd.m_grouped_fp8_gemm_nt_masked))
  jaxpr = str(jax.make_jaxpr(f)(a, sa, b, sb, mm))
  assert "lead=2" in jaxpr and "reshape" not in jaxpr, jaxpr
  d = jax.jit(f)(a, sa, b, sb, mm)
  for i in range(2):
    for j in range(3):
      _same(np.asarray(d[i, j], np.float32), np.asarray(jd.m_grouped_fp8_gemm_nt_masked(
          a[i, j], sa[i, j], b[i, j], sb[i, j], mm[i, j]), np.float32))


def test_masked_out_errors(rng):
  a, sa = quant_act(rng, 32, 128)
  a, sa = a.reshape(2, 16, 128), sa.reshape(2, 16, 1)
  b, sb = quant_w(rng, 2, 32, 128)
  mm = jnp.zeros((2,), jnp.int32)
  f = jd.m_grouped_fp8_gemm_nt_masked
  out = jnp.zeros((2, 16, 32), jnp.float32)
  with pytest.raises(TypeError, match="out must be bfloat16 or float32, got float16"):
    f(a, sa, b, sb, mm, out=out.astype(jnp.float16))
  with pytest.raises(TypeError, match="out must be float32, got bfloat16"):
    f(a, sa, b, sb, mm, out=out.astype(jnp.bfloat16), out_dtype=jnp.float32)
  with pytest.raises(ValueError, match=r"out must have shape \(2, 16, 32\)"):
    f(a, sa, b, sb, mm, out=out[:, :8])
  with pytest.raises(TypeError, match="m_grouped_fp8_gemm_nt_masked: out"):
    f(a, sa, b, sb, mm, out="zeros")


def test_masked_errors(rng):
  a, sa = quant_act(rng, 32, 128)
  a, sa = a.reshape(2, 16, 128), sa.reshape(2, 16, 1)
  b, sb = quant_w(rng, 2, 32, 128)
  f = jd.m_grouped_fp8_gemm_nt_masked
  with pytest.raises(ValueError, match="G or K differs"):
    f(a, sa, b[:1], sb[:1], jnp.zeros((2,), jnp.int32))
  with pytest.raises(TypeError, match="expected_m must be a Python int"):
    f(a, sa, b, sb, jnp.zeros((2,), jnp.int32), expected_m=2.5)
  with pytest.raises(ValueError, match="a must be 3-D"):
    f(a[0], sa[0], b, sb, jnp.zeros((2,), jnp.int32))


def test_masked_huge_unsigned_sizes_saturate(rng):
  # 3e9 as uint32 would wrap negative in an int32 cast (all rows skipped); it means M_max.
  a, sa = quant_act(rng, 32, 128)
  a, sa = a.reshape(2, 16, 128), sa.reshape(2, 16, 1)
  b, sb = quant_w(rng, 2, 32, 128)
  f = jd.m_grouped_fp8_gemm_nt_masked
  d = f(a, sa, b, sb, jnp.asarray([3_000_000_000, 5], jnp.uint32))
  ref = f(a, sa, b, sb, jnp.asarray([16, 5], jnp.int32))
  np.testing.assert_array_equal(np.asarray(d), np.asarray(ref))
  # Host int64 / uint64 sizes too: without x64, asarray alone would wrap 2**32 + 3 to 3.
  for sizes in (np.array([2**32 + 3, 5]), np.array([2**33, 5], np.uint64)):
    np.testing.assert_array_equal(np.asarray(f(a, sa, b, sb, sizes)), np.asarray(ref))
  # Narrow types must not wrap M_max either (int8 can't hold 128; uint8 wraps 256 to 0).
  a2, sa2 = quant_act(rng, 2 * 300, 128)
  a2, sa2 = a2.reshape(2, 300, 128), sa2.reshape(2, 300, 1)
  full = f(a2, sa2, b, sb, jnp.asarray([100, 300], jnp.int32))
  for sizes in (jnp.asarray([100, 127], jnp.int8), jnp.asarray([100, 255], jnp.uint8),
                jnp.asarray([100, 300], jnp.int16)):
    want = full if sizes.dtype == jnp.int16 else f(a2, sa2, b, sb, sizes.astype(jnp.int32))
    np.testing.assert_array_equal(np.asarray(f(a2, sa2, b, sb, sizes)), np.asarray(want))
  assert np.abs(np.asarray(ref[0], np.float32)).min(axis=1).min() > 0


def test_out_dtype_none_is_the_default(rng):
  a, sa = quant_act(rng, 32, 128)
  b, sb = quant_w(rng, 2, 32, 128)
  gs = jnp.asarray([20, 12], jnp.int32)
  assert jd.m_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, gs, out_dtype=None).dtype == jnp.bfloat16
  a3, sa3 = a.reshape(2, 16, 128), sa.reshape(2, 16, 1)
  assert jd.m_grouped_fp8_gemm_nt_masked(a3, sa3, b, sb, gs, out_dtype=None).dtype == jnp.bfloat16
  at, sat = quant_act(rng, 32, 64, axis=0)
  assert jd.k_grouped_fp8_gemm_tn_contiguous(at, sat, at, sat, gs,
                                             out_dtype=None).dtype == jnp.float32
  assert jd.fp8_gemm_nt(a, sa, b[0], sb[0], out_dtype=None).dtype == jnp.bfloat16


def test_huge_group_sizes_saturate(rng):
  a, sa = quant_act(rng, 10, 128)
  b, sb = quant_w(rng, 3, 16, 128)
  gs = jnp.asarray([2**31 - 1, 2**31 - 1, 3], jnp.int32)
  from jax_deepgemm.grouped_contiguous import sanitize_group_sizes
  np.testing.assert_array_equal(np.asarray(sanitize_group_sizes(gs, 10)), [10, 0, 0])
  # Narrow types keep their values when M does not fit them (int8 vs M = 300).
  np.testing.assert_array_equal(
      np.asarray(sanitize_group_sizes(jnp.asarray([5, 100, -3, 127], jnp.int8), 300)),
      [5, 100, 0, 127])
  np.testing.assert_array_equal(
      np.asarray(sanitize_group_sizes(jnp.asarray([200, 255], jnp.uint8), 300)), [200, 100])
  d = jd.m_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, gs)
  assert oracle.calc_diff(d, oracle.grouped_contiguous(a, sa, b, sb, [10, 0, 0])) < 1e-5


def test_vmap_does_not_copy_shared_weights(rng):
  a, sa = quant_act(rng, 4 * 32, 128)
  b, sb = quant_w(rng, 2, 64, 128)
  gs = jnp.asarray([[16, 16]] * 4, jnp.int32)
  f = jax.vmap(jd.m_grouped_fp8_gemm_nt_contiguous, in_axes=(0, 0, None, None, 0))
  hlo = jax.jit(f).lower(a.reshape(4, 32, 128), sa.reshape(4, 32, 1), b, sb, gs).as_text()
  assert "4x2x64x128" not in hlo  # no per-element broadcast of b


def test_ops_under_disable_jit(rng):
  a, sa = quant_act(rng, 8, 128)
  b, sb = quant_w(rng, 16, 128)
  with jax.disable_jit():
    d = jd.fp8_gemm_nt(a, sa, b, sb)
  assert oracle.calc_diff(d, oracle.gemm_nt(a, sa, b, sb)) < 1e-5


def _grouped_binds(jaxpr):
  """Every M-grouped primitive application in ``jaxpr`` and its sub-jaxprs: (name, G)."""
  out = []
  for eqn in jaxpr.eqns:
    if "m_grouped" in eqn.primitive.name:
      out.append((eqn.primitive.name, eqn.invars[2].aval.shape[0]))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      out += _grouped_binds(sub)
  return out


def test_vmap_folds_no_more_groups_than_the_kernel_holds(rng, monkeypatch):
  # The batching rules fold a batch of weights into groups; the kernel's group table holds
  # MAX_KERNEL_GROUPS, so a bigger batch folds in chunks (remainder included), not one bind.
  from jax_deepgemm import grouped_contiguous
  monkeypatch.setattr(grouped_contiguous, "MAX_KERNEL_GROUPS", 4)
  xs = [quant_act(rng, 9, 128) for _ in range(10)]
  ws = [quant_w(rng, 24, 128) for _ in range(10)]
  a, sa = (jnp.stack(t) for t in zip(*xs))
  b, sb = (jnp.stack(t) for t in zip(*ws))
  f = jax.vmap(jd.fp8_gemm_nt)
  binds = _grouped_binds(jax.make_jaxpr(f)(a, sa, b, sb).jaxpr)
  assert binds and all(g <= 4 for _, g in binds), binds
  d = jax.jit(f)(a, sa, b, sb)
  for i in range(10):
    assert oracle.calc_diff(d[i], oracle.gemm_nt(*xs[i], *ws[i])) < 1e-5
  # Masked: a batch of 5 x 2 groups folds at most 2 elements (4 groups) at a time.
  g, m_max, n, k = 2, 8, 24, 128
  a, sa = quant_act(rng, 5 * g * m_max, k)
  a, sa = a.reshape(5, g, m_max, k), sa.reshape(5, g, m_max, 1)
  wb = [quant_w(rng, g, n, k) for _ in range(5)]
  b, sb = (jnp.stack(t) for t in zip(*wb))
  mm = jnp.asarray(rng.integers(0, m_max + 1, (5, g)), jnp.int32)
  f = jax.vmap(jd.m_grouped_fp8_gemm_nt_masked)
  binds = _grouped_binds(jax.make_jaxpr(f)(a, sa, b, sb, mm).jaxpr)
  assert binds and all(gg <= 4 for _, gg in binds), binds
  d = jax.jit(f)(a, sa, b, sb, mm)
  for i in range(5):
    assert oracle.calc_diff(d[i], oracle.grouped_masked(a[i], sa[i], *wb[i], mm[i])) < 1e-5


def test_sizes_as_python_lists(rng):
  # An empty Python list is int32 group sizes (jnp.asarray([]) alone would be float32).
  a, sa = quant_act(rng, 4, 128)
  b, sb = quant_w(rng, 0, 16, 128)
  d = jd.m_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, [])
  assert d.shape == (4, 16) and float(jnp.abs(d.astype(jnp.float32)).max()) == 0.0
  b2, sb2 = quant_w(rng, 2, 16, 128)
  d = jd.m_grouped_fp8_gemm_nt_contiguous(a, sa, b2, sb2, [3, 1])
  assert oracle.calc_diff(d, oracle.grouped_contiguous(a, sa, b2, sb2, [3, 1])) < 1e-5


def test_masked_expected_m_checked_whatever_the_rank(rng):
  a, sa = quant_act(rng, 16, 128)
  b, sb = quant_w(rng, 2, 32, 128)
  with pytest.raises(TypeError, match="expected_m must be a Python int"):
    jd.m_grouped_fp8_gemm_nt_masked(a, sa, b, sb, jnp.zeros((2,), jnp.int32), expected_m=[1])


def test_contiguous_rows_only_see_their_own_expert(rng):
  # (The reference went through ragged_dot's dense lowering, which masks by multiplying: an
  # inf scale or NaN weight in one expert, an empty one too, made every row NaN, rows past the
  # last group included. The kernel never reads weights for rows that are not theirs.)
  a, sa = quant_act(rng, 8, 128)
  b, sb = quant_w(rng, 3, 16, 128)
  for sizes, bad in (([3, 0, 3], 1), ([3, 2, 3], 2)):
    sb_bad = sb.at[bad].set(jnp.inf)
    d = np.asarray(jd.m_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb_bad, sizes,
                                                       out_dtype=jnp.float32))
    own = np.repeat(np.arange(3), sizes)
    good_rows = np.flatnonzero(own != bad)
    want = np.asarray(oracle.grouped_contiguous(a, sa, b, sb, sizes))
    assert oracle.calc_diff(d[good_rows], want[good_rows]) < 1e-5  # (kernels: FP8 sums)
    if sizes[bad]:  # the bad expert's own rows are not finite, as in the float64 oracle
      assert not np.isfinite(d[np.flatnonzero(own == bad)]).any()
    np.testing.assert_array_equal(d[len(own):], 0.0)  # rows past the last group


def test_group_sizes_as_wide_python_ints_and_bad_types(rng):
  a, sa = quant_act(rng, 4, 128)
  b, sb = quant_w(rng, 3, 16, 128)
  d = jd.m_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, [2**32 + 3, 0, 0])  # clipped to M
  assert oracle.calc_diff(d, oracle.grouped_contiguous(a, sa, b, sb, [4, 0, 0])) < 1e-5
  for bad in (None, "3", [3, True], (np.bool_(True), 2), {}, [[1], [2, 3]],
              [jnp.asarray(True), 2, 0], [2, np.array(False), 0]):
    with pytest.raises(TypeError, match="m_grouped_fp8_gemm_nt_contiguous: group_sizes"):
      jd.m_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, bad)
  # A JAX bool in the list, traced too, was taken as 0 or 1 rows (only Python and NumPy bools
  # were refused).
  with pytest.raises(TypeError, match="m_grouped_fp8_gemm_nt_contiguous: group_sizes"):
    jax.jit(lambda m: jd.m_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, [m, 2, 0]))(
        jnp.asarray(True))
  with pytest.raises(TypeError, match="m_grouped_fp8_gemm_nt_masked: masked_m"):
    jd.m_grouped_fp8_gemm_nt_masked(a[None], sa[None], b[:1], sb[:1], [jnp.asarray(True)])
