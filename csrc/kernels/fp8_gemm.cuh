// DeepGEMM-style FP8 (e4m3) GEMM "NT" for sm_90a:
//   out[m, n] = sum_k a[m, k] * b[n, k] * sa[k/128, m] * sb[n/128, k/128]
//               (+ bias[n]) (+ c[m, n])
// a: [M, K] row-major, b: [N, K] row-major (both K-major), fp32 accumulation
// with per-128-K-block promotion on CUDA cores.
//
// Structure:
//   * persistent CTAs (grid = min(#tiles, #SMs)) walking a static tile
//     schedule with grouped (L2-friendly) rasterization;
//   * warp specialisation: BLOCK_M/64 math warpgroups + 1 TMA producer
//     warpgroup (last); setmaxnreg rebalances registers between them;
//   * STAGES-deep shared-memory ring guarded by full/empty mbarriers; the
//     k-iteration counter (stage, phase) runs across tiles.
//   * BLOCK_N <= 128: two wgmma result buffers, so a k-block's promotion
//     FFMAs run while the next k-block's wgmma is in flight (in chunks of up
//     to 8 k-blocks; ptxas serializes wgmmas left in flight across a loop's
//     back edge).
//   * BLOCK_N 256: each k-block runs as two 128-wide wgmma halves through one
//     result buffer, each promoted before the next is issued (registers); dense,
//     it stages half its output tile in shared memory (a 4th stage) and stores
//     the previous tile's two column halves under the first k-block's two halves.
//
// The same kernel runs the M-grouped (MoE) GEMMs when kGrouped: rows of `a`
// belong to groups (experts) g, each with its own B[g] = b[g*N : (g+1)*N].
// Group sizes are read on device (no host sync, CUDA-graph safe) into a
// shared-memory table at kernel start; tiles never straddle two groups, so a
// tile only writes rows of its own group, and empty groups get no tiles.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "../common/ptx.cuh"

namespace jax_deepgemm {

constexpr int kBlockK = 128;            // one 128-byte swizzle atom of e4m3
constexpr int kScaleBlock = 128;        // scale granularity along N and K
constexpr int kGroupM = 8;              // M-blocks per rasterization group
constexpr int kMaxSmemPerBlock = 232448;  // 227 KiB opt-in limit on sm_90
constexpr int kSmemAlignPad = 1024;     // K-grouped kernel: it aligns the dynamic smem base
constexpr int kMaxGroups = 1024;        // grouped kernels: size of the smem group table
// Group table: m-block prefix [G+1], first row [G], end row [G] (int32 each).
constexpr int kGroupTableBytes = (3 * kMaxGroups + 1) * 4 + 12;  // padded to 16B

constexpr int fp8_gemm_sa_rows(int block_m, bool grouped) {
  return grouped ? block_m + 4 : block_m;
}
constexpr int fp8_gemm_sa_bytes(int block_m, bool grouped) {
  return (fp8_gemm_sa_rows(block_m, grouped) * 4 + 127) / 128 * 128;
}
// Dense kernels: a tile's bias slice rides with its first k-block's stage,
// except 128x256 (its 4th stage leaves no room: its lanes read the bias from
// global a tile ahead, see bias_pairs).
constexpr int fp8_gemm_bias_bytes(int block_n, bool grouped) {
  return grouped || block_n == 256 ? 0 : block_n * 4;
}

// Shared memory that stages a tile's output for the TMA-store epilogue:
// BLOCK_M rows x fp8_gemm_d_cols bf16 (more columns go through it in passes),
// as 128-byte-wide, 128B-swizzled boxes of 64 rows. Only built for
// BLOCK_N % 64 == 0; other tiles store from registers. So do 192-row tiles:
// their 48 KB D tile costs a stage, and with that stage they ran 1.5-2% faster
// (8192^3 849 vs 862 us, 4096x2112x7168 110 vs 112; kernel_bench, H200).
constexpr bool fp8_gemm_tma_store(int block_m, int block_n) {
#ifdef JAX_DEEPGEMM_NO_TMA_STORE  // kernel_bench experiments: no D tile, room for a stage more
  return false;
#else
  return block_n % 64 == 0 && block_m != 192;
#endif
}
// The output's TMA box (tmap_out): 64 rows x one 128-byte swizzle row.
template <typename OutT>
constexpr int fp8_gemm_out_box_cols() { return 128 / static_cast<int>(sizeof(OutT)); }
// Dense 128x256 tiles stage half their columns, which makes room for a 4th stage;
// their epilogue stores the two halves while the next tile's two wgmma halves run
// (fp8_gemm_split_epilogue). Against 3 stages and the whole tile staged at once:
// 1.3-5.2% faster (kernel_bench alone, H200, session 30, us, two runs each:
// 4096x7168x16384 719 -> 709-710, 4096x16384x7168 725-727 -> 709, 4096x24576x1536
// 271 -> 256-257, 4096x4096x7168 186 -> 181-183, 4096x7168x2048 108 -> 102-104).
// A 4th stage with the halves stored back to back gained less at K <= 7168 (262-263,
// 104-106 us), the split epilogue with 3 stages nothing. Grouped kernels have
// 3 stages either way (their group table), so they keep the whole tile.
constexpr int fp8_gemm_d_cols(int block_n, bool grouped) {
  return block_n == 256 && !grouped ? 128 : block_n;
}
constexpr int fp8_gemm_d_bytes(int block_m, int block_n, bool grouped) {
  return fp8_gemm_tma_store(block_m, block_n) ? block_m * fp8_gemm_d_cols(block_n, grouped) * 2
                                              : 0;
}
constexpr bool fp8_gemm_split_epilogue(int block_n, bool grouped) {
  return fp8_gemm_d_cols(block_n, grouped) < block_n;
}

// Whether the mainloop double-buffers the wgmma results (3 x BLOCK_N/2 fp32
// registers per thread: acc + 2 buffers) so promotion overlaps the next wgmma.
// Three math warpgroups (BLOCK_M 192) have 160 registers each: one buffer, and
// each promotes while the other two's wgmmas run.
constexpr bool fp8_gemm_pipelined(int block_m, int block_n) {
  return block_n <= 128 && block_m <= 128;
}
// BLOCK_N 256 runs each k-block as two 128-column wgmma halves through one
// 64-register buffer (acc 128 + 64 registers: a 256-wide buffer does not fit);
// each half is one 128-wide scale block of B.
constexpr bool fp8_gemm_split_n(int block_n) { return block_n == 256; }

template <int BLOCK_M, int BLOCK_N, int STAGES, bool kGrouped = false>
struct Fp8GemmLayout {
  static constexpr int kNumMathWG = BLOCK_M / 64;
  static constexpr int kNumMathThreads = kNumMathWG * 128;
  static constexpr int kNumThreads = kNumMathThreads + 128;  // + producer WG
  static constexpr int kNumMathWarps = kNumMathThreads / 32;

  static constexpr int kBytesA = BLOCK_M * kBlockK;    // fp8, per stage
  static constexpr int kBytesB = BLOCK_N * kBlockK;    // fp8, per stage
  // A scales: grouped tiles start at any row, but a TMA box must start 16B
  // aligned along the inner (row) axis, so they load 4 more rows from row0 & ~3.
  static constexpr int kSARows = fp8_gemm_sa_rows(BLOCK_M, kGrouped);
  static constexpr int kBytesSA = fp8_gemm_sa_bytes(BLOCK_M, kGrouped);  // per stage
  static constexpr uint32_t kTxBytes = kBytesA + kBytesB + kSARows * 4;

