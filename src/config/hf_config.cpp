#include "config/hf_config.h"

#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "formats/safetensors.h"

namespace shardlm {

using nlohmann::json;

namespace {

// config.json files are a few kB; the cap only bounds what a wrong path can make us read.
constexpr uint64_t kMaxConfigBytes = 16 << 20;

// Reads fields of one JSON object and names `prefix.key` in errors. Absent and null mean the same:
// transformers writes null for "not set" (e.g. sliding_window, head_dim).
class Fields {
 public:
  Fields(const json& j, std::string file, std::string prefix)
      : j_(j), file_(std::move(file)), prefix_(std::move(prefix)) {}

  const json* get(const char* key) const {
    auto it = j_.find(key);
    return (it == j_.end() || it->is_null()) ? nullptr : &*it;
  }
  std::string field(const char* key) const { return prefix_.empty() ? key : prefix_ + "." + key; }

  std::optional<int64_t> opt_int(const char* key, int64_t min) const {
    const json* v = get(key);
    if (!v) return std::nullopt;
    // 256.0 is a JSON float: counts must be written as integers.
    if (!v->is_number_integer())
      fail(file_, ": field '", field(key), "' = ", v->dump(), " is not an integer");
    if (v->is_number_unsigned() && v->get<uint64_t>() > static_cast<uint64_t>(INT64_MAX))
      fail(file_, ": field '", field(key), "' = ", v->dump(), " is out of range");
    const int64_t x = v->get<int64_t>();
    if (x < min) fail(file_, ": field '", field(key), "' = ", x, " is below the minimum ", min);
    // Sizes multiply into tensor byte counts; 2^31 per dimension is far past any real model and keeps
    // every product of two of them inside int64.
    if (x > (int64_t{1} << 31)) fail(file_, ": field '", field(key), "' = ", x, " exceeds the limit 2^31");
    return x;
  }
  int64_t req_int(const char* key, int64_t min) const {
    auto v = opt_int(key, min);
    if (!v) fail(file_, ": missing field '", field(key), "'");
    return *v;
  }
  std::optional<double> opt_num(const char* key) const {
    const json* v = get(key);
    if (!v) return std::nullopt;
    if (!v->is_number()) fail(file_, ": field '", field(key), "' = ", v->dump(), " is not a number");
    const double x = v->get<double>();
    if (!std::isfinite(x)) fail(file_, ": field '", field(key), "' = ", v->dump(), " is not finite");
    return x;
  }
  double req_num(const char* key) const {
    auto v = opt_num(key);
    if (!v) fail(file_, ": missing field '", field(key), "'");
    return *v;
  }
  std::optional<bool> opt_bool(const char* key) const {
    const json* v = get(key);
    if (!v) return std::nullopt;
    if (!v->is_boolean()) fail(file_, ": field '", field(key), "' = ", v->dump(), " is not a boolean");
    return v->get<bool>();
  }
  std::optional<std::string> opt_str(const char* key) const {
    const json* v = get(key);
    if (!v) return std::nullopt;
    if (!v->is_string()) fail(file_, ": field '", field(key), "' = ", v->dump(), " is not a string");
    return v->get<std::string>();
  }
  const std::string& file() const { return file_; }

