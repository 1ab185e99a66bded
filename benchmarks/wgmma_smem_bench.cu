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
// "mcast M": launched in clusters of 2, M bytes of each k-block's fill are shared by the
// pair (a 128x256 tile pair along N shares its 16 KB of A): each CTA loads half of them and
// multicasts it to both, so a CTA still receives the whole fill but the pair reads M fewer
// bytes from L2. Each stage is released to a producer only when both CTAs' math warps are
// done with it. Against "mcast 0" this tells an L2-bound fill (faster) from an SM-bound one.
//
// "rescale" (BN 256): one m64n256 per k32 into the accumulator in place, which holds the sum
// divided by the current k-block's scale: after each k-block's wgmmas, wait, multiply the
// accumulator by (old scale / new scale) per row and 128 columns, issue the next. It reads A
// once per k-block (the split loop twice) with no second 128-register buffer.
//
// `wsb` runs the fill sizes 0 / 32 / 48 KB; `wsb mcast` the 48 KB (and 192x128's 40 KB) fill
// with 0 / 16 / 32 / 48 KB of it multicast.
//
// Prints, per variant, FMA per clock per SM (median over CTAs, from clock64; 4096 is the
// dense FP8 peak of an H100/H200 SM) and TFLOPS from the kernel's wall time.
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <string>
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

// bulk_load_1d to the same offset in both CTAs of a 2-CTA cluster (each one's `bar` gets
// the complete_tx).
__device__ __forceinline__ void bulk_load_1d_multicast(void* smem_dst, const void* src,
                                                       uint32_t bytes, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
      " [%0], [%1], %2, [%3], %4;" ::"r"(ptx::smem_addr(smem_dst)),
      "l"(reinterpret_cast<uint64_t>(src)), "r"(bytes), "r"(ptx::smem_addr(bar)),
      "h"(static_cast<uint16_t>(0x3))
      : "memory");
}

// "rs" (the split loop, A from registers): A's 64 x 128 bytes of the k-block are read from
// shared memory once per warpgroup (4 ldmatrix.x4 per thread, 8 KB) into the register fragments
// of 4 k32 steps, which both 128-wide halves' wgmmas take (the SS loop reads A per half: twice).
// The addresses follow the 128B swizzle (16-byte chunk c of row r at r * 128 + ((c ^ r % 8) * 16)),
// conflict-free. Lanes 0-7 / 8-15 / 16-23 / 24-31 address rows 0-7 / 8-15 / 0-7 / 8-15 of the
// warp's 16 at k 0-15 / 0-15 / 16-31 / 16-31: the e4m3 A fragment's a0..a3, so a kernel could
// take the same loads.
__device__ __forceinline__ void load_a_fragment(uint32_t (&a)[4], const uint8_t* smem_a, int kk,
                                                int lane, int warp_in_wg) {
  const int row = warp_in_wg * 16 + (lane % 16);
  const int chunk = kk * 2 + lane / 16;
  const uint32_t addr = ptx::smem_addr(smem_a + row * 128 + ((chunk ^ (row % 8)) * 16));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
               : "r"(addr));
}

// D[64 x 128] (+)= A[64 x 32] (e4m3, registers) * B[128 x 32]^T (e4m3, smem desc).
__device__ __forceinline__ void wgmma_rs_n128(float (&d)[64], const uint32_t (&a)[4],
                                              uint64_t desc_b, bool scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "{%64, %65, %66, %67}, %68, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),
        "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]),
        "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]),
        "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]),
        "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]),
        "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]),
        "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(static_cast<int32_t>(scale_d)));
}

