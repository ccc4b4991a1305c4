// Block formats Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q5_K, IQ4_NL, IQ4_XS, MXFP4: blocks built byte by byte from
// the layout description (ggml-common.h) with values computed by hand, quantize->dequantize error
// bounds, zero/constant blocks and unaligned rows. Byte-identity with ggml itself was checked outside the
// tree against libggml (see the commit message); these tests pin the format and the quality.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
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

void put16(std::vector<uint8_t>& b, size_t off, uint16_t v) {
  b[off] = static_cast<uint8_t>(v & 0xFF);
  b[off + 1] = static_cast<uint8_t>(v >> 8);
}

std::vector<float> decode(GgmlType type, const std::vector<uint8_t>& b, int64_t n) {
  std::vector<float> out(static_cast<size_t>(n));
  dequantize_row(type, b.data(), out.data(), n);
  return out;
}

// The IQ4_NL / IQ4_XS codebook as printed in ggml-common.h (kvalues_iq4nl): data of the format.
constexpr int kIq4nl[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

// E2M1 (the MXFP4 element) from its definition: bit 3 sign, bits 2..1 exponent (bias 1), bit 0 mantissa;
// exponent 0 is subnormal (0.5 * m).
double e2m1(int code) {
  const int sign = code >> 3, exp = (code >> 1) & 3, man = code & 1;
  const double mag = exp == 0 ? 0.5 * man : std::ldexp(1.0 + 0.5 * man, exp - 1);
  return sign ? -mag : mag;
}

TEST(HandBlocks, Q4_1) {
  // d = 0.5 (fp16 0x3800), m = -2 (0xC000); byte j: nibble j (element j), 15 - j (element j + 16).
  std::vector<uint8_t> b(20);
  put16(b, 0, 0x3800);
  put16(b, 2, 0xC000);
  for (int j = 0; j < 16; ++j) b[4 + j] = static_cast<uint8_t>(j | ((15 - j) << 4));
  const auto out = decode(GgmlType::Q4_1, b, 32);
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(out[j], j * 0.5f - 2.0f) << j;
    EXPECT_EQ(out[j + 16], (15 - j) * 0.5f - 2.0f) << j + 16;
  }
}

TEST(HandBlocks, Q5_0) {
  // d = 0.25 (0x3400). Element e has the 5-bit quant q(e) = (7e + 3) % 32: low nibble in byte 6 + e % 16
  // (high nibble for e >= 16), 5th bit at bit e of the little-endian uint32 at bytes 2..5.
  // value = (q - 16) * d.
  std::vector<uint8_t> b(22);
  put16(b, 0, 0x3400);
  for (int e = 0; e < 32; ++e) {
    const int q = (7 * e + 3) % 32;
    b[6 + e % 16] = static_cast<uint8_t>(b[6 + e % 16] | ((q & 0xF) << (e >= 16 ? 4 : 0)));
    b[2 + e / 8] = static_cast<uint8_t>(b[2 + e / 8] | ((q >> 4) << (e % 8)));
  }
  const auto out = decode(GgmlType::Q5_0, b, 32);
  for (int e = 0; e < 32; ++e) EXPECT_EQ(out[e], ((7 * e + 3) % 32 - 16) * 0.25f) << e;
}

TEST(HandBlocks, Q5_1) {
  // d = 2^-3 (0x3000), m = 1.5 (0x3E00), qh at bytes 4..7, nibbles at 8..23; q(e) = (11e + 5) % 32.
  std::vector<uint8_t> b(24);
  put16(b, 0, 0x3000);
  put16(b, 2, 0x3E00);
  for (int e = 0; e < 32; ++e) {
    const int q = (11 * e + 5) % 32;
    b[8 + e % 16] = static_cast<uint8_t>(b[8 + e % 16] | ((q & 0xF) << (e >= 16 ? 4 : 0)));
    b[4 + e / 8] = static_cast<uint8_t>(b[4 + e / 8] | ((q >> 4) << (e % 8)));
  }
  const auto out = decode(GgmlType::Q5_1, b, 32);
  for (int e = 0; e < 32; ++e) EXPECT_EQ(out[e], ((11 * e + 5) % 32) * 0.125f + 1.5f) << e;
}

