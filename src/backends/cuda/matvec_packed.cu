// Decode matvec and prefill dequantization for packed quantized weights (layout: pack.h).
//
// Why this kernel: with ggml's interleaved blocks and float x the quantized matvecs ran at 30-65% of the
// copy bandwidth (docs/cuda_kernels.md): each element cost ~3 instructions (nibble -> float, FMA, x from
// shared memory) and the blocks had to be staged through shared memory. Here, as in llama.cpp's mmvq,
// x is quantized to int8 per 32 elements once per thread block (into shared memory), and each lane
// multiplies one 32-column unit of a row with __dp4a: 8 dp4a + a few LOP3 per 32 elements, one float
// conversion per unit. Packed rows give every lane aligned 16-byte loads straight into registers, and
// the default kernel (matvec_pipe_kernel, below) keeps the next 4 units per lane in flight while it
// multiplies the current 4.
//
// Precision: x_j becomes d * q_j with |x_j - d * q_j| <= d / 2, d = max|x| / 127 over its 32 elements;
// the result differs from the float product by at most sum over units of d/2 * sum |w_j| (the op suite
// checks exactly that bound). The float weights' values are unchanged.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "backends/cuda/cuda_util.cuh"
#include "backends/cuda/kernels.cuh"
#include "backends/cuda/pdl.cuh"
#include "backends/cuda/mv_common.cuh"
#include "backends/cuda/pack.h"
#include "backends/cuda/quant_x.cuh"
#include "comm/device_push.h"
#include "core/error.h"

namespace shardlm::cuda_detail {
namespace {

constexpr int kThreads = 256;  // 8 warps per block
constexpr int kWarps = kThreads / 32;
// Shared memory of the several-token kernel: at most this much per block (x's rows of one pass), and the
// budget per SM that sets how many blocks run together (an H100 SM has 228 KB).
constexpr size_t kTokensSmemMax = 200 * 1024;
constexpr size_t kTokensSmemPerSm = 220 * 1024;

__device__ __forceinline__ float h2f(uint32_t bits) { return __half2float(__ushort_as_half(static_cast<unsigned short>(bits))); }
__device__ __forceinline__ uint32_t ld_u16(const uint8_t* p) { return __ldg(reinterpret_cast<const unsigned short*>(p)); }
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

// Nibble words of a 16-byte Q4_0-ordered unit: word k low nibbles = elements 4k..4k+3, high = 16+4k...
__device__ __forceinline__ int nib_dot(const uint4& q, const int (&xw)[8], int s) {
  s = __dp4a(static_cast<int>(q.x & 0x0F0F0F0Fu), xw[0], s);
  s = __dp4a(static_cast<int>((q.x >> 4) & 0x0F0F0F0Fu), xw[4], s);
  s = __dp4a(static_cast<int>(q.y & 0x0F0F0F0Fu), xw[1], s);
  s = __dp4a(static_cast<int>((q.y >> 4) & 0x0F0F0F0Fu), xw[5], s);
  s = __dp4a(static_cast<int>(q.z & 0x0F0F0F0Fu), xw[2], s);
  s = __dp4a(static_cast<int>((q.z >> 4) & 0x0F0F0F0Fu), xw[6], s);
  s = __dp4a(static_cast<int>(q.w & 0x0F0F0F0Fu), xw[3], s);
  s = __dp4a(static_cast<int>((q.w >> 4) & 0x0F0F0F0Fu), xw[7], s);
  return s;
}

// Q4_K sub-block j's 6-bit scale and min from the header words (scales[0..3], [4..7], [8..11]).
__device__ __forceinline__ void q4k_sc_m(const uint4& hdr, int j, uint32_t& sc, uint32_t& m) {
  const int sh = 8 * (j & 3);
  const uint32_t a = hdr.y >> sh, b = hdr.z >> sh;
  if (j < 4) {
    sc = a & 63;
    m = b & 63;
  } else {
    const uint32_t c = hdr.w >> sh;
    sc = (c & 0xF) | (((a >> 6) & 3) << 4);
    m = ((c >> 4) & 0xF) | (((b >> 6) & 3) << 4);
  }
}

// Q6_K: 6-bit element word w (elements 4w..4w+3 of the unit) as signed bytes q - 32.
__device__ __forceinline__ int q6_word(const uint4& lo, const uint2& hi, int w) {
  const uint32_t l = (w & 3) == 0 ? lo.x : (w & 3) == 1 ? lo.y : (w & 3) == 2 ? lo.z : lo.w;
  const uint32_t nib = (w < 4 ? l : (l >> 4)) & 0x0F0F0F0Fu;
  const uint32_t h = ((((w < 4) ? hi.x : hi.y) >> (2 * (w & 3))) & 0x03030303u) << 4;
  // Bytewise q - 32 without borrows between bytes: set each byte's top bit, subtract, flip it back.
  return static_cast<int>((((nib | h) | 0x80808080u) - 0x20202020u) ^ 0x80808080u);
}

template <GgmlType T>
struct Pk;

template <>
struct Pk<GgmlType::Q4_0> {
  struct U {
    uint4 q;
    uint32_t d;
  };
  __device__ static const uint8_t* quants(const uint8_t* row, int64_t u) { return row + 16 * u; }
  __device__ static U load(const uint8_t* row, int64_t u, int64_t nb) {
    return {ld_stream(row + 16 * u), ld_u16(row + 16 * nb + 2 * u)};
  }
  // xd: x's scale for the unit, xs: xd * sum of its int8 values.
  __device__ static float dot(const U& v, int64_t, const int (&xw)[8], float xd, float xs) {
    return h2f(v.d) * (xd * static_cast<float>(nib_dot(v.q, xw, 0)) - 8.0f * xs);
  }
};

template <>
struct Pk<GgmlType::Q8_0> {
  struct U {
    uint4 q0, q1;
    uint32_t d;
  };
  __device__ static const uint8_t* quants(const uint8_t* row, int64_t u) { return row + 32 * u; }
  __device__ static U load(const uint8_t* row, int64_t u, int64_t nb) {
    return {ld_stream(row + 32 * u), ld_stream(row + 32 * u + 16), ld_u16(row + 32 * nb + 2 * u)};
  }
  __device__ static float dot(const U& v, int64_t, const int (&xw)[8], float xd, float) {
    int s = __dp4a(static_cast<int>(v.q0.x), xw[0], 0);
    s = __dp4a(static_cast<int>(v.q0.y), xw[1], s);
    s = __dp4a(static_cast<int>(v.q0.z), xw[2], s);
    s = __dp4a(static_cast<int>(v.q0.w), xw[3], s);
    s = __dp4a(static_cast<int>(v.q1.x), xw[4], s);
    s = __dp4a(static_cast<int>(v.q1.y), xw[5], s);
    s = __dp4a(static_cast<int>(v.q1.z), xw[6], s);
    s = __dp4a(static_cast<int>(v.q1.w), xw[7], s);
    return h2f(v.d) * xd * static_cast<float>(s);
  }
};

template <>
struct Pk<GgmlType::Q4_K> {
  struct U {
    uint4 q, hdr;
  };
  __device__ static const uint8_t* quants(const uint8_t* row, int64_t u) { return row + 16 * u; }
  __device__ static U load(const uint8_t* row, int64_t u, int64_t nb) {
    // 8 lanes share a header: a cached load, merged by the coalescer.
    return {ld_stream(row + 16 * u), __ldg(reinterpret_cast<const uint4*>(row + 16 * nb + 16 * (u / 8)))};
  }
  __device__ static float dot(const U& v, int64_t u, const int (&xw)[8], float xd, float xs) {
    uint32_t sc, m;
    q4k_sc_m(v.hdr, static_cast<int>(u & 7), sc, m);
    const float d1 = h2f(v.hdr.x & 0xFFFFu) * static_cast<float>(sc);
    const float m1 = h2f(v.hdr.x >> 16) * static_cast<float>(m);
    return d1 * (xd * static_cast<float>(nib_dot(v.q, xw, 0))) - m1 * xs;
  }
};

template <>
struct Pk<GgmlType::Q6_K> {
  struct U {
    uint4 lo;
    uint2 hi;
    uint32_t sc, d;
  };
  __device__ static const uint8_t* quants(const uint8_t* row, int64_t u) { return row + 16 * u; }
  __device__ static U load(const uint8_t* row, int64_t u, int64_t nb) {
    return {ld_stream(row + 16 * u), __ldg(reinterpret_cast<const uint2*>(row + 16 * nb + 8 * u)),
            ld_u16(row + 24 * nb + 2 * u), ld_u16(row + 26 * nb + 2 * (u / 8))};
  }
  __device__ static float dot(const U& v, int64_t, const int (&xw)[8], float xd, float) {
    int s0 = 0, s1 = 0;
#pragma unroll
    for (int w = 0; w < 4; ++w) s0 = __dp4a(q6_word(v.lo, v.hi, w), xw[w], s0);
#pragma unroll
    for (int w = 4; w < 8; ++w) s1 = __dp4a(q6_word(v.lo, v.hi, w), xw[w], s1);
    const int sc0 = static_cast<int8_t>(v.sc & 0xFF), sc1 = static_cast<int8_t>(v.sc >> 8);
    return h2f(v.d) * (xd * static_cast<float>(sc0 * s0 + sc1 * s1));
  }
};

// x (n_cols floats) -> its int8 row in shared memory (quant_x.cuh layout). Every thread of the block runs the
// same number of rounds so that the 8-lane shuffles see all their lanes.
__device__ __forceinline__ void quantize_x(const float* __restrict__ x, int64_t n_cols, bool x_aligned,
                                           int* row /* (quant_x_words(n_cols)) */, int tid /* 0..kThreads-1 */) {
  const int64_t n4 = n_cols / 4;
  constexpr int kBatch = 4;  // float4 loads per thread issued together
  for (int64_t base = 0; base < n4; base += int64_t{kThreads} * kBatch) {
    float4 v[kBatch];
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const int64_t e4 = base + int64_t{k} * kThreads + tid;
      if (e4 >= n4) {
        v[k] = make_float4(0.f, 0.f, 0.f, 0.f);
      } else if (x_aligned) {
        v[k] = __ldg(reinterpret_cast<const float4*>(x) + e4);
      } else {
        v[k] = make_float4(x[4 * e4], x[4 * e4 + 1], x[4 * e4 + 2], x[4 * e4 + 3]);
      }
    }
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const int64_t e4 = base + int64_t{k} * kThreads + tid;
      quantize_store4(v[k], e4, e4 < n4, row, n_cols);
    }
  }
}


