// Device-side decoding of ggml's block formats (for get_rows, the dequantize-to-16-bit pass of prefill and
// the generic matvec). Layouts as in ggml-common.h / src/quant/blocks.h; rows may start at any address
// (MXFP4's blocks are 17 bytes, IQ4_NL's 18, Q5_0's 22), so multi-byte fields are read as bytes (or, for
// runs of 8 quant bytes, as the aligned words that hold them: ld8).
//
// dq_elem decodes one element of any supported type. dq_group8 decodes a run of 8 elements of the types
// beyond Q8_0/Q4_0/Q4_K/Q6_K ("grouped" types: in each of them the 8 elements 8g .. 8g+7 share every
// scale, sign byte and grid entry), computing each value with ggml's float operations in ggml's order
// (dequantize_row_* in ggml-quants.c) through _rn intrinsics, which nvcc never contracts into FMAs: the
// values equal the CPU reference decoder's (quant/quant.h dequantize_row) bit for bit.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "backends/cuda/kernels.cuh"
#include "core/dtype.h"

namespace shardlm::cuda_detail {

// The IQ and MXFP4 lookup tables (kIq2xxsGrid, kKsignsIq2xs, kValuesIq4nl, ...). static: each translation
// unit that includes this header (ops.cu, matvec.cu) holds its own copy in global memory (about 33 KB),
// which needs no relocatable device code. Read through L1 (lanes index them divergently, which constant
// memory would serialize).
namespace iq {
#define SHARDLM_IQ_TABLE(type, name, size) static __device__ const type name[size] =
#include "quant/iq_tables.h"
}  // namespace iq

__device__ __forceinline__ float f16_bits(uint16_t h) { return __half2float(__ushort_as_half(h)); }
__device__ __forceinline__ float bf16_bits(uint16_t h) { return __uint_as_float(static_cast<uint32_t>(h) << 16); }
__device__ __forceinline__ uint16_t rd16(const uint8_t* p) {
  return static_cast<uint16_t>(p[0] | (static_cast<uint16_t>(p[1]) << 8));
}
__device__ __forceinline__ uint32_t rd32(const uint8_t* p) {
  return static_cast<uint32_t>(rd16(p)) | (static_cast<uint32_t>(rd16(p + 2)) << 16);
}

// Bytes p[0..7] of a row (any alignment) from the 4-byte-aligned words that hold them: two or three loads
// and two funnel shifts instead of eight byte loads. Every word read holds at least one of the 8 bytes, so
// no read leaves the allocation. Weights are read-only while a kernel runs (read-only data path).
struct Bytes8 {
  uint32_t lo, hi;  // bytes 0..3, 4..7
  __device__ __forceinline__ int operator[](int i) const {
    return static_cast<int>(((i < 4 ? lo : hi) >> (8 * (i & 3))) & 0xFFu);
  }
};
// kStaged: p points into a copy in shared memory (matvec_group8_kernel's staged chunks), read with plain loads.
template <bool kStaged = false>
__device__ __forceinline__ uint32_t ld_word(const uint32_t* w) {
  if constexpr (kStaged) return *w;
  else return __ldg(w);
}
template <bool kStaged = false>
__device__ __forceinline__ Bytes8 ld8(const uint8_t* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const uint32_t* w = reinterpret_cast<const uint32_t*>(a & ~uintptr_t{3});
  const uint32_t sh = static_cast<uint32_t>(a & 3) * 8;
  const uint32_t w0 = ld_word<kStaged>(w), w1 = ld_word<kStaged>(w + 1), w2 = sh != 0 ? ld_word<kStaged>(w + 2) : 0u;
  return Bytes8{__funnelshift_r(w0, w1, sh), __funnelshift_r(w1, w2, sh)};
}

// ggml_e8m0_to_fp32_half: 2^(e - 128) as a float (subnormal for e < 2).
__device__ __forceinline__ float e8m0_half(uint8_t e) {
  return __uint_as_float(e < 2 ? (0x00200000u << e) : (static_cast<uint32_t>(e - 1) << 23));
}

// Q4_K / Q5_K: 6-bit scale and min of sub-block s (0..7) from the 12 packed bytes (ggml's get_scale_min_k4).
__device__ __forceinline__ void k4_scale_min(const uint8_t* sc, int s, int& scale, int& mn) {
  if (s < 4) {
    scale = sc[s] & 63;
    mn = sc[s + 4] & 63;
  } else {
    scale = (sc[s + 4] & 0xF) | ((sc[s - 4] >> 6) << 4);
    mn = (sc[s + 4] >> 4) | ((sc[s] >> 6) << 4);
  }
}

// v[i] = grid byte i (a table entry holds 8, or 4 for the IQ3 grids) * db, negated where bit i of `signs`
// is set: ggml's `db * grid[j] * (signs & kmask_iq2xs[j] ? -1.f : 1.f)`, two roundings in that order.
__device__ __forceinline__ void iq_signed8(float db, uint64_t grid, uint32_t signs, float (&v)[8]) {
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float q = static_cast<float>(static_cast<uint32_t>(grid >> (8 * i)) & 0xFFu);
    v[i] = __fmul_rn(__fmul_rn(db, q), (signs & iq::kKmaskIq2xs[i]) ? -1.0f : 1.0f);
  }
}

