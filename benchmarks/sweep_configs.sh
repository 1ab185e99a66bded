#!/usr/bin/env bash
# Times forced kernel configs on a few shapes, jax_deepgemm only. Each line shows TFLOPS, the
# SM clock and power sampled during the timing, and the share of the FP8 peak at that clock
# (the H200 runs these GEMMs at its power cap, so configs compare per clock).
#   SWEEP_CONFIGS="block_n=128 block_n=160" SWEEP_SHAPES=4096x7168x16384 \
#     bash benchmarks/sweep_configs.sh                 # dense: JAX_DEEPGEMM_GEMM_CONFIG
#   SWEEP_CONFIGS= SWEEP_KG_CONFIGS="block_m=128 block_m=192" bash benchmarks/sweep_configs.sh
#                                                      # K-grouped: JAX_DEEPGEMM_K_GROUPED_CONFIG
cd "$(dirname "$0")/.."
for cfg in ${SWEEP_CONFIGS-block_m=128,block_n=128}; do
  JAX_DEEPGEMM_GEMM_CONFIG=$cfg python3 benchmarks/bench_gemm.py --skip-xla --no-write \
    --shapes ${SWEEP_SHAPES:-4096x7168x16384} 2>&1 | grep -E "\] ours|Error|error" | sed "s/^/$cfg /"
done
for cfg in ${SWEEP_KG_CONFIGS:-}; do
  JAX_DEEPGEMM_K_GROUPED_CONFIG=$cfg python3 benchmarks/bench_k_grouped.py --skip-baseline \
    --no-write 2>&1 | grep -E "\] ours|Error|error" | sed "s/^/$cfg /"
done
