// XLA typed-FFI binding for the FP8 NT GEMM kernel.
//
// Custom call target: "jax_deepgemm_fp8_gemm_nt" (typed FFI, custom call
// API version 4). Operands (in order), no attributes:
//   a    F8E4M3FN [M, K]      row-major; M >= 1, K >= 16, K % 16 == 0
//   sa   F32      [KB, MP]    KB = ceil(K/128), MP = round_up(M, 4);
//                             scale of a[m, k] is sa[k/128, m]. Where
//                             M % 4 == 0 also [M, KB] in column-major
//                             layout (operand_layouts {0, 1}): the same bytes
//   b    F8E4M3FN [N, K]      row-major; N >= 1
//   sb   F32      [NB, KB]    NB = ceil(N/128); scale of b[n, k] is
//                             sb[n/128, k/128]
//   bias F32      [N] or [0]  ([0] = no bias)
//   c    F32      [M, N] or [0]  ([0] = no accumulation; if present the
//                             result must be F32; c may alias out)
// Result:
//   out  BF16 or F32 [M, N]
//   out = (a*sa) @ (b*sb)^T (+ bias[None, :]) (+ c)
//
// Custom call target: "jax_deepgemm_m_grouped_fp8_gemm_nt" (the MoE forward):
//   a, sa as above (rows of all groups), b F8E4M3FN [G, N, K],
//   sb F32 [G, NB, KB], sizes S32 [G] (on device), attributes
//   masked_stride (i64; 0 = contiguous layout, else rows per group of the
//   masked layout, M = G * masked_stride) and expected_m (i64; rows per group
//   the caller expects, only steers the config). Result out [M, N]; rows in no
//   group are zero. See kernels/fp8_gemm.cuh for how sizes are clipped.
//
// Custom call target: "jax_deepgemm_k_grouped_fp8_gemm_tn" (MoE weight grad):
//   aT F8E4M3FN [N, T] and bT F8E4M3FN [K, T] (token-major; T % 16 == 0),
//   sa F32 [TB, NP], sb F32 [TB, KP] (TB = ceil(T/128), NP/KP = N/K rounded up
//   to 4; scale of aT[n, t] is sa[t/128, n]), sizes S32 [G], c F32 [G, N, K]
//   or [0]. Result out F32, or BF16 without c, [G, N, K] = (c +) per-group
//   aT_g bT_g^T.

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <string>
#include <vector>

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "xla/ffi/api/ffi.h"

#include "common/ffi_util.h"
#include "common/tma.cuh"
#include "handlers.h"
#include "kernels/fp8_gemm.cuh"
#include "kernels/k_grouped_gemm.cuh"

namespace ffi = xla::ffi;

namespace jax_deepgemm {
namespace {

constexpr int kMaxDevices = 64;

// ---------------------------------------------------------------------------
// Configurations
// ---------------------------------------------------------------------------
struct LaunchArgs {
  const void* a;
  const float* sa;
  const void* b;
  const float* sb;
  const float* bias;  // nullable
  const float* c;     // nullable
  void* out;
  GroupArgs grp;  // sizes == nullptr for the dense GEMM
  int m, n, k;
  int mp;  // padded row count of sa's inner dim
  int kb;  // number of 128-wide K blocks
  bool tma_store;  // allow the TMA-store epilogue (JAX_DEEPGEMM_GEMM_CONFIG tma_store=0: no)
};

using LaunchFn = ffi::Error (*)(const LaunchArgs&, cudaStream_t, int device,
                                int num_sms);

// Launch config for `grid` CTAs of `threads` threads in clusters of `cluster`
// CTAs along x (no cluster attribute when cluster == 1); *attr backs it.
inline cudaLaunchConfig_t ClusterLaunch(int grid, int threads, int smem, cudaStream_t stream,
                                        int cluster, cudaLaunchAttribute* attr) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(grid, 1, 1);
  config.blockDim = dim3(threads, 1, 1);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  attr->id = cudaLaunchAttributeClusterDimension;
  attr->val.clusterDim.x = cluster;
  attr->val.clusterDim.y = 1;
  attr->val.clusterDim.z = 1;
  config.attrs = attr;
  config.numAttrs = cluster > 1 ? 1 : 0;
  return config;
}

// The epilogue's store mode for out [rows, cols] (OutT), and *tmap_out for it.
// The TMA-store epilogue needs 16-byte rows and base, and rows the kernels'
// int coordinates reach (the K-grouped one views [G, N, K] as [G*N, K]: past
// INT32_MAX rows a coordinate would wrap and its box be dropped). An fp32 c is
// added by a TMA reduce-add into out, so only when c is out itself (the ops
// alias them). Anything else, or !enabled, stores from registers (64-bit
// offsets).
template <typename OutT>
int PickStoreMode(bool enabled, void* out, const float* c, int64_t rows, int64_t cols,
                  CUtensorMap* tmap_out) {
  std::memset(tmap_out, 0, sizeof(*tmap_out));
  constexpr int kOutBytes = sizeof(OutT);
  if (enabled && rows <= INT32_MAX && (cols * kOutBytes) % 16 == 0 &&
      reinterpret_cast<uintptr_t>(out) % 16 == 0 &&
      (c == nullptr || static_cast<const void*>(c) == out) &&
      tma::make_2d_tiled(tmap_out,
                         kOutBytes == 4 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT32
                                        : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
                         kOutBytes, out, rows, cols, 64, fp8_gemm_out_box_cols<OutT>(),
                         CU_TENSOR_MAP_SWIZZLE_128B) == CUDA_SUCCESS) {
    return c != nullptr ? kStoreTmaAdd : kStoreTma;
  }
  return kStoreRegisters;
}

// Raises the kernel's dynamic shared-memory limit on `device` (the current
// device), once. Not allowed while a stream is being captured into a CUDA
// graph, so InitializeDevices() does it for every device ahead of time.
// For multicast kernels it also records how many clusters fit on the device
// at once (*max_clusters; the persistent grid never exceeds it).
template <int BM, int BN, int ST, typename OutT, bool kGrouped, int MC>
ffi::Error ConfigureFp8GemmNt(int device, int* max_clusters = nullptr) {
  using L = Fp8GemmLayout<BM, BN, ST, kGrouped>;
  auto* kernel = &fp8_gemm_nt_kernel<BM, BN, ST, OutT, kGrouped, MC>;
  static std::atomic<int> clusters[kMaxDevices] = {};
  const bool cacheable = device >= 0 && device < kMaxDevices;
  if (cacheable) {
    const int cached = clusters[device].load(std::memory_order_acquire);
    if (cached > 0) {
      if (max_clusters != nullptr) *max_clusters = cached;
      return ffi::Error::Success();
    }
  }
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         L::kDynamicSmem);
  int fit = 1 << 30;  // MC == 1: limited by the SM count only
  if (err == cudaSuccess && MC > 1) {
    cudaLaunchAttribute attr;
    const cudaLaunchConfig_t config =
        ClusterLaunch(MC, L::kNumThreads, L::kDynamicSmem, nullptr, MC, &attr);
    err = cudaOccupancyMaxActiveClusters(&fit, kernel, &config);
    if (err == cudaSuccess && fit < 1) err = cudaErrorInvalidConfiguration;
  }
  if (err != cudaSuccess) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("jax_deepgemm: configuring the fp8_gemm kernel failed: ") +
                          cudaGetErrorString(err));
  }
  if (cacheable) clusters[device].store(fit, std::memory_order_release);
  if (max_clusters != nullptr) *max_clusters = fit;
  return ffi::Error::Success();
}

