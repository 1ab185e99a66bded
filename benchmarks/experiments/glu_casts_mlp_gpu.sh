#!/usr/bin/env bash
# Device script for the parked glu_casts_mlp.patch: new = the patch's Python, tests, benchmarks
# (.gpu/glu/src) and wheel (.gpu/glu/*.whl); old = main's Python (.gpu/old/jax_deepgemm) and
# wheel (.gpu/s46/*.whl). Set up here (ignored .gpu/, carried by `run`):
#   git worktree add /tmp/glu wip/glu-cast   # or main + this patch
#   (in /tmp/glu, with the CUTLASS wheel in its .gpu/) bash benchmarks/build_device_wheel.sh
#   mkdir -p .gpu/glu/src .gpu/old; mv /tmp/glu/.gpu/jax_deepgemm-*.whl .gpu/glu/
#   (cd /tmp/glu && git archive HEAD jax_deepgemm tests benchmarks pyproject.toml) | tar -x -C .gpu/glu/src
#   git archive HEAD jax_deepgemm | tar -x -C .gpu/old   # and main's wheel in .gpu/s46/
#   rm -rf .gpu/glu/src/benchmarks/results   # (carry is limited to 64 MiB)
# Then, on the device, from the repository root (B = seconds the call may use):
#   STAGES="glu san ab tests" SAN_TOOLS=memcheck AB_REPS=1 B=560 \
#     bash benchmarks/experiments/glu_casts_mlp_gpu.sh
# Stages: glu (test_gpu_quant -k "glu or dual"), san (compute-sanitizer on
# sanitize_quant_case.py), ab (bench_moe old/new), adamw (moe_adamw_step.py), tests ($TESTS -k $TK).
set -uo pipefail
cd "$(dirname "$0")/../.."
T0=$(date +%s); B=${B:-560}
left() { echo $(( B - ($(date +%s) - T0) )); }
export PATH=/usr/local/cuda/bin:$PATH PYTHONUNBUFFERED=1
has() { [[ " $STAGES " == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.sm,power.limit --format=csv,noheader
rm -rf /tmp/sb /tmp/sb_old /tmp/sp /tmp/sp_old; mkdir -p /tmp/sp /tmp/sp_old
pip install -q --no-deps --target /tmp/sb .gpu/glu/jax_deepgemm-*.whl > $OUT/pip.log 2>&1 || { tail $OUT/pip.log; exit 1; }
cp -r .gpu/glu/src/jax_deepgemm /tmp/sp/; cp /tmp/sb/jax_deepgemm/_C*.so /tmp/sp/jax_deepgemm/
pip install -q --no-deps --target /tmp/sb_old .gpu/s46/jax_deepgemm-*.whl >> $OUT/pip.log 2>&1 || { tail $OUT/pip.log; exit 1; }
cp -r .gpu/old/jax_deepgemm /tmp/sp_old/; cp /tmp/sb_old/jax_deepgemm/_C*.so /tmp/sp_old/jax_deepgemm/
export PYTHONPATH=/tmp/sp JAX_DEEPGEMM_REQUIRE_EXTENSION=1
python3 -P -c "import jax, jax_deepgemm as jd; print(jax.__version__, jax.devices(), 'kernels:', jd.use_kernels())"
G=.gpu/glu/src
if has glu; then
  echo "== glu/dual-cast GPU tests ($(left) s left)"
  (cd $G && timeout $(( $(left) - 60 )) python3 -P -m pytest -q -x tests/test_gpu_quant.py -k "glu or dual" 2>&1 | tail -6) | tee -a $OUT/tests.log
fi
if has san; then
  for tool in ${SAN_TOOLS:-memcheck racecheck}; do
    echo "== $tool quant case ($(left) s left)"
    XLA_PYTHON_CLIENT_ALLOCATOR=platform XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 200 \
      compute-sanitizer --tool $tool --print-limit 20 python3 -P $G/tests/sanitize_quant_case.py > /tmp/$tool.log 2>&1
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|sanitize quant case|rror" /tmp/$tool.log | head -8 | tee -a $OUT/sanitize.log
  done
fi
if has ab; then
  for i in $(seq ${AB_REPS:-2}); do for v in new old; do
    [ $(left) -lt 90 ] && break
    echo "== bench_moe $v ($(left) s left)"
    P=/tmp/sp; [ $v = old ] && P=/tmp/sp_old
    H=""; [ $i = 1 ] && [ $v = new ] && H="--hlo /tmp/moe_new.hlo"
    PYTHONPATH=$P timeout $(( $(left) - 20 )) python3 $G/benchmarks/bench_moe.py --grad-x --skip-baseline --tokens 8192 \
      --experts ${EXPERTS:-32} --kernel-times --no-write --param-dtype ${PARAM_DTYPE:-float32} $H > /tmp/ab_$v$i.log 2>&1
    grep -E "kernels of one|tok/s|Error|error" /tmp/ab_$v$i.log | head -4
    echo "== $v $i" >> $OUT/moe_ab.log; cat /tmp/ab_$v$i.log >> $OUT/moe_ab.log
  done; done
  [ -f /tmp/moe_new.hlo ] && gzip -c /tmp/moe_new.hlo > $OUT/moe_new.hlo.gz
fi
if has adamw; then
  for v in new old; do
    [ $(left) -lt 80 ] && break
    P=/tmp/sp; [ $v = old ] && P=/tmp/sp_old
    echo "== adamw step $v ($(left) s left)"
    PYTHONPATH=$P timeout $(( $(left) - 10 )) python3 $G/benchmarks/moe_adamw_step.py 32 2>&1 | tail -3 | tee -a $OUT/adamw.log
  done
fi
if has tests; then
  echo "== layer GPU tests ($(left) s left)"
  (cd $G && timeout $(( $(left) - 30 )) python3 -P -m pytest -q -x ${TESTS:-tests/test_linear.py tests/test_flax_moe.py} -k "${TK:-}" --durations=5 2>&1 | tail -12) | tee -a $OUT/tests.log
fi
echo "done, $(left) s left"
