// AVX2 + FMA + F16C kernels: weights are dequantized to fp32 in registers, 32 elements (4 vectors) at a
// time, and multiplied with fp32 activations; Q8_0, Q4_0, Q4_K and Q6_K instead take integer dot products
// with int8-rounded activations (matmul_int8_avx2, below). Compiled for that ISA via the pragma below and only called
// after dispatch.cpp checked __builtin_cpu_supports, so the rest of the library stays baseline x86-64.
//
// Every decoded value is the reference dequantizer's (quant_ref.cpp, codec_*.cpp) bit for bit: in every
// format a value is an fp16 (or e8m0) scale times small integers (or IQ1's +-1/8-shifted ones), a product
// of at most 24 significant bits that fp32 holds exactly, so fused and separate multiply-adds round alike
// and the order of the multiplications does not matter.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "core/error.h"
#include "quant/blocks.h"
#include "quant/blocks_iq.h"
#include "quant/kernels.h"

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

#include "quant/kernels_attend.h"
#include "quant/kernels_tile.h"

namespace shardlm::quant_detail {
namespace {

#define SHARDLM_IQ_TABLE(type, name, size) inline constexpr type name[size] =
#include "quant/iq_tables.h"

float half(const uint8_t* p) { return _cvtsh_ss(load_u16(p)); }

// 8 int8 -> 8 floats.
__m256 i8x8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }
__m256 u8x8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }
__m128i ld128(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
__m256i ld256(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// 32 int8 / uint8 (element order) -> 4 x 8 floats.
void i8x32(__m256i q, __m256* f) {
  const __m128i q0 = _mm256_castsi256_si128(q), q1 = _mm256_extracti128_si256(q, 1);
  f[0] = i8x8(q0);
  f[1] = i8x8(_mm_unpackhi_epi64(q0, q0));
  f[2] = i8x8(q1);
  f[3] = i8x8(_mm_unpackhi_epi64(q1, q1));
}
void u8x32(__m256i q, __m256* f) {
  const __m128i q0 = _mm256_castsi256_si128(q), q1 = _mm256_extracti128_si256(q, 1);
  f[0] = u8x8(q0);
  f[1] = u8x8(_mm_unpackhi_epi64(q0, q0));
  f[2] = u8x8(q1);
  f[3] = u8x8(_mm_unpackhi_epi64(q1, q1));
}

// The 32 nibbles of a 16-byte Q4_0-style group in element order: low nibbles (elements 0..15) in the
// low lane, high nibbles (16..31) in the high lane.
__m256i nibbles32(const uint8_t* qs) {
  const __m128i q = ld128(qs);
  return _mm256_and_si256(_mm256_inserti128_si256(_mm256_castsi128_si256(q), _mm_srli_epi16(q, 4), 1),
                          _mm256_set1_epi8(0x0F));
}

// Byte i = 0xFF where bit i of `bits` is set, else 0 (the 5th bits of Q5_0 / Q5_1).
__m256i bit_bytes(uint32_t bits) {
  const __m256i spread = _mm256_shuffle_epi8(  // byte i <- byte i / 8 of bits (within each lane)
      _mm256_set1_epi32(static_cast<int>(bits)),
      _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303));
  const __m256i sel = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201));  // byte i: 1 << (i % 8)
  return _mm256_cmpeq_epi8(_mm256_and_si256(spread, sel), sel);
}

// Negates byte i of v where bit i of `signs` is set (the IQ grids' sign bits, one per value).
__m256i apply_signs(__m256i v, uint32_t signs) {
  const __m256i m = bit_bytes(signs);
  return _mm256_sub_epi8(_mm256_xor_si256(v, m), m);
}

// Four 8-byte grid points (IQ2 / IQ1 grids) -> 32 bytes in element order.
__m256i grid4(const uint64_t* grid, int i0, int i1, int i2, int i3) {
  return _mm256_setr_epi64x(static_cast<int64_t>(grid[i0]), static_cast<int64_t>(grid[i1]),
                            static_cast<int64_t>(grid[i2]), static_cast<int64_t>(grid[i3]));
}

// 8 bytes -> 8 uint32 lanes (grid indices).
__m256i u8x8_epi32(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

// Eight 4-byte grid points (IQ3 grids) at the 32-bit indices idx -> 32 bytes in element order.
__m256i grid8(const uint32_t* grid, __m256i idx) {
  return _mm256_i32gather_epi32(reinterpret_cast<const int*>(grid), idx, 4);
}

// The sign bytes of the four 8-value groups of an IQ2_XXS / IQ3_XXS sub-block: four 7-bit indices into
// kKsignsIq2xs in bits 0..27 of aux.
uint32_t ksigns4(uint32_t aux) {
  return kKsignsIq2xs[aux & 127] | (kKsignsIq2xs[(aux >> 7) & 127] << 8) | (kKsignsIq2xs[(aux >> 14) & 127] << 16) |
         (static_cast<uint32_t>(kKsignsIq2xs[(aux >> 21) & 127]) << 24);
}

// The IQ1 shift +-SHARDLM_IQ1S_DELTA with sign bit `sign` (0 or 0x80000000): built from bits, as a
// data-dependent choice between two floats compiles to a branch that random sign bits mispredict.
float iq1_delta(uint32_t sign) {
  const float pos = SHARDLM_IQ1S_DELTA;
  uint32_t bits;
  std::memcpy(&bits, &pos, sizeof bits);
  bits |= sign;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Q6_K chunk s (0..3) of half g of super-block b, as 32 unsigned 6-bit quants in element order (value =
// d * scale * (q - 32)): low 4 bits from ql[g*64 + (s&1)*32 + l] (high nibble for s >= 2), top 2 bits from
// qh[g*32 + l] at bit 2s.
__m256i q6k_quants(const uint8_t* b, int g, int s) {
  __m256i ql = ld256(b + g * 64 + (s & 1) * 32);
  __m256i qh = ld256(b + kQ6_KQh + g * 32);
  ql = _mm256_and_si256(_mm256_srl_epi16(ql, _mm_cvtsi32_si128((s >> 1) * 4)), _mm256_set1_epi8(0x0F));
  qh = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * s)), _mm256_set1_epi8(3));
  return _mm256_or_si256(ql, _mm256_slli_epi16(qh, 4));
}

// A 16-entry int8 table in both lanes, for _mm256_shuffle_epi8 lookups of nibble indices.
__m256i table16(const int8_t* t) {
  return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t)));
}

