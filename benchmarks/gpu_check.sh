#!/usr/bin/env bash
# On the GPU machine (see ../shared/gpu.md): build, test, sanitize, benchmark; logs under $OUT.
#   bash benchmarks/gpu_check.sh [build|wheel] [test] [sanitize] [prof] [prof-src] [tiles] [mn-major] [mn-major-bench]
#                                [experiments] [bars] [bench]
#   (pytest arguments via PYTEST_ARGS)
# With no stage named: build test sanitize bench. The build carries CUTLASS from .gpu/ (no network there).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/jdg_out}; mkdir -p "$OUT"
stages=${*:-build test sanitize bench}
has() { [[ " $stages " == *" $1 "* ]]; }
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=16
# The image's default g++ links libstdc++ statically (gpu.md): build host code with g++-13.
if command -v g++-13 >/dev/null; then export CXX=g++-13 CUDAHOSTCXX=g++-13; fi
export PATH=/usr/local/cuda/bin:$PATH
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.sm,power.limit,power.draw --format=csv

# The installed extension: FP8 wgmma instructions in it, and what it exports.
report_so() {
  local so
  so=$(python3 -P -c "import jax_deepgemm._C as c; print(c.__file__)")
  echo "QGMMA instructions in $so: $(cuobjdump -sass "$so" | grep -c QGMMA)"
  nm -D --defined-only "$so" | grep -c ' T ' | xargs echo "exported text symbols:"
}

if has build; then
  CUTLASS_ARGS=()
  if ls .gpu/nvidia_cutlass-*.whl >/dev/null 2>&1; then
    rm -rf /tmp/cutlass && mkdir -p /tmp/cutlass
    python3 -m zipfile -e .gpu/nvidia_cutlass-*.whl /tmp/cutlass >/dev/null
    CUTLASS_ARGS=(-Ccmake.define.CUTLASS_INCLUDE_DIR=/tmp/cutlass/cutlass_library/source/include)
  fi
  t0=$(date +%s)
  # EXTRA_BUILD_ARGS: more pip -C options, e.g. an experiment's macro for an A/B run:
  #   EXTRA_BUILD_ARGS="-Ccmake.define.CMAKE_CUDA_FLAGS=-DMY_EXPERIMENT"
  if ! python3 -m pip install --no-build-isolation --no-deps -v . "${CUTLASS_ARGS[@]}" \
       ${EXTRA_BUILD_ARGS:-} > "$OUT/build.log" 2>&1; then
    tail -60 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
  fi
  echo "build: $(( $(date +%s) - t0 )) s"
  report_so
fi

if has wheel; then
  # A wheel built on the CPU machine for the device's Python (cp312, jaxlib 0.11.2) and carried
  # in .gpu/: seconds instead of a two-minute build, which matters when the machine is released
  # 30 s after each call. Build it with benchmarks/build_device_wheel.sh.
  python3 -m pip install --no-deps --force-reinstall .gpu/jax_deepgemm-*-cp312-*.whl > "$OUT/build.log" 2>&1 \
    || { tail -20 "$OUT/build.log"; echo "WHEEL INSTALL FAILED"; exit 1; }
  echo "wheel installed"
  report_so
fi

python3 -P -c "import jax, jax_deepgemm as jd; print(jax.__version__, jax.devices(), 'kernels:', jd.use_kernels())"

if has test; then
  python3 -P -m pytest -q -x --durations=8 ${PYTEST_ARGS:-tests} 2>&1 | tee "$OUT/tests.log" | tail -25
fi

if has sanitize; then
  # One cudaMalloc per buffer, so memcheck sees our kernel's out-of-bounds accesses.
  # sanitize TOOL LOG [CONFIG]: compute-sanitizer's own host process has segfaulted on this image
  # (rc 139, no summary, dmesg naming compute-sanitizer; session 44, then clean on a rerun), so a
  # run that ends without its summary is run once more rather than read as a verdict on the kernels.
  sanitize() {
    local rc try
    for try in 1 2; do
      JAX_DEEPGEMM_GEMM_CONFIG=${3:-${JAX_DEEPGEMM_GEMM_CONFIG:-}} \
        XLA_PYTHON_CLIENT_ALLOCATOR=platform XLA_PYTHON_CLIENT_PREALLOCATE=false \
        compute-sanitizer --tool "$1" --print-limit 20 python3 tests/sanitize_case.py > "$2" 2>&1
      rc=$?
      grep -qE "ERROR SUMMARY|RACECHECK SUMMARY" "$2" && break
      echo "$1: no summary (rc=$rc), compute-sanitizer itself failed; try $try of 2"
    done
    echo "$1${3:+ $3} rc=$rc"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|sanitize case" "$2"
  }
  sanitize memcheck "$OUT/memcheck.log"
  sanitize racecheck "$OUT/racecheck.log"
  # Extra forced configs under memcheck, e.g. SANITIZE_CONFIGS="block_n=96 block_n=192".
  for cfg in ${SANITIZE_CONFIGS:-}; do
    sanitize memcheck "$OUT/memcheck_$cfg.log" "$cfg"
  done
