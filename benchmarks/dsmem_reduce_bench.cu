// How long a thread-block cluster takes to sum S partial fp32 tiles (128x128,
// 64 KB each) held in its CTAs' shared memory: the reduction a split-K GEMM over
// a cluster needs before its epilogue. Two ways, both summing in rank order (so
// the result is deterministic):
//   leader:  CTA 0 reads every rank's tile through distributed shared memory and
//            writes the sum (what both earlier split-K attempts did, one SM
//            reading (S-1) x 64 KB);
//   scatter: CTA r sums slice r (1/S of the tile) over all ranks and writes it.
// The `none` variant fills and synchronizes without reducing; each variant's
// time minus it is the reduction's cost (with the sum's global stores). Each launch runs `kIters` rounds of
// (fill, cluster sync, reduce, cluster sync) to leave launch overhead out.
//
//   nvcc -std=c++17 -O2 -gencode=arch=compute_90a,code=sm_90a \
//        -o /tmp/dsmem benchmarks/dsmem_reduce_bench.cu && /tmp/dsmem [clusters]
//
// Prints, per cluster size S = 2..8, us per round for each variant, and checks
// every output element against the exact sum (the partials are small integers).
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda_check.h"

namespace cg = cooperative_groups;

constexpr int kTileFloats = 128 * 128;  // one fp32 128x128 tile: 64 KB
constexpr int kThreads = 256;           // the GEMM's two math warpgroups
constexpr int kIters = 20;

enum Variant { kNone = 0, kLeader = 1, kScatter = 2 };

// Partial of rank r at element i in round it: a small integer, so sums are exact.
__host__ __device__ inline float partial(int r, int i, int it) {
  return static_cast<float>((r * 7 + i * 3 + it) % 17) - 8.0f;
}

template <int kVariant>
__global__ void reduce_kernel(float* out) {
  extern __shared__ float4 tile4[];
  float* tile = reinterpret_cast<float*>(tile4);
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int s = static_cast<int>(cluster.num_blocks());
  const int cluster_id = blockIdx.x / s;
  float4* out4 = reinterpret_cast<float4*>(out + static_cast<size_t>(cluster_id) * kTileFloats);
  for (int it = 0; it < kIters; ++it) {
    for (int i = threadIdx.x; i < kTileFloats; i += kThreads) tile[i] = partial(rank, i, it);
    cluster.sync();  // every partial written
    if (kVariant != kNone) {
      // float4 slice [lo, hi) of the tile that this CTA sums
      int lo = 0, hi = 0;
      if (kVariant == kLeader) {
        hi = rank == 0 ? kTileFloats / 4 : 0;
      } else {
        lo = rank * (kTileFloats / 4) / s;
        hi = (rank + 1) * (kTileFloats / 4) / s;
      }
      for (int i = lo + static_cast<int>(threadIdx.x); i < hi; i += kThreads) {
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int r = 0; r < s; ++r) {  // rank order: deterministic
          const float4 v = cluster.map_shared_rank(tile4, r)[i];
          acc.x += v.x;
          acc.y += v.y;
          acc.z += v.z;
          acc.w += v.w;
        }
        out4[i] = acc;  // every round (as the GEMM's epilogue would; unused loads would go)
      }
    }
    cluster.sync();  // every read done before the next round overwrites
  }
}

template <int kVariant>
cudaLaunchConfig_t launch_config(int s, int clusters, cudaLaunchAttribute* attr) {
  const int smem = kTileFloats * 4;
  CHECK(cudaFuncSetAttribute(&reduce_kernel<kVariant>,
                             cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(clusters * s);
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = smem;
  attr->id = cudaLaunchAttributeClusterDimension;
  attr->val.clusterDim.x = s;
  attr->val.clusterDim.y = 1;
  attr->val.clusterDim.z = 1;
  config.attrs = attr;
  config.numAttrs = 1;
  return config;
}

template <int kVariant>
float run(int s, int clusters, float* out) {
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t config = launch_config<kVariant>(s, clusters, &attr);
  cudaEvent_t t0, t1;
  CHECK(cudaEventCreate(&t0));
  CHECK(cudaEventCreate(&t1));
  std::vector<float> times;
  for (int rep = 0; rep < 11; ++rep) {
    CHECK(cudaEventRecord(t0));
    CHECK(cudaLaunchKernelEx(&config, &reduce_kernel<kVariant>, out));
    CHECK(cudaEventRecord(t1));
    CHECK(cudaEventSynchronize(t1));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, t0, t1));
    times.push_back(ms * 1000.0f / kIters);
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

int main(int argc, char** argv) {
  const int clusters_arg = argc > 1 ? std::atoi(argv[1]) : 0;
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("# %s, %d SMs; us per round (fill + sync + reduce + sync), median of 11\n",
              prop.name, prop.multiProcessorCount);
  std::printf("%3s %8s %10s %10s %10s %12s %12s %6s\n", "S", "clusters", "none", "leader",
              "scatter", "leader-none", "scatter-none", "check");
  for (int s = 2; s <= 8; ++s) {
    // As many clusters as fit at once (one wave), or as asked.
    cudaLaunchAttribute attr;
    const cudaLaunchConfig_t probe = launch_config<kScatter>(s, 1, &attr);
    int fit = 0;
    CHECK(cudaOccupancyMaxActiveClusters(&fit, &reduce_kernel<kScatter>, &probe));
    const int clusters = clusters_arg > 0 ? clusters_arg : fit;
    float* out;
    const size_t n = static_cast<size_t>(clusters) * kTileFloats;
    CHECK(cudaMalloc(&out, n * 4));
    const float t_none = run<kNone>(s, clusters, out);
    bool ok = true;
    std::vector<float> host(n);
    float t_var[2];
    for (int v = 0; v < 2; ++v) {
      CHECK(cudaMemset(out, 0xFF, n * 4));  // NaNs: an element not written fails the check
      t_var[v] = v == 0 ? run<kLeader>(s, clusters, out) : run<kScatter>(s, clusters, out);
      CHECK(cudaMemcpy(host.data(), out, n * 4, cudaMemcpyDeviceToHost));
      for (size_t j = 0; j < n && ok; ++j) {
        const int i = static_cast<int>(j % kTileFloats);
        float want = 0.0f;
        for (int r = 0; r < s; ++r) want += partial(r, i, kIters - 1);
        ok = host[j] == want;
      }
    }
    std::printf("%3d %8d %10.2f %10.2f %10.2f %12.2f %12.2f %6s\n", s, clusters, t_none,
                t_var[0], t_var[1], t_var[0] - t_none, t_var[1] - t_none, ok ? "ok" : "WRONG");
    CHECK(cudaFree(out));
  }
  return 0;
}