template <int BM, int BN, int ST, typename OutT, bool kGrouped, int MC>
ffi::Error LaunchFp8GemmNt(const LaunchArgs& args, cudaStream_t stream,
                           int device, int num_sms) {
  using L = Fp8GemmLayout<BM, BN, ST, kGrouped>;
  auto* kernel = &fp8_gemm_nt_kernel<BM, BN, ST, OutT, kGrouped, MC>;
  int max_clusters = 0;
  if (ffi::Error e = ConfigureFp8GemmNt<BM, BN, ST, OutT, kGrouped, MC>(device, &max_clusters);
      e.failure()) {
    return e;
  }
  if (((args.n + BN - 1) / BN) % MC != 0) {  // the heuristic never picks this
    return ffi::Error(ffi::ErrorCode::kInternal,
                      "jax_deepgemm: multicast config needs an even number of N blocks");
  }

  CUtensorMap tmap_a, tmap_b, tmap_sa;
  // With multicast each CTA of a cluster loads BM / MC rows of the A tile;
  // dense problems of fewer rows than BM load them rounded up to 8 (and as many scales).
  const int a_rows = fp8_gemm_a_rows(BM, kGrouped, MC, args.m);
  const bool short_a = a_rows * MC != BM;
  CUresult res = tma::make_2d_tiled(&tmap_a, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1,
                                    args.a, args.m, args.k, a_rows, kBlockK,
                                    CU_TENSOR_MAP_SWIZZLE_128B);
  if (res == CUDA_SUCCESS) {
    res = tma::make_2d_tiled(&tmap_b, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, args.b,
                             static_cast<int64_t>(args.grp.num_groups) * args.n, args.k, BN, kBlockK,
                             CU_TENSOR_MAP_SWIZZLE_128B);
  }
  if (res == CUDA_SUCCESS) {
    res = tma::make_2d_tiled(&tmap_sa, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4,
                             args.sa, args.kb, args.mp, 1, short_a ? a_rows : L::kSARows,
                             CU_TENSOR_MAP_SWIZZLE_NONE);
  }
  if (res != CUDA_SUCCESS) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      "jax_deepgemm: cuTensorMapEncodeTiled failed (CUresult " +
                          std::to_string(static_cast<int>(res)) + ")");
  }
  CUtensorMap tmap_out;
  const int store_mode = PickStoreMode<OutT>(fp8_gemm_tma_store(BM, BN) && args.tma_store,
                                             args.out, args.c, args.m, args.n, &tmap_out);

  // Grouped: an upper bound (each group adds at most one partial m-block).
  // Tiles are scheduled per cluster of MC CTAs.
  const int64_t num_tiles =
      (static_cast<int64_t>((args.m + BM - 1) / BM) + (kGrouped ? args.grp.num_groups : 0)) *
      ((args.n + BN - 1) / BN / MC);
  if (num_tiles * MC > INT32_MAX) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "jax_deepgemm: problem too large (tile count overflows int32)");
  }
  // Dense: fp8_gemm_balanced_clusters. 4096x2112x7168 (544 tiles, 5 waves): 109
  // CTAs instead of 132, 125.5 -> 118.9 us; the other M = 4096 shapes within +-2%
  // (kernel_bench, H200, 2026-12-04). DeepGEMM launches this way too. (Not
  // grouped: there the tile count is only an upper bound.)
  const int64_t max_grid = std::max<int64_t>(std::min<int64_t>(num_sms / MC, max_clusters), 1);
  const int64_t clusters = kGrouped ? std::min(num_tiles, max_grid)
                                    : fp8_gemm_balanced_clusters(num_tiles, max_grid);
  const int grid = static_cast<int>(std::max<int64_t>(clusters, 1)) * MC;

  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t config =
      ClusterLaunch(grid, L::kNumThreads, L::kDynamicSmem, stream, MC, &attr);
  cudaError_t err = cudaLaunchKernelEx(&config, kernel, tmap_a, tmap_b, tmap_sa, args.sb,
                                       args.bias, args.c, static_cast<OutT*>(args.out), tmap_out,
                                       store_mode, args.m, args.n, args.k, args.grp);
  if (err == cudaSuccess) err = cudaGetLastError();
  if (err != cudaSuccess) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("jax_deepgemm: fp8_gemm_nt launch failed: ") +
                          cudaGetErrorString(err));
  }
  return ffi::Error::Success();
}

using ConfigureFn = ffi::Error (*)(int device);

struct KernelEntry {
  int block_m, block_n, stages;
  int multicast;  // CTAs per cluster sharing (multicasting) the A tile: 1 or 2
  LaunchFn bf16;
  LaunchFn f32;
  ConfigureFn configure_bf16;
  ConfigureFn configure_f32;
};

template <int BM, int BN, int ST, typename OutT, bool kGrouped, int MC>
ffi::Error Configure(int device) {
  return ConfigureFp8GemmNt<BM, BN, ST, OutT, kGrouped, MC>(device);
}

#define JAX_DEEPGEMM_ENTRY(BM, BN, ST, G, MC)                            \
  KernelEntry {                                                          \
    BM, BN, ST, MC, &LaunchFp8GemmNt<BM, BN, ST, __nv_bfloat16, G, MC>,  \
        &LaunchFp8GemmNt<BM, BN, ST, float, G, MC>,                      \
        &Configure<BM, BN, ST, __nv_bfloat16, G, MC>,                    \
        &Configure<BM, BN, ST, float, G, MC>                             \
  }

// Every config is built with the most stages that fit; the heuristic below
// picks among them (JAX_DEEPGEMM_GEMM_CONFIG may force one).
#define JAX_DEEPGEMM_MAX_STAGES(BM, BN, MC) \
  JAX_DEEPGEMM_ENTRY(BM, BN, fp8_gemm_max_stages(BM, BN), false, MC)
#define JAX_DEEPGEMM_GROUPED(BM, BN, MC) \
  JAX_DEEPGEMM_ENTRY(BM, BN, fp8_gemm_max_stages(BM, BN, true), true, MC)

const KernelEntry kKernels[] = {
    JAX_DEEPGEMM_MAX_STAGES(64, 32, 1),
    JAX_DEEPGEMM_MAX_STAGES(64, 64, 1),   JAX_DEEPGEMM_MAX_STAGES(64, 128, 1),
    JAX_DEEPGEMM_MAX_STAGES(64, 192, 1),  JAX_DEEPGEMM_MAX_STAGES(128, 64, 1),
    JAX_DEEPGEMM_MAX_STAGES(128, 96, 1),  JAX_DEEPGEMM_MAX_STAGES(128, 128, 1),
    JAX_DEEPGEMM_MAX_STAGES(128, 160, 1), JAX_DEEPGEMM_MAX_STAGES(128, 192, 1),
    JAX_DEEPGEMM_MAX_STAGES(128, 256, 1), JAX_DEEPGEMM_ENTRY(128, 128, 4, false, 1),
    JAX_DEEPGEMM_MAX_STAGES(128, 128, 2), JAX_DEEPGEMM_MAX_STAGES(192, 128, 1),
};

// The M-grouped kernels (a smaller set: each costs two instantiations).
const KernelEntry kGroupedKernels[] = {
    JAX_DEEPGEMM_GROUPED(64, 64, 1),   JAX_DEEPGEMM_GROUPED(64, 128, 1),
    JAX_DEEPGEMM_GROUPED(128, 64, 1),  JAX_DEEPGEMM_GROUPED(128, 128, 1),
    JAX_DEEPGEMM_GROUPED(128, 192, 1), JAX_DEEPGEMM_GROUPED(128, 256, 1),
    JAX_DEEPGEMM_GROUPED(128, 128, 2),
};

#undef JAX_DEEPGEMM_GROUPED
#undef JAX_DEEPGEMM_MAX_STAGES
#undef JAX_DEEPGEMM_ENTRY

// ---- K-grouped (weight-gradient) kernel ----
struct KGroupedArgs {
  const void* a;   // aT [N, T]
  const float* sa;  // [TB, NP]
  const void* b;   // bT [K, T]
  const float* sb;  // [TB, KP]
  const float* c;  // nullable (then out may be bf16)
  void* out;      // f32 or bf16
  GroupArgs grp;
  int n, k, t;
};

using KGroupedLaunchFn = ffi::Error (*)(const KGroupedArgs&, cudaStream_t, int device,
                                        int num_sms);

template <int BM, int BN, int ST, typename OutT>
ffi::Error ConfigureKGrouped(int device) {
  using L = KGroupedLayout<BM, BN, ST>;
  static std::atomic<uint64_t> configured{0};
  const uint64_t bit = device < kMaxDevices ? (uint64_t{1} << device) : 0;
  if (bit != 0 && (configured.load(std::memory_order_acquire) & bit) != 0) {
    return ffi::Error::Success();
  }
  const cudaError_t err = cudaFuncSetAttribute(&k_grouped_gemm_tn_kernel<BM, BN, ST, OutT>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               L::kDynamicSmem);
  if (err != cudaSuccess) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("jax_deepgemm: cudaFuncSetAttribute failed: ") +
                          cudaGetErrorString(err));
  }
  configured.fetch_or(bit, std::memory_order_acq_rel);
  return ffi::Error::Success();
}

