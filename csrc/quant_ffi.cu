// XLA typed-FFI bindings for the FP8 quantization kernels (kernels/quant.cuh).
//
// Custom call targets (typed FFI, custom call API version 4). Input x is
// bf16, f16 or f32, row-major; q is float8_e4m3fn, s float32. Attributes are
// int32 flags: use_ue8m0 (power-of-two scales), recip (quantize as
// x * (1 / scale) instead of x / scale; see quant.cuh), transpose.
//   "jax_deepgemm_per_token_cast"   x [R, C]    -> q [R, C],    s [R, ceil(C/128)]
//                                   attrs use_ue8m0, recip, s_mn_major (s's bytes
//                                   are [ceil(C/128), R]: the caller declares that
//                                   layout, the one the GEMMs read)
//   "jax_deepgemm_per_block_cast"   x [B, N, K] -> q [B, N, K], s [B, ceil(N/128), ceil(K/128)]
//                                   (transpose = 1: q [B, K, N], s [B, ceil(K/128), ceil(N/128)])
//                                   attrs use_ue8m0, recip, transpose
//   "jax_deepgemm_per_block_dual_cast"
//                                   x [B, N, K] -> q [B, N, K], qt [B, K, N] (q transposed),
//                                                  s [B, ceil(N/128), ceil(K/128)] (q's; qt's
//                                                  are their transpose), from one read of x
//                                   attrs use_ue8m0, recip
//   "jax_deepgemm_token_axis_cast"  x [A, T, N] -> q [A, T, N] (transpose = 0) or
//                                                  q [A, N, T] (transpose = 1),
//                                                  s [A, ceil(T/128), N]
//                                   attrs use_ue8m0, recip, transpose
//   "jax_deepgemm_dual_cast"        x [A, T, C], keep_rows int32 [A]
//                                               -> q [A, T, C],  s [A, T, ceil(C/128)]
//                                                  (per-token) and qt [A, C, T],
//                                                  st [A, ceil(T/128), C] (token axis, q
//                                                  transposed), from one read of x; rows
//                                                  t >= keep_rows[a] are cast as zeros
//                                   attrs use_ue8m0, recip_token, recip_axis (the recip
//                                   flags of the per-token and the token-axis cast),
//                                   s_mn_major (s's bytes are [ceil(C/128), A, T])
//   "jax_deepgemm_gathered_dual_cast"
//                                   x [A, S, C], rows int32 [A, T], keep_rows int32 [A]
//                                               -> the dual cast's four results of the
//                                                  [A, T, C] whose row t of slice a is
//                                                  x[a, rows[a, t]] (zeros where that is
//                                                  outside [0, S)), x read in place
//                                   attrs as the dual cast's
// Every size may be 0 (nothing is launched). The handlers check shapes and
// launch one kernel: no host synchronization, no allocation (CUDA-graph safe).

#include <cstdint>
#include <string>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "xla/ffi/api/ffi.h"

#include "common/ffi_util.h"
#include "handlers.h"
#include "kernels/quant.cuh"

namespace ffi = xla::ffi;

namespace jax_deepgemm {
namespace {

using quant::kGroup;
using quant::kThreads;

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool HasDims(const ffi::AnyBuffer& buf, std::initializer_list<int64_t> dims) {
  const auto have = buf.dimensions();
  if (have.size() != dims.size()) return false;
  size_t i = 0;
  for (int64_t d : dims) {
    if (have[i++] != d) return false;
  }
  return true;
}

ffi::Error InvalidArg(const char* op, const std::string& msg) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, std::string(op) + ": " + msg);
}

// x must be a bf16/f16/f32 array of the given rank.
ffi::Error CheckInput(const char* op, const ffi::AnyBuffer& x, size_t rank, const char* layout) {
  const ffi::DataType t = x.element_type();
  if ((t != ffi::DataType::BF16 && t != ffi::DataType::F16 && t != ffi::DataType::F32) ||
      x.dimensions().size() != rank) {
    return InvalidArg(op, std::string("x must be a bf16, f16 or f32 array ") + layout +
                              ", got shape " + Dims(x));
  }
  return ffi::Error::Success();
}

