// Host helpers shared by the FFI handlers (quant_ffi.cu, fp8_gemm_ffi.cu).
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>

#include <cuda_runtime.h>

namespace jax_deepgemm {

// "[d0, d1, ...]" for error messages.
template <typename Dims>
std::string DimsString(const Dims& dims) {
  std::string s = "[";
  bool first = true;
  for (int64_t d : dims) {
    if (!first) s += ", ";
    s += std::to_string(d);
    first = false;
  }
  return s + "]";
}

template <typename Buffer>
std::string Dims(const Buffer& buf) {
  return DimsString(buf.dimensions());
}

inline std::string Dims(std::initializer_list<int64_t> dims) { return DimsString(dims); }

inline bool Aligned(const void* p, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// Makes `device` current and restores the calling thread's previous device on
// scope exit (kernels launch on the current device).
class ScopedDevice {
 public:
  explicit ScopedDevice(int device) {
    if (cudaGetDevice(&prev_) != cudaSuccess) {
      (void)cudaGetLastError();
      prev_ = -1;
    }
    if (prev_ != device) {
      ok_ = cudaSetDevice(device) == cudaSuccess;
      switched_ = ok_;
    }
  }
  ~ScopedDevice() {
    if (switched_ && prev_ >= 0) (void)cudaSetDevice(prev_);
  }
  ScopedDevice(const ScopedDevice&) = delete;
  ScopedDevice& operator=(const ScopedDevice&) = delete;
  bool ok() const { return ok_; }

 private:
  int prev_ = -1;
  bool ok_ = true;
  bool switched_ = false;
};

}  // namespace jax_deepgemm
