#include "model/llama.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/error.h"

namespace shardlm {
namespace {
constexpr int kTagHidden = 100;  // stage-to-stage hidden states
}

struct LlamaModel::Segment {
  Backend* b = nullptr;
  int first = 0, end = 0;  // layer indices within this stage
  std::vector<KvLayerView> kv_views;  // (end - first) the engine's pools of these layers
  // Activations of one step, in b's memory.
  std::unique_ptr<DeviceBuffer> x, xn, q, k, v, att, o, gate, up;
  std::unique_ptr<DeviceBuffer> kn;  // (n_batch, kv_local * head_dim) normed k heads (qwen3), else null
  // Mixture of experts only (else null): gate/up then hold (n_batch * n_expert_used, ff_local).
  std::unique_ptr<DeviceBuffer> router_logits;  // (n_batch, n_expert)
  std::unique_ptr<DeviceBuffer> xs;             // (n_batch * n_expert_used, n_embd) token rows grouped by expert
  std::unique_ptr<DeviceBuffer> ys;             // (n_batch * n_expert_used, n_embd) each chosen expert's output
  // Experts held apart from the segment's backend (in RAM, run by the CPU): the FFN's buffers there, null
  // otherwise. xn arrives from the segment's backend, o goes back to it.
  Backend* eb = nullptr;
  std::unique_ptr<DeviceBuffer> e_xn;    // (n_batch, n_embd)
  std::unique_ptr<DeviceBuffer> e_xs;    // (n_batch * n_expert_used, n_embd)
  std::unique_ptr<DeviceBuffer> e_gate;  // (n_batch * n_expert_used, ff_local)
  std::unique_ptr<DeviceBuffer> e_up;    // (n_batch * n_expert_used, ff_local)
  std::unique_ptr<DeviceBuffer> e_ys;    // (n_batch * n_expert_used, n_embd)
  std::unique_ptr<DeviceBuffer> e_o;     // (n_batch, n_embd)
};

std::vector<KvLayerView> allocate_kv_pools(const ModelConfig& config, int64_t n_head_kv_local,
                                           const std::vector<Backend*>& layer_backend, int64_t n_blocks,
                                           int64_t block_size, GgmlType type,
                                           std::vector<std::unique_ptr<DeviceBuffer>>* storage, uint64_t* bytes) {
  kv_type_check(type, config.head_dim);
  std::vector<KvLayerView> views;
  for (Backend* b : layer_backend) {
    KvLayerView v;
    v.type = type;
    v.n_blocks = n_blocks;
    v.block_size = block_size;
    v.n_head_kv = n_head_kv_local;
    v.head_dim = config.head_dim;
    const size_t n = static_cast<size_t>(
        checked_mul<int64_t>(checked_mul<int64_t>(n_blocks, block_size, "KV pool"), v.row_bytes(), "KV pool"));
    storage->push_back(b->alloc(n));
    v.k = storage->back()->data();
    storage->push_back(b->alloc(n));
    v.v = storage->back()->data();
    *bytes += 2 * n;
    views.push_back(v);
  }
  return views;
}

LlamaModel::LlamaModel(const ModelConfig& config, const Mapping& mapping, Communicator& comm, ModelWeights weights,
                       const ModelOptions& options)
    : config_(config), mapping_(mapping), comm_(comm), weights_(std::move(weights)), options_(options) {
  const int tp = mapping_.tp_size(), tr = mapping_.tp_rank();
  heads_ = head_shard(config_, tp, tr);
  vocab_ = vocab_shard(config_, tp, tr);
  for (int r = 0; r < tp; ++r) vocab_counts_.push_back(static_cast<size_t>(vocab_shard(config_, tp, r).size()));
  tp_group_ = comm_.make_group(mapping_.tp_group());
  if (options_.n_batch < 1) fail("batch size ", options_.n_batch, " must be >= 1");
  const int n_layers = static_cast<int>(weights_.layers.size());
  if (static_cast<int>(options_.kv.size()) != n_layers)
    fail_kind(ErrorKind::kInternal, "KV pools for ", options_.kv.size(), " layers, stage owns ", n_layers);
  for (const KvLayerView& kv : options_.kv) {
    kv_type_check(kv.type, config_.head_dim);
    if (kv.n_blocks != options_.kv.front().n_blocks || kv.block_size != options_.kv.front().block_size ||
        kv.n_blocks < 1 || kv.block_size < 1 || kv.head_dim != config_.head_dim)
      fail_kind(ErrorKind::kInternal, "KV pools of different shapes: ", kv.n_blocks, " x ", kv.block_size, " head_dim ",
                kv.head_dim);
  }
  if (n_layers != mapping_.layers().size() || static_cast<int>(weights_.layer_backend.size()) != n_layers || n_layers < 1)
    fail_kind(ErrorKind::kInternal, "weights hold ", n_layers, " layers on ", weights_.layer_backend.size(),
              " backends, stage owns ", mapping_.layers().size());
  ff_local_ = config_.moe() ? weights_.layers[0].exp_gate.at(0).n_rows : weights_.layers[0].w_gate.n_rows;
  if (config_.moe() && weights_.layers[0].exp_gate.size() != static_cast<size_t>(mapping_.experts().size()))
    fail_kind(ErrorKind::kInternal, "layer 0 holds ", weights_.layers[0].exp_gate.size(), " experts, the mapping ",
              mapping_.experts().size());
  const int64_t ffn_rows = config_.moe() ? config_.n_expert_used : 1;  // FFN rows per token

  const int64_t hd = config_.head_dim, nb = options_.n_batch;
  const int64_t kv_w = heads_.kv_heads.size() * hd;
  for (int l = 0; l < n_layers; ++l) {
    Backend* b = weights_.layer_backend[static_cast<size_t>(l)];
    if (segments_.empty() || segments_.back()->b != b) {
      auto seg = std::make_unique<Segment>();
      seg->b = b;
      seg->first = l;
      auto act = [&](int64_t width) {
        const size_t bytes = static_cast<size_t>(checked_mul<int64_t>(nb, std::max<int64_t>(width, 1), "workspace")) *
                             sizeof(float);
        workspace_bytes_ += bytes;
        return b->alloc(bytes);
      };
      seg->x = act(config_.n_embd);
      seg->xn = act(config_.n_embd);
      seg->o = act(config_.n_embd);
      seg->q = act(heads_.q_heads.size() * hd);
      seg->att = act(heads_.q_heads.size() * hd);
      seg->k = act(kv_w);
      seg->v = act(kv_w);
      if (config_.qk_norm) seg->kn = act(kv_w);
      seg->gate = act(ff_local_ * ffn_rows);
      seg->up = act(ff_local_ * ffn_rows);
      if (config_.moe()) {
        seg->router_logits = act(config_.n_expert);
        seg->xs = act(config_.n_embd * ffn_rows);
        seg->ys = act(config_.n_embd * ffn_rows);
      }
      segments_.push_back(std::move(seg));
    }
    Segment& seg = *segments_.back();
    seg.end = l + 1;
    if (Backend* eb = weights_.layers[static_cast<size_t>(l)].expert_backend; eb != nullptr && eb != b) {
      if (seg.eb != nullptr && seg.eb != eb)
        fail_kind(ErrorKind::kInternal, "layer ", l, ": experts on a second backend apart from their layer's");
      if (seg.eb == nullptr) {
        seg.eb = eb;
        auto eact = [&](int64_t width) {
          const size_t bytes =
              static_cast<size_t>(checked_mul<int64_t>(nb, std::max<int64_t>(width, 1), "workspace")) * sizeof(float);
          workspace_bytes_ += bytes;
          return eb->alloc(bytes);
        };
        seg.e_xn = eact(config_.n_embd);
        seg.e_xs = eact(config_.n_embd * ffn_rows);
        seg.e_gate = eact(ff_local_ * ffn_rows);
        seg.e_up = eact(ff_local_ * ffn_rows);
        seg.e_ys = eact(config_.n_embd * ffn_rows);
        seg.e_o = eact(config_.n_embd);
      }
    }
    const KvLayerView& v = options_.kv[static_cast<size_t>(l)];
    if (v.n_head_kv != heads_.kv_heads.size())
      fail_kind(ErrorKind::kInternal, "KV pool of layer ", l, " holds ", v.n_head_kv, " heads, this rank ",
                heads_.kv_heads.size());
    seg.kv_views.push_back(v);
  }
  if (mapping_.is_last_stage()) {
    // One row: decode of one sequence needs only its last token's logits; steps with more rows grow a
    // second buffer on demand.
    Backend& b = *segments_.back()->b;
    logits_row_ = b.alloc(static_cast<size_t>(vocab_.size()) * sizeof(float));
    workspace_bytes_ += static_cast<size_t>(vocab_.size()) * sizeof(float);
  }
}

LlamaModel::~LlamaModel() {
  for (int h : send_handle_) comm_.wait_send(h);
}

bool LlamaModel::device_collectives(const Backend& b) const {
  return b.device() != DeviceKind::kCpu && comm_.accepts_device_memory();
}

bool LlamaModel::reduces_on_device(const Backend& b) const {
  return mapping_.tp_size() > 1 && device_collectives(b);
}

void LlamaModel::all_reduce(Backend& b, float* buf, size_t n) {
  if (device_collectives(b)) {
    // A device communicator (NCCL) enqueues on the backend's stream: no host sync, so the step can be
    // captured in a CUDA graph.
    tp_group_->all_reduce_sum(buf, n);
    return;
  }
  b.synchronize();
  if (b.device() == DeviceKind::kCpu) {
    tp_group_->all_reduce_sum(buf, n);
    return;
  }
  host_stage_.resize(n);
  b.download(host_stage_.data(), buf, n * sizeof(float));
  tp_group_->all_reduce_sum(host_stage_.data(), n);
  b.upload(buf, host_stage_.data(), n * sizeof(float));
}

void LlamaModel::send_hidden(Backend& b, float* x, size_t n) {
  b.synchronize();
  if (device_collectives(b)) {
    comm_.send(x, n * sizeof(float), mapping_.next_stage_rank(), kTagHidden);
    return;
  }
  // Copied out and sent without waiting: this stage goes on with its next micro-batch while the message
  // is delivered. The buffer's previous send (two messages ago) is long done by now.
  const int slot = send_slot_;
  send_slot_ ^= 1;
  comm_.wait_send(send_handle_[slot]);
  send_handle_[slot] = -1;
  std::vector<float>& buf = send_buf_[slot];
  buf.resize(n);
  b.download(buf.data(), x, n * sizeof(float));
  send_handle_[slot] = comm_.isend(buf.data(), n * sizeof(float), mapping_.next_stage_rank(), kTagHidden);
}

void LlamaModel::recv_hidden(Backend& b, float* x, size_t n) {
  if (b.device() == DeviceKind::kCpu || comm_.accepts_device_memory()) {
    b.synchronize();
    comm_.recv(x, n * sizeof(float), mapping_.prev_stage_rank(), kTagHidden);
    return;
  }
  host_stage_.resize(n);
  comm_.recv(host_stage_.data(), n * sizeof(float), mapping_.prev_stage_rank(), kTagHidden);
  b.upload(x, host_stage_.data(), n * sizeof(float));
}

void LlamaModel::segment_body(size_t s, const BatchInfo& batch) {
  Segment& seg = *segments_[s];
  const int64_t n_tok = batch.n_tok;
  const size_t n_hidden = static_cast<size_t>(n_tok * config_.n_embd);
  for (int l = seg.first; l < seg.end; ++l) layer(seg, l, n_tok, l > seg.first);
  if (seg.end > seg.first) {
    if (mapping_.tp_size() > 1) all_reduce(*seg.b, seg.o->as<float>(), n_hidden);
    seg.b->add(seg.x->as<float>(), seg.o->as<float>(), static_cast<int64_t>(n_hidden));
  }
  if (s + 1 == segments_.size() && mapping_.is_last_stage()) head(batch);
}

bool LlamaModel::greedy_on_device() const {
  // Experts are routed on the host: a step reads the router's logits back, which the device token avoids.
  if (mapping_.pp_size() != 1 || segments_.size() != 1 || config_.n_vocab >= (int64_t{1} << 24) || config_.moe())
    return false;
  const Backend& b = *segments_.front()->b;
  return b.device_tokens() && (mapping_.tp_size() == 1 || device_collectives(b));
}

void LlamaModel::set_device_token(int32_t id) {
  if (!greedy_on_device()) fail_kind(ErrorKind::kInternal, "set_device_token: greedy decoding on the device is not available");
  if (id < 0 || id >= config_.n_vocab)
    fail("token id ", id, " is outside the vocabulary [0, ", config_.n_vocab, ")");
  segments_.front()->b->set_device_token(id);
}

void LlamaModel::step_greedy(const BatchInfo& batch) {
  if (!greedy_on_device()) fail_kind(ErrorKind::kInternal, "step_greedy: greedy decoding on the device is not available");
  check_batch(batch);
  if (batch.n_seq() != 1 || batch.n_tok != 1 || batch.out_rows != std::vector<int32_t>{0})
    fail_kind(ErrorKind::kInternal, "step_greedy: a step of one sequence and one token, with its logits");
  Segment& seg = *segments_.front();
  Backend& b = *seg.b;
  const int tp = mapping_.tp_size();
  if (!greedy_cands_) greedy_cands_ = b.alloc(static_cast<size_t>(4 * tp) * sizeof(float));
  float* cands = greedy_cands_->as<float>();
  n_out_ = 1;
  auto body = [&] {
    b.get_rows_device_token(weights_.token_embd, seg.x->as<float>());
    segment_body(0, batch);
    // Each rank's best of its vocabulary slice in its own slot; the sum over the group gives every rank
    // every slot (exact: integers and zeros), and each picks the same token.
    b.greedy_candidate(logits_for(1), static_cast<int64_t>(vocab_.size()), vocab_.begin, cands, mapping_.tp_rank(), tp);
    if (tp > 1) all_reduce(b, cands, static_cast<size_t>(4 * tp));
    b.greedy_pick(cands, tp);
  };
  if (greedy_runner_) {
    greedy_runner_(batch, body);
  } else {
    b.begin_step(batch);
    body();
  }
  b.mark_device_token(batch.seqs[0].pos0);
}

int32_t LlamaModel::device_token_at(int64_t pos) {
  const int32_t t = segments_.front()->b->device_token_at(pos);
  if (t < 0 || t >= config_.n_vocab)
    fail("the step at position ", pos, " gave no token (", t, "): its logits had no candidate");
  return t;
}

void LlamaModel::check_batch(const BatchInfo& batch) const {
  if (batch.n_tok < 1 || batch.n_tok > options_.n_batch)
    fail("step of ", batch.n_tok, " tokens is outside [1, ", options_.n_batch, "] (the batch size)");
  batch.validate(kv_blocks(), kv_block_size());
}

bool LlamaModel::forward(const BatchInfo& batch, const int32_t* ids) {
  check_batch(batch);
  const int64_t n_tok = batch.n_tok;
  const size_t n_hidden = static_cast<size_t>(n_tok * config_.n_embd);
  Segment& first = *segments_.front();
  if (mapping_.is_first_stage()) {
    for (int64_t t = 0; t < n_tok; ++t)
      if (ids[t] < 0 || ids[t] >= config_.n_vocab)
        fail("token id ", ids[t], " is outside the vocabulary [0, ", config_.n_vocab, ")");
    first.b->begin_step(batch);
    first.b->get_rows(weights_.token_embd, ids, n_tok, first.x->as<float>());
  } else {
    recv_hidden(*first.b, first.x->as<float>(), n_hidden);
  }
  n_out_ = static_cast<int64_t>(batch.out_rows.size());
  // Graphs replay one-token steps of one sequence (decode at batch 1) on a model that lives on one backend.
  const bool graph = decode_runner_ && n_tok == 1 && segments_.size() == 1;
  for (size_t s = 0; s < segments_.size(); ++s) {
    Segment& seg = *segments_[s];
    if (s > 0) {
      // Offload boundary: the hidden state moves through host memory to the next backend.
      Segment& prev = *segments_[s - 1];
      host_stage_.resize(n_hidden);
      prev.b->synchronize();
      prev.b->download(host_stage_.data(), prev.x->as<float>(), n_hidden * sizeof(float));
      seg.b->upload(seg.x->as<float>(), host_stage_.data(), n_hidden * sizeof(float));
    }
    auto body = [&] { segment_body(s, batch); };
    if (graph) {
      decode_runner_(batch, body);
    } else {
      seg.b->begin_step(batch);
      body();
    }
  }
  Segment& last = *segments_.back();
  if (!mapping_.is_last_stage()) {
    send_hidden(*last.b, last.x->as<float>(), n_hidden);
    return false;
  }
  return true;
}

void LlamaModel::layer(Segment& seg, int index, int64_t n_tok, bool add_pending) {
  Backend& b = *seg.b;
  const LayerWeights& w = weights_.layers[static_cast<size_t>(index)];
  const KvLayerView& kv = seg.kv_views[static_cast<size_t>(index - seg.first)];
  const int64_t d = config_.n_embd, hd = config_.head_dim;
  const int64_t nq = heads_.q_heads.size(), nkv = heads_.kv_heads.size();
  float* x = seg.x->as<float>();
  float* xn = seg.xn->as<float>();
  float* q = seg.q->as<float>();
  float* k = seg.k->as<float>();
  float* v = seg.v->as<float>();
  float* att = seg.att->as<float>();
  float* o = seg.o->as<float>();
  const float* ff = weights_.rope_freq_factors.empty() ? nullptr : weights_.rope_freq_factors.data();

  // Attention block: column-parallel q/k/v, local heads, row-parallel output + one all-reduce. The
  // previous layer of this segment left its rank's share of the FFN output in o, to be summed over the
  // tensor-parallel group and added to x here (with the norm, in one kernel where the backend can).
  if (add_pending)
    reduce_add_norm(b, o, x, w.attn_norm, xn, n_tok);
  else
    b.rms_norm(x, w.attn_norm, xn, n_tok, d, config_.rms_eps);
  {
    const WeightView ws[3] = {w.wq, w.wk, w.wv};
    float* const ys[3] = {q, k, v};
    b.matmul_group(ws, 3, xn, ys, n_tok);
  }
  if (w.bq) {
    b.add_bias(q, w.bq, n_tok, nq * hd);
    b.add_bias(k, w.bk, n_tok, nkv * hd);
    b.add_bias(v, w.bv, n_tok, nkv * hd);
  }
  if (w.q_norm) {
    // Qwen3: each head is a row of head_dim for the norm. Out of place (no op promises in-place norms):
    // q's normed heads go to att, and attention then writes into q, which the output matmul reads.
    float* kn = seg.kn->as<float>();
    b.rms_norm(q, w.q_norm, att, n_tok * nq, hd, config_.rms_eps);
    b.rms_norm(k, w.k_norm, kn, n_tok * nkv, hd, config_.rms_eps);
    std::swap(q, att);
    k = kn;
  }
  b.rope_attention(q, k, v, kv, n_tok, nq, config_.rope_freq_base, ff, att);
  // o's sum over the group is the next call (reduce_add_norm); where that call is the device's fused one,
  // the matvec may push its share to the other ranks itself.
  const bool fused_reduce = reduces_on_device(b);
  if (fused_reduce)
    b.matmul_reduce(*tp_group_, w.wo, att, o, n_tok);
  else
    b.matmul(w.wo, att, o, n_tok);

  // FFN block: column-parallel gate/up, row-parallel down + one all-reduce.
  float* g = seg.gate->as<float>();
  float* u = seg.up->as<float>();
  reduce_add_norm(b, o, x, w.ffn_norm, xn, n_tok);
  if (config_.moe()) return moe_ffn(seg, w, n_tok);
  {
    const WeightView ws[2] = {w.w_gate, w.w_up};
    float* const ys[2] = {g, u};
    b.matmul_group(ws, 2, xn, ys, n_tok);
  }
  b.swiglu(g, u, g, n_tok * ff_local_);
  // The next layer of this segment starts with the fused reduce of o; the segment's last layer is followed
  // by a plain all-reduce instead.
  if (fused_reduce && index + 1 < seg.end)
    b.matmul_reduce(*tp_group_, w.w_down, g, o, n_tok);
  else
    b.matmul(w.w_down, g, o, n_tok);
  // o is this rank's share: its all-reduce and x += o are left to the next layer (reduce_add_norm) or to
  // the end of the segment.
}

void LlamaModel::moe_ffn(Segment& seg, const LayerWeights& w, int64_t n_tok) {
  Backend& b = *seg.b;
  const int64_t d = config_.n_embd, n_exp = config_.n_expert, k = config_.n_expert_used;
  float* xn = seg.xn->as<float>();
  // Routing on the host: softmax over the experts, the k most likely (lowest index first on ties), their
  // probabilities as weights, renormalized to sum 1 where the model says so. Every tensor-parallel rank
  // computes the same (its router and xn are the same).
  float* rl = seg.router_logits->as<float>();
  b.matmul(w.router, xn, rl, n_tok);
  std::vector<float> logits(static_cast<size_t>(n_tok * n_exp));
  b.download(logits.data(), rl, logits.size() * sizeof(float));
  std::vector<int32_t> chosen(static_cast<size_t>(n_tok * k));  // (n_tok, k) expert ids
  std::vector<float> weight(static_cast<size_t>(n_tok * k));    // (n_tok, k)
  std::vector<double> p(static_cast<size_t>(n_exp));
  std::vector<int32_t> order(static_cast<size_t>(n_exp));
  for (int64_t t = 0; t < n_tok; ++t) {
    const float* lt = logits.data() + t * n_exp;
    const double mx = *std::max_element(lt, lt + n_exp);
    double sum = 0;
    for (int64_t e = 0; e < n_exp; ++e) sum += p[static_cast<size_t>(e)] = std::exp(double(lt[e]) - mx);
    for (int64_t e = 0; e < n_exp; ++e) order[static_cast<size_t>(e)] = static_cast<int32_t>(e);
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t c) {
      return p[static_cast<size_t>(a)] > p[static_cast<size_t>(c)] || (p[static_cast<size_t>(a)] == p[static_cast<size_t>(c)] && a < c);
    });
    double top = 0;
    for (int64_t j = 0; j < k; ++j) top += p[static_cast<size_t>(order[static_cast<size_t>(j)])];
    for (int64_t j = 0; j < k; ++j) {
      const int32_t e = order[static_cast<size_t>(j)];
      chosen[static_cast<size_t>(t * k + j)] = e;
      weight[static_cast<size_t>(t * k + j)] =
          static_cast<float>(p[static_cast<size_t>(e)] / (config_.expert_weights_norm ? top : sum));
    }
  }
  // Group the (token, slot) pairs whose expert this rank holds (all of them unless expert-parallel) by
  // expert: slot_row[t*k + j] is the pair's row in xs/ys (-1: another rank's expert), tok[row] its token.
  const ExpertRange held = mapping_.experts();
  std::vector<int64_t> count(static_cast<size_t>(n_exp) + 1, 0);
  for (int32_t e : chosen)
    if (held.contains(e)) ++count[static_cast<size_t>(e) + 1];
  for (int64_t e = 0; e < n_exp; ++e) count[static_cast<size_t>(e) + 1] += count[static_cast<size_t>(e)];
  const int64_t n_rows = count[static_cast<size_t>(n_exp)];
  std::vector<int64_t> next(count.begin(), count.end() - 1);
  std::vector<int32_t> slot_row(chosen.size(), -1), tok(static_cast<size_t>(n_rows));
  for (size_t i = 0; i < chosen.size(); ++i) {
    if (!held.contains(chosen[i])) continue;
    const int64_t r = next[static_cast<size_t>(chosen[i])]++;
    slot_row[i] = static_cast<int32_t>(r);
    tok[static_cast<size_t>(r)] = static_cast<int32_t>(static_cast<int64_t>(i) / k);
  }
  // The experts run where they live: on the segment's backend, or (in RAM beside a GPU layer) on the CPU,
  // which reads xn from the device and sends the weighted sum back.
  const bool apart = w.expert_backend != nullptr && w.expert_backend != &b;
  Backend& eb = apart ? *w.expert_backend : b;
  if (apart && seg.eb != &eb) fail_kind(ErrorKind::kInternal, "experts' backend has no buffers in this segment");
  float* g = (apart ? seg.e_gate : seg.gate)->as<float>();
  float* u = (apart ? seg.e_up : seg.up)->as<float>();
  float* xs = (apart ? seg.e_xs : seg.xs)->as<float>();
  float* ys = (apart ? seg.e_ys : seg.ys)->as<float>();
  float* out = (apart ? seg.e_o : seg.o)->as<float>();
  if (apart) {
    b.download(seg.e_xn->as<float>(), xn, static_cast<size_t>(n_tok * d) * sizeof(float));
    xn = seg.e_xn->as<float>();
  }
  if (n_rows > 0) eb.gather_rows(xn, tok.data(), n_rows, d, xs);
  // w.exp_*[i] is expert held.begin + i, its rows [count[held.begin + i], count[held.begin + i + 1]); at
  // batch 1 only the k chosen experts have rows, so only their weights are read.
  const int64_t* bounds = count.data() + held.begin;
  const WeightView* gate_up[2] = {w.exp_gate.data(), w.exp_up.data()};
  float* const gu_out[2] = {g, u};
  eb.matmul_experts(gate_up, 2, held.size(), bounds, xs, gu_out);
  if (n_rows > 0) eb.swiglu(g, u, g, n_rows * ff_local_);
  const WeightView* down[1] = {w.exp_down.data()};
  float* const down_out[1] = {ys};
  eb.matmul_experts(down, 1, held.size(), bounds, g, down_out);
  // Under expert parallelism each rank sums its own experts' share; the FFN's all-reduce adds the rest.
  eb.weighted_row_sum(ys, n_rows, slot_row.data(), weight.data(), n_tok, static_cast<int>(k), d, out);
  if (apart) b.upload(seg.o->as<float>(), out, static_cast<size_t>(n_tok * d) * sizeof(float));
}

