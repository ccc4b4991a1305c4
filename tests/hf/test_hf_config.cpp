// config.json -> ModelConfig for the transformers 4.x and 5.x spellings, checked against the values
// written in the fixtures' config.json and against transformers' llama3 formula computed in Python.
#include <gtest/gtest.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "config/hf_config.h"
#include "formats/safetensors.h"
#include "hf_test_util.h"

namespace shardlm {
namespace {

using nlohmann::json;
using test::expect_error;

json fixture_json(const std::string& name) {
  return json::parse(read_small_file(test::hf_fixture(name) + "/config.json", 1 << 20));
}
HfConfig parse_json(const json& j) { return parse_hf_config(j.dump(), "config.json"); }

TEST(HfConfig, Llama31BothFormsAgree) {
  const HfConfig v5 = load_hf_config(test::hf_fixture("tiny-llama31"));
  const HfConfig v4 = load_hf_config(test::hf_fixture("tiny-llama31-v4config/config.json"));
  for (const HfConfig* h : {&v5, &v4}) {
    const ModelConfig& c = h->model;
    EXPECT_EQ(h->architecture, "LlamaForCausalLM");
    EXPECT_EQ(h->dtype, "bfloat16");
    EXPECT_EQ(c.arch, "llama");
    EXPECT_EQ(c.n_vocab, 1024);
    EXPECT_EQ(c.n_embd, 256);
    EXPECT_EQ(c.n_layer, 4);
    EXPECT_EQ(c.n_head, 8);
    EXPECT_EQ(c.n_head_kv, 2);
    EXPECT_EQ(c.head_dim, 32);
    EXPECT_EQ(c.n_ff, 768);
    EXPECT_EQ(c.n_ctx_train, 2048);
    EXPECT_FLOAT_EQ(c.rms_eps, 1e-5f);
    EXPECT_FLOAT_EQ(c.rope_freq_base, 500000.0f);
    EXPECT_TRUE(c.tied_output);
    EXPECT_FALSE(c.qkv_bias);
    EXPECT_EQ(c.rope_scaling.type, "llama3");
    EXPECT_FLOAT_EQ(c.rope_scaling.factor, 8.0f);
    EXPECT_FLOAT_EQ(c.rope_scaling.low_freq_factor, 1.0f);
    EXPECT_FLOAT_EQ(c.rope_scaling.high_freq_factor, 4.0f);
    EXPECT_EQ(c.rope_scaling.original_context, 64);
    // inv_freq / inv_freq_llama from transformers' _compute_llama3_parameters (theta 5e5, dim 32,
    // factor 8, low 1, high 4, original 64), evaluated in Python.
    const std::vector<float> want = {1.0f, 1.0f, 2.442259f, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8};
    ASSERT_EQ(c.rope_freq_factors.size(), want.size());
    for (size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(c.rope_freq_factors[i], want[i], 1e-5 * want[i]) << i;
  }
  const ModelConfig& a = v5.model;
  const ModelConfig& b = v4.model;
  EXPECT_EQ(a.rope_freq_factors, b.rope_freq_factors);
  EXPECT_EQ(a.n_ctx_train, b.n_ctx_train);
  EXPECT_EQ(a.rope_freq_base, b.rope_freq_base);
  EXPECT_EQ(a.n_head_kv, b.n_head_kv);
}

TEST(HfConfig, Llama2DefaultRope) {
  const ModelConfig c = load_hf_config(test::hf_fixture("tiny-llama2")).model;
  EXPECT_EQ(c.arch, "llama");
  EXPECT_EQ(c.n_vocab, 512);
  EXPECT_EQ(c.n_head_kv, 8);
  EXPECT_EQ(c.n_ctx_train, 512);
  EXPECT_FALSE(c.tied_output);
  EXPECT_EQ(c.rope_scaling.type, "none");
  EXPECT_TRUE(c.rope_freq_factors.empty());
  EXPECT_FLOAT_EQ(c.rope_freq_base, 10000.0f);
}

TEST(HfConfig, Qwen2) {
  const HfConfig h = load_hf_config(test::hf_fixture("tiny-qwen2"));
  const ModelConfig& c = h.model;
  EXPECT_EQ(c.arch, "qwen2");
  EXPECT_TRUE(c.qkv_bias);
  EXPECT_EQ(c.head_dim, 32);  // no head_dim field: hidden_size 256 / 8 heads
  EXPECT_EQ(c.n_head_kv, 4);
  EXPECT_EQ(c.n_vocab, 640);
  EXPECT_FLOAT_EQ(c.rms_eps, 1e-6f);
  EXPECT_FLOAT_EQ(c.rope_freq_base, 1e6f);
  EXPECT_FALSE(h.sliding_window.has_value());
  // Qwen2 ignores sliding_window unless use_sliding_window is true.
  json j = fixture_json("tiny-qwen2");
  j["sliding_window"] = 128;
  EXPECT_EQ(parse_json(j).model.n_ctx_train, 512);
  j["use_sliding_window"] = true;
  EXPECT_EQ(parse_json(j).model.n_ctx_train, 128);
}

TEST(HfConfig, MistralSlidingWindow) {
  const HfConfig h = load_hf_config(test::hf_fixture("tiny-mistral"));
  EXPECT_EQ(h.architecture, "MistralForCausalLM");
  EXPECT_EQ(h.model.arch, "llama");
  EXPECT_EQ(h.model.n_vocab, 700);
  EXPECT_FALSE(h.sliding_window.has_value());  // null in the file
  json j = fixture_json("tiny-mistral");
  j["sliding_window"] = 128;
  const HfConfig w = parse_json(j);
  ASSERT_TRUE(w.sliding_window.has_value());
  EXPECT_EQ(*w.sliding_window, 128);
  EXPECT_EQ(w.model.n_ctx_train, 128);  // capped: beyond the window our full attention would differ
  EXPECT_EQ(w.max_position_embeddings, 512);
  ASSERT_EQ(w.notes.size(), 1u);
  EXPECT_NE(w.notes[0].find("sliding_window 128"), std::string::npos);
  j["sliding_window"] = 4096;  // wider than the context: no effect
  EXPECT_EQ(parse_json(j).model.n_ctx_train, 512);
}

TEST(HfConfig, OldRopeScalingTypeKey) {
  // transformers < 4.45 wrote rope_scaling.type instead of rope_type.
  json j = fixture_json("tiny-llama31-v4config");
  j["rope_scaling"].erase("rope_type");
  j["rope_scaling"]["type"] = "llama3";
  EXPECT_EQ(parse_json(j).model.rope_scaling.type, "llama3");
}

TEST(HfConfigBad, MissingAndWrongFields) {
  for (const char* field : {"hidden_size", "vocab_size", "num_hidden_layers", "num_attention_heads",
                            "intermediate_size", "max_position_embeddings", "rms_norm_eps", "architectures"}) {
    json j = fixture_json("tiny-llama2");
    j.erase(field);
    expect_error([&] { parse_json(j); }, {"config.json", std::string("missing field '") + field + "'"});
  }
  json j = fixture_json("tiny-llama2");
  j["num_hidden_layers"] = 4.5;
  expect_error([&] { parse_json(j); }, {"'num_hidden_layers' = 4.5", "not an integer"});
  j = fixture_json("tiny-llama2");
  j["num_attention_heads"] = 0;
  expect_error([&] { parse_json(j); }, {"'num_attention_heads' = 0", "below the minimum 1"});
  j = fixture_json("tiny-llama2");
  j["num_key_value_heads"] = 3;
  expect_error([&] { parse_json(j); }, {"not a multiple of 'num_key_value_heads' = 3"});
  j = fixture_json("tiny-llama2");
  j["tie_word_embeddings"] = "yes";
  expect_error([&] { parse_json(j); }, {"'tie_word_embeddings'", "not a boolean"});
  j = fixture_json("tiny-llama2");
  j["rms_norm_eps"] = -1;
  expect_error([&] { parse_json(j); }, {"'rms_norm_eps'", "(0, 1)"});
  expect_error([] { parse_hf_config("[1]", "c.json"); }, {"c.json", "expected an object"});
  expect_error([] { parse_hf_config(R"({"vocab_size":1,"vocab_size":2})", "c.json"); }, {"duplicate JSON key 'vocab_size'"});
}

TEST(HfConfigBad, UnsupportedArchitectureAndRope) {
  json j = fixture_json("tiny-llama2");
  j["architectures"] = {"GPT2LMHeadModel"};
  expect_error([&] { parse_json(j); }, {"'architectures' = 'GPT2LMHeadModel'", "not supported"}, ErrorKind::kUnsupported);
  j = fixture_json("tiny-llama2");
  j["rope_parameters"]["rope_type"] = "yarn";
  expect_error([&] { parse_json(j); }, {"'rope_parameters.rope_type' = 'yarn'", "not supported"}, ErrorKind::kUnsupported);
  j = fixture_json("tiny-llama31-v4config");
  j["rope_scaling"]["rope_type"] = "linear";
  expect_error([&] { parse_json(j); }, {"'rope_scaling.rope_type' = 'linear'"}, ErrorKind::kUnsupported);
  j = fixture_json("tiny-llama31-v4config");
  j["rope_scaling"].erase("factor");
  expect_error([&] { parse_json(j); }, {"missing field 'rope_scaling.factor'"});
  j = fixture_json("tiny-llama31");
  j["rope_parameters"]["high_freq_factor"] = 1.0;
  expect_error([&] { parse_json(j); }, {"'rope_parameters.high_freq_factor'", "must exceed low_freq_factor"});
  j = fixture_json("tiny-llama2");
  j["hidden_act"] = "gelu";
  expect_error([&] { parse_json(j); }, {"'hidden_act' = 'gelu'"}, ErrorKind::kUnsupported);
  j = fixture_json("tiny-llama2");
  j["attention_bias"] = true;
  expect_error([&] { parse_json(j); }, {"'attention_bias'"}, ErrorKind::kUnsupported);
}

TEST(HfConfigBad, HeadDimFromHidden) {
  json j = fixture_json("tiny-qwen2");
  j["num_attention_heads"] = 3;
  j["num_key_value_heads"] = 1;
  expect_error([&] { parse_json(j); }, {"'hidden_size' = 256 is not a multiple of 'num_attention_heads' = 3"});
  j["head_dim"] = 64;  // an explicit head_dim needs no divisibility
  EXPECT_EQ(parse_json(j).model.head_dim, 64);
}

}  // namespace
}  // namespace shardlm
