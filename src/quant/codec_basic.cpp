// Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q5_K, IQ4_NL, IQ4_XS, MXFP4 (see codecs.h).
//
// The dequantizers compute each value with ggml's dequantize_row_* operations in ggml's order, so the
// floats are bit-identical. The quantizers are the code path of ggml_quantize_chunk without an importance
// matrix (what llama-quantize runs), operation by operation: same float evaluation order, the same
// nearest_int and truncating casts, so the bytes are identical. For every type but IQ4_NL that path is
// quantize_row_*_ref; for IQ4_NL it is quantize_iq4_nl (7 extra scale trials per block), which
// quantize_row_iq4_nl_ref skips, so we match llama-quantize's files rather than that function.
//
// quantize_basic_imatrix holds the importance-matrix quantizers of every type without lookup grids,
// including Q4_0/Q4_K/Q6_K, whose plain quantizers live in quant_ref.cpp.
#include <algorithm>
#include <bit>
#include <cfloat>
#include <cmath>
#include <cstring>

#include "quant/blocks.h"
#include "quant/codecs.h"
#include "quant/quant.h"

namespace shardlm::quant_detail {

namespace {

// The fit both share; degenerate_below: qkx3's `max <= min` test (qkx2's is `max == min`).
float make_qkx_quants(int n, int nmax, const float* x /* (n) */, const float* weights /* (n) */,
                      uint8_t* L /* (n) */, float& the_min, uint8_t* laux /* (n) */, float rmin, float rdelta,
                      int nstep, bool use_mad, bool degenerate_below) {
  float min = x[0], max = x[0];
  float sum_w = weights[0];
  float sum_x = sum_w * x[0];
  for (int i = 1; i < n; ++i) {
    if (x[i] < min) min = x[i];
    if (x[i] > max) max = x[i];
    const float w = weights[i];
    sum_w += w;
    sum_x += w * x[i];
  }
  if (min > 0) min = 0;
  if (degenerate_below ? max <= min : max == min) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    the_min = -min;
    return 0.f;
  }
  float iscale = nmax / (max - min);
  float scale = 1 / iscale;
  float best_error = 0;
  for (int i = 0; i < n; ++i) {
    const int l = nearest_int(iscale * (x[i] - min));
    L[i] = static_cast<uint8_t>(std::max(0, std::min(nmax, l)));
    float diff = scale * L[i] + min - x[i];
    diff = use_mad ? std::fabs(diff) : diff * diff;
    best_error += weights[i] * diff;
  }
  for (int is = 0; is <= nstep; ++is) {
    iscale = (rmin + rdelta * is + nmax) / (max - min);
    float sum_l = 0, sum_l2 = 0, sum_xl = 0;
    for (int i = 0; i < n; ++i) {
      int l = nearest_int(iscale * (x[i] - min));
      l = std::max(0, std::min(nmax, l));
      laux[i] = static_cast<uint8_t>(l);
      const float w = weights[i];
      sum_l += w * l;
      sum_l2 += w * l * l;
      sum_xl += w * l * x[i];
    }
    const float D = sum_w * sum_l2 - sum_l * sum_l;
    if (D > 0) {
      float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
      float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
      if (this_min > 0) {
        this_min = 0;
        this_scale = sum_xl / sum_l2;
      }
      float cur_error = 0;
      for (int i = 0; i < n; ++i) {
        float diff = this_scale * laux[i] + this_min - x[i];
        diff = use_mad ? std::fabs(diff) : diff * diff;
        cur_error += weights[i] * diff;
      }
      if (cur_error < best_error) {
        for (int i = 0; i < n; ++i) L[i] = laux[i];
        best_error = cur_error;
        scale = this_scale;
        min = this_min;
      }
    }
  }
  the_min = -min;
  return scale;
}

}  // namespace

// ggml's make_qkx2_quants: an asymmetric (scale, min) fit of n values to [0, nmax], trying nstep+1
// scales around the min-max one and keeping the weighted best, by squared error or (use_mad) absolute
// error. Returns the scale and stores -min in the_min. Serves Q4_K (quant_ref.cpp), Q5_K and Q2_K (use_mad).
float make_qkx2_quants(int n, int nmax, const float* x /* (n) */, const float* weights /* (n) */,
                       uint8_t* L /* (n) */, float& the_min, uint8_t* laux /* (n) */, float rmin,
                       float rdelta, int nstep, bool use_mad) {
  return make_qkx_quants(n, nmax, x, weights, L, the_min, laux, rmin, rdelta, nstep, use_mad, false);
}

namespace {

#define SHARDLM_IQ_TABLE(type, name, size) inline constexpr type name[size] =
#include "quant/iq_tables.h"

constexpr float kGroupMaxEps = 1e-15f;  // ggml's GROUP_MAX_EPS: below it a group counts as all zero

// C's (int8_t)f / (uint8_t)f as GCC compiles them on x86 (truncate to int32, keep the low byte). Only
// reached with in-range values on sane input, but written through int so that it stays well defined.
int8_t trunc_i8(float f) { return static_cast<int8_t>(static_cast<int>(f)); }
uint8_t trunc_u8(float f) { return static_cast<uint8_t>(static_cast<int>(f)); }

void store_u32(uint8_t* p, uint32_t v) { std::memcpy(p, &v, sizeof v); }

// ---------------------------------------------------------------- 32-element linear formats

void dequantize_q4_1(const uint8_t* x, float* y /* (n) */, int64_t n) {
  for (int64_t b = 0; b < n / kQ4_1Block; ++b, x += kQ4_1Bytes, y += kQ4_1Block) {
    const float d = fp16_to_fp32(load_u16(x));
    const float m = fp16_to_fp32(load_u16(x + kQ4_1M));
    for (int j = 0; j < 16; ++j) {
      y[j] = (x[kQ4_1Qs + j] & 0xF) * d + m;
      y[j + 16] = (x[kQ4_1Qs + j] >> 4) * d + m;
    }
  }
}

void quantize_q4_1(const float* x /* (n) */, uint8_t* y, int64_t n) {
  for (int64_t b = 0; b < n / kQ4_1Block; ++b, x += kQ4_1Block, y += kQ4_1Bytes) {
    float min = FLT_MAX, max = -FLT_MAX;
    for (int j = 0; j < kQ4_1Block; ++j) {
      if (x[j] < min) min = x[j];
      if (x[j] > max) max = x[j];
    }
    // 16 levels from the minimum up; the minimum itself is stored exactly (up to fp16), the step not.
    const float d = (max - min) / 15;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    store_u16(y, fp32_to_fp16(d));
    store_u16(y + kQ4_1M, fp32_to_fp16(min));
    for (int j = 0; j < 16; ++j) {
      // Round half up by truncation (the argument is >= 0), clamp the top.
      const int q0 = std::min(15, static_cast<int>(trunc_i8((x[j] - min) * id + 0.5f)));
      const int q1 = std::min(15, static_cast<int>(trunc_i8((x[j + 16] - min) * id + 0.5f)));
      y[kQ4_1Qs + j] = static_cast<uint8_t>(q0 | (q1 << 4));
    }
  }
}

void dequantize_q5_0(const uint8_t* x, float* y /* (n) */, int64_t n) {
  for (int64_t b = 0; b < n / kQ5_0Block; ++b, x += kQ5_0Bytes, y += kQ5_0Block) {
    const float d = fp16_to_fp32(load_u16(x));
    const uint32_t qh = load_u32(x + kQ5_0Qh);
    for (int j = 0; j < 16; ++j) {
      const int q0 = (x[kQ5_0Qs + j] & 0xF) | static_cast<int>(((qh >> j) & 1u) << 4);
      const int q1 = (x[kQ5_0Qs + j] >> 4) | static_cast<int>(((qh >> (j + 16)) & 1u) << 4);
      y[j] = (q0 - 16) * d;
      y[j + 16] = (q1 - 16) * d;
    }
  }
}

void quantize_q5_0(const float* x /* (n) */, uint8_t* y, int64_t n) {
  for (int64_t b = 0; b < n / kQ5_0Block; ++b, x += kQ5_0Block, y += kQ5_0Bytes) {
    // As Q4_0: the signed extreme maps to -16, the end of the range that has one more level.
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < kQ5_0Block; ++j) {
      if (amax < std::fabs(x[j])) {
        amax = std::fabs(x[j]);
        max = x[j];
      }
    }
    const float d = max / -16;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    store_u16(y, fp32_to_fp16(d));
    uint32_t qh = 0;
    for (int j = 0; j < 16; ++j) {
      const int q0 = std::min(31, static_cast<int>(trunc_i8(x[j] * id + 16.5f)));
      const int q1 = std::min(31, static_cast<int>(trunc_i8(x[j + 16] * id + 16.5f)));
      y[kQ5_0Qs + j] = static_cast<uint8_t>((q0 & 0xF) | ((q1 & 0xF) << 4));
      qh |= static_cast<uint32_t>((q0 >> 4) & 1) << j;
      qh |= static_cast<uint32_t>((q1 >> 4) & 1) << (j + 16);
    }
    store_u32(y + kQ5_0Qh, qh);
  }
}