// A producer warpgroup (one thread issues) and W math warpgroups, registers moved to the
// math warpgroups with setmaxnreg as the GEMM kernels do.
template <int N, int BN, int W, bool kPromote, bool kRescale, bool kRS = false>
__global__ void __launch_bounds__((W + 1) * 128, 1)
wgmma_smem_kernel(int iters, int fill, int mcast, const uint8_t* src, size_t src_bytes,
                  long long* cycles, float* sink) {
  constexpr int kGroups = BN / N;  // column groups of B per k-block
  constexpr int kAcc = N / 2;      // floats per thread per group
  static_assert(!kPromote || N == 128, "the serial loops' wgmmas are 128 wide");
  static_assert(!kRescale || (N == 256 && BN == 256 && !kPromote), "rescale: one m64n256 per k32");
  static_assert(!kRS || (N == 128 && kPromote), "rs: the split loop with A from registers");
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
      ptx::mbarrier_init(&empty[s], W * 4 * (mcast > 0 ? 2 : 1));  // per math warp (of the pair)
    }
    ptx::fence_barrier_init();
  }
  ptx::fence_proxy_async();  // the generic-proxy operand writes, before wgmma reads them
  if (mcast > 0) {
    ptx::cluster_sync();  // the peer's barriers are initialised before anything arrives on them
  } else {
    __syncthreads();
  }
  const uint32_t rank = mcast > 0 ? ptx::cluster_ctarank() : 0;
  // The stage's release: on this CTA's empty barrier, and on the peer's (it multicasts here).
  auto release = [&](int s) {
    if (mcast > 0) {
      if (lane < 2) ptx::mbarrier_arrive_cluster(&empty[s], lane);
    } else if (lane == 0) {
      ptx::mbarrier_arrive(&empty[s]);
    }
  };

  if (warp >= W * 4) {  // producer warpgroup
    ptx::setmaxnreg_dec<W == 3 ? 24 : 40>();
    if (fill > 0 && warp == W * 4 && lane == 0) {
      // The pair's shared bytes come from the same place: offsets by cluster when multicasting.
      const size_t who = mcast > 0 ? blockIdx.x / 2 : blockIdx.x;
      size_t offset = (who * 7919 * 1024) % src_bytes;
      size_t own = (static_cast<size_t>(blockIdx.x) * 6007 * 1024) % src_bytes;
      const int half = mcast / 2, priv = fill - mcast;
      for (int kb = 0; kb < iters; ++kb) {
        const int s = kb % kStages;
        uint8_t* dst = smem_fill + s * kMaxFill;
        ptx::mbarrier_wait(&empty[s], ((kb / kStages) & 1) ^ 1);
        ptx::mbarrier_arrive_expect_tx(&full[s], fill);
        if (mcast > 0) {
          if (offset + mcast > src_bytes) offset = 0;
          if (own + priv > src_bytes) own = 0;
          bulk_load_1d_multicast(dst + rank * half, src + offset + rank * half, half, &full[s]);
          if (priv > 0) ptx::bulk_load_1d(dst + mcast, src + own, priv, &full[s]);
          offset += mcast;
          own += priv;
        } else {
          if (offset + fill > src_bytes) offset = 0;
          ptx::bulk_load_1d(dst, src + offset, fill, &full[s]);
          offset += fill;
        }
      }
    }
    if (mcast > 0) ptx::cluster_sync();  // the peer still arrives here and writes into us
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
    if constexpr (kRescale) {
      // acc holds the sum over k-blocks so far divided by this k-block's scale: wait for the
      // last k-block, multiply acc by (last scale / this scale) per row and per 128 columns
      // (B's scale blocks), then the wgmmas add this k-block into acc in place.
      ptx::wgmma_wait_group<0>();
#pragma unroll
      for (int i = 0; i < kAcc; ++i) ptx::fence_operand(acc[0][i]);
      if (fill > 0 && kb > 0) release((kb - 1) % kStages);
      const float base = 1.0f + static_cast<float>(kb & 7) * 0x1p-20f;
      const float r00 = base, r01 = base * 0.99999f, r10 = base * 1.00001f, r11 = base * 0.99998f;
#pragma unroll
      for (int i = 0; i < kAcc; ++i) {
        acc[0][i] *= (i & 2) ? (i < kAcc / 2 ? r10 : r11) : (i < kAcc / 2 ? r00 : r01);
      }
#pragma unroll
      for (int i = 0; i < kAcc; ++i) ptx::fence_operand(acc[0][i]);
      ptx::wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        ptx::WgmmaFp8<N>::mma(acc[0], desc_a + 2 * kk, ptx::make_smem_desc_k_sw128(smem_b) + 2 * kk,
                              true);
      }
      ptx::wgmma_commit_group();
    } else if constexpr (kPromote) {
      const float scale = 1.0f + static_cast<float>(kb & 7) * 0x1p-20f;
      uint32_t a_frag[kRS ? 4 : 1][4];  // A's k32 fragments, read once for both halves
      if constexpr (kRS) {
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) load_a_fragment(a_frag[kk], smem_a + wg * 64 * 128, kk, lane, warp % 4);
      }
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        if constexpr (kRS) {
          const uint64_t desc_b = ptx::make_smem_desc_k_sw128(smem_b + g * N * 128);
#pragma unroll
          for (int i = 0; i < kAcc; ++i) ptx::fence_operand(buf[i]);
          ptx::wgmma_fence();
#pragma unroll
          for (int kk = 0; kk < 4; ++kk) wgmma_rs_n128(buf, a_frag[kk], desc_b + 2 * kk, kk > 0);
          ptx::wgmma_commit_group();
        } else {
          ptx::wgmma_k_block<N>(buf, desc_a, ptx::make_smem_desc_k_sw128(smem_b + g * N * 128));
        }
        ptx::wgmma_wait_group<0>();
#pragma unroll
        for (int i = 0; i < kAcc; ++i) ptx::fence_operand(buf[i]);
#pragma unroll
        for (int i = 0; i < kAcc; ++i) acc[g][i] = fmaf(buf[i], scale, acc[g][i]);
#pragma unroll
        for (int i = 0; i < kAcc; ++i) ptx::fence_operand(acc[g][i]);
      }
      if (fill > 0) release(s);
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
      if (fill > 0 && kb > 0) release((kb - 1) % kStages);
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
  if (mcast > 0) ptx::cluster_sync();
  float sum = 0.0f;