ffi::Error CheckOutputs(const char* op, const ffi::AnyBuffer& q,
                        std::initializer_list<int64_t> q_dims, const ffi::AnyBuffer& s,
                        std::initializer_list<int64_t> s_dims) {
  if (q.element_type() != ffi::DataType::F8E4M3FN || !HasDims(q, q_dims)) {
    return InvalidArg(op, "q must be float8_e4m3fn " + Dims(q_dims) + ", got " + Dims(q));
  }
  if (s.element_type() != ffi::DataType::F32 || !HasDims(s, s_dims)) {
    return InvalidArg(op, "s must be float32 " + Dims(s_dims) + ", got " + Dims(s));
  }
  return ffi::Error::Success();
}

ffi::Error LaunchStatus(const char* op) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string(op) + ": kernel launch failed: " + cudaGetErrorString(err));
  }
  return ffi::Error::Success();
}

// Calls fn(T{}) with T the C++ type of x's element type (checked before).
template <typename Fn>
ffi::Error DispatchInput(ffi::DataType t, Fn&& fn) {
  switch (t) {
    case ffi::DataType::BF16:
      return fn(__nv_bfloat16{});
    case ffi::DataType::F16:
      return fn(__half{});
    default:
      return fn(float{});
  }
}

// ---------------------------------------------------------------------------
// (a) per-token 1x128 cast
// ---------------------------------------------------------------------------
constexpr char kPerTokenOp[] = "jax_deepgemm_per_token_cast";

ffi::Error PerTokenCastImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer x,
                            ffi::Result<ffi::AnyBuffer> q, ffi::Result<ffi::AnyBuffer> s,
                            int32_t use_ue8m0, int32_t recip, int32_t s_mn_major) {
  if (ffi::Error e = CheckInput(kPerTokenOp, x, 2, "[R, C]"); e.failure()) return e;
  const int64_t rows = x.dimensions()[0], cols = x.dimensions()[1];
  const int64_t groups = CeilDiv(cols, kGroup);
  if (ffi::Error e = CheckOutputs(kPerTokenOp, *q, {rows, cols}, *s, {rows, groups});
      e.failure()) {
    return e;
  }
  if (rows == 0 || cols == 0) return ffi::Error::Success();
  const int64_t total_groups = rows * groups;
  if (total_groups >= INT32_MAX) return InvalidArg(kPerTokenOp, "too many 128-element groups");

  ScopedDevice scoped(device);
  if (!scoped.ok()) return ffi::Error(ffi::ErrorCode::kInternal, "cudaSetDevice failed");
  return DispatchInput(x.element_type(), [&](auto tag) -> ffi::Error {
    using T = decltype(tag);
    using S = quant::TokenCastShape<T>;
    const T* xp = static_cast<const T*>(x.untyped_data());
    uint8_t* qp = static_cast<uint8_t*>(q->untyped_data());
    float* sp = static_cast<float*>(s->untyped_data());
    const int blocks = static_cast<int>(CeilDiv(total_groups, S::kGroupsPerBlock));
    // 16-byte loads need every row to start 16-byte aligned.
    const bool aligned = cols % S::kVec == 0 && Aligned(xp, 16) && Aligned(qp, S::kVec);
    auto* kernel = s_mn_major ? (aligned ? &quant::per_token_cast_kernel<T, true, true>
                                         : &quant::per_token_cast_kernel<T, false, true>)
                              : (aligned ? &quant::per_token_cast_kernel<T, true, false>
                                         : &quant::per_token_cast_kernel<T, false, false>);
    kernel<<<blocks, kThreads, 0, stream>>>(xp, qp, sp, cols, static_cast<int>(groups),
                                            total_groups, use_ue8m0, recip,
                                            static_cast<int>(rows));
    return LaunchStatus(kPerTokenOp);
  });
}

// ---------------------------------------------------------------------------
// (b) per-block 128x128 cast, q and / or its transpose
// ---------------------------------------------------------------------------
constexpr char kPerBlockOp[] = "jax_deepgemm_per_block_cast";
constexpr char kPerBlockDualOp[] = "jax_deepgemm_per_block_dual_cast";

template <typename T, bool kPlain, bool kTransposed>
auto* PerBlockKernel(bool aligned) {
  return aligned ? &quant::per_block_cast_kernel<T, true, kPlain, kTransposed>
                 : &quant::per_block_cast_kernel<T, false, kPlain, kTransposed>;
}

