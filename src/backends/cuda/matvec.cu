// Matrix-vector products for decode (n_tok == 1): y = W x, W in any supported GgmlType, x and y f32.
//
// Decode reads every weight byte once, so these kernels are judged by bandwidth. Common design:
//  * a thread block owns kRows consecutive rows (x is loaded once into registers and used kRows times,
//    which keeps the L1 traffic for x below the HBM traffic even for 4-bit weights);
//  * its warps split each row's columns, and a shuffle + shared-memory reduction finishes each row;
//  * weights are read with 16-byte, warp-coalesced, L1-bypassing loads, several per thread issued
//    before the first use;
//  * block formats are dequantized in registers with exponent tricks (no int->float conversions, which
//    run at a quarter rate): a nibble q becomes the float 1 + q/16 with one LOP3 + PRMT, and the sum is
//    corrected once per unit with sum(x), so each element costs about 2.5 instructions.
// Block-format rows are only 2-byte aligned in general (18- and 34-byte blocks), so each warp copies
// chunks of 32 "units" per row into shared memory with aligned 16-byte cp.async copies covering them
// (a 3-stage ring: two chunks in flight while one is decoded), then every lane decodes one unit (32
// or 64 elements) from there.
// The other block types (kernels.cuh's dq_grouped: Q4_1 ... IQ1_M, MXFP4) take matvec_group8_kernel, a
// simpler kernel that decodes 8-element runs with dequant.cuh's dq_group8.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>

#include "backends/cuda/cuda_util.cuh"
#include "backends/cuda/dequant.cuh"
#include "backends/cuda/kernels.cuh"
#include "backends/cuda/pdl.cuh"
#include "backends/cuda/mv_common.cuh"

namespace shardlm::cuda_detail {
namespace {

constexpr int kRows = 4;  // rows per thread block (x reuse factor)


// Reduces acc[r] over the block and writes y[row0 + r] (rows past n_rows are dropped).
template <int R>
__device__ __forceinline__ void block_reduce_store(float (&acc)[R], float* y, int64_t row0, int64_t n_rows) {
  __shared__ float red[32][R];  // (warps, rows)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n_warps = blockDim.x / 32;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    float s = warp_sum(acc[r]);
    if (lane == 0) red[warp][r] = s;
  }
  __syncthreads();
  if (threadIdx.x < R) {
    float s = 0.0f;
    for (int w = 0; w < n_warps; ++w) s += red[w][threadIdx.x];
    if (row0 + threadIdx.x < n_rows) y[row0 + threadIdx.x] = s;
  }
}

// ---------------------------------------------------------------------------------------------------
// F32 / F16 / BF16: one 16-byte vector = 4 or 8 elements; kU vectors per row per thread in flight.
template <GgmlType T>
struct Plain;
template <>
struct Plain<GgmlType::F32> {
  static constexpr int kElems = 4;
  __device__ static void to_f32(const uint4& v, float (&o)[8]) {
    o[0] = __uint_as_float(v.x);
    o[1] = __uint_as_float(v.y);
    o[2] = __uint_as_float(v.z);
    o[3] = __uint_as_float(v.w);
  }
};
template <>
struct Plain<GgmlType::F16> {
  static constexpr int kElems = 8;
  __device__ static void to_f32(const uint4& v, float (&o)[8]) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[k]));
      o[2 * k] = f.x;
      o[2 * k + 1] = f.y;
    }
  }
};
template <>
struct Plain<GgmlType::BF16> {
  static constexpr int kElems = 8;
  __device__ static void to_f32(const uint4& v, float (&o)[8]) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      o[2 * k] = __uint_as_float(w[k] << 16);
      o[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
    }
  }
};

template <GgmlType T, int R, int U>
__global__ void __launch_bounds__(128) matvec_plain_kernel(
    const __grid_constant__ MvGroup grp,  // weights: (n_rows, row_stride bytes), 16-byte aligned rows; y: (n_rows)
    int64_t n_vec,                        // 16-byte vectors per row (n_cols / kElems)
    const float* __restrict__ x) {        // (n_cols)
  pdl_trigger();
  constexpr int E = Plain<T>::kElems;
  const MvSeg sg = mv_seg(grp, blockIdx.x);
  const uint8_t* __restrict__ w = sg.w;
  const size_t row_stride = sg.stride;
  const int64_t n_rows = sg.n_rows;
  float* __restrict__ y = sg.y;
  const int64_t row0 = sg.local * R;
  const uint8_t* rows[R];
#pragma unroll
  for (int r = 0; r < R; ++r) rows[r] = w + static_cast<size_t>(min(row0 + r, n_rows - 1)) * row_stride;
  float acc[R] = {};
  const int64_t step = static_cast<int64_t>(blockDim.x) * U;
  for (int64_t v0 = threadIdx.x; v0 < n_vec; v0 += step) {
    uint4 wv[R][U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t v = v0 + static_cast<int64_t>(u) * blockDim.x;
#pragma unroll
      for (int r = 0; r < R; ++r) wv[r][u] = (v < n_vec) ? ld_stream(rows[r] + 16 * v) : make_uint4(0, 0, 0, 0);
    }
    pdl_wait();  // the first weights are on their way before x (the previous kernel's output) is read
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t v = v0 + static_cast<int64_t>(u) * blockDim.x;
      if (v >= n_vec) break;
      float xs[8];
      const float4* xp = reinterpret_cast<const float4*>(x + v * E);
#pragma unroll
      for (int k = 0; k < E / 4; ++k) {
        float4 t = __ldg(xp + k);
        xs[4 * k] = t.x;
        xs[4 * k + 1] = t.y;
        xs[4 * k + 2] = t.z;
        xs[4 * k + 3] = t.w;
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float f[8];
        Plain<T>::to_f32(wv[r][u], f);
#pragma unroll
        for (int k = 0; k < E; ++k) acc[r] = fmaf(f[k], xs[k], acc[r]);
      }
    }
  }
  block_reduce_store<R>(acc, y, row0, n_rows);
}

// ---------------------------------------------------------------------------------------------------
// Block formats. A unit is what one lane decodes: a whole Q8_0/Q4_0 block (32 elements), or a quarter of
// a Q4_K/Q6_K super-block (64 elements). A chunk is 32 units of a row (contiguous bytes).
template <GgmlType T>
struct Quant;
template <>
struct Quant<GgmlType::Q4_0> {
  static constexpr int kBlockBytes = 18, kUnitsPerBlock = 1, kUnitElems = 32;
};
template <>
struct Quant<GgmlType::Q8_0> {
  static constexpr int kBlockBytes = 34, kUnitsPerBlock = 1, kUnitElems = 32;
};
template <>
struct Quant<GgmlType::Q4_K> {
  static constexpr int kBlockBytes = 144, kUnitsPerBlock = 4, kUnitElems = 64;
};
template <>
struct Quant<GgmlType::Q6_K> {
  static constexpr int kBlockBytes = 210, kUnitsPerBlock = 4, kUnitElems = 64;
};

template <GgmlType T>
struct Chunk {
  static constexpr int kBlocks = 32 / Quant<T>::kUnitsPerBlock;
  static constexpr int kBytes = kBlocks * Quant<T>::kBlockBytes;  // a multiple of 16 for every type
  // Aligned 16-byte vectors covering a chunk that starts anywhere (2-byte aligned), per lane.
  static constexpr int kVecPerLane = ((14 + kBytes + 15) / 16 + 31) / 32;
  static constexpr int kSmemBytes = kVecPerLane * 32 * 16 + 16;  // per (warp, row), +16: funnel reads
};
static_assert(Chunk<GgmlType::Q4_0>::kBytes % 16 == 0 && Chunk<GgmlType::Q8_0>::kBytes % 16 == 0 &&
              Chunk<GgmlType::Q4_K>::kBytes % 16 == 0 && Chunk<GgmlType::Q6_K>::kBytes % 16 == 0);