template <int BM, int BN, int ST, typename OutT>
ffi::Error LaunchKGrouped(const KGroupedArgs& args, cudaStream_t stream, int device,
                          int num_sms) {
  using L = KGroupedLayout<BM, BN, ST>;
  if (ffi::Error e = ConfigureKGrouped<BM, BN, ST, OutT>(device); e.failure()) return e;
  const int tb = (args.t + 127) / 128;
  CUtensorMap tmap_a, tmap_b, tmap_sa, tmap_sb;
  CUresult res = tma::make_2d_tiled(&tmap_a, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, args.a, args.n,
                                    args.t, BM, kBlockK, CU_TENSOR_MAP_SWIZZLE_128B);
  if (res == CUDA_SUCCESS) {
    res = tma::make_2d_tiled(&tmap_b, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, args.b, args.k, args.t,
                             BN, kBlockK, CU_TENSOR_MAP_SWIZZLE_128B);
  }
  if (res == CUDA_SUCCESS) {
    res = tma::make_2d_tiled(&tmap_sa, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4, args.sa, tb,
                             (args.n + 3) / 4 * 4, 1, BM, CU_TENSOR_MAP_SWIZZLE_NONE);
  }
  if (res == CUDA_SUCCESS) {
    res = tma::make_2d_tiled(&tmap_sb, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4, args.sb, tb,
                             (args.k + 3) / 4 * 4, 1, BN, CU_TENSOR_MAP_SWIZZLE_NONE);
  }
  if (res != CUDA_SUCCESS) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      "jax_deepgemm: cuTensorMapEncodeTiled failed (CUresult " +
                          std::to_string(static_cast<int>(res)) + ")");
  }
  // out is viewed as [G*N, K] (the kernel stores through TMA only where a
  // warpgroup's rows stay inside one group).
  CUtensorMap tmap_out;
  const int store_mode =
      PickStoreMode<OutT>(L::kBytesD > 0, args.out, args.c,
                          static_cast<int64_t>(args.grp.num_groups) * args.n, args.k, &tmap_out);
  const int64_t num_tiles = static_cast<int64_t>(args.grp.num_groups) *
                            ((args.n + BM - 1) / BM) * ((args.k + BN - 1) / BN);
  if (num_tiles > INT32_MAX) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "jax_deepgemm: problem too large (tile count overflows int32)");
  }
  const int grid = static_cast<int>(num_tiles < num_sms ? num_tiles : num_sms);
  k_grouped_gemm_tn_kernel<BM, BN, ST, OutT><<<grid, L::kNumThreads, L::kDynamicSmem, stream>>>(
      tmap_a, tmap_b, tmap_sa, tmap_sb, args.c, static_cast<OutT*>(args.out), tmap_out,
      store_mode, args.n, args.k, args.t, args.grp);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("jax_deepgemm: k_grouped launch failed: ") +
                          cudaGetErrorString(err));
  }
  return ffi::Error::Success();
}

struct KGroupedEntry {
  int block_m, block_n;
  KGroupedLaunchFn f32, bf16;
  ConfigureFn configure_f32, configure_bf16;
};

#define JAX_DEEPGEMM_KGROUPED(BM, BN)                                                    \
  KGroupedEntry {                                                                        \
    BM, BN, &LaunchKGrouped<BM, BN, k_grouped_max_stages(BM, BN), float>,                \
        &LaunchKGrouped<BM, BN, k_grouped_max_stages(BM, BN), __nv_bfloat16>,            \
        &ConfigureKGrouped<BM, BN, k_grouped_max_stages(BM, BN), float>,                 \
        &ConfigureKGrouped<BM, BN, k_grouped_max_stages(BM, BN), __nv_bfloat16>          \
  }
// 192x128 runs three math warpgroups with serial promotion (k_grouped_gemm.cuh).
const KGroupedEntry kKGroupedKernels[] = {JAX_DEEPGEMM_KGROUPED(128, 128),
                                          JAX_DEEPGEMM_KGROUPED(64, 128),
                                          JAX_DEEPGEMM_KGROUPED(192, 128)};
#undef JAX_DEEPGEMM_KGROUPED

struct KernelTable {
  const KernelEntry* begin_;
  const KernelEntry* end_;
  bool grouped;
  const KernelEntry* begin() const { return begin_; }
  const KernelEntry* end() const { return end_; }
};
constexpr KernelTable kDenseTable{std::begin(kKernels), std::end(kKernels), false};
constexpr KernelTable kGroupedTable{std::begin(kGroupedKernels), std::end(kGroupedKernels), true};

std::string ConfigName(int block_m, int block_n, int stages, int multicast) {
  return "block_m=" + std::to_string(block_m) + ",block_n=" + std::to_string(block_n) +
         ",stages=" + std::to_string(stages) + ",multicast=" + std::to_string(multicast);
}

std::string SupportedConfigs(const KernelTable& table) {
  std::string s;
  for (const KernelEntry& e : table) {
    if (!s.empty()) s += "; ";
    s += ConfigName(e.block_m, e.block_n, e.stages, e.multicast);
  }
  return s;
}

// JAX_DEEPGEMM_GEMM_CONFIG, e.g. "block_m=64,block_n=128,stages=4". Keys are
// optional; missing ones fall back to the heuristic (stages: the maximum for
// the chosen block shape). multicast=2 applies where the problem has an even
// number of N blocks; elsewhere the same tile runs without. Read once per process.
struct EnvOverride {
  bool present = false;
  std::string raw;
  std::string error;  // non-empty if unparsable
  int block_m = 0, block_n = 0, stages = 0, multicast = 0;  // 0 = not forced
  int tma_store = 1;  // 0: the epilogue stores from registers (for comparison)
};

EnvOverride ParseEnvOverride(const char* name = "JAX_DEEPGEMM_GEMM_CONFIG") {
  EnvOverride o;
  const char* v = std::getenv(name);
  if (v == nullptr) return o;
  o.raw = v;
  std::string s;
  for (char ch : o.raw) {
    if (!std::isspace(static_cast<unsigned char>(ch))) s += ch;
  }
  if (s.empty()) return o;  // empty = not set
  o.present = true;
  size_t pos = 0;
  while (pos <= s.size()) {
    size_t end = s.find(',', pos);
    if (end == std::string::npos) end = s.size();
    const std::string item = s.substr(pos, end - pos);
    pos = end + 1;
    if (item.empty()) continue;
    const size_t eq = item.find('=');
    if (eq == std::string::npos) {
      o.error = "expected key=value, got '" + item + "'";
      return o;
    }
    const std::string key = item.substr(0, eq);
    const std::string val = item.substr(eq + 1);
    char* endp = nullptr;
    const long x = std::strtol(val.c_str(), &endp, 10);
    if (key == "tma_store") {
      if (val != "0" && val != "1") {
        o.error = "tma_store must be 0 or 1, got '" + val + "'";
        return o;
      }
      o.tma_store = val[0] - '0';
      continue;
    }
    if (val.empty() || *endp != '\0' || x <= 0 || x > 4096) {
      o.error = "bad value for '" + key + "': '" + val + "'";
      return o;
    }
    if (key == "block_m") {
      o.block_m = static_cast<int>(x);
    } else if (key == "block_n") {
      o.block_n = static_cast<int>(x);
    } else if (key == "stages") {
      o.stages = static_cast<int>(x);
    } else if (key == "multicast") {
      if (x > 2) {
        o.error = "multicast must be 1 or 2, got " + val;
        return o;
      }
      o.multicast = static_cast<int>(x);
    } else {
      o.error = "unknown key '" + key +
                "' (expected block_m, block_n, stages, multicast, tma_store)";
      return o;
    }
  }
  return o;
}

const EnvOverride& GetEnvOverride() {
  static const EnvOverride o = ParseEnvOverride();
  return o;
}

// Row blocks of `bm` rows over m rows in all: the masked layout's groups hold
// masked_rows rows each (m = groups * masked_rows) and each starts a block; the
// contiguous layout's boundaries fall anywhere: about one partial block per two groups.
int64_t MBlocks(int64_t m, int bm, int64_t groups, int64_t masked_rows) {
  if (masked_rows > 0) return groups * ((masked_rows + bm - 1) / bm);
  return (m + bm - 1) / bm + (groups > 1 ? groups / 2 : 0);
}

