// Device-side decoding of ggml's block formats, one element at a time (for get_rows, the dequantize-to-16
// bit pass of prefill and the generic matvec fallback). Layouts as in ggml-common.h / src/quant/blocks.h;
// rows may start at any 2-byte-aligned address, so multi-byte fields are read as bytes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "core/dtype.h"

namespace shardlm::cuda_detail {

__device__ __forceinline__ float f16_bits(uint16_t h) { return __half2float(__ushort_as_half(h)); }
__device__ __forceinline__ float bf16_bits(uint16_t h) { return __uint_as_float(static_cast<uint32_t>(h) << 16); }
__device__ __forceinline__ uint16_t rd16(const uint8_t* p) {
  return static_cast<uint16_t>(p[0] | (static_cast<uint16_t>(p[1]) << 8));
}

// Element c of a row of `type` starting at `row`.
__device__ inline float dq_elem(GgmlType type, const uint8_t* row, int64_t c) {
  switch (type) {
    case GgmlType::F32: {
      uint32_t u = rd16(row + 4 * c) | (static_cast<uint32_t>(rd16(row + 4 * c + 2)) << 16);
      return __uint_as_float(u);
    }
    case GgmlType::F16:
      return f16_bits(rd16(row + 2 * c));
    case GgmlType::BF16:
      return bf16_bits(rd16(row + 2 * c));
    case GgmlType::Q8_0: {  // fp16 d; int8 qs[32]
      const uint8_t* b = row + (c / 32) * 34;
      return f16_bits(rd16(b)) * static_cast<float>(static_cast<int8_t>(b[2 + c % 32]));
    }
    case GgmlType::Q4_0: {  // fp16 d; qs[16]: element j low nibble of qs[j], j+16 high nibble
      const uint8_t* b = row + (c / 32) * 18;
      int j = static_cast<int>(c % 32);
      int q = (j < 16) ? (b[2 + j] & 0xF) : (b[2 + j - 16] >> 4);
      return f16_bits(rd16(b)) * static_cast<float>(q - 8);
    }
    case GgmlType::Q4_K: {  // fp16 d, dmin; scales[12]; qs[128]
      const uint8_t* b = row + (c / 256) * 144;
      int e = static_cast<int>(c % 256), s = e / 32, l = e % 32;
      const uint8_t* sc = b + 4;
      int scale, mn;
      if (s < 4) {
        scale = sc[s] & 63;
        mn = sc[s + 4] & 63;
      } else {
        scale = (sc[s + 4] & 0xF) | ((sc[s - 4] >> 6) << 4);
        mn = (sc[s + 4] >> 4) | ((sc[s] >> 6) << 4);
      }
      uint8_t byte = b[16 + 32 * (s / 2) + l];
      int q = (s & 1) ? (byte >> 4) : (byte & 0xF);
      return f16_bits(rd16(b)) * scale * q - f16_bits(rd16(b + 2)) * mn;
    }
    case GgmlType::Q6_K: {  // ql[128]; qh[64]; int8 scales[16]; fp16 d
      const uint8_t* b = row + (c / 256) * 210;
      int e = static_cast<int>(c % 256), n = e / 128, r = e % 128, quarter = r / 32, l = r % 32;
      const uint8_t* ql = b + 64 * n;
      const uint8_t* qh = b + 128 + 32 * n;
      const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192 + 8 * n);
      int lo = (quarter & 1) ? ql[l + 32] : ql[l];
      lo = (quarter & 2) ? (lo >> 4) : (lo & 0xF);
      int hi = (qh[l] >> (2 * quarter)) & 3;
      int q = (lo | (hi << 4)) - 32;
      return f16_bits(rd16(b + 208)) * sc[l / 16 + 2 * quarter] * q;
    }
    default:
      return 0.0f;  // unreachable: the host refuses unsupported types before launching
  }
}

}  // namespace shardlm::cuda_detail
