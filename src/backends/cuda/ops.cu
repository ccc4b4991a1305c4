// Every op of the CUDA backend except the matrix-vector products (matvec.cu).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cfloat>
#include <cmath>

#include "backends/cuda/cuda_util.cuh"
#include "backends/cuda/dequant.cuh"
#include "backends/cuda/kernels.cuh"
#include "backends/cuda/pdl.cuh"
#include "backends/cuda/quant_x.cuh"
#include "backends/cuda/warp.cuh"

namespace shardlm::cuda_detail {
namespace {


unsigned grid_for(int64_t n, int threads, int64_t cap = 65535LL * 16) {
  return static_cast<unsigned>(std::clamp<int64_t>((n + threads - 1) / threads, 1, cap));
}

// ---- element-wise -----------------------------------------------------------------------------------
// One block per token row. Rows up to kNormVec * 4 * blockDim floats stay in registers (one read of x);
// longer rows are read twice. kAdd: x += delta first (written back), the residual add fused into the norm
// with the same float operations as add_kernel followed by the norm.
// The weight row is loaded before the PDL wait (it is a weight: no kernel writes it), so its DRAM latency
// overlaps the previous kernel; blocks are as small as the row allows (norm_threads) so that one fits on
// an SM beside the persistent matvec blocks and can start early. (A 1024-thread block that loaded w after
// the wait made the norms a tenth of a Q4_0 token; docs/BENCHMARKS.md, Decisions in the source.)
constexpr int kNormThreads = 512, kNormVec = 8;
// 16 elements per thread where the row allows (a 4096 row: 256 threads), up to kNormVec * 4.
int norm_threads(int64_t n) {
  return static_cast<int>(std::clamp<int64_t>((n + 16 * 32 - 1) / (16 * 32) * 32, 128, kNormThreads));
}
template <bool kAdd>
__global__ void __launch_bounds__(kNormThreads) rms_norm_kernel(float* __restrict__ x /* (n_tok, n); read-only unless kAdd */,
                                                               const float* __restrict__ delta /* (n_tok, n) or null */,
                                                               const float* __restrict__ w /* (n) */,
                                                               float* __restrict__ y /* (n_tok, n) */, int64_t n,
                                                               float eps,
                                                               int* __restrict__ xq /* (quant_x_words(n)) or null */) {
  pdl_trigger();
  float* xr = x + blockIdx.x * n;
  const float* dr = kAdd ? delta + blockIdx.x * n : nullptr;
  float* yr = y + blockIdx.x * n;
  const bool vec = (n % 4 == 0) && (n <= static_cast<int64_t>(kNormVec) * 4 * blockDim.x) &&
                   aligned16(xr) && aligned16(yr) && aligned16(w) && (!kAdd || aligned16(dr));
  float4 v[kNormVec], wv[kNormVec];
  if (vec) {
#pragma unroll
    for (int k = 0; k < kNormVec; ++k) {
      const int64_t i = (threadIdx.x + static_cast<int64_t>(k) * blockDim.x) * 4;
      wv[k] = i < n ? __ldg(reinterpret_cast<const float4*>(w + i)) : make_float4(0.f, 0.f, 0.f, 0.f);
    }
  }
  pdl_wait();
  float ss = 0.0f;
  if (vec) {
#pragma unroll
    for (int k = 0; k < kNormVec; ++k) {
      const int64_t i = (threadIdx.x + static_cast<int64_t>(k) * blockDim.x) * 4;
      v[k] = i < n ? *reinterpret_cast<const float4*>(xr + i) : make_float4(0.f, 0.f, 0.f, 0.f);
      if (kAdd && i < n) {
        const float4 a = *reinterpret_cast<const float4*>(dr + i);
        v[k] = make_float4(v[k].x + a.x, v[k].y + a.y, v[k].z + a.z, v[k].w + a.w);
        *reinterpret_cast<float4*>(xr + i) = v[k];
      }
      ss = fmaf(v[k].x, v[k].x, fmaf(v[k].y, v[k].y, fmaf(v[k].z, v[k].z, fmaf(v[k].w, v[k].w, ss))));
    }
  } else {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      float a = xr[i];
      if (kAdd) {
        a += dr[i];
        xr[i] = a;
      }
      ss = fmaf(a, a, ss);
    }
  }
  __shared__ float part[32];  // (warps)
  ss = warp_sum(ss);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = ss;
  __syncthreads();
  if (threadIdx.x < 32) {
    float t = (threadIdx.x < blockDim.x / 32) ? part[threadIdx.x] : 0.0f;
    t = warp_sum(t);
    if (threadIdx.x == 0) part[0] = t;
  }
  __syncthreads();
  const float scale = 1.0f / sqrtf(part[0] / static_cast<float>(n) + eps);
  if (vec) {
#pragma unroll
    for (int k = 0; k < kNormVec; ++k) {
      const int64_t e4 = threadIdx.x + static_cast<int64_t>(k) * blockDim.x, i = e4 * 4;
      float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
      if (i < n) {
        const float4 g = wv[k];
        o = make_float4(v[k].x * scale * g.x, v[k].y * scale * g.y, v[k].z * scale * g.z, v[k].w * scale * g.w);
        *reinterpret_cast<float4*>(yr + i) = o;
      }
      // The launcher passes xq only for one row with n % 32 == 0 (whole 8-lane groups in or out).
      if (xq) quantize_store4(o, e4, i < n, xq, n);
    }
  } else {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) yr[i] = xr[i] * scale * w[i];
  }
}

__global__ void add_bias_kernel(float* __restrict__ y /* (n_tok, n) */, const float* __restrict__ b /* (n) */,
                                int64_t total, int64_t n) {
  pdl_enter();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    y[i] += b[i % n];
}

__global__ void add_kernel(float* __restrict__ y /* (n) */, const float* __restrict__ x /* (n) */, int64_t n) {
  pdl_enter();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    y[i] += x[i];
}

__global__ void swiglu_kernel(const float* __restrict__ g /* (n) */, const float* __restrict__ u /* (n) */,
                              float* __restrict__ o /* (n) */, int64_t n) {
  pdl_enter();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float a = g[i];
    o[i] = a / (1.0f + expf(-a)) * u[i];
  }
}

// One row, n % 32 == 0, 16-byte aligned: the same products as swiglu_kernel, and the row quantized for the
// packed matvecs (quant_x.cuh).
__global__ void swiglu_quant_kernel(const float4* __restrict__ g /* (n/4) */, const float4* __restrict__ u /* (n/4) */,
                                    float4* __restrict__ o /* (n/4) */, int64_t n, int* __restrict__ xq) {
  pdl_enter();
  const int64_t e4 = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const bool valid = e4 < n / 4;
  float4 r = make_float4(0.f, 0.f, 0.f, 0.f);
  if (valid) {
    const float4 a = g[e4], b = u[e4];
    r = make_float4(a.x / (1.0f + expf(-a.x)) * b.x, a.y / (1.0f + expf(-a.y)) * b.y,
                    a.z / (1.0f + expf(-a.z)) * b.z, a.w / (1.0f + expf(-a.w)) * b.w);
    o[e4] = r;
  }
  quantize_store4(r, e4, valid, xq, n);
}

// Cosine and sine of pair i's angle at `pos`, theta_i = freq_base^(-2i/head_dim) / ff[i]. Formed in double: at
// positions ~1e5 a float angle would be off by ~1e-2 rad. rope_pair and the fused decode attention both use
// these two helpers, so their rotations agree bit for bit.
__device__ __forceinline__ void rope_cos_sin(int64_t i, int64_t pos, int64_t head_dim, float freq_base,
                                             const float* __restrict__ ff /* (head_dim/2) or null */, double& c,
                                             double& s) {
  double theta = pow(static_cast<double>(freq_base), -2.0 * static_cast<double>(i) / static_cast<double>(head_dim));
  if (ff) theta /= static_cast<double>(ff[i]);
  sincos(static_cast<double>(pos) * theta, &s, &c);
}
// (x0, x1) rotated by the angle whose cosine and sine are c and s.
__device__ __forceinline__ float2 rope_rotate(float x0, float x1, double c, double s) {
  return make_float2(static_cast<float>(x0 * c - x1 * s), static_cast<float>(x0 * s + x1 * c));
}

// Rotates pair i of one head of token t (p points at the pair).
__device__ __forceinline__ void rope_pair(float* p, int64_t i, int64_t pos, int64_t head_dim, float freq_base,
                                          const float* __restrict__ ff) {
  double c, s;
  rope_cos_sin(i, pos, head_dim, freq_base, ff, c, s);
  const float2 r = rope_rotate(p[0], p[1], c, s);
  p[0] = r.x;
  p[1] = r.y;
}

// One thread per rotated pair.
__global__ void rope_kernel(float* __restrict__ x /* (n_tok, n_heads, head_dim) */, int64_t n_tok, int64_t n_heads,
                            int64_t head_dim, float freq_base, const float* __restrict__ ff /* (head_dim/2) or null */,
                            const StepDev* __restrict__ step) {
  pdl_enter();
  const int64_t half = head_dim / 2;
  const int64_t total = n_tok * n_heads * half;
  const int64_t pos0 = step->pos0;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx % half;
    const int64_t t = idx / (half * n_heads);
    rope_pair(x + (idx / half) * head_dim + 2 * i, i, pos0 + t, head_dim, freq_base, ff);
  }
}

// ---- KV cache ----------------------------------------------------------------------------------------
template <typename KV>
__device__ __forceinline__ KV to_kv(float v);
template <>
__device__ __forceinline__ float to_kv<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half to_kv<__half>(float v) { return __float2half_rn(v); }

__device__ __forceinline__ float kv_f32(float v) { return v; }
__device__ __forceinline__ float kv_f32(__half v) { return __half2float(v); }
// 16 bytes of cache elements as floats.
__device__ __forceinline__ void kv_piece(const uint4& u, float (&o)[8]) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[k]));
    o[2 * k] = f.x;
    o[2 * k + 1] = f.y;
  }
}
__device__ __forceinline__ void kv_piece(const uint4& u, float (&o)[4]) {
  o[0] = __uint_as_float(u.x);
  o[1] = __uint_as_float(u.y);
  o[2] = __uint_as_float(u.z);
  o[3] = __uint_as_float(u.w);
}
// 8 consecutive cache elements (16-byte aligned) as floats.
__device__ __forceinline__ void load8(const __half* p, float (&o)[8]) {
  kv_piece(__ldg(reinterpret_cast<const uint4*>(p)), o);
}
__device__ __forceinline__ void load8(const float* p, float (&o)[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p)), b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w;
  o[4] = b.x; o[5] = b.y; o[6] = b.z; o[7] = b.w;
}

template <typename KV>
__global__ void kv_store_kernel(KV* __restrict__ kc /* (n_ctx, n_head_kv, head_dim) */,
                                KV* __restrict__ vc /* (n_ctx, n_head_kv, head_dim) */, int64_t n_ctx,
                                int64_t row /* n_head_kv * head_dim */, const float* __restrict__ k /* (n_tok, row) */,
                                const float* __restrict__ v /* (n_tok, row) */, int64_t n_tok,
                                const StepDev* __restrict__ step) {
  pdl_enter();
  const int64_t total = n_tok * row;
  const int64_t pos0 = step->pos0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / row;
    if (pos0 + t >= n_ctx || pos0 + t < 0) continue;  // the host checks; this only keeps a bad replay in bounds
    const int64_t dst = (pos0 + t) * row + (i % row);
    kc[dst] = to_kv<KV>(k[i]);
    vc[dst] = to_kv<KV>(v[i]);
  }
}

