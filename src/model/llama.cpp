#include "model/llama.h"

#include <cstring>

#include "core/error.h"

namespace shardlm {
namespace {
constexpr int kTagHidden = 100;  // stage-to-stage hidden states
}

LlamaModel::LlamaModel(const ModelConfig& config, const Mapping& mapping, Backend& backend, Communicator& comm,
                       ModelWeights weights, const ModelOptions& options)
    : config_(config),
      mapping_(mapping),
      backend_(backend),
      comm_(comm),
      weights_(std::move(weights)),
      options_(options) {
  const int tp = mapping_.tp_size(), tr = mapping_.tp_rank();
  heads_ = head_shard(config_, tp, tr);
  vocab_ = vocab_shard(config_, tp, tr);
  for (int r = 0; r < tp; ++r) vocab_counts_.push_back(static_cast<size_t>(vocab_shard(config_, tp, r).size()));
  tp_group_ = comm_.make_group(mapping_.tp_group());
  if (options_.n_ctx < 1) fail("context size ", options_.n_ctx, " must be >= 1");
  if (options_.n_batch < 1) fail("batch size ", options_.n_batch, " must be >= 1");
  if (options_.kv_type != GgmlType::F32 && options_.kv_type != GgmlType::F16)
    fail("KV cache type ", type_name(options_.kv_type), " is not supported (f32, f16)");
  if (static_cast<int64_t>(weights_.layers.size()) != mapping_.layers().size())
    fail_kind(ErrorKind::kInternal, "weights hold ", weights_.layers.size(), " layers, stage owns ",
              mapping_.layers().size());
  ff_local_ = weights_.layers.empty() ? 0 : weights_.layers[0].w_gate.n_rows;

  const int64_t hd = config_.head_dim;
  const int64_t kv_w = heads_.kv_heads.size() * hd;
  const size_t kv_layer = static_cast<size_t>(
      checked_mul<int64_t>(checked_mul<int64_t>(options_.n_ctx, kv_w, "kv cache"), type_size(options_.kv_type),
                           "kv cache"));
  for (size_t l = 0; l < weights_.layers.size(); ++l) {
    kv_.push_back(backend_.alloc(kv_layer));
    kv_.push_back(backend_.alloc(kv_layer));
    KvLayerView v;
    v.type = options_.kv_type;
    v.n_ctx = options_.n_ctx;
    v.n_head_kv = heads_.kv_heads.size();
    v.head_dim = hd;
    v.k = kv_[2 * l]->data();
    v.v = kv_[2 * l + 1]->data();
    kv_views_.push_back(v);
    kv_bytes_ += 2 * kv_layer;
  }

  const int64_t nb = options_.n_batch;
  auto act = [&](int64_t width) {
    const size_t bytes = static_cast<size_t>(checked_mul<int64_t>(nb, width, "workspace")) * sizeof(float);
    workspace_bytes_ += bytes;
    return backend_.alloc(bytes);
  };
  x_ = act(config_.n_embd);
  xn_ = act(config_.n_embd);
  o_ = act(config_.n_embd);
  q_ = act(heads_.q_heads.size() * hd);
  att_ = act(heads_.q_heads.size() * hd);
  k_ = act(kv_w);
  v_ = act(kv_w);
  gate_ = act(std::max<int64_t>(ff_local_, 1));
  up_ = act(std::max<int64_t>(ff_local_, 1));
  if (mapping_.is_last_stage()) {
    // One row each: decode needs only the last token's logits; all_logits steps grow them on demand.
    logits_local_ = backend_.alloc(static_cast<size_t>(vocab_.size()) * sizeof(float));
    logits_all_ = backend_.alloc(static_cast<size_t>(config_.n_vocab) * sizeof(float));
    workspace_bytes_ += static_cast<size_t>(vocab_.size() + config_.n_vocab) * sizeof(float);
  }
}

bool LlamaModel::step(const int32_t* ids, int64_t n_tok, int64_t pos0, bool all_logits,
                      std::vector<float>* logits) {
  if (n_tok < 1 || n_tok > options_.n_batch)
    fail("step of ", n_tok, " tokens is outside [1, ", options_.n_batch, "] (the batch size)");
  if (pos0 < 0 || pos0 + n_tok > options_.n_ctx)
    fail("positions [", pos0, ", ", pos0 + n_tok, ") do not fit the context of ", options_.n_ctx, " tokens");
  backend_.begin_step({pos0, n_tok});
  const size_t hidden_bytes = static_cast<size_t>(n_tok * config_.n_embd) * sizeof(float);
  float* x = x_->as<float>();
  if (mapping_.is_first_stage()) {
    for (int64_t t = 0; t < n_tok; ++t)
      if (ids[t] < 0 || ids[t] >= config_.n_vocab)
        fail("token id ", ids[t], " is outside the vocabulary [0, ", config_.n_vocab, ")");
    backend_.get_rows(weights_.token_embd, ids, n_tok, x);
  } else {
    backend_.synchronize();
    comm_.recv(x, hidden_bytes, mapping_.prev_stage_rank(), kTagHidden);
  }
  for (int l = 0; l < static_cast<int>(weights_.layers.size()); ++l) layer(l, n_tok);
  if (!mapping_.is_last_stage()) {
    backend_.synchronize();
    comm_.send(x, hidden_bytes, mapping_.next_stage_rank(), kTagHidden);
    return false;
  }
  compute_logits(n_tok, all_logits, logits);
  return true;
}

void LlamaModel::layer(int index, int64_t n_tok) {
  const LayerWeights& w = weights_.layers[static_cast<size_t>(index)];
  const KvLayerView& kv = kv_views_[static_cast<size_t>(index)];
  const int64_t d = config_.n_embd, hd = config_.head_dim;
  const int64_t nq = heads_.q_heads.size(), nkv = heads_.kv_heads.size();
  float* x = x_->as<float>();
  float* xn = xn_->as<float>();
  float* q = q_->as<float>();
  float* k = k_->as<float>();
  float* v = v_->as<float>();
  float* att = att_->as<float>();
  float* o = o_->as<float>();
  const float* ff = weights_.rope_freq_factors.empty() ? nullptr : weights_.rope_freq_factors.data();

  // Attention block: column-parallel q/k/v, local heads, row-parallel output + one all-reduce.
  backend_.rms_norm(x, w.attn_norm, xn, n_tok, d, config_.rms_eps);
  backend_.matmul(w.wq, xn, q, n_tok);
  backend_.matmul(w.wk, xn, k, n_tok);
  backend_.matmul(w.wv, xn, v, n_tok);
  if (w.bq) {
    backend_.add_bias(q, w.bq, n_tok, nq * hd);
    backend_.add_bias(k, w.bk, n_tok, nkv * hd);
    backend_.add_bias(v, w.bv, n_tok, nkv * hd);
  }
  backend_.rope(q, n_tok, nq, hd, config_.rope_freq_base, ff);
  backend_.rope(k, n_tok, nkv, hd, config_.rope_freq_base, ff);
  backend_.kv_store(kv, k, v, n_tok);
  backend_.attention(q, kv, n_tok, nq, att);
  backend_.matmul(w.wo, att, o, n_tok);
  if (mapping_.tp_size() > 1) {
    backend_.synchronize();
    tp_group_->all_reduce_sum(o, static_cast<size_t>(n_tok * d));
  }
  backend_.add(x, o, n_tok * d);

  // FFN block: column-parallel gate/up, row-parallel down + one all-reduce.
  float* g = gate_->as<float>();
  float* u = up_->as<float>();
  backend_.rms_norm(x, w.ffn_norm, xn, n_tok, d, config_.rms_eps);
  backend_.matmul(w.w_gate, xn, g, n_tok);
  backend_.matmul(w.w_up, xn, u, n_tok);
  backend_.swiglu(g, u, g, n_tok * ff_local_);
  backend_.matmul(w.w_down, g, o, n_tok);
  if (mapping_.tp_size() > 1) {
    backend_.synchronize();
    tp_group_->all_reduce_sum(o, static_cast<size_t>(n_tok * d));
  }
  backend_.add(x, o, n_tok * d);
}

void LlamaModel::compute_logits(int64_t n_tok, bool all_logits, std::vector<float>* logits) {
  const int64_t d = config_.n_embd, nv = config_.n_vocab;
  const int64_t first = all_logits ? 0 : n_tok - 1, rows = n_tok - first;
  float* xn = xn_->as<float>();
  backend_.rms_norm(x_->as<float>() + first * d, weights_.output_norm, xn, rows, d, config_.rms_eps);
  const size_t local_bytes = static_cast<size_t>(rows * vocab_.size()) * sizeof(float);
  if (logits_local_->size() < local_bytes) logits_local_ = backend_.alloc(local_bytes);
  if (logits_all_->size() < static_cast<size_t>(rows * nv) * sizeof(float))
    logits_all_ = backend_.alloc(static_cast<size_t>(rows * nv) * sizeof(float));
  float* local = logits_local_->as<float>();
  backend_.matmul(weights_.output, xn, local, rows);
  backend_.synchronize();
  std::vector<float> host(static_cast<size_t>(rows * nv));
  if (mapping_.tp_size() == 1) {
    backend_.download(host.data(), local, host.size() * sizeof(float));
  } else {
    // Each rank holds (rows, its vocabulary slice); gathered member by member, then interleaved per row.
    std::vector<size_t> counts;
    for (size_t c : vocab_counts_) counts.push_back(c * static_cast<size_t>(rows));
    float* all = logits_all_->as<float>();
    tp_group_->all_gather(local, all, counts);
    std::vector<float> gathered(static_cast<size_t>(rows * nv));
    backend_.download(gathered.data(), all, gathered.size() * sizeof(float));
    size_t at = 0;
    int64_t col = 0;
    for (size_t r = 0; r < vocab_counts_.size(); ++r) {
      const int64_t w = static_cast<int64_t>(vocab_counts_[r]);
      for (int64_t t = 0; t < rows; ++t)
        std::memcpy(&host[static_cast<size_t>(t * nv + col)], &gathered[at + static_cast<size_t>(t * w)],
                    static_cast<size_t>(w) * sizeof(float));
      at += static_cast<size_t>(w * rows);
      col += w;
    }
  }
  if (logits) *logits = std::move(host);
}

}  // namespace shardlm