// Share of the tensor-core time of `rounds` full waves that a tile shape
// spends on the m x n output (the rest: the last wave's idle SMs, padding).
double WaveEfficiency(int64_t m, int64_t n, int bm, int bn, int64_t groups, int num_sms,
                      int64_t masked_rows = 0) {
  const int64_t m_blocks = MBlocks(m, bm, groups, masked_rows);
  const int64_t tiles = m_blocks * ((n + bn - 1) / bn);
  const int64_t rounds = (tiles + num_sms - 1) / num_sms;
  return static_cast<double>(m) * n / (static_cast<double>(rounds) * num_sms * bm * bn);
}

// The tile with the best estimated throughput: rows of N used x SM-waves used
// x the tile's work per clock. Three math warpgroups (192 rows) hide more of
// the promotion's latency: +5-8% over 128 rows on the H200's bar shapes
// (2026-12-03). 64 rows only where 128 leaves SMs idle.
const KGroupedEntry* KGroupedHeuristic(int64_t g, int64_t n, int64_t k, int num_sms) {
  const int64_t k_blocks = (k + 127) / 128;
  if (g * ((n + 127) / 128) * k_blocks < num_sms) return &kKGroupedKernels[1];
  // The [G, N, K] output as N rows of G * k_blocks 128-wide column blocks.
  auto score = [&](int block_m, double speed) {
    return speed * WaveEfficiency(n, g * k_blocks * 128, block_m, 128, 1, num_sms);
  };
  return score(192, 1.06) > score(128, 1.0) ? &kKGroupedKernels[2] : &kKGroupedKernels[0];
}

// The heuristic's tile, or the one JAX_DEEPGEMM_K_GROUPED_CONFIG
// ("block_m=64|128|192", read once per process) forces; nullptr (and *error)
// if that names no built tile.
const KGroupedEntry* SelectKGrouped(int64_t g, int64_t n, int64_t k, int num_sms,
                                    std::string* error) {
  static const EnvOverride env = ParseEnvOverride("JAX_DEEPGEMM_K_GROUPED_CONFIG");
  if (!env.present) return KGroupedHeuristic(g, n, k, num_sms);
  for (const KGroupedEntry& x : kKGroupedKernels) {
    if (env.error.empty() && env.block_m == x.block_m &&
        (env.block_n == 0 || env.block_n == x.block_n) && !env.stages && !env.multicast &&
        env.tma_store == 1) {
      return &x;
    }
  }
  *error = "jax_deepgemm: invalid JAX_DEEPGEMM_K_GROUPED_CONFIG='" + env.raw +
           "': expected block_m=64, 128 or 192 (block_n=128)" +
           (env.error.empty() ? std::string() : " (" + env.error + ")");
  return nullptr;
}

struct GemmConfig {
  int block_m, block_n, stages, multicast;
};

// True when `e` agrees with every key JAX_DEEPGEMM_GEMM_CONFIG sets; without
// a forced stage count only the deepest build of a tile shape is a candidate.
// Multicast kernels pair adjacent N blocks, so they need an even count of them.
bool Allowed(const KernelEntry& e, const EnvOverride& env, bool grouped, int64_t n) {
  if (env.block_m && e.block_m != env.block_m) return false;
  if (env.block_n && e.block_n != env.block_n) return false;
  if (env.multicast && e.multicast != env.multicast) return false;
  if (((n + e.block_n - 1) / e.block_n) % e.multicast != 0) return false;
  if (env.stages) return e.stages == env.stages;
  return e.stages == fp8_gemm_max_stages(e.block_m, e.block_n, grouped);
}

// Work per clock of a tile in problems of over two waves, relative to 128x128
// at equally full waves (H200); 0: not a candidate there.
//  * 128x128 overlaps promotion with the next wgmma (two result buffers).
//  * 192x128 (dense only: three math warpgroups) reads 17% fewer bytes per FLOP
//    and ran at about 128x128's speed where their waves were as full (8192^3:
//    849-862 vs 878 us); so it wins where its waves are fuller: 4096x2112x7168 (3
//    rounds of 374 tiles against 5 of 544) 110-112 vs 118 us (kernel_bench alone,
//    2026-12-04); through JAX under DeepGEMM's protocol 105.5 vs 118.7 us and 818
//    vs 852 us. In the M-grouped kernels it did not pay (contiguous 4x8192: 1309
//    vs 1302 TFLOPS, 1214 vs 1237), so they are not built with it. With A's scales
//    read ahead of the wgmma wait (session 27, H100, kernel_bench alone) its work per
//    full round came to 1.08-1.10x 128x128's and 1.01-1.05x 128x256's (us, 192x128 /
//    128x128 / 128x256: 4096x7168x16384 738 / 745 / 722 in 10 / 14 / 7 rounds,
//    4096x4096x7168 196 / 193 / 185 in 6 / 8 / 4), so 1.05: above 128x256's 1.035,
//    so that 8192^3 (21 rounds at 98.5% against 16 at 97.0%) stays on it.
//  * 128x256 (two 128-wide wgmma halves per K block) spreads each tile's fixed cost
//    (pipeline fill, epilogue) over twice the work: +5% at K <= 2048 (4096x7168x2048,
//    4096x24576x1536, M-grouped 4x8192 x 7168 x 2048; 2026-12-03), so it is taken down
//    to 95% of 128x128's wave fill. At K 7168 and 16384 the two measured the same until
//    A's scales were read before the wgmma wait (session 27, H100, kernel_bench alone,
//    both tiles with it, us, 128x256 vs 128x128: 4096x7168x16384 722 vs 745,
//    4096x4096x7168 185 vs 193, 4096x7168x2048 108 vs 118, 4096x24576x1536 272 vs 292),
//    so 1.035 at larger K (+2.5% over 128x128's 1.01 at equal waves).
//  * 128x160 / 128x192 (serial promotion): 27% / 16% slower per FLOP than 128x128
//    (4096x7168x16384: 952 / 948 vs 763 us, 2026-12-04), with a run-time B-scale pick
//    per accumulator and a scale load stalling each k-block's last wgmma. Without both
//    (2026-12-05), 128x160 ran 0.87-0.93 of 128x128's work per clock at equal waves
//    (kernel_bench alone, us, 128x160 vs 128x128, and the wave fills: 4096x7168x16384
//    842 vs 763, 98.7% vs 97.0%; 4096x4096x7168 232 vs 198, 88.7% vs 97.0%;
//    4096x7168x2048 129 vs 117; 4096x24576x1536 341 vs 293, 98.0% vs 99.0%), so 0.88.
//    128x192 is unmeasured since and keeps 0.86. They win only where their waves are
//    much fuller (e.g. 3072x2112x4096: 2 full rounds of 128x192 against 4 at 75%;
//    1024x5120: 2 rounds of 128x160 at 97% against 3 at 81%). Measured on dense problems
//    only: the M-grouped kernels keep 128x128.
//  * Accumulating into c (D = C + A*B, f32) keeps 128x128: that reduce-add epilogue
//    cost 19.5% over the f32 plain kernel with 128x256 on 4096x24576x1536, against
//    8.6% with 128x128 (bench_gemm --epilogues); the others are unmeasured.
//  * Other f32 outputs skip the dense 128x256 build: it stages half a bf16 tile in
//    shared memory, so an f32 tile goes through it in four passes, each waiting for
//    the last one's store (H100, session 30, bench_gemm --epilogues, us, f32 vs bf16
//    out: 4096x7168x16384 929 vs 792, 4096x24576x1536 349 vs 294, 4096x7168x2048
//    135 vs 110; 128x128's f32 epilogue cost +3% over its bf16 one, H200 2026-11-22).
double ManyWaveSpeed(int block_m, int block_n, int64_t k, bool accumulate, bool f32_out,
                     bool grouped) {
  if (block_m == 128 && block_n == 128) return 1.0;
  if (accumulate) return 0.0;
  if (f32_out && fp8_gemm_split_epilogue(block_n, grouped)) return 0.0;
  if (block_m == 192 && block_n == 128) return 1.05;
  if (block_m == 128 && block_n == 256) return k <= 2048 ? 1.01 / 0.95 : 1.035;
  if (grouped) return 0.0;
  if (block_m == 128 && block_n == 160) return 0.88;
  if (block_m == 128 && block_n == 192) return 0.86;
  return 0.0;
}

