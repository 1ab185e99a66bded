"""K-grouped weight-gradient GEMM on the default backend."""
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_deepgemm as jd
import multidevice
import oracle
from helpers import quant_act, randn


@pytest.mark.parametrize("sizes", [[100, 0, 157, 3], [0, 260, 0, 0], [128, 128, 4, 0]])
def test_matches_float64(rng, sizes):
  t, n, k = 260, 72, 136
  a, sa = quant_act(rng, t, n, axis=0)
  b, sb = quant_act(rng, t, k, axis=0)
  assert sa.shape == (3, n)
  gs = jnp.asarray(sizes, jnp.int32)
  d = jax.jit(jd.k_grouped_fp8_gemm_tn_contiguous)(a, sa, b, sb, gs)
  assert d.shape == (4, n, k) and d.dtype == jnp.float32
  want = oracle.k_grouped(a, sa, b, sb, sizes)
  assert oracle.calc_diff(d, want) < 1e-5
  for g, s in enumerate(sizes):
    if s == 0:
      assert float(jnp.abs(d[g]).max()) == 0.0


def test_accumulate(rng):
  t, n, k = 200, 40, 64
  a, sa = quant_act(rng, t, n, axis=0)
  b, sb = quant_act(rng, t, k, axis=0)
  gs = jnp.asarray([150, 0, 50], jnp.int32)
  c = randn(rng, (3, n, k), scale=100.0)
  d = jd.k_grouped_fp8_gemm_tn_contiguous(a, sa, b, sb, gs, c=c)
  assert oracle.calc_diff(d, oracle.k_grouped(a, sa, b, sb, gs, c=c)) < 1e-5
  np.testing.assert_array_equal(np.asarray(d[1]), np.asarray(c[1]))  # empty group: c untouched


def test_token_major_operands(rng):
  # [N, T] / [K, T] operands (per_token_cast_transpose_to_fp8's layout) give the same result.
  t, n, k = 300, 24, 40
  x = randn(rng, (t, n), jnp.bfloat16)
  y = randn(rng, (t, k), jnp.bfloat16)
  a, sa = jd.per_token_cast_to_fp8(x, axis=0)
  b, sb = jd.per_token_cast_to_fp8(y, axis=0)
  at, sat = jd.per_token_cast_transpose_to_fp8(x)
  bt, sbt = jd.per_token_cast_transpose_to_fp8(y)
  gs = jnp.asarray([100, 0, 77, 123], jnp.int32)
  d = jd.k_grouped_fp8_gemm_tn_contiguous(at, sat, bt, sbt, gs, token_major=True)
  want = oracle.k_grouped(a, sa, b, sb, gs)
  assert oracle.calc_diff(d, want) < 1e-5
  np.testing.assert_array_equal(np.asarray(d), np.asarray(
      jd.k_grouped_fp8_gemm_tn_contiguous(a, sa, b, sb, gs)))
  with pytest.raises(ValueError, match=r"a is \[N, T\]"):
    jd.k_grouped_fp8_gemm_tn_contiguous(at, sat, b, sb, gs, token_major=True)


def test_bf16_out(rng):
  # bf16 output = the fp32 result rounded once; c needs the fp32 output.
  t, n, k = 260, 72, 136
  a, sa = quant_act(rng, t, n, axis=0)
  b, sb = quant_act(rng, t, k, axis=0)
  gs = jnp.asarray([100, 0, 160], jnp.int32)
  f = jd.k_grouped_fp8_gemm_tn_contiguous
  d16 = jax.jit(lambda *xs: f(*xs, out_dtype=jnp.bfloat16))(a, sa, b, sb, gs)
  assert d16.dtype == jnp.bfloat16 and d16.shape == (3, n, k)
  np.testing.assert_array_equal(np.asarray(d16.astype(jnp.float32)),
                                np.asarray(f(a, sa, b, sb, gs).astype(jnp.bfloat16)
                                           .astype(jnp.float32)))
  with pytest.raises(TypeError, match="out_dtype must be bfloat16 or float32"):
    f(a, sa, b, sb, gs, out_dtype=jnp.float16)