void LlamaModel::reduce_add_norm(Backend& b, float* o, float* x, const float* w, float* xn, int64_t n_tok) {
  const int64_t d = config_.n_embd;
  if (reduces_on_device(b)) return b.all_reduce_add_rms_norm(*tp_group_, o, x, w, xn, n_tok, d, config_.rms_eps);
  if (mapping_.tp_size() > 1) all_reduce(b, o, static_cast<size_t>(n_tok * d));
  b.add_rms_norm(x, o, w, xn, n_tok, d, config_.rms_eps);
}

void LlamaModel::head(const BatchInfo& batch) {
  Segment& seg = *segments_.back();
  Backend& b = *seg.b;
  const int64_t d = config_.n_embd, rows = static_cast<int64_t>(batch.out_rows.size());
  if (rows == 0) return;
  // Out rows that are consecutive (the last token of a one-sequence step, or all of them) are read in
  // place; others are gathered into o, which the step no longer needs.
  const float* x = seg.x->as<float>();
  const int32_t first = batch.out_rows.front();
  if (batch.out_rows.back() - first + 1 == rows) {
    x += first * d;
  } else {
    b.gather_rows(x, batch.out_rows.data(), rows, d, seg.o->as<float>());
    x = seg.o->as<float>();
  }
  b.rms_norm(x, weights_.output_norm, seg.xn->as<float>(), rows, d, config_.rms_eps);
  b.matmul(weights_.output, seg.xn->as<float>(), logits_for(rows), rows);
}

