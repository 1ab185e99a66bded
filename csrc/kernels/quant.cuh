// FP8 (e4m3) quantization kernels with DeepSeek-V3's fine-grained scales.
//
// Four casts, all memory-bound (they read the input once, write q and the
// scales once):
//   per_token_cast_kernel    x [R, C]    -> q [R, C],          s [R, ceil(C/128)]
//                            (one scale per 1x128 group along the last axis;
//                            kMnMajor: s is written MN-major, [ceil(C/128), R],
//                            the layout the GEMMs read)
//   per_block_cast_kernel    x [B, N, K] -> q [B, N, K],       s [B, ceil(N/128), ceil(K/128)]
//                            (one scale per 128x128 block; the transposed
//                            variant writes q [B, K, N], s [B, ceil(K/128), ceil(N/128)],
//                            the dual one both q and qT with s as above, from one read)
//   token_axis_cast_kernel   x [A, T, N] -> q [A, T, N] or qT [A, N, T],
//                                           s [A, ceil(T/128), N]
//                            (one scale per 128x1 group along the token axis;
//                            the transposed variant writes q's transpose)
//   dual_cast_kernel         x [A, T, C] -> (a)'s q, s and (c)'s transposed qT, s
//                            from one read of x
// Inputs are bf16, f16 or f32; ragged last groups (sizes not multiples of
// 128) are allowed: the missing elements count as zeros for the amax and are
// not written.
//
// Bitwise equal to jax_deepgemm/quant_kernels.py's pure-JAX reference as XLA
// compiles it for the GPU, which is not the textbook arithmetic:
//   * amax: NaN-propagating max of |x| (XLA's maximum), here max.NaN.f32.
//   * scale = max(amax, 1e-4) / 448: XLA's algebraic simplifier rewrites a
//     division by a constant into a multiplication by its (f32-rounded)
//     inverse, so scale = max(amax, 1e-4f) * fl(1/448).
//   * UE8M0: the same bit operations as the reference (round the scale up to
//     a power of two).
//   * q = x / scale: XLA's GPU backend compiles f32 division to div.full.f32
//     (LLVM -nvptx-prec-divf32=1; at most 2 ulp, not IEEE). We emit the same
//     PTX instruction, or, for finite scales, x * rcp.approx(scale), which
//     gave the same bits there (quantize_chunk_rcp). (XLA on CPU instead
//     computes x * (1 / scale); should a later XLA do that on GPU too, `recip`
//     selects that form: r = 1 / scale
//     as LLVM lowers it there (rcp.approx.f32), q = x * r. The Python side
//     probes which form XLA uses.)
//   * f32 -> e4m3: XLA emits cvt.rn.satfinite.e4m3x2.f32 and then turns
//     results whose input magnitude is above 464 (including inf) into NaN
//     with the input's sign (0x7F | sign). We do the same. (For finite inputs
//     |x / scale| <= 448 * (1 + 2^-21), so this only matters for inf/NaN
//     inputs, e.g. x/scale = inf with UE8M0 scales of NaN groups.)
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace jax_deepgemm {
namespace quant {

constexpr int kGroup = 128;      // elements per scale group (and block side)
constexpr int kThreads = 256;    // threads per CTA (the token-axis cast: TokenAxisShape)
constexpr int kWarps = kThreads / 32;
constexpr float kAmaxFloor = 1e-4f;           // quant.AMAX_FLOOR as f32
constexpr float kInvFp8Max = 1.0f / 448.0f;   // XLA's folded constant fl(1/448)
constexpr float kOverflow = 464.0f;           // 448 + half an e4m3 ulp

// ---------------------------------------------------------------------------
// Arithmetic (each a single PTX instruction, so that it matches XLA's code)
// ---------------------------------------------------------------------------
__device__ __forceinline__ float max_nan(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

__device__ __forceinline__ float div_full(float a, float b) {
  float r;
  asm("div.full.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

// 1 / b as LLVM emits it for XLA (-nvptx-prec-divf32=1 turns fdiv 1.0, b into
// rcp.approx.f32, "the same result as div.full(1.0f, b)").
__device__ __forceinline__ float rcp_approx(float b) {
  float r;
  asm("rcp.approx.f32 %0, %1;" : "=f"(r) : "f"(b));
  return r;
}

// Two floats -> two e4m3 bytes (lo in bits 0..7, hi in bits 8..15).
__device__ __forceinline__ uint32_t cvt_e4m3x2(float lo, float hi) {
  uint16_t r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
  return r;
}

// What XLA's convert gives for |v| > 464 (inf included): NaN with v's sign.
__device__ __forceinline__ uint32_t e4m3_overflow(float v) {
  return 0x7Fu | ((__float_as_uint(v) >> 24) & 0x80u);
}

__device__ __forceinline__ float group_scale(float amax, bool ue8m0) {
  float s = __fmul_rn(max_nan(amax, kAmaxFloor), kInvFp8Max);
  if (ue8m0) {
    // Round up to a power of two on the bits, exactly as the reference does;
    // NaN and inf stay (NaN's exponent add would carry into the sign: -0.0).
    const uint32_t bits = __float_as_uint(s);
    const uint32_t exp = bits & 0x7F800000u;
    if (exp != 0x7F800000u) {
      s = __uint_as_float((bits & 0x007FFFFFu) != 0 ? exp + 0x00800000u : exp);
    }
  }
  return s;
}

// ---------------------------------------------------------------------------
// 16-byte chunks of input: kVec = 8 (bf16/f16) or 4 (f32) elements
// ---------------------------------------------------------------------------
// Word i of a chunk (i a compile-time constant after unrolling: no local memory).
__device__ __forceinline__ uint32_t word(const uint4& c, int i) {
  return i == 0 ? c.x : i == 1 ? c.y : i == 2 ? c.z : c.w;
}
__device__ __forceinline__ void or_word(uint4& c, int i, uint32_t v) {
  if (i == 0) c.x |= v;
  else if (i == 1) c.y |= v;
  else if (i == 2) c.z |= v;
  else c.w |= v;
}

template <typename T>
struct Elem;
template <>
struct Elem<__nv_bfloat16> {
  static constexpr int kVec = 8;
  // bf16 -> f32 is exact: the bf16 bits are the top half of the f32.
  __device__ static float get(const uint4& c, int i) {
    const uint32_t w = word(c, i / 2);
    return __uint_as_float((i & 1) ? (w & 0xFFFF0000u) : (w << 16));
  }
  // Per element of two words: max(|a|, |b|), NaN-propagating.
  __device__ static uint32_t abs_max(uint32_t a, uint32_t b) {
    uint32_t r;
    asm("max.NaN.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a & 0x7FFF7FFFu), "r"(b & 0x7FFF7FFFu));
    return r;
  }
  // Both elements of a word times s in f32, rounded to nearest even.
  __device__ static uint32_t scaled(uint32_t w, float s) {
    const __nv_bfloat162 r = __floats2bfloat162_rn(__uint_as_float(w << 16) * s,
                                                   __uint_as_float(w & 0xFFFF0000u) * s);
    return *reinterpret_cast<const uint32_t*>(&r);
  }
};
template <>
struct Elem<__half> {
  static constexpr int kVec = 8;
  __device__ static float get(const uint4& c, int i) {
    const uint32_t w = word(c, i / 2);
    return __half2float(__ushort_as_half(static_cast<unsigned short>((i & 1) ? (w >> 16) : w)));
  }
  __device__ static uint32_t abs_max(uint32_t a, uint32_t b) {
    uint32_t r;
    asm("max.NaN.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a & 0x7FFF7FFFu), "r"(b & 0x7FFF7FFFu));
    return r;
  }
  __device__ static uint32_t scaled(uint32_t w, float s) {
    const __half2 h = *reinterpret_cast<const __half2*>(&w);
    const __half2 r = __floats2half2_rn(__low2float(h) * s, __high2float(h) * s);
    return *reinterpret_cast<const uint32_t*>(&r);
  }
};
template <>
struct Elem<float> {
  static constexpr int kVec = 4;
  __device__ static float get(const uint4& c, int i) { return __uint_as_float(word(c, i)); }
  __device__ static uint32_t abs_max(uint32_t a, uint32_t b) {
    return __float_as_uint(
        max_nan(__uint_as_float(a & 0x7FFFFFFFu), __uint_as_float(b & 0x7FFFFFFFu)));
  }
  __device__ static uint32_t scaled(uint32_t w, float s) {
    return __float_as_uint(__uint_as_float(w) * s);
  }
};

// Loads the chunk at `p` of which the first `valid` elements exist (valid <= 0:
// none; the rest read as zeros). kAligned: `p` is 16-byte aligned and a chunk
// is either entirely valid or entirely not (the row length is a multiple of
// kVec), so one 16-byte load does. Otherwise element by element.
template <typename T, bool kAligned>
__device__ __forceinline__ uint4 load_chunk(const T* p, int64_t valid) {
  uint4 c = make_uint4(0, 0, 0, 0);
  if constexpr (kAligned) {
    // Read once: keep it out of L1. (Not volatile: the compiler may, and
    // should, issue all of a thread's loads before the first use.)
    if (valid > 0) {
      asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
          : "=r"(c.x), "=r"(c.y), "=r"(c.z), "=r"(c.w)
          : "l"(p));
    }
  } else {
    constexpr int kVec = Elem<T>::kVec;
    constexpr int kBits = 8 * sizeof(T);
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      if (i < valid) {
        uint32_t v;
        if constexpr (sizeof(T) == 4) {
          v = __ldg(reinterpret_cast<const unsigned int*>(p) + i);
        } else {
          v = __ldg(reinterpret_cast<const unsigned short*>(p) + i);
        }
        or_word(c, i * kBits / 32, v << ((i * kBits) % 32));
      }
    }
  }
  return c;
}

// amax of a chunk's elements (zeros of missing elements included: harmless).
template <typename T>
__device__ __forceinline__ float chunk_amax(const uint4& c, float m) {
#pragma unroll
  for (int i = 0; i < Elem<T>::kVec; ++i) m = max_nan(m, fabsf(Elem<T>::get(c, i)));
  return m;
}

// Quantizes a chunk's kVec elements with one scale `s` per element (`scale`
// points to kVec scales, or to one repeated when kOneScale). The e4m3 bytes
// come back packed little-endian in kVec / 4 words.
template <typename T, bool kOneScale>
__device__ __forceinline__ void quantize_chunk(const uint4& c, const float* scale, bool recip,
                                               uint32_t* words) {
  constexpr int kVec = Elem<T>::kVec;
  float v[kVec];
  if (recip) {
    // x * (1 / scale): the form XLA compiles the reference to on CPU.
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const float r = rcp_approx(scale[kOneScale ? 0 : i]);
      v[i] = __fmul_rn(Elem<T>::get(c, i), r);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) v[i] = div_full(Elem<T>::get(c, i), scale[kOneScale ? 0 : i]);
  }
  float vmax = 0.0f;  // fmaxf ignores NaN: NaN is not an overflow
#pragma unroll
  for (int i = 0; i < kVec; ++i) vmax = fmaxf(vmax, fabsf(v[i]));
#pragma unroll
  for (int w = 0; w < kVec / 4; ++w) {
    words[w] = cvt_e4m3x2(v[4 * w], v[4 * w + 1]) | (cvt_e4m3x2(v[4 * w + 2], v[4 * w + 3]) << 16);
  }
  if (vmax > kOverflow) {  // never for finite inputs (see the top of this file)
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      if (fabsf(v[i]) > kOverflow) {
        const int shift = 8 * (i % 4);
        words[i / 4] = (words[i / 4] & ~(0xFFu << shift)) | (e4m3_overflow(v[i]) << shift);
      }
    }
  }
}

// quantize_chunk for finite positive scales (rcp_ok), with their reciprocals
// `rcp` computed once per column. (PTX calls div.full a full-range approximation
// that scales its operands; x * rcp.approx is div.approx.) Scales are in
// [1e-4 / 448, 2^120] (UE8M0 rounds up), and there x * rcp.approx(scale) gave
// div.full's bits in every case checked (an H200: every bf16 and 2^16 random f32
// numerators against 2^16 scales from 2.2e-7 to 2^91 and FLT_MAX / 448, 0 of
// 8.6e9 differed; the GPU tests compare the casts bitwise with XLA's). No
// |x / scale| can exceed 448 * (1 + 2^-21), so the overflow check is not needed.
template <typename T, bool kOneScale>
__device__ __forceinline__ void quantize_chunk_rcp(const uint4& c, const float* rcp,
                                                   uint32_t* words) {
#pragma unroll
  for (int w = 0; w < Elem<T>::kVec / 4; ++w) {
    float v[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[i] = __fmul_rn(Elem<T>::get(c, 4 * w + i), rcp[kOneScale ? 0 : 4 * w + i]);
    }
    words[w] = cvt_e4m3x2(v[0], v[1]) | (cvt_e4m3x2(v[2], v[3]) << 16);
  }
}

// Whether quantize_chunk_rcp may take a scale: positive and finite, so not the
// inf or NaN of non-finite groups.
__device__ __forceinline__ bool rcp_ok(float scale) { return scale > 0.0f && scale < INFINITY; }

// A chunk of one scale (`rcp` = rcp_approx(scale)): the fast form where rcp_ok.
template <typename T>
__device__ __forceinline__ void quantize_chunk_one(const uint4& c, float scale, float rcp,
                                                   bool recip, uint32_t* words) {
  if (rcp_ok(scale)) {
    quantize_chunk_rcp<T, true>(c, &rcp, words);
  } else {
    quantize_chunk<T, true>(c, &scale, recip, words);
  }
}

// Bytes b[r][k] of four words (row r, byte k) -> out[k] = (b[0][k], .., b[3][k]).
__device__ __forceinline__ void transpose_4x4_bytes(const uint32_t* in, uint32_t* out) {
  const uint32_t t0 = __byte_perm(in[0], in[1], 0x5140);  // a0 b0 a1 b1
  const uint32_t t1 = __byte_perm(in[2], in[3], 0x5140);  // c0 d0 c1 d1
  const uint32_t t2 = __byte_perm(in[0], in[1], 0x7362);  // a2 b2 a3 b3
  const uint32_t t3 = __byte_perm(in[2], in[3], 0x7362);  // c2 d2 c3 d3
  out[0] = __byte_perm(t0, t1, 0x5410);
  out[1] = __byte_perm(t0, t1, 0x7632);
  out[2] = __byte_perm(t2, t3, 0x5410);
  out[3] = __byte_perm(t2, t3, 0x7632);
}

// Four rows' quantized bytes (words[i]: row i's kVec bytes, columns col0..) into a
// byte tile stored by column: tile[col0 + e][word] gets the 4 rows' bytes of column e.
template <int kVec>
__device__ __forceinline__ void put_4_rows_by_column(const uint32_t (*words)[kVec / 4],
                                                     uint32_t (*tile)[kGroup / 4 + 1], int col0,
                                                     int word) {
#pragma unroll
  for (int cg = 0; cg < kVec / 4; ++cg) {
    const uint32_t rows4[4] = {words[0][cg], words[1][cg], words[2][cg], words[3][cg]};
    uint32_t cols4[4];
    transpose_4x4_bytes(rows4, cols4);
#pragma unroll
    for (int k = 0; k < 4; ++k) tile[col0 + 4 * cg + k][word] = cols4[k];
  }
}

// Stores a shared-memory tile of kRows rows of 128 bytes (kGroup / 4 + 1 words a
// row: one of padding) at `dst`, rows `stride` bytes apart: the rows below
// valid_rows and their bytes below valid_bytes; 16-byte stores when `vec` (whole
// pieces fit and dst is 16-byte aligned), else byte by byte. 8 consecutive
// threads store a row.
template <int kRows, int kCtaThreads>
__device__ __forceinline__ void store_byte_tile(const uint32_t (*tile)[kGroup / 4 + 1],
                                                uint8_t* dst, int stride, int valid_rows,
                                                int valid_bytes, bool vec) {
  constexpr int kPieces = kRows * (kGroup / 16);
#pragma unroll
  for (int it = 0; it < kPieces / kCtaThreads; ++it) {
    const int piece = threadIdx.x + it * kCtaThreads;
    const int r = piece / (kGroup / 16);
    const int part = piece % (kGroup / 16);
    if (r >= valid_rows || part * 16 >= valid_bytes) continue;
    const uint32_t* src = &tile[r][part * 4];
    uint8_t* d = dst + r * stride + part * 16;
    if (vec) {
      *reinterpret_cast<uint4*>(d) = make_uint4(src[0], src[1], src[2], src[3]);
    } else {
      const int valid = valid_bytes - part * 16;
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        if (i < valid) d[i] = static_cast<uint8_t>(src[i / 4] >> (8 * (i % 4)));
      }
    }
  }
}

// Stores kVec e4m3 bytes (kVec / 4 words) at `p`, of which the first `valid`
// exist. kAligned: `p` is kVec-byte aligned and all or none are valid.
template <int kVec, bool kAligned>
__device__ __forceinline__ void store_bytes(uint8_t* p, const uint32_t* words, int64_t valid) {
  if (valid <= 0) return;
  if constexpr (kAligned) {
    if constexpr (kVec == 8) {
      *reinterpret_cast<uint2*>(p) = make_uint2(words[0], words[1]);
    } else {
      *reinterpret_cast<uint32_t*>(p) = words[0];
    }
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      if (i < valid) p[i] = static_cast<uint8_t>(words[i / 4] >> (8 * (i % 4)));
    }
  }
}

// ---------------------------------------------------------------------------
// (a) 1x128 groups along the last axis of x [rows, cols]
// ---------------------------------------------------------------------------
// A group is 128 / kVec lanes (16 for 2-byte inputs, 32 for f32), each with one
// 16-byte chunk; a warp covers kGroupsPerWarp consecutive groups per step and
// kSteps steps, all loads issued before any is used (bytes in flight hide the
// HBM latency). amax: shuffles within the group's lanes.
constexpr int kTokenSteps = 4;

template <typename T>
struct TokenCastShape {
  static constexpr int kVec = Elem<T>::kVec;
  static constexpr int kLanes = kGroup / kVec;
  static constexpr int kGroupsPerWarp = 32 / kLanes;
  static constexpr int kGroupsPerBlock = kWarps * kTokenSteps * kGroupsPerWarp;
};

template <typename T, bool kAligned, bool kMnMajor>
__global__ void __launch_bounds__(kThreads)
    per_token_cast_kernel(const T* __restrict__ x, uint8_t* __restrict__ q,
                          float* __restrict__ s, int64_t cols, int groups,
                          int64_t total_groups, int ue8m0, int recip, int rows) {
  using S = TokenCastShape<T>;
  const int lane = threadIdx.x % 32;
  const int sub = lane % S::kLanes;  // this lane's chunk within its group
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / 32;

  // This thread's first group; later steps move kGroupsPerWarp groups on.
  // (32-bit division, once: the host checks total_groups < 2^31.)
  int64_t unit = warp * (kTokenSteps * S::kGroupsPerWarp) + lane / S::kLanes;
  const uint32_t first = static_cast<uint32_t>(unit < total_groups ? unit : 0);
  uint32_t row = first / static_cast<uint32_t>(groups);
  uint32_t g = first - row * static_cast<uint32_t>(groups);

  int64_t offset[kTokenSteps];  // element offset of the chunk in x (and q)
  int64_t valid[kTokenSteps];   // elements of the chunk inside the row (<= 0: none)
#pragma unroll
  for (int st = 0; st < kTokenSteps; ++st) {
    const int64_t col = static_cast<int64_t>(g) * kGroup + sub * S::kVec;
    const bool live = unit + st * S::kGroupsPerWarp < total_groups;
    offset[st] = live ? static_cast<int64_t>(row) * cols + col : 0;
    valid[st] = live ? cols - col : 0;
    g += S::kGroupsPerWarp;
    while (g >= static_cast<uint32_t>(groups)) {
      g -= groups;
      ++row;
    }
  }
  // All loads back to back (in their own loop, after the branchy index
  // arithmetic), so that they are in flight together.
  uint4 chunk[kTokenSteps];
#pragma unroll
  for (int st = 0; st < kTokenSteps; ++st) {
    chunk[st] = load_chunk<T, kAligned>(x + offset[st], valid[st]);
  }

#pragma unroll
  for (int st = 0; st < kTokenSteps; ++st) {
    float amax = chunk_amax<T>(chunk[st], 0.0f);
#pragma unroll
    for (int off = S::kLanes / 2; off >= 1; off /= 2) {
      amax = max_nan(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, off));
    }
    const float scale = group_scale(amax, ue8m0 != 0);
    const int64_t u = unit + st * S::kGroupsPerWarp;
    if (u >= total_groups) continue;  // (no shuffles below)
    if (sub == 0) {
      if constexpr (kMnMajor) {  // s [groups, rows]; u < total_groups < 2^31
        const uint32_t uu = static_cast<uint32_t>(u), gs = static_cast<uint32_t>(groups);
        const uint32_t r = uu / gs;
        s[(uu - r * gs) * static_cast<uint32_t>(rows) + r] = scale;
      } else {
        s[u] = scale;
      }
    }
    uint32_t words[S::kVec / 4];
    quantize_chunk_one<T>(chunk[st], scale, rcp_approx(scale), recip != 0, words);
    store_bytes<S::kVec, kAligned>(q + offset[st], words, valid[st]);
  }
}

