// Element types with the numbering and byte layouts of ggml/GGUF, so that tensors move between GGUF files,
// our kernels and llama.cpp without conversion.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace shardlm {

// Values are ggml's `enum ggml_type`; they appear verbatim in GGUF tensor infos.
enum class GgmlType : uint32_t {
  F32 = 0,
  F16 = 1,
  Q4_0 = 2,
  Q4_1 = 3,
  Q5_0 = 6,
  Q5_1 = 7,
  Q8_0 = 8,
  Q8_1 = 9,
  Q2_K = 10,
  Q3_K = 11,
  Q4_K = 12,
  Q5_K = 13,
  Q6_K = 14,
  Q8_K = 15,
  IQ2_XXS = 16,
  IQ2_XS = 17,
  IQ3_XXS = 18,
  IQ1_S = 19,
  IQ4_NL = 20,
  IQ3_S = 21,
  IQ2_S = 22,
  IQ4_XS = 23,
  I8 = 24,
  I16 = 25,
  I32 = 26,
  I64 = 27,
  F64 = 28,
  IQ1_M = 29,
  BF16 = 30,
  TQ1_0 = 34,
  TQ2_0 = 35,
  MXFP4 = 39,  // gpt-oss experts: e8m0 scale + 32 e2m1 values
};

struct TypeTraits {
  GgmlType type;
  const char* name;     // ggml's spelling, e.g. "q4_K"
  int64_t block_size;   // elements per block (1 for plain types)
  int64_t type_size;    // bytes per block
  bool compute;         // we have kernels for it (load, matmul, quantize); others are inspect-only
};

// nullptr when `raw` is not a ggml type we know (GGUF readers must reject such tensors by name).
const TypeTraits* type_traits(uint32_t raw);
const TypeTraits& type_traits(GgmlType t);

inline int64_t block_size(GgmlType t) { return type_traits(t).block_size; }
inline int64_t type_size(GgmlType t) { return type_traits(t).type_size; }
inline const char* type_name(GgmlType t) { return type_traits(t).name; }

// Bytes of one row of `n` elements. Throws if `n` is not a multiple of the block size or overflows.
int64_t row_bytes(GgmlType t, int64_t n);

// Parses "f32", "F16", "bf16", "q8_0", "Q4_K", "q6_k" ... (case-insensitive). nullopt if unknown.
std::optional<GgmlType> parse_type(std::string_view s);

// Average bits per weight, for reports and the planner.
double bits_per_weight(GgmlType t);

}  // namespace shardlm
