// Small device helpers shared by the matvec kernels (matvec.cu, matvec_packed.cu).
#pragma once

#include <cstddef>
#include <cstdint>

#include "backends/cuda/warp.cuh"

namespace shardlm::cuda_detail {

// 16-byte streaming load: no L1 allocation (weights are used once), read-only path.
__device__ __forceinline__ uint4 ld_stream(const void* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

// Up to kMax weights of one type and width multiplied by the same x in one launch (q/k/v, gate/up): the
// work items of the segments (blocks, units or row groups, as each kernel defines them) follow each other;
// first[k] is segment k's first item. A single matvec is a group of one. Passed as a __grid_constant__ parameter.
struct MvGroup {
  static constexpr int kMax = 4;
  int n = 0;
  const uint8_t* w[kMax] = {};
  size_t stride[kMax] = {};
  int64_t n_rows[kMax] = {};
  float* y[kMax] = {};
  int64_t first[kMax] = {};
};
struct MvSeg {
  const uint8_t* w;
  size_t stride;
  int64_t n_rows;
  float* y;
  int64_t local;  // item index within the segment
};
// Segment of item `idx` (constant indices only: the parameter stays in the constant bank).
__device__ __forceinline__ MvSeg mv_seg(const MvGroup& g, int64_t idx) {
  MvSeg sg{g.w[0], g.stride[0], g.n_rows[0], g.y[0], idx};
#pragma unroll
  for (int k = 1; k < MvGroup::kMax; ++k)
    if (k < g.n && idx >= g.first[k]) sg = MvSeg{g.w[k], g.stride[k], g.n_rows[k], g.y[k], idx - g.first[k]};
  return sg;
}

}  // namespace shardlm::cuda_detail
