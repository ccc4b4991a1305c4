// inspect: what a model file holds, from its metadata and tensor table alone (no tensor data is read).
#include <cstdio>
#include <filesystem>
#include <map>
#include <string>

#include <nlohmann/json.hpp>

#include "cli_common.h"
#include "commands.h"
#include "core/error.h"
#include "formats/gguf.h"

namespace shardlm {
namespace {

std::string value_text(const GgufValue& v) {
  switch (v.type) {
    case GgufType::STRING: {
      std::string s = std::get<std::string>(v.scalar);
      if (s.size() > 80) s = s.substr(0, 77) + "...";
      return "\"" + s + "\"";
    }
    case GgufType::BOOL: return std::get<bool>(v.scalar) ? "true" : "false";
    case GgufType::FLOAT32:
    case GgufType::FLOAT64: return cat(std::get<double>(v.scalar));
    case GgufType::INT8:
    case GgufType::INT16:
    case GgufType::INT32:
    case GgufType::INT64: return cat(std::get<int64_t>(v.scalar));
    case GgufType::ARRAY: return cat("[", gguf_type_name(v.array_type), " x ", v.array_size(), "]");
    default: return cat(std::get<uint64_t>(v.scalar));
  }
}

}  // namespace

int cmd_inspect(int argc, const char* const* argv) {
  CLI::App app("Show a model's architecture, hyper-parameters and tensors (types, shapes, bytes).", "inspect");
  std::string path;
  bool json = false, no_tensors = false;
  app.add_option("model", path, "GGUF file or Hugging Face directory")->required();
  app.add_flag("--json", json, "machine-readable output");
  app.add_flag("--no-tensors", no_tensors, "omit the tensor table");
  if (int rc = parse_cli(app, argc, argv); rc >= 0) return rc;

  nlohmann::json j;
  std::error_code ec;
  std::vector<std::tuple<std::string, GgmlType, std::vector<int64_t>, uint64_t>> tensors;
  std::string format;
  std::optional<ModelConfig> config;
  std::unique_ptr<GgufFile> gguf;
  std::unique_ptr<ModelSource> src;
  if (std::filesystem::is_directory(path, ec)) {
    src = open_model(path);
    format = src->format_name();
    config = src->config();
    for (const auto& t : src->tensors())
      tensors.emplace_back(t.name, t.type, std::vector<int64_t>(t.ne.begin(), t.ne.begin() + t.n_dims), t.n_bytes);
  } else {
    gguf = GgufFile::open(path);
    format = cat("gguf v", gguf->version());
    if (gguf->find("general.architecture")) config = config_from_gguf(*gguf);
    for (const auto& t : gguf->tensors())
      tensors.emplace_back(t.name, t.type, std::vector<int64_t>(t.ne.begin(), t.ne.begin() + t.n_dims), t.n_bytes);
  }
  uint64_t n_params = 0, n_bytes = 0;
  struct TypeTotal {
    uint64_t tensors = 0, params = 0, bytes = 0;
  };
  std::map<std::string, TypeTotal> by_type;  // llama-quantize's mix at a glance (e.g. q4_K + q6_K for q4_k_m)
  for (const auto& [name, type, ne, bytes] : tensors) {
    if (name == "rope_freqs.weight") continue;  // a table derived from the config, not a parameter
    uint64_t n = 1;
    for (int64_t x : ne) n *= static_cast<uint64_t>(x);
    n_params += n;
    n_bytes += bytes;
    TypeTotal& tt = by_type[type_name(type)];
    ++tt.tensors;
    tt.params += n;
    tt.bytes += bytes;
  }
  j["path"] = path;
  j["format"] = format;
  j["n_params"] = n_params;
  j["weight_bytes"] = n_bytes;
  j["types"] = nlohmann::json::object();
  for (const auto& [type, tt] : by_type)
    j["types"][type] = {{"tensors", tt.tensors}, {"params", tt.params}, {"bytes", tt.bytes}};
  if (config) {
    const ModelConfig& c = *config;
    j["config"] = {{"arch", c.arch}, {"name", c.name}, {"n_vocab", c.n_vocab}, {"n_embd", c.n_embd},
                   {"n_layer", c.n_layer}, {"n_head", c.n_head}, {"n_head_kv", c.n_head_kv},
                   {"head_dim", c.head_dim}, {"n_ff", c.n_ff}, {"n_ctx_train", c.n_ctx_train},
                   {"rms_eps", c.rms_eps}, {"rope_freq_base", c.rope_freq_base},
                   {"rope_scaling", c.rope_scaling.type}, {"qkv_bias", c.qkv_bias}, {"qk_norm", c.qk_norm},
                   {"tied_output", c.tied_output}};
    if (c.moe())
      j["config"].update({{"expert_count", c.n_expert}, {"expert_used_count", c.n_expert_used},
                          {"expert_feed_forward_length", c.n_ff_exp}, {"expert_weights_norm", c.expert_weights_norm}});
  }
  if (gguf) {
    nlohmann::json kv = nlohmann::json::object();
    for (const auto& e : gguf->kvs()) kv[e.key] = value_text(e.value);
    j["metadata"] = kv;
  }
  if (!no_tensors) {
    j["tensors"] = nlohmann::json::array();
    for (const auto& [name, type, ne, bytes] : tensors)
      j["tensors"].push_back({{"name", name}, {"type", type_name(type)}, {"shape", ne}, {"bytes", bytes}});
  }
  if (json) {
    std::printf("%s\n", j.dump(2, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
    return 0;
  }
  std::printf("%s (%s)\n", path.c_str(), format.c_str());
  if (config) {
    const ModelConfig& c = *config;
    std::printf("  architecture %s%s%s\n", c.arch.c_str(), c.name.empty() ? "" : ", ", c.name.c_str());
    std::printf("  vocab %lld, embedding %lld, layers %lld, heads %lld (kv %lld, dim %lld), ffn %lld, context %lld\n",
                (long long)c.n_vocab, (long long)c.n_embd, (long long)c.n_layer, (long long)c.n_head,
                (long long)c.n_head_kv, (long long)c.head_dim, (long long)c.n_ff, (long long)c.n_ctx_train);
    std::printf("  rms eps %g, rope base %g, rope scaling %s, qkv bias %s, q/k norm %s, tied output %s\n", c.rms_eps,
                c.rope_freq_base, c.rope_scaling.type.c_str(), c.qkv_bias ? "yes" : "no", c.qk_norm ? "yes" : "no",
                c.tied_output ? "yes" : "no");
    if (c.moe())
      std::printf("  experts: expert_count %lld, expert_used_count %lld per token, width %lld, weights %s\n",
                  (long long)c.n_expert, (long long)c.n_expert_used, (long long)c.n_ff_exp,
                  c.expert_weights_norm ? "renormalized to sum 1" : "the softmax probabilities");
  }
  std::printf("  parameters %.4g (%llu), weights %s in %zu tensors\n", double(n_params), (unsigned long long)n_params,
              human_bytes(n_bytes).c_str(), tensors.size());
  for (const auto& [type, tt] : by_type)
    std::printf("    %-8s %4llu tensors  %10s  %5.2f bits per weight\n", type.c_str(), (unsigned long long)tt.tensors,
                human_bytes(tt.bytes).c_str(), tt.params ? 8.0 * double(tt.bytes) / double(tt.params) : 0.0);
  if (gguf) {
    std::printf("metadata:\n");
    for (const auto& e : gguf->kvs()) std::printf("  %-44s %s\n", e.key.c_str(), value_text(e.value).c_str());
  }
  if (!no_tensors) {
    std::printf("tensors:\n");
    for (const auto& [name, type, ne, bytes] : tensors) {
      std::string shape;
      for (size_t i = 0; i < ne.size(); ++i) shape += (i ? " x " : "") + std::to_string(ne[i]);
      std::printf("  %-32s %-6s %-22s %s\n", name.c_str(), type_name(type), shape.c_str(), human_bytes(bytes).c_str());
    }
  }
  return 0;
}

}  // namespace shardlm
