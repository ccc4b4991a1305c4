// fp16/bf16 conversions and the reference quantizers/dequantizers. The quantizers follow ggml's
// *_ref algorithms operation by operation (same float evaluation order, nearest_int rounding), because
// byte-identical output is the point: a file we write must decode exactly like llama.cpp's.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>

#include "core/error.h"
#include "quant/blocks.h"
#include "quant/codecs.h"
#include "quant/kernels.h"
#include "quant/quant.h"

namespace shardlm {

using namespace quant_detail;

uint16_t fp32_to_fp16(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return sign | 0x7e00u;  // NaN: quiet, sign kept (as ggml's FP16 conversion)
  if (ax >= 0x47800000u) return sign | 0x7c00u;  // >= 65536 (or inf): overflows to inf
  if (ax < 0x38800000u) {
    // Below 2^-14 the result is subnormal: adding 0.5f puts the fp16 ulp (2^-24) at the float's last
    // mantissa bit, so the FPU's own round-to-nearest-even does the rounding.
    const float r = std::bit_cast<float>(ax) + 0.5f;
    return sign | static_cast<uint16_t>(std::bit_cast<uint32_t>(r) - 0x3f000000u);
  }
  // Normal: rebias the exponent and round the 13 dropped bits to nearest even; a carry out of the
  // mantissa correctly bumps the exponent, up to inf for values >= 65520.
  const uint32_t odd = (ax >> 13) & 1u;
  const uint32_t r = (ax + 0xc8000fffu + odd) >> 13;  // 0xc8000000 = (15 - 127) << 23 (mod 2^32)
  return sign | static_cast<uint16_t>(std::min<uint32_t>(r, 0x7c00u));
}

float fp16_to_fp32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    // Zero or subnormal: mant * 2^-24 is exact in float.
    const float v = std::ldexp(static_cast<float>(mant), -24);
    return sign ? -v : v;
  }
  if (exp == 31) return std::bit_cast<float>(sign | 0x7f800000u | (mant << 13));
  return std::bit_cast<float>(sign | ((exp + 112u) << 23) | (mant << 13));
}

uint16_t fp32_to_bf16(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 64u);  // quiet NaN
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

float bf16_to_fp32(uint16_t h) { return std::bit_cast<float>(static_cast<uint32_t>(h) << 16); }

namespace {

constexpr float kGroupMaxEps = 1e-15f;

void quantize_q8_0(const float* x /* (n) */, uint8_t* y, int64_t n) {
  for (int64_t b = 0; b < n / kQ8_0Block; ++b, x += kQ8_0Block, y += kQ8_0Bytes) {
    float amax = 0.0f;
    for (int j = 0; j < kQ8_0Block; ++j) amax = std::max(amax, std::fabs(x[j]));
    const float d = amax / 127;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    store_u16(y, fp32_to_fp16(d));
    for (int j = 0; j < kQ8_0Block; ++j)
      y[kQ8_0Qs + j] = static_cast<uint8_t>(static_cast<int8_t>(std::round(x[j] * id)));
  }
}

void quantize_q4_0(const float* x /* (n) */, uint8_t* y, int64_t n) {
  for (int64_t b = 0; b < n / kQ4_0Block; ++b, x += kQ4_0Block, y += kQ4_0Bytes) {
    // The signed extreme maps to -8 so the full 16-level range is used on the side that needs it.
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < kQ4_0Block; ++j) {
      if (amax < std::fabs(x[j])) {
        amax = std::fabs(x[j]);
        max = x[j];
      }
    }
    const float d = max / -8;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    store_u16(y, fp32_to_fp16(d));
    for (int j = 0; j < 16; ++j) {
      // Truncation after +8.5 is ggml's rounding; values are >= 0 here, so it rounds half up.
      const int q0 = std::min(15, static_cast<int>(static_cast<int8_t>(x[j] * id + 8.5f)));
      const int q1 = std::min(15, static_cast<int>(static_cast<int8_t>(x[j + 16] * id + 8.5f)));
      y[kQ4_0Qs + j] = static_cast<uint8_t>(q0 | (q1 << 4));
    }
  }
}

