#include "loader/gguf_export.h"

#include <cctype>
#include <cstring>
#include <filesystem>
#include <map>
#include <vector>

#include "config/presets.h"
#include "plan/cost_model.h"
#include "core/error.h"
#include "quant/quant.h"

namespace shardlm {

namespace {
std::string lower_ascii(std::string s) {
  for (char& ch : s) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return s;
}
// "blk.L.ffn_gate.E.weight" -> {L, "ffn_gate", E}; expert -1 for any other name.
struct ExpertName {
  int64_t layer = -1;
  std::string kind;
  int64_t expert = -1;
};
ExpertName split_expert_name(const std::string& name) {
  ExpertName r;
  if (name.rfind("blk.", 0) != 0) return r;
  const size_t d1 = name.find('.', 4), d2 = d1 == std::string::npos ? d1 : name.find('.', d1 + 1);
  const size_t d3 = d2 == std::string::npos ? d2 : name.find('.', d2 + 1);
  if (d3 == std::string::npos || name.compare(d3, std::string::npos, ".weight") != 0) return r;
  const std::string kind = name.substr(d1 + 1, d2 - d1 - 1), e = name.substr(d2 + 1, d3 - d2 - 1);
  const std::string layer = name.substr(4, d1 - 4);
  const auto digits = [](const std::string& x) {
    return !x.empty() && x.size() <= 6 && x.find_first_not_of("0123456789") == std::string::npos;
  };
  if ((kind != "ffn_gate" && kind != "ffn_up" && kind != "ffn_down") || !digits(e) || !digits(layer)) return r;
  r.layer = std::stoll(layer);
  r.kind = kind;
  r.expert = std::stoll(e);
  return r;
}
}  // namespace

void write_model_metadata(GgufWriter& w, const ModelConfig& c, const Vocab* vocab, const std::string& chat_template) {
  const std::string a = c.arch + ".";
  w.set_string("general.architecture", c.arch);
  if (!c.name.empty()) w.set_string("general.name", c.name);
  w.set_u32(a + "context_length", static_cast<uint32_t>(c.n_ctx_train));
  w.set_u32(a + "embedding_length", static_cast<uint32_t>(c.n_embd));
  w.set_u32(a + "block_count", static_cast<uint32_t>(c.n_layer));
  w.set_u32(a + "feed_forward_length", static_cast<uint32_t>(c.n_ff));
  w.set_u32(a + "attention.head_count", static_cast<uint32_t>(c.n_head));
  w.set_u32(a + "attention.head_count_kv", static_cast<uint32_t>(c.n_head_kv));
  w.set_f32(a + "attention.layer_norm_rms_epsilon", c.rms_eps);
  w.set_f32(a + "rope.freq_base", c.rope_freq_base);
  w.set_u32(a + "rope.dimension_count", static_cast<uint32_t>(c.head_dim));
  if (c.head_dim * c.n_head != c.n_embd) {
    w.set_u32(a + "attention.key_length", static_cast<uint32_t>(c.head_dim));
    w.set_u32(a + "attention.value_length", static_cast<uint32_t>(c.head_dim));
  }
  w.set_u32(a + "vocab_size", static_cast<uint32_t>(c.n_vocab));
  if (c.moe()) {
    w.set_u32(a + "expert_count", static_cast<uint32_t>(c.n_expert));
    w.set_u32(a + "expert_used_count", static_cast<uint32_t>(c.n_expert_used));
    if (c.arch != "llama") w.set_u32(a + "expert_feed_forward_length", static_cast<uint32_t>(c.n_ff_exp));
  }
  w.set_u32("general.quantization_version", 2);  // GGML_QNT_VERSION, which llama.cpp's writers record
  if (!vocab) return;
  // llama.cpp (and our GGUF reader) want one token per embedding row. Checkpoints pad their embeddings
  // past the tokenizer (Qwen2: 151936 rows, 151665 tokens); llama.cpp's converter fills the gap with
  // "[PAD<i>]" tokens of type UNUSED, which no text ever encodes to.
  Vocab v = *vocab;
  if (static_cast<int64_t>(v.tokens.size()) > c.n_vocab)
    fail("tokenizer has ", v.tokens.size(), " tokens but the model's vocabulary has ", c.n_vocab, " rows");
  const size_t n_real = v.tokens.size();
  if (v.types.empty() && static_cast<int64_t>(n_real) < c.n_vocab) v.types.assign(n_real, TokenType::kNormal);
  // A Hugging Face SentencePiece-style BPE ranks merges instead of scoring pieces; GGUF "llama" merges by
  // score (the pair whose result scores highest first). Such a tokenizer.json is converted from a
  // SentencePiece model, whose pieces are numbered in descending score order, so score -id restores the
  // order SentencePiece (and llama.cpp) merge in. Pieces made only of U+2581 ("▁", "▁▁", ...) are
  // user-defined in Llama's SentencePiece models, scored -1e9 so merging never prefers them; the merge
  // list of tokenizer.json puts them first instead. Checked against llama.cpp's Llama-SPM vocab suite.
  if (v.model == Vocab::Model::kSpm && v.scores.empty()) {
    static const std::string kMarker = "\xE2\x96\x81";  // U+2581
    v.scores.resize(n_real);
    for (size_t i = 0; i < n_real; ++i) {
      const std::string& t = v.tokens[i];
      bool spaces = !t.empty() && t.size() % kMarker.size() == 0;
      for (size_t k = 0; spaces && k < t.size(); k += kMarker.size()) spaces = t.compare(k, kMarker.size(), kMarker) == 0;
      v.scores[i] = spaces ? -1e9f : -static_cast<float>(i);
    }
  }
  for (size_t i = n_real; i < static_cast<size_t>(c.n_vocab); ++i) {
    v.tokens.push_back(cat("[PAD", i, "]"));
    if (!v.scores.empty()) v.scores.push_back(-1000.0f);
    v.types.push_back(TokenType::kUnused);
  }
  vocab = &v;
  w.set_string("tokenizer.ggml.model", vocab->model == Vocab::Model::kSpm ? "llama" : "gpt2");
  if (vocab->model == Vocab::Model::kBpe) w.set_string("tokenizer.ggml.pre", vocab->pre);
  w.set_string_array("tokenizer.ggml.tokens", vocab->tokens);
  if (!vocab->scores.empty()) w.set_f32_array("tokenizer.ggml.scores", vocab->scores);
  if (!vocab->types.empty()) {
    std::vector<int32_t> t;
    for (TokenType x : vocab->types) t.push_back(static_cast<int32_t>(x));
    w.set_i32_array("tokenizer.ggml.token_type", t);
  }
  if (!vocab->merges.empty()) w.set_string_array("tokenizer.ggml.merges", vocab->merges);
  if (vocab->bos >= 0) w.set_u32("tokenizer.ggml.bos_token_id", static_cast<uint32_t>(vocab->bos));
  if (vocab->eos >= 0) w.set_u32("tokenizer.ggml.eos_token_id", static_cast<uint32_t>(vocab->eos));
  if (vocab->unk >= 0) w.set_u32("tokenizer.ggml.unknown_token_id", static_cast<uint32_t>(vocab->unk));
  if (vocab->pad >= 0) w.set_u32("tokenizer.ggml.padding_token_id", static_cast<uint32_t>(vocab->pad));
  w.set_bool("tokenizer.ggml.add_bos_token", vocab->add_bos);
  w.set_bool("tokenizer.ggml.add_eos_token", vocab->add_eos);
  if (vocab->model == Vocab::Model::kSpm) w.set_bool("tokenizer.ggml.add_space_prefix", vocab->add_space_prefix);
  if (!chat_template.empty()) w.set_string("tokenizer.chat_template", chat_template);
}

void export_gguf(const ModelSource& src, const std::string& path, const std::string& scheme,
                 const std::function<void(uint64_t, uint64_t)>& progress, const ImportanceMatrix* imatrix) {
  if (!scheme.empty() && !is_known_scheme(scheme))
    fail("type '", scheme, "' is not a known scheme (", scheme_names(), ")");
  if (!scheme.empty() && scheme_needs_imatrix(scheme) && imatrix == nullptr)
    fail("type '", scheme, "' needs an importance matrix, as in llama-quantize: make one with llama-imatrix -m MODEL "
         "-f TEXT and pass --imatrix FILE");
  const ModelConfig& c = src.config();
  GgufWriter w;
  ModelConfig named = c;
  // llama.cpp's converter names a model after its directory (config.json names only the model type).
  if (named.name.empty() || src.format_name() == "hf-safetensors")
    named.name = std::filesystem::path(src.path()).lexically_normal().filename().string();
  if (named.name.empty())
    named.name = std::filesystem::path(src.path()).lexically_normal().parent_path().filename().string();
  write_model_metadata(w, named, src.vocab(), src.chat_template());
  if (const int ft = scheme_file_type(scheme); ft >= 0) w.set_u32("general.file_type", static_cast<uint32_t>(ft));
  if (imatrix != nullptr) {  // llama-quantize's record of the importance matrix used
    w.set_string("quantize.imatrix.file", imatrix->path);
    if (!imatrix->datasets.empty()) w.set_string("quantize.imatrix.dataset", imatrix->datasets[0]);
    w.set_i32("quantize.imatrix.entries_count", static_cast<int32_t>(imatrix->entries.size()));
    w.set_i32("quantize.imatrix.chunks_count", static_cast<int32_t>(imatrix->chunk_count));
  }
  if (!c.rope_freq_factors.empty() && !src.find_tensor("rope_freqs.weight"))
    w.add_tensor("rope_freqs.weight", GgmlType::F32, {static_cast<int64_t>(c.rope_freq_factors.size())},
                 c.rope_freq_factors.data());
  for (const SourceTensor& first : src.tensors()) {
    // Per-expert matrices (blk.L.ffn_gate.E.weight, as a Hugging Face directory exposes them) are written as
    // llama.cpp's converter writes them: one 3-D blk.L.ffn_gate_exps.weight {in, out, n_expert}, experts
    // in order, at expert 0's turn.
    std::string name = first.name;
    std::vector<const SourceTensor*> parts = {&first};
    std::vector<int64_t> ne(first.ne.begin(), first.ne.begin() + std::max(1, first.n_dims));
    if (const auto [layer, kind, expert] = split_expert_name(first.name); expert >= 0) {
      if (expert > 0) continue;
      name = cat("blk.", layer, ".", kind, "_exps.weight");
      for (int64_t x = 1; x < c.n_expert; ++x) {
        const SourceTensor* p = src.find_tensor(cat("blk.", layer, ".", kind, ".", x, ".weight"));
        if (!p || p->type != first.type || p->ne != first.ne)
          fail(src.path(), ": expert ", x, " of ", name, " is missing or differs from expert 0 in type or shape");
        parts.push_back(p);
      }
      ne = {first.ne[0], first.ne[1], c.n_expert};
    }
    const SourceTensor& t = first;
    GgmlType to = t.type;
    if (!scheme.empty()) {
      TensorSpec spec{name, ne, tensor_layer(name, c.n_layer, src.path())};
      to = tensor_type_for_scheme(scheme, spec, c, imatrix != nullptr);
    }
    const int64_t n0 = t.ne[0], rows = t.ne[1] * t.ne[2] * t.ne[3];  // per part
    const bool quantized = to != t.type && to != GgmlType::F32 && to != GgmlType::F16 && to != GgmlType::BF16;
    // This tensor's importances (ne0 per expert), as llama-quantize picks them.
    const float* im = nullptr;
    if (quantized && imatrix != nullptr) {
      const auto it = imatrix->entries.find(name);
      if (it != imatrix->entries.end()) {
        const uint64_t want = static_cast<uint64_t>(n0) * static_cast<uint64_t>(ne.size() > 2 ? ne[2] : 1);
        if (it->second.size() == want) im = it->second.data();
        else if (name != "token_embd.weight")  // llama-quantize ignores a mismatched entry only there
          fail("--imatrix: entry '", name, "' has ", it->second.size(), " values; the tensor needs ", want,
               " (an importance matrix made for another model?)");
      }
    }
    if (quantized && im == nullptr) {
      const bool q2_k_s = lower_ascii(scheme) == "q2_k_s" && to == GgmlType::Q2_K && name != "token_embd.weight" &&
                          name != "output.weight";
      if (tensor_needs_imatrix(name, to) || q2_k_s || !can_quantize(to))
        fail("tensor '", name, "': type ", type_name(to), " needs an importance matrix",
             imatrix ? " and --imatrix has no entry for it" : " (--imatrix FILE, made by llama-imatrix)");
    }
    const size_t in_row = static_cast<size_t>(row_bytes(t.type, n0));
    const int64_t rows_per_expert = t.ne[1];
    w.add_tensor(name, to, ne, [parts, to, n0, rows, in_row, im, rows_per_expert](uint8_t* dst, size_t) {
      const size_t out_row = static_cast<size_t>(row_bytes(to, n0));
      std::vector<float> row(static_cast<size_t>(n0));
      for (size_t p = 0; p < parts.size(); ++p) {
        const SourceTensor* tp = parts[p];
        uint8_t* part_dst = dst + out_row * static_cast<size_t>(rows) * p;
        if (to == tp->type) {
          std::memcpy(part_dst, tp->data, tp->n_bytes);
          continue;
        }
        for (int64_t r = 0; r < rows; ++r) {
          dequantize_row(tp->type, tp->data + in_row * static_cast<size_t>(r), row.data(), n0);
          uint8_t* out = part_dst + out_row * static_cast<size_t>(r);
          const int64_t g = static_cast<int64_t>(p) * rows + r;  // row of the whole (stacked) tensor
          if (im != nullptr) quantize_row_imatrix(to, row.data(), out, n0, im + (g / rows_per_expert) * n0);
          else quantize_row(to, row.data(), out, n0);
        }
      }
    });
  }
  w.write(path, progress);
}

}  // namespace shardlm