// ---------------------------------------------------------------------------
// (b) 128x128 blocks of x [batch, n, k]
// ---------------------------------------------------------------------------
// One CTA per block. A row of the block is kChunksPerRow 16-byte chunks; the
// CTA covers kRowsPerPass rows per pass and holds all kPasses chunks of each
// thread in registers: one read of the input, amax, then quantize from
// registers.
//
// kTransposed: q's transpose [batch, k, n] is written to qt (what per_block_cast
// of x's transpose gives: the blocks are square), so that a [K, N] weight becomes
// the [N, K] operand without a separate transpose of its e4m3 bytes. Each thread
// then owns kPasses consecutive rows (the same two 256-byte rows per warp load),
// quantizes them four at a time into words of 4 consecutive rows per column (a
// 4x4 byte transpose), and the block goes through shared memory as 128 rows of
// 128 bytes, stored with 16-byte stores where whole pieces fit.
//
// kPlain and kTransposed: both q and qt from one read of x (fp8_linear needs the
// [N, K] operand forward and the [K, N] one for dgrad). The rows are the
// transposed variant's; each group of 4 quantized rows is stored to q (rows
// still grow with p) and put into the tile. The scales keep q's layout [batch,
// nb, kb]; with kTransposed alone they are written as [batch, kb, nb].
template <typename T>
struct BlockCastShape {
  static constexpr int kVec = Elem<T>::kVec;
  static constexpr int kChunksPerRow = kGroup / kVec;            // 16 or 32
  static constexpr int kRowsPerPass = kThreads / kChunksPerRow;  // 16 or 8
  static constexpr int kPasses = kGroup / kRowsPerPass;          // 8 or 16
  static constexpr int kTileWords = kGroup / 4 + 1;              // +1: fewer bank conflicts
};

