// The one-shot all-reduce kernel (the protocol and why it is safe: docs/multi_gpu.md, "One-shot all-reduce").
#include "comm/nccl/one_shot_all_reduce.h"

#include <algorithm>

#include "backends/cuda/pdl.cuh"
#include "backends/cuda/quant_x.cuh"
#include "backends/cuda/warp.cuh"
#include "comm/device_push.h"

namespace shardlm::one_shot {
namespace {

// Nanoseconds, the same clock on every SM (clock64 counts cycles per SM at a varying frequency).
__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// LL words (one_shot_all_reduce.h): a float4 as two 16-byte stores {x, tag, y, tag}, {z, tag, w, tag}.
// Volatile: straight to the owner's memory (a peer's, over NVLink) and, when polling, past L1, which does not
// see another GPU's writes. Only each aligned 8-byte (value, tag) pair needs to arrive whole, as in NCCL's LL.
__device__ __forceinline__ void st_ll(char* p /* (32 bytes) one float4's LL words */, float4 v, uint32_t tag) {
  asm volatile("st.volatile.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(__float_as_uint(v.x)), "r"(tag),
               "r"(__float_as_uint(v.y)), "r"(tag)
               : "memory");
  asm volatile("st.volatile.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p + 16), "r"(__float_as_uint(v.z)), "r"(tag),
               "r"(__float_as_uint(v.w)), "r"(tag)
               : "memory");
}
// One float4's LL words as loaded, before their tags are checked: a thread can ask for several sources'
// words first and look at them afterwards, one round trip for all.
struct LlWords {
  uint4 lo, hi;  // {x, tag, y, tag}, {z, tag, w, tag}
};
__device__ __forceinline__ LlWords ld_ll_words(const char* p /* (32 bytes) one float4's LL words */) {
  LlWords w;
  asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(w.lo.x), "=r"(w.lo.y), "=r"(w.lo.z), "=r"(w.lo.w)
               : "l"(p)
               : "memory");
  asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(w.hi.x), "=r"(w.hi.y), "=r"(w.hi.z), "=r"(w.hi.w)
               : "l"(p + 16)
               : "memory");
  return w;
}
// Whether both halves carry `tag`; fills v when they do.
__device__ __forceinline__ bool ll_ready(const LlWords& w, uint32_t tag, float4& v) {
  if (w.lo.y != tag || w.lo.w != tag || w.hi.y != tag || w.hi.w != tag) return false;
  v = make_float4(__uint_as_float(w.lo.x), __uint_as_float(w.lo.z), __uint_as_float(w.hi.x), __uint_as_float(w.hi.z));
  return true;
}
__device__ __forceinline__ bool ld_ll(const char* p /* (32 bytes) one float4's LL words */, uint32_t tag, float4& v) {
  return ll_ready(ld_ll_words(p), tag, v);
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

// Grid (blocks_for(n)), block (kThreads); see kBlocks for who owns what. kNorm: the fused epilogue, with
// the whole row in one pass (n <= kMaxNormFloats).
// __grid_constant__: base[] is indexed by runtime ranks; this reads it from the parameter space instead
// of copying the struct to local memory.
template <bool kNorm>
__global__ void __launch_bounds__(kThreads) one_shot_all_reduce(const __grid_constant__ KernelArgs a) {
  // Launched as a programmatic dependent (unless Fuse::kOff): the kernel after this one (a matvec) may
  // start streaming its weights while this one waits for the peers.
  cuda_detail::pdl_trigger();
  const uint64_t t_start = a.trace ? global_ns() : 0;
  __shared__ uint32_t s_epoch, s_call;
  __shared__ int s_give_up;
  __shared__ float s_part[kThreads / 32];  // (warps) the norm's block reduction
  __shared__ float s_shares[kBlocks];      // (data blocks) every block's share of the sum of squares
  const int b = static_cast<int>(blockIdx.x), t = static_cast<int>(threadIdx.x);
  const size_t n4 = (a.n + 3) / 4;
  const size_t first = static_cast<size_t>(b) * kThreads + static_cast<size_t>(t);
  constexpr size_t stride = static_cast<size_t>(kBlocks) * kThreads;
  const bool aligned = (reinterpret_cast<uintptr_t>(a.buf) & 15u) == 0;
  // The norm's weight is no kernel's output: read before the wait, its latency hidden behind the matvec.
  float4 wv = make_float4(0.f, 0.f, 0.f, 0.f);
  if (kNorm && first < n4) wv = load4(a.norm.w, 4 * first, a.n, (reinterpret_cast<uintptr_t>(a.norm.w) & 15u) == 0);
  // Everything below reads or writes what earlier kernels in the stream touch (buf, x, our flags and areas).
  cuda_detail::pdl_wait();
  const uint64_t t_waited = a.trace ? global_ns() : 0;
  Flags* const mine = reinterpret_cast<Flags*>(a.base[a.rank] + a.channel);
  // This thread's first group of buf and of the residual row are requested now, together with thread 0's
  // counters below, instead of one L2 round trip after the other (a seventh of the time from the wait to
  // the peers' data at 70B tp 4; docs/BENCHMARKS.md, Decisions in the source).
  const float4 x_first = first < n4 ? load4(a.buf, 4 * first, a.n, aligned) : make_float4(0.f, 0.f, 0.f, 0.f);
  const bool x_aligned = (reinterpret_cast<uintptr_t>(a.norm.x) & 15u) == 0;
  float4 xv = make_float4(0.f, 0.f, 0.f, 0.f);
  if (kNorm && first < n4) xv = load4(a.norm.x, 4 * first, a.n, x_aligned);
  if (t == 0) {
    // Written by this block's thread 0 in the previous call of this channel: a kernel boundary orders it.
    s_epoch = mine->epoch[b];
    if (kNorm) s_call = mine->norm_calls;
    s_give_up = mine->error != 0;
  }
  __syncthreads();
  if (s_give_up) return;  // a peer already failed to arrive: do not wait the whole timeout again
  // The words' layout and tags are comm/device_push.h's, which a pushing producer uses too.
  const uint32_t epoch = s_epoch, tag = push_tag(epoch);
  // Area (parity, src) of member m's buffer: a.base[m] + areas + push_area(epoch, world, src) * a.area.
  const size_t areas = a.channel + kFlagsBytes;

  // 1. Send: our part of every float4 group this block owns, tagged with the call, into our area of every
  //    peer's buffer. No peer still reads that area: it was last filled in our call e - 2, and we have since
  //    received the peer's data of call e - 1, which the peer sends only after its kernel of call e - 2
  //    (the one that read the area) has finished - stream order on the peer. Two parities are what makes
  //    that true.
  //    A pushed call's producer (a matvec) stored these words already, the same values and tags
  //    (comm/device_push.h), after the same stream-ordered point: our previous call's end.
  const size_t to_us = areas + push_area(epoch, a.world, a.rank) * a.area;
  for (size_t v = first; v < n4 && !a.pushed; v += stride) {
    const float4 x = v == first ? x_first : load4(a.buf, 4 * v, a.n, aligned);
    for (int p = 0; p < a.world; ++p)
      if (p != a.rank) st_ll(a.base[p] + to_us + 32 * v, x, tag);
  }

  // 2. Receive and sum in rank order 0, 1, ... on every rank (our own part from buf, the same bits the peers
  //    received): the same float additions in the same order give every rank the same bits. Each thread
  //    polls its own words; a peer that never sends is given up after the timeout.
  //    Every source's words of a group are asked for together (kTogether sources per round) before any is
  //    looked at: where they are there already, as they mostly are once the producers push, that is one
  //    round trip instead of one per peer (at 70B tp 4 the data phase took 2.0 us against tp 2's 1.3).
  //    Only a source whose words were not there yet is polled again, alone.
  const uint64_t deadline = global_ns() + a.timeout_ns;
  constexpr int kTogether = 4;
  auto receive = [&](size_t v, float4& acc) -> bool {
    const auto from = [&](int r) { return a.base[a.rank] + areas + push_area(epoch, a.world, r) * a.area + 32 * v; };
    for (int r0 = 0; r0 < a.world; r0 += kTogether) {
      LlWords words[kTogether] = {};
      if (a.poll_together) {
#pragma unroll
        for (int k = 0; k < kTogether; ++k)
          if (r0 + k < a.world && r0 + k != a.rank) words[k] = ld_ll_words(from(r0 + k));
      }
#pragma unroll
      for (int k = 0; k < kTogether; ++k) {
        const int r = r0 + k;
        if (r >= a.world) break;
        float4 x;
        if (r == a.rank) {
          x = v == first ? x_first : load4(a.buf, 4 * v, a.n, aligned);
        } else if (!(a.poll_together && ll_ready(words[k], tag, x))) {
          while (!ld_ll(from(r), tag, x)) {
            if (global_ns() > deadline) {
              // Bounded: a dead peer must not hold the GPU forever. The host sees the word and fails the job.
              *reinterpret_cast<volatile uint32_t*>(a.host_error) = 1u + static_cast<uint32_t>(r);
              __threadfence_system();
              s_give_up = 1;
              return false;
            }
          }
        }
        if (r == 0) {
          acc = x;
        } else {
          acc.x += x.x;
          acc.y += x.y;
          acc.z += x.z;
          acc.w += x.w;
        }
      }
    }
    return true;
  };
  auto gave_up = [&]() {
    // The pointer is fetched again from the parameters: keeping `mine` live until here made ptxas spill.
    if (t == 0) reinterpret_cast<Flags*>(a.base[a.rank] + a.channel)->error = 1;
  };
  if constexpr (!kNorm) {
    // All of a thread's groups are received before any is stored: buf is also what we sent.
    bool ok = true;
    for (size_t v = first; v < n4 && ok; v += stride) {
      float4 acc;
      ok = receive(v, acc);
      if (ok) store4(a.buf, 4 * v, a.n, aligned, acc);
    }
    __syncthreads();
    if (s_give_up) return gave_up();
  } else {
    // 3. x += sum (the same float additions as the backend's add_rms_norm), then the norm. The row is
    //    spread over the data blocks: each publishes its share of the sum of squares, tagged with the
    //    call, and every block adds all shares in block order, so every block and every rank (same x,
    //    same sum) gets the same scale.
    const bool valid = first < n4;
    float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
    if (valid && receive(first, s)) {
      xv = make_float4(xv.x + s.x, xv.y + s.y, xv.z + s.z, xv.w + s.w);
      store4(a.buf, 4 * first, a.n, aligned, s);
      store4(a.norm.x, 4 * first, a.n, x_aligned, xv);
    }
    __syncthreads();
    const uint64_t t_data = a.trace ? global_ns() : 0;
    if (s_give_up) return gave_up();
    const float ss =
        cuda_detail::warp_sum(fmaf(xv.x, xv.x, fmaf(xv.y, xv.y, fmaf(xv.z, xv.z, xv.w * xv.w))));
    if (t % 32 == 0) s_part[t / 32] = ss;
    __syncthreads();
    const int n_data = static_cast<int>(gridDim.x);
    // (Exchanging the shares through a thread-block cluster's shared memory instead measured 1-2% slower at
    // 70B tp 4, 172.1 / 170.3 against 174.9 / 172.6 tok/s: the cluster's blocks are placed together.)
    if (t == 0) {
      float part = 0.0f;
      for (int w = 0; w < kThreads / 32; ++w) part += s_part[w];
      const uint64_t word = (static_cast<uint64_t>(s_call + 1) << 32) | __float_as_uint(part);
      // GPU scope: only this rank's other blocks read it. Relaxed: the word carries its value and call
      // together and nothing else is read on the strength of it, so no fence need order this thread's
      // earlier stores (buf, x) before it; a release store would wait for them (SHARDLM_ALLREDUCE_RELAXED_SHARES=0).
      if (a.relaxed_shares)
        asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(&mine->share[b]), "l"(word) : "memory");
      else
        asm volatile("st.release.gpu.global.u64 [%0], %1;" ::"l"(&mine->share[b]), "l"(word) : "memory");
    }
    if (t < n_data) {
      const uint64_t* p = &mine->share[t];
      const uint64_t share_deadline = global_ns() + a.timeout_ns;
      uint64_t word;
      for (;;) {
        if (a.relaxed_shares)
          asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(word) : "l"(p) : "memory");
        else
          asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(word) : "l"(p) : "memory");
        if (static_cast<uint32_t>(word >> 32) == s_call + 1) break;
        // Only a block that gave up on a peer (and so published nothing) keeps us here: give up too.
        if (global_ns() > share_deadline) {
          s_give_up = 1;
          break;
        }
      }
      s_shares[t] = __uint_as_float(static_cast<uint32_t>(word));
    }
    __syncthreads();
    if (s_give_up) {
      if (t == 0) {
        // The block that gave up on a peer has named it already; otherwise say what happened here.
        // (No atomics: the word is host memory across PCIe. A race only picks one of two true messages.)
        volatile uint32_t* he = a.host_error;
        if (*he == 0u) *he = kHostErrorNoShare;
        __threadfence_system();
      }
      return gave_up();
    }
    float total = 0.0f;
    for (int i = 0; i < n_data; ++i) total += s_shares[i];
    if (a.trace && b == 0 && t == 0) {
      uint64_t* tr = a.trace + static_cast<size_t>(s_call % kTraceCalls) * kTracePoints;
      tr[0] = t_start;
      tr[1] = t_waited;
      tr[2] = t_data;
      tr[3] = global_ns();
    }
    const float scale = 1.0f / sqrtf(total / static_cast<float>(a.n) + a.norm.eps);
    const float4 y = make_float4(xv.x * scale * wv.x, xv.y * scale * wv.y, xv.z * scale * wv.z, xv.w * scale * wv.w);
    if (valid) store4(a.norm.y, 4 * first, a.n, (reinterpret_cast<uintptr_t>(a.norm.y) & 15u) == 0, y);
    // Every lane of every warp takes part (shuffles); n % 32 == 0 keeps 8-lane groups whole.
    if (a.norm.xq) cuda_detail::quantize_store4(y, static_cast<int64_t>(first), valid, a.norm.xq, static_cast<int64_t>(a.n));
  }
  // The counters live in device memory and the kernel advances them: a CUDA graph replays the same
  // arguments, so the host could not.
  if (t == 0) {
    mine->epoch[b] = epoch + 1;
    if (kNorm && b == 0) mine->norm_calls = s_call + 1;
    if (kNorm && a.trace && b == 0) a.trace[static_cast<size_t>(s_call % kTraceCalls) * kTracePoints + 4] = global_ns();
  }
}

// The blocks that own some of n floats (kBlocks at most).
unsigned blocks_for(size_t n) {
  const size_t n4 = (n + 3) / 4;
  return static_cast<unsigned>(std::min<size_t>(kBlocks, (n4 + kThreads - 1) / kThreads));
}

}  // namespace

cudaError_t launch_kernel(const KernelArgs& args, bool norm, Fuse fuse, cudaStream_t stream) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(blocks_for(args.n));
  cfg.blockDim = dim3(kThreads);
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = fuse == Fuse::kOff ? 0 : 1;
  return norm ? cudaLaunchKernelEx(&cfg, one_shot_all_reduce<true>, args)
              : cudaLaunchKernelEx(&cfg, one_shot_all_reduce<false>, args);
}

}  // namespace shardlm::one_shot
