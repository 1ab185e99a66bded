// Standalone timing harness for the dense FP8 kernel: A/B runs of kernel
// variants without rebuilding the Python extension or starting JAX.
// Tile via -DKB_BLOCK_M / -DKB_BLOCK_N (the most stages that fit), -DKB_MULTICAST=2
// for 2-CTA clusters; KB_STORE_MODE=0 in the environment: register-store epilogue.
//
//   nvcc -std=c++17 -O2 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a \
//        -Icsrc -o /tmp/kbench benchmarks/kernel_bench.cu [-DKB_BLOCK_N=128 ...]
//   /tmp/kbench 4096x7168x16384 4096x7168x2048 ...
//
// Per shape: the median of 20 launches, each timed alone (cudaEvent), on
// operands rotated over copies (up to 8, 256 MB or more: beyond L2 for the
// shapes of interest), and 64 sampled outputs
// checked against a float64 sum on the host (a variant that computes wrong
// results says WRONG). The max error is relative to the sum of |terms| /
// sqrt(K); bf16 rounding alone gives a few 1e-2. This times the kernel alone
// (bf16 out, no bias); the Python benchmarks time the op as JAX runs it and
// sample the SM clock; these separate launches keep it near its maximum.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "common/tma.cuh"
#include "kernels/fp8_gemm.cuh"

#ifndef KB_BLOCK_M
#define KB_BLOCK_M 128
#endif
#ifndef KB_BLOCK_N
#define KB_BLOCK_N 128
#endif
#ifndef KB_MULTICAST
#define KB_MULTICAST 1
#endif

using namespace jax_deepgemm;

#define CHECK(x)                                                              \
  do {                                                                        \
    cudaError_t e_ = (x);                                                     \
    if (e_ != cudaSuccess) {                                                  \
      std::fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e_)); \
      std::exit(1);                                                           \
    }                                                                         \
  } while (0)

static float e4m3_to_float(uint8_t v) {
  const int s = v >> 7, e = (v >> 3) & 15, m = v & 7;
  const float mag = e == 0 ? std::ldexp(static_cast<float>(m), -9)
                           : std::ldexp(1.0f + m / 8.0f, e - 7);
  return s ? -mag : mag;
}

static float bf16_to_float(__nv_bfloat16 v) {
  uint16_t u;
  std::memcpy(&u, &v, 2);
  uint32_t w = static_cast<uint32_t>(u) << 16;
  float f;
  std::memcpy(&f, &w, 4);
  return f;
}

struct Operands {
  uint8_t *a, *b;
  float *sa, *sb;
  __nv_bfloat16* out;
  CUtensorMap ta, tb, tsa, tout;
};

