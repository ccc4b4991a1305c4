// AVX-512 (F, BW, VL) kernels: same structure as the AVX2 family with 16-lane vectors, so a 32-element
// chunk is two vectors and the 32-register file allows a 4 rows x 4 tokens tile.
//
// Every decoded value is the reference dequantizer's (quant_ref.cpp, codec_*.cpp) bit for bit: in every
// format a value is an fp16 (or e8m0) scale times small integers (or IQ1's +-1/8-shifted ones), a product
// of at most 24 significant bits that fp32 holds exactly, so fused and separate multiply-adds round alike
// and the order of the multiplications does not matter.
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "core/error.h"
#include "quant/blocks.h"
#include "quant/blocks_iq.h"
#include "quant/kernels.h"

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")
// GCC 12's own avx512fintrin.h passes a deliberately undefined vector (_mm512_undefined_*) as the
// unused merge source of _mm512_cvtph_ps / _mm512_reduce_add_ps and then warns about it (GCC bug
// 105593); the value is never read, so silence exactly these two diagnostics for this file.
#pragma GCC diagnostic ignored "-Wuninitialized"
#ifndef __clang__  // GCC's name only: clang (the fuzzing build) warns about an unknown group
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include "quant/kernels_attend.h"
#include "quant/kernels_tile.h"

namespace shardlm::quant_detail {
namespace {

#define SHARDLM_IQ_TABLE(type, name, size) inline constexpr type name[size] =
#include "quant/iq_tables.h"

float half(const uint8_t* p) { return _cvtsh_ss(load_u16(p)); }

__m512 i8x16(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)); }
__m512 u8x16(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v)); }
__m128i ld128(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
__m256i ld256(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// 32 int8 / uint8 (element order) -> 2 x 16 floats.
void i8x32(__m256i q, __m512* f) {
  f[0] = i8x16(_mm256_castsi256_si128(q));
  f[1] = i8x16(_mm256_extracti128_si256(q, 1));
}
void u8x32(__m256i q, __m512* f) {
  f[0] = u8x16(_mm256_castsi256_si128(q));
  f[1] = u8x16(_mm256_extracti128_si256(q, 1));
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
  return _mm256_movm_epi8(bits);  // AVX512BW + VL: mask bit i -> byte i
}

// Negates byte i of v where bit i of `signs` is set (the IQ grids' sign bits, one per value).
__m256i apply_signs(__m256i v, uint32_t signs) { return _mm256_mask_sub_epi8(v, signs, _mm256_setzero_si256(), v); }

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

// A 16-entry int8 table in both lanes, for _mm256_shuffle_epi8 lookups of nibble indices.
__m256i table16(const int8_t* t) {
  return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t)));
}

