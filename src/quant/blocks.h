// Byte layouts of the block formats (ggml-common.h), as offsets rather than structs: rows may start at any
// byte (GGUF only promises 32-byte alignment of the tensor, not of each row), so every multi-byte field is
// read through memcpy and the layout stays in one place for the scalar and SIMD kernels.
#pragma once

#include <cstdint>
#include <cstring>

namespace shardlm::quant_detail {

// Q8_0: fp16 d; int8 qs[32].
inline constexpr int kQ8_0Block = 32;
inline constexpr int kQ8_0Bytes = 34;
inline constexpr int kQ8_0Qs = 2;

// Q4_0: fp16 d; uint8 qs[16]; element j in the low nibble of qs[j], element j+16 in the high nibble.
inline constexpr int kQ4_0Block = 32;
inline constexpr int kQ4_0Bytes = 18;
inline constexpr int kQ4_0Qs = 2;

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

inline uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store_u16(uint8_t* p, uint16_t v) { std::memcpy(p, &v, sizeof v); }

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

}  // namespace shardlm::quant_detail
