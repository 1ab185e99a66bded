// Device check for kgrouped_mask_branchfree.patch (session 40): mask_tokens of a patched csrc/
// against the per-byte loop it replaces, for every group range near three token blocks.
//   nvcc -std=c++17 -O2 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a \
//     -I<patched>/csrc -o mask_check benchmarks/experiments/kgrouped_mask_check.cu && ./mask_check
// prints "bad 0" when they agree.
#include <cstdio>
#include <cstdint>
#include "kernels/k_grouped_gemm.cuh"
using namespace jax_deepgemm;
// old reference
__device__ void mask_old(uint8_t* tile, int row_begin, int row_end, int tok0, int t0, int t1, int tid, int nthreads) {
  for (int q = row_begin * 8 + tid; q < row_end * 8; q += nthreads) {
    const int row = q / 8; const int chunk = (q % 8) ^ (row % 8); const int first = tok0 + chunk * 16;
    if (first >= t0 && first + 16 <= t1) continue;
    uint4* p = reinterpret_cast<uint4*>(tile + q * 16); uint4 v = *p; uint32_t* w = reinterpret_cast<uint32_t*>(&v);
    for (int j = 0; j < 16; ++j) { const int tok = first + j; if (tok < t0 || tok >= t1) w[j / 4] &= ~(0xffu << (8 * (j % 4))); }
    *p = v;
  }
}
__global__ void k(int* bad) {
  __shared__ __align__(16) uint8_t a[8 * 128], b[8 * 128];
  int nbad = 0;
  for (int t0 = -20; t0 <= 300; t0 += 1) for (int len = 0; len <= 300; len += 7) {
    int t1 = t0 + len;
    for (int tok0 : {0, 128, 256}) {
      for (int i = threadIdx.x; i < 1024; i += blockDim.x) a[i] = b[i] = (uint8_t)(i * 37 + 11 + t0);
      __syncthreads();
      mask_old(a, 0, 8, tok0, t0, t1, threadIdx.x, blockDim.x);
      mask_tokens(b, 0, 8, tok0, t0, t1, threadIdx.x, blockDim.x);
      __syncthreads();
      for (int i = threadIdx.x; i < 1024; i += blockDim.x) nbad += a[i] != b[i];
      __syncthreads();
    }
  }
  atomicAdd(bad, nbad);
}
int main() { int* d; cudaMalloc(&d, 4); cudaMemset(d, 0, 4); k<<<1, 64>>>(d); int h = -1; cudaMemcpy(&h, d, 4, cudaMemcpyDeviceToHost); printf("bad %d (%s)\n", h, cudaGetErrorString(cudaGetLastError())); }
