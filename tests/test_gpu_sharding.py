"""Sharding rules on real GPUs (>= 2 Hopper GPUs): sharded ops under plain jit run our kernels
per shard and gather nothing. The CPU version (tests/test_sharding.py) covers every split.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jax_deepgemm as jd
import multidevice
import oracle
from helpers import quant_act, quant_w


def _gpus():
  try:
    return jax.devices("gpu")
  except RuntimeError:
    return []


pytestmark = pytest.mark.skipif(not (jd.use_kernels() and len(_gpus()) >= 2),
                                reason="needs the CUDA extension and >= 2 Hopper GPUs")


def _run(fn, args, specs):
  mesh = jax.make_mesh((2,), ("x",), devices=_gpus()[:2],
                       axis_types=(jax.sharding.AxisType.Auto,))
  placed = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)]
  f = jax.jit(fn)
  hlo = f.lower(*placed).compile().as_text()
  return f(*placed), multidevice.collectives(hlo), hlo


def test_gemm_m_and_n_sharded_stay_local(rng):
  a, sa = quant_act(rng, 512, 1024)
  b, sb = quant_w(rng, 768, 1024)
  want = jd.fp8_gemm_nt(a, sa, b, sb)
  for specs in [(P("x"), P("x"), P(), P()), (P(), P(), P("x"), P("x"))]:
    d, counts, hlo = _run(jd.fp8_gemm_nt, (a, sa, b, sb), specs)
    assert "jax_deepgemm_fp8_gemm_nt" in hlo
    assert counts["all-gather"] == 0 and counts["all-reduce"] == 0, (specs, counts)
    np.testing.assert_array_equal(np.asarray(d.astype(jnp.float32)),
                                  np.asarray(want.astype(jnp.float32)))


def test_gemm_k_sharded_reduces(rng):
  a, sa = quant_act(rng, 256, 1024)
  b, sb = quant_w(rng, 384, 1024)
  d, counts, _ = _run(jd.fp8_gemm_nt, (a, sa, b, sb),
                      (P(None, "x"), P(None, "x"), P(None, "x"), P(None, "x")))
  assert counts["all-gather"] == 0 and counts["all-reduce"] == 1, counts
  assert oracle.calc_diff(d, oracle.gemm_nt(a, sa, b, sb)) < 1e-5


def test_grouped_n_sharded_and_wgrad_token_sharded(rng):
  a, sa = quant_act(rng, 600, 512)
  b, sb = quant_w(rng, 4, 512, 512)
  gs = jnp.asarray([100, 0, 350, 150], jnp.int32)
  d, counts, hlo = _run(jd.m_grouped_fp8_gemm_nt_contiguous, (a, sa, b, sb, gs),
                        (P(), P(), P(None, "x"), P(None, "x"), P()))
  assert "jax_deepgemm_m_grouped_fp8_gemm_nt" in hlo and counts["all-gather"] == 0, counts
  assert oracle.calc_diff(d, oracle.grouped_contiguous(a, sa, b, sb, gs)) < 1e-5
  x, sx = quant_act(rng, 1024, 256, axis=0)
  y, sy = quant_act(rng, 1024, 384, axis=0)
  gs = jnp.asarray([300, 0, 724], jnp.int32)
  d, counts, hlo = _run(jd.k_grouped_fp8_gemm_tn_contiguous, (x, sx, y, sy, gs),
                        (P("x"), P("x"), P("x"), P("x"), P()))
  assert "jax_deepgemm_k_grouped_fp8_gemm_tn" in hlo
  assert counts["all-gather"] == 0 and counts["all-reduce"] == 1, counts
  assert oracle.calc_diff(d, oracle.k_grouped(x, sx, y, sy, gs)) < 1e-5


def test_fp8_linear_data_parallel_gathers_nothing(rng):
  # Casts and GEMMs of forward and backward all run per shard; only dW is all-reduced.
  x = jnp.asarray(rng.standard_normal((512, 1024)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((1024, 768)) * 0.03, jnp.bfloat16)
  loss = lambda x, w: jnp.sum(jd.fp8_linear(x, w).astype(jnp.float32) ** 2)
  grad = jax.value_and_grad(loss, argnums=(0, 1))
  (l, (gx, gw)), counts, hlo = _run(grad, (x, w), (P("x"), P()))
  # (value_and_grad runs the forward rule: X's and W's casts are the dual ones.)
  for target in ("dual_cast", "per_block_dual_cast", "fp8_gemm_nt"):
    assert f'custom_call_target="jax_deepgemm_{target}"' in hlo, target
  assert counts["all-gather"] == 0 and counts["all-to-all"] == 0, counts
  l1, (gx1, gw1) = jax.jit(grad)(x, w)
  np.testing.assert_allclose(float(l), float(l1), rtol=1e-4)
  assert oracle.calc_diff(gx, gx1) < 1e-6 and oracle.calc_diff(gw, gw1) < 1e-5