// Both per-block handlers: one kernel writes q [B, N, K] and / or qt [B, K, N]
// (null: not written). s is [B, nb, kb], or [B, kb, nb] when qt is written alone
// (the cast of x's transpose).
ffi::Error PerBlockCast(cudaStream_t stream, int32_t device, const char* op,
                        const ffi::AnyBuffer& x, ffi::AnyBuffer* q, ffi::AnyBuffer* qt,
                        ffi::AnyBuffer& s, int32_t use_ue8m0, int32_t recip) {
  if (ffi::Error e = CheckInput(op, x, 3, "[B, N, K]"); e.failure()) return e;
  const int64_t batch = x.dimensions()[0], n = x.dimensions()[1], k = x.dimensions()[2];
  const int64_t nb = CeilDiv(n, kGroup), kb = CeilDiv(k, kGroup);
  ffi::Error shapes = q ? CheckOutputs(op, *q, {batch, n, k}, s, {batch, nb, kb})
                        : CheckOutputs(op, *qt, {batch, k, n}, s, {batch, kb, nb});
  if (shapes.success() && q && qt) {
    shapes = CheckOutputs(op, *qt, {batch, k, n}, s, {batch, nb, kb});
  }
  if (shapes.failure()) return shapes;
  if (batch == 0 || n == 0 || k == 0) return ffi::Error::Success();
  // The kernel addresses a block's elements with 32-bit offsets (row * k, and
  // transposed row * n).
  if (n >= INT32_MAX || k * kGroup >= INT32_MAX || (qt && n * kGroup >= INT32_MAX) ||
      batch * nb * kb >= INT32_MAX) {
    return InvalidArg(op, "x " + Dims(x) + " is too large");
  }

  ScopedDevice scoped(device);
  if (!scoped.ok()) return ffi::Error(ffi::ErrorCode::kInternal, "cudaSetDevice failed");
  return DispatchInput(x.element_type(), [&](auto tag) -> ffi::Error {
    using T = decltype(tag);
    constexpr int kVec = quant::Elem<T>::kVec;
    const T* xp = static_cast<const T*>(x.untyped_data());
    uint8_t* qp = q ? static_cast<uint8_t*>(q->untyped_data()) : nullptr;
    uint8_t* qtp = qt ? static_cast<uint8_t*>(qt->untyped_data()) : nullptr;
    float* sp = static_cast<float*>(s.untyped_data());
    // Loads: 16-byte chunks along K. Stores: q's kVec-byte chunks along K; qt's
    // 16-byte pieces along N when whole pieces fit.
    const bool aligned = k % kVec == 0 && Aligned(xp, 16) && (!qp || Aligned(qp, kVec));
    const int vec_store_t = qtp && n % 16 == 0 && Aligned(qtp, 16);
    auto* kernel = !qtp  ? PerBlockKernel<T, true, false>(aligned)
                   : !qp ? PerBlockKernel<T, false, true>(aligned)
                         : PerBlockKernel<T, true, true>(aligned);
    kernel<<<static_cast<int>(batch * nb * kb), kThreads, 0, stream>>>(
        xp, qp, qtp, sp, static_cast<int>(n), static_cast<int>(k), static_cast<int>(nb),
        static_cast<int>(kb), use_ue8m0, recip, vec_store_t);
    return LaunchStatus(op);
  });
}

// q, or (transpose = 1) its transpose alone.
ffi::Error PerBlockCastImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer x,
                            ffi::Result<ffi::AnyBuffer> q, ffi::Result<ffi::AnyBuffer> s,
                            int32_t use_ue8m0, int32_t recip, int32_t transpose) {
  return PerBlockCast(stream, device, kPerBlockOp, x, transpose ? nullptr : &*q,
                      transpose ? &*q : nullptr, *s, use_ue8m0, recip);
}

// Both, from one read of x.
ffi::Error PerBlockDualCastImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer x,
                                ffi::Result<ffi::AnyBuffer> q, ffi::Result<ffi::AnyBuffer> qt,
                                ffi::Result<ffi::AnyBuffer> s, int32_t use_ue8m0,
                                int32_t recip) {
  return PerBlockCast(stream, device, kPerBlockDualOp, x, &*q, &*qt, *s, use_ue8m0, recip);
}

// ---------------------------------------------------------------------------
// (c) token-axis 128x1 cast, optionally writing q transposed
// ---------------------------------------------------------------------------
constexpr char kTokenAxisOp[] = "jax_deepgemm_token_axis_cast";

