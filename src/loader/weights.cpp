#include "loader/weights.h"

#include <cstring>

#include "core/error.h"
#include "loader/hf_source.h"
#include "quant/quant.h"

namespace shardlm {
namespace {

std::string blk(int l, const char* what) { return cat("blk.", l, ".", what); }

// Expected ggml shape of every tensor, from the config alone; a file that disagrees is refused by name.
std::pair<int64_t, int64_t> expected_shape(const ModelConfig& c, const std::string& name) {
  const auto ends = [&](const char* s) {
    const std::string suf(s);
    return name.size() >= suf.size() && name.compare(name.size() - suf.size(), suf.size(), suf) == 0;
  };
  if (name == "token_embd.weight" || name == "output.weight") return {c.n_embd, c.n_vocab};
  // Experts: 3-D ffn_*_exps {in, out, n_expert} (rows of all experts, checked per dimension by
  // checked_tensor) or one 2-D blk.L.ffn_*.E.weight per expert.
  if (ends("ffn_gate_inp.weight")) return {c.n_embd, c.n_expert};
  if (ends("ffn_gate_exps.weight") || ends("ffn_up_exps.weight")) return {c.n_embd, c.n_ff_exp * c.n_expert};
  if (ends("ffn_down_exps.weight")) return {c.n_ff_exp, c.n_embd * c.n_expert};
  if (expert_index(name) >= 0)  // blk.L.ffn_{gate,up,down}.E.weight
    return name.find(".ffn_down.") != std::string::npos ? std::pair<int64_t, int64_t>{c.n_ff_exp, c.n_embd}
                                                        : std::pair<int64_t, int64_t>{c.n_embd, c.n_ff_exp};
  if (ends("attn_q_norm.weight") || ends("attn_k_norm.weight")) return {c.head_dim, 1};
  if (ends("_norm.weight")) return {c.n_embd, 1};
  if (ends("attn_q.weight")) return {c.n_embd, c.q_dim()};
  if (ends("attn_k.weight") || ends("attn_v.weight")) return {c.n_embd, c.kv_dim()};
  if (ends("attn_q.bias")) return {c.q_dim(), 1};
  if (ends("attn_k.bias") || ends("attn_v.bias")) return {c.kv_dim(), 1};
  if (ends("attn_output.weight")) return {c.q_dim(), c.n_embd};
  if (ends("ffn_gate.weight") || ends("ffn_up.weight")) return {c.n_embd, c.n_ff};
  if (ends("ffn_down.weight")) return {c.n_ff, c.n_embd};
  fail("no expected shape for tensor '", name, "'");
}

const SourceTensor& checked_tensor(const ModelSource& src, const std::string& name) {
  const SourceTensor& t = src.tensor(name);
  const auto [e0, e1] = expected_shape(src.config(), name);
  // Experts first: a wrong expert count shows in the third dimension, which names the field to look at.
  const bool exps = name.size() >= 12 && name.compare(name.size() - 12, 12, "_exps.weight") == 0;
  if (exps && (t.ne[2] != src.config().n_expert || t.ne[3] != 1))
    fail(src.path(), ": tensor '", name, "' has shape [", t.ne[0], ", ", t.ne[1], ", ", t.ne[2], ", ", t.ne[3],
         "]: its third dimension must be expert_count = ", src.config().n_expert);
  const int64_t ne1 = t.ne[1] * t.ne[2] * t.ne[3];
  if (t.ne[0] != e0 || ne1 != e1)
    fail(src.path(), ": tensor '", name, "' has shape [", t.ne[0], ", ", ne1, "], the config implies [", e0, ", ",
         e1, "]");
  return t;
}

// The type of layer l's FFN down projection (its blocks decide how tensor parallelism cuts the FFN):
// ffn_down, or with experts ffn_down_exps or expert 0's ffn_down.0.
GgmlType ffn_down_type(const ModelSource& src, int l) {
  if (!src.config().moe()) return checked_tensor(src, blk(l, "ffn_down.weight")).type;
  if (src.find_tensor(blk(l, "ffn_down_exps.weight"))) return checked_tensor(src, blk(l, "ffn_down_exps.weight")).type;
  return checked_tensor(src, blk(l, "ffn_down.0.weight")).type;
}

class Loader {
 public:
  Loader(const ModelSource& src, const Mapping& m, std::vector<HeldTensor>* held)
      : src_(src), c_(src.config()), m_(m), held_(held) {}
  // Where the following tensors go.
  void use(Backend& b) { b_ = &b; }

