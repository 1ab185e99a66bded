"""The Hopper K-grouped (weight-gradient) kernel against the float64 oracle.

Skips without the CUDA extension and an sm_90 GPU.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_deepgemm as jd
import oracle
from helpers import quant_act, randn, run_script

pytestmark = pytest.mark.skipif(not jd.use_kernels(),
                                reason="needs the CUDA extension and a Hopper (sm_90) GPU")


def _operands(rng, t, n, k):
  a, sa = quant_act(rng, t, n, axis=0)
  b, sb = quant_act(rng, t, k, axis=0)
  return a, sa, b, sb


@pytest.mark.parametrize("sizes", [
    [128, 256, 0, 128],          # aligned, one empty group
    [100, 0, 29, 300, 1, 82],    # boundaries inside 128-token blocks
    [0, 0, 512, 0],              # one group
    [5, 3, 0, 9],                # tiny groups sharing one block; sum < T
    [300, 300, 300],             # sum > T: clipped
])
def test_routings(rng, sizes):
  t, n, k = 512, 256, 384
  a, sa, b, sb = _operands(rng, t, n, k)
  gs = np.asarray(sizes, np.int32)
  d = jax.jit(jd.k_grouped_fp8_gemm_tn_contiguous)(a, sa, b, sb, gs)
  want = oracle.k_grouped(a, sa, b, sb, gs)
  assert d.shape == (len(sizes), n, k) and d.dtype == jnp.float32
  assert oracle.calc_diff(d, want) < 1e-5
  clipped = np.diff(np.minimum(np.cumsum(np.concatenate([[0], gs])), t))
  for g in np.flatnonzero(clipped == 0):
    assert float(jnp.abs(d[g]).max()) == 0.0


@pytest.mark.parametrize("t,n,k,g", [(1000, 100, 72, 5), (4096, 7168, 2048, 4), (333, 64, 96, 2),
                                     (8200, 1536, 1024, 16)])
def test_shapes_random_routing(rng, t, n, k, g):
  a, sa, b, sb = _operands(rng, t, n, k)
  gs = np.bincount(rng.integers(0, g, size=t), minlength=g).astype(np.int32)
  gs[g // 2] = 0
  gs[-1] += t - gs.sum()
  d = jd.k_grouped_fp8_gemm_tn_contiguous(a, sa, b, sb, gs)
  assert oracle.calc_diff(d, oracle.k_grouped(a, sa, b, sb, gs)) < 1e-5


@pytest.mark.parametrize("t,n,k,sizes", [
    # 0/1/2/4/8-block chunks, groups ending mid-block (their last block runs alone)
    (4000, 256, 384, [1, 127, 129, 1000, 1921, 0, 2, 820]),
    (1000, 100, 72, [500, 0, 300, 200]),  # odd N, K: the per-pair store
    # Rows of K * 4 (fp32) / K * 2 (bf16) bytes not a multiple of 16; N 320: a 192-row
    # tile whose last warpgroup lies past N (the edges of the TMA-store epilogue: the
    # register store where TMA cannot take the rows)
    (700, 70, 90, [300, 0, 400]), (600, 320, 64, [250, 0, 350]),
])
def test_bf16_out(rng, t, n, k, sizes):
  # The kernel rounds its fp32 accumulator once: bitwise the fp32 result in bf16.
  a, sa, b, sb = _operands(rng, t, n, k)
  gs = np.asarray(sizes, np.int32)
  f = jax.jit(jd.k_grouped_fp8_gemm_tn_contiguous, static_argnames="out_dtype")
  d32 = f(a, sa, b, sb, gs)
  d16 = f(a, sa, b, sb, gs, out_dtype=jnp.bfloat16)
  assert d16.dtype == jnp.bfloat16
  assert oracle.calc_diff(d32, oracle.k_grouped(a, sa, b, sb, gs)) < 1e-5
  np.testing.assert_array_equal(np.asarray(d16.astype(jnp.float32)),
                                np.asarray(d32.astype(jnp.bfloat16).astype(jnp.float32)))


def test_accumulate_into_c(rng):
  t, n, k = 700, 128, 256
  a, sa, b, sb = _operands(rng, t, n, k)
  gs = np.array([200, 0, 500], np.int32)
  c = randn(rng, (3, n, k), scale=10.0)
  d = jax.jit(lambda c: jd.k_grouped_fp8_gemm_tn_contiguous(a, sa, b, sb, gs, c=c),
              donate_argnums=0)(jnp.array(c))
  want = oracle.k_grouped(a, sa, b, sb, gs, c=c)
  assert oracle.calc_diff(d, want) < 1e-5
  np.testing.assert_array_equal(np.asarray(d[1]), np.asarray(c[1]))  # empty group: c


def test_nan_in_another_group_does_not_leak(rng):
  # Group 0 ends mid-block; group 1's tokens in that block are masked, NaN or not.
  t, n, k = 256, 128, 128
  a, sa, b, sb = _operands(rng, t, n, k)
  b = b.at[100:].set(jnp.nan)
  gs = np.array([100, 156], np.int32)
  d = jd.k_grouped_fp8_gemm_tn_contiguous(a, sa, b, sb, gs)
  assert bool(jnp.isfinite(d[0]).all())
  assert oracle.calc_diff(d[0], oracle.k_grouped(a[:100], sa[:1], b[:100], sb[:1], gs[:1])[0]) < 1e-5


def test_output_rows_past_int32(rng):
  # [G, N, K] with G*N > 2^31: the TMA store's row coordinate g*N + row is an int, so
  # the last group's boxes would land at negative rows and be dropped (its rows left
  # unwritten); such outputs store from registers. bf16, K 8: a 34 GB output.
  t, n, k, g = 32, 2_099_328, 8, 1024
  assert (g - 1) * n > 2**31 - 1 > (g - 2) * n  # groups 1022 (its tail) and 1023
  limit = jax.devices()[0].memory_stats().get("bytes_limit", 0)
  if limit < 48 * 2**30:
    pytest.skip(f"needs 48 GiB of device memory, XLA's pool has {limit / 2**30:.0f} GiB")
  a, sa, b, sb = _operands(rng, t, n, k)
  gs = np.zeros(g, np.int32)
  gs[0], gs[-1] = 12, 20
  d = jax.jit(jd.k_grouped_fp8_gemm_tn_contiguous, static_argnames="out_dtype")(
      a, sa, b, sb, gs, out_dtype=jnp.bfloat16)
  x, y = oracle.deq_token(a, sa, axis=0), oracle.deq_token(b, sb, axis=0)
  assert oracle.calc_diff(d[0], x[:12].T @ y[:12]) < 1e-5
  assert oracle.calc_diff(d[-1], x[12:].T @ y[12:]) < 1e-5
  assert not bool(jax.jit(lambda d: jnp.any(d[1:-1] != 0))(d))  # empty groups: zeros


def test_token_major_matches(rng):
  t, n, k = 1000, 320, 192
  x = randn(rng, (t, n), jnp.bfloat16)
  y = randn(rng, (t, k), jnp.bfloat16)
  at, sat = jd.per_token_cast_transpose_to_fp8(x)
  bt, sbt = jd.per_token_cast_transpose_to_fp8(y)
  a, sa = jd.per_token_cast_to_fp8(x, axis=0)
  b, sb = jd.per_token_cast_to_fp8(y, axis=0)
  gs = np.array([333, 0, 1, 600], np.int32)
  d = jax.jit(lambda *xs: jd.k_grouped_fp8_gemm_tn_contiguous(*xs, token_major=True))(
      at, sat, bt, sbt, gs)
  np.testing.assert_array_equal(np.asarray(d), np.asarray(
      jd.k_grouped_fp8_gemm_tn_contiguous(a, sa, b, sb, gs)))
  assert oracle.calc_diff(d, oracle.k_grouped(a, sa, b, sb, gs)) < 1e-5


def test_lowers_to_kernel_and_is_deterministic(rng):
  a, sa, b, sb = _operands(rng, 2048, 512, 512)
  gs = np.array([700, 0, 1000, 348], np.int32)
  f = jax.jit(jd.k_grouped_fp8_gemm_tn_contiguous)
  assert "jax_deepgemm_k_grouped_fp8_gemm_tn" in f.lower(a, sa, b, sb, gs).compile().as_text()
  ref = np.asarray(f(a, sa, b, sb, gs))
  for _ in range(2):
    np.testing.assert_array_equal(np.asarray(f(a, sa, b, sb, gs)), ref)


# Every K-grouped tile against the oracle, forced by JAX_DEEPGEMM_K_GROUPED_CONFIG (read
# once per process, so in a subprocess): routings with empty groups and boundaries inside
# token blocks, bf16 output, accumulation into c.
_FORCED_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np, jax_deepgemm as jd
import oracle
from helpers import quant_act, randn
rng = np.random.default_rng(3)
worst = 0.0
for t, n, k, sizes in [(512, 256, 384, [128, 256, 0, 128]), (1000, 100, 72, [5, 0, 29, 900]),
                       (4000, 448, 384, [1, 127, 129, 1000, 1921, 0, 2, 820]),
                       (300, 200, 136, [0, 0, 300])]:
  a, sa = quant_act(rng, t, n, axis=0)
  b, sb = quant_act(rng, t, k, axis=0)
  gs = np.asarray(sizes, np.int32)
  want = oracle.k_grouped(a, sa, b, sb, gs)
  d = jd.k_grouped_fp8_gemm_tn_contiguous(a, sa, b, sb, gs)
  worst = max(worst, oracle.calc_diff(d, want))
  for g in np.flatnonzero(gs == 0):
    assert float(jnp.abs(d[g]).max()) == 0.0, ("empty group", g)
  d16 = jd.k_grouped_fp8_gemm_tn_contiguous(a, sa, b, sb, gs, out_dtype=jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(d16.astype(jnp.float32)),
                                np.asarray(d.astype(jnp.bfloat16).astype(jnp.float32)))
  c = randn(rng, (len(sizes), n, k), scale=10.0)
  dc = jd.k_grouped_fp8_gemm_tn_contiguous(a, sa, b, sb, gs, c=c)
  worst = max(worst, oracle.calc_diff(dc, oracle.k_grouped(a, sa, b, sb, gs, c=c)))
print("WORST", worst)
"""


def _run_forced(cfg, script):
  return run_script(script, {"JAX_DEEPGEMM_K_GROUPED_CONFIG": cfg})


@pytest.mark.parametrize("cfg", ["block_m=192", "block_m=64", "block_m=128,block_n=128"])
def test_forced_tile(cfg):
  r = _run_forced(cfg, _FORCED_SCRIPT)
  assert r.returncode == 0, (cfg, r.stderr[-2000:])
  assert float(r.stdout.split("WORST")[-1]) < 1e-5, (cfg, r.stdout)


@pytest.mark.parametrize("cfg", ["block_m=96", "block_m=192,block_n=64", "stages=3", "block_m"])
def test_forced_tile_rejects_unknown(cfg):
  r = _run_forced(cfg, _FORCED_SCRIPT)
  assert r.returncode != 0 and "JAX_DEEPGEMM_K_GROUPED_CONFIG" in r.stderr, (cfg, r.stderr[-500:])
