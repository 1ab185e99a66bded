#!/usr/bin/env bash
# Times forced kernel configs (JAX_DEEPGEMM_GEMM_CONFIG) on a few shapes, jax_deepgemm only,
# while nvidia-smi samples SM clock and power (so clock-bound vs clock-independent limits show).
#   SWEEP_CONFIGS="block_n=128 block_n=160" SWEEP_SHAPES=4096x7168x16384 bash benchmarks/sweep_configs.sh
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/jdg_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=clocks.sm,power.draw,clocks_throttle_reasons.active --format=csv,noheader -lms 250 \
  > "$OUT/smi.csv" 2>&1 &
smi=$!
for cfg in ${SWEEP_CONFIGS:-block_m=128,block_n=128}; do
  JAX_DEEPGEMM_GEMM_CONFIG=$cfg python3 benchmarks/bench_gemm.py --skip-xla --no-write \
    --shapes ${SWEEP_SHAPES:-4096x7168x16384} 2>&1 | grep -E "ours|Error|error" | sed "s/^/$cfg /"
done
kill $smi
sort "$OUT/smi.csv" | uniq -c | sort -rn | head -8