void quantize_q4_k(const float* x /* (n) */, uint8_t* y, int64_t n) {
  uint8_t L[kQK];
  uint8_t laux[32];
  float weights[32];
  float mins[8];
  float scales[8];
  for (int64_t b = 0; b < n / kQK; ++b, x += kQK, y += kQ4_KBytes) {
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < 8; ++j) {
      float sum_x2 = 0;
      for (int l = 0; l < 32; ++l) sum_x2 += x[32 * j + l] * x[32 * j + l];
      const float av_x = std::sqrt(sum_x2 / 32);
      for (int l = 0; l < 32; ++l) weights[l] = av_x + std::fabs(x[32 * j + l]);
      scales[j] = make_qkx2_quants(32, 15, x + 32 * j, weights, L + 32 * j, mins[j], laux, -1.f, 0.1f, 20, false);
      max_scale = std::max(max_scale, scales[j]);
      max_min = std::max(max_min, mins[j]);
    }
    const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    uint8_t* sc = y + kQ4_KScales;
    std::memset(sc, 0, 12);
    for (int j = 0; j < 8; ++j) {
      // uint8_t truncation before the clamp mirrors ggml (values are in [0, 63.5] anyway).
      const uint8_t ls = std::min<uint8_t>(63, static_cast<uint8_t>(nearest_int(inv_scale * scales[j])));
      const uint8_t lm = std::min<uint8_t>(63, static_cast<uint8_t>(nearest_int(inv_min * mins[j])));
      if (j < 4) {
        sc[j] = ls;
        sc[j + 4] = lm;
      } else {
        sc[j + 4] = static_cast<uint8_t>((ls & 0xF) | ((lm & 0xF) << 4));
        sc[j - 4] |= static_cast<uint8_t>((ls >> 4) << 6);
        sc[j] |= static_cast<uint8_t>((lm >> 4) << 6);
      }
    }
    store_u16(y, fp32_to_fp16(max_scale / 63.f));
    store_u16(y + kQ4_KDmin, fp32_to_fp16(max_min / 63.f));
    // Requantize against the rounded 6-bit scales actually stored, as ggml does.
    const float d_all = fp16_to_fp32(load_u16(y));
    const float m_all = fp16_to_fp32(load_u16(y + kQ4_KDmin));
    for (int j = 0; j < 8; ++j) {
      int s = 0, m = 0;
      q4k_scale_min(j, sc, s, m);
      const float d = d_all * s;
      if (d == 0.0f) continue;
      const float dm = m_all * m;
      for (int i = 0; i < 32; ++i) {
        const int l = nearest_int((x[32 * j + i] + dm) / d);
        L[32 * j + i] = static_cast<uint8_t>(std::max(0, std::min(15, l)));
      }
    }
    uint8_t* q = y + kQ4_KQs;
    for (int j = 0; j < kQK; j += 64, q += 32)
      for (int l = 0; l < 32; ++l) q[l] = static_cast<uint8_t>(L[j + l] | (L[j + l + 32] << 4));
  }
}

// ggml's make_qx_quants with rmse_type 1 and no importance weights: symmetric fit to [-nmax, nmax-1]
// weighted by x^2, trying 18 scales around amax/nmax.
float make_qx_quants(int n, int nmax, const float* x, int8_t* L) {
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
    const float w = x[i] * x[i];
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
      const float w = x[i] * x[i];
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

void quantize_q6_k(const float* x /* (n) */, uint8_t* y, int64_t n) {
  int8_t L[kQK];
  float scales[16];
  for (int64_t b = 0; b < n / kQK; ++b, x += kQK, y += kQ6_KBytes) {
    float max_scale = 0, max_abs_scale = 0;
    for (int ib = 0; ib < 16; ++ib) {
      scales[ib] = make_qx_quants(16, 32, x + 16 * ib, L + 16 * ib);
      if (std::fabs(scales[ib]) > max_abs_scale) {
        max_abs_scale = std::fabs(scales[ib]);
        max_scale = scales[ib];
      }
    }
    std::memset(y, 0, kQ6_KBytes);
    if (max_abs_scale < kGroupMaxEps) continue;  // all-zero block: d = 0 and all bytes 0
    const float iscale = -128.f / max_scale;
    store_u16(y + kQ6_KD, fp32_to_fp16(1 / iscale));
    int8_t* sc = reinterpret_cast<int8_t*>(y + kQ6_KScales);
    for (int ib = 0; ib < 16; ++ib)
      sc[ib] = static_cast<int8_t>(std::min(127, nearest_int(iscale * scales[ib])));
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
        qh[l] = static_cast<uint8_t>((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) |
                                     ((L[j + l + 64] >> 4) << 4) | ((L[j + l + 96] >> 4) << 6));
      }
    }
  }
}