  // Offsets from the 1024-byte-aligned base.
  static constexpr int kOffA = 0;
  static constexpr int kOffB = kOffA + STAGES * kBytesA;
  static constexpr int kOffD = kOffB + STAGES * kBytesB;  // 1024B aligned (swizzle)
  static constexpr int kBytesD = fp8_gemm_d_bytes(BLOCK_M, BLOCK_N, kGrouped);
  static constexpr int kOffSA = kOffD + kBytesD;
  static constexpr int kBytesBias = fp8_gemm_bias_bytes(BLOCK_N, kGrouped);  // per stage
  static constexpr int kOffBias = kOffSA + STAGES * kBytesSA;
  static constexpr int kOffBar = kOffBias + STAGES * kBytesBias;
  static constexpr int kOffGroups = kOffBar + 2 * STAGES * 8;
  static constexpr int kBytes = kOffGroups + (kGrouped ? kGroupTableBytes : 0);
  // No alignment pad: the kernel declares its shared memory 1024B aligned (a pad
  // would cost 128x256 its 4th stage).
  static constexpr int kDynamicSmem = kBytes;

  static_assert(BLOCK_M == 64 || BLOCK_M == 128 || BLOCK_M == 192,
                "BLOCK_M must be 64, 128 or 192");
  static_assert(BLOCK_N % 32 == 0 && BLOCK_N <= 256, "bad BLOCK_N");
  // A tile starts at a multiple of gcd(BLOCK_N, 128) inside a 128-wide scale
  // block of B, so it touches at most two of them (the kernel's lo/hi scales).
  static constexpr int kNAlign = BLOCK_N % 128 == 0 ? 128 : BLOCK_N % 64 == 0 ? 64 : 32;
  static_assert(kScaleBlock - kNAlign + BLOCK_N <= 2 * kScaleBlock,
                "a tile may span at most two 128-wide scale blocks of B");
  static_assert(kBytesA % 1024 == 0 && kBytesB % 1024 == 0,
                "stage buffers must stay 1024B aligned (128B swizzle)");
  static_assert(kBytesSA % 128 == 0, "scale stage must stay 128B aligned");
  static_assert(kOffBar % 8 == 0, "mbarriers need 8B alignment");
  static_assert(kDynamicSmem <= kMaxSmemPerBlock, "too many stages");
  static_assert(BLOCK_M <= 256 && BLOCK_N <= 256, "TMA box dims <= 256");
};

// Rows of A (and of its scales) that one TMA load brings per k-block. A dense
// problem with fewer rows than the tile (decode) loads M rounded up to a
// swizzle atom: filling the box's out-of-bounds rows with zeros cost the
// producer ~10% at M = 1 (H200). The rows left stale in shared memory feed only
// accumulator rows >= M, which are never stored. Host and kernel share this rule.
__host__ __device__ constexpr int fp8_gemm_a_rows(int block_m, bool grouped, int multicast,
                                                  int m) {
  return !grouped && multicast == 1 && m < block_m ? (m + 7) / 8 * 8 : block_m / multicast;
}

// Clusters a dense persistent launch of `tiles` cluster tiles uses, at most
// `max_clusters`: only as many as the last wave needs to finish with the others
// (the same number of waves on fewer busy SMs). Host and kernel_bench share this rule.
__host__ __device__ constexpr int64_t fp8_gemm_balanced_clusters(int64_t tiles,
                                                                 int64_t max_clusters) {
  const int64_t waves = (tiles + max_clusters - 1) / max_clusters;
  return waves <= 1 ? tiles : (tiles + waves - 1) / waves;
}

// Largest number of stages that fits in shared memory.
constexpr int fp8_gemm_max_stages(int block_m, int block_n, bool grouped = false) {
  return (kMaxSmemPerBlock - (grouped ? kGroupTableBytes : 0) -
          fp8_gemm_d_bytes(block_m, block_n, grouped)) /
         (block_m * kBlockK + block_n * kBlockK + fp8_gemm_sa_bytes(block_m, grouped) +
          fp8_gemm_bias_bytes(block_n, grouped) + 16);
}

// Static persistent schedule: tile -> (m_block, n_block). Consecutive tiles
// sweep kGroupM M-blocks first, then move along N, so the CTAs that run
// concurrently share a few A row-panels and B column-panels in L2.
__device__ __forceinline__ void fp8_gemm_tile_coords(int tile, int num_m_blocks,
                                                     int num_n_blocks,
                                                     int& m_block,
                                                     int& n_block) {
  const int tiles_per_group = kGroupM * num_n_blocks;
  const int group = tile / tiles_per_group;
  const int first_m = group * kGroupM;
  const int group_m = min(num_m_blocks - first_m, kGroupM);
  const int in_group = tile - group * tiles_per_group;
  m_block = first_m + in_group % group_m;
  n_block = in_group / group_m;
}

// Calls f(std::integral_constant<int, J>{}) for the J among kStep, 2 kStep, ...
// (below kEnd) that equals j, so that code depending on j can be unrolled for
// a constant (e.g. which accumulator chunks take the second scale block of B).
// False when no J matches (the caller decides: the promotion traps).
template <int kStep, int kEnd, int J = kStep, typename F>
__device__ __forceinline__ bool dispatch_multiple(int j, F&& f) {
  if constexpr (J < kEnd) {
    if (j == J) {
      f(std::integral_constant<int, J>{});
      return true;
    }
    return dispatch_multiple<kStep, kEnd, J + kStep>(j, f);
  } else {
    return false;
  }
}

// The mainloop's k-block schedule: blocks [kb, kb_split) as chunks of 8, then
// 4, 2 and 1 consecutive blocks (kMaxChunk 1: one at a time), then blocks
// [kb_split, kb_end) one at a time; `chunk(kb, std::integral_constant<int, U>,
// mid)` runs U blocks. The first chunk, the largest that fits, gets `first`
// as its mid (the previous tile's epilogue), the others `rest`; kMayBeEmpty:
// with no block at all, `first` runs alone.
template <int kMaxChunk, bool kMayBeEmpty, typename Chunk, typename First, typename Rest>
__device__ __forceinline__ void run_k_chunks(int kb, int kb_split, int kb_end, Chunk&& chunk,
                                             First&& first, Rest&& rest) {
  using C8 = std::integral_constant<int, 8>;
  using C4 = std::integral_constant<int, 4>;
  using C2 = std::integral_constant<int, 2>;
  using C1 = std::integral_constant<int, 1>;
  const int n = kb_split - kb;
  if constexpr (kMaxChunk == 8) {
    if (n >= 8) {
      chunk(kb, C8{}, first);
      kb += 8;
    } else if (n >= 4) {
      chunk(kb, C4{}, first);
      kb += 4;
    } else if (n >= 2) {
      chunk(kb, C2{}, first);
      kb += 2;
    } else if (!kMayBeEmpty || n == 1) {
      chunk(kb, C1{}, first);
      kb += 1;
    } else {
      first();
    }
    for (; kb + 8 <= kb_split; kb += 8) chunk(kb, C8{}, rest);
    if (kb_split - kb >= 4) {
      chunk(kb, C4{}, rest);
      kb += 4;
    }
    if (kb_split - kb >= 2) {
      chunk(kb, C2{}, rest);
      kb += 2;
    }
  } else {
    static_assert(kMaxChunk == 1, "chunks of 8 down to 1, or of 1");
    if (kMayBeEmpty && n == 0) {
      first();
    } else {
      chunk(kb, C1{}, first);
      kb += 1;
    }
  }
  for (; kb < kb_end; ++kb) chunk(kb, C1{}, rest);
}

template <typename OutT>
__device__ __forceinline__ void store_pair(OutT* p, float v0, float v1);

template <>
__device__ __forceinline__ void store_pair<float>(float* p, float v0, float v1) {
  *reinterpret_cast<float2*>(p) = make_float2(v0, v1);
}

template <>
__device__ __forceinline__ void store_pair<__nv_bfloat16>(__nv_bfloat16* p,
                                                          float v0, float v1) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(v0, v1);
}

template <typename OutT>
__device__ __forceinline__ void store_one(OutT* p, float v);

template <>
__device__ __forceinline__ void store_one<float>(float* p, float v) { *p = v; }

template <>
__device__ __forceinline__ void store_one<__nv_bfloat16>(__nv_bfloat16* p,
                                                         float v) {
  *p = __float2bfloat16_rn(v);
}