TEST(HandBlocks, Q2_K) {
  // scales[i] (bytes 0..15) = scale s_i | min m_i << 4 for the 16-element sub-block i, with
  // s_i = (3i + 1) % 16 and m_i = 15 - i; qs at bytes 16..79; d = 2^-2 (0x3400) at 80, dmin = 2^-4
  // (0x2C00) at 82. Element e: 2-bit q(e) = (e / 3) % 4 at bits 2 * ((e % 128) / 32) of
  // qs[(e / 128) * 32 + e % 32]. value = d * s * q - dmin * m (all exact in float).
  std::vector<uint8_t> b(84);
  for (int i = 0; i < 16; ++i) b[i] = static_cast<uint8_t>((3 * i + 1) % 16 | ((15 - i) << 4));
  for (int e = 0; e < 256; ++e) {
    uint8_t& q = b[16 + (e / 128) * 32 + e % 32];
    q = static_cast<uint8_t>(q | (((e / 3) % 4) << (2 * ((e % 128) / 32))));
  }
  put16(b, 80, 0x3400);
  put16(b, 82, 0x2C00);
  const auto out = decode(GgmlType::Q2_K, b, 256);
  for (int e = 0; e < 256; ++e) {
    const int i = e / 16;
    const double want = 0.25 * ((3 * i + 1) % 16) * ((e / 3) % 4) - 0.0625 * (15 - i);
    EXPECT_EQ(out[e], static_cast<float>(want)) << "element " << e;
  }
}

TEST(HandBlocks, Q3_K) {
  // Sixteen 6-bit scales u_j = (7j + 5) % 64 (signed scale u_j - 32): low nibble of u_j in byte
  // 96 + j % 8 (high nibble of that byte for j >= 8), top 2 bits in byte 104 + j % 4 at bits 2 * (j / 4).
  // Element e has the 3-bit level v(e) = (3e + 1) % 8 (signed q = v - 4): low 2 bits as Q2_K in qs
  // (bytes 32..95), top bit as bit e / 32 of hmask[e % 32] (bytes 0..31). d = 2^-5 (0x2800) at 108.
  std::vector<uint8_t> b(110);
  for (int j = 0; j < 16; ++j) {
    const int u = (7 * j + 5) % 64;
    b[96 + j % 8] = static_cast<uint8_t>(b[96 + j % 8] | ((u & 0xF) << (j >= 8 ? 4 : 0)));
    b[104 + j % 4] = static_cast<uint8_t>(b[104 + j % 4] | ((u >> 4) << (2 * (j / 4))));
  }
  for (int e = 0; e < 256; ++e) {
    const int v = (3 * e + 1) % 8;
    uint8_t& q = b[32 + (e / 128) * 32 + e % 32];
    q = static_cast<uint8_t>(q | ((v & 3) << (2 * ((e % 128) / 32))));
    b[e % 32] = static_cast<uint8_t>(b[e % 32] | ((v >> 2) << (e / 32)));
  }
  put16(b, 108, 0x2800);
  const auto out = decode(GgmlType::Q3_K, b, 256);
  for (int e = 0; e < 256; ++e) {
    const int j = e / 16;
    const double want = 0.03125 * ((7 * j + 5) % 64 - 32) * ((3 * e + 1) % 8 - 4);
    EXPECT_EQ(out[e], static_cast<float>(want)) << "element " << e;
  }
}

