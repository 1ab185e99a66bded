// XLA typed-FFI binding for the FP8 NT GEMM kernel.
//
// Custom call target: "jax_deepgemm_fp8_gemm_nt" (typed FFI, custom call
// API version 4). Operands (in order), no attributes:
//   a    F8E4M3FN [M, K]      row-major; M >= 1, K >= 16, K % 16 == 0
//   sa   F32      [KB, MP]    KB = ceil(K/128), MP = round_up(M, 4);
//                             scale of a[m, k] is sa[k/128, m]
//   b    F8E4M3FN [N, K]      row-major; N >= 1
//   sb   F32      [NB, KB]    NB = ceil(N/128); scale of b[n, k] is
//                             sb[n/128, k/128]
//   bias F32      [N] or [0]  ([0] = no bias)
//   c    F32      [M, N] or [0]  ([0] = no accumulation; if present the
//                             result must be F32; c may alias out)
// Result:
//   out  BF16 or F32 [M, N]
//   out = (a*sa) @ (b*sb)^T (+ bias[None, :]) (+ c)

#include <atomic>
#include <cctype>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "xla/ffi/api/ffi.h"

#include "common/tma.cuh"
#include "handlers.h"
#include "kernels/fp8_gemm.cuh"

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
  int m, n, k;
  int mp;  // padded row count of sa's inner dim
  int kb;  // number of 128-wide K blocks
};

using LaunchFn = ffi::Error (*)(const LaunchArgs&, cudaStream_t, int device,
                                int num_sms);

// Raises the kernel's dynamic shared-memory limit on `device` (the current
// device), once. Not allowed while a stream is being captured into a CUDA
// graph, so InitializeDevices() does it for every device ahead of time.
template <int BM, int BN, int ST, typename OutT>
ffi::Error ConfigureFp8GemmNt(int device) {
  using L = Fp8GemmLayout<BM, BN, ST>;
  static std::atomic<uint64_t> configured{0};
  const uint64_t bit = device < kMaxDevices ? (uint64_t{1} << device) : 0;
  if (bit != 0 && (configured.load(std::memory_order_acquire) & bit) != 0) {
    return ffi::Error::Success();
  }
  const cudaError_t err = cudaFuncSetAttribute(
      &fp8_gemm_nt_kernel<BM, BN, ST, OutT>,
      cudaFuncAttributeMaxDynamicSharedMemorySize, L::kDynamicSmem);
  if (err != cudaSuccess) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("jax_deepgemm: cudaFuncSetAttribute failed: ") +
                          cudaGetErrorString(err));
  }
  configured.fetch_or(bit, std::memory_order_acq_rel);
  return ffi::Error::Success();
}

template <int BM, int BN, int ST, typename OutT>
ffi::Error LaunchFp8GemmNt(const LaunchArgs& args, cudaStream_t stream,
                           int device, int num_sms) {
  using L = Fp8GemmLayout<BM, BN, ST>;
  auto* kernel = &fp8_gemm_nt_kernel<BM, BN, ST, OutT>;
  if (ffi::Error e = ConfigureFp8GemmNt<BM, BN, ST, OutT>(device); e.failure()) return e;

  CUtensorMap tmap_a, tmap_b, tmap_sa;
  CUresult res = tma::make_2d_tiled(&tmap_a, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1,
                                    args.a, args.m, args.k, BM, kBlockK,
                                    CU_TENSOR_MAP_SWIZZLE_128B);
  if (res == CUDA_SUCCESS) {
    res = tma::make_2d_tiled(&tmap_b, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, args.b,
                             args.n, args.k, BN, kBlockK,
                             CU_TENSOR_MAP_SWIZZLE_128B);
  }
  if (res == CUDA_SUCCESS) {
    res = tma::make_2d_tiled(&tmap_sa, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4,
                             args.sa, args.kb, args.mp, 1, BM,
                             CU_TENSOR_MAP_SWIZZLE_NONE);
  }
  if (res != CUDA_SUCCESS) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      "jax_deepgemm: cuTensorMapEncodeTiled failed (CUresult " +
                          std::to_string(static_cast<int>(res)) + ")");
  }

  const int64_t num_tiles = static_cast<int64_t>((args.m + BM - 1) / BM) *
                            ((args.n + BN - 1) / BN);
  if (num_tiles > INT32_MAX) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "jax_deepgemm: problem too large (tile count overflows int32)");
  }
  const int grid = static_cast<int>(num_tiles < num_sms ? num_tiles : num_sms);

  kernel<<<grid, L::kNumThreads, L::kDynamicSmem, stream>>>(
      tmap_a, tmap_b, tmap_sa, args.sb, args.bias, args.c,
      static_cast<OutT*>(args.out), args.m, args.n, args.k);
  const cudaError_t err = cudaGetLastError();
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
  LaunchFn bf16;
  LaunchFn f32;
  ConfigureFn configure_bf16;
  ConfigureFn configure_f32;
};