#pragma unroll
  for (int g = 0; g < kGroups; ++g) {
#pragma unroll
    for (int i = 0; i < kAcc; ++i) sum += acc[g][i];
  }
  if (sum == 12345.678f) sink[thread] = sum;  // keeps the wgmmas
}

template <int N, int BN, int W, bool kPromote = false, bool kRescale = false, bool kRS = false>
static void run(int num_sms, int fill, int mcast, const uint8_t* src, size_t src_bytes, long long* d_cycles,
                float* sink) {
  auto* kernel = &wgmma_smem_kernel<N, BN, W, kPromote, kRescale, kRS>;
  const int smem = W * 64 * 128 + BN * 128 + kStages * kMaxFill + 2 * kStages * 8;
  CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const int iters = 4000;
  const int threads = (W + 1) * 128;
  const int grid = mcast > 0 ? num_sms / 2 * 2 : num_sms;
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = 2;
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(grid);
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = smem;
  config.attrs = &attr;
  config.numAttrs = mcast > 0 ? 1 : 0;
  auto launch = [&] {
    CHECK(cudaLaunchKernelEx(&config, kernel, iters, fill, mcast, src, src_bytes, d_cycles, sink));
  };
  for (int rep = 0; rep < 2; ++rep) launch();
  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  CHECK(cudaEventRecord(e0));
  launch();
  CHECK(cudaEventRecord(e1));
  CHECK(cudaEventSynchronize(e1));
  CHECK(cudaGetLastError());
  float ms = 0;
  CHECK(cudaEventElapsedTime(&ms, e0, e1));
  std::vector<long long> cyc(grid);
  CHECK(cudaMemcpy(cyc.data(), d_cycles, grid * sizeof(long long), cudaMemcpyDeviceToHost));
  std::sort(cyc.begin(), cyc.end());
  const double fma_per_cta = static_cast<double>(iters) * W * 64.0 * BN * 128.0;
  const double med = cyc[grid / 2];
  std::printf("N %3d  BN %3d  W %d %-7s fill %5d B/k-block mcast %5d: %6.0f FMA/clk/SM (%4.1f%% of 4096), "
              "%6.0f TFLOPS, wgmma smem reads %3.0f + fill %3.0f B/clk\n",
              N, BN, W, kRescale ? "rescale" : kRS ? "rs" : kPromote ? "promote" : "plain", fill, mcast, fma_per_cta / med,
              100.0 * fma_per_cta / med / 4096, 2.0 * fma_per_cta * grid / (ms * 1e-3) * 1e-12,
              static_cast<double>(iters) * W * (BN / N) * (8192 + N * 128) / med,
              static_cast<double>(iters) * fill / med);
  CHECK(cudaEventDestroy(e0));
  CHECK(cudaEventDestroy(e1));
}

int main(int argc, char** argv) {
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
  if (argc > 1 && std::string(argv[1]) == "mcast") {  // 128x256's 48 KB, part shared by a pair
    for (int mcast : {0, 16 * 1024, 32 * 1024, 48 * 1024}) {
      run<128, 256, 2>(num_sms, 48 * 1024, mcast, src, src_bytes, d_cycles, sink);
      run<256, 256, 2>(num_sms, 48 * 1024, mcast, src, src_bytes, d_cycles, sink);
      run<128, 256, 2, true>(num_sms, 48 * 1024, mcast, src, src_bytes, d_cycles, sink);
      run<256, 256, 2, false, true>(num_sms, 48 * 1024, mcast, src, src_bytes, d_cycles, sink);
      run<128, 256, 2, true, false, true>(num_sms, 48 * 1024, mcast, src, src_bytes, d_cycles, sink);
    }
    for (int mcast : {0, 16 * 1024, 24 * 1024}) {  // 192x128's 40 KB, B (16 KB) or A's half
      run<128, 128, 3, true>(num_sms, 40 * 1024, mcast, src, src_bytes, d_cycles, sink);
    }
  } else {
    for (int fill : {0, 32 * 1024, 48 * 1024}) {
      if (fill > kMaxFill) continue;
      run<128, 256, 2>(num_sms, fill, 0, src, src_bytes, d_cycles, sink);  // 128x256 split loop
      run<256, 256, 2>(num_sms, fill, 0, src, src_bytes, d_cycles, sink);  // m64n256
      run<128, 128, 2>(num_sms, fill, 0, src, src_bytes, d_cycles, sink);  // 128x128
      run<128, 128, 3>(num_sms, fill, 0, src, src_bytes, d_cycles, sink);  // 192x128
      run<128, 256, 2, true>(num_sms, fill, 0, src, src_bytes, d_cycles, sink);  // the split loop
      run<128, 128, 3, true>(num_sms, fill, 0, src, src_bytes, d_cycles, sink);  // 192x128's loop
      run<256, 256, 2, false, true>(num_sms, fill, 0, src, src_bytes, d_cycles, sink);  // rescale
      run<128, 256, 2, true, false, true>(num_sms, fill, 0, src, src_bytes, d_cycles, sink);  // rs
    }
  }
  CHECK(cudaFree(src));
  CHECK(cudaFree(d_cycles));
  CHECK(cudaFree(sink));
  return 0;
}
