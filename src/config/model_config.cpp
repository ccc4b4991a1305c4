#include "config/model_config.h"

#include <cmath>

#include "core/error.h"
#include "formats/gguf.h"

namespace shardlm {

void ModelConfig::validate() const {
  auto positive = [](const char* field, int64_t v, int64_t limit) {
    if (v < 1 || v > limit) fail("model config: ", field, " = ", v, " is outside [1, ", limit, "]");
  };
  if (arch != "llama" && arch != "qwen2" && arch != "qwen3" && arch != "qwen3moe")
    fail("model config: architecture '", arch, "' is not supported (supported: llama, qwen2, qwen3, qwen3moe)");
  positive("n_vocab", n_vocab, int64_t(1) << 24);
  positive("n_embd", n_embd, int64_t(1) << 17);
  positive("n_layer", n_layer, 4096);
  positive("n_head", n_head, 4096);
  positive("n_head_kv", n_head_kv, 4096);
  positive("head_dim", head_dim, 4096);
  positive("n_ff", n_ff, int64_t(1) << 20);
  positive("n_ctx_train", n_ctx_train, int64_t(1) << 24);
  if (n_head % n_head_kv != 0)
    fail("model config: n_head = ", n_head, " is not a multiple of n_head_kv = ", n_head_kv);
  if (head_dim % 2 != 0) fail("model config: head_dim = ", head_dim, " must be even for RoPE");
  if (arch == "qwen3moe" && n_expert == 0) fail("model config: qwen3moe needs an expert count (expert_count)");
  if (n_expert < 0 || n_expert > 4096) fail("model config: expert_count = ", n_expert, " is outside [0, 4096]");
  if (n_expert > 0) {
    if (n_expert_used < 1 || n_expert_used > n_expert)
      fail("model config: expert_used_count = ", n_expert_used, " is outside [1, expert_count = ", n_expert, "]");
    positive("expert_feed_forward_length", n_ff_exp, int64_t(1) << 20);
  }
  if (!(rms_eps > 0 && rms_eps < 1)) fail("model config: rms_norm_eps = ", rms_eps, " is outside (0, 1)");
  if (!(rope_freq_base > 1 && std::isfinite(rope_freq_base)))
    fail("model config: rope freq_base = ", rope_freq_base, " must be a finite number > 1");
  if (!rope_freq_factors.empty() && static_cast<int64_t>(rope_freq_factors.size()) != head_dim / 2)
    fail("model config: rope_freqs has ", rope_freq_factors.size(), " entries, expected head_dim/2 = ",
         head_dim / 2);
  for (float f : rope_freq_factors)
    if (!(f > 0 && std::isfinite(f))) fail("model config: rope_freqs entry ", f, " must be positive");
}

std::vector<float> llama3_rope_freq_factors(const ModelConfig& c) {
  if (c.rope_scaling.type != "llama3") return {};
  // Meta's reference (and llama.cpp's converter): wavelengths shorter than orig/high_freq_factor keep
  // their frequency, longer than orig/low_freq_factor are divided by `factor`, and the band between
  // is interpolated smoothly.
  const RopeScaling& s = c.rope_scaling;
  const double low_wavelen = double(s.original_context) / s.low_freq_factor;
  const double high_wavelen = double(s.original_context) / s.high_freq_factor;
  std::vector<float> f;
  for (int64_t i = 0; i < c.head_dim / 2; ++i) {
    const double freq = 1.0 / std::pow(double(c.rope_freq_base), 2.0 * double(i) / double(c.head_dim));
    const double wavelen = 2 * M_PI / freq;
    if (wavelen < high_wavelen) {
      f.push_back(1.0f);
    } else if (wavelen > low_wavelen) {
      f.push_back(s.factor);
    } else {
      const double smooth =
          (double(s.original_context) / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
      f.push_back(float(1.0 / ((1 - smooth) / s.factor + smooth)));
    }
  }
  return f;
}

ModelConfig config_from_gguf(const GgufFile& f) {
  ModelConfig c;
  const auto arch = f.get_string("general.architecture");
  if (!arch) fail(f.path(), ": general.architecture is missing (not a model file?)");
  c.arch = *arch;
  if (c.arch != "llama" && c.arch != "qwen2" && c.arch != "qwen3" && c.arch != "qwen3moe")
    fail(f.path(), ": general.architecture '", c.arch, "' is not supported (supported: llama, qwen2, qwen3, qwen3moe)");
  c.name = f.get_string("general.name").value_or("");
  const std::string a = c.arch + ".";
  auto need = [&](const std::string& key) -> int64_t {
    const auto v = f.get_uint(key);
    if (!v) fail(f.path(), ": required key ", key, " is missing");
    return checked_cast<int64_t>(*v, key);
  };
  c.n_embd = need(a + "embedding_length");
  c.n_layer = need(a + "block_count");
  c.n_ff = need(a + "feed_forward_length");
  c.n_head = need(a + "attention.head_count");
  c.n_head_kv = f.get_uint(a + "attention.head_count_kv") ? need(a + "attention.head_count_kv") : c.n_head;
  c.n_ctx_train = need(a + "context_length");
  c.head_dim = f.get_uint(a + "attention.key_length") ? need(a + "attention.key_length")
                                                      : (c.n_head > 0 ? c.n_embd / c.n_head : 0);
  if (const auto rot = f.get_uint(a + "rope.dimension_count"); rot && static_cast<int64_t>(*rot) != c.head_dim)
    fail(f.path(), ": ", a, "rope.dimension_count = ", *rot, " differs from head_dim ", c.head_dim,
         " (partial rotary embeddings are not supported)");
  c.rms_eps = float(f.get_float(a + "attention.layer_norm_rms_epsilon").value_or(1e-5));
  c.rope_freq_base = float(f.get_float(a + "rope.freq_base").value_or(10000.0));
  if (const auto st = f.get_string(a + "rope.scaling.type"); st && *st != "none")
    fail(f.path(), ": ", a, "rope.scaling.type '", *st, "' is not supported (only Llama 3.1's rope_freqs)");
  c.qkv_bias = f.find_tensor("blk.0.attn_q.bias") != nullptr;
  c.qk_norm = f.find_tensor("blk.0.attn_q_norm.weight") != nullptr;
  if (f.get_uint(a + "expert_count") && need(a + "expert_count") > 0) {
    c.n_expert = need(a + "expert_count");
    if (!f.get_uint(a + "expert_used_count")) fail(f.path(), ": ", a, "expert_count is set but ", a, "expert_used_count is missing");
    c.n_expert_used = need(a + "expert_used_count");
    // Mixtral's experts are feed_forward_length wide; qwen3moe names the expert width apart.
    c.n_ff_exp = f.get_uint(a + "expert_feed_forward_length") ? need(a + "expert_feed_forward_length") : c.n_ff;
    // llama.cpp renormalizes the chosen experts' weights for both (its qwen3moe and llama graphs).
    c.expert_weights_norm = true;
  }
  c.tied_output = f.find_tensor("output.weight") == nullptr;
  const GgufTensorInfo* emb = f.find_tensor("token_embd.weight");
  if (!emb) fail(f.path(), ": tensor token_embd.weight is missing");
  c.n_vocab = emb->ne[1];
  if (const auto toks = f.find("tokenizer.ggml.tokens"); toks && toks->array_size() != size_t(c.n_vocab))
    fail(f.path(), ": tokenizer.ggml.tokens has ", toks->array_size(), " entries but token_embd.weight has ",
         c.n_vocab, " rows");
  if (const GgufTensorInfo* rf = f.find_tensor("rope_freqs.weight")) {
    if (rf->type != GgmlType::F32 || rf->n_dims != 1)
      fail(f.path(), ": rope_freqs.weight must be a 1-D f32 tensor");
    const float* p = reinterpret_cast<const float*>(f.tensor_data(*rf));
    c.rope_freq_factors.assign(p, p + rf->ne[0]);
    c.rope_scaling.type = "llama3";
  }
  try {
    c.validate();
  } catch (const Error& e) {
    fail(f.path(), ": ", e.what());
  }
  return c;
}

}  // namespace shardlm