  ModelWeights& out() { return w_; }

  // A matrix this rank needs, sliced per the sharding rules of `name`.
  WeightView matrix(const std::string& name, GgmlType down_type) {
    return matrix_from(checked_tensor(src_, name), name, down_type, false);
  }

  // `t`'s bytes sliced by the rule of tensor `name` (tied models slice token_embd as output.weight).
  // `already_mapped`: the bytes are already counted (a tied output on the rank that maps the embedding).
  WeightView matrix_from(const SourceTensor& t, const std::string& name, GgmlType down_type, bool already_mapped) {
    if (!b_->supports(t.type))
      fail(src_.path(), ": tensor '", name, "' has type ", type_name(t.type), ", which the ", b_->name(),
           " backend cannot compute with");
    const int64_t ne1 = t.ne[1] * t.ne[2] * t.ne[3];
    const TensorShard s =
        tensor_shard(name, t.type, t.ne[0], ne1, c_, down_type, m_.tp_size(), m_.tp_rank(), m_.expert_parallel());
    const size_t full_row = static_cast<size_t>(row_bytes(t.type, t.ne[0]));
    WeightView v;
    v.type = t.type;
    v.n_cols = s.ne0;
    v.n_rows = s.ne1;
    v.row_stride = static_cast<size_t>(row_bytes(t.type, s.ne0));
    const bool host = b_->device() == DeviceKind::kCpu;
    // The shard's bytes in host memory: a slice of the mapping, or gathered when columns are cut.
    const uint8_t* bytes = t.data + full_row * static_cast<size_t>(s.kind == ShardKind::kRows ? s.range.begin : 0);
    std::vector<uint8_t> gathered;
    if (s.kind == ShardKind::kCols) {
      const size_t off = static_cast<size_t>(row_bytes(t.type, s.range.begin));
      gathered.resize(s.n_bytes);
      for (int64_t r = 0; r < s.ne1; ++r)
        std::memcpy(gathered.data() + static_cast<size_t>(r) * v.row_stride,
                    t.data + full_row * static_cast<size_t>(r) + off, v.row_stride);
      bytes = gathered.data();
    }
    const bool neox = c_.rope_neox() && (name.find("attn_q.weight") != std::string::npos ||
                                         name.find("attn_k.weight") != std::string::npos);
    if (neox) {
      // Halves layout to adjacent pairs, head by head (a shard always holds whole heads).
      std::vector<uint8_t> permuted(s.n_bytes);
      permute_rotary_rows(bytes, permuted.data(), s.ne1 / c_.head_dim, c_.head_dim, v.row_stride);
      gathered = std::move(permuted);
      bytes = gathered.data();
    }
    // Read in place from the mapping unless the backend packs it (get_rows' table never is).
    const bool mapped = host && gathered.empty() && (name == "token_embd.weight" || !b_->packs_matmul_weight(v));
    if (mapped) {
      v.data = bytes;
    } else if (name == "token_embd.weight") {
      v.data = place(bytes, s.n_bytes);  // read by get_rows: stays in ggml's layout
    } else {
      v.data = bytes;
      v = b_->place_matmul_weight(v, w_.storage);
    }
    count(name, t.type, s, (already_mapped && mapped) ? 0 : s.n_bytes);
    if (mapped && !already_mapped) w_.mapped_bytes += s.n_bytes;
    if (name != "token_embd.weight") w_.step_bytes += s.n_bytes;  // a tied output's too, aliased or packed
    return v;
  }

