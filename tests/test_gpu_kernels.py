"""Hopper kernels against the float64 oracle. Skips without the CUDA extension and an sm_90 GPU.

The CPU-path tests in the other files also run through the kernels when a Hopper GPU is the
default device; these add the production shapes and GPU-only properties.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_deepgemm as jd
import oracle
from helpers import quant_act, quant_w, randn, run_script

pytestmark = pytest.mark.skipif(not jd.use_kernels(),
                                reason="needs the CUDA extension and a Hopper (sm_90) GPU")

NK = [(2112, 7168), (24576, 1536), (7168, 16384), (4096, 7168), (7168, 2048)]


def _run(m, n, k, rng, operands=None, **kw):
  a, sa, b, sb = operands or (*quant_act(rng, m, k), *quant_w(rng, n, k))
  d = jax.jit(jd.fp8_gemm_nt)(a, sa, b, sb, **kw)
  return d, oracle.gemm_nt(a, sa, b, sb, **kw)


def _check(m, n, k, rng, elementwise=True):
  """calc_diff against float64, and (the float64 |terms| product permitting) per element."""
  operands = (*quant_act(rng, m, k), *quant_w(rng, n, k))
  d, want = _run(m, n, k, rng, operands)
  assert oracle.calc_diff(d, want) < 1e-5
  if elementwise:
    oracle.assert_elementwise(d, want, oracle.gemm_nt_abs(*operands), d.dtype)


@pytest.mark.parametrize("m", [1, 7, 127, 128, 4096])
@pytest.mark.parametrize("n,k", NK)
def test_deepgemm_shapes(rng, m, n, k):
  _check(m, n, k, rng, elementwise=m < 4096)  # a second float64 GEMM at M = 4096 is slow


@pytest.mark.parametrize("m,n,k", [(1, 1, 16), (3, 5, 100), (129, 257, 272), (65, 8, 4096),
                                   (200, 1000, 144), (1000, 24, 16384)])
def test_odd_shapes(rng, m, n, k):
  _check(m, n, k, rng)


def test_epilogues_odd(rng):
  m, n, k = 77, 300, 512
  bias = randn(rng, (n,), scale=5.0)
  c = randn(rng, (m, n), scale=50.0)
  d, want = _run(m, n, k, rng, bias=bias, c=c)
  assert d.dtype == jnp.float32 and oracle.calc_diff(d, want) < 1e-5


def test_lowers_to_our_kernel(rng):
  a, sa = quant_act(rng, 128, 256)
  b, sb = quant_w(rng, 128, 256)
  hlo = jax.jit(jd.fp8_gemm_nt).lower(a, sa, b, sb).compile().as_text()
  assert "jax_deepgemm_fp8_gemm_nt" in hlo


def test_bitwise_deterministic(rng):
  a, sa = quant_act(rng, 4096, 7168)
  b, sb = quant_w(rng, 4096, 7168)
  f = jax.jit(jd.fp8_gemm_nt)
  ref = np.asarray(f(a, sa, b, sb).astype(jnp.float32))
  for _ in range(3):
    np.testing.assert_array_equal(np.asarray(f(a, sa, b, sb).astype(jnp.float32)), ref)


def test_large_k_stays_accurate(rng):
  # Promotion every 128 K keeps FP32 accuracy where tensor-core-only accumulation drifts.
  d, want = _run(256, 256, 65536, rng)
  assert oracle.calc_diff(d, want) < 1e-5


@pytest.mark.parametrize("m,n,k", [(300, 512, 1024), (4096, 7168, 2048)])
def test_zero_and_tiny_scale_blocks(rng, m, n, k):
  # Scale blocks of 0 (a block of zeros scaled without a floor) and far apart in size: the
  # 128x256 loop keeps its accumulator divided by the current k-block's scale.
  a, sa = quant_act(rng, m, k)
  b, sb = quant_w(rng, n, k)
  sa = sa.at[5:40, 2].set(0.0).at[200:, 0].set(0.0).at[:, 5].multiply(1e-12)
  sb = sb.at[1, 3].set(0.0).at[:, 4].multiply(1e6)
  operands = (a, sa, b, sb)
  d, want = _run(m, n, k, rng, operands)
  assert oracle.calc_diff(d, want) < 1e-5
  if m < 4096:
    oracle.assert_elementwise(d, want, oracle.gemm_nt_abs(*operands), d.dtype)


_CONFIG_SCRIPT = """
import sys, jax, jax.numpy as jnp, numpy as np, jax_deepgemm as jd, oracle
from helpers import quant_act, quant_w
rng = np.random.default_rng(1)
worst = 0.0
outs = []
# K 9008: 71 k-blocks, past two windows of B scales (32 k-blocks each; serial loops, 64x128).
# 1100x4000: more tiles than SMs for every tile (a CTA stores a tile while it runs the next,
# 128x256 in two column halves), partial in M and N.
for m, n, k in [(200, 1000, 640), (65, 300, 400), (1, 96, 7168), (300, 2112, 128), (130, 161, 16),
                (129, 200, 9008), (1100, 4000, 256)]:
  a, sa = quant_act(rng, m, k); b, sb = quant_w(rng, n, k)
  bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
  c = jnp.asarray(rng.standard_normal((m, n)) * 10, jnp.float32)
  d_bias, d_c = jd.fp8_gemm_nt(a, sa, b, sb, bias=bias), jd.fp8_gemm_nt(a, sa, b, sb, c=c)
  worst = max(worst, oracle.calc_diff(d_bias, oracle.gemm_nt(a, sa, b, sb, bias=bias)),
              oracle.calc_diff(d_c, oracle.gemm_nt(a, sa, b, sb, c=c)))
  outs += [d_bias, d_c]
  if m == 1100:
    d = jd.fp8_gemm_nt(a, sa, b, sb, out_dtype=jnp.float32)
    worst = max(worst, oracle.calc_diff(d, oracle.gemm_nt(a, sa, b, sb)))
    outs.append(d)
