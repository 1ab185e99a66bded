"""MN-major activation scales (the default; ``JAX_DEEPGEMM_MN_MAJOR_SCALES=0`` turns them off) on a
Hopper GPU: the same bits as row-major ones.

With the setting on, the per-token casts write their scales MN-major (``output_layouts``) and the
GEMMs take them as they are (``input_layouts``). The kernels compute the same thing, so every
result must equal the row-major path's bit for bit; and a cast feeding a GEMM must compile to the
two custom calls with nothing between them. The setting is read at lowering, so each path runs
in its own process (jit caches would otherwise mix them). Skips without an sm_90 GPU.
"""
import numpy as np
import pytest

import jax_deepgemm as jd
from jax_deepgemm import _ffi
from helpers import run_script

pytestmark = pytest.mark.skipif(not jd.use_kernels(),
                                reason="needs the CUDA extension and a Hopper (sm_90) GPU")

_SCRIPT = r"""
import sys
import numpy as np
from test_gpu_mn_major import outputs
np.savez(sys.argv[1], **outputs())
"""


def _bytes(x):
  return np.ascontiguousarray(np.asarray(x)).view(np.uint8)


def _extra_ops(compiled_text):
  """Instructions of the compiled entry computation that are neither our calls nor free."""
  entry = compiled_text[compiled_text.index("ENTRY"):]
  entry = entry[:entry.index("\n}")]
  free = ("parameter(", "custom-call(", "get-tuple-element(", "tuple(", "bitcast(", "constant(")
  return [line.strip() for line in entry.splitlines()[1:]
          if "=" in line and not any(f in line for f in free)]


def outputs():
  """Results of the casts, GEMMs and layers on fixed data (run in a subprocess per setting)."""
  import jax
  import jax.numpy as jnp
  rng = np.random.default_rng(0)

  def randn(shape, scale=1.0):
    x = rng.standard_normal(shape) * np.exp(rng.uniform(-2, 2, size=shape[:-1] + (1,))) * scale
    return jnp.asarray(x, jnp.bfloat16)

  out = {}
  for m in (128, 7, 260):
    x = randn((m, 1000))
    w = jd.per_block_cast_to_fp8(randn((384, 1000), 0.05))
    xb = randn((2, m, 384))
    out[f"cast_{m}"] = [*jd.per_token_cast_to_fp8(x), *jd.per_token_cast_to_fp8(xb)]
    out[f"dual_{m}"] = list(jd.per_token_cast_to_fp8_and_transpose(x))
    dense = jax.jit(lambda x, w=w: jd.fp8_gemm_nt(*jd.per_token_cast_to_fp8(x), *w))
    out[f"dense_{m}"] = [dense(x)]
    if m == 128:  # cast + GEMM: two kernels, no transpose (or copy) of the scales between
      # (K % 16 == 0: K = 1000 above also pads a, an op between the two in either setting.)
      xk, wk = randn((m, 1024)), jd.per_block_cast_to_fp8(randn((384, 1024), 0.05))
      dense_k = jax.jit(lambda x, w=wk: jd.fp8_gemm_nt(*jd.per_token_cast_to_fp8(x), *w))
      out["extra_ops"] = np.int32(len(_extra_ops(dense_k.lower(xk).compile().as_text())))
    a, sa = jd.per_token_cast_to_fp8(x)  # sa handed over row-major, as a jit argument
    out[f"dense_arg_{m}"] = [jax.jit(jd.fp8_gemm_nt)(a, sa, *w)]
    bg, sbg = jd.per_block_cast_to_fp8(randn((3, 256, 1000), 0.05))
    xg = randn((2 * m + 4, 1000))  # rows % 4 == 0 (but for m = 7), groups not of 128
    gs = jnp.asarray([m, 0, m + 4], jnp.int32)
    out[f"grouped_{m}"] = [jax.jit(lambda x: jd.m_grouped_fp8_gemm_nt_contiguous(
        *jd.per_token_cast_to_fp8(x), bg, sbg, gs))(xg)]
    xm = randn((3, m, 1000))
    out[f"masked_{m}"] = [jax.jit(lambda x: jd.m_grouped_fp8_gemm_nt_masked(
        *jd.per_token_cast_to_fp8(x), bg, sbg, jnp.asarray([m, 0, m // 2], jnp.int32)))(xm)]
    wl, bias = randn((1000, 384), 0.05), randn((1, 384))[0]
    loss = lambda x, w, b: jnp.sum(jd.fp8_linear(x, w, b).astype(jnp.float32) ** 2)
    out[f"linear_{m}"] = list(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, wl, bias)[1])
    wg = randn((3, 1000, 256), 0.05)
    gloss = lambda x, w: jnp.sum(jd.fp8_grouped_linear(x, w, gs).astype(jnp.float32) ** 2)
    out[f"grouped_linear_{m}"] = list(jax.jit(jax.grad(gloss, argnums=(0, 1)))(xg, wg))
  flat = {}
  for k, v in out.items():
    if isinstance(v, list):
      flat.update({f"{k}_{i}": _bytes(o) for i, o in enumerate(v)})
    else:
      flat[k] = v
  return flat


def test_mn_major_scales_change_no_bit(tmp_path):
  got = {}
  for on in ("0", "1"):
    path = tmp_path / f"{on}.npz"
    r = run_script(_SCRIPT, {_ffi.MN_MAJOR_SCALES_ENV: on,
                             "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}, str(path))
    assert r.returncode == 0, r.stderr[-3000:]
    got[on] = dict(np.load(path))
  off, on = got["0"], got["1"]
  assert set(off) == set(on)
  for k in sorted(off):
    if k != "extra_ops":
      np.testing.assert_array_equal(on[k], off[k], err_msg=k)
  # Without the setting the scales are transposed between the two calls; with it, not.
  assert off["extra_ops"] >= 1
  assert on["extra_ops"] == 0, "an op between the cast and the GEMM with the setting on"