// N consecutive 32-bit words starting at a 2-byte-aligned shared-memory address.
template <int N>
__device__ __forceinline__ void lds_words(const uint8_t* p, uint32_t (&out)[N]) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const uint32_t* al = reinterpret_cast<const uint32_t*>(a & ~uintptr_t{3});
  const uint32_t sh = static_cast<uint32_t>(a & 3) * 8;
  uint32_t w[N + 1];
#pragma unroll
  for (int i = 0; i <= N; ++i) w[i] = al[i];
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = __funnelshift_r(w[i], w[i + 1], sh);
}
__device__ __forceinline__ uint16_t lds16(const uint8_t* p) { return *reinterpret_cast<const uint16_t*>(p); }

// Byte b (0..3) of each word as the float 1 + q/16 where the byte holds 0x80 | (q << 3).
template <int B>
__device__ __forceinline__ float byte_as_float(uint32_t w) {
  return __uint_as_float(__byte_perm(w, 0x3F000000u, 0x7044 | (B << 8)));
}
// Byte b (0..3) as the float 2^23 + byte.
template <int B>
__device__ __forceinline__ float byte_as_big(uint32_t w) {
  return __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7440 | B));
}

// sum_j x[j] * (1 + q_j/16) over 8 nibble-elements: the low nibbles of word w go with xl[0..3], the
// high nibbles with xh[0..3].
__device__ __forceinline__ void nib_dot(uint32_t w, const float* xl, const float* xh, float& al, float& ah) {
  const uint32_t lo = ((w << 3) & 0x78787878u) | 0x80808080u;
  const uint32_t hi = ((w >> 1) & 0x78787878u) | 0x80808080u;
  al = fmaf(xl[0], byte_as_float<0>(lo), al);
  al = fmaf(xl[1], byte_as_float<1>(lo), al);
  al = fmaf(xl[2], byte_as_float<2>(lo), al);
  al = fmaf(xl[3], byte_as_float<3>(lo), al);
  ah = fmaf(xh[0], byte_as_float<0>(hi), ah);
  ah = fmaf(xh[1], byte_as_float<1>(hi), ah);
  ah = fmaf(xh[2], byte_as_float<2>(hi), ah);
  ah = fmaf(xh[3], byte_as_float<3>(hi), ah);
}

// x of one unit, in registers, and the sums the exponent trick needs.
template <GgmlType T>
struct UnitX {
  float v[Quant<T>::kUnitElems];
  float s[4];  // partial sums of v (meaning per type, see load)
};

template <int N>
__device__ __forceinline__ void ldx(const float* p, float* dst) {
#pragma unroll
  for (int k = 0; k < N / 4; ++k) {
    float4 t = __ldg(reinterpret_cast<const float4*>(p) + k);
    dst[4 * k] = t.x;
    dst[4 * k + 1] = t.y;
    dst[4 * k + 2] = t.z;
    dst[4 * k + 3] = t.w;
  }
}
template <int N>
__device__ __forceinline__ float sum_of(const float* p) {
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < N; ++i) s += p[i];
  return s;
}

// Loads the x of unit `u` (0-based within the row) and precomputes its sums.
template <GgmlType T>
__device__ __forceinline__ void load_unit_x(const float* __restrict__ x, int64_t u, UnitX<T>& ux) {
  if constexpr (T == GgmlType::Q6_K) {
    // unit = (super-block u/4, half n, l-half lh): elements 128n + 16lh + l + 32*quarter, l < 16
    const int64_t sb = u / 4;
    const int j = static_cast<int>(u % 4), n = j / 2, lh = j % 2;
    const float* base = x + sb * 256 + 128 * n + 16 * lh;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      ldx<16>(base + 32 * q, ux.v + 16 * q);
      ux.s[q] = sum_of<16>(ux.v + 16 * q);
    }
  } else {
    ldx<Quant<T>::kUnitElems>(x + u * Quant<T>::kUnitElems, ux.v);
    if constexpr (T == GgmlType::Q4_K) {
      ux.s[0] = sum_of<32>(ux.v);
      ux.s[1] = sum_of<32>(ux.v + 32);
    } else if constexpr (T == GgmlType::Q4_0) {
      ux.s[0] = sum_of<32>(ux.v);
    }
  }
}

// Dot product of one unit (bytes of its block at `bp` in shared memory, unit index j within the block)
// with its x.
template <GgmlType T>
__device__ __forceinline__ float unit_dot(const uint8_t* bp, int j, const UnitX<T>& ux) {
  if constexpr (T == GgmlType::Q4_0) {
    const float d = f16_bits(lds16(bp));
    uint32_t q[4];
    lds_words<4>(bp + 2, q);
    float al = 0.0f, ah = 0.0f;
#pragma unroll
    for (int k = 0; k < 4; ++k) nib_dot(q[k], ux.v + 4 * k, ux.v + 16 + 4 * k, al, ah);
    // sum x (q - 8) = 16 (a - sum x) - 8 sum x
    return d * (16.0f * (al + ah) - 24.0f * ux.s[0]);
  } else if constexpr (T == GgmlType::Q8_0) {
    const float d = f16_bits(lds16(bp));
    uint32_t q[8];
    lds_words<8>(bp + 2, q);
    float a = 0.0f;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const uint32_t u = q[k] ^ 0x80808080u;  // q + 128 per byte
      constexpr float kBias = 8388608.0f + 128.0f;
      a = fmaf(ux.v[4 * k + 0], byte_as_big<0>(u) - kBias, a);
      a = fmaf(ux.v[4 * k + 1], byte_as_big<1>(u) - kBias, a);
      a = fmaf(ux.v[4 * k + 2], byte_as_big<2>(u) - kBias, a);
      a = fmaf(ux.v[4 * k + 3], byte_as_big<3>(u) - kBias, a);
    }
    return d * a;
  } else if constexpr (T == GgmlType::Q4_K) {
    // pair j: sub-blocks 2j (low nibbles of qs[32j..32j+32)) and 2j+1 (high nibbles)
    const float d = f16_bits(lds16(bp)), dmin = f16_bits(lds16(bp + 2));
    const uint8_t* sc = bp + 4;
    const int s0 = 2 * j, s1 = 2 * j + 1;
    int sc0, m0, sc1, m1;
    if (j < 2) {
      sc0 = sc[s0] & 63;
      m0 = sc[s0 + 4] & 63;
      sc1 = sc[s1] & 63;
      m1 = sc[s1 + 4] & 63;
    } else {
      sc0 = (sc[s0 + 4] & 0xF) | ((sc[s0 - 4] >> 6) << 4);
      m0 = (sc[s0 + 4] >> 4) | ((sc[s0] >> 6) << 4);
      sc1 = (sc[s1 + 4] & 0xF) | ((sc[s1 - 4] >> 6) << 4);
      m1 = (sc[s1 + 4] >> 4) | ((sc[s1] >> 6) << 4);
    }
    uint32_t q[8];
    lds_words<8>(bp + 16 + 32 * j, q);
    float al = 0.0f, ah = 0.0f;
#pragma unroll
    for (int k = 0; k < 8; ++k) nib_dot(q[k], ux.v + 4 * k, ux.v + 32 + 4 * k, al, ah);
    // sum x*q = 16 (a - sum x); element = d*sc*q - dmin*m
    const float ql = 16.0f * (al - ux.s[0]), qh = 16.0f * (ah - ux.s[1]);
    return d * (sc0 * ql + sc1 * qh) - dmin * (m0 * ux.s[0] + m1 * ux.s[1]);
  } else {  // Q6_K, unit j = (half n = j/2, l-half lh = j%2)
    const int n = j / 2, lh = j % 2;
    const float d = f16_bits(lds16(bp + 208));
    const int8_t* sc = reinterpret_cast<const int8_t*>(bp + 192 + 8 * n) + lh;
    uint32_t a[4], b[4], h[4];
    lds_words<4>(bp + 64 * n + 16 * lh, a);        // ql[l]
    lds_words<4>(bp + 64 * n + 32 + 16 * lh, b);   // ql[l + 32]
    lds_words<4>(bp + 128 + 32 * n + 16 * lh, h);  // qh[l]
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      // 6-bit values (0..63) per byte, shifted left by 1 and tagged 0x80: the float 1 + q/64
      uint32_t q[4];
      q[0] = (a[k] & 0x0F0F0F0Fu) | ((h[k] << 4) & 0x30303030u);
      q[1] = (b[k] & 0x0F0F0F0Fu) | ((h[k] << 2) & 0x30303030u);
      q[2] = ((a[k] >> 4) & 0x0F0F0F0Fu) | (h[k] & 0x30303030u);
      q[3] = ((b[k] >> 4) & 0x0F0F0F0Fu) | ((h[k] >> 2) & 0x30303030u);
#pragma unroll
      for (int qq = 0; qq < 4; ++qq) {
        const uint32_t t = (q[qq] << 1) | 0x80808080u;
        const float* xv = ux.v + 16 * qq + 4 * k;
        acc[qq] = fmaf(xv[0], byte_as_float<0>(t), acc[qq]);
        acc[qq] = fmaf(xv[1], byte_as_float<1>(t), acc[qq]);
        acc[qq] = fmaf(xv[2], byte_as_float<2>(t), acc[qq]);
        acc[qq] = fmaf(xv[3], byte_as_float<3>(t), acc[qq]);
      }
    }
    // sum x (q - 32) = 64 (a - sum x) - 32 sum x = 64 a - 96 sum x
    float r = 0.0f;
