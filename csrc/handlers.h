// Declarations shared between the CUDA translation unit (which defines the
// XLA FFI handlers) and the nanobind module (which must stay CUDA-free).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "xla/ffi/api/api.h"

// Typed-FFI handler for the custom call target "jax_deepgemm_fp8_gemm_nt".
XLA_FFI_DECLARE_HANDLER_SYMBOL(Fp8GemmNt);
// "jax_deepgemm_m_grouped_fp8_gemm_nt" (contiguous and masked MoE layouts).
XLA_FFI_DECLARE_HANDLER_SYMBOL(MGroupedFp8GemmNt);
// "jax_deepgemm_m_grouped_fp8_gemm_nt_into": the same into an aliased buffer whose rows in no
// group stay as they are (the masked op's `out`).
XLA_FFI_DECLARE_HANDLER_SYMBOL(MGroupedFp8GemmNtInto);
// "jax_deepgemm_k_grouped_fp8_gemm_tn" (MoE weight gradient).
XLA_FFI_DECLARE_HANDLER_SYMBOL(KGroupedFp8GemmTn);

// Typed-FFI handlers of the FP8 quantization kernels (quant_ffi.cu):
// "jax_deepgemm_per_token_cast", "jax_deepgemm_per_block_cast",
// "jax_deepgemm_per_block_dual_cast", "jax_deepgemm_token_axis_cast",
// "jax_deepgemm_dual_cast", "jax_deepgemm_gathered_dual_cast".
XLA_FFI_DECLARE_HANDLER_SYMBOL(PerTokenCastFp8);
XLA_FFI_DECLARE_HANDLER_SYMBOL(PerBlockCastFp8);
XLA_FFI_DECLARE_HANDLER_SYMBOL(PerBlockDualCastFp8);
XLA_FFI_DECLARE_HANDLER_SYMBOL(TokenAxisCastFp8);
XLA_FFI_DECLARE_HANDLER_SYMBOL(DualCastFp8);
XLA_FFI_DECLARE_HANDLER_SYMBOL(GatheredDualCastFp8);

namespace jax_deepgemm {

// One-time host setup of the given CUDA devices (shared-memory limits, driver
// entry points, SM counts); non-Hopper devices are skipped. Call before the
// first launch: these calls are not allowed while XLA captures a command
// buffer (CUDA graph).
bool InitializeDevices(const std::vector<int>& devices, std::string* error);

// "block_m=..,block_n=..,stages=..; ..." for every dense / grouped config that is built.
std::string SupportedGemmConfigs();
std::string SupportedGroupedGemmConfigs();

// Kernel configuration that the dense (groups == 0) or M-grouped kernel would
// use for a problem of M rows in all, formatted as
// "block_m=128,block_n=128,stages=6" (masked: the masked layout, `groups` groups
// of M expected rows each). Honors the environment variable
// JAX_DEEPGEMM_GEMM_CONFIG. Returns false (and sets *error) if the problem or
// the forced configuration is invalid.
// f32_out: a float32 output (implied by accumulate).
bool GemmConfigString(int64_t m, int64_t n, int64_t k, int64_t groups, bool accumulate,
                      bool f32_out, bool masked, std::string* config, std::string* error);

// Tile of the K-grouped (wgrad) kernel for G groups and an [N, K] output,
// e.g. "block_m=192,block_n=128,stages=5". Honors JAX_DEEPGEMM_K_GROUPED_CONFIG.
bool KGroupedConfigString(int64_t groups, int64_t n, int64_t k, std::string* config,
                          std::string* error);

}  // namespace jax_deepgemm