def test_c_with_a_bf16_out_dtype_is_the_dense_ops_type_error(rng):
  # The same mistake raised ValueError here and TypeError in fp8_gemm_nt, and the dense op
  # printed out_dtype as "<class 'jax.numpy.bfloat16'>": one TypeError, the dtype's name.
  t, n, k = 64, 16, 32
  a, sa = quant_act(rng, t, n, axis=0)
  b, sb = quant_act(rng, t, k, axis=0)
  gs = jnp.asarray([40, 24], jnp.int32)
  d, d_s = quant_act(rng, 8, 256), jd.per_block_cast_to_fp8(randn(rng, (16, 256)))
  calls = {
      "k_grouped_fp8_gemm_tn_contiguous": lambda **kw: jd.k_grouped_fp8_gemm_tn_contiguous(
          a, sa, b, sb, gs, c=jnp.zeros((2, n, k)), **kw),
      "fp8_gemm_nt": lambda **kw: jd.fp8_gemm_nt(*d, *d_s, c=jnp.zeros((8, 16)), **kw)}
  for op, call in calls.items():
    for bad in (jnp.bfloat16, "bfloat16", np.dtype(jnp.bfloat16)):
      with pytest.raises(TypeError, match=f"^{op}: accumulating into c produces float32, so "
                         "out_dtype must be float32 or None, got bfloat16$"):
        call(out_dtype=bad)
    for ok in (None, jnp.float32, "float32", np.float32):
      assert call(out_dtype=ok).dtype == jnp.float32


def test_vmap(rng):
  t, n, k = 64, 16, 32
  xs = [(quant_act(rng, t, n, axis=0), quant_act(rng, t, k, axis=0)) for _ in range(2)]
  a = jnp.stack([x[0][0] for x in xs]); sa = jnp.stack([x[0][1] for x in xs])
  b = jnp.stack([x[1][0] for x in xs]); sb = jnp.stack([x[1][1] for x in xs])
  gs = jnp.asarray([32, 32], jnp.int32)
  d = jax.vmap(jd.k_grouped_fp8_gemm_tn_contiguous, in_axes=(0, 0, 0, 0, None))(a, sa, b, sb, gs)
  for i in range(2):
    assert oracle.calc_diff(d[i], oracle.k_grouped(a[i], sa[i], b[i], sb[i], gs)) < 1e-5


def test_errors(rng):
  a, sa = quant_act(rng, 64, 16, axis=0)
  b, sb = quant_act(rng, 63, 32, axis=0)
  f = jd.k_grouped_fp8_gemm_tn_contiguous
  with pytest.raises(ValueError, match="T differs"):
    f(a, sa, b, sb, jnp.asarray([64], jnp.int32))
  a2, sa2 = quant_act(rng, 64, 16)  # quantized along the wrong axis
  with pytest.raises(ValueError, match="per_token_cast_to_fp8"):
    f(a2, sa2, a2, sa2, jnp.asarray([64], jnp.int32))
  with pytest.raises(ValueError, match=r"c must have shape \(1, 16, 16\)"):
    f(a, sa, a, sa, jnp.asarray([64], jnp.int32), c=jnp.zeros((1, 16, 15)))
  with pytest.raises(TypeError, match="token_major must be a Python bool"):
    f(a, sa, a, sa, jnp.asarray([64], jnp.int32), token_major="yes")
  assert f(a, sa, a, sa, []).shape == (0, 16, 16)  # no groups, as an empty Python list


def test_sizes_are_sanitized_once(rng, monkeypatch):
  # The op sanitizes the sizes before binding, and its reference lowering did it again (a
  # second scan over the groups in every CPU computation, on sizes already sanitized). Once
  # now, with the same results for sizes that need it: negative, past T, other int types.
  from jax_deepgemm import grouped_contiguous, k_grouped
  calls = []

  def counted(*args, **kwargs):
    calls.append(args[1:])
    return grouped_contiguous.sanitize_group_sizes(*args, **kwargs)
  monkeypatch.setattr(k_grouped, "sanitize_group_sizes", counted)
  t, n, k = 200, 16, 24
  a, sa = quant_act(rng, t, n, axis=0)
  b, sb = quant_act(rng, t, k, axis=0)
  f = jd.k_grouped_fp8_gemm_tn_contiguous
  cases = [([-5, 150, 100, 7], np.int32), ([100, -1, 127, 3], np.int8),
           ([2**32 - 1, 5, 0, 0], np.uint32), ([0, 0, 0, 0], np.int32)]
  for token_major in (False, True):
    args = (a.T, sa, b.T, sb) if token_major else (a, sa, b, sb)
    for sizes, dtype in cases:
      calls.clear()
      d = jax.jit(lambda *xs: f(*xs, token_major=token_major))(*args, np.asarray(sizes, dtype))
      assert calls == [(t, k_grouped.OP)], (sizes, dtype, token_major, calls)
      want = oracle.k_grouped(a, sa, b, sb, np.asarray(sizes, dtype))
      if any(np.asarray(sizes, np.int64) > 0):
        assert oracle.calc_diff(d, want) < 1e-5, (sizes, dtype, token_major)
      else:
        assert not np.asarray(d).any()


