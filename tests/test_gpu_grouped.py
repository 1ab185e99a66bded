"""The Hopper M-grouped kernel (contiguous and masked layouts) against the float64 oracle.

Skips without the CUDA extension and an sm_90 GPU. ``test_grouped.py`` runs the small
routings through the kernel too when a Hopper GPU is the default device.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_deepgemm as jd
import oracle
from helpers import quant_act, quant_w, run_script

pytestmark = pytest.mark.skipif(not jd.use_kernels(),
                                reason="needs the CUDA extension and a Hopper (sm_90) GPU")


def _routing(rng, m, g, kind):
  if kind == "uniform":
    sizes = np.bincount(rng.integers(0, g, size=m), minlength=g)
  elif kind == "skewed":  # Zipf-like, many empty experts
    p = 1.0 / np.arange(1, g + 1) ** 1.5
    sizes = np.bincount(rng.choice(g, size=m, p=p / p.sum()), minlength=g)
  elif kind == "one_expert":
    sizes = np.zeros(g, np.int64)
    sizes[g // 2] = m
  elif kind == "aligned":
    sizes = np.full(g, m // g)
  else:
    raise ValueError(kind)
  return sizes.astype(np.int32)


@pytest.mark.parametrize("kind", ["uniform", "skewed", "one_expert", "aligned"])
@pytest.mark.parametrize("g,m,n,k", [(8, 2048, 512, 1024), (5, 777, 4096, 7168),
                                     (32, 3000, 256, 128), (3, 300, 96, 1552)])
def test_contiguous(rng, kind, g, m, n, k):
  a, sa = quant_act(rng, m, k)
  b, sb = quant_w(rng, g, n, k)
  gs = _routing(rng, m, g, kind)
  d = jax.jit(jd.m_grouped_fp8_gemm_nt_contiguous)(a, sa, b, sb, gs)
  want = oracle.grouped_contiguous(a, sa, b, sb, gs)
  assert oracle.calc_diff(d, want) < 1e-5
  # Per element: a tile that strays across a group boundary fails here.
  oracle.assert_elementwise(d, want, oracle.abs_terms(oracle.grouped_contiguous, a, sa, b, sb, gs),
                            d.dtype)


def test_contiguous_partial_and_f32(rng):
  # Groups cover only part of M: the rows after them must be exactly zero.
  m, n, k, g = 1000, 384, 512, 7
  a, sa = quant_act(rng, m, k)
  b, sb = quant_w(rng, g, n, k)
  gs = np.array([0, 129, 1, 0, 300, 7, 0], np.int32)
  d = jd.m_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, gs, out_dtype=jnp.float32)
  want = oracle.grouped_contiguous(a, sa, b, sb, gs)
  assert oracle.calc_diff(d, want) < 1e-5
  assert float(jnp.abs(d[gs.sum():]).max()) == 0.0


def test_contiguous_tiles_stay_in_their_group(rng):
  # A group of 1 row between big groups: every row must use its own expert's weights.
  m, n, k = 513, 256, 256
  a, sa = quant_act(rng, m, k)
  b, sb = quant_w(rng, 3, n, k)
  gs = np.array([256, 1, 256], np.int32)
  d = np.asarray(jd.m_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, gs, out_dtype=jnp.float32))
  want = oracle.grouped_contiguous(a, sa, b, sb, gs)
  for r in (255, 256, 257):
    assert oracle.calc_diff(d[r], want[r]) < 1e-5, r


def test_contiguous_out_of_range_sizes(rng):
  # int32 sizes reach the kernel unclipped (no scan kernels ahead of it): it clips each size
  # to [0, M] and their running sum to M itself, as sanitize_group_sizes does.
  m, n, k = 1000, 256, 384
  a, sa = quant_act(rng, m, k)
  b, sb = quant_w(rng, 6, n, k)
  gs = np.array([-7, 300, 2**31 - 1, 50, -(2**31), 2**31 - 1], np.int32)
  clipped = np.array([0, 300, 700, 0, 0, 0], np.int32)
  d = jax.jit(jd.m_grouped_fp8_gemm_nt_contiguous)(a, sa, b, sb, gs)
  want = oracle.grouped_contiguous(a, sa, b, sb, clipped)
  assert oracle.calc_diff(d, want) < 1e-5
  oracle.assert_elementwise(
      d, want, oracle.abs_terms(oracle.grouped_contiguous, a, sa, b, sb, clipped), d.dtype)


@pytest.mark.parametrize("masked", ["random", "zeros", "full", "mixed", "out_of_range"])
@pytest.mark.parametrize("g,mmax,n,k", [(4, 256, 1024, 2048), (6, 100, 512, 256), (2, 64, 160, 640)])
def test_masked(rng, masked, g, mmax, n, k):
  a, sa = quant_act(rng, g * mmax, k)
  a, sa = a.reshape(g, mmax, k), sa.reshape(g, mmax, -1)
  b, sb = quant_w(rng, g, n, k)
  mm = {"random": rng.integers(0, mmax + 1, size=g), "zeros": np.zeros(g),
        "full": np.full(g, mmax), "mixed": np.array([0, mmax] * g)[:g],
        # int32 sizes reach the kernel unclipped (no clamp kernel): it must clip them itself.
        "out_of_range": np.array([-5, mmax + 37, 2**31 - 1, mmax // 3, -(2**31), 1] * g)[:g],
        }[masked].astype(np.int32)
  d = jax.jit(jd.m_grouped_fp8_gemm_nt_masked, static_argnames="expected_m")(
      a, sa, b, sb, mm, expected_m=max(1, mmax // 2))
  mm = np.clip(mm, 0, mmax)
  want = oracle.grouped_masked(a, sa, b, sb, mm)
  if mm.sum() == 0:
    assert float(jnp.abs(d.astype(jnp.float32)).max()) == 0.0
  else:
    assert oracle.calc_diff(d, want) < 1e-5
  rows = np.arange(mmax)[None, :] >= mm[:, None]
  assert float(jnp.abs(d.astype(jnp.float32))[rows].max(initial=0.0)) == 0.0


@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("donate", [False, True])
def test_masked_into_out(rng, out_dtype, donate):
  # `out`: the kernel writes only the valid rows, into out's buffer (the aliased `_into`
  # target); the rest keep out's values, NaN and inf included. Valid rows bitwise the
  # zero-filling op's; unclipped int32 masked_m (an empty group, a full one, past M_max).
  g, mmax, n, k = 5, 200, 320, 384
  a, sa = quant_act(rng, g * mmax, k)
  a, sa = a.reshape(g, mmax, k), sa.reshape(g, mmax, -1)
  b, sb = quant_w(rng, g, n, k)
  mm = jnp.asarray([0, mmax, 37, -3, 2**31 - 1], jnp.int32)
  out_np = rng.standard_normal((g, mmax, n)).astype(np.float32)
  out_np[2, 37:40, :2] = [[np.nan, np.inf]] * 3
  op = jd.m_grouped_fp8_gemm_nt_masked
  f = jax.jit(lambda o, *x: op(*x, expected_m=64, out=o), donate_argnums=(0,) if donate else ())
  hlo = f.lower(jnp.asarray(out_np, out_dtype), a, sa, b, sb, mm).compile().as_text()
  assert "jax_deepgemm_m_grouped_fp8_gemm_nt_into" in hlo
  got = np.asarray(f(jnp.asarray(out_np, out_dtype), a, sa, b, sb, mm), np.float32)
  zero_filled = np.asarray(jax.jit(lambda *x: op(*x, expected_m=64, out_dtype=out_dtype))(
      a, sa, b, sb, mm), np.float32)
  rows = np.arange(mmax)[None, :] < np.clip(np.asarray(mm), 0, mmax)[:, None]
  np.testing.assert_array_equal(got[rows], zero_filled[rows])
  np.testing.assert_array_equal(got[~rows], np.asarray(jnp.asarray(out_np, out_dtype), np.float32)[~rows])
  assert oracle.calc_diff(got[rows], oracle.grouped_masked(a, sa, b, sb, np.clip(mm, 0, mmax))[rows]) < 1e-5


def test_masked_into_out_carried_through_a_scan(rng):
  # A decode loop's pattern: one buffer carried (in place) through the steps, fewer valid rows
  # each step; rows a step leaves alone keep the last step's values that wrote them.
  g, mmax, n, k = 3, 96, 256, 256
  a, sa = quant_act(rng, g * mmax, k)
  a, sa = a.reshape(g, mmax, k), sa.reshape(g, mmax, -1)
  b, sb = quant_w(rng, g, n, k)
  steps = jnp.asarray([[96, 50, 7], [60, 0, 7], [10, 0, 3]], jnp.int32)

  def body(buf, mm):
    return jd.m_grouped_fp8_gemm_nt_masked(a, sa, b, sb, mm, out=buf), None

  init = jnp.full((g, mmax, n), -1.0, jnp.float32)
  got = np.asarray(jax.jit(lambda i: jax.lax.scan(body, i, steps)[0], donate_argnums=0)(init))
  full = np.asarray(jd.m_grouped_fp8_gemm_nt_masked(a, sa, b, sb, jnp.full((g,), mmax, jnp.int32),
                                                    out_dtype=jnp.float32))
  written = np.arange(mmax)[None, :] < np.asarray(steps).max(axis=0)[:, None]
  np.testing.assert_array_equal(got[written], full[written])
  assert (got[~written] == -1.0).all()


def test_lowers_to_grouped_kernel(rng):
  a, sa = quant_act(rng, 256, 256)
  b, sb = quant_w(rng, 2, 128, 256)
  gs = jnp.array([100, 156], jnp.int32)
  hlo = jax.jit(jd.m_grouped_fp8_gemm_nt_contiguous).lower(a, sa, b, sb, gs).compile().as_text()
  assert "jax_deepgemm_m_grouped_fp8_gemm_nt" in hlo


def test_bitwise_deterministic(rng):
  a, sa = quant_act(rng, 4096, 2048)
  b, sb = quant_w(rng, 8, 1024, 2048)
  gs = _routing(rng, 4096, 8, "skewed")
  f = jax.jit(jd.m_grouped_fp8_gemm_nt_contiguous)
  ref = np.asarray(f(a, sa, b, sb, gs).astype(jnp.float32))
  for _ in range(3):
    np.testing.assert_array_equal(np.asarray(f(a, sa, b, sb, gs).astype(jnp.float32)), ref)


_SCRIPT = """
import sys, numpy as np, jax, jax.numpy as jnp, jax_deepgemm as jd, oracle
from helpers import quant_act, quant_w
rng = np.random.default_rng(7)
worst = 0.0
outs = []
for m, n, k, g in [(700, 256, 512, 6), (64, 192, 256, 3), (2000, 1024, 1024, 4)]:
  a, sa = quant_act(rng, m, k); b, sb = quant_w(rng, g, n, k)
  gs = np.bincount(rng.integers(0, g, size=m), minlength=g).astype(np.int32); gs[1] = 0
  # Steps in a scan so that XLA puts the custom call into a command buffer.
  def body(c, x):
    return c, jd.m_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, gs + x, out_dtype=jnp.float32)
  _, d = jax.jit(lambda: jax.lax.scan(body, 0, jnp.zeros((2,), jnp.int32)))()
  worst = max(worst, oracle.calc_diff(d[0], oracle.grouped_contiguous(a, sa, b, sb, gs)))
  mm = np.array([0, m // g, 5][:g] + [m // g] * (g - 3), np.int32)
  am, sam = a[: g * (m // g)].reshape(g, m // g, k), sa[: g * (m // g)].reshape(g, m // g, -1)
  dm = jax.jit(jd.m_grouped_fp8_gemm_nt_masked)(am, sam, b, sb, mm)
  worst = max(worst, oracle.calc_diff(dm, oracle.grouped_masked(am, sam, b, sb, mm)))
  outs += [np.asarray(d), np.asarray(dm.astype(jnp.float32))]
np.savez(sys.argv[1], *outs)
print("WORST", worst)
"""


def _run_script(env_extra, out):
  r = run_script(_SCRIPT, env_extra, out)
  assert r.returncode == 0, (env_extra, r.stderr[-3000:])
  return float(r.stdout.split("WORST")[-1])


def test_command_buffers_on_and_off(tmp_path):
  on = {"XLA_FLAGS": "--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL,WHILE "
                     "--xla_gpu_graph_min_graph_size=1"}
  off = {"XLA_FLAGS": "--xla_gpu_enable_command_buffer="}
  assert _run_script(on, str(tmp_path / "on.npz")) < 1e-5
  assert _run_script(off, str(tmp_path / "off.npz")) < 1e-5
  a, b = np.load(tmp_path / "on.npz"), np.load(tmp_path / "off.npz")
  for key in a.files:
    np.testing.assert_array_equal(a[key], b[key])


def test_every_grouped_config(tmp_path):
  # Against float64, and bitwise against the first config (batch invariance, as dense).
  from jax_deepgemm import _C
  configs = _C.supported_grouped_gemm_configs().split("; ")
  assert len(configs) >= 4
  first = None
  for i, cfg in enumerate(configs + ["block_m=64", "block_n=64"]):  # partial configs pick a built one
    f = str(tmp_path / f"cfg{i}.npz")
    worst = _run_script({"JAX_DEEPGEMM_GEMM_CONFIG": cfg}, f)
    assert worst < 1e-5, (cfg, worst)
    got = np.load(f)
    if first is None:
      first = (cfg, got)
      continue
    for key in got.files:
      np.testing.assert_array_equal(got[key], first[1][key], err_msg=f"{cfg} vs {first[0]}: {key}")


def test_rows_do_not_depend_on_the_routing(rng):
  # Batch invariance across ops and routings: a token's row is the same bits through the dense
  # kernel with its expert's weights, the contiguous layout under two routings of the other
  # tokens, and the masked layout (other groups' masked_m and expected_m changing the tiles).
  g, n, k = 4, 2112, 7168
  a, sa = quant_act(rng, 1024, k)
  b, sb = quant_w(rng, g, n, k)
  dense = [np.asarray(jd.fp8_gemm_nt(a, sa, b[e], sb[e]).astype(jnp.float32)) for e in range(g)]
  contiguous = jax.jit(jd.m_grouped_fp8_gemm_nt_contiguous)
  for sizes in ([256, 256, 256, 256], [1, 0, 1000, 23], [700, 300, 0, 24]):
    got = np.asarray(contiguous(a, sa, b, sb, jnp.asarray(sizes, jnp.int32)).astype(jnp.float32))
    start = np.concatenate([[0], np.cumsum(sizes)])
    for e in range(g):
      lo, hi = start[e], start[e + 1]
      np.testing.assert_array_equal(got[lo:hi], dense[e][lo:hi], err_msg=f"{sizes} group {e}")
  am, sam = a.reshape(g, 256, k), sa.reshape(g, 256, -1)
  masked = jax.jit(jd.m_grouped_fp8_gemm_nt_masked, static_argnames="expected_m")
  for mm, expected_m in (([256, 256, 256, 256], 256), ([3, 256, 130, 0], 32), ([256, 1, 65, 200], 128)):
    got = np.asarray(masked(am, sam, b, sb, jnp.asarray(mm, jnp.int32),
                            expected_m=expected_m).astype(jnp.float32))
    for e in range(g):
      want = dense[e][e * 256:e * 256 + mm[e]]
      np.testing.assert_array_equal(got[e, :mm[e]], want, err_msg=f"{mm} group {e}")


def test_linear_layers_rows_do_not_depend_on_the_batch(rng):
  # The layers' forward keeps batch invariance: per-token casts, then the kernels above.
  k, n, g = 1536, 1000, 3
  x = jnp.asarray(rng.standard_normal((600, k)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((k, n)) / 40, jnp.bfloat16)
  wg = jnp.asarray(rng.standard_normal((g, k, n)) / 40, jnp.bfloat16)
  lin = jax.jit(jd.fp8_linear)
  full = np.asarray(lin(x, w).astype(jnp.float32))
  for lo, hi in [(0, 1), (5, 12), (300, 600)]:
    np.testing.assert_array_equal(np.asarray(lin(x[lo:hi], w).astype(jnp.float32)), full[lo:hi])
  grouped = jax.jit(jd.fp8_grouped_linear)
  ref = np.asarray(grouped(x, wg, jnp.asarray([200, 200, 200], jnp.int32)).astype(jnp.float32))
  # Rows 200..400 (group 1) again, with other tokens around them in groups 0 and 2.
  xs = jnp.concatenate([x[:7], x[200:400], x[450:]])
  got = np.asarray(grouped(xs, wg, jnp.asarray([7, 200, 150], jnp.int32)).astype(jnp.float32))
  np.testing.assert_array_equal(got[7:207], ref[200:400])