// rope(q), rope(k) and kv_store in one launch: threads [0, Pq) rotate the query pairs, threads [Pq, Pq + Pk)
// rotate a key pair (in place, as rope would) and store it and the matching value pair in the cache.
template <typename KV>
__global__ void rope_kv_store_kernel(float* __restrict__ q /* (n_tok, n_head, head_dim) */,
                                     float* __restrict__ k /* (n_tok, n_head_kv, head_dim) */,
                                     const float* __restrict__ v /* (n_tok, n_head_kv, head_dim) */,
                                     KV* __restrict__ kc /* (n_ctx, n_head_kv, head_dim) */,
                                     KV* __restrict__ vc /* (n_ctx, n_head_kv, head_dim) */, int64_t n_ctx,
                                     int64_t n_tok, int64_t n_head, int64_t n_head_kv, int64_t head_dim, float freq_base,
                                     const float* __restrict__ ff /* (head_dim/2) or null */,
                                     const StepDev* __restrict__ step) {
  pdl_enter();
  const int64_t half = head_dim / 2;
  const int64_t pq = n_tok * n_head * half, pk = n_tok * n_head_kv * half;
  const int64_t pos0 = step->pos0;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < pq + pk;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (idx < pq) {
      const int64_t i = idx % half, t = idx / (half * n_head);
      rope_pair(q + (idx / half) * head_dim + 2 * i, i, pos0 + t, head_dim, freq_base, ff);
      continue;
    }
    const int64_t j = idx - pq, i = j % half, t = j / (half * n_head_kv);
    const int64_t off = (j / half) * head_dim + 2 * i;  // in k / v: (t, head, 2i)
    rope_pair(k + off, i, pos0 + t, head_dim, freq_base, ff);
    if (pos0 + t >= n_ctx || pos0 + t < 0) continue;  // the host checks; this only keeps a bad replay in bounds
    const int64_t row = n_head_kv * head_dim;
    const int64_t dst = (pos0 + t) * row + (off - t * row);
    kc[dst] = to_kv<KV>(k[off]);
    kc[dst + 1] = to_kv<KV>(k[off + 1]);
    vc[dst] = to_kv<KV>(v[off]);
    vc[dst + 1] = to_kv<KV>(v[off + 1]);
  }
}

// ---- attention ----------------------------------------------------------------------------------------
// Decode, flash-decoding style. Block (kv head kh, split s) covers positions [s*chunk, min(len, (s+1)*chunk))
// for the G query heads that share kv head kh; chunk = attn_chunk(len, n_split), len = pos0 + 1. Blocks
// past len have nothing to do and leave at once; the combine kernel reads only the splits before them.
// Each warp takes 32-position tiles and requests all of a tile's key and value pieces before it uses the
// first: the cache rows of a layer have left L2 by the next token, and the earlier version's ~8 dependent
// rounds of loads per tile made attention + combine a sixth of a Q4_0 layer (docs/BENCHMARKS.md, Decisions
// in the source).
// Scores: lane = position (its key row in registers, q from shared memory). Values: a row is KP lanes
// (lane c holds elements cE..cE+E-1), PG rows at once; the PG partial sums meet by shuffles at the end.
// Fused form (rp.k_new set, rope_attention): the kernel also rotates q and the new key (rope_pair's double
// precision, the angles computed before the PDL wait) and the block whose range holds pos0 stores the new
// key and value rows, which only that block reads.
// Up to 128 positions (one tile per warp) one block per kv head covers the context: it writes the output
// itself and the combine kernel has nothing to do (it was ~2 us of a ~70 us layer).
// Before the PDL wait each warp asks L1 for its first tile's cache rows except pos0's: those rows were
// written by earlier steps, so their DRAM latency overlaps the previous kernel's end.
constexpr int kAttnWarps = 4;
constexpr float kLog2e = 1.4426950408889634f;

struct AttnRope {
  const float* k_new;  // (n_head_kv, D) this step's key, not yet rotated; null: the cache is complete
  const float* v_new;  // (n_head_kv, D)
  const float* ff;     // (D / 2) device, or null
  float freq_base;
};

__host__ __device__ inline int64_t attn_chunk(int64_t len, int n_split) {
  // Longer contexts keep the many splits (a floor of one tile per warp there measured -1.3% at 3,000 positions).
  if (len <= 32 * kAttnWarps) return 32 * kAttnWarps;
  return ((len + n_split - 1) / n_split + 31) / 32 * 32;
}
// Element d of one query head from its first n_active splits' partials, merged online in one pass (all
// their loads in flight together). The combine kernel and the attention kernel's last block (in-kernel
// combine) both use it, so the two forms give the same bits. ld.cg: the partials were stored by other blocks.
__device__ __forceinline__ float combine_splits(const float* __restrict__ ph /* (n_split, D + 2) */, int n_active,
                                                int64_t D, int64_t d) {
  float mm = -INFINITY, ll = 0.0f, a = 0.0f;
#pragma unroll 8
  for (int sp = 0; sp < n_active; ++sp) {
    const float* ps = ph + sp * (D + 2);
    const float ms = __ldcg(ps + D), ls = __ldcg(ps + D + 1), as = __ldcg(ps + d);
    if (ms == -INFINITY) continue;  // no finite score in that split
    const float mn = fmaxf(mm, ms);
    const float co = exp2f(mm - mn), cn = exp2f(ms - mn);  // co = 0 while mm = -inf
    ll = ll * co + ls * cn;
    a = a * co + as * cn;
    mm = mn;
  }
  return a / ll;
}

__device__ __forceinline__ void prefetch_l1(const void* p) { asm volatile("prefetch.global.L1 [%0];" ::"l"(p)); }

// Plain (coherent) load: in the fused form a block reads the row it has just stored.
__device__ __forceinline__ uint4 ld_piece(const void* p) { return *reinterpret_cast<const uint4*>(p); }

// Heads per warp: with G >= 2 the G query heads are split over two warps per tile slot (kAttnWarps slots, so
// 4 * attn_head_split(G) warps), which halves each warp's chain of products; at short contexts a block has
// one tile and its work was one warp's (70B at tp 2, G = 8: ~14 us of a ~130 us layer).
// (Four warps per tile slot at G >= 4, with the loads in flight halved to fit 128 registers, measured no
// faster at tp 4; docs/BENCHMARKS.md, Decisions in the source.)
__host__ __device__ constexpr int attn_head_split(int g) { return g >= 2 ? 2 : 1; }

