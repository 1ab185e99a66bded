"""The FP8 quantization kernels against their pure-JAX reference, bit for bit, on a Hopper GPU.

Skips without the CUDA extension and an sm_90 GPU. The reference is the code the primitives'
reference lowering runs (``quant_kernels.*_reference``), compiled by XLA for the same GPU;
one test also runs the public API in a subprocess with ``JAX_DEEPGEMM_FORCE_REFERENCE=1``.
"""
import itertools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_deepgemm as jd
from jax_deepgemm import quant_kernels as qk

pytestmark = pytest.mark.skipif(not jd.use_kernels(),
                                reason="needs the CUDA extension and a Hopper (sm_90) GPU")

DTYPES = [jnp.bfloat16, jnp.float32, jnp.float16]


def _data(rng, shape, dtype):
  """Random values of varied magnitude, with all-zero groups, huge, tiny and exact values."""
  f16 = dtype == jnp.float16
  big, tiny, top = (3e4, 1e-7, 6) if f16 else (1e37, 1e-35, 12)  # (f16 ends at 65504)
  x = rng.standard_normal(shape) * np.exp(rng.uniform(-6, 6, size=shape[:-1] + (1,)))
  x = x.reshape(-1, shape[-1])
  r, c = x.shape
  # An all-zero rectangle: zero groups along either axis (and whole zero blocks).
  r0, c0 = rng.integers(0, r), rng.integers(0, c)
  x[r0:r0 + 150, c0:c0 + 150] = 0.0
  n = max(1, x.size // 500)
  idx = rng.integers(0, x.size, size=(3, n))
  x.flat[idx[0]] = big * rng.choice([-1, 1], n) * rng.uniform(0.5, 1, n)
  x.flat[idx[1]] = tiny * rng.choice([-1, 1], n)
  x.flat[idx[2]] = 448.0 * np.exp2(rng.integers(-12, top, n)) * rng.choice([-1, 1], n)
  return jnp.asarray(x.reshape(shape), dtype)


def _bits(a):
  a = np.asarray(a)
  return a.view(np.uint8) if a.dtype.itemsize == 1 else a.view(np.uint32)


def _assert_bitwise(got, want, what=""):
  for name, g, w in zip(("q", "scale"), got, want):
    assert g.shape == w.shape and g.dtype == w.dtype, (what, name, g.shape, w.shape)
    gb, wb = _bits(g), _bits(w)
    bad = np.argwhere(gb != wb)
    assert bad.size == 0, (f"{what}: {name} differs at {len(bad)} of {gb.size} places, first "
                           f"{bad[:5].tolist()}: got {gb[tuple(bad[:5].T)]}, "
                           f"want {wb[tuple(bad[:5].T)]}")


def _jit(fn, **kw):
  return jax.jit(lambda x: fn(x, **kw))


# ----------------------------------------------------------------------------- per token

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("use_ue8m0", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 257])
@pytest.mark.parametrize("cols", [100, 129, 7168])
def test_per_token(rng, dtype, use_ue8m0, rows, cols):
  x = _data(rng, (rows, cols), dtype)
  got = _jit(jd.per_token_cast_to_fp8, use_ue8m0=use_ue8m0)(x)
  want = _jit(qk.per_token_cast_reference, use_ue8m0=use_ue8m0)(x)
  _assert_bitwise(got, want, f"per_token {dtype.__name__} {x.shape} ue8m0={use_ue8m0}")


@pytest.mark.parametrize("shape", [(3, 5, 384), (4096, 7168), (2, 1, 8)])
def test_per_token_shapes(rng, shape):
  x = _data(rng, shape, jnp.bfloat16)
  _assert_bitwise(_jit(jd.per_token_cast_to_fp8)(x), _jit(qk.per_token_cast_reference)(x),
                  f"per_token {shape}")


# ----------------------------------------------------------------------------- per block

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("use_ue8m0", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (7, 100), (257, 129), (129, 7168), (300, 256),
                                   (2, 130, 257), (3, 256, 384)])
