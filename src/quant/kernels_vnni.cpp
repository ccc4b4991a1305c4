// AVX-512 VNNI kernels for packed integer groups (pack_rows; blocks.h's kQ8x8, kQ4x8, kQ4Kx8 and kQ6Kx8 layouts):
// the avx2 group tiles (kernels_avx2.cpp) on 16 lanes, two groups a vector (lanes 0-7 the first group's rows,
// 8-15 the second's), and each 4-byte dot product one vpdpbusd instead of maddubs + add + madd. Every integer sum
// is exact in both, and the float operations after it are the avx2 tiles' in the same order, so each row gets
// the same bits as there (test_quant_kernels compares them).
//
// vpdpbusd multiplies unsigned weight bytes with signed activation bytes. Q4_0, Q4_K and Q6_K quants are unsigned
// already (their offsets come off through the activations' block sums, as in avx2); Q8_0's signed quants are
// biased by 128 (an xor of the sign bit) and 128 * sum(x) comes off the same way.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "core/error.h"
#include "quant/blocks.h"
#include "quant/kernels.h"

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")
#pragma GCC diagnostic ignored "-Wuninitialized"  // GCC bug 105593, as in kernels_avx512.cpp
#ifndef __clang__
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

namespace shardlm::quant_detail {
namespace {

uint32_t load_u32(const void* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
__m128i ld128(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
__m256i ld256(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
// The 32 bytes at offset `off` of group A and of group B (gb bytes later) as one vector.
__m512i ld2(const uint8_t* a, size_t gb, size_t off) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(ld256(a + off)), ld256(a + gb + off), 1);
}
// The 8 fp16 values at `off` of both groups as 16 floats.
__m512 half2(const uint8_t* a, size_t gb, size_t off) {
  return _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(ld128(a + off)), ld128(a + gb + off), 1));
}
// 4 activation bytes in every 32-bit lane.
__m512i bcast4(const int8_t* x) { return _mm512_set1_epi32(static_cast<int>(load_u32(x))); }
__m512i srl32(__m512i v, int bits) { return _mm512_srl_epi32(v, _mm_cvtsi32_si128(bits)); }

// A kQ4x8-ordered 128-byte block of both groups as 4 + 4 vectors of unsigned nibbles: lo[k] holds elements
// 4k..4k+3 of each row, hi[k] elements 16+4k..16+4k+3.
struct Q4x16 {
  __m512i lo[4], hi[4];
};
[[gnu::always_inline]] inline Q4x16 nibbles(const uint8_t* a, size_t gb, size_t off) {
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  Q4x16 n;
  for (int k = 0; k < 4; ++k) {
    const __m512i raw = ld2(a, gb, off + 32 * k);
    n.lo[k] = _mm512_and_si512(raw, m4);
    n.hi[k] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4);
  }
  return n;
}
// Each lane's sum over the nibbles v[0..3] times the activations xq[4k..4k+3]: two chains of two (integer sums
// are exact in any order; one chain of four made decode latency-bound).
[[gnu::always_inline]] inline __m512i dot4(const __m512i* v, const int8_t* xq) {
  const __m512i s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v[0], bcast4(xq));
  const __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v[1], bcast4(xq + 4));
  return _mm512_add_epi32(_mm512_dpbusd_epi32(s0, v[2], bcast4(xq + 8)), _mm512_dpbusd_epi32(s1, v[3], bcast4(xq + 12)));
}

// Q4_0: isum = sum(nibble * x) - 8 * sum(x); acc += float(isum) * (d_w * d_x), as q4x8_tile.
template <int TB>
void q4_pair(const uint8_t* g, size_t gb, int64_t n_blocks, const ActRow* a, float* y, int64_t ldy) {
  __m512 acc[TB];
  for (int t = 0; t < TB; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < n_blocks; ++b) {
    const uint8_t* blk = g + b * kQ4x8Block;
    const __m512 dw = half2(blk, gb, 0);
    const Q4x16 n = nibbles(blk, gb, kQ4x8Qs);
    for (int t = 0; t < TB; ++t) {
      const int8_t* xq = a[t].q + 32 * b;
      const __m512i isum = _mm512_sub_epi32(_mm512_add_epi32(dot4(n.lo, xq), dot4(n.hi, xq + 16)),
                                            _mm512_set1_epi32(8 * a[t].sum[b]));
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(dw, _mm512_set1_ps(a[t].d[b])), acc[t]);
    }
  }
  for (int t = 0; t < TB; ++t) _mm512_storeu_ps(y + t * ldy, acc[t]);
}