// Blocks per SM the launch bounds promise: two, unless R x U units in flight need more registers.
template <int R, int U>
constexpr int kMinBlocks = R * U > 8 ? 1 : 2;

template <GgmlType T, int R, int U>
__global__ void __launch_bounds__(kThreads, kMinBlocks<R, U>) matvec_packed_kernel(
    const __grid_constant__ MvGroup grp,  // packed weights (n_rows, stride bytes) each; y: (n_rows) each
    int64_t n_cols,                       // columns of every weight (multiple of 32 or 256)
    int64_t n_items,                      // groups of R rows over all segments
    const float* __restrict__ x,          // (n_cols)
    bool x_aligned) {                     // x is 16-byte aligned
  extern __shared__ int4 smem[];
  pdl_trigger();
  const int64_t nb = n_cols / 32;
  int* xq = reinterpret_cast<int*>(smem);                  // (n_cols / 4) words of 4 int8
  float* xd = reinterpret_cast<float*>(xq + n_cols / 4);   // (nb)
  float* xs = xd + nb;                                      // (nb)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarps;

  // The first units of this warp's first rows are loaded into registers before anything else: they do not
  // depend on the previous kernel, so their DRAM latency overlaps its tail (PDL) and x's quantization.
  // The next units of those rows go to L2 meanwhile.
  typename Pk<T>::U a[R][U];
  bool preloaded = false;
  if (first < n_items) {
    const MvSeg sg = mv_seg(grp, first);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const uint8_t* row = sg.w + min(R * sg.local + r, sg.n_rows - 1) * sg.stride;
#pragma unroll
      for (int j = 0; j < U; ++j) {
        const int64_t u = lane + 32 * j;
        if (u < nb) a[r][j] = Pk<T>::load(row, u, nb);
        if (u + 32 * U < nb) prefetch_l2(Pk<T>::quants(row, u + 32 * U));
      }
    }
    preloaded = true;
  }
  pdl_wait();  // x is the previous kernel's output; the weights were not
  quantize_x(x, n_cols, x_aligned, xq, threadIdx.x);
  __syncthreads();

  const int4* xq4 = reinterpret_cast<const int4*>(xq);
  for (int64_t item = first; item < n_items; item += step) {
    const MvSeg sg = mv_seg(grp, item);
    const uint8_t* rows[R];
#pragma unroll
    for (int r = 0; r < R; ++r) rows[r] = sg.w + min(R * sg.local + r, sg.n_rows - 1) * sg.stride;
    float acc[R] = {};
    for (int64_t u0 = lane; u0 < nb; u0 += 32 * U) {
      if (!preloaded) {
#pragma unroll
        for (int j = 0; j < U; ++j) {
          const int64_t u = u0 + 32 * j;
          if (u < nb) {
#pragma unroll
            for (int r = 0; r < R; ++r) a[r][j] = Pk<T>::load(rows[r], u, nb);
          }
        }
      }
      preloaded = false;
#pragma unroll
      for (int j = 0; j < U; ++j) {
        const int64_t u = u0 + 32 * j;
        if (u < nb) {
          const int4 lo = xq4[2 * u], hi = xq4[2 * u + 1];
          const int xw[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
          const float d = xd[u], s = xs[u];
#pragma unroll
          for (int r = 0; r < R; ++r) acc[r] += Pk<T>::dot(a[r][j], u, xw, d, s);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = warp_sum(acc[r]);
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < R; ++r)
        if (R * sg.local + r < sg.n_rows) sg.y[R * sg.local + r] = acc[r];
    }
  }
}


// ---- the default decode kernel: one row per warp, the next U units in flight while U are multiplied ------
// ncu on the kernel above (2 rows x 4 units per lane, 16 warps/SM): DRAM 41-51%, ~0.6 eligible warps per
// scheduler: each warp alternates between a burst of loads and a burst of arithmetic, so while it computes
// it has nothing in flight. Here every warp walks its (row, chunk) sequence as one software pipeline: the
// next chunk's loads (possibly the next row's) are issued before the current chunk is multiplied, so each
// warp always has U x 32 units on the way. (A bulk-copy producer/consumer version that streamed whole rows
// into shared memory measured worse, 42-61%: its consumers were issue-bound.)
// B: blocks per SM the launch bounds promise (and the persistent grid uses): more warps to hide latency,
// fewer registers per thread.
// kPre: x arrives already quantized (xpre, quant_x.cuh layout, written by the kernel that produced x) and is
// only copied to shared memory, so no block spends its start quantizing all of x: that prologue, repeated
// by each of the 264 blocks, costs about as many instructions as the products for 14336-wide rows.
// (Reading xpre through L1 in the main loop instead of shared memory measured 3% slower end to end.)
// push (world > 0, one weight): each output is also stored, beside its all-reduce call's tag, into the other
// members' receive areas of the fused one-shot all-reduce that sums it next (comm/device_push.h): the
// send then happens as rows finish instead of after this kernel and the all-reduce kernel's start.
template <GgmlType T, int R, int U, int B, bool kPre>
__global__ void __launch_bounds__(kThreads, B) matvec_pipe_kernel(
    const __grid_constant__ MvGroup grp,  // packed weights (n_rows, stride bytes) each; y: (n_rows) each
    int64_t n_cols,                       // columns of every weight
    int64_t n_items,                      // groups of R rows of one weight, over all segments
    const float* __restrict__ x,          // (n_cols); unused with kPre
    bool x_aligned,                       // x is 16-byte aligned
    const int* __restrict__ xpre,         // (quant_x_words(n_cols)) with kPre, else null
    const __grid_constant__ DevicePush push) {
  extern __shared__ int4 smem[];
  pdl_trigger();
  const int nb = static_cast<int>(n_cols / 32);
  const int* xq = reinterpret_cast<const int*>(smem);                  // (n_cols / 4) words of 4 int8
  const float* xd = reinterpret_cast<const float*>(xq + n_cols / 4);  // (nb)
  const float* xs = xd + nb;                                            // (nb)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarps;
  const int n_chunks = (nb + 32 * U - 1) / (32 * U);
  using Unit = typename Pk<T>::U;
  // Rows of an item (the last item of a weight may repeat its last row; only real rows are written).
  const auto rows_of = [&](int64_t item, const uint8_t* (&rows)[R]) {
    const MvSeg sg = mv_seg(grp, item);
#pragma unroll
    for (int r = 0; r < R; ++r) rows[r] = sg.w + min(R * sg.local + r, sg.n_rows - 1) * sg.stride;
  };
  const auto load = [&](Unit (&buf)[R][U], const uint8_t* const (&rows)[R], int chunk) {
#pragma unroll
    for (int j = 0; j < U; ++j) {
      const int u = chunk * 32 * U + lane + 32 * j;
      if (u < nb) {
#pragma unroll
        for (int r = 0; r < R; ++r) buf[r][j] = Pk<T>::load(rows[r], u, nb);
      }
    }
  };

  int64_t item = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  int chunk = 0;
  Unit cur[R][U], nxt[R][U];
  const uint8_t* rows[R] = {};
  // The first chunk does not depend on the previous kernel: on its way before the wait. (Two chunks before
  // the wait measured slower end to end for Q4_0/Q4_K_M and equal for Q8_0: the second delays the kernel
  // before, whose tail it competes with; docs/BENCHMARKS.md, Decisions in the source.)
  if (item < n_items) {
    rows_of(item, rows);
    load(cur, rows, 0);
  }
  pdl_wait();  // x is the previous kernel's output
  // The all-reduce blocks' call counters: its previous call (which advanced them) ended before our wait.
  __shared__ uint32_t s_epoch[32];
  if (push.world > 0 && static_cast<int>(threadIdx.x) < push.blocks)
    s_epoch[threadIdx.x] = *reinterpret_cast<const volatile uint32_t*>(push.epochs + threadIdx.x);
  if constexpr (kPre) {
    // One round of 16-byte copies (at most 8 per thread for 16384 columns, more rounds beyond).
    const int n16 = static_cast<int>(quant_x_words(n_cols) / 4);
    const int4* src = reinterpret_cast<const int4*>(xpre);
    for (int base = 0; base < n16; base += 8 * kThreads) {
      int4 v[8];
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const int i = base + k * kThreads + static_cast<int>(threadIdx.x);
        if (i < n16) v[k] = __ldg(src + i);
      }
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const int i = base + k * kThreads + static_cast<int>(threadIdx.x);
        if (i < n16) smem[i] = v[k];
      }
    }
  } else {
    quantize_x(x, n_cols, x_aligned, reinterpret_cast<int*>(smem), threadIdx.x);
  }
  __syncthreads();

  const int4* xq4 = reinterpret_cast<const int4*>(xq);
  float acc[R] = {};
  while (item < n_items) {
    int64_t next_item = item;
    int next_chunk = chunk + 1;
    if (next_chunk == n_chunks) {
      next_chunk = 0;
      next_item = item + step;
    }
    const uint8_t* next_rows[R];
#pragma unroll
    for (int r = 0; r < R; ++r) next_rows[r] = rows[r];
    if (next_item != item && next_item < n_items) rows_of(next_item, next_rows);
    if (next_item < n_items) load(nxt, next_rows, next_chunk);
#pragma unroll
    for (int j = 0; j < U; ++j) {
      const int u = chunk * 32 * U + lane + 32 * j;
      if (u < nb) {
        const int4 lo = xq4[2 * u], hi = xq4[2 * u + 1];
        const int xw[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
        const float d = xd[u], s = xs[u];
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r] += Pk<T>::dot(cur[r][j], u, xw, d, s);
      }
    }
    if (next_chunk == 0) {
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r] = warp_sum(acc[r]);
      if (lane == 0) {
        const MvSeg sg = mv_seg(grp, item);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const int64_t row = R * sg.local + r;
          if (row >= sg.n_rows) continue;
          sg.y[row] = acc[r];
          if (push.world > 0) {
            const uint32_t epoch = s_epoch[push_owner(push, row)];
            const size_t off = push_offset(push, epoch, row);
            for (int p = 0; p < push.world; ++p)
              if (p != push.rank)
                asm volatile("st.volatile.global.v2.u32 [%0], {%1, %2};" ::"l"(push.areas[p] + off),
                             "r"(__float_as_uint(acc[r])), "r"(push_tag(epoch))
                             : "memory");
          }
        }
      }
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r] = 0.0f;
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int j = 0; j < U; ++j) cur[r][j] = nxt[r][j];
      rows[r] = next_rows[r];
    }
    item = next_item;
    chunk = next_chunk;
  }
}