@pytest.mark.parametrize("transpose", [False, True])
def test_per_block(rng, dtype, use_ue8m0, shape, transpose):
  x = _data(rng, shape, dtype)
  got = _jit(jd.per_block_cast_to_fp8, use_ue8m0=use_ue8m0, transpose=transpose)(x)
  want = _jit(qk.per_block_cast_reference, use_ue8m0=use_ue8m0, transpose=transpose)(x)
  _assert_bitwise(got, want, f"per_block {dtype.__name__} {shape} ue8m0={use_ue8m0} "
                             f"transpose={transpose}")


# ----------------------------------------------------------------------------- token axis

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("t", [1, 7, 300])
@pytest.mark.parametrize("n", [1, 100, 129, 7168])
def test_token_axis(rng, dtype, transpose, t, n):
  x = _data(rng, (t, n), dtype)
  if transpose:
    got = _jit(jd.per_token_cast_transpose_to_fp8)(x)
  else:
    got = _jit(jd.per_token_cast_to_fp8, axis=0)(x)
  want = _jit(qk.token_axis_cast_reference, transpose=transpose)(x)
  _assert_bitwise(got, want, f"token_axis {dtype.__name__} {x.shape} transpose={transpose}")


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("shape", [(257, 130), (2, 300, 130), (384, 7168), (4096, 7168),
                                   (300, 16)])
def test_token_axis_ue8m0_and_batches(rng, transpose, shape):
  x = _data(rng, shape, jnp.bfloat16)
  for use_ue8m0 in (False, True):
    if transpose:
      got = _jit(jd.per_token_cast_transpose_to_fp8, use_ue8m0=use_ue8m0)(x)
    else:
      got = _jit(jd.per_token_cast_to_fp8, axis=-2, use_ue8m0=use_ue8m0)(x)
    want = _jit(qk.token_axis_cast_reference, use_ue8m0=use_ue8m0, transpose=transpose)(x)
    _assert_bitwise(got, want, f"token_axis {shape} transpose={transpose} ue8m0={use_ue8m0}")


def test_inner_axis_of_4d(rng):
  x = _data(rng, (2, 300, 3, 130), jnp.float32)  # groups along axis 1: [2, 300, 390]
  got = _jit(jd.per_token_cast_to_fp8, axis=1)(x)
  q, s = _jit(qk.token_axis_cast_reference)(x.reshape(2, 300, 390))
  _assert_bitwise(got, (q.reshape(x.shape), s.reshape(2, 3, 3, 130)), "axis=1 of 4-D")


# ----------------------------------------------------------------------------- properties

def test_non_finite_inputs(rng):
  # NaN and inf groups: the same bits as XLA's convert (NaN, or NaN with the sign for
  # the values that overflow to inf, which UE8M0 scales of NaN groups produce).
  x = np.array(_data(rng, (64, 512), jnp.float32))
  x[3, 5] = np.nan
  x[7, 200] = np.inf
  x[9, 300] = -np.inf
  x[100 % 64, 130] = np.nan
  # (bf16 too: 2-byte inputs take their own code in the token-axis kernel.)
  for x, use_ue8m0 in itertools.product((jnp.asarray(x), jnp.asarray(x, jnp.bfloat16)),
                                        (False, True)):
    for name, fn, ref in [
        ("per_token", jd.per_token_cast_to_fp8, qk.per_token_cast_reference),
        ("per_block", jd.per_block_cast_to_fp8, qk.per_block_cast_reference),
        ("per_block_t", lambda x, **kw: jd.per_block_cast_to_fp8(x, transpose=True, **kw),
         lambda x, **kw: qk.per_block_cast_reference(x, transpose=True, **kw)),
        ("token_axis", lambda x, **kw: jd.per_token_cast_to_fp8(x, axis=0, **kw),
         qk.token_axis_cast_reference),
        ("transpose", jd.per_token_cast_transpose_to_fp8,
         lambda x, **kw: qk.token_axis_cast_reference(x, transpose=True, **kw))]:
      (q, s), (qr, sr) = _jit(fn, use_ue8m0=use_ue8m0)(x), _jit(ref, use_ue8m0=use_ue8m0)(x)
      what = f"{name} {x.dtype} ue8m0={use_ue8m0}"
      np.testing.assert_array_equal(_bits(q), _bits(qr), err_msg=what)
      np.testing.assert_array_equal(np.asarray(s), np.asarray(sr), err_msg=what)  # NaN == NaN


