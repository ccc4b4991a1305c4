// Byte layouts of the block formats (ggml-common.h), as offsets rather than structs: rows may start at any
// byte (GGUF only promises 32-byte alignment of the tensor, not of each row), so every multi-byte field is
// read through memcpy and the layout stays in one place for the scalar and SIMD kernels.
#pragma once

#include <bit>
#include <cstdint>
#include <cstring>

namespace shardlm::quant_detail {

// Q8_0: fp16 d; int8 qs[32].
inline constexpr int kQ8_0Block = 32;
inline constexpr int kQ8_0Bytes = 34;
inline constexpr int kQ8_0Qs = 2;

// Q8_0 packed in groups of 8 rows (pack_rows; matmul_packed_avx2 says why), per 32-column block kQ8x8Block
// bytes: the 8 rows' fp16 d (row r at 2r), then for k = 0..7 the 32 bytes qs[4k..4k+3] of row 0, ..., of row 7.
inline constexpr int kQ8x8Block = 8 * kQ8_0Bytes;
inline constexpr int kQ8x8Qs = 16;

// Q4_0: fp16 d; uint8 qs[16]; element j in the low nibble of qs[j], element j+16 in the high nibble.
inline constexpr int kQ4_0Block = 32;
inline constexpr int kQ4_0Bytes = 18;
inline constexpr int kQ4_0Qs = 2;

// Q4_0 packed in groups of 8 rows (pack_rows; matmul_packed_avx2 says why), per 32-column block
// kQ4x8Block bytes: the 8 rows' fp16 d (row r at 2r), then for k = 0..3 the 32 bytes qs[4k..4k+3] of row 0,
// of row 1, ..., of row 7.
inline constexpr int kQ4x8Rows = 8;
inline constexpr int kQ4x8Block = kQ4x8Rows * kQ4_0Bytes;
inline constexpr int kQ4x8Qs = 2 * kQ4x8Rows;

// F16 and BF16 packed in groups of 8 rows (pack_rows; fx8_rows in kernels_avx2.cpp says why), 16 * n_cols bytes
// a group (the 8 rows' bytes). F16: column k's 8 values (row r at 2r) at 16k, so one vcvtph2ps gives a column of
// all 8 rows. BF16: columns 2p and 2p + 1 share the 32 bytes at 32p, row r's pair at 4r (column 2p in the low
// half), so a shift and a mask give the two columns as floats; an odd last column's 8 values follow at
// 32 * (n_cols / 2), row r at 2r.
inline constexpr int kFx8ColBytes = 2 * kQ4x8Rows;  // one column of a group
// Columns a packed F16 / BF16 dot sums as one FMA chain before adding it to the row's total (fx8_rows in
// kernels_avx2.cpp says why); both families' kernels take this one value, so they give the same bits.
inline constexpr int64_t kFx8Slab = 256;

// Q4_K: fp16 d; fp16 dmin; uint8 scales[12]; uint8 qs[128].
inline constexpr int kQK = 256;
inline constexpr int kQ4_KBytes = 144;
inline constexpr int kQ4_KDmin = 2;
inline constexpr int kQ4_KScales = 4;
inline constexpr int kQ4_KQs = 16;

// Q6_K: uint8 ql[128]; uint8 qh[64]; int8 scales[16]; fp16 d.
inline constexpr int kQ6_KBytes = 210;
inline constexpr int kQ6_KQh = 128;
inline constexpr int kQ6_KScales = 192;
inline constexpr int kQ6_KD = 208;

// Q6_K packed in groups of 8 rows (pack_rows; matmul_packed_avx2 says why), per super-block kQ6Kx8Block bytes
// (the 8 rows' super-blocks' bytes): the 8 rows' fp16 d (row r at 2r); for each 32-element chunk j the 16
// bytes sc[2j], sc[2j + 1] of row 0, of row 1, ..., of row 7; then per chunk j (6-bit quants q[0..31])
// kQ6Kx8Chunk bytes: the low 4 bits as kQ4x8's 128 bytes (q[i] & 15 | (q[i + 16] & 15) << 4), then the top 2
// bits as two 32-byte words, one for q[0..15] and one for q[16..31], each row r's 32-bit word at 4r: byte i
// of the word holds the top bits of q[4k + i] (of q[16 + 4k + i]) at bits 2k, 2k + 1, for k = 0..3.
inline constexpr int kQ6Kx8Block = 8 * kQ6_KBytes;
inline constexpr int kQ6Kx8Scales = 16;
inline constexpr int kQ6Kx8Qs = kQ6Kx8Scales + 8 * 16;
inline constexpr int kQ6Kx8Chunk = 128 + 64;
static_assert(kQ6Kx8Qs + 8 * kQ6Kx8Chunk == kQ6Kx8Block, "packed Q6_K keeps the rows' size");

// Element e (0..255) of a Q6_K super-block as its unsigned 6-bit quant (value = d * sc[e / 16] * (q - 32)):
// ggml's dequantize_row_q6_K order, 128 elements per half, four 32-element runs per half.
inline int q6k_quant(const uint8_t* b /* (kQ6_KBytes) */, int e) {
  const int h = e / 128, run = (e % 128) / 32, l = e % 32;
  const uint8_t ql = b[64 * h + l + 32 * (run & 1)];
  const int lo = run < 2 ? ql & 0xF : ql >> 4;
  return lo | ((b[kQ6_KQh + 32 * h + l] >> (2 * run)) & 3) << 4;
}

inline uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store_u16(uint8_t* p, uint16_t v) { std::memcpy(p, &v, sizeof v); }

inline uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// ggml's nearest_int: round half to even through the float adder; valid for |v| <= 2^22 (out-of-range
// values only reach clamped levels). The reference quantizers' rounding (not used by the ISA files).
inline int nearest_int(float v) {
  const float t = v + 12582912.f;
  return static_cast<int>(std::bit_cast<uint32_t>(t) & 0x007fffffu) - 0x00400000;
}

// Q4_K packed in groups of 8 rows (pack_rows; matmul_packed_avx2 says why), per super-block kQ4Kx8Block bytes
// (the 8 rows' super-blocks' bytes): the 8 rows' fp16 d (row r at 2r), their fp16 dmin, then the 12 scale
// bytes of each row as three 32-byte words: bytes 4w..4w+3 of row r at kQ4Kx8Scales + 32w + 4r (so one
// shift and mask give sub-block j's scale or min of all 8 rows, one per 32-bit lane); then for each
// sub-block j (32 elements q[0..31]) 128 bytes in kQ4x8's order of the 16 bytes q[i] | q[i + 16] << 4.
inline constexpr int kQ4Kx8Block = kQ4x8Rows * kQ4_KBytes;
inline constexpr int kQ4Kx8Dmin = 2 * kQ4x8Rows;
inline constexpr int kQ4Kx8Scales = 4 * kQ4x8Rows;
inline constexpr int kQ4Kx8Qs = kQ4Kx8Scales + 12 * kQ4x8Rows;

// The 6-bit scale and min of sub-block j (0..7) of a Q4_K super-block (ggml's get_scale_min_k4): the
// first four sit in the low 6 bits of bytes 0..3 / 4..7; the last four keep their low 4 bits in bytes
// 8..11 and their top 2 bits in the spare top bits of bytes 0..7.
inline void q4k_scale_min(int j, const uint8_t* scales /* (12) */, int& sc, int& m) {
  if (j < 4) {
    sc = scales[j] & 63;
    m = scales[j + 4] & 63;
  } else {
    sc = (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4);
    m = (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4);
  }
}

// ---- Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q5_K, IQ4_NL, IQ4_XS, MXFP4 (codec_basic.cpp) ----
// Offsets are in bytes from the start of the block. In the 32-element formats, element j sits in the low
// nibble of qs[j] and element j + 16 in the high nibble (as Q4_0).

// Q4_1: fp16 d; fp16 m; uint8 qs[16]. value = q * d + m.
inline constexpr int kQ4_1Block = 32;
inline constexpr int kQ4_1Bytes = 20;
inline constexpr int kQ4_1M = 2;
inline constexpr int kQ4_1Qs = 4;

// Q5_0: fp16 d; uint8 qh[4] (bit j of the little-endian uint32 = 5th bit of element j); uint8 qs[16].
// value = (q - 16) * d.
inline constexpr int kQ5_0Block = 32;
inline constexpr int kQ5_0Bytes = 22;
inline constexpr int kQ5_0Qh = 2;
inline constexpr int kQ5_0Qs = 6;

// Q5_1: fp16 d; fp16 m; uint8 qh[4]; uint8 qs[16]. value = q * d + m.
inline constexpr int kQ5_1Block = 32;
inline constexpr int kQ5_1Bytes = 24;
inline constexpr int kQ5_1M = 2;
inline constexpr int kQ5_1Qh = 4;
inline constexpr int kQ5_1Qs = 8;

// Q2_K: uint8 scales[16] (low nibble: scale, high nibble: min of each 16-element sub-block);
// uint8 qs[64]; fp16 d; fp16 dmin. Element e: 2 bits at shift 2 * ((e % 128) / 32) of
// qs[(e / 128) * 32 + e % 32]. value = d * scale * q - dmin * min.
inline constexpr int kQ2_KBytes = 84;
inline constexpr int kQ2_KQs = 16;
inline constexpr int kQ2_KD = 80;
inline constexpr int kQ2_KDmin = 82;

// Q3_K: uint8 hmask[32]; uint8 qs[64]; uint8 scales[12]; fp16 d. Element e: low 2 bits as Q2_K, the
// third bit is bit e / 32 of hmask[e % 32] (set means +0, clear means -4: q in [-4, 3]). Sixteen signed
// 6-bit scales (q3k_scale). value = d * scale * q.
inline constexpr int kQ3_KBytes = 110;
inline constexpr int kQ3_KQs = 32;
inline constexpr int kQ3_KScales = 96;
inline constexpr int kQ3_KD = 108;

// Q5_K: fp16 d; fp16 dmin; uint8 scales[12] (packed as Q4_K: q4k_scale_min); uint8 qh[32];
// uint8 qs[128]. Element e: low 4 bits as Q4_K (qs[(e / 64) * 32 + e % 32], high nibble when
// e % 64 >= 32), 5th bit is bit 2 * (e / 64) + (e % 64 >= 32) of qh[e % 32].
inline constexpr int kQ5_KBytes = 176;
inline constexpr int kQ5_KDmin = 2;
inline constexpr int kQ5_KScales = 4;
inline constexpr int kQ5_KQh = 16;
inline constexpr int kQ5_KQs = 48;

// IQ4_NL: fp16 d; uint8 qs[16] of indices into kValuesIq4nl (quant/iq_tables.h). value = d * table[q].
inline constexpr int kIQ4_NLBlock = 32;
inline constexpr int kIQ4_NLBytes = 18;
inline constexpr int kIQ4_NLQs = 2;

// IQ4_XS: fp16 d; uint16 scales_h; uint8 scales_l[4]; uint8 qs[128]. Eight 32-element sub-blocks, each
// with a 6-bit scale ls (iq4xs_scale) and nibbles laid out as IQ4_NL. value = d * (ls - 32) * table[q].
inline constexpr int kIQ4_XSBytes = 136;
inline constexpr int kIQ4_XSScalesH = 2;
inline constexpr int kIQ4_XSScalesL = 4;
inline constexpr int kIQ4_XSQs = 8;

// MXFP4: uint8 e (e8m0 exponent); uint8 qs[16] of indices into kValuesFp4 (e2m1 values doubled).
// value = table[q] * e8m0_to_fp32_half(e).
inline constexpr int kMXFP4Block = 32;
inline constexpr int kMXFP4Bytes = 17;
inline constexpr int kMXFP4Qs = 1;

// Signed 6-bit scale of sub-block j (0..15) of a Q3_K super-block: the low 4 bits are nibble j / 8 of
// byte j % 8, the top 2 bits are bits 2 * (j / 4) of byte 8 + j % 4.
inline int q3k_scale(int j, const uint8_t* scales /* (12) */) {
  const int lo = (scales[j % 8] >> (4 * (j / 8))) & 0xF;
  const int hi = (scales[8 + j % 4] >> (2 * (j / 4))) & 3;
  return (lo | (hi << 4)) - 32;
}

// The unsigned 6-bit scale of sub-block ib (0..7) of an IQ4_XS super-block (before the -32 offset).
inline int iq4xs_scale(int ib, const uint8_t* block) {
  const int lo = (block[kIQ4_XSScalesL + ib / 2] >> (4 * (ib % 2))) & 0xF;
  const int hi = (load_u16(block + kIQ4_XSScalesH) >> (2 * ib)) & 3;
  return lo | (hi << 4);
}

// Half the value of an e8m0 scale byte, 2^(e - 128) (ggml's GGML_E8M0_TO_FP32_HALF: the MXFP4 table
// holds doubled e2m1 values). e = 0 and 1 give the float subnormals 2^-128 and 2^-127; e = 255 (the
// format's NaN) is not special-cased, as in ggml.
inline float e8m0_to_fp32_half(uint8_t e) {
  const uint32_t bits = e < 2 ? 0x00200000u << e : static_cast<uint32_t>(e - 1) << 23;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

}  // namespace shardlm::quant_detail