#pragma unroll
    for (int qq = 0; qq < 4; ++qq) r = fmaf(static_cast<float>(sc[2 * qq]), 64.0f * acc[qq] - 96.0f * ux.s[qq], r);
    return d * r;
  }
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const auto s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// Each warp streams its chunks (c = warp, warp + W, ...) of the block's R rows through an S-stage ring
// of shared-memory buffers filled by cp.async (no registers held by loads in flight): S - 1 chunks are
// in flight while one is decoded.
template <GgmlType T, int R, int S>
__global__ void __launch_bounds__(128) matvec_quant_kernel(
    const uint8_t* __restrict__ w,  // (n_rows, row_stride bytes), rows 2-byte aligned
    size_t row_stride,              // bytes between rows
    int64_t n_rows,                 // rows of W
    int64_t n_units,                // units per row (n_cols / kUnitElems)
    const float* __restrict__ x,    // (n_cols)
    float* __restrict__ y) {        // (n_rows)
  pdl_enter();
  using C = Chunk<T>;
  using Q = Quant<T>;
  extern __shared__ __align__(16) uint8_t smem[];  // (warps, S stages, R rows, C::kSmemBytes)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n_warps = blockDim.x / 32;
  uint8_t* my = smem + static_cast<size_t>(warp) * S * R * C::kSmemBytes;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * R;
  const int64_t row_bytes = n_units / Q::kUnitsPerBlock * Q::kBlockBytes;
  const int64_t n_chunks = (n_units + 31) / 32;
  const int64_t n_mine = warp < n_chunks ? (n_chunks - warp + n_warps - 1) / n_warps : 0;

  const uint8_t* base[R];  // 16-byte aligned address at or before each row's start
  int head[R];             // row start - base
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const uint8_t* p = w + static_cast<size_t>(min(row0 + r, n_rows - 1)) * row_stride;
    base[r] = reinterpret_cast<const uint8_t*>(reinterpret_cast<uintptr_t>(p) & ~uintptr_t{15});
    head[r] = static_cast<int>(p - base[r]);
  }
  auto issue = [&](int64_t i) {  // the warp's i-th chunk into stage i % S
    if (i < n_mine) {
      const int64_t b0 = (warp + i * n_warps) * C::kBytes;
      const int64_t nb = min(static_cast<int64_t>(C::kBytes), row_bytes - b0);
      uint8_t* stage = my + (i % S) * R * C::kSmemBytes;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int nvec = static_cast<int>((head[r] + nb + 15) / 16);
#pragma unroll
        for (int k = 0; k < C::kVecPerLane; ++k) {
          const int v = lane + 32 * k;
          if (v < nvec) cp_async16(stage + r * C::kSmemBytes + 16 * v, base[r] + b0 + 16 * v);
        }
      }
    }
    cp_async_commit();  // empty groups too, so that wait_group counts stay uniform
  };

  float acc[R] = {};
#pragma unroll
  for (int i = 0; i < S - 1; ++i) issue(i);
  for (int64_t i = 0; i < n_mine; ++i) {
    const int64_t u = (warp + i * n_warps) * 32 + lane;
    UnitX<T> ux;
    if (u < n_units) load_unit_x<T>(x, u, ux);  // x does not wait for the weights
    cp_async_wait<S - 2>();
    __syncwarp();
    issue(i + S - 1);  // refills the stage decoded in the previous iteration
    if (u < n_units) {
      const uint8_t* stage = my + (i % S) * R * C::kSmemBytes;
      const int blk = lane / Q::kUnitsPerBlock, j = lane % Q::kUnitsPerBlock;
#pragma unroll
      for (int r = 0; r < R; ++r)
        acc[r] += unit_dot<T>(stage + r * C::kSmemBytes + head[r] + blk * Q::kBlockBytes, j, ux);
    }
    __syncwarp();
  }
  cp_async_wait<0>();
  block_reduce_store<R>(acc, y, row0, n_rows);
}

// ---------------------------------------------------------------------------------------------------
// Block formats, rows across lanes (the fast path when rows are 16-byte aligned and n_cols % 256 == 0).
//
// Each lane owns one row (RPW rows per warp; with RPW < 32, LPR = 32 / RPW lane groups take different
// column items of the same rows), so the x a lane needs is the same for all RPW lanes of its group: x is
// read with broadcast float4 loads (one L1 wavefront) and its 16-element sums come from a per-block
// table in shared memory (the exponent tricks need sum(x); computing it per lane would cost 1 instr/elem).
// An item is 256 columns: 8 Q4_0/Q8_0 blocks (144/272 bytes, 16-byte aligned) or one Q4_K super-block
// (144 bytes), or one Q6_K super-block (210 bytes: read through a 224-byte 16-byte-aligned window whose
// phase, 2 * (item % 8) bytes, is the same for every lane of the warp, so that the decode is a
// compile-time-specialised switch). Each warp streams its items of its rows into shared memory with
// warp-coalesced 16-byte cp.async (3-stage ring); a lane then reads its own row's item with conflict-free
// 16-byte shared loads (slot strides of 36/68/60 words) into registers and decodes it with compile-time
// byte offsets.
template <GgmlType T>
struct Item;
template <>
struct Item<GgmlType::Q4_0> {
  static constexpr int kWin = 144, kSlot = 144, kStride = 144;  // bytes: window read, smem slot, global step
};
template <>
struct Item<GgmlType::Q8_0> {
  static constexpr int kWin = 272, kSlot = 272, kStride = 272;
};
template <>
struct Item<GgmlType::Q4_K> {
  static constexpr int kWin = 144, kSlot = 144, kStride = 144;
};
template <>
struct Item<GgmlType::Q6_K> {
  static constexpr int kWin = 224, kSlot = 240, kStride = 210;
};

