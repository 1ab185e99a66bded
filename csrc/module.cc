// nanobind extension module `jax_deepgemm._C` (no CUDA code in this TU).
#include <cstdint>
#include <string>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "handlers.h"

namespace nb = nanobind;

NB_MODULE(_C, m) {
  m.doc() = "jax_deepgemm CUDA extension (XLA FFI handlers, sm_90a)";

  m.def(
      "registrations",
      []() {
        nb::dict d;
        d["jax_deepgemm_fp8_gemm_nt"] =
            nb::capsule(reinterpret_cast<void*>(&Fp8GemmNt));
        d["jax_deepgemm_per_token_cast"] =
            nb::capsule(reinterpret_cast<void*>(&PerTokenCastFp8));
        d["jax_deepgemm_per_block_cast"] =
            nb::capsule(reinterpret_cast<void*>(&PerBlockCastFp8));
        d["jax_deepgemm_per_block_dual_cast"] =
            nb::capsule(reinterpret_cast<void*>(&PerBlockDualCastFp8));
        d["jax_deepgemm_token_axis_cast"] =
            nb::capsule(reinterpret_cast<void*>(&TokenAxisCastFp8));
        d["jax_deepgemm_dual_cast"] =
            nb::capsule(reinterpret_cast<void*>(&DualCastFp8));
        d["jax_deepgemm_gathered_dual_cast"] =
            nb::capsule(reinterpret_cast<void*>(&GatheredDualCastFp8));
        d["jax_deepgemm_m_grouped_fp8_gemm_nt"] =
            nb::capsule(reinterpret_cast<void*>(&MGroupedFp8GemmNt));
        d["jax_deepgemm_m_grouped_fp8_gemm_nt_into"] =
            nb::capsule(reinterpret_cast<void*>(&MGroupedFp8GemmNtInto));
        d["jax_deepgemm_k_grouped_fp8_gemm_tn"] =
            nb::capsule(reinterpret_cast<void*>(&KGroupedFp8GemmTn));
        return d;
      },
      "Dict of XLA FFI target name -> handler capsule (platform CUDA).");

  m.def(
      "gemm_config",
      [](int64_t m_, int64_t n_, int64_t k_, int64_t groups, bool accumulate, bool masked,
         bool f32_out) {
        std::string config, error;
        if (!jax_deepgemm::GemmConfigString(m_, n_, k_, groups, accumulate, f32_out, masked,
                                            &config, &error)) {
          throw nb::value_error(error.c_str());
        }
        return config;
      },
      nb::arg("m"), nb::arg("n"), nb::arg("k"), nb::arg("groups") = 0,
      nb::arg("accumulate") = false, nb::arg("masked") = false, nb::arg("f32_out") = false,
      "Kernel configuration chosen for an (M, N, K) problem (groups > 0: the M-grouped "
      "kernel, M rows in all, or with masked, M expected rows per group of the masked "
      "layout; accumulate: the dense GEMM with c; f32_out: a float32 output), e.g. "
      "'block_m=128,block_n=128,stages=6' (honors JAX_DEEPGEMM_GEMM_CONFIG).");

  m.def(
      "k_grouped_config",
      [](int64_t groups, int64_t n_, int64_t k_) {
        std::string config, error;
        if (!jax_deepgemm::KGroupedConfigString(groups, n_, k_, &config, &error)) {
          throw nb::value_error(error.c_str());
        }
        return config;
      },
      nb::arg("groups"), nb::arg("n"), nb::arg("k"),
      "Tile chosen for the K-grouped wgrad GEMM with an [groups, N, K] output (honors "
      "JAX_DEEPGEMM_K_GROUPED_CONFIG).");

  m.def(
      "initialize",
      [](const std::vector<int>& devices) {
        std::string error;
        if (!jax_deepgemm::InitializeDevices(devices, &error)) {
          throw nb::value_error(error.c_str());
        }
      },
      nb::arg("devices"),
      "One-time setup of the given CUDA devices (ordinals); call before the first kernel runs.");

  m.def(
      "supported_gemm_configs", []() { return jax_deepgemm::SupportedGemmConfigs(); },
      "Every dense-GEMM config that is built, '; '-separated (JAX_DEEPGEMM_GEMM_CONFIG values).");

  m.def(
      "supported_grouped_gemm_configs",
      []() { return jax_deepgemm::SupportedGroupedGemmConfigs(); },
      "Every M-grouped GEMM config that is built, '; '-separated.");

  m.def(
      "built_for", []() { return std::string("sm_90a"); },
      "CUDA architecture the kernels were compiled for.");
}
