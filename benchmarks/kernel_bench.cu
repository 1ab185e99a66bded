// Standalone timing harness for the FP8 kernels: A/B runs of kernel variants
// without rebuilding the Python extension or starting JAX.
//
//   nvcc -std=c++17 -O2 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a \
//        -Icsrc -o /tmp/kbench benchmarks/kernel_bench.cu [-D...]
//   /tmp/kbench 4096x7168x16384 4096x7168x2048          # dense: MxNxK
//   /tmp/kbench_kg 4x8192x7168x4096                      # -DKB_K_GROUPED: GxTxNxK
//
// Dense (fp8_gemm_nt_kernel, bf16 out, -DKB_OUT_F32: f32; KB_BIAS=1 in the environment:
// with a bias per column; KB_ACC=1 with -DKB_OUT_F32: accumulating into out, which starts
// as a random c, as the op's aliased c does; both checked): tile via -DKB_BLOCK_M /
// -DKB_BLOCK_N (the most stages that fit, or -DKB_STAGES=n), -DKB_MULTICAST=2 for
// 2-CTA clusters; KB_STORE_MODE=0 in the environment: the register-store epilogue
// (-DJAX_DEEPGEMM_NO_TMA_STORE: that epilogue only, and no shared-memory D tile,
// which leaves room for a 6th stage at 128x128).
// K-grouped (k_grouped_gemm_tn_kernel, f32 out, no c; -DKB_K_GROUPED): G groups
// of T tokens each, output [G, N, K]; tile via -DKB_BLOCK_M (64, 128, 192) and
// -DKB_BLOCK_N (default 128); KB_STORE_MODE=0 as for dense (the D tile's stage
// stays given up).
// An experimental copy of csrc/kernels/ can come first on the include path.
//
// Per shape: the median of 20 launches, each timed alone (cudaEvent), on
// operands rotated over copies (up to 8, 256 MB or more: beyond L2 for the
// shapes of interest), and 64 sampled outputs checked against a float64 sum
// on the host (a variant that computes wrong results says WRONG). The error is
// relative to the sum of |terms| / sqrt(terms); bf16 rounding alone gives a
// few 1e-2. This times a kernel alone; the Python benchmarks time the op as
// JAX runs it and sample the SM clock (these separate launches keep it near
// its maximum, where back-to-back work runs into the power cap).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "common/tma.cuh"
#include "cuda_check.h"
#include "kernels/fp8_gemm.cuh"
#include "kernels/k_grouped_gemm.cuh"

#ifndef KB_BLOCK_M
#define KB_BLOCK_M 128
#endif
#ifndef KB_BLOCK_N
#define KB_BLOCK_N 128
#endif
#ifndef KB_MULTICAST
#define KB_MULTICAST 1
#endif
#ifndef KB_STAGES
#define KB_STAGES 0  // dense: 0 = the most that fit (with -DJAX_DEEPGEMM_NO_TMA_STORE, one more)
#endif
#ifndef KB_K_GROUPED
constexpr int kDenseStages = KB_STAGES > 0
                                 ? KB_STAGES
                                 : jax_deepgemm::fp8_gemm_max_stages(KB_BLOCK_M, KB_BLOCK_N);
#endif

using namespace jax_deepgemm;

static float e4m3_to_float(uint8_t v) {
  const int s = v >> 7, e = (v >> 3) & 15, m = v & 7;
  const float mag = e == 0 ? std::ldexp(static_cast<float>(m), -9)
                           : std::ldexp(1.0f + m / 8.0f, e - 7);
  return s ? -mag : mag;
}

[[maybe_unused]] static float bf16_to_float(__nv_bfloat16 v) {
  uint16_t u;
  std::memcpy(&u, &v, 2);
  const uint32_t w = static_cast<uint32_t>(u) << 16;
  float f;
  std::memcpy(&f, &w, 4);
  return f;
}