// ---- steps of several tokens (2 .. a few dozen): each weight unit read once per pass of up to NT tokens ----
// Why: a step that decodes several sequences ran one matvec per token, reading every weight once per
// sequence (8 sequences on an H100 decoded 363 tokens/s in all, below one sequence's 436; docs/BENCHMARKS.md).
// Here a warp loads R rows' units once and multiplies them with each token's int8 row, all of the pass's rows
// held in shared memory. Every (row, token) product is the decode kernel's: the same Pk<T>::dot per unit,
// the units of a lane summed in the same order (u = lane, lane + 32, ...), the lanes by warp_sum, from the
// same int8 rows (quantize_store4): a token's outputs have the same bits alone or in a step of many
// (tested), so batching never changes a sequence's tokens on this path.
// x rows arrive quantized in global memory (quantize_rows_kernel, once per matmul or group), each padded to
// a multiple of 4 words so that a block copies them with 16-byte loads.
__host__ __device__ constexpr int64_t quant_x_ld(int64_t n_cols) { return (quant_x_words(n_cols) + 3) / 4 * 4; }

__global__ void quantize_rows_kernel(const float* __restrict__ x,  // (n_tok, n_cols)
                                     int64_t n_cols, int64_t n_tok,
                                     int* __restrict__ out) {        // (n_tok, quant_x_ld(n_cols)) words
  pdl_trigger();
  pdl_wait();
  const int64_t nb = n_cols / 32, per_tok = (nb + 3) / 4;  // a warp quantizes 4 units (lanes 8g..8g+7: one)
  const int64_t gw = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (gw >= n_tok * per_tok) return;  // uniform per warp
  const int lane = threadIdx.x % 32;
  const int64_t t = gw / per_tok, u = (gw % per_tok) * 4 + lane / 8;
  const bool valid = u < nb;
  const int64_t e4 = u * 8 + lane % 8;
  const float* xr = x + t * n_cols;
  const float4 v = valid ? make_float4(xr[4 * e4], xr[4 * e4 + 1], xr[4 * e4 + 2], xr[4 * e4 + 3])
                         : make_float4(0.f, 0.f, 0.f, 0.f);
  quantize_store4(v, e4, valid, out + t * quant_x_ld(n_cols), n_cols);
}