ffi::Error TokenAxisCastImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer x,
                             ffi::Result<ffi::AnyBuffer> q, ffi::Result<ffi::AnyBuffer> s,
                             int32_t use_ue8m0, int32_t recip, int32_t transpose) {
  if (ffi::Error e = CheckInput(kTokenAxisOp, x, 3, "[A, T, N]"); e.failure()) return e;
  const int64_t batch = x.dimensions()[0], t = x.dimensions()[1], n = x.dimensions()[2];
  const int64_t tg = CeilDiv(t, kGroup);
  const ffi::Error shapes =
      transpose ? CheckOutputs(kTokenAxisOp, *q, {batch, n, t}, *s, {batch, tg, n})
                : CheckOutputs(kTokenAxisOp, *q, {batch, t, n}, *s, {batch, tg, n});
  if (shapes.failure()) return shapes;
  if (batch == 0 || t == 0 || n == 0) return ffi::Error::Success();

  ScopedDevice scoped(device);
  if (!scoped.ok()) return ffi::Error(ffi::ErrorCode::kInternal, "cudaSetDevice failed");
  return DispatchInput(x.element_type(), [&](auto tag) -> ffi::Error {
    using T = decltype(tag);
    using S = quant::TokenAxisShape<T>;
    const int64_t nt = CeilDiv(n, S::kTileN);
    // The kernel addresses a tile's elements with 32-bit offsets (row * n,
    // and transposed row * t).
    if (t * S::kTileN >= INT32_MAX || n * kGroup >= INT32_MAX || batch * tg * nt >= INT32_MAX) {
      return InvalidArg(kTokenAxisOp, "x " + Dims(x) + " is too large");
    }
    const T* xp = static_cast<const T*>(x.untyped_data());
    uint8_t* qp = static_cast<uint8_t*>(q->untyped_data());
    float* sp = static_cast<float*>(s->untyped_data());
    // Loads: 16-byte chunks along N. Stores: kVec-byte chunks along N, or
    // (transposed) 16-byte pieces along T when whole pieces fit.
    const bool aligned =
        n % S::kVec == 0 && Aligned(xp, 16) && (transpose || Aligned(qp, S::kVec));
    const int vec_store_t = transpose && t % 16 == 0 && Aligned(qp, 16);
    auto* kernel =
        transpose ? (aligned ? &quant::token_axis_cast_kernel<T, true, true>
                             : &quant::token_axis_cast_kernel<T, false, true>)
                  : (aligned ? &quant::token_axis_cast_kernel<T, true, false>
                             : &quant::token_axis_cast_kernel<T, false, false>);
    kernel<<<static_cast<int>(batch * tg * nt), S::kThreads, 0, stream>>>(
        xp, qp, sp, static_cast<int>(t), static_cast<int>(n), static_cast<int>(tg),
        static_cast<int>(nt), use_ue8m0, recip, vec_store_t);
    return LaunchStatus(kTokenAxisOp);
  });
}


// ---------------------------------------------------------------------------
// (d) both activation casts from one read: per-token q, s and token-axis qt, st
// ---------------------------------------------------------------------------
constexpr char kDualOp[] = "jax_deepgemm_dual_cast";

