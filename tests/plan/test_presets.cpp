// Presets against the models' published sizes and llama.cpp's per-tensor quantization choices.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "config/presets.h"
#include "core/error.h"
#include "plan/cost_model.h"
#include "support/fixtures.h"

namespace shardlm {
namespace {

// Parameter count by hand: embeddings (+ untied output), the final norm, and per layer two norms,
// q/k/v/o and the three FFN matrices (+ q/k/v biases for qwen2).
int64_t hand_params(int64_t V, int64_t d, int64_t L, int64_t q, int64_t kv, int64_t ff, bool tied, bool bias) {
  const int64_t per_layer = 2 * d + 2 * d * q + 2 * d * kv + 3 * d * ff + (bias ? q + 2 * kv : 0);
  return V * d * (tied ? 1 : 2) + d + L * per_layer;
}

TEST(Presets, ParameterCountsMatchHandFormulaAndPublishedSizes) {
  struct Row {
    const char* preset;
    int64_t hand;
    double published;  // 0 = no public figure checked
  } rows[] = {
      {"llama-3.1-8b", hand_params(128256, 4096, 32, 4096, 1024, 14336, false, false), 8.03e9},
      {"llama-3.1-70b", hand_params(128256, 8192, 80, 8192, 1024, 28672, false, false), 70.6e9},
      {"llama-3.1-405b", hand_params(128256, 16384, 126, 16384, 1024, 53248, false, false), 405.9e9},
      {"llama-3.2-1b", hand_params(128256, 2048, 16, 2048, 512, 8192, true, false), 1.24e9},
      {"llama-2-7b", hand_params(32000, 4096, 32, 4096, 4096, 11008, false, false), 6.74e9},
      {"llama-2-13b", hand_params(32000, 5120, 40, 5120, 5120, 13824, false, false), 13.0e9},
      {"qwen2.5-7b", hand_params(152064, 3584, 28, 3584, 512, 18944, false, true), 7.62e9},
      {"qwen2.5-72b", hand_params(152064, 8192, 80, 8192, 1024, 29568, false, true), 72.7e9},
  };
  for (const Row& r : rows) {
    SCOPED_TRACE(r.preset);
    const ModelDesc m = model_desc_from_preset(r.preset, "f16");
    EXPECT_EQ(m.n_params(), r.hand);
    EXPECT_NEAR(static_cast<double>(m.n_params()) / r.published, 1.0, 0.005);
  }
}

TEST(Presets, HyperParameters) {
  const ModelConfig& c31 = find_preset("llama-3.1-8b")->config;
  EXPECT_EQ(c31.n_vocab, 128256);
  EXPECT_FLOAT_EQ(c31.rope_freq_base, 500000.0f);
  EXPECT_EQ(c31.rope_scaling.type, "llama3");
  EXPECT_FLOAT_EQ(c31.rope_scaling.factor, 8.0f);
  EXPECT_EQ(c31.rope_scaling.original_context, 8192);
  const ModelConfig& l2 = find_preset("LLAMA-2-7B")->config;  // names are case-insensitive
  EXPECT_EQ(l2.n_vocab, 32000);
  EXPECT_FLOAT_EQ(l2.rope_freq_base, 10000.0f);
  const ModelConfig& q = find_preset("qwen2.5-7b")->config;
  EXPECT_TRUE(q.qkv_bias);
  EXPECT_EQ(q.head_dim, 128);
  EXPECT_FLOAT_EQ(q.rope_freq_base, 1e6f);
  EXPECT_TRUE(find_preset("llama-3.2-1b")->config.tied_output);
  EXPECT_EQ(find_preset("nope"), nullptr);
  for (const Preset& p : presets()) {
    SCOPED_TRACE(p.name);
    EXPECT_EQ(p.config.n_head % p.config.n_head_kv, 0);
    // Qwen3 gives head_dim apart (Qwen3-30B-A3B: 32 heads of 128 on a 2048-wide model).
    if (p.config.arch != "qwen3" && p.config.arch != "qwen3moe") {
      EXPECT_EQ(p.config.head_dim * p.config.n_head, p.config.n_embd);
    }
  }
  const ModelConfig& q3 = find_preset("qwen3-8b")->config;
  EXPECT_TRUE(q3.qk_norm);
  EXPECT_FALSE(q3.qkv_bias);
  EXPECT_EQ(q3.head_dim, 128);
  EXPECT_EQ(q3.n_layer, 36);
  EXPECT_EQ(q3.n_ff, 12288);
  const ModelConfig& t3 = find_preset("tiny-qwen3")->config;
  EXPECT_EQ(t3.q_dim(), 2 * t3.n_embd);  // q wider than the hidden state
}

TEST(Presets, TensorListInGgufOrder) {
  const ModelConfig& c = find_preset("tiny-qwen2")->config;
  const auto t = model_tensors(c);
  // token_embd + 4 layers x (2 norms + 7 matrices + 3 biases) + output_norm + output
  ASSERT_EQ(t.size(), 1u + 4u * 12u + 2u);
  EXPECT_EQ(t.front().name, "token_embd.weight");
  EXPECT_EQ(t[1].name, "blk.0.attn_norm.weight");
  EXPECT_EQ(t[2].name, "blk.0.attn_q.weight");
  EXPECT_EQ(t[3].name, "blk.0.attn_q.bias");
  EXPECT_EQ(t.back().name, "output.weight");
  EXPECT_EQ(t[2].ne, (std::vector<int64_t>{256, 256}));
  const auto tied = model_tensors(find_preset("llama-3.2-1b")->config);
  EXPECT_EQ(tied.back().name, "output_norm.weight");
}

// Expected types per llama.cpp's llama_tensor_get_type (src/llama-quant.cpp), worked by hand.
TEST(Presets, TensorTypesFollowLlamaCpp) {
  struct Row {
    const char* preset;
    const char* scheme;
    const char* tensor;
    GgmlType want;
  } rows[] = {
      // q4_k_m on 80 layers: use_more_bits = layers 0-9, 70-79 and 12, 15, ..., 69.
      {"llama-3.1-70b", "q4_k_m", "output.weight", GgmlType::Q6_K},
      {"llama-3.1-70b", "q4_k_m", "token_embd.weight", GgmlType::Q4_K},
      {"llama-3.1-70b", "q4_k_m", "blk.0.ffn_down.weight", GgmlType::Q6_K},
      {"llama-3.1-70b", "q4_k_m", "blk.10.ffn_down.weight", GgmlType::Q4_K},
      {"llama-3.1-70b", "q4_k_m", "blk.12.ffn_down.weight", GgmlType::Q6_K},
      {"llama-3.1-70b", "q4_k_m", "blk.13.ffn_down.weight", GgmlType::Q4_K},
      {"llama-3.1-70b", "q4_k_m", "blk.79.ffn_down.weight", GgmlType::Q6_K},
      {"llama-3.1-70b", "q4_k_m", "blk.12.attn_v.weight", GgmlType::Q6_K},
      {"llama-3.1-70b", "q4_k_m", "blk.11.attn_v.weight", GgmlType::Q5_K},  // the 70B bump
      {"llama-3.1-70b", "q4_k_m", "blk.11.attn_q.weight", GgmlType::Q4_K},
      {"llama-3.1-70b", "q4_k_m", "blk.11.attn_norm.weight", GgmlType::F32},
      // 32 layers: use_more_bits = 0-3, 28-31 and 6, 9, ..., 27; no 70B bump.
      {"llama-3.1-8b", "q4_k_m", "blk.5.attn_v.weight", GgmlType::Q4_K},
      {"llama-3.1-8b", "q4_k_m", "blk.6.attn_v.weight", GgmlType::Q6_K},
      {"llama-3.2-1b", "q4_k_m", "token_embd.weight", GgmlType::Q6_K},  // tied: treated as the output
      {"llama-3.1-70b", "q4_0", "output.weight", GgmlType::Q6_K},
      {"llama-3.1-70b", "q4_0", "token_embd.weight", GgmlType::Q4_0},
      {"llama-3.1-70b", "q4_0", "blk.0.ffn_down.weight", GgmlType::Q4_0},
      {"llama-3.1-70b", "q8_0", "output.weight", GgmlType::Q8_0},
      {"llama-3.1-70b", "q6_k", "blk.3.attn_q.weight", GgmlType::Q6_K},
      {"llama-3.1-70b", "bf16", "output.weight", GgmlType::BF16},
      {"llama-3.1-70b", "f16", "blk.0.attn_norm.weight", GgmlType::F32},
      // Qwen2.5 72B: n_ff 29568 is not a multiple of 256, so ffn_down falls back (Q4_K->Q5_0, Q6_K->Q8_0).
      {"qwen2.5-72b", "q4_k_m", "blk.10.ffn_down.weight", GgmlType::Q5_0},
      {"qwen2.5-72b", "q4_k_m", "blk.0.ffn_down.weight", GgmlType::Q8_0},
      {"qwen2.5-72b", "q4_k_m", "blk.0.attn_q.bias", GgmlType::F32},
      // tiny: 64-wide rows fall back; the output (ne0 64) becomes Q8_0.
      {"tiny", "q4_k_m", "blk.1.attn_q.weight", GgmlType::Q5_0},
      {"tiny", "q4_k_m", "output.weight", GgmlType::Q8_0},
      {"tiny", "q6_k", "blk.1.attn_q.weight", GgmlType::Q8_0},
      {"tiny-k", "q4_k_m", "blk.1.attn_q.weight", GgmlType::Q4_K},
  };
  for (const Row& r : rows) {
    SCOPED_TRACE(std::string(r.preset) + " " + r.scheme + " " + r.tensor);
    const ModelDesc m = model_desc_from_preset(r.preset, r.scheme);
    const TensorDesc* t = m.find(r.tensor);
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(type_name(t->type), std::string(type_name(r.want)));
  }
}

TEST(Presets, UnknownNamesAreClearErrors) {
  try {
    model_desc_from_preset("llama-9", "q4_k_m");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'llama-9'"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("llama-3.1-8b"), std::string::npos) << e.what();
  }
  try {
    model_desc_from_preset("llama-3.1-8b", "q3_k_xl");  // not one of llama-quantize's names
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("q3_k_xl"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("q4_k_m"), std::string::npos) << e.what();
  }
}

// Every tensor of every test preset under every scheme, with and without an importance matrix ("+imatrix"),
// against the types llama.cpp's llama-quantize gave the same tensors (recorded by
// scripts/record_llama_quantize_types.py, read back with gguf-py): the presets cover 64-wide rows (fallbacks),
// GQA 2 and 4, 4 and 16 layers, qwen2 biases, and mixtures of 8 experts (qwen3moe, Mixtral: 3-D expert
// tensors and llama.cpp's 8-expert rules for attention).
TEST(Presets, EveryTensorTypeMatchesLlamaQuantize) {
  std::ifstream f(test::fixture_path("quant/llama_quantize_types.json"));
  const auto j = nlohmann::json::parse(f);
  int checked = 0;
  for (const auto& [preset, schemes] : j.at("presets").items()) {
    const Preset* p = find_preset(preset);
    ASSERT_NE(p, nullptr) << preset;
    const auto specs = model_tensors(p->config);
    ASSERT_FALSE(schemes.empty());
    for (const auto& [key, types] : schemes.items()) {
      const bool imatrix = key.size() > 8 && key.compare(key.size() - 8, 8, "+imatrix") == 0;
      const std::string scheme = imatrix ? key.substr(0, key.size() - 8) : key;
      ASSERT_TRUE(is_known_scheme(scheme)) << scheme;
      EXPECT_EQ(scheme_needs_imatrix(scheme), imatrix && schemes.find(scheme) == schemes.end()) << key;
      EXPECT_EQ(types.size(), specs.size()) << preset << " " << scheme;
      for (const TensorSpec& t : specs) {
        ASSERT_TRUE(types.contains(t.name)) << preset << " " << scheme << " " << t.name;
        const auto want = parse_type(types.at(t.name).get<std::string>());
        ASSERT_TRUE(want.has_value()) << types.at(t.name);
        EXPECT_EQ(std::string(type_name(tensor_type_for_scheme(scheme, t, p->config, imatrix))), type_name(*want))
            << preset << " " << key << " " << t.name;
        ++checked;
      }
    }
  }
  EXPECT_GT(checked, 10000);
}

}  // namespace
}  // namespace shardlm