template <GgmlType T, int R, int NT>
__global__ void __launch_bounds__(kThreads) matvec_tokens_kernel(
    const __grid_constant__ MvGroup grp,  // packed weights (n_rows, stride bytes) each; y: (n_tok, n_rows) each
    int64_t n_cols,                       // columns of every weight
    int64_t n_items,                      // groups of R rows of one weight, over all segments
    const int* __restrict__ xq,           // (n_tok, quant_x_ld(n_cols)) x's rows as int8 (quant_x.cuh)
    int n_tok) {                          // tokens of this pass, 1..NT
  // Shared memory, per token: lo (nb int4: words 0..3 of each unit), hi (nb int4: words 4..7), d (nb
  // floats), s (nb floats), the row padded to quant_x_ld words. Units split into two planes so that the 32
  // lanes' 16-byte reads of 32 consecutive units are consecutive (4 wavefronts, not 8 with 32-byte strides).
  extern __shared__ int4 smem[];
  pdl_trigger();
  const int nb = static_cast<int>(n_cols / 32);
  const int ld = static_cast<int>(quant_x_ld(n_cols));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  using Unit = typename Pk<T>::U;
  pdl_wait();  // x is the previous kernel's output
  {
    // int4 i of a global row: i < 2 nb are unit i / 2's half i % 2; the rest (d, s, padding) keep their place.
    const int per = ld / 4, n16 = n_tok * per;
    const int4* src = reinterpret_cast<const int4*>(xq);
    for (int i = threadIdx.x; i < n16; i += kThreads) {
      const int t = i / per, j = i % per;
      const int dst = j < 2 * nb ? (j % 2) * nb + j / 2 : j;
      smem[t * per + dst] = __ldg(src + i);
    }
  }
  __syncthreads();
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * kWarps + warp; item < n_items;
       item += static_cast<int64_t>(gridDim.x) * kWarps) {
    const MvSeg sg = mv_seg(grp, item);
    const uint8_t* rows[R];
#pragma unroll
    for (int r = 0; r < R; ++r) rows[r] = sg.w + min(R * sg.local + r, sg.n_rows - 1) * sg.stride;
    float acc[R][NT];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int t = 0; t < NT; ++t) acc[r][t] = 0.0f;
    for (int u = lane; u < nb; u += 32) {
      Unit a[R];
#pragma unroll
      for (int r = 0; r < R; ++r) a[r] = Pk<T>::load(rows[r], u, nb);
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        if (t >= n_tok) break;
        const int4* xt = smem + t * (ld / 4);
        const int4 lo = xt[u], hi = xt[nb + u];
        const int xw[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
        const float* xd = reinterpret_cast<const float*>(xt + 2 * nb);
        const float d = xd[u], s = xd[nb + u];
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r][t] += Pk<T>::dot(a[r], u, xw, d, s);
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int t = 0; t < NT; ++t) acc[r][t] = warp_sum(acc[r][t]);
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int64_t row = R * sg.local + r;
        if (row >= sg.n_rows) continue;
#pragma unroll
        for (int t = 0; t < NT; ++t)
          if (t < n_tok) sg.y[t * sg.n_rows + row] = acc[r][t];
      }
    }
  }
}

// ---- prefill: packed rows -> fp16/bf16 (one thread per 8 elements: one 16-byte store) ----
// Elements 8k..8k+7 of unit u of a row: packed_load8 reads the bytes they need (so that a kernel can hold the
// next tile's bytes in registers while it computes), packed_values8 turns them into floats.
template <GgmlType T>
struct Packed8 {
  uint2 q;              // the 8 elements' 8 (Q8_0) or 4-bit-pair bytes
  uint4 hdr;            // Q4_K: the unit's 16-byte super-block header; Q6_K: x,y = high bits, z = scale, w = d
  uint32_t d;           // Q8_0, Q4_0: the unit's fp16 scale
};

template <GgmlType T>
__device__ __forceinline__ Packed8<T> packed_load8(const uint8_t* row, int64_t nb, int64_t u, int k) {
  Packed8<T> p{};
  if constexpr (T == GgmlType::Q8_0) {
    p.q = *reinterpret_cast<const uint2*>(row + 32 * u + 8 * k);
    p.d = ld_u16(row + 32 * nb + 2 * u);
  } else {
    // 4-bit units (Q4_0, Q4_K, Q6_K's low bits): elements 8k..8k+7 are the low (k < 2) or high nibbles of
    // bytes 8 * (k & 1)...
    p.q = *reinterpret_cast<const uint2*>(row + 16 * u + 8 * (k & 1));
    if constexpr (T == GgmlType::Q4_0) {
      p.d = ld_u16(row + 16 * nb + 2 * u);
    } else if constexpr (T == GgmlType::Q4_K) {
      p.hdr = *reinterpret_cast<const uint4*>(row + 16 * nb + 16 * (u / 8));
    } else {  // Q6_K
      const uint2 hi = *reinterpret_cast<const uint2*>(row + 16 * nb + 8 * u);
      p.hdr = make_uint4(hi.x, hi.y, static_cast<uint32_t>(row[24 * nb + 2 * u + k / 2]),
                         ld_u16(row + 26 * nb + 2 * (u / 8)));
    }
  }
  return p;
}