// QS: blocks per KV head, each with G of its query heads (grid.x = n_head_kv * QS; a template argument so that
// the one-block form's code is what it was).
template <typename KV, int D, int G, int QS>
__global__ void __launch_bounds__(kAttnWarps * 32 * attn_head_split(G)) attention_decode_kernel(
    const float* __restrict__ q,   // (n_tok, n_head, D) the step's rows, n_head = n_head_kv * QS * G; not yet
                                   // rotated in the fused form
    KV* __restrict__ kc,           // (n_blocks, n_ctx, n_head_kv, D) the pool: one block of n_ctx per sequence
    KV* __restrict__ vc,           // (n_blocks, n_ctx, n_head_kv, D)
    int64_t n_ctx, int64_t n_head_kv, int n_split,
    float* __restrict__ partial,   // (n_seq, n_head, n_split, D + 2): acc[D], m, l
    float* __restrict__ out,       // (n_tok, n_head, D): written here when one split covers the context
    int* __restrict__ xq,          // (quant_x_words(n_head * D)) or null (one-row steps): out quantized (quant_x.cuh)
    const StepDev* __restrict__ step,  // (n_seq) grid.z = sequence; its tok0 row of q/out/k_new, its block
    AttnRope rp,                   // k_new, v_new: (n_tok, n_head_kv, D) the step's rows
    bool out4,                     // the output step with one float4 per thread where it applies
    int* __restrict__ done) {      // (n_seq, gridDim.x) zeros, or null: the in-kernel combine (see its step below)
  constexpr int HS = attn_head_split(G), GW = G / HS;   // warps per tile slot, heads per warp
  constexpr int E = 16 / static_cast<int>(sizeof(KV));  // cache elements per 16-byte piece
  constexpr int KP = D / E;                             // pieces per cache row: 8, 16 or 32
  constexpr int KB = KP < 16 ? KP : 16;                 // key pieces per lane loaded together
  constexpr int PG = 32 / KP;                           // value rows a warp reads at once
  constexpr int VP = 32 / PG;                           // value pieces per lane per tile
  // Value pieces per lane loaded together: half a tile's when GW x E accumulators would leave too few
  // registers (f16, head_dim 128, 8 heads per warp spilled ~280 bytes with all 16).
  constexpr int VB = (VP < 16 ? VP : 16) / (GW * E > 32 ? 2 : 1);
  __shared__ __align__(16) float qs[G][D];              // queries pre-scaled by log2(e)/sqrt(D)
  __shared__ double rot[D / 2][2];                      // cos, sin of pair i's angle (fused form)
  __shared__ float wm[kAttnWarps][G], wl[kAttnWarps][G];
  __shared__ __align__(16) float wacc[kAttnWarps][G][D];
  pdl_trigger();
  // This block's KV head, and the first of its G query heads (blockIdx.x * G = kh * QS * G + the block's
  // share of the KV head's query heads).
  const int kh = static_cast<int>(blockIdx.x) / QS, s = blockIdx.y;
  const int hb = static_cast<int>(blockIdx.x) * G;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int ts = warp / HS, g0 = (warp % HS) * GW;  // tile slot; first head of this warp
  // This block's sequence (one launch serves every decoding sequence of a step): its StepDev, like the
  // position, is copied by the host before the graph runs, not by a kernel: readable before the wait. A
  // sequence with a prompt chunk in the step has its own kernels.
  step += blockIdx.z;
  if (step->n_tok != 1) return;
  {
    const int64_t qrow = n_head_kv * QS * G * D, kvr = n_head_kv * D, t = step->tok0;
    q += t * qrow;
    out += t * qrow;
    if (rp.k_new) {
      rp.k_new += t * kvr;
      rp.v_new += t * kvr;
    }
    kc += step->block * n_ctx * kvr;
    vc += step->block * n_ctx * kvr;
    partial += static_cast<int64_t>(blockIdx.z) * n_head_kv * QS * G * n_split * (D + 2);
    if (done) done += static_cast<int64_t>(blockIdx.z) * gridDim.x;
  }
  const int64_t pos = step->pos0;
  const int64_t len = min(pos + 1, n_ctx);  // the host checks pos0 < n_ctx; this keeps a replay in bounds
  const int64_t chunk = attn_chunk(len, n_split);
  const int64_t p_begin = s * chunk, p_end = min(len, p_begin + chunk);
  if (p_begin >= p_end) return;
  const int64_t kv_row = n_head_kv * D;
  {
    const int64_t p = p_begin + ts * 32 + lane;
    if (g0 == 0 && p < p_end && p != pos) {
#pragma unroll
      for (int off = 0; off < D * static_cast<int>(sizeof(KV)); off += 128) {
        prefetch_l1(reinterpret_cast<const char*>(kc + p * kv_row + kh * D) + off);
        prefetch_l1(reinterpret_cast<const char*>(vc + p * kv_row + kh * D) + off);
      }
    }
  }
  if (rp.k_new) {
    for (int i = threadIdx.x; i < D / 2; i += blockDim.x)
      rope_cos_sin(i, pos, D, rp.freq_base, rp.ff, rot[i][0], rot[i][1]);
    __syncthreads();
  }
  pdl_wait();
  const float scale = kLog2e / sqrtf(static_cast<float>(D));
  for (int i = threadIdx.x; i < G * D / 2; i += blockDim.x) {
    const int g = i / (D / 2), j = i % (D / 2);
    float2 x = *reinterpret_cast<const float2*>(q + (hb + g) * D + 2 * j);
    if (rp.k_new) x = rope_rotate(x.x, x.y, rot[j][0], rot[j][1]);
    qs[g][2 * j] = x.x * scale;
    qs[g][2 * j + 1] = x.y * scale;
  }
  // With QS > 1 every block of the KV head stores the same row (the same bits): each then reads back
  // what it wrote itself, with no ordering between blocks to rely on.
  if (rp.k_new && pos >= p_begin && pos < p_end) {
    for (int j = threadIdx.x; j < D / 2; j += blockDim.x) {
      const int64_t src = kh * D + 2 * j, dst = pos * kv_row + src;
      const float2 k = rope_rotate(rp.k_new[src], rp.k_new[src + 1], rot[j][0], rot[j][1]);
      kc[dst] = to_kv<KV>(k.x);
      kc[dst + 1] = to_kv<KV>(k.y);
      vc[dst] = to_kv<KV>(rp.v_new[src]);
      vc[dst + 1] = to_kv<KV>(rp.v_new[src + 1]);
    }
  }
  __syncthreads();  // qs, and the stored row visible to the whole block

  float m[GW], l[GW], acc[GW][E];
#pragma unroll
  for (int g = 0; g < GW; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.0f;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[g][e] = 0.0f;
  }
  const int c = lane % KP, pg = lane / KP;
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  for (int64_t t0 = p_begin + ts * 32; t0 < p_end; t0 += kAttnWarps * 32) {
    const int64_t p = t0 + lane;
    const bool pv = p < p_end;
    const KV* kr = kc + (pv ? p : p_begin) * kv_row + kh * D;
    // Value piece j of this lane: position t0 + j * PG + pg; past p_end it reads as zeros (its weight is 0,
    // and an unwritten cache row could hold NaN).
    const auto load_v = [&](uint4 (&vw)[VB], int j0) {
#pragma unroll
      for (int j = 0; j < VB; ++j) {
        const int64_t pp = t0 + (j0 + j) * PG + pg;
        vw[j] = pp < p_end ? ld_piece(vc + pp * kv_row + kh * D + c * E) : zero;
      }
    };
    float sc[GW];
#pragma unroll
    for (int g = 0; g < GW; ++g) sc[g] = 0.0f;
    uint4 vw[VB];
#pragma unroll
    for (int b0 = 0; b0 < KP; b0 += KB) {
      uint4 kw[KB];
#pragma unroll
      for (int i = 0; i < KB; ++i) kw[i] = pv ? ld_piece(kr + (b0 + i) * E) : zero;
      if (b0 == 0) load_v(vw, 0);
#pragma unroll
      for (int i = 0; i < KB; ++i) {
        float f[E];
        kv_piece(kw[i], f);
#pragma unroll
        for (int g = 0; g < GW; ++g)
#pragma unroll
          for (int e = 0; e < E; ++e) sc[g] = fmaf(qs[g0 + g][(b0 + i) * E + e], f[e], sc[g]);
      }
    }
    float pr[GW];
#pragma unroll
    for (int g = 0; g < GW; ++g) {
      if (!pv) sc[g] = -INFINITY;
      const float mn = fmaxf(m[g], warp_max(sc[g]));  // finite: lane 0's position is in range
      const float corr = exp2f(m[g] - mn);             // m = -inf at first: 0
      pr[g] = pv ? exp2f(sc[g] - mn) : 0.0f;
      l[g] = l[g] * corr + warp_sum(pr[g]);
      m[g] = mn;
#pragma unroll
      for (int e = 0; e < E; ++e) acc[g][e] *= corr;
    }
#pragma unroll
    for (int j0 = 0; j0 < VP; j0 += VB) {
      if (j0 > 0) load_v(vw, j0);
#pragma unroll
      for (int j = 0; j < VB; ++j) {
        float f[E];
        kv_piece(vw[j], f);
        const int src = (j0 + j) * PG + pg;  // the lane whose position this piece belongs to
#pragma unroll
        for (int g = 0; g < GW; ++g) {
          const float w = __shfl_sync(0xffffffffu, pr[g], src);
#pragma unroll
          for (int e = 0; e < E; ++e) acc[g][e] = fmaf(w, f[e], acc[g][e]);
        }
      }
    }
  }
  // the PG row groups of each warp, then the tile slots
#pragma unroll
  for (int o = KP; o < 32; o <<= 1)
#pragma unroll
    for (int g = 0; g < GW; ++g)
#pragma unroll
      for (int e = 0; e < E; ++e) acc[g][e] += __shfl_xor_sync(0xffffffffu, acc[g][e], o);
#pragma unroll
  for (int g = 0; g < GW; ++g) {
    if (lane == 0) {
      wm[ts][g0 + g] = m[g];
      wl[ts][g0 + g] = l[g];
    }
    if (lane < KP) {
#pragma unroll
      for (int e = 0; e < E; ++e) wacc[ts][g0 + g][c * E + e] = acc[g][e];
    }
  }
  __syncthreads();
  const bool whole = p_begin == 0 && p_end == len;  // the only split: the final output
  if (out4 && whole && (G * D / 4) % 32 == 0 && aligned16(out)) {
    // Four consecutive elements per thread, so one quantize_store4 (3 shuffle rounds) replaces up to four
    // serial quantize_store1 rounds (13 shuffles each) per thread: with 2 warps per scheduler nothing hides
    // those chains (70B at tp 2, G = 8: 3.45 us of the kernel's 9.25 per layer went to this step). The same
    // float operations per element as the loop below. Whole warps: G * D / 4 is a multiple of 32, so every
    // iteration has whole warps in or out.
    for (int i4 = threadIdx.x; i4 < G * D / 4; i4 += blockDim.x) {
      const int g = (4 * i4) / D, d = (4 * i4) % D;
      float mm = -INFINITY;
      for (int w = 0; w < kAttnWarps; ++w) mm = fmaxf(mm, wm[w][g]);
      float ll = 0.0f;
      float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
      if (mm != -INFINITY) {
        for (int w = 0; w < kAttnWarps; ++w) {
          const float cw = exp2f(wm[w][g] - mm);
          ll += wl[w][g] * cw;
          const float4 v = *reinterpret_cast<const float4*>(&wacc[w][g][d]);
          a.x += v.x * cw;
          a.y += v.y * cw;
          a.z += v.z * cw;
          a.w += v.w * cw;
        }
      }
      const int64_t h = static_cast<int64_t>(hb) + g;
      const float4 r = make_float4(a.x / ll, a.y / ll, a.z / ll, a.w / ll);
      *reinterpret_cast<float4*>(out + h * D + d) = r;
      if (xq) quantize_store4(r, (h * D + d) / 4, true, xq, n_head_kv * QS * G * D);
    }
    return;
  }
  for (int i = threadIdx.x; i < G * D; i += blockDim.x) {
    const int g = i / D, d = i % D;
    float mm = -INFINITY;
    for (int w = 0; w < kAttnWarps; ++w) mm = fmaxf(mm, wm[w][g]);
    float ll = 0.0f, a = 0.0f;
    if (mm != -INFINITY) {
      for (int w = 0; w < kAttnWarps; ++w) {
        const float cw = exp2f(wm[w][g] - mm);
        ll += wl[w][g] * cw;
        a += wacc[w][g][d] * cw;
      }
    }
    if (whole) {
      // The combine kernel's arithmetic for one split (its weight exp2(m - m) = 1): a * 1 / (l * 1).
      const int64_t h = static_cast<int64_t>(hb) + g;
      const float r = a / ll;
      out[h * D + d] = r;
      // Whole warps take 32 consecutive elements of one head (D % 32 == 0, G * D a multiple of blockDim or
      // smaller than it by whole warps).
      if (xq) quantize_store1(r, h * D + d, true, xq, n_head_kv * QS * G * D);
      continue;
    }
    float* po = partial + ((static_cast<int64_t>(hb) + g) * n_split + s) * (D + 2);
    po[d] = a;
    if (d == 0) {
      po[D] = mm;
      po[D + 1] = ll;
    }
  }
  if (whole || !done) return;
  // In-kernel combine: the last of a KV head's active splits to finish merges them all, so the chain has no
  // combine kernel (one kernel boundary less per layer). The count is the grid-sync pattern: every thread's
  // partials, a block barrier, then thread 0's device fence before its atomic; the last block fences again
  // before it reads the others' partials (ld.cg), and puts the count back to 0 for the next call (the next
  // call's blocks count only after their PDL wait, which covers this kernel).
  __shared__ int s_last;
  const int n_active = static_cast<int>(min(static_cast<int64_t>(n_split), (len + chunk - 1) / chunk));
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    s_last = atomicAdd(done + blockIdx.x, 1) == n_active - 1;
    if (s_last) __threadfence();
  }
  __syncthreads();
  if (!s_last) return;
  // The combine kernel's elements for this block's G heads, in its order per warp (quantize_store1 needs a
  // warp on 32 consecutive elements of one head, as in the whole-context step above).
  for (int i = threadIdx.x; i < G * D; i += blockDim.x) {
    const int64_t h = static_cast<int64_t>(hb) + i / D, d = i % D;
    const float r = combine_splits(partial + h * n_split * (D + 2), n_active, D, d);
    out[h * D + d] = r;
    if (xq) quantize_store1(r, h * D + d, true, xq, n_head_kv * QS * G * D);
  }
  if (threadIdx.x == 0) done[blockIdx.x] = 0;
}

// One block per query head, one thread per element: the splits that had positions (combine_splits).
// grid.y: the sequence, as the attention kernel's grid.z.
__global__ void attention_combine_kernel(const float* __restrict__ partial /* (n_seq, n_head, n_split, D + 2) */,
                                         int n_split, int64_t D, int64_t n_ctx,
                                         const StepDev* __restrict__ step /* (n_seq) */,
                                         float* __restrict__ out /* (n_tok, n_head, D) */,
                                         int* __restrict__ xq /* (quant_x_words(n_head * D)) or null; D % 32 == 0 */) {
  pdl_trigger();
  step += blockIdx.y;
  const int64_t len = min(step->pos0 + 1, n_ctx);  // host-written before the graph: readable before the wait
  const int64_t chunk = attn_chunk(len, n_split);
  const int n_active = static_cast<int>(min(static_cast<int64_t>(n_split), (len + chunk - 1) / chunk));
  pdl_wait();  // also when there is nothing to do: the next kernel's wait must cover the attention kernel
  if (n_active == 1 || step->n_tok != 1) return;  // the attention kernel wrote the output, or not its sequence
  const int h = blockIdx.x;
  out += step->tok0 * static_cast<int64_t>(gridDim.x) * D;
  const float* ph = partial + (static_cast<int64_t>(blockIdx.y) * gridDim.x + h) * n_split * (D + 2);
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    const float r = combine_splits(ph, n_active, D, d);
    out[h * D + d] = r;
    // The o projection's int8 row (quant_x.cuh): a warp holds 32 consecutive elements of this head.
    if (xq) quantize_store1(r, h * D + d, true, xq, static_cast<int64_t>(gridDim.x) * D);
  }
}

