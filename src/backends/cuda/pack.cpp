#include "backends/cuda/pack.h"

#include <cstring>

#include "core/error.h"
#include "quant/blocks.h"
#include "quant/quant.h"

namespace shardlm::cuda_detail {
namespace {

using namespace quant_detail;

size_t ggml_row(GgmlType type, int64_t n_cols) { return static_cast<size_t>(row_bytes(type, n_cols)); }

// 16 bytes of nibbles in Q4_0's order from 32 values 0..15: byte j = v[j] | v[j + 16] << 4.
void put_nibbles(const uint8_t (&v)[32], uint8_t* dst /* (16) */) {
  for (int j = 0; j < 16; ++j) dst[j] = static_cast<uint8_t>((v[j] & 0xF) | ((v[j + 16] & 0xF) << 4));
}

float f16_to_f32(uint16_t h) {
  float f;
  dequantize_row(GgmlType::F16, &h, &f, 1);
  return f;
}

}  // namespace

bool packable(GgmlType type, int64_t n_cols) {
  // The matvec keeps x quantized to int8 in shared memory (n_cols + 8 * n_cols / 32 bytes); 64K columns
  // stay well inside one block's shared memory.
  if (n_cols <= 0 || n_cols > 65536) return false;
  switch (type) {
    case GgmlType::Q8_0:
    case GgmlType::Q4_0:
      return n_cols % 32 == 0;
    case GgmlType::Q4_K:
    case GgmlType::Q6_K:
      return n_cols % 256 == 0;
    default:
      return false;
  }
}

size_t packed_row_stride(GgmlType type, int64_t n_cols) {
  if (!packable(type, n_cols)) fail_kind(ErrorKind::kInternal, "packed_row_stride: ", type_name(type), " x ", n_cols);
  return (ggml_row(type, n_cols) + 15) / 16 * 16;
}

void pack_rows(GgmlType type, const uint8_t* src, size_t src_stride, int64_t n_rows, int64_t n_cols, uint8_t* dst) {
  const size_t stride = packed_row_stride(type, n_cols);
  const int64_t nb = n_cols / 32, nsb = n_cols / 256;
  for (int64_t r = 0; r < n_rows; ++r) {
    const uint8_t* s = src + static_cast<size_t>(r) * src_stride;
    uint8_t* d = dst + static_cast<size_t>(r) * stride;
    std::memset(d, 0, stride);
    switch (type) {
      case GgmlType::Q8_0:
      case GgmlType::Q4_0: {
        // One f16 scale, then the quants (32 bytes, or 16 of nibbles): quants plane, then scales plane.
        const bool q8 = type == GgmlType::Q8_0;
        const int64_t qbytes = q8 ? 32 : 16, bbytes = q8 ? kQ8_0Bytes : kQ4_0Bytes, qs = q8 ? kQ8_0Qs : kQ4_0Qs;
        for (int64_t b = 0; b < nb; ++b) {
          const uint8_t* blk = s + b * bbytes;
          std::memcpy(d + qbytes * b, blk + qs, static_cast<size_t>(qbytes));
          std::memcpy(d + qbytes * nb + 2 * b, blk, 2);
        }
        break;
      }
      case GgmlType::Q4_K:
        for (int64_t sb = 0; sb < nsb; ++sb) {
          const uint8_t* blk = s + sb * kQ4_KBytes;
          std::memcpy(d + 16 * nb + 16 * sb, blk, 16);  // d, dmin, scales[12]
          for (int j = 0; j < 8; ++j) {
            // ggml: sub-block j is the low (j even) or high (j odd) nibble of qs[32 * (j / 2) + l].
            uint8_t v[32];
            for (int l = 0; l < 32; ++l) {
              const uint8_t byte = blk[kQ4_KQs + 32 * (j / 2) + l];
              v[l] = static_cast<uint8_t>((j & 1) ? (byte >> 4) : (byte & 0xF));
            }
            put_nibbles(v, d + 16 * (sb * 8 + j));
          }
        }
        break;
      case GgmlType::Q6_K:
        for (int64_t sb = 0; sb < nsb; ++sb) {
          const uint8_t* blk = s + sb * kQ6_KBytes;
          std::memcpy(d + 26 * nb + 2 * sb, blk + kQ6_KD, 2);
          for (int m = 0; m < 8; ++m) {  // unit m: elements 32m..32m+31 of the super-block
            const int n = m / 4, quarter = m % 4;
            uint8_t lo[32], hi[32];
            for (int l = 0; l < 32; ++l) {
              const uint8_t qlb = blk[64 * n + l + 32 * (quarter & 1)];
              lo[l] = static_cast<uint8_t>((quarter & 2) ? (qlb >> 4) : (qlb & 0xF));
              hi[l] = static_cast<uint8_t>((blk[kQ6_KQh + 32 * n + l] >> (2 * quarter)) & 3);
            }
            const int64_t u = sb * 8 + m;
            put_nibbles(lo, d + 16 * u);
            uint8_t* h = d + 16 * nb + 8 * u;
            for (int e = 0; e < 32; ++e) {  // element e = 4 * (4 * word + shift) + byte
              const int w = e / 4, k = e % 4;
              h[4 * (w / 4) + k] = static_cast<uint8_t>(h[4 * (w / 4) + k] | (hi[e] << (2 * (w % 4))));
            }
            d[24 * nb + 2 * u] = blk[kQ6_KScales + 8 * n + 2 * quarter];
            d[24 * nb + 2 * u + 1] = blk[kQ6_KScales + 8 * n + 2 * quarter + 1];
          }
        }
        break;
      default:
        fail_kind(ErrorKind::kInternal, "pack_rows: ", type_name(type));
    }
  }
}

float packed_element(GgmlType type, const uint8_t* row, int64_t n_cols, int64_t c) {
  const int64_t nb = n_cols / 32, u = c / 32;
  const int e = static_cast<int>(c % 32);
  const auto nibble = [&](const uint8_t* q) { return (e < 16) ? (q[e] & 0xF) : (q[e - 16] >> 4); };
  switch (type) {
    case GgmlType::Q8_0:
      return f16_to_f32(load_u16(row + 32 * nb + 2 * u)) * static_cast<float>(static_cast<int8_t>(row[32 * u + e]));
    case GgmlType::Q4_0:
      return f16_to_f32(load_u16(row + 16 * nb + 2 * u)) * static_cast<float>(nibble(row + 16 * u) - 8);
    case GgmlType::Q4_K: {
      const uint8_t* hdr = row + 16 * nb + 16 * (u / 8);
      int sc, m;
      q4k_scale_min(static_cast<int>(u % 8), hdr + kQ4_KScales, sc, m);
      const float d = f16_to_f32(load_u16(hdr)) * static_cast<float>(sc);
      const float dm = f16_to_f32(load_u16(hdr + kQ4_KDmin)) * static_cast<float>(m);
      return d * static_cast<float>(nibble(row + 16 * u)) - dm;
    }
    case GgmlType::Q6_K: {
      const int w = e / 4, k = e % 4;
      const int hi = (row[16 * nb + 8 * u + 4 * (w / 4) + k] >> (2 * (w % 4))) & 3;
      const int q = (nibble(row + 16 * u) | (hi << 4)) - 32;
      const int8_t sc = static_cast<int8_t>(row[24 * nb + 2 * u + e / 16]);
      return f16_to_f32(load_u16(row + 26 * nb + 2 * (u / 8))) * static_cast<float>(sc) * static_cast<float>(q);
    }
    default:
      fail_kind(ErrorKind::kInternal, "packed_element: ", type_name(type));
  }
}

}  // namespace shardlm::cuda_detail
