// Is the dense mainloop bound by shared-memory bandwidth? FP8 wgmmas with both operands in
// shared memory (SS), issued back to back by W math warpgroups in one CTA per SM, with and
// without a producer warp writing bytes into shared memory (cp.async.bulk from L2) at a GEMM
// tile's pace: one stage per k-block, released when that k-block's wgmmas are done.
//
// A "k-block" is what a tile's math warpgroup issues per 128-deep K block: 4 x k32 wgmmas of
// width N for each of BN / N column groups of B (BN 256, N 128: the 128x256 split loop's two
// halves; BN 256, N 256: one m64n256 per k32; BN 128, N 128: the 128x128 tile). Nothing is
// promoted: the accumulators take the wgmmas in place. Per k-block and warpgroup the wgmmas
// read (BN / N) x (8 KB of A) + BN x 128 B of B; a 128 x BN tile's TMA writes
// (128 + BN) x 128 B per k-block (the fill to pass for the GEMM's pace: 48 KB at BN 256,
// 32 KB at BN 128). Model: at 128 B per clock, 2 warpgroups, BN 256: N 128 reads 96 KB + 48
// written per 1024 tensor clocks (89% of peak at best), N 256 80 + 48 (100%).
//
//   nvcc -std=c++17 -O2 -gencode=arch=compute_90a,code=sm_90a -Icsrc -Ibenchmarks \
//        -o /tmp/wsb benchmarks/wgmma_smem_bench.cu && /tmp/wsb
//
// "promote" variants run each column group as the serial loops do (128x256's split loop,
// 192x128): issue its wgmmas into one result buffer, wait, add the buffer into the
// accumulator times a scale (one FFMA per element), then the next group; the other
// warpgroups' wgmmas are all that covers each warpgroup's wait and FFMAs. Against the
// plain variant of the same shape this isolates what the loop's structure costs.
//
// Prints, per variant, FMA per clock per SM (median over CTAs, from clock64; 4096 is the
// dense FP8 peak of an H100/H200 SM) and TFLOPS from the kernel's wall time.
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <vector>

#include "common/ptx.cuh"
#include "cuda_check.h"

using namespace jax_deepgemm;

// -DWSB_STAGES=n -DWSB_MAX_FILL_KB=k: more stages of smaller fills (e.g. 5 x 32 KB), which
// tells a fill bound by L2 bandwidth (no change) from one bound by latency (faster).
#ifndef WSB_STAGES
#define WSB_STAGES 3
#endif
#ifndef WSB_MAX_FILL_KB
#define WSB_MAX_FILL_KB 48
#endif
constexpr int kStages = WSB_STAGES;
constexpr int kMaxFill = WSB_MAX_FILL_KB * 1024;  // bytes per stage