// 3 CTAs per SM (<= 80 registers, no spills): with a whole block in registers,
// CTAs in their load phase overlap the others' quantize and store phases.
template <typename T, bool kAligned, bool kPlain = true, bool kTransposed = false>
__global__ void __launch_bounds__(kThreads, 3)
    per_block_cast_kernel(const T* __restrict__ x, uint8_t* __restrict__ q,
                          uint8_t* __restrict__ qt, float* __restrict__ s, int n, int k,
                          int nb, int kb, int ue8m0, int recip, int vec_store_t) {
  static_assert(kPlain || kTransposed, "nothing to write");
  using S = BlockCastShape<T>;
  __shared__ float warp_amax[kWarps];
  __shared__ uint32_t tile[kTransposed ? kGroup : 1][kTransposed ? S::kTileWords : 1];

  const int block = blockIdx.x;  // = (b * nb + bn) * kb + bk, also the scale's index
  const int b = block / (nb * kb);
  const int bn = block / kb - b * nb;
  const int bk = block % kb;
  // The block's first element; offsets inside the block fit in 32 bits (the
  // host checks 128 * k < 2^31, and transposed 128 * n < 2^31), which keeps the
  // per-pass addresses cheap.
  const int64_t origin = (static_cast<int64_t>(b) * n + bn * kGroup) * k + bk * kGroup;
  const T* xb = x + origin;
  const int rg = threadIdx.x / S::kChunksPerRow;
  const int c0 = (threadIdx.x % S::kChunksPerRow) * S::kVec;
  const int rows = n - bn * kGroup;             // rows of the block inside x
  const int valid_cols = k - bk * kGroup - c0;  // elements of this thread's chunks inside x
  // Row of pass p: strided by default, consecutive when writing qt.
  auto row = [&](int p) { return kTransposed ? rg * S::kPasses + p : rg + p * S::kRowsPerPass; };

  uint4 chunk[S::kPasses];
#pragma unroll
  for (int p = 0; p < S::kPasses; ++p) {
    const int r = row(p);
    const int valid = r < rows ? valid_cols : 0;
    chunk[p] = load_chunk<T, kAligned>(xb + (valid > 0 ? r * k + c0 : 0), valid);
  }

  float amax = 0.0f;
#pragma unroll
  for (int p = 0; p < S::kPasses; ++p) amax = chunk_amax<T>(chunk[p], amax);
#pragma unroll
  for (int off = 16; off >= 1; off /= 2) {
    amax = max_nan(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, off));
  }
  if (threadIdx.x % 32 == 0) warp_amax[threadIdx.x / 32] = amax;
  __syncthreads();
  amax = warp_amax[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) amax = max_nan(amax, warp_amax[w]);
  const float scale = group_scale(amax, ue8m0 != 0);
  if (threadIdx.x == 0) s[kPlain ? block : (b * kb + bk) * nb + bn] = scale;

  // (The division here, not quantize_chunk_rcp: with a branch on a finite scale
  // this kernel spills at 80 registers, and it runs at 93-96% of a copy anyway.)
  if constexpr (!kTransposed) {
    uint8_t* qb = q + origin;
#pragma unroll
    for (int p = 0; p < S::kPasses; ++p) {
      const int r = row(p);
      if (r >= rows) break;  // rows only grow with p
      uint32_t words[S::kVec / 4];
      quantize_chunk<T, true>(chunk[p], &scale, recip != 0, words);
      store_bytes<S::kVec, kAligned>(qb + r * k + c0, words, valid_cols);
    }
  } else {
    // Rows past n quantize zeros; they are never stored.
#pragma unroll
    for (int w = 0; w < S::kPasses / 4; ++w) {
      uint32_t words[4][S::kVec / 4];
#pragma unroll
      for (int i = 0; i < 4; ++i) quantize_chunk<T, true>(chunk[4 * w + i], &scale, recip != 0,
                                                          words[i]);
      if constexpr (kPlain) {
        // The 4 rows from row(4 * w), those inside x. (From one pointer: indexing q
        // by row, as the plain-only path does, spills f32 at 80 registers.)
        uint8_t* qr = q + origin + row(4 * w) * k + c0;
        const int left = rows - row(4 * w);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          if (i < left) store_bytes<S::kVec, kAligned>(qr + i * k, words[i], valid_cols);
        }
      }
      put_4_rows_by_column<S::kVec>(words, tile, c0, rg * (S::kPasses / 4) + w);
    }
    __syncthreads();
    // 128 rows (columns of x) x 8 pieces of 16 bytes; 8 consecutive threads store a row.
    uint8_t* qtb = qt + (static_cast<int64_t>(b) * k + bk * kGroup) * n + bn * kGroup;
    // (vec_store_t: n % 16 == 0 and qt 16-byte aligned.)
    store_byte_tile<kGroup, kThreads>(tile, qtb, n, k - bk * kGroup, rows, vec_store_t != 0);
  }
}