void LlamaModel::rows(const std::vector<RowRequest>& reqs, std::vector<RowCandidates>* out) {
  if (static_cast<int64_t>(reqs.size()) != n_out_)
    fail_kind(ErrorKind::kInternal, "rows: ", reqs.size(), " requests for ", n_out_, " out rows");
  out->assign(reqs.size(), RowCandidates{});
  if (reqs.empty()) return;
  for (const RowRequest& q : reqs) {
    if (q.k < 0) fail_kind(ErrorKind::kInternal, "rows: k = ", q.k);
    for (int32_t e : q.extra)
      if (e < 0 || e >= config_.n_vocab) fail_kind(ErrorKind::kInternal, "rows: extra id ", e);
  }
  const int64_t nv = config_.n_vocab;
  if (std::any_of(reqs.begin(), reqs.end(), [](const RowRequest& q) { return q.k == 0; })) {
    // Some row needs all its logits: gather every row and rank the others on the host, which gives the
    // candidates the device would (the candidate order is total).
    std::vector<float> all;
    logits(&all);
    for (size_t r = 0; r < reqs.size(); ++r) {
      const float* row = all.data() + r * static_cast<size_t>(nv);
      RowCandidates& c = (*out)[r];
      if (reqs[r].k == 0) {
        c.logits.assign(row, row + nv);
      } else {
        c.top = top_candidates_host(row, nv, reqs[r].k);
      }
      for (int32_t e : reqs[r].extra) c.extra.push_back(row[e]);
      if (reqs[r].lse) {
        double mx = 0, sum = 0;
        Backend::log_sum_exp_parts_host(row, nv, &mx, &sum);
        c.lse = static_cast<float>(mx + std::log(sum));
      }
    }
    return;
  }
  Backend& b = *segments_.back()->b;
  const int64_t n_local = vocab_.size();
  const float* logits = logits_for(n_out_);
  // Every rank sends, per row, k (logit, id) pairs and a value for every extra id (0 where another rank
  // owns it); ids travel as the bits of a float. A rank whose slice is smaller than k pads with NaN at id -1.
  // Words of one row: k (logit, id) pairs, the extra values, then (max, sum) of the slice when lse is asked.
  auto words = [](const RowRequest& q) { return 2 * static_cast<size_t>(q.k) + q.extra.size() + (q.lse ? 2 : 0); };
  size_t per = 0;
  for (const RowRequest& q : reqs) per += words(q);
  std::vector<float> send(per, 0.0f);
  // Every row's candidates from one call (one wait), the extra ids this rank's slice holds as local ids.
  std::vector<CandidateQuery> queries(reqs.size());
  std::vector<std::vector<size_t>> extra_at(reqs.size());  // index into reqs[r].extra of each local extra
  for (size_t r = 0; r < reqs.size(); ++r) {
    queries[r].k = reqs[r].k;
    for (size_t i = 0; i < reqs[r].extra.size(); ++i)
      if (reqs[r].extra[i] >= vocab_.begin && reqs[r].extra[i] < vocab_.end) {
        queries[r].extra.push_back(static_cast<int32_t>(reqs[r].extra[i] - vocab_.begin));
        extra_at[r].push_back(i);
      }
  }
  std::vector<CandidateAnswer> mine;
  b.top_candidates(logits, n_local, queries, mine);
  size_t at = 0;
  for (size_t r = 0; r < reqs.size(); ++r) {
    const RowRequest& q = reqs[r];
    for (int i = 0; i < q.k; ++i) {
      TokenCandidate c = static_cast<size_t>(i) < mine[r].top.size() ? mine[r].top[static_cast<size_t>(i)]
                                                                     : TokenCandidate{__builtin_nanf(""), -1};
      if (c.id >= 0) c.id += static_cast<int32_t>(vocab_.begin);
      send[at + 2 * static_cast<size_t>(i)] = c.logit;
      std::memcpy(&send[at + 2 * static_cast<size_t>(i) + 1], &c.id, sizeof c.id);
    }
    for (size_t i = 0; i < extra_at[r].size(); ++i)
      send[at + 2 * static_cast<size_t>(q.k) + extra_at[r][i]] = mine[r].extra_values[i];
    if (q.lse) {
      // The slice's max and sum of exp(x - max); floats on the wire (the exchange is floats), the sum
      // rescaled to the max so it stays in range.
      double mx = 0, sum = 0;
      b.log_sum_exp_parts(logits + r * static_cast<size_t>(n_local), n_local, &mx, &sum);
      send[at + 2 * static_cast<size_t>(q.k) + q.extra.size()] = static_cast<float>(mx);
      send[at + 2 * static_cast<size_t>(q.k) + q.extra.size() + 1] = static_cast<float>(sum);
    }
    at += words(q);
  }
  const size_t tp = vocab_counts_.size();
  std::vector<float> all(per * tp);
  if (tp > 1)
    tp_group_->all_gather(send.data(), all.data(), std::vector<size_t>(tp, per));
  else
    all = send;
  at = 0;
  for (size_t r = 0; r < reqs.size(); ++r) {
    const RowRequest& q = reqs[r];
    RowCandidates& c = (*out)[r];
    c.extra.assign(q.extra.size(), 0.0f);
    int64_t owner_begin = 0;
    double lse_max = -INFINITY;
    std::vector<std::pair<double, double>> parts;  // (max, sum) of each member's slice
    for (size_t m = 0; m < tp; ++m) {
      const float* p = all.data() + m * per + at;
      if (q.lse) {
        const double mx = p[2 * q.k + q.extra.size()], sum = p[2 * q.k + q.extra.size() + 1];
        parts.emplace_back(mx, sum);
        lse_max = std::max(lse_max, mx);
      }
      for (int i = 0; i < q.k; ++i) {
        TokenCandidate t;
        t.logit = p[2 * i];
        std::memcpy(&t.id, &p[2 * i + 1], sizeof t.id);
        if (t.id >= 0) c.top.push_back(t);
      }
      const int64_t owner_end = owner_begin + static_cast<int64_t>(vocab_counts_[m]);
      for (size_t i = 0; i < q.extra.size(); ++i)
        if (q.extra[i] >= owner_begin && q.extra[i] < owner_end) c.extra[i] = p[2 * q.k + i];
      owner_begin = owner_end;
    }
    const size_t keep = std::min(c.top.size(), static_cast<size_t>(q.k));
    std::partial_sort(c.top.begin(), c.top.begin() + static_cast<std::ptrdiff_t>(keep), c.top.end(), candidate_before);
    c.top.resize(keep);
    if (q.lse) {
      double total = 0;
      for (const auto& [mx, sum] : parts)
        if (std::isfinite(mx)) total += sum * std::exp(mx - lse_max);
      c.lse = static_cast<float>(lse_max + std::log(total));
    }
    at += words(q);
  }
}

