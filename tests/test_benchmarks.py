"""Smoke runs of the benchmark scripts on the CPU reference path (--quick, nothing written), so
that a benchmark that no longer runs fails CI rather than the next GPU session."""
import argparse
import importlib
import os
import subprocess
import sys

import jax
import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def bench_module(name):
  """Imports benchmarks/<name>.py (the scripts are not a package)."""
  sys.path.insert(0, BENCH)
  try:
    return importlib.import_module(name)
  finally:
    sys.path.remove(BENCH)


def run(script, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, os.path.join(BENCH, script), "--quick", "--no-write", *args],
                       cwd=BENCH, env=env, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
  return res.stdout


def test_bench_gemm_with_epilogues():
  out = run("bench_gemm.py", "--epilogues", "--skip-xla", "--shapes", "4096x256x256",
            "--epilogue-rounds", "2")
  line = next(l for l in out.splitlines() if l.startswith("[4096x256x256] epilogues"))
  assert "(2 rounds, medians): bias" in line and "accumulate" in line and "n/a" not in line


def test_bench_moe():
  out = run("bench_moe.py", "--tokens", "64")
  assert "T64 H256 W128 E8 top2" in out


def test_bench_moe_f32_params():
  out = run("bench_moe.py", "--tokens", "64", "--param-dtype", "float32", "--skip-baseline")
  assert "float32 params" in out and "T64 H256 W128 E8 top2" in out


def test_moe_adamw_step(capsys):
  bench_module("moe_adamw_step").main(experts=4, tokens=64, hidden=256, width=128, top_k=2)
  assert "E4 adamw step" in capsys.readouterr().out


def test_bench_moe_micro_batches():
  # Gradient accumulation: the FP8 step also with the experts' weights cast once per step.
  out = run("bench_moe.py", "--tokens", "64", "--micro-batches", "2")
  assert "T64 H256 W128 E8 top2 x2" in out
  assert "fp8 with the weights cast once per step" in out


def test_bench_moe_cast_once_step_is_the_accumulated_step():
  # The cast-once step sums the same gradients (bitwise) and runs no weight cast in its loop.
  B = bench_module("bench_moe")
  from flax import nnx  # noqa: PLC0415
  from jax.extend.core import jaxprs_in_params  # noqa: PLC0415
  cfg = argparse.Namespace(hidden=256, expert_width=128, experts=8, top_k=2)
  graphdef, params, rest = nnx.split(B.make_moe(cfg, "fp8"), nnx.Param, ...)
  _, x, ct = B.make_inputs_fn(params, 64, 256, micro_batches=3)(jax.random.PRNGKey(0))
  assert x.shape == (3, 64, 256)
  plain, once = (jax.jit(B.make_step(graphdef, rest, False, 3, cast_once=c)) for c in (0, 1))
  for a, b in zip(jax.tree.leaves(plain(params, x, ct)), jax.tree.leaves(once(params, x, ct))):
    assert bool(jax.numpy.array_equal(a, b))

  def casts_in_scan(step):
    def walk(j, inside):
      n = 0
      for eqn in j.eqns:
        n += inside and eqn.primitive.name == "jax_deepgemm_per_block_dual_cast"
        for sub in jaxprs_in_params(eqn.params):
          n += walk(sub, inside or eqn.primitive.name == "scan")
      return n
    return walk(jax.make_jaxpr(step)(params, x, ct).jaxpr, False)
  assert casts_in_scan(B.make_step(graphdef, rest, False, 3)) == 2  # gate|up and down
  assert casts_in_scan(B.make_step(graphdef, rest, False, 3, cast_once=True)) == 0