struct Avx2 {
  using V = __m256;
  static constexpr int L = 8;
  static constexpr int kTokTile = 3;
  template <GgmlType>
  static constexpr int chunk() { return 32; }
  template <GgmlType>
  static constexpr int row_tile() { return 2; }  // 2 rows x 4 weight vectors + 6 accumulators: 16 regs

  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V set1(float f) { return _mm256_set1_ps(f); }
  static float lane0(V v) { return _mm256_cvtss_f32(v); }
  static float hsum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static float hmax(V v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // exp(x) for x <= 0 as 2^n * exp_reduced(r) (kernels_attend.h), 2^n built in the exponent field; 0 below -87,
  // where fp32's normal range ends (and for -inf).
  static V exp(V x) {
    const V tiny = _mm256_cmp_ps(x, set1(-87.0f), _CMP_LT_OQ);
    x = max(x, set1(-87.0f));
    const V n = _mm256_round_ps(mul(x, set1(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const V r = _mm256_fnmadd_ps(n, set1(kLn2Lo), _mm256_fnmadd_ps(n, set1(kLn2Hi), x));
    const V p = exp_reduced<Avx2>(r);
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(tiny, mul(p, _mm256_castsi256_ps(e)));
  }

  // Chunk c of a row: 32 elements starting at element 32*c, dequantized into out[0..3].
  template <GgmlType T>
  static void decode(const uint8_t* row, int64_t c, V* out) {
    if constexpr (T == GgmlType::F32) {
      const float* p = reinterpret_cast<const float*>(row) + c * 32;
      for (int k = 0; k < 4; ++k) out[k] = _mm256_loadu_ps(p + 8 * k);
    } else if constexpr (T == GgmlType::F16) {
      const uint8_t* p = row + c * 64;
      for (int k = 0; k < 4; ++k)
        out[k] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * k)));
    } else if constexpr (T == GgmlType::BF16) {
      const uint8_t* p = row + c * 64;
      for (int k = 0; k < 4; ++k) {
        const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * k)));
        out[k] = _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
      }
    } else if constexpr (T == GgmlType::Q8_0) {
      const uint8_t* b = row + c * kQ8_0Bytes;
      const V d = _mm256_set1_ps(half(b));
      for (int k = 0; k < 4; ++k)
        out[k] = _mm256_mul_ps(d, i8x8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + kQ8_0Qs + 8 * k))));
    } else if constexpr (T == GgmlType::Q4_0) {
      const uint8_t* b = row + c * kQ4_0Bytes;
      const V d = _mm256_set1_ps(half(b));
      const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + kQ4_0Qs));
      const __m128i m4 = _mm_set1_epi8(0x0F), eight = _mm_set1_epi8(8);
      const __m128i lo = _mm_sub_epi8(_mm_and_si128(q, m4), eight);                     // elements 0..15
      const __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(q, 4), m4), eight);  // 16..31
      out[0] = _mm256_mul_ps(d, i8x8(lo));
      out[1] = _mm256_mul_ps(d, i8x8(_mm_unpackhi_epi64(lo, lo)));
      out[2] = _mm256_mul_ps(d, i8x8(hi));
      out[3] = _mm256_mul_ps(d, i8x8(_mm_unpackhi_epi64(hi, hi)));
    } else if constexpr (T == GgmlType::Q4_K) {
      // Sub-block j of super-block sb: its 32 quants are the low (even j) or high (odd j) nibbles of
      // the 32 bytes of chunk j/2.
      const uint8_t* b = row + (c >> 3) * kQ4_KBytes;
      const int j = static_cast<int>(c & 7);
      int sc, m;
      q4k_scale_min(j, b + kQ4_KScales, sc, m);
      const V d = _mm256_set1_ps(half(b) * static_cast<float>(sc));
      const V neg_min = _mm256_set1_ps(-(half(b + kQ4_KDmin) * static_cast<float>(m)));
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + kQ4_KQs + (j >> 1) * 32));
      const __m256i q = _mm256_and_si256(j & 1 ? _mm256_srli_epi16(raw, 4) : raw, _mm256_set1_epi8(0x0F));
      const __m128i q0 = _mm256_castsi256_si128(q), q1 = _mm256_extracti128_si256(q, 1);
      const __m128i parts[4] = {q0, _mm_unpackhi_epi64(q0, q0), q1, _mm_unpackhi_epi64(q1, q1)};
      for (int k = 0; k < 4; ++k)
        out[k] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[k])), neg_min);
    } else if constexpr (T == GgmlType::Q6_K) {
      // Chunk s (0..3) of half g (q6k_quants); 16 elements per 8-bit scale.
      const uint8_t* b = row + (c >> 3) * kQ6_KBytes;
      const int q8 = static_cast<int>(c & 7), g = q8 >> 2, s = q8 & 3;
      const auto* scales = reinterpret_cast<const int8_t*>(b + kQ6_KScales) + g * 8 + 2 * s;
      const float d = half(b + kQ6_KD);
      const __m256i q = _mm256_sub_epi8(q6k_quants(b, g, s), _mm256_set1_epi8(32));
      const __m128i q0 = _mm256_castsi256_si128(q), q1 = _mm256_extracti128_si256(q, 1);
      const V d0 = _mm256_set1_ps(d * scales[0]), d1 = _mm256_set1_ps(d * scales[1]);
      out[0] = _mm256_mul_ps(d0, i8x8(q0));
      out[1] = _mm256_mul_ps(d0, i8x8(_mm_unpackhi_epi64(q0, q0)));
      out[2] = _mm256_mul_ps(d1, i8x8(q1));
      out[3] = _mm256_mul_ps(d1, i8x8(_mm_unpackhi_epi64(q1, q1)));
    } else if constexpr (T == GgmlType::Q4_1) {
      const uint8_t* b = row + c * kQ4_1Bytes;
      const V d = _mm256_set1_ps(half(b)), m = _mm256_set1_ps(half(b + kQ4_1M));
      V f[4];
      u8x32(nibbles32(b + kQ4_1Qs), f);
      for (int k = 0; k < 4; ++k) out[k] = _mm256_fmadd_ps(f[k], d, m);
    } else if constexpr (T == GgmlType::Q5_0) {
      // q - 16 = nibble - (5th bit clear ? 16 : 0), in [-16, 15].
      const uint8_t* b = row + c * kQ5_0Bytes;
      const V d = _mm256_set1_ps(half(b));
      const __m256i hi = bit_bytes(load_u32(b + kQ5_0Qh));
      V f[4];
      i8x32(_mm256_sub_epi8(nibbles32(b + kQ5_0Qs), _mm256_andnot_si256(hi, _mm256_set1_epi8(16))), f);
      for (int k = 0; k < 4; ++k) out[k] = _mm256_mul_ps(f[k], d);
    } else if constexpr (T == GgmlType::Q5_1) {
      const uint8_t* b = row + c * kQ5_1Bytes;
      const V d = _mm256_set1_ps(half(b)), m = _mm256_set1_ps(half(b + kQ5_1M));
      const __m256i hi = bit_bytes(load_u32(b + kQ5_1Qh));
      V f[4];
      u8x32(_mm256_or_si256(nibbles32(b + kQ5_1Qs), _mm256_and_si256(hi, _mm256_set1_epi8(16))), f);
      for (int k = 0; k < 4; ++k) out[k] = _mm256_fmadd_ps(f[k], d, m);
    } else if constexpr (T == GgmlType::Q2_K) {
      // Chunk j (0..7) of a super-block: 2-bit fields at shift 2 * (j % 4) of qs[(j / 4) * 32 + l];
      // scale bytes 2j and 2j + 1 serve its two 16-element halves.
      const uint8_t* b = row + (c >> 3) * kQ2_KBytes;
      const int j = static_cast<int>(c & 7);
      const float d = half(b + kQ2_KD), dmin = half(b + kQ2_KDmin);
      const __m256i q = _mm256_and_si256(
          _mm256_srl_epi16(ld256(b + kQ2_KQs + (j >> 2) * 32), _mm_cvtsi32_si128(2 * (j & 3))),
          _mm256_set1_epi8(3));
      V f[4];
      u8x32(q, f);
      for (int h = 0; h < 2; ++h) {
        const uint8_t sc = b[2 * j + h];
        const V dl = _mm256_set1_ps(d * static_cast<float>(sc & 0xF));
        const V neg_ml = _mm256_set1_ps(-(dmin * static_cast<float>(sc >> 4)));
        out[2 * h] = _mm256_fmadd_ps(dl, f[2 * h], neg_ml);
        out[2 * h + 1] = _mm256_fmadd_ps(dl, f[2 * h + 1], neg_ml);
      }
    } else if constexpr (T == GgmlType::Q3_K) {
      // Low 2 bits as Q2_K; the third bit is bit j of hmask[l] (clear: -4).
      const uint8_t* b = row + (c >> 3) * kQ3_KBytes;
      const int j = static_cast<int>(c & 7);
      const float d = half(b + kQ3_KD);
      const __m256i lo = _mm256_and_si256(
          _mm256_srl_epi16(ld256(b + kQ3_KQs + (j >> 2) * 32), _mm_cvtsi32_si128(2 * (j & 3))),
          _mm256_set1_epi8(3));
      const __m256i hbit = _mm256_and_si256(_mm256_srl_epi16(ld256(b), _mm_cvtsi32_si128(j)), _mm256_set1_epi8(1));
      // lo - 4 + 4 * hbit, in [-4, 3]
      const __m256i q = _mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16(hbit, 2)), _mm256_set1_epi8(4));
      V f[4];
      i8x32(q, f);
      const V d0 = _mm256_set1_ps(d * static_cast<float>(q3k_scale(2 * j, b + kQ3_KScales)));
      const V d1 = _mm256_set1_ps(d * static_cast<float>(q3k_scale(2 * j + 1, b + kQ3_KScales)));
      out[0] = _mm256_mul_ps(d0, f[0]);
      out[1] = _mm256_mul_ps(d0, f[1]);
      out[2] = _mm256_mul_ps(d1, f[2]);
      out[3] = _mm256_mul_ps(d1, f[3]);
    } else if constexpr (T == GgmlType::Q5_K) {
      // Sub-block j: nibbles as Q4_K, 5th bit is bit j of qh[l].
      const uint8_t* b = row + (c >> 3) * kQ5_KBytes;
      const int j = static_cast<int>(c & 7);
      int sc, m;
      q4k_scale_min(j, b + kQ5_KScales, sc, m);
      const V d = _mm256_set1_ps(half(b) * static_cast<float>(sc));
      const V neg_min = _mm256_set1_ps(-(half(b + kQ5_KDmin) * static_cast<float>(m)));
      const __m256i raw = ld256(b + kQ5_KQs + (j >> 1) * 32);
      const __m256i lo =
          _mm256_and_si256(_mm256_srl_epi16(raw, _mm_cvtsi32_si128(4 * (j & 1))), _mm256_set1_epi8(0x0F));
      const __m256i hbit = _mm256_and_si256(_mm256_srl_epi16(ld256(b + kQ5_KQh), _mm_cvtsi32_si128(j)),
                                            _mm256_set1_epi8(1));
      V f[4];
      u8x32(_mm256_or_si256(lo, _mm256_slli_epi16(hbit, 4)), f);
      for (int k = 0; k < 4; ++k) out[k] = _mm256_fmadd_ps(d, f[k], neg_min);
    } else if constexpr (T == GgmlType::IQ4_NL) {
      const uint8_t* b = row + c * kIQ4_NLBytes;
      const V d = _mm256_set1_ps(half(b));
      V f[4];
      i8x32(_mm256_shuffle_epi8(table16(kValuesIq4nl), nibbles32(b + kIQ4_NLQs)), f);
      for (int k = 0; k < 4; ++k) out[k] = _mm256_mul_ps(d, f[k]);
    } else if constexpr (T == GgmlType::IQ4_XS) {
      const uint8_t* b = row + (c >> 3) * kIQ4_XSBytes;
      const int ib = static_cast<int>(c & 7);
      const V d = _mm256_set1_ps(half(b) * static_cast<float>(iq4xs_scale(ib, b) - 32));
      V f[4];
      i8x32(_mm256_shuffle_epi8(table16(kValuesIq4nl), nibbles32(b + kIQ4_XSQs + 16 * ib)), f);
      for (int k = 0; k < 4; ++k) out[k] = _mm256_mul_ps(d, f[k]);
    } else if constexpr (T == GgmlType::MXFP4) {
      const uint8_t* b = row + c * kMXFP4Bytes;
      const V d = _mm256_set1_ps(e8m0_to_fp32_half(b[0]));
      V f[4];
      i8x32(_mm256_shuffle_epi8(table16(kValuesFp4), nibbles32(b + kMXFP4Qs)), f);
      for (int k = 0; k < 4; ++k) out[k] = _mm256_mul_ps(f[k], d);
    } else if constexpr (T == GgmlType::IQ2_XXS) {
      // Sub-block ib: 4 grid indices (one per 8 values), then a u32 of four 7-bit sign indices and a
      // 4-bit scale. Grid bytes are small positive integers, so the signed values fit int8.
      const uint8_t* b = row + (c >> 3) * kIQ2_XXSBytes;
      const uint8_t* g = b + kIQ2_XXSQs + 8 * (c & 7);
      const uint32_t aux = load_u32(g + 4);
      const V db = _mm256_set1_ps(half(b) * (0.5f + static_cast<float>(aux >> 28)) * 0.25f);
      V f[4];
      i8x32(apply_signs(grid4(kIq2xxsGrid, g[0], g[1], g[2], g[3]), ksigns4(aux)), f);
      for (int k = 0; k < 4; ++k) out[k] = _mm256_mul_ps(db, f[k]);
    } else if constexpr (T == GgmlType::IQ2_XS) {
      const uint8_t* b = row + (c >> 3) * kIQ2_XSBytes;
      const int ib = static_cast<int>(c & 7);
      const uint8_t* q = b + kIQ2_XSQs + 8 * ib;  // 4 u16: 9-bit grid index | 7-bit sign index << 9
      const uint16_t q0 = load_u16(q), q1 = load_u16(q + 2), q2 = load_u16(q + 4), q3 = load_u16(q + 6);
      const uint32_t signs = kKsignsIq2xs[q0 >> 9] | (kKsignsIq2xs[q1 >> 9] << 8) | (kKsignsIq2xs[q2 >> 9] << 16) |
                             (static_cast<uint32_t>(kKsignsIq2xs[q3 >> 9]) << 24);
      const float d = half(b);
      const uint8_t sc = b[kIQ2_XSScales + ib];
      const V db0 = _mm256_set1_ps(d * (0.5f + static_cast<float>(sc & 0xf)) * 0.25f);
      const V db1 = _mm256_set1_ps(d * (0.5f + static_cast<float>(sc >> 4)) * 0.25f);
      V f[4];
      i8x32(apply_signs(grid4(kIq2xsGrid, q0 & 511, q1 & 511, q2 & 511, q3 & 511), signs), f);
      out[0] = _mm256_mul_ps(db0, f[0]);
      out[1] = _mm256_mul_ps(db0, f[1]);
      out[2] = _mm256_mul_ps(db1, f[2]);
      out[3] = _mm256_mul_ps(db1, f[3]);
    } else if constexpr (T == GgmlType::IQ2_S) {
      const uint8_t* b = row + (c >> 3) * kIQ2_SBytes;
      const int ib = static_cast<int>(c & 7);
      const uint8_t* qs = b + kIQ2_SQs + 4 * ib;
      const int qh = b[kIQ2_SQh + ib];
      const float d = half(b);
      const uint8_t sc = b[kIQ2_SScales + ib];
      const V db0 = _mm256_set1_ps(d * (0.5f + static_cast<float>(sc & 0xf)) * 0.25f);
      const V db1 = _mm256_set1_ps(d * (0.5f + static_cast<float>(sc >> 4)) * 0.25f);
      const __m256i g = grid4(kIq2sGrid, qs[0] | ((qh << 8) & 0x300), qs[1] | ((qh << 6) & 0x300),
                              qs[2] | ((qh << 4) & 0x300), qs[3] | ((qh << 2) & 0x300));
      V f[4];
      i8x32(apply_signs(g, load_u32(b + kIQ2_SSigns + 4 * ib)), f);
      out[0] = _mm256_mul_ps(db0, f[0]);
      out[1] = _mm256_mul_ps(db0, f[1]);
      out[2] = _mm256_mul_ps(db1, f[2]);
      out[3] = _mm256_mul_ps(db1, f[3]);
    } else if constexpr (T == GgmlType::IQ3_XXS) {
      const uint8_t* b = row + (c >> 3) * kIQ3_XXSBytes;
      const int ib = static_cast<int>(c & 7);
      const uint32_t aux = load_u32(b + kIQ3_XXSSigns + 4 * ib);
      const V db = _mm256_set1_ps(half(b) * (0.5f + static_cast<float>(aux >> 28)) * 0.5f);
      const __m256i idx = u8x8_epi32(b + kIQ3_XXSQs + 8 * ib);
      V f[4];
      i8x32(apply_signs(grid8(kIq3xxsGrid, idx), ksigns4(aux)), f);
      for (int k = 0; k < 4; ++k) out[k] = _mm256_mul_ps(db, f[k]);
    } else if constexpr (T == GgmlType::IQ3_S) {
      // Index k (0..7) of sub-block ib: qs[k] | bit k of qh << 8.
      const uint8_t* b = row + (c >> 3) * kIQ3_SBytes;
      const int ib = static_cast<int>(c & 7);
      const uint8_t sc = b[kIQ3_SScales + ib / 2];
      const V db = _mm256_set1_ps(half(b) * static_cast<float>(1 + 2 * ((sc >> (4 * (ib & 1))) & 0xf)));
      const __m256i lo = u8x8_epi32(b + kIQ3_SQs + 8 * ib);
      const __m256i hi = _mm256_and_si256(_mm256_sllv_epi32(_mm256_set1_epi32(b[kIQ3_SQh + ib]),
                                                            _mm256_setr_epi32(8, 7, 6, 5, 4, 3, 2, 1)),
                                          _mm256_set1_epi32(0x100));
      V f[4];
      i8x32(apply_signs(grid8(kIq3sGrid, _mm256_or_si256(lo, hi)), load_u32(b + kIQ3_SSigns + 4 * ib)), f);
      for (int k = 0; k < 4; ++k) out[k] = _mm256_mul_ps(db, f[k]);
    } else if constexpr (T == GgmlType::IQ1_S) {
      // Grid values are -1, 0, 1; value = dl * (grid + delta), delta = +-1/8 per sub-block.
      const uint8_t* b = row + (c >> 3) * kIQ1_SBytes;
      const int ib = static_cast<int>(c & 7);
      const uint8_t* qs = b + kIQ1_SQs + 4 * ib;
      const int qh = load_u16(b + kIQ1_SQh + 2 * ib);
      const V dl = _mm256_set1_ps(half(b) * static_cast<float>(2 * ((qh >> 12) & 7) + 1));
      const V delta = _mm256_set1_ps(iq1_delta(static_cast<uint32_t>(qh & 0x8000) << 16));
      V f[4];
      i8x32(grid4(kIq1sGrid, qs[0] | ((qh << 8) & 0x700), qs[1] | ((qh << 5) & 0x700), qs[2] | ((qh << 2) & 0x700),
                  qs[3] | ((qh >> 1) & 0x700)),
            f);
      for (int k = 0; k < 4; ++k) out[k] = _mm256_mul_ps(dl, _mm256_add_ps(f[k], delta));
    } else if constexpr (T == GgmlType::IQ1_M) {
      // As IQ1_S, with a 3-bit scale per 16 values and the shift's sign per 8 (qh nibble bit 3).
      const uint8_t* b = row + (c >> 3) * kIQ1_MBytes;
      const int ib = static_cast<int>(c & 7);
      const uint8_t* sp = b + kIQ1_MScales;
      const uint16_t d16 = static_cast<uint16_t>((load_u16(sp) >> 12) | ((load_u16(sp + 2) >> 8) & 0x00f0) |
                                                 ((load_u16(sp + 4) >> 4) & 0x0f00) | (load_u16(sp + 6) & 0xf000));
      const float d = _cvtsh_ss(d16);
      const int s = load_u16(sp + 2 * (ib / 2)) >> (6 * (ib % 2));
      const uint8_t* qs = b + kIQ1_MQs + 4 * ib;
      const int h0 = b[kIQ1_MQh + 2 * ib], h1 = b[kIQ1_MQh + 2 * ib + 1];  // nibbles of groups 0, 1 / 2, 3
      const int nib[4] = {h0 & 0xf, h0 >> 4, h1 & 0xf, h1 >> 4};
      V f[4];
      i8x32(grid4(kIq1sGrid, qs[0] | ((nib[0] & 7) << 8), qs[1] | ((nib[1] & 7) << 8), qs[2] | ((nib[2] & 7) << 8),
                  qs[3] | ((nib[3] & 7) << 8)),
            f);
      const V dl[2] = {_mm256_set1_ps(d * static_cast<float>(2 * (s & 7) + 1)),
                       _mm256_set1_ps(d * static_cast<float>(2 * ((s >> 3) & 7) + 1))};
      for (int k = 0; k < 4; ++k) {
        const V delta = _mm256_set1_ps(iq1_delta(static_cast<uint32_t>(nib[k] & 8) << 28));
        out[k] = _mm256_mul_ps(dl[k / 2], _mm256_add_ps(f[k], delta));
      }
    } else {
      static_assert(T == GgmlType::F32 && T != GgmlType::F32, "no AVX2 decoder for this type");
    }
  }
};

