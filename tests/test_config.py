"""The kernel-config heuristic and JAX_DEEPGEMM_GEMM_CONFIG, checked on the host.

No GPU needed (without one the heuristic assumes 132 SMs, as on H100/H200 SXM), but the CUDA
extension must be built, as it is in CI. The override is read once per process, so every case
runs in a subprocess.
"""
import os
import subprocess
import sys

import pytest

import jax_deepgemm as jd

pytestmark = pytest.mark.skipif(not jd.extension_built(), reason="needs the CUDA extension")

_SCRIPT = """
import sys, jax_deepgemm as jd
for spec in sys.argv[1:]:
  if spec.startswith("kg:"):  # the K-grouped tile for G x N x K
    print(jd.k_grouped_config(*map(int, spec[3:].split("x"))))
  elif spec.endswith("m"):  # the masked layout: expected rows per group x N x K x G
    print(jd.gemm_config(*map(int, spec[:-1].split("x")), masked=True))
  else:
    acc = spec.endswith("+c")  # the dense GEMM that accumulates into c
    f32 = spec.endswith("+f32")  # a float32 output
    dims = map(int, spec.removesuffix("+c").removesuffix("+f32").split("x"))
    print(jd.gemm_config(*dims, accumulate=acc, out_dtype="float32" if f32 else None))
"""


def _configs(override, *specs, var="JAX_DEEPGEMM_GEMM_CONFIG", script=_SCRIPT):
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_DEEPGEMM_GEMM_CONFIG", "JAX_DEEPGEMM_K_GROUPED_CONFIG")}
  if override is not None:
    env[var] = override
  # -P and cwd: import the installed package (with its extension), not a source tree.
  r = subprocess.run([sys.executable, "-P", "-c", script, *specs], env=env,
                     cwd=os.path.dirname(__file__), capture_output=True, text=True, timeout=120)
  return r.returncode, r.stdout.split(), r.stderr


def _cfg(bm, bn, stages, mc=1):
  return f"block_m={bm},block_n={bn},stages={stages},multicast={mc}"


def test_heuristic_picks_the_documented_tiles():
  # The README's results table names these configs; a heuristic change must update both.
  rc, out, err = _configs(None, "4096x7168x16384", "128x7168x16384", "128x24576x1536",
                          "128x4096x7168", "128x7168x2048", "1x4096x7168",
                          "32768x4096x7168x4", "128x2112x7168", "64x2112x7168",
                          "7x2112x7168", "1x7168x2048")
  assert rc == 0, err[-2000:]
  # Decode: 64x32 where it fits one wave (1x4096x7168), 64x64 where 64x32 would take two.
  assert out == [_cfg(128, 256, 4), _cfg(64, 128, 8), _cfg(128, 192, 4), _cfg(64, 64, 13),
                 _cfg(64, 128, 8), _cfg(64, 32, 18), _cfg(128, 256, 3), _cfg(64, 32, 18),
                 _cfg(64, 32, 18), _cfg(64, 32, 18), _cfg(64, 64, 13)], out


def test_wide_tile():
  # 128x256 where its waves are about as full as 128x128's (dense and M-grouped), at any K
  # since session 27 (ManyWaveSpeed 1.06 at K <= 2048, 1.035 above); not 4096x2112 (9
  # column blocks of 256 in 3 rounds: there 192x128's 3 rounds are fuller than 128x128's 5),
  # not 4 groups in 4096 rows at K 2048 (8 rounds of 256-wide tiles, 94% as full as 15 of
  # 128), not problems of under two waves of 128x128 (256x7168: the cost model).
  rc, out, err = _configs(None, "4096x7168x2048", "4096x24576x1536", "4096x2112x2048",
                          "4096x7168x2176", "32768x7168x2048x4", "32768x7168x2176x4",
                          "4096x7168x2048x4", "256x7168x2048")
  assert rc == 0, err[-2000:]
  assert out == [_cfg(128, 256, 4), _cfg(128, 256, 4), _cfg(192, 128, 5), _cfg(128, 256, 4),
                 _cfg(128, 256, 3), _cfg(128, 256, 3), _cfg(128, 128, 5),
                 _cfg(128, 128, 5)], out
  # Accumulating into c keeps 128x128 (its reduce-add epilogue cost more with 128x256);
  # `accumulate` does not apply to grouped problems.
  rc, out, err = _configs(None, "4096x24576x1536+c", "4096x7168x2048+c", "32768x7168x2048x4+c")
  assert rc == 0, err[-2000:]
  assert out == [_cfg(128, 128, 5)] * 2 + [_cfg(128, 256, 3)], out
  # Dense float32 outputs skip 128x256 too: it stages half a bf16 tile in shared memory (room
  # for a 4th stage), which an f32 tile takes in four passes; they take the next best tile
  # (192x128 at 4096x24576, whose waves are fuller than 128x128's). Grouped 128x256 stages
  # its whole tile.
  rc, out, err = _configs(None, "4096x7168x16384+f32", "4096x24576x1536+f32",
                          "32768x7168x2048x4+f32")
  assert rc == 0, err[-2000:]
  assert out == [_cfg(128, 128, 5), _cfg(192, 128, 5), _cfg(128, 256, 3)], out
  # Forced, it runs anywhere; 160-wide tiles are built for dense problems only.
  rc, out, err = _configs("block_n=256", "4096x7168x16384", "1x4096x7168", "256x7168x7168x2")
  assert rc == 0 and out == [_cfg(128, 256, 4)] * 2 + [_cfg(128, 256, 3)], (out, err[-2000:])
  rc, out, err = _configs("block_n=160", "32768x7168x2048x4")
  assert rc != 0 and "matches no grouped kernel that is built" in err, (out, err[-2000:])