void dequantize_q5_1(const uint8_t* x, float* y /* (n) */, int64_t n) {
  for (int64_t b = 0; b < n / kQ5_1Block; ++b, x += kQ5_1Bytes, y += kQ5_1Block) {
    const float d = fp16_to_fp32(load_u16(x));
    const float m = fp16_to_fp32(load_u16(x + kQ5_1M));
    const uint32_t qh = load_u32(x + kQ5_1Qh);
    for (int j = 0; j < 16; ++j) {
      const int q0 = (x[kQ5_1Qs + j] & 0xF) | static_cast<int>(((qh >> j) & 1u) << 4);
      const int q1 = (x[kQ5_1Qs + j] >> 4) | static_cast<int>(((qh >> (j + 16)) & 1u) << 4);
      y[j] = q0 * d + m;
      y[j + 16] = q1 * d + m;
    }
  }
}

void quantize_q5_1(const float* x /* (n) */, uint8_t* y, int64_t n) {
  for (int64_t b = 0; b < n / kQ5_1Block; ++b, x += kQ5_1Block, y += kQ5_1Bytes) {
    float min = FLT_MAX, max = -FLT_MAX;
    for (int j = 0; j < kQ5_1Block; ++j) {
      if (x[j] < min) min = x[j];
      if (x[j] > max) max = x[j];
    }
    const float d = (max - min) / 31;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    store_u16(y, fp32_to_fp16(d));
    store_u16(y + kQ5_1M, fp32_to_fp16(min));
    uint32_t qh = 0;
    for (int j = 0; j < 16; ++j) {
      // ggml does not clamp here (the top lands at 31.5 at most and truncates to 31); the masks below
      // keep 5 bits as ggml's do.
      const int q0 = trunc_u8((x[j] - min) * id + 0.5f);
      const int q1 = trunc_u8((x[j + 16] - min) * id + 0.5f);
      y[kQ5_1Qs + j] = static_cast<uint8_t>((q0 & 0xF) | ((q1 & 0xF) << 4));
      qh |= static_cast<uint32_t>((q0 >> 4) & 1) << j;
      qh |= static_cast<uint32_t>((q1 >> 4) & 1) << (j + 16);
    }
    store_u32(y + kQ5_1Qh, qh);
  }
}

// ---------------------------------------------------------------- k-quants


// ggml's make_q3_quants with do_rmse: symmetric levels [-nmax, nmax-1] from amax, then up to five
// coordinate-descent passes that move single elements to another level when that improves the
// x^2-weighted fit. L gets the levels offset by +nmax. Returns the least-squares scale.
float make_q3_quants(int n, int nmax, const float* x /* (n) */, int8_t* L /* (n) */) {
  float max = 0, amax = 0;
  for (int i = 0; i < n; ++i) {
    const float ax = std::fabs(x[i]);
    if (ax > amax) {
      amax = ax;
      max = x[i];
    }
  }
  if (amax < kGroupMaxEps) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    return 0.f;
  }
  const float iscale = -nmax / max;
  float sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; ++i) {
    int l = nearest_int(iscale * x[i]);
    l = std::max(-nmax, std::min(nmax - 1, l));
    L[i] = static_cast<int8_t>(l);
    const float w = x[i] * x[i];
    sumlx += w * x[i] * l;
    suml2 += w * l * l;
  }
  for (int itry = 0; itry < 5; ++itry) {
    int n_changed = 0;
    for (int i = 0; i < n; ++i) {
      const float w = x[i] * x[i];
      float slx = sumlx - w * x[i] * L[i];
      if (slx > 0) {
        float sl2 = suml2 - w * L[i] * L[i];
        int new_l = nearest_int(x[i] * sl2 / slx);
        new_l = std::max(-nmax, std::min(nmax - 1, new_l));
        if (new_l != L[i]) {
          slx += w * x[i] * new_l;
          sl2 += w * new_l * new_l;
          // Compares sumlx^2/suml2 (the fit's explained energy) without dividing.
          if (sl2 > 0 && slx * slx * suml2 > sumlx * sumlx * sl2) {
            L[i] = static_cast<int8_t>(new_l);
            sumlx = slx;
            suml2 = sl2;
            ++n_changed;
          }
        }
      }
    }
    if (n_changed == 0) break;
  }
  for (int i = 0; i < n; ++i) L[i] = static_cast<int8_t>(L[i] + nmax);
  return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

// The 2-bit fields of Q2_K and Q3_K: element e goes to qs[(e / 128) * 32 + e % 32] at bit
// 2 * ((e % 128) / 32).
template <typename T>
void pack_2bit(const T* L /* (256) */, uint8_t* qs /* (64) */) {
  for (int j = 0; j < kQK; j += 128)
    for (int l = 0; l < 32; ++l)
      qs[j / 4 + l] = static_cast<uint8_t>(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) |
                                           (L[j + l + 96] << 6));
}

void dequantize_q2_k(const uint8_t* x, float* y /* (n) */, int64_t n) {
  for (int64_t b = 0; b < n / kQK; ++b, x += kQ2_KBytes) {
    const float d = fp16_to_fp32(load_u16(x + kQ2_KD));
    const float dmin = fp16_to_fp32(load_u16(x + kQ2_KDmin));
    const uint8_t* q = x + kQ2_KQs;
    int is = 0;
    for (int half = 0; half < 2; ++half, q += 32) {
      for (int shift = 0; shift < 8; shift += 2) {
        // Two 16-element sub-blocks per shift: q[0..15] and q[16..31].
        for (int k = 0; k < 2; ++k, ++is) {
          const uint8_t sc = x[is];
          const float dl = d * (sc & 0xF), ml = dmin * (sc >> 4);
          for (int l = 0; l < 16; ++l) *y++ = dl * ((q[16 * k + l] >> shift) & 3) - ml;
        }
      }
    }
  }
}

