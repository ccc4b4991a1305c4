// The CUDA backend's packed weight layout (src/backends/cuda/pack.h), on the host: packing must keep every
// element's value bit for bit (checked against the quant library's ggml decoder, an independent reading
// of the same bytes), keep the row size, and only pad rows to 16 bytes. Runs without a GPU.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <vector>

#include "backends/cuda/pack.h"
#include "core/dtype.h"
#include "quant/quant.h"

namespace shardlm::cuda_detail {
namespace {

// Random bytes everywhere (every quant bit pattern occurs), then finite fp16 scales where the format has
// them, so that the decoded values are finite and comparable bit for bit.
std::vector<uint8_t> random_rows(std::mt19937_64& rng, GgmlType t, int64_t rows, int64_t cols) {
  const size_t rb = static_cast<size_t>(row_bytes(t, cols));
  std::vector<uint8_t> b(rb * rows);
  std::uniform_int_distribution<int> byte(0, 255), mant(0, 1023), ex(10, 17);
  for (auto& x : b) x = static_cast<uint8_t>(byte(rng));
  auto f16 = [&](uint8_t* p) {
    const uint16_t h = static_cast<uint16_t>((byte(rng) & 1) << 15 | ex(rng) << 10 | mant(rng));
    std::memcpy(p, &h, 2);
  };
  for (int64_t r = 0; r < rows; ++r) {
    uint8_t* row = b.data() + r * rb;
    switch (t) {
      case GgmlType::Q8_0:
        for (int64_t u = 0; u < cols / 32; ++u) f16(row + 34 * u);
        break;
      case GgmlType::Q4_0:
        for (int64_t u = 0; u < cols / 32; ++u) f16(row + 18 * u);
        break;
      case GgmlType::Q4_K:
        for (int64_t s = 0; s < cols / 256; ++s) {
          f16(row + 144 * s);
          f16(row + 144 * s + 2);
        }
        break;
      case GgmlType::Q6_K:
        for (int64_t s = 0; s < cols / 256; ++s) f16(row + 210 * s + 208);
        break;
      default: ADD_FAILURE();
    }
  }
  return b;
}

TEST(CudaPack, EveryElementKeepsItsValueAndRowsKeepTheirSize) {
  std::mt19937_64 rng(7);
  for (GgmlType t : {GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_K, GgmlType::Q6_K})
    for (int64_t cols : {96, 256, 768, 1280, 4096}) {
      if (!packable(t, cols)) {
        EXPECT_NE(cols % 256, 0) << type_name(t) << " " << cols;
        continue;
      }
      SCOPED_TRACE(std::string(type_name(t)) + " x " + std::to_string(cols));
      const int64_t rows = 5;
      const size_t rb = static_cast<size_t>(row_bytes(t, cols)), ps = packed_row_stride(t, cols);
      EXPECT_EQ(ps % 16, 0u);
      EXPECT_GE(ps, rb);
      EXPECT_LT(ps, rb + 16);
      const auto src = random_rows(rng, t, rows, cols);
      std::vector<uint8_t> dst(ps * rows, 0xAB);
      pack_rows(t, src.data(), rb, rows, cols, dst.data());
      std::vector<float> want(static_cast<size_t>(cols));
      for (int64_t r = 0; r < rows; ++r) {
        dequantize_row(t, src.data() + r * rb, want.data(), cols);
        int bad = 0;
        for (int64_t c = 0; c < cols && bad < 5; ++c) {
          const float got = packed_element(t, dst.data() + r * ps, cols, c);
          if (std::memcmp(&got, &want[c], 4) != 0) {
            ADD_FAILURE() << "row " << r << " col " << c << ": packed " << got << ", ggml " << want[c];
            ++bad;
          }
        }
        for (size_t i = rb; i < ps; ++i) EXPECT_EQ(dst[r * ps + i], 0) << "padding byte " << i << " of row " << r;
      }
    }
}

TEST(CudaPack, OnlyWholeBlocksOfSupportedTypesArePacked) {
  EXPECT_TRUE(packable(GgmlType::Q4_0, 32));
  EXPECT_FALSE(packable(GgmlType::Q4_0, 48));
  EXPECT_FALSE(packable(GgmlType::Q4_K, 128));
  EXPECT_TRUE(packable(GgmlType::Q6_K, 65536));
  EXPECT_FALSE(packable(GgmlType::Q6_K, 65536 + 256));  // x would not fit the kernel's shared memory
  EXPECT_FALSE(packable(GgmlType::F16, 4096));
  EXPECT_FALSE(packable(GgmlType::BF16, 4096));
}

}  // namespace
}  // namespace shardlm::cuda_detail