@pytest.mark.parametrize("operand", ["a", "b"])
def test_non_finite_token_stays_in_its_group(rng, operand):
  # The kernel masks both operands' tokens outside a group; the reference zeroed only a's, so
  # a NaN in b's tokens of group 0 made group 1 NaN (0 * NaN) on CPU and not on the GPU.
  t, n, k = 256, 16, 24
  x, y = np.array(randn(rng, (t, n))), np.array(randn(rng, (t, k)))
  (x if operand == "a" else y)[3, 5] = np.nan  # group 0's scale block (tokens 0-127)
  a, sa = jd.per_token_cast_to_fp8(jnp.asarray(x), axis=0)
  b, sb = jd.per_token_cast_to_fp8(jnp.asarray(y), axis=0)
  gs = jnp.asarray([128, 128], jnp.int32)
  d = jax.jit(jd.k_grouped_fp8_gemm_tn_contiguous)(a, sa, b, sb, gs)
  assert bool(jnp.isnan(d[0]).any())
  assert not bool(jnp.isnan(d[1]).any())
  sel = slice(128, None)
  want = oracle.k_grouped(a[sel], sa[1:], b[sel], sb[1:], [0, 128])
  assert oracle.calc_diff(d[1], want[1]) < 1e-5


_EAGER_SHARD_MAP = r"""
import json
import jax, jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import jax_deepgemm as jd, oracle
from helpers import quant_act
from jax_deepgemm.grouped_contiguous import sanitize_group_sizes
import numpy as np

mesh = jax.make_mesh((jax.device_count(),), ("x",))
def eager(f, *args):  # not jitted: the body runs op by op
  return jax.shard_map(f, mesh=mesh, in_specs=P(), out_specs=P())(*args)

out = {"sanitized": []}
for sizes, dtype, m in json.loads(%r):
  gs = jnp.asarray(np.asarray(sizes, dtype))
  out["sanitized"].append(np.asarray(eager(lambda g: sanitize_group_sizes(g, m), gs)).tolist())
rng = np.random.default_rng(0)
a, sa = quant_act(rng, 200, 16, axis=0)
b, sb = quant_act(rng, 200, 24, axis=0)
sizes = [100, 0, 157, 3]
d = eager(jd.k_grouped_fp8_gemm_tn_contiguous, a, sa, b, sb, jnp.asarray(sizes, jnp.int32))
out["diff"] = float(oracle.calc_diff(d, oracle.k_grouped(a, sa, b, sb, sizes)))
print(json.dumps(out))
"""


def test_eager_in_shard_map():
  # Eagerly (not jitted) in a shard_map, the op's group-size running sum (an associative_scan)
  # ran op by op, and XLA:CPU segfaulted on one of its concatenates, with an empty operand
  # (jax 0.11.2, 2 CPU devices; jnp.concatenate([g[:0], g]) there does too): the process
  # died. It runs jitted now. In a child process, which needs the devices (and a crash must
  # fail the test, not end pytest). Sizes past int32 in sum: their saturating sum wrapped.
  # (No groups; clipped sizes; int8 ones; ones whose running sum passes int32.)
  cases = [([], "int32", 10), ([3, 4, 5, 6], "int32", 10), ([5, 100, -3, 127], "int8", 300),
           ([2**31 - 1, 2**31 - 1, 5], "int32", 2**31 - 1)]
  proc = subprocess.run([sys.executable, "-c", _EAGER_SHARD_MAP % json.dumps(cases)],
                        env=multidevice.env(devices=2), cwd=multidevice.TESTS,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, (proc.returncode, proc.stdout[-2000:], proc.stderr[-4000:])
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  for (sizes, dtype, m), got in zip(cases, out["sanitized"]):
    ends = np.minimum(np.cumsum(np.clip(np.asarray(sizes, dtype).astype(np.int64), 0, m)), m)
    np.testing.assert_array_equal(got, np.diff(ends, prepend=0), err_msg=str((sizes, dtype, m)))
  assert len(out["sanitized"]) == len(cases) and out["diff"] < 1e-5
