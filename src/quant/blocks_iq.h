// Byte layouts of the IQ block formats (ggml-common.h's block_iq*), as offsets like quant/blocks.h, for
// the row codecs (codec_iq.cpp) and any SIMD/CUDA kernel that reads these blocks later. All of them are
// super-blocks of kQK = 256 values in groups of 8 (one grid point, or two IQ3 points of 4, per group).
// Grid values and sign patterns are in quant/iq_tables.h.
#pragma once

#include <cstdint>

namespace shardlm::quant_detail {

// IQ2_XXS: fp16 d; then per 32 values 8 bytes: 4 grid indices (kIq2xxsGrid, one per 8 values) and a
// little-endian u32 holding four 7-bit sign indices (kKsignsIq2xs) in bits 0..27 and a 4-bit scale s in
// bits 28..31. Value = d * (0.5 + s) / 4 * grid byte * sign.
inline constexpr int kIQ2_XXSBytes = 66;
inline constexpr int kIQ2_XXSQs = 2;

// IQ2_XS: fp16 d; u16 qs[32] (9-bit grid index into kIq2xsGrid | 7-bit sign index << 9, one per 8
// values); uint8 scales[8] (per 32 values, low nibble for the first 16, high nibble for the next 16).
inline constexpr int kIQ2_XSBytes = 74;
inline constexpr int kIQ2_XSQs = 2;
inline constexpr int kIQ2_XSScales = 66;

// IQ2_S: fp16 d; uint8 qs[32] (low 8 bits of the 10-bit kIq2sGrid index, one per 8 values); uint8
// signs[32] (one explicit sign byte per 8 values); uint8 qh[8] (per 32 values, bits 2l..2l+1 are the top
// bits of index l); uint8 scales[8] (nibbles as IQ2_XS).
inline constexpr int kIQ2_SBytes = 82;
inline constexpr int kIQ2_SQs = 2;
inline constexpr int kIQ2_SSigns = 34;
inline constexpr int kIQ2_SQh = 66;
inline constexpr int kIQ2_SScales = 74;

// IQ3_XXS: fp16 d; uint8 qs[64] (kIq3xxsGrid indices, one per 4 values); then per 32 values a
// little-endian u32: four 7-bit sign indices in bits 0..27 and a 4-bit scale s in bits 28..31.
// Value = d * (0.5 + s) / 2 * grid byte * sign.
inline constexpr int kIQ3_XXSBytes = 98;
inline constexpr int kIQ3_XXSQs = 2;
inline constexpr int kIQ3_XXSSigns = 66;

// IQ3_S: fp16 d; uint8 qs[64] (low 8 bits of the 9-bit kIq3sGrid index, one per 4 values); uint8 qh[8]
// (per 32 values, bit k is the top bit of index k); uint8 signs[32] (one sign byte per 8 values); uint8
// scales[4] (per 64 values, a nibble s per 32: value = d * (1 + 2s) * grid byte * sign).
inline constexpr int kIQ3_SBytes = 110;
inline constexpr int kIQ3_SQs = 2;
inline constexpr int kIQ3_SQh = 66;
inline constexpr int kIQ3_SSigns = 74;
inline constexpr int kIQ3_SScales = 106;

// IQ1_S: fp16 d; uint8 qs[32] (low 8 bits of the 11-bit kIq1sGrid index, one per 8 values); u16 qh[8]
// per 32 values: bits 3l..3l+2 the top bits of index l, bits 12..14 a scale s, bit 15 the sign of the
// shift. Value = d * (2s + 1) * (grid value + shift), shift = +-SHARDLM_IQ1S_DELTA.
inline constexpr int kIQ1_SBytes = 50;
inline constexpr int kIQ1_SQs = 2;
inline constexpr int kIQ1_SQh = 34;

// IQ1_M: no d field. uint8 qs[32] (low 8 bits of the kIq1sGrid index, one per 8 values); uint8 qh[16]
// (per 16 values: bits 0..2 / 4..6 the top bits of the two indices, bits 3 / 7 the signs of their
// shifts); u16 scales[4]: four 3-bit scales in bits 0..11 of each (per 16 values) and, in bits 12..15 of
// the four together, the fp16 super-block scale d.
inline constexpr int kIQ1_MBytes = 56;
inline constexpr int kIQ1_MQs = 0;
inline constexpr int kIQ1_MQh = 32;
inline constexpr int kIQ1_MScales = 48;

// Byte j of a grid entry as ggml reads it (it casts the table to bytes on a little-endian host).
inline uint8_t grid_byte(uint64_t entry, int j) { return static_cast<uint8_t>(entry >> (8 * j)); }

}  // namespace shardlm::quant_detail