// ---- Integer dot products on int8-rounded activations (Q8_0, Q4_0, Q4_K, Q6_K) ----
// A float-decode chunk costs ~16 instructions per 32 weights and token (widen, convert, scale, FMA), which
// keeps decode far below memory speed on few cores. Here each token's activations are rounded once per call
// to int8 blocks of 32 (quantize_activation_q8's rule, bit for bit), and a chunk's dot is maddubs + madd on 32
// byte lanes at once: an exact int32 sum, then one fp32 multiply-add with the two block scales.

// x (n, a multiple of 32) -> q (n) int8, d, s, sum and sums (n / 32); the same bits as quantize_activation_q8.
void quantize_act(const float* x, int64_t n, int8_t* q, float* d, float* s, int32_t* sum, int32_t* sums) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (int64_t b = 0; b < n / 32; ++b) {
    __m256 v[4];
    for (int k = 0; k < 4; ++k) v[k] = _mm256_loadu_ps(x + 32 * b + 8 * k);
    __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], abs_mask), _mm256_and_ps(v[1], abs_mask)),
                             _mm256_max_ps(_mm256_and_ps(v[2], abs_mask), _mm256_and_ps(v[3], abs_mask)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    const float amax = _mm_cvtss_f32(h);
    const float db = amax / 127.0f;
    const __m256 id = _mm256_set1_ps(db != 0.0f ? 1.0f / db : 0.0f);
    __m256i iv[4];
    for (int k = 0; k < 4; ++k)
      iv[k] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[k], id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    // The two halves' sums (elements 0..15 in iv[0..1], 16..31 in iv[2..3]) in the low and high 128 bits.
    const __m256i h01 = _mm256_add_epi32(iv[0], iv[1]), h23 = _mm256_add_epi32(iv[2], iv[3]);
    __m256i hs = _mm256_add_epi32(_mm256_permute2x128_si256(h01, h23, 0x20), _mm256_permute2x128_si256(h01, h23, 0x31));
    hs = _mm256_add_epi32(hs, _mm256_shuffle_epi32(hs, 0x4E));
    hs = _mm256_add_epi32(hs, _mm256_shuffle_epi32(hs, 0xB1));
    const int32_t sum_lo = _mm256_cvtsi256_si32(hs), sum_hi = _mm_cvtsi128_si32(_mm256_extracti128_si256(hs, 1));
    // Each half is at most 16 * 127 in magnitude: an int16 each.
    sums[b] = static_cast<int32_t>(static_cast<uint32_t>(static_cast<uint16_t>(sum_lo)) |
                                   static_cast<uint32_t>(static_cast<uint16_t>(sum_hi)) << 16);
    // packs work within 128-bit lanes: the bytes come out as 4-element groups 0,2,4,6,1,3,5,7 of the block.
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(iv[0], iv[1]), _mm256_packs_epi32(iv[2], iv[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 32 * b),
                        _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    d[b] = db;
    sum[b] = sum_lo + sum_hi;
    s[b] = db * static_cast<float>(sum[b]);
  }
}