// Q8_0: quants biased to w + 128 (unsigned), isum = sum((w + 128) * x) - 128 * sum(x), as q8x8_tile's exact sum.
template <int TB>
void q8_pair(const uint8_t* g, size_t gb, int64_t n_blocks, const ActRow* a, float* y, int64_t ldy) {
  const __m512i bias = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[TB];
  for (int t = 0; t < TB; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < n_blocks; ++b) {
    const uint8_t* blk = g + b * kQ8x8Block;
    const __m512 dw = half2(blk, gb, 0);
    __m512i u[8];
    for (int k = 0; k < 8; ++k) u[k] = _mm512_xor_si512(ld2(blk, gb, kQ8x8Qs + 32 * k), bias);
    for (int t = 0; t < TB; ++t) {
      const int8_t* xq = a[t].q + 32 * b;
      const __m512i s = _mm512_add_epi32(dot4(u, xq), dot4(u + 4, xq + 16));
      const __m512i isum = _mm512_sub_epi32(s, _mm512_set1_epi32(128 * a[t].sum[b]));
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(dw, _mm512_set1_ps(a[t].d[b])), acc[t]);
    }
  }
  for (int t = 0; t < TB; ++t) _mm512_storeu_ps(y + t * ldy, acc[t]);
}

// Q4_K: sub-block j's exact dot times its 6-bit scale (the product q4kx8_tile's madd with (sc, sc) gives), the
// minimum's term apart; per super-block acc = acc + sd * d - sm * dmin, as q4kx8_tile.
template <int TB>
void q4k_pair(const uint8_t* g, size_t gb, int64_t n_super, const ActRow* a, float* y, int64_t ldy) {
  const __m512i m6 = _mm512_set1_epi32(63), m4 = _mm512_set1_epi32(0x0F), m2 = _mm512_set1_epi32(3);
  __m512 acc[TB];
  for (int t = 0; t < TB; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t sb = 0; sb < n_super; ++sb) {
    const uint8_t* blk = g + sb * kQ4Kx8Block;
    const __m512 d = half2(blk, gb, 0), dmin = half2(blk, gb, kQ4Kx8Dmin);
    const __m512i w0 = ld2(blk, gb, kQ4Kx8Scales), w1 = ld2(blk, gb, kQ4Kx8Scales + 32),
                  w2 = ld2(blk, gb, kQ4Kx8Scales + 64);
    __m512 sd[TB], sm[TB];
    for (int t = 0; t < TB; ++t) sd[t] = sm[t] = _mm512_setzero_ps();
    for (int j = 0; j < 8; ++j) {
      __m512i sc, mn;
      if (j < 4) {
        sc = _mm512_and_si512(srl32(w0, 8 * j), m6);
        mn = _mm512_and_si512(srl32(w1, 8 * j), m6);
      } else {
        const int b = 8 * (j - 4);
        sc = _mm512_or_si512(_mm512_and_si512(srl32(w2, b), m4),
                             _mm512_slli_epi32(_mm512_and_si512(srl32(w0, b + 6), m2), 4));
        mn = _mm512_or_si512(_mm512_and_si512(srl32(w2, b + 4), m4),
                             _mm512_slli_epi32(_mm512_and_si512(srl32(w1, b + 6), m2), 4));
      }
      const __m512 mf = _mm512_cvtepi32_ps(mn);
      const Q4x16 n = nibbles(blk, gb, kQ4Kx8Qs + 128 * j);
      const int64_t c = 8 * sb + j;  // the activation block
      for (int t = 0; t < TB; ++t) {
        const int8_t* xq = a[t].q + 32 * c;
        const __m512i isum = _mm512_mullo_epi32(_mm512_add_epi32(dot4(n.lo, xq), dot4(n.hi, xq + 16)), sc);
        sd[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(a[t].d[c]), sd[t]);
        sm[t] = _mm512_fmadd_ps(mf, _mm512_set1_ps(a[t].s[c]), sm[t]);
      }
    }
    for (int t = 0; t < TB; ++t) acc[t] = _mm512_fnmadd_ps(sm[t], dmin, _mm512_fmadd_ps(sd[t], d, acc[t]));
  }
  for (int t = 0; t < TB; ++t) _mm512_storeu_ps(y + t * ldy, acc[t]);
}