def test_tall_tile_where_its_waves_are_fuller():
  # 192x128 (dense) where its waves are fuller than 128x128's: 4096x2112 (3 rounds of 374
  # tiles against 5 of 544), 8192^3 (21 rounds against 32, 98.5% vs 97.0% full; 128x256's
  # 16 are 97.0% full too); not 4096 rows otherwise (21.3 tiles of 192: 4096x4096 takes
  # 128x256's 4 full rounds), not grouped problems (not built for them),
  # not when accumulating into c (unmeasured), nor by the small-problem cost model
  # (384x7168: there 192x128 would take one round, like the 128x192 it picks). At K <= 2048
  # it also beats 128x256 where its waves are fuller than 128x256's by over 6%
  # (3072x5120x2048: 97% against 91% for both 128-row tiles).
  rc, out, err = _configs(None, "4096x2112x7168", "8192x8192x8192", "4096x4096x7168",
                          "32768x2112x7168x4", "4096x2112x7168+c", "384x7168x7168",
                          "3072x5120x2048")
  assert rc == 0, err[-2000:]
  assert out == [_cfg(192, 128, 5), _cfg(192, 128, 5), _cfg(128, 256, 4), _cfg(128, 128, 5),
                 _cfg(128, 128, 5), _cfg(128, 192, 4), _cfg(192, 128, 5)], out


def test_wide_serial_tiles_only_where_their_waves_are_much_fuller():
  # ManyWaveSpeed: 128x192 runs at 0.86 of 128x128's work per clock (dense), so it takes
  # 3072x2112x4096 (2 full rounds against 4 at 75%), not 4096x2112x7168 (89% vs 80% full);
  # 128x160 at 0.88 takes 1024x5120x7168 (2 rounds at 97% against 3 at 81%) and
  # 4096x1280x7168, not 4096x7168x16384 (98.7% vs 97.0%: too little; 128x256 there);
  # the M-grouped kernels don't have them (8192 rows, 32 groups, N 576: 128x256's 2 rounds
  # are as full as 128x128's 4).
  rc, out, err = _configs(None, "3072x2112x4096", "4096x2112x7168", "8192x576x7168x32",
                          "1024x5120x7168", "4096x1280x7168", "4096x7168x16384")
  assert rc == 0, err[-2000:]
  assert out == [_cfg(128, 192, 4), _cfg(192, 128, 5), _cfg(128, 256, 3), _cfg(128, 160, 6),
                 _cfg(128, 160, 6), _cfg(128, 256, 4)], out
  # Forced, it runs any dense problem (the cost model never picks it on its own).
  rc, out, err = _configs("block_m=192", "4096x7168x16384", "1x4096x7168")
  assert rc == 0 and out == [_cfg(192, 128, 5)] * 2, (out, err[-2000:])
  rc, out, err = _configs("block_m=192", "32768x7168x2048x4")
  assert rc != 0 and "matches no grouped kernel that is built" in err, (out, err[-2000:])


def test_masked_layout():
  # Rows per group x N x K x groups. Groups of over 64 expected rows take the many-wave rule
  # from one wave of 128-row tiles on, counting whole m-blocks per group: the bar shapes
  # (1x1024, 2x512, 4x256 at 4096x7168) take 128x256's one full round rather than 128x128's
  # two; decode-sized groups keep the cost model's 64-row tiles.
  rc, out, err = _configs(None, "1024x4096x7168x1m", "512x4096x7168x2m", "256x4096x7168x4m",
                          "16x4096x7168x8m", "64x4096x7168x8m")
  assert rc == 0, err[-2000:]
  assert out[:3] == [_cfg(128, 256, 3)] * 3, out
  assert all(c.startswith("block_m=64,") for c in out[3:]), out
  rc, out, err = _configs(None, "1024x4096x7168m")
  assert rc != 0 and "masked layout needs groups >= 1" in err, (out, err[-2000:])


def test_forced_config_is_honored():
  rc, out, err = _configs("block_m=64, block_n=128", "4096x7168x16384", "4096x7168x2048x4")
  assert rc == 0, err[-2000:]
  assert out == [_cfg(64, 128, 8)] * 2
  rc, out, err = _configs("block_m=128,block_n=128,multicast=2", "4096x7168x16384")
  assert rc == 0, err[-2000:]
  assert out == [_cfg(128, 128, 5, 2)]
  # multicast=2 where N has an odd number of 128-wide blocks (17): the same 128x128 tile
  # without multicast, not the heuristic's own choice there (128x192).
  rc, out, err = _configs("multicast=2", "3072x2112x4096")
  assert rc == 0 and out == [_cfg(128, 128, 5)], (out, err[-2000:])
  # An empty value means "not set"; tma_store alone leaves the tile to the heuristic.
  for override in (" ", "tma_store=0"):
    rc, out, err = _configs(override, "4096x7168x16384")
    assert rc == 0 and out == [_cfg(128, 256, 4)], (override, err[-2000:])


