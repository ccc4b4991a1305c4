// Small device helpers shared by the matvec kernels (matvec.cu, matvec_packed.cu).
#pragma once

#include <cstdint>

namespace shardlm::cuda_detail {

// 16-byte streaming load: no L1 allocation (weights are used once), read-only path.
__device__ __forceinline__ uint4 ld_stream(const void* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

}  // namespace shardlm::cuda_detail
