// The one-shot all-reduce kernel (the protocol and why it is safe: docs/multi_gpu.md, "One-shot all-reduce").
#include "comm/nccl/one_shot_all_reduce.h"

namespace shardlm::one_shot {
namespace {

// A release store at system scope: the data this block wrote before the preceding __syncthreads is
// visible to a peer GPU before it can see the flag.
__device__ __forceinline__ void store_release_sys(uint32_t* p, uint32_t v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// The matching acquire: once the flag is seen, the peer's slot data is too. It also bypasses a stale L1 line.
__device__ __forceinline__ uint32_t load_acquire_sys(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Nanoseconds, the same clock on every SM (clock64 counts cycles per SM at a varying frequency).
__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Flags only grow, and a peer is at most one call ahead (it cannot finish call e + 1 before we publish
// e + 1), so a wrap-safe difference decides "this peer has reached call `want`".
__device__ __forceinline__ bool reached(uint32_t flag, uint32_t want) {
  return static_cast<int32_t>(flag - want) >= 0;
}

// Elements i..i+3 of buf (n floats), zero past the end. The float4 path needs a 16-byte aligned buffer;
// the caller's buffer may be any float view. Alignment only changes the instructions, never which block
// handles which elements: that must be the same on every rank, whose buffers may be aligned differently.
__device__ __forceinline__ float4 load4(const float* buf, size_t i, size_t n, bool aligned) {
  if (aligned && i + 4 <= n) return *reinterpret_cast<const float4*>(buf + i);
  float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
  x.x = buf[i];
  if (i + 1 < n) x.y = buf[i + 1];
  if (i + 2 < n) x.z = buf[i + 2];
  if (i + 3 < n) x.w = buf[i + 3];
  return x;
}

__device__ __forceinline__ void store4(float* buf, size_t i, size_t n, bool aligned, float4 x) {
  if (aligned && i + 4 <= n) {
    *reinterpret_cast<float4*>(buf + i) = x;
    return;
  }
  buf[i] = x.x;
  if (i + 1 < n) buf[i + 1] = x.y;
  if (i + 2 < n) buf[i + 2] = x.z;
  if (i + 3 < n) buf[i + 3] = x.w;
}

// Grid (kBlocks), block (kThreads). Block b owns the float4 groups v = b * kThreads + t + k * kBlocks *
// kThreads on every rank, and only ever waits for block b of its peers.
// __grid_constant__: base[] is indexed by runtime ranks; this reads it from the parameter space instead
// of copying the struct to local memory.
__global__ void __launch_bounds__(kThreads) one_shot_all_reduce(const __grid_constant__ KernelArgs a) {
  __shared__ uint32_t s_epoch;
  __shared__ int s_give_up;
  const int b = static_cast<int>(blockIdx.x), t = static_cast<int>(threadIdx.x);
  Flags* const mine = reinterpret_cast<Flags*>(a.base[a.rank]);
  if (t == 0) {
    // Written by this block's thread 0 in the previous call: a kernel boundary orders it.
    s_epoch = mine->epoch[b];
    s_give_up = mine->error != 0;
  }
  __syncthreads();
  if (s_give_up) return;  // a peer already failed to arrive: do not wait the whole timeout again
  const uint32_t epoch = s_epoch;
  const size_t slot = kFlagsBytes + (epoch & 1u) * kSlotBytes;
  const bool aligned = (reinterpret_cast<uintptr_t>(a.buf) & 15u) == 0;
  const size_t n4 = (a.n + 3) / 4;
  const size_t first = static_cast<size_t>(b) * kThreads + static_cast<size_t>(t);
  constexpr size_t stride = static_cast<size_t>(kBlocks) * kThreads;

  // 1. Our input into our slot of this call's parity. No peer still reads it: the last call that used it
  //    was e - 2, and in call e - 1 we waited for every peer's flag of call e - 1, which a peer publishes
  //    only after its kernel of call e - 2 (the one reading our slot) has finished.
  float4* const my_slot = reinterpret_cast<float4*>(a.base[a.rank] + slot);
  for (size_t v = first; v < n4; v += stride) my_slot[v] = load4(a.buf, 4 * v, a.n, aligned);
  __syncthreads();

  // 2. Thread p (p != rank) publishes "our block b has call `epoch`'s data" into member p's flags, then
  //    waits for member p's matching flag in ours. Push the flag, poll locally: a remote store is posted,
  //    a remote poll would cross the link on every iteration.
  if (t < a.world && t != a.rank) {
    store_release_sys(&reinterpret_cast<Flags*>(a.base[t])->arrived[b][a.rank], epoch + 1);
    const uint32_t* flag = &mine->arrived[b][t];
    const uint64_t deadline = global_ns() + a.timeout_ns;
    bool arrived = true;
    while (!reached(load_acquire_sys(flag), epoch + 1)) {
      if (global_ns() > deadline) {
        arrived = false;
        break;
      }
    }
    if (!arrived) {
      // Bounded: a dead peer must not hold the GPU forever. The host sees the word and fails the job.
      *reinterpret_cast<volatile uint32_t*>(a.host_error) = 1u + static_cast<uint32_t>(t);
      __threadfence_system();
      s_give_up = 1;
    }
  }
  __syncthreads();
  if (s_give_up) {
    // The pointer is fetched again from the parameters: keeping `mine` live until here made ptxas spill.
    if (t == 0) reinterpret_cast<Flags*>(a.base[a.rank])->error = 1;
    return;
  }

  // 3. Every member's slot, summed in rank order 0, 1, ... on every rank: the same float additions in the
  //    same order give every rank the same bits. __ldcg: peers' data is read from L2 (theirs), never from
  //    an L1 line of an earlier call.
  for (size_t v = first; v < n4; v += stride) {
    float4 acc = __ldcg(reinterpret_cast<const float4*>(a.base[0] + slot) + v);
#pragma unroll
    for (int r = 1; r < kMaxRanks; ++r) {
      if (r >= a.world) break;
      const float4 x = __ldcg(reinterpret_cast<const float4*>(a.base[r] + slot) + v);
      acc.x += x.x;
      acc.y += x.y;
      acc.z += x.z;
      acc.w += x.w;
    }
    store4(a.buf, 4 * v, a.n, aligned, acc);
  }
  // The counter lives in device memory and the kernel advances it: a CUDA graph replays the same
  // arguments, so the host could not.
  if (t == 0) mine->epoch[b] = epoch + 1;
}

}  // namespace

cudaError_t launch_kernel(const KernelArgs& args, cudaStream_t stream) {
  one_shot_all_reduce<<<kBlocks, kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace shardlm::one_shot