def test_bench_moe_floor_gemm_matches_layer_routing():
  B = bench_module("bench_moe")
  from flax import nnx  # noqa: PLC0415
  cfg = argparse.Namespace(hidden=256, expert_width=128, experts=8, top_k=2)
  graphdef, params, rest = nnx.split(B.make_moe(cfg, "fp8"), nnx.Param, ...)
  gemm, make = B.make_floor(graphdef, params, rest, 64, 256, 2)
  x_sorted, w, sizes = make(jax.random.PRNGKey(0))
  assert x_sorted.shape == (128, 256) and w.shape == (8, 256, 128)
  assert int(sizes.sum()) == 128 and int(sizes.min()) >= 0
  assert jax.jit(gemm)(x_sorted, w, sizes).shape == (128, 128)


def test_bench_grouped_masked_runs_both_peers():
  # The "x vs ragged_dot" bar covers masked shapes too: ragged_dot on the packed rows
  # runs next to the batched einsum.
  out = run("bench_grouped.py", "--filter", "masked")
  assert "xla_bf16_einsum" in out and "[2x64 n256 k512] ragged_dot_bf16" in out


# ----------------------------------------------------------------- FLOP and byte accounting
# The TFLOPS and GB/s of the records rest on these formulas; each is checked against what the
# benchmark's own step runs (its GEMMs, after dead-code elimination) or moves (its arrays).

def gemm_flops_in(fn, *args):
  """2·M·N·K summed over the GEMMs ``jax.jit(fn)(*args)`` runs: the dots and our GEMM ops of
  its jaxpr once dead code is dropped (as XLA drops it), nested jaxprs included. Grouped ops
  count all their rows (the callers' group sizes cover them)."""
  import math  # noqa: PLC0415
  from jax._src.interpreters import partial_eval as pe  # noqa: PLC0415
  from jax.extend.core import jaxprs_in_params  # noqa: PLC0415
  closed = jax.make_jaxpr(fn)(*args)
  jaxpr, _ = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
  found = []

  def walk(j):
    for eqn in j.eqns:
      name, shapes = eqn.primitive.name, [v.aval.shape for v in eqn.invars]
      if name == "dot_general":
        (_, rc), (_, rb) = eqn.params["dimension_numbers"]
        free = [d for i, d in enumerate(shapes[1]) if i not in rc and i not in rb]
        found.append((name, 2.0 * math.prod(shapes[0]) * math.prod(free)))
      elif name in ("jax_deepgemm_fp8_gemm_nt",
                    "jax_deepgemm_m_grouped_fp8_gemm_nt_contiguous"):
        (m, k), n = shapes[0], shapes[2][-2]
        found.append((name, 2.0 * m * n * k))
      elif name == "jax_deepgemm_k_grouped_fp8_gemm_tn_contiguous":
        a, b = shapes[0], shapes[2]
        (n, t), k = (a, b[0]) if eqn.params["token_major"] else (a[::-1], b[1])
        found.append((name, 2.0 * t * n * k))
      else:
        assert "fp8_gemm" not in name and "ragged_dot" not in name, f"uncounted GEMM {name}"
      for sub in jaxprs_in_params(eqn.params):
        walk(sub)
  walk(jaxpr)
  return sum(f for _, f in found), [name for name, _ in found]


def test_train_flops_are_the_three_gemms_of_each_step():
  B = bench_module("bench_train")
  for g, rows, n, k in B.QUICK_GROUPED:
    inputs = B.grouped_inputs(g, rows, n, k)(jax.random.PRNGKey(0))
    flops, gemms = gemm_flops_in(B.GROUPED_IMPLS["jax_deepgemm"], *inputs)
    assert len(gemms) == 3 and flops == B.fwd_bwd_flops(g * rows, n, k)
  for m, n, k in B.QUICK_DENSE:
    inputs = B.dense_inputs(m, n, k)(jax.random.PRNGKey(0))
    for fn in B.DENSE_IMPLS.values():
      flops, gemms = gemm_flops_in(fn, *inputs)
      assert len(gemms) == 3 and flops == B.fwd_bwd_flops(m, n, k)