void check_row(GgmlType type, const void* p, const char* what, int64_t n) {
  const TypeTraits& tr = type_traits(type);
  if (!tr.compute)
    fail_kind(ErrorKind::kUnsupported, "type ", tr.name, " has no quantize/dequantize implementation");
  row_bytes(type, n);  // throws on negative n or n not a multiple of the block size
  if (n > 0 && p == nullptr) fail(what, " is null for a row of ", n, " elements");
}

}  // namespace

bool can_quantize(GgmlType type) {
  if (!type_traits(type).compute) return false;
  switch (type) {
    case GgmlType::IQ2_XXS: case GgmlType::IQ2_XS: case GgmlType::IQ1_S: case GgmlType::IQ1_M:
      return false;  // need an importance matrix
    default: return true;
  }
}

void quantize_row(GgmlType type, const float* src /* (n) */, void* dst, int64_t n) {
  check_row(type, dst, "quantize_row destination", n);
  if (n > 0 && src == nullptr) fail("quantize_row source is null for a row of ", n, " elements");
  auto* y = static_cast<uint8_t*>(dst);
  switch (type) {
    case GgmlType::F32: std::memcpy(y, src, static_cast<size_t>(n) * 4); return;
    case GgmlType::F16:
      for (int64_t i = 0; i < n; ++i) store_u16(y + 2 * i, fp32_to_fp16(src[i]));
      return;
    case GgmlType::BF16:
      for (int64_t i = 0; i < n; ++i) store_u16(y + 2 * i, fp32_to_bf16(src[i]));
      return;
    case GgmlType::Q8_0: quantize_q8_0(src, y, n); return;
    case GgmlType::Q4_0: quantize_q4_0(src, y, n); return;
    case GgmlType::Q4_K: quantize_q4_k(src, y, n); return;
    case GgmlType::Q6_K: quantize_q6_k(src, y, n); return;
    default: break;
  }
  if (quantize_basic(type, src, y, n) || quantize_iq(type, src, y, n)) return;
  fail_kind(ErrorKind::kUnsupported, "type ", type_name(type),
            " cannot be written without an importance matrix (llama-quantize refuses it too)");
}

void quantize_row_imatrix(GgmlType type, const float* src /* (n) */, void* dst, int64_t n,
                          const float* imatrix /* (n) */) {
  check_row(type, dst, "quantize_row_imatrix destination", n);
  if (n > 0 && src == nullptr) fail("quantize_row_imatrix source is null for a row of ", n, " elements");
  if (n > 0 && imatrix == nullptr) fail("quantize_row_imatrix: the importance matrix is null");
  if (type == GgmlType::F32 || type == GgmlType::F16 || type == GgmlType::BF16)
    fail("quantize_row_imatrix: ", type_name(type), " is not a quantized type");
  auto* y = static_cast<uint8_t*>(dst);
  if (quantize_basic_imatrix(type, src, y, n, imatrix) || quantize_iq_imatrix(type, src, y, n, imatrix)) return;
  fail_kind(ErrorKind::kUnsupported, "type ", type_name(type), " has no importance-matrix quantizer");
}