if len(sys.argv) > 1:
  np.savez(sys.argv[1], *[np.asarray(o.astype(jnp.float32)) for o in outs])
print("WORST", worst)
"""


def _run_with_config(cfg, script, *args):
  """Runs `script` in a subprocess with JAX_DEEPGEMM_GEMM_CONFIG=cfg (read once per process)."""
  r = run_script(script, {"JAX_DEEPGEMM_GEMM_CONFIG": cfg}, *args)
  assert r.returncode == 0, (cfg, r.stderr[-2000:])
  return r.stdout


def test_every_built_config(tmp_path):
  # Each config against float64, and bitwise against the first: every tile promotes each
  # element over the same k-blocks in the same order, so no config (and no M, through the
  # config the heuristic picks for it) changes a result (README: batch invariance).
  from jax_deepgemm import _C
  configs = _C.supported_gemm_configs().split("; ")
  assert len(configs) >= 5
  first = None
  for i, cfg in enumerate(configs):
    f = str(tmp_path / f"cfg{i}.npz")
    worst = float(_run_with_config(cfg, _CONFIG_SCRIPT, f).split("WORST")[-1])
    assert worst < 1e-5, (cfg, worst)
    got = np.load(f)
    assert len(got.files) == 15
    if first is None:
      first = (cfg, got)
      continue
    for key in got.files:
      np.testing.assert_array_equal(got[key], first[1][key], err_msg=f"{cfg} vs {first[0]}: {key}")


@pytest.mark.parametrize("n,k", [(2112, 7168), (7168, 2048), (300, 400)])
def test_rows_do_not_depend_on_m(rng, n, k):
  # Batch invariance: a row's result is the same bits whatever else is in the batch (the
  # heuristic picks 64x32 with short A boxes at M = 1, 128-row tiles at M = 4096), bf16 and f32.
  a, sa = quant_act(rng, 4096, k)
  b, sb = quant_w(rng, n, k)
  bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
  for kw in ({}, {"out_dtype": jnp.float32, "bias": bias}):
    f = jax.jit(lambda a, sa: jd.fp8_gemm_nt(a, sa, b, sb, **kw))
    full = np.asarray(f(a, sa).astype(jnp.float32))
    for lo, hi in [(0, 1), (4095, 4096), (100, 107), (64, 128), (1000, 1129), (0, 2048)]:
      part = np.asarray(f(a[lo:hi], sa[lo:hi]).astype(jnp.float32))
      np.testing.assert_array_equal(part, full[lo:hi], err_msg=f"rows {lo}:{hi} {kw.keys()}")


# Outputs of the dense and M-grouped kernels (bias, c in place, fp32/bf16, edge tiles,
# partial and empty groups), for comparing the two epilogues.
_EPILOGUE_SCRIPT = """
import sys, jax, jax.numpy as jnp, numpy as np, jax_deepgemm as jd
from helpers import quant_act, quant_w
rng = np.random.default_rng(7)
outs = []
for m, n, k in [(300, 2112, 640), (4096, 512, 1024), (200, 1000, 256)]:
  a, sa = quant_act(rng, m, k); b, sb = quant_w(rng, n, k)
  bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
  c = jnp.asarray(rng.standard_normal((m, n)) * 10, jnp.float32)
  outs += [jd.fp8_gemm_nt(a, sa, b, sb), jd.fp8_gemm_nt(a, sa, b, sb, bias=bias),
           jd.fp8_gemm_nt(a, sa, b, sb, bias=bias, c=c),
           jd.fp8_gemm_nt(a, sa, b, sb, out_dtype=jnp.float32)]
m, n, k, sizes = 700, 384, 512, [0, 7, 300, 64, 0, 129, 200]
a, sa = quant_act(rng, m, k); b, sb = quant_w(rng, len(sizes), n, k)
gs = jnp.asarray(sizes, jnp.int32)
outs.append(jd.m_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, gs))
outs.append(jd.m_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, gs, out_dtype=jnp.float32))
am, sam = a[:6 * 100].reshape(6, 100, k), sa[:6 * 100].reshape(6, 100, -1)
outs.append(jd.m_grouped_fp8_gemm_nt_masked(am, sam, b[:6], sb[:6],
                                            jnp.asarray([0, 100, 64, 65, 1, 99], jnp.int32)))
np.savez(sys.argv[1], *[np.asarray(o.astype(jnp.float32)) for o in outs])
"""


def test_tma_store_epilogue_matches_register_epilogue(tmp_path):
  # Same values, so bitwise equal: the TMA-store epilogue (default where out
  # allows it, reduce-add for c) against the register one (tma_store=0).
  res = {}
  for flag in ("1", "0"):
    f = str(tmp_path / f"tma{flag}.npz")
    _run_with_config(f"tma_store={flag}", _EPILOGUE_SCRIPT, f)
    res[flag] = np.load(f)
  assert len(res["1"].files) == 15
  for key in res["1"].files:
    assert np.isfinite(res["1"][key]).all(), key
    np.testing.assert_array_equal(res["1"][key], res["0"][key], err_msg=key)