// Picks a kernel among the allowed entries. Problems that fill the GPU in over
// two waves take the tile of the highest speed x wave efficiency (above); another
// tile must beat 128x128 by 1%, and exact ties go to the later entry of the table.
// The multicast build is only used when forced: on H200 it runs at 97-98% of the
// plain kernel's speed (1045 vs 1071 TFLOPS on 4096x7168x16384, 2026-11-22).
// Problems of one wave or less (small M, decode) pick by a small cost model per 128-wide K
// step: a tile needs max(tensor-core time ~ BM*BN/32 clocks, load time ~
// 4*(BM+BN) clocks) and more, smaller tiles keep more SMs pulling from HBM.
// For grouped problems `m` is the total row count and `groups` adds one
// partial m-block per two groups; masked_rows > 0: the masked layout, `groups`
// groups of masked_rows rows (the expected ones), each starting an m-block.
// Masked problems of over one wave of 128-row groups take the many-wave rule: its
// full-wave tiles measured faster than the cost model's (session 27, H100, 4096x7168 per
// group, chilled, us, 128x256 vs 128x128 before A's scales moved ahead of the wgmma wait,
// which took 5% off 128x256 alone: 1x1024 50.5 vs 50.0, 2x512 53.9 vs 56.4, 4x256 63.9
// vs 68.8). Groups of 64 rows or fewer (decode) keep the cost model's 64-row tiles.
const KernelEntry* HeuristicKernel(int64_t m, int64_t n, int64_t k, int64_t groups,
                                   bool accumulate, bool f32_out, int num_sms,
                                   const KernelTable& table,
                                   const EnvOverride& env, int64_t masked_rows = 0) {
  const int64_t tiles_128 = MBlocks(m, 128, groups, masked_rows) * ((n + 127) / 128);
  const KernelEntry* best_entry = nullptr;
  double best = 1e300;
  const bool many_waves = masked_rows > 0 ? masked_rows > 64 && tiles_128 > num_sms
                                          : m > 64 && tiles_128 > 2 * num_sms;
  if (many_waves) {
    for (const KernelEntry& e : table) {
      if (!Allowed(e, env, table.grouped, n)) continue;
      if (e.multicast > 1 && env.multicast < e.multicast) continue;  // only when forced
      const double speed =
          ManyWaveSpeed(e.block_m, e.block_n, k, accumulate, f32_out, table.grouped);
      const bool base = e.block_m == 128 && e.block_n == 128;
      const double score = speed * (base ? 1.01 : 1.0) *
                           WaveEfficiency(m, n, e.block_m, e.block_n, groups, num_sms,
                                          masked_rows);
      if (speed > 0.0 && (best_entry == nullptr || score > best * (1.0 - 1e-12))) {
        best = score;
        best_entry = &e;
      }
    }
    if (best_entry != nullptr) return best_entry;
    best = 1e300;
  }
  for (const KernelEntry& e : table) {
    if (!Allowed(e, env, table.grouped, n)) continue;
    if (e.multicast > 1 && env.multicast < e.multicast) continue;  // only when forced
    // Not in this cost model, which knows nothing of their serial mainloops.
    if (fp8_gemm_split_n(e.block_n) && env.block_n != e.block_n) continue;
    if (e.block_m == 192 && env.block_m != 192) continue;
    // Don't waste half of every tile (unless nothing else is allowed).
    const bool wasteful = m <= 64 * groups && e.block_m != 64;
    const int64_t m_blocks = MBlocks(m, e.block_m, groups, masked_rows);
    const int64_t tiles = m_blocks * ((n + e.block_n - 1) / e.block_n);
    const int64_t waves = (tiles + num_sms - 1) / num_sms;
    // One math warpgroup can't hide its promotion behind the other's wgmma.
    const double math = e.block_m * e.block_n / 32.0 * (e.block_m == 64 ? 1.4 : 1.0);
    const double load = 4.0 * (e.block_m + e.block_n);
    const double cost = static_cast<double>(waves) * (math > load ? math : load) *
                        (wasteful ? 2.0 : 1.0);
    // So 64x32 takes one-wave problems where 64x64 leaves half the SMs idle, decode
    // included now that A's box is short (kernel_bench, H200, 2026-12-04, us, 64x32
    // vs 64x64: 128x2112x7168 17.9 vs 19.9; 1x4096x7168 18.6 vs 20.9).
    // Ties go to the larger tile (fewer bytes per FLOP).
    if (best_entry == nullptr || cost < best * 0.999 ||
        (cost <= best * 1.001 &&
         e.block_m * e.block_n > best_entry->block_m * best_entry->block_n)) {
      best = cost < best ? cost : best;
      best_entry = &e;
    }
  }
  return best_entry;
}

bool SelectConfig(int64_t m, int64_t n, int64_t k, int64_t groups, bool accumulate, bool f32_out,
                  int num_sms, const KernelTable& table, GemmConfig* cfg,
                  const KernelEntry** entry, std::string* error, int64_t masked_rows = 0) {
  static const EnvOverride kNoOverride;
  const EnvOverride& env = GetEnvOverride();
  if (env.present && !env.error.empty()) {
    *error = "jax_deepgemm: invalid JAX_DEEPGEMM_GEMM_CONFIG='" + env.raw + "': " + env.error;
    return false;
  }
  const KernelEntry* e =
      HeuristicKernel(m, n, k, groups, accumulate, f32_out, num_sms, table,
                      env.present ? env : kNoOverride, masked_rows);
  if (e == nullptr && env.present && env.multicast > 1) {
    // A forced multicast=2 on a problem with an odd N-block count: same tile (multicast
    // builds are 128x128), no multicast.
    EnvOverride relaxed = env;
    relaxed.multicast = 0;
    relaxed.block_m = relaxed.block_m ? relaxed.block_m : 128;
    relaxed.block_n = relaxed.block_n ? relaxed.block_n : 128;
    e = HeuristicKernel(m, n, k, groups, accumulate, f32_out, num_sms, table, relaxed,
                        masked_rows);
  }
  if (e == nullptr) {
    *error = "jax_deepgemm: JAX_DEEPGEMM_GEMM_CONFIG='" + env.raw + "' matches no " +
             (table.grouped ? "grouped" : "dense") + " kernel that is built; supported: " +
             SupportedConfigs(table);
    return false;
  }
  *cfg = GemmConfig{e->block_m, e->block_n, e->stages, e->multicast};
  if (entry != nullptr) *entry = e;
  return true;
}

// ---------------------------------------------------------------------------
// Per-device info
// ---------------------------------------------------------------------------
int GetNumSms(int device, cudaError_t* err) {
  static std::atomic<int> cache[kMaxDevices] = {};
  if (device >= 0 && device < kMaxDevices) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int sms = 0;
  *err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (*err != cudaSuccess || sms <= 0) return 0;
  if (device >= 0 && device < kMaxDevices) {
    cache[device].store(sms, std::memory_order_relaxed);
  }
  return sms;
}

// ---------------------------------------------------------------------------
// Handler
// ---------------------------------------------------------------------------
ffi::Error InvalidArg(const std::string& msg) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "jax_deepgemm_fp8_gemm_nt: " + msg);
}

bool IsEmpty1D(const ffi::AnyBuffer& buf) {
  const auto dims = buf.dimensions();
  return dims.size() == 1 && dims[0] == 0;
}

// The SM count of `device`, made current by `scoped` (the device comes from XLA,
// not cudaStreamGetDevice: stream queries invalidate a CUDA-graph capture).
ffi::Error DeviceSms(const ScopedDevice& scoped, int device, int* num_sms) {
  if (!scoped.ok()) {
    return ffi::Error(ffi::ErrorCode::kInternal, "jax_deepgemm: cudaSetDevice failed");
  }
  cudaError_t cerr = cudaSuccess;
  *num_sms = GetNumSms(device, &cerr);
  if (*num_sms <= 0) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("jax_deepgemm: cannot query SM count: ") +
                          cudaGetErrorString(cerr));
  }
  return ffi::Error::Success();
}