struct Avx512 {
  using V = __m512;
  static constexpr int L = 16;
  static constexpr int kTokTile = 4;
  // Q4_K decodes a whole 64-element chunk (one 32-byte load, low and high nibbles) so its scale
  // unpacking and fp16 conversions are paid once per 64 weights; its 4 vectors per row then need a
  // 2-row tile to keep weights + 4x4 accumulators within 32 registers.
  template <GgmlType T>
  static constexpr int chunk() { return T == GgmlType::Q4_K ? 64 : 32; }
  template <GgmlType T>
  static constexpr int row_tile() { return T == GgmlType::Q4_K ? 2 : 4; }

  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V set1(float f) { return _mm512_set1_ps(f); }
  static float lane0(V v) { return _mm512_cvtss_f32(v); }
  static float hsum(V v) { return _mm512_reduce_add_ps(v); }
  static float hmax(V v) { return _mm512_reduce_max_ps(v); }
  // exp(x) for x <= 0: the avx2 family's method, 2^n applied by scalef.
  static V exp(V x) {
    const __mmask16 tiny = _mm512_cmp_ps_mask(x, set1(-87.0f), _CMP_LT_OQ);
    x = max(x, set1(-87.0f));
    const V n = _mm512_roundscale_ps(mul(x, set1(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const V r = _mm512_fnmadd_ps(n, set1(kLn2Lo), _mm512_fnmadd_ps(n, set1(kLn2Hi), x));
    const V p = exp_reduced<Avx512>(r);
    return _mm512_maskz_mov_ps(static_cast<__mmask16>(~tiny), _mm512_scalef_ps(p, n));
  }

  template <GgmlType T>
  static void decode(const uint8_t* row, int64_t c, V* out) {
    if constexpr (T == GgmlType::F32) {
      const float* p = reinterpret_cast<const float*>(row) + c * 32;
      out[0] = _mm512_loadu_ps(p);
      out[1] = _mm512_loadu_ps(p + 16);
    } else if constexpr (T == GgmlType::F16) {
      const uint8_t* p = row + c * 64;
      out[0] = _mm512_cvtph_ps(ld256(p));
      out[1] = _mm512_cvtph_ps(ld256(p + 32));
    } else if constexpr (T == GgmlType::BF16) {
      const uint8_t* p = row + c * 64;
      out[0] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(ld256(p)), 16));
      out[1] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(ld256(p + 32)), 16));
    } else if constexpr (T == GgmlType::Q8_0) {
      const uint8_t* b = row + c * kQ8_0Bytes;
      const V d = _mm512_set1_ps(half(b));
      out[0] = _mm512_mul_ps(d, i8x16(ld128(b + kQ8_0Qs)));
      out[1] = _mm512_mul_ps(d, i8x16(ld128(b + kQ8_0Qs + 16)));
    } else if constexpr (T == GgmlType::Q4_0) {
      const uint8_t* b = row + c * kQ4_0Bytes;
      const V d = _mm512_set1_ps(half(b));
      const __m128i q = ld128(b + kQ4_0Qs);
      const __m128i m4 = _mm_set1_epi8(0x0F), eight = _mm_set1_epi8(8);
      out[0] = _mm512_mul_ps(d, i8x16(_mm_sub_epi8(_mm_and_si128(q, m4), eight)));
      out[1] = _mm512_mul_ps(d, i8x16(_mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(q, 4), m4), eight)));
    } else if constexpr (T == GgmlType::Q4_K) {
      // Chunk c = 64 elements = sub-blocks 2p and 2p+1 of super-block c/4: the low and high nibbles
      // of the same 32 bytes.
      const uint8_t* b = row + (c >> 2) * kQ4_KBytes;
      const int p = static_cast<int>(c & 3);
      int sc0, m0, sc1, m1;
      q4k_scale_min(2 * p, b + kQ4_KScales, sc0, m0);
      q4k_scale_min(2 * p + 1, b + kQ4_KScales, sc1, m1);
      const float d = half(b), dmin = half(b + kQ4_KDmin);
      const __m256i raw = ld256(b + kQ4_KQs + p * 32);
      const __m256i m4 = _mm256_set1_epi8(0x0F);
      const __m256i lo = _mm256_and_si256(raw, m4), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
      const V d0 = _mm512_set1_ps(d * static_cast<float>(sc0)), n0 = _mm512_set1_ps(-(dmin * static_cast<float>(m0)));
      const V d1 = _mm512_set1_ps(d * static_cast<float>(sc1)), n1 = _mm512_set1_ps(-(dmin * static_cast<float>(m1)));
      out[0] = _mm512_fmadd_ps(d0, u8x16(_mm256_castsi256_si128(lo)), n0);
      out[1] = _mm512_fmadd_ps(d0, u8x16(_mm256_extracti128_si256(lo, 1)), n0);
      out[2] = _mm512_fmadd_ps(d1, u8x16(_mm256_castsi256_si128(hi)), n1);
      out[3] = _mm512_fmadd_ps(d1, u8x16(_mm256_extracti128_si256(hi, 1)), n1);
    } else if constexpr (T == GgmlType::Q6_K) {
      const uint8_t* b = row + (c >> 3) * kQ6_KBytes;
      const int q8 = static_cast<int>(c & 7), g = q8 >> 2, s = q8 & 3;
      const auto* scales = reinterpret_cast<const int8_t*>(b + kQ6_KScales) + g * 8 + 2 * s;
      const float d = half(b + kQ6_KD);
      __m256i ql = ld256(b + g * 64 + (s & 1) * 32);
      __m256i qh = ld256(b + kQ6_KQh + g * 32);
      ql = _mm256_and_si256(_mm256_srl_epi16(ql, _mm_cvtsi32_si128((s >> 1) * 4)), _mm256_set1_epi8(0x0F));
      qh = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * s)), _mm256_set1_epi8(3));
      const __m256i q = _mm256_sub_epi8(_mm256_or_si256(ql, _mm256_slli_epi16(qh, 4)), _mm256_set1_epi8(32));
      out[0] = _mm512_mul_ps(_mm512_set1_ps(d * scales[0]), i8x16(_mm256_castsi256_si128(q)));
      out[1] = _mm512_mul_ps(_mm512_set1_ps(d * scales[1]), i8x16(_mm256_extracti128_si256(q, 1)));
    } else if constexpr (T == GgmlType::Q4_1) {
      const uint8_t* b = row + c * kQ4_1Bytes;
      const V d = _mm512_set1_ps(half(b)), m = _mm512_set1_ps(half(b + kQ4_1M));
      V f[2];
      u8x32(nibbles32(b + kQ4_1Qs), f);
      out[0] = _mm512_fmadd_ps(f[0], d, m);
      out[1] = _mm512_fmadd_ps(f[1], d, m);
    } else if constexpr (T == GgmlType::Q5_0) {
      // q - 16 = nibble - (5th bit clear ? 16 : 0), in [-16, 15].
      const uint8_t* b = row + c * kQ5_0Bytes;
      const V d = _mm512_set1_ps(half(b));
      const __m256i hi = bit_bytes(load_u32(b + kQ5_0Qh));
      V f[2];
      i8x32(_mm256_sub_epi8(nibbles32(b + kQ5_0Qs), _mm256_andnot_si256(hi, _mm256_set1_epi8(16))), f);
      out[0] = _mm512_mul_ps(f[0], d);
      out[1] = _mm512_mul_ps(f[1], d);
    } else if constexpr (T == GgmlType::Q5_1) {
      const uint8_t* b = row + c * kQ5_1Bytes;
      const V d = _mm512_set1_ps(half(b)), m = _mm512_set1_ps(half(b + kQ5_1M));
      const __m256i hi = bit_bytes(load_u32(b + kQ5_1Qh));
      V f[2];
      u8x32(_mm256_or_si256(nibbles32(b + kQ5_1Qs), _mm256_and_si256(hi, _mm256_set1_epi8(16))), f);
      out[0] = _mm512_fmadd_ps(f[0], d, m);
      out[1] = _mm512_fmadd_ps(f[1], d, m);
    } else if constexpr (T == GgmlType::Q2_K) {
      // Chunk j (0..7) of a super-block: 2-bit fields at shift 2 * (j % 4) of qs[(j / 4) * 32 + l];
      // scale bytes 2j and 2j + 1 serve its two 16-element halves.
      const uint8_t* b = row + (c >> 3) * kQ2_KBytes;
      const int j = static_cast<int>(c & 7);
      const float d = half(b + kQ2_KD), dmin = half(b + kQ2_KDmin);
      const __m256i q = _mm256_and_si256(
          _mm256_srl_epi16(ld256(b + kQ2_KQs + (j >> 2) * 32), _mm_cvtsi32_si128(2 * (j & 3))),
          _mm256_set1_epi8(3));
      V f[2];
      u8x32(q, f);
      for (int h = 0; h < 2; ++h) {
        const uint8_t sc = b[2 * j + h];
        const V dl = _mm512_set1_ps(d * static_cast<float>(sc & 0xF));
        const V neg_ml = _mm512_set1_ps(-(dmin * static_cast<float>(sc >> 4)));
        out[h] = _mm512_fmadd_ps(dl, f[h], neg_ml);
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
      V f[2];
      i8x32(q, f);
      out[0] = _mm512_mul_ps(_mm512_set1_ps(d * static_cast<float>(q3k_scale(2 * j, b + kQ3_KScales))), f[0]);
      out[1] = _mm512_mul_ps(_mm512_set1_ps(d * static_cast<float>(q3k_scale(2 * j + 1, b + kQ3_KScales))), f[1]);
    } else if constexpr (T == GgmlType::Q5_K) {
      // Sub-block j: nibbles as Q4_K, 5th bit is bit j of qh[l].
      const uint8_t* b = row + (c >> 3) * kQ5_KBytes;
      const int j = static_cast<int>(c & 7);
      int sc, m;
      q4k_scale_min(j, b + kQ5_KScales, sc, m);
      const V d = _mm512_set1_ps(half(b) * static_cast<float>(sc));
      const V neg_min = _mm512_set1_ps(-(half(b + kQ5_KDmin) * static_cast<float>(m)));
      const __m256i raw = ld256(b + kQ5_KQs + (j >> 1) * 32);
      const __m256i lo =
          _mm256_and_si256(_mm256_srl_epi16(raw, _mm_cvtsi32_si128(4 * (j & 1))), _mm256_set1_epi8(0x0F));
      const __m256i hbit = _mm256_and_si256(_mm256_srl_epi16(ld256(b + kQ5_KQh), _mm_cvtsi32_si128(j)),
                                            _mm256_set1_epi8(1));
      V f[2];
      u8x32(_mm256_or_si256(lo, _mm256_slli_epi16(hbit, 4)), f);
      out[0] = _mm512_fmadd_ps(d, f[0], neg_min);
      out[1] = _mm512_fmadd_ps(d, f[1], neg_min);
    } else if constexpr (T == GgmlType::IQ4_NL) {
      const uint8_t* b = row + c * kIQ4_NLBytes;
      const V d = _mm512_set1_ps(half(b));
      V f[2];
      i8x32(_mm256_shuffle_epi8(table16(kValuesIq4nl), nibbles32(b + kIQ4_NLQs)), f);
      out[0] = _mm512_mul_ps(d, f[0]);
      out[1] = _mm512_mul_ps(d, f[1]);
    } else if constexpr (T == GgmlType::IQ4_XS) {
      const uint8_t* b = row + (c >> 3) * kIQ4_XSBytes;
      const int ib = static_cast<int>(c & 7);
      const V d = _mm512_set1_ps(half(b) * static_cast<float>(iq4xs_scale(ib, b) - 32));
      V f[2];
      i8x32(_mm256_shuffle_epi8(table16(kValuesIq4nl), nibbles32(b + kIQ4_XSQs + 16 * ib)), f);
      out[0] = _mm512_mul_ps(d, f[0]);
      out[1] = _mm512_mul_ps(d, f[1]);
    } else if constexpr (T == GgmlType::MXFP4) {
      const uint8_t* b = row + c * kMXFP4Bytes;
      const V d = _mm512_set1_ps(e8m0_to_fp32_half(b[0]));
      V f[2];
      i8x32(_mm256_shuffle_epi8(table16(kValuesFp4), nibbles32(b + kMXFP4Qs)), f);
      out[0] = _mm512_mul_ps(f[0], d);
      out[1] = _mm512_mul_ps(f[1], d);
    } else if constexpr (T == GgmlType::IQ2_XXS) {
      // Sub-block ib: 4 grid indices (one per 8 values), then a u32 of four 7-bit sign indices and a
      // 4-bit scale. Grid bytes are small positive integers, so the signed values fit int8.
      const uint8_t* b = row + (c >> 3) * kIQ2_XXSBytes;
      const uint8_t* g = b + kIQ2_XXSQs + 8 * (c & 7);
      const uint32_t aux = load_u32(g + 4);
      const V db = _mm512_set1_ps(half(b) * (0.5f + static_cast<float>(aux >> 28)) * 0.25f);
      V f[2];
      i8x32(apply_signs(grid4(kIq2xxsGrid, g[0], g[1], g[2], g[3]), ksigns4(aux)), f);
      out[0] = _mm512_mul_ps(db, f[0]);
      out[1] = _mm512_mul_ps(db, f[1]);
    } else if constexpr (T == GgmlType::IQ2_XS) {
      const uint8_t* b = row + (c >> 3) * kIQ2_XSBytes;
      const int ib = static_cast<int>(c & 7);
      const uint8_t* q = b + kIQ2_XSQs + 8 * ib;  // 4 u16: 9-bit grid index | 7-bit sign index << 9
      const uint16_t q0 = load_u16(q), q1 = load_u16(q + 2), q2 = load_u16(q + 4), q3 = load_u16(q + 6);
      const uint32_t signs = kKsignsIq2xs[q0 >> 9] | (kKsignsIq2xs[q1 >> 9] << 8) | (kKsignsIq2xs[q2 >> 9] << 16) |
                             (static_cast<uint32_t>(kKsignsIq2xs[q3 >> 9]) << 24);
      const float d = half(b);
      const uint8_t sc = b[kIQ2_XSScales + ib];
      V f[2];
      i8x32(apply_signs(grid4(kIq2xsGrid, q0 & 511, q1 & 511, q2 & 511, q3 & 511), signs), f);
      out[0] = _mm512_mul_ps(_mm512_set1_ps(d * (0.5f + static_cast<float>(sc & 0xf)) * 0.25f), f[0]);
      out[1] = _mm512_mul_ps(_mm512_set1_ps(d * (0.5f + static_cast<float>(sc >> 4)) * 0.25f), f[1]);
    } else if constexpr (T == GgmlType::IQ2_S) {
      const uint8_t* b = row + (c >> 3) * kIQ2_SBytes;
      const int ib = static_cast<int>(c & 7);
      const uint8_t* qs = b + kIQ2_SQs + 4 * ib;
      const int qh = b[kIQ2_SQh + ib];
      const float d = half(b);
      const uint8_t sc = b[kIQ2_SScales + ib];
      const __m256i g = grid4(kIq2sGrid, qs[0] | ((qh << 8) & 0x300), qs[1] | ((qh << 6) & 0x300),
                              qs[2] | ((qh << 4) & 0x300), qs[3] | ((qh << 2) & 0x300));
      V f[2];
      i8x32(apply_signs(g, load_u32(b + kIQ2_SSigns + 4 * ib)), f);
      out[0] = _mm512_mul_ps(_mm512_set1_ps(d * (0.5f + static_cast<float>(sc & 0xf)) * 0.25f), f[0]);
      out[1] = _mm512_mul_ps(_mm512_set1_ps(d * (0.5f + static_cast<float>(sc >> 4)) * 0.25f), f[1]);
    } else if constexpr (T == GgmlType::IQ3_XXS) {
      const uint8_t* b = row + (c >> 3) * kIQ3_XXSBytes;
      const int ib = static_cast<int>(c & 7);
      const uint32_t aux = load_u32(b + kIQ3_XXSSigns + 4 * ib);
      const V db = _mm512_set1_ps(half(b) * (0.5f + static_cast<float>(aux >> 28)) * 0.5f);
      const __m256i idx = u8x8_epi32(b + kIQ3_XXSQs + 8 * ib);
      V f[2];
      i8x32(apply_signs(grid8(kIq3xxsGrid, idx), ksigns4(aux)), f);
      out[0] = _mm512_mul_ps(db, f[0]);
      out[1] = _mm512_mul_ps(db, f[1]);
    } else if constexpr (T == GgmlType::IQ3_S) {
      // Index k (0..7) of sub-block ib: qs[k] | bit k of qh << 8.
      const uint8_t* b = row + (c >> 3) * kIQ3_SBytes;
      const int ib = static_cast<int>(c & 7);
      const uint8_t sc = b[kIQ3_SScales + ib / 2];
      const V db = _mm512_set1_ps(half(b) * static_cast<float>(1 + 2 * ((sc >> (4 * (ib & 1))) & 0xf)));
      const __m256i lo = u8x8_epi32(b + kIQ3_SQs + 8 * ib);
      const __m256i hi = _mm256_and_si256(_mm256_sllv_epi32(_mm256_set1_epi32(b[kIQ3_SQh + ib]),
                                                            _mm256_setr_epi32(8, 7, 6, 5, 4, 3, 2, 1)),
                                          _mm256_set1_epi32(0x100));
      V f[2];
      i8x32(apply_signs(grid8(kIq3sGrid, _mm256_or_si256(lo, hi)), load_u32(b + kIQ3_SSigns + 4 * ib)), f);
      out[0] = _mm512_mul_ps(db, f[0]);
      out[1] = _mm512_mul_ps(db, f[1]);
    } else if constexpr (T == GgmlType::IQ1_S) {
      // Grid values are -1, 0, 1; value = dl * (grid + delta), delta = +-1/8 per sub-block.
      const uint8_t* b = row + (c >> 3) * kIQ1_SBytes;
      const int ib = static_cast<int>(c & 7);
      const uint8_t* qs = b + kIQ1_SQs + 4 * ib;
      const int qh = load_u16(b + kIQ1_SQh + 2 * ib);
      const V dl = _mm512_set1_ps(half(b) * static_cast<float>(2 * ((qh >> 12) & 7) + 1));
      const V delta = _mm512_set1_ps(iq1_delta(static_cast<uint32_t>(qh & 0x8000) << 16));
      V f[2];
      i8x32(grid4(kIq1sGrid, qs[0] | ((qh << 8) & 0x700), qs[1] | ((qh << 5) & 0x700), qs[2] | ((qh << 2) & 0x700),
                  qs[3] | ((qh >> 1) & 0x700)),
            f);
      out[0] = _mm512_mul_ps(dl, _mm512_add_ps(f[0], delta));
      out[1] = _mm512_mul_ps(dl, _mm512_add_ps(f[1], delta));
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
      V f[2];
      i8x32(grid4(kIq1sGrid, qs[0] | ((nib[0] & 7) << 8), qs[1] | ((nib[1] & 7) << 8), qs[2] | ((nib[2] & 7) << 8),
                  qs[3] | ((nib[3] & 7) << 8)),
            f);
      for (int h = 0; h < 2; ++h) {
        const V dl = _mm512_set1_ps(d * static_cast<float>(2 * ((s >> (3 * h)) & 7) + 1));
        const V delta = _mm512_mask_blend_ps(  // lanes 0..7: group 2h, lanes 8..15: group 2h + 1
            0xFF00, _mm512_set1_ps(iq1_delta(static_cast<uint32_t>(nib[2 * h] & 8) << 28)),
            _mm512_set1_ps(iq1_delta(static_cast<uint32_t>(nib[2 * h + 1] & 8) << 28)));
        out[h] = _mm512_mul_ps(dl, _mm512_add_ps(f[h], delta));
      }
    } else {
      static_assert(T == GgmlType::F32 && T != GgmlType::F32, "no AVX-512 decoder for this type");
    }
  }
};