def test_vmap_folds_into_the_kernel(rng):
  x = _data(rng, (3, 200, 130), jnp.bfloat16)
  for fn, ref in [(jd.per_token_cast_to_fp8, qk.per_token_cast_reference),
                  (jd.per_block_cast_to_fp8, qk.per_block_cast_reference),
                  (jd.per_token_cast_transpose_to_fp8,
                   lambda x: qk.token_axis_cast_reference(x, transpose=True))]:
    f = jax.jit(jax.vmap(fn, in_axes=1))
    assert "jax_deepgemm_" in f.lower(x).compile().as_text()
    _assert_bitwise(f(x), jax.jit(jax.vmap(ref, in_axes=1))(x), f"vmap {fn.__name__}")


def test_lowers_to_our_kernels(rng):
  x = _data(rng, (256, 384), jnp.bfloat16)
  for fn, target in [(jd.per_token_cast_to_fp8, "per_token_cast"),
                     (jd.per_block_cast_to_fp8, "per_block_cast"),
                     (jd.per_token_cast_transpose_to_fp8, "token_axis_cast"),
                     (lambda x: jd.per_token_cast_to_fp8(x, axis=0), "token_axis_cast"),
                     (jd.per_block_cast_to_fp8_and_transpose, "per_block_dual_cast")]:
    hlo = jax.jit(fn).lower(x).compile().as_text()
    assert f'custom_call_target="jax_deepgemm_{target}"' in hlo


def test_empty_inputs():
  for shape in [(0, 128), (4, 0), (0, 0)]:
    x = jnp.zeros(shape, jnp.bfloat16)
    for fn in (jd.per_token_cast_to_fp8, jd.per_block_cast_to_fp8,
               jd.per_token_cast_transpose_to_fp8, jd.per_block_cast_to_fp8_and_transpose):
      jax.block_until_ready(jax.jit(fn)(x))


def test_division_mode_probe():
  # Which form XLA compiles x / scale to here (the kernels follow it); printed for the log.
  modes = {kind: qk._kernel_recip(kind) for kind in ("token", "block", "token_axis")}
  print("XLA on this GPU quantizes as x * (1 / scale):", modes)
  assert len(set(modes.values())) == 1


def _recip_reference(x, use_ue8m0):
  """The per-token reference written as x * (1 / scale) (the kernels' `recip` form)."""
  xm = x.astype(jnp.float32)
  g = qk.ceil_div(x.shape[-1], 128)
  xg = jnp.pad(xm, ((0, 0), (0, g * 128 - x.shape[-1]))).reshape(x.shape[0], g, 128)
  scale = qk._scale_from_amax(jnp.max(jnp.abs(xg), axis=-1), use_ue8m0)
  q = (xg * (1.0 / scale)[..., None]).astype(qk.FP8_DTYPE).reshape(x.shape[0], -1)
  return q[:, :x.shape[-1]], scale


@pytest.mark.parametrize("use_ue8m0", [False, True])
def test_recip_mode_kernel(rng, use_ue8m0):
  # The fallback form, should XLA start to compile x / scale as x * (1 / scale) on GPUs.
  x = _data(rng, (257, 7168), jnp.bfloat16)
  call = jax.ffi.ffi_call("jax_deepgemm_per_token_cast",
                          (jax.ShapeDtypeStruct(x.shape, qk.FP8_DTYPE),
                           jax.ShapeDtypeStruct((257, 56), jnp.float32)))
  # Every attribute the handler declares (it rejects a call that lacks one); row-major scales.
  got = jax.jit(lambda x: call(x, use_ue8m0=np.int32(use_ue8m0), recip=np.int32(1),
                               s_mn_major=np.int32(0)))(x)
  want = jax.jit(lambda x: _recip_reference(x, use_ue8m0))(x)
  _assert_bitwise(got, want, f"recip ue8m0={use_ue8m0}")