fi

if has prof; then
  # Nsight Compute on the 3rd call of each case: PROF_CASES="4096x7168x16384 ...", PROF_ARGS
  # (e.g. --grouped), PROF_KERNEL (name regex). Full reports in $OUT/ncu.txt. data_bank_*:
  # shared-memory bank use, to tell whether a kernel is bound by it.
  : > "$OUT/ncu.txt"
  for case in ${PROF_CASES:-4096x7168x16384}; do
    ncu --kernel-name regex:${PROF_KERNEL:-fp8_gemm} --launch-skip 2 --launch-count 1 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
      --section WarpStateStats --section SchedulerStats --section LaunchStats \
      --metrics sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active,sm__cycles_elapsed.avg.per_second,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum,lts__t_sectors_srcunit_tex.sum,smsp__average_warp_latency_issue_stalled_barrier,smsp__average_warp_latency_issue_stalled_long_scoreboard,l1tex__data_bank_reads.avg.pct_of_peak_sustained_elapsed,l1tex__data_bank_writes.avg.pct_of_peak_sustained_elapsed,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_gmma.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared_op_gmma.sum \
      python3 benchmarks/profile_case.py ${PROF_ARGS:-} $case >> "$OUT/ncu.txt" 2>&1
    echo "ncu $case rc=$?"
  done
  grep -E "profiled|Duration|SM Frequency|Compute \(SM\) Throughput|Memory Throughput|L2 Cache Throughput|DRAM Throughput|gmma_cycles|Warp Cycles Per Issued|Issue Slots Busy|bank_conflicts|Registers Per|Stall|data_bank|op_gmma" "$OUT/ncu.txt" | head -80
fi

if has prof-src; then
  # Per-instruction (SASS) warp-state samples of one case: which instructions the warps
  # wait on. PROF_CASES/PROF_ARGS/PROF_KERNEL as for `prof` (first case only). (On the H200,
  # 2026-12-03, ncu's kernel durations matched the benchmark's, though ncu reported a
  # 1.29 GHz SM clock and the benchmark sampled 1.41 GHz for the same dense case.)
  case=${PROF_CASES:-4096x7168x16384}; case=${case%% *}
  ncu -f -o /tmp/jdg_src --kernel-name regex:${PROF_KERNEL:-fp8_gemm} --launch-skip 2 \
    --launch-count 1 --section SourceCounters --section SpeedOfLight --import-source no \
    python3 benchmarks/profile_case.py ${PROF_ARGS:-} $case > "$OUT/ncu_src.log" 2>&1
  echo "ncu source $case rc=$?"
  ncu -i /tmp/jdg_src.ncu-rep --page source --csv --print-source sass | gzip > "$OUT/src.csv.gz"
  python3 benchmarks/ncu_source_summary.py "$OUT/src.csv.gz" | tee "$OUT/src_summary.txt" | head -30
fi