// A producer warpgroup (one thread issues) and W math warpgroups, registers moved to the
// math warpgroups with setmaxnreg as the GEMM kernels do.
template <int N, int BN, int W, bool kPromote>
__global__ void __launch_bounds__((W + 1) * 128, 1)
wgmma_smem_kernel(int iters, int fill, const uint8_t* src, size_t src_bytes,
                  long long* cycles, float* sink) {
  constexpr int kGroups = BN / N;  // column groups of B per k-block
  constexpr int kAcc = N / 2;      // floats per thread per group
  static_assert(!kPromote || N == 128, "the serial loops' wgmmas are 128 wide");
  extern __shared__ __align__(1024) uint8_t smem[];
  uint8_t* smem_a = smem;                      // W x 64 rows x 128 B
  uint8_t* smem_b = smem_a + W * 64 * 128;     // BN rows x 128 B
  uint8_t* smem_fill = smem_b + BN * 128;      // kStages x kMaxFill
  uint64_t* full = reinterpret_cast<uint64_t*>(smem_fill + kStages * kMaxFill);
  uint64_t* empty = full + kStages;
  const int thread = threadIdx.x, warp = thread / 32, lane = thread % 32;

  // Operands: bytes whose e4m3 values are small and finite (the tensor cores' power, and so
  // the clock, depend on the data; zeros would flatter them).
  for (int i = thread; i < (W * 64 + BN) * 128; i += blockDim.x) {
    smem[i] = static_cast<uint8_t>(((i * 37 + 11) % 0x38) | ((i & 64) << 1));
  }
  if (thread == 0) {
    for (int s = 0; s < kStages; ++s) {
      ptx::mbarrier_init(&full[s], 1);
      ptx::mbarrier_init(&empty[s], W * 4);  // one arrival per math warp
    }
    ptx::fence_barrier_init();
  }
  ptx::fence_proxy_async();  // the generic-proxy operand writes, before wgmma reads them
  __syncthreads();

  if (warp >= W * 4) {  // producer warpgroup
    ptx::setmaxnreg_dec<W == 3 ? 24 : 40>();
    if (fill > 0 && warp == W * 4 && lane == 0) {
      size_t offset = (static_cast<size_t>(blockIdx.x) * 7919 * 1024) % src_bytes;
      for (int kb = 0; kb < iters; ++kb) {
        const int s = kb % kStages;
        ptx::mbarrier_wait(&empty[s], ((kb / kStages) & 1) ^ 1);
        ptx::mbarrier_arrive_expect_tx(&full[s], fill);
        if (offset + fill > src_bytes) offset = 0;
        ptx::bulk_load_1d(smem_fill + s * kMaxFill, src + offset, fill, &full[s]);
        offset += fill;
      }
    }
    return;
  }
  ptx::setmaxnreg_inc<W == 3 ? 160 : 232>();
  const int wg = warp / 4;
  float acc[kGroups][kAcc];
#pragma unroll
  for (int g = 0; g < kGroups; ++g) {
#pragma unroll
    for (int i = 0; i < kAcc; ++i) acc[g][i] = 0.0f;
  }
  const uint64_t desc_a = ptx::make_smem_desc_k_sw128(smem_a + wg * 64 * 128);
  float buf[kPromote ? kAcc : 1];
  __syncwarp();
  const long long t0 = clock64();
  for (int kb = 0; kb < iters; ++kb) {
    const int s = kb % kStages;
    if (fill > 0) ptx::mbarrier_wait(&full[s], (kb / kStages) & 1);
    if constexpr (kPromote) {
      const float scale = 1.0f + static_cast<float>(kb & 7) * 0x1p-20f;
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        ptx::wgmma_k_block<N>(buf, desc_a, ptx::make_smem_desc_k_sw128(smem_b + g * N * 128));
        ptx::wgmma_wait_group<0>();
#pragma unroll
        for (int i = 0; i < kAcc; ++i) ptx::fence_operand(buf[i]);
#pragma unroll
        for (int i = 0; i < kAcc; ++i) acc[g][i] = fmaf(buf[i], scale, acc[g][i]);
#pragma unroll
        for (int i = 0; i < kAcc; ++i) ptx::fence_operand(acc[g][i]);
      }
      if (fill > 0 && lane == 0) ptx::mbarrier_arrive(&empty[s]);
    } else {
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
#pragma unroll
        for (int i = 0; i < kAcc; ++i) ptx::fence_operand(acc[g][i]);
      }
      ptx::wgmma_fence();
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        const uint64_t desc_b = ptx::make_smem_desc_k_sw128(smem_b + g * N * 128);
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          ptx::WgmmaFp8<N>::mma(acc[g], desc_a + 2 * kk, desc_b + 2 * kk, true);
        }
      }
      ptx::wgmma_commit_group();
      ptx::wgmma_wait_group<1>();  // k-block kb - 1 is done: release its stage
      if (fill > 0 && kb > 0 && lane == 0) ptx::mbarrier_arrive(&empty[(kb - 1) % kStages]);
    }
  }
  ptx::wgmma_wait_group<0>();
#pragma unroll
  for (int g = 0; g < kGroups; ++g) {
#pragma unroll
    for (int i = 0; i < kAcc; ++i) ptx::fence_operand(acc[g][i]);
  }
  const long long t1 = clock64();
  if (thread == 0) cycles[blockIdx.x] = t1 - t0;
  float sum = 0.0f;