namespace {

// dequantize_row after its checks.
void dequantize_checked(GgmlType type, const uint8_t* x, float* dst /* (n) */, int64_t n) {
  switch (type) {
    case GgmlType::F32: std::memcpy(dst, x, static_cast<size_t>(n) * 4); return;
    case GgmlType::F16:
      // The CPU's own conversion where the avx2 family runs (exact, so the same values): attention reads every
      // f16 KV row through here.
      if (cpu_isa() != CpuIsa::kScalar) return quant_detail::convert_halves_avx2(type, x, dst, n);
      for (int64_t i = 0; i < n; ++i) dst[i] = fp16_to_fp32(load_u16(x + 2 * i));
      return;
    case GgmlType::BF16:
      if (cpu_isa() != CpuIsa::kScalar) return quant_detail::convert_halves_avx2(type, x, dst, n);
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_fp32(load_u16(x + 2 * i));
      return;
    case GgmlType::Q8_0:
      for (int64_t b = 0; b < n / kQ8_0Block; ++b, x += kQ8_0Bytes, dst += kQ8_0Block) {
        const float d = fp16_to_fp32(load_u16(x));
        for (int j = 0; j < kQ8_0Block; ++j) dst[j] = static_cast<int8_t>(x[kQ8_0Qs + j]) * d;
      }
      return;
    case GgmlType::Q4_0:
      for (int64_t b = 0; b < n / kQ4_0Block; ++b, x += kQ4_0Bytes, dst += kQ4_0Block) {
        const float d = fp16_to_fp32(load_u16(x));
        for (int j = 0; j < 16; ++j) {
          dst[j] = ((x[kQ4_0Qs + j] & 0xF) - 8) * d;
          dst[j + 16] = ((x[kQ4_0Qs + j] >> 4) - 8) * d;
        }
      }
      return;
    case GgmlType::Q4_K:
      for (int64_t b = 0; b < n / kQK; ++b, x += kQ4_KBytes) {
        const float d = fp16_to_fp32(load_u16(x));
        const float dmin = fp16_to_fp32(load_u16(x + kQ4_KDmin));
        const uint8_t* q = x + kQ4_KQs;
        for (int j = 0; j < 8; j += 2, q += 32) {
          int s0, m0, s1, m1;
          q4k_scale_min(j, x + kQ4_KScales, s0, m0);
          q4k_scale_min(j + 1, x + kQ4_KScales, s1, m1);
          const float d0 = d * s0, min0 = dmin * m0, d1 = d * s1, min1 = dmin * m1;
          for (int l = 0; l < 32; ++l) *dst++ = d0 * (q[l] & 0xF) - min0;
          for (int l = 0; l < 32; ++l) *dst++ = d1 * (q[l] >> 4) - min1;
        }
      }
      return;
    case GgmlType::Q6_K:
      for (int64_t b = 0; b < n / kQK; ++b, x += kQ6_KBytes) {
        const float d = fp16_to_fp32(load_u16(x + kQ6_KD));
        const uint8_t* ql = x;
        const uint8_t* qh = x + kQ6_KQh;
        const auto* sc = reinterpret_cast<const int8_t*>(x + kQ6_KScales);
        for (int g = 0; g < 2; ++g, ql += 64, qh += 32, sc += 8, dst += 128) {
          for (int l = 0; l < 32; ++l) {
            const int is = l / 16;
            const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
            const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
            const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            dst[l] = d * sc[is] * q1;
            dst[l + 32] = d * sc[is + 2] * q2;
            dst[l + 64] = d * sc[is + 4] * q3;
            dst[l + 96] = d * sc[is + 6] * q4;
          }
        }
      }
      return;
    default: break;
  }
  if (dequantize_basic(type, x, dst, n) || dequantize_iq(type, x, dst, n)) return;
  SHARDLM_CHECK(false, "unhandled type ", type_name(type));
}

}  // namespace

void dequantize_row(GgmlType type, const void* src, float* dst /* (n) */, int64_t n) {
  check_row(type, src, "dequantize_row source", n);
  if (n > 0 && dst == nullptr) fail("dequantize_row destination is null for a row of ", n, " elements");
  dequantize_checked(type, static_cast<const uint8_t*>(src), dst, n);
}

void dequantize_rows(GgmlType type, const void* src, size_t stride, int64_t n_rows, int64_t n, float* dst,
                     int64_t ldd) {
  check_row(type, src, "dequantize_rows source", n);
  if (n_rows < 0 || ldd < n || stride < static_cast<size_t>(row_bytes(type, n)))
    fail("dequantize_rows: ", n_rows, " rows of ", n, " elements, source stride ", stride, " bytes, destination ",
         ldd, " floats apart");
  if (n_rows > 0 && n > 0 && dst == nullptr) fail("dequantize_rows destination is null");
  const auto* x = static_cast<const uint8_t*>(src);
  for (int64_t r = 0; r < n_rows; ++r) dequantize_checked(type, x + static_cast<size_t>(r) * stride, dst + r * ldd, n);
}

}  // namespace shardlm