TEST(HandBlocks, Q5_K) {
  // d = 2^-4 (0x2C00), dmin = 2^-3 (0x3000); 6-bit scales sc[s] = 7s + 13 and mins m[s] = 60 - 5s packed
  // as Q4_K (bytes 4..15: bytes 4..7 / 8..11 hold the low 6 bits of sc[0..3] / m[0..3], bytes 12..15
  // hold sc[4..7] | m[4..7] << 4 low nibbles, the top 2 bits of sc[4..7] / m[4..7] in bits 6..7 of bytes
  // 4..7 / 8..11). Element e: q(e) = (13e + 2) % 32; low nibble in qs[(e / 64) * 32 + e % 32] (bytes
  // 48..175, high nibble when e % 64 >= 32); bit 4 as bit 2 * (e / 64) + (e % 64 >= 32) of qh[e % 32]
  // (bytes 16..47). value = d * sc * q - dmin * m.
  int sc[8], mn[8];
  for (int s = 0; s < 8; ++s) sc[s] = 7 * s + 13, mn[s] = 60 - 5 * s;
  std::vector<uint8_t> b(176);
  put16(b, 0, 0x2C00);
  put16(b, 2, 0x3000);
  for (int s = 0; s < 4; ++s) {
    b[4 + s] = static_cast<uint8_t>(sc[s] | ((sc[s + 4] >> 4) << 6));
    b[8 + s] = static_cast<uint8_t>(mn[s] | ((mn[s + 4] >> 4) << 6));
    b[12 + s] = static_cast<uint8_t>((sc[s + 4] & 0xF) | ((mn[s + 4] & 0xF) << 4));
  }
  for (int e = 0; e < 256; ++e) {
    const int q = (13 * e + 2) % 32;
    const bool upper = e % 64 >= 32;
    uint8_t& ql = b[48 + (e / 64) * 32 + e % 32];
    ql = static_cast<uint8_t>(ql | ((q & 0xF) << (upper ? 4 : 0)));
    b[16 + e % 32] = static_cast<uint8_t>(b[16 + e % 32] | ((q >> 4) << (2 * (e / 64) + (upper ? 1 : 0))));
  }
  const auto out = decode(GgmlType::Q5_K, b, 256);
  for (int e = 0; e < 256; ++e) {
    const int s = e / 32;
    const double want = 0.0625 * sc[s] * ((13 * e + 2) % 32) - 0.125 * mn[s];
    EXPECT_EQ(out[e], static_cast<float>(want)) << "element " << e;
  }
}

TEST(HandBlocks, IQ4_NL) {
  // d = 0.5 (0x3800); byte 2 + j: index j (element j), 15 - j (element j + 16). value = d * table[index].
  std::vector<uint8_t> b(18);
  put16(b, 0, 0x3800);
  for (int j = 0; j < 16; ++j) b[2 + j] = static_cast<uint8_t>(j | ((15 - j) << 4));
  const auto out = decode(GgmlType::IQ4_NL, b, 32);
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(out[j], 0.5f * kIq4nl[j]) << j;
    EXPECT_EQ(out[j + 16], 0.5f * kIq4nl[15 - j]) << j + 16;
  }
}

TEST(HandBlocks, IQ4_XS) {
  // d = 2^-6 (0x2400); 6-bit group scales u_g = (9g + 3) % 64 (signed u_g - 32): low nibble in byte
  // 4 + g / 2 (high nibble for odd g), top 2 bits at bits 2g of the uint16 at bytes 2..3. Element e of
  // group g = e / 32: index (5e) % 16 in byte 8 + 16g + e % 16 (high nibble when e % 32 >= 16).
  std::vector<uint8_t> b(136);
  put16(b, 0, 0x2400);
  uint16_t scales_h = 0;
  for (int g = 0; g < 8; ++g) {
    const int u = (9 * g + 3) % 64;
    b[4 + g / 2] = static_cast<uint8_t>(b[4 + g / 2] | ((u & 0xF) << (g % 2 ? 4 : 0)));
    scales_h = static_cast<uint16_t>(scales_h | ((u >> 4) << (2 * g)));
  }
  put16(b, 2, scales_h);
  for (int e = 0; e < 256; ++e) {
    uint8_t& q = b[8 + 16 * (e / 32) + e % 16];
    q = static_cast<uint8_t>(q | (((5 * e) % 16) << (e % 32 >= 16 ? 4 : 0)));
  }
  const auto out = decode(GgmlType::IQ4_XS, b, 256);
  for (int e = 0; e < 256; ++e) {
    const int g = e / 32;
    const double want = 0.015625 * ((9 * g + 3) % 64 - 32) * kIq4nl[(5 * e) % 16];
    EXPECT_EQ(out[e], static_cast<float>(want)) << "element " << e;
  }
}

