// Declarations shared between the CUDA translation unit (which defines the
// XLA FFI handlers) and the nanobind module (which must stay CUDA-free).
#pragma once

#include <cstdint>
#include <string>

#include "xla/ffi/api/api.h"

// Typed-FFI handler for the custom call target "jax_deepgemm_fp8_gemm_nt".
XLA_FFI_DECLARE_HANDLER_SYMBOL(Fp8GemmNt);

namespace jax_deepgemm {

// Kernel configuration that Fp8GemmNt would use for an (M, N, K) problem,
// formatted as "block_m=128,block_n=128,stages=6". Honors the environment
// variable JAX_DEEPGEMM_GEMM_CONFIG. Returns false (and sets *error) if the
// problem or the forced configuration is invalid.
// One-time host setup for every Hopper device (shared-memory limits, driver
// entry points, SM counts). Call before the first launch: these calls are not
// allowed while XLA captures a command buffer (CUDA graph).
bool InitializeDevices(std::string* error);

// "block_m=..,block_n=..,stages=..; ..." for every dense config that is built.
std::string SupportedGemmConfigs();

bool GemmConfigString(int64_t m, int64_t n, int64_t k, std::string* config,
                      std::string* error);

}  // namespace jax_deepgemm
