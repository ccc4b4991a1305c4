// Bytes of models and their shards against public file sizes and hand computations.
#include <gtest/gtest.h>

#include "core/error.h"
#include "config/presets.h"
#include "plan/cost_model.h"

namespace shardlm {
namespace {

// Public GGUF file sizes (GB = 1e9 bytes; bartowski/QuantFactory uploads). Files also hold metadata and
// a tokenizer (a few MB), so the tolerance covers that and quantizer version drift.
TEST(CostModel, WeightBytesMatchPublicFiles) {
  struct Row {
    const char* preset;
    const char* scheme;
    double gb;
    double tol;
  } rows[] = {
      {"llama-3.1-70b", "q4_k_m", 42.52, 0.03}, {"llama-3.1-8b", "q4_k_m", 4.92, 0.03},
      {"llama-3.1-70b", "q4_0", 40.12, 0.03},   {"llama-3.1-70b", "q8_0", 74.98, 0.03},
      {"llama-3.1-8b", "q8_0", 8.54, 0.03},     {"llama-3.1-8b", "f16", 16.07, 0.03},
      {"llama-3.2-1b", "q4_k_m", 0.808, 0.03},  {"qwen2.5-7b", "q4_k_m", 4.68, 0.03},
  };
  for (const Row& r : rows) {
    SCOPED_TRACE(std::string(r.preset) + " " + r.scheme);
    const double got = static_cast<double>(model_desc_from_preset(r.preset, r.scheme).weight_bytes()) / 1e9;
    EXPECT_NEAR(got / r.gb, 1.0, r.tol) << got << " GB";
  }
}

// 70B q4_k_m tensor by tensor: Q4_K = 144 B / 256, Q5_K = 176 / 256, Q6_K = 210 / 256; 40 of the 80
// layers have Q6_K attn_v and ffn_down, the other 40 Q5_K attn_v and Q4_K ffn_down.
TEST(CostModel, Llama70bQ4KMByHand) {
  const int64_t d = 8192, kv = 1024, ff = 28672, V = 128256;
  auto q4k = [](int64_t n) { return n / 256 * 144; };
  auto q5k = [](int64_t n) { return n / 256 * 176; };
  auto q6k = [](int64_t n) { return n / 256 * 210; };
  const int64_t common = q4k(d * d) * 2 + q4k(d * kv) + q4k(2 * d * ff) + 2 * d * 4;  // q, o, k, gate+up, norms
  const int64_t more = q6k(d * kv) + q6k(ff * d), less = q5k(d * kv) + q4k(ff * d);
  const int64_t want = q4k(V * d) + q6k(V * d) + d * 4 + 80 * common + 40 * more + 40 * less;
  EXPECT_EQ(static_cast<int64_t>(model_desc_from_preset("llama-3.1-70b", "q4_k_m").weight_bytes()), want);
}

TEST(CostModel, RankWeightsSplitLikeTheShardRules) {
  const ModelDesc m = model_desc_from_preset("llama-3.1-70b", "q4_k_m");
  const auto r1 = rank_weights(m, 1);
  const auto r2 = rank_weights(m, 2);
  ASSERT_EQ(r2.size(), 2u);
  for (int l : {0, 10, 79}) {
    SCOPED_TRACE(l);
    // Layer matrices split in halves; the two norms (2 x 8192 f32) are replicated on both ranks.
    EXPECT_EQ(r2[0].layer_bytes[l] + r2[1].layer_bytes[l], r1[0].layer_bytes[l] + 2 * 8192 * 4);
    EXPECT_EQ(r2[0].layer_bytes[l], r2[1].layer_bytes[l]);
  }
  EXPECT_EQ(r2[0].token_embd_bytes, r1[0].token_embd_bytes);  // replicated
  EXPECT_EQ(r2[0].output_bytes, 128256 / 2 * (8192 / 256 * 210));
  EXPECT_EQ(r2[0].kv_heads, 4);
  EXPECT_EQ(r2[0].q_heads, 32);
  EXPECT_EQ(r2[0].ff_units, 28672 / 2);
}

TEST(CostModel, BiasesAreShardedByElements) {
  // tiny-qwen2: q bias 256 f32, k/v biases 128 f32 each; at tp 2 each rank holds half of each.
  const ModelDesc m = model_desc_from_preset("tiny-qwen2", "f32");
  const auto r1 = rank_weights(m, 1);
  const auto r2 = rank_weights(m, 2);
  const uint64_t norms = 2 * 256 * 4;
  EXPECT_EQ(r2[0].layer_bytes[0] + r2[1].layer_bytes[0], r1[0].layer_bytes[0] + norms);
}

TEST(CostModel, KvBytesPerTokenLayer) {
  struct Row {
    const char* preset;
    int tp;
    GgmlType kv;
    uint64_t want;  // 2 (K,V) x heads on the rank x head_dim x bytes
  } rows[] = {
      {"llama-3.1-70b", 1, GgmlType::F16, 2 * 8 * 128 * 2},
      {"llama-3.1-70b", 2, GgmlType::F16, 2 * 4 * 128 * 2},
      {"llama-3.1-70b", 2, GgmlType::F32, 2 * 4 * 128 * 4},
      {"llama-3.1-70b", 16, GgmlType::F16, 2 * 1 * 128 * 2},  // KV heads replicated over 2 ranks each
      {"llama-2-7b", 4, GgmlType::F16, 2 * 8 * 128 * 2},
      // Quantized caches: 128 values are 4 blocks of 34 (q8_0) or 18 (q4_0) bytes.
      {"llama-3.1-70b", 2, GgmlType::Q8_0, 2 * 4 * 4 * 34},
      {"llama-3.1-70b", 2, GgmlType::Q4_0, 2 * 4 * 4 * 18},
  };
  for (const Row& r : rows) {
    const ModelDesc m = model_desc_from_preset(r.preset, "q8_0");
    const auto w = rank_weights(m, r.tp);
    EXPECT_EQ(kv_bytes_per_token_layer(m.config, w[0].kv_heads, r.kv), r.want) << r.preset << " tp " << r.tp;
  }
  EXPECT_THROW(kv_bytes_per_token_layer(find_preset("tiny")->config, 1, GgmlType::Q4_K), Error);
}

TEST(CostModel, TensorParallelRespectsHeadAndBlockRules) {
  struct Row {
    const char* preset;
    const char* scheme;
    int tp;
    bool ok;
  } rows[] = {
      {"llama-3.1-70b", "q4_k_m", 2, true},
      {"llama-3.1-70b", "q4_k_m", 8, true},
      {"llama-3.1-70b", "q4_k_m", 16, true},   // 2 ranks per KV head, 4 q heads each
      {"llama-3.1-70b", "q4_k_m", 12, false},  // above n_head_kv and not a multiple of it
      {"llama-2-13b", "q4_k_m", 3, false},     // 13 heads x 128 = 1664 columns cut a 256-block
      {"llama-2-13b", "q8_0", 3, true},        // 32-blocks: fine
      {"tiny", "f32", 3, false},               // 2 KV heads, 4 q heads
      {"tiny", "f32", 4, true},
  };
  for (const Row& r : rows) {
    SCOPED_TRACE(std::string(r.preset) + " " + r.scheme + " tp " + std::to_string(r.tp));
    const ModelDesc m = model_desc_from_preset(r.preset, r.scheme);
    if (r.ok) EXPECT_NO_THROW(rank_weights(m, r.tp));
    else EXPECT_THROW(rank_weights(m, r.tp), Error);
  }
}

}  // namespace
}  // namespace shardlm