// Checks shared by the dense and grouped handlers: a [M, K], sa [KB, MP],
// b [G*N, K] viewed as `b_rows` rows, out [M, N].
ffi::Error CheckCommon(const ffi::AnyBuffer& a, const ffi::AnyBuffer& sa,
                       const ffi::AnyBuffer& b, int64_t n, const ffi::AnyBuffer& out,
                       const std::string& op) {
  auto invalid = [&](const std::string& msg) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, op + ": " + msg);
  };
  const int64_t m = a.dimensions()[0];
  const int64_t k = a.dimensions()[1];
  if (m < 1 || n < 1) return invalid("M and N must be >= 1");
  if (k < 16 || k % 16 != 0) {
    return invalid("K must be >= 16 and a multiple of 16, got " + std::to_string(k));
  }
  if (m > INT32_MAX || n > INT32_MAX || k > INT32_MAX) {
    return invalid("M, N, K must each be < 2^31");
  }
  const int64_t kb = (k + 127) / 128;
  const int64_t mp = (m + 3) / 4 * 4;
  // [M, KB] declared column-major (M % 4 == 0) is the same bytes as [KB, MP].
  const bool sa_dims = sa.dimensions().size() == 2 &&
                       ((sa.dimensions()[0] == kb && sa.dimensions()[1] == mp) ||
                        (m == mp && sa.dimensions()[0] == m && sa.dimensions()[1] == kb));
  if (sa.element_type() != ffi::DataType::F32 || !sa_dims) {
    return invalid("sa must be float32 [ceil(K/128), round_up(M, 4)] = [" +
                   std::to_string(kb) + ", " + std::to_string(mp) + "], got " +
                   Dims(sa));
  }
  const ffi::DataType out_type = out.element_type();
  if ((out_type != ffi::DataType::BF16 && out_type != ffi::DataType::F32) ||
      out.dimensions().size() != 2 || out.dimensions()[0] != m || out.dimensions()[1] != n) {
    return invalid("out must be bfloat16 or float32 [M, N], got " + Dims(out));
  }
  // TMA needs 16-byte aligned global addresses; the epilogue uses 8-byte (and
  // the zero fill 16-byte, after a scalar head) accesses. XLA buffers are far
  // more aligned than this.
  if (!Aligned(a.untyped_data(), 16) || !Aligned(b.untyped_data(), 16) ||
      !Aligned(sa.untyped_data(), 16) || !Aligned(out.untyped_data(), 8)) {
    return invalid("operand buffers are insufficiently aligned");
  }
  return ffi::Error::Success();
}

LaunchArgs MakeArgs(const ffi::AnyBuffer& a, const ffi::AnyBuffer& sa, const ffi::AnyBuffer& b,
                    const ffi::AnyBuffer& sb, int64_t n, ffi::AnyBuffer& out) {
  LaunchArgs args;
  args.a = a.untyped_data();
  args.sa = static_cast<const float*>(sa.untyped_data());
  args.b = b.untyped_data();
  args.sb = static_cast<const float*>(sb.untyped_data());
  args.bias = nullptr;
  args.c = nullptr;
  args.out = out.untyped_data();
  args.grp = GroupArgs{nullptr, 1, 0};
  args.m = static_cast<int>(a.dimensions()[0]);
  args.n = static_cast<int>(n);
  args.k = static_cast<int>(a.dimensions()[1]);
  args.mp = static_cast<int>((args.m + 3) / 4 * 4);
  args.kb = (args.k + 127) / 128;
  args.tma_store = GetEnvOverride().tma_store != 0;
  return args;
}

ffi::Error Fp8GemmNtImpl(cudaStream_t stream, int32_t device_ordinal, ffi::AnyBuffer a,
                         ffi::AnyBuffer sa, ffi::AnyBuffer b,
                         ffi::AnyBuffer sb, ffi::AnyBuffer bias,
                         ffi::AnyBuffer c, ffi::Result<ffi::AnyBuffer> out) {
  // ---- dtypes / ranks / shapes ----
  if (a.element_type() != ffi::DataType::F8E4M3FN || a.dimensions().size() != 2) {
    return InvalidArg("a must be a rank-2 float8_e4m3fn array, got shape " +
                      Dims(a));
  }
  if (b.element_type() != ffi::DataType::F8E4M3FN || b.dimensions().size() != 2) {
    return InvalidArg("b must be a rank-2 float8_e4m3fn array, got shape " +
                      Dims(b));
  }
  const int64_t m = a.dimensions()[0];
  const int64_t k = a.dimensions()[1];
  const int64_t n = b.dimensions()[0];
  if (b.dimensions()[1] != k) {
    return InvalidArg("a " + Dims(a) + " and b " + Dims(b) +
                      " disagree on K");
  }
  if (ffi::Error e = CheckCommon(a, sa, b, n, *out, "jax_deepgemm_fp8_gemm_nt"); e.failure()) {
    return e;
  }
  const int64_t kb = (k + 127) / 128;
  const int64_t nb = (n + 127) / 128;
  if (sb.element_type() != ffi::DataType::F32 || sb.dimensions().size() != 2 ||
      sb.dimensions()[0] != nb || sb.dimensions()[1] != kb) {
    return InvalidArg("sb must be float32 [ceil(N/128), ceil(K/128)] = [" +
                      std::to_string(nb) + ", " + std::to_string(kb) + "], got " +
                      Dims(sb));
  }
  const bool has_bias = !IsEmpty1D(bias);
  if (bias.element_type() != ffi::DataType::F32 ||
      (has_bias && (bias.dimensions().size() != 1 || bias.dimensions()[0] != n))) {
    return InvalidArg("bias must be float32 [N] or [0], got " + Dims(bias));
  }
  const bool has_c = !IsEmpty1D(c);
  if (c.element_type() != ffi::DataType::F32 ||
      (has_c && (c.dimensions().size() != 2 || c.dimensions()[0] != m ||
                 c.dimensions()[1] != n))) {
    return InvalidArg("c must be float32 [M, N] or [0], got " + Dims(c));
  }
  const ffi::DataType out_type = out->element_type();
  if (has_c && out_type != ffi::DataType::F32) {
    return InvalidArg("out must be float32 when c is given");
  }
  if (!Aligned(sb.untyped_data(), 4) || (has_bias && !Aligned(bias.untyped_data(), 8)) ||
      (has_c && !Aligned(c.untyped_data(), 8))) {
    return InvalidArg("operand buffers are insufficiently aligned");
  }

  const int device = static_cast<int>(device_ordinal);
  ScopedDevice scoped(device);
  int num_sms = 0;
  if (ffi::Error e = DeviceSms(scoped, device, &num_sms); e.failure()) return e;

  GemmConfig cfg;
  const KernelEntry* entry = nullptr;
  std::string error;
  if (!SelectConfig(m, n, k, 1, has_c, out_type == ffi::DataType::F32, num_sms, kDenseTable,
                    &cfg, &entry, &error)) {
    return InvalidArg(error);
  }

  LaunchArgs args = MakeArgs(a, sa, b, sb, n, *out);
  args.bias = has_bias ? static_cast<const float*>(bias.untyped_data()) : nullptr;
  args.c = has_c ? static_cast<const float*>(c.untyped_data()) : nullptr;
  const LaunchFn fn = out_type == ffi::DataType::BF16 ? entry->bf16 : entry->f32;
  return fn(args, stream, device, num_sms);
}

ffi::Error GroupedInvalid(const std::string& msg) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                    "jax_deepgemm_m_grouped_fp8_gemm_nt: " + msg);
}