#define JAX_DEEPGEMM_ENTRY(BM, BN, ST)                                   \
  KernelEntry {                                                          \
    BM, BN, ST, &LaunchFp8GemmNt<BM, BN, ST, __nv_bfloat16>,             \
        &LaunchFp8GemmNt<BM, BN, ST, float>,                             \
        &ConfigureFp8GemmNt<BM, BN, ST, __nv_bfloat16>,                  \
        &ConfigureFp8GemmNt<BM, BN, ST, float>                           \
  }

// Every config is built with the most stages that fit; the heuristic below
// picks among them (JAX_DEEPGEMM_GEMM_CONFIG may force one).
#define JAX_DEEPGEMM_MAX_STAGES(BM, BN) JAX_DEEPGEMM_ENTRY(BM, BN, fp8_gemm_max_stages(BM, BN))

const KernelEntry kKernels[] = {
    JAX_DEEPGEMM_MAX_STAGES(64, 64),   JAX_DEEPGEMM_MAX_STAGES(64, 128),
    JAX_DEEPGEMM_MAX_STAGES(64, 192),  JAX_DEEPGEMM_MAX_STAGES(128, 64),
    JAX_DEEPGEMM_MAX_STAGES(128, 96),  JAX_DEEPGEMM_MAX_STAGES(128, 128),
    JAX_DEEPGEMM_MAX_STAGES(128, 160), JAX_DEEPGEMM_MAX_STAGES(128, 192),
    JAX_DEEPGEMM_ENTRY(128, 128, 4),
};

#undef JAX_DEEPGEMM_MAX_STAGES
#undef JAX_DEEPGEMM_ENTRY

const KernelEntry* FindKernel(int bm, int bn, int stages) {
  for (const KernelEntry& e : kKernels) {
    if (e.block_m == bm && e.block_n == bn && e.stages == stages) return &e;
  }
  return nullptr;
}

std::string SupportedConfigs() {
  std::string s;
  for (const KernelEntry& e : kKernels) {
    if (!s.empty()) s += "; ";
    s += "block_m=" + std::to_string(e.block_m) +
         ",block_n=" + std::to_string(e.block_n) +
         ",stages=" + std::to_string(e.stages);
  }
  return s;
}

// JAX_DEEPGEMM_GEMM_CONFIG, e.g. "block_m=64,block_n=128,stages=4". Keys are
// optional; missing ones fall back to the heuristic (stages: the maximum for
// the chosen block shape). Read once per process.
struct EnvOverride {
  bool present = false;
  std::string raw;
  std::string error;  // non-empty if unparsable
  int block_m = 0, block_n = 0, stages = 0;  // 0 = not forced
};

EnvOverride ParseEnvOverride() {
  EnvOverride o;
  const char* v = std::getenv("JAX_DEEPGEMM_GEMM_CONFIG");
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
    } else {
      o.error = "unknown key '" + key + "' (expected block_m, block_n, stages)";
      return o;
    }
  }
  return o;
}