// The reciprocals of a thread's kVec column scales (col_scale points at its
// first column); true when all of them are rcp_ok (the fast, x * rcp path).
template <int kVec>
__device__ __forceinline__ bool column_rcp(const float* col_scale, float (&rcp)[kVec]) {
  bool finite = true;
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    const float scale = col_scale[e];
    rcp[e] = rcp_approx(scale);
    finite = finite && rcp_ok(scale);
  }
  return finite;
}

// A tile of token-axis groups ((c) and (d)): the thread's kRows consecutive
// rows from r0, one 16-byte chunk each at column c0 (rows past `rows` and
// elements past valid_cols read as zeros; 8-ish loads in flight per thread).
template <typename T, bool kAligned, int kRows>
__device__ __forceinline__ void load_column_chunks(uint4 (&chunk)[kRows], const T* xt, int r0,
                                                   int rows, int n, int c0, int valid_cols) {
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const int r = r0 + i;
    const int valid = r < rows ? valid_cols : 0;
    chunk[i] = load_chunk<T, kAligned>(xt + (valid > 0 ? r * n + c0 : 0), valid);
  }
}

// Column amax over this thread's rows, then over the warp's row groups (lanes
// that differ in the bits above kLanesPerRow), written to col_amax_warp[c0 ..
// c0 + kVec) by the warp's first row group; the caller reduces over the warps.
// In the input's format, two 2-byte elements per instruction (exact: the max
// is one of the values; NaN becomes the canonical f32 NaN in the f32 max
// across warps, as in the other kernels).
template <typename T, int kRows, int kLanesPerRow>
__device__ __forceinline__ void column_amax(const uint4 (&chunk)[kRows], float* col_amax_warp,
                                            int c0) {
  uint32_t cm[4] = {0, 0, 0, 0};
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
#pragma unroll
    for (int w = 0; w < 4; ++w) cm[w] = Elem<T>::abs_max(cm[w], word(chunk[i], w));
  }