// keep_unused_rows: `out` aliases the caller's buffer, whose rows in no group stay as they are.
ffi::Error MGroupedLaunch(cudaStream_t stream, int32_t device_ordinal, ffi::AnyBuffer a,
                          ffi::AnyBuffer sa, ffi::AnyBuffer b, ffi::AnyBuffer sb,
                          ffi::AnyBuffer sizes, ffi::Result<ffi::AnyBuffer> out,
                          int64_t masked_stride, int64_t expected_m, bool keep_unused_rows) {
  if (a.element_type() != ffi::DataType::F8E4M3FN || a.dimensions().size() != 2) {
    return GroupedInvalid("a must be a rank-2 float8_e4m3fn array, got shape " +
                          Dims(a));
  }
  if (b.element_type() != ffi::DataType::F8E4M3FN || b.dimensions().size() != 3) {
    return GroupedInvalid("b must be a rank-3 float8_e4m3fn array [G, N, K], got shape " +
                          Dims(b));
  }
  const int64_t m = a.dimensions()[0];
  const int64_t k = a.dimensions()[1];
  const int64_t g = b.dimensions()[0];
  const int64_t n = b.dimensions()[1];
  if (b.dimensions()[2] != k) {
    return GroupedInvalid("a " + Dims(a) + " and b " + Dims(b) +
                          " disagree on K");
  }
  if (g < 1 || g > kMaxGroups) {
    return GroupedInvalid("the number of groups must be in [1, " + std::to_string(kMaxGroups) +
                          "], got " + std::to_string(g));
  }
  if (g * n > INT32_MAX) return GroupedInvalid("G * N must be < 2^31");
  if (ffi::Error e = CheckCommon(a, sa, b, n, *out, "jax_deepgemm_m_grouped_fp8_gemm_nt");
      e.failure()) {
    return e;
  }
  const int64_t kb = (k + 127) / 128;
  const int64_t nb = (n + 127) / 128;
  if (sb.element_type() != ffi::DataType::F32 || sb.dimensions().size() != 3 ||
      sb.dimensions()[0] != g || sb.dimensions()[1] != nb || sb.dimensions()[2] != kb) {
    return GroupedInvalid("sb must be float32 [G, ceil(N/128), ceil(K/128)] = [" +
                          std::to_string(g) + ", " + std::to_string(nb) + ", " +
                          std::to_string(kb) + "], got " + Dims(sb));
  }
  if (sizes.element_type() != ffi::DataType::S32 || sizes.dimensions().size() != 1 ||
      sizes.dimensions()[0] != g) {
    return GroupedInvalid("group sizes must be int32 [G], got " + Dims(sizes));
  }
  if (masked_stride < 0 || (masked_stride > 0 && masked_stride * g != m)) {
    return GroupedInvalid("masked_stride must be 0 (contiguous) or M / G, got " +
                          std::to_string(masked_stride));
  }
  if (!Aligned(sb.untyped_data(), 4) || !Aligned(sizes.untyped_data(), 4)) {
    return GroupedInvalid("operand buffers are insufficiently aligned");
  }

  const int device = static_cast<int>(device_ordinal);
  ScopedDevice scoped(device);
  int num_sms = 0;
  if (ffi::Error e = DeviceSms(scoped, device, &num_sms); e.failure()) return e;

  // The config follows the rows the caller expects to be valid, not the buffer.
  const int64_t masked_rows = masked_stride <= 0 ? 0
                              : expected_m > 0 ? std::min(expected_m, masked_stride)
                                               : masked_stride;
  const int64_t rows = masked_rows > 0 ? masked_rows * g : m;
  GemmConfig cfg;
  const KernelEntry* entry = nullptr;
  std::string error;
  if (!SelectConfig(rows, n, k, g, false, out->element_type() == ffi::DataType::F32, num_sms,
                    kGroupedTable, &cfg, &entry, &error,
                    masked_rows)) {
    return GroupedInvalid(error);
  }
  LaunchArgs args = MakeArgs(a, sa, b, sb, n, *out);
  args.grp = GroupArgs{static_cast<const int*>(sizes.untyped_data()), static_cast<int>(g),
                       static_cast<int>(masked_stride), keep_unused_rows ? 1 : 0};
  const LaunchFn fn = out->element_type() == ffi::DataType::BF16 ? entry->bf16 : entry->f32;
  return fn(args, stream, device, num_sms);
}

ffi::Error MGroupedFp8GemmNtImpl(cudaStream_t stream, int32_t device_ordinal,
                                 ffi::AnyBuffer a, ffi::AnyBuffer sa, ffi::AnyBuffer b,
                                 ffi::AnyBuffer sb, ffi::AnyBuffer sizes,
                                 ffi::Result<ffi::AnyBuffer> out, int64_t masked_stride,
                                 int64_t expected_m) {
  return MGroupedLaunch(stream, device_ordinal, a, sa, b, sb, sizes, out, masked_stride,
                        expected_m, false);
}

// The same GEMM into `into`, which XLA aliases to `out` (input_output_aliases): only the
// rows of the groups are written.
ffi::Error MGroupedFp8GemmNtIntoImpl(cudaStream_t stream, int32_t device_ordinal,
                                     ffi::AnyBuffer a, ffi::AnyBuffer sa, ffi::AnyBuffer b,
                                     ffi::AnyBuffer sb, ffi::AnyBuffer sizes,
                                     ffi::AnyBuffer into, ffi::Result<ffi::AnyBuffer> out,
                                     int64_t masked_stride, int64_t expected_m) {
  if (into.untyped_data() != out->untyped_data() ||
      into.element_type() != out->element_type() ||
      into.size_bytes() != out->size_bytes()) {
    return GroupedInvalid("the output must alias the buffer it is written into");
  }
  return MGroupedLaunch(stream, device_ordinal, a, sa, b, sb, sizes, out, masked_stride,
                        expected_m, true);
}

ffi::Error KGroupedInvalid(const std::string& msg) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                    "jax_deepgemm_k_grouped_fp8_gemm_tn: " + msg);
}

ffi::Error KGroupedFp8GemmTnImpl(cudaStream_t stream, int32_t device_ordinal,
                                 ffi::AnyBuffer a, ffi::AnyBuffer sa, ffi::AnyBuffer b,
                                 ffi::AnyBuffer sb, ffi::AnyBuffer sizes, ffi::AnyBuffer c,
                                 ffi::Result<ffi::AnyBuffer> out) {
  if (a.element_type() != ffi::DataType::F8E4M3FN || a.dimensions().size() != 2 ||
      b.element_type() != ffi::DataType::F8E4M3FN || b.dimensions().size() != 2) {
    return KGroupedInvalid("aT and bT must be rank-2 float8_e4m3fn arrays, got " +
                           Dims(a) + " and " + Dims(b));
  }
  const int64_t n = a.dimensions()[0], t = a.dimensions()[1];
  const int64_t k = b.dimensions()[0];
  if (b.dimensions()[1] != t) {
    return KGroupedInvalid("aT " + Dims(a) + " and bT " + Dims(b) +
                           " disagree on T");
  }
  if (n < 1 || k < 1 || t < 16 || t % 16 != 0 || n > INT32_MAX || k > INT32_MAX ||
      t > INT32_MAX) {
    return KGroupedInvalid("need N, K >= 1 and T >= 16 with T % 16 == 0, got N=" +
                           std::to_string(n) + " K=" + std::to_string(k) +
                           " T=" + std::to_string(t));
  }
  if (sizes.element_type() != ffi::DataType::S32 || sizes.dimensions().size() != 1) {
    return KGroupedInvalid("group sizes must be int32 [G], got " + Dims(sizes));
  }
  const int64_t g = sizes.dimensions()[0];
  if (g < 1 || g > kMaxGroups) {
    return KGroupedInvalid("the number of groups must be in [1, " +
                           std::to_string(kMaxGroups) + "], got " + std::to_string(g));
  }
  const int64_t tb = (t + 127) / 128;
  if (sa.element_type() != ffi::DataType::F32 || sa.dimensions().size() != 2 ||
      sa.dimensions()[0] != tb || sa.dimensions()[1] != (n + 3) / 4 * 4) {
    return KGroupedInvalid("sa must be float32 [ceil(T/128), round_up(N, 4)], got " +
                           Dims(sa));
  }
  if (sb.element_type() != ffi::DataType::F32 || sb.dimensions().size() != 2 ||
      sb.dimensions()[0] != tb || sb.dimensions()[1] != (k + 3) / 4 * 4) {
    return KGroupedInvalid("sb must be float32 [ceil(T/128), round_up(K, 4)], got " +
                           Dims(sb));
  }
  const bool has_c = !IsEmpty1D(c);
  auto is_gnk = [&](const ffi::AnyBuffer& x) {
    const auto d = x.dimensions();
    return d.size() == 3 && d[0] == g && d[1] == n && d[2] == k;
  };
  if (c.element_type() != ffi::DataType::F32 || (has_c && !is_gnk(c))) {
    return KGroupedInvalid("c must be float32 [G, N, K] or [0], got " + Dims(c));
  }
  const bool out_bf16 = out->element_type() == ffi::DataType::BF16;
  if (!is_gnk(*out) || (out->element_type() != ffi::DataType::F32 && !out_bf16)) {
    return KGroupedInvalid("out must be float32 or bfloat16 [G, N, K], got " + Dims(*out));
  }
  if (has_c && out_bf16) {
    return KGroupedInvalid("accumulating into c needs a float32 out");
  }
  if (!Aligned(a.untyped_data(), 16) || !Aligned(b.untyped_data(), 16) ||
      !Aligned(sa.untyped_data(), 16) || !Aligned(sb.untyped_data(), 16) ||
      !Aligned(sizes.untyped_data(), 4) || (has_c && !Aligned(c.untyped_data(), 8)) ||
      !Aligned(out->untyped_data(), 8)) {
    return KGroupedInvalid("operand buffers are insufficiently aligned");
  }

  const int device = static_cast<int>(device_ordinal);
  ScopedDevice scoped(device);
  int num_sms = 0;
  if (ffi::Error e = DeviceSms(scoped, device, &num_sms); e.failure()) return e;

  std::string error;
  const KGroupedEntry* chosen = SelectKGrouped(g, n, k, num_sms, &error);
  if (chosen == nullptr) return ffi::Error(ffi::ErrorCode::kInvalidArgument, error);
  const KGroupedEntry& e = *chosen;
  KGroupedArgs args;
  args.a = a.untyped_data();
  args.sa = static_cast<const float*>(sa.untyped_data());
  args.b = b.untyped_data();
  args.sb = static_cast<const float*>(sb.untyped_data());
  args.c = has_c ? static_cast<const float*>(c.untyped_data()) : nullptr;
  args.out = out->untyped_data();
  args.grp = GroupArgs{static_cast<const int*>(sizes.untyped_data()), static_cast<int>(g), 0};
  args.n = static_cast<int>(n);
  args.k = static_cast<int>(k);
  args.t = static_cast<int>(t);
  return (out_bf16 ? e.bf16 : e.f32)(args, stream, device, num_sms);
}

}  // namespace

