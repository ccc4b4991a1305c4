// HF checkpoint directories as ModelSource: GGUF names, reversed shapes, dtypes kept, q/k rows permuted
// from rotate-half to adjacent pairs, and every mismatch with config.json refused by name.
#include <gtest/gtest.h>

#include <cstring>
#include <map>
#include <nlohmann/json.hpp>

#include "formats/safetensors.h"
#include "hf_test_util.h"
#include "loader/hf_source.h"

namespace shardlm {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using test::expect_error;

// ModelSource::find_tensor lives in the loader's model_source.cpp; look up by hand so this test does
// not depend on it.
const SourceTensor* find(const ModelSource& s, const std::string& name) {
  for (const auto& t : s.tensors())
    if (t.name == name) return &t;
  return nullptr;
}

TEST(HfNames, Mapping) {
  EXPECT_EQ(hf_to_gguf_name("model.embed_tokens.weight"), "token_embd.weight");
  EXPECT_EQ(hf_to_gguf_name("model.norm.weight"), "output_norm.weight");
  EXPECT_EQ(hf_to_gguf_name("lm_head.weight"), "output.weight");
  EXPECT_EQ(hf_to_gguf_name("model.layers.0.self_attn.q_proj.weight"), "blk.0.attn_q.weight");
  EXPECT_EQ(hf_to_gguf_name("model.layers.12.self_attn.k_proj.bias"), "blk.12.attn_k.bias");
  EXPECT_EQ(hf_to_gguf_name("model.layers.3.self_attn.o_proj.weight"), "blk.3.attn_output.weight");
  EXPECT_EQ(hf_to_gguf_name("model.layers.3.mlp.gate_proj.weight"), "blk.3.ffn_gate.weight");
  EXPECT_EQ(hf_to_gguf_name("model.layers.3.mlp.up_proj.weight"), "blk.3.ffn_up.weight");
  EXPECT_EQ(hf_to_gguf_name("model.layers.3.mlp.down_proj.weight"), "blk.3.ffn_down.weight");
  EXPECT_EQ(hf_to_gguf_name("model.layers.3.input_layernorm.weight"), "blk.3.attn_norm.weight");
  EXPECT_EQ(hf_to_gguf_name("model.layers.3.post_attention_layernorm.weight"), "blk.3.ffn_norm.weight");
  EXPECT_EQ(hf_to_gguf_name("model.layers.x.mlp.up_proj.weight"), "");
  EXPECT_EQ(hf_to_gguf_name("model.layers.01.mlp.up_proj.weight"), "");
  EXPECT_EQ(hf_to_gguf_name("model.layers.1.mlp.up_proj.bias"), "");
  EXPECT_EQ(hf_to_gguf_name("model.layers.1"), "");
}

TEST(HfRotary, PermutationOfHandMadeRows) {
  // Rows labelled by their index. numpy: arange(8).reshape(2, 2, 2).swapaxes(1, 2).reshape(8) is
  // [0, 2, 1, 3, 4, 6, 5, 7]: each head's halves [0 1 | 2 3] interleave to pairs (0,2), (1,3).
  const std::vector<uint8_t> src = {0, 1, 2, 3, 4, 5, 6, 7};
  std::vector<uint8_t> dst(8, 0xEE);
  permute_rotary_rows(src.data(), dst.data(), 2, 4, 1);
  EXPECT_EQ(dst, (std::vector<uint8_t>{0, 2, 1, 3, 4, 6, 5, 7}));

  // One head of 6 rows of 2 bytes: halves [0 1 2 | 3 4 5] -> 0, 3, 1, 4, 2, 5; whole rows move.
  std::vector<uint8_t> s2(12), d2(12, 0xEE);
  for (size_t i = 0; i < s2.size(); ++i) s2[i] = static_cast<uint8_t>(10 * (i / 2) + i % 2);
  permute_rotary_rows(s2.data(), d2.data(), 1, 6, 2);
  EXPECT_EQ(d2, (std::vector<uint8_t>{0, 1, 30, 31, 10, 11, 40, 41, 20, 21, 50, 51}));
}

struct Case {
  const char* dir;
  size_t n_tensors;
  bool tied;
  bool bias;
  int64_t n_vocab;
  int64_t kv_dim;
};
const Case kCases[] = {
    {"tiny-llama2", 4 * 9 + 3, false, false, 512, 256},
    {"tiny-llama31", 4 * 9 + 2, true, false, 1024, 64},
    {"tiny-llama31-v4config", 4 * 9 + 2, true, false, 1024, 64},
    {"tiny-qwen2", 4 * 12 + 3, false, true, 640, 128},
    {"tiny-mistral", 4 * 9 + 3, false, false, 700, 128},
};

TEST(HfSource, FixturesNamesShapesTypes) {
  for (const Case& k : kCases) {
    SCOPED_TRACE(k.dir);
    const std::string dir = test::hf_fixture(k.dir);
    auto s = open_hf_model_source(dir);
    EXPECT_EQ(s->format_name(), "hf-safetensors");
    EXPECT_EQ(s->path(), dir);
    EXPECT_EQ(s->vocab(), nullptr);  // the fixtures ship no tokenizer.json
    EXPECT_EQ(s->tensors().size(), k.n_tensors);
    for (const auto& t : s->tensors()) EXPECT_EQ(t.type, GgmlType::BF16) << t.name;
    const int64_t n_embd = 256, n_ff = 768;
    auto expect_ne = [&](const std::string& name, std::vector<int64_t> ne) {
      const SourceTensor* t = find(*s, name);
      ASSERT_NE(t, nullptr) << name;
      ASSERT_EQ(t->n_dims, static_cast<int>(ne.size())) << name;
      for (size_t d = 0; d < ne.size(); ++d) EXPECT_EQ(t->ne[d], ne[d]) << name << " ne[" << d << "]";
      int64_t n = 1;
      for (int64_t x : ne) n *= x;
      EXPECT_EQ(t->n_bytes, static_cast<uint64_t>(n * 2)) << name;
      EXPECT_NE(t->data, nullptr);
    };
    expect_ne("token_embd.weight", {n_embd, k.n_vocab});
    expect_ne("output_norm.weight", {n_embd});
    for (int i = 0; i < 4; ++i) {
      const std::string b = "blk." + std::to_string(i) + ".";
      expect_ne(b + "attn_norm.weight", {n_embd});
      expect_ne(b + "attn_q.weight", {n_embd, 256});
      expect_ne(b + "attn_k.weight", {n_embd, k.kv_dim});
      expect_ne(b + "attn_v.weight", {n_embd, k.kv_dim});
      expect_ne(b + "attn_output.weight", {256, n_embd});
      expect_ne(b + "ffn_norm.weight", {n_embd});
      expect_ne(b + "ffn_gate.weight", {n_embd, n_ff});
      expect_ne(b + "ffn_up.weight", {n_embd, n_ff});
      expect_ne(b + "ffn_down.weight", {n_ff, n_embd});
      if (k.bias) {
        expect_ne(b + "attn_q.bias", {256});
        expect_ne(b + "attn_k.bias", {k.kv_dim});
        expect_ne(b + "attn_v.bias", {k.kv_dim});
      } else {
        EXPECT_EQ(find(*s, b + "attn_q.bias"), nullptr);
      }
    }
    if (k.tied) {
      EXPECT_EQ(find(*s, "output.weight"), nullptr);
      EXPECT_TRUE(s->config().tied_output);
    } else {
      expect_ne("output.weight", {n_embd, k.n_vocab});
    }
  }
}

// Qwen3: no biases, and the per-head q/k norms (head_dim 64) under llama.cpp's names.
TEST(HfSource, Qwen3HasPerHeadQkNorms) {
  auto s = open_hf_model_source(test::hf_fixture("tiny-qwen3"));
  const ModelConfig& c = s->config();
  EXPECT_EQ(c.arch, "qwen3");
  EXPECT_TRUE(c.qk_norm);
  EXPECT_FALSE(c.qkv_bias);
  EXPECT_TRUE(c.rope_neox());
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(s->tensors().size(), 3u * 11 + 2);  // 9 + 2 norms per layer, embedding, final norm; tied output
  for (int i = 0; i < 3; ++i)
    for (const char* n : {"attn_q_norm.weight", "attn_k_norm.weight"}) {
      const SourceTensor* t = find(*s, "blk." + std::to_string(i) + "." + n);
      ASSERT_NE(t, nullptr) << n;
      EXPECT_EQ(t->n_dims, 1);
      EXPECT_EQ(t->ne[0], 64);
    }
  EXPECT_EQ(find(*s, "blk.0.attn_q.bias"), nullptr);
}

// Row r of a row-major tensor with `row_bytes` bytes per row.
const uint8_t* row(const uint8_t* p, int64_t r, uint64_t row_bytes) { return p + r * row_bytes; }

TEST(HfSource, QkRowsPermutedOthersMapped) {
  for (const char* name : {"tiny-llama31", "tiny-qwen2"}) {
    SCOPED_TRACE(name);
    const std::string dir = test::hf_fixture(name);
    auto s = open_hf_model_source(dir);
    auto raw = SafetensorsCheckpoint::open_dir(dir);
    const ModelConfig& c = s->config();
    const int64_t hd = c.head_dim, half = hd / 2;
    struct P {
      std::string gguf, hf;
      int64_t heads;
      uint64_t row_bytes;
    };
    std::vector<P> ps = {{"blk.1.attn_q.weight", "model.layers.1.self_attn.q_proj.weight", c.n_head, 256 * 2},
                         {"blk.1.attn_k.weight", "model.layers.1.self_attn.k_proj.weight", c.n_head_kv, 256 * 2}};
    if (c.qkv_bias) {
      ps.push_back({"blk.1.attn_q.bias", "model.layers.1.self_attn.q_proj.bias", c.n_head, 2});
      ps.push_back({"blk.1.attn_k.bias", "model.layers.1.self_attn.k_proj.bias", c.n_head_kv, 2});
    }
    for (const P& p : ps) {
      SCOPED_TRACE(p.gguf);
      const SourceTensor* t = find(*s, p.gguf);
      const SafetensorsTensor* r = raw->find(p.hf);
      ASSERT_TRUE(t && r);
      if (!hf_rotary_permuted(c.arch)) {
        // Qwen2 keeps the halves ("NEOX") layout in the source, as GGUF's qwen2 does; the weight
        // loader permutes both alike (tested end to end in test_hf_e2e).
        EXPECT_EQ(std::memcmp(t->data, r->data, t->n_bytes), 0);
        continue;
      }
      EXPECT_NE(t->data, r->data);  // an owned copy
      int mismatches = 0;
      for (int64_t h = 0; h < p.heads; ++h)
        for (int64_t i = 0; i < half; ++i) {
          const int64_t base = h * hd;
          mismatches += std::memcmp(row(t->data, base + 2 * i, p.row_bytes), row(r->data, base + i, p.row_bytes),
                                    p.row_bytes) != 0;
          mismatches += std::memcmp(row(t->data, base + 2 * i + 1, p.row_bytes),
                                    row(r->data, base + half + i, p.row_bytes), p.row_bytes) != 0;
        }
      EXPECT_EQ(mismatches, 0);
      // The permutation really moves data (random weights: row 1 differs from row half).
      EXPECT_NE(std::memcmp(t->data, r->data, t->n_bytes), 0);
    }
    // v, the FFN and the embedding keep their bytes (the raw checkpoint is a second mapping, so compare
    // contents, not addresses).
    for (const auto& [g, h] : std::map<std::string, std::string>{
             {"blk.1.attn_v.weight", "model.layers.1.self_attn.v_proj.weight"},
             {"blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj.weight"},
             {"token_embd.weight", "model.embed_tokens.weight"}})
      EXPECT_EQ(std::memcmp(find(*s, g)->data, raw->find(h)->data, raw->find(h)->n_bytes), 0) << g;
  }
}

// A directory with an edited config.json next to links to a fixture's weight files.
struct EditedDir {
  test::TempDir dir;
  EditedDir(const std::string& fixture, const std::function<void(json&)>& edit) {
    const fs::path src = fs::path(test::hf_fixture(fixture));
    for (const auto& e : fs::directory_iterator(src)) {
      const std::string n = e.path().filename().string();
      if (n.find(".safetensors") != std::string::npos) fs::create_symlink(e.path(), dir.path / n);
    }
    json j = json::parse(read_small_file((src / "config.json").string(), 1 << 20));
    edit(j);
    test::write_text(dir.path / "config.json", j.dump());
  }
  std::string str() const { return dir.str(); }
};

TEST(HfSourceBad, ShapeMismatch) {
  EditedDir d("tiny-llama31", [](json& j) { j["intermediate_size"] = 512; });
  expect_error([&] { open_hf_model_source(d.str()); },
               {"model.layers.0.mlp.gate_proj.weight", "blk.0.ffn_gate.weight", "expected shape [512, 256]",
                "got [768, 256]"});
  EditedDir kv("tiny-llama31", [](json& j) { j["num_key_value_heads"] = 4; });
  expect_error([&] { open_hf_model_source(kv.str()); },
               {"model.layers.0.self_attn.k_proj.weight", "expected shape [128, 256]", "got [64, 256]"});
}

TEST(HfSourceBad, MissingTensor) {
  EditedDir d("tiny-llama2", [](json& j) { j["num_hidden_layers"] = 5; });  // sharded fixture
  expect_error([&] { open_hf_model_source(d.str()); },
               {"model.layers.4.input_layernorm.weight", "blk.4.attn_norm.weight", "is missing"});
  EditedDir untied("tiny-llama31", [](json& j) { j["tie_word_embeddings"] = false; });
  expect_error([&] { open_hf_model_source(untied.str()); }, {"'lm_head.weight'", "is missing"});
  // Qwen2 biases are required for Qwen2 only: a Llama config over Qwen2 weights leaves them unexplained.
  EditedDir llama("tiny-qwen2", [](json& j) { j["architectures"] = {"LlamaForCausalLM"}; });
  expect_error([&] { open_hf_model_source(llama.str()); }, {"unexpected tensor", "_proj.bias"});
}

TEST(HfSourceBad, UnexpectedTensor) {
  EditedDir d("tiny-mistral", [](json& j) { j["num_hidden_layers"] = 3; });
  expect_error([&] { open_hf_model_source(d.str()); }, {"unexpected tensor 'model.layers.3."});
}

TEST(HfSourceBad, TiedCheckpointMaySaveLmHead) {
  // transformers ignores a saved lm_head when embeddings are tied; so do we.
  EditedDir d("tiny-llama2", [](json& j) { j["tie_word_embeddings"] = true; });
  auto s = open_hf_model_source(d.str());
  EXPECT_EQ(find(*s, "output.weight"), nullptr);
  EXPECT_EQ(s->tensors().size(), 4u * 9 + 2);
}

TEST(HfSourceBad, NotADirectoryOrNoConfig) {
  expect_error([] { open_hf_model_source("/nonexistent/model"); }, {"/nonexistent/model", "not a directory"},
               ErrorKind::kIo);
  test::TempDir d;
  expect_error([&] { open_hf_model_source(d.str()); }, {"config.json"}, ErrorKind::kIo);
}

TEST(HfSource, HandMadeMixedDtypes) {
  // One layer, n_embd 4, 2 heads of head_dim 2, 1 KV head, n_ff 3, vocab 5, tied; F32 and F16 weights
  // stay as stored; an old-style rotary_emb.inv_freq buffer is ignored.
  test::TempDir d;
  json cfg = {{"architectures", {"LlamaForCausalLM"}}, {"hidden_size", 4},      {"num_hidden_layers", 1},
              {"num_attention_heads", 2},              {"num_key_value_heads", 1}, {"intermediate_size", 3},
              {"vocab_size", 5},                       {"max_position_embeddings", 16}, {"rms_norm_eps", 1e-5},
              {"tie_word_embeddings", true},           {"torch_dtype", "float32"}};
  test::write_text(d.path / "config.json", cfg.dump());
  struct T {
    std::string name, dtype;
    std::vector<int64_t> shape;
  };
  const std::vector<T> ts = {{"model.embed_tokens.weight", "F32", {5, 4}},
                             {"model.layers.0.input_layernorm.weight", "F32", {4}},
                             {"model.layers.0.self_attn.q_proj.weight", "F32", {4, 4}},
                             {"model.layers.0.self_attn.k_proj.weight", "F16", {2, 4}},
                             {"model.layers.0.self_attn.v_proj.weight", "F16", {2, 4}},
                             {"model.layers.0.self_attn.o_proj.weight", "F32", {4, 4}},
                             {"model.layers.0.self_attn.rotary_emb.inv_freq", "F32", {1}},
                             {"model.layers.0.post_attention_layernorm.weight", "F32", {4}},
                             {"model.layers.0.mlp.gate_proj.weight", "F16", {3, 4}},
                             {"model.layers.0.mlp.up_proj.weight", "F16", {3, 4}},
                             {"model.layers.0.mlp.down_proj.weight", "F16", {4, 3}},
                             {"model.norm.weight", "F32", {4}}};
  json h = json::object();
  uint64_t off = 0;
  for (const T& t : ts) {
    uint64_t n = t.dtype == "F32" ? 4 : 2;
    for (int64_t x : t.shape) n *= static_cast<uint64_t>(x);
    h[t.name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {off, off + n}}};
    off += n;
  }
  test::write_file(d.path / "model.safetensors", test::st_bytes(h.dump(), off));
  auto s = open_hf_model_source(d.str());
  EXPECT_EQ(s->tensors().size(), 11u);
  EXPECT_EQ(find(*s, "blk.0.attn_q.weight")->type, GgmlType::F32);
  EXPECT_EQ(find(*s, "blk.0.attn_k.weight")->type, GgmlType::F16);
  EXPECT_EQ(find(*s, "blk.0.ffn_down.weight")->ne[0], 3);
  EXPECT_EQ(find(*s, "blk.0.ffn_down.weight")->ne[1], 4);
  // q has 2 heads of 2 rows: pairs (0,1) are already adjacent halves of size 1, so rows stay put.
  auto raw = SafetensorsCheckpoint::open_dir(d.str());
  EXPECT_EQ(std::memcmp(find(*s, "blk.0.attn_q.weight")->data,
                        raw->find("model.layers.0.self_attn.q_proj.weight")->data, 64), 0);
}

}  // namespace
}  // namespace shardlm

