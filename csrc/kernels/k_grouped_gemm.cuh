// K-grouped FP8 GEMM "TN" for sm_90a, the MoE weight gradient:
//   out[g, n, k] (= c[g, n, k]) + sum over tokens t of group g of
//                a[t, n] * b[t, k] * sa[t/128, n] * sb[t/128, k]
// The kernel takes both operands token-major ("K-major" for wgmma, which
// FP8 requires): aT [N, T] and bT [K, T], fp32 (or bf16) output [G, N, K].
//
// Same machinery as fp8_gemm.cuh (persistent CTAs, TMA producer warpgroup,
// mbarrier ring, FP8 wgmma issued one block ahead of the promotion every 128
// tokens, each tile's store deferred under the next tile's first wgmmas),
// with three changes:
//   * a tile (g, n-block, k-block) contracts over the 128-token blocks that
//     hold group g's tokens [t0, t1), read from a device-side group table;
//   * both scales are per row of their operand (1x128 along tokens), so the
//     promotion multiplies by sa[row] * sb[col] (B scales come in by TMA too);
//   * a token block that straddles a group boundary is masked in shared
//     memory: the other group's tokens are zeroed in A and B before wgmma.
#pragma once

#include "fp8_gemm.cuh"

namespace jax_deepgemm {

// The D tile of the TMA-store epilogue (store_tile_tma, fp8_gemm.cuh), which
// takes the tile's store off the math warps' path: stmatrix into shared memory
// and one TMA store per 64 rows, where each thread otherwise issued 16-32
// global stores (and quad shuffles for bf16) with the tensor cores idle.
constexpr int k_grouped_d_bytes(int block_m, int block_n) {
#ifdef JAX_DEEPGEMM_NO_TMA_STORE
  return 0;
#else
  return block_m * block_n * 2;
#endif
}

template <int BLOCK_M, int BLOCK_N, int STAGES>
struct KGroupedLayout {
  static constexpr int kNumMathWG = BLOCK_M / 64;
  // Three math warpgroups get 160 registers each: too few for a second wgmma
  // result buffer, so each promotes its block before issuing the next, while
  // the other two warpgroups' wgmmas run.
  static constexpr bool kSerial = kNumMathWG == 3;
  static constexpr int kTmaRegs = kNumMathWG == 3 ? 24 : 40;
  static constexpr int kMathRegs = kNumMathWG == 3 ? 160 : kNumMathWG == 2 ? 232 : 240;
  static constexpr int kNumMathThreads = kNumMathWG * 128;
  static constexpr int kNumThreads = kNumMathThreads + 128;
  static constexpr int kNumMathWarps = kNumMathThreads / 32;

  static constexpr int kBytesA = BLOCK_M * kBlockK;
  static constexpr int kBytesB = BLOCK_N * kBlockK;
  static constexpr int kBytesSA = BLOCK_M * 4;
  static constexpr int kBytesSB = BLOCK_N * 4;
  static constexpr uint32_t kTxBytes = kBytesA + kBytesB + kBytesSA + kBytesSB;
  // The TMA-store epilogue's D tile: BLOCK_M x BLOCK_N bf16 (an fp32 tile goes
  // through it in two column halves), 64 rows per math warpgroup.
  static constexpr int kBytesD = k_grouped_d_bytes(BLOCK_M, BLOCK_N);

  static constexpr int kOffA = 0;
  static constexpr int kOffB = kOffA + STAGES * kBytesA;
  static constexpr int kOffD = kOffB + STAGES * kBytesB;  // 1024B aligned (128B swizzle)
  static constexpr int kOffSA = kOffD + kBytesD;
  static constexpr int kOffSB = kOffSA + STAGES * kBytesSA;
  static constexpr int kOffBar = kOffSB + STAGES * kBytesSB;
  static constexpr int kOffGroups = kOffBar + 2 * STAGES * 8;
  static constexpr int kBytes = kOffGroups + kGroupTableBytes;
  static constexpr int kDynamicSmem = kBytes + kSmemAlignPad;