// Chunk c (32 weights) of a row as int8 lanes in element order, with what scales their integer dot.
struct WChunk {
  __m256i q;    // 32 quants: signed (Q8_0), or unsigned with the offset kOffset<T> still in them
  __m256i sc;   // 16 int16 multipliers of the maddubs pairs: 1, or Q6_K's 16-element scales
  float d;      // fp32 scale of the chunk's integer dot
  float m;      // Q4_K: the minimum's scale (value = d * q - m)
};

// The offset the unsigned quants keep (value = d * (q - offset)): subtracted after maddubs as
// offset * sum(x) per pair, computed once per token and chunk for all rows. Q8_0's signed quants have none
// (kSigned) and take the sign trick instead.
template <GgmlType T>
constexpr int kOffset = T == GgmlType::Q4_0 ? 8 : T == GgmlType::Q6_K ? 32 : 0;
template <GgmlType T>
constexpr bool kSigned = T == GgmlType::Q8_0;
template <GgmlType T>
constexpr bool kHasMin = T == GgmlType::Q4_K;

// Q4_K: the scales of a super-block's eight sub-blocks, unpacked once per super-block and row where rows are
// decoded whole (prefill: 10% faster for Q4_K_M); decode's 4-row tiles unpack per chunk, which measured faster
// there (6.5 against 5.5 tokens/s). Both compute each scale by the same expression: the same bits.
struct Q4kScales {
  float d[8];  // d * sc_j
  float m[8];  // dmin * m_j
};

// Always inlined: GCC otherwise leaves the Q4_K and Q6_K decoders out of line, and a call per chunk and row
// (with the chunk's round trip through memory and a vzeroupper) costs as much as the chunk's dot. st: null, or
// Q4_K's scales kept across the chunks of a row taken in order from a super-block's first.
template <GgmlType T>
[[gnu::always_inline]] inline void decode_i8(const uint8_t* row, int64_t c, WChunk& w, Q4kScales* st) {
  if constexpr (T == GgmlType::Q8_0) {
    const uint8_t* b = row + c * kQ8_0Bytes;
    w.d = half(b);
    w.q = ld256(b + kQ8_0Qs);
    w.sc = _mm256_set1_epi16(1);
  } else if constexpr (T == GgmlType::Q4_0) {
    const uint8_t* b = row + c * kQ4_0Bytes;
    w.d = half(b);
    w.q = nibbles32(b + kQ4_0Qs);
    w.sc = _mm256_set1_epi16(1);
  } else if constexpr (T == GgmlType::Q4_K) {
    const uint8_t* b = row + (c >> 3) * kQ4_KBytes;
    const int j = static_cast<int>(c & 7);
    if (st == nullptr) {
      int sc, m;
      q4k_scale_min(j, b + kQ4_KScales, sc, m);
      w.d = half(b) * static_cast<float>(sc);
      w.m = half(b + kQ4_KDmin) * static_cast<float>(m);
    } else {
      if (j == 0) {
        const float d = half(b), dmin = half(b + kQ4_KDmin);
        for (int k = 0; k < 8; ++k) {
          int sc, m;
          q4k_scale_min(k, b + kQ4_KScales, sc, m);
          st->d[k] = d * static_cast<float>(sc);
          st->m[k] = dmin * static_cast<float>(m);
        }
      }
      w.d = st->d[j];
      w.m = st->m[j];
    }
    const __m256i raw = ld256(b + kQ4_KQs + (j >> 1) * 32);
    w.q = _mm256_and_si256(_mm256_srl_epi16(raw, _mm_cvtsi32_si128(4 * (j & 1))), _mm256_set1_epi8(0x0F));
    w.sc = _mm256_set1_epi16(1);
  } else if constexpr (T == GgmlType::Q6_K) {
    const uint8_t* b = row + (c >> 3) * kQ6_KBytes;
    const int q8 = static_cast<int>(c & 7), g = q8 >> 2, s = q8 & 3;
    const auto* scales = reinterpret_cast<const int8_t*>(b + kQ6_KScales) + g * 8 + 2 * s;
    w.q = q6k_quants(b, g, s);
    // maddubs pair lanes 0..7 hold elements 0..15 (scale 2s), lanes 8..15 elements 16..31 (scale 2s+1).
    w.sc = _mm256_setr_m128i(_mm_set1_epi16(scales[0]), _mm_set1_epi16(scales[1]));
    w.d = half(b + kQ6_KD);
  } else {
    static_assert(T == GgmlType::F32 && T != GgmlType::F32, "no int8 decoder for this type");
  }
}