// The 32-bit word / 16-bit half / byte at byte offset o (even; a compile-time constant after unrolling)
// of a register array.
__device__ __forceinline__ uint32_t word_at(const uint32_t* g, int o) {
  return (o % 4 == 0) ? g[o / 4] : __byte_perm(g[o / 4], g[o / 4 + 1], 0x5432);
}
__device__ __forceinline__ uint32_t half_at(const uint32_t* g, int o) {
  return (o % 4 == 0) ? (g[o / 4] & 0xFFFFu) : (g[o / 4] >> 16);
}
__device__ __forceinline__ uint32_t byte_at(const uint32_t* g, int o) { return (g[o / 4] >> (8 * (o % 4))) & 0xFFu; }
__device__ __forceinline__ float f16_of(uint32_t h) { return f16_bits(static_cast<uint16_t>(h)); }

template <int N>
__device__ __forceinline__ void ldx_bcast(const float* __restrict__ p, float* dst) {
#pragma unroll
  for (int k = 0; k < N / 4; ++k) {
    const float4 t = __ldg(reinterpret_cast<const float4*>(p) + k);
    dst[4 * k] = t.x;
    dst[4 * k + 1] = t.y;
    dst[4 * k + 2] = t.z;
    dst[4 * k + 3] = t.w;
  }
}

// Dot product of one item (bytes in g, the item starting at byte P of g) with x (256 floats at xp) given
// the sums of x over its 16 aligned 16-element pieces (s16).
template <int N>
__device__ __forceinline__ void ldx_smem(const float* p, float* dst) {
#pragma unroll
  for (int k = 0; k < N / 4; ++k) {
    const float4 t = reinterpret_cast<const float4*>(p)[k];
    dst[4 * k] = t.x;
    dst[4 * k + 1] = t.y;
    dst[4 * k + 2] = t.z;
    dst[4 * k + 3] = t.w;
  }
}

template <GgmlType T, int P>
__device__ __forceinline__ float item_dot(const uint32_t* g, const float* xp, const float* s16) {
  float acc = 0.0f;
  if constexpr (T == GgmlType::Q4_0) {
#pragma unroll
    for (int b = 0; b < 8; ++b) {
      const int o = 18 * b;
      float xv[32];
      ldx_smem<32>(xp + 32 * b, xv);
      const float d = f16_of(half_at(g, o));
      float al = 0.0f, ah = 0.0f;
#pragma unroll
      for (int k = 0; k < 4; ++k) nib_dot(word_at(g, o + 2 + 4 * k), xv + 4 * k, xv + 16 + 4 * k, al, ah);
      const float sx = s16[2 * b] + s16[2 * b + 1];
      acc = fmaf(d, 16.0f * (al + ah) - 24.0f * sx, acc);
    }
  } else if constexpr (T == GgmlType::Q8_0) {
#pragma unroll
    for (int b = 0; b < 8; ++b) {
      const int o = 34 * b;
      float xv[32];
      ldx_smem<32>(xp + 32 * b, xv);
      const float d = f16_of(half_at(g, o));
      float a0 = 0.0f, a1 = 0.0f;
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const uint32_t u = word_at(g, o + 2 + 4 * k) ^ 0x80808080u;  // q + 128 per byte
        constexpr float kBias = 8388608.0f + 128.0f;
        float& a = (k & 1) ? a1 : a0;
        a = fmaf(xv[4 * k + 0], byte_as_big<0>(u) - kBias, a);
        a = fmaf(xv[4 * k + 1], byte_as_big<1>(u) - kBias, a);
        a = fmaf(xv[4 * k + 2], byte_as_big<2>(u) - kBias, a);
        a = fmaf(xv[4 * k + 3], byte_as_big<3>(u) - kBias, a);
      }
      acc = fmaf(d, a0 + a1, acc);
    }
  } else if constexpr (T == GgmlType::Q4_K) {
    const float d = f16_of(half_at(g, 0)), dmin = f16_of(half_at(g, 2));
    float sum_scaled = 0.0f, sum_min = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // sub-blocks 2j (low nibbles of qs[32j..32j+32)) and 2j+1 (high nibbles)
      const int s0 = 2 * j, s1 = 2 * j + 1;
      int sc0, m0, sc1, m1;
      if (j < 2) {
        sc0 = byte_at(g, 4 + s0) & 63;
        m0 = byte_at(g, 4 + s0 + 4) & 63;
        sc1 = byte_at(g, 4 + s1) & 63;
        m1 = byte_at(g, 4 + s1 + 4) & 63;
      } else {
        sc0 = (byte_at(g, 4 + s0 + 4) & 0xF) | ((byte_at(g, 4 + s0 - 4) >> 6) << 4);
        m0 = (byte_at(g, 4 + s0 + 4) >> 4) | ((byte_at(g, 4 + s0) >> 6) << 4);
        sc1 = (byte_at(g, 4 + s1 + 4) & 0xF) | ((byte_at(g, 4 + s1 - 4) >> 6) << 4);
        m1 = (byte_at(g, 4 + s1 + 4) >> 4) | ((byte_at(g, 4 + s1) >> 6) << 4);
      }
      float xv[64];
      ldx_smem<64>(xp + 64 * j, xv);
      float al0 = 0.0f, ah0 = 0.0f, al1 = 0.0f, ah1 = 0.0f;
#pragma unroll
      for (int k = 0; k < 8; k += 2) {
        nib_dot(g[(16 + 32 * j) / 4 + k], xv + 4 * k, xv + 32 + 4 * k, al0, ah0);
        nib_dot(g[(16 + 32 * j) / 4 + k + 1], xv + 4 * k + 4, xv + 36 + 4 * k, al1, ah1);
      }
      const float sx0 = s16[4 * j] + s16[4 * j + 1], sx1 = s16[4 * j + 2] + s16[4 * j + 3];
      // sum x*q = 16 (a - sum x); element = d*sc*q - dmin*m
      const float ql = 16.0f * ((al0 + al1) - sx0), qh = 16.0f * ((ah0 + ah1) - sx1);
      sum_scaled += static_cast<float>(sc0) * ql + static_cast<float>(sc1) * qh;
      sum_min += static_cast<float>(m0) * sx0 + static_cast<float>(m1) * sx1;
    }
    acc = d * sum_scaled - dmin * sum_min;
  } else {  // Q6_K super-block at byte P of the window; unit (half n, l-half lh) as in unit_dot
    float r = 0.0f;
#pragma unroll
    for (int n = 0; n < 2; ++n) {
#pragma unroll
      for (int lh = 0; lh < 2; ++lh) {
        float xv[64];  // 4 pieces of 16: elements 128n + 16lh + 32qq + l
#pragma unroll
        for (int qq = 0; qq < 4; ++qq) ldx_smem<16>(xp + 128 * n + 16 * lh + 32 * qq, xv + 16 * qq);
        float acc4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const uint32_t a = word_at(g, P + 64 * n + 16 * lh + 4 * k);        // ql[l]
          const uint32_t b = word_at(g, P + 64 * n + 32 + 16 * lh + 4 * k);   // ql[l + 32]
          const uint32_t h = word_at(g, P + 128 + 32 * n + 16 * lh + 4 * k);  // qh[l]
          uint32_t q[4];
          q[0] = (a & 0x0F0F0F0Fu) | ((h << 4) & 0x30303030u);
          q[1] = (b & 0x0F0F0F0Fu) | ((h << 2) & 0x30303030u);
          q[2] = ((a >> 4) & 0x0F0F0F0Fu) | (h & 0x30303030u);
          q[3] = ((b >> 4) & 0x0F0F0F0Fu) | ((h >> 2) & 0x30303030u);
#pragma unroll
          for (int qq = 0; qq < 4; ++qq) {
            const uint32_t t = (q[qq] << 1) | 0x80808080u;  // the float 1 + q/64
            const float* xq = xv + 16 * qq + 4 * k;
            acc4[qq] = fmaf(xq[0], byte_as_float<0>(t), acc4[qq]);
            acc4[qq] = fmaf(xq[1], byte_as_float<1>(t), acc4[qq]);
            acc4[qq] = fmaf(xq[2], byte_as_float<2>(t), acc4[qq]);
            acc4[qq] = fmaf(xq[3], byte_as_float<3>(t), acc4[qq]);
          }
        }
        // sum x (q - 32) = 64 (a - sum x) - 32 sum x = 64 a - 96 sum x
#pragma unroll
        for (int qq = 0; qq < 4; ++qq) {
          const float sc = static_cast<float>(static_cast<int8_t>(byte_at(g, P + 192 + 8 * n + lh + 2 * qq)));
          r = fmaf(sc, 64.0f * acc4[qq] - 96.0f * s16[8 * n + lh + 2 * qq], r);
        }
      }
    }
    acc = f16_of(half_at(g, P + 208)) * r;
  }
  return acc;
}