TEST(HandBlocks, MXFP4) {
  // Byte 0 is the e8m0 scale 2^(e - 127); then nibbles as Q4_0 (element j low in byte 1 + j, j + 16
  // high), each an E2M1 code. value = e2m1(code) * 2^(e - 127). Scales from the float-subnormal
  // range (e = 0, 1) to large ones.
  for (const int e : {0, 1, 100, 127, 130, 200}) {
    std::vector<uint8_t> b(17);
    b[0] = static_cast<uint8_t>(e);
    for (int j = 0; j < 16; ++j) b[1 + j] = static_cast<uint8_t>(j | (((j * 5 + 3) % 16) << 4));
    const auto out = decode(GgmlType::MXFP4, b, 32);
    for (int j = 0; j < 16; ++j) {
      EXPECT_EQ(out[j], static_cast<float>(std::ldexp(e2m1(j), e - 127))) << "e=" << e << " j=" << j;
      EXPECT_EQ(out[j + 16], static_cast<float>(std::ldexp(e2m1((j * 5 + 3) % 16), e - 127)))
          << "e=" << e << " j=" << j + 16;
    }
  }
}

// Q4_1 quantizer on a block laid on its own grid: min -1, max 2, so d = 3/15 = 0.2 is stored as fp16
// 0x3266 (0.2 = 1.6 * 2^-3, mantissa 0.6 * 1024 = 614.4 -> 614 = 0x266) and m = -1 as 0xBC00;
// x = -1 + 0.2k gets quant k.
TEST(Quantize, Q4_1HandBlock) {
  float x[32];
  for (int j = 0; j < 32; ++j) x[j] = -1.0f + 0.2f * static_cast<float>((j * 7) % 16);
  uint8_t b[20];
  quantize_row(GgmlType::Q4_1, x, b, 32);
  EXPECT_EQ(b[0] | (b[1] << 8), 0x3266);
  EXPECT_EQ(b[2] | (b[3] << 8), 0xBC00);
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(b[4 + j] & 0xF, (j * 7) % 16) << j;
    EXPECT_EQ(b[4 + j] >> 4, ((j + 16) * 7) % 16) << j + 16;
  }
}

// MXFP4 quantizer by hand: amax = 5 gives the scale exponent floor(log2 5) - 2 = 0, so e = 127 and the
// elements are plain E2M1 values. 5 lies halfway between 4 (code 6) and 6 (code 7): ggml's linear search
// keeps the first, 4. -0.25 is halfway between 0 (code 0) and -0.5 (code 9): 0. 1.5 (code 3) and -3
// (code 13) are exact; 0.8 goes to 1 (code 2).
TEST(Quantize, MXFP4HandBlock) {
  float x[32] = {};
  x[0] = 5.0f;
  x[1] = -0.25f;
  x[2] = 1.5f;
  x[17] = -3.0f;  // code 13, high nibble of byte 2
  x[18] = 0.8f;   // nearest is 1.0 (code 2), high nibble of byte 3
  uint8_t b[17];
  quantize_row(GgmlType::MXFP4, x, b, 32);
  EXPECT_EQ(b[0], 127);
  EXPECT_EQ(b[1], 6);              // element 0 -> 6, element 16 (0) -> 0
  EXPECT_EQ(b[2], 0 | (13 << 4));  // element 1 -> 0, element 17 -> 13
  EXPECT_EQ(b[3], 3 | (2 << 4));   // element 2 -> 3, element 18 -> 2
  for (int j = 3; j < 16; ++j) EXPECT_EQ(b[1 + j], 0) << j;
}