 private:
  const json& j_;
  std::string file_;
  std::string prefix_;
};

// RoPE base and scaling from one of the two spellings. `spec` is rope_parameters (5.x: theta inside)
// or rope_scaling (4.x: theta at the top level); null when the file has neither.
void read_rope(const Fields& top, const json* spec, const char* spec_name, ModelConfig& c) {
  const std::string& file = top.file();
  std::optional<double> theta = top.opt_num("rope_theta");
  std::string type = "default";
  if (spec) {
    if (!spec->is_object()) fail(file, ": field '", spec_name, "' is a JSON ", spec->type_name(), ", expected an object");
    Fields s(*spec, file, spec_name);
    if (auto t = s.opt_num("rope_theta")) theta = t;
    // 4.x files from before transformers 4.45 spell the key "type".
    if (auto t = s.opt_str("rope_type")) {
      type = *t;
    } else if (auto t2 = s.opt_str("type")) {
      type = *t2;
    }
    if (type == "llama3") {
      RopeScaling& r = c.rope_scaling;
      r.type = "llama3";
      r.factor = static_cast<float>(s.req_num("factor"));
      r.low_freq_factor = static_cast<float>(s.req_num("low_freq_factor"));
      r.high_freq_factor = static_cast<float>(s.req_num("high_freq_factor"));
      r.original_context = s.req_int("original_max_position_embeddings", 1);
      if (!(r.factor >= 1.0f)) fail(file, ": field '", s.field("factor"), "' = ", r.factor, " must be >= 1");
      if (!(r.low_freq_factor > 0.0f))
        fail(file, ": field '", s.field("low_freq_factor"), "' = ", r.low_freq_factor, " must be > 0");
      // The llama3 formula divides by (high - low).
      if (!(r.high_freq_factor > r.low_freq_factor))
        fail(file, ": field '", s.field("high_freq_factor"), "' = ", r.high_freq_factor,
             " must exceed low_freq_factor = ", r.low_freq_factor);
    } else if (type != "default") {
      fail_kind(ErrorKind::kUnsupported, file, ": field '", s.field("rope_type"), "' = '", type,
                "' is not supported (supported: default, llama3)");
    }
  }
  // transformers' Llama, Mistral and Qwen2 configs all default rope_theta to 10000 when it is unset.
  const double base = theta.value_or(10000.0);
  if (!(base > 0.0)) fail(file, ": field 'rope_theta' = ", base, " must be > 0");
  c.rope_freq_base = static_cast<float>(base);
}

}  // namespace

HfConfig parse_hf_config(std::string_view json_text, const std::string& name) {
  const json j = parse_json_checked(json_text, name);
  if (!j.is_object()) fail(name, ": is a JSON ", j.type_name(), ", expected an object");
  const Fields f(j, name, "");
  HfConfig h;
  ModelConfig& c = h.model;

  const json* archs = f.get("architectures");
  if (!archs) fail(name, ": missing field 'architectures'");
  if (!archs->is_array() || archs->empty() || !(*archs)[0].is_string())
    fail(name, ": field 'architectures' = ", archs->dump(), " is not a non-empty array of strings");
  h.architecture = (*archs)[0].get<std::string>();
  const bool llama = h.architecture == "LlamaForCausalLM";
  const bool mistral = h.architecture == "MistralForCausalLM";
  const bool qwen2 = h.architecture == "Qwen2ForCausalLM";
  const bool qwen3moe = h.architecture == "Qwen3MoeForCausalLM";
  const bool mixtral = h.architecture == "MixtralForCausalLM";
  const bool qwen3 = h.architecture == "Qwen3ForCausalLM" || qwen3moe;
  if (!llama && !mistral && !qwen2 && !qwen3 && !mixtral)
    fail_kind(ErrorKind::kUnsupported, name, ": field 'architectures' = '", h.architecture,
              "' is not supported (supported: LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM, "
              "Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM)");
  // Mistral and Mixtral are the llama graph (GGUF calls them "llama" too; Mixtral with experts); Qwen2 adds
  // q/k/v biases; Qwen3 drops them (attention_bias, false in published checkpoints) and norms each q/k head.
  c.arch = qwen2 ? "qwen2" : qwen3moe ? "qwen3moe" : qwen3 ? "qwen3" : "llama";
  c.qkv_bias = qwen2 || (qwen3 && f.opt_bool("attention_bias").value_or(false));
  c.qk_norm = qwen3;
  if (qwen3moe || mixtral) {
    // Published checkpoints (transformers 4.x) say num_experts for Qwen3-MoE; transformers 5 writes
    // num_local_experts, Mixtral's name.
    const char* count_key = f.get("num_local_experts") ? "num_local_experts" : "num_experts";
    c.n_expert = f.req_int(count_key, 1);
    c.n_expert_used = f.req_int("num_experts_per_tok", 1);
    if (c.n_expert_used > c.n_expert)
      fail(name, ": field 'num_experts_per_tok' = ", c.n_expert_used, " exceeds '", count_key, "' = ", c.n_expert);
    c.expert_weights_norm = qwen3moe ? f.opt_bool("norm_topk_prob").value_or(false) : true;
  }
  if (qwen3moe) {
    if (const json* dense = f.get("mlp_only_layers"); dense && !(dense->is_array() && dense->empty()))
      fail_kind(ErrorKind::kUnsupported, name, ": field 'mlp_only_layers' = ", dense->dump(),
                " is not supported (every layer must be a mixture of experts)");
    if (auto step = f.opt_int("decoder_sparse_step", 1); step && *step != 1)
      fail_kind(ErrorKind::kUnsupported, name, ": field 'decoder_sparse_step' = ", *step,
                " is not supported (every layer must be a mixture of experts)");
  }
  c.name = f.opt_str("_name_or_path").value_or("");
  if (c.name.empty()) c.name = f.opt_str("model_type").value_or(h.architecture);

  if (auto act = f.opt_str("hidden_act"); act && *act != "silu")
    fail_kind(ErrorKind::kUnsupported, name, ": field 'hidden_act' = '", *act, "' is not supported (supported: silu)");
  if (!qwen2 && !qwen3 && f.opt_bool("attention_bias").value_or(false))
    fail_kind(ErrorKind::kUnsupported, name, ": field 'attention_bias' = true is not supported for ", h.architecture);
  if (f.opt_bool("mlp_bias").value_or(false))
    fail_kind(ErrorKind::kUnsupported, name, ": field 'mlp_bias' = true is not supported");

  c.n_vocab = f.req_int("vocab_size", 1);
  c.n_embd = f.req_int("hidden_size", 1);
  c.n_layer = f.req_int("num_hidden_layers", 1);
  c.n_head = f.req_int("num_attention_heads", 1);
  // transformers: num_key_value_heads unset means multi-head attention.
  c.n_head_kv = f.opt_int("num_key_value_heads", 1).value_or(c.n_head);
  if (c.n_head % c.n_head_kv != 0)
    fail(name, ": field 'num_attention_heads' = ", c.n_head, " is not a multiple of 'num_key_value_heads' = ",
         c.n_head_kv);
  if (auto hd = f.opt_int("head_dim", 1)) {
    c.head_dim = *hd;
  } else {
    if (c.n_embd % c.n_head != 0)
      fail(name, ": field 'hidden_size' = ", c.n_embd, " is not a multiple of 'num_attention_heads' = ", c.n_head,
           " and 'head_dim' is not given");
    c.head_dim = c.n_embd / c.n_head;
  }
  if (c.head_dim % 2 != 0) fail(name, ": head_dim = ", c.head_dim, " must be even (RoPE rotates pairs)");
  c.n_ff = f.req_int("intermediate_size", 1);
  if (c.moe()) c.n_ff_exp = qwen3moe ? f.req_int("moe_intermediate_size", 1) : c.n_ff;
  h.max_position_embeddings = f.req_int("max_position_embeddings", 1);
  c.n_ctx_train = h.max_position_embeddings;
  const double eps = f.req_num("rms_norm_eps");
  if (!(eps > 0.0 && eps < 1.0)) fail(name, ": field 'rms_norm_eps' = ", eps, " must be in (0, 1)");
  c.rms_eps = static_cast<float>(eps);
  c.tied_output = f.opt_bool("tie_word_embeddings").value_or(false);

  if (const json* rp = f.get("rope_parameters")) {
    read_rope(f, rp, "rope_parameters", c);
  } else {
    read_rope(f, f.get("rope_scaling"), "rope_scaling", c);
  }
  c.rope_freq_factors = llama3_rope_freq_factors(c);

  h.dtype = f.opt_str("dtype").value_or(f.opt_str("torch_dtype").value_or(""));

  // Qwen2 writes a sliding_window value even when use_sliding_window is false; only the flag counts.
  const bool window_used = (qwen2 || qwen3) ? f.opt_bool("use_sliding_window").value_or(false) : (mistral || llama || mixtral);
  if (window_used) {
    if (auto w = f.opt_int("sliding_window", 1)) {
      h.sliding_window = *w;
      if (*w < c.n_ctx_train) {
        h.notes.push_back(cat("sliding_window ", *w, " < max_position_embeddings ", c.n_ctx_train,
                              ": context limited to ", *w, " positions (full attention equals the window there)"));
        c.n_ctx_train = *w;
      }
    }
  }
  try {
    c.validate();
  } catch (const Error& e) {
    fail(name, ": ", e.what());
  }
  return h;
}

HfConfig load_hf_config(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const std::string file = fs::is_directory(path, ec) ? (fs::path(path) / "config.json").string() : path;
  return parse_hf_config(read_small_file(file, kMaxConfigBytes), file);
}

}  // namespace shardlm