// rows: the gathered cast's row indices (int32 [A, T]), or nullptr (row t is x's row t);
// row_scale: with rows, f32 [A, T] (each gathered row's factor) or [A, 0] (none).
ffi::Error DualCast(cudaStream_t stream, int32_t device, const char* op, ffi::AnyBuffer x,
                    const ffi::AnyBuffer* rows, const ffi::AnyBuffer* row_scale,
                    ffi::AnyBuffer keep_rows,
                    ffi::Result<ffi::AnyBuffer> q, ffi::Result<ffi::AnyBuffer> s,
                    ffi::Result<ffi::AnyBuffer> qt, ffi::Result<ffi::AnyBuffer> st,
                    int32_t use_ue8m0, int32_t recip_token, int32_t recip_axis,
                    int32_t s_mn_major) {
  if (ffi::Error e = CheckInput(op, x, 3, rows ? "[A, S, C]" : "[A, T, C]"); e.failure()) {
    return e;
  }
  const int64_t batch = x.dimensions()[0], c = x.dimensions()[2];
  const int64_t src_t = x.dimensions()[1];
  if (rows && (rows->element_type() != ffi::DataType::S32 || rows->dimensions().size() != 2 ||
               rows->dimensions()[0] != batch)) {
    return InvalidArg(op, "rows must be int32 [" + std::to_string(batch) + ", T], got " +
                              Dims(*rows));
  }
  const int64_t t = rows ? rows->dimensions()[1] : src_t;
  if (row_scale && (row_scale->element_type() != ffi::DataType::F32 ||
                    !(HasDims(*row_scale, {batch, t}) || HasDims(*row_scale, {batch, 0})))) {
    return InvalidArg(op, "row_scale must be f32 [" + std::to_string(batch) + ", " +
                              std::to_string(t) + "] or [" + std::to_string(batch) +
                              ", 0], got " + Dims(*row_scale));
  }
  const bool scaled = row_scale && row_scale->element_count() > 0;
  const int64_t tg = CeilDiv(t, kGroup), cg = CeilDiv(c, kGroup);
  if (ffi::Error e = CheckOutputs(op, *q, {batch, t, c}, *s, {batch, t, cg}); e.failure()) {
    return e;
  }
  if (ffi::Error e = CheckOutputs(op, *qt, {batch, c, t}, *st, {batch, tg, c}); e.failure()) {
    return e;
  }
  if (keep_rows.element_type() != ffi::DataType::S32 || !HasDims(keep_rows, {batch})) {
    return InvalidArg(op, "keep_rows must be int32 [" + std::to_string(batch) + "], got " +
                              Dims(keep_rows));
  }
  if (batch == 0 || t == 0 || c == 0) return ffi::Error::Success();
  // The kernel addresses a tile's elements with 32-bit offsets (row * c, and
  // transposed row * t; gathered rows' offsets are 64-bit).
  if (t * kGroup >= INT32_MAX || c * kGroup >= INT32_MAX || batch * tg * cg >= INT32_MAX ||
      src_t >= INT32_MAX) {
    return InvalidArg(op, "x " + Dims(x) + " is too large");
  }

  ScopedDevice scoped(device);
  if (!scoped.ok()) return ffi::Error(ffi::ErrorCode::kInternal, "cudaSetDevice failed");
  return DispatchInput(x.element_type(), [&](auto tag) -> ffi::Error {
    using T = decltype(tag);
    using S = quant::DualCastShape<T>;
    const T* xp = static_cast<const T*>(x.untyped_data());
    uint8_t* qp = static_cast<uint8_t*>(q->untyped_data());
    float* sp = static_cast<float*>(s->untyped_data());
    uint8_t* qtp = static_cast<uint8_t*>(qt->untyped_data());
    float* stp = static_cast<float*>(st->untyped_data());
    // Loads: 16-byte chunks along C; q's stores kVec-byte chunks along C; qt's
    // 16-byte pieces along T when whole pieces fit.
    const bool aligned = c % S::kVec == 0 && Aligned(xp, 16) && Aligned(qp, S::kVec);
    const int vec_store_t = t % 16 == 0 && Aligned(qtp, 16);
    auto pick = [&](auto gather) {
      constexpr bool kGather = decltype(gather)::value;
      return s_mn_major ? (aligned ? &quant::dual_cast_kernel<T, true, true, kGather>
                                   : &quant::dual_cast_kernel<T, false, true, kGather>)
                        : (aligned ? &quant::dual_cast_kernel<T, true, false, kGather>
                                   : &quant::dual_cast_kernel<T, false, false, kGather>);
    };
    auto* kernel = rows ? pick(std::true_type{}) : pick(std::false_type{});
    kernel<<<static_cast<int>(batch * tg * cg), S::kThreads, 0, stream>>>(
        xp, static_cast<const int*>(keep_rows.untyped_data()), qp, sp, qtp, stp,
        static_cast<int>(t), static_cast<int>(c), static_cast<int>(tg),
        static_cast<int>(cg), use_ue8m0, recip_token, recip_axis, vec_store_t, batch * t,
        rows ? static_cast<const int*>(rows->untyped_data()) : nullptr,
        static_cast<int>(src_t),
        scaled ? static_cast<const float*>(row_scale->untyped_data()) : nullptr);
    return LaunchStatus(op);
  });
}

ffi::Error DualCastImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer x,
                        ffi::AnyBuffer keep_rows, ffi::Result<ffi::AnyBuffer> q,
                        ffi::Result<ffi::AnyBuffer> s, ffi::Result<ffi::AnyBuffer> qt,
                        ffi::Result<ffi::AnyBuffer> st, int32_t use_ue8m0, int32_t recip_token,
                        int32_t recip_axis, int32_t s_mn_major) {
  return DualCast(stream, device, kDualOp, x, nullptr, nullptr, keep_rows, q, s, qt, st,
                  use_ue8m0, recip_token, recip_axis, s_mn_major);
}

constexpr char kGatheredDualOp[] = "jax_deepgemm_gathered_dual_cast";