void quantize_q2_k(const float* x /* (n) */, uint8_t* y, int64_t n) {
  uint8_t L[kQK];
  uint8_t laux[16];
  float weights[16];
  float mins[16];
  float scales[16];
  constexpr float q4scale = 15.f;
  for (int64_t b = 0; b < n / kQK; ++b, x += kQK, y += kQ2_KBytes) {
    float max_scale = 0, max_min = 0;  // scales and mins of the min-subtracting fit are >= 0
    for (int j = 0; j < 16; ++j) {
      for (int l = 0; l < 16; ++l) weights[l] = std::fabs(x[16 * j + l]);
      scales[j] =
          make_qkx2_quants(16, 3, x + 16 * j, weights, L + 16 * j, mins[j], laux, -0.5f, 0.1f, 15, true);
      if (scales[j] > max_scale) max_scale = scales[j];
      if (mins[j] > max_min) max_min = mins[j];
    }
    uint8_t* sc = y;
    // 4-bit scales and mins relative to the largest of each; the (uint8_t) stores truncate as ggml's do.
    if (max_scale > 0) {
      const float iscale = q4scale / max_scale;
      for (int j = 0; j < 16; ++j) sc[j] = static_cast<uint8_t>(nearest_int(iscale * scales[j]));
      store_u16(y + kQ2_KD, fp32_to_fp16(max_scale / q4scale));
    } else {
      for (int j = 0; j < 16; ++j) sc[j] = 0;
      store_u16(y + kQ2_KD, fp32_to_fp16(0.f));
    }
    if (max_min > 0) {
      const float iscale = q4scale / max_min;
      for (int j = 0; j < 16; ++j)
        sc[j] = static_cast<uint8_t>(sc[j] | (static_cast<unsigned>(nearest_int(iscale * mins[j])) << 4));
      store_u16(y + kQ2_KDmin, fp32_to_fp16(max_min / q4scale));
    } else {
      store_u16(y + kQ2_KDmin, fp32_to_fp16(0.f));
    }
    // Requantize against the stored 4-bit scales and mins; a sub-block with scale 0 keeps its fit's L.
    const float d_all = fp16_to_fp32(load_u16(y + kQ2_KD));
    const float m_all = fp16_to_fp32(load_u16(y + kQ2_KDmin));
    for (int j = 0; j < 16; ++j) {
      const float d = d_all * (sc[j] & 0xF);
      if (d == 0.0f) continue;
      const float dm = m_all * (sc[j] >> 4);
      for (int i = 0; i < 16; ++i) {
        const int l = nearest_int((x[16 * j + i] + dm) / d);
        L[16 * j + i] = static_cast<uint8_t>(std::max(0, std::min(3, l)));
      }
    }
    pack_2bit(L, y + kQ2_KQs);
  }
}

void dequantize_q3_k(const uint8_t* x, float* y /* (n) */, int64_t n) {
  for (int64_t b = 0; b < n / kQK; ++b, x += kQ3_KBytes) {
    const float d_all = fp16_to_fp32(load_u16(x + kQ3_KD));
    const uint8_t* q = x + kQ3_KQs;
    const uint8_t* hm = x;
    uint8_t m = 1;  // the hmask bit of the current 32-element group (bit e / 32)
    int is = 0;
    for (int half = 0; half < 2; ++half, q += 32) {
      for (int shift = 0; shift < 8; shift += 2, m = static_cast<uint8_t>(m << 1)) {
        for (int k = 0; k < 2; ++k, ++is) {
          const float dl = d_all * q3k_scale(is, x + kQ3_KScales);
          for (int l = 0; l < 16; ++l) {
            const int lo = (q[16 * k + l] >> shift) & 3;
            *y++ = dl * (lo - ((hm[16 * k + l] & m) ? 0 : 4));
          }
        }
      }
    }
  }
}

void quantize_q3_k(const float* x /* (n) */, uint8_t* y, int64_t n) {
  int8_t L[kQK];
  float scales[16];
  for (int64_t b = 0; b < n / kQK; ++b, x += kQK, y += kQ3_KBytes) {
    float max_scale = 0, amax = 0;
    for (int j = 0; j < 16; ++j) {
      scales[j] = make_q3_quants(16, 4, x + 16 * j, L + 16 * j);
      if (std::fabs(scales[j]) > amax) {
        amax = std::fabs(scales[j]);
        max_scale = scales[j];
      }
    }
    uint8_t* sc = y + kQ3_KScales;
    std::memset(sc, 0, 12);
    if (max_scale != 0.0f) {
      // Signed 6-bit scales with the largest magnitude at -32 (the end with one more level).
      const float iscale = -32.f / max_scale;
      for (int j = 0; j < 16; ++j) {
        int8_t l = static_cast<int8_t>(nearest_int(iscale * scales[j]));
        l = static_cast<int8_t>(std::max(-32, std::min(31, static_cast<int>(l))) + 32);
        if (j < 8) sc[j] = static_cast<uint8_t>(l & 0xF);
        else sc[j - 8] = static_cast<uint8_t>(sc[j - 8] | ((l & 0xF) << 4));
        sc[j % 4 + 8] = static_cast<uint8_t>(sc[j % 4 + 8] | ((l >> 4) << (2 * (j / 4))));
      }
      store_u16(y + kQ3_KD, fp32_to_fp16(1 / iscale));
    } else {
      store_u16(y + kQ3_KD, fp32_to_fp16(0.f));
    }
    const float d_all = fp16_to_fp32(load_u16(y + kQ3_KD));
    for (int j = 0; j < 16; ++j) {
      const float d = d_all * q3k_scale(j, sc);
      if (d == 0.0f) continue;
      for (int i = 0; i < 16; ++i) {
        const int l = nearest_int(x[16 * j + i] / d);
        L[16 * j + i] = static_cast<int8_t>(std::max(-4, std::min(3, l)) + 4);
      }
    }
    // Levels 4..7 set their hmask bit (bit e / 32 of hmask[e % 32]) and keep the low 2 bits in qs.
    uint8_t* hmask = y;
    std::memset(hmask, 0, 32);
    for (int e = 0; e < kQK; ++e) {
      if (L[e] > 3) {
        hmask[e % 32] = static_cast<uint8_t>(hmask[e % 32] | (1 << (e / 32)));
        L[e] = static_cast<int8_t>(L[e] - 4);
      }
    }
    pack_2bit(L, y + kQ3_KQs);
  }
}

void dequantize_q5_k(const uint8_t* x, float* y /* (n) */, int64_t n) {
  for (int64_t b = 0; b < n / kQK; ++b, x += kQ5_KBytes) {
    const float d = fp16_to_fp32(load_u16(x));
    const float dmin = fp16_to_fp32(load_u16(x + kQ5_KDmin));
    const uint8_t* ql = x + kQ5_KQs;
    const uint8_t* qh = x + kQ5_KQh;
    for (int j = 0; j < 8; j += 2, ql += 32) {
      int s0, m0, s1, m1;
      q4k_scale_min(j, x + kQ5_KScales, s0, m0);
      q4k_scale_min(j + 1, x + kQ5_KScales, s1, m1);
      const float d1 = d * s0, min1 = dmin * m0, d2 = d * s1, min2 = dmin * m1;
      const int u1 = 1 << j, u2 = 2 << j;  // the qh bits of sub-blocks j and j + 1
      for (int l = 0; l < 32; ++l) *y++ = d1 * ((ql[l] & 0xF) + ((qh[l] & u1) ? 16 : 0)) - min1;
      for (int l = 0; l < 32; ++l) *y++ = d2 * ((ql[l] >> 4) + ((qh[l] & u2) ? 16 : 0)) - min2;
    }
  }
}

void quantize_q5_k(const float* x /* (n) */, uint8_t* y, int64_t n) {
  uint8_t L[kQK];
  uint8_t laux[32];
  float weights[32];
  float mins[8];
  float scales[8];
  for (int64_t b = 0; b < n / kQK; ++b, x += kQK, y += kQ5_KBytes) {
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < 8; ++j) {
      float sum_x2 = 0;
      for (int l = 0; l < 32; ++l) sum_x2 += x[32 * j + l] * x[32 * j + l];
      const float av_x = std::sqrt(sum_x2 / 32);
      for (int l = 0; l < 32; ++l) weights[l] = av_x + std::fabs(x[32 * j + l]);
      scales[j] =
          make_qkx2_quants(32, 31, x + 32 * j, weights, L + 32 * j, mins[j], laux, -0.5f, 0.1f, 15, false);
      if (scales[j] > max_scale) max_scale = scales[j];
      if (mins[j] > max_min) max_min = mins[j];
    }
    const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    uint8_t* sc = y + kQ5_KScales;
    for (int j = 0; j < 8; ++j) {
      // (uint8_t) truncation before the clamp mirrors ggml. Unlike Q4_K's, ggml's Q5_K does not clear
      // the scale bytes first: bytes 0..7 are written (j < 4) before their top bits are or-ed in.
      const uint8_t ls = std::min<uint8_t>(63, static_cast<uint8_t>(nearest_int(inv_scale * scales[j])));
      const uint8_t lm = std::min<uint8_t>(63, static_cast<uint8_t>(nearest_int(inv_min * mins[j])));
      if (j < 4) {
        sc[j] = ls;
        sc[j + 4] = lm;
      } else {
        sc[j + 4] = static_cast<uint8_t>((ls & 0xF) | ((lm & 0xF) << 4));
        sc[j - 4] = static_cast<uint8_t>(sc[j - 4] | ((ls >> 4) << 6));
        sc[j] = static_cast<uint8_t>(sc[j] | ((lm >> 4) << 6));
      }
    }
    store_u16(y, fp32_to_fp16(max_scale / 63.f));
    store_u16(y + kQ5_KDmin, fp32_to_fp16(max_min / 63.f));
    const float d_all = fp16_to_fp32(load_u16(y));
    const float m_all = fp16_to_fp32(load_u16(y + kQ5_KDmin));
    for (int j = 0; j < 8; ++j) {
      int s = 0, m = 0;
      q4k_scale_min(j, sc, s, m);
      const float d = d_all * s;
      if (d == 0.0f) continue;
      const float dm = m_all * m;
      for (int i = 0; i < 32; ++i) {
        const int l = nearest_int((x[32 * j + i] + dm) / d);
        L[32 * j + i] = static_cast<uint8_t>(std::max(0, std::min(31, l)));
      }
    }
    uint8_t* qh = y + kQ5_KQh;
    uint8_t* ql = y + kQ5_KQs;
    std::memset(qh, 0, 32);
    for (int c = 0; c < 4; ++c, ql += 32) {  // 64-element chunks: sub-blocks 2c (low nibble), 2c+1 (high)
      for (int j = 0; j < 32; ++j) {
        int l1 = L[64 * c + j], l2 = L[64 * c + j + 32];
        if (l1 > 15) {
          l1 -= 16;
          qh[j] = static_cast<uint8_t>(qh[j] | (1 << (2 * c)));
        }
        if (l2 > 15) {
          l2 -= 16;
          qh[j] = static_cast<uint8_t>(qh[j] | (2 << (2 * c)));
        }
        ql[j] = static_cast<uint8_t>(l1 | (l2 << 4));
      }
    }
  }
}