// Any n_tok / head_dim <= 256: block (token t, head h), 4 warps over 32-position key tiles of [0, pos0 + t].
constexpr int kMaxD = 256;
template <typename KV>
__global__ void __launch_bounds__(kAttnWarps * 32) attention_generic_kernel(
    const float* __restrict__ q,  // (n_tok, n_head, D)
    const KV* __restrict__ kc,    // (n_ctx, n_head_kv, D)
    const KV* __restrict__ vc,    // (n_ctx, n_head_kv, D)
    int64_t n_ctx, int64_t n_head_kv, int64_t D, int64_t n_head,
    float* __restrict__ out,      // (n_tok, n_head, D)
    const StepDev* __restrict__ step) {
  constexpr int DL = kMaxD / 32;
  __shared__ float qs[kMaxD];
  __shared__ float wm[kAttnWarps], wl[kAttnWarps];
  __shared__ float wacc[kAttnWarps][kMaxD];
  const int64_t t = blockIdx.x, h = blockIdx.y;
  const int64_t kh = h / (n_head / n_head_kv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t len = min(step->pos0 + t + 1, n_ctx);
  const float scale = kLog2e / sqrtf(static_cast<float>(D));
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) qs[i] = q[(t * n_head + h) * D + i] * scale;
  __syncthreads();
  float m = -INFINITY, l = 0.0f, acc[DL];
#pragma unroll
  for (int i = 0; i < DL; ++i) acc[i] = 0.0f;
  const int64_t kv_row = n_head_kv * D;
  for (int64_t t0 = warp * 32; t0 < len; t0 += kAttnWarps * 32) {
    const int64_t p = t0 + lane;
    float sc = -INFINITY;
    if (p < len) {
      const KV* kr = kc + p * kv_row + kh * D;
      sc = 0.0f;
      for (int64_t d = 0; d < D; ++d) sc = fmaf(qs[d], kv_f32(kr[d]), sc);
    }
    const float mn = fmaxf(m, warp_max(sc));
    const float corr = exp2f(m - mn);
    const float pr = (p < len) ? exp2f(sc - mn) : 0.0f;
    l = l * corr + warp_sum(pr);
    m = mn;
#pragma unroll
    for (int i = 0; i < DL; ++i) acc[i] *= corr;
    const int n_here = static_cast<int>(len - t0 < 32 ? len - t0 : 32);
    for (int j = 0; j < n_here; ++j) {
      const KV* vr = vc + (t0 + j) * kv_row + kh * D;
      const float pj = __shfl_sync(0xffffffffu, pr, j);
#pragma unroll
      for (int i = 0; i < DL; ++i)
        if (lane + 32 * i < D) acc[i] = fmaf(pj, kv_f32(vr[lane + 32 * i]), acc[i]);
    }
  }
  if (lane == 0) {
    wm[warp] = m;
    wl[warp] = l;
  }
#pragma unroll
  for (int i = 0; i < DL; ++i)
    if (lane + 32 * i < D) wacc[warp][lane + 32 * i] = acc[i];
  __syncthreads();
  float mm = -INFINITY;
  for (int w = 0; w < kAttnWarps; ++w) mm = fmaxf(mm, wm[w]);
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float ll = 0.0f, a = 0.0f;
    for (int w = 0; w < kAttnWarps; ++w) {
      if (wm[w] == -INFINITY) continue;
      const float c = exp2f(wm[w] - mm);
      ll += wl[w] * c;
      a += wacc[w][d] * c;
    }
    out[(t * n_head + h) * D + d] = a / ll;
  }
}

// Prefill (n_tok > 1), head_dim 64/128: block (tile of BQ query tokens, head h). K and V tiles of 64
// positions go to shared memory as f32 (K transposed); S = Q K^T is a BQ x 64 register-tiled product
// (4 rows x 4 keys per thread), online softmax per row (4 threads per row), O += P V with 4 rows x
// D/16 dims per thread. FP32 FMA throughout (same precision as the other kernels); every K/V element is
// read once per block instead of once per (token, head).
constexpr int kPfKeys = 64;  // keys per tile
template <typename KV, int D, int BQ>
__global__ void __launch_bounds__(BQ * 4) attention_prefill_kernel(
    const float* __restrict__ q,  // (n_tok, n_head, D)
    const KV* __restrict__ kc,    // (n_ctx, n_head_kv, D)
    const KV* __restrict__ vc,    // (n_ctx, n_head_kv, D)
    int64_t n_ctx, int64_t n_head_kv, int64_t n_tok, int64_t n_head,
    float* __restrict__ out,      // (n_tok, n_head, D)
    const StepDev* __restrict__ step) {
  constexpr int NT = BQ * 4;          // threads: (BQ / 4) x 16
  constexpr int DC = D / 64;          // float4 column groups per thread in the PV product
  constexpr int SP = BQ + 4;          // row pitch of St (keeps float4 alignment)
  extern __shared__ __align__(16) float sm[];
  float* Qt = sm;                     // [D][BQ]   queries, transposed, pre-scaled
  float* Kt = Qt + D * BQ;            // [D][64]   keys, transposed
  float* Vs = Kt + D * kPfKeys;       // [64][D]   values
  float* St = Vs + kPfKeys * D;       // [64][SP]  scores, then probabilities, transposed
  float* red = St + kPfKeys * SP;     // [4][BQ]   partial max / sum of the 4 row parts
  float* mrow = red + 4 * BQ;         // [BQ]      running max (log2 domain)
  float* lrow = mrow + BQ;            // [BQ]      running sum
  float* crow = lrow + BQ;            // [BQ]      correction of this tile
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * BQ, h = blockIdx.y;
  const int64_t kh = h / (n_head / n_head_kv);
  const int64_t pos0 = step->pos0;
  const int64_t kv_row = n_head_kv * D;
  const float scale = kLog2e / sqrtf(static_cast<float>(D));
  // keys [0, len_max) are visible to some row of this block
  const int64_t t_last = min(t0 + BQ, n_tok) - 1;
  const int64_t len_max = min(pos0 + t_last + 1, n_ctx);

  for (int i = tid; i < BQ * D; i += NT) {
    const int r = i % BQ, d = i / BQ;
    const int64_t t = t0 + r;
    Qt[d * BQ + r] = t < n_tok ? q[(t * n_head + h) * D + d] * scale : 0.0f;
  }
  for (int r = tid; r < BQ; r += NT) {
    mrow[r] = -INFINITY;
    lrow[r] = 0.0f;
  }
  float acc[4][DC][4];
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int g = 0; g < DC; ++g)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[r][g][c] = 0.0f;

  for (int64_t j0 = 0; j0 < len_max; j0 += kPfKeys) {
    __syncthreads();  // previous tile's readers are done with Kt / Vs / St
    // K and V tile: thread -> (key j = i % 64, 8 dims at d0 = 8 * (i / 64))
    for (int i = tid; i < kPfKeys * (D / 8); i += NT) {
      const int j = i % kPfKeys, d0 = 8 * (i / kPfKeys);
      const int64_t p = j0 + j;
      float kf[8], vf[8];
      if (p < len_max) {
        load8(kc + p * kv_row + kh * D + d0, kf);
        load8(vc + p * kv_row + kh * D + d0, vf);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) kf[e] = vf[e] = 0.0f;
      }
#pragma unroll
      for (int e = 0; e < 8; ++e) Kt[(d0 + e) * kPfKeys + j] = kf[e];
      *reinterpret_cast<float4*>(&Vs[j * D + d0]) = make_float4(vf[0], vf[1], vf[2], vf[3]);
      *reinterpret_cast<float4*>(&Vs[j * D + d0 + 4]) = make_float4(vf[4], vf[5], vf[6], vf[7]);
    }
    __syncthreads();
    // S = Q K^T: rows ty*4 + r, keys tx + 16 c
    float s[4][4];
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int c = 0; c < 4; ++c) s[r][c] = 0.0f;
#pragma unroll 8
    for (int d = 0; d < D; ++d) {
      const float4 qv = *reinterpret_cast<const float4*>(&Qt[d * BQ + ty * 4]);
      const float qa[4] = {qv.x, qv.y, qv.z, qv.w};
      float kv[4];
#pragma unroll
      for (int c = 0; c < 4; ++c) kv[c] = Kt[d * kPfKeys + tx + 16 * c];
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) s[r][c] = fmaf(qa[r], kv[c], s[r][c]);
    }
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int j = tx + 16 * c;
      const int64_t p = j0 + j;
      float4 o;
      float* op = &o.x;
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int64_t t = t0 + ty * 4 + r;
        const int64_t len = min(pos0 + min(t, n_tok - 1) + 1, n_ctx);  // padding rows act like the last token
        op[r] = p < len ? s[r][c] : -INFINITY;
      }
      *reinterpret_cast<float4*>(&St[j * SP + ty * 4]) = o;
    }
    __syncthreads();
    // online softmax: thread -> (row = tid % BQ, part = tid / BQ of 4, 16 keys each)
    {
      const int row = tid % BQ, part = tid / BQ;
      float mx = -INFINITY;
#pragma unroll
      for (int i = 0; i < 16; ++i) mx = fmaxf(mx, St[(part * 16 + i) * SP + row]);
      red[part * BQ + row] = mx;
      __syncthreads();
      const float m_old = mrow[row];
      const float m_new = fmaxf(m_old, fmaxf(fmaxf(red[row], red[BQ + row]), fmaxf(red[2 * BQ + row], red[3 * BQ + row])));
      float sum = 0.0f;
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        float* sp = &St[(part * 16 + i) * SP + row];
        const float pr = exp2f(*sp - m_new);  // -inf -> 0; m_new is finite (key 0 is visible to every row)
        *sp = pr;
        sum += pr;
      }
      __syncthreads();  // every part has read red (max) and mrow
      red[part * BQ + row] = sum;
      __syncthreads();
      if (part == 0) {
        const float corr = exp2f(m_old - m_new);  // m_old = -inf at first: 0
        crow[row] = corr;
        lrow[row] = lrow[row] * corr + (red[row] + red[BQ + row]) + (red[2 * BQ + row] + red[3 * BQ + row]);
        mrow[row] = m_new;
      }
      __syncthreads();
    }
    // O = O * corr + P V: rows ty*4 + r, dims g*64 + tx*4 + (0..3)
    {
      const float4 cv = *reinterpret_cast<const float4*>(&crow[ty * 4]);
      const float cr[4] = {cv.x, cv.y, cv.z, cv.w};
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int g = 0; g < DC; ++g)
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[r][g][c] *= cr[r];
      const int n_keys = static_cast<int>(min(static_cast<int64_t>(kPfKeys), len_max - j0));
#pragma unroll 4
      for (int j = 0; j < n_keys; ++j) {
        const float4 pv = *reinterpret_cast<const float4*>(&St[j * SP + ty * 4]);
        const float pa[4] = {pv.x, pv.y, pv.z, pv.w};
#pragma unroll
        for (int g = 0; g < DC; ++g) {
          const float4 vv = *reinterpret_cast<const float4*>(&Vs[j * D + g * 64 + tx * 4]);
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            acc[r][g][0] = fmaf(pa[r], vv.x, acc[r][g][0]);
            acc[r][g][1] = fmaf(pa[r], vv.y, acc[r][g][1]);
            acc[r][g][2] = fmaf(pa[r], vv.z, acc[r][g][2]);
            acc[r][g][3] = fmaf(pa[r], vv.w, acc[r][g][3]);
          }
        }
      }
    }
  }
  __syncthreads();
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int64_t t = t0 + ty * 4 + r;
    if (t >= n_tok) continue;
    const float inv = 1.0f / lrow[ty * 4 + r];