def test_moe_flops_are_the_gemms_of_its_step():
  # The step differentiates the parameters, not x: the fused gate|up GEMM's dgrad is dead
  # code, so 7 expert GEMMs' work (not 9) and the router's forward and wgrad (not 3 dots) run.
  # The formula was 18·T·k·H·W + 6·T·H·E before, 29% over the work at DeepSeek-V3's shapes.
  # Gate and up are one GEMM of twice the width: forward (gate|up, down), down's dgrad; wgrads
  # of w_gate_up and w_down.
  B = bench_module("bench_moe")
  from flax import nnx  # noqa: PLC0415
  cfg = argparse.Namespace(hidden=256, expert_width=128, experts=8, top_k=2)
  graphdef, params, rest = nnx.split(B.make_moe(cfg, "fp8"), nnx.Param, ...)
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 256), jax.numpy.bfloat16)
  flops, gemms = gemm_flops_in(B.make_step(graphdef, rest), params, x, x)
  assert flops == B.moe_flops(64, 256, 128, 8, 2)
  assert sorted(gemms).count("jax_deepgemm_m_grouped_fp8_gemm_nt_contiguous") == 3
  assert gemms.count("jax_deepgemm_k_grouped_fp8_gemm_tn_contiguous") == 2
  assert gemms.count("dot_general") == 2
  # --grad-x: x's gradient brings the gate|up dgrad (one GEMM, K = 2W) and the router's back.
  flops, gemms = gemm_flops_in(B.make_step(graphdef, rest, grad_x=True), params, x, x)
  assert flops == B.moe_flops(64, 256, 128, 8, 2, grad_x=True)
  assert gemms.count("jax_deepgemm_m_grouped_fp8_gemm_nt_contiguous") == 4
  assert gemms.count("jax_deepgemm_k_grouped_fp8_gemm_tn_contiguous") == 2
  assert gemms.count("dot_general") == 3


def nbytes(*arrays):
  """Bytes of arrays or shape-dtype structs."""
  import math  # noqa: PLC0415
  return sum(math.prod(a.shape) * a.dtype.itemsize for a in arrays)


def test_gemm_bytes_are_its_operands_scales_and_output():
  B = bench_module("bench_gemm")
  key = jax.random.PRNGKey(0)
  for m, n, k in [(128, 256, 512), (200, 384, 320)]:
    ours, fp8, bf16 = B.gemm_bytes(m, n, k)
    a, sa, b, sb = B.ours_inputs(m, n, k)(key)
    assert ours == nbytes(a, sa, b, sb, jax.jit(B.ours)(a, sa, b, sb))
    a8, b8, _, _ = B.fp8_inputs(m, n, k)(key)  # (per-tensor scales: two scalars, not counted)
    assert fp8 == nbytes(a8, b8) + 2 * m * n
    x, w = B.bf16_inputs(m, n, k)(key)
    assert bf16 == nbytes(x, w, jax.jit(B.xla_bf16)(x, w))


def test_grouped_bytes_and_flops_count_the_rows_in_groups():
  B = bench_module("bench_grouped")
  key = jax.random.PRNGKey(0)
  for case in B.quick_cases(0.5):
    ours, bf16 = B.grouped_bytes(case.m, case.groups, case.n, case.k)
    if isinstance(case, B.Contiguous):
      a, sa, b, sb, gs = B.contiguous_fp8_inputs(case)(key)
      assert int(gs.sum()) == case.m == a.shape[0]
      out = jax.eval_shape(B.ours_contiguous, a, sa, b, sb, gs)
      x, w, _ = B.contiguous_bf16_inputs(case)(key)
      assert ours == nbytes(a, sa, b, sb, out)
      assert bf16 == nbytes(x, w) + 2 * case.m * case.n
    else:
      a, sa, b, sb, mm = B.masked_fp8_inputs(case)(key)
      assert int(mm.sum()) == case.m  # the valid rows (masked_m), what TFLOPS counts
      out = jax.eval_shape(lambda *v: B.ours_masked(*v, expected_m=case.expected_m),
                           a, sa, b, sb, mm)
      x, w = B.masked_bf16_inputs(case)(key)
      # The rows' bytes count the valid rows only (DeepGEMM's "dg" cases: M_max of 4096 rows
      # past masked_m, which the kernel never reads).
      rows = lambda *v: nbytes(*v) * case.m // (case.groups * case.m_max)  # noqa: E731
      assert ours == nbytes(b, sb) + rows(a, sa, out)
      assert bf16 == nbytes(w) + rows(x) + 2 * case.m * case.n
      assert case.expected_m == (case.expected or case.m_max)
      assert all(0 < v <= case.m_max for v in case.masked_m)
    assert B.gemm_flops(case.m, case.n, case.k) == 2.0 * case.m * case.n * case.k