  static_assert(BLOCK_M == 64 || BLOCK_M == 128 || BLOCK_M == 192, "BLOCK_M: 64, 128 or 192");
  static_assert(kNumMathThreads * kMathRegs + 128 * kTmaRegs <= 65536, "register file");
  static_assert(BLOCK_N % 64 == 0 && BLOCK_N <= 256, "bad BLOCK_N");
  static_assert(kBytesSA % 128 == 0 && kBytesSB % 128 == 0, "scale stages stay 128B aligned");
  static_assert(kOffD % 1024 == 0, "the D tile is 128B-swizzled");
  static_assert(kDynamicSmem <= kMaxSmemPerBlock, "too many stages");
};

constexpr int k_grouped_max_stages(int block_m, int block_n) {
  const int fixed = kSmemAlignPad + kGroupTableBytes + k_grouped_d_bytes(block_m, block_n);
  return (kMaxSmemPerBlock - fixed) / ((block_m + block_n) * (kBlockK + 4) + 16);
}

// Zeroes, in a 128B-swizzled [rows, 128-token] fp8 tile, the tokens outside
// [t0, t1) (token of byte j of logical 16B chunk c: tok0 + 16c + j). Rows
// [row_begin, row_end) are split over `nthreads` threads (tid in [0, nthreads)).
__device__ __forceinline__ void mask_tokens(uint8_t* tile, int row_begin, int row_end,
                                            int tok0, int t0, int t1, int tid, int nthreads) {
  for (int q = row_begin * 8 + tid; q < row_end * 8; q += nthreads) {
    const int row = q / 8;
    const int chunk = (q % 8) ^ (row % 8);  // 128B swizzle: 16B chunks XOR row % 8
    const int first = tok0 + chunk * 16;
    if (first >= t0 && first + 16 <= t1) continue;
    uint4* p = reinterpret_cast<uint4*>(tile + q * 16);
    uint4 v = *p;
    uint32_t* w = reinterpret_cast<uint32_t*>(&v);
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const int tok = first + j;
      if (tok < t0 || tok >= t1) w[j / 4] &= ~(0xffu << (8 * (j % 4)));
    }
    *p = v;
  }
}

