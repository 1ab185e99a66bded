// Host-side construction of TMA descriptors (CUtensorMap).
// cuTensorMapEncodeTiled is resolved at run time through the CUDA runtime's
// driver entry point query, so we never link against libcuda.
#pragma once

#include <cstdint>
#include <cstring>

#include <cuda.h>          // types only
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled_v12000
#include <cuda_runtime_api.h>

namespace jax_deepgemm::tma {

using EncodeTiledFn = PFN_cuTensorMapEncodeTiled_v12000;

// Returns nullptr if the driver does not provide the entry point.
inline EncodeTiledFn get_encode_tiled() {
  static EncodeTiledFn fn = []() -> EncodeTiledFn {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult status = cudaDriverEntryPointSymbolNotFound;
    const cudaError_t err = cudaGetDriverEntryPointByVersion(
        "cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &status);
    if (err != cudaSuccess || status != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();  // do not leave a sticky-looking error behind
      return nullptr;
    }
    return reinterpret_cast<EncodeTiledFn>(ptr);
  }();
  return fn;
}

// 2D row-major tensor [rows, cols] (cols contiguous) with a
// [box_rows, box_cols] box. Out-of-bounds elements are filled with zeros
// (CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE). Returns a CUresult (CUDA_SUCCESS = 0).
inline CUresult make_2d_tiled(CUtensorMap* map, CUtensorMapDataType dtype,
                              uint32_t elem_bytes, const void* base,
                              uint64_t rows, uint64_t cols, uint32_t box_rows,
                              uint32_t box_cols, CUtensorMapSwizzle swizzle) {
  EncodeTiledFn encode = get_encode_tiled();
  if (encode == nullptr) return CUDA_ERROR_NOT_FOUND;
  std::memset(map, 0, sizeof(*map));
  const cuuint64_t global_dim[2] = {cols, rows};              // innermost first
  const cuuint64_t global_stride[1] = {cols * elem_bytes};    // bytes, dim 1
  const cuuint32_t box_dim[2] = {box_cols, box_rows};
  const cuuint32_t elem_stride[2] = {1, 1};
  return encode(map, dtype, 2, const_cast<void*>(base), global_dim,
                global_stride, box_dim, elem_stride,
                CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
}

}  // namespace jax_deepgemm::tma