#pragma unroll
  for (int w = 0; w < 4; ++w) {
#pragma unroll
    for (int off = kLanesPerRow; off < 32; off *= 2) {
      cm[w] = Elem<T>::abs_max(cm[w], __shfl_xor_sync(0xFFFFFFFFu, cm[w], off));
    }
  }
  if (threadIdx.x % 32 < kLanesPerRow) {
    const uint4 c = make_uint4(cm[0], cm[1], cm[2], cm[3]);
#pragma unroll
    for (int e = 0; e < Elem<T>::kVec; ++e) col_amax_warp[c0 + e] = Elem<T>::get(c, e);
  }
}

// ---------------------------------------------------------------------------
// (c) 128x1 groups along the token axis of x [batch, t, n]
// ---------------------------------------------------------------------------
// One CTA per tile of 128 tokens x 64 columns. Each thread owns
// kRowsPerThread = 8 consecutive tokens of one 16-byte column chunk, so 8 loads
// in flight (2-byte inputs take 128 threads per CTA for that, f32 256); a
// warp's load reads 4 (2-byte) or 2 (f32) rows of 128 or 256 contiguous bytes.
// Column amax: within the thread, then shuffles across the warp's row groups,
// then shared memory across the warps. Finite scales quantize by multiplying
// with their reciprocals (quantize_chunk_rcp). Together these took the bf16
// cast of 32768x7168 from 229 to 183 us, 74% -> 92% of a copy's bandwidth (the
// 8 loads alone: 78%; 128-column tiles measured the same; H200).
//
// kTranspose: q's transpose [batch, n, t] is written instead. The tile's bytes
// go through shared memory as 64 rows (columns of x) of 128 bytes (tokens),
// each thread writing, per 4 of its tokens, one word per column (a 4x4 byte
// transpose); then 8 threads store each 128-byte row with 16-byte stores.
template <typename T, int kTileCols = 64, int kCtaThreads = (sizeof(T) == 4 ? 256 : 128)>
struct TokenAxisShape {
  static constexpr int kThreads = kCtaThreads;
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kVec = Elem<T>::kVec;
  static constexpr int kTileN = kTileCols;
  static constexpr int kLanesPerRow = kTileN / kVec;                // 8 or 16
  static constexpr int kRowGroups = kThreads / kLanesPerRow;        // 16 (default)
  static constexpr int kRowsPerThread = kGroup / kRowGroups;        // 8 (default)
  static constexpr int kWordsPerThread = kRowsPerThread / 4;        // 2 (default)
  static constexpr int kTileWords = kGroup / 4 + 1;  // +1 word: fewer bank conflicts
  static_assert(kRowsPerThread % 4 == 0 && kLanesPerRow <= 32 && kTileN <= kThreads,
                "tile shape");
};