if has tiles; then
  # kernel_bench A/B of tiles without the extension (so no build stage needed): each
  # TILES entry (BMxBN) is compiled here against each VARIANTS entry (name:include dir,
  # e.g. "main:.gpu/v/main/csrc wip:csrc" for a copy of another revision's csrc/ carried
  # in .gpu/), ~10 s each in parallel, then all run alone on SHAPES, alternating, twice.
  # TILE_FLAGS: more nvcc flags (-DKB_K_GROUPED: K-grouped, SHAPES as GxTxNxK, TILES
  # 192x128 / 128x128 / 64x128; -DJAX_DEEPGEMM_NO_TMA_STORE; -DKB_STAGES=n); KB_BURST=1
  # in the environment times back-to-back bursts instead. KB_ENVS: run every binary once per
  # entry with those kernel_bench settings (commas join several), e.g. "KB_ACC=0 KB_ACC=1"
  # (f32 plain, then accumulating; with TILE_FLAGS=-DKB_OUT_F32) or "KB_BIAS=0 KB_BIAS=1".
  # A VARIANTS entry may name a patch instead (name:path.patch): csrc/ with it applied.
  tiles=${TILES:-128x128 128x160 128x192 192x128}
  variants=""
  for v in ${VARIANTS:-cur:csrc}; do
    if [[ $v == *.patch ]]; then
      d=/tmp/kb_src_${v%%:*}; rm -rf "$d"; mkdir -p "$d"; cp -r csrc "$d/"
      if command -v patch >/dev/null; then patch -s -d "$d" -p1 < "${v#*:}"
      else git -C "$d" apply "$PWD/${v#*:}"; fi || { echo "PATCH FAILED: ${v#*:}"; exit 1; }
      v="${v%%:*}:$d/csrc"
    fi
    variants="$variants $v"
  done
  for v in $variants; do
    for t in $tiles; do
      nvcc -std=c++17 -O2 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a \
        -I"${v#*:}" -DKB_BLOCK_M=${t%x*} -DKB_BLOCK_N=${t#*x} ${TILE_FLAGS:-} \
        -o /tmp/kb_${v%%:*}_$t benchmarks/kernel_bench.cu > "$OUT/tiles_build_${v%%:*}_$t.log" 2>&1 &
    done
  done
  wait
  for r in 1 2; do
    for t in $tiles; do
      for v in $variants; do
        b=/tmp/kb_${v%%:*}_$t
        [ -x $b ] || { echo "== ${v%%:*} $t BUILD FAILED"; tail -5 "$OUT/tiles_build_${v%%:*}_$t.log"; continue; }
        for e in ${KB_ENVS:--}; do
          echo "== ${v%%:*} $t ${e#-} (run $r)"
          [ "$e" = - ] && e=""
          env ${e//,/ } $b ${SHAPES:-4096x7168x16384 4096x16384x7168 4096x4096x7168 4096x2112x7168}
        done
      done
    done
  done 2>&1 | tee "$OUT/tiles.log" | grep -v "^#"
fi

if has mn-major; then
  # MN-major activation scales are the default (session 26, after this stage passed on the H100:
  # both sanitizers with them on, and every GPU test of an op that casts or takes sa). The stage
  # now checks the opt-out: both settings bit for bit (test_gpu_mn_major), the sanitizers and
  # the GPU tests of those ops with JAX_DEEPGEMM_MN_MAJOR_SCALES=0. Needs the build (or wheel) stage.
  python3 -P -m pytest -q tests/test_gpu_mn_major.py 2>&1 | tee "$OUT/tests_mn_major.log" | tail -3
  for tool in memcheck racecheck; do
    JAX_DEEPGEMM_MN_MAJOR_SCALES=0 XLA_PYTHON_CLIENT_ALLOCATOR=platform \
      XLA_PYTHON_CLIENT_PREALLOCATE=false compute-sanitizer --tool $tool --print-limit 20 \
      python3 tests/sanitize_case.py > "$OUT/${tool}_row_major.log" 2>&1
    echo "$tool (row-major scales) rc=$?"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|sanitize case" "$OUT/${tool}_row_major.log"
  done
  JAX_DEEPGEMM_MN_MAJOR_SCALES=0 python3 -P -m pytest -q -x tests/test_linear.py \
    tests/test_flax_moe.py tests/test_gpu_quant.py tests/test_gpu_kernels.py \
    tests/test_gpu_grouped.py 2>&1 | tee -a "$OUT/tests_mn_major.log" | tail -3
fi

if has mn-major-bench; then
  # The timings of both settings, in one run: M = 128 kernel times with sa handed row-major
  # (a transpose in the call) and MN-major, and fp8_linear's training step with each setting.
  m128=128x2112x7168,128x24576x1536,128x7168x16384,128x4096x7168,128x7168x2048
  python3 benchmarks/bench_gemm.py --shapes $m128 --kernel-times on --out gemm_m128_rowmajor \
    2>&1 | tail -8
  python3 benchmarks/bench_gemm.py --shapes $m128 --kernel-times on --skip-xla \
    --mn-major-scales --out gemm_m128_mn_major 2>&1 | tail -8
  for on in 0 1; do
    JAX_DEEPGEMM_MN_MAJOR_SCALES=$on python3 benchmarks/bench_train.py --only dense \
      --kernel-times --no-write 2>&1 | tail -4
  done
  cp benchmarks/results/gemm_m128_*.json "$OUT/" 2>/dev/null
fi

if has experiments; then
  # The A/Bs of the patches parked under benchmarks/experiments/ (each header says what it
  # changes, and names the tiles it touches on a "Tiles:" line, and may give kernel_bench
  # flags on a "Flags:" line, e.g. -DKB_K_GROUPED, its shapes on a "Shapes:" line and
  # kernel_bench settings to run each binary under on an "Envs:" line, as KB_ENVS),
  # kernel_bench alone against csrc/ as it is in the same run, through the tiles stage.
  # EXP_ONLY="name ..." picks patches (file names without .patch); EXP_SHAPES the shapes of
  # patches without a "Shapes:" line.
  shapes="${EXP_SHAPES:-4096x7168x16384 4096x24576x1536 4096x7168x2048 4096x4096x7168}"
  found=0
  for patch in benchmarks/experiments/*.patch; do
    [ -e "$patch" ] || continue
    e=$(basename "$patch" .patch)
    [ -n "${EXP_ONLY:-}" ] && [[ " $EXP_ONLY " != *" $e "* ]] && continue
    found=1
    tiles=$(sed -n 's/^Tiles: *//p' "$patch" | head -1)
    # A layer-level experiment (no kernel_bench A/B) names its own script instead.
    [ -z "$tiles" ] && { echo "== experiment $e: no Tiles: line, see its header"; continue; }
    flags=$(sed -n 's/^Flags: *//p' "$patch" | head -1)
    pshapes=$(sed -n 's/^Shapes: *//p' "$patch" | head -1)
    envs=$(sed -n 's/^Envs: *//p' "$patch" | head -1)
    echo "== experiment $e: ${tiles} ${flags} ${envs}"
    OUT=$OUT/$e TILES="$tiles" SHAPES="${pshapes:-$shapes}" VARIANTS="cur:csrc $e:$patch" \
      TILE_FLAGS="${TILE_FLAGS:-} $flags" KB_ENVS="${envs:-${KB_ENVS:-}}" bash "$0" tiles | tail -80
  done
  [ $found = 1 ] || echo "no parked experiments"
fi

if has bars; then
  # Every throughput bar of issues 3-5 in one stage, under DeepGEMM's protocol (8 GB fill) with
  # A's scales handed MN-major (as a per-token cast in the same jit hands them), results as
  # JSON named for the device (<bench>_bars_<h100|h200>.json). BARS_PEERS=0 leaves out the
  # XLA and ragged_dot peers (about half the time). ~4-6 min with the peers.
  dev=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -o -i 'h[12]00' | tr A-Z a-z)
  peers=""; [ "${BARS_PEERS:-1}" = 0 ] && peers=1
  bar_lines() { grep -E "DeepGEMM's protocol|\] ours|\] ragged_dot|rror|WARN"; }  # what each bench prints of a bar
  python3 benchmarks/bench_gemm.py --chill-gb 8 --mn-major-scales ${peers:+--skip-xla} \
    --shapes 4096x2112x7168,4096x24576x1536,4096x7168x16384,4096x4096x7168,4096x7168x2048 \
    --out gemm_bars_${dev:-gpu} 2>&1 | bar_lines
  for f in masked 4x8192 8x; do  # (8x: 8x4096 and its unaligned twin, the >= 90% bar)
    python3 benchmarks/bench_grouped.py --filter $f --chill-gb 8 --mn-major-scales \
      ${peers:+--skip-baseline} --out grouped_${f}_bars_${dev:-gpu} 2>&1 \
      | bar_lines
  done
  python3 benchmarks/bench_k_grouped.py --chill-gb 8 ${peers:+--skip-baseline} \
    --out k_grouped_bars_${dev:-gpu} 2>&1 | bar_lines
  python3 benchmarks/bench_train.py --kernel-times ${peers:+--skip-baseline} \
    --no-write 2>&1 | tail -8
  cp benchmarks/results/*_bars_*.json "$OUT/" 2>/dev/null
fi

if has bench; then
  # BENCHES="gemm grouped ..." picks scripts; BENCH_ARGS_<name> passes arguments to one.
  for b in ${BENCHES:-gemm}; do
    args_var="BENCH_ARGS_$b"
    python3 benchmarks/bench_$b.py ${!args_var:-${BENCH_ARGS:-}} 2>&1 | tee "$OUT/bench_$b.log" | tail -30
  done
  cp benchmarks/results/*.json "$OUT/" 2>/dev/null
fi