// The chunk's 8 int32 partial dots with 32 activations xq; bias = maddubs(kOffset, xq). maddubs needs an
// unsigned first operand: signed weights lend their signs to the activations (|w| * sign(w) x). Pairs stay
// below int16's limit: 2 * 128 * 127 = 32,512; Q6_K's 2 * 63 * 127, times a scale below 128 after madd,
// is well inside int32.
template <GgmlType T>
[[gnu::always_inline]] inline __m256i dot_i8(const WChunk& w, __m256i xq, __m256i bias) {
  __m256i p;
  if constexpr (kSigned<T>) {
    p = _mm256_maddubs_epi16(_mm256_sign_epi8(w.q, w.q), _mm256_sign_epi8(xq, w.q));
  } else if constexpr (kOffset<T> != 0) {
    p = _mm256_sub_epi16(_mm256_maddubs_epi16(w.q, xq), bias);
  } else {
    p = _mm256_maddubs_epi16(w.q, xq);
  }
  return _mm256_madd_epi16(p, w.sc);
}

// R rows x TB tokens. Each (row, token) result is one fixed sequence of operations over the chunks, the
// same whatever R and TB are and whether the chunks are decoded here or read back decoded (batch
// invariance, as for the float tiles in kernels_tile.h). Src is either raw rows (decoded per chunk) or
// `const WChunk*` rows of n_chunks already decoded (prefill: each row decoded once for all its tiles).
template <GgmlType T, int R, int TB, bool kDecoded>
void itile(const void* w /* (R rows) */, size_t stride, int64_t n_chunks, const ActRow* a /* (TB) */,
           float* y /* (TB, ldy) */, int64_t ldy) {
  __m256 acc[R][TB];
  float corr[R][TB];  // Q4_K: sum over chunks of m * s
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TB; ++t) {
      acc[r][t] = _mm256_setzero_ps();
      corr[r][t] = 0.0f;
    }
  for (int64_t c = 0; c < n_chunks; ++c) {
    WChunk wc[R];
    for (int r = 0; r < R; ++r) {
      if constexpr (kDecoded) {
        wc[r] = static_cast<const WChunk*>(w)[r * n_chunks + c];
        if constexpr (T != GgmlType::Q6_K) wc[r].sc = _mm256_set1_epi16(1);  // a constant, not a load
      } else {
        decode_i8<T>(static_cast<const uint8_t*>(w) + r * stride, c, wc[r], nullptr);
      }
    }
    __m256 wd[R];  // the rows' scales, broadcast once for all tokens
    for (int r = 0; r < R; ++r) wd[r] = _mm256_set1_ps(wc[r].d);
    for (int t = 0; t < TB; ++t) {
      const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[t].q + 32 * c));
      const __m256 dx = _mm256_broadcast_ss(a[t].d + c);
      __m256i bias = _mm256_setzero_si256();
      if constexpr (kOffset<T> != 0) bias = _mm256_maddubs_epi16(_mm256_set1_epi8(kOffset<T>), xq);
      for (int r = 0; r < R; ++r) {
        const __m256 p = _mm256_cvtepi32_ps(dot_i8<T>(wc[r], xq, bias));
        acc[r][t] = _mm256_fmadd_ps(p, _mm256_mul_ps(wd[r], dx), acc[r][t]);
        if constexpr (kHasMin<T>) corr[r][t] = __builtin_fmaf(wc[r].m, a[t].s[c], corr[r][t]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TB; ++t) y[t * ldy + r] = Avx2::hsum(acc[r][t]) - corr[r][t];
}

template <GgmlType T, int R, bool kDecoded>
void irows(const void* w, size_t stride, int64_t n_chunks, const ActRow* a, int64_t n_tok, float* y,
           int64_t ldy) {
  constexpr int kTb = 3;
  int64_t t = 0;
  for (; t + kTb <= n_tok; t += kTb) itile<T, R, kTb, kDecoded>(w, stride, n_chunks, a + t, y + t * ldy, ldy);
  if (n_tok - t == 2) itile<T, R, 2, kDecoded>(w, stride, n_chunks, a + t, y + t * ldy, ldy);
  if (n_tok - t == 1) itile<T, R, 1, kDecoded>(w, stride, n_chunks, a + t, y + t * ldy, ldy);
}

template <GgmlType T>
void imatmul(const uint8_t* w, size_t stride, int64_t n_rows, int64_t n_cols, const ActRow* a, int64_t n_tok,
             float* y, int64_t ldy, WChunk* decoded /* (2, n_cols / 32) */) {
  const int64_t n_chunks = n_cols / 32;
  int64_t r = 0;
  if (n_tok == 1) {  // decode: four rows share each activation load
    for (; r + 4 <= n_rows; r += 4) irows<T, 4, false>(w + r * stride, stride, n_chunks, a, n_tok, y + r, ldy);
    for (; r < n_rows; ++r) irows<T, 1, false>(w + r * stride, stride, n_chunks, a, n_tok, y + r, ldy);
    return;
  }
  // Several tokens: decode each pair of rows once, then run every token tile over the decoded chunks.
  for (; r < n_rows; r += 2) {
    const int rows = n_rows - r >= 2 ? 2 : 1;
    for (int k = 0; k < rows; ++k) {
      Q4kScales q4k;
      for (int64_t c = 0; c < n_chunks; ++c) decode_i8<T>(w + (r + k) * stride, c, decoded[k * n_chunks + c], &q4k);
    }
    if (rows == 2) irows<T, 2, true>(decoded, 0, n_chunks, a, n_tok, y + r, ldy);
    else irows<T, 1, true>(decoded, 0, n_chunks, a, n_tok, y + r, ldy);
  }
}


// ---- Q8_0, Q4_0, Q4_K and Q6_K in groups of 8 rows (pack_rows, blocks.h's kQ8x8, kQ4x8, kQ4Kx8, kQ6Kx8) ----
// Row-by-row decode spends a float convert, multiply and FMA, a scale load and a broadcast per row and chunk,
// and reads 8 rows from 8 places. A packed group puts one row in each 32-bit lane instead: a 32-byte load
// holds 4 quant bytes (8 weights) of every row, maddubs + madd against the 4 activations broadcast to every
// lane leave each row's sum in its own lane, and one convert and FMA per block serve all 8 rows, read from
// one place. Low nibbles are elements 4k..4k+3, high nibbles 16+4k..16+4k+3 (ggml's Q4_0 order).

__m256i srl32(__m256i v, int bits) { return _mm256_srl_epi32(v, _mm_cvtsi32_si128(bits)); }
// 4 activation bytes in every 32-bit lane.
__m256i bcast4(const int8_t* x) {
  return _mm256_set1_epi32(static_cast<int>(load_u32(reinterpret_cast<const uint8_t*>(x))));
}

// A 128-byte kQ4x8 block of 32 columns as 4 + 4 vectors of unsigned nibbles.
struct Q4x8 {
  __m256i lo[4], hi[4];
};
[[gnu::always_inline]] inline Q4x8 q4x8_nibbles(const uint8_t* q /* (128) */) {
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  Q4x8 n;
  for (int k = 0; k < 4; ++k) {
    const __m256i raw = ld256(q + 32 * k);
    n.lo[k] = _mm256_and_si256(raw, m4);
    n.hi[k] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
  }
  return n;
}
// Each lane's (row's) 16 int16 pair sums of its 32 nibbles times the block's 32 activations xq: the 8 maddubs
// products of a lane added (each at most 2 * 15 * 127 = 3810 in magnitude: 8 of them, 30,480, fit int16).
[[gnu::always_inline]] inline __m256i q4x8_pairs(const Q4x8& n, const int8_t* xq /* (32) */) {
  // Activations 4k..4k+3 (and 16+4k..) in every lane, against each row's 4 quant bytes.
  __m256i s16 =
      _mm256_add_epi16(_mm256_maddubs_epi16(n.lo[0], bcast4(xq)), _mm256_maddubs_epi16(n.hi[0], bcast4(xq + 16)));
  for (int k = 1; k < 4; ++k) {
    s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(n.lo[k], bcast4(xq + 4 * k)));
    s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(n.hi[k], bcast4(xq + 16 + 4 * k)));
  }
  return s16;
}

// Q4_0: the 8 rows' results for TB tokens. Per block and token: the pair sums madd to int32, minus 8 * sum(q)
// (the offset 8 of the unsigned quants), then acc += float(isum) * (d_w * d_x): the same operations for a
// token whatever TB is (batch invariance).
template <int TB>
void q4x8_tile(const uint8_t* g /* (n_blocks, kQ4x8Block) */, int64_t n_blocks, const ActRow* a /* (TB) */,
               float* y /* (TB, ldy) */, int64_t ldy) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[TB];
  for (int t = 0; t < TB; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < n_blocks; ++b) {
    const uint8_t* blk = g + b * kQ4x8Block;
    const __m256 dw = _mm256_cvtph_ps(ld128(blk));
    const Q4x8 n = q4x8_nibbles(blk + kQ4x8Qs);
    for (int t = 0; t < TB; ++t) {
      const __m256i s16 = q4x8_pairs(n, a[t].q + 32 * b);
      const __m256i isum = _mm256_sub_epi32(_mm256_madd_epi16(s16, ones), _mm256_set1_epi32(8 * a[t].sum[b]));
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(dw, _mm256_broadcast_ss(a[t].d + b)), acc[t]);
    }
  }
  for (int t = 0; t < TB; ++t) _mm256_storeu_ps(y + t * ldy, acc[t]);
}