// <= 64 registers: 1024 threads per SM. (The inf/NaN path of 2-byte inputs
// spills a few words; finite inputs do not take it.)
template <typename T, bool kAligned, bool kTranspose, int kTileCols = TokenAxisShape<T>::kTileN,
          int kCtaThreads = TokenAxisShape<T>::kThreads>
__global__ void __launch_bounds__(kCtaThreads, 1024 / kCtaThreads)
    token_axis_cast_kernel(const T* __restrict__ x, uint8_t* __restrict__ q,
                           float* __restrict__ s, int t_len, int n, int tg, int nt,
                           int ue8m0, int recip, int vec_store_t) {
  using S = TokenAxisShape<T, kTileCols, kCtaThreads>;
  constexpr int kWarps = S::kWarps;
  __shared__ float col_amax[kWarps][S::kTileN];
  __shared__ float col_scale[S::kTileN];
  __shared__ uint32_t tile[kTranspose ? S::kTileN : 1][kTranspose ? S::kTileWords : 1];

  const int block = blockIdx.x;  // = (a * tg + g) * nt + j
  const int a = block / (tg * nt);
  const int g = block / nt - a * tg;
  const int j = block % nt;
  // The tile's first element; offsets inside the tile fit in 32 bits (the host
  // checks 128 * n < 2^31 and, transposed, 64 * t_len < 2^31).
  const int64_t origin = (static_cast<int64_t>(a) * t_len + g * kGroup) * n + j * S::kTileN;
  const T* xt = x + origin;
  const int vc = threadIdx.x % S::kLanesPerRow;
  const int rg = threadIdx.x / S::kLanesPerRow;
  const int c0 = vc * S::kVec;                     // first column of this thread
  const int r0 = rg * S::kRowsPerThread;           // first row (token) of this thread
  const int rows = t_len - g * kGroup;             // rows of the tile inside x
  const int valid_cols = n - j * S::kTileN - c0;   // elements of this thread's chunks inside x

  uint4 chunk[S::kRowsPerThread];
  load_column_chunks<T, kAligned>(chunk, xt, r0, rows, n, c0, valid_cols);
  // Column amax: the thread's rows and the warp's row groups, then the warps.
  const int warp = threadIdx.x / 32;
  column_amax<T, S::kRowsPerThread, S::kLanesPerRow>(chunk, col_amax[warp], c0);
  __syncthreads();
  if (threadIdx.x < S::kTileN) {
    float m = col_amax[0][threadIdx.x];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) m = max_nan(m, col_amax[w][threadIdx.x]);
    const float scale = group_scale(m, ue8m0 != 0);
    col_scale[threadIdx.x] = scale;
    const int c = j * S::kTileN + threadIdx.x;
    if (c < n) s[(static_cast<int64_t>(a) * tg + g) * n + c] = scale;
  }
  __syncthreads();
  float rcp[S::kVec];
  const bool finite = column_rcp(col_scale + vc * S::kVec, rcp);  // no inf/NaN column
  // Quantizes and stores (or, transposed, writes to `tile`) the thread's rows;
  // kFast: all of its columns' scales are rcp_ok (no inf or NaN input).
  auto quantize_rows = [&](auto fast) {
    constexpr bool kFast = decltype(fast)::value;
    float scale[kFast ? 1 : S::kVec];
    if constexpr (!kFast) {
#pragma unroll
      for (int e = 0; e < S::kVec; ++e) scale[e] = col_scale[vc * S::kVec + e];
    }
    // Row i's kVec bytes, as kVec / 4 words.
    auto quantize_row = [&](int i, uint32_t* words) {
      if constexpr (kFast) {
        quantize_chunk_rcp<T, false>(chunk[i], rcp, words);
      } else {
        quantize_chunk<T, false>(chunk[i], scale, recip != 0, words);
      }
    };
    if constexpr (!kTranspose) {
      uint8_t* qt = q + origin;
#pragma unroll
      for (int i = 0; i < S::kRowsPerThread; ++i) {
        const int r = r0 + i;
        if (r >= rows) break;
        uint32_t words[S::kVec / 4];
        quantize_row(i, words);
        store_bytes<S::kVec, kAligned>(qt + r * n + c0, words, valid_cols);
      }
    } else {
      // Bytes of (row i, column e) -> tile[column][token / 4], byte token % 4:
      // four rows at a time, each group of 4 columns a 4x4 byte transpose.
      // Rows past t_len quantize zeros; they are never stored.
#pragma unroll
      for (int w = 0; w < S::kWordsPerThread; ++w) {
        uint32_t words[4][S::kVec / 4];
#pragma unroll
        for (int i = 0; i < 4; ++i) quantize_row(4 * w + i, words[i]);
        put_4_rows_by_column<S::kVec>(words, tile, vc * S::kVec, rg * S::kWordsPerThread + w);
      }
    }
  };
  if (finite) {
    quantize_rows(std::true_type{});
  } else {
    quantize_rows(std::false_type{});
  }

  if constexpr (kTranspose) {
    __syncthreads();
    // kTileN rows x 8 pieces of 16 bytes; 8 consecutive threads store one row.
    // qT's tile origin: row (column of x) j * kTileN, column (token) g * 128.
    uint8_t* qt = q + (static_cast<int64_t>(a) * n + j * S::kTileN) * t_len + g * kGroup;
    // (vec_store_t: t_len % 16 == 0 and q 16-byte aligned.)
    store_byte_tile<S::kTileN, S::kThreads>(tile, qt, t_len, n - j * S::kTileN, rows,
                                            vec_store_t != 0);
  }
}