template <GgmlType T>
__device__ __forceinline__ float item_dot_phase(const uint32_t* g, int phase, const float* xp, const float* s16) {
  if constexpr (T != GgmlType::Q6_K) {
    return item_dot<T, 0>(g, xp, s16);
  } else {
    switch (phase) {  // warp-uniform
      case 0: return item_dot<T, 0>(g, xp, s16);
      case 2: return item_dot<T, 2>(g, xp, s16);
      case 4: return item_dot<T, 4>(g, xp, s16);
      case 6: return item_dot<T, 6>(g, xp, s16);
      case 8: return item_dot<T, 8>(g, xp, s16);
      case 10: return item_dot<T, 10>(g, xp, s16);
      case 12: return item_dot<T, 12>(g, xp, s16);
      default: return item_dot<T, 14>(g, xp, s16);
    }
  }
}

// Item of (warp step j, lane group k): Q6_K keeps the 8 phases aligned across lane groups (items 8 apart
// share a phase); the others take LPR consecutive items per step.
template <GgmlType T, int LPR>
__device__ __forceinline__ int64_t step_item(int64_t j, int k) {
  if constexpr (T == GgmlType::Q6_K) return (j >> 3) * 8 * LPR + 8 * k + (j & 7);
  else return j * LPR + k;
}

// Shared-memory copy of x: item i's 256 floats at i * 288 + a skew of 4 * ((i + i / 8) % 8) floats, so that
// the LPR items a warp reads at once (consecutive, or 8 apart for Q6_K) sit in different banks.
__host__ __device__ constexpr int64_t xs_item_base(int64_t i) { return i * 288 + 4 * ((i + (i >> 3)) & 7); }

template <GgmlType T>
struct RowsCfg {
  static constexpr int kRPW = (T == GgmlType::Q6_K) ? 16 : 8;  // rows per warp (a unit of work)
  static constexpr int kStages = 3;
  // Warps per block at most (registers: the 272/224-byte items need more than 128 per thread).
  static constexpr int kMaxWarps = (Item<T>::kSlot == 144) ? 16 : 8;
};

// Persistent grid: unit u (RPW rows x all columns) goes to warp (u / gridDim.x) % W of block u % gridDim.x,
// so that small matrices still spread over every SM. A warp streams the steps of all its units through
// one cp.async ring (the next unit's weights are in flight while the last steps of the current one are
// decoded); x and its 16-element sums are copied to shared memory once per block.
template <GgmlType T>
__global__ void __launch_bounds__(RowsCfg<T>::kMaxWarps * 32) matvec_rows_kernel(
    const __grid_constant__ MvGroup grp,  // weights (n_rows, row_stride bytes): 16-byte aligned rows, stride
                                          // a multiple of 16; y (n_rows); first[] counts units
    int64_t n_units,                      // units of all segments
    int64_t n_items,                      // items (256 columns) per row
    const float* __restrict__ x) {        // (n_cols), 16-byte aligned
  pdl_enter();
  using I = Item<T>;
  constexpr int RPW = RowsCfg<T>::kRPW, S = RowsCfg<T>::kStages;
  constexpr int LPR = 32 / RPW;
  constexpr int V = I::kWin / 16;   // 16-byte vectors per slot, and cp.async per lane per step
  constexpr int KOFF = (T == GgmlType::Q6_K) ? 8 * I::kStride : I::kStride;  // item step between lane groups
  extern __shared__ __align__(16) uint8_t smem[];  // [sums16: n_items*16] [xs: n_items*288] [ring (W, S, 32)]
  float* s16 = reinterpret_cast<float*>(smem);
  float* xs = s16 + n_items * 16;
  uint8_t* ring = reinterpret_cast<uint8_t*>(xs + n_items * 288);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n_warps = blockDim.x / 32;
  uint8_t* my = ring + static_cast<size_t>(warp) * S * 32 * I::kSlot;
  const int64_t n_steps = (T == GgmlType::Q6_K) ? (n_items + 8 * LPR - 1) / (8 * LPR) * 8 : (n_items + LPR - 1) / LPR;
  const int64_t u_first = static_cast<int64_t>(warp) * gridDim.x + blockIdx.x;
  const int64_t u_step = static_cast<int64_t>(gridDim.x) * n_warps;
  const int64_t my_units = u_first < n_units ? (n_units - u_first + u_step - 1) / u_step : 0;
  const int64_t total = my_units * n_steps;  // the warp's steps, all units

  // This lane's V copies per step: slot (k * RPW + r) = row r's item of lane group k.
  int rk[V];        // r | k << 8
  uint32_t dst[V];  // slot byte offset in a stage
#pragma unroll
  for (int m = 0; m < V; ++m) {
    const int v = lane + 32 * m, slot = v / V, off = v % V;
    rk[m] = (slot % RPW) | ((slot / RPW) << 8);
    dst[m] = static_cast<uint32_t>(slot * I::kSlot + 16 * off);
  }
  const uint8_t* src[V];  // for the unit being issued
  int64_t iu = u_first, iq = 0;  // unit and step of the next issue
  auto set_unit = [&](int64_t u) {
    const MvSeg sg = mv_seg(grp, u);
#pragma unroll
    for (int m = 0; m < V; ++m) {
      const int r = rk[m] & 0xFF, k = rk[m] >> 8, off = (dst[m] % I::kSlot) / 16;
      src[m] = sg.w + static_cast<size_t>(min(sg.local * RPW + r, sg.n_rows - 1)) * sg.stride +
               static_cast<size_t>(k) * KOFF + 16 * off;
    }
  };
  if (my_units > 0) set_unit(iu);
  auto issue = [&](int64_t i) {  // the warp's i-th step into stage i % S
    if (i < total) {
      const int64_t it0 = step_item<T, LPR>(iq, 0);
      const size_t base = (T == GgmlType::Q6_K) ? (static_cast<size_t>(it0) * I::kStride) & ~size_t{15}
                                                 : static_cast<size_t>(it0) * I::kStride;
      uint8_t* stage = my + (i % S) * 32 * I::kSlot;
#pragma unroll
      for (int m = 0; m < V; ++m)
        if (step_item<T, LPR>(iq, rk[m] >> 8) < n_items) cp_async16(stage + dst[m], src[m] + base);
      if (++iq == n_steps) {
        iq = 0;
        iu += u_step;
        if (i + 1 < total) set_unit(iu);
      }
    }
    cp_async_commit();  // empty groups too, so that wait_group counts stay uniform
  };
#pragma unroll
  for (int i = 0; i < S - 1; ++i) issue(i);

  // x and its 16-element sums into shared memory, while the first weights are in flight.
  for (int64_t p0 = threadIdx.x; p0 < n_items * 16; p0 += 2 * blockDim.x) {
    float v[2][16];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t p = p0 + h * blockDim.x;
      if (p < n_items * 16) ldx_bcast<16>(x + 16 * p, v[h]);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t p = p0 + h * blockDim.x;
      if (p < n_items * 16) {
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < 16; ++i) s += v[h][i];
        s16[p] = s;
        float4* d = reinterpret_cast<float4*>(xs + xs_item_base(p / 16) + 16 * (p % 16));
#pragma unroll
        for (int i = 0; i < 4; ++i) d[i] = make_float4(v[h][4 * i], v[h][4 * i + 1], v[h][4 * i + 2], v[h][4 * i + 3]);
      }
    }
  }
  __syncthreads();

  const int my_k = lane / RPW;
  int64_t du = u_first, dq = 0;  // unit and step being decoded
  float acc = 0.0f;
  for (int64_t i = 0; i < total; ++i) {
    cp_async_wait<S - 2>();
    __syncwarp();
    issue(i + S - 1);  // refills the stage decoded in the previous iteration
    const int64_t item = step_item<T, LPR>(dq, my_k);
    if (item < n_items) {
      const uint4* sp = reinterpret_cast<const uint4*>(my + (i % S) * 32 * I::kSlot + lane * I::kSlot);
      uint32_t g[4 * V];
#pragma unroll
      for (int m = 0; m < V; ++m) {
        const uint4 t = sp[m];
        g[4 * m] = t.x;
        g[4 * m + 1] = t.y;
        g[4 * m + 2] = t.z;
        g[4 * m + 3] = t.w;
      }
      const int phase = static_cast<int>((item * I::kStride) & 15);
      acc += item_dot_phase<T>(g, phase, xs + xs_item_base(item), s16 + item * 16);
    }
    if (++dq == n_steps) {  // unit done: combine the lane groups, store its rows
#pragma unroll
      for (int o = 16; o >= RPW; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
      const MvSeg sg = mv_seg(grp, du);
      if (lane < RPW && sg.local * RPW + lane < sg.n_rows) sg.y[sg.local * RPW + lane] = acc;
      acc = 0.0f;
      dq = 0;
      du += u_step;
    }
    __syncwarp();
  }
  cp_async_wait<0>();
}