// ---------------------------------------------------------------- non-linear 4-bit (IQ4_NL, IQ4_XS)

// ggml's best_index_int8: the index of the table value nearest to v (table ascending); a tie goes to the
// upper one.
int best_index_iq4nl(float v) {
  const int8_t* val = kValuesIq4nl;
  if (v <= val[0]) return 0;
  if (v >= val[15]) return 15;
  int lo = 0, hi = 15;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (v < val[mid]) hi = mid;
    else lo = mid;
  }
  return v - val[hi - 1] < val[hi] - v ? hi - 1 : hi;
}

// The scale search of ggml's quantize_row_iq4_nl_impl for one 32-element group with ntry = 7, as
// quantize_iq4_nl/quantize_iq4_xs call it: start from the scale putting the signed extreme on the -127
// end, then try the 15 scales (t - 127) / max, t in -7..7, keeping the best weighted least-squares fit.
// The weights are x^2 without an importance matrix. Returns 0 for an all-zero group. (The index choices
// made here are redone by the callers against the final scale, so they are not kept.)
float iq4_group_scale(const float* xb /* (32) */, const float* weight /* (32) */) {
  constexpr int ntry = 7;
  float amax = 0, max = 0;
  for (int j = 0; j < 32; ++j) {
    const float ax = std::fabs(xb[j]);
    if (ax > amax) {
      amax = ax;
      max = xb[j];
    }
  }
  if (amax < kGroupMaxEps) return 0;
  float d = -max / kValuesIq4nl[0];
  float id = 1 / d;
  float sumqx = 0, sumq2 = 0;
  for (int j = 0; j < 32; ++j) {
    const float q = kValuesIq4nl[best_index_iq4nl(id * xb[j])];
    const float w = weight[j];
    sumqx += w * q * xb[j];
    sumq2 += w * q * q;
  }
  d = sumq2 > 0 ? sumqx / sumq2 : 0.f;
  float best = d * sumqx;
  for (int itry = -ntry; itry <= ntry; ++itry) {
    id = (itry + kValuesIq4nl[0]) / max;
    sumqx = sumq2 = 0;
    for (int j = 0; j < 32; ++j) {
      const float q = kValuesIq4nl[best_index_iq4nl(id * xb[j])];
      const float w = weight[j];
      sumqx += w * q * xb[j];
      sumq2 += w * q * q;
    }
    if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
      d = sumqx / sumq2;
      best = d * sumqx;
    }
  }
  return d;
}

// Nibbles of a 32-element group: element j low in qs[j], element j + 16 high.
void pack_iq4_group(const float* xb /* (32) */, float id, uint8_t* qs /* (16) */) {
  for (int j = 0; j < 16; ++j)
    qs[j] =
        static_cast<uint8_t>(best_index_iq4nl(id * xb[j]) | (best_index_iq4nl(id * xb[j + 16]) << 4));
}

void dequantize_iq4_nl(const uint8_t* x, float* y /* (n) */, int64_t n) {
  for (int64_t b = 0; b < n / kIQ4_NLBlock; ++b, x += kIQ4_NLBytes, y += kIQ4_NLBlock) {
    const float d = fp16_to_fp32(load_u16(x));
    for (int j = 0; j < 16; ++j) {
      y[j] = d * kValuesIq4nl[x[kIQ4_NLQs + j] & 0xF];
      y[j + 16] = d * kValuesIq4nl[x[kIQ4_NLQs + j] >> 4];
    }
  }
}

void quantize_iq4_nl(const float* x /* (n) */, uint8_t* y, int64_t n) {
  for (int64_t b = 0; b < n / kIQ4_NLBlock; ++b, x += kIQ4_NLBlock, y += kIQ4_NLBytes) {
    // One group per block: the fp32 scale is stored as fp16 and the indices are chosen against the
    // unrounded scale (ggml's order).
    float weight[kIQ4_NLBlock];
    for (int j = 0; j < kIQ4_NLBlock; ++j) weight[j] = x[j] * x[j];
    const float scale = iq4_group_scale(x, weight);
    store_u16(y, fp32_to_fp16(scale));
    const float id = scale != 0.0f ? 1 / scale : 0;
    pack_iq4_group(x, id, y + kIQ4_NLQs);
  }
}

void dequantize_iq4_xs(const uint8_t* x, float* y /* (n) */, int64_t n) {
  for (int64_t b = 0; b < n / kQK; ++b, x += kIQ4_XSBytes) {
    const float d = fp16_to_fp32(load_u16(x));
    const uint8_t* qs = x + kIQ4_XSQs;
    for (int ib = 0; ib < 8; ++ib, qs += 16, y += 32) {
      const float dl = d * (iq4xs_scale(ib, x) - 32);
      for (int j = 0; j < 16; ++j) {
        y[j] = dl * kValuesIq4nl[qs[j] & 0xF];
        y[j + 16] = dl * kValuesIq4nl[qs[j] >> 4];
      }
    }
  }
}

// One IQ4_XS super-block from its eight group scales (iq4_group_scale's): signed 6-bit group scales with
// the largest magnitude at -32, then every index chosen against the group's final scale. An all-zero
// block stores d = -0.
void store_iq4_xs_block(const float* x /* (256) */, const float* scales /* (8) */, uint8_t* y) {
  float max_scale = 0, amax_scale = 0;
  for (int ib = 0; ib < 8; ++ib) {
    if (std::fabs(scales[ib]) > amax_scale) {
      amax_scale = std::fabs(scales[ib]);
      max_scale = scales[ib];
    }
  }
  const float d = -max_scale / 32;
  store_u16(y, fp32_to_fp16(d));
  const float id = d != 0.0f ? 1 / d : 0.f;
  uint16_t scales_h = 0;
  uint8_t* scales_l = y + kIQ4_XSScalesL;
  for (int ib = 0; ib < 8; ++ib) {
    int l = nearest_int(id * scales[ib]);
    l = std::max(-32, std::min(31, l));
    // Indices against the fp32 d times the group's integer scale (not the fp16-rounded d, as ggml).
    const float dl = d * l;
    const float idl = dl != 0.0f ? 1 / dl : 0.f;
    pack_iq4_group(x + 32 * ib, idl, y + kIQ4_XSQs + 16 * ib);
    l += 32;
    if (ib % 2 == 0) scales_l[ib / 2] = static_cast<uint8_t>(l & 0xF);
    else scales_l[ib / 2] = static_cast<uint8_t>(scales_l[ib / 2] | ((l & 0xF) << 4));
    scales_h = static_cast<uint16_t>(scales_h | ((l >> 4) << (2 * ib)));
  }
  store_u16(y + kIQ4_XSScalesH, scales_h);
}

