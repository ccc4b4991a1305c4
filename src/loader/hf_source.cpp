#include "loader/hf_source.h"

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <vector>

#include "config/hf_config.h"
#include "core/error.h"
#include "formats/gguf.h"
#include "formats/safetensors.h"
#include "tokenizer/hf_tokenizer.h"

namespace shardlm {

namespace {

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

bool ends_with(const std::string& s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// One tensor the config says must exist.
struct Expected {
  std::string hf;              // name in the checkpoint
  std::string gguf;            // name we expose
  std::vector<int64_t> shape;  // torch order, as stored
  int64_t rotary_heads = 0;    // > 0: permute rows per head (q: n_head, k: n_head_kv)
};

std::vector<Expected> expected_tensors(const ModelConfig& c) {
  const bool permute = hf_rotary_permuted(c.arch);
  const int64_t q_heads = permute ? c.n_head : 0;
  const int64_t k_heads = permute ? c.n_head_kv : 0;
  std::vector<Expected> e;
  // GGUF names come from hf_to_gguf_name so that the table of names exists once.
  auto add = [&](std::string hf, std::vector<int64_t> shape, int64_t heads) {
    std::string gguf = hf_to_gguf_name(hf);
    SHARDLM_CHECK(!gguf.empty(), hf);
    e.push_back({std::move(hf), std::move(gguf), std::move(shape), heads});
  };
  add("model.embed_tokens.weight", {c.n_vocab, c.n_embd}, 0);
  for (int64_t i = 0; i < c.n_layer; ++i) {
    const std::string h = cat("model.layers.", i, ".");
    add(h + "input_layernorm.weight", {c.n_embd}, 0);
    add(h + "self_attn.q_proj.weight", {c.q_dim(), c.n_embd}, q_heads);
    add(h + "self_attn.k_proj.weight", {c.kv_dim(), c.n_embd}, k_heads);
    add(h + "self_attn.v_proj.weight", {c.kv_dim(), c.n_embd}, 0);
    if (c.qkv_bias) {
      add(h + "self_attn.q_proj.bias", {c.q_dim()}, q_heads);
      add(h + "self_attn.k_proj.bias", {c.kv_dim()}, k_heads);
      add(h + "self_attn.v_proj.bias", {c.kv_dim()}, 0);
    }
    if (c.qk_norm) {
      add(h + "self_attn.q_norm.weight", {c.head_dim}, 0);
      add(h + "self_attn.k_norm.weight", {c.head_dim}, 0);
    }
    add(h + "self_attn.o_proj.weight", {c.n_embd, c.q_dim()}, 0);
    add(h + "post_attention_layernorm.weight", {c.n_embd}, 0);
    if (c.moe()) {
      // The Hub's layout: a router and one 2-D tensor per expert (exposed as llama.cpp's older per-expert
      // names, blk.L.ffn_gate.E.weight; convert stacks them into the 3-D ffn_*_exps tensors).
      const bool mixtral = c.arch == "llama";
      const std::string m = mixtral ? "block_sparse_moe." : "mlp.";
      add(h + m + "gate.weight", {c.n_expert, c.n_embd}, 0);
      for (int64_t x = 0; x < c.n_expert; ++x) {
        const std::string ex = cat(h, m, "experts.", x, ".");
        add(ex + (mixtral ? "w1.weight" : "gate_proj.weight"), {c.n_ff_exp, c.n_embd}, 0);
        add(ex + (mixtral ? "w3.weight" : "up_proj.weight"), {c.n_ff_exp, c.n_embd}, 0);
        add(ex + (mixtral ? "w2.weight" : "down_proj.weight"), {c.n_embd, c.n_ff_exp}, 0);
      }
    } else {
      add(h + "mlp.gate_proj.weight", {c.n_ff, c.n_embd}, 0);
      add(h + "mlp.up_proj.weight", {c.n_ff, c.n_embd}, 0);
      add(h + "mlp.down_proj.weight", {c.n_embd, c.n_ff}, 0);
    }
  }
  add("model.norm.weight", {c.n_embd}, 0);
  if (!c.tied_output) add("lm_head.weight", {c.n_vocab, c.n_embd}, 0);
  return e;
}

std::string chat_template_of(const std::string& tokenizer_config_path);

class HfModelSource final : public ModelSource {
 public:
  explicit HfModelSource(const std::string& dir) : dir_(dir) {
    hf_ = load_hf_config(dir);
    ckpt_ = SafetensorsCheckpoint::open_dir(dir);
    const ModelConfig& c = hf_.model;
    const std::vector<Expected> expected = expected_tensors(c);

    std::set<std::string> known;
    for (const auto& x : expected) known.insert(x.hf);
    for (const SafetensorsTensor* t : ckpt_->tensors()) {
      if (known.count(t->name)) continue;
      // Older checkpoints save the RoPE inverse-frequency buffer; it is recomputed from the config.
      if (ends_with(t->name, ".rotary_emb.inv_freq")) continue;
      // Some tied checkpoints also save lm_head; transformers ignores it and ties to the embedding.
      if (c.tied_output && t->name == "lm_head.weight") continue;
      fail(dir_, ": unexpected tensor '", t->name, "' (not part of a ", hf_.architecture, " with ", c.n_layer,
           " layers", c.tied_output ? ", tied embeddings" : "", ")");
    }

    // Count permuted copies first so `owned_` never reallocates under the pointers handed out.
    size_t n_owned = 0;
    for (const auto& x : expected) n_owned += x.rotary_heads > 0;
    owned_.reserve(n_owned);

    for (const auto& x : expected) {
      const SafetensorsTensor* t = ckpt_->find(x.hf);
      if (t == nullptr) fail(dir_, ": tensor '", x.hf, "' (", x.gguf, ") is missing");
      if (t->shape != x.shape)
        fail(dir_, ": tensor '", x.hf, "' (", x.gguf, "): expected shape ", shape_str(x.shape), " from config.json, got ",
             shape_str(t->shape));
      SourceTensor s;
      s.name = x.gguf;
      s.type = t->type;
      s.n_dims = static_cast<int>(t->shape.size());
      for (int d = 0; d < s.n_dims; ++d) s.ne[d] = t->shape[s.n_dims - 1 - d];  // ggml order is reversed
      s.n_bytes = t->n_bytes;
      s.data = t->data;
      if (x.rotary_heads > 0) {
        const int64_t row_len = s.n_dims == 2 ? s.ne[0] : 1;
        const uint64_t row_bytes = static_cast<uint64_t>(row_bytes_of(t->type, row_len));
        owned_.emplace_back(t->n_bytes);
        permute_rotary_rows(t->data, owned_.back().data(), x.rotary_heads, c.head_dim, row_bytes);
        s.data = owned_.back().data();
      }
      tensors_.push_back(std::move(s));
    }
    load_tokenizer();
  }

  const ModelConfig& config() const override { return hf_.model; }
  const std::vector<SourceTensor>& tensors() const override { return tensors_; }
  const Vocab* vocab() const override { return vocab_.get(); }
  std::string chat_template() const override { return chat_template_; }
  std::string format_name() const override { return "hf-safetensors"; }
  std::string path() const override { return dir_; }

 private:
  static int64_t row_bytes_of(GgmlType t, int64_t n) { return checked_mul(n, type_size(t), "row bytes"); }

  // tokenizer.json is optional (the test fixtures have random vocabularies and ship none); when present
  // it must parse, and its size must fit the embedding.
  void load_tokenizer() {
    namespace fs = std::filesystem;
    std::error_code ec;
    const fs::path tj = fs::path(dir_) / "tokenizer.json";
    const fs::path tc = fs::path(dir_) / "tokenizer_config.json";
    const bool have_tc = fs::is_regular_file(tc, ec);
    if (fs::is_regular_file(tj, ec)) {
      vocab_ = std::make_unique<Vocab>(vocab_from_hf_tokenizer(tj.string(), have_tc ? tc.string() : ""));
      // Embeddings are often padded past the tokenizer (Qwen2: 151936 rows, 151665 tokens); a tokenizer
      // larger than the embedding would index past it.
      if (static_cast<int64_t>(vocab_->tokens.size()) > hf_.model.n_vocab)
        fail(tj.string(), ": ", vocab_->tokens.size(), " tokens exceed config.json vocab_size ", hf_.model.n_vocab);
    }
    if (have_tc) chat_template_ = chat_template_of(tc.string());
  }

  std::string dir_;
  HfConfig hf_;
  std::unique_ptr<Vocab> vocab_;  // null without tokenizer.json
  std::string chat_template_;
  std::unique_ptr<SafetensorsCheckpoint> ckpt_;  // owns the mappings `tensors_` point into
  std::vector<std::vector<uint8_t>> owned_;      // permuted q/k copies
  std::vector<SourceTensor> tensors_;
};

}  // namespace

// Llama and Mistral checkpoints rotate halves, GGUF's `llama` rotates adjacent pairs: permute here, as
// llama.cpp's converter does. Qwen2 and Qwen3 stay in the halves ("NEOX") layout, which GGUF's `qwen2` and
// `qwen3` keep too; the weight loader permutes both sources of them the same way (ModelConfig::rope_neox).
bool hf_rotary_permuted(const std::string& arch) {
  ModelConfig c;  // the list of NEOX architectures lives in rope_neox() alone
  c.arch = arch;
  return !c.rope_neox();
}

void permute_rotary_rows(const uint8_t* src, uint8_t* dst, int64_t n_head, int64_t head_dim, uint64_t row_bytes) {
  SHARDLM_CHECK(head_dim % 2 == 0, "head_dim ", head_dim);
  const int64_t half = head_dim / 2;
  for (int64_t h = 0; h < n_head; ++h) {
    const uint64_t base = static_cast<uint64_t>(h * head_dim);
    for (int64_t i = 0; i < half; ++i) {
      std::memcpy(dst + (base + 2 * i) * row_bytes, src + (base + i) * row_bytes, row_bytes);
      std::memcpy(dst + (base + 2 * i + 1) * row_bytes, src + (base + half + i) * row_bytes, row_bytes);
    }
  }
}

std::string hf_to_gguf_name(const std::string& hf_name) {
  static const std::map<std::string, std::string> kTop = {
      {"model.embed_tokens.weight", "token_embd.weight"},
      {"model.norm.weight", "output_norm.weight"},
      {"lm_head.weight", "output.weight"},
  };
  if (auto it = kTop.find(hf_name); it != kTop.end()) return it->second;
  static const std::map<std::string, std::string> kLayer = {
      {"input_layernorm.weight", "attn_norm.weight"},
      {"self_attn.q_proj.weight", "attn_q.weight"},
      {"self_attn.k_proj.weight", "attn_k.weight"},
      {"self_attn.v_proj.weight", "attn_v.weight"},
      {"self_attn.q_proj.bias", "attn_q.bias"},
      {"self_attn.k_proj.bias", "attn_k.bias"},
      {"self_attn.v_proj.bias", "attn_v.bias"},
      {"self_attn.q_norm.weight", "attn_q_norm.weight"},
      {"self_attn.k_norm.weight", "attn_k_norm.weight"},
      {"self_attn.o_proj.weight", "attn_output.weight"},
      {"post_attention_layernorm.weight", "ffn_norm.weight"},
      {"mlp.gate_proj.weight", "ffn_gate.weight"},
      {"mlp.up_proj.weight", "ffn_up.weight"},
      {"mlp.down_proj.weight", "ffn_down.weight"},
      {"mlp.gate.weight", "ffn_gate_inp.weight"},               // Qwen3-MoE router
      {"block_sparse_moe.gate.weight", "ffn_gate_inp.weight"},  // Mixtral router
  };
  // One expert's matrix: "mlp.experts.E.gate_proj.weight" (Qwen3-MoE) or "block_sparse_moe.experts.E.w1.weight"
  // (Mixtral: w1 gate, w3 up, w2 down).
  static const std::map<std::string, std::string> kExpert = {
      {"gate_proj.weight", "ffn_gate"}, {"up_proj.weight", "ffn_up"}, {"down_proj.weight", "ffn_down"},
      {"w1.weight", "ffn_gate"},        {"w3.weight", "ffn_up"},      {"w2.weight", "ffn_down"},
  };
  static constexpr std::string_view kPrefix = "model.layers.";
  if (hf_name.compare(0, kPrefix.size(), kPrefix) != 0) return {};
  const size_t start = kPrefix.size();
  size_t dot = start;
  while (dot < hf_name.size() && hf_name[dot] >= '0' && hf_name[dot] <= '9') ++dot;
  // A layer index: digits, no leading zero unless it is "0", then a dot.
  if (dot == start || dot >= hf_name.size() || hf_name[dot] != '.' || (hf_name[start] == '0' && dot - start > 1))
    return {};
  const std::string layer = hf_name.substr(start, dot - start), rest = hf_name.substr(dot + 1);
  for (const std::string p : {"mlp.experts.", "block_sparse_moe.experts."}) {
    if (rest.compare(0, p.size(), p) != 0) continue;
    size_t e = p.size();
    while (e < rest.size() && rest[e] >= '0' && rest[e] <= '9') ++e;
    if (e == p.size() || e >= rest.size() || rest[e] != '.' || (rest[p.size()] == '0' && e - p.size() > 1)) return {};
    auto x = kExpert.find(rest.substr(e + 1));
    if (x == kExpert.end()) return {};
    return "blk." + layer + "." + x->second + "." + rest.substr(p.size(), e - p.size()) + ".weight";
  }
  auto it = kLayer.find(rest);
  if (it == kLayer.end()) return {};
  return "blk." + layer + "." + it->second;
}

namespace {

// Reads tokenizer_config.json's chat_template: a string, or the list form [{name, template}, ...] of
// which transformers uses the one named "default". "" when absent.
std::string chat_template_of(const std::string& tokenizer_config_path) {
  static constexpr uint64_t kMaxBytes = 64 << 20;  // configs with a template are tens of kB
  const auto j = parse_json_checked(read_small_file(tokenizer_config_path, kMaxBytes), tokenizer_config_path);
  const auto it = j.is_object() ? j.find("chat_template") : j.end();
  if (it == j.end() || it->is_null()) return {};
  if (it->is_string()) return it->get<std::string>();
  if (it->is_array()) {
    for (const auto& e : *it)
      if (e.is_object() && e.value("name", "") == "default" && e.contains("template") && e["template"].is_string())
        return e["template"].get<std::string>();
    return {};
  }
  fail(tokenizer_config_path, ": field 'chat_template' is a JSON ", it->type_name(), ", expected a string or a list");
}

// A model source whose tokenizer comes from elsewhere; everything else is the model's.
class PairedSource final : public ModelSource {
 public:
  PairedSource(std::unique_ptr<ModelSource> m, TokenizerFiles t) : m_(std::move(m)), t_(std::move(t)) {}
  const ModelConfig& config() const override { return m_->config(); }
  const std::vector<SourceTensor>& tensors() const override { return m_->tensors(); }
  const Vocab* vocab() const override { return &t_.vocab; }
  std::string chat_template() const override {
    return t_.chat_template.empty() ? m_->chat_template() : t_.chat_template;
  }
  std::string format_name() const override { return m_->format_name(); }
  std::string path() const override { return m_->path(); }