// F16 / BF16 packed rows (blocks.h's kFx8 layouts) in 16 lanes: one vector holds a column of two groups (lanes
// 0-7 the first group's rows, 8-15 the second's), so every row runs the same FMA chain over the same slabs as in
// the avx2 family's fx8_rows (kernels_avx2.cpp says why that order), and gives the same bits.

// Column k of the groups at a and b as 16 floats in c0, and column k + 1 in c1 where c1 is given (k even).
template <GgmlType T>
void fx16_columns(const uint8_t* a, const uint8_t* b, int64_t k, int64_t n_cols, __m512* c0, __m512* c1) {
  if constexpr (T == GgmlType::F16) {
    *c0 = _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(ld128(a + kFx8ColBytes * k)),
                                                  ld128(b + kFx8ColBytes * k), 1));
    if (c1)
      *c1 = _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(ld128(a + kFx8ColBytes * (k + 1))),
                                                    ld128(b + kFx8ColBytes * (k + 1)), 1));
  } else if (k == n_cols / 2 * 2) {  // an unpaired last column
    const __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(ld128(a + 32 * (k / 2))), ld128(b + 32 * (k / 2)), 1);
    *c0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
  } else {  // k even: the pair's 32 bytes of each group
    const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(ld256(a + 32 * (k / 2))), ld256(b + 32 * (k / 2)), 1);
    *c0 = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    if (c1) *c1 = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
}

