// Warp-wide reductions (all 32 lanes take part), shared by the backend's kernels and the one-shot
// all-reduce kernel (src/comm/nccl).
#pragma once

namespace shardlm::cuda_detail {

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

}  // namespace shardlm::cuda_detail