float* LlamaModel::logits_for(int64_t rows) {
  if (rows == 1) return logits_row_->as<float>();
  const size_t bytes = static_cast<size_t>(rows * vocab_.size()) * sizeof(float);
  if (!logits_rows_ || logits_rows_->size() < bytes) logits_rows_ = segments_.back()->b->alloc(bytes);
  return logits_rows_->as<float>();
}

void LlamaModel::logits(std::vector<float>* out) {
  Backend& b = *segments_.back()->b;
  const int64_t nv = config_.n_vocab;
  const int64_t rows = n_out_;
  std::vector<float> host(static_cast<size_t>(rows * nv));
  b.synchronize();
  if (mapping_.tp_size() == 1) {
    b.download(host.data(), logits_for(rows), host.size() * sizeof(float));
  } else {
    // Each rank holds (rows, its vocabulary slice); gathered member by member, then interleaved per row.
    const size_t local_n = static_cast<size_t>(rows * vocab_.size());
    std::vector<float> local(local_n), gathered(static_cast<size_t>(rows * nv));
    b.download(local.data(), logits_for(rows), local_n * sizeof(float));
    std::vector<size_t> counts;
    for (size_t c : vocab_counts_) counts.push_back(c * static_cast<size_t>(rows));
    tp_group_->all_gather(local.data(), gathered.data(), counts);
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
  *out = std::move(host);
}

}  // namespace shardlm