// P pairs of groups (group j at g + j * gb; with `lone`, P is 1 and the one group fills both halves, of which
// only the first is stored) x TB tokens over the slab [k0, k1): y = the slab's chain, or y + it after the first.
template <GgmlType T, int P, int TB>
void fx16_tile(const uint8_t* g, size_t gb, bool lone, int64_t k0, int64_t k1, int64_t n_cols,
               const float* x /* (TB, ldx) */, int64_t ldx, float* y /* (TB, ldy) */, int64_t ldy) {
  __m512 acc[P][TB];
  for (int i = 0; i < P; ++i)
    for (int t = 0; t < TB; ++t) acc[i][t] = _mm512_setzero_ps();
  const auto step = [&](const __m512* w, int64_t k) {
    for (int t = 0; t < TB; ++t) {
      const __m512 xb = _mm512_set1_ps(x[t * ldx + k]);
      for (int i = 0; i < P; ++i) acc[i][t] = _mm512_fmadd_ps(w[i], xb, acc[i][t]);
    }
  };
  int64_t k = k0;
  const int64_t pairs_end = k0 + (k1 - k0) / 2 * 2;  // k0 is even (slabs are)
  for (; k < pairs_end; k += 2) {
    __m512 w0[P], w1[P];
    for (int i = 0; i < P; ++i) {
      const uint8_t* a = g + 2 * i * gb;
      fx16_columns<T>(a, lone ? a : a + gb, k, n_cols, &w0[i], &w1[i]);
    }
    step(w0, k);
    step(w1, k + 1);
  }
  if (k < k1) {
    __m512 w0[P];
    for (int i = 0; i < P; ++i) {
      const uint8_t* a = g + 2 * i * gb;
      fx16_columns<T>(a, lone ? a : a + gb, k, n_cols, &w0[i], nullptr);
    }
    step(w0, k);
  }
  const __mmask16 m = lone ? 0x00FF : 0xFFFF;
  for (int t = 0; t < TB; ++t)
    for (int i = 0; i < P; ++i) {
      float* out = y + t * ldy + 16 * i;
      const __m512 v = k0 == 0 ? acc[i][t] : _mm512_add_ps(_mm512_maskz_loadu_ps(m, out), acc[i][t]);
      _mm512_mask_storeu_ps(out, m, v);
    }
}

