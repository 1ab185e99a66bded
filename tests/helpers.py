import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import jaxprs_in_params

import jax_deepgemm as jd


def randn(rng, shape, dtype=jnp.float32, scale=1.0):
  # Varying magnitudes per row so the 1x128 / 128x128 scales differ.
  x = rng.standard_normal(shape) * scale
  if len(shape) >= 1 and shape[0] > 0:
    x = x * np.exp(rng.uniform(-2, 2, size=(shape[0],) + (1,) * (len(shape) - 1)))
  return jnp.asarray(x, dtype)


def quant_act(rng, m, k, axis=-1):
  return jd.per_token_cast_to_fp8(randn(rng, (m, k), jnp.bfloat16), axis=axis)


def quant_w(rng, *shape):
  return jd.per_block_cast_to_fp8(randn(rng, shape))


W_CASTS = ("jax_deepgemm_per_block_cast", "jax_deepgemm_per_block_dual_cast")


def casts_of_w(fn, *args, under=None):
  """How many block casts (W's casts: X and dY take the per-token ones) ``fn``'s jaxpr holds;
  with ``under``, only those inside an equation of that primitive (e.g. a scan's body)."""
  def count(jaxpr, inside):
    n = 0
    for eqn in jaxpr.eqns:
      n += inside and eqn.primitive.name in W_CASTS
      for sub in jaxprs_in_params(eqn.params):
        n += count(sub, inside or eqn.primitive.name == under)
    return n
  return count(jax.make_jaxpr(fn)(*args).jaxpr, under is None)


def w_cast_dtypes(fn, *args):
  """The dtypes of the arrays W's block casts read in ``fn``'s jaxpr, sorted."""
  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in W_CASTS:
        yield str(eqn.invars[0].aval.dtype)
      for sub in jaxprs_in_params(eqn.params):
        yield from walk(sub)
  return sorted(walk(jax.make_jaxpr(fn)(*args).jaxpr))


def run_script(script, env_extra, *args):
  """Runs `script` in a fresh Python with `env_extra` set (for settings read once per process,
  like JAX_DEEPGEMM_GEMM_CONFIG), from tests/ with tests/ importable. Returns the process."""
  here = os.path.dirname(os.path.abspath(__file__))
  path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
  env = dict(os.environ, PYTHONPATH=path, **env_extra)
  return subprocess.run([sys.executable, "-c", script, *args], env=env, cwd=here,
                        capture_output=True, text=True, timeout=300)
