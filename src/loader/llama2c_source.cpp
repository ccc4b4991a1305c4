#include "loader/llama2c_source.h"

#include <cstring>
#include <fstream>
#include <iterator>

#include "core/error.h"

namespace shardlm {
namespace {

std::vector<uint8_t> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail_kind(ErrorKind::kIo, "cannot open '", path, "': ", std::strerror(errno));
  std::vector<uint8_t> b((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  return b;
}

class Reader {
 public:
  Reader(const std::vector<uint8_t>& b, std::string path) : b_(b), path_(std::move(path)) {}
  template <typename T>
  T get(const char* field) {
    if (b_.size() - at_ < sizeof(T))
      fail(path_, ": truncated at byte ", at_, " while reading ", field, " (file has ", b_.size(), " bytes)");
    T v;
    std::memcpy(&v, b_.data() + at_, sizeof(T));
    at_ += sizeof(T);
    return v;
  }
  const uint8_t* take(size_t n, const std::string& field) {
    if (b_.size() - at_ < n)
      fail(path_, ": truncated: ", field, " needs ", n, " bytes at offset ", at_, ", only ", b_.size() - at_,
           " left");
    const uint8_t* p = b_.data() + at_;
    at_ += n;
    return p;
  }
  size_t left() const { return b_.size() - at_; }

 private:
  const std::vector<uint8_t>& b_;
  std::string path_;
  size_t at_ = 0;
};

class Llama2cSource final : public ModelSource {
 public:
  Llama2cSource(const std::string& ckpt, const std::string& tok) : path_(ckpt) {
    data_ = read_file(ckpt);
    Reader r(data_, ckpt);
    const int32_t dim = r.get<int32_t>("dim"), hidden = r.get<int32_t>("hidden_dim"),
                  n_layer = r.get<int32_t>("n_layers"), n_head = r.get<int32_t>("n_heads"),
                  n_kv = r.get<int32_t>("n_kv_heads"), vocab_raw = r.get<int32_t>("vocab_size"),
                  seq = r.get<int32_t>("seq_len");
    auto positive = [&](const char* f, int32_t v) {
      if (v < 1 || v > (1 << 20)) fail(ckpt, ": header field ", f, " = ", v, " is outside [1, 1048576]");
    };
    positive("dim", dim);
    positive("hidden_dim", hidden);
    positive("n_layers", n_layer);
    positive("n_heads", n_head);
    positive("n_kv_heads", n_kv);
    positive("seq_len", seq);
    if (vocab_raw == 0 || vocab_raw == INT32_MIN) fail(ckpt, ": header field vocab_size = ", vocab_raw, " is invalid");
    const bool shared = vocab_raw > 0;
    const int32_t vocab = shared ? vocab_raw : -vocab_raw;
    positive("vocab_size", vocab);
    if (dim % n_head != 0) fail(ckpt, ": dim ", dim, " is not a multiple of n_heads ", n_head);
    c_.arch = "llama";
    c_.name = "llama2.c import";
    c_.n_vocab = vocab;
    c_.n_embd = dim;
    c_.n_layer = n_layer;
    c_.n_head = n_head;
    c_.n_head_kv = n_kv;
    c_.head_dim = dim / n_head;
    c_.n_ff = hidden;
    c_.n_ctx_train = seq;
    c_.rms_eps = 1e-5f;
    c_.rope_freq_base = 10000.0f;
    c_.tied_output = shared;
    c_.validate();

    const int64_t kv_dim = int64_t(n_kv) * c_.head_dim;
    // run.c's order; every matrix is (out, in) row-major, which is ggml's {in, out}.
    auto arr = [&](const std::string& what, std::vector<int64_t> ne, int n_rep) {
      int64_t count = 1;
      for (int64_t x : ne) count = checked_mul(count, x, what);
      const size_t bytes = static_cast<size_t>(checked_mul<int64_t>(count, 4, what));
      std::vector<const uint8_t*> parts;
      for (int i = 0; i < n_rep; ++i) parts.push_back(r.take(bytes, what));
      return std::make_pair(parts, ne);
    };
    auto add = [&](const std::string& name, const uint8_t* p, std::vector<int64_t> ne) {
      SourceTensor t;
      t.name = name;
      t.type = GgmlType::F32;
      t.n_dims = static_cast<int>(ne.size());
      for (size_t i = 0; i < ne.size(); ++i) t.ne[i] = ne[i];
      t.data = p;
      t.n_bytes = 4;
      for (int64_t x : ne) t.n_bytes *= static_cast<uint64_t>(x);
      tensors_.push_back(t);
    };
    auto emb = arr("token_embedding", {dim, vocab}, 1);
    add("token_embd.weight", emb.first[0], emb.second);
    auto per_layer = [&](const std::string& gguf, const std::string& what, std::vector<int64_t> ne) {
      auto a = arr(what, ne, n_layer);
      for (int l = 0; l < n_layer; ++l) add(cat("blk.", l, ".", gguf), a.first[static_cast<size_t>(l)], ne);
    };
    per_layer("attn_norm.weight", "rms_att_weight", {dim});
    per_layer("attn_q.weight", "wq", {dim, dim});
    per_layer("attn_k.weight", "wk", {dim, kv_dim});
    per_layer("attn_v.weight", "wv", {dim, kv_dim});
    per_layer("attn_output.weight", "wo", {dim, dim});
    per_layer("ffn_norm.weight", "rms_ffn_weight", {dim});
    per_layer("ffn_gate.weight", "w1", {dim, hidden});
    per_layer("ffn_down.weight", "w2", {hidden, dim});
    per_layer("ffn_up.weight", "w3", {dim, hidden});
    auto fin = arr("rms_final_weight", {dim}, 1);
    add("output_norm.weight", fin.first[0], fin.second);
    // Two legacy RoPE tables (seq_len * head_size / 2 floats each) that run.c skips too.
    arr("freq_cis_real", {seq, c_.head_dim / 2}, 1);
    arr("freq_cis_imag", {seq, c_.head_dim / 2}, 1);
    if (!shared) {
      auto cls = arr("wcls", {dim, vocab}, 1);
      add("output.weight", cls.first[0], cls.second);
    }
    if (r.left() != 0) fail(ckpt, ": ", r.left(), " unexpected bytes after the last tensor");
    read_vocab(tok, vocab);
  }

  const ModelConfig& config() const override { return c_; }
  const std::vector<SourceTensor>& tensors() const override { return tensors_; }
  const Vocab* vocab() const override { return &vocab_; }
  std::string format_name() const override { return "llama2c"; }
  std::string path() const override { return path_; }

 private:
  void read_vocab(const std::string& path, int32_t n_vocab) {
    const std::vector<uint8_t> b = read_file(path);
    Reader r(b, path);
    const int32_t max_len = r.get<int32_t>("max_token_length");
    if (max_len < 1 || max_len > 4096) fail(path, ": max_token_length = ", max_len, " is outside [1, 4096]");
    vocab_.model = Vocab::Model::kSpm;
    vocab_.bos = 1;
    vocab_.eos = 2;
    vocab_.unk = 0;
    vocab_.add_bos = true;
    vocab_.add_space_prefix = true;
    for (int32_t i = 0; i < n_vocab; ++i) {
      const float score = r.get<float>("score");
      const int32_t len = r.get<int32_t>("token length");
      if (len < 0 || len > max_len)
        fail(path, ": token ", i, " has length ", len, ", outside [0, max_token_length = ", max_len, "]");
      const uint8_t* p = r.take(static_cast<size_t>(len), cat("token ", i));
      std::string piece(reinterpret_cast<const char*>(p), static_cast<size_t>(len));
      TokenType type = TokenType::kNormal;
      if (i == 0) {
        type = TokenType::kUnknown;
      } else if (piece == "\n<s>\n") {
        piece = "<s>";
        type = TokenType::kControl;
      } else if (piece == "\n</s>\n") {
        piece = "</s>";
        type = TokenType::kControl;
      } else if (piece.size() == 6 && piece.rfind("<0x", 0) == 0 && piece[5] == '>') {
        type = TokenType::kByte;
      } else {
        std::string out;
        for (char ch : piece) out += ch == ' ' ? std::string("\xE2\x96\x81") : std::string(1, ch);
        piece = out;
      }
      vocab_.tokens.push_back(piece);
      vocab_.scores.push_back(score);
      vocab_.types.push_back(type);
    }
    if (r.left() != 0) fail(path, ": ", r.left(), " unexpected bytes after ", n_vocab, " tokens (vocab_size mismatch?)");
  }

  std::string path_;
  std::vector<uint8_t> data_;
  ModelConfig c_;
  std::vector<SourceTensor> tensors_;
  Vocab vocab_;
};

}  // namespace

std::unique_ptr<ModelSource> open_llama2c_source(const std::string& checkpoint, const std::string& tokenizer) {
  return std::make_unique<Llama2cSource>(checkpoint, tokenizer);
}

}  // namespace shardlm
