// nanobind extension module `jax_deepgemm._C` (no CUDA code in this TU).
#include <cstdint>
#include <string>

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

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
        return d;
      },
      "Dict of XLA FFI target name -> handler capsule (platform CUDA).");

  m.def(
      "gemm_config",
      [](int64_t m_, int64_t n_, int64_t k_) {
        std::string config, error;
        if (!jax_deepgemm::GemmConfigString(m_, n_, k_, &config, &error)) {
          throw nb::value_error(error.c_str());
        }
        return config;
      },
      nb::arg("m"), nb::arg("n"), nb::arg("k"),
      "Kernel configuration chosen for an (M, N, K) problem, e.g. "
      "'block_m=128,block_n=128,stages=6' (honors JAX_DEEPGEMM_GEMM_CONFIG).");

  m.def(
      "initialize",
      []() {
        std::string error;
        if (!jax_deepgemm::InitializeDevices(&error)) throw nb::value_error(error.c_str());
      },
      "One-time setup of every Hopper device; call before the first kernel runs.");

  m.def(
      "supported_gemm_configs", []() { return jax_deepgemm::SupportedGemmConfigs(); },
      "Every dense-GEMM config that is built, '; '-separated (JAX_DEEPGEMM_GEMM_CONFIG values).");

  m.def(
      "built_for", []() { return std::string("sm_90a"); },
      "CUDA architecture the kernels were compiled for.");
}
