// Small sm_90a device helpers written as inline PTX (mbarrier, TMA, wgmma,
// setmaxnreg). Everything here is header-only and __forceinline__.
#pragma once

#include <cstdint>

#include <cuda.h>  // CUtensorMap (type only)

#include "wgmma_fp8.cuh"  // WgmmaFp8<N>, generated

namespace jax_deepgemm::ptx {

// ---------------------------------------------------------------------------
// Addresses
// ---------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ uint32_t lane_id() {
  uint32_t lane;
  asm volatile("mov.u32 %0, %%laneid;" : "=r"(lane));
  return lane;
}

// ---------------------------------------------------------------------------
// mbarrier (CTA scope, 64-bit barrier object in shared memory)
// ---------------------------------------------------------------------------
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)),
               "r"(count)
               : "memory");
}

// Makes mbarrier.init visible to the async proxy (TMA complete_tx) and to
// the other threads; follow with a CTA barrier.
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

// Orders this thread's generic-proxy shared-memory accesses with respect to
// later async-proxy (TMA / wgmma) accesses.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// Barrier among `count` threads (a multiple of 32) on hardware barrier `id`
// (1..15; 0 is __syncthreads).
__device__ __forceinline__ void named_barrier_sync(uint32_t id, uint32_t count) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(count) : "memory");
}

__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.release.cta.shared::cta.b64 _, [%0];" ::"r"(
                   smem_addr(bar))
               : "memory");
}

// Arrive (count 1) and add `bytes` to the transaction count of the current
// phase.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar,
                                                          uint32_t bytes) {
  asm volatile(
      "mbarrier.arrive.expect_tx.release.cta.shared::cta.b64 _, [%0], %1;" ::"r"(
          smem_addr(bar)),
      "r"(bytes)
      : "memory");
}

// Blocks until the phase with the given parity has completed.
// (On a freshly initialised barrier, parity 1 counts as completed.)
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  const uint32_t addr = smem_addr(bar);
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n"
      "}\n" ::"r"(addr),
      "r"(parity)
      : "memory");
}

// ---------------------------------------------------------------------------
// TMA
// ---------------------------------------------------------------------------
__device__ __forceinline__ void prefetch_tma_descriptor(const CUtensorMap* desc) {
  asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(desc))
               : "memory");
}

// 2D tiled bulk tensor load global -> shared; completion is signalled on
// `bar` as `box bytes` of transaction count. Coordinates are innermost first.
__device__ __forceinline__ void tma_load_2d(const CUtensorMap* desc,
                                            uint64_t* bar, void* smem_dst,
                                            int32_t c0, int32_t c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::"
      "bytes [%0], [%1, {%3, %4}], [%2];" ::"r"(smem_addr(smem_dst)),
      "l"(reinterpret_cast<uint64_t>(desc)), "r"(smem_addr(bar)), "r"(c0),
      "r"(c1)
      : "memory");
}

// The same load multicast to every CTA of the cluster in `cta_mask`: the data
// lands at the same smem offset in each, and each one's mbarrier at `bar`'s
// offset receives the complete_tx.
__device__ __forceinline__ void tma_load_2d_multicast(const CUtensorMap* desc, uint64_t* bar,
                                                      void* smem_dst, int32_t c0, int32_t c1,
                                                      uint16_t cta_mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      ".multicast::cluster [%0], [%1, {%3, %4}], [%2], %5;" ::"r"(smem_addr(smem_dst)),
      "l"(reinterpret_cast<uint64_t>(desc)), "r"(smem_addr(bar)), "r"(c0), "r"(c1),
      "h"(cta_mask)
      : "memory");
}

// 1D bulk copy global -> shared of `bytes` (a multiple of 16; both addresses
// 16B aligned); completion is signalled on `bar` as transaction bytes.
__device__ __forceinline__ void bulk_load_1d(void* smem_dst, const void* src, uint32_t bytes,
                                             uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
          smem_addr(smem_dst)),
      "l"(reinterpret_cast<uint64_t>(src)), "r"(bytes), "r"(smem_addr(bar))
      : "memory");
}

// 2D tiled bulk tensor store shared -> global (box at {c0, c1}, innermost
// first; the parts outside the tensor are not written), in the current bulk group.
__device__ __forceinline__ void tma_store_2d(const CUtensorMap* desc, uint32_t smem_src,
                                             int32_t c0, int32_t c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];" ::"l"(
          reinterpret_cast<uint64_t>(desc)),
      "r"(smem_src), "r"(c0), "r"(c1)
      : "memory");
}

// The same, adding the box into global memory (an element-wise reduction in L2).
__device__ __forceinline__ void tma_reduce_add_2d(const CUtensorMap* desc, uint32_t smem_src,
                                                  int32_t c0, int32_t c1) {
  asm volatile(
      "cp.reduce.async.bulk.tensor.2d.global.shared::cta.add.bulk_group [%0, {%2, %3}], [%1];"
      ::"l"(reinterpret_cast<uint64_t>(desc)), "r"(smem_src), "r"(c0), "r"(c1)
      : "memory");
}

// Brings the box at {c0, c1} into L2 (no completion to wait for).
__device__ __forceinline__ void tma_prefetch_2d(const CUtensorMap* desc, int32_t c0, int32_t c1) {
  asm volatile("cp.async.bulk.prefetch.tensor.2d.L2.global.tile [%0, {%1, %2}];" ::"l"(
                   reinterpret_cast<uint64_t>(desc)),
               "r"(c0), "r"(c1)
               : "memory");
}