// Elements 8g .. 8g+7 of a row of a grouped type starting at `row` (g < n_cols / 8). Comments give the
// block layout (byte offsets) and the value; every product and sum is one rounding, as in ggml.
// kStaged: `row` is a 4-byte aligned copy in shared memory (see ld8).
template <bool kStaged = false>
__device__ __forceinline__ void dq_group8(GgmlType type, const uint8_t* row, int64_t g, float (&v)[8]) {
  // 32-element blocks: group k (0..3) of the block; elements 8k+i are nibble 8(k%2)+i, low (k < 2) or high.
  // 256-element super-blocks: group k (0..31).
  const int k4 = static_cast<int>(g % 4), sh4 = 4 * (k4 / 2), o4 = 8 * (k4 % 2);
  const int k = static_cast<int>(g % 32), ib = k / 4, l = k % 4;
  switch (type) {
    case GgmlType::Q4_1: {  // 20 B: fp16 d @0, fp16 m @2, qs[16] @4; x = q*d + m
      const uint8_t* b = row + (g / 4) * 20;
      const float d = f16_bits(rd16(b)), m = f16_bits(rd16(b + 2));
      const Bytes8 qs = ld8<kStaged>(b + 4 + o4);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = __fadd_rn(__fmul_rn(static_cast<float>((qs[i] >> sh4) & 0xF), d), m);
      return;
    }
    case GgmlType::Q5_0: {  // 22 B: fp16 d @0, qh[4] @2 (bit e: 5th bit of element e), qs[16] @6; x = (q - 16)*d
      const uint8_t* b = row + (g / 4) * 22;
      const float d = f16_bits(rd16(b));
      const int hb = b[2 + k4];
      const Bytes8 qs = ld8<kStaged>(b + 6 + o4);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int q = (((qs[i] >> sh4) & 0xF) | (((hb >> i) & 1) << 4)) - 16;
        v[i] = __fmul_rn(static_cast<float>(q), d);
      }
      return;
    }
    case GgmlType::Q5_1: {  // 24 B: fp16 d @0, fp16 m @2, qh[4] @4, qs[16] @8; x = q*d + m
      const uint8_t* b = row + (g / 4) * 24;
      const float d = f16_bits(rd16(b)), m = f16_bits(rd16(b + 2));
      const int hb = b[4 + k4];
      const Bytes8 qs = ld8<kStaged>(b + 8 + o4);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int q = ((qs[i] >> sh4) & 0xF) | (((hb >> i) & 1) << 4);
        v[i] = __fadd_rn(__fmul_rn(static_cast<float>(q), d), m);
      }
      return;
    }
    case GgmlType::MXFP4: {  // 17 B: e8m0 e @0, qs[16] @1; x = kvalues_mxfp4[q] * 2^(e-128)
      const uint8_t* b = row + (g / 4) * 17;
      const float d = e8m0_half(b[0]);
      const Bytes8 qs = ld8<kStaged>(b + 1 + o4);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = __fmul_rn(static_cast<float>(iq::kValuesFp4[(qs[i] >> sh4) & 0xF]), d);
      return;
    }
    case GgmlType::IQ4_NL: {  // 18 B: fp16 d @0, qs[16] @2; x = d * kvalues_iq4nl[q]
      const uint8_t* b = row + (g / 4) * 18;
      const float d = f16_bits(rd16(b));
      const Bytes8 qs = ld8<kStaged>(b + 2 + o4);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = __fmul_rn(d, static_cast<float>(iq::kValuesIq4nl[(qs[i] >> sh4) & 0xF]));
      return;
    }
    case GgmlType::Q2_K:
    case GgmlType::Q3_K: {
      // Element e = 128n + 32j + l: 2 bits at shift 2j of qs[32n + l]; 16-element scale index 8n + 2j + l/16.
      const int n = k / 16, j = (k % 16) / 4, l32 = 8 * (k % 4), is = 8 * n + 2 * j + (k % 4) / 2;
      if (type == GgmlType::Q2_K) {  // 84 B: scales[16] @0 (4-bit scale | 4-bit min), qs[64] @16, fp16 d @80, dmin @82
        const uint8_t* b = row + (g / 32) * 84;
        const int sc = b[is];
        const float dl = __fmul_rn(f16_bits(rd16(b + 80)), static_cast<float>(sc & 0xF));
        const float ml = __fmul_rn(f16_bits(rd16(b + 82)), static_cast<float>(sc >> 4));
        const Bytes8 q = ld8<kStaged>(b + 16 + 32 * n + l32);
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = __fsub_rn(__fmul_rn(dl, static_cast<float>((q[i] >> (2 * j)) & 3)), ml);
      } else {  // 110 B: hmask[32] @0, qs[64] @32, scales[12] @96 (16 x 6 bits), fp16 d @108; x = d*(s-32) * (q - 4*!h)
        const uint8_t* b = row + (g / 32) * 110;
        const uint8_t* sc = b + 96;
        const int lo = is < 8 ? (sc[is] & 0xF) : (sc[is - 8] >> 4);
        const int hi = (sc[8 + is % 4] >> (2 * (is / 4))) & 3;
        const float dl = __fmul_rn(f16_bits(rd16(b + 108)), static_cast<float>((lo | (hi << 4)) - 32));
        const Bytes8 q = ld8<kStaged>(b + 32 + 32 * n + l32);
        const Bytes8 hm = ld8<kStaged>(b + l32);
        const int m = 1 << (4 * n + j);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const int qv = ((q[i] >> (2 * j)) & 3) - ((hm[i] & m) ? 0 : 4);
          v[i] = __fmul_rn(dl, static_cast<float>(qv));
        }
      }
      return;
    }
    case GgmlType::Q5_K: {  // 176 B: fp16 d @0, dmin @2, scales[12] @4, qh[32] @16, qs[128] @48; x = d*sc * q - dmin*m
      const uint8_t* b = row + (g / 32) * 176;
      const int s = k / 4, l32 = 8 * (k % 4);  // sub-block s (32 elements), elements l32 + i
      int sc, mn;
      k4_scale_min(b + 4, s, sc, mn);
      const float d1 = __fmul_rn(f16_bits(rd16(b)), static_cast<float>(sc));
      const float m1 = __fmul_rn(f16_bits(rd16(b + 2)), static_cast<float>(mn));
      const Bytes8 ql = ld8<kStaged>(b + 48 + 32 * (s / 2) + l32);
      const Bytes8 qh = ld8<kStaged>(b + 16 + l32);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int q = ((ql[i] >> (4 * (s & 1))) & 0xF) + (((qh[i] >> s) & 1) ? 16 : 0);
        v[i] = __fsub_rn(__fmul_rn(d1, static_cast<float>(q)), m1);
      }
      return;
    }
    case GgmlType::IQ2_XXS: {  // 66 B: fp16 d @0, per 32 elements 8 B @2+8ib: 4 grid indices, u32 (7-bit signs x 4 | scale << 28)
      const uint8_t* b = row + (g / 32) * 66;
      const uint8_t* q = b + 2 + 8 * ib;
      const uint32_t aux = rd32(q + 4);
      const float db = __fmul_rn(__fmul_rn(f16_bits(rd16(b)), __fadd_rn(0.5f, static_cast<float>(aux >> 28))), 0.25f);
      iq_signed8(db, iq::kIq2xxsGrid[q[l]], iq::kKsignsIq2xs[(aux >> (7 * l)) & 127], v);
      return;
    }
    case GgmlType::IQ2_XS: {  // 74 B: fp16 d @0, u16 qs[32] @2 (9-bit index | 7-bit signs << 9), scales[8] @66
      const uint8_t* b = row + (g / 32) * 74;
      const uint16_t q = rd16(b + 2 + 2 * k);
      const int sc = (b[66 + ib] >> (4 * (l / 2))) & 0xF;
      const float db = __fmul_rn(__fmul_rn(f16_bits(rd16(b)), __fadd_rn(0.5f, static_cast<float>(sc))), 0.25f);
      iq_signed8(db, iq::kIq2xsGrid[q & 511], iq::kKsignsIq2xs[q >> 9], v);
      return;
    }
    case GgmlType::IQ2_S: {  // 82 B: fp16 d @0, qs[32] @2, signs[32] @34, qh[8] @66 (2 index bits per group), scales[8] @74
      const uint8_t* b = row + (g / 32) * 82;
      const int idx = b[2 + k] | ((b[66 + ib] << (8 - 2 * l)) & 0x300);
      const int sc = (b[74 + ib] >> (4 * (l / 2))) & 0xF;
      const float db = __fmul_rn(__fmul_rn(f16_bits(rd16(b)), __fadd_rn(0.5f, static_cast<float>(sc))), 0.25f);
      iq_signed8(db, iq::kIq2sGrid[idx], b[34 + k], v);
      return;
    }
    case GgmlType::IQ3_XXS: {  // 98 B: fp16 d @0, qs[64] @2 (2 indices of 4 per group), u32 @66+4ib (signs x 4 | scale << 28)
      const uint8_t* b = row + (g / 32) * 98;
      const uint8_t* qs = b + 2 + 8 * ib + 2 * l;
      const uint32_t aux = rd32(b + 66 + 4 * ib);
      const float db = __fmul_rn(__fmul_rn(f16_bits(rd16(b)), __fadd_rn(0.5f, static_cast<float>(aux >> 28))), 0.5f);
      const uint64_t grid = iq::kIq3xxsGrid[qs[0]] | (static_cast<uint64_t>(iq::kIq3xxsGrid[qs[1]]) << 32);
      iq_signed8(db, grid, iq::kKsignsIq2xs[(aux >> (7 * l)) & 127], v);
      return;
    }
    case GgmlType::IQ3_S: {  // 110 B: fp16 d @0, qs[64] @2, qh[8] @66 (9th index bits), signs[32] @74, scales[4] @106
      const uint8_t* b = row + (g / 32) * 110;
      const uint8_t* qs = b + 2 + 8 * ib + 2 * l;
      const int qh = b[66 + ib];
      const int i1 = qs[0] | ((qh << (8 - 2 * l)) & 256), i2 = qs[1] | ((qh << (7 - 2 * l)) & 256);
      const int sc = (b[106 + ib / 2] >> (4 * (ib % 2))) & 0xF;
      const float db = __fmul_rn(f16_bits(rd16(b)), static_cast<float>(1 + 2 * sc));
      const uint64_t grid = iq::kIq3sGrid[i1] | (static_cast<uint64_t>(iq::kIq3sGrid[i2]) << 32);
      iq_signed8(db, grid, b[74 + 4 * ib + l], v);
      return;
    }
    case GgmlType::IQ1_S: {  // 50 B: fp16 d @0, qs[32] @2, u16 qh[8] @34 (3 index bits x 4, scale << 12, delta sign << 15)
      const uint8_t* b = row + (g / 32) * 50;
      const uint16_t qh = rd16(b + 34 + 2 * ib);
      const float dl = __fmul_rn(f16_bits(rd16(b)), static_cast<float>(2 * ((qh >> 12) & 7) + 1));
      const float delta = (qh & 0x8000) ? -SHARDLM_IQ1S_DELTA : SHARDLM_IQ1S_DELTA;
      const uint64_t grid = iq::kIq1sGrid[b[2 + k] | (((qh >> (3 * l)) & 7) << 8)];
#pragma unroll
      for (int i = 0; i < 8; ++i)
        v[i] = __fmul_rn(dl, __fadd_rn(static_cast<float>(static_cast<int8_t>(grid >> (8 * i))), delta));
      return;
    }
    case GgmlType::IQ1_M: {  // 56 B: qs[32] @0, qh[16] @32, u16 scales[4] @48 (3-bit scales; fp16 d in the top nibbles)
      const uint8_t* b = row + (g / 32) * 56;
      const uint16_t s0 = rd16(b + 48), s1 = rd16(b + 50), s2 = rd16(b + 52), s3 = rd16(b + 54);
      const float d = f16_bits(static_cast<uint16_t>((s0 >> 12) | ((s1 >> 8) & 0x00F0) | ((s2 >> 4) & 0x0F00) | (s3 & 0xF000)));
      const int qh = b[32 + 2 * ib + l / 2];
      const int idx = b[k] | ((qh << ((l % 2) ? 4 : 8)) & 0x700);
      const float delta = (qh & ((l % 2) ? 0x80 : 0x08)) ? -SHARDLM_IQ1S_DELTA : SHARDLM_IQ1S_DELTA;
      const int sc = (rd16(b + 48 + 2 * (ib / 2)) >> (6 * (ib % 2) + 3 * (l / 2))) & 7;
      const float dl = __fmul_rn(d, static_cast<float>(2 * sc + 1));
      const uint64_t grid = iq::kIq1sGrid[idx];
#pragma unroll
      for (int i = 0; i < 8; ++i)
        v[i] = __fmul_rn(dl, __fadd_rn(static_cast<float>(static_cast<int8_t>(grid >> (8 * i))), delta));
      return;
    }
    case GgmlType::IQ4_XS: {  // 136 B: fp16 d @0, u16 scales_h @2, scales_l[4] @4, qs[128] @8; x = d*(ls-32) * kvalues_iq4nl[q]
      const uint8_t* b = row + (g / 32) * 136;
      const int ls = ((b[4 + ib / 2] >> (4 * (ib % 2))) & 0xF) | (((rd16(b + 2) >> (2 * ib)) & 3) << 4);
      const float dl = __fmul_rn(f16_bits(rd16(b)), static_cast<float>(ls - 32));
      const Bytes8 qs = ld8<kStaged>(b + 8 + 16 * ib + 8 * (l % 2));
      const int sh = 4 * (l / 2);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = __fmul_rn(dl, static_cast<float>(iq::kValuesIq4nl[(qs[i] >> sh) & 0xF]));
      return;
    }
    default:
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = 0.0f;  // unreachable: callers check dq_grouped
      return;
  }
}

