// Host-side helpers shared by the FFI handlers (*_ffi.cu).
#pragma once

#include <cstdint>
#include <string>

#include <cuda_runtime.h>

namespace jax_deepgemm {

// "[d0, d1, ...]" of an ffi buffer, for error messages.
template <typename Buffer>
std::string Dims(const Buffer& buf) {
  std::string s = "[";
  bool first = true;
  for (int64_t d : buf.dimensions()) {
    if (!first) s += ", ";
    s += std::to_string(d);
    first = false;
  }
  return s + "]";
}

inline bool Aligned(const void* p, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// Makes `device` current and restores the calling thread's device on scope
// exit (kernels launch on the current device; the stream belongs to `device`).
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