  // Layer l's matrices of one kind ("ffn_gate", "ffn_up" or "ffn_down") of the experts this rank holds
  // (Mapping::experts(): all of them, each sliced like a dense FFN of width n_ff_exp, or under expert
  // parallelism its share, whole): from the 3-D blk.l.<kind>_exps.weight (views into it, no copy where
  // mapped) or from one 2-D blk.l.<kind>.E.weight per expert.
  std::vector<WeightView> experts(int l, const std::string& kind, GgmlType down_type) {
    std::vector<WeightView> v;
    const ExpertRange range = m_.experts();
    const std::string exps = blk(l, (kind + "_exps.weight").c_str());
    if (src_.find_tensor(exps)) {
      const SourceTensor& t = checked_tensor(src_, exps);
      const uint64_t per = t.n_bytes / static_cast<uint64_t>(c_.n_expert);
      for (int x = range.begin; x < range.end; ++x) {
        SourceTensor s = t;
        s.n_dims = 2;
        s.ne = {t.ne[0], t.ne[1], 1, 1};
        s.data = t.data + per * static_cast<uint64_t>(x);
        s.n_bytes = per;
        v.push_back(matrix_from(s, exps, down_type, false));
      }
      return v;
    }
    for (int x = range.begin; x < range.end; ++x) {
      const std::string name = blk(l, cat(kind, ".", x, ".weight").c_str());
      if (!src_.find_tensor(name))
        fail(src_.path(), ": expert ", x, " of layer ", l, " is missing: neither ", exps, " nor ", name);
      v.push_back(matrix(name, down_type));
    }
    return v;
  }

  // A vector (norm weight or bias), converted to f32; biases are sliced like their matrix's rows.
  const float* vec(const std::string& name) {
    const SourceTensor& t = checked_tensor(src_, name);
    const int64_t n = t.ne[0];
    Range r{0, n};
    if (name.find(".bias") != std::string::npos && m_.tp_size() > 1) {
      const TensorShard s = tensor_shard(name, GgmlType::F32, 1, n, c_, GgmlType::F32, m_.tp_size(), m_.tp_rank());
      r = s.range;
    }
    std::vector<float> f(static_cast<size_t>(n));
    if (t.type != GgmlType::F32 && t.type != GgmlType::F16 && t.type != GgmlType::BF16)
      fail(src_.path(), ": tensor '", name, "' has type ", type_name(t.type), "; norms and biases must be f32/f16/bf16");
    dequantize_row(t.type, t.data, f.data(), n);
    // q/k biases and Qwen3's per-head q/k norm weights (one head of head_dim) follow their rows' permutation.
    if (c_.rope_neox() && (name.find("attn_q.bias") != std::string::npos ||
                           name.find("attn_k.bias") != std::string::npos ||
                           name.find("attn_q_norm.weight") != std::string::npos ||
                           name.find("attn_k_norm.weight") != std::string::npos)) {
      std::vector<float> p(f.size());
      permute_rotary_rows(reinterpret_cast<const uint8_t*>(f.data()), reinterpret_cast<uint8_t*>(p.data()),
                          n / c_.head_dim, c_.head_dim, sizeof(float));
      f = std::move(p);
    }
    const size_t bytes = static_cast<size_t>(r.size()) * sizeof(float);
    TensorShard s;
    s.kind = r.size() == n ? ShardKind::kReplicated : ShardKind::kRows;
    s.range = r;
    s.ne0 = r.size();
    s.ne1 = 1;
    s.n_bytes = bytes;
    count(name, GgmlType::F32, s, bytes);
    w_.step_bytes += bytes;
    return static_cast<const float*>(place(f.data() + r.begin, bytes));
  }

 private:
  const void* place(const void* host, size_t bytes) {
    auto buf = b_->alloc(bytes);
    b_->upload(buf->data(), host, bytes);
    const void* p = buf->data();
    w_.storage.push_back(std::move(buf));
    return p;
  }
  void count(const std::string& name, GgmlType type, const TensorShard& s, uint64_t bytes) {
    w_.weight_bytes += bytes;
    if (held_) held_->push_back({name, type, s.ne0, s.ne1, s.range, s.kind, bytes});
  }