#pragma unroll
  for (int g = 0; g < kGroups; ++g) {
#pragma unroll
    for (int i = 0; i < kAcc; ++i) sum += acc[g][i];
  }
  if (sum == 12345.678f) sink[thread] = sum;  // keeps the wgmmas
}

template <int N, int BN, int W, bool kPromote = false>
static void run(int num_sms, int fill, const uint8_t* src, size_t src_bytes, long long* d_cycles,
                float* sink) {
  auto* kernel = &wgmma_smem_kernel<N, BN, W, kPromote>;
  const int smem = W * 64 * 128 + BN * 128 + kStages * kMaxFill + 2 * kStages * 8;
  CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const int iters = 4000;
  const int threads = (W + 1) * 128;
  for (int rep = 0; rep < 2; ++rep) {
    kernel<<<num_sms, threads, smem>>>(iters, fill, src, src_bytes, d_cycles, sink);
  }
  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  CHECK(cudaEventRecord(e0));
  kernel<<<num_sms, threads, smem>>>(iters, fill, src, src_bytes, d_cycles, sink);
  CHECK(cudaEventRecord(e1));
  CHECK(cudaEventSynchronize(e1));
  CHECK(cudaGetLastError());
  float ms = 0;
  CHECK(cudaEventElapsedTime(&ms, e0, e1));
  std::vector<long long> cyc(num_sms);
  CHECK(cudaMemcpy(cyc.data(), d_cycles, num_sms * sizeof(long long), cudaMemcpyDeviceToHost));
  std::sort(cyc.begin(), cyc.end());
  const double fma_per_cta = static_cast<double>(iters) * W * 64.0 * BN * 128.0;
  std::printf("N %3d  BN %3d  W %d %-7s fill %5d B/k-block: %6.0f FMA/clk/SM (%4.1f%% of 4096), "
              "%6.0f TFLOPS, wgmma smem reads %3.0f + fill %3.0f B/clk\n",
              N, BN, W, kPromote ? "promote" : "plain", fill, fma_per_cta / cyc[num_sms / 2],
              100.0 * fma_per_cta / cyc[num_sms / 2] / 4096,
              2.0 * fma_per_cta * num_sms / (ms * 1e-3) * 1e-12,
              static_cast<double>(iters) * W * (BN / N) * (8192 + N * 128) / cyc[num_sms / 2],
              static_cast<double>(iters) * fill / cyc[num_sms / 2]);
  CHECK(cudaEventDestroy(e0));
  CHECK(cudaEventDestroy(e1));
}

int main() {
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  const int num_sms = prop.multiProcessorCount;
  std::printf("# %s, %d SMs; one CTA per SM, 4000 k-blocks each\n", prop.name, num_sms);
  const size_t src_bytes = size_t{16} << 20;  // L2-resident, as most of a GEMM's loads
  uint8_t* src = nullptr;
  long long* d_cycles = nullptr;
  float* sink = nullptr;
  CHECK(cudaMalloc(&src, src_bytes));
  CHECK(cudaMemset(src, 0x11, src_bytes));
  CHECK(cudaMalloc(&d_cycles, num_sms * sizeof(long long)));
  CHECK(cudaMalloc(&sink, 1024 * sizeof(float)));
  std::printf("# %d stages of at most %d KB\n", kStages, kMaxFill / 1024);
  for (int fill : {0, 32 * 1024, 48 * 1024}) {
    if (fill > kMaxFill) continue;
    run<128, 256, 2>(num_sms, fill, src, src_bytes, d_cycles, sink);  // 128x256 split loop
    run<256, 256, 2>(num_sms, fill, src, src_bytes, d_cycles, sink);  // m64n256
    run<128, 128, 2>(num_sms, fill, src, src_bytes, d_cycles, sink);  // 128x128
    run<128, 128, 3>(num_sms, fill, src, src_bytes, d_cycles, sink);  // 192x128
    run<128, 256, 2, true>(num_sms, fill, src, src_bytes, d_cycles, sink);  // the split loop
    run<128, 128, 3, true>(num_sms, fill, src, src_bytes, d_cycles, sink);  // 192x128's loop
  }
  CHECK(cudaFree(src));
  CHECK(cudaFree(d_cycles));
  CHECK(cudaFree(sink));
  return 0;
}