#pragma unroll
    for (int g = 0; g < DC; ++g)
      *reinterpret_cast<float4*>(&out[(t * n_head + h) * D + g * 64 + tx * 4]) =
          make_float4(acc[r][g][0] * inv, acc[r][g][1] * inv, acc[r][g][2] * inv, acc[r][g][3] * inv);
  }
}

// ---- lookup and conversion ------------------------------------------------------------------------------
__global__ void get_rows_kernel(GgmlType type, const uint8_t* __restrict__ table /* (n_rows, row_stride) */,
                                size_t row_stride, int64_t n_rows, int64_t n_cols,
                                const int32_t* __restrict__ ids /* (n_tok) */, float* __restrict__ out /* (n_tok, n_cols) */) {
  const int64_t t = blockIdx.y;
  const int64_t id = ids[t];
  float* o = out + t * n_cols;
  const bool ok = id >= 0 && id < n_rows;  // the host validates ids; a bad one yields NaN, never a fault
  const uint8_t* row = table + static_cast<size_t>(ok ? id : 0) * row_stride;
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < n_cols;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x)
    o[c] = ok ? dq_elem(type, row, c) : __int_as_float(0x7fc00000);
}

// The grouped types (dequant.cuh): one thread per run of 8 elements, so that each scale and grid entry is
// decoded once per 8 elements rather than once per element.
__global__ void get_rows8_kernel(GgmlType type, const uint8_t* __restrict__ table /* (n_rows, row_stride) */,
                                 size_t row_stride, int64_t n_rows, int64_t n_grp /* n_cols / 8 */,
                                 const int32_t* __restrict__ ids /* (n_tok) */, float* __restrict__ out /* (n_tok, n_cols) */) {
  const int64_t t = blockIdx.y;
  const int64_t id = ids[t];
  float* o = out + t * n_grp * 8;
  const bool ok = id >= 0 && id < n_rows;  // the host validates ids; a bad one yields NaN, never a fault
  const uint8_t* row = table + static_cast<size_t>(ok ? id : 0) * row_stride;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < n_grp;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v[8];
    dq_group8(type, row, g, v);
#pragma unroll
    for (int i = 0; i < 8; ++i) o[8 * g + i] = ok ? v[i] : __int_as_float(0x7fc00000);
  }
}

__global__ void dequant_rows_kernel(GgmlType type, const uint8_t* __restrict__ w /* (rows, row_stride) */,
                                    size_t row_stride, int64_t row0, int64_t n_rows, int64_t n_cols,
                                    uint16_t* __restrict__ dst /* (n_rows, n_cols) */, bool to_bf16) {
  const int64_t total = n_rows * n_cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / n_cols, c = i % n_cols;
    const float v = dq_elem(type, w + static_cast<size_t>(row0 + r) * row_stride, c);
    dst[i] = to_bf16 ? __bfloat16_as_ushort(__float2bfloat16_rn(v)) : __half_as_ushort(__float2half_rn(v));
  }
}

// Fast path of the dequantize-to-16-bit pass: each thread writes 8 consecutive elements (one 16-byte store,
// so a warp stores 512 contiguous bytes), decoding them with the block's scale read once and the quants
// read as 16-bit words (block-format rows are only 2-byte aligned); no 64-bit division per element.
__device__ __forceinline__ uint16_t to16(float v, bool to_bf16) {
  return to_bf16 ? __bfloat16_as_ushort(__float2bfloat16_rn(v)) : __half_as_ushort(__float2half_rn(v));
}
template <GgmlType T>
__device__ __forceinline__ void dq8(const uint8_t* __restrict__ row, int64_t e0, float (&v)[8]) {
  if constexpr (T == GgmlType::Q8_0) {
    const uint8_t* b = row + (e0 / 32) * 34;
    const float d = f16_bits(*reinterpret_cast<const uint16_t*>(b));
    const uint16_t* q = reinterpret_cast<const uint16_t*>(b + 2 + e0 % 32);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint16_t w = q[i];
      v[2 * i] = d * static_cast<float>(static_cast<int8_t>(w & 0xFF));
      v[2 * i + 1] = d * static_cast<float>(static_cast<int8_t>(w >> 8));
    }
  } else if constexpr (T == GgmlType::Q4_0) {
    const uint8_t* b = row + (e0 / 32) * 18;
    const float d = f16_bits(*reinterpret_cast<const uint16_t*>(b));
    const int o = static_cast<int>(e0 % 32);
    const int sh = o < 16 ? 0 : 4;
    const uint16_t* q = reinterpret_cast<const uint16_t*>(b + 2 + (o & 15));
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint16_t w = q[i];
      v[2 * i] = d * static_cast<float>(static_cast<int>((w >> sh) & 0xF) - 8);
      v[2 * i + 1] = d * static_cast<float>(static_cast<int>((w >> (8 + sh)) & 0xF) - 8);
    }
  } else if constexpr (T == GgmlType::Q4_K) {
    const uint8_t* b = row + (e0 / 256) * 144;
    const int e = static_cast<int>(e0 % 256), sidx = e / 32, l = e % 32;
    const uint8_t* sc = b + 4;
    int scale, mn;
    if (sidx < 4) {
      scale = sc[sidx] & 63;
      mn = sc[sidx + 4] & 63;
    } else {
      scale = (sc[sidx + 4] & 0xF) | ((sc[sidx - 4] >> 6) << 4);
      mn = (sc[sidx + 4] >> 4) | ((sc[sidx] >> 6) << 4);
    }
    const float d = f16_bits(*reinterpret_cast<const uint16_t*>(b)) * scale;
    const float m = f16_bits(*reinterpret_cast<const uint16_t*>(b + 2)) * mn;
    const int sh = (sidx & 1) ? 4 : 0;
    const uint16_t* q = reinterpret_cast<const uint16_t*>(b + 16 + 32 * (sidx / 2) + l);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint16_t w = q[i];
      v[2 * i] = d * static_cast<float>((w >> sh) & 0xF) - m;
      v[2 * i + 1] = d * static_cast<float>((w >> (8 + sh)) & 0xF) - m;
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = dq_elem(T, row, e0 + i);
  }
}
template <GgmlType T>
__global__ void dequant_rows_fast_kernel(const uint8_t* __restrict__ w /* (rows, row_stride) */, size_t row_stride,
                                         int64_t row0, int64_t n_oct /* n_cols / 8 */,
                                         uint16_t* __restrict__ dst /* (n_rows, n_cols) */, bool to_bf16) {
  const int64_t r = blockIdx.y;
  const uint8_t* row = w + static_cast<size_t>(row0 + r) * row_stride;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < n_oct;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v[8];
    dq8<T>(row, 8 * g, v);
    uint32_t p[4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
      p[i] = static_cast<uint32_t>(to16(v[2 * i], to_bf16)) | (static_cast<uint32_t>(to16(v[2 * i + 1], to_bf16)) << 16);
    reinterpret_cast<uint4*>(dst + r * n_oct * 8)[g] = make_uint4(p[0], p[1], p[2], p[3]);
  }
}

// The grouped types (dequant.cuh): each thread decodes 8 consecutive elements and writes them with one
// 16-byte store (dst 16-byte aligned; n_cols is a multiple of 32 for these types). Rows are walked with
// blockIdx.y steps, so any number of rows fits the grid.
__global__ void dequant_rows8_kernel(GgmlType type, const uint8_t* __restrict__ w /* (rows, row_stride) */,
                                     size_t row_stride, int64_t row0, int64_t n_rows, int64_t n_grp /* n_cols / 8 */,
                                     uint16_t* __restrict__ dst /* (n_rows, n_cols) */, bool to_bf16) {
  for (int64_t r = blockIdx.y; r < n_rows; r += gridDim.y) {
    const uint8_t* row = w + static_cast<size_t>(row0 + r) * row_stride;
    for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < n_grp;
         g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      float v[8];
      dq_group8(type, row, g, v);
      uint32_t p[4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
        p[i] = static_cast<uint32_t>(to16(v[2 * i], to_bf16)) | (static_cast<uint32_t>(to16(v[2 * i + 1], to_bf16)) << 16);
      reinterpret_cast<uint4*>(dst + r * n_grp * 8)[g] = make_uint4(p[0], p[1], p[2], p[3]);
    }
  }
}

__global__ void f32_to_16_kernel(const float* __restrict__ src /* (n) */, uint16_t* __restrict__ dst /* (n) */,
                                 int64_t n, bool to_bf16) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[i] = to_bf16 ? __bfloat16_as_ushort(__float2bfloat16_rn(src[i])) : __half_as_ushort(__float2half_rn(src[i]));
}

// ---- argmax and top-k ------------------------------------------------------------------------------------
// Key = (order-preserving bits of the value) << 32 | ~index, the candidate order of ops/candidates.h: the
// largest key is the largest value at the lowest index; -0 counts as +0; NaNs have value bits 0, so they
// come after every number. Key 0 is padding (it would be index 0xffffffff).
__device__ __forceinline__ unsigned long long ord_key(uint32_t ord, int64_t i) {
  return (static_cast<unsigned long long>(ord) << 32) | static_cast<uint32_t>(~static_cast<uint32_t>(i));
}
__device__ __forceinline__ unsigned long long cand_key(float v, int64_t i) {
  uint32_t ord = 0;
  if (!isnan(v)) {
    uint32_t b = __float_as_uint(v);
    if (b == 0x80000000u) b = 0;
    ord = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  }
  return ord_key(ord, i);
}
// The index of a key (not of the padding key 0).
__device__ __forceinline__ int64_t key_index(unsigned long long k) {
  return static_cast<int64_t>(~static_cast<uint32_t>(k & 0xffffffffu));
}
// Row blockIdx.y of x (gridDim.y rows of n) into best[blockIdx.y].
__global__ void argmax_partial_kernel(const float* __restrict__ x /* (gridDim.y, n) */, int64_t n,
                                      unsigned long long* __restrict__ best /* (gridDim.y), zeroed */) {
  pdl_enter();
  x += blockIdx.y * n;
  best += blockIdx.y;
  unsigned long long k = 0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    k = max(k, cand_key(x[i], i));
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) k = max(k, __shfl_xor_sync(0xffffffffu, k, o));
  if (threadIdx.x % 32 == 0 && k != 0) atomicMax(best, k);
}
__global__ void argmax_final_kernel(const unsigned long long* __restrict__ best, int32_t* __restrict__ out) {
  pdl_enter();
  const unsigned long long k = *best;
  *out = k == 0 ? 0 : static_cast<int32_t>(key_index(k));
}