def test_k_grouped_bytes_and_group_sizes_operand():
  B = bench_module("bench_k_grouped")
  for g, per, n, k, unaligned in B.QUICK:
    gs = B.sizes_for(g, per, unaligned)
    t = int(gs.sum())
    ours, bf16 = B.k_grouped_bytes(t, g, n, k)
    a, sa, b, sb, gs_dev = B.fp8_inputs(t, n, k, gs)(jax.random.PRNGKey(0))
    # The group sizes are an operand (as in the backward pass), not a constant of the jit.
    assert gs_dev.tolist() == gs.tolist()
    out = jax.eval_shape(B.ours, a, sa, b, sb, gs_dev)
    assert ours == nbytes(a, sa, b, sb, out)
    x, y, _ = B.bf16_inputs(t, n, k, gs)(jax.random.PRNGKey(0))
    assert bf16 == nbytes(x, y, jax.eval_shape(B.ragged_bf16, x, y, gs_dev))
    assert B.k_grouped_flops(t, n, k) == 2.0 * t * n * k


def test_quant_bytes_are_input_and_outputs():
  B = bench_module("bench_quant")
  for case in B.QUICK_CASES:
    x, = B.make_inputs(case)(jax.random.PRNGKey(0))
    outs = jax.eval_shape(B.IMPLS[case.op][0], x)
    assert B.moved_bytes(case) == nbytes(x, *outs), case.name


def test_xla_fp8_peers_precision():
  # XLA turns on cuBLASLt's FP8 fast accumulation (no promotion of partial sums) for dots at
  # DEFAULT precision: the "xla_fp8_dot" patterns are that; the promoted peer asks HIGHEST.
  B = bench_module("bench_gemm")
  inputs = B.fp8_inputs(128, 256, 512)(jax.random.PRNGKey(0))
  for fn in B.XLA_FP8_PATTERNS.values():
    assert "precision = [DEFAULT, DEFAULT]" in jax.jit(fn).lower(*inputs).as_text()
  assert "precision = [HIGHEST, HIGHEST]" in jax.jit(B.xla_fp8_promoted).lower(*inputs).as_text()
  assert B.fast_accum("cublaslt_f8", promoted=False) is True
  assert B.fast_accum("cublaslt_f8", promoted=True) is False
  assert B.fast_accum("triton", promoted=False) is None


def test_chilled_kernel_times_count_the_ops_kernels_only():
  T = bench_module("_timing")
  ev = [("fill_iota", 3000.0, 0.0), ("gemm", 100.0, 3000.0), ("transpose", 2.0, 3100.0),
        ("fill_iota", 3000.0, 3200.0), ("gemm", 101.0, 6200.0)]
  assert T.op_events(ev, {"gemm", "transpose"}, {"fill_iota"}) == [ev[1], ev[2], ev[4]]
  with pytest.raises(ValueError, match="also the op's"):
    T.op_events(ev, {"gemm", "fill_iota"}, {"fill_iota"})
  # kernel_times checks the names before its timed runs, by the same check.
  T._check_no_clash(iter(["gemm", "transpose"]), iter(["fill_iota"]))
  with pytest.raises(ValueError, match=r"the fill's kernels \['fill_iota'\] are also the op's"):
    T._check_no_clash(iter(["gemm", "fill_iota"]), iter(["fill_iota"]))


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))