// Per-type error bounds, measured per block (the super-block for the K and XS types) so that they hold
// for any input. d denotes the block's step.
// - Q4_1 / Q5_1: d = (max - min) / (2^bits - 1) and min is stored: round to nearest is d/2, plus the fp16
//   rounding of d (2^-11 relative, times up to 15 / 31 levels: 0.0073 d / 0.0151 d) and of min
//   (2^-11 |min|) -> 0.51 d / 0.52 d + 2^-11 |min|.
// - Q5_0: as Q4_0, d = amax / 16; the element of opposite sign to the extreme can sit at +16 steps and
//   is clamped to +15: one full step plus the fp16 rounding of d -> 1.01 d.
// - Q2_K / Q5_K (asymmetric, 4- / 6-bit sub-block scales and mins): half a step, plus the rounding of
//   each sub-block's scale to 1/15 (1/63) of the largest (up to 3 (31) levels of it) and of its min,
//   plus the fit choosing a scale below range/nmax so that the top is clamped. Q2_K: about 0.7 of a step
//   of range/3 (range = max - min(min, 0) of the super-block) -> range / 3. Q5_K: the scale and min
//   roundings each cost up to a quarter step -> 1.5 steps, range / 20.7.
// - Q3_K: symmetric levels -4..3 with the extreme on -4: an opposite-sign element near amax clamps at 3
//   steps (amax / 4 away); the 6-bit sub-block scales and the RMSE refit move the step off amax / 4
//   -> amax / 3.
// - IQ4_NL: the codebook spans -127..113 with gaps of at most 24; with the scale within about +-10% of
//   amax / 127 (the least-squares fit among scales (127 +- 7) / amax), half a gap is < amax / 9.6 and
//   the short 113 end costs < 0.19 amax -> amax / 5. IQ4_XS adds the 6-bit group scales relative to the
//   largest (half of max_scale / 32, up to 127 codebook units: ~amax / 64) -> amax / 4.
// - MXFP4: the scale is u = 2^(floor(log2 amax) - 3) per half E2M1 unit, so amax / u is in [8, 16) while
//   the largest level is 12: up to 4u at the top, and half the widest gap (8 -> 12) elsewhere -> 4u.
// RMS limits catch a systematically worse (but bounded) quantizer: ggml's algorithms give, on this data,
// Q4_1 0.078, Q5_0 0.043, Q5_1 0.038, Q2_K 0.30, Q3_K 0.15, Q5_K 0.036, IQ4_NL 0.076, IQ4_XS 0.077,
// MXFP4 0.12 relative RMS error; the limits allow about 1.4x.
TEST(Quantize, RoundTripWithinBounds) {
  for (GgmlType type : {GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q2_K, GgmlType::Q3_K,
                        GgmlType::Q5_K, GgmlType::IQ4_NL, GgmlType::IQ4_XS, GgmlType::MXFP4}) {
    const int64_t n = 4096;
    const auto x = random_floats(n, 4321, 0.7f);
    std::vector<uint8_t> q(static_cast<size_t>(row_bytes(type, n)));
    std::vector<float> r(n);
    quantize_row(type, x.data(), q.data(), n);
    dequantize_row(type, q.data(), r.data(), n);
    const int64_t bs = block_size(type);
    double worst_share = 0, sum_e2 = 0, sum_x2 = 0;
    int64_t worst_i = -1;
    for (int64_t b0 = 0; b0 < n; b0 += bs) {
      double amax = 0, lo = x[b0], hi = x[b0];
      for (int64_t i = b0; i < b0 + bs; ++i) {
        amax = std::max(amax, std::fabs(static_cast<double>(x[i])));
        lo = std::min<double>(lo, x[i]);
        hi = std::max<double>(hi, x[i]);
      }
      const double range0 = hi - std::min(lo, 0.0);
      for (int64_t i = b0; i < b0 + bs; ++i) {
        const double xi = x[i], e = std::fabs(static_cast<double>(r[i]) - xi);
        double bound = 0;
        switch (type) {
          case GgmlType::Q4_1: bound = 0.51 * (hi - lo) / 15 + std::ldexp(std::fabs(lo), -11); break;
          case GgmlType::Q5_1: bound = 0.52 * (hi - lo) / 31 + std::ldexp(std::fabs(lo), -11); break;
          case GgmlType::Q5_0: bound = 1.01 * amax / 16; break;
          case GgmlType::Q2_K: bound = range0 / 3; break;
          case GgmlType::Q5_K: bound = 1.5 * range0 / 31; break;
          case GgmlType::Q3_K: bound = amax / 3; break;
          case GgmlType::IQ4_NL: bound = amax / 5; break;
          case GgmlType::IQ4_XS: bound = amax / 4; break;
          case GgmlType::MXFP4:  // 4u = 2^(floor(log2 amax) - 1)
            bound = std::ldexp(1.0, static_cast<int>(std::floor(std::log2(amax))) - 1);
            break;
          default: FAIL();
        }
        const double share = bound > 0 ? e / bound : (e > 0 ? 1e30 : 0);
        if (share > worst_share) worst_share = share, worst_i = i;
        sum_e2 += e * e;
        sum_x2 += xi * xi;
      }
    }
    EXPECT_LE(worst_share, 1.0) << type_name(type) << ": worst element " << worst_i << " x=" << x[worst_i]
                                << " got " << r[worst_i] << " uses " << worst_share << " of its bound";
    const double rel_rms = std::sqrt(sum_e2 / sum_x2);
    double rms_limit = 0;
    switch (type) {
      case GgmlType::Q4_1: rms_limit = 0.11; break;
      case GgmlType::Q5_0: rms_limit = 0.06; break;
      case GgmlType::Q5_1: rms_limit = 0.055; break;
      case GgmlType::Q2_K: rms_limit = 0.42; break;
      case GgmlType::Q3_K: rms_limit = 0.21; break;
      case GgmlType::Q5_K: rms_limit = 0.05; break;
      case GgmlType::IQ4_NL: rms_limit = 0.105; break;
      case GgmlType::IQ4_XS: rms_limit = 0.105; break;
      case GgmlType::MXFP4: rms_limit = 0.165; break;
      default: FAIL();
    }
    EXPECT_LE(rel_rms, rms_limit) << type_name(type);
    std::printf("%-6s relative RMS error %.5f (limit %.5f), worst element uses %.2f of its bound\n",
                type_name(type), rel_rms, rms_limit, worst_share);
  }
}