// Kernel arguments:
//   tmap_a : aT [N, T] uint8, box [BLOCK_M, 128], 128B swizzle
//   tmap_b : bT [K, T] uint8, box [BLOCK_N, 128], 128B swizzle
//   tmap_sa: sa [TB, NP] f32, box [1, BLOCK_M] (NP = N rounded up to 4)
//   tmap_sb: sb [TB, KP] f32, box [1, BLOCK_N] (KP = K rounded up to 4)
//   c      : [G, N, K] f32 or nullptr; may alias out (then OutT is float). With
//            kStoreTmaAdd c is `out` itself and is never read here: TMA adds
//            each tile into it.
//   out    : [G, N, K] f32 or bf16
//   tmap_out: out as [G*N, K], box [64, 128 bytes], 128B swizzle (used unless
//            store_mode is kStoreRegisters, which the host picks when out
//            cannot take TMA)
//   grp    : token counts per group (contiguous rules of GroupArgs, over T)
template <int BLOCK_M, int BLOCK_N, int STAGES, typename OutT>
__global__ void __launch_bounds__(KGroupedLayout<BLOCK_M, BLOCK_N, STAGES>::kNumThreads, 1)
k_grouped_gemm_tn_kernel(const __grid_constant__ CUtensorMap tmap_a,
                         const __grid_constant__ CUtensorMap tmap_b,
                         const __grid_constant__ CUtensorMap tmap_sa,
                         const __grid_constant__ CUtensorMap tmap_sb,
                         const float* c, OutT* out,
                         const __grid_constant__ CUtensorMap tmap_out, int store_mode,
                         int N, int K, int T, GroupArgs grp) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using L = KGroupedLayout<BLOCK_M, BLOCK_N, STAGES>;
  using Mma = ptx::WgmmaFp8<BLOCK_N>;
  constexpr int kNumAccum = Mma::kNumAccum;

  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024u - (ptx::smem_addr(smem_raw) & 1023u)) & 1023u);
  uint8_t* smem_a = smem + L::kOffA;
  uint8_t* smem_b = smem + L::kOffB;
  uint8_t* smem_d = smem + L::kOffD;
  float* smem_sa = reinterpret_cast<float*>(smem + L::kOffSA);
  float* smem_sb = reinterpret_cast<float*>(smem + L::kOffSB);
  uint64_t* full_bar = reinterpret_cast<uint64_t*>(smem + L::kOffBar);
  uint64_t* empty_bar = full_bar + STAGES;
  int* grp_mblk = reinterpret_cast<int*>(smem + L::kOffGroups);
  int* grp_tstart = grp_mblk + kMaxGroups + 1;
  int* grp_tend = grp_tstart + kMaxGroups;

  const int thread = static_cast<int>(threadIdx.x);
  const int warp = __shfl_sync(0xffffffffu, thread / 32, 0);
  const int lane = thread & 31;
  const int wg = warp / 4;
  // Tiles go out through the shared-memory D tile and TMA (else from registers).
  const bool tma_store = L::kBytesD > 0 && store_mode != kStoreRegisters;

  if (thread == L::kNumMathThreads) {
    ptx::prefetch_tma_descriptor(&tmap_a);
    ptx::prefetch_tma_descriptor(&tmap_b);
    ptx::prefetch_tma_descriptor(&tmap_sa);
    ptx::prefetch_tma_descriptor(&tmap_sb);
    if (tma_store) ptx::prefetch_tma_descriptor(&tmap_out);
  }
  if (thread == 0) {
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
      ptx::mbarrier_init(&full_bar[s], 1);
      ptx::mbarrier_init(&empty_bar[s], L::kNumMathWarps);
    }
    ptx::fence_barrier_init();
    ptx::fence_proxy_async();
  }
  if (warp == 1) build_group_table<kBlockK>(grp, T, grp_mblk, grp_tstart, grp_tend, lane);
  __syncthreads();

  const int num_m_blocks = (N + BLOCK_M - 1) / BLOCK_M;
  const int num_n_blocks = (K + BLOCK_N - 1) / BLOCK_N;
  const int tiles_per_group = num_m_blocks * num_n_blocks;
  const int num_tiles = grp.num_groups * tiles_per_group;

  if (wg == L::kNumMathWG) {
    ptx::setmaxnreg_dec<L::kTmaRegs>();
    if (thread == L::kNumMathThreads) {
      int stage = 0;
      uint32_t phase = 0;
      for (int tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
        const int g = tile / tiles_per_group;
        int m_block, n_block;
        fp8_gemm_tile_coords(tile - g * tiles_per_group, num_m_blocks, num_n_blocks, m_block,
                             n_block);
        const int t0 = grp_tstart[g], t1 = grp_tend[g];
        const int kb_end = t1 > t0 ? (t1 + kBlockK - 1) / kBlockK : 0;
        for (int kb = t0 / kBlockK; kb < kb_end; ++kb) {
          ptx::mbarrier_wait(&empty_bar[stage], phase ^ 1u);
          ptx::mbarrier_arrive_expect_tx(&full_bar[stage], L::kTxBytes);
          ptx::tma_load_2d(&tmap_a, &full_bar[stage], smem_a + stage * L::kBytesA,
                           kb * kBlockK, m_block * BLOCK_M);
          ptx::tma_load_2d(&tmap_b, &full_bar[stage], smem_b + stage * L::kBytesB,
                           kb * kBlockK, n_block * BLOCK_N);
          ptx::tma_load_2d(&tmap_sa, &full_bar[stage], smem_sa + stage * BLOCK_M,
                           m_block * BLOCK_M, kb);
          ptx::tma_load_2d(&tmap_sb, &full_bar[stage], smem_sb + stage * BLOCK_N,
                           n_block * BLOCK_N, kb);
          if (++stage == STAGES) {
            stage = 0;
            phase ^= 1u;
          }
        }
      }
    }
  } else {
    ptx::setmaxnreg_inc<L::kMathRegs>();
    const int warp_in_wg = warp % 4;
    const int r_local = wg * 64 + warp_in_wg * 16 + lane / 4;  // and +8
    const int a_wg_offset = wg * 64 * kBlockK;

    float acc[kNumAccum];
    float buf0[kNumAccum];  // wgmma results of one token block, before promotion
    float buf1[kNumAccum];  // unused by the serial loop
    // Two cursors over the ring, as in fp8_gemm.cuh: `issue` runs one token
    // block ahead of `promo`, so each block's wgmmas run under the FFMAs of
    // the one before. (The serial loop uses `issue`'s alone.)
    int issue_stage = 0, promo_stage = 0;
    uint32_t issue_phase = 0;
    int t0 = 0, t1 = 0;  // token range of the current tile's group

    auto next_issue_stage = [&]() {
      if (++issue_stage == STAGES) {
        issue_stage = 0;
        issue_phase ^= 1u;
      }
    };
    // Waits for the next stage's data and issues its 4 wgmmas (one commit group).
    // (The serial loop promotes each block before issuing the next: promote
    // moves its cursor on.)
    auto issue = [&](float (&d)[kNumAccum]) {
      ptx::mbarrier_wait(&full_bar[issue_stage], issue_phase);
      ptx::wgmma_k_block<BLOCK_N>(
          d, ptx::make_smem_desc_k_sw128(smem_a + issue_stage * L::kBytesA + a_wg_offset),
          ptx::make_smem_desc_k_sw128(smem_b + issue_stage * L::kBytesB));
      if constexpr (!L::kSerial) next_issue_stage();
    };
    // Before issue, where no wgmma is in flight (masking code next to in-flight
    // accumulators makes ptxas spill them and serialize every wgmma): zeroes the
    // tokens outside [t0, t1) of block kb, the next stage, if it straddles them.
    auto mask = [&](int kb) {
      const int tok0 = kb * kBlockK;
      if (tok0 >= t0 && tok0 + kBlockK <= t1) return;
      ptx::mbarrier_wait(&full_bar[issue_stage], issue_phase);
      // Each warpgroup masks its A rows and its share of B's rows.
      const int tid = thread % 128;
      // (The min only where the rows do not divide evenly: 3 warpgroups; the
      // others' code stays as it was measured.)
      constexpr int kBRows = (BLOCK_N + L::kNumMathWG - 1) / L::kNumMathWG;
      const int b_end = BLOCK_N % L::kNumMathWG == 0 ? wg * kBRows + kBRows
                                                      : min(wg * kBRows + kBRows, BLOCK_N);
      mask_tokens(smem_a + issue_stage * L::kBytesA, wg * 64, wg * 64 + 64, tok0, t0, t1, tid,
                  128);
      mask_tokens(smem_b + issue_stage * L::kBytesB, wg * kBRows, b_end, tok0, t0, t1, tid,
                  128);
      ptx::fence_proxy_async();  // generic-proxy writes -> visible to wgmma
      ptx::named_barrier_sync(1, L::kNumMathThreads);
    };

    // acc += d * sa[row] * sb[col] of the block, then release its stage (after
    // the FFMAs, which read the scales in place: no registers to hold them).
    auto promote = [&](float (&d)[kNumAccum]) {
#pragma unroll
      for (int i = 0; i < kNumAccum; ++i) ptx::fence_operand(d[i]);
      if constexpr (L::kSerial) promo_stage = issue_stage;
      const float* sa_stage = smem_sa + promo_stage * BLOCK_M;
      const float sa0 = sa_stage[r_local], sa1 = sa_stage[r_local + 8];
      const float* sb_stage = smem_sb + promo_stage * BLOCK_N + (lane % 4) * 2;
#pragma unroll
      for (int j = 0; j < BLOCK_N / 8; ++j) {
        const float2 sb = *reinterpret_cast<const float2*>(sb_stage + j * 8);
        acc[j * 4 + 0] = fmaf(d[j * 4 + 0], sa0 * sb.x, acc[j * 4 + 0]);
        acc[j * 4 + 1] = fmaf(d[j * 4 + 1], sa0 * sb.y, acc[j * 4 + 1]);
        acc[j * 4 + 2] = fmaf(d[j * 4 + 2], sa1 * sb.x, acc[j * 4 + 2]);
        acc[j * 4 + 3] = fmaf(d[j * 4 + 3], sa1 * sb.y, acc[j * 4 + 3]);
      }
      // Keep the FFMAs here (sunk past the next wgmma on d, they would make
      // ptxas serialize the wgmmas).
#pragma unroll
      for (int i = 0; i < kNumAccum; ++i) ptx::fence_operand(acc[i]);
      __syncwarp();
      if (lane == 0) ptx::mbarrier_arrive(&empty_bar[promo_stage]);
      if constexpr (L::kSerial) {
        next_issue_stage();
      } else if (++promo_stage == STAGES) {
        promo_stage = 0;
      }
    };

    // A tile's store is deferred into the next tile's first token block, under
    // its wgmmas. `prev_*` is the tile whose result `acc` holds (prev_g < 0: none).
    int prev_g = -1, prev_m = 0, prev_n = 0;
    auto flush = [&]() {
      // Through TMA where the warpgroup's 64 rows are all below N (a box over
      // [G*N, K] would write the next group's rows); a warpgroup whose rows
      // all lie past N stores nothing either way.
      const int wg_row = prev_m * BLOCK_M + wg * 64;
      if (tma_store && prev_g >= 0 && wg_row + 64 <= N) {
        store_tile_tma<BLOCK_N, BLOCK_N, OutT>(acc, smem_d + wg * (BLOCK_N * 128), &tmap_out,
                                               store_mode == kStoreTmaAdd, prev_g * N + wg_row,
                                               prev_n * BLOCK_N, K, wg, warp_in_wg, lane);
      } else if (prev_g >= 0) {
        const int64_t group_offset = static_cast<int64_t>(prev_g) * N * K;
        store_tile<BLOCK_N, OutT>(acc, out + group_offset,
                                   c != nullptr ? c + group_offset : nullptr,
                                   prev_m * BLOCK_M + r_local, N,
                                   prev_n * BLOCK_N + (lane % 4) * 2, K);
      }
#pragma unroll
      for (int i = 0; i < kNumAccum; ++i) acc[i] = 0.0f;
    };
    auto no_flush = []() {};

    // Promotes block kb (issued into d); unless `last`, first issues kb + 1
    // into d_next. `mid` (the flush) runs before that issue: the fp32 store
    // needs the registers of the second buffer.
    auto step = [&](auto& d, auto& d_next, int kb, bool last, auto&& mid) {
      mid();
      if (!last) {
        issue(d_next);
        ptx::wgmma_wait_group<1>();
      } else {
        ptx::wgmma_wait_group<0>();
      }
      promote(d);
    };
    // U consecutive blocks, alternating buffers; nothing in flight between
    // chunks (ptxas serializes wgmmas pending at a loop's back edge), so the
    // first block of a chunk may be masked.
    auto chunk = [&](int kb, auto u, auto&& first) {
      constexpr int U = decltype(u)::value;
      if constexpr (L::kSerial) {
        static_assert(U == 1, "the serial loop runs one token block per chunk");
        first();  // before the wgmma: with it in flight the store would spill
        mask(kb);
        issue(buf0);
        ptx::wgmma_wait_group<0>();
        promote(buf0);
      } else {
        mask(kb);
        issue(buf0);
#pragma unroll
        for (int j = 0; j < U; ++j) {
          if (j == 0) step(buf0, buf1, kb, U == 1, first);
          else if (j % 2 == 0) step(buf0, buf1, kb + j, j + 1 == U, no_flush);
          else step(buf1, buf0, kb + j, j + 1 == U, no_flush);
        }
      }
    };

    // The serial loop's block that cannot straddle the group's tokens: no mask.
    auto serial_block = [&]() {
      issue(buf0);
      ptx::wgmma_wait_group<0>();
      promote(buf0);
    };

    for (int tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
      const int g = tile / tiles_per_group;
      int m_block, n_block;
      fp8_gemm_tile_coords(tile - g * tiles_per_group, num_m_blocks, num_n_blocks, m_block,
                           n_block);
      t0 = grp_tstart[g];
      t1 = grp_tend[g];
      const int kb_begin = t0 / kBlockK;
      const int kb_end = t1 > t0 ? (t1 + kBlockK - 1) / kBlockK : kb_begin;
      // Only a tile's first and last blocks can straddle: a straddling last
      // block runs as its own chunk, so that both start a chunk.
      const int kb_split = t1 % kBlockK != 0 && kb_end - kb_begin >= 2 ? kb_end - 1 : kb_end;

      // The first chunk also flushes the previous tile (an empty group: zeros,
      // c + 0 with c).
      if constexpr (L::kSerial) {
        // Blocks strictly between the first and kb_split lie inside [t0, t1): their
        // loop skips mask's test (6 of its ~210 instructions per block).
        if (kb_begin == kb_end) {
          flush();
        } else {
          chunk(kb_begin, std::integral_constant<int, 1>{}, flush);
        }
        for (int kb = kb_begin + 1; kb < kb_split; ++kb) serial_block();
        if (kb_split > kb_begin && kb_split < kb_end) {
          chunk(kb_split, std::integral_constant<int, 1>{}, no_flush);
        }
      } else {
        run_k_chunks<8, true>(kb_begin, kb_split, kb_end, chunk, flush, no_flush);
      }
      prev_g = g;
      prev_m = m_block;
      prev_n = n_block;
    }
    flush();  // the last tile
    // TMA stores read smem asynchronously: done before the CTA exits.
    if (tma_store && warp_in_wg == 0 && lane == 0) {
      ptx::bulk_wait_group0();
    }
  }
#else
  __trap();
#endif
}

}  // namespace jax_deepgemm