def test_ncu_source_summary(tmp_path):
  # A made-up source page in ncu's CSV layout: the summary must attribute samples to the
  # instruction classes and find the hot run.
  hdr = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed",
         "stall_short_sb", "stall_barrier", "stall_wait"]
  lines = [("QGMMA.64x128x32.F32.E4M3.E4M3 R24, gdesc[UR16], RZ, !UPT", 10, 8, 0, 0, 2),
           ("WARPGROUP.DEPBAR.LE gsb0, 0x1", 50, 8, 0, 50, 0),
           ("LDS.64 R182, [R206]", 5, 8, 0, 0, 5),
           ("FMUL R211, R182, R208", 30, 8, 28, 0, 2),
           ("@!P0  BRA 0x7f2fcb7eacc0", 5, 8, 0, 0, 0)]
  path = tmp_path / "src.csv"
  with open(path, "w") as f:
    f.write('"Kernel Name","k"\n')
    f.write(",".join(f'"{h}"' for h in hdr) + "\n")
    for i, (src, *vals) in enumerate(lines):
      f.write(",".join(f'"{v}"' for v in (hex(i * 16), src, *vals)) + "\n")
  res = subprocess.run([sys.executable, os.path.join(BENCH, "ncu_source_summary.py"), str(path),
                        "--window", "3"], capture_output=True, text=True, timeout=60)
  assert res.returncode == 0, res.stderr
  out = res.stdout
  assert "samples: 100" in out
  share = {l.split()[0]: float(l.split()[1]) for l in out.splitlines()
           if l.split() and l.split()[0] in ("wgmma_wait", "fp32", "qgmma", "lds", "branch")}
  assert share == {"wgmma_wait": 50.0, "fp32": 30.0, "qgmma": 10.0, "lds": 5.0, "branch": 5.0}
  assert "barrier 50.0" in out and "short_sb 28.0" in out
  hot = out.split("hottest 3 instructions")[1]  # DEPBAR + LDS + FMUL = 85 > QGMMA + DEPBAR + LDS
  assert "(85.0% of samples)" in hot and "DEPBAR" in hot and "FMUL" in hot and "QGMMA" not in hot


def test_clock_sampler_parse():
  import datetime  # noqa: PLC0415
  T = bench_module("_timing")
  span = (datetime.datetime(2026, 12, 3, 15, 40, 1), datetime.datetime(2026, 12, 3, 15, 40, 2))
  text = ("2026/12/03 15:40:00.900, 1980, 100.0\n"   # before the span
          "2026/12/03 15:40:01.100, 1300, 690.5\n"
          "2026/12/03 15:40:01.500, 1350, [N/A]\n"   # clock without power
          "2026/12/03 15:40:01.900, 1200, 700.5\n"
          "2026/12/03 15:40:02.100, 1980, 90\n"      # after it
          "timestamp, clocks.sm [MHz], power.draw [W]\n")
  assert T.ClockSampler.parse(text, span) == (1300.0, 695.5)
  assert T.ClockSampler.parse("", span) == (None, None)
  assert T.ClockSampler.parse_details(text, span) is None  # no detail columns: nothing said
  # With the detail columns (clock event reasons, temperature, enforced power limit).
  text = ("2026/12/03 15:40:00.900, 1980, 100.0, 0x0000000000000001, 30, 700.00\n"
          "2026/12/03 15:40:01.100, 1300, 690.5, 0x0000000000000004, 61, 700.00\n"
          "2026/12/03 15:40:01.500, 1350, [N/A], 0x0000000000000044, 63, 700.00\n"
          "2026/12/03 15:40:01.700, 1350, 650.0, [N/A], [N/A], [N/A]\n"  # no mask: no details
          "2026/12/03 15:40:01.900, 1200, 700.5, 0x0000000000000000, 65, 650.00\n")
  assert T.ClockSampler.parse(text, span) == (1325.0, 690.5)
  assert T.ClockSampler.parse_details(text, span) == {
      "clock_reasons": {"hw_thermal_slowdown": 0.333, "sw_power_cap": 0.667},
      "gpu_temp_c": 63.0, "power_limit_w": 700.0}