template <GgmlType T>
__device__ __forceinline__ void packed_values8(const Packed8<T>& p, int64_t u, int k, float (&v)[8]) {
  const uint2 q = p.q;
  if constexpr (T == GgmlType::Q8_0) {
    const float d = h2f(static_cast<uint16_t>(p.d));
#pragma unroll
    for (int i = 0; i < 8; ++i)
      v[i] = static_cast<float>(static_cast<int8_t>(((i < 4 ? q.x : q.y) >> (8 * (i & 3))) & 0xFF)) * d;
  } else {
    const int sh = 4 * (k >> 1);
    int nib[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) nib[i] = static_cast<int>((((i < 4 ? q.x : q.y) >> (8 * (i & 3))) >> sh) & 0xF);
    if constexpr (T == GgmlType::Q4_0) {
      const float d = h2f(static_cast<uint16_t>(p.d));
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = static_cast<float>(nib[i] - 8) * d;
    } else if constexpr (T == GgmlType::Q4_K) {
      uint32_t sc, m;
      q4k_sc_m(p.hdr, static_cast<int>(u & 7), sc, m);
      const float d1 = h2f(p.hdr.x & 0xFFFFu) * static_cast<float>(sc);
      const float m1 = h2f(p.hdr.x >> 16) * static_cast<float>(m);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = d1 * static_cast<float>(nib[i]) - m1;
    } else {  // Q6_K
      const float dsc = h2f(static_cast<uint16_t>(p.hdr.w)) * static_cast<float>(static_cast<int8_t>(p.hdr.z & 0xFF));
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int e = 8 * k + i, w = e / 4, byte = e % 4;
        const int h = static_cast<int>((((w < 4) ? p.hdr.x : p.hdr.y) >> (8 * byte + 2 * (w & 3))) & 3);
        v[i] = dsc * static_cast<float>((nib[i] | (h << 4)) - 32);
      }
    }
  }
}

template <GgmlType T>
__device__ __forceinline__ void packed_dequant8(const uint8_t* row, int64_t nb, int64_t u, int k, float (&v)[8]) {
  packed_values8<T>(packed_load8<T>(row, nb, u, k), u, k, v);
}

// The 8 values as fp16 (4 half2 words), each the fp32 value of packed_values8 rounded to nearest. Q4_0 in half2
// arithmetic: 0x6400 | nibble is the half 1024 + nibble, minus 1032 gives nibble - 8 exactly, and one multiply
// by the fp16 scale rounds the exact product once, as the fp32 product (exact: 4 x 11 bits) rounded to fp16
// does: the same bits in 4 instructions per pair instead of ~10.
template <GgmlType T>
__device__ __forceinline__ uint4 packed_half8(const Packed8<T>& p, int64_t u, int k) {
  uint32_t o[4];
  if constexpr (T == GgmlType::Q4_0) {
    const __half2 d2 = __half2half2(__ushort_as_half(static_cast<unsigned short>(p.d)));
    const __half2 bias = __float2half2_rn(1032.0f);
    const int sh = 4 * (k >> 1);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t w = (((j < 2) ? p.q.x : p.q.y) >> sh) & 0x0F0F0F0Fu;
      // bytes 2 (j & 1) and 2 (j & 1) + 1 of w into the low bytes of the two halves, 0x64 into the high bytes
      const uint32_t pair = __byte_perm(w, 0x64u, (j & 1) ? 0x4342u : 0x4140u);  // 0x64 above each
      const __half2 h = __hmul2(__hsub2(*reinterpret_cast<const __half2*>(&pair), bias), d2);
      o[j] = *reinterpret_cast<const uint32_t*>(&h);
    }
  } else {
    float v[8];
    packed_values8<T>(p, u, k, v);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const __half2 h = __floats2half2_rn(v[2 * j], v[2 * j + 1]);
      o[j] = *reinterpret_cast<const uint32_t*>(&h);
    }
  }
  return make_uint4(o[0], o[1], o[2], o[3]);
}

// ---- steps of many tokens: packed weights dequantized into fp16 tiles in shared memory, tensor-core products --
// Why: above a few dozen tokens the several-token kernel is bound by its integer products, and the cuBLAS path
// writes every weight out as 16 bits and reads it back (8B Q4_0, 64 sequences decoding: ~4.5 bytes moved per
// weight instead of 0.56). Here a block turns kMmaUnits 32-column units of kMmaRows rows into fp16 in shared
// memory (packed_half8: the values of the cuBLAS path's dequantization), with kMmaTok tokens' fp16 x beside them,
// and 8 warps multiply them with mma.m16n8k16 (fp16 in, fp32 accumulation), each warp 16 rows x kMmaTok tokens;
// the next stage's bytes are loaded into registers while the tensor cores work. 128 rows a block: x's tile is
// read from L2 once per 128 rows (about 1 byte per weight at 64 tokens, against Q4_0's 0.56 bytes of weights; 64
// rows would double it). The columns are split over grid.z slices so that small row counts still fill the GPU;
// each slice writes its partial sums and matmul_mma_sum_kernel adds them in slice order (no atomics: the
// same bits every run).
constexpr int kMmaThreads = 256, kMmaRows = 128, kMmaTok = 64, kMmaUnits = 2, kMmaK = 32 * kMmaUnits, kMmaPad = 8;
// Launch bounds: two blocks an SM (128 registers a thread); Q6_K's prefetched bytes need more than that without
// spilling, so it asks for one.

__device__ __forceinline__ void mma_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

