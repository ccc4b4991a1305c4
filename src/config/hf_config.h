// Hugging Face config.json -> ModelConfig, for LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM.
//
// Both spellings transformers has written are read: 4.x puts RoPE settings at the top level
// (`rope_theta`, `rope_scaling` {rope_type|type, factor, ...}) and the dtype in `torch_dtype`; 5.x puts
// them in `rope_parameters` {rope_type, rope_theta, factor, ...} and `dtype`. A missing required field,
// a wrong JSON type or an architecture we do not run is an Error naming the field.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "config/model_config.h"

namespace shardlm {

struct HfConfig {
  ModelConfig model;            // arch "llama" (Llama, Mistral) or "qwen2"; rope_freq_factors filled
  std::string architecture;     // architectures[0], e.g. "MistralForCausalLM"
  std::string dtype;            // "bfloat16", "float16", "float32" or "" when absent (informative)
  int64_t max_position_embeddings = 0;  // as written; model.n_ctx_train may be smaller (sliding window)
  // Set when the model attends to a sliding window of this many positions. Up to the window, sliding and
  // full causal attention are the same computation, so model.n_ctx_train is capped at the window and
  // longer contexts are refused rather than computed wrongly.
  std::optional<int64_t> sliding_window;
  std::vector<std::string> notes;  // human-readable remarks (e.g. the context cap above) for logs
};

// `name` (usually the file path) appears in every error.
HfConfig parse_hf_config(std::string_view json_text, const std::string& name);
// Reads and parses `<dir>/config.json` or a config.json path.
HfConfig load_hf_config(const std::string& path);

}  // namespace shardlm