// M-grouped problems: group g owns rows [row_start_g, row_start_g + size_g).
//   contiguous (masked_stride == 0): groups follow each other from row 0;
//       sizes are clipped so that the groups end at row M at the latest;
//   masked (masked_stride > 0): group g starts at row g * masked_stride and
//       its size is clipped to [0, masked_stride].
// Rows of `out` that belong to no group are written as zeros.
struct GroupArgs {
  const int* sizes;   // [num_groups] int32 on device; nullptr = dense GEMM
  int num_groups;
  int masked_stride;
  // 1: rows in no group keep what `out` holds (it aliases the caller's buffer), else zeros.
  int keep_unused_rows = 0;
};

// Fills the smem group table (run by one full warp): mblk[g] = first global
// m-block of group g (mblk[G] = total), rows [rstart[g], rend[g]).
template <int BLOCK_M>
__device__ __forceinline__ void build_group_table(const GroupArgs& grp, int M,
                                                  int* mblk, int* rstart, int* rend,
                                                  int lane) {
  int64_t carry_rows = 0;
  int carry_mb = 0;
  if (lane == 0) mblk[0] = 0;
  for (int base = 0; base < grp.num_groups; base += 32) {
    const int g = base + lane;
    const int64_t size = g < grp.num_groups ? max(__ldg(grp.sizes + g), 0) : 0;
    int64_t start, end;
    if (grp.masked_stride > 0) {
      start = static_cast<int64_t>(g) * grp.masked_stride;
      end = start + min(size, static_cast<int64_t>(grp.masked_stride));
    } else {
      int64_t incl = size;  // inclusive prefix sum over the warp (64-bit: no overflow)
#pragma unroll
      for (int d = 1; d < 32; d *= 2) {
        const int64_t v = __shfl_up_sync(0xffffffffu, incl, d);
        if (lane >= d) incl += v;
      }
      start = min(carry_rows + incl - size, static_cast<int64_t>(M));
      end = min(carry_rows + incl, static_cast<int64_t>(M));
      carry_rows = __shfl_sync(0xffffffffu, carry_rows + incl, 31);
    }
    int mb = g < grp.num_groups ? static_cast<int>((end - start + BLOCK_M - 1) / BLOCK_M) : 0;
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
      const int v = __shfl_up_sync(0xffffffffu, mb, d);
      if (lane >= d) mb += v;
    }
    if (g < grp.num_groups) {
      mblk[g + 1] = carry_mb + mb;
      rstart[g] = static_cast<int>(start);
      rend[g] = static_cast<int>(end);
    }
    carry_mb += __shfl_sync(0xffffffffu, mb, 31);
  }
}

// Where one output tile lives.
struct TileInfo {
  int row0;     // first row of a / out
  int row_end;  // rows >= row_end belong to another group (or are past M)
  int n0;       // first column of out
  int group;
};

// With kMulticast CTAs per cluster, `tile` indexes groups of kMulticast
// tiles side by side along N (same rows of A); `rank` picks one.
template <int BLOCK_M, int BLOCK_N, bool kGrouped, int kMulticast = 1>
__device__ __forceinline__ TileInfo tile_info(int tile, int num_m_blocks, int num_n_blocks,
                                              int M, int num_groups, const int* mblk,
                                              const int* rstart, const int* rend,
                                              int rank = 0) {
  int m_block, n_block;
  fp8_gemm_tile_coords(tile, num_m_blocks, num_n_blocks / kMulticast, m_block, n_block);
  n_block = n_block * kMulticast + rank;
  if constexpr (!kGrouped) {
    return TileInfo{m_block * BLOCK_M, M, n_block * BLOCK_N, 0};
  } else {
    // The group whose m-blocks contain m_block: the first g with mblk[g+1] > m_block
    // (empty groups have mblk[g] == mblk[g+1] and are skipped).
    int lo = 0, hi = num_groups - 1;
    while (lo < hi) {
      const int mid = (lo + hi) >> 1;
      if (mblk[mid + 1] > m_block) hi = mid; else lo = mid + 1;
    }
    return TileInfo{rstart[lo] + (m_block - mblk[lo]) * BLOCK_M, rend[lo], n_block * BLOCK_N, lo};
  }
}

// Writes zeros to out[r0:r1, :] (a contiguous span), spread over `nthreads` threads.
template <typename OutT>
__device__ __forceinline__ void zero_rows(OutT* out, int64_t r0, int64_t r1, int N,
                                          int64_t tid, int64_t nthreads) {
  if (r1 <= r0) return;
  OutT* p = out + r0 * N;
  const int64_t count = (r1 - r0) * N;
  constexpr int kVec = 16 / sizeof(OutT);
  const int64_t head = min(count, static_cast<int64_t>(
      ((16 - reinterpret_cast<uintptr_t>(p) % 16) % 16) / sizeof(OutT)));
  const int64_t num_vec = (count - head) / kVec;
  const OutT zero = static_cast<OutT>(0.0f);
  for (int64_t i = tid; i < head; i += nthreads) p[i] = zero;
  uint4* v = reinterpret_cast<uint4*>(p + head);
  for (int64_t i = tid; i < num_vec; i += nthreads) v[i] = make_uint4(0, 0, 0, 0);
  for (int64_t i = head + num_vec * kVec + tid; i < count; i += nthreads) p[i] = zero;
}

// Epilogue of one wgmma accumulator tile, registers -> global: this thread
// holds rows `row` and `row + 8` (rows >= row_end are skipped) and columns
// col_base + 8j + {0, 1}; out = acc (+ c[row, col]), out/c row pitch N.
// (A bias is already in acc: the kernel starts each tile's accumulator from it.)
// One store per column pair: for tiles at the right edge and odd N.
template <int BLOCK_N, typename OutT>
__device__ __forceinline__ void store_tile_pairs(const float* acc, OutT* out, const float* c,
                                           int row, int row_end,
                                           int col_base, int N) {
  const bool n_even = (N % 2) == 0;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = row + h * 8;
    if (r >= row_end) continue;
    OutT* out_row = out + static_cast<int64_t>(r) * N;
    const float* c_row = c != nullptr ? c + static_cast<int64_t>(r) * N : nullptr;
#pragma unroll
    for (int j = 0; j < BLOCK_N / 8; ++j) {
      const int col = col_base + j * 8;
      float v0 = acc[j * 4 + h * 2];
      float v1 = acc[j * 4 + h * 2 + 1];
      if (n_even) {
        // col is even and N is even: col < N implies col + 1 < N, and the
        // pair is 2-element aligned.
        if (col < N) {
          if (c_row != nullptr) {
            const float2 cv = *reinterpret_cast<const float2*>(c_row + col);
            v0 += cv.x;
            v1 += cv.y;
          }
          store_pair<OutT>(out_row + col, v0, v1);
        }
      } else {
        if (col < N) {
          if (c_row != nullptr) v0 += c_row[col];
          store_one<OutT>(out_row + col, v0);
        }
        if (col + 1 < N) {
          if (c_row != nullptr) v1 += c_row[col + 1];
          store_one<OutT>(out_row + col + 1, v1);
        }
      }
    }
  }
}

