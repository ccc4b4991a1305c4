// Named model shapes (gen-model, plan) and the per-tensor type of each quantization scheme.
#pragma once

#include <array>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "config/model_config.h"
#include "core/dtype.h"

namespace shardlm {

struct Preset {
  std::string name;         // "llama-3.1-8b"
  std::string description;  // one line for --help and plan output
  ModelConfig config;
};

const std::vector<Preset>& presets();
const Preset* find_preset(std::string_view name);  // nullptr if unknown
std::string preset_names();                        // "a, b, c" for error messages

// Every weight tensor of a Llama-family model with GGUF names and ggml-order shapes
// (token_embd.weight, blk.{i}.attn_norm.weight, blk.{i}.attn_q.weight [+ .bias for qwen2], attn_k,
// attn_v, attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down, output_norm.weight, output.weight
// unless tied), in file order.
struct TensorSpec {
  std::string name;
  std::vector<int64_t> ne;  // ggml order, ne[0] = row length
  int layer = -1;           // -1 outside the repeating blocks
};
std::vector<TensorSpec> model_tensors(const ModelConfig& c);

// Quantization schemes: "f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q6_k". The type of each
// tensor follows what llama.cpp's quantizer produces for that scheme (norms and biases stay F32;
// q4_k_m puts Q6_K on output.weight and on half of attn_v/ffn_down by llama.cpp's rule; a tensor whose
// row length does not fit the block size falls back as llama.cpp does).
bool is_known_scheme(std::string_view scheme);
std::string scheme_names();
GgmlType tensor_type_for_scheme(std::string_view scheme, const TensorSpec& t, const ModelConfig& c);

}  // namespace shardlm
