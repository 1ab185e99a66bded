"""Smoke runs of the benchmark scripts on the CPU reference path (--quick, nothing written), so
that a benchmark that no longer runs fails CI rather than the next GPU session."""
import argparse
import os
import subprocess
import sys

import jax
import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def run(script, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, os.path.join(BENCH, script), "--quick", "--no-write", *args],
                       cwd=BENCH, env=env, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
  return res.stdout


def test_bench_gemm_with_epilogues():
  out = run("bench_gemm.py", "--epilogues", "--skip-xla", "--shapes", "4096x256x256")
  assert "[4096x256x256] epilogues: bias" in out and "accumulate" in out


def test_bench_moe():
  out = run("bench_moe.py", "--tokens", "64")
  assert "T64 H256 W128 E8 top2" in out


def test_bench_moe_floor_gemm_matches_layer_routing():
  sys.path.insert(0, BENCH)
  try:
    import bench_moe as B  # noqa: PLC0415
  finally:
    sys.path.remove(BENCH)
  from flax import nnx  # noqa: PLC0415
  cfg = argparse.Namespace(hidden=256, expert_width=128, experts=8, top_k=2)
  graphdef, params, rest = nnx.split(B.make_moe(cfg, "fp8"), nnx.Param, ...)
  gemm, make = B.make_floor(graphdef, params, rest, 64, 256, 2)
  x_sorted, w, sizes = make(jax.random.PRNGKey(0))
  assert x_sorted.shape == (128, 256) and w.shape == (8, 256, 128)
  assert int(sizes.sum()) == 128 and int(sizes.min()) >= 0
  assert jax.jit(gemm)(x_sorted, w, sizes).shape == (128, 128)


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