void quantize_iq4_xs(const float* x /* (n) */, uint8_t* y, int64_t n) {
  float scales[8];
  float weight[32];
  for (int64_t b = 0; b < n / kQK; ++b, x += kQK, y += kIQ4_XSBytes) {
    for (int ib = 0; ib < 8; ++ib) {
      for (int j = 0; j < 32; ++j) weight[j] = x[32 * ib + j] * x[32 * ib + j];
      scales[ib] = iq4_group_scale(x + 32 * ib, weight);
    }
    store_iq4_xs_block(x, scales, y);
  }
}

// ---------------------------------------------------------------- MXFP4

void dequantize_mxfp4(const uint8_t* x, float* y /* (n) */, int64_t n) {
  for (int64_t b = 0; b < n / kMXFP4Block; ++b, x += kMXFP4Bytes, y += kMXFP4Block) {
    const float d = e8m0_to_fp32_half(x[0]);
    for (int j = 0; j < 16; ++j) {
      y[j] = kValuesFp4[x[kMXFP4Qs + j] & 0xF] * d;
      y[j + 16] = kValuesFp4[x[kMXFP4Qs + j] >> 4] * d;
    }
  }
}

// ggml's best_index_mxfp4: the first index of the smallest |table * d - v| (a linear scan, so of the two
// zeros, index 0 wins, and ties go to the lower index).
int best_index_fp4(float v, float d) {
  int best = 0;
  float best_err = std::fabs(kValuesFp4[0] * d - v);
  for (int i = 1; i < 16; ++i) {
    const float err = std::fabs(kValuesFp4[i] * d - v);
    if (err < best_err) {
      best = i;
      best_err = err;
    }
  }
  return best;
}

void quantize_mxfp4(const float* x /* (n) */, uint8_t* y, int64_t n) {
  for (int64_t b = 0; b < n / kMXFP4Block; ++b, x += kMXFP4Block, y += kMXFP4Bytes) {
    float amax = 0.0f;
    for (int j = 0; j < kMXFP4Block; ++j) amax = std::max(amax, std::fabs(x[j]));
    // Power-of-two scale with amax in [4, 8) half-units, i.e. [2, 4) of e2m1's 6 maximum: the top of
    // the block may round down to 6 (ggml's choice). Exponents below the byte's range wrap, as ggml's
    // uint8_t cast does on x86.
    const uint8_t e = amax > 0.0f ? trunc_u8(std::floor(std::log2(amax)) - 2 + 127) : 0;
    const float d = e8m0_to_fp32_half(e);
    y[0] = e;
    for (int j = 0; j < 16; ++j)
      y[kMXFP4Qs + j] =
          static_cast<uint8_t>(best_index_fp4(x[j], d) | (best_index_fp4(x[j + 16], d) << 4));
  }
}

// ---------------------------------------------------------------- with an importance matrix
//
// ggml's quantize_<type>(src, dst, 1, n, quant_weights) paths: the *_impl quantizers, which fit every
// sub-block by the imatrix-weighted squared error and (k-quants) fit the sub-block scales themselves by
// their summed weights. Same float evaluation order as ggml, so the bytes are identical.

// The fits below (make_qkx3_quants, make_qp_quants) are only reached with weights, so ggml's fallbacks for
// a null weight array are left out.

float sum_squares(const float* x /* (n) */, int64_t n) {
  float s = 0;
  for (int64_t j = 0; j < n; ++j) s += x[j] * x[j];
  return s;
}

// ggml's element weight with an importance matrix: imatrix * sqrt(sigma2 + x^2). sigma2 (a mean square
// of the row or super-block) keeps the small elements of an important column from weighing nothing.
void imatrix_weights(int n, const float* x /* (n) */, const float* qw /* (n) */, float sigma2,
                     float* w /* (n) */) {
  for (int j = 0; j < n; ++j) w[j] = qw[j] * std::sqrt(sigma2 + x[j] * x[j]);
}

// ggml's make_qkx3_quants with the arguments every imatrix caller passes (rmin -0.9, rdelta 0.05, 37
// steps, squared error): as make_qkx2_quants, but a finer and wider scale sweep and `max <= min` as the
// degenerate test. Returns the scale and stores -min in the_min.
float make_qkx3_quants(int n, int nmax, const float* x /* (n) */, const float* weights /* (n) */,
                       uint8_t* L /* (n) */, float& the_min, uint8_t* laux /* (n) */) {
  return make_qkx_quants(n, nmax, x, weights, L, the_min, laux, -0.9f, 0.05f, 36, false, true);
}

// ggml's make_qp_quants: unsigned levels [0, nmax] for n non-negative values (the sub-block scales or
// mins of a k-quant super-block), weighted by quant_weights: pick the best of 9 scales around max/nmax,
// then up to five passes moving single levels while the weighted fit improves. Returns the fitted scale.
// L is uint8_t as in ggml: a negative level (only from a negative input) wraps there and is read back
// wrapped, which the int locals reproduce.
float make_qp_quants(int n, int nmax, const float* x /* (n) */, uint8_t* L /* (n) */,
                     const float* quant_weights /* (n) */) {
  float max = 0;
  for (int i = 0; i < n; ++i) max = std::max(max, x[i]);
  if (max < kGroupMaxEps) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    return 0.f;
  }
  float iscale = nmax / max;
  for (int i = 0; i < n; ++i) L[i] = static_cast<uint8_t>(nearest_int(iscale * x[i]));
  const float scale = 1 / iscale;
  float best_mse = 0;
  for (int i = 0; i < n; ++i) {
    const float diff = x[i] - scale * L[i];
    const float w = quant_weights[i];
    best_mse += w * diff * diff;
  }
  for (int is = -4; is <= 4; ++is) {
    if (is == 0) continue;
    const float iscale_is = (0.1f * is + nmax) / max;
    const float scale_is = 1 / iscale_is;
    float mse = 0;
    for (int i = 0; i < n; ++i) {
      const int l = std::min(nmax, nearest_int(iscale_is * x[i]));
      const float diff = x[i] - scale_is * l;
      const float w = quant_weights[i];
      mse += w * diff * diff;
    }
    if (mse < best_mse) {
      best_mse = mse;
      iscale = iscale_is;
    }
  }
  float sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; ++i) {
    const int l = std::min(nmax, nearest_int(iscale * x[i]));
    L[i] = static_cast<uint8_t>(l);
    const float w = quant_weights[i];
    sumlx += w * x[i] * l;
    suml2 += w * l * l;
  }
  for (int itry = 0; itry < 5; ++itry) {
    int n_changed = 0;
    for (int i = 0; i < n; ++i) {
      const float w = quant_weights[i];
      float slx = sumlx - w * x[i] * L[i];
      float sl2 = suml2 - w * L[i] * L[i];
      if (slx > 0 && sl2 > 0) {
        const int new_l = std::min(nmax, nearest_int(x[i] * sl2 / slx));
        if (new_l != L[i]) {
          slx += w * x[i] * new_l;
          sl2 += w * new_l * new_l;
          // Compares sumlx^2/suml2 (the fit's explained energy) without dividing.
          if (slx * slx * suml2 > sumlx * sumlx * sl2) {
            L[i] = static_cast<uint8_t>(new_l);
            sumlx = slx;
            suml2 = sl2;
            ++n_changed;
          }
        }
      }
    }
    if (n_changed == 0) break;
  }
  return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