const EnvOverride& GetEnvOverride() {
  static const EnvOverride o = ParseEnvOverride();
  return o;
}

struct GemmConfig {
  int block_m, block_n, stages;
};

// Picks (block_m, block_n). Problems that fill the GPU in over two waves use
// 128x128 tiles: measured fastest on H200 (BLOCK_N 160/192 lose 4-12% with
// this kernel's serial wgmma -> promotion loop). Problems of one wave or less
// (small M, decode) pick by a small cost model per 128-wide K step: a tile
// needs max(tensor-core time ~ BM*BN/32 clocks, load time ~ 4*(BM+BN) clocks)
// and more, smaller tiles keep more SMs pulling from HBM.
void HeuristicTile(int64_t m, int64_t n, int num_sms, int* bm_out, int* bn_out) {
  const int64_t tiles_128 = ((m + 127) / 128) * ((n + 127) / 128);
  if (m > 64 && tiles_128 > 2 * num_sms) {
    *bm_out = *bn_out = 128;
    return;
  }
  double best = 1e300;
  for (const KernelEntry& e : kKernels) {
    if (e.stages != fp8_gemm_max_stages(e.block_m, e.block_n)) continue;
    if (m <= 64 && e.block_m != 64) continue;  // don't waste half of every tile
    const int64_t tiles = ((m + e.block_m - 1) / e.block_m) * ((n + e.block_n - 1) / e.block_n);
    const int64_t waves = (tiles + num_sms - 1) / num_sms;
    // One math warpgroup can't hide its promotion behind the other's wgmma.
    const double math = e.block_m * e.block_n / 32.0 * (e.block_m == 64 ? 1.4 : 1.0);
    const double load = 4.0 * (e.block_m + e.block_n);
    const double cost = static_cast<double>(waves) * (math > load ? math : load);
    // Ties go to the larger tile (fewer bytes per FLOP).
    if (cost < best * 0.999 || (cost <= best * 1.001 && e.block_m * e.block_n > *bm_out * *bn_out)) {
      best = cost < best ? cost : best;
      *bm_out = e.block_m;
      *bn_out = e.block_n;
    }
  }
}

bool SelectConfig(int64_t m, int64_t n, int64_t /*k*/, int num_sms, GemmConfig* cfg,
                  const KernelEntry** entry, std::string* error) {
  int bm = 0, bn = 0;
  HeuristicTile(m, n, num_sms, &bm, &bn);
  int stages = 0;
  const EnvOverride& env = GetEnvOverride();
  if (env.present) {
    if (!env.error.empty()) {
      *error = "jax_deepgemm: invalid JAX_DEEPGEMM_GEMM_CONFIG='" + env.raw +
               "': " + env.error;
      return false;
    }
    if (env.block_m) bm = env.block_m;
    if (env.block_n) bn = env.block_n;
    if (env.stages) stages = env.stages;
  }
  if (stages == 0) stages = fp8_gemm_max_stages(bm, bn);
  const KernelEntry* e = FindKernel(bm, bn, stages);
  if (e == nullptr) {
    *error = "jax_deepgemm: JAX_DEEPGEMM_GEMM_CONFIG='" + env.raw +
             "' selects block_m=" + std::to_string(bm) +
             ",block_n=" + std::to_string(bn) +
             ",stages=" + std::to_string(stages) +
             ", which is not built; supported: " + SupportedConfigs();
    return false;
  }
  *cfg = GemmConfig{bm, bn, stages};
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

std::string DimsToString(const ffi::AnyBuffer& buf) {
  std::string s = "[";
  bool first = true;
  for (int64_t d : buf.dimensions()) {
    if (!first) s += ", ";
    s += std::to_string(d);
    first = false;
  }
  return s + "]";
}

bool IsEmpty1D(const ffi::AnyBuffer& buf) {
  const auto dims = buf.dimensions();
  return dims.size() == 1 && dims[0] == 0;
}

bool Aligned(const void* p, uintptr_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) % bytes) == 0;
}