@pytest.mark.parametrize("override,message", [
    ("block_n=100", "matches no dense kernel that is built"),
    ("stages=2", "matches no dense kernel that is built"),
    ("foo=1", "unknown key 'foo'"),
    ("block_m", "expected key=value"),
    ("block_m=abc", "bad value for 'block_m'"),
    ("multicast=3", "multicast must be 1 or 2"),
    ("tma_store=2", "tma_store must be 0 or 1"),
])
def test_bad_override_is_a_clear_error(override, message):
  rc, _, err = _configs(override, "4096x7168x16384")
  assert rc != 0
  assert "ValueError" in err and message in err, err[-2000:]


_LOWER = """
import sys, jax, jax.numpy as jnp, jax_deepgemm as jd
from jax_deepgemm import _ffi
_ffi.use_kernels = lambda: True  # lower as on a Hopper GPU (the lowering needs none)
S, e4, f32, i32 = jax.ShapeDtypeStruct, jnp.float8_e4m3fn, jnp.float32, jnp.int32
ops = {
    "dense": (jd.fp8_gemm_nt, (S((256, 256), e4), S((256, 2), f32), S((256, 256), e4),
                               S((2, 2), f32))),
    "grouped": (jd.m_grouped_fp8_gemm_nt_contiguous,
                (S((256, 256), e4), S((256, 2), f32), S((2, 256, 256), e4), S((2, 2, 2), f32),
                 S((2,), i32))),
    "k_grouped": (jd.k_grouped_fp8_gemm_tn_contiguous,
                  (S((256, 128), e4), S((2, 128), f32), S((256, 256), e4), S((2, 256), f32),
                   S((2,), i32))),
}
for name in sys.argv[1:]:
  fn, specs = ops[name]
  try:
    jax.export.export(jax.jit(fn), platforms=("cuda",),
                      disabled_checks=jd.export_safety_checks())(*specs)
    print("ok")
  except ValueError as e:
    print("error")
    print(e, file=sys.stderr)
"""


def test_override_that_no_kernel_of_an_op_matches_fails_its_lowering():
  # Dense-only tiles forced: the M-grouped GEMMs failed every call at run time, in the
  # handler; now their lowering (jit, export) fails, naming the op. Dense ones lower.
  for override in ("block_n=32", "block_m=192", "block_n=160"):
    rc, out, err = _configs(override, "dense", "grouped", script=_LOWER)
    assert rc == 0 and out == ["ok", "error"], (override, out, err[-2000:])
    assert ("m_grouped_fp8_gemm_nt: JAX_DEEPGEMM_GEMM_CONFIG='" + override +
            "' matches no grouped kernel that is built") in err, err[-2000:]
  rc, out, err = _configs("block_m=96", "k_grouped", "dense", script=_LOWER,
                          var="JAX_DEEPGEMM_K_GROUPED_CONFIG")
  assert rc == 0 and out == ["error", "ok"], (out, err[-2000:])
  assert "k_grouped_fp8_gemm_tn_contiguous: invalid JAX_DEEPGEMM_K_GROUPED_CONFIG" in err


def test_k_grouped_heuristic_and_override():
  kg = "JAX_DEEPGEMM_K_GROUPED_CONFIG"
  # The bar shapes get the 192-row tile (three math warpgroups); one group's 7168 x 4096
  # (9.2 waves of 192-row tiles) keeps 128; a small output that leaves SMs idle gets 64.
  rc, out, err = _configs(None, "kg:4x7168x4096", "kg:4x2048x7168", "kg:8x7168x4096",
                          "kg:1x7168x4096", "kg:2x256x512")
  assert rc == 0, err[-2000:]
  assert [o.split(",")[0] for o in out] == ["block_m=192", "block_m=192", "block_m=192",
                                            "block_m=128", "block_m=64"], out
  assert all(",block_n=128,stages=" in o for o in out), out
  rc, out, err = _configs("block_m=128", "kg:4x7168x4096", "kg:2x256x512", var=kg)
  assert rc == 0 and [o.split(",")[0] for o in out] == ["block_m=128"] * 2, (out, err[-2000:])
  # The dense override does not touch the K-grouped tile.
  rc, out, err = _configs("block_m=64", "kg:4x7168x4096")
  assert rc == 0 and out[0].startswith("block_m=192"), (out, err[-2000:])
  for bad in ("block_m=96", "block_m=192,block_n=64", "stages=3", "block_m"):
    rc, _, err = _configs(bad, "kg:4x7168x4096", var=kg)
    assert rc != 0 and "ValueError" in err and kg in err, (bad, err[-2000:])
  rc, _, err = _configs(None, "kg:0x7168x4096")
  assert rc != 0 and "needs groups, N, K >= 1" in err, err[-2000:]