namespace shardlm {
namespace {

TEST(HfSource, TokenizerAndChatTemplate) {
  // A hand-made three-token BPE tokenizer.json and a tokenizer_config.json with a chat template.
  EditedDir d("tiny-llama31", [](json&) {});
  const json tok = {{"model", {{"type", "BPE"}, {"vocab", {{"a", 0}, {"b", 1}, {"ab", 2}}}, {"merges", {"a b"}}}},
                    {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
                    {"normalizer", nullptr},
                    {"added_tokens", json::array()}};
  test::write_text(d.dir.path / "tokenizer.json", tok.dump());
  test::write_text(d.dir.path / "tokenizer_config.json", R"({"chat_template":"{{ messages }}"})");
  auto s = open_hf_model_source(d.str());
  ASSERT_NE(s->vocab(), nullptr);
  EXPECT_EQ(s->vocab()->tokens, (std::vector<std::string>{"a", "b", "ab"}));
  EXPECT_EQ(s->chat_template(), "{{ messages }}");

  test::write_text(d.dir.path / "tokenizer_config.json", R"({"chat_template":[{"name":"x","template":"X"},)"
                                                         R"({"name":"default","template":"D"}]})");
  EXPECT_EQ(open_hf_model_source(d.str())->chat_template(), "D");
  test::write_text(d.dir.path / "tokenizer_config.json", R"({"chat_template":5})");
  expect_error([&] { open_hf_model_source(d.str()); }, {"tokenizer_config.json", "'chat_template'"});
}

TEST(HfSourceBad, TokenizerLargerThanEmbedding) {
  // The Llama 2 tokenizer (32000 tokens) next to a 1024-row embedding.
  EditedDir d("tiny-llama31", [](json&) {});
  fs::copy_file(test::fixture_path("tokenizers/llama2/tokenizer.json"), d.dir.path / "tokenizer.json");
  expect_error([&] { open_hf_model_source(d.str()); }, {"tokenizer.json", "32000 tokens exceed", "vocab_size 1024"});
}

}  // namespace
}  // namespace shardlm