_FORCED_REFERENCE_SCRIPT = """
import sys, numpy as np, jax, jax.numpy as jnp, jax_deepgemm as jd
assert not jd.use_kernels()
x = jnp.asarray(np.load(sys.argv[1]))
out = {}
for ue in (0, 1):
  out[f"tok{ue}"] = jd.per_token_cast_to_fp8(x, use_ue8m0=bool(ue))
  out[f"ax0{ue}"] = jd.per_token_cast_to_fp8(x, axis=0, use_ue8m0=bool(ue))
  out[f"tr{ue}"] = jd.per_token_cast_transpose_to_fp8(x, use_ue8m0=bool(ue))
  out[f"blk{ue}"] = jd.per_block_cast_to_fp8(x, use_ue8m0=bool(ue))
  out[f"bdual{ue}"] = jd.per_block_cast_to_fp8_and_transpose(x, use_ue8m0=bool(ue))
np.savez(sys.argv[2], **{f"{k}_{i}": np.asarray(o).view(np.uint8) for k, v in out.items()
                         for i, o in enumerate(v)})
"""


def test_matches_forced_reference_subprocess(rng, tmp_path):
  x = _data(rng, (300, 1000), jnp.float32)
  np.save(tmp_path / "x.npy", np.asarray(x))
  # (This process holds most of the GPU's memory: the child allocates as it goes.)
  env = dict(os.environ, JAX_DEEPGEMM_FORCE_REFERENCE="1", XLA_PYTHON_CLIENT_PREALLOCATE="false")
  r = subprocess.run([sys.executable, "-c", _FORCED_REFERENCE_SCRIPT, str(tmp_path / "x.npy"),
                      str(tmp_path / "ref.npz")], env=env, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  ref = np.load(tmp_path / "ref.npz")
  for ue in (0, 1):
    got = {"tok": jd.per_token_cast_to_fp8(x, use_ue8m0=bool(ue)),
           "ax0": jd.per_token_cast_to_fp8(x, axis=0, use_ue8m0=bool(ue)),
           "tr": jd.per_token_cast_transpose_to_fp8(x, use_ue8m0=bool(ue)),
           "blk": jd.per_block_cast_to_fp8(x, use_ue8m0=bool(ue)),
           "bdual": jd.per_block_cast_to_fp8_and_transpose(x, use_ue8m0=bool(ue))}
    for k, v in got.items():
      for i, o in enumerate(v):
        np.testing.assert_array_equal(np.asarray(o).view(np.uint8), ref[f"{k}{ue}_{i}"],
                                      err_msg=f"{k} ue8m0={ue} output {i}")


# ----------------------------------------------------------------------------- dual cast

def _separate(x, use_ue8m0=False):
  return (*jd.per_token_cast_to_fp8(x, use_ue8m0=use_ue8m0),
          *jd.per_token_cast_transpose_to_fp8(x, use_ue8m0=use_ue8m0))


def _assert_dual(got, want, what, halves=("per-token q, s", "token-axis qt, st")):
  _assert_bitwise(got[:2], want[:2], f"{what} ({halves[0]})")
  _assert_bitwise(got[2:], want[2:], f"{what} ({halves[1]})")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("use_ue8m0", [False, True])
@pytest.mark.parametrize("t", [1, 7, 129, 300])
@pytest.mark.parametrize("c", [1, 100, 130, 256, 1000, 7168])
def test_dual_cast(rng, dtype, use_ue8m0, t, c):
  # The fused kernel against the two separate kernels (and so, by the tests above, XLA).
  x = _data(rng, (t, c), dtype)
  got = _jit(jd.per_token_cast_to_fp8_and_transpose, use_ue8m0=use_ue8m0)(x)
  want = _jit(_separate, use_ue8m0=use_ue8m0)(x)
  _assert_dual(got, want, f"dual {dtype.__name__} {x.shape} ue8m0={use_ue8m0}")
  ref = _jit(qk.dual_cast_reference, use_ue8m0=use_ue8m0)(x)
  _assert_dual(got, ref, f"dual vs reference {dtype.__name__} {x.shape} ue8m0={use_ue8m0}")


@pytest.mark.parametrize("shape,dtype", [((32768, 7168), jnp.bfloat16),
                                         ((4096, 16384), jnp.bfloat16),
                                         ((3, 300, 1000), jnp.float32),
                                         ((2, 4096, 7168), jnp.float16)])
def test_dual_cast_large(rng, shape, dtype):
  x = _data(rng, shape, dtype)
  for use_ue8m0 in (False, True):
    got = _jit(jd.per_token_cast_to_fp8_and_transpose, use_ue8m0=use_ue8m0)(x)
    _assert_dual(got, _jit(_separate, use_ue8m0=use_ue8m0)(x),
                 f"dual {shape} {dtype.__name__} ue8m0={use_ue8m0}")
    del got


def test_dual_cast_non_finite_vmap_and_lowering(rng):
  x = np.array(_data(rng, (130, 512), jnp.float32))
  x[3, 5], x[7, 200], x[9, 300], x[129, 511] = np.nan, np.inf, -np.inf, np.nan
  for xd, use_ue8m0 in itertools.product((jnp.asarray(x), jnp.asarray(x, jnp.bfloat16),
                                          jnp.asarray(x, jnp.float16)), (False, True)):
    got = _jit(jd.per_token_cast_to_fp8_and_transpose, use_ue8m0=use_ue8m0)(xd)
    want = _jit(_separate, use_ue8m0=use_ue8m0)(xd)
    what = f"dual non-finite {xd.dtype} ue8m0={use_ue8m0}"
    for g, w in zip(got, want):  # (NaN scales: compare bits)
      np.testing.assert_array_equal(_bits(g), _bits(w), err_msg=what)
  xb = _data(rng, (3, 200, 130), jnp.bfloat16)
  f = jax.jit(jax.vmap(jd.per_token_cast_to_fp8_and_transpose, in_axes=1))
  assert 'custom_call_target="jax_deepgemm_dual_cast"' in f.lower(xb).compile().as_text()
  _assert_dual(f(xb), jax.jit(jax.vmap(_separate, in_axes=1))(xb), "dual vmap")
  for shape in [(0, 128), (4, 0), (0, 0)]:
    jax.block_until_ready(jax.jit(jd.per_token_cast_to_fp8_and_transpose)(
        jnp.zeros(shape, jnp.bfloat16)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dual_cast_keep_rows(rng, dtype):
  # Rows past keep_rows (NaN, inf and huge garbage here) are cast as zeros: bitwise the cast
  # of x with those rows zeroed, and the reference's; per slice, vmapped over keep_rows too.
  x = np.asarray(_data(rng, (3, 300, 1000), dtype)).astype(np.float32)
  keep = np.array([0, 129, 250], np.int32)
  for a, k in enumerate(keep):
    x[a, k:] = np.where(rng.random(x[a, k:].shape) < 0.5, np.nan, 3e38)
    x[a, k:, 7] = np.inf
  zeroed = np.where(np.arange(300)[None, :, None] < keep[:, None, None], x, 0)
  xd, zd = jnp.asarray(x, dtype), jnp.asarray(zeroed, dtype)
  bind = lambda x, k: qk.dual_cast_p.bind(x, k, use_ue8m0=False)
  got = jax.jit(bind)(xd, jnp.asarray(keep))
  what = f"dual keep_rows {dtype.__name__}"
  _assert_dual(got, _jit(jd.per_token_cast_to_fp8_and_transpose)(zd), what)
  _assert_dual(got, jax.jit(qk.dual_cast_reference)(xd, jnp.asarray(keep)), what + " vs reference")
  f = jax.jit(jax.vmap(bind, in_axes=(None, 0)))  # x shared, keep_rows batched
  many = f(xd[1], jnp.asarray([0, 1, 128, 299, 300], jnp.int32))
  for i, k in enumerate([0, 1, 128, 299, 300]):
    want = _jit(jd.per_token_cast_to_fp8_and_transpose)(xd[1].at[k:].set(0))
    _assert_dual([o[i] for o in many], want, f"{what} vmapped keep {k}")


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("s,t,c", [(300, 1000, 1000), (7, 129, 130), (1, 5, 7168),
                                   (4096, 300, 7168), (0, 130, 256)])
def test_gathered_dual_cast(rng, dtype, s, t, c, scaled):
  # The dual cast of rows read through an index (the MoE's dispatch): bitwise the dual cast
  # of the gathered rows, with repeated, out-of-range (>= S, negative: zero rows) indices and
  # rows past keep_rows; in slices of a leading axis, and under vmap (rows batched). scaled:
  # each row times its row_scale first (the combine's routing weights; zeros among them, and
  # NaN at rows outside x, which must stay zero rows), rounded to x's dtype as XLA rounds.
  x = _data(rng, (2, max(s, 1), c), dtype)[:, :s]
  rows = rng.integers(-2, s + 3, size=(2, t)).astype(np.int32)
  rows[:, : t // 2] = np.sort(rows[:, : t // 2])  # (sorted runs, as experts' tokens are)
  keep = np.array([t, max(t - 70, 0)], np.int32)
  valid = (rows >= 0) & (rows < s)
  if scaled:
    scale = rng.uniform(0.0, 1.5, size=(2, t)).astype(np.float32)
    scale[:, ::7] = 0.0
    scale = np.where(valid, scale, np.nan).astype(np.float32)
  else:
    scale = np.zeros((2, 0), np.float32)
  bind = jax.jit(lambda x, r, f, k: qk.gathered_dual_cast_p.bind(x, r, f, k, use_ue8m0=False))
  f = bind.lower(x, rows, scale, keep).compile().as_text()
  if s:
    assert 'custom_call_target="jax_deepgemm_gathered_dual_cast"' in f
  got = bind(x, rows, scale, keep)
  xg = np.asarray(x.astype(jnp.float32))[np.arange(2)[:, None], np.where(valid, rows, 0)] \
      if s else np.zeros((2, t, c), np.float32)
  xg = jnp.asarray(np.where(valid[..., None], xg, 0), dtype)
  if scaled:  # (XLA's f32 multiply and round, as the backward of the MoE's combine has it)
    xg = jax.jit(lambda f, v: (f[..., None] * v.astype(jnp.float32)).astype(dtype))(
        np.where(valid, scale, 1.0).astype(np.float32), xg)
  what = f"gathered dual {dtype.__name__} S {s} T {t} C {c} scaled {scaled}"
  _assert_dual(got, jax.jit(qk.dual_cast_p.bind, static_argnames="use_ue8m0")(
      xg, jnp.asarray(keep), use_ue8m0=False), what)
  _assert_dual(got, jax.jit(qk.gathered_dual_cast_reference)(x, rows, scale, keep),
               what + " vs ref")
  many = jax.jit(jax.vmap(lambda r, f: qk.gathered_dual_cast_p.bind(
      x[0], r, f, jnp.int32(t), use_ue8m0=False)))(rows, scale)
  for i in range(2):
    want = bind(x[:1], rows[i][None], scale[i][None], jnp.asarray([t], jnp.int32))
    _assert_dual([o[i] for o in many], [o[0] for o in want], f"{what} vmapped rows {i}")


def test_fp8_linear_uses_the_dual_cast(rng):
  x = _data(rng, (256, 384), jnp.bfloat16)
  w = _data(rng, (384, 256), jnp.bfloat16)
  f = jax.jit(jax.grad(lambda x, w: jd.fp8_linear(x, w).astype(jnp.float32).sum(),
                       argnums=(0, 1)))
  hlo = f.lower(x, w).compile().as_text()
  assert hlo.count('custom_call_target="jax_deepgemm_dual_cast"') == 2
  jax.block_until_ready(f(x, w))


# ----------------------------------------------------------------------------- per-block dual cast

def _separate_block(x, use_ue8m0=False):
  return (*jd.per_block_cast_to_fp8(x, use_ue8m0=use_ue8m0),
          *jd.per_block_cast_to_fp8(x, use_ue8m0=use_ue8m0, transpose=True))


def _block_reference(x, use_ue8m0=False):
  return (*qk.per_block_cast_reference(x, use_ue8m0=use_ue8m0),
          *qk.per_block_cast_reference(x, use_ue8m0=use_ue8m0, transpose=True))


def _assert_block_dual(got, want, what):
  _assert_dual(got, want, what, halves=("q, s", "transposed qt, st"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("use_ue8m0", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (7, 100), (257, 129), (129, 7168), (300, 200),
                                   (129, 1000), (2, 130, 257), (3, 256, 384)])
def test_block_dual_cast(rng, dtype, use_ue8m0, shape):
  # The fused kernel against the two separate kernels and XLA's reference.
  x = _data(rng, shape, dtype)
  got = _jit(jd.per_block_cast_to_fp8_and_transpose, use_ue8m0=use_ue8m0)(x)
  what = f"block dual {dtype.__name__} {shape} ue8m0={use_ue8m0}"
  _assert_block_dual(got, _jit(_separate_block, use_ue8m0=use_ue8m0)(x), what)
  _assert_block_dual(got, _jit(_block_reference, use_ue8m0=use_ue8m0)(x), what + " vs reference")


@pytest.mark.parametrize("shape,dtype", [((7168, 16384), jnp.bfloat16),
                                         ((16384, 7168), jnp.bfloat16),
                                         ((4, 2048, 7168), jnp.float16),
                                         ((3, 300, 1000), jnp.float32)])
def test_block_dual_cast_large(rng, shape, dtype):
  x = _data(rng, shape, dtype)
  for use_ue8m0 in (False, True):
    got = _jit(jd.per_block_cast_to_fp8_and_transpose, use_ue8m0=use_ue8m0)(x)
    _assert_block_dual(got, _jit(_separate_block, use_ue8m0=use_ue8m0)(x),
                       f"block dual {shape} {dtype.__name__} ue8m0={use_ue8m0}")
    del got


def test_block_dual_cast_non_finite_vmap_and_lowering(rng):
  x = np.array(_data(rng, (130, 512), jnp.float32))
  x[3, 5], x[7, 200], x[9, 300], x[129, 511] = np.nan, np.inf, -np.inf, np.nan
  for xd, use_ue8m0 in itertools.product((jnp.asarray(x), jnp.asarray(x, jnp.bfloat16),
                                          jnp.asarray(x, jnp.float16)), (False, True)):
    got = _jit(jd.per_block_cast_to_fp8_and_transpose, use_ue8m0=use_ue8m0)(xd)
    want = _jit(_block_reference, use_ue8m0=use_ue8m0)(xd)
    what = f"block dual non-finite {xd.dtype} ue8m0={use_ue8m0}"
    for g, w in zip(got, want):  # (NaN scales: compare bits)
      np.testing.assert_array_equal(_bits(g), _bits(w), err_msg=what)
  xb = _data(rng, (3, 200, 130), jnp.bfloat16)
  f = jax.jit(jax.vmap(jd.per_block_cast_to_fp8_and_transpose, in_axes=1))
  hlo = f.lower(xb).compile().as_text()
  assert 'custom_call_target="jax_deepgemm_per_block_dual_cast"' in hlo
  _assert_block_dual(f(xb), jax.jit(jax.vmap(_separate_block, in_axes=1))(xb), "block dual vmap")


@pytest.mark.parametrize("grouped", [False, True])
def test_fp8_linear_casts_w_once(rng, grouped):
  # One per-block dual cast of W in the forward (its [K, N] half kept for dgrad), no other
  # per-block cast, forward or backward.
  x = _data(rng, (256, 384), jnp.bfloat16)
  if grouped:
    w = _data(rng, (2, 384, 256), jnp.bfloat16)
    gs = jnp.asarray([100, 156], jnp.int32)
    layer = lambda x, w: jd.fp8_grouped_linear(x, w, gs)
  else:
    w = _data(rng, (384, 256), jnp.bfloat16)
    layer = jd.fp8_linear
  f = jax.jit(jax.grad(lambda x, w: layer(x, w).astype(jnp.float32).sum(), argnums=(0, 1)))
  hlo = f.lower(x, w).compile().as_text()
  assert hlo.count('custom_call_target="jax_deepgemm_per_block_dual_cast"') == 1
  assert 'custom_call_target="jax_deepgemm_per_block_cast"' not in hlo
  jax.block_until_ready(f(x, w))