int main(int argc, char** argv) {
  constexpr int BM = KB_BLOCK_M, BN = KB_BLOCK_N, MC = KB_MULTICAST;
  constexpr int ST = fp8_gemm_max_stages(BM, BN);
  using L = Fp8GemmLayout<BM, BN, ST, false>;
  auto* kernel = &fp8_gemm_nt_kernel<BM, BN, ST, __nv_bfloat16, false, MC>;
  CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             L::kDynamicSmem));
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  const int num_sms = prop.multiProcessorCount;
  std::printf("# %s, %d SMs, tile %dx%d, %d stages, multicast %d\n", prop.name, num_sms, BM, BN,
              ST, MC);

  // KB_STORE_MODE=0: the epilogue stores from registers instead of through TMA.
  const char* mode_env = std::getenv("KB_STORE_MODE");
  const int store_mode = mode_env != nullptr && mode_env[0] == '0' ? kStoreRegisters : kStoreTma;
  for (int arg = 1; arg < argc; ++arg) {
    int m, n, k;
    if (std::sscanf(argv[arg], "%dx%dx%d", &m, &n, &k) != 3) continue;
    if (((n + BN - 1) / BN) % MC != 0) {  // as in the FFI: clusters pair N blocks
      std::printf("%dx%dx%d  skipped: multicast needs an even number of N blocks\n", m, n, k);
      continue;
    }
    const int kb = (k + 127) / 128, nb = (n + 127) / 128, mp = (m + 3) / 4 * 4;
    std::mt19937 rng(arg);
    std::vector<uint8_t> ha(static_cast<size_t>(m) * k), hb(static_cast<size_t>(n) * k);
    // e4m3 bytes with exponent <= 13 (no NaN), random signs.
    for (auto& x : ha) x = static_cast<uint8_t>(rng() % 0x70) | (rng() & 0x80);
    for (auto& x : hb) x = static_cast<uint8_t>(rng() % 0x70) | (rng() & 0x80);
    std::vector<float> hsa(static_cast<size_t>(kb) * mp), hsb(static_cast<size_t>(nb) * kb);
    std::uniform_real_distribution<float> u(0.5f, 2.0f);
    for (auto& x : hsa) x = u(rng) / 64;
    for (auto& x : hsb) x = u(rng) / 64;

    const size_t bytes = ha.size() + hb.size() + (hsa.size() + hsb.size()) * 4 +
                         static_cast<size_t>(m) * n * 2;
    const int copies = static_cast<int>(std::min<size_t>(8, 1 + (256u << 20) / bytes));
    std::vector<Operands> ops(copies);
    for (auto& o : ops) {
      CHECK(cudaMalloc(&o.a, ha.size()));
      CHECK(cudaMalloc(&o.b, hb.size()));
      CHECK(cudaMalloc(&o.sa, hsa.size() * 4));
      CHECK(cudaMalloc(&o.sb, hsb.size() * 4));
      CHECK(cudaMalloc(&o.out, static_cast<size_t>(m) * n * 2));
      CHECK(cudaMemcpy(o.a, ha.data(), ha.size(), cudaMemcpyHostToDevice));
      CHECK(cudaMemcpy(o.b, hb.data(), hb.size(), cudaMemcpyHostToDevice));
      CHECK(cudaMemcpy(o.sa, hsa.data(), hsa.size() * 4, cudaMemcpyHostToDevice));
      CHECK(cudaMemcpy(o.sb, hsb.data(), hsb.size() * 4, cudaMemcpyHostToDevice));
      int r = tma::make_2d_tiled(&o.ta, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, o.a, m, k, BM / MC, kBlockK,
                                 CU_TENSOR_MAP_SWIZZLE_128B);
      r |= tma::make_2d_tiled(&o.tb, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, o.b, n, k, BN, kBlockK,
                              CU_TENSOR_MAP_SWIZZLE_128B);
      r |= tma::make_2d_tiled(&o.tsa, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4, o.sa, kb, mp, 1,
                              L::kSARows, CU_TENSOR_MAP_SWIZZLE_NONE);
      r |= tma::make_2d_tiled(&o.tout, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, o.out, m, n, 64,
                              fp8_gemm_out_box_cols<__nv_bfloat16>(), CU_TENSOR_MAP_SWIZZLE_128B);
      if (r != 0) {
        std::fprintf(stderr, "tensor map failed\n");
        return 1;
      }
    }
    const int64_t tiles = static_cast<int64_t>((m + BM - 1) / BM) * ((n + BN - 1) / BN);
    // Persistent grid: whole clusters, at most one CTA per SM (the FFI also
    // caps it by cudaOccupancyMaxActiveClusters; the harness assumes they fit).
    const int grid = static_cast<int>(std::min<int64_t>(tiles / MC, num_sms / MC)) * MC;
    cudaLaunchAttribute attr;
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim.x = MC;
    attr.val.clusterDim.y = 1;
    attr.val.clusterDim.z = 1;
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(grid, 1, 1);
    config.blockDim = dim3(L::kNumThreads, 1, 1);
    config.dynamicSmemBytes = L::kDynamicSmem;
    config.attrs = &attr;
    config.numAttrs = MC > 1 ? 1 : 0;
    const GroupArgs grp{nullptr, 1, 0};
    auto launch = [&](const Operands& o) {
      CHECK(cudaLaunchKernelEx(&config, kernel, o.ta, o.tb, o.tsa, o.sb, nullptr, nullptr,
                               o.out, o.tout, store_mode, m, n, k, grp));
    };
    for (int i = 0; i < 3 * copies; ++i) launch(ops[i % copies]);
    CHECK(cudaDeviceSynchronize());
    // Each launch timed alone: short gaps between them keep the GPU below its
    // power cap, so variants compare at about the same (high) clock.
    constexpr int kIters = 20;
    std::vector<float> ms(kIters);
    cudaEvent_t e0, e1;
    CHECK(cudaEventCreate(&e0));
    CHECK(cudaEventCreate(&e1));
    for (int i = 0; i < kIters; ++i) {
      CHECK(cudaEventRecord(e0));
      launch(ops[i % copies]);
      CHECK(cudaEventRecord(e1));
      CHECK(cudaEventSynchronize(e1));
      CHECK(cudaEventElapsedTime(&ms[i], e0, e1));
    }
    CHECK(cudaGetLastError());
    CHECK(cudaEventDestroy(e0));
    CHECK(cudaEventDestroy(e1));
    std::vector<float> sorted = ms;
    std::sort(sorted.begin(), sorted.end());
    const double t = sorted[kIters / 2] * 1e-3;
    const double tflops = 2.0 * m * n * k / t * 1e-12;

    // 64 sampled outputs of copy 0 against a float64 sum.
    std::vector<__nv_bfloat16> hout(static_cast<size_t>(m) * n);
    CHECK(cudaMemcpy(hout.data(), ops[0].out, hout.size() * 2, cudaMemcpyDeviceToHost));
    double max_rel = 0;
    for (int s = 0; s < 64; ++s) {
      const int i = static_cast<int>(rng() % m), j = static_cast<int>(rng() % n);
      double ref = 0, mag = 0;
      for (int kk = 0; kk < k; ++kk) {
        const double v = static_cast<double>(e4m3_to_float(ha[static_cast<size_t>(i) * k + kk])) *
                         e4m3_to_float(hb[static_cast<size_t>(j) * k + kk]) *
                         hsa[static_cast<size_t>(kk / 128) * mp + i] *
                         hsb[static_cast<size_t>(j / 128) * kb + kk / 128];
        ref += v;
        mag += std::fabs(v);
      }
      const double got = bf16_to_float(hout[static_cast<size_t>(i) * n + j]);
      max_rel = std::max(max_rel, std::fabs(got - ref) / (mag / std::sqrt(k) + 1e-30));
    }
    std::printf("%dx%dx%d  %.1f us  %.0f TFLOPS  (min %.1f us)  err %.3g%s\n", m, n, k, t * 1e6,
                tflops, sorted[0] * 1e3, max_rel, max_rel > 0.05 ? "  WRONG" : "");
    for (auto& o : ops) {
      cudaFree(o.a);
      cudaFree(o.b);
      cudaFree(o.sa);
      cudaFree(o.sb);
      cudaFree(o.out);
    }
  }
  return 0;
}