template <GgmlType T>
__global__ void __launch_bounds__(kMmaThreads, T == GgmlType::Q6_K ? 1 : 2) matmul_mma_kernel(
    const uint8_t* __restrict__ w,    // packed (n_rows, stride bytes)
    size_t stride, int64_t n_rows, int64_t n_cols,
    const __half* __restrict__ x16,   // (n_tok, n_cols) x in fp16
    int64_t n_tok,
    int64_t units_per_slice,          // 32-column units of each grid.z slice (a multiple of kMmaUnits)
    float* __restrict__ y) {          // (gridDim.z, n_tok, n_rows): slice z's partial sums
  __shared__ __align__(16) __half ws[kMmaRows][kMmaK + kMmaPad];  // (rows, columns) of the stage
  __shared__ __align__(16) __half xs[kMmaTok][kMmaK + kMmaPad];   // (tokens, columns) of the stage
  pdl_trigger();
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kMmaRows, tk0 = static_cast<int64_t>(blockIdx.y) * kMmaTok;
  const int64_t nb = n_cols / 32;
  const int64_t u_begin = static_cast<int64_t>(blockIdx.z) * units_per_slice;
  const int64_t u_end = min(nb, u_begin + units_per_slice);
  float acc[kMmaTok / 8][4];
#pragma unroll
  for (int n = 0; n < kMmaTok / 8; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[n][i] = 0.0f;
  // A stage's weight pieces (8 columns of a row) and x pieces (8 columns of a token) of each thread, held in
  // registers from their load until the stage before has been multiplied: the loads of stage s + 1 are in flight
  // while the tensor cores work on stage s.
  constexpr int kWp = kMmaRows * kMmaUnits * 4 / kMmaThreads, kXp = kMmaTok * kMmaK / 8 / kMmaThreads;
  Packed8<T> wr[kWp];
  uint4 xr[kXp];
  const auto load = [&](int64_t u0) {
#pragma unroll
    for (int i = 0; i < kWp; ++i) {
      const int p = tid + kMmaThreads * i, row = p / (4 * kMmaUnits), piece = p % (4 * kMmaUnits);
      const int64_t u = u0 + piece / 4;
      if (r0 + row < n_rows && u < u_end) wr[i] = packed_load8<T>(w + (r0 + row) * stride, nb, u, piece % 4);
    }
#pragma unroll
    for (int i = 0; i < kXp; ++i) {
      const int p = tid + kMmaThreads * i, tok = p / (kMmaK / 8), piece = p % (kMmaK / 8);
      const int64_t col = u0 * 32 + 8 * piece;
      xr[i] = make_uint4(0u, 0u, 0u, 0u);
      if (tk0 + tok < n_tok && col < u_end * 32) xr[i] = *reinterpret_cast<const uint4*>(x16 + (tk0 + tok) * n_cols + col);
    }
  };
  // Registers -> shared memory: weights dequantized (packed_values8, the cuBLAS path's values) and rounded to
  // fp16; pieces outside the matrix are zeros.
  const auto store = [&](int64_t u0) {
#pragma unroll
    for (int i = 0; i < kWp; ++i) {
      const int p = tid + kMmaThreads * i, row = p / (4 * kMmaUnits), piece = p % (4 * kMmaUnits);
      const int64_t u = u0 + piece / 4;
      const uint4 h = r0 + row < n_rows && u < u_end ? packed_half8<T>(wr[i], u, piece % 4) : make_uint4(0u, 0u, 0u, 0u);
      *reinterpret_cast<uint4*>(&ws[row][8 * piece]) = h;
    }
#pragma unroll
    for (int i = 0; i < kXp; ++i) {
      const int p = tid + kMmaThreads * i, tok = p / (kMmaK / 8), piece = p % (kMmaK / 8);
      *reinterpret_cast<uint4*>(&xs[tok][8 * piece]) = xr[i];
    }
  };
  pdl_wait();  // x16 is the previous kernel's output
  if (u_begin < u_end) load(u_begin);
  for (int64_t u0 = u_begin; u0 < u_end; u0 += kMmaUnits) {
    store(u0);
    __syncthreads();
    if (u0 + kMmaUnits < u_end) load(u0 + kMmaUnits);
#pragma unroll
    for (int ks = 0; ks < kMmaK / 16; ++ks) {
      const int c = ks * 16 + 2 * t4, ra = warp * 16 + g;
      const uint32_t a0 = *reinterpret_cast<const uint32_t*>(&ws[ra][c]);
      const uint32_t a1 = *reinterpret_cast<const uint32_t*>(&ws[ra + 8][c]);
      const uint32_t a2 = *reinterpret_cast<const uint32_t*>(&ws[ra][c + 8]);
      const uint32_t a3 = *reinterpret_cast<const uint32_t*>(&ws[ra + 8][c + 8]);
#pragma unroll
      for (int n = 0; n < kMmaTok / 8; ++n) {
        const uint32_t b0 = *reinterpret_cast<const uint32_t*>(&xs[n * 8 + g][c]);
        const uint32_t b1 = *reinterpret_cast<const uint32_t*>(&xs[n * 8 + g][c + 8]);
        mma_16816(acc[n], a0, a1, a2, a3, b0, b1);
      }
    }
    __syncthreads();
  }
  // Accumulator (row g or g + 8 of the warp's 16, tokens 2 t4 and 2 t4 + 1 of the n-tile).
  float* ys = y + static_cast<int64_t>(blockIdx.z) * n_tok * n_rows;
#pragma unroll
  for (int n = 0; n < kMmaTok / 8; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t row = r0 + warp * 16 + g + (i >= 2 ? 8 : 0), tok = tk0 + n * 8 + 2 * t4 + (i & 1);
      if (row < n_rows && tok < n_tok) ys[tok * n_rows + row] = acc[n][i];
    }
}

// y = the sum of the n_slices partials, in slice order.
__global__ void matmul_mma_sum_kernel(const float* __restrict__ part /* (n_slices, n) */, int n_slices, int64_t n,
                                      float* __restrict__ y /* (n) */) {
  pdl_trigger();
  pdl_wait();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float s = part[i];
  for (int z = 1; z < n_slices; ++z) s += part[z * n + i];
  y[i] = s;
}

template <GgmlType T, bool kBf16>
__global__ void dequant_packed_kernel(const uint8_t* __restrict__ w,  // packed (rows, stride bytes)
                                      size_t stride, int64_t row0, int64_t n_rows, int64_t n_cols,
                                      uint4* __restrict__ dst) {      // (n_rows, n_cols) 16-bit, 8 per uint4
  const int64_t nb = n_cols / 32;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n_rows * nb * 4) return;
  const int k = static_cast<int>(idx & 3);
  const int64_t u = (idx >> 2) % nb, r = (idx >> 2) / nb;
  if constexpr (!kBf16) {
    // fp16: the values the tensor-core kernel puts in its tiles (packed_half8)
    dst[idx] = packed_half8<T>(packed_load8<T>(w + (row0 + r) * stride, nb, u, k), u, k);
  } else {
    float v[8];
    packed_dequant8<T>(w + (row0 + r) * stride, nb, u, k, v);
    uint32_t o[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const __nv_bfloat162 p = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
      o[i] = *reinterpret_cast<const uint32_t*>(&p);
    }
    dst[idx] = make_uint4(o[0], o[1], o[2], o[3]);
  }
}

template <GgmlType T, int R, int U>
void launch_kernel(const MvGroup& g, int64_t n_cols, int64_t n_items, const float* x, int sm_count, cudaStream_t s) {
  const size_t smem = static_cast<size_t>(n_cols) + 8 * static_cast<size_t>(n_cols / 32);
  if (smem > 48 * 1024)
    SHARDLM_CUDA_CHECK(cudaFuncSetAttribute(matvec_packed_kernel<T, R, U>,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  // kMinBlocks blocks per SM fit by construction (launch bounds, <= 80 KB of shared memory each); more
  // blocks than that would only re-quantize x.
  const int64_t want = (n_items + kWarps - 1) / kWarps;
  const int blocks =
      static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, int64_t{kMinBlocks<R, U>} * sm_count)));
  const bool aligned = aligned16(x);
  launch_pdl(matvec_packed_kernel<T, R, U>, dim3(blocks), dim3(kThreads), smem, s, g, n_cols, n_items, x, aligned);
}

template <GgmlType T, int R, int U, int B>
void launch_pipe(MvGroup& g, const int64_t* n_rows, int n, int64_t n_cols, const float* x, int sm, cudaStream_t s,
                 const int* xpre, const DevicePush* push) {
  int64_t items = 0;
  for (int k = 0; k < n; ++k) {
    g.first[k] = items;
    items += (n_rows[k] + R - 1) / R;
  }
  const int64_t want = (items + kWarps - 1) / kWarps;
  const int blocks =
      static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, int64_t{B} * sm)));
  const bool aligned = aligned16(x);
  // Both forms hold x as int8 in shared memory.
  const size_t smem = static_cast<size_t>(n_cols) + 8 * static_cast<size_t>(n_cols / 32);
  const auto launch = [&](auto kernel) {
    if (smem > 48 * 1024)
      SHARDLM_CUDA_CHECK(
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    launch_pdl(kernel, dim3(blocks), dim3(kThreads), smem, s, g, n_cols, items, x, aligned, xpre,
               push ? *push : DevicePush{});
  };
  if (push && (n != 1 || push->world < 2 || push->world > DevicePush::kMaxRanks || push->blocks > 32 ||
               push->block_floats < 4 || push->block_floats % 4 != 0))
    fail_kind(ErrorKind::kInternal, "launch_matvec_packed: a push target for ", n, " weights, world ", push->world);
  if (!xpre) return launch(matvec_pipe_kernel<T, R, U, B, false>);
  if (!aligned16(xpre))
    fail_kind(ErrorKind::kInternal, "launch_matvec_packed: the quantized x must be 16-byte aligned");
  launch(matvec_pipe_kernel<T, R, U, B, true>);
}

