// Our dequantize_row against llama.cpp's independent numpy decoders (gguf-py's gguf/quants.py), recorded on
// random blocks of every quantized type in tests/data/quant/gguf_py_dequant.bin (see its README.md).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <iterator>
#include <set>
#include <string>
#include <vector>

#include "quant/quant.h"
#include "support/fixtures.h"

namespace shardlm {
namespace {

struct Record {
  GgmlType type;
  std::vector<uint8_t> blocks;
  std::vector<float> values;  // (n) gguf-py's dequantization of `blocks`
};

uint32_t read_u32(const std::vector<uint8_t>& b, size_t& at) {
  if (at + 4 > b.size()) throw std::runtime_error("gguf_py_dequant.bin: truncated record header");
  uint32_t v;
  std::memcpy(&v, b.data() + at, 4);
  at += 4;
  return v;
}

std::vector<Record> load_records() {
  std::ifstream f(test::fixture_path("quant/gguf_py_dequant.bin"), std::ios::binary);
  const std::vector<uint8_t> b((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  std::vector<Record> out;
  size_t at = 0;
  while (at < b.size()) {
    Record r;
    const uint32_t raw_type = read_u32(b, at), n = read_u32(b, at), n_bytes = read_u32(b, at);
    if (type_traits(raw_type) == nullptr) throw std::runtime_error("gguf_py_dequant.bin: unknown type");
    r.type = static_cast<GgmlType>(raw_type);
    if (at + n_bytes + 4ull * n > b.size()) throw std::runtime_error("gguf_py_dequant.bin: truncated record");
    r.blocks.assign(b.begin() + static_cast<std::ptrdiff_t>(at), b.begin() + static_cast<std::ptrdiff_t>(at + n_bytes));
    at += n_bytes;
    r.values.resize(n);
    std::memcpy(r.values.data(), b.data() + at, 4ull * n);
    at += 4ull * n;
    out.push_back(std::move(r));
  }
  return out;
}

TEST(GgufPy, EveryQuantizedTypeDecodesAsGgufPyDoes) {
  const auto records = load_records();
  std::set<GgmlType> seen;
  for (const Record& r : records) {
    SCOPED_TRACE(type_name(r.type));
    const int64_t n = static_cast<int64_t>(r.values.size());
    ASSERT_EQ(row_bytes(r.type, n), static_cast<int64_t>(r.blocks.size()));
    std::vector<float> ours(r.values.size());
    dequantize_row(r.type, r.blocks.data(), ours.data(), n);
    // gguf-py evaluates the same products in float32 but not always in the same order (e.g. (d*sc)*q vs
    // d*(sc*q)), which moves a value by a few ulps of its largest factor; any decoding error (a wrong
    // nibble, sign, grid entry or scale) moves it by at least one quantization step, orders of magnitude
    // more. So: 4 ulps of the value plus 4 ulps of the block's largest magnitude for cancellation.
    const int64_t bs = block_size(r.type);
    for (int64_t b = 0; b < n / bs; ++b) {
      float amax = 0;
      for (int64_t i = b * bs; i < (b + 1) * bs; ++i) amax = std::max(amax, std::fabs(r.values[i]));
      for (int64_t i = b * bs; i < (b + 1) * bs; ++i) {
        const double tol = 4 * 0x1p-24 * (std::fabs(r.values[i]) + amax);
        ASSERT_NEAR(ours[i], r.values[i], tol) << "element " << i << " (block " << b << ")";
      }
    }
    seen.insert(r.type);
  }
  // The recording must cover every quantized type we read (a type added later needs a new recording).
  for (uint32_t raw = 0; raw < 64; ++raw) {
    const TypeTraits* tr = type_traits(raw);
    if (tr == nullptr || !tr->compute || tr->block_size == 1) continue;
    EXPECT_TRUE(seen.count(tr->type)) << tr->name << " is not in gguf_py_dequant.bin";
  }
}

}  // namespace
}  // namespace shardlm