// Q8_0: signed quants, so each 4-byte group takes the sign trick (maddubs(|w|, sign(x, w))) and its own madd
// (a pair reaches 2 * 127 * 127 = 32,258: two would overflow int16); acc += float(isum) * (d_w * d_x) per
// block, the same operations for a token whatever TB is.
template <int TB>
void q8x8_tile(const uint8_t* g /* (n_blocks, kQ8x8Block) */, int64_t n_blocks, const ActRow* a /* (TB) */,
               float* y /* (TB, ldy) */, int64_t ldy) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[TB];
  for (int t = 0; t < TB; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < n_blocks; ++b) {
    const uint8_t* blk = g + b * kQ8x8Block;
    const __m256 dw = _mm256_cvtph_ps(ld128(blk));
    for (int t = 0; t < TB; ++t) {
      const int8_t* xq = a[t].q + 32 * b;
      __m256i isum = _mm256_setzero_si256();
      for (int k = 0; k < 8; ++k) {
        const __m256i w = ld256(blk + kQ8x8Qs + 32 * k);
        const __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(bcast4(xq + 4 * k), w));
        isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p, ones));
      }
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(dw, _mm256_broadcast_ss(a[t].d + b)), acc[t]);
    }
  }
  for (int t = 0; t < TB; ++t) _mm256_storeu_ps(y + t * ldy, acc[t]);
}

// Q4_K: sub-block j's pair sums madd with each row's 6-bit scale (the int16 pair (sc, sc) in its lane), and
// the minimum's term kept apart; per token and super-block
//   acc += d * sum_j float(isum_j) * dx_j - dmin * sum_j m_j * s_j   (s_j = dx_j * sum(q_j), ActRow::s),
// the same operations for a token whatever TB is.
template <int TB>
void q4kx8_tile(const uint8_t* g /* (n_super, kQ4Kx8Block) */, int64_t n_super, const ActRow* a /* (TB) */,
                float* y /* (TB, ldy) */, int64_t ldy) {
  const __m256i m6 = _mm256_set1_epi32(63), m4 = _mm256_set1_epi32(0x0F), m2 = _mm256_set1_epi32(3);
  __m256 acc[TB];
  for (int t = 0; t < TB; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t sb = 0; sb < n_super; ++sb) {
    const uint8_t* blk = g + sb * kQ4Kx8Block;
    const __m256 d = _mm256_cvtph_ps(ld128(blk)), dmin = _mm256_cvtph_ps(ld128(blk + kQ4Kx8Dmin));
    const __m256i w0 = ld256(blk + kQ4Kx8Scales), w1 = ld256(blk + kQ4Kx8Scales + 32),
                  w2 = ld256(blk + kQ4Kx8Scales + 64);
    __m256 sd[TB], sm[TB];
    for (int t = 0; t < TB; ++t) sd[t] = sm[t] = _mm256_setzero_ps();
    for (int j = 0; j < 8; ++j) {
      // q4k_scale_min on 8 rows at once: byte j & 3 of the rows' scale words.
      __m256i sc, mn;
      if (j < 4) {
        sc = _mm256_and_si256(srl32(w0, 8 * j), m6);
        mn = _mm256_and_si256(srl32(w1, 8 * j), m6);
      } else {
        const int b = 8 * (j - 4);
        sc = _mm256_or_si256(_mm256_and_si256(srl32(w2, b), m4),
                             _mm256_slli_epi32(_mm256_and_si256(srl32(w0, b + 6), m2), 4));
        mn = _mm256_or_si256(_mm256_and_si256(srl32(w2, b + 4), m4),
                             _mm256_slli_epi32(_mm256_and_si256(srl32(w1, b + 6), m2), 4));
      }
      const __m256i sc2 = _mm256_or_si256(sc, _mm256_slli_epi32(sc, 16));
      const __m256 mf = _mm256_cvtepi32_ps(mn);
      const Q4x8 n = q4x8_nibbles(blk + kQ4Kx8Qs + 128 * j);
      const int64_t c = 8 * sb + j;  // the activation block
      for (int t = 0; t < TB; ++t) {
        const __m256i isum = _mm256_madd_epi16(q4x8_pairs(n, a[t].q + 32 * c), sc2);
        sd[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_broadcast_ss(a[t].d + c), sd[t]);
        sm[t] = _mm256_fmadd_ps(mf, _mm256_broadcast_ss(a[t].s + c), sm[t]);
      }
    }
    for (int t = 0; t < TB; ++t) acc[t] = _mm256_fnmadd_ps(sm[t], dmin, _mm256_fmadd_ps(sd[t], d, acc[t]));
  }
  for (int t = 0; t < TB; ++t) _mm256_storeu_ps(y + t * ldy, acc[t]);
}

// Q6_K: per chunk j the 6-bit quants rebuilt from the low nibbles and the top-bit words; elements 0..15 and
// 16..31 have their own scales, so their pair sums (each maddubs pair at most 2 * 63 * 127 = 16,002: two
// added fit int16) madd with (sc_a, sc_a) and (sc_b, sc_b); the offset 32 of the quants comes off as
// 32 * (sc_a * sum(x[0..15]) + sc_b * sum(x[16..31])), one madd of (sc_a, sc_b) with the two half sums. Per
// token and super-block: acc += d * sum_j float(isum_j) * dx_j, the same operations whatever TB is.
template <int TB>
void q6kx8_tile(const uint8_t* g /* (n_super, kQ6Kx8Block) */, int64_t n_super, const ActRow* a /* (TB) */,
                float* y /* (TB, ldy) */, int64_t ldy) {
  const __m256i m30 = _mm256_set1_epi8(0x30);
  // Within each 32-bit lane: (sc_a, sc_b) -> (sc_a, sc_a) and (sc_b, sc_b).
  const __m256i dup_a = _mm256_setr_epi8(0, 1, 0, 1, 4, 5, 4, 5, 8, 9, 8, 9, 12, 13, 12, 13, 0, 1, 0, 1, 4, 5, 4, 5,
                                         8, 9, 8, 9, 12, 13, 12, 13);
  const __m256i dup_b = _mm256_setr_epi8(2, 3, 2, 3, 6, 7, 6, 7, 10, 11, 10, 11, 14, 15, 14, 15, 2, 3, 2, 3, 6, 7,
                                         6, 7, 10, 11, 10, 11, 14, 15, 14, 15);
  __m256 acc[TB];
  for (int t = 0; t < TB; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t sb = 0; sb < n_super; ++sb) {
    const uint8_t* blk = g + sb * kQ6Kx8Block;
    const __m256 d = _mm256_cvtph_ps(ld128(blk));
    __m256 sd[TB];
    for (int t = 0; t < TB; ++t) sd[t] = _mm256_setzero_ps();
    for (int j = 0; j < 8; ++j) {
      const __m256i sc = _mm256_cvtepi8_epi16(ld128(blk + kQ6Kx8Scales + 16 * j));  // (sc_a, sc_b) per lane
      const __m256i sa = _mm256_shuffle_epi8(sc, dup_a), sbv = _mm256_shuffle_epi8(sc, dup_b);
      const uint8_t* chunk = blk + kQ6Kx8Qs + j * kQ6Kx8Chunk;
      Q4x8 n = q4x8_nibbles(chunk);
      const __m256i h_lo = ld256(chunk + 128), h_hi = ld256(chunk + 160);
      // Top bits of elements 4k + i to bits 4, 5 of byte i: shifts within 16-bit lanes, the bits that cross
      // into the next byte masked off.
      n.lo[0] = _mm256_or_si256(n.lo[0], _mm256_and_si256(_mm256_slli_epi16(h_lo, 4), m30));
      n.hi[0] = _mm256_or_si256(n.hi[0], _mm256_and_si256(_mm256_slli_epi16(h_hi, 4), m30));
      n.lo[1] = _mm256_or_si256(n.lo[1], _mm256_and_si256(_mm256_slli_epi16(h_lo, 2), m30));
      n.hi[1] = _mm256_or_si256(n.hi[1], _mm256_and_si256(_mm256_slli_epi16(h_hi, 2), m30));
      n.lo[2] = _mm256_or_si256(n.lo[2], _mm256_and_si256(h_lo, m30));
      n.hi[2] = _mm256_or_si256(n.hi[2], _mm256_and_si256(h_hi, m30));
      n.lo[3] = _mm256_or_si256(n.lo[3], _mm256_and_si256(_mm256_srli_epi16(h_lo, 2), m30));
      n.hi[3] = _mm256_or_si256(n.hi[3], _mm256_and_si256(_mm256_srli_epi16(h_hi, 2), m30));
      const int64_t c = 8 * sb + j;  // the activation block
      for (int t = 0; t < TB; ++t) {
        const int8_t* xq = a[t].q + 32 * c;
        // Two maddubs products of vectors v and v + 1 of `q`, against activations xq[i..i+3] and xq[i+4..i+7].
        const auto pair = [xq](const __m256i* q, int v, int i) {
          return _mm256_add_epi16(_mm256_maddubs_epi16(q[v], bcast4(xq + i)),
                                  _mm256_maddubs_epi16(q[v + 1], bcast4(xq + i + 4)));
        };
        const __m256i dot_a = _mm256_add_epi32(_mm256_madd_epi16(pair(n.lo, 0, 0), sa),  // elements 0..15
                                               _mm256_madd_epi16(pair(n.lo, 2, 8), sa));
        const __m256i dot_b = _mm256_add_epi32(_mm256_madd_epi16(pair(n.hi, 0, 16), sbv),  // 16..31
                                               _mm256_madd_epi16(pair(n.hi, 2, 24), sbv));
        const __m256i dot = _mm256_add_epi32(dot_a, dot_b);
        const __m256i off = _mm256_slli_epi32(_mm256_madd_epi16(sc, _mm256_set1_epi32(a[t].sums[c])), 5);
        sd[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(dot, off)), _mm256_broadcast_ss(a[t].d + c),
                                sd[t]);
      }
    }
    for (int t = 0; t < TB; ++t) acc[t] = _mm256_fmadd_ps(sd[t], d, acc[t]);
  }
  for (int t = 0; t < TB; ++t) _mm256_storeu_ps(y + t * ldy, acc[t]);
}