// Q6_K: the 6-bit quants rebuilt as in q6kx8_tile; elements 0..15 and 16..31 take their scales sc_a and sc_b
// (int32 lanes, sign-extended from the int16 pair), the offset 32 comes off as 32 * madd((sc_a, sc_b), half sums).
template <int TB>
void q6k_pair(const uint8_t* g, size_t gb, int64_t n_super, const ActRow* a, float* y, int64_t ldy) {
  const __m512i m30 = _mm512_set1_epi8(0x30);
  __m512 acc[TB];
  for (int t = 0; t < TB; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t sb = 0; sb < n_super; ++sb) {
    const uint8_t* blk = g + sb * kQ6Kx8Block;
    const __m512 d = half2(blk, gb, 0);
    __m512 sd[TB];
    for (int t = 0; t < TB; ++t) sd[t] = _mm512_setzero_ps();
    for (int j = 0; j < 8; ++j) {
      const size_t so = kQ6Kx8Scales + 16 * static_cast<size_t>(j);
      const __m512i sc = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_cvtepi8_epi16(ld128(blk + so))),
                                            _mm256_cvtepi8_epi16(ld128(blk + gb + so)), 1);  // (sc_a, sc_b) a lane
      const __m512i sa = _mm512_srai_epi32(_mm512_slli_epi32(sc, 16), 16), sbv = _mm512_srai_epi32(sc, 16);
      const size_t co = kQ6Kx8Qs + static_cast<size_t>(j) * kQ6Kx8Chunk;
      Q4x16 n = nibbles(blk, gb, co);
      const __m512i h_lo = ld2(blk, gb, co + 128), h_hi = ld2(blk, gb, co + 160);
      n.lo[0] = _mm512_or_si512(n.lo[0], _mm512_and_si512(_mm512_slli_epi16(h_lo, 4), m30));
      n.hi[0] = _mm512_or_si512(n.hi[0], _mm512_and_si512(_mm512_slli_epi16(h_hi, 4), m30));
      n.lo[1] = _mm512_or_si512(n.lo[1], _mm512_and_si512(_mm512_slli_epi16(h_lo, 2), m30));
      n.hi[1] = _mm512_or_si512(n.hi[1], _mm512_and_si512(_mm512_slli_epi16(h_hi, 2), m30));
      n.lo[2] = _mm512_or_si512(n.lo[2], _mm512_and_si512(h_lo, m30));
      n.hi[2] = _mm512_or_si512(n.hi[2], _mm512_and_si512(h_hi, m30));
      n.lo[3] = _mm512_or_si512(n.lo[3], _mm512_and_si512(_mm512_srli_epi16(h_lo, 2), m30));
      n.hi[3] = _mm512_or_si512(n.hi[3], _mm512_and_si512(_mm512_srli_epi16(h_hi, 2), m30));
      const int64_t c = 8 * sb + j;  // the activation block
      for (int t = 0; t < TB; ++t) {
        const int8_t* xq = a[t].q + 32 * c;
        const __m512i dot = _mm512_add_epi32(_mm512_mullo_epi32(dot4(n.lo, xq), sa),
                                             _mm512_mullo_epi32(dot4(n.hi, xq + 16), sbv));
        const __m512i off = _mm512_slli_epi32(_mm512_madd_epi16(sc, _mm512_set1_epi32(a[t].sums[c])), 5);
        sd[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(dot, off)), _mm512_set1_ps(a[t].d[c]), sd[t]);
      }
    }
    for (int t = 0; t < TB; ++t) acc[t] = _mm512_fmadd_ps(sd[t], d, acc[t]);
  }
  for (int t = 0; t < TB; ++t) _mm512_storeu_ps(y + t * ldy, acc[t]);
}

