// Programmatic dependent launch (sm_90): a decode step is ~450 small kernels, and between two of them the
// GPU idles for the launch of the next and its ramp-up. Kernels launched with launch_pdl may start while
// their predecessor is still running; each calls pdl_enter() (or pdl_trigger() early and pdl_wait()
// before it reads anything a predecessor wrote), which makes them start as soon as the predecessor's
// blocks are all running and then wait for its completion (and memory flush) in hardware. A kernel that
// waits this way still sees every earlier kernel's writes: its predecessor could only complete after
// its own wait. Kernels launched the ordinary way treat both instructions as no-ops.
#pragma once

#include <cuda_runtime.h>

#include <utility>

#include "backends/cuda/cuda_util.cuh"

namespace shardlm::cuda_detail {

// Lets the next kernel in the stream launch (it still waits for this one to finish before reading).
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
// Waits until the previous kernel in the stream has completed and its writes are visible.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_enter() {
  pdl_trigger();
  pdl_wait();
}

// kernel<<<grid, block, smem, stream>>>(args...) with programmatic stream serialization allowed.
template <typename... Params, typename... Args>
void launch_pdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  SHARDLM_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...));
}

}  // namespace shardlm::cuda_detail