  const ModelSource& src_;
  const ModelConfig& c_;
  const Mapping& m_;
  Backend* b_ = nullptr;
  std::vector<HeldTensor>* held_;
  ModelWeights w_;
};

}  // namespace

void check_layout(const ModelSource& src, int tp_size, bool expert_parallel) {
  const ModelConfig& c = src.config();
  for (int l = 0; l < c.n_layer; ++l) {
    const GgmlType down = ffn_down_type(src, l);
    const GgmlType out = checked_tensor(src, blk(l, "attn_output.weight")).type;
    check_shardable(c, out, down, tp_size, expert_parallel);
  }
  head_shard(c, tp_size, 0);
}

ModelWeights load_weights(const ModelSource& src, const Mapping& mapping, Backend& backend,
                          std::vector<HeldTensor>* held, const std::function<void(uint64_t, uint64_t)>& progress) {
  return load_weights(src, mapping, Placement::all_on(backend, mapping.layers().size()), held, progress);
}

ModelWeights load_weights(const ModelSource& src, const Mapping& mapping, const Placement& placement,
                          std::vector<HeldTensor>* held, const std::function<void(uint64_t, uint64_t)>& progress) {
  const ModelConfig& c = src.config();
  check_layout(src, mapping.tp_size(), mapping.expert_parallel());
  if (static_cast<int>(placement.layers.size()) != mapping.layers().size() || !placement.embd || !placement.out ||
      (!placement.experts.empty() && placement.experts.size() != placement.layers.size()))
    fail_kind(ErrorKind::kInternal, "placement names ", placement.layers.size(), " layers, the stage has ",
              mapping.layers().size());
  Loader ld(src, mapping, held);
  ModelWeights& w = ld.out();
  const LayerRange layers = mapping.layers();
  uint64_t total = 0, done = 0;
  for (const SourceTensor& t : src.tensors()) total += t.n_bytes;
  if (mapping.is_first_stage()) {
    ld.use(*placement.embd);
    w.token_embd = ld.matrix("token_embd.weight", GgmlType::F32);
  }
  for (int l = layers.begin; l < layers.end; ++l) {
    Backend* lb = placement.layers[static_cast<size_t>(l - layers.begin)];
    ld.use(*lb);
    w.layer_backend.push_back(lb);
    const GgmlType down = ffn_down_type(src, l);
    LayerWeights lw;
    lw.attn_norm = ld.vec(blk(l, "attn_norm.weight"));
    lw.wq = ld.matrix(blk(l, "attn_q.weight"), down);
    lw.wk = ld.matrix(blk(l, "attn_k.weight"), down);
    lw.wv = ld.matrix(blk(l, "attn_v.weight"), down);
    if (c.qkv_bias) {
      lw.bq = ld.vec(blk(l, "attn_q.bias"));
      lw.bk = ld.vec(blk(l, "attn_k.bias"));
      lw.bv = ld.vec(blk(l, "attn_v.bias"));
    }
    if (c.qk_norm) {
      lw.q_norm = ld.vec(blk(l, "attn_q_norm.weight"));
      lw.k_norm = ld.vec(blk(l, "attn_k_norm.weight"));
    }
    lw.wo = ld.matrix(blk(l, "attn_output.weight"), down);
    lw.ffn_norm = ld.vec(blk(l, "ffn_norm.weight"));
    if (c.moe()) {
      lw.router = ld.matrix(blk(l, "ffn_gate_inp.weight"), down);
      Backend* eb = placement.experts.empty() ? lb : placement.experts[static_cast<size_t>(l - layers.begin)];
      const uint64_t before = w.weight_bytes;
      ld.use(*eb);
      lw.exp_gate = ld.experts(l, "ffn_gate", down);
      lw.exp_up = ld.experts(l, "ffn_up", down);
      lw.exp_down = ld.experts(l, "ffn_down", down);
      ld.use(*lb);
      if (eb != lb) {
        lw.expert_backend = eb;
        w.expert_host_bytes += w.weight_bytes - before;
      }
    } else {
      lw.w_gate = ld.matrix(blk(l, "ffn_gate.weight"), down);
      lw.w_up = ld.matrix(blk(l, "ffn_up.weight"), down);
      lw.w_down = ld.matrix(blk(l, "ffn_down.weight"), down);
    }
    w.layers.push_back(lw);
    done += total / static_cast<uint64_t>(c.n_layer + 1);
    if (progress) progress(done, total);
  }
  if (mapping.is_last_stage()) {
    ld.use(*placement.out);
    w.output_norm = ld.vec("output_norm.weight");
    // Tied models reuse the embedding table as the output matrix (sliced by vocabulary like output).
    if (c.tied_output) {
      // On the CPU a rank that maps the whole embedding holds the output slice already.
      w.output = ld.matrix_from(checked_tensor(src, "token_embd.weight"), "output.weight", GgmlType::F32,
                                mapping.is_first_stage() && placement.out == placement.embd);
    } else {
      w.output = ld.matrix("output.weight", GgmlType::F32);
    }
  }
  if (progress) progress(total, total);
  w.rope_freq_factors = c.rope_freq_factors;
  return std::move(w);
}

}  // namespace shardlm