// n_groups packed groups (gb bytes each) times n_tok > 1 tokens (decode takes the avx2 tiles: dispatch.cpp): tiles
// of 2 pairs x 8 tokens (16 chains, each converted column used 8 times), a slab of them in L1 while the tokens pass.
template <GgmlType T>
void fx16_rows(const uint8_t* w, size_t gb, int64_t n_groups, int64_t n_cols, const float* x, int64_t ldx,
               int64_t n_tok, float* y, int64_t ldy) {
  constexpr int kTb = 8;
  const auto run = [&]<int P>(const uint8_t* g, bool lone, float* yg) {
    for (int64_t k0 = 0; k0 < n_cols; k0 += kFx8Slab) {
      const int64_t k1 = k0 + kFx8Slab < n_cols ? k0 + kFx8Slab : n_cols;
      int64_t t = 0;
      for (; t + kTb <= n_tok; t += kTb) fx16_tile<T, P, kTb>(g, gb, lone, k0, k1, n_cols, x + t * ldx, ldx, yg + t * ldy, ldy);
      const float* xt = x + t * ldx;
      float* yt = yg + t * ldy;
      switch (n_tok - t) {
        case 7: fx16_tile<T, P, 7>(g, gb, lone, k0, k1, n_cols, xt, ldx, yt, ldy); break;
        case 6: fx16_tile<T, P, 6>(g, gb, lone, k0, k1, n_cols, xt, ldx, yt, ldy); break;
        case 5: fx16_tile<T, P, 5>(g, gb, lone, k0, k1, n_cols, xt, ldx, yt, ldy); break;
        case 4: fx16_tile<T, P, 4>(g, gb, lone, k0, k1, n_cols, xt, ldx, yt, ldy); break;
        case 3: fx16_tile<T, P, 3>(g, gb, lone, k0, k1, n_cols, xt, ldx, yt, ldy); break;
        case 2: fx16_tile<T, P, 2>(g, gb, lone, k0, k1, n_cols, xt, ldx, yt, ldy); break;
        case 1: fx16_tile<T, P, 1>(g, gb, lone, k0, k1, n_cols, xt, ldx, yt, ldy); break;
        default: break;
      }
    }
  };
  int64_t i = 0;
  for (; i + 4 <= n_groups; i += 4) run.template operator()<2>(w + i * gb, false, y + 8 * i);
  for (; i + 2 <= n_groups; i += 2) run.template operator()<1>(w + i * gb, false, y + 8 * i);
  if (i < n_groups) run.template operator()<1>(w + i * gb, true, y + 8 * i);
}

}  // namespace