// Greedy decoding with the token in device memory (Backend::greedy_candidate / greedy_pick). A slot is 4
// floats, all integers below 2^24 so that an all-reduce sum with the other members' zeros is exact: the
// key's ordered value bits as two 16-bit halves, the id (-1: no candidate), 0.
__global__ void greedy_candidate_kernel(const unsigned long long* __restrict__ key /* (1) */, int64_t id_offset,
                                        float* __restrict__ cands /* (n_slots, 4) */, int slot, int n_slots) {
  pdl_enter();
  const unsigned long long k = *key;  // 0: no element (argmax_partial_kernel's keys are never 0 otherwise)
  const uint32_t ord = static_cast<uint32_t>(k >> 32);
  const int64_t id = k == 0 ? -1 : key_index(k) + id_offset;
  for (int j = threadIdx.x; j < 4 * n_slots; j += blockDim.x) {
    float v = 0.0f;
    if (j / 4 == slot) {
      const int f = j % 4;
      v = f == 0 ? static_cast<float>(ord >> 16) : f == 1 ? static_cast<float>(ord & 0xffffu) : f == 2 ? static_cast<float>(id) : 0.0f;
    }
    cands[j] = v;
  }
}
// The best slot in candidate order; writes the device token (0 where there is none, so that the next
// step's row lookup stays in bounds; the host sees -1 and fails) and the host's word for this step.
__global__ void greedy_pick_kernel(const float* __restrict__ cands /* (n_slots, 4) */, int n_slots,
                                   int32_t* __restrict__ token /* (1) device */,
                                   volatile int32_t* __restrict__ host_ring /* (2) mapped host memory */,
                                   const StepDev* __restrict__ step) {
  pdl_enter();
  if (threadIdx.x != 0) return;
  unsigned long long best = 0;
  for (int s = 0; s < n_slots; ++s) {
    const float id = cands[4 * s + 2];
    if (!(id >= 0.0f)) continue;
    const uint32_t ord = (static_cast<uint32_t>(cands[4 * s]) << 16) | static_cast<uint32_t>(cands[4 * s + 1]);
    best = max(best, ord_key(ord, static_cast<int64_t>(id)));
  }
  const int32_t t = best == 0 ? -1 : static_cast<int32_t>(key_index(best));
  *token = t < 0 ? 0 : t;
  host_ring[step->pos0 & 1] = t;
  __threadfence_system();
}

// One round of top-k: block b sorts keys [b * kTopChunk, (b + 1) * kTopChunk) of the input (logits turned
// into keys, or the previous round's keys) in shared memory, descending (bitonic network), and keeps the
// first k. Rounds repeat until one block is left; each shrinks the keys kTopChunk / k times.
constexpr int kTopChunk = 4096;
constexpr int kTopThreads = 1024;
template <bool kFromLogits>
__global__ void __launch_bounds__(kTopThreads) topk_round_kernel(
    const void* __restrict__ in,          // (n) floats (kFromLogits) or u64 keys
    int64_t n, int k,                     // k <= kTopChunk
    unsigned long long* __restrict__ out  // (gridDim.x, k) keys, best first per block
) {
  __shared__ unsigned long long key[kTopChunk];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kTopChunk;
  for (int t = threadIdx.x; t < kTopChunk; t += kTopThreads) {
    const int64_t i = base + t;
    unsigned long long v = 0;
    if (i < n) {
      if constexpr (kFromLogits)
        v = cand_key(static_cast<const float*>(in)[i], i);
      else
        v = static_cast<const unsigned long long*>(in)[i];
    }
    key[t] = v;
  }
  __syncthreads();
  for (int size = 2; size <= kTopChunk; size <<= 1) {
    for (int stride = size / 2; stride > 0; stride >>= 1) {
      for (int t = threadIdx.x; t < kTopChunk / 2; t += kTopThreads) {
        const int i = 2 * t - (t & (stride - 1)), j = i + stride;
        const bool desc = (i & size) == 0;  // the last merge (size == kTopChunk) is descending everywhere
        const unsigned long long a = key[i], b = key[j];
        if ((a < b) == desc) {
          key[i] = b;
          key[j] = a;
        }
      }
      __syncthreads();
    }
  }
  for (int t = threadIdx.x; t < k; t += kTopThreads) out[static_cast<int64_t>(blockIdx.x) * k + t] = key[t];
}

__global__ void gather_f32_kernel(const float* __restrict__ x, const int32_t* __restrict__ idx /* (n) */, int n,
                                  float* __restrict__ out /* (n) */) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = x[idx[i]];
}

// ---- random fill (tests, bench) ------------------------------------------------------------------------
__device__ __forceinline__ uint32_t hash32(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  x ^= x >> 33;
  return static_cast<uint32_t>(x);
}
__device__ __forceinline__ float unit_rand(uint64_t k) {  // [-1, 1)
  return static_cast<float>(hash32(k) >> 8) * (2.0f / 16777216.0f) - 1.0f;
}
__global__ void fill_random_kernel(GgmlType type, uint8_t* __restrict__ dst /* (n_rows, row_stride) */, int64_t n_rows,
                                   size_t row_stride, int64_t row_bytes, int64_t block_bytes, uint64_t seed) {
  const int64_t total = n_rows * row_bytes;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total / 2;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = (2 * i) / row_bytes, off = (2 * i) % row_bytes;  // 16-bit granules
    uint16_t* p = reinterpret_cast<uint16_t*>(dst + static_cast<size_t>(r) * row_stride + off);
    const uint64_t key = seed * 0x9E3779B97F4A7C15ULL + static_cast<uint64_t>(i);
    const int64_t ob = off % block_bytes;
    const float scale = 0.01f * (1.0f + 0.5f * unit_rand(key ^ 0x5555));
    uint16_t v = static_cast<uint16_t>(hash32(key));
    switch (type) {
      case GgmlType::F32:
        v = static_cast<uint16_t>(__float_as_uint(unit_rand(seed * 0x9E3779B97F4A7C15ULL + static_cast<uint64_t>(i / 2))) >>
                                  ((off % 4) ? 16 : 0));
        break;
      case GgmlType::F16: v = __half_as_ushort(__float2half_rn(unit_rand(key))); break;
      case GgmlType::BF16: v = __bfloat16_as_ushort(__float2bfloat16_rn(unit_rand(key))); break;
      case GgmlType::Q8_0:
      case GgmlType::Q4_0:
        if (ob == 0) v = __half_as_ushort(__float2half_rn(scale));
        break;
      case GgmlType::Q4_K:
        if (ob == 0 || ob == 2) v = __half_as_ushort(__float2half_rn(scale * 0.1f));
        break;
      case GgmlType::Q6_K:
        if (ob == 208) v = __half_as_ushort(__float2half_rn(scale * 0.1f));
        break;
      default: break;
    }
    *p = v;
  }
}

// Byte offsets of a grouped type's fp16 scale fields in its block (-1: none; MXFP4 and IQ1_M: see below).
__device__ __forceinline__ void grouped_f16_fields(GgmlType type, int& f0, int& f1) {
  f0 = 0;
  f1 = -1;
  switch (type) {
    case GgmlType::Q4_1: case GgmlType::Q5_1: case GgmlType::Q5_K: f1 = 2; break;
    case GgmlType::Q2_K: f0 = 80; f1 = 82; break;
    case GgmlType::Q3_K: f0 = 108; break;
    case GgmlType::MXFP4: case GgmlType::IQ1_M: f0 = -1; break;
    default: break;  // fp16 d at offset 0
  }
}
// The grouped types: random bytes (every quant, index and sign pattern occurs), then each fp16 scale field
// (and MXFP4's exponent, IQ1_M's scale nibbles) set to a finite value of realistic size. One thread per byte:
// rows of these types may have any length (MXFP4's 17-byte blocks).
__global__ void fill_random_grouped_kernel(GgmlType type, uint8_t* __restrict__ dst /* (n_rows, row_stride) */,
                                           int64_t n_rows, size_t row_stride, int64_t row_bytes, int64_t block_bytes,
                                           uint64_t seed) {
  const int64_t total = n_rows * row_bytes;
  int f0, f1;
  grouped_f16_fields(type, f0, f1);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / row_bytes, off = i % row_bytes, ob = off % block_bytes;
    const uint64_t key = seed * 0x9E3779B97F4A7C15ULL + static_cast<uint64_t>(i);
    uint8_t v = static_cast<uint8_t>(hash32(key));
    // One scale per block (the same for each of its bytes): 0.001 .. 0.003, random sign.
    const uint64_t bkey = (seed * 0x9E3779B97F4A7C15ULL) ^ (static_cast<uint64_t>(r * row_bytes + off - ob) * 0xD6E8FEB86659FD93ULL);
    const uint16_t h = __half_as_ushort(__float2half_rn(0.002f * (1.0f + 0.5f * unit_rand(bkey)) *
                                                        ((hash32(bkey ^ 0x77) & 1) ? -1.0f : 1.0f)));
    if ((f0 >= 0 && ob == f0) || (f1 >= 0 && ob == f1)) v = static_cast<uint8_t>(h & 0xFF);
    if ((f0 >= 0 && ob == f0 + 1) || (f1 >= 0 && ob == f1 + 1)) v = static_cast<uint8_t>(h >> 8);
    if (type == GgmlType::MXFP4 && ob == 0) v = static_cast<uint8_t>(118 + (hash32(bkey) & 3));  // 2^-10 .. 2^-7
    if (type == GgmlType::IQ1_M && ob >= 49 && ob % 2 == 1)  // top nibble of scales u16 t = (ob - 49) / 2: nibble t of d
      v = static_cast<uint8_t>((v & 0x0F) | (((h >> (4 * ((ob - 49) / 2))) & 0xF) << 4));
    dst[static_cast<size_t>(r) * row_stride + off] = v;
  }
}

}  // namespace

namespace {
// Whether rms_norm_kernel takes its float4 path for one row and can quantize it (its own test, repeated).
bool norm_quantizes(const float* x, const float* delta, const float* w, const float* y, int64_t n_tok, int64_t n,
                    const int* xq) {
  return xq && aligned16(xq) && n_tok == 1 && n % 32 == 0 && n <= int64_t{kNormVec} * 4 * kNormThreads &&
         aligned16(x) && aligned16(w) && aligned16(y) && (!delta || aligned16(delta));
}
}  // namespace

bool launch_rms_norm(const float* x, const float* w, float* y, int64_t n_tok, int64_t n, float eps, cudaStream_t s,
                     int* xq) {
  if (n_tok <= 0) return false;
  if (!norm_quantizes(x, nullptr, w, y, n_tok, n, xq)) xq = nullptr;
  // Not written without kAdd.
  launch_pdl(rms_norm_kernel<false>, dim3(static_cast<unsigned>(n_tok)), dim3(norm_threads(n)), 0, s,
             const_cast<float*>(x), static_cast<const float*>(nullptr), w, y, n, eps, xq);
  SHARDLM_CUDA_CHECK_LAUNCH("rms_norm_kernel");
  return xq != nullptr;
}

bool launch_add_rms_norm(float* x, const float* delta, const float* w, float* y, int64_t n_tok, int64_t n, float eps,
                         cudaStream_t s, int* xq) {
  if (n_tok <= 0) return false;
  if (!norm_quantizes(x, delta, w, y, n_tok, n, xq)) xq = nullptr;
  launch_pdl(rms_norm_kernel<true>, dim3(static_cast<unsigned>(n_tok)), dim3(norm_threads(n)), 0, s, x, delta, w, y, n,
             eps, xq);
  SHARDLM_CUDA_CHECK_LAUNCH("rms_norm_kernel<add>");
  return xq != nullptr;
}

void launch_rope_kv_store(GgmlType kv_type, float* q, float* k, const float* v, void* k_cache, void* v_cache,
                          int64_t n_ctx, int64_t n_tok, int64_t n_head, int64_t n_head_kv, int64_t head_dim,
                          float freq_base, const float* freq_factors, const StepDev* step, cudaStream_t s) {
  const int64_t total = n_tok * (n_head + n_head_kv) * (head_dim / 2);
  if (total <= 0) return;
  if (kv_type == GgmlType::F16)
    launch_pdl(rope_kv_store_kernel<__half>, dim3(grid_for(total, 256)), dim3(256), 0, s, q, k, v,
               static_cast<__half*>(k_cache), static_cast<__half*>(v_cache), n_ctx, n_tok, n_head, n_head_kv, head_dim,
               freq_base, freq_factors, step);
  else
    launch_pdl(rope_kv_store_kernel<float>, dim3(grid_for(total, 256)), dim3(256), 0, s, q, k, v,
               static_cast<float*>(k_cache), static_cast<float*>(v_cache), n_ctx, n_tok, n_head, n_head_kv, head_dim,
               freq_base, freq_factors, step);
  SHARDLM_CUDA_CHECK_LAUNCH("rope_kv_store_kernel");
}