// Random e4m3 bytes with exponent <= 13 (no NaN) and random signs; scales in [1/128, 1/32].
static std::vector<uint8_t> random_fp8(std::mt19937& rng, size_t count) {
  std::vector<uint8_t> v(count);
  for (auto& x : v) x = static_cast<uint8_t>(rng() % 0x70) | (rng() & 0x80);
  return v;
}
static std::vector<float> random_scales(std::mt19937& rng, size_t count) {
  std::uniform_real_distribution<float> u(0.5f, 2.0f);
  std::vector<float> v(count);
  for (auto& x : v) x = u(rng) / 64;
  return v;
}

template <typename T>
static T* to_device(const std::vector<T>& h) {
  T* d = nullptr;
  CHECK(cudaMalloc(&d, h.size() * sizeof(T)));
  CHECK(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

static int num_copies(size_t bytes) {
  return static_cast<int>(std::min<size_t>(8, 1 + (size_t{256} << 20) / bytes));
}

// Median and minimum (ms) of 20 launches, each timed alone; launch(i) uses copy i % copies.
// KB_BURST=1 in the environment: each of the 20 samples is instead a burst of 4 * copies
// back-to-back launches (per launch), as a framework issues them: launch gaps and
// tails count, and the clock meets the power cap sooner.
static void time_launches(const std::function<void(int)>& launch, int copies, double* median,
                          double* min) {
  for (int i = 0; i < 3 * copies; ++i) launch(i);
  CHECK(cudaDeviceSynchronize());
  const char* burst_env = std::getenv("KB_BURST");
  const int burst = burst_env != nullptr && burst_env[0] == '1' ? 4 * copies : 1;
  constexpr int kIters = 20;
  std::vector<float> ms(kIters);
  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  for (int i = 0; i < kIters; ++i) {
    CHECK(cudaEventRecord(e0));
    for (int j = 0; j < burst; ++j) launch(i * burst + j);
    CHECK(cudaEventRecord(e1));
    CHECK(cudaEventSynchronize(e1));
    CHECK(cudaEventElapsedTime(&ms[i], e0, e1));
    ms[i] /= burst;
  }
  CHECK(cudaGetLastError());
  CHECK(cudaEventDestroy(e0));
  CHECK(cudaEventDestroy(e1));
  std::sort(ms.begin(), ms.end());
  *median = ms[kIters / 2];
  *min = ms[0];
}

static void report(const char* shape, double flops, double median_ms, double min_ms,
                   double max_err) {
  std::printf("%s  %.1f us  %.0f TFLOPS  (min %.1f us)  err %.3g%s\n", shape, median_ms * 1e3,
              flops / (median_ms * 1e-3) * 1e-12, min_ms * 1e3, max_err,
              max_err > 0.05 ? "  WRONG" : "");
}

// KB_CUBIN=file.cubin in the environment: run the same kernel from that cubin
// instead (e.g. one whose SASS was edited; benchmarks/sass_edit.py), looked up
// by its mangled name.
[[maybe_unused]] static const void* kernel_from_cubin(const void* kernel) {
  const char* path = std::getenv("KB_CUBIN");
  if (path == nullptr || path[0] == '\0') return kernel;
  const char* name = nullptr;
  CHECK(cudaFuncGetName(&name, kernel));
  cudaLibrary_t lib;
  CHECK(cudaLibraryLoadFromFile(&lib, path, nullptr, nullptr, 0, nullptr, nullptr, 0));
  cudaKernel_t loaded;
  CHECK(cudaLibraryGetKernel(&loaded, lib, name));
  std::printf("# kernel %s from %s\n", name, path);
  return reinterpret_cast<const void*>(loaded);
}

#ifndef KB_K_GROUPED
#ifdef KB_OUT_F32
using OutT = float;
static float out_to_float(float v) { return v; }
#else
using OutT = __nv_bfloat16;
static float out_to_float(__nv_bfloat16 v) { return bf16_to_float(v); }
#endif

// out[m, n] (+)= sum_k a[m, k] b[n, k] sa[k/128, m] sb[n/128, k/128] (+ bias[n])
static void run_dense(int m, int n, int k, std::mt19937& rng, int num_sms) {
  constexpr int BM = KB_BLOCK_M, BN = KB_BLOCK_N, MC = KB_MULTICAST;
  constexpr int ST = kDenseStages;
  using L = Fp8GemmLayout<BM, BN, ST, false>;
  const void* kernel =
      reinterpret_cast<const void*>(&fp8_gemm_nt_kernel<BM, BN, ST, OutT, false, MC>);
  kernel = kernel_from_cubin(kernel);
  CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             L::kDynamicSmem));
  if (((n + BN - 1) / BN) % MC != 0) {  // as in the FFI: clusters pair N blocks
    std::printf("%dx%dx%d  skipped: multicast needs an even number of N blocks\n", m, n, k);
    return;
  }
  // KB_STORE_MODE=0: the epilogue stores from registers instead of through TMA.
  const char* mode_env = std::getenv("KB_STORE_MODE");
  const char* acc_env = std::getenv("KB_ACC");
  const bool acc = sizeof(OutT) == 4 && acc_env != nullptr && acc_env[0] == '1';
  const int store_mode = (mode_env != nullptr && mode_env[0] == '0') || !fp8_gemm_tma_store(BM, BN)
                             ? kStoreRegisters : acc ? kStoreTmaAdd : kStoreTma;
  const int kb = (k + 127) / 128, nb = (n + 127) / 128, mp = (m + 3) / 4 * 4;
  const auto ha = random_fp8(rng, static_cast<size_t>(m) * k);
  const auto hb = random_fp8(rng, static_cast<size_t>(n) * k);
  const auto hsa = random_scales(rng, static_cast<size_t>(kb) * mp);
  const auto hsb = random_scales(rng, static_cast<size_t>(nb) * kb);
  // KB_BIAS=1: a bias per column (one copy: it stays in L2 either way).
  const char* bias_env = std::getenv("KB_BIAS");
  const bool with_bias = bias_env != nullptr && bias_env[0] == '1';
  std::vector<float> hbias(n, 0.0f);
  if (with_bias) {
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    for (auto& x : hbias) x = u(rng);
  }
  float* bias = with_bias ? to_device(hbias) : nullptr;
  // KB_ACC=1: c, the value every copy's out starts from (checked after one launch).
  std::vector<float> hc(acc ? static_cast<size_t>(m) * n : 0);
  {
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    for (auto& x : hc) x = u(rng);
  }

  struct Copy {
    uint8_t *a, *b;
    float *sa, *sb;
    OutT* out;
    CUtensorMap ta, tb, tsa, tout;
  };
  const size_t out_bytes = static_cast<size_t>(m) * n * sizeof(OutT);
  std::vector<Copy> ops(num_copies(ha.size() + hb.size() + out_bytes * (acc ? 2 : 1)));
  for (auto& o : ops) {
    o.a = to_device(ha);
    o.b = to_device(hb);
    o.sa = to_device(hsa);
    o.sb = to_device(hsb);
    CHECK(cudaMalloc(&o.out, out_bytes));
    if (acc) CHECK(cudaMemcpy(o.out, hc.data(), out_bytes, cudaMemcpyHostToDevice));
    int r = tma::make_2d_tiled(&o.ta, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, o.a, m, k,
                               fp8_gemm_a_rows(BM, false, MC, m), kBlockK,
                               CU_TENSOR_MAP_SWIZZLE_128B);
    r |= tma::make_2d_tiled(&o.tb, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, o.b, n, k, BN, kBlockK,
                            CU_TENSOR_MAP_SWIZZLE_128B);
    r |= tma::make_2d_tiled(&o.tsa, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4, o.sa, kb, mp, 1,
                            MC == 1 ? fp8_gemm_a_rows(BM, false, 1, m) : L::kSARows,
                            CU_TENSOR_MAP_SWIZZLE_NONE);
    r |= tma::make_2d_tiled(&o.tout,
                            sizeof(OutT) == 4 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT32
                                              : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
                            sizeof(OutT), o.out, m, n, 64, fp8_gemm_out_box_cols<OutT>(),
                            CU_TENSOR_MAP_SWIZZLE_128B);
    if (r != 0) {
      std::fprintf(stderr, "tensor map failed\n");
      std::exit(1);
    }
  }
  cudaLaunchAttribute attrs[2];
  int num_attrs = 0;
  if (MC > 1) {
    attrs[num_attrs].id = cudaLaunchAttributeClusterDimension;
    attrs[num_attrs++].val.clusterDim = {MC, 1, 1};
  }
  // Persistent grid: whole clusters, at most one CTA per SM and, as in the FFI,
  // no more clusters than fit at once (clusters of 4 may not tile every GPC).
  int max_clusters = num_sms / MC;
  if (MC > 1) {
    cudaLaunchConfig_t probe = {};
    probe.gridDim = dim3(MC, 1, 1);
    probe.blockDim = dim3(L::kNumThreads, 1, 1);
    probe.dynamicSmemBytes = L::kDynamicSmem;
    probe.attrs = attrs;
    probe.numAttrs = 1;
    int fit = 0;
    CHECK(cudaOccupancyMaxActiveClusters(&fit, kernel, &probe));
    max_clusters = std::min(max_clusters, fit);
  }
  const int64_t tiles = static_cast<int64_t>((m + BM - 1) / BM) * ((n + BN - 1) / BN);
  // As the FFI launches (fp8_gemm_balanced_clusters); KB_BALANCED=0: one per SM.
  const char* balanced_env = std::getenv("KB_BALANCED");
  const bool balanced = balanced_env == nullptr || balanced_env[0] != '0';
  const int grid = static_cast<int>(balanced ? fp8_gemm_balanced_clusters(tiles / MC, max_clusters)
                                             : std::min<int64_t>(tiles / MC, max_clusters)) *
                   MC;
  // KB_PDL=1: programmatic dependent launch, so that a launch may start while the
  // previous one finishes; only meaningful with a kernel that waits for its
  // predecessor (griddepcontrol.wait) before touching global memory.
  const char* pdl_env = std::getenv("KB_PDL");
  if (pdl_env != nullptr && pdl_env[0] == '1') {
    attrs[num_attrs].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attrs[num_attrs++].val.programmaticStreamSerializationAllowed = 1;
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(grid, 1, 1);
  config.blockDim = dim3(L::kNumThreads, 1, 1);
  config.dynamicSmemBytes = L::kDynamicSmem;
  config.attrs = attrs;
  config.numAttrs = num_attrs;
  // The kernel's arguments by address (it may come from a cubin: no typed launch).
  GroupArgs grp{nullptr, 1, 0};
  int mode = store_mode;
  double median, min;
  auto launch = [&](int i) {
    Copy& o = ops[i % ops.size()];
    const float* c = acc ? reinterpret_cast<const float*>(o.out) : nullptr;  // aliased, as the op
    void* args[] = {&o.ta, &o.tb, &o.tsa, &o.sb, &bias, &c, &o.out, &o.tout, &mode,
                    &m, &n, &k, &grp};
    CHECK(cudaLaunchKernelExC(&config, kernel, args));
  };
  time_launches(launch, static_cast<int>(ops.size()), &median, &min);
  if (acc) {  // out = c again, then one launch to check
    CHECK(cudaMemcpy(ops[0].out, hc.data(), out_bytes, cudaMemcpyHostToDevice));
    launch(0);
    CHECK(cudaDeviceSynchronize());
  }

  std::vector<OutT> hout(static_cast<size_t>(m) * n);
  CHECK(cudaMemcpy(hout.data(), ops[0].out, out_bytes, cudaMemcpyDeviceToHost));
  double max_err = 0;
  for (int s = 0; s < 64; ++s) {
    const int i = static_cast<int>(rng() % m), j = static_cast<int>(rng() % n);
    const double c0 = acc ? hc[static_cast<size_t>(i) * n + j] : 0.0;
    double ref = hbias[j] + c0, mag = std::fabs(hbias[j]) + std::fabs(c0);
    for (int kk = 0; kk < k; ++kk) {
      const double v = static_cast<double>(e4m3_to_float(ha[static_cast<size_t>(i) * k + kk])) *
                       e4m3_to_float(hb[static_cast<size_t>(j) * k + kk]) *
                       hsa[static_cast<size_t>(kk / 128) * mp + i] *
                       hsb[static_cast<size_t>(j / 128) * kb + kk / 128];
      ref += v;
      mag += std::fabs(v);
    }
    const double got = out_to_float(hout[static_cast<size_t>(i) * n + j]);
    const double err = std::fabs(got - ref) / (mag / std::sqrt(k) + 1e-30);
    // bf16 rounding of a large output can exceed the threshold by itself: show it.
    if (err > 0.05) {
      std::printf("#   out[%d, %d] = %.6g, float64 %.6g (bf16 ulp there %.3g), sum|terms| %.6g\n",
                  i, j, got, ref, std::ldexp(1.0, std::ilogb(ref) - 7), mag);
    }
    max_err = std::max(max_err, err);
  }
  char shape[64];
  std::snprintf(shape, sizeof(shape), "%dx%dx%d%s%s%s", m, n, k, sizeof(OutT) == 4 ? " f32" : "",
                with_bias ? " bias" : "", acc ? " acc" : "");
  report(shape, 2.0 * m * n * k, median, min, max_err);
  if (bias != nullptr) CHECK(cudaFree(bias));
  for (auto& o : ops) {
    for (void* p : {static_cast<void*>(o.a), static_cast<void*>(o.b), static_cast<void*>(o.sa),
                    static_cast<void*>(o.sb), static_cast<void*>(o.out)}) {
      CHECK(cudaFree(p));
    }
  }
}

#else
// out[g, i, j] = sum over tokens t of group g of aT[i, t] bT[j, t] sa[t/128, i] sb[t/128, j],
// G groups of tg tokens each (T = G * tg tokens in all).
static void run_k_grouped(int g, int tg, int n, int k, std::mt19937& rng, int num_sms) {
  constexpr int BM = KB_BLOCK_M, BN = KB_BLOCK_N;
  constexpr int ST = k_grouped_max_stages(BM, BN);
  using L = KGroupedLayout<BM, BN, ST>;
  auto* kernel = &k_grouped_gemm_tn_kernel<BM, BN, ST, float>;
  CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             L::kDynamicSmem));
  const int t = g * tg, tb = (t + 127) / 128, np = (n + 3) / 4 * 4, kp = (k + 3) / 4 * 4;
  const auto ha = random_fp8(rng, static_cast<size_t>(n) * t);  // aT [N, T]
  const auto hb = random_fp8(rng, static_cast<size_t>(k) * t);  // bT [K, T]
  const auto hsa = random_scales(rng, static_cast<size_t>(tb) * np);
  const auto hsb = random_scales(rng, static_cast<size_t>(tb) * kp);
  const std::vector<int> sizes(g, tg);
  const size_t out_elems = static_cast<size_t>(g) * n * k;

  struct Copy {
    uint8_t *a, *b;
    float *sa, *sb, *out;
    int* sizes;
    CUtensorMap ta, tb, tsa, tsb, tout;
  };
  // KB_STORE_MODE=0: the epilogue stores from registers instead of through TMA
  // (the D tile's stage stays given up: -DJAX_DEEPGEMM_NO_TMA_STORE takes it back).
  const char* mode_env = std::getenv("KB_STORE_MODE");
  const int store_mode =
      (mode_env != nullptr && mode_env[0] == '0') || L::kBytesD == 0 ? kStoreRegisters : kStoreTma;
  std::vector<Copy> ops(num_copies(ha.size() + hb.size() + out_elems * 4));
  for (auto& o : ops) {
    o.a = to_device(ha);
    o.b = to_device(hb);
    o.sa = to_device(hsa);
    o.sb = to_device(hsb);
    o.sizes = to_device(sizes);
    CHECK(cudaMalloc(&o.out, out_elems * 4));
    int r = tma::make_2d_tiled(&o.ta, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, o.a, n, t, BM, kBlockK,
                               CU_TENSOR_MAP_SWIZZLE_128B);
    r |= tma::make_2d_tiled(&o.tb, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, o.b, k, t, BN, kBlockK,
                            CU_TENSOR_MAP_SWIZZLE_128B);
    r |= tma::make_2d_tiled(&o.tsa, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4, o.sa, tb, np, 1, BM,
                            CU_TENSOR_MAP_SWIZZLE_NONE);
    r |= tma::make_2d_tiled(&o.tsb, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4, o.sb, tb, kp, 1, BN,
                            CU_TENSOR_MAP_SWIZZLE_NONE);
    r |= tma::make_2d_tiled(&o.tout, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4, o.out,
                            static_cast<uint64_t>(g) * n, k, 64, 32, CU_TENSOR_MAP_SWIZZLE_128B);
    if (r != 0) {
      std::fprintf(stderr, "tensor map failed\n");
      std::exit(1);
    }
  }
  const int64_t tiles = static_cast<int64_t>(g) * ((n + BM - 1) / BM) * ((k + BN - 1) / BN);
  const int grid = static_cast<int>(std::min<int64_t>(tiles, num_sms));
  double median, min;
  time_launches([&](int i) {
    const Copy& o = ops[i % ops.size()];
    const GroupArgs grp{o.sizes, g, 0};
    kernel<<<grid, L::kNumThreads, L::kDynamicSmem>>>(o.ta, o.tb, o.tsa, o.tsb, nullptr, o.out,
                                                      o.tout, store_mode, n, k, t, grp);
  }, static_cast<int>(ops.size()), &median, &min);

  std::vector<float> hout(out_elems);
  CHECK(cudaMemcpy(hout.data(), ops[0].out, out_elems * 4, cudaMemcpyDeviceToHost));
  double max_err = 0;
  for (int s = 0; s < 64; ++s) {
    const int gg = static_cast<int>(rng() % g), i = static_cast<int>(rng() % n),
              j = static_cast<int>(rng() % k);
    double ref = 0, mag = 0;
    for (int tt = gg * tg; tt < (gg + 1) * tg; ++tt) {
      const double v = static_cast<double>(e4m3_to_float(ha[static_cast<size_t>(i) * t + tt])) *
                       e4m3_to_float(hb[static_cast<size_t>(j) * t + tt]) *
                       hsa[static_cast<size_t>(tt / 128) * np + i] *
                       hsb[static_cast<size_t>(tt / 128) * kp + j];
      ref += v;
      mag += std::fabs(v);
    }
    const double got = hout[(static_cast<size_t>(gg) * n + i) * k + j];
    max_err = std::max(max_err, std::fabs(got - ref) / (mag / std::sqrt(tg) + 1e-30));
  }
  char shape[64];
  std::snprintf(shape, sizeof(shape), "%dx%dx%dx%d", g, tg, n, k);
  report(shape, 2.0 * t * n * k, median, min, max_err);
  for (auto& o : ops) {
    for (void* p : {static_cast<void*>(o.a), static_cast<void*>(o.b), static_cast<void*>(o.sa),
                    static_cast<void*>(o.sb), static_cast<void*>(o.out),
                    static_cast<void*>(o.sizes)}) {
      CHECK(cudaFree(p));
    }
  }
}
#endif

