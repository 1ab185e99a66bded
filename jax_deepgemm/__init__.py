"""jax_deepgemm: DeepSeek-style FP8 GEMMs (1x128 / 128x128 scales) for JAX on Hopper."""
from jax_deepgemm._ffi import (export_safety_checks, extension_built, gemm_config,
                               k_grouped_config, use_kernels)
from jax_deepgemm.gemm import fp8_gemm_nt
from jax_deepgemm.grouped_contiguous import m_grouped_fp8_gemm_nt_contiguous
from jax_deepgemm.grouped_masked import m_grouped_fp8_gemm_nt_masked
from jax_deepgemm.k_grouped import k_grouped_fp8_gemm_tn_contiguous
from jax_deepgemm.linear import (FP8_RESIDUALS, Fp8Weight, fp8_grouped_linear, fp8_linear,
                                 quantize_weight)
from jax_deepgemm import sharding as _sharding  # noqa: F401  (installs the partitioning rules)
from jax_deepgemm.quant import (dequantize_per_block, dequantize_per_token,
                                per_block_cast_to_fp8, per_block_cast_to_fp8_and_transpose,
                                per_token_cast_to_fp8,
                                per_token_cast_to_fp8_and_transpose,
                                per_token_cast_transpose_to_fp8)

__version__ = "0.1.0"

__all__ = [
    "per_token_cast_to_fp8", "per_token_cast_transpose_to_fp8",
    "per_token_cast_to_fp8_and_transpose", "per_block_cast_to_fp8",
    "per_block_cast_to_fp8_and_transpose",
    "dequantize_per_token",
    "dequantize_per_block", "fp8_gemm_nt", "m_grouped_fp8_gemm_nt_contiguous",
    "m_grouped_fp8_gemm_nt_masked", "k_grouped_fp8_gemm_tn_contiguous", "extension_built",
    "use_kernels", "export_safety_checks", "gemm_config", "k_grouped_config", "fp8_linear",
    "fp8_grouped_linear", "FP8_RESIDUALS", "quantize_weight", "Fp8Weight",
]