def test_clock_sampler_runs_nvidia_smi(tmp_path, monkeypatch):
  # A stand-in for `nvidia-smi -lms`: a sample every 20 ms, stamped like the real one, its
  # output block-buffered into the pipe (as a C program's is): stopping it must not lose it.
  fake, ready = tmp_path / "fake-smi", tmp_path / "ready"
  # Asked once without -lms (does it know the detail fields?), it answers and exits.
  fake.write_text(f"#!{sys.executable}\nimport datetime, os, sys, time\n"
                  "detail = 'clocks_event_reasons' in ' '.join(sys.argv)\n"
                  "if '-lms' not in sys.argv:\n  print('0x4, 60, 700.00')\n  sys.exit(0)\n"
                  f"open({str(ready)!r}, 'w').close()\n"
                  "out = os.fdopen(1, 'w', buffering=65536)\nwhile True:\n"
                  "  out.write(datetime.datetime.now().strftime('%Y/%m/%d %H:%M:%S.%f')[:-3]"
                  " + ', 1755, 612.25' + (', 0x0000000000000004, 71, 700.00' if detail else '')"
                  " + '\\n')\n  time.sleep(0.02)\n")
  fake.chmod(0o755)
  T = bench_module("_timing")
  monkeypatch.setattr(T.ClockSampler, "_gpu_index", lambda self: "0")
  # As in a benchmark started in the background (`cmd &` in a script): SIGINT ignored, which
  # the sampler would inherit (then stop() kills it and its buffered samples are lost).
  import signal  # noqa: PLC0415
  old = signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    s = T.ClockSampler(command=str(fake)).start()
  finally:
    signal.signal(signal.SIGINT, old)
  import time  # noqa: PLC0415
  # Its start-up (a Python interpreter) can take seconds on a loaded machine: wait for it.
  deadline = time.monotonic() + 60
  while not ready.exists() and time.monotonic() < deadline:
    time.sleep(0.05)
  time.sleep(0.1)
  s.window(begin=True)
  time.sleep(0.4)
  s.window(begin=False)
  assert s.stop() == (1755.0, 612.25)
  assert s.details == {"clock_reasons": {"sw_power_cap": 1.0}, "gpu_temp_c": 71.0,
                       "power_limit_w": 700.0}
  # Off GPUs (this CPU run) there is nothing to sample and the timing says so.
  t = T.bench(lambda x: x + 1, lambda key: (jax.random.normal(key, (64,)),), iters=2,
              min_time_s=0.01, n_rot=2)
  assert t.sm_clock_mhz is None and t.extras()["sm_clock_mhz"] is None and T.mhz(t) == "-"
  assert T.watts(t) == "-" and T.per_clock(1000.0, t) == "-"


def test_clock_sampler_fields_fall_back(tmp_path):
  # An nvidia-smi that rejects the detail fields (as older drivers reject a field they do not
  # know, failing the whole query) still gets sampled for clock and power.
  T = bench_module("_timing")
  old = tmp_path / "old-smi"
  old.write_text(f"#!{sys.executable}\nimport sys\n"
                 "sys.exit(2 if 'clocks_event_reasons' in ' '.join(sys.argv) else 0)\n")
  old.chmod(0o755)
  assert T.ClockSampler()._fields(str(old), "0") == T.ClockSampler.FIELDS
  new = tmp_path / "new-smi"
  new.write_text(f"#!{sys.executable}\nprint('0x0, 40, 700.00')\n")
  new.chmod(0o755)
  assert T.ClockSampler()._fields(str(new), "0") == (T.ClockSampler.FIELDS
                                                     + T.ClockSampler.DETAIL_FIELDS)


