#include "core/dtype.h"

#include <algorithm>
#include <array>
#include <cctype>

#include "core/error.h"

namespace shardlm {
namespace {

// Block sizes and bytes per block as defined by ggml (ggml-common.h). The `compute` column marks the
// types with quantize/dequantize and dot kernels here.
constexpr std::array<TypeTraits, 32> kTraits = {{
    {GgmlType::F32, "f32", 1, 4, true},
    {GgmlType::F16, "f16", 1, 2, true},
    {GgmlType::Q4_0, "q4_0", 32, 18, true},
    {GgmlType::Q4_1, "q4_1", 32, 20, true},
    {GgmlType::Q5_0, "q5_0", 32, 22, true},
    {GgmlType::Q5_1, "q5_1", 32, 24, true},
    {GgmlType::Q8_0, "q8_0", 32, 34, true},
    {GgmlType::Q8_1, "q8_1", 32, 36, false},
    {GgmlType::Q2_K, "q2_K", 256, 84, true},
    {GgmlType::Q3_K, "q3_K", 256, 110, true},
    {GgmlType::Q4_K, "q4_K", 256, 144, true},
    {GgmlType::Q5_K, "q5_K", 256, 176, true},
    {GgmlType::Q6_K, "q6_K", 256, 210, true},
    {GgmlType::Q8_K, "q8_K", 256, 292, false},
    {GgmlType::IQ2_XXS, "iq2_xxs", 256, 66, true},
    {GgmlType::IQ2_XS, "iq2_xs", 256, 74, true},
    {GgmlType::IQ3_XXS, "iq3_xxs", 256, 98, true},
    {GgmlType::IQ1_S, "iq1_s", 256, 50, true},
    {GgmlType::IQ4_NL, "iq4_nl", 32, 18, true},
    {GgmlType::IQ3_S, "iq3_s", 256, 110, true},
    {GgmlType::IQ2_S, "iq2_s", 256, 82, true},
    {GgmlType::IQ4_XS, "iq4_xs", 256, 136, true},
    {GgmlType::I8, "i8", 1, 1, false},
    {GgmlType::I16, "i16", 1, 2, false},
    {GgmlType::I32, "i32", 1, 4, false},
    {GgmlType::I64, "i64", 1, 8, false},
    {GgmlType::F64, "f64", 1, 8, false},
    {GgmlType::IQ1_M, "iq1_m", 256, 56, true},
    {GgmlType::BF16, "bf16", 1, 2, true},
    {GgmlType::TQ1_0, "tq1_0", 256, 54, false},
    {GgmlType::TQ2_0, "tq2_0", 256, 66, false},
    {GgmlType::MXFP4, "mxfp4", 32, 17, true},
}};

std::string lower(std::string_view s) {
  std::string r(s);
  std::transform(r.begin(), r.end(), r.begin(), [](unsigned char c) { return std::tolower(c); });
  return r;
}

}  // namespace

const TypeTraits* type_traits(uint32_t raw) {
  for (const auto& t : kTraits)
    if (static_cast<uint32_t>(t.type) == raw) return &t;
  return nullptr;
}

const TypeTraits& type_traits(GgmlType t) {
  const TypeTraits* tr = type_traits(static_cast<uint32_t>(t));
  SHARDLM_CHECK(tr != nullptr, "unknown GgmlType ", static_cast<uint32_t>(t));
  return *tr;
}

int64_t row_bytes(GgmlType t, int64_t n) {
  const TypeTraits& tr = type_traits(t);
  if (n < 0) fail("row length ", n, " is negative");
  if (n % tr.block_size != 0)
    fail("row length ", n, " is not a multiple of the ", tr.name, " block size ", tr.block_size);
  return checked_mul<int64_t>(n / tr.block_size, tr.type_size, "row bytes");
}

std::optional<GgmlType> parse_type(std::string_view s) {
  const std::string l = lower(s);
  for (const auto& t : kTraits)
    if (lower(t.name) == l) return t.type;
  return std::nullopt;
}

double bits_per_weight(GgmlType t) {
  const TypeTraits& tr = type_traits(t);
  return 8.0 * static_cast<double>(tr.type_size) / static_cast<double>(tr.block_size);
}

}  // namespace shardlm