void launch_add_bias(float* y, const float* b, int64_t n_tok, int64_t n, cudaStream_t s) {
  if (n_tok * n <= 0) return;
  launch_pdl(add_bias_kernel, dim3(grid_for(n_tok * n, 256)), dim3(256), 0, s, y, b, n_tok * n, n);
  SHARDLM_CUDA_CHECK_LAUNCH("add_bias_kernel");
}

void launch_add(float* y, const float* x, int64_t n, cudaStream_t s) {
  if (n <= 0) return;
  launch_pdl(add_kernel, dim3(grid_for(n, 256)), dim3(256), 0, s, y, x, n);
  SHARDLM_CUDA_CHECK_LAUNCH("add_kernel");
}

bool launch_swiglu(const float* gate, const float* up, float* out, int64_t n, cudaStream_t s, int* xq) {
  if (n <= 0) return false;
  if (xq && aligned16(xq) && n % 32 == 0 && aligned16(gate) && aligned16(up) && aligned16(out)) {
    launch_pdl(swiglu_quant_kernel, dim3(grid_for(n / 4, 256)), dim3(256), 0, s, reinterpret_cast<const float4*>(gate),
               reinterpret_cast<const float4*>(up), reinterpret_cast<float4*>(out), n, xq);
    SHARDLM_CUDA_CHECK_LAUNCH("swiglu_quant_kernel");
    return true;
  }
  launch_pdl(swiglu_kernel, dim3(grid_for(n, 256)), dim3(256), 0, s, gate, up, out, n);
  SHARDLM_CUDA_CHECK_LAUNCH("swiglu_kernel");
  return false;
}

void launch_rope(float* x, int64_t n_tok, int64_t n_heads, int64_t head_dim, float freq_base,
                 const float* freq_factors, const StepDev* step, cudaStream_t s) {
  const int64_t total = n_tok * n_heads * (head_dim / 2);
  if (total <= 0) return;
  launch_pdl(rope_kernel, dim3(grid_for(total, 256)), dim3(256), 0, s, x, n_tok, n_heads, head_dim, freq_base, freq_factors, step);
  SHARDLM_CUDA_CHECK_LAUNCH("rope_kernel");
}

void launch_kv_store(GgmlType kv_type, void* k_cache, void* v_cache, int64_t n_ctx, int64_t n_head_kv,
                     int64_t head_dim, const float* k, const float* v, int64_t n_tok, const StepDev* step,
                     cudaStream_t s) {
  const int64_t row = n_head_kv * head_dim, total = n_tok * row;
  if (total <= 0) return;
  if (kv_type == GgmlType::F16)
    launch_pdl(kv_store_kernel<__half>, dim3(grid_for(total, 256)), dim3(256), 0, s, static_cast<__half*>(k_cache),
                                                               static_cast<__half*>(v_cache), n_ctx, row, k, v,
                                                               n_tok, step);
  else
    launch_pdl(kv_store_kernel<float>, dim3(grid_for(total, 256)), dim3(256), 0, s, static_cast<float*>(k_cache),
                                                              static_cast<float*>(v_cache), n_ctx, row, k, v,
                                                              n_tok, step);
  SHARDLM_CUDA_CHECK_LAUNCH("kv_store_kernel");
}

int attention_decode_splits(int64_t n_ctx, int64_t n_head_kv, int sm_count) {
  // About two blocks per SM at full context, never more splits than 64-position slices of the cache.
  const int64_t want = std::max<int64_t>(1, (2 * sm_count + n_head_kv - 1) / n_head_kv);
  return static_cast<int>(std::clamp<int64_t>(std::min(want, (n_ctx + 63) / 64), 1, 256));
}

bool attention_decode_supported(int64_t head_dim, int64_t group) {
  return (head_dim == 64 || head_dim == 128) && (group == 1 || group == 2 || group == 4 || group == 8);
}

template <typename KV, int D>
static void decode_d(int64_t group, int qsplit, const float* q, void* kc, void* vc, int64_t n_ctx, int64_t n_head_kv,
                     int n_split, float* partial, float* out, int* xq, const StepDev* step, int64_t n_seq,
                     const AttnRope& rp, bool out4, int* done, cudaStream_t s) {
  // qsplit blocks per KV head, each with group / qsplit query heads (the kernel's G); grid.z: the sequences.
  const int64_t per_block = group / qsplit;
  const dim3 grid(static_cast<unsigned>(n_head_kv * qsplit), static_cast<unsigned>(n_split),
                  static_cast<unsigned>(n_seq));
  auto* k = static_cast<KV*>(kc);
  auto* v = static_cast<KV*>(vc);
  const dim3 block(kAttnWarps * 32 * attn_head_split(static_cast<int>(per_block)));
  const auto go = [&](auto kernel) {
    launch_pdl(kernel, grid, block, 0, s, q, k, v, n_ctx, n_head_kv, n_split, partial, out, xq, step, rp, out4, done);
  };
  // per_block is group / qsplit: the groups are 1, 2, 4 or 8 (attention_decode_supported), qsplit <= group.
  if (qsplit == 4) {
    if (per_block == 1) go(attention_decode_kernel<KV, D, 1, 4>);
    else go(attention_decode_kernel<KV, D, 2, 4>);
  } else if (qsplit == 2) {
    switch (per_block) {
      case 1: go(attention_decode_kernel<KV, D, 1, 2>); break;
      case 2: go(attention_decode_kernel<KV, D, 2, 2>); break;
      default: go(attention_decode_kernel<KV, D, 4, 2>); break;
    }
  } else {
    switch (per_block) {
      case 1: go(attention_decode_kernel<KV, D, 1, 1>); break;
      case 2: go(attention_decode_kernel<KV, D, 2, 1>); break;
      case 4: go(attention_decode_kernel<KV, D, 4, 1>); break;
      default: go(attention_decode_kernel<KV, D, 8, 1>); break;
    }
  }
  SHARDLM_CUDA_CHECK_LAUNCH("attention_decode_kernel");
}

bool launch_attention_decode(GgmlType kv_type, const float* q, void* k_cache, void* v_cache, int64_t n_ctx,
                             int64_t n_head_kv, int64_t head_dim, int64_t n_head, int n_split, float* partial,
                             float* out, const StepDev* step, int64_t n_seq, cudaStream_t s, int* xq,
                             const float* k_new, const float* v_new, float freq_base, const float* freq_factors,
                             bool out4, int qsplit, int* done) {
  if (n_seq < 1 || n_seq > 65535)
    fail_kind(ErrorKind::kInternal, "launch_attention_decode: ", n_seq, " sequences (1 to 65,535 per launch)");
  // Whole warps of one head each (head_dim 64 or 128 here, one thread per element); one row only.
  if (!(xq && n_seq == 1 && aligned16(xq) && head_dim % 32 == 0 && head_dim <= 256)) xq = nullptr;
  const int64_t group = n_head / n_head_kv;
  // A split of a KV head's query heads needs whole supported groups on each side.
  if (!(qsplit == 1 || ((qsplit == 2 || qsplit == 4) && group >= qsplit)))
    fail_kind(ErrorKind::kInternal, "launch_attention_decode: ", qsplit, " blocks per KV head for a group of ", group);
  const bool f16 = kv_type == GgmlType::F16;
  const AttnRope rp{k_new, k_new ? v_new : nullptr, freq_factors, freq_base};
  if (head_dim == 64) {
    if (f16) decode_d<__half, 64>(group, qsplit, q, k_cache, v_cache, n_ctx, n_head_kv, n_split, partial, out, xq, step, n_seq, rp, out4, done, s);
    else decode_d<float, 64>(group, qsplit, q, k_cache, v_cache, n_ctx, n_head_kv, n_split, partial, out, xq, step, n_seq, rp, out4, done, s);
  } else {
    if (f16) decode_d<__half, 128>(group, qsplit, q, k_cache, v_cache, n_ctx, n_head_kv, n_split, partial, out, xq, step, n_seq, rp, out4, done, s);
    else decode_d<float, 128>(group, qsplit, q, k_cache, v_cache, n_ctx, n_head_kv, n_split, partial, out, xq, step, n_seq, rp, out4, done, s);
  }
  if (done) return xq != nullptr;  // the attention kernel combined its splits itself
  launch_pdl(attention_combine_kernel, dim3(static_cast<unsigned>(n_head), static_cast<unsigned>(n_seq)),
             dim3(static_cast<unsigned>(std::min<int64_t>(head_dim, 256))), 0, s, partial, n_split, head_dim, n_ctx,
             step, out, xq);
  SHARDLM_CUDA_CHECK_LAUNCH("attention_combine_kernel");
  return xq != nullptr;
}

void launch_attention_generic(GgmlType kv_type, const float* q, const void* k_cache, const void* v_cache,
                              int64_t n_ctx, int64_t n_head_kv, int64_t head_dim, int64_t n_tok, int64_t n_head,
                              float* out, const StepDev* step, cudaStream_t s) {
  if (n_tok <= 0) return;
  const dim3 grid(static_cast<unsigned>(n_tok), static_cast<unsigned>(n_head));
  if (kv_type == GgmlType::F16)
    attention_generic_kernel<__half><<<grid, kAttnWarps * 32, 0, s>>>(
        q, static_cast<const __half*>(k_cache), static_cast<const __half*>(v_cache), n_ctx, n_head_kv, head_dim, n_head, out,
        step);
  else
    attention_generic_kernel<float><<<grid, kAttnWarps * 32, 0, s>>>(
        q, static_cast<const float*>(k_cache), static_cast<const float*>(v_cache), n_ctx, n_head_kv, head_dim, n_head, out,
        step);
  SHARDLM_CUDA_CHECK_LAUNCH("attention_generic_kernel");
}

template <typename KV, int D, int BQ>
static void prefill_launch(const float* q, const void* kc, const void* vc, int64_t n_ctx, int64_t n_head_kv,
                           int64_t n_tok, int64_t n_head, float* out, const StepDev* step, cudaStream_t s) {
  constexpr size_t smem = sizeof(float) * (static_cast<size_t>(D) * BQ + 2 * static_cast<size_t>(D) * kPfKeys +
                                           static_cast<size_t>(kPfKeys) * (BQ + 4) + 7 * BQ);
  auto kernel = attention_prefill_kernel<KV, D, BQ>;
  SHARDLM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const dim3 grid(static_cast<unsigned>((n_tok + BQ - 1) / BQ), static_cast<unsigned>(n_head));
  kernel<<<grid, BQ * 4, smem, s>>>(q, static_cast<const KV*>(kc), static_cast<const KV*>(vc), n_ctx, n_head_kv, n_tok,
                                    n_head, out, step);
  SHARDLM_CUDA_CHECK_LAUNCH("attention_prefill_kernel");
}

template <typename KV, int D>
static void prefill_d(const float* q, const void* kc, const void* vc, int64_t n_ctx, int64_t n_head_kv, int64_t n_tok,
                      int64_t n_head, float* out, const StepDev* step, int sm_count, cudaStream_t s) {
  // 64-token tiles when they alone give two blocks per SM, else 32 (more blocks, less reuse of K/V)
  if ((n_tok + 63) / 64 * n_head >= 2 * static_cast<int64_t>(sm_count))
    prefill_launch<KV, D, 64>(q, kc, vc, n_ctx, n_head_kv, n_tok, n_head, out, step, s);
  else
    prefill_launch<KV, D, 32>(q, kc, vc, n_ctx, n_head_kv, n_tok, n_head, out, step, s);
}