 private:
  std::unique_ptr<ModelSource> m_;
  TokenizerFiles t_;
};

}  // namespace

TokenizerFiles load_tokenizer_files(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  TokenizerFiles r;
  r.path = path;
  if (!fs::exists(path, ec)) fail_kind(ErrorKind::kIo, "tokenizer '", path, "' does not exist");
  fs::path json_path = path;
  if (fs::is_directory(path, ec)) {
    json_path = fs::path(path) / "tokenizer.json";
    if (!fs::is_regular_file(json_path, ec))
      fail_kind(ErrorKind::kIo, "tokenizer directory '", path, "' has no tokenizer.json");
  } else {
    // A GGUF file starts with the magic "GGUF"; anything else is taken as tokenizer.json text.
    char magic[4] = {};
    if (FILE* f = std::fopen(path.c_str(), "rb")) {
      const size_t n = std::fread(magic, 1, 4, f);
      std::fclose(f);
      if (n == 4 && std::memcmp(magic, "GGUF", 4) == 0) {
        const auto g = GgufFile::open(path);
        if (!g->find("tokenizer.ggml.tokens")) fail(path, ": GGUF file has no tokenizer (tokenizer.ggml.tokens)");
        r.vocab = vocab_from_gguf(*g);
        r.chat_template = g->get_string("tokenizer.chat_template").value_or("");
        return r;
      }
    }
  }
  const fs::path tc = json_path.parent_path() / "tokenizer_config.json";
  const bool have_tc = fs::is_regular_file(tc, ec);
  r.vocab = vocab_from_hf_tokenizer(json_path.string(), have_tc ? tc.string() : "");
  if (have_tc) r.chat_template = chat_template_of(tc.string());
  return r;
}

std::unique_ptr<ModelSource> with_tokenizer(std::unique_ptr<ModelSource> model, TokenizerFiles tok) {
  const int64_t n_tok = static_cast<int64_t>(tok.vocab.tokens.size());
  const int64_t n_vocab = model->config().n_vocab;
  if (n_tok > n_vocab)
    fail("tokenizer '", tok.path, "' has ", n_tok, " tokens but model '", model->path(), "' has a vocabulary of ",
         n_vocab, " (token_embd rows): the tokenizer does not belong to this model");
  return std::make_unique<PairedSource>(std::move(model), std::move(tok));
}

std::unique_ptr<ModelSource> open_hf_model_source(const std::string& dir) {
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec))
    fail_kind(ErrorKind::kIo, dir, ": not a directory (a Hugging Face checkpoint is a folder with config.json)");
  return std::make_unique<HfModelSource>(dir);
}

}  // namespace shardlm