// Quad transpose: lane q of a quad holds x[j] = its column pair q of 8-column
// block j (j = 0..3, W 32-bit words per pair); afterwards x[p] = pair p of block q,
// so each lane owns 8 consecutive columns. Rows are per quad: no lane diverges.
template <int W>
__device__ __forceinline__ void quad_transpose(uint32_t (&x)[4][W], int q) {
#pragma unroll
  for (int bit = 1; bit <= 2; bit <<= 1) {
    const bool upper = (q & bit) != 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (j & bit) continue;  // swap x[j + bit] of the lower lane with x[j] of the upper one
#pragma unroll
      for (int w = 0; w < W; ++w) {
        const uint32_t recv = __shfl_xor_sync(0xffffffffu, upper ? x[j][w] : x[j + bit][w], bit);
        if (upper) x[j][w] = recv; else x[j + bit][w] = recv;
      }
    }
  }
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// The same epilogue with 16-byte stores: each quad transposes four 8-column
// blocks so that a lane writes 8 consecutive columns at once. A warp store then
// covers 64 contiguous bytes of each of its 8 rows instead of 16, which cuts the
// epilogue's LSU cycles (the tensor cores idle during it) about 3x.
// Falls back to store_tile_pairs unless the tile is whole in N, N % 8 == 0 and
// out / c are 16-byte aligned. Called by whole warps.
template <int BLOCK_N, typename OutT>
__device__ __forceinline__ void store_tile(const float* acc, OutT* out, const float* c,
                                           int row, int row_end,
                                           int col_base, int N) {
  constexpr bool kBf16 = std::is_same<OutT, __nv_bfloat16>::value;
  const int q = (col_base / 2) % 4;  // = lane % 4: col_base = n0 + 2 * (lane % 4), n0 % 8 == 0
  const int n0 = col_base - 2 * q;
  const bool fast = N % 8 == 0 && n0 + BLOCK_N <= N &&
                    reinterpret_cast<uintptr_t>(out) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(c) % 16 == 0;
  if (!__all_sync(0xffffffffu, fast)) {
    store_tile_pairs<BLOCK_N, OutT>(acc, out, c, row, row_end, col_base, N);
    return;
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = row + h * 8;
    const bool valid = r < row_end;  // the same for the whole quad
    OutT* out_row = out + static_cast<int64_t>(r) * N;
#pragma unroll
    for (int g = 0; g < BLOCK_N / 32; ++g) {
      float v[4][2];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        v[j][0] = acc[(g * 4 + j) * 4 + h * 2];
        v[j][1] = acc[(g * 4 + j) * 4 + h * 2 + 1];
      }
      const int col = n0 + (g * 4 + q) * 8;  // this lane's 8 columns after the transpose
      if (kBf16 && c == nullptr) {
        uint32_t x[4][1];
#pragma unroll
        for (int j = 0; j < 4; ++j) x[j][0] = pack_bf16x2(v[j][0], v[j][1]);
        quad_transpose<1>(x, q);
        if (valid) {
          *reinterpret_cast<uint4*>(out_row + col) = make_uint4(x[0][0], x[1][0], x[2][0], x[3][0]);
        }
      } else {
        uint32_t x[4][2];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          x[j][0] = __float_as_uint(v[j][0]);
          x[j][1] = __float_as_uint(v[j][1]);
        }
        quad_transpose<2>(x, q);
        if (valid) {
          float o[8];
#pragma unroll
          for (int p = 0; p < 4; ++p) {
            o[2 * p] = __uint_as_float(x[p][0]);
            o[2 * p + 1] = __uint_as_float(x[p][1]);
          }
          if (c != nullptr) {
            const float4* c_ptr = reinterpret_cast<const float4*>(c + static_cast<int64_t>(r) * N + col);
            const float4 c0 = c_ptr[0], c1 = c_ptr[1];
            o[0] += c0.x; o[1] += c0.y; o[2] += c0.z; o[3] += c0.w;
            o[4] += c1.x; o[5] += c1.y; o[6] += c1.z; o[7] += c1.w;
          }
          if constexpr (kBf16) {
            *reinterpret_cast<uint4*>(out_row + col) =
                make_uint4(pack_bf16x2(o[0], o[1]), pack_bf16x2(o[2], o[3]),
                           pack_bf16x2(o[4], o[5]), pack_bf16x2(o[6], o[7]));
          } else {
            float4* o_ptr = reinterpret_cast<float4*>(out_row + col);
            o_ptr[0] = make_float4(o[0], o[1], o[2], o[3]);
            o_ptr[1] = make_float4(o[4], o[5], o[6], o[7]);
          }
        }
      }
    }
  }
}

// How the epilogue writes `out` (chosen on the host, the same for all tiles).
enum StoreMode : int {
  kStoreRegisters = 0,  // store_tile: st.global from registers
  kStoreTma = 1,        // store_tile_tma: smem staging + TMA store
  kStoreTmaAdd = 2,     // the same with a TMA reduce-add: out holds c (aliased), fp32
};

// TMA-store epilogue of one math warpgroup's 64 x BLOCK_N accumulator
// (warpgroup `wg`, rows [row0, row0 + 64) of out, columns [n0, n0 + BLOCK_N)):
// registers -> the warpgroup's 128B-swizzled smem boxes -> one thread
// issues the TMA stores (or reduce-adds). The math warps spend a few
// instructions here instead of a global store per value and a load of c, and
// TMA clips rows >= M and columns >= N. Called by the whole warpgroup.
// `smem_d`: this warpgroup's kDCols * 128 bytes, 1024B aligned (64 rows of kDCols
// bf16); columns [kCol0, kCol0 + kNCols) go through it in passes of at most its size.
template <int BLOCK_N, int kDCols, typename OutT, int kCol0 = 0, int kNCols = BLOCK_N>
__device__ __forceinline__ void store_tile_tma(const float* acc, uint8_t* smem_d,
                                               const CUtensorMap* tmap_out, bool reduce_add,
                                               int row0, int n0, int N, int wg, int warp_in_wg,
                                               int lane) {
  static_assert(BLOCK_N % 64 == 0, "TMA-store epilogue needs BLOCK_N % 64 == 0");
  constexpr bool kBf16 = std::is_same<OutT, __nv_bfloat16>::value;
  constexpr int kOutCols = kDCols * 2 / static_cast<int>(sizeof(OutT));  // per pass at most
  constexpr int kPassCols = kNCols < kOutCols ? kNCols : kOutCols;
  static_assert(kNCols % kPassCols == 0 && kCol0 % kPassCols == 0, "bad column range");
  constexpr int kPasses = kNCols / kPassCols;
  constexpr int kBoxCols = fp8_gemm_out_box_cols<OutT>();
  constexpr int kBoxes = kPassCols / kBoxCols;
  constexpr int kBoxBytes = 64 * 128;
  const int q = lane % 4;
  const bool leader = warp_in_wg == 0 && lane == 0;
  const uint32_t bar_id = 2 + wg;  // 0: __syncthreads
  const uint32_t d_base = ptx::smem_addr(smem_d);

#pragma unroll
  for (int p = 0; p < kPasses; ++p) {
    const int pc0 = kCol0 + p * kPassCols;  // first column of this pass
    const uint32_t pass_base = d_base + (pc0 % kOutCols) * sizeof(OutT) / 128 * kBoxBytes;
    // The previous store's reads of the buffer are done before anyone rewrites it.
    if (pc0 % kOutCols == 0 && leader) ptx::bulk_wait_group_read0();
    ptx::named_barrier_sync(bar_id, 128);
    // 16-byte chunk `chunk` of row `row` of a box sits at chunk ^ (row % 8).
    if constexpr (kBf16) {
      // One stmatrix.x4 per 16 columns: matrices (rows +0/+8) x (8-column blocks 2jj, 2jj+1).
      const int i = lane / 8;
      const int row = warp_in_wg * 16 + (i % 2) * 8 + lane % 8;
#pragma unroll
      for (int jj = 0; jj < kPassCols / 16; ++jj) {
        const int a = (pc0 / 16 + jj) * 8;  // accumulator index of the 16 columns
        const int col_bytes = (jj * 2 + i / 2) * 16;
        const uint32_t addr = pass_base + (col_bytes / 128) * kBoxBytes + row * 128 +
                              ((((col_bytes % 128) / 16) ^ (row % 8)) << 4);
        ptx::stmatrix_x4(addr, pack_bf16x2(acc[a + 0], acc[a + 1]),
                         pack_bf16x2(acc[a + 2], acc[a + 3]),
                         pack_bf16x2(acc[a + 4], acc[a + 5]),
                         pack_bf16x2(acc[a + 6], acc[a + 7]));
      }
    } else {
#pragma unroll
      for (int jb = 0; jb < kPassCols / 8; ++jb) {
        const int j = pc0 / 8 + jb;
        const int col_bytes = (jb * 8 + 2 * q) * 4;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = warp_in_wg * 16 + lane / 4 + h * 8;
          const uint32_t addr = pass_base + (col_bytes / 128) * kBoxBytes + row * 128 +
                                ((((col_bytes % 128) / 16) ^ (row % 8)) << 4) + col_bytes % 16;
          ptx::st_shared_v2(addr, acc[j * 4 + h * 2], acc[j * 4 + h * 2 + 1]);
        }
      }
    }
    ptx::fence_proxy_async();  // generic-proxy smem writes -> visible to TMA
    ptx::named_barrier_sync(bar_id, 128);
    if (leader) {
#pragma unroll
      for (int b = 0; b < kBoxes; ++b) {
        const int x = n0 + pc0 + b * kBoxCols;
        if (x < N) {
          if (reduce_add) {
            ptx::tma_reduce_add_2d(tmap_out, pass_base + b * kBoxBytes, x, row0);
          } else {
            ptx::tma_store_2d(tmap_out, pass_base + b * kBoxBytes, x, row0);
          }
        }
      }
      ptx::bulk_commit_group();
    }
  }
}

