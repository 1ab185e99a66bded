"""Expert-parallel MoE on real GPUs (>= 2 Hopper GPUs): the single-device layer's results.

The CPU version (tests/test_expert_parallel.py) checks the same on 8 forced host devices;
this one runs the FP8 kernels and NCCL all_to_all. Skips with fewer than 2 Hopper GPUs.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_deepgemm as jd
import oracle
from jax_deepgemm import expert_parallel
from test_expert_parallel import _moe, _value_and_grads


def _gpus():
  try:
    return jax.devices("gpu")
  except RuntimeError:
    return []


pytestmark = pytest.mark.skipif(not (jd.use_kernels() and len(_gpus()) >= 2),
                                reason="needs the CUDA extension and >= 2 Hopper GPUs")


@pytest.mark.parametrize("impl", ["bf16", "fp8"])
def test_expert_parallel_matches_single_gpu(impl):
  mesh = expert_parallel.make_mesh(data=1, expert=2, devices=_gpus()[:2])
  h, w, e, k = 256, 128, 8, 2
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((64, 32, h)), jnp.float32)
  r = jnp.asarray(rng.standard_normal((64, 32, h)), jnp.float32)
  single, par = _moe(None, impl, h, w, e, k), _moe(mesh, impl, h, w, e, k)
  router = jnp.asarray(rng.standard_normal((h, e)) * 0.3, jnp.float32)
  single.router[...] = router
  par.router[...] = router
  with jax.default_matmul_precision("highest"):
    y1, aux1, gx1, g1 = _value_and_grads(single, x, r)
    y2, aux2, gx2, g2 = _value_and_grads(par, x, r)
  assert oracle.calc_diff(y2, y1) < 1e-6 and oracle.calc_diff(gx2, gx1) < 1e-6
  np.testing.assert_allclose(aux2, aux1, rtol=1e-5)
  for name in g1:
    assert oracle.calc_diff(g2[name], g1[name]) < (2e-3 if impl == "fp8" else 1e-6), name