// Every token tile of one packed group: TB tokens at a time, then the tail. tile(std::integral_constant<int, TB>,
// g, n_blocks, a, y, ldy) runs one tile kernel.
template <class Tile>
void group_tiles(Tile tile, const uint8_t* g, int64_t n_blocks, const ActRow* a, int64_t n_tok, float* y,
                 int64_t ldy) {
  int64_t t = 0;
  for (; t + 4 <= n_tok; t += 4) tile(std::integral_constant<int, 4>{}, g, n_blocks, a + t, y + t * ldy, ldy);
  switch (n_tok - t) {
    case 3: tile(std::integral_constant<int, 3>{}, g, n_blocks, a + t, y + t * ldy, ldy); break;
    case 2: tile(std::integral_constant<int, 2>{}, g, n_blocks, a + t, y + t * ldy, ldy); break;
    case 1: tile(std::integral_constant<int, 1>{}, g, n_blocks, a + t, y + t * ldy, ldy); break;
    default: break;
  }
}

// Each token's rounded activations (quantize_act) in decode_scratch, after `lead` floats (32-byte aligned)
// that the caller may use; returns the table of n_tok rows.
ActRow* round_activations(const float* x, int64_t ldx, int64_t n_tok, int64_t n_cols, int64_t lead, float** lead_out) {
  // Scratch: `lead`, the token table, then per token n_cols int8 values and n_cols / 32 scales, sums d*q,
  // integer sums and half sums.
  const int64_t nb = n_cols / 32;
  const int64_t per_tok = n_cols / 4 + 4 * nb;  // in floats (int32 sums are float-sized)
  static_assert(sizeof(ActRow) % sizeof(float) == 0 && sizeof(int32_t) == sizeof(float));
  constexpr int64_t kRowFloats = sizeof(ActRow) / sizeof(float);
  float* raw = decode_scratch(static_cast<size_t>(8 + lead + n_tok * (kRowFloats + per_tok)));
  float* buf = raw + (8 - (reinterpret_cast<uintptr_t>(raw) / sizeof(float)) % 8) % 8;  // 32-byte aligned
  *lead_out = buf;
  auto* rows = reinterpret_cast<ActRow*>(buf + lead);  // (n_tok)
  for (int64_t t = 0; t < n_tok; ++t) {
    float* base = buf + lead + n_tok * kRowFloats + t * per_tok;
    auto* q = reinterpret_cast<int8_t*>(base);
    float* d = base + n_cols / 4;
    float* s = d + nb;
    auto* sum = reinterpret_cast<int32_t*>(s + nb);
    int32_t* sums = sum + nb;
    quantize_act(x + t * ldx, n_cols, q, d, s, sum, sums);
    rows[t] = ActRow{q, d, s, sum, sums};
  }
  return rows;
}

// F16 / BF16 packed rows (blocks.h's kFx8 layouts): a GEMM that broadcasts one activation to the 8 rows of a group
// and multiplies it with their column, converted in one instruction (F16's vcvtph2ps) or two columns in two
// (BF16's shift and mask). Each (row, token) dot is a sum over slabs of kFx8Slab columns in order, each slab one
// FMA chain from zero added to the running total in y: the same operations whatever the tile, so decode and
// prefill give a token the same bits (batch invariance), and no chain is longer than a slab (its rounding error
// grows with the chain). The unpacked float tile spends ~14 instructions per 32 weights and token, 4 of them a
// dependent FMA chain; here 2-3 per column of 8 rows, and prefill tiles reuse each converted column for 6 tokens.

// Column k of the G groups (gb bytes apart) as 8 floats each.
template <GgmlType T, int G>
void fx8_column(const uint8_t* g, size_t gb, int64_t k, int64_t n_cols, __m256* w /* (G) */) {
  if constexpr (T == GgmlType::F16) {
    for (int i = 0; i < G; ++i) w[i] = _mm256_cvtph_ps(ld128(g + i * gb + kFx8ColBytes * k));
  } else {
    // An unpaired last column: 8 bf16 -> the top halves of 8 floats.
    if (k == n_cols / 2 * 2) {
      for (int i = 0; i < G; ++i)
        w[i] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(ld128(g + i * gb + 32 * (k / 2))), 16));
      return;
    }
    for (int i = 0; i < G; ++i) {
      const __m256i v = ld256(g + i * gb + 32 * (k / 2));
      w[i] = _mm256_castsi256_ps(k & 1 ? _mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u)))
                                       : _mm256_slli_epi32(v, 16));
    }
  }
}

// G groups x TB tokens over columns [k0, k1) (one slab): y (TB tokens ldy apart, G * 8 rows) = the slab's chain,
// or y + it after the first slab.
template <GgmlType T, int G, int TB>
void fx8_tile(const uint8_t* g /* G groups, gb bytes apart */, size_t gb, int64_t k0, int64_t k1, int64_t n_cols,
              const float* x /* (TB, ldx) */, int64_t ldx, float* y /* (TB, ldy) */, int64_t ldy) {
  __m256 acc[G][TB];
  for (int i = 0; i < G; ++i)
    for (int t = 0; t < TB; ++t) acc[i][t] = _mm256_setzero_ps();
  for (int64_t k = k0; k < k1; ++k) {
    __m256 w[G];
    fx8_column<T, G>(g, gb, k, n_cols, w);
    for (int t = 0; t < TB; ++t) {
      const __m256 xb = _mm256_broadcast_ss(x + t * ldx + k);
      for (int i = 0; i < G; ++i) acc[i][t] = _mm256_fmadd_ps(w[i], xb, acc[i][t]);
    }
  }
  for (int t = 0; t < TB; ++t)
    for (int i = 0; i < G; ++i) {
      float* out = y + t * ldy + 8 * i;
      _mm256_storeu_ps(out, k0 == 0 ? acc[i][t] : _mm256_add_ps(_mm256_loadu_ps(out), acc[i][t]));
    }
}

// n_groups packed groups (gb bytes each) times n_tok tokens. Decode walks 4 groups at once (4 chains in flight,
// 4 streams); prefill tiles are 2 groups x 6 tokens (12 chains: two FMA pipes of 4 cycles' latency stay busy),
// each slab of the 2 groups (8 KiB of F16) staying in L1 while every token tile passes over it.
template <GgmlType T>
void fx8_rows(const uint8_t* w, size_t gb, int64_t n_groups, int64_t n_cols, const float* x, int64_t ldx,
              int64_t n_tok, float* y, int64_t ldy) {
  const auto slabs = [&](auto tile, const uint8_t* g, float* yg) {
    for (int64_t k0 = 0; k0 < n_cols; k0 += kFx8Slab) tile(g, k0, k0 + kFx8Slab < n_cols ? k0 + kFx8Slab : n_cols, yg);
  };
  int64_t i = 0;
  if (n_tok == 1) {
    for (; i + 4 <= n_groups; i += 4)
      slabs([&](const uint8_t* g, int64_t k0, int64_t k1, float* yg) { fx8_tile<T, 4, 1>(g, gb, k0, k1, n_cols, x, ldx, yg, ldy); },
            w + i * gb, y + 8 * i);
    for (; i < n_groups; ++i)
      slabs([&](const uint8_t* g, int64_t k0, int64_t k1, float* yg) { fx8_tile<T, 1, 1>(g, gb, k0, k1, n_cols, x, ldx, yg, ldy); },
            w + i * gb, y + 8 * i);
    return;
  }
  const auto tokens = [&]<int G>(const uint8_t* g, int64_t k0, int64_t k1, float* yg) {
    int64_t t = 0;
    for (; t + 6 <= n_tok; t += 6) fx8_tile<T, G, 6>(g, gb, k0, k1, n_cols, x + t * ldx, ldx, yg + t * ldy, ldy);
    const float* xt = x + t * ldx;
    float* yt = yg + t * ldy;
    switch (n_tok - t) {
      case 5: return fx8_tile<T, G, 5>(g, gb, k0, k1, n_cols, xt, ldx, yt, ldy);
      case 4: return fx8_tile<T, G, 4>(g, gb, k0, k1, n_cols, xt, ldx, yt, ldy);
      case 3: return fx8_tile<T, G, 3>(g, gb, k0, k1, n_cols, xt, ldx, yt, ldy);
      case 2: return fx8_tile<T, G, 2>(g, gb, k0, k1, n_cols, xt, ldx, yt, ldy);
      case 1: return fx8_tile<T, G, 1>(g, gb, k0, k1, n_cols, xt, ldx, yt, ldy);
      default: return;
    }
  };
  for (; i + 2 <= n_groups; i += 2)
    slabs([&](const uint8_t* g, int64_t k0, int64_t k1, float* yg) { tokens.template operator()<2>(g, k0, k1, yg); },
          w + i * gb, y + 8 * i);
  for (; i < n_groups; ++i)
    slabs([&](const uint8_t* g, int64_t k0, int64_t k1, float* yg) { tokens.template operator()<1>(g, k0, k1, yg); },
          w + i * gb, y + 8 * i);
}

}  // namespace