std::string SupportedGemmConfigs() { return SupportedConfigs(kDenseTable); }

std::string SupportedGroupedGemmConfigs() { return SupportedConfigs(kGroupedTable); }

bool InitializeDevices(const std::vector<int>& devices, std::string* error) {
  if (tma::get_encode_tiled() == nullptr) {
    *error = "jax_deepgemm: the CUDA driver has no cuTensorMapEncodeTiled";
    return false;
  }
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();
    *error = "jax_deepgemm: cudaGetDeviceCount failed";
    return false;
  }
  // Only the devices this process uses: touching others would open CUDA
  // contexts on GPUs that belong to other processes.
  for (int d : devices) {
    if (d < 0 || d >= count || d >= kMaxDevices) {
      *error = "jax_deepgemm: no CUDA device " + std::to_string(d) + " (have " +
               std::to_string(count) + ")";
      return false;
    }
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, d) != cudaSuccess || prop.major != 9) continue;
    ScopedDevice scoped(d);
    cudaError_t cerr = cudaSuccess;
    if (!scoped.ok() || GetNumSms(d, &cerr) <= 0) {
      *error = "jax_deepgemm: cannot set up device " + std::to_string(d);
      return false;
    }
    for (const KGroupedEntry& e : kKGroupedKernels) {
      for (ConfigureFn fn : {e.configure_f32, e.configure_bf16}) {
        if (ffi::Error err = fn(d); err.failure()) {
          *error = err.message();
          return false;
        }
      }
    }
    for (const KernelTable& table : {kDenseTable, kGroupedTable}) {
      for (const KernelEntry& e : table) {
        for (ConfigureFn fn : {e.configure_bf16, e.configure_f32}) {
          if (ffi::Error err = fn(d); err.failure()) {
            *error = err.message();
            return false;
          }
        }
      }
    }
  }
  return true;
}

// For the *_config queries: the current device's SMs (132, as on H100/H200
// SXM, if there is none).
int CurrentDeviceSms() {
  int device = 0, num_sms = 0;
  cudaError_t cerr = cudaGetDevice(&device);
  if (cerr == cudaSuccess) num_sms = GetNumSms(device, &cerr);
  if (num_sms <= 0) {
    (void)cudaGetLastError();
    num_sms = 132;
  }
  return num_sms;
}

bool GemmConfigString(int64_t m, int64_t n, int64_t k, int64_t groups, bool accumulate,
                      bool f32_out, bool masked, std::string* config, std::string* error) {
  if (m < 1 || n < 1 || k < 1 || groups < 0) {
    *error = "jax_deepgemm: gemm_config needs M, N, K >= 1 and groups >= 0";
    return false;
  }
  if (masked && groups == 0) {
    *error = "jax_deepgemm: gemm_config's masked layout needs groups >= 1";
    return false;
  }
  const int num_sms = CurrentDeviceSms();
  GemmConfig cfg;
  const KernelTable& table = groups > 0 ? kGroupedTable : kDenseTable;
  if (!SelectConfig(masked ? m * groups : m, n, k, groups > 0 ? groups : 1,
                    accumulate && groups == 0, f32_out || accumulate, num_sms, table, &cfg,
                    nullptr, error, masked ? m : 0)) {
    return false;
  }
  *config = ConfigName(cfg.block_m, cfg.block_n, cfg.stages, cfg.multicast);
  return true;
}

bool KGroupedConfigString(int64_t groups, int64_t n, int64_t k, std::string* config,
                          std::string* error) {
  if (groups < 1 || n < 1 || k < 1) {
    *error = "jax_deepgemm: k_grouped_config needs groups, N, K >= 1";
    return false;
  }
  const KGroupedEntry* e = SelectKGrouped(groups, n, k, CurrentDeviceSms(), error);
  if (e == nullptr) return false;
  *config = "block_m=" + std::to_string(e->block_m) + ",block_n=" + std::to_string(e->block_n) +
            ",stages=" + std::to_string(k_grouped_max_stages(e->block_m, e->block_n));
  return true;
}

}  // namespace jax_deepgemm

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    Fp8GemmNt, jax_deepgemm::Fp8GemmNtImpl,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
        .Ctx<xla::ffi::DeviceOrdinal>()
        .Arg<xla::ffi::AnyBuffer>()  // a
        .Arg<xla::ffi::AnyBuffer>()  // sa
        .Arg<xla::ffi::AnyBuffer>()  // b
        .Arg<xla::ffi::AnyBuffer>()  // sb
        .Arg<xla::ffi::AnyBuffer>()  // bias
        .Arg<xla::ffi::AnyBuffer>()  // c
        .Ret<xla::ffi::AnyBuffer>(),  // out
    {xla::ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    MGroupedFp8GemmNt, jax_deepgemm::MGroupedFp8GemmNtImpl,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
        .Ctx<xla::ffi::DeviceOrdinal>()
        .Arg<xla::ffi::AnyBuffer>()  // a
        .Arg<xla::ffi::AnyBuffer>()  // sa
        .Arg<xla::ffi::AnyBuffer>()  // b
        .Arg<xla::ffi::AnyBuffer>()  // sb
        .Arg<xla::ffi::AnyBuffer>()  // group sizes
        .Ret<xla::ffi::AnyBuffer>()  // out
        .Attr<int64_t>("masked_stride")
        .Attr<int64_t>("expected_m"),
    {xla::ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    MGroupedFp8GemmNtInto, jax_deepgemm::MGroupedFp8GemmNtIntoImpl,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
        .Ctx<xla::ffi::DeviceOrdinal>()
        .Arg<xla::ffi::AnyBuffer>()  // a
        .Arg<xla::ffi::AnyBuffer>()  // sa
        .Arg<xla::ffi::AnyBuffer>()  // b
        .Arg<xla::ffi::AnyBuffer>()  // sb
        .Arg<xla::ffi::AnyBuffer>()  // group sizes
        .Arg<xla::ffi::AnyBuffer>()  // into (aliased to out)
        .Ret<xla::ffi::AnyBuffer>()  // out
        .Attr<int64_t>("masked_stride")
        .Attr<int64_t>("expected_m"),
    {xla::ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    KGroupedFp8GemmTn, jax_deepgemm::KGroupedFp8GemmTnImpl,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
        .Ctx<xla::ffi::DeviceOrdinal>()
        .Arg<xla::ffi::AnyBuffer>()  // aT
        .Arg<xla::ffi::AnyBuffer>()  // sa
        .Arg<xla::ffi::AnyBuffer>()  // bT
        .Arg<xla::ffi::AnyBuffer>()  // sb
        .Arg<xla::ffi::AnyBuffer>()  // group sizes
        .Arg<xla::ffi::AnyBuffer>()  // c
        .Ret<xla::ffi::AnyBuffer>(),  // out
    {xla::ffi::Traits::kCmdBufferCompatible});