void matmul_avx512(GgmlType type, const uint8_t* w, size_t row_stride, int64_t n_rows, int64_t n_cols,
                   const float* x, int64_t ldx, int64_t n_tok, float* y, int64_t ldy) {
  matmul_dispatch<Avx512>(type, w, row_stride, n_rows, n_cols, x, ldx, n_tok, y, ldy);
}

void attend_chunk_avx512(float* s, int64_t lds, const int32_t* n_valid, int64_t n_q, const float* v, int64_t ldv,
                         int64_t hd, float scale, float* m, float* l, float* acc) {
  attend_chunk_rows<Avx512>(s, lds, n_valid, n_q, v, ldv, hd, scale, m, l, acc);
}

void matmul_packed_avx512(GgmlType type, const uint8_t* w, size_t row_stride, int64_t n_rows, int64_t n_cols,
                          const float* x, int64_t ldx, int64_t n_tok, float* y, int64_t ldy) {
  SHARDLM_CHECK(type == GgmlType::F16 || type == GgmlType::BF16, "no avx512 packed kernel for ", type_name(type));
  SHARDLM_CHECK(n_rows % kQ4x8Rows == 0 && n_tok > 1, "avx512 packed ", type_name(type), ": ", n_rows, " rows, ",
                n_tok, " tokens (whole groups, prefill)");
  const size_t gb = row_stride * kQ4x8Rows;
  if (type == GgmlType::F16) fx16_rows<GgmlType::F16>(w, gb, n_rows / kQ4x8Rows, n_cols, x, ldx, n_tok, y, ldy);
  else fx16_rows<GgmlType::BF16>(w, gb, n_rows / kQ4x8Rows, n_cols, x, ldx, n_tok, y, ldy);
}

}  // namespace shardlm::quant_detail
#pragma GCC pop_options

#else  // not x86-64: dispatch never selects this family (cpu_isa_supported is false)

namespace shardlm::quant_detail {
void matmul_avx512(GgmlType type, const uint8_t* w, size_t row_stride, int64_t n_rows, int64_t n_cols,
                   const float* x, int64_t ldx, int64_t n_tok, float* y, int64_t ldy) {
  matmul_scalar(type, w, row_stride, n_rows, n_cols, x, ldx, n_tok, y, ldy);
}
void matmul_packed_avx512(GgmlType, const uint8_t*, size_t, int64_t, int64_t, const float*, int64_t, int64_t, float*,
                          int64_t) {
  SHARDLM_CHECK(false, "packed rows exist only where the avx512 family runs");
}
void attend_chunk_avx512(float*, int64_t, const int32_t*, int64_t, const float*, int64_t, int64_t, float, float*,
                         float*, float*) {
  SHARDLM_CHECK(false, "the avx512 family exists only on x86-64");
}
}  // namespace shardlm::quant_detail
#endif