// ---------------------------------------------------------------------------------------------------
// Fallback for any layout: one warp per row, element by element.
__global__ void matvec_generic_kernel(GgmlType type, const uint8_t* __restrict__ w /* (n_rows, row_stride) */,
                                      size_t row_stride, int64_t n_rows, int64_t n_cols,
                                      const float* __restrict__ x /* (n_cols) */, float* __restrict__ y /* (n_rows) */) {
  pdl_enter();
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= n_rows) return;
  const uint8_t* p = w + static_cast<size_t>(row) * row_stride;
  float acc = 0.0f;
  for (int64_t c = lane; c < n_cols; c += 32) acc = fmaf(dq_elem(type, p, c), x[c], acc);
  acc = warp_sum(acc);
  if (lane == 0) y[row] = acc;
}

// The grouped types (kernels.cuh's dq_grouped: Q4_1 ... IQ1_M, MXFP4), which have no fast kernel: each lane
// decodes runs of 8 elements with dq_group8 (a warp step covers 256 columns: one super-block of the K/IQ
// types, eight blocks of the 32-element ones), so every scale and grid entry is decoded once per 8 elements.
// A warp owns R rows and walks them in chunks of U warp steps: it copies each row's chunk (U * step bytes,
// at any alignment) into its shared-memory buffer with warp-coalesced, L1-bypassing 16-byte loads of the
// aligned words covering it (the next chunk's loads are issued before the current one is decoded, so they
// are in flight during the decode), then every lane decodes its U runs of each row from shared memory
// (dq_group8<true>: byte and word loads there are cheap, where the same loads from global memory made the
// kernel load-issue bound) and multiplies them with the same 8 x values (one x load serves R rows). x is
// read as two float4 per run when it is 16-byte aligned (x_vec), else element by element.
template <GgmlType T>
constexpr int group8_step_bytes() {  // bytes of 256 columns
  switch (T) {
    case GgmlType::Q4_1: return 8 * 20;
    case GgmlType::Q5_0: return 8 * 22;
    case GgmlType::Q5_1: return 8 * 24;
    case GgmlType::MXFP4: return 8 * 17;
    case GgmlType::IQ4_NL: return 8 * 18;
    case GgmlType::Q2_K: return 84;
    case GgmlType::Q3_K: return 110;
    case GgmlType::Q5_K: return 176;
    case GgmlType::IQ2_XXS: return 66;
    case GgmlType::IQ2_XS: return 74;
    case GgmlType::IQ2_S: return 82;
    case GgmlType::IQ3_XXS: return 98;
    case GgmlType::IQ3_S: return 110;
    case GgmlType::IQ1_S: return 50;
    case GgmlType::IQ1_M: return 56;
    case GgmlType::IQ4_XS: return 136;
    default: return 0;
  }
}

constexpr int kG8Warps = 4;

template <GgmlType T, int U, int R>
__global__ void __launch_bounds__(kG8Warps * 32) matvec_group8_kernel(
    const uint8_t* __restrict__ w /* (n_rows, row_stride) */, size_t row_stride, int64_t n_rows,
    int64_t n_grp /* n_cols / 8 */, size_t row_bytes, const float* __restrict__ x /* (n_cols) */, bool x_vec,
    float* __restrict__ y /* (n_rows) */) {
  constexpr int kChunk = U * group8_step_bytes<T>();  // bytes of a chunk of a row
  constexpr int kVec = (kChunk + 30) / 16;             // aligned 16-byte words covering it, at most
  constexpr int kPer = (kVec + 31) / 32;               // per lane
  static_assert(group8_step_bytes<T>() > 0);
  __shared__ __align__(16) uint8_t stage[kG8Warps][R][kVec * 16];
  pdl_enter();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * kG8Warps + warp) * R;
  if (row0 >= n_rows) return;
  const int64_t n_chunks = (n_grp + 32 * U - 1) / (32 * U);
  const uint8_t* rows[R];
  bool live[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    live[r] = row0 + r < n_rows;
    rows[r] = w + static_cast<size_t>(live[r] ? row0 + r : row0) * row_stride;
  }
  uint4 buf[R][kPer];
  auto load = [&](int64_t c) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const uintptr_t start = reinterpret_cast<uintptr_t>(rows[r]) + static_cast<uintptr_t>(c) * kChunk;
      const uintptr_t end = reinterpret_cast<uintptr_t>(rows[r]) + row_bytes;
      const uintptr_t a0 = start & ~uintptr_t{15};
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        const int idx = lane + 32 * j;
        const uintptr_t a = a0 + 16 * static_cast<uintptr_t>(idx);
        buf[r][j] = (live[r] && idx < kVec && a < end) ? ld_stream(reinterpret_cast<const void*>(a)) : make_uint4(0, 0, 0, 0);
      }
    }
  };
  float acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0.0f;
  load(0);
  for (int64_t c = 0; c < n_chunks; ++c) {
    __syncwarp();  // the previous chunk's decode is done with the buffer
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int j = 0; j < kPer; ++j)
        if (lane + 32 * j < kVec) reinterpret_cast<uint4*>(stage[warp][r])[lane + 32 * j] = buf[r][j];
    __syncwarp();
    if (c + 1 < n_chunks) load(c + 1);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int gl = lane + 32 * u;  // run within the chunk
      const int64_t g = c * 32 * U + gl;
      if (g < n_grp) {
        float xs[8];
        if (x_vec) {
          const float4 a = __ldg(reinterpret_cast<const float4*>(x + 8 * g));
          const float4 b = __ldg(reinterpret_cast<const float4*>(x + 8 * g) + 1);
          xs[0] = a.x;
          xs[1] = a.y;
          xs[2] = a.z;
          xs[3] = a.w;
          xs[4] = b.x;
          xs[5] = b.y;
          xs[6] = b.z;
          xs[7] = b.w;
        } else {
#pragma unroll
          for (int i = 0; i < 8; ++i) xs[i] = __ldg(x + 8 * g + i);
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const int off = static_cast<int>((reinterpret_cast<uintptr_t>(rows[r]) + static_cast<uintptr_t>(c) * kChunk) & 15);
          float v[8];
          dq_group8<true>(T, stage[warp][r] + off, gl, v);
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[r] = fmaf(v[i], xs[i], acc[r]);
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const float a = warp_sum(acc[r]);
    if (lane == 0 && live[r]) y[row0 + r] = a;
  }
}