// ggml's make_qx_quants with rmse_type 1 and importance weights qw: symmetric levels [-nmax, nmax-1]
// from the signed extreme, then the best qw-weighted least-squares fit of 18 more scales around it. L
// gets the levels offset by +nmax. Returns the fitted scale.
float make_qx_quants_weighted(int n, int nmax, const float* x /* (n) */, int8_t* L /* (n) */,
                              const float* qw /* (n) */) {
  float max = 0, amax = 0;
  for (int i = 0; i < n; ++i) {
    const float ax = std::fabs(x[i]);
    if (ax > amax) {
      amax = ax;
      max = x[i];
    }
  }
  if (amax < kGroupMaxEps) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    return 0.f;
  }
  float iscale = -nmax / max;
  float sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; ++i) {
    int l = nearest_int(iscale * x[i]);
    l = std::max(-nmax, std::min(nmax - 1, l));
    L[i] = static_cast<int8_t>(l + nmax);
    const float w = qw[i];
    sumlx += w * x[i] * l;
    suml2 += w * l * l;
  }
  float scale = suml2 != 0.0f ? sumlx / suml2 : 0.0f;
  float best = scale * sumlx;
  for (int is = -9; is <= 9; ++is) {
    if (is == 0) continue;
    iscale = -(nmax + 0.1f * is) / max;
    sumlx = suml2 = 0;
    for (int i = 0; i < n; ++i) {
      int l = nearest_int(iscale * x[i]);
      l = std::max(-nmax, std::min(nmax - 1, l));
      const float w = qw[i];
      sumlx += w * x[i] * l;
      suml2 += w * l * l;
    }
    if (suml2 > 0 && sumlx * sumlx > best * suml2) {
      for (int i = 0; i < n; ++i) {
        const int l = nearest_int(iscale * x[i]);
        L[i] = static_cast<int8_t>(nmax + std::max(-nmax, std::min(nmax - 1, l)));
      }
      scale = sumlx / suml2;
      best = scale * sumlx;
    }
  }
  return scale;
}

// The 5th bits of a 32-element block's levels (Q5_0/Q5_1): bit j of the uint32 for element j; the low
// nibbles go to qs as in Q4_0.
void pack_q5_block(const uint8_t* L /* (32) */, uint8_t* qs /* (16) */, uint8_t* qh_out /* (4) */) {
  uint32_t qh = 0;
  for (int j = 0; j < 16; ++j) {
    qs[j] = static_cast<uint8_t>((L[j] & 0xF) | ((L[j + 16] & 0xF) << 4));
    qh |= static_cast<uint32_t>((L[j] & 0x10u) >> 4) << j;
    qh |= static_cast<uint32_t>((L[j + 16] & 0x10u) >> 4) << (j + 16);
  }
  store_u32(qh_out, qh);
}

// Q4_0 and Q5_0: one symmetric weighted fit per block, levels [-nmax, nmax-1]. sigma2 is the whole
// row's mean square (ggml's choice for the 32-element formats, unlike the k-quants' per super-block).
void quantize_q4_0_imatrix(const float* x /* (n) */, uint8_t* y, int64_t n, const float* qw /* (n) */) {
  const float sigma2 = sum_squares(x, n) / static_cast<float>(n);
  float weight[32];
  int8_t L[32];
  for (int64_t b = 0; b < n / kQ4_0Block; ++b, x += 32, qw += 32, y += kQ4_0Bytes) {
    imatrix_weights(32, x, qw, sigma2, weight);
    const float d = make_qx_quants_weighted(32, 8, x, L, weight);
    store_u16(y, fp32_to_fp16(d));
    for (int j = 0; j < 16; ++j) y[kQ4_0Qs + j] = static_cast<uint8_t>(L[j] | (L[j + 16] << 4));
  }
}

void quantize_q5_0_imatrix(const float* x /* (n) */, uint8_t* y, int64_t n, const float* qw /* (n) */) {
  const float sigma2 = sum_squares(x, n) / static_cast<float>(n);
  float weight[32];
  int8_t L[32];
  uint8_t Lu[32];
  for (int64_t b = 0; b < n / kQ5_0Block; ++b, x += 32, qw += 32, y += kQ5_0Bytes) {
    imatrix_weights(32, x, qw, sigma2, weight);
    const float d = make_qx_quants_weighted(32, 16, x, L, weight);
    store_u16(y, fp32_to_fp16(d));
    for (int j = 0; j < 32; ++j) Lu[j] = static_cast<uint8_t>(L[j]);  // 0..31
    pack_q5_block(Lu, y + kQ5_0Qs, y + kQ5_0Qh);
  }
}

// Q4_1 and Q5_1: one weighted (scale, min) fit per block; m stores the (non-positive) offset.
void quantize_q4_1_imatrix(const float* x /* (n) */, uint8_t* y, int64_t n, const float* qw /* (n) */) {
  const float sigma2 = sum_squares(x, n) / static_cast<float>(n);
  float weight[32];
  uint8_t L[32], laux[32];
  for (int64_t b = 0; b < n / kQ4_1Block; ++b, x += 32, qw += 32, y += kQ4_1Bytes) {
    imatrix_weights(32, x, qw, sigma2, weight);
    float min = 0;
    const float d = make_qkx3_quants(32, 15, x, weight, L, min, laux);
    store_u16(y, fp32_to_fp16(d));
    store_u16(y + kQ4_1M, fp32_to_fp16(-min));
    for (int j = 0; j < 16; ++j) y[kQ4_1Qs + j] = static_cast<uint8_t>(L[j] | (L[j + 16] << 4));
  }
}

void quantize_q5_1_imatrix(const float* x /* (n) */, uint8_t* y, int64_t n, const float* qw /* (n) */) {
  const float sigma2 = sum_squares(x, n) / static_cast<float>(n);
  float weight[32];
  uint8_t L[32], laux[32];
  for (int64_t b = 0; b < n / kQ5_1Block; ++b, x += 32, qw += 32, y += kQ5_1Bytes) {
    imatrix_weights(32, x, qw, sigma2, weight);
    float min = 0;
    const float d = make_qkx3_quants(32, 31, x, weight, L, min, laux);
    store_u16(y, fp32_to_fp16(d));
    store_u16(y + kQ5_1M, fp32_to_fp16(-min));
    pack_q5_block(L, y + kQ5_1Qs, y + kQ5_1Qh);
  }
}

void quantize_q2_k_imatrix(const float* x /* (n) */, uint8_t* y, int64_t n, const float* qw /* (n) */) {
  uint8_t L[kQK];
  uint8_t laux[16];
  uint8_t Ls[16], Lm[16];
  float weight[16];
  float sw[16];
  float mins[16];
  float scales[16];
  for (int64_t b = 0; b < n / kQK; ++b, x += kQK, qw += kQK, y += kQ2_KBytes) {
    const float sigma2 = sum_squares(x, kQK) / kQK;  // no factor 2 here, unlike Q3_K..Q5_K
    for (int j = 0; j < 16; ++j) {
      imatrix_weights(16, x + 16 * j, qw + 16 * j, sigma2, weight);
      sw[j] = 0;
      for (int l = 0; l < 16; ++l) sw[j] += weight[l];
      scales[j] = make_qkx3_quants(16, 3, x + 16 * j, weight, L + 16 * j, mins[j], laux);
    }
    // The 4-bit scales and mins are themselves fitted, weighted by each sub-block's total importance.
    const float dm = make_qp_quants(16, 15, scales, Ls, sw);
    const float mm = make_qp_quants(16, 15, mins, Lm, sw);
    store_u16(y + kQ2_KD, fp32_to_fp16(dm));
    store_u16(y + kQ2_KDmin, fp32_to_fp16(mm));
    const float d_all = fp16_to_fp32(load_u16(y + kQ2_KD));
    const float m_all = fp16_to_fp32(load_u16(y + kQ2_KDmin));
    uint8_t* sc = y;
    for (int j = 0; j < 16; ++j) sc[j] = static_cast<uint8_t>(Ls[j] | (Lm[j] << 4));
    // Requantize against the stored scales and mins; a sub-block with scale 0 keeps its fit's L.
    for (int j = 0; j < 16; ++j) {
      const float d = d_all * (sc[j] & 0xF);
      if (d == 0.0f) continue;
      const float m = m_all * (sc[j] >> 4);
      for (int i = 0; i < 16; ++i) {
        const int l = nearest_int((x[16 * j + i] + m) / d);
        L[16 * j + i] = static_cast<uint8_t>(std::max(0, std::min(3, l)));
      }
    }
    pack_2bit(L, y + kQ2_KQs);
  }
}