int main(int argc, char** argv) {
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  const int num_sms = prop.multiProcessorCount;
#ifdef KB_K_GROUPED
  std::printf("# %s, %d SMs, K-grouped, tile %dx%d, %d stages\n", prop.name, num_sms,
              KB_BLOCK_M, KB_BLOCK_N, k_grouped_max_stages(KB_BLOCK_M, KB_BLOCK_N));
#else
  std::printf("# %s, %d SMs, tile %dx%d, %d stages, multicast %d\n", prop.name, num_sms,
              KB_BLOCK_M, KB_BLOCK_N, kDenseStages, KB_MULTICAST);
#endif
  for (int arg = 1; arg < argc; ++arg) {
    std::mt19937 rng(arg);
    int d[4];
#ifdef KB_K_GROUPED
    if (std::sscanf(argv[arg], "%dx%dx%dx%d", &d[0], &d[1], &d[2], &d[3]) == 4 &&
        d[1] % 16 == 0) {
      run_k_grouped(d[0], d[1], d[2], d[3], rng, num_sms);
    } else {
      std::printf("%s  skipped: expected GxTxNxK with T %% 16 == 0\n", argv[arg]);
    }
#else
    if (std::sscanf(argv[arg], "%dx%dx%d", &d[0], &d[1], &d[2]) == 3 && d[2] % 16 == 0) {
      run_dense(d[0], d[1], d[2], rng, num_sms);
    } else {
      std::printf("%s  skipped: expected MxNxK with K %% 16 == 0\n", argv[arg]);
    }
#endif
  }
  return 0;
}