def test_peak_frac(monkeypatch):
  T = bench_module("_timing")
  # H200 numbers of 2026-12-03: 1134 TFLOPS at 1410 MHz on 132 SMs is 74% of the FP8 peak.
  assert abs(T.peak_frac(1134.0, 1410.0, 132) - 0.7437) < 1e-3
  assert T.peak_frac(1134.0, None, 132) is None and T.peak_frac(None, 1410.0, 132) is None
  assert T.peak_frac(1134.0, 1410.0, None) is None
  on_gpu = jax.devices()[0].platform == "gpu"
  n_sms = T.hopper_sm_count()
  assert (n_sms is None or n_sms >= 100) if on_gpu else n_sms is None  # (Hopper: 114 or 132)
  monkeypatch.setattr(T, "hopper_sm_count", lambda: None)
  rec = T.make_record(op="x", impl="y", m=1, n=1, k=1, time_us=1.0, flops=1e6, nbytes=0,
                      sm_clock_mhz=1500.0)
  assert "fp8_peak_frac_at_clock" not in rec  # not a Hopper GPU: no peak to compare with
  monkeypatch.setattr(T, "hopper_sm_count", lambda: 132)
  rec = T.make_record(op="x", impl="y", m=1, n=1, k=1, time_us=847.0,
                      flops=2.0 * 4096 * 7168 * 16384, nbytes=0, sm_clock_mhz=1410.0)
  assert abs(rec["fp8_peak_frac_at_clock"] - rec["tflops"] / 1524.7) < 1e-3


def test_kernel_times_trace_parsing(tmp_path):
  T = bench_module("_timing")
  # Off GPUs there are no kernels to time: None, not a crash or a made-up number.
  on_gpu = jax.devices()[0].platform == "gpu"
  kt = T.kernel_times(lambda x: x * 2, lambda key: (jax.random.normal(key, (64,)),),
                      n_sets=2, reps=2)
  assert (kt is not None and kt.total_us > 0) if on_gpu else kt is None
  # The trace reader works on a real trace (a CPU one has host planes only: no GPU events).
  with jax.profiler.trace(str(tmp_path)):
    jax.block_until_ready(jax.jit(lambda x: x @ x)(jax.numpy.ones((64, 64))))
  events = T._trace_events(str(tmp_path))
  assert len(events) > 0 if on_gpu else events == []
  assert T._trace_events(str(tmp_path / "missing")) is None
  # Idle time between kernels: two runs of three kernels (us), the host's wait between runs
  # (the largest gap) left out, overlapping kernels (two streams) counting no gap.
  ev = [("a", 10.0, 0.0), ("b", 5.0, 12.0), ("c", 4.0, 15.0),    # gaps 2, 0 (overlap)
        ("a", 10.0, 500.0), ("b", 5.0, 513.0), ("c", 4.0, 519.0)]  # host wait 481; gaps 3, 1
  assert T.inner_gaps_us(ev, runs=2) == 6.0
  assert T.inner_gaps_us(ev, runs=1) == 487.0
  assert T.inner_gaps_us(ev[:1], runs=1) == 0.0 and T.inner_gaps_us([], runs=3) == 0.0


EXPERIMENTS = os.path.join(BENCH, "experiments")


@pytest.mark.parametrize("patch", sorted(p for p in os.listdir(EXPERIMENTS) if p.endswith(".patch"))
                         if os.path.isdir(EXPERIMENTS) else [])
def test_experiment_patches_still_apply(patch):
  # A parked kernel experiment must apply to today's csrc/ (gpu_check.sh tiles builds it from
  # a patched copy); one that no longer does is refreshed or deleted, not left to rot.
  git = subprocess.run(["git", "--version"], capture_output=True)
  if git.returncode != 0:
    pytest.skip("needs git")
  res = subprocess.run(["git", "apply", "--check", os.path.join(EXPERIMENTS, patch)],
                       cwd=os.path.dirname(BENCH), capture_output=True, text=True)
  assert res.returncode == 0, res.stderr