void quantize_q3_k_imatrix(const float* x /* (n) */, uint8_t* y, int64_t n, const float* qw /* (n) */) {
  int8_t L[kQK];
  int8_t Ls[16];
  float weight[16];
  float sw[16];
  float scales[16];
  for (int64_t b = 0; b < n / kQK; ++b, x += kQK, qw += kQK, y += kQ3_KBytes) {
    const float sigma2 = 2 * sum_squares(x, kQK) / kQK;
    for (int j = 0; j < 16; ++j) {
      imatrix_weights(16, x + 16 * j, qw + 16 * j, sigma2, weight);
      float sumw = 0;
      for (int l = 0; l < 16; ++l) sumw += weight[l];
      sw[j] = sumw;
      scales[j] = make_qx_quants_weighted(16, 4, x + 16 * j, L + 16 * j, weight);
    }
    // Signed 6-bit sub-block scales, themselves a weighted fit (levels offset by +32 in Ls).
    uint8_t* sc = y + kQ3_KScales;
    std::memset(sc, 0, 12);
    const float d_block = make_qx_quants_weighted(16, 32, scales, Ls, sw);
    for (int j = 0; j < 16; ++j) {
      const int l = Ls[j];
      if (j < 8) sc[j] = static_cast<uint8_t>(l & 0xF);
      else sc[j - 8] = static_cast<uint8_t>(sc[j - 8] | ((l & 0xF) << 4));
      sc[j % 4 + 8] = static_cast<uint8_t>(sc[j % 4 + 8] | ((l >> 4) << (2 * (j / 4))));
    }
    store_u16(y + kQ3_KD, fp32_to_fp16(d_block));
    const float d_all = fp16_to_fp32(load_u16(y + kQ3_KD));
    for (int j = 0; j < 16; ++j) {
      const float d = d_all * q3k_scale(j, sc);
      if (d == 0.0f) continue;
      for (int i = 0; i < 16; ++i) {
        const int l = nearest_int(x[16 * j + i] / d);
        L[16 * j + i] = static_cast<int8_t>(std::max(-4, std::min(3, l)) + 4);
      }
    }
    uint8_t* hmask = y;
    std::memset(hmask, 0, 32);
    for (int e = 0; e < kQK; ++e) {
      if (L[e] > 3) {
        hmask[e % 32] = static_cast<uint8_t>(hmask[e % 32] | (1 << (e / 32)));
        L[e] = static_cast<int8_t>(L[e] - 4);
      }
    }
    pack_2bit(L, y + kQ3_KQs);
  }
}

// The part Q4_K and Q5_K share: eight 32-element (scale, min) fits weighted by the importance, then the
// 6-bit scales Ls and mins Lm fitted by each sub-block's total weight. Returns the block's d and dmin.
void fit_k_subblocks(const float* x /* (256) */, const float* qw /* (256) */, int nmax, uint8_t* L /* (256) */,
                     uint8_t* Ls /* (8) */, uint8_t* Lm /* (8) */, float& d_block, float& m_block) {
  uint8_t laux[32];
  float weights[32];
  float sw[8];
  float mins[8];
  float scales[8];
  const float sigma2 = 2 * sum_squares(x, kQK) / kQK;
  for (int j = 0; j < 8; ++j) {
    imatrix_weights(32, x + 32 * j, qw + 32 * j, sigma2, weights);
    float sumw = 0;
    for (int l = 0; l < 32; ++l) sumw += weights[l];
    sw[j] = sumw;
    scales[j] = make_qkx3_quants(32, nmax, x + 32 * j, weights, L + 32 * j, mins[j], laux);
  }
  d_block = make_qp_quants(8, 63, scales, Ls, sw);
  m_block = make_qp_quants(8, 63, mins, Lm, sw);
}

// Packs the 6-bit scales and mins as q4k_scale_min reads them. Bytes 0..7 are written (j < 4) before
// their top bits are or-ed in, so no clearing is needed (ggml clears nothing either).
void pack_k_scales(const uint8_t* ls /* (8) */, const uint8_t* lm /* (8) */, uint8_t* sc /* (12) */) {
  for (int j = 0; j < 8; ++j) {
    if (j < 4) {
      sc[j] = ls[j];
      sc[j + 4] = lm[j];
    } else {
      sc[j + 4] = static_cast<uint8_t>((ls[j] & 0xF) | ((lm[j] & 0xF) << 4));
      sc[j - 4] = static_cast<uint8_t>(sc[j - 4] | ((ls[j] >> 4) << 6));
      sc[j] = static_cast<uint8_t>(sc[j] | ((lm[j] >> 4) << 6));
    }
  }
}

// Levels against the stored scales and mins (sub-blocks with scale 0 keep their fit's levels).
void requantize_k_subblocks(const float* x /* (256) */, float d_all, float m_all, const uint8_t* sc /* (12) */,
                            int nmax, uint8_t* L /* (256) */) {
  for (int j = 0; j < 8; ++j) {
    int s = 0, m = 0;
    q4k_scale_min(j, sc, s, m);
    const float d = d_all * s;
    if (d == 0.0f) continue;
    const float dm = m_all * m;
    for (int i = 0; i < 32; ++i) {
      const int l = nearest_int((x[32 * j + i] + dm) / d);
      L[32 * j + i] = static_cast<uint8_t>(std::max(0, std::min(nmax, l)));
    }
  }
}

void quantize_q4_k_imatrix(const float* x /* (n) */, uint8_t* y, int64_t n, const float* qw /* (n) */) {
  uint8_t L[kQK];
  uint8_t Ls[8], Lm[8];
  for (int64_t b = 0; b < n / kQK; ++b, x += kQK, qw += kQK, y += kQ4_KBytes) {
    float d_block = 0, m_block = 0;
    fit_k_subblocks(x, qw, 15, L, Ls, Lm, d_block, m_block);
    // Unlike Q5_K, ggml does not clamp Ls/Lm to 63 here (make_qp_quants keeps them in range anyway).
    pack_k_scales(Ls, Lm, y + kQ4_KScales);
    store_u16(y, fp32_to_fp16(d_block));
    store_u16(y + kQ4_KDmin, fp32_to_fp16(m_block));
    requantize_k_subblocks(x, fp16_to_fp32(load_u16(y)), fp16_to_fp32(load_u16(y + kQ4_KDmin)),
                           y + kQ4_KScales, 15, L);
    uint8_t* q = y + kQ4_KQs;
    for (int j = 0; j < kQK; j += 64, q += 32)
      for (int l = 0; l < 32; ++l) q[l] = static_cast<uint8_t>(L[j + l] | (L[j + l + 32] << 4));
  }
}

void quantize_q5_k_imatrix(const float* x /* (n) */, uint8_t* y, int64_t n, const float* qw /* (n) */) {
  uint8_t L[kQK];
  uint8_t Ls[8], Lm[8];
  for (int64_t b = 0; b < n / kQK; ++b, x += kQK, qw += kQK, y += kQ5_KBytes) {
    float d_block = 0, m_block = 0;
    fit_k_subblocks(x, qw, 31, L, Ls, Lm, d_block, m_block);
    for (int j = 0; j < 8; ++j) {
      Ls[j] = std::min<uint8_t>(63, Ls[j]);
      Lm[j] = std::min<uint8_t>(63, Lm[j]);
    }
    pack_k_scales(Ls, Lm, y + kQ5_KScales);
    store_u16(y, fp32_to_fp16(d_block));
    store_u16(y + kQ5_KDmin, fp32_to_fp16(m_block));
    requantize_k_subblocks(x, fp16_to_fp32(load_u16(y)), fp16_to_fp32(load_u16(y + kQ5_KDmin)),
                           y + kQ5_KScales, 31, L);
    uint8_t* qh = y + kQ5_KQh;
    uint8_t* ql = y + kQ5_KQs;
    std::memset(qh, 0, 32);
    for (int c = 0; c < 4; ++c, ql += 32) {  // 64-element chunks: sub-blocks 2c (low nibble), 2c+1 (high)
      for (int j = 0; j < 32; ++j) {
        int l1 = L[64 * c + j], l2 = L[64 * c + j + 32];
        if (l1 > 15) {
          l1 -= 16;
          qh[j] = static_cast<uint8_t>(qh[j] | (1 << (2 * c)));
        }
        if (l2 > 15) {
          l2 -= 16;
          qh[j] = static_cast<uint8_t>(qh[j] | (2 << (2 * c)));
        }
        ql[j] = static_cast<uint8_t>(l1 | (l2 << 4));
      }
    }
  }
}