// Variant 0 (default): the pipelined kernel, one row per warp. 1: the two-rows register kernel without
// pipelining. 2: pipelined with two rows per warp for Q4_0 (x loads shared by two rows; measured no faster
// than 0; the other types' units would spill). Kept to be measured against (shardlm_cuda_bench with
// SHARDLM_PK_VARIANT; docs/BENCHMARKS.md, Decisions in the source).
template <GgmlType T>
void launch_variant(int variant, MvGroup& g, const int64_t* n_rows, int n, int64_t n_cols, const float* x, int sm,
                    cudaStream_t s, const int* xpre, const DevicePush* push) {
  if constexpr (T == GgmlType::Q4_0) {
    if (variant == 2) return launch_pipe<T, 2, 4, 2>(g, n_rows, n, n_cols, x, sm, s, xpre, push);
  }
  // 3, 4: more resident warps per SM (3 or 4 blocks of 8), fewer registers. Measured no faster than 0 for
  // Q4_0 and slower for Q8_0 (docs/BENCHMARKS.md, Decisions in the source).
  if (variant == 3) return launch_pipe<T, 1, 4, 3>(g, n_rows, n, n_cols, x, sm, s, xpre, push);
  if (variant == 4) return launch_pipe<T, 1, 4, 4>(g, n_rows, n, n_cols, x, sm, s, xpre, push);
  // The register kernel of variant 1 has no push epilogue: a push needs the pipelined one.
  if (variant != 1 || push) return launch_pipe<T, 1, 4, 2>(g, n_rows, n, n_cols, x, sm, s, xpre, push);
  int64_t items = 0;
  for (int k = 0; k < n; ++k) {
    g.first[k] = items;
    items += (n_rows[k] + 1) / 2;
  }
  launch_kernel<T, 2, 4>(g, n_cols, items, x, sm, s);
}

template <GgmlType T, int NT>
void launch_tokens(MvGroup& g, const int64_t* n_rows, int n, int64_t n_cols, const int* xq, int n_tok, int sm,
                   cudaStream_t s) {
  // 4 rows a warp: each token's x unit, read from shared memory, serves 4 rows (2 rows a warp measured
  // 1,617-1,639 aggregate tokens/s for 8 sequences of 8B Q4_0 on an H200, x in one plane).
  constexpr int R = 4;
  int64_t items = 0;
  for (int k = 0; k < n; ++k) {
    g.first[k] = items;
    items += (n_rows[k] + R - 1) / R;
  }
  const size_t smem = static_cast<size_t>(n_tok) * static_cast<size_t>(quant_x_ld(n_cols)) * 4;
  auto kernel = matvec_tokens_kernel<T, R, NT>;
  if (smem > 48 * 1024)
    SHARDLM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  // As many blocks as fit an SM's shared memory (each copies the pass's x rows once), at most 4 per SM.
  const int per_sm = static_cast<int>(std::clamp<size_t>(kTokensSmemPerSm / std::max<size_t>(smem, 1), 1, 4));
  const int64_t want = (items + kWarps - 1) / kWarps;
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, int64_t{per_sm} * sm)));
  launch_pdl(kernel, dim3(blocks), dim3(kThreads), smem, s, g, n_cols, items, xq, n_tok);
}

template <GgmlType T>
void launch_tokens_pass(MvGroup& g, const int64_t* n_rows, int n, int64_t n_cols, const int* xq, int n_tok, int sm,
                        cudaStream_t s) {
  if (n_tok <= 2) return launch_tokens<T, 2>(g, n_rows, n, n_cols, xq, n_tok, sm, s);
  if (n_tok <= 4) return launch_tokens<T, 4>(g, n_rows, n, n_cols, xq, n_tok, sm, s);
  return launch_tokens<T, 8>(g, n_rows, n, n_cols, xq, n_tok, sm, s);
}

// The group table of n packed weights (16-byte aligned rows) and their outputs.
MvGroup packed_group(int n, const void* const* w, const size_t* row_stride, const int64_t* n_rows, float* const* y,
                     const char* caller) {
  MvGroup g;
  g.n = n;
  for (int k = 0; k < n; ++k) {
    if (row_stride[k] % 16 != 0 || !aligned16(w[k]))
      fail_kind(ErrorKind::kInternal, caller, ": packed rows must be 16-byte aligned");
    g.w[k] = static_cast<const uint8_t*>(w[k]);
    g.stride[k] = row_stride[k];
    g.n_rows[k] = n_rows[k];
    g.y[k] = y[k];
  }
  return g;
}

}  // namespace

int matvec_tokens_per_pass(int64_t n_cols) {
  const size_t per_tok = static_cast<size_t>(quant_x_ld(n_cols)) * 4;
  const int fit = static_cast<int>(kTokensSmemMax / per_tok);
  return fit >= 8 ? 8 : fit >= 4 ? 4 : fit >= 2 ? 2 : 0;
}

size_t quant_rows_bytes(int64_t n_tok, int64_t n_cols) {
  return static_cast<size_t>(n_tok) * static_cast<size_t>(quant_x_ld(n_cols)) * 4;
}

void launch_quantize_rows(const float* x, int64_t n_tok, int64_t n_cols, int* out, cudaStream_t stream) {
  if (n_tok <= 0) return;
  if (n_cols % 32 != 0 || !aligned16(out))
    fail_kind(ErrorKind::kInternal, "launch_quantize_rows: ", n_cols, " columns (multiple of 32), aligned output");
  const int64_t warps = n_tok * ((n_cols / 32 + 3) / 4);
  const int threads = 256;
  const auto blocks = static_cast<unsigned>((warps * 32 + threads - 1) / threads);
  launch_pdl(quantize_rows_kernel, dim3(blocks), dim3(threads), 0, stream, x, n_cols, n_tok, out);
}

void launch_matvec_tokens(GgmlType type, int n, const void* const* w, const size_t* row_stride, const int64_t* n_rows,
                          int64_t n_cols, const int* xq, int64_t n_tok, float* const* y, int sm_count,
                          cudaStream_t stream) {
  const int per_pass = matvec_tokens_per_pass(n_cols);
  if (n < 1 || n > MvGroup::kMax || !packable(type, n_cols) || per_pass < 2 || !aligned16(xq))
    fail_kind(ErrorKind::kInternal, "launch_matvec_tokens: ", n, " weights of ", type_name(type), " x ", n_cols);
  MvGroup g = packed_group(n, w, row_stride, n_rows, y, "launch_matvec_tokens");
  const int64_t ld = quant_x_ld(n_cols);
  for (int64_t t0 = 0; t0 < n_tok; t0 += per_pass) {
    const int nt = static_cast<int>(std::min<int64_t>(per_pass, n_tok - t0));
    for (int k = 0; k < n; ++k) g.y[k] = y[k] + t0 * n_rows[k];
    const int* xp = xq + t0 * ld;
    switch (type) {
      case GgmlType::Q4_0: launch_tokens_pass<GgmlType::Q4_0>(g, n_rows, n, n_cols, xp, nt, sm_count, stream); break;
      case GgmlType::Q8_0: launch_tokens_pass<GgmlType::Q8_0>(g, n_rows, n, n_cols, xp, nt, sm_count, stream); break;
      case GgmlType::Q4_K: launch_tokens_pass<GgmlType::Q4_K>(g, n_rows, n, n_cols, xp, nt, sm_count, stream); break;
      case GgmlType::Q6_K: launch_tokens_pass<GgmlType::Q6_K>(g, n_rows, n, n_cols, xp, nt, sm_count, stream); break;
      default: fail_kind(ErrorKind::kInternal, "launch_matvec_tokens: ", type_name(type));
    }
  }
}