ffi::Error GatheredDualCastImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer x,
                                ffi::AnyBuffer rows, ffi::AnyBuffer row_scale,
                                ffi::AnyBuffer keep_rows, ffi::Result<ffi::AnyBuffer> q,
                                ffi::Result<ffi::AnyBuffer> s, ffi::Result<ffi::AnyBuffer> qt,
                                ffi::Result<ffi::AnyBuffer> st, int32_t use_ue8m0,
                                int32_t recip_token, int32_t recip_axis, int32_t s_mn_major) {
  return DualCast(stream, device, kGatheredDualOp, x, &rows, &row_scale, keep_rows, q, s, qt,
                  st, use_ue8m0, recip_token, recip_axis, s_mn_major);
}

}  // namespace
}  // namespace jax_deepgemm

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    PerTokenCastFp8, jax_deepgemm::PerTokenCastImpl,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
        .Ctx<xla::ffi::DeviceOrdinal>()
        .Arg<xla::ffi::AnyBuffer>()  // x
        .Ret<xla::ffi::AnyBuffer>()  // q
        .Ret<xla::ffi::AnyBuffer>()  // s
        .Attr<int32_t>("use_ue8m0")
        .Attr<int32_t>("recip")
        .Attr<int32_t>("s_mn_major"),
    {xla::ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    PerBlockCastFp8, jax_deepgemm::PerBlockCastImpl,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
        .Ctx<xla::ffi::DeviceOrdinal>()
        .Arg<xla::ffi::AnyBuffer>()  // x
        .Ret<xla::ffi::AnyBuffer>()  // q
        .Ret<xla::ffi::AnyBuffer>()  // s
        .Attr<int32_t>("use_ue8m0")
        .Attr<int32_t>("recip")
        .Attr<int32_t>("transpose"),
    {xla::ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    PerBlockDualCastFp8, jax_deepgemm::PerBlockDualCastImpl,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
        .Ctx<xla::ffi::DeviceOrdinal>()
        .Arg<xla::ffi::AnyBuffer>()  // x
        .Ret<xla::ffi::AnyBuffer>()  // q
        .Ret<xla::ffi::AnyBuffer>()  // qt
        .Ret<xla::ffi::AnyBuffer>()  // s
        .Attr<int32_t>("use_ue8m0")
        .Attr<int32_t>("recip"),
    {xla::ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    TokenAxisCastFp8, jax_deepgemm::TokenAxisCastImpl,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
        .Ctx<xla::ffi::DeviceOrdinal>()
        .Arg<xla::ffi::AnyBuffer>()  // x
        .Ret<xla::ffi::AnyBuffer>()  // q
        .Ret<xla::ffi::AnyBuffer>()  // s
        .Attr<int32_t>("use_ue8m0")
        .Attr<int32_t>("recip")
        .Attr<int32_t>("transpose"),
    {xla::ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    DualCastFp8, jax_deepgemm::DualCastImpl,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
        .Ctx<xla::ffi::DeviceOrdinal>()
        .Arg<xla::ffi::AnyBuffer>()  // x
        .Arg<xla::ffi::AnyBuffer>()  // keep_rows
        .Ret<xla::ffi::AnyBuffer>()  // q
        .Ret<xla::ffi::AnyBuffer>()  // s
        .Ret<xla::ffi::AnyBuffer>()  // qt
        .Ret<xla::ffi::AnyBuffer>()  // st
        .Attr<int32_t>("use_ue8m0")
        .Attr<int32_t>("recip_token")
        .Attr<int32_t>("recip_axis")
        .Attr<int32_t>("s_mn_major"),
    {xla::ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    GatheredDualCastFp8, jax_deepgemm::GatheredDualCastImpl,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
        .Ctx<xla::ffi::DeviceOrdinal>()
        .Arg<xla::ffi::AnyBuffer>()  // x
        .Arg<xla::ffi::AnyBuffer>()  // rows
        .Arg<xla::ffi::AnyBuffer>()  // row_scale
        .Arg<xla::ffi::AnyBuffer>()  // keep_rows
        .Ret<xla::ffi::AnyBuffer>()  // q
        .Ret<xla::ffi::AnyBuffer>()  // s
        .Ret<xla::ffi::AnyBuffer>()  // qt
        .Ret<xla::ffi::AnyBuffer>()  // st
        .Attr<int32_t>("use_ue8m0")
        .Attr<int32_t>("recip_token")
        .Attr<int32_t>("recip_axis")
        .Attr<int32_t>("s_mn_major"),
    {xla::ffi::Traits::kCmdBufferCompatible});