// Q6_K weighs each sub-block fit by the raw importance (ggml's sigma2 term is commented out there); the
// 8-bit sub-block scales are then rounded as without an importance matrix.
void quantize_q6_k_imatrix(const float* x /* (n) */, uint8_t* y, int64_t n, const float* qw /* (n) */) {
  int8_t L[kQK];
  float scales[16];
  for (int64_t b = 0; b < n / kQK; ++b, x += kQK, qw += kQK, y += kQ6_KBytes) {
    float max_scale = 0, max_abs_scale = 0;
    for (int ib = 0; ib < 16; ++ib) {
      scales[ib] = make_qx_quants_weighted(16, 32, x + 16 * ib, L + 16 * ib, qw + 16 * ib);
      if (std::fabs(scales[ib]) > max_abs_scale) {
        max_abs_scale = std::fabs(scales[ib]);
        max_scale = scales[ib];
      }
    }
    std::memset(y, 0, kQ6_KBytes);
    if (max_abs_scale < kGroupMaxEps) continue;  // all-zero block: d = 0 and all bytes 0
    const float iscale = -128.f / max_scale;
    store_u16(y + kQ6_KD, fp32_to_fp16(1 / iscale));
    auto* sc = reinterpret_cast<int8_t*>(y + kQ6_KScales);
    for (int ib = 0; ib < 16; ++ib) sc[ib] = static_cast<int8_t>(std::min(127, nearest_int(iscale * scales[ib])));
    const float d_all = fp16_to_fp32(load_u16(y + kQ6_KD));
    for (int j = 0; j < 16; ++j) {
      const float d = d_all * sc[j];
      if (d == 0.0f) continue;
      for (int i = 0; i < 16; ++i) {
        const int l = nearest_int(x[16 * j + i] / d);
        L[16 * j + i] = static_cast<int8_t>(std::max(-32, std::min(31, l)) + 32);
      }
    }
    uint8_t* ql = y;
    uint8_t* qh = y + kQ6_KQh;
    for (int j = 0; j < kQK; j += 128, ql += 64, qh += 32) {
      for (int l = 0; l < 32; ++l) {
        const int q1 = L[j + l] & 0xF, q2 = L[j + l + 32] & 0xF;
        const int q3 = L[j + l + 64] & 0xF, q4 = L[j + l + 96] & 0xF;
        ql[l] = static_cast<uint8_t>(q1 | (q3 << 4));
        ql[l + 32] = static_cast<uint8_t>(q2 | (q4 << 4));
        qh[l] = static_cast<uint8_t>((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4) |
                                     ((L[j + l + 96] >> 4) << 6));
      }
    }
  }
}

// IQ4_NL: the group's scale search with the importance weights; sigma2 is the 32-element block's own
// mean square, doubled (the block is ggml's super-block here).
void quantize_iq4_nl_imatrix(const float* x /* (n) */, uint8_t* y, int64_t n, const float* qw /* (n) */) {
  float weight[kIQ4_NLBlock];
  for (int64_t b = 0; b < n / kIQ4_NLBlock; ++b, x += kIQ4_NLBlock, qw += kIQ4_NLBlock, y += kIQ4_NLBytes) {
    const float sigma2 = sum_squares(x, kIQ4_NLBlock) * (2.f / kIQ4_NLBlock);
    imatrix_weights(kIQ4_NLBlock, x, qw, sigma2, weight);
    const float scale = iq4_group_scale(x, weight);
    store_u16(y, fp32_to_fp16(scale));
    const float id = scale != 0.0f ? 1 / scale : 0;
    pack_iq4_group(x, id, y + kIQ4_NLQs);
  }
}

void quantize_iq4_xs_imatrix(const float* x /* (n) */, uint8_t* y, int64_t n, const float* qw /* (n) */) {
  float scales[8];
  float weight[32];
  for (int64_t b = 0; b < n / kQK; ++b, x += kQK, qw += kQK, y += kIQ4_XSBytes) {
    const float sigma2 = sum_squares(x, kQK) * (2.f / kQK);
    for (int ib = 0; ib < 8; ++ib) {
      imatrix_weights(32, x + 32 * ib, qw + 32 * ib, sigma2, weight);
      scales[ib] = iq4_group_scale(x + 32 * ib, weight);
    }
    store_iq4_xs_block(x, scales, y);
  }
}

}  // namespace

bool dequantize_basic(GgmlType type, const uint8_t* x, float* y, int64_t n) {
  switch (type) {
    case GgmlType::Q4_1: dequantize_q4_1(x, y, n); return true;
    case GgmlType::Q5_0: dequantize_q5_0(x, y, n); return true;
    case GgmlType::Q5_1: dequantize_q5_1(x, y, n); return true;
    case GgmlType::Q2_K: dequantize_q2_k(x, y, n); return true;
    case GgmlType::Q3_K: dequantize_q3_k(x, y, n); return true;
    case GgmlType::Q5_K: dequantize_q5_k(x, y, n); return true;
    case GgmlType::IQ4_NL: dequantize_iq4_nl(x, y, n); return true;
    case GgmlType::IQ4_XS: dequantize_iq4_xs(x, y, n); return true;
    case GgmlType::MXFP4: dequantize_mxfp4(x, y, n); return true;
    default: return false;
  }
}

bool quantize_basic(GgmlType type, const float* x, uint8_t* y, int64_t n) {
  switch (type) {
    case GgmlType::Q4_1: quantize_q4_1(x, y, n); return true;
    case GgmlType::Q5_0: quantize_q5_0(x, y, n); return true;
    case GgmlType::Q5_1: quantize_q5_1(x, y, n); return true;
    case GgmlType::Q2_K: quantize_q2_k(x, y, n); return true;
    case GgmlType::Q3_K: quantize_q3_k(x, y, n); return true;
    case GgmlType::Q5_K: quantize_q5_k(x, y, n); return true;
    case GgmlType::IQ4_NL: quantize_iq4_nl(x, y, n); return true;
    case GgmlType::IQ4_XS: quantize_iq4_xs(x, y, n); return true;
    case GgmlType::MXFP4: quantize_mxfp4(x, y, n); return true;
    default: return false;
  }
}

bool quantize_basic_imatrix(GgmlType type, const float* x, uint8_t* y, int64_t n, const float* imatrix) {
  switch (type) {
    case GgmlType::Q4_0: quantize_q4_0_imatrix(x, y, n, imatrix); return true;
    case GgmlType::Q4_1: quantize_q4_1_imatrix(x, y, n, imatrix); return true;
    case GgmlType::Q5_0: quantize_q5_0_imatrix(x, y, n, imatrix); return true;
    case GgmlType::Q5_1: quantize_q5_1_imatrix(x, y, n, imatrix); return true;
    case GgmlType::Q2_K: quantize_q2_k_imatrix(x, y, n, imatrix); return true;
    case GgmlType::Q3_K: quantize_q3_k_imatrix(x, y, n, imatrix); return true;
    case GgmlType::Q4_K: quantize_q4_k_imatrix(x, y, n, imatrix); return true;
    case GgmlType::Q5_K: quantize_q5_k_imatrix(x, y, n, imatrix); return true;
    case GgmlType::Q6_K: quantize_q6_k_imatrix(x, y, n, imatrix); return true;
    case GgmlType::IQ4_NL: quantize_iq4_nl_imatrix(x, y, n, imatrix); return true;
    case GgmlType::IQ4_XS: quantize_iq4_xs_imatrix(x, y, n, imatrix); return true;
    // ggml's quantize_q8_0 and quantize_mxfp4 ignore the importance matrix: the plain reference path.
    case GgmlType::Q8_0:
    case GgmlType::MXFP4: quantize_row(type, x, y, n); return true;
    default: return false;
  }
}

}  // namespace shardlm::quant_detail