__device__ __forceinline__ void bulk_commit_group() {
  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}

// Until the shared-memory sources of all committed bulk groups have been read
// (the buffer may be rewritten).
__device__ __forceinline__ void bulk_wait_group_read0() {
  asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
}

// Until all committed bulk groups have completed (their writes are done).
__device__ __forceinline__ void bulk_wait_group0() {
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

// Four 8x8 b16 matrices to shared memory: register i holds this lane's pair
// (row lane/4, columns 2*(lane%4)..+1) of matrix i; lanes 8i..8i+7 give the
// addresses of matrix i's rows 0..7.
__device__ __forceinline__ void stmatrix_x4(uint32_t addr, uint32_t r0, uint32_t r1,
                                            uint32_t r2, uint32_t r3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};" ::"r"(addr),
               "r"(r0), "r"(r1), "r"(r2), "r"(r3)
               : "memory");
}

__device__ __forceinline__ void st_shared_v2(uint32_t addr, float v0, float v1) {
  asm volatile("st.shared.v2.f32 [%0], {%1, %2};" ::"r"(addr), "f"(v0), "f"(v1) : "memory");
}

// ---------------------------------------------------------------------------
// Thread-block clusters
// ---------------------------------------------------------------------------
__device__ __forceinline__ uint32_t cluster_ctarank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}

// All threads of all CTAs of the cluster (also a CTA-wide barrier).
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release;\n"
               "barrier.cluster.wait.acquire;" ::: "memory");
}

// Arrive (count 1) on the mbarrier at `bar`'s offset in CTA `cta` of the cluster.
// Default semantics (release at CTA scope), as CUTLASS's ClusterBarrier::arrive:
// with .release.cluster, the per-k-block arrive made multicast run at 57% of
// the plain kernel's speed on H200 (98% without).
__device__ __forceinline__ void mbarrier_arrive_cluster(uint64_t* bar, uint32_t cta) {
  asm volatile(
      "{\n.reg .b32 remote;\n"
      "mapa.shared::cluster.u32 remote, %0, %1;\n"
      "mbarrier.arrive.shared::cluster.b64 _, [remote];\n}" ::"r"(smem_addr(bar)),
      "r"(cta)
      : "memory");
}

// ---------------------------------------------------------------------------
// Register reconfiguration (must be executed by all threads of a warpgroup)
// ---------------------------------------------------------------------------
template <uint32_t kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  static_assert(kRegs >= 24 && kRegs <= 256 && kRegs % 8 == 0, "bad count");
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kRegs));
}

template <uint32_t kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  static_assert(kRegs >= 24 && kRegs <= 256 && kRegs % 8 == 0, "bad count");
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kRegs));
}

// ---------------------------------------------------------------------------
// wgmma synchronisation
// ---------------------------------------------------------------------------
__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
}

__device__ __forceinline__ void wgmma_commit_group() {
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}

template <int N>
__device__ __forceinline__ void wgmma_wait_group() {
  static_assert(N >= 0 && N <= 7, "wgmma.wait_group: N in [0, 7]");
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

// Compiler-only fence: pins a register's value at this point in program
// order, so reads of wgmma results cannot be hoisted above wgmma_wait_group
// and writes cannot sink below the next wgmma issue.
__device__ __forceinline__ void fence_operand(float& r) {
  asm volatile("" : "+f"(r)::"memory");
}

// ---------------------------------------------------------------------------
// Shared-memory matrix descriptor: K-major operand, 128-byte swizzle.
//   bits  0-13 : start address >> 4
//   bits 16-29 : leading byte offset >> 4 (unused for swizzled K-major; 1)
//   bits 32-45 : stride byte offset >> 4 (1024 B between 8-row groups = 64)
//   bits 49-51 : base offset (0: every tile is 1024 B aligned)
//   bits 62-63 : layout type (1 = 128B swizzle)
// Advancing along K inside the 128-byte swizzle atom is done by adding
// (bytes >> 4) to the start-address field.
// ---------------------------------------------------------------------------
__device__ __forceinline__ uint64_t make_smem_desc_k_sw128(const void* smem_ptr) {
  const uint64_t start = (smem_addr(smem_ptr) & 0x3FFFFu) >> 4;
  return start | (uint64_t{1} << 16) | (uint64_t{1024 >> 4} << 32) |
         (uint64_t{1} << 62);
}

// One 128-deep k-block of FP8 wgmmas (4 x k32, 32 bytes apart inside the
// 128-byte swizzle atom = +2 in the descriptor's >>4 address field) into d,
// which is overwritten; issued as one commit group.
template <int N>
__device__ __forceinline__ void wgmma_k_block(float (&d)[WgmmaFp8<N>::kNumAccum],
                                              uint64_t desc_a, uint64_t desc_b) {
#pragma unroll
  for (int i = 0; i < WgmmaFp8<N>::kNumAccum; ++i) fence_operand(d[i]);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) WgmmaFp8<N>::mma(d, desc_a + 2 * kk, desc_b + 2 * kk, kk > 0);
  wgmma_commit_group();
}

}  // namespace jax_deepgemm::ptx