// ---------------------------------------------------------------------------
// (d) Both activation casts of x [batch, t, n] from one read: 1x128 groups
//     along n (q [batch, t, n], s [batch, t, ceil(n/128)], as (a)) and 128x1
//     groups along t written transposed (qt [batch, n, t], st [batch,
//     ceil(t/128), n], as (c) with kTranspose); rows t >= keep_rows[batch]
//     are cast as zeros. kGather: row t of slice a is x's row rows[a][t] of
//     that slice's src_t rows (outside [0, src_t): zeros), the MoE's dispatch
//     gather read in place instead of materialized first; with row_scale, that
//     row times row_scale[a][t] (rounded to T: the MoE's combine weights)
// ---------------------------------------------------------------------------
// fp8_linear needs both casts of X (forward GEMM operand, wgrad residual) and
// of dY (dgrad, wgrad); two kernels read x twice. One CTA per tile of 128
// tokens x 128 columns: a tile row is exactly one per-token group, a tile
// column one token-axis group, so both amaxes are tile-local. Each thread owns
// kRowsPerThread consecutive tokens of one 16-byte column chunk, so a
// row's 128 columns are kLanesPerRow = 16 (2-byte) or 32 (f32) consecutive
// lanes: the per-token amax is a shuffle among them, the
// token-axis amax is as in (c) (within the thread, shuffles across the warp's
// row groups, shared memory across the warps). The per-token half (quantize,
// store q and s) runs between the column amax's shared-memory write and its
// __syncthreads, hiding that barrier. The arithmetic is (a)'s and (c)'s
// exactly (quantize_chunk_one per row; quantize_chunk_rcp or quantize_chunk
// per column), each with its own recip flag (the Python side probes the two
// references separately), so the results are bitwise theirs.
template <typename T>
struct DualCastShape {
  static constexpr int kVec = Elem<T>::kVec;
  static constexpr int kLanesPerRow = kGroup / kVec;             // 16 or 32
  // 512 threads of <= 64 registers, 2 CTAs per SM, for every input type: 4
  // rows per thread for 2-byte inputs (8 for f32). Against 8 rows x 256
  // threads for bf16 (the same bytes in flight per CTA, half the threads per
  // SM): 304.7 vs 324.7 us on 32768x7168, 92.0 vs 98.1 on 4096x16384 (H200,
  // harness, back-to-back), as one CTA's loads overlap more of the other's
  // quantize and stores. At 3 CTAs per SM either spills (311.7 / 367.8 us).
  static constexpr int kRowsPerThread = kLanesPerRow / 4;       // 4 or 8
  static constexpr int kRowGroups = kGroup / kRowsPerThread;     // 32 or 16
  static constexpr int kThreads = kRowGroups * kLanesPerRow;     // 512
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kWordsPerThread = kRowsPerThread / 4;     // 1 or 2
  static constexpr int kTileWords = kGroup / 4 + 1;  // +1 word: fewer bank conflicts
  static constexpr int kMinBlocks = 2;  // CTAs per SM the registers must allow
  static_assert(kLanesPerRow <= 32 && kRowsPerThread % 4 == 0, "tile shape");
};