bool launch_attention_prefill(GgmlType kv_type, const float* q, const void* k_cache, const void* v_cache,
                              int64_t n_ctx, int64_t n_head_kv, int64_t head_dim, int64_t n_tok, int64_t n_head,
                              float* out, const StepDev* step, int sm_count, cudaStream_t s) {
  if ((head_dim != 64 && head_dim != 128) || !aligned16(out) || !aligned16(k_cache) || !aligned16(v_cache)) return false;
  if (n_tok <= 0 || n_tok > 65535LL * 64 || n_head > 65535) return false;
  const bool f16 = kv_type == GgmlType::F16;
  if (head_dim == 64) {
    if (f16) prefill_d<__half, 64>(q, k_cache, v_cache, n_ctx, n_head_kv, n_tok, n_head, out, step, sm_count, s);
    else prefill_d<float, 64>(q, k_cache, v_cache, n_ctx, n_head_kv, n_tok, n_head, out, step, sm_count, s);
  } else {
    if (f16) prefill_d<__half, 128>(q, k_cache, v_cache, n_ctx, n_head_kv, n_tok, n_head, out, step, sm_count, s);
    else prefill_d<float, 128>(q, k_cache, v_cache, n_ctx, n_head_kv, n_tok, n_head, out, step, sm_count, s);
  }
  return true;
}

void launch_get_rows(GgmlType type, const void* table, size_t row_stride, int64_t n_rows_table, int64_t n_cols,
                     const int32_t* ids, int64_t n_tok, float* out, cudaStream_t s) {
  if (n_tok <= 0) return;
  if (dq_grouped(type) && n_cols % 8 == 0) {
    const int64_t n_grp = n_cols / 8;
    const dim3 grid(static_cast<unsigned>(std::clamp<int64_t>((n_grp + 255) / 256, 1, 64)), static_cast<unsigned>(n_tok));
    get_rows8_kernel<<<grid, 256, 0, s>>>(type, static_cast<const uint8_t*>(table), row_stride, n_rows_table, n_grp,
                                          ids, out);
    SHARDLM_CUDA_CHECK_LAUNCH("get_rows8_kernel");
    return;
  }
  const dim3 grid(static_cast<unsigned>(std::clamp<int64_t>((n_cols + 255) / 256, 1, 64)), static_cast<unsigned>(n_tok));
  get_rows_kernel<<<grid, 256, 0, s>>>(type, static_cast<const uint8_t*>(table), row_stride, n_rows_table, n_cols, ids,
                                       out);
  SHARDLM_CUDA_CHECK_LAUNCH("get_rows_kernel");
}

template <GgmlType T>
static void dequant_fast(const void* w, size_t row_stride, int64_t row0, int64_t n_rows, int64_t n_cols, void* dst,
                         bool to_bf16, cudaStream_t s) {
  const int64_t n_oct = n_cols / 8;
  const dim3 grid(static_cast<unsigned>(std::clamp<int64_t>((n_oct + 127) / 128, 1, 64)),
                  static_cast<unsigned>(n_rows));
  dequant_rows_fast_kernel<T><<<grid, 128, 0, s>>>(static_cast<const uint8_t*>(w), row_stride, row0, n_oct,
                                                   static_cast<uint16_t*>(dst), to_bf16);
  SHARDLM_CUDA_CHECK_LAUNCH("dequant_rows_fast_kernel");
}

void launch_dequant_rows(GgmlType type, const void* w, size_t row_stride, int64_t row0, int64_t n_rows,
                         int64_t n_cols, void* dst, bool to_bf16, cudaStream_t s) {
  const int64_t total = n_rows * n_cols;
  if (total <= 0) return;
  if (n_cols % 32 == 0 && aligned16(dst) && reinterpret_cast<uintptr_t>(w) % 2 == 0 &&
      row_stride % 2 == 0 && n_rows <= 65535) {
    switch (type) {
      case GgmlType::Q8_0: return dequant_fast<GgmlType::Q8_0>(w, row_stride, row0, n_rows, n_cols, dst, to_bf16, s);
      case GgmlType::Q4_0: return dequant_fast<GgmlType::Q4_0>(w, row_stride, row0, n_rows, n_cols, dst, to_bf16, s);
      case GgmlType::Q4_K: return dequant_fast<GgmlType::Q4_K>(w, row_stride, row0, n_rows, n_cols, dst, to_bf16, s);
      case GgmlType::Q6_K: return dequant_fast<GgmlType::Q6_K>(w, row_stride, row0, n_rows, n_cols, dst, to_bf16, s);
      default: break;
    }
  }
  if (dq_grouped(type) && n_cols % 8 == 0 && aligned16(dst)) {
    const int64_t n_grp = n_cols / 8;
    const dim3 grid(static_cast<unsigned>(std::clamp<int64_t>((n_grp + 127) / 128, 1, 64)),
                    static_cast<unsigned>(std::min<int64_t>(n_rows, 65535)));
    dequant_rows8_kernel<<<grid, 128, 0, s>>>(type, static_cast<const uint8_t*>(w), row_stride, row0, n_rows, n_grp,
                                              static_cast<uint16_t*>(dst), to_bf16);
    SHARDLM_CUDA_CHECK_LAUNCH("dequant_rows8_kernel");
    return;
  }
  dequant_rows_kernel<<<grid_for(total, 256), 256, 0, s>>>(type, static_cast<const uint8_t*>(w), row_stride, row0,
                                                           n_rows, n_cols, static_cast<uint16_t*>(dst), to_bf16);
  SHARDLM_CUDA_CHECK_LAUNCH("dequant_rows_kernel");
}

void launch_f32_to_16(const float* src, void* dst, int64_t n, bool to_bf16, cudaStream_t s) {
  if (n <= 0) return;
  f32_to_16_kernel<<<grid_for(n, 256), 256, 0, s>>>(src, static_cast<uint16_t*>(dst), n, to_bf16);
  SHARDLM_CUDA_CHECK_LAUNCH("f32_to_16_kernel");
}

void launch_argmax(const float* x, int64_t n, int32_t* out, unsigned long long* scratch, cudaStream_t s) {
  SHARDLM_CUDA_CHECK(cudaMemsetAsync(scratch, 0, sizeof(unsigned long long), s));
  launch_pdl(argmax_partial_kernel, dim3(grid_for(n, 256, 264)), dim3(256), 0, s, x, n, scratch);
  SHARDLM_CUDA_CHECK_LAUNCH("argmax_partial_kernel");
  launch_pdl(argmax_final_kernel, dim3(1), dim3(1), 0, s, scratch, out);
  SHARDLM_CUDA_CHECK_LAUNCH("argmax_final_kernel");
}

void launch_argmax_key(const float* x, int64_t n, unsigned long long* key, cudaStream_t s) {
  launch_argmax_keys(x, n, 1, key, s);
}

void launch_argmax_keys(const float* x, int64_t n, int64_t n_rows, unsigned long long* keys, cudaStream_t s) {
  if (n_rows < 1 || n_rows > 65535) fail_kind(ErrorKind::kInternal, "launch_argmax_keys: ", n_rows, " rows");
  SHARDLM_CUDA_CHECK(cudaMemsetAsync(keys, 0, static_cast<size_t>(n_rows) * sizeof(unsigned long long), s));
  // About 264 blocks in all (two waves of 132 SMs), at least one a row.
  const unsigned per_row = grid_for(n, 256, std::max<int64_t>(1, 264 / n_rows));
  launch_pdl(argmax_partial_kernel, dim3(per_row, static_cast<unsigned>(n_rows)), dim3(256), 0, s, x, n, keys);
  SHARDLM_CUDA_CHECK_LAUNCH("argmax_partial_kernel");
}

void launch_greedy_candidate(const float* x, int64_t n, int64_t id_offset, unsigned long long* key, float* cands,
                             int slot, int n_slots, cudaStream_t s) {
  if (slot < 0 || slot >= n_slots) fail_kind(ErrorKind::kInternal, "launch_greedy_candidate: slot ", slot, " of ", n_slots);
  launch_argmax_key(x, n, key, s);
  launch_pdl(greedy_candidate_kernel, dim3(1), dim3(128), 0, s, key, id_offset, cands, slot, n_slots);
  SHARDLM_CUDA_CHECK_LAUNCH("greedy_candidate_kernel");
}

void launch_greedy_pick(const float* cands, int n_slots, int32_t* token, int32_t* host_ring, const StepDev* step,
                        cudaStream_t s) {
  launch_pdl(greedy_pick_kernel, dim3(1), dim3(32), 0, s, cands, n_slots, token, host_ring, step);
  SHARDLM_CUDA_CHECK_LAUNCH("greedy_pick_kernel");
}

int64_t topk_scratch_keys(int64_t n, int k) { return (n + kTopChunk - 1) / kTopChunk * k; }

const unsigned long long* launch_topk(const float* x, int64_t n, int k, unsigned long long* a,
                                      unsigned long long* b, cudaStream_t s) {
  if (n < 1 || k < 1 || k > kTopMaxK) fail_kind(ErrorKind::kInternal, "launch_topk: n = ", n, ", k = ", k);
  int64_t blocks = (n + kTopChunk - 1) / kTopChunk;
  topk_round_kernel<true><<<static_cast<unsigned>(blocks), kTopThreads, 0, s>>>(x, n, k, a);
  SHARDLM_CUDA_CHECK_LAUNCH("topk_round_kernel");
  while (blocks > 1) {
    const int64_t m = blocks * k;
    blocks = (m + kTopChunk - 1) / kTopChunk;
    topk_round_kernel<false><<<static_cast<unsigned>(blocks), kTopThreads, 0, s>>>(a, m, k, b);
    SHARDLM_CUDA_CHECK_LAUNCH("topk_round_kernel");
    std::swap(a, b);
  }
  return a;
}

void launch_gather_f32(const float* x, const int32_t* idx, int n, float* out, cudaStream_t s) {
  if (n <= 0) return;
  gather_f32_kernel<<<(n + 255) / 256, 256, 0, s>>>(x, idx, n, out);
  SHARDLM_CUDA_CHECK_LAUNCH("gather_f32_kernel");
}

void launch_fill_random(GgmlType type, void* dst, int64_t n_rows, size_t row_stride, int64_t n_cols, uint64_t seed,
                        cudaStream_t s) {
  const auto& tt = type_traits(type);
  const int64_t row_bytes = n_cols / tt.block_size * tt.type_size;
  if (dq_grouped(type)) {
    fill_random_grouped_kernel<<<grid_for(n_rows * row_bytes, 256), 256, 0, s>>>(
        type, static_cast<uint8_t*>(dst), n_rows, row_stride, row_bytes, tt.type_size, seed);
    SHARDLM_CUDA_CHECK_LAUNCH("fill_random_grouped_kernel");
    return;
  }
  const int64_t block_bytes = tt.block_size == 1 ? 4 : tt.type_size;
  fill_random_kernel<<<grid_for(n_rows * row_bytes / 2, 256), 256, 0, s>>>(
      type, static_cast<uint8_t*>(dst), n_rows, row_stride, row_bytes, block_bytes, seed);
  SHARDLM_CUDA_CHECK_LAUNCH("fill_random_kernel");
}

}  // namespace shardlm::cuda_detail
