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

// Quantization schemes by llama-quantize's names: f32, f16, bf16, q8_0, q6_k, q5_k_m, q5_k_s, q5_1, q5_0,
// q4_k_m, q4_k_s, q4_1, q4_0, iq4_nl, iq4_xs, q3_k_l, q3_k_m, q3_k_s, iq3_m, iq3_s, q2_k, and those that need an
// importance matrix: iq3_xs, iq3_xxs, q2_k_s, iq2_m, iq2_s, iq2_xs, iq2_xxs, iq1_m, iq1_s (case-insensitive).
// The type of each tensor follows what llama.cpp's quantizer produces for that scheme, with or without an
// importance matrix (norms and biases stay F32; output, attn_v, ffn_down and attn_output get more bits by its
// rules; a tensor whose row length does not fit the block size falls back as llama.cpp does).
bool is_known_scheme(std::string_view scheme);
std::string scheme_names();
// llama.cpp's llama_ftype of a scheme (general.file_type), or -1 when `scheme` is not one.
int scheme_file_type(std::string_view scheme);
// Whether llama-quantize refuses `scheme` without an importance matrix.
bool scheme_needs_imatrix(std::string_view scheme);
// Whether a tensor of this name may not be written as `type` without its importance (llama.cpp's
// tensor_requires_imatrix: the IQ1/IQ2/IQ3_XXS types, except for token_embd and output).
bool tensor_needs_imatrix(std::string_view name, GgmlType type);
// `imatrix`: whether the file is quantized with an importance matrix (a few of llama.cpp's rules depend on it;
// the schemes that need one assume it).
GgmlType tensor_type_for_scheme(std::string_view scheme, const TensorSpec& t, const ModelConfig& c,
                                bool imatrix = false);

}  // namespace shardlm
