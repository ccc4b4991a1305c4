// Hyper-parameters of a Llama-family model, parsed once (from GGUF metadata, config.json or a preset)
// and passed by value everywhere else.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace shardlm {

class GgufFile;

struct RopeScaling {
  // Llama 3.1 "llama3" frequency scaling; type "none" leaves frequencies alone.
  std::string type = "none";
  float factor = 1.0f;
  float low_freq_factor = 1.0f;
  float high_freq_factor = 4.0f;
  int64_t original_context = 8192;
};

struct ModelConfig {
  std::string arch = "llama";  // GGUF general.architecture: "llama", "qwen2", "qwen3" or "qwen3moe"
  std::string name;            // general.name, informative
  int64_t n_vocab = 0;
  int64_t n_embd = 0;          // hidden size
  int64_t n_layer = 0;
  int64_t n_head = 0;          // query heads
  int64_t n_head_kv = 0;       // key/value heads (GQA when < n_head)
  int64_t head_dim = 0;        // usually n_embd / n_head
  int64_t n_ff = 0;            // FFN hidden size
  int64_t n_ctx_train = 0;     // trained context length
  float rms_eps = 1e-5f;
  float rope_freq_base = 10000.0f;
  RopeScaling rope_scaling;
  // (head_dim / 2) divisors of the rotary frequencies, as GGUF's rope_freqs.weight stores them for
  // Llama 3.1; empty means none. Filled from rope_scaling by rope_freq_factors() when a file has no table.
  std::vector<float> rope_freq_factors;
  bool qkv_bias = false;       // qwen2
  bool qk_norm = false;        // qwen3: an RMS norm (weights of head_dim) on every q and k head before RoPE
  bool tied_output = false;    // output matrix is token_embd (no output.weight)
  // Mixture of experts (qwen3moe; Mixtral is `llama` with experts): every layer's FFN is n_expert experts of
  // width n_ff_exp, of which a router picks n_expert_used per token (softmax over all, then the top k, their
  // weights renormalized to sum 1 when expert_weights_norm). n_expert == 0: dense FFN of width n_ff.
  int64_t n_expert = 0;
  int64_t n_expert_used = 0;
  int64_t n_ff_exp = 0;
  bool expert_weights_norm = true;

  // llama.cpp's "NEOX" rotary layout (qwen2, qwen3): rotate halves of each head rather than adjacent pairs. The
  // loader permutes q/k rows of such models into adjacent pairs, so files keep llama.cpp's convention.
  bool rope_neox() const { return arch == "qwen2" || arch == "qwen3" || arch == "qwen3moe"; }
  bool moe() const { return n_expert > 0; }
  // Width of one FFN (an expert's when moe()).
  int64_t ffn_width() const { return moe() ? n_ff_exp : n_ff; }
  int64_t q_dim() const { return n_head * head_dim; }
  int64_t kv_dim() const { return n_head_kv * head_dim; }
  // Throws Error naming the first inconsistent field (zero sizes, n_head % n_head_kv != 0, ...).
  void validate() const;
};

// Llama 3.1 "llama3" scaling as per-frequency divisors (the formula of Meta's reference and llama.cpp's
// converter); empty when rope_scaling.type is "none".
std::vector<float> llama3_rope_freq_factors(const ModelConfig& c);

// The context a run gets when none is asked for (generate, serve, bench, the engine, plan): the trained
// context, at most 4096 (a KV cache of the whole 128K context of Llama 3.1 would be 16 GiB at 8B); 4096
// when the model does not say.
inline int64_t default_context(const ModelConfig& c) {
  return c.n_ctx_train > 0 ? (c.n_ctx_train < 4096 ? c.n_ctx_train : 4096) : 4096;
}

// Reads {arch}.* keys; throws Error naming the key for anything missing or out of range.
ModelConfig config_from_gguf(const GgufFile& f);

}  // namespace shardlm