constexpr GgmlType kTypes[] = {GgmlType::Q4_1, GgmlType::Q5_0,   GgmlType::Q5_1,
                               GgmlType::Q2_K, GgmlType::Q3_K,   GgmlType::Q5_K,
                               GgmlType::IQ4_NL, GgmlType::IQ4_XS, GgmlType::MXFP4};

TEST(Quantize, ZeroBlocksDecodeToZero) {
  // ggml writes scale 0 (or -0) and never divides by it, so zeros come back exactly (no NaN).
  for (GgmlType type : kTypes) {
    std::vector<float> x(512, 0.0f), r(512, 1.0f);
    std::vector<uint8_t> q(static_cast<size_t>(row_bytes(type, 512)));
    quantize_row(type, x.data(), q.data(), 512);
    dequantize_row(type, q.data(), r.data(), 512);
    for (int i = 0; i < 512; ++i) ASSERT_EQ(r[i], 0.0f) << type_name(type) << " element " << i;
  }
}

TEST(Quantize, ConstantBlocks) {
  // Exact where the format can store the constant itself: Q4_1 / Q5_1 keep it as the fp16 min (d = 0);
  // Q5_0 stores d = c / -16 (exact in fp16 for these c) and every element is the extreme at -16; MXFP4
  // puts c = 1.5 * 2^k on its top level (floor(log2 c) = k, unit 2^(k - 3), 12 units = c). The others
  // decode fp16-rounded scales times integer levels: fp16 rounds by 2^-11 relative above 2^-14 and by
  // up to 2^-25 absolute below (its subnormal step is 2^-24), times the largest level product the scale
  // meets: Q2_K 15 * 3 + 15 (scale and min), Q3_K 32 * 4, Q5_K 63 * 31 + 63, IQ4_NL 127, IQ4_XS 32 * 127
  // (a constant -0.047 puts IQ4_XS's d = c / 4064 among the fp16 subnormals). Allow 2^-9 relative plus
  // that many 2^-25.
  for (GgmlType type : kTypes) {
    for (const float c : {0.75f, -1.5f, 3.0f, -0.046875f, 96.0f}) {
      std::vector<float> x(256, c), r(256);
      std::vector<uint8_t> q(static_cast<size_t>(row_bytes(type, 256)));
      quantize_row(type, x.data(), q.data(), 256);
      dequantize_row(type, q.data(), r.data(), 256);
      const bool exact = type == GgmlType::Q4_1 || type == GgmlType::Q5_0 || type == GgmlType::Q5_1 ||
                         type == GgmlType::MXFP4;
      double levels = 0;
      switch (type) {
        case GgmlType::Q2_K: levels = 15 * 3 + 15; break;
        case GgmlType::Q3_K: levels = 32 * 4; break;
        case GgmlType::Q5_K: levels = 63 * 31 + 63; break;
        case GgmlType::IQ4_NL: levels = 127; break;
        case GgmlType::IQ4_XS: levels = 32 * 127; break;
        default: break;
      }
      const double tol = std::ldexp(std::fabs(c), -9) + levels * std::ldexp(1.0, -25);
      for (int i = 0; i < 256; ++i) {
        if (exact) ASSERT_EQ(r[i], c) << type_name(type) << " c=" << c << " element " << i;
        else ASSERT_NEAR(r[i], c, tol) << type_name(type) << " c=" << c << " element " << i;
      }
    }
  }
}