// Every token tile of one pair of groups: TB tokens at a time, then the tail.
template <int TB, class F>
void tiles(F tile, const uint8_t* g, int64_t n_tok, const ActRow* a, float* y, int64_t ldy) {
  int64_t t = 0;
  for (; t + TB <= n_tok; t += TB) tile(std::integral_constant<int, TB>{}, g, a + t, y + t * ldy);
  if constexpr (TB > 4) {
    if (n_tok - t >= 4) {
      tile(std::integral_constant<int, 4>{}, g, a + t, y + t * ldy);
      t += 4;
    }
  }
  switch (n_tok - t) {
    case 3: tile(std::integral_constant<int, 3>{}, g, a + t, y + t * ldy); break;
    case 2: tile(std::integral_constant<int, 2>{}, g, a + t, y + t * ldy); break;
    case 1: tile(std::integral_constant<int, 1>{}, g, a + t, y + t * ldy); break;
    default: break;
  }
}

}  // namespace

int64_t packed_pairs_vnni(GgmlType type, const uint8_t* w, size_t gb, int64_t n_groups, int64_t n_cols,
                          const ActRow* a, int64_t n_tok, float* y, int64_t ldy) {
  // Decode stays on the avx2 tiles (the same bits): one token through these pairs decoded at 0.7x their speed on
  // the Zen 5 (docs/BENCHMARKS.md, "VNNI"), while prefill's token tiles gain (dispatch.cpp does the same for F16).
  if (n_tok == 1) return 0;
  const int64_t n_pairs = n_groups / 2;
  // Tiles of 8 tokens where the weights' registers leave room (Q4_0, Q8_0: 8 weight vectors, 8 accumulators),
  // 4 for the K-quants (three accumulators a token).
  const auto run = [&]<int TB>(auto tile) {
    for (int64_t p = 0; p < n_pairs; ++p) tiles<TB>(tile, w + 2 * p * gb, n_tok, a, y + 16 * p, ldy);
  };
  const int64_t nb = n_cols / 32, ns = n_cols / 256;
  switch (type) {
    case GgmlType::Q4_0:
      run.template operator()<8>([&](auto tb, const uint8_t* g, const ActRow* at, float* yt) {
        q4_pair<decltype(tb)::value>(g, gb, nb, at, yt, ldy);
      });
      break;
    case GgmlType::Q8_0:
      run.template operator()<8>([&](auto tb, const uint8_t* g, const ActRow* at, float* yt) {
        q8_pair<decltype(tb)::value>(g, gb, nb, at, yt, ldy);
      });
      break;
    case GgmlType::Q4_K:
      run.template operator()<4>([&](auto tb, const uint8_t* g, const ActRow* at, float* yt) {
        q4k_pair<decltype(tb)::value>(g, gb, ns, at, yt, ldy);
      });
      break;
    case GgmlType::Q6_K:
      run.template operator()<4>([&](auto tb, const uint8_t* g, const ActRow* at, float* yt) {
        q6k_pair<decltype(tb)::value>(g, gb, ns, at, yt, ldy);
      });
      break;
    default: return 0;
  }
  return 2 * n_pairs;
}

}  // namespace shardlm::quant_detail
#pragma GCC pop_options

#else  // not x86-64: dispatch never selects this path

namespace shardlm::quant_detail {
int64_t packed_pairs_vnni(GgmlType, const uint8_t*, size_t, int64_t, int64_t, const ActRow*, int64_t, float*, int64_t) {
  return 0;
}
}  // namespace shardlm::quant_detail
#endif