void launch_matvec_packed(GgmlType type, int n, const void* const* w, const size_t* row_stride, const int64_t* n_rows,
                          int64_t n_cols, const float* x, float* const* y, int sm_count, cudaStream_t stream,
                          int variant, const int* xpre, const DevicePush* push) {
  if (n < 1 || n > MvGroup::kMax || !packable(type, n_cols))
    fail_kind(ErrorKind::kInternal, "launch_matvec_packed: ", n, " weights of ", type_name(type), " x ", n_cols);
  MvGroup g = packed_group(n, w, row_stride, n_rows, y, "launch_matvec_packed");
  switch (type) {
    case GgmlType::Q4_0: return launch_variant<GgmlType::Q4_0>(variant, g, n_rows, n, n_cols, x, sm_count, stream, xpre, push);
    case GgmlType::Q8_0: return launch_variant<GgmlType::Q8_0>(variant, g, n_rows, n, n_cols, x, sm_count, stream, xpre, push);
    case GgmlType::Q4_K: return launch_variant<GgmlType::Q4_K>(variant, g, n_rows, n, n_cols, x, sm_count, stream, xpre, push);
    case GgmlType::Q6_K: return launch_variant<GgmlType::Q6_K>(variant, g, n_rows, n, n_cols, x, sm_count, stream, xpre, push);
    default: fail_kind(ErrorKind::kInternal, "launch_matvec_packed: ", type_name(type));
  }
}

// Column slices of a launch: about kMmaBlocksPerSm blocks per SM in all (each block has one stage of loads in
// flight, so more blocks hide more latency; each slice's partial sums cost a write and a read of n_tok x
// n_rows floats), each slice at least 4 stages of columns.
constexpr int kMmaBlocksPerSm = 2;
static int64_t mma_slices(int64_t n_rows, int64_t n_cols, int64_t n_tok, int sm_count) {
  const int64_t tiles = ((n_rows + kMmaRows - 1) / kMmaRows) * ((n_tok + kMmaTok - 1) / kMmaTok);
  const int64_t stages = (n_cols / 32 + kMmaUnits - 1) / kMmaUnits;
  return std::clamp<int64_t>((int64_t{kMmaBlocksPerSm} * sm_count + tiles - 1) / tiles, 1,
                             std::max<int64_t>(1, stages / 4));
}

size_t matmul_mma_scratch_floats(int64_t n_rows, int64_t n_cols, int64_t n_tok, int sm_count) {
  const int64_t slices = mma_slices(n_rows, n_cols, n_tok, sm_count);
  return slices > 1 ? static_cast<size_t>(slices * n_tok * n_rows) : 0;
}

void launch_matmul_mma(GgmlType type, const void* w, size_t row_stride, int64_t n_rows, int64_t n_cols,
                       const void* x16, int64_t n_tok, float* y, float* scratch, int sm_count, cudaStream_t stream) {
  if (!packable(type, n_cols) || n_rows <= 0 || n_tok <= 0 || n_cols % 8 != 0 || !aligned16(x16))
    fail_kind(ErrorKind::kInternal, "launch_matmul_mma: ", type_name(type), " ", n_rows, " x ", n_cols);
  const int64_t tiles_r = (n_rows + kMmaRows - 1) / kMmaRows, tiles_t = (n_tok + kMmaTok - 1) / kMmaTok;
  const int64_t stages = (n_cols / 32 + kMmaUnits - 1) / kMmaUnits;
  const int64_t slices = mma_slices(n_rows, n_cols, n_tok, sm_count);
  const int64_t per_slice = (stages + slices - 1) / slices * kMmaUnits;
  const int64_t used = (n_cols / 32 + per_slice - 1) / per_slice;  // slices that have columns
  if (tiles_r > INT32_MAX || tiles_t > 65535)
    fail_kind(ErrorKind::kInternal, "launch_matmul_mma: ", n_rows, " rows, ", n_tok, " tokens");
  float* out = used > 1 ? scratch : y;
  const dim3 grid(static_cast<unsigned>(tiles_r), static_cast<unsigned>(tiles_t), static_cast<unsigned>(used));
  const auto* wp = static_cast<const uint8_t*>(w);
  const auto* xp = static_cast<const __half*>(x16);
  switch (type) {
    case GgmlType::Q4_0: launch_pdl(matmul_mma_kernel<GgmlType::Q4_0>, grid, dim3(kMmaThreads), 0, stream, wp, row_stride, n_rows, n_cols, xp, n_tok, per_slice, out); break;
    case GgmlType::Q8_0: launch_pdl(matmul_mma_kernel<GgmlType::Q8_0>, grid, dim3(kMmaThreads), 0, stream, wp, row_stride, n_rows, n_cols, xp, n_tok, per_slice, out); break;
    case GgmlType::Q4_K: launch_pdl(matmul_mma_kernel<GgmlType::Q4_K>, grid, dim3(kMmaThreads), 0, stream, wp, row_stride, n_rows, n_cols, xp, n_tok, per_slice, out); break;
    case GgmlType::Q6_K: launch_pdl(matmul_mma_kernel<GgmlType::Q6_K>, grid, dim3(kMmaThreads), 0, stream, wp, row_stride, n_rows, n_cols, xp, n_tok, per_slice, out); break;
    default: fail_kind(ErrorKind::kInternal, "launch_matmul_mma: ", type_name(type));
  }
  if (used > 1) {
    const int64_t n = n_tok * n_rows;
    launch_pdl(matmul_mma_sum_kernel, dim3(static_cast<unsigned>((n + 255) / 256)), dim3(256), 0, stream, scratch,
               static_cast<int>(used), n, y);
  }
}

void launch_dequant_packed(GgmlType type, const void* w, size_t row_stride, int64_t row0, int64_t n_rows,
                           int64_t n_cols, void* dst, bool to_bf16, cudaStream_t stream) {
  if (!packable(type, n_cols) || n_rows <= 0) return;
  const int64_t n = n_rows * (n_cols / 32) * 4;
  const int threads = 256;
  const auto blocks = static_cast<unsigned>((n + threads - 1) / threads);
  const auto* wp = static_cast<const uint8_t*>(w);
  auto* d = static_cast<uint4*>(dst);
#define SHARDLM_DQ(T)                                                                                  \
  (to_bf16 ? dequant_packed_kernel<T, true><<<blocks, threads, 0, stream>>>(wp, row_stride, row0, n_rows, n_cols, d) \
           : dequant_packed_kernel<T, false><<<blocks, threads, 0, stream>>>(wp, row_stride, row0, n_rows, n_cols, d))
  switch (type) {
    case GgmlType::Q4_0: SHARDLM_DQ(GgmlType::Q4_0); break;
    case GgmlType::Q8_0: SHARDLM_DQ(GgmlType::Q8_0); break;
    case GgmlType::Q4_K: SHARDLM_DQ(GgmlType::Q4_K); break;
    case GgmlType::Q6_K: SHARDLM_DQ(GgmlType::Q6_K); break;
    default: fail_kind(ErrorKind::kInternal, "launch_dequant_packed: ", type_name(type));
  }
#undef SHARDLM_DQ
  SHARDLM_CUDA_CHECK(cudaGetLastError());
}

}  // namespace shardlm::cuda_detail