template <GgmlType T>
void launch_group8(const void* w, size_t stride, int64_t n_rows, int64_t n_cols, const float* x, float* y,
                   cudaStream_t s) {
  constexpr int kU = 8, kR = 2;
  const int64_t per_block = int64_t{kG8Warps} * kR;
  const size_t row_bytes = static_cast<size_t>(n_cols / 256) * group8_step_bytes<T>() +
                           static_cast<size_t>(n_cols % 256 / 32) * (group8_step_bytes<T>() / 8);
  launch_pdl(matvec_group8_kernel<T, kU, kR>, dim3(static_cast<unsigned>((n_rows + per_block - 1) / per_block)),
             dim3(kG8Warps * 32), 0, s, static_cast<const uint8_t*>(w), stride, n_rows, n_cols / 8, row_bytes, x,
             aligned16(x), y);
  SHARDLM_CUDA_CHECK_LAUNCH("matvec_group8_kernel");
}

MvGroup one_group(const void* w, size_t stride, int64_t n_rows, float* y) {
  MvGroup g;
  g.n = 1;
  g.w[0] = static_cast<const uint8_t*>(w);
  g.stride[0] = stride;
  g.n_rows[0] = n_rows;
  g.y[0] = y;
  return g;
}

// `g` without first[] (filled here).
template <GgmlType T>
void launch_plain_group(MvGroup g, int64_t n_cols, const float* x, cudaStream_t s) {
  constexpr int U = 2;
  const int64_t n_vec = n_cols / Plain<T>::kElems;
  // Fewer warps when the row is short, so that threads don't idle.
  const int threads = static_cast<int>(std::clamp<int64_t>((n_vec / U + 31) / 32 * 32, 32, 128));
  int64_t blocks = 0;
  for (int k = 0; k < g.n; ++k) {
    g.first[k] = blocks;
    blocks += (g.n_rows[k] + kRows - 1) / kRows;
  }
  launch_pdl(matvec_plain_kernel<T, kRows, U>, dim3(static_cast<unsigned>(blocks)), dim3(threads), 0, s, g, n_vec, x);
  SHARDLM_CUDA_CHECK_LAUNCH("matvec_plain_kernel");
}

template <GgmlType T>
void launch_plain(const void* w, size_t stride, int64_t n_rows, int64_t n_cols, const float* x, float* y,
                  cudaStream_t s) {
  launch_plain_group<T>(one_group(w, stride, n_rows, y), n_cols, x, s);
}

template <GgmlType T>
void launch_quant(const void* w, size_t stride, int64_t n_rows, int64_t n_cols, const float* x, float* y,
                  cudaStream_t s) {
  constexpr int kStages = 3;
  const int64_t n_units = n_cols / Quant<T>::kUnitElems;
  const int64_t n_chunks = (n_units + 31) / 32;
  // Enough chunks per warp (>= 4) for the pipeline to fill; more warps per row only for long rows.
  const int warps = static_cast<int>(std::clamp<int64_t>(n_chunks / 4, 1, 4));
  const size_t smem = static_cast<size_t>(warps) * kStages * kRows * Chunk<T>::kSmemBytes;
  auto kernel = matvec_quant_kernel<T, kRows, kStages>;
  if (smem > 48 * 1024)
    SHARDLM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  // Keep about a third of the unified L1/shared storage as L1: x (16-56 KB) is read by every block.
  SHARDLM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, 66));
  const int64_t blocks = (n_rows + kRows - 1) / kRows;
  launch_pdl(kernel, dim3(static_cast<unsigned>(blocks)), dim3(warps * 32), smem, s, static_cast<const uint8_t*>(w), stride, n_rows,
                                                                  n_units, x, y);
  SHARDLM_CUDA_CHECK_LAUNCH("matvec_quant_kernel");
}

int max_dyn_smem() {
  static const int v = [] {
    int dev = 0, bytes = 0;
    SHARDLM_CUDA_CHECK(cudaGetDevice(&dev));
    SHARDLM_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    return bytes;
  }();
  return v;
}

int sm_count() {
  static const int v = [] {
    int dev = 0, n = 0;
    SHARDLM_CUDA_CHECK(cudaGetDevice(&dev));
    SHARDLM_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    return n;
  }();
  return v;
}

// The rows-across-lanes kernel when the layout allows it (16-byte aligned rows, whole 256-column items,
// shared memory within the device limit); false means: use matvec_quant_kernel.
template <GgmlType T>
bool launch_rows_group(MvGroup g, int64_t n_cols, const float* x, cudaStream_t s) {
  if (n_cols % 256 != 0) return false;
  for (int k = 0; k < g.n; ++k)
    if (!aligned16(g.w[k]) || g.stride[k] % 16 != 0) return false;
  using C = RowsCfg<T>;
  const int64_t n_items = n_cols / 256;
  const size_t fixed = static_cast<size_t>(n_items) * (16 + 288) * sizeof(float);
  const size_t per_warp = size_t{32} * C::kStages * Item<T>::kSlot;
  const size_t limit = static_cast<size_t>(max_dyn_smem());
  if (fixed + per_warp > limit) return false;
  // One block per SM with as many warps as shared memory allows: each warp keeps S - 1 steps of 32 slots
  // (RPW rows x LPR items) in flight.
  const int warps = static_cast<int>(std::min<size_t>(C::kMaxWarps, (limit - fixed) / per_warp));
  const size_t smem = fixed + warps * per_warp;
  auto kernel = matvec_rows_kernel<T>;
  SHARDLM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  SHARDLM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, 100));
  int64_t n_units = 0;
  for (int k = 0; k < g.n; ++k) {
    g.first[k] = n_units;
    n_units += (g.n_rows[k] + C::kRPW - 1) / C::kRPW;
  }
  const int64_t blocks = std::min<int64_t>(n_units, sm_count());
  launch_pdl(kernel, dim3(static_cast<unsigned>(blocks)), dim3(warps * 32), smem, s, g, n_units, n_items, x);
  SHARDLM_CUDA_CHECK_LAUNCH("matvec_rows_kernel");
  return true;
}