// Kernel arguments:
//   tmap_a : a  [M, K]  uint8 view, box [BLOCK_M, 128], 128B swizzle
//   tmap_b : b  [G*N, K] uint8 view, box [BLOCK_N, 128], 128B swizzle
//   tmap_sa: sa [KB, MP] f32,        box [1, kSARows],   no swizzle
//   sb     : [G, NB, KB] f32 (global loads)
//   bias   : [N] f32 or nullptr (dense only)
//   c      : [M, N] f32 or nullptr (dense only); may alias `out` (each element
//            is read and then written by the same thread). With kStoreTmaAdd
//            c is `out` itself and is never read here: TMA adds the tile into it.
//   out    : [M, N] OutT
//   tmap_out: out, box [64, 128 bytes], 128B swizzle (used unless store_mode
//            is kStoreRegisters, which the host picks when out cannot take TMA)
//   grp    : group sizes (kGrouped only; G = 1 for the dense GEMM)
// kMulticast = 2: launched in clusters of 2 CTAs that compute horizontally
// adjacent tiles (same rows, so the same A tile); each CTA loads half of the
// A rows and TMA multicasts them to both, halving A's L2 traffic. The host
// guarantees an even number of N blocks.
template <int BLOCK_M, int BLOCK_N, int STAGES, typename OutT, bool kGrouped,
          int kMulticast = 1>