// kMnMajor: s is written MN-major, [nt][s_rows] with s_rows = batch * t_len (the
// per-token scales' layout that the GEMMs read).
template <typename T, bool kAligned, bool kMnMajor, bool kGather = false>
__global__ void __launch_bounds__(DualCastShape<T>::kThreads, DualCastShape<T>::kMinBlocks)
    dual_cast_kernel(const T* __restrict__ x, const int* __restrict__ keep_rows,
                     uint8_t* __restrict__ q, float* __restrict__ s,
                     uint8_t* __restrict__ qt, float* __restrict__ st, int t_len, int n, int tg,
                     int nt, int ue8m0, int recip_token, int recip_axis, int vec_store_t,
                     int64_t s_rows, const int* __restrict__ rows_of = nullptr, int src_t = 0,
                     const float* __restrict__ row_scale = nullptr) {
  using S = DualCastShape<T>;
  __shared__ float col_amax[S::kWarps][kGroup];
  __shared__ float col_scale[kGroup];
  __shared__ uint32_t tile[kGroup][S::kTileWords];

  const int block = blockIdx.x;  // = (a * tg + g) * nt + j
  const int a = block / (tg * nt);
  const int g = block / nt - a * tg;
  const int j = block % nt;
  // The tile's first element; offsets inside the tile fit in 32 bits (the host
  // checks 128 * n < 2^31 and 128 * t_len < 2^31).
  const int64_t origin = (static_cast<int64_t>(a) * t_len + g * kGroup) * n + j * kGroup;
  const int vc = threadIdx.x % S::kLanesPerRow;
  const int rg = threadIdx.x / S::kLanesPerRow;
  const int c0 = vc * S::kVec;                  // first column of this thread in the tile
  const int r0 = rg * S::kRowsPerThread;        // first row (token) of this thread
  const int rows = t_len - g * kGroup;          // rows of the tile inside x
  const int valid_cols = n - j * kGroup - c0;   // elements of this thread's chunks inside x

  uint4 chunk[S::kRowsPerThread];
  if constexpr (kGather) {
    // Each row from where rows_of points: x's row rows_of[a][t] of slice a.
    const int* idx = rows_of + static_cast<int64_t>(a) * t_len + g * kGroup;
    const T* xa = x + static_cast<int64_t>(a) * src_t * n + j * kGroup + c0;
    const int64_t first = idx - rows_of;  // this tile's first row in rows_of (and row_scale)
    float f[S::kRowsPerThread];
#pragma unroll
    for (int i = 0; i < S::kRowsPerThread; ++i) {
      const int src = r0 + i < rows ? __ldg(idx + r0 + i) : -1;
      const bool in = src >= 0 && src < src_t;
      chunk[i] = load_chunk<T, kAligned>(xa + (in ? static_cast<int64_t>(src) * n : 0),
                                         in ? valid_cols : 0);
      // A row outside x stays zero whatever its scale (0 * inf would be NaN).
      f[i] = row_scale != nullptr && in ? __ldg(row_scale + first + r0 + i) : 1.0f;
    }
    if (row_scale != nullptr) {
#pragma unroll
      for (int i = 0; i < S::kRowsPerThread; ++i) {
        chunk[i] = make_uint4(Elem<T>::scaled(chunk[i].x, f[i]), Elem<T>::scaled(chunk[i].y, f[i]),
                              Elem<T>::scaled(chunk[i].z, f[i]), Elem<T>::scaled(chunk[i].w, f[i]));
      }
    }
  } else {
    load_column_chunks<T, kAligned>(chunk, x + origin, r0, rows, n, c0, valid_cols);
  }
  // Rows of slice a at or past keep_rows[a] are cast as zeros (fp8_grouped_linear's rows
  // past its groups: whatever they hold must not reach the token-axis scales that valid
  // rows share). Masked after the loads, not instead of them: the limit's load then
  // overlaps the tile's instead of delaying them.
  {
    const int keep = keep_rows[a] - g * kGroup;
#pragma unroll
    for (int i = 0; i < S::kRowsPerThread; ++i) {
      if (r0 + i >= keep) chunk[i] = make_uint4(0, 0, 0, 0);
    }
  }
  // Token-axis column amax, as in (c): this thread's rows, the warp's row
  // groups, then (after the per-token half) the warps.
  const int warp = threadIdx.x / 32;
  column_amax<T, S::kRowsPerThread, S::kLanesPerRow>(chunk, col_amax[warp], c0);

  // Per-token half, as in (a): row r's group is the tile row (columns
  // j * 128 ..), its amax a shuffle among the row's kLanesPerRow lanes. Rows
  // past t_len are all zeros (their shuffles still run: the whole warp takes
  // part); they are not stored.
  {
    uint8_t* qb = q + origin;
#pragma unroll
    for (int i = 0; i < S::kRowsPerThread; ++i) {
      float amax = chunk_amax<T>(chunk[i], 0.0f);
#pragma unroll
      for (int off = S::kLanesPerRow / 2; off >= 1; off /= 2) {
        amax = max_nan(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, off));
      }
      const int r = r0 + i;
      // (continue, not break: the warp's other row group may still shuffle)
      if (r >= rows) continue;
      const float scale = group_scale(amax, ue8m0 != 0);
      if (vc == 0) {
        const int64_t row = static_cast<int64_t>(a) * t_len + g * kGroup + r;
        s[kMnMajor ? j * s_rows + row : row * nt + j] = scale;
      }
      uint32_t words[S::kVec / 4];
      quantize_chunk_one<T>(chunk[i], scale, rcp_approx(scale), recip_token != 0, words);
      store_bytes<S::kVec, kAligned>(qb + r * n + c0, words, valid_cols);
    }
  }

  // Token-axis half, as in (c) with kTranspose.
  __syncthreads();
  if (threadIdx.x < kGroup) {
    float m = col_amax[0][threadIdx.x];
#pragma unroll
    for (int w = 1; w < S::kWarps; ++w) m = max_nan(m, col_amax[w][threadIdx.x]);
    const float scale = group_scale(m, ue8m0 != 0);
    col_scale[threadIdx.x] = scale;
    const int c = j * kGroup + threadIdx.x;
    if (c < n) st[(static_cast<int64_t>(a) * tg + g) * n + c] = scale;
  }
  __syncthreads();
  float rcp[S::kVec];
  const bool finite = column_rcp(col_scale + c0, rcp);  // no inf/NaN column
  // Bytes of (row i, column e) -> tile[column][token / 4], byte token % 4, four
  // rows at a time (put_4_rows_by_column). Rows past t_len quantize zeros; they
  // are never stored. kFast: all of the thread's column scales are rcp_ok.
  auto quantize_rows = [&](auto fast) {
    constexpr bool kFast = decltype(fast)::value;
    float scale[kFast ? 1 : S::kVec];
    if constexpr (!kFast) {
#pragma unroll
      for (int e = 0; e < S::kVec; ++e) scale[e] = col_scale[c0 + e];
    }
#pragma unroll
    for (int w = 0; w < S::kWordsPerThread; ++w) {
      uint32_t words[4][S::kVec / 4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if constexpr (kFast) {
          quantize_chunk_rcp<T, false>(chunk[4 * w + i], rcp, words[i]);
        } else {
          quantize_chunk<T, false>(chunk[4 * w + i], scale, recip_axis != 0, words[i]);
        }
      }
      put_4_rows_by_column<S::kVec>(words, tile, c0, rg * S::kWordsPerThread + w);
    }
  };
  if (finite) {
    quantize_rows(std::true_type{});
  } else {
    quantize_rows(std::false_type{});
  }
  __syncthreads();
  // 128 rows (columns of x) x 8 pieces of 16 bytes; 8 consecutive threads
  // store a row. qt's tile origin: row (column of x) j * 128, column (token)
  // g * 128. (vec_store_t: t_len % 16 == 0 and qt 16-byte aligned.)
  uint8_t* qtb = qt + (static_cast<int64_t>(a) * n + j * kGroup) * t_len + g * kGroup;
  store_byte_tile<kGroup, S::kThreads>(tile, qtb, t_len, n - j * kGroup, rows, vec_store_t != 0);
}

}  // namespace quant
}  // namespace jax_deepgemm
