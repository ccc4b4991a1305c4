// Block formats against hand-computed values: fp16/bf16 bit patterns, blocks built byte by byte from the
// layout description (independent of our quantizer), quantize->dequantize error bounds, and validation.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "core/error.h"
#include "quant/quant.h"

namespace shardlm {
namespace {

std::vector<float> random_floats(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (auto& f : v) f = dist(rng);
  return v;
}

uint32_t bits(float f) { return std::bit_cast<uint32_t>(f); }

TEST(Fp16, KnownBitPatterns) {
  EXPECT_EQ(fp32_to_fp16(1.0f), 0x3C00);
  EXPECT_EQ(fp32_to_fp16(-2.0f), 0xC000);
  EXPECT_EQ(fp32_to_fp16(0.0f), 0x0000);
  EXPECT_EQ(fp32_to_fp16(-0.0f), 0x8000);
  EXPECT_EQ(fp32_to_fp16(65504.0f), 0x7BFF);            // largest finite
  EXPECT_EQ(fp32_to_fp16(65519.0f), 0x7BFF);            // below the halfway point to 65536
  EXPECT_EQ(fp32_to_fp16(65520.0f), 0x7C00);            // halfway to 2^16 rounds (to even) up to inf
  EXPECT_EQ(fp32_to_fp16(1e10f), 0x7C00);
  EXPECT_EQ(fp32_to_fp16(std::ldexp(1.0f, -14)), 0x0400);  // smallest normal
  EXPECT_EQ(fp32_to_fp16(std::ldexp(1.0f, -24)), 0x0001);  // smallest subnormal
  EXPECT_EQ(fp32_to_fp16(std::ldexp(1.0f, -25)), 0x0000);  // exactly half of it: tie to even (0)
  EXPECT_EQ(fp32_to_fp16(std::ldexp(3.0f, -25)), 0x0002);  // 1.5 ulp: tie to even (2)
  EXPECT_EQ(fp32_to_fp16(std::ldexp(1.0f, -25) * 1.0001f), 0x0001);  // just above half rounds up
  EXPECT_EQ(fp32_to_fp16(std::ldexp(1023.0f, -24)), 0x03FF);  // largest subnormal
  // Ties in the normal range: 1 + 2^-11 is halfway between 1 and 1 + 2^-10 -> even (1.0);
  // 1 + 3*2^-11 is halfway between 1+2^-10 (odd) and 1+2^-9 (even) -> up.
  EXPECT_EQ(fp32_to_fp16(1.0f + std::ldexp(1.0f, -11)), 0x3C00);
  EXPECT_EQ(fp32_to_fp16(1.0f + std::ldexp(3.0f, -11)), 0x3C02);
  EXPECT_EQ(fp32_to_fp16(std::numeric_limits<float>::infinity()), 0x7C00);
  EXPECT_EQ(fp32_to_fp16(-std::numeric_limits<float>::infinity()), 0xFC00);
  const uint16_t nan = fp32_to_fp16(std::numeric_limits<float>::quiet_NaN());
  EXPECT_EQ(nan & 0x7C00, 0x7C00);
  EXPECT_NE(nan & 0x03FF, 0);
  // A signalling NaN whose payload sits only in the dropped low bits must stay NaN, not become inf.
  EXPECT_NE(fp32_to_fp16(std::bit_cast<float>(0x7F800001u)) & 0x03FF, 0);

  EXPECT_EQ(fp16_to_fp32(0x3C00), 1.0f);
  EXPECT_EQ(fp16_to_fp32(0x7BFF), 65504.0f);
  EXPECT_EQ(fp16_to_fp32(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(fp16_to_fp32(0x83FF), -std::ldexp(1023.0f, -24));
  EXPECT_EQ(bits(fp16_to_fp32(0x8000)), 0x80000000u);
  EXPECT_EQ(fp16_to_fp32(0xFC00), -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(fp16_to_fp32(0x7E00)));
  EXPECT_TRUE(std::isnan(fp16_to_fp32(0x7C01)));
}

TEST(Fp16, AllValuesRoundTrip) {
  // Every fp16 value is exactly representable in fp32, so fp16 -> fp32 -> fp16 must be the identity.
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = fp16_to_fp32(static_cast<uint16_t>(h));
    if (std::isnan(f)) continue;
    ASSERT_EQ(fp32_to_fp16(f), h) << "h=0x" << std::hex << h;
  }
}

TEST(Bf16, KnownBitPatterns) {
  EXPECT_EQ(fp32_to_bf16(1.0f), 0x3F80);
  EXPECT_EQ(fp32_to_bf16(-2.0f), 0xC000);
  EXPECT_EQ(fp32_to_bf16(std::bit_cast<float>(0x3F808000u)), 0x3F80);  // tie, even below: down
  EXPECT_EQ(fp32_to_bf16(std::bit_cast<float>(0x3F818000u)), 0x3F82);  // tie, odd below: up
  EXPECT_EQ(fp32_to_bf16(std::bit_cast<float>(0x3F808001u)), 0x3F81);  // above the tie: up
  EXPECT_EQ(fp32_to_bf16(std::bit_cast<float>(0x00010000u)), 0x0001);  // subnormal kept
  EXPECT_EQ(fp32_to_bf16(std::bit_cast<float>(0x7F7FFFFFu)), 0x7F80);  // max float rounds to inf
  EXPECT_EQ(fp32_to_bf16(std::numeric_limits<float>::infinity()), 0x7F80);
  EXPECT_EQ(fp32_to_bf16(-std::numeric_limits<float>::infinity()), 0xFF80);
  // NaN whose payload is only in the low 16 bits: must stay NaN (forced quiet), not round to inf.
  EXPECT_EQ(fp32_to_bf16(std::bit_cast<float>(0x7F800001u)), 0x7FC0);
  EXPECT_EQ(bf16_to_fp32(0x3F80), 1.0f);
  EXPECT_EQ(bits(bf16_to_fp32(0xC049)), 0xC0490000u);
  EXPECT_TRUE(std::isnan(bf16_to_fp32(0x7FC0)));
}

void put16(std::vector<uint8_t>& b, size_t off, uint16_t v) {
  b[off] = static_cast<uint8_t>(v & 0xFF);
  b[off + 1] = static_cast<uint8_t>(v >> 8);
}

TEST(HandBlocks, Q4_0) {
  // d = 0.5 (fp16 0x3800); byte j holds nibble j (low, element j) and 15 - j (high, element j + 16).
  std::vector<uint8_t> b(18);
  put16(b, 0, 0x3800);
  for (int j = 0; j < 16; ++j) b[2 + j] = static_cast<uint8_t>(j | ((15 - j) << 4));
  float out[32];
  dequantize_row(GgmlType::Q4_0, b.data(), out, 32);
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(out[j], (j - 8) * 0.5f) << j;
    EXPECT_EQ(out[j + 16], (7 - j) * 0.5f) << j + 16;
  }
}

TEST(HandBlocks, Q8_0) {
  // d = -0.25 (fp16 0xB400), qs[j] = j - 16 for j in 0..31.
  std::vector<uint8_t> b(34);
  put16(b, 0, 0xB400);
  for (int j = 0; j < 32; ++j) b[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(j - 16));
  float out[32];
  dequantize_row(GgmlType::Q8_0, b.data(), out, 32);
  for (int j = 0; j < 32; ++j) EXPECT_EQ(out[j], (j - 16) * -0.25f) << j;
}

TEST(HandBlocks, Q4_K) {
  // d = 2^-4, dmin = 2^-3. Sub-block s gets the 6-bit scale sc[s] = 7s + 13 and the 6-bit
  // min m[s] = 60 - 5s; the packing is written out from the layout description: bytes 0..3 hold the
  // low 6 bits of sc[0..3] and bytes 4..7 those of m[0..3]; bytes 8..11 hold sc[4..7] low nibble |
  // m[4..7] low nibble << 4, and the top two bits of sc[4..7] / m[4..7] go into bits 6..7 of bytes
  // 0..3 / 4..7.
  int sc[8], mn[8];
  for (int s = 0; s < 8; ++s) {
    sc[s] = 7 * s + 13;  // 13..62, exercises the high bits for s >= 4 (41, 48, 55, 62)
    mn[s] = 60 - 5 * s;  // 60..25
  }
  std::vector<uint8_t> b(144);
  put16(b, 0, 0x2C00);  // 2^-4
  put16(b, 2, 0x3000);  // 2^-3
  for (int s = 0; s < 4; ++s) {
    b[4 + s] = static_cast<uint8_t>(sc[s] | ((sc[s + 4] >> 4) << 6));
    b[8 + s] = static_cast<uint8_t>(mn[s] | ((mn[s + 4] >> 4) << 6));
    b[12 + s] = static_cast<uint8_t>((sc[s + 4] & 0xF) | ((mn[s + 4] & 0xF) << 4));
  }
  // Element e of the super-block: chunk c = e / 64, lane l = e % 32, high nibble when e % 64 >= 32.
  // Quant value q(e) = (e * 7) % 16.
  for (int e = 0; e < 256; ++e) {
    const int q = (e * 7) % 16;
    const int byte = 16 + (e / 64) * 32 + (e % 32);
    b[byte] = static_cast<uint8_t>(b[byte] | (e % 64 >= 32 ? q << 4 : q));
  }
  float out[256];
  dequantize_row(GgmlType::Q4_K, b.data(), out, 256);
  for (int e = 0; e < 256; ++e) {
    const int s = e / 32;
    const double want = 0.0625 * sc[s] * ((e * 7) % 16) - 0.125 * mn[s];
    EXPECT_EQ(out[e], static_cast<float>(want)) << "element " << e;
  }
}

TEST(HandBlocks, Q6_K) {
  // Element e: half h = e / 128, k = (e % 128) / 32 (which quarter), l = e % 32. Its 6-bit quant
  // q(e) = (e * 5 + 3) % 64 has the low 4 bits in ql[h*64 + (k & 1)*32 + l] (low nibble for k < 2,
  // high nibble for k >= 2) and the top 2 bits in qh[h*32 + l] at bits 2k..2k+1. Scale index is
  // e / 16 (16 signed 8-bit scales); d is the last field. value = d * scale * (q - 32).
  std::vector<uint8_t> b(210);
  for (int e = 0; e < 256; ++e) {
    const int q = (e * 5 + 3) % 64;
    const int h = e / 128, k = (e % 128) / 32, l = e % 32;
    uint8_t& ql = b[h * 64 + (k & 1) * 32 + l];
    ql = static_cast<uint8_t>(ql | ((q & 0xF) << (k >= 2 ? 4 : 0)));
    uint8_t& qh = b[128 + h * 32 + l];
    qh = static_cast<uint8_t>(qh | ((q >> 4) << (2 * k)));
  }
  int scales[16];
  for (int i = 0; i < 16; ++i) {
    scales[i] = (i % 2 ? -1 : 1) * (i * 8 + 1);  // mixed signs, up to +-121
    b[192 + i] = static_cast<uint8_t>(static_cast<int8_t>(scales[i]));
  }
  put16(b, 208, 0x2400);  // d = 2^-6
  float out[256];
  dequantize_row(GgmlType::Q6_K, b.data(), out, 256);
  for (int e = 0; e < 256; ++e) {
    const double want = 0.015625 * scales[e / 16] * ((e * 5 + 3) % 64 - 32);
    EXPECT_EQ(out[e], static_cast<float>(want)) << "element " << e;
  }
}

TEST(HandBlocks, F16AndBf16Rows) {
  const std::vector<uint8_t> h = {0x00, 0x3C, 0x00, 0xC0, 0xFF, 0x7B, 0x01, 0x00};
  float out[4];
  dequantize_row(GgmlType::F16, h.data(), out, 4);
  EXPECT_EQ(out[0], 1.0f);
  EXPECT_EQ(out[1], -2.0f);
  EXPECT_EQ(out[2], 65504.0f);
  EXPECT_EQ(out[3], std::ldexp(1.0f, -24));
  dequantize_row(GgmlType::BF16, h.data(), out, 4);
  EXPECT_EQ(out[0], bf16_to_fp32(0x3C00));
  EXPECT_EQ(bits(out[1]), 0xC0000000u);
}

// Q4_0 quantizer on a hand-picked block: amax element -4 gives d = 0.5 and that element maps to q=0;
// 4 maps to (8 / -1 ... ) clamp: x*id = 4 / 0.5 = 8 -> 8 + 8.5 = 16 -> clamped to 15.
TEST(Quantize, Q4_0HandBlock) {
  float x[32];
  for (int j = 0; j < 32; ++j) x[j] = 0.25f * static_cast<float>((j % 9) - 4);  // -1 .. 1
  x[5] = -4.0f;
  x[20] = 4.0f;
  uint8_t b[18];
  quantize_row(GgmlType::Q4_0, x, b, 32);
  EXPECT_EQ(b[0] | (b[1] << 8), 0x3800);  // d = -4 / -8 = 0.5
  EXPECT_EQ(b[2 + 5] & 0xF, 0);           // -4 / 0.5 = -8 -> q = 0
  EXPECT_EQ(b[2 + 4] >> 4, 15);           // element 20: +8 clamps to 15
  // x = 0.5 -> 1 + 8.5 = 9.5 -> 9.
  EXPECT_EQ(b[2 + 6] & 0xF, 9);  // x[6] = 0.25*(6-4) = 0.5
}

struct RoundTripCase {
  GgmlType type;
  int64_t n;
};

// Per-type error bounds, measured per block against that block's own scale so they hold for any input:
// - F32 exact; F16 half an ulp (2^-11 relative) or 2^-25 in the subnormal range; BF16 2^-8 relative.
// - Q8_0: round to nearest step d = amax/127: |e| <= d/2, plus |q|<=127 times the fp16 error of d
//   (2^-11 d) -> 0.57 d.
// - Q4_0: step |d| = amax/8; the element of opposite sign to the extreme can sit at +8 steps and is
//   clamped to +7, so the bound is one full step (plus the fp16 rounding of d) -> 1.01 |d|.
// - Q4_K: 15 steps over each sub-block's [min, max]; the 6-bit rounding of scale and min and the clamp
//   to [0, 15] can cost up to about one full step of the super-block range -> range/15.
// - Q6_K: symmetric 6-bit steps with 8-bit scales relative to the largest: one step of amax/32.
// RMS bounds catch a systematically wrong (but bounded) quantizer: for Gaussian data the ideal uniform
// quantizer gives step/sqrt(12); we allow about 1.5x that.
double max_abs(const float* x, int64_t n) {
  double m = 0;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, std::fabs(static_cast<double>(x[i])));
  return m;
}

TEST(Quantize, RoundTripWithinBounds) {
  for (GgmlType type : {GgmlType::F32, GgmlType::F16, GgmlType::BF16, GgmlType::Q8_0, GgmlType::Q4_0,
                        GgmlType::Q4_K, GgmlType::Q6_K}) {
    const int64_t n = 4096;
    const auto x = random_floats(n, 1234, 0.7f);
    std::vector<uint8_t> q(static_cast<size_t>(row_bytes(type, n)));
    std::vector<float> r(n);
    quantize_row(type, x.data(), q.data(), n);
    dequantize_row(type, q.data(), r.data(), n);
    const int64_t bs = std::max<int64_t>(block_size(type), 32);
    double worst_share = 0, sum_e2 = 0, sum_x2 = 0;
    int64_t worst_i = -1;
    for (int64_t b0 = 0; b0 < n; b0 += bs) {
      const double amax = max_abs(x.data() + b0, bs);
      double lo = x[b0], hi = x[b0];
      for (int64_t i = b0; i < b0 + bs; ++i) lo = std::min<double>(lo, x[i]), hi = std::max<double>(hi, x[i]);
      for (int64_t i = b0; i < b0 + bs; ++i) {
        const double xi = x[i], e = std::fabs(static_cast<double>(r[i]) - xi);
        double bound = 0;
        switch (type) {
          case GgmlType::F32: bound = 0; break;
          case GgmlType::F16: bound = std::ldexp(std::fabs(xi), -11) + std::ldexp(1.0, -25); break;
          case GgmlType::BF16: bound = std::ldexp(std::fabs(xi), -8); break;
          case GgmlType::Q8_0: bound = 0.57 * amax / 127; break;
          case GgmlType::Q4_0: bound = 1.01 * amax / 8; break;
          case GgmlType::Q4_K: bound = (hi - std::min(lo, 0.0)) / 15; break;
          case GgmlType::Q6_K: bound = amax / 32; break;
          default: FAIL();
        }
        const double share = bound > 0 ? e / bound : (e > 0 ? 1e30 : 0);
        if (share > worst_share) worst_share = share, worst_i = i;
        sum_e2 += e * e;
        sum_x2 += xi * xi;
      }
    }
    EXPECT_LE(worst_share, 1.0) << type_name(type) << ": worst element " << worst_i << " x="
                                << x[worst_i] << " got " << r[worst_i] << " uses " << worst_share
                                << " of its bound";
    // Relative RMS error: ideal-quantizer estimates for N(0, s): Q8_0 ~0.006, Q4_0 ~0.09,
    // Q4_K ~0.07, Q6_K ~0.02; the limits allow 1.5x.
    const double rel_rms = std::sqrt(sum_e2 / sum_x2);
    double rms_limit = 0;
    switch (type) {
      case GgmlType::F32: rms_limit = 0; break;
      case GgmlType::F16: rms_limit = 3e-4; break;
      case GgmlType::BF16: rms_limit = 3e-3; break;
      case GgmlType::Q8_0: rms_limit = 0.009; break;
      case GgmlType::Q4_0: rms_limit = 0.135; break;
      case GgmlType::Q4_K: rms_limit = 0.105; break;
      case GgmlType::Q6_K: rms_limit = 0.03; break;
      default: FAIL();
    }
    EXPECT_LE(rel_rms, rms_limit) << type_name(type);
    std::printf("%-5s relative RMS error %.5f (limit %.5f), worst element uses %.2f of its bound\n",
                type_name(type), rel_rms, rms_limit, worst_share);
  }
}

TEST(Quantize, ZeroAndConstantBlocks) {
  // All-zero input must decode to exact zeros (ggml writes d = 0 and no NaN from 0/0).
  for (GgmlType type : {GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_K, GgmlType::Q6_K}) {
    std::vector<float> x(256, 0.0f), r(256, 1.0f);
    std::vector<uint8_t> q(static_cast<size_t>(row_bytes(type, 256)));
    quantize_row(type, x.data(), q.data(), 256);
    dequantize_row(type, q.data(), r.data(), 256);
    for (int i = 0; i < 256; ++i) ASSERT_EQ(r[i], 0.0f) << type_name(type) << " element " << i;
  }
}

TEST(Quantize, Q6_KExtremeElementKeepsItsValue) {
  // The stored d of Q6_K is -max_scale/128 where max_scale is the signed largest sub-block scale, so
  // for a block whose largest magnitude is a positive value the super-block d is negative (ggml's
  // convention: the extreme quantizes to -32). Checks we kept that sign rule, independent of kernels.
  std::vector<float> x(256);
  for (int i = 0; i < 256; ++i) x[i] = 0.01f * static_cast<float>((i * 37) % 101 - 50);
  x[77] = 3.0f;
  std::vector<uint8_t> q(210);
  quantize_row(GgmlType::Q6_K, x.data(), q.data(), 256);
  const float d = fp16_to_fp32(static_cast<uint16_t>(q[208] | (q[209] << 8)));
  const auto sc = static_cast<int8_t>(q[192 + 77 / 16]);
  EXPECT_NE(d, 0.0f);
  // The extreme element sits at the end of the range: |d * sc * (q - 32)| ~= 3.
  std::vector<float> r(256);
  dequantize_row(GgmlType::Q6_K, q.data(), r.data(), 256);
  EXPECT_NEAR(r[77], 3.0f, 3.0 / 32) << "d=" << d << " sc=" << int(sc);
}

TEST(Validation, RejectsBadRows) {
  std::vector<float> x(300, 1.0f);
  std::vector<uint8_t> q(1024);
  EXPECT_THROW(quantize_row(GgmlType::Q4_0, x.data(), q.data(), 33), Error);
  EXPECT_THROW(quantize_row(GgmlType::Q4_K, x.data(), q.data(), 255), Error);
  EXPECT_THROW(quantize_row(GgmlType::Q6_K, x.data(), q.data(), 288), Error);
  EXPECT_THROW(quantize_row(GgmlType::Q8_0, x.data(), q.data(), -32), Error);
  EXPECT_THROW(dequantize_row(GgmlType::Q8_0, q.data(), x.data(), 31), Error);
  EXPECT_THROW(quantize_row(GgmlType::TQ1_0, x.data(), q.data(), 256), Error);  // no implementation
  EXPECT_THROW(quantize_row(GgmlType::Q4_0, nullptr, q.data(), 32), Error);
  EXPECT_THROW(dequantize_row(GgmlType::Q4_0, q.data(), nullptr, 32), Error);
  try {
    quantize_row(GgmlType::Q4_0, x.data(), q.data(), 33);
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("33"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("32"), std::string::npos) << e.what();
  }
  // Zero-length rows are valid and touch nothing.
  EXPECT_NO_THROW(quantize_row(GgmlType::Q4_K, x.data(), q.data(), 0));
}

}  // namespace
}  // namespace shardlm