__global__ void __launch_bounds__(Fp8GemmLayout<BLOCK_M, BLOCK_N, STAGES, kGrouped>::kNumThreads, 1)
fp8_gemm_nt_kernel(const __grid_constant__ CUtensorMap tmap_a,
                   const __grid_constant__ CUtensorMap tmap_b,
                   const __grid_constant__ CUtensorMap tmap_sa,
                   const float* __restrict__ sb,
                   const float* __restrict__ bias,
                   const float* c,
                   OutT* out,
                   const __grid_constant__ CUtensorMap tmap_out,
                   int store_mode,
                   int M, int N, int K, GroupArgs grp) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using L = Fp8GemmLayout<BLOCK_M, BLOCK_N, STAGES, kGrouped>;
  // Each CTA's share of a multicast A tile is whole 8-row swizzle atoms.
  static_assert(kMulticast == 1 || (kMulticast == 2 && (BLOCK_M / 2) % 8 == 0), "bad multicast");
  constexpr bool kSplitN = fp8_gemm_split_n(BLOCK_N);
  // Split tiles with half a D tile store the previous tile in column halves, each
  // while one wgmma half of the next tile's first k-block runs.
  constexpr bool kSplitEpilogue = fp8_gemm_split_epilogue(BLOCK_N, kGrouped);
  constexpr int kWgmmaN = kSplitN ? BLOCK_N / 2 : BLOCK_N;
  constexpr int kNumAccum = BLOCK_N / 2;  // accumulator floats per thread
  constexpr int kNumBuf = ptx::WgmmaFp8<kWgmmaN>::kNumAccum;  // one wgmma result
  // Two wgmma result buffers + the accumulator fit in registers up to BLOCK_N 128.
  constexpr bool kPipelined = fp8_gemm_pipelined(BLOCK_M, BLOCK_N);
  // B's scales from a per-lane window (window_b_scales): the serial loop, and 64x128
  // (kernel_bench, H200, us, alone / bursts: 128x7168x2048 16.8 -> 15.2 / 11.3 -> 10.6,
  // 128x7168x16384 47.0 -> 43.6). 64x64 and 64x32 ran 0-12% slower with it, 128x128 2.5%.
  constexpr bool kScaleWindow = !kSplitN && (!kPipelined || (BLOCK_M == 64 && BLOCK_N == 128));
  // 512 threads (BLOCK_M 192) share 64K registers: 128 x 24 + 384 x 160.
  constexpr int kTmaRegs = L::kNumMathWG == 3 ? 24 : 40;
  constexpr int kMathRegs = L::kNumMathWG == 3 ? 160 : L::kNumMathWG == 2 ? 232 : 240;

  extern __shared__ __align__(1024) uint8_t smem_raw[];
  // 128B-swizzled TMA destinations / wgmma operands need 1024B alignment.
  if ((ptx::smem_addr(smem_raw) & 1023u) != 0) __trap();
  uint8_t* smem = smem_raw;
  uint8_t* smem_a = smem + L::kOffA;
  uint8_t* smem_b = smem + L::kOffB;
  uint8_t* smem_d = smem + L::kOffD;
  float* smem_bias = reinterpret_cast<float*>(smem + L::kOffBias);
  float* smem_sa = reinterpret_cast<float*>(smem + L::kOffSA);
  uint64_t* full_bar = reinterpret_cast<uint64_t*>(smem + L::kOffBar);
  uint64_t* empty_bar = full_bar + STAGES;
  int* grp_mblk = reinterpret_cast<int*>(smem + L::kOffGroups);  // kGrouped only
  int* grp_rstart = grp_mblk + kMaxGroups + 1;
  int* grp_rend = grp_rstart + kMaxGroups;

  const int thread = static_cast<int>(threadIdx.x);
  const int warp = __shfl_sync(0xffffffffu, thread / 32, 0);  // warp-uniform
  const int lane = thread & 31;
  const int wg = warp / 4;

  if (thread == L::kNumMathThreads) {
    ptx::prefetch_tma_descriptor(&tmap_a);
    ptx::prefetch_tma_descriptor(&tmap_b);
    ptx::prefetch_tma_descriptor(&tmap_sa);
    if (store_mode != kStoreRegisters) ptx::prefetch_tma_descriptor(&tmap_out);
  }
  if (thread == 0) {
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
      ptx::mbarrier_init(&full_bar[s], 1);  // producer's arrive_expect_tx
      // 1 per math warp of every CTA that writes into this stage
      ptx::mbarrier_init(&empty_bar[s], L::kNumMathWarps * kMulticast);
    }
    ptx::fence_barrier_init();
    ptx::fence_proxy_async();
  }
  if constexpr (kGrouped) {
    if (warp == 1) build_group_table<BLOCK_M>(grp, M, grp_mblk, grp_rstart, grp_rend, lane);
  }
  // Barriers initialised (in the peer CTA too) before anyone arrives on them.
  if constexpr (kMulticast > 1) {
    ptx::cluster_sync();
  } else {
    __syncthreads();
  }
  const int rank = kMulticast > 1 ? static_cast<int>(ptx::cluster_ctarank()) : 0;
  const int sched0 = static_cast<int>(blockIdx.x) / kMulticast;  // cluster index
  const int sched_step = static_cast<int>(gridDim.x) / kMulticast;

  const int num_groups = kGrouped ? grp.num_groups : 1;
  const int num_m_blocks = kGrouped ? grp_mblk[num_groups] : (M + BLOCK_M - 1) / BLOCK_M;
  const int num_n_blocks = (N + BLOCK_N - 1) / BLOCK_N;
  const int num_k_blocks = (K + kBlockK - 1) / kBlockK;
  const int num_scale_n = (N + kScaleBlock - 1) / kScaleBlock;
  const int num_tiles = num_m_blocks * (num_n_blocks / kMulticast);  // per cluster
  // Dense: each tile's bias slice is bulk-copied into smem with its first
  // k-block (where the slice is whole 16-byte units); else it is read from global.
  const bool bias_smem = L::kBytesBias > 0 && bias != nullptr && N % 4 == 0 &&
                         reinterpret_cast<uintptr_t>(bias) % 16 == 0;

  if (wg == L::kNumMathWG) {
    // ------------------------------------------------------------------
    // Producer warpgroup: one thread issues all TMA loads.
    // ------------------------------------------------------------------
    ptx::setmaxnreg_dec<kTmaRegs>();
    // A short A box (decode, fp8_gemm_a_rows) delivers a_rows rows of A and of sa.
    const int a_rows = fp8_gemm_a_rows(BLOCK_M, kGrouped, kMulticast, M);
    const uint32_t tx_bytes =
        a_rows * kMulticast == BLOCK_M ? L::kTxBytes
                                       : L::kTxBytes - (BLOCK_M - a_rows) * (kBlockK + 4);
    if (thread == L::kNumMathThreads) {
      int stage = 0;
      uint32_t phase = 0;
      for (int tile = sched0; tile < num_tiles; tile += sched_step) {
        const TileInfo t = tile_info<BLOCK_M, BLOCK_N, kGrouped, kMulticast>(
            tile, num_m_blocks, num_n_blocks, M, num_groups, grp_mblk, grp_rstart, grp_rend,
            rank);
        const int b_row0 = t.group * N + t.n0;
        if (store_mode == kStoreTmaAdd) {
          // The tile's c (= out) into L2 now, so that its reduce-add, a whole
          // tile of k-blocks later, does not wait for HBM.
          constexpr int kBoxCols = fp8_gemm_out_box_cols<OutT>();
          for (int r = 0; r < BLOCK_M; r += 64) {
            for (int x = 0; x < BLOCK_N && t.n0 + x < N; x += kBoxCols) {
              ptx::tma_prefetch_2d(&tmap_out, t.n0 + x, t.row0 + r);
            }
          }
        }
        for (int kb = 0; kb < num_k_blocks; ++kb) {
          // Wait until the math warps released this slot (trivially true in
          // the first pass over the ring: parity 1 of a fresh barrier).
          ptx::mbarrier_wait(&empty_bar[stage], phase ^ 1u);
          // Full box bytes are always delivered (OOB elements zero-filled).
          const uint32_t bias_bytes = bias_smem && kb == 0 ? min(BLOCK_N, N - t.n0) * 4 : 0;
          ptx::mbarrier_arrive_expect_tx(&full_bar[stage], tx_bytes + bias_bytes);
          if constexpr (kMulticast > 1) {
            // Our share of the A rows, into both CTAs (tmap_a's box is BLOCK_M/2 rows).
            constexpr int kRows = BLOCK_M / kMulticast;
            ptx::tma_load_2d_multicast(&tmap_a, &full_bar[stage],
                                       smem_a + stage * L::kBytesA + rank * kRows * kBlockK,
                                       kb * kBlockK, t.row0 + rank * kRows,
                                       static_cast<uint16_t>((1u << kMulticast) - 1));
          } else {
            ptx::tma_load_2d(&tmap_a, &full_bar[stage], smem_a + stage * L::kBytesA,
                             kb * kBlockK, t.row0);
          }
          ptx::tma_load_2d(&tmap_b, &full_bar[stage], smem_b + stage * L::kBytesB,
                           kb * kBlockK, b_row0);
          ptx::tma_load_2d(&tmap_sa, &full_bar[stage], smem_sa + stage * (L::kBytesSA / 4),
                           kGrouped ? t.row0 & ~3 : t.row0, kb);
          if (bias_bytes > 0) {
            ptx::bulk_load_1d(smem_bias + stage * BLOCK_N, bias + t.n0, bias_bytes,
                              &full_bar[stage]);
          }
          if (++stage == STAGES) {
            stage = 0;
            phase ^= 1u;
          }
        }
      }
    }
  } else {
    // ------------------------------------------------------------------
    // Math warpgroups: warpgroup `wg` owns tile rows [wg*64, wg*64+64).
    // ------------------------------------------------------------------
    ptx::setmaxnreg_inc<kMathRegs>();
    const int warp_in_wg = warp % 4;
    const int r_local = wg * 64 + warp_in_wg * 16 + lane / 4;  // and +8
    const int a_wg_offset = wg * 64 * kBlockK;  // bytes; multiple of 1024

    float acc[kNumAccum];
    float buf0[kNumBuf];  // wgmma results of one k-block (or half), before promotion
    float buf1[kPipelined ? kNumBuf : 1];

    // The ring is walked by two cursors: `issue` (next k-block whose wgmma is
    // issued) and `promo` (next k-block to promote and release).
    int issue_stage = 0, promo_stage = 0;
    uint32_t issue_phase = 0, promo_phase = 0;

    // Waits for the next stage's TMA data and issues its 4 wgmmas (one commit
    // group). Split tiles issue a stage in two calls, B rows [0, 128) (waits
    // for the data) and [128, 256) (moves on to the next stage).
    auto issue = [&](float (&d)[kNumBuf], int half) {
      if (!kSplitN || half == 0) ptx::mbarrier_wait(&full_bar[issue_stage], issue_phase);
      const uint64_t desc_a =
          ptx::make_smem_desc_k_sw128(smem_a + issue_stage * L::kBytesA + a_wg_offset);
      const uint64_t desc_b = ptx::make_smem_desc_k_sw128(
          smem_b + issue_stage * L::kBytesB + (kSplitN ? half * kWgmmaN * kBlockK : 0));
      ptx::wgmma_k_block<kWgmmaN>(d, desc_a, desc_b);
      if (kSplitN && half == 0) return;
      if (++issue_stage == STAGES) {
        issue_stage = 0;
        issue_phase ^= 1u;
      }
    };

    // The epilogue of a tile is deferred into the next tile's first k-blocks:
    // it runs while their wgmmas are in flight (the tensor cores would idle
    // during it otherwise). `prev` is the tile whose result `acc` holds.
    // Grouped tiles store through TMA only where the warpgroup's 64 rows are
    // all in the tile's group (a TMA box would write rows of the next one).
    TileInfo prev{0, 0, 0, -1};
    // half < 0: the whole tile; with kSplitEpilogue, half 0 or 1: that column half
    // (half 1 stores nothing from registers: half 0 stored the whole tile).
    auto store_prev = [&](int half) {
      if (prev.group < 0) return;
      if constexpr (fp8_gemm_tma_store(BLOCK_M, BLOCK_N)) {
        const int wg_row0 = prev.row0 + wg * 64;
        if (store_mode != kStoreRegisters && (!kGrouped || wg_row0 + 64 <= prev.row_end)) {
          constexpr int kDCols = fp8_gemm_d_cols(BLOCK_N, kGrouped);
          uint8_t* d = smem_d + wg * (kDCols * 128);
          const bool add = store_mode == kStoreTmaAdd;
          if (!kSplitEpilogue || half < 0) {
            store_tile_tma<BLOCK_N, kDCols, OutT>(acc, d, &tmap_out, add, wg_row0, prev.n0, N,
                                                  wg, warp_in_wg, lane);
          } else if (half == 0) {
            store_tile_tma<BLOCK_N, kDCols, OutT, 0, BLOCK_N / 2>(
                acc, d, &tmap_out, add, wg_row0, prev.n0, N, wg, warp_in_wg, lane);
          } else {
            store_tile_tma<BLOCK_N, kDCols, OutT, BLOCK_N / 2, BLOCK_N / 2>(
                acc, d, &tmap_out, add, wg_row0, prev.n0, N, wg, warp_in_wg, lane);
          }
          return;
        }
      }
      if (half <= 0) {
        store_tile<BLOCK_N, OutT>(acc, out, c, prev.row0 + r_local, prev.row_end,
                                  prev.n0 + (lane % 4) * 2, N);
      }
    };
    // Stores `prev`, then starts the accumulator of the tile at column n0 from
    // its bias (zeros without), so that no add waits for bias loads at the store;
    // half >= 0: only that column half (kSplitEpilogue).
    // A bias in smem sits in the stage of the tile's first k-block (promo_stage,
    // not yet released); the serial fp32 loop flushes before waiting for it.
    // kSplitEpilogue tiles have no smem slot for it: each lane holds the pairs of
    // columns 2 lane and 64 + 2 lane of both 128-column halves (bias_pairs, read a
    // tile ahead), and the accumulator's columns come from them by shuffles.
    float2 bias_pairs[kSplitEpilogue ? 4 : 1];
    auto load_bias_pairs = [&](int n0) {
#pragma unroll
      for (int i = 0; i < (kSplitEpilogue ? 4 : 0); ++i) {
        const int col = n0 + i * 64 + lane * 2;
        float2 v = make_float2(0.0f, 0.0f);
        if (col + 1 < N) {
          v = __ldg(reinterpret_cast<const float2*>(bias + col));  // 8B aligned (host check)
        } else if (col < N) {
          v.x = __ldg(bias + col);
        }
        bias_pairs[i] = v;
      }
    };
    auto flush = [&](int n0, int half, int next_n0) {
      store_prev(half);
      if (bias_smem) ptx::mbarrier_wait(&full_bar[promo_stage], promo_phase);
      const float* bias_s = smem_bias + promo_stage * BLOCK_N + (lane % 4) * 2;
      const int col0 = n0 + (lane % 4) * 2;
#pragma unroll
      for (int j = 0; j < kNumAccum / 4; ++j) {
        if (half >= 0 && j / (kNumAccum / 8) != half) continue;
        const int col = col0 + j * 8;
        float b0 = 0.0f, b1 = 0.0f;
        if constexpr (kSplitEpilogue) {
          if (bias != nullptr) {  // columns j * 8 + (lane % 4) * 2 (+1) of the tile
            const int src = (j % 8) * 4 + lane % 4;  // the lane holding that pair
            b0 = __shfl_sync(0xffffffffu, bias_pairs[j / 8].x, src);
            b1 = __shfl_sync(0xffffffffu, bias_pairs[j / 8].y, src);
          }
        } else if (bias_smem) {
          if (col < N) {  // N % 4 == 0: then col + 1 < N too
            const float2 bv = *reinterpret_cast<const float2*>(bias_s + j * 8);
            b0 = bv.x;
            b1 = bv.y;
          }
        } else if (bias != nullptr) {
          b0 = col < N ? __ldg(bias + col) : 0.0f;
          b1 = col + 1 < N ? __ldg(bias + col + 1) : 0.0f;
        }
        acc[j * 4 + 0] = b0;
        acc[j * 4 + 1] = b1;
        acc[j * 4 + 2] = b0;
        acc[j * 4 + 3] = b1;
      }
      if (kSplitEpilogue && bias != nullptr && half != 0 && next_n0 >= 0) load_bias_pairs(next_n0);
    };
    auto no_flush = [](auto...) {};

    auto tile_at = [&](int tile) {
      return tile_info<BLOCK_M, BLOCK_N, kGrouped, kMulticast>(
          tile, num_m_blocks, num_n_blocks, M, num_groups, grp_mblk, grp_rstart, grp_rend, rank);
    };
    // The rows of sb for a tile's columns [n0, n0 + BLOCK_N): scale blocks n0/128
    // ("lo") and, from accumulator chunk j_hi on, n0/128 + 1 ("hi").
    auto b_scale_rows = [&](const TileInfo& ti, const float*& lo, const float*& hi) {
      const int nb_lo = ti.n0 / kScaleBlock;
      const int nb_hi = min(nb_lo + 1, num_scale_n - 1);
      const float* sb_g = sb + static_cast<int64_t>(ti.group) * num_scale_n * num_k_blocks;
      lo = sb_g + static_cast<int64_t>(nb_lo) * num_k_blocks;
      hi = sb_g + static_cast<int64_t>(nb_hi) * num_k_blocks;
    };
    // B scales where kScaleWindow: lane l holds those of k-block w + l of the window of
    // 32 in use, and of the next window, read by a shuffle. ptxas moves a warp-uniform
    // scale to a uniform register before the k-block's last wgmma is issued, so loading
    // it in its own k-block stalled that issue by a global-load latency (kernel_bench,
    // H200, 4096x7168x16384: 128x160 959 -> 842 us, 192x128 782 -> 764 us).
    // The windows run on across the CTA's tiles: a tile's first window is loaded
    // during the previous tile's last.
    auto load_sb = [&](const float* p, int kb) {
      return kb < num_k_blocks ? __ldg(p + kb) : 0.0f;
    };
    float sbw_lo = 0.0f, sbw_hi = 0.0f, sbn_lo = 0.0f, sbn_hi = 0.0f;
    if constexpr (kScaleWindow) {
      if (sched0 < num_tiles) {
        const float *lo, *hi;
        b_scale_rows(tile_at(sched0), lo, hi);
        sbn_lo = load_sb(lo, lane);
        sbn_hi = load_sb(hi, lane);
      }
    }

    if (kSplitEpilogue && bias != nullptr && sched0 < num_tiles) {
      load_bias_pairs(tile_at(sched0).n0);
    }
    for (int tile = sched0; tile < num_tiles; tile += sched_step) {
      const TileInfo t = tile_at(tile);
      const int next_n0 = kSplitEpilogue && bias != nullptr && tile + sched_step < num_tiles
                              ? tile_at(tile + sched_step).n0
                              : -1;
      auto flush_t = [&](int half = -1) { flush(t.n0, half, next_n0); };
      const int j_hi = (kScaleBlock - t.n0 % kScaleBlock) / 8;
      const float *sb_lo, *sb_hi;
      b_scale_rows(t, sb_lo, sb_hi);
      const float* sa_base = smem_sa + (kGrouped ? t.row0 & 3 : 0) + r_local;
      const float *next_lo = sb_lo, *next_hi = sb_hi;
      if (kScaleWindow && tile + sched_step < num_tiles) {
        b_scale_rows(tile_at(tile + sched_step), next_lo, next_hi);
      }
      auto window_b_scales = [&](int kb, float& lo, float& hi) {
        if ((kb & 31) == 0) {
          sbw_lo = sbn_lo;
          sbw_hi = sbn_hi;
          if (kb + 32 < num_k_blocks) {
            sbn_lo = load_sb(sb_lo, kb + 32 + lane);
            sbn_hi = load_sb(sb_hi, kb + 32 + lane);
          } else if (tile + sched_step < num_tiles) {  // the next tile's first window
            sbn_lo = load_sb(next_lo, lane);
            sbn_hi = load_sb(next_hi, lane);
          }
        }
        lo = __shfl_sync(0xffffffffu, sbw_lo, kb & 31);
        hi = __shfl_sync(0xffffffffu, sbw_hi, kb & 31);
      };

      // acc += d * scales of k-block kb, then release its stage. Split tiles
      // promote a stage in two calls, as `issue` issues it: d holds columns
      // [half * 128, half * 128 + 128), all in one scale block of B (passed as
      // sb_lo_val); the first half keeps the stage (its second half is next).
      // A's scales of the k-block being promoted (rows r_local and r_local + 8), read
      // before the wgmma wait: after it, the loads' latency would come before the FFMAs.
      auto read_sa = [&](float& sa0, float& sa1) {
        const float* sa_stage = sa_base + promo_stage * (L::kBytesSA / 4);
        sa0 = sa_stage[0];
        sa1 = sa_stage[8];
      };
      auto promote = [&](float (&d)[kNumBuf], float sb_lo_val, float sb_hi_val, int half,
                         float sa0, float sa1) {
#pragma unroll
        for (int i = 0; i < kNumBuf; ++i) ptx::fence_operand(d[i]);
        if (kSplitN && half == 0) {
          const float s0 = sa0 * sb_lo_val, s1 = sa1 * sb_lo_val;
#pragma unroll
          for (int i = 0; i < kNumBuf; ++i) acc[i] = fmaf(d[i], (i & 2) ? s1 : s0, acc[i]);
#pragma unroll
          for (int i = 0; i < kNumBuf; ++i) ptx::fence_operand(acc[i]);
          return;
        }
        // All smem reads of this stage (wgmma operands and sa) are done:
        // release the slot, one arrival per warp (to every CTA that fills it).
        __syncwarp();
        if constexpr (kMulticast > 1) {
          if (lane < kMulticast) ptx::mbarrier_arrive_cluster(&empty_bar[promo_stage], lane);
        } else {
          if (lane == 0) ptx::mbarrier_arrive(&empty_bar[promo_stage]);
        }
        if (++promo_stage == STAGES) {
          promo_stage = 0;
          promo_phase ^= 1u;
        }

        const float s_lo0 = sa0 * sb_lo_val, s_lo1 = sa1 * sb_lo_val;
        if constexpr (kSplitN) {
#pragma unroll
          for (int i = 0; i < kNumBuf; ++i) {
            acc[kNumBuf + i] = fmaf(d[i], (i & 2) ? s_lo1 : s_lo0, acc[kNumBuf + i]);
          }
        } else if (j_hi >= kNumAccum / 4) {  // the whole tile is in one scale block of B
#pragma unroll
          for (int i = 0; i < kNumAccum; ++i) acc[i] = fmaf(d[i], (i & 2) ? s_lo1 : s_lo0, acc[i]);
        } else {
          // Chunks j_hi.. take the second scale block. A runtime j_hi cost a select
          // (and predicate set-up) per pair of FFMAs; it is a multiple of kNAlign / 8
          // (tiles start at multiples of gcd(BLOCK_N, 128)), so unroll for each value.
          const float s_hi0 = sa0 * sb_hi_val, s_hi1 = sa1 * sb_hi_val;
          auto promote_split = [&](auto jc) {
            constexpr int kJHi = decltype(jc)::value;
#pragma unroll
            for (int i = 0; i < kNumAccum; ++i) {
              const bool hi = i / 4 >= kJHi;
              const float sc = (i & 2) ? (hi ? s_hi1 : s_lo1) : (hi ? s_hi0 : s_lo0);
              acc[i] = fmaf(d[i], sc, acc[i]);
            }
          };
          // Not reached (see above); a fault rather than a silently wrong tile.
          if (!dispatch_multiple<L::kNAlign / 8, kNumAccum / 4>(j_hi, promote_split)) __trap();
        }
        // Keep the FFMAs here: sunk past the next wgmma on d, they would make
        // ptxas serialize every wgmma.
#pragma unroll
        for (int i = 0; i < kNumAccum; ++i) ptx::fence_operand(acc[i]);
      };

      // Promotes k-block kb (already issued into d); with kPipelined and not
      // `last`, first issues kb + 1 into d_next so it runs under the FFMAs.
      // `mid` runs with the wgmmas in flight, before the wait (fp32 outputs:
      // before kb + 1 is issued, as their epilogue needs more registers).
      auto step = [&](auto& d, auto& d_next, float sb_lo_val, float sb_hi_val, bool last,
                      auto&& mid) {
        float sa0, sa1;
        if constexpr (kPipelined) {
          constexpr bool kMidEarly = sizeof(OutT) == 4;
          if (!last) {
            if constexpr (kMidEarly) mid();
            issue(d_next, 1);
            if constexpr (!kMidEarly) mid();
            read_sa(sa0, sa1);
            ptx::wgmma_wait_group<1>();
          } else {
            mid();
            read_sa(sa0, sa1);
            ptx::wgmma_wait_group<0>();
          }
        } else {
          mid();
          read_sa(sa0, sa1);
          ptx::wgmma_wait_group<0>();
        }
        promote(d, sb_lo_val, sb_hi_val, 1, sa0, sa1);
      };

      // U consecutive k-blocks, alternating buffers; `first` runs in the first
      // step (the previous tile's epilogue). Nothing is in flight between
      // chunks: ptxas serializes wgmmas still pending at a loop's back edge.
      auto chunk = [&](int kb, auto u, auto&& first) {
        constexpr int U = decltype(u)::value;
        if constexpr (kPipelined) {
          issue(buf0, 1);
#pragma unroll
          for (int j = 0; j < U; ++j) {
            float lo, hi;
            if constexpr (kScaleWindow) {
              window_b_scales(kb + j, lo, hi);
            } else {
              lo = __ldg(sb_lo + kb + j);
              hi = __ldg(sb_hi + kb + j);
            }
            if (j == 0) step(buf0, buf1, lo, hi, U == 1, first);
            else if (j % 2 == 0) step(buf0, buf1, lo, hi, j + 1 == U, no_flush);
            else step(buf1, buf0, lo, hi, j + 1 == U, no_flush);
          }
        } else if constexpr (kSplitN) {
          // Two halves per k-block, each promoted before the next is issued
          // (the other math warpgroup's wgmmas keep the tensor cores busy; making
          // the two take turns through named barriers measured the same).
          // (Its scales load here: through the window it ran 1.5-3% slower, H200.)
          static_assert(U == 1, "the split loop runs one k-block per chunk");
          const float sb_lo_val = __ldg(sb_lo + kb), sb_hi_val = __ldg(sb_hi + kb);
          if constexpr (sizeof(OutT) == 4 && !kSplitEpilogue) first();
          issue(buf0, 0);
          if constexpr (kSplitEpilogue) first(0);
          else if constexpr (sizeof(OutT) != 4) first();
          float sa0, sa1;  // both halves' rows
          read_sa(sa0, sa1);
          ptx::wgmma_wait_group<0>();
          promote(buf0, sb_lo_val, 0.0f, 0, sa0, sa1);
          issue(buf0, 1);
          if constexpr (kSplitEpilogue) first(1);
          ptx::wgmma_wait_group<0>();
          promote(buf0, sb_hi_val, 0.0f, 1, sa0, sa1);
        } else {  // one k-block; fp32 outputs flush before the issue (registers)
          static_assert(U == 1, "the serial loop runs one k-block per chunk");
          float sb_lo_val, sb_hi_val;
          window_b_scales(kb, sb_lo_val, sb_hi_val);
          if constexpr (sizeof(OutT) == 4) first();
          issue(buf0, 1);
          if constexpr (sizeof(OutT) == 4) step(buf0, buf0, sb_lo_val, sb_hi_val, true, no_flush);
          else step(buf0, buf0, sb_lo_val, sb_hi_val, true, first);
        }
      };
      // The tile's first chunk also flushes `prev`.
      run_k_chunks<kPipelined ? 8 : 1, false>(0, num_k_blocks, num_k_blocks, chunk, flush_t,
                                             no_flush);
      prev = t;
    }
    // ---------------- epilogue of the last tile ----------------
    store_prev(-1);
    // TMA stores read smem asynchronously: done before the CTA exits.
    if (store_mode != kStoreRegisters && warp_in_wg == 0 && lane == 0) ptx::bulk_wait_group0();

    if (kGrouped && !grp.keep_unused_rows) {
      // Rows that belong to no group come out as zeros (like the reference).
      const int64_t tid = static_cast<int64_t>(blockIdx.x) * L::kNumMathThreads + thread;
      const int64_t nthreads = static_cast<int64_t>(gridDim.x) * L::kNumMathThreads;
      if (grp.masked_stride > 0) {
        for (int g = 0; g < num_groups; ++g) {
          zero_rows(out, grp_rend[g], static_cast<int64_t>(g + 1) * grp.masked_stride, N,
                    tid, nthreads);
        }
      } else {
        zero_rows(out, grp_rend[num_groups - 1], M, N, tid, nthreads);
      }
    }
  }
  // The peer may still arrive on our barriers: stay resident until it is done.
  if constexpr (kMulticast > 1) ptx::cluster_sync();
#else
  // Only sm_90a is supported.
  __trap();
#endif
}

}  // namespace jax_deepgemm