// Restores the calling thread's current device on scope exit.
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
  bool ok() const { return ok_; }

 private:
  int prev_ = -1;
  bool ok_ = true;
  bool switched_ = false;
};

ffi::Error Fp8GemmNtImpl(cudaStream_t stream, int32_t device_ordinal, ffi::AnyBuffer a,
                         ffi::AnyBuffer sa, ffi::AnyBuffer b,
                         ffi::AnyBuffer sb, ffi::AnyBuffer bias,
                         ffi::AnyBuffer c, ffi::Result<ffi::AnyBuffer> out) {
  // ---- dtypes / ranks / shapes ----
  if (a.element_type() != ffi::DataType::F8E4M3FN || a.dimensions().size() != 2) {
    return InvalidArg("a must be a rank-2 float8_e4m3fn array, got shape " +
                      DimsToString(a));
  }
  if (b.element_type() != ffi::DataType::F8E4M3FN || b.dimensions().size() != 2) {
    return InvalidArg("b must be a rank-2 float8_e4m3fn array, got shape " +
                      DimsToString(b));
  }
  const int64_t m = a.dimensions()[0];
  const int64_t k = a.dimensions()[1];
  const int64_t n = b.dimensions()[0];
  if (b.dimensions()[1] != k) {
    return InvalidArg("a " + DimsToString(a) + " and b " + DimsToString(b) +
                      " disagree on K");
  }
  if (m < 1 || n < 1) return InvalidArg("M and N must be >= 1");
  if (k < 16 || k % 16 != 0) {
    return InvalidArg("K must be >= 16 and a multiple of 16, got " + std::to_string(k));
  }
  if (m > INT32_MAX || n > INT32_MAX || k > INT32_MAX) {
    return InvalidArg("M, N, K must each be < 2^31");
  }
  const int64_t kb = (k + 127) / 128;
  const int64_t nb = (n + 127) / 128;
  const int64_t mp = (m + 3) / 4 * 4;

  if (sa.element_type() != ffi::DataType::F32 || sa.dimensions().size() != 2 ||
      sa.dimensions()[0] != kb || sa.dimensions()[1] != mp) {
    return InvalidArg("sa must be float32 [ceil(K/128), round_up(M, 4)] = [" +
                      std::to_string(kb) + ", " + std::to_string(mp) + "], got " +
                      DimsToString(sa));
  }
  if (sb.element_type() != ffi::DataType::F32 || sb.dimensions().size() != 2 ||
      sb.dimensions()[0] != nb || sb.dimensions()[1] != kb) {
    return InvalidArg("sb must be float32 [ceil(N/128), ceil(K/128)] = [" +
                      std::to_string(nb) + ", " + std::to_string(kb) + "], got " +
                      DimsToString(sb));
  }
  const bool has_bias = !IsEmpty1D(bias);
  if (bias.element_type() != ffi::DataType::F32 ||
      (has_bias && (bias.dimensions().size() != 1 || bias.dimensions()[0] != n))) {
    return InvalidArg("bias must be float32 [N] or [0], got " + DimsToString(bias));
  }
  const bool has_c = !IsEmpty1D(c);
  if (c.element_type() != ffi::DataType::F32 ||
      (has_c && (c.dimensions().size() != 2 || c.dimensions()[0] != m ||
                 c.dimensions()[1] != n))) {
    return InvalidArg("c must be float32 [M, N] or [0], got " + DimsToString(c));
  }
  const ffi::DataType out_type = out->element_type();
  if ((out_type != ffi::DataType::BF16 && out_type != ffi::DataType::F32) ||
      out->dimensions().size() != 2 || out->dimensions()[0] != m ||
      out->dimensions()[1] != n) {
    return InvalidArg("out must be bfloat16 or float32 [M, N], got " +
                      DimsToString(*out));
  }
  if (has_c && out_type != ffi::DataType::F32) {
    return InvalidArg("out must be float32 when c is given");
  }
  // TMA needs 16-byte aligned global addresses; the epilogue uses 8-byte
  // vector accesses. XLA buffers are far more aligned than this.
  if (!Aligned(a.untyped_data(), 16) || !Aligned(b.untyped_data(), 16) ||
      !Aligned(sa.untyped_data(), 16) || !Aligned(sb.untyped_data(), 4) ||
      (has_bias && !Aligned(bias.untyped_data(), 8)) ||
      (has_c && !Aligned(c.untyped_data(), 8)) ||
      !Aligned(out->untyped_data(), 8)) {
    return InvalidArg("operand buffers are insufficiently aligned");
  }

  // ---- device ----
  // From XLA, not cudaStreamGetDevice: stream queries invalidate a CUDA-graph capture.
  const int device = static_cast<int>(device_ordinal);
  ScopedDevice scoped(device);
  if (!scoped.ok()) {
    return ffi::Error(ffi::ErrorCode::kInternal, "jax_deepgemm: cudaSetDevice failed");
  }
  cudaError_t cerr = cudaSuccess;
  const int num_sms = GetNumSms(device, &cerr);
  if (num_sms <= 0) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("jax_deepgemm: cannot query SM count: ") +
                          cudaGetErrorString(cerr));
  }

  GemmConfig cfg;
  const KernelEntry* entry = nullptr;
  std::string error;
  if (!SelectConfig(m, n, k, num_sms, &cfg, &entry, &error)) {
    return InvalidArg(error);
  }

  LaunchArgs args;
  args.a = a.untyped_data();
  args.sa = static_cast<const float*>(sa.untyped_data());
  args.b = b.untyped_data();
  args.sb = static_cast<const float*>(sb.untyped_data());
  args.bias = has_bias ? static_cast<const float*>(bias.untyped_data()) : nullptr;
  args.c = has_c ? static_cast<const float*>(c.untyped_data()) : nullptr;
  args.out = out->untyped_data();
  args.m = static_cast<int>(m);
  args.n = static_cast<int>(n);
  args.k = static_cast<int>(k);
  args.mp = static_cast<int>(mp);
  args.kb = static_cast<int>(kb);

  const LaunchFn fn = out_type == ffi::DataType::BF16 ? entry->bf16 : entry->f32;
  return fn(args, stream, device, num_sms);
}

}  // namespace