void matmul_avx2(GgmlType type, const uint8_t* w, size_t row_stride, int64_t n_rows, int64_t n_cols,
                 const float* x, int64_t ldx, int64_t n_tok, float* y, int64_t ldy) {
  matmul_dispatch<Avx2>(type, w, row_stride, n_rows, n_cols, x, ldx, n_tok, y, ldy);
}

void attend_chunk_avx2(float* s, int64_t lds, const int32_t* n_valid, int64_t n_q, const float* v, int64_t ldv,
                       int64_t hd, float scale, float* m, float* l, float* acc) {
  attend_chunk_rows<Avx2>(s, lds, n_valid, n_q, v, ldv, hd, scale, m, l, acc);
}

void convert_halves_avx2(GgmlType type, const uint8_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  if (type == GgmlType::F16) {
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(ld128(src + 2 * i)));
    for (; i < n; ++i) dst[i] = _cvtsh_ss(load_u16(src + 2 * i));
  } else {
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(ld128(src + 2 * i)), 16)));
    for (; i < n; ++i) {
      const uint32_t bits = static_cast<uint32_t>(load_u16(src + 2 * i)) << 16;
      std::memcpy(dst + i, &bits, sizeof bits);
    }
  }
}

void matmul_int8_avx2(GgmlType type, const uint8_t* w, size_t row_stride, int64_t n_rows, int64_t n_cols,
                      const float* x, int64_t ldx, int64_t n_tok, float* y, int64_t ldy) {
  // Two decoded rows (prefill) lead the scratch, for their 32-byte alignment.
  static_assert(sizeof(WChunk) % sizeof(float) == 0);
  constexpr int64_t kChunkFloats = sizeof(WChunk) / sizeof(float);
  const int64_t dec_floats = n_tok > 1 ? 2 * (n_cols / 32) * kChunkFloats : 0;
  float* lead = nullptr;
  const ActRow* rows = round_activations(x, ldx, n_tok, n_cols, dec_floats, &lead);
  auto* decoded = reinterpret_cast<WChunk*>(lead);
  switch (type) {
    case GgmlType::Q8_0: return imatmul<GgmlType::Q8_0>(w, row_stride, n_rows, n_cols, rows, n_tok, y, ldy, decoded);
    case GgmlType::Q4_0: return imatmul<GgmlType::Q4_0>(w, row_stride, n_rows, n_cols, rows, n_tok, y, ldy, decoded);
    case GgmlType::Q4_K: return imatmul<GgmlType::Q4_K>(w, row_stride, n_rows, n_cols, rows, n_tok, y, ldy, decoded);
    case GgmlType::Q6_K: return imatmul<GgmlType::Q6_K>(w, row_stride, n_rows, n_cols, rows, n_tok, y, ldy, decoded);
    default: break;
  }
  SHARDLM_CHECK(false, "no int8 kernel for ", type_name(type));
}

void matmul_packed_avx2(GgmlType type, const uint8_t* w, size_t row_stride, int64_t n_rows, int64_t n_cols,
                        const float* x, int64_t ldx, int64_t n_tok, float* y, int64_t ldy, PairTilesFn pairs) {
  const int64_t full = n_rows / kQ4x8Rows * kQ4x8Rows;
  if (type == GgmlType::F16 || type == GgmlType::BF16) {
    SHARDLM_CHECK(full == n_rows, "packed ", type_name(type), ": ", n_rows, " rows are not whole groups");
    const size_t gb = row_stride * kQ4x8Rows;
    if (type == GgmlType::F16) fx8_rows<GgmlType::F16>(w, gb, full / kQ4x8Rows, n_cols, x, ldx, n_tok, y, ldy);
    else fx8_rows<GgmlType::BF16>(w, gb, full / kQ4x8Rows, n_cols, x, ldx, n_tok, y, ldy);
    return;
  }
  // The tail rows' prefill decodes two rows at a time into scratch ahead of the activations (imatmul).
  const int64_t tail_floats =
      n_tok > 1 && full < n_rows ? 2 * (n_cols / 32) * static_cast<int64_t>(sizeof(WChunk) / sizeof(float)) : 0;
  float* lead = nullptr;
  const ActRow* a = round_activations(x, ldx, n_tok, n_cols, tail_floats, &lead);
  // The groups `pairs` takes (a wider family's kernels, two groups at a time), the rest here, then the last
  // n_rows % 8 rows in ggml's layout. n_blocks: the tile's blocks per row.
  const int64_t first =
      pairs ? kQ4x8Rows * pairs(type, w, row_stride * kQ4x8Rows, full / kQ4x8Rows, n_cols, a, n_tok, y, ldy) : 0;
  const auto rows = [&]<GgmlType T>(int64_t n_blocks, auto tile) {
    for (int64_t r = first; r < full; r += kQ4x8Rows) group_tiles(tile, w + r * row_stride, n_blocks, a, n_tok, y + r, ldy);
    if (full < n_rows)
      imatmul<T>(w + full * row_stride, row_stride, n_rows - full, n_cols, a, n_tok, y + full, ldy,
                 reinterpret_cast<WChunk*>(lead));
  };
  switch (type) {
    case GgmlType::Q8_0:
      return rows.template operator()<GgmlType::Q8_0>(
          n_cols / 32, [](auto tb, auto... p) { q8x8_tile<decltype(tb)::value>(p...); });
    case GgmlType::Q4_0:
      return rows.template operator()<GgmlType::Q4_0>(
          n_cols / 32, [](auto tb, auto... p) { q4x8_tile<decltype(tb)::value>(p...); });
    case GgmlType::Q4_K:
      return rows.template operator()<GgmlType::Q4_K>(
          n_cols / kQK, [](auto tb, auto... p) { q4kx8_tile<decltype(tb)::value>(p...); });
    case GgmlType::Q6_K:
      return rows.template operator()<GgmlType::Q6_K>(
          n_cols / kQK, [](auto tb, auto... p) { q6kx8_tile<decltype(tb)::value>(p...); });
    default: break;
  }
  SHARDLM_CHECK(false, "no packed kernel for ", type_name(type));
}

}  // namespace shardlm::quant_detail
#pragma GCC pop_options

#else  // not x86-64: dispatch never selects this family (cpu_isa_supported is false)

namespace shardlm::quant_detail {
void matmul_avx2(GgmlType type, const uint8_t* w, size_t row_stride, int64_t n_rows, int64_t n_cols,
                 const float* x, int64_t ldx, int64_t n_tok, float* y, int64_t ldy) {
  matmul_scalar(type, w, row_stride, n_rows, n_cols, x, ldx, n_tok, y, ldy);
}
void convert_halves_avx2(GgmlType, const uint8_t*, float*, int64_t) {
  SHARDLM_CHECK(false, "the avx2 family exists only on x86-64");
}
void attend_chunk_avx2(float*, int64_t, const int32_t*, int64_t, const float*, int64_t, int64_t, float, float*, float*,
                       float*) {
  SHARDLM_CHECK(false, "the avx2 family exists only on x86-64");
}
void matmul_int8_avx2(GgmlType type, const uint8_t* w, size_t row_stride, int64_t n_rows, int64_t n_cols,
                      const float* x, int64_t ldx, int64_t n_tok, float* y, int64_t ldy) {
  matmul_scalar(type, w, row_stride, n_rows, n_cols, x, ldx, n_tok, y, ldy);
}
void matmul_packed_avx2(GgmlType, const uint8_t*, size_t, int64_t, int64_t, const float*, int64_t, int64_t, float*,
                        int64_t, PairTilesFn) {
  SHARDLM_CHECK(false, "packed rows exist only where the avx2 family runs");
}
}  // namespace shardlm::quant_detail
#endif