template <GgmlType T>
bool launch_rows(const void* w, size_t stride, int64_t n_rows, int64_t n_cols, const float* x, float* y,
                 cudaStream_t s) {
  return launch_rows_group<T>(one_group(w, stride, n_rows, y), n_cols, x, s);
}

template <GgmlType T>
void launch_block_format(const void* w, size_t stride, int64_t n_rows, int64_t n_cols, const float* x, float* y,
                         cudaStream_t s) {
  // Q6_K: the rows-across-lanes variant measured slower than the chunk kernel on H100 (docs/BENCHMARKS.md,
  // Decisions in the source), so it stays on matvec_quant_kernel until that is understood.
  if (T == GgmlType::Q6_K || !launch_rows<T>(w, stride, n_rows, n_cols, x, y, s))
    launch_quant<T>(w, stride, n_rows, n_cols, x, y, s);
}

}  // namespace

bool matvec_fast_path(GgmlType type, const void* w, size_t row_stride, int64_t n_cols) {
  const auto a = reinterpret_cast<uintptr_t>(w);
  switch (type) {
    case GgmlType::F32:
      return (a % 16 == 0) && (row_stride % 16 == 0) && (n_cols % 4 == 0);
    case GgmlType::F16:
    case GgmlType::BF16:
      return (a % 16 == 0) && (row_stride % 16 == 0) && (n_cols % 8 == 0);
    case GgmlType::Q4_0:
    case GgmlType::Q8_0:
    case GgmlType::Q4_K:
    case GgmlType::Q6_K:
      // x is read as float4 per unit: the caller's x must be 16-byte aligned (checked by the backend)
      return (a % 2 == 0) && (row_stride % 2 == 0);
    default:
      return false;
  }
}

bool launch_matvec_group(GgmlType type, int n, const void* const* w, const size_t* row_stride,
                         const int64_t* n_rows, int64_t n_cols, const float* x, float* const* y, cudaStream_t s) {
  if (n < 1 || n > MvGroup::kMax || !aligned16(x)) return false;
  MvGroup g;
  g.n = n;
  for (int k = 0; k < n; ++k) {
    if (n_rows[k] <= 0 || !matvec_fast_path(type, w[k], row_stride[k], n_cols)) return false;
    g.w[k] = static_cast<const uint8_t*>(w[k]);
    g.stride[k] = row_stride[k];
    g.n_rows[k] = n_rows[k];
    g.y[k] = y[k];
  }
  switch (type) {
    case GgmlType::F32: launch_plain_group<GgmlType::F32>(g, n_cols, x, s); return true;
    case GgmlType::F16: launch_plain_group<GgmlType::F16>(g, n_cols, x, s); return true;
    case GgmlType::BF16: launch_plain_group<GgmlType::BF16>(g, n_cols, x, s); return true;
    case GgmlType::Q4_0: return launch_rows_group<GgmlType::Q4_0>(g, n_cols, x, s);
    case GgmlType::Q8_0: return launch_rows_group<GgmlType::Q8_0>(g, n_cols, x, s);
    case GgmlType::Q4_K: return launch_rows_group<GgmlType::Q4_K>(g, n_cols, x, s);
    default: return false;  // Q6_K: the chunk kernel, one launch per weight
  }
}

void launch_matvec(GgmlType type, const void* w, size_t row_stride, int64_t n_rows, int64_t n_cols,
                   const float* x, float* y, cudaStream_t s, bool force_generic) {
  if (n_rows <= 0) return;
  if (n_cols % 8 == 0) {  // the grouped types, with or without force_generic: they have no other kernel
    switch (type) {
      case GgmlType::Q4_1: return launch_group8<GgmlType::Q4_1>(w, row_stride, n_rows, n_cols, x, y, s);
      case GgmlType::Q5_0: return launch_group8<GgmlType::Q5_0>(w, row_stride, n_rows, n_cols, x, y, s);
      case GgmlType::Q5_1: return launch_group8<GgmlType::Q5_1>(w, row_stride, n_rows, n_cols, x, y, s);
      case GgmlType::Q2_K: return launch_group8<GgmlType::Q2_K>(w, row_stride, n_rows, n_cols, x, y, s);
      case GgmlType::Q3_K: return launch_group8<GgmlType::Q3_K>(w, row_stride, n_rows, n_cols, x, y, s);
      case GgmlType::Q5_K: return launch_group8<GgmlType::Q5_K>(w, row_stride, n_rows, n_cols, x, y, s);
      case GgmlType::IQ2_XXS: return launch_group8<GgmlType::IQ2_XXS>(w, row_stride, n_rows, n_cols, x, y, s);
      case GgmlType::IQ2_XS: return launch_group8<GgmlType::IQ2_XS>(w, row_stride, n_rows, n_cols, x, y, s);
      case GgmlType::IQ2_S: return launch_group8<GgmlType::IQ2_S>(w, row_stride, n_rows, n_cols, x, y, s);
      case GgmlType::IQ3_XXS: return launch_group8<GgmlType::IQ3_XXS>(w, row_stride, n_rows, n_cols, x, y, s);
      case GgmlType::IQ3_S: return launch_group8<GgmlType::IQ3_S>(w, row_stride, n_rows, n_cols, x, y, s);
      case GgmlType::IQ1_S: return launch_group8<GgmlType::IQ1_S>(w, row_stride, n_rows, n_cols, x, y, s);
      case GgmlType::IQ1_M: return launch_group8<GgmlType::IQ1_M>(w, row_stride, n_rows, n_cols, x, y, s);
      case GgmlType::IQ4_NL: return launch_group8<GgmlType::IQ4_NL>(w, row_stride, n_rows, n_cols, x, y, s);
      case GgmlType::IQ4_XS: return launch_group8<GgmlType::IQ4_XS>(w, row_stride, n_rows, n_cols, x, y, s);
      case GgmlType::MXFP4: return launch_group8<GgmlType::MXFP4>(w, row_stride, n_rows, n_cols, x, y, s);
      default: break;  // not grouped (a grouped type without a case would take the element kernel below)
    }
  }
  if (force_generic || !matvec_fast_path(type, w, row_stride, n_cols)) {
    const int warps = 8;
    launch_pdl(matvec_generic_kernel, dim3(static_cast<unsigned>((n_rows + warps - 1) / warps)), dim3(warps * 32), 0, s, 
        type, static_cast<const uint8_t*>(w), row_stride, n_rows, n_cols, x, y);
    SHARDLM_CUDA_CHECK_LAUNCH("matvec_generic_kernel");
    return;
  }
  switch (type) {
    case GgmlType::F32: return launch_plain<GgmlType::F32>(w, row_stride, n_rows, n_cols, x, y, s);
    case GgmlType::F16: return launch_plain<GgmlType::F16>(w, row_stride, n_rows, n_cols, x, y, s);
    case GgmlType::BF16: return launch_plain<GgmlType::BF16>(w, row_stride, n_rows, n_cols, x, y, s);
    case GgmlType::Q4_0: return launch_block_format<GgmlType::Q4_0>(w, row_stride, n_rows, n_cols, x, y, s);
    case GgmlType::Q8_0: return launch_block_format<GgmlType::Q8_0>(w, row_stride, n_rows, n_cols, x, y, s);
    case GgmlType::Q4_K: return launch_block_format<GgmlType::Q4_K>(w, row_stride, n_rows, n_cols, x, y, s);
    case GgmlType::Q6_K: return launch_block_format<GgmlType::Q6_K>(w, row_stride, n_rows, n_cols, x, y, s);
    default: break;
  }
}

}  // namespace shardlm::cuda_detail