std::string SupportedGemmConfigs() { return SupportedConfigs(); }

bool InitializeDevices(std::string* error) {
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
  for (int d = 0; d < count && d < kMaxDevices; ++d) {
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, d) != cudaSuccess || prop.major != 9) continue;
    ScopedDevice scoped(d);
    cudaError_t cerr = cudaSuccess;
    if (!scoped.ok() || GetNumSms(d, &cerr) <= 0) {
      *error = "jax_deepgemm: cannot set up device " + std::to_string(d);
      return false;
    }
    for (const KernelEntry& e : kKernels) {
      for (ConfigureFn fn : {e.configure_bf16, e.configure_f32}) {
        if (ffi::Error err = fn(d); err.failure()) {
          *error = err.message();
          return false;
        }
      }
    }
  }
  return true;
}

bool GemmConfigString(int64_t m, int64_t n, int64_t k, std::string* config,
                      std::string* error) {
  if (m < 1 || n < 1 || k < 1) {
    *error = "jax_deepgemm: gemm_config needs M, N, K >= 1";
    return false;
  }
  // The config for the current device (132 SMs on H100/H200 SXM if unknown).
  int device = 0, num_sms = 0;
  cudaError_t cerr = cudaGetDevice(&device);
  if (cerr == cudaSuccess) num_sms = GetNumSms(device, &cerr);
  if (num_sms <= 0) {
    (void)cudaGetLastError();
    num_sms = 132;
  }
  GemmConfig cfg;
  if (!SelectConfig(m, n, k, num_sms, &cfg, nullptr, error)) return false;
  *config = "block_m=" + std::to_string(cfg.block_m) +
            ",block_n=" + std::to_string(cfg.block_n) +
            ",stages=" + std::to_string(cfg.stages);
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
