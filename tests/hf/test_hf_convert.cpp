// Hugging Face checkpoints exported to GGUF (export_gguf, what `shardlm convert --from hf` runs): the
// metadata llama.cpp reads, checked against config.json parsed here independently; the rotary layout of
// q/k (llama: rows interleaved per head as llama.cpp's converter permutes them; qwen2: kept in halves);
// every scheme's types; and the files run by our loader against transformers' reference.json. F16 and
// Q8_0 under several layouts are in test_hf_layouts.cpp; this covers bf16, q4_0 and q4_k_m on one rank.
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <sstream>

#include "config/presets.h"
#include "formats/gguf.h"
#include "hf_reference.h"
#include "hf_test_util.h"
#include "loader/gguf_export.h"
#include "loader/hf_source.h"
#include "quant/quant.h"
#include "runtime/engine.h"
#include "tokenizer/hf_tokenizer.h"

namespace shardlm::test {
namespace {

using nlohmann::json;

const std::vector<std::string> kFixtures = {"tiny-llama2", "tiny-llama31", "tiny-llama31-v4config", "tiny-qwen2",
                                            "tiny-mistral", "tiny-qwen3", "tiny-qwen3moe", "tiny-mixtral"};

// KL(reference softmax || ours) at the first and last prompt positions, nats. Measured on these fixtures
// (bf16-rounded RoPE as the reference): bf16 below 1e-12 (the same weights); q4_0 4.4e-3..8.3e-3
// (llama2, qwen2, mistral) and 2.7e-2..5.7e-2 (llama31); q4_k_m 2.3e-3..4.0e-3 and 1.3e-2..2.9e-2
// (llama31). Bounds are ~3x the worst measured of each scheme (Q8_0's is in test_hf_layouts.cpp).
// Argmax flips at near-ties (up to 12 of 24 positions for q4_0 on llama31) are printed, not asserted.
constexpr double kKlBf16 = 1e-6, kKlQ4_0 = 0.15, kKlQ4KM = 0.1;

std::string tmp_gguf(const std::string& f, const std::string& scheme) {
  return std::string(SHARDLM_BINARY_DIR) + "/hfconv-" + f + "-" + scheme + ".gguf";
}

class HfConvert : public ::testing::TestWithParam<const char*> {};

// config.json read here without our HF config parser: both the 5.x (rope_parameters) and 4.x spellings.
struct Cfg {
  std::string arch;
  int64_t hidden, layers, ff, heads, kv_heads, head_dim, ctx;
  double eps, theta;
  bool llama3_rope;
  int64_t experts = 0, experts_used = 0, ff_exp = 0;  // mixtures of experts
};
Cfg read_config(const std::string& dir) {
  const json j = json::parse(read_small_file(dir + "/config.json", 1 << 20));
  Cfg c;
  const std::string mt = j.at("model_type");
  c.arch = mt == "qwen2" || mt == "qwen3" ? mt : mt == "qwen3_moe" ? "qwen3moe" : "llama";  // Mistral, Mixtral: `llama`
  c.hidden = j.at("hidden_size");
  c.layers = j.at("num_hidden_layers");
  c.ff = j.at("intermediate_size");
  c.heads = j.at("num_attention_heads");
  c.kv_heads = j.at("num_key_value_heads");
  c.head_dim = j.contains("head_dim") && j["head_dim"].is_number() ? j["head_dim"].get<int64_t>() : c.hidden / c.heads;
  c.ctx = j.at("max_position_embeddings");
  if (j.contains("sliding_window") && j["sliding_window"].is_number()) c.ctx = std::min<int64_t>(c.ctx, j["sliding_window"]);
  c.eps = j.at("rms_norm_eps");
  const json rp = j.contains("rope_parameters") ? j["rope_parameters"] : j;
  c.theta = rp.at("rope_theta");
  const json rs = j.contains("rope_parameters") ? j["rope_parameters"] : j.value("rope_scaling", json::object());
  c.llama3_rope = rs.is_object() && rs.value("rope_type", "") == "llama3";
  c.experts = j.value("num_experts", j.value("num_local_experts", int64_t{0}));
  c.experts_used = j.value("num_experts_per_tok", int64_t{0});
  c.ff_exp = j.value("moe_intermediate_size", c.ff);  // Mixtral's experts are intermediate_size wide
  return c;
}

TEST_P(HfConvert, MetadataIsWhatLlamaCppReads) {
  const std::string dir = hf_fixture(GetParam());
  const Cfg want = read_config(dir);
  auto src = open_model_source(dir);
  const std::string out = tmp_gguf(GetParam(), "f16");
  uint64_t last_done = 0, total = 0;
  export_gguf(*src, out, "f16", [&](uint64_t d, uint64_t t) { last_done = d, total = t; });
  EXPECT_GT(total, 0u);
  EXPECT_EQ(last_done, total) << "progress never reached the end";
  const auto g = GgufFile::open(out);
  const std::string a = want.arch + ".";
  EXPECT_EQ(g->get_string("general.architecture"), want.arch);
  EXPECT_EQ(g->get_string("general.name"), std::string(GetParam()));
  EXPECT_EQ(g->get_uint("general.file_type"), 1u);  // LLAMA_FTYPE_MOSTLY_F16
  EXPECT_EQ(g->get_uint("general.quantization_version"), 2u);
  EXPECT_EQ(g->get_uint(a + "embedding_length"), uint64_t(want.hidden));
  EXPECT_EQ(g->get_uint(a + "block_count"), uint64_t(want.layers));
  EXPECT_EQ(g->get_uint(a + "feed_forward_length"), uint64_t(want.ff));
  EXPECT_EQ(g->get_uint(a + "attention.head_count"), uint64_t(want.heads));
  EXPECT_EQ(g->get_uint(a + "attention.head_count_kv"), uint64_t(want.kv_heads));
  EXPECT_EQ(g->get_uint(a + "context_length"), uint64_t(want.ctx));
  EXPECT_EQ(g->get_uint(a + "rope.dimension_count"), uint64_t(want.head_dim));
  EXPECT_FLOAT_EQ(float(*g->get_float(a + "attention.layer_norm_rms_epsilon")), float(want.eps));
  EXPECT_FLOAT_EQ(float(*g->get_float(a + "rope.freq_base")), float(want.theta));
  // Llama 3.1 scaling travels as llama.cpp's rope_freqs.weight (head_dim/2 divisors), nothing else does.
  const GgufTensorInfo* rf = g->find_tensor("rope_freqs.weight");
  ASSERT_EQ(rf != nullptr, want.llama3_rope);
  if (rf) {
    EXPECT_EQ(rf->ne[0], want.head_dim / 2);
    const float* f = reinterpret_cast<const float*>(g->tensor_data(*rf));
    EXPECT_FLOAT_EQ(f[0], 1.0f);                     // the highest frequency is not scaled
    EXPECT_FLOAT_EQ(f[want.head_dim / 2 - 1], 8.0f);  // the lowest is divided by `factor`
  }
  // Vectors and the router stay F32, as llama.cpp's converter keeps them (and llama-quantize leaves them).
  for (const auto& t : g->tensors()) {
    const bool f32 = t.n_dims == 1 || t.name.find("ffn_gate_inp") != std::string::npos;
    EXPECT_EQ(int(t.type), int(f32 ? GgmlType::F32 : GgmlType::F16)) << t.name;
  }
  EXPECT_EQ(g->find_tensor("blk.0.attn_q.bias") != nullptr, want.arch == "qwen2");
  // Qwen3's per-head norms travel as llama.cpp names them, one head_dim vector each, unpermuted.
  EXPECT_EQ(g->find_tensor("blk.0.attn_q_norm.weight") != nullptr, want.arch == "qwen3" || want.arch == "qwen3moe");
  // Experts: llama.cpp's keys and 3-D tensors {in, out, n_expert}; no per-expert or dense FFN tensors.
  if (want.experts > 0) {
    EXPECT_EQ(g->get_uint(a + "expert_count"), uint64_t(want.experts));
    EXPECT_EQ(g->get_uint(a + "expert_used_count"), uint64_t(want.experts_used));
    if (want.arch == "qwen3moe") {
      EXPECT_EQ(g->get_uint(a + "expert_feed_forward_length"), uint64_t(want.ff_exp));
    }
    for (int64_t l = 0; l < want.layers; ++l) {
      const std::string b = "blk." + std::to_string(l) + ".";
      const GgufTensorInfo* router = g->find_tensor(b + "ffn_gate_inp.weight");
      ASSERT_NE(router, nullptr) << l;
      EXPECT_EQ(router->ne[0], want.hidden);
      EXPECT_EQ(router->ne[1], want.experts);
      for (const char* k : {"ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"}) {
        const GgufTensorInfo* t = g->find_tensor(b + k + ".weight");
        ASSERT_NE(t, nullptr) << b << k;
        const bool down = std::string(k) == "ffn_down_exps";
        EXPECT_EQ(t->n_dims, 3) << t->name;
        EXPECT_EQ(t->ne[0], down ? want.ff_exp : want.hidden) << t->name;
        EXPECT_EQ(t->ne[1], down ? want.hidden : want.ff_exp) << t->name;
        EXPECT_EQ(t->ne[2], want.experts) << t->name;
      }
      EXPECT_EQ(g->find_tensor(b + "ffn_up.weight"), nullptr);
      EXPECT_EQ(g->find_tensor(b + "ffn_up.0.weight"), nullptr);
    }
  }
  if (const GgufTensorInfo* qn = g->find_tensor("blk.2.attn_k_norm.weight")) {
    EXPECT_EQ(qn->ne[0], want.head_dim);
    const auto norms = SafetensorsCheckpoint::open_dir(dir);  // owns the mapping hn points into
    const SafetensorsTensor* hn = norms->find("model.layers.2.self_attn.k_norm.weight");
    ASSERT_NE(hn, nullptr);
    std::vector<float> h(static_cast<size_t>(want.head_dim));
    dequantize_row(GgmlType::BF16, hn->data, h.data(), want.head_dim);
    const float* gf = reinterpret_cast<const float*>(g->tensor_data(*qn));
    for (int64_t i = 0; i < want.head_dim; ++i) EXPECT_EQ(gf[i], h[size_t(i)]) << "k_norm " << i;
  }

  // q_proj as stored (bf16) against the file's attn_q (f16): llama interleaves each head's halves,
  // qwen2 and qwen3 keep them (llama.cpp rotates them with NEOX and its converter does not permute).
  const bool neox = want.arch == "qwen2" || want.arch == "qwen3" || want.arch == "qwen3moe";
  const auto ckpt = SafetensorsCheckpoint::open_dir(dir);
  for (const char* which : {"q", "k"}) {
    const SafetensorsTensor* hq = ckpt->find(cat("model.layers.1.self_attn.", which, "_proj.weight"));
    const GgufTensorInfo* gq = g->find_tensor(cat("blk.1.attn_", which, ".weight"));
    ASSERT_TRUE(hq && gq);
    const int64_t n = want.hidden, rows = hq->shape[0], hd = want.head_dim;
    ASSERT_EQ(gq->ne[1], rows);
    std::vector<float> hrow(static_cast<size_t>(n)), grow(static_cast<size_t>(n));
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t h = r / hd, i = r % hd;
      const int64_t from = neox ? r : h * hd + (i % 2 == 0 ? i / 2 : hd / 2 + i / 2);
      dequantize_row(GgmlType::BF16, hq->data + size_t(from * n * 2), hrow.data(), n);
      dequantize_row(GgmlType::F16, g->tensor_data(*gq) + size_t(r * n * 2), grow.data(), n);
      for (int64_t c = 0; c < n; ++c)
        ASSERT_NEAR(grow[size_t(c)], hrow[size_t(c)], 3e-8) << which << " row " << r << " col " << c;
    }
  }
  std::remove(out.c_str());
}

// bf16, q4_0 and q4_k_m files load and reproduce the reference within the stated KL bounds; bf16 also
// gives every argmax.
TEST_P(HfConvert, EverySchemeLoadsAndRuns) {
  const std::string dir = hf_fixture(GetParam());
  auto src = open_model_source(dir);
  const auto ref = load_reference(dir);
  for (const std::string scheme : {"bf16", "q4_0", "q4_k_m"}) {
    SCOPED_TRACE(scheme);
    const std::string out = tmp_gguf(GetParam(), scheme);
    export_gguf(*src, out, scheme);
    auto gsrc = open_model_source(out);
    EXPECT_EQ(gsrc->format_name(), "gguf");
    // Each tensor has the type the scheme gives it (with llama.cpp's fallbacks for short rows).
    for (const SourceTensor& t : gsrc->tensors()) {
      if (t.name == "rope_freqs.weight") continue;
      TensorSpec spec{t.name, std::vector<int64_t>(t.ne.begin(), t.ne.begin() + t.n_dims), -1};
      if (t.name.rfind("blk.", 0) == 0) spec.layer = std::stoi(t.name.substr(4));
      EXPECT_EQ(int(t.type), int(tensor_type_for_scheme(scheme, spec, gsrc->config()))) << t.name;
    }
    const ReferenceRopeSource rounded(*gsrc, dir);
    auto comm = make_single_rank_communicator();
    EngineOptions o;
    o.n_threads = 2;
    Engine e(rounded, *comm, o);
    const int64_t nv = e.config().n_vocab;
    const double bound = scheme == "bf16" ? kKlBf16 : scheme == "q4_0" ? kKlQ4_0 : kKlQ4KM;
    for (const RefCase& c : ref) {
      const auto all = e.all_logits(c.prompt_ids);
      const double klf = kl_divergence(c.logits_first, all.data());
      const double kll = kl_divergence(c.logits_last, all.data() + all.size() - size_t(nv));
      size_t flips = 0;
      for (size_t p = 0; p < c.prompt_ids.size(); ++p) flips += argmax_of(all.data() + p * size_t(nv), nv) != c.argmax_all[p];
      std::printf("%-22s %-6s %2zu tokens: KL first %.2e last %.2e, argmax differs at %zu positions\n", GetParam(),
                  scheme.c_str(), c.prompt_ids.size(), klf, kll, flips);
      EXPECT_LE(klf, bound);
      EXPECT_LE(kll, bound);
      if (scheme == "bf16") {
        EXPECT_EQ(flips, 0u);
      }
    }
    std::remove(out.c_str());
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, HfConvert, ::testing::Values("tiny-llama2", "tiny-llama31", "tiny-llama31-v4config", "tiny-qwen2", "tiny-mistral", "tiny-qwen3", "tiny-qwen3moe", "tiny-mixtral"),
                         [](const ::testing::TestParamInfo<const char*>& i) {
                           std::string n = i.param;
                           for (char& ch : n)
                             if (ch == '-') ch = '_';
                           return n;
                         });

// The Llama 2 tokenizer.json, paired with a model whose embedding has 16 more rows than it has tokens,
// exported into GGUF: the rows past the tokenizer become "[PAD<i>]" tokens of type UNUSED, as llama.cpp's
// converter writes them, and the merge ranks become SentencePiece scores, so the GGUF tokenizer gives
// llama.cpp's own ids for its Llama-SPM test suite (ggml-vocab-llama-spm.gguf.inp/.out, an independent
// reference), leading spaces included.
TEST(HfConvertTokenizer, Llama2TokenizerJsonBecomesAGgufVocabulary) {
  auto base = open_model_source(hf_fixture("tiny-llama31"));
  auto model = std::make_unique<PaddedVocabSource>(*base, 32016);
  auto paired =
      with_tokenizer(std::move(model), load_tokenizer_files(fixture_path("tokenizers/llama2/tokenizer.json")));
  const std::string out = tmp_gguf("llama2-tokenizer", "f16");
  export_gguf(*paired, out, "f16");
  auto g = open_model_source(out);
  ASSERT_NE(g->vocab(), nullptr);
  const Vocab& v = *g->vocab();
  ASSERT_EQ(v.tokens.size(), 32016u);
  EXPECT_EQ(v.tokens[32000], "[PAD32000]");
  EXPECT_EQ(int(v.types[32015]), int(TokenType::kUnused));
  EXPECT_EQ(v.bos, 1);
  EXPECT_EQ(v.eos, 2);
  const auto tok = Tokenizer::create(v);
  const std::string inp = read_small_file(fixture_path("vocab/ggml-vocab-llama-spm.gguf.inp"), 1 << 24),
                    outp = read_small_file(fixture_path("vocab/ggml-vocab-llama-spm.gguf.out"), 1 << 24);
  std::vector<std::string> texts;
  const std::string sep = "\n__ggml_vocab_test__\n";
  for (size_t at = 0;;) {
    const size_t next = inp.find(sep, at);
    if (next == std::string::npos) break;
    texts.push_back(inp.substr(at, next - at));
    at = next + sep.size();
  }
  std::vector<std::vector<int32_t>> want;
  std::stringstream ss(outp);
  for (std::string line; std::getline(ss, line);) {
    std::vector<int32_t> ids;
    std::stringstream ls(line);
    for (int32_t id; ls >> id;) ids.push_back(id);
    want.push_back(ids);
  }
  ASSERT_EQ(texts.size(), want.size());
  ASSERT_GT(texts.size(), 40u);
  for (size_t i = 0; i < texts.size(); ++i)
    EXPECT_EQ(tok->encode(texts[i], false, false), want[i]) << "text " << i << ": '" << texts[i] << "'";
  std::remove(out.c_str());
}

}  // namespace
}  // namespace shardlm::test