TEST(Quantize, UnalignedRows) {
  // Rows may start at any byte: quantizing into and decoding from an odd address must give the same
  // bytes and floats as the aligned buffer.
  for (GgmlType type : kTypes) {
    const int64_t n = 512;
    const auto x = random_floats(n, 99, 2.0f);
    const size_t nb = static_cast<size_t>(row_bytes(type, n));
    std::vector<uint8_t> a(nb), u(nb + 3);
    quantize_row(type, x.data(), a.data(), n);
    quantize_row(type, x.data(), u.data() + 3, n);
    EXPECT_EQ(std::memcmp(a.data(), u.data() + 3, nb), 0) << type_name(type);
    std::vector<float> ra(n), ru(n);
    dequantize_row(type, a.data(), ra.data(), n);
    dequantize_row(type, u.data() + 3, ru.data(), n);
    EXPECT_EQ(std::memcmp(ra.data(), ru.data(), sizeof(float) * n), 0) << type_name(type);
  }
}

TEST(Validation, RejectsPartialBlocks) {
  std::vector<float> x(512, 1.0f);
  std::vector<uint8_t> q(1024);
  EXPECT_THROW(quantize_row(GgmlType::Q2_K, x.data(), q.data(), 255), Error);
  EXPECT_THROW(quantize_row(GgmlType::IQ4_XS, x.data(), q.data(), 288), Error);
  EXPECT_THROW(quantize_row(GgmlType::MXFP4, x.data(), q.data(), 33), Error);
  EXPECT_THROW(dequantize_row(GgmlType::Q5_1, q.data(), x.data(), 48), Error);
  EXPECT_TRUE(can_quantize(GgmlType::IQ4_NL));
  EXPECT_EQ(row_bytes(GgmlType::MXFP4, 64), 34);
  EXPECT_EQ(row_bytes(GgmlType::Q3_K, 512), 220);
}

}  // namespace
}  // namespace shardlm