// Element c of a row of `type` starting at `row`.
__device__ inline float dq_elem(GgmlType type, const uint8_t* row, int64_t c) {
  switch (type) {
    case GgmlType::F32: {
      uint32_t u = rd16(row + 4 * c) | (static_cast<uint32_t>(rd16(row + 4 * c + 2)) << 16);
      return __uint_as_float(u);
    }
    case GgmlType::F16:
      return f16_bits(rd16(row + 2 * c));
    case GgmlType::BF16:
      return bf16_bits(rd16(row + 2 * c));
    case GgmlType::Q8_0: {  // fp16 d; int8 qs[32]
      const uint8_t* b = row + (c / 32) * 34;
      return f16_bits(rd16(b)) * static_cast<float>(static_cast<int8_t>(b[2 + c % 32]));
    }
    case GgmlType::Q4_0: {  // fp16 d; qs[16]: element j low nibble of qs[j], j+16 high nibble
      const uint8_t* b = row + (c / 32) * 18;
      int j = static_cast<int>(c % 32);
      int q = (j < 16) ? (b[2 + j] & 0xF) : (b[2 + j - 16] >> 4);
      return f16_bits(rd16(b)) * static_cast<float>(q - 8);
    }
    case GgmlType::Q4_K: {  // fp16 d, dmin; scales[12]; qs[128]
      const uint8_t* b = row + (c / 256) * 144;
      int e = static_cast<int>(c % 256), s = e / 32, l = e % 32;
      const uint8_t* sc = b + 4;
      int scale, mn;
      if (s < 4) {
        scale = sc[s] & 63;
        mn = sc[s + 4] & 63;
      } else {
        scale = (sc[s + 4] & 0xF) | ((sc[s - 4] >> 6) << 4);
        mn = (sc[s + 4] >> 4) | ((sc[s] >> 6) << 4);
      }
      uint8_t byte = b[16 + 32 * (s / 2) + l];
      int q = (s & 1) ? (byte >> 4) : (byte & 0xF);
      return f16_bits(rd16(b)) * scale * q - f16_bits(rd16(b + 2)) * mn;
    }
    case GgmlType::Q6_K: {  // ql[128]; qh[64]; int8 scales[16]; fp16 d
      const uint8_t* b = row + (c / 256) * 210;
      int e = static_cast<int>(c % 256), n = e / 128, r = e % 128, quarter = r / 32, l = r % 32;
      const uint8_t* ql = b + 64 * n;
      const uint8_t* qh = b + 128 + 32 * n;
      const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192 + 8 * n);
      int lo = (quarter & 1) ? ql[l + 32] : ql[l];
      lo = (quarter & 2) ? (lo >> 4) : (lo & 0xF);
      int hi = (qh[l] >> (2 * quarter)) & 3;
      int q = (lo | (hi << 4)) - 32;
      return f16_bits(rd16(b + 208)) * sc[l / 16 + 2 * quarter] * q;
    }
    default: {
      if (!dq_grouped(type)) return 0.0f;  // unreachable: the host refuses unsupported types before launching
      float v[8];
      dq_group8(type, row, c / 8, v);
      const int i = static_cast<int>(c % 8);
      float r = v[0];
#pragma unroll
      for (int j = 1; j < 8; ++j) r = (i == j) ? v[j] : r;  // selects: no local-memory array
      return r;
    }
  }
}

}  // namespace shardlm::cuda_detail
