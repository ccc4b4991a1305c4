#include "plan/cost_model.h"

#include <algorithm>

#include "config/presets.h"
#include "core/error.h"
#include "plan/mapping.h"
#include "plan/shard.h"

namespace shardlm {
namespace {

bool ends_with(const std::string& s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

uint64_t tensor_bytes(GgmlType type, const std::vector<int64_t>& ne, const std::string& name) {
  if (ne.empty()) fail("tensor '", name, "' has no dimensions");
  int64_t rows = 1;
  for (size_t i = 1; i < ne.size(); ++i) rows = checked_mul<int64_t>(rows, ne[i], "tensor rows");
  return static_cast<uint64_t>(checked_mul<int64_t>(row_bytes(type, ne[0]), rows, "tensor bytes"));
}

}  // namespace

int64_t TensorDesc::n_elements() const {
  int64_t n = 1;
  for (int64_t d : ne) n = checked_mul<int64_t>(n, d, "tensor elements");
  return n;
}

uint64_t gpu_alloc_bytes(uint64_t n) {
  constexpr uint64_t kPage = uint64_t{2} << 20, kRoundFrom = uint64_t{1} << 20;
  if (n < kRoundFrom) return n;
  return checked_mul<uint64_t>((n + kPage - 1) / kPage, kPage, "GPU allocation bytes");
}

uint64_t gpu_alloc_pad(uint64_t n) { return gpu_alloc_bytes(n) - n; }

uint64_t ModelDesc::weight_bytes() const {
  uint64_t s = 0;
  for (const TensorDesc& t : tensors) s = checked_add<uint64_t>(s, t.n_bytes, "model bytes");
  return s;
}

int64_t ModelDesc::n_params() const {
  int64_t s = 0;
  for (const TensorDesc& t : tensors) s += t.n_elements();
  return s;
}

const TensorDesc* ModelDesc::find(std::string_view name) const {
  for (const TensorDesc& t : tensors)
    if (t.name == name) return &t;
  return nullptr;
}

std::vector<ModelDesc::TypeShare> ModelDesc::matmul_types() const {
  std::vector<TypeShare> out;
  for (const TensorDesc& t : tensors) {
    if (t.ne.size() < 2 || (t.name == "token_embd.weight" && !config.tied_output)) continue;
    auto it = std::find_if(out.begin(), out.end(), [&](const TypeShare& s) { return s.type == t.type; });
    if (it == out.end()) it = out.insert(out.end(), TypeShare{t.type});
    it->bytes += static_cast<double>(t.n_bytes);
    it->params += static_cast<double>(t.n_elements());
  }
  return out;
}

ModelDesc model_desc_from_config(const ModelConfig& c, std::string_view scheme) {
  if (!is_known_scheme(scheme))
    fail("quantization (--quant): '", scheme, "' is unknown; known: ", scheme_names());
  ModelDesc m;
  m.config = c;
  m.scheme = std::string(scheme);
  m.source = cat(c.name.empty() ? "model" : c.name, ", ", scheme);
  for (const TensorSpec& s : model_tensors(c)) {
    TensorDesc t;
    t.name = s.name;
    t.ne = s.ne;
    t.layer = s.layer;
    t.type = tensor_type_for_scheme(scheme, s, c, scheme_needs_imatrix(scheme));  // such files are made with one
    t.n_bytes = tensor_bytes(t.type, t.ne, t.name);
    m.tensors.push_back(std::move(t));
  }
  return m;
}

ModelDesc model_desc_from_preset(std::string_view preset, std::string_view scheme) {
  const Preset* p = find_preset(preset);
  if (p == nullptr) fail("model preset '", preset, "' is unknown; known presets: ", preset_names());
  ModelDesc m = model_desc_from_config(p->config, scheme);
  m.source = cat("preset ", p->name, ", ", scheme);
  return m;
}

std::vector<RankWeights> rank_weights(const ModelDesc& m, int tp, bool expert_parallel) {
  const ModelConfig& c = m.config;
  if (tp < 1) fail("tensor parallel size: ", tp, " must be >= 1");
  if (c.n_layer < 1) fail("model: n_layer ", c.n_layer, " must be >= 1");
  // ffn_down's type decides the FFN split unit of every FFN tensor of its layer.
  std::vector<GgmlType> down(static_cast<size_t>(c.n_layer), GgmlType::F32);
  std::vector<bool> have_down(static_cast<size_t>(c.n_layer), false);
  for (const TensorDesc& t : m.tensors)
    if (t.layer >= 0 && (ends_with(t.name, "ffn_down.weight") || ends_with(t.name, "ffn_down_exps.weight") ||
                         ends_with(t.name, "ffn_down.0.weight"))) {
      if (t.layer >= c.n_layer) fail("tensor '", t.name, "' is outside the model's ", c.n_layer, " layers");
      down[static_cast<size_t>(t.layer)] = t.type;
      have_down[static_cast<size_t>(t.layer)] = true;
    }
  for (int64_t l = 0; l < c.n_layer; ++l)
    if (!have_down[static_cast<size_t>(l)]) fail("model: tensor 'blk.", l, ".ffn_down.weight' is missing");

  std::vector<RankWeights> ranks(static_cast<size_t>(tp));
  for (int r = 0; r < tp; ++r) {
    RankWeights& w = ranks[static_cast<size_t>(r)];
    w.layer_bytes.assign(static_cast<size_t>(c.n_layer), 0);
    w.layer_gpu_pad.assign(static_cast<size_t>(c.n_layer), 0);
    const HeadShard h = head_shard(c, tp, r);
    w.kv_heads = h.kv_heads.size();
    w.q_heads = h.q_heads.size();
    // The experts this rank holds, as Mapping::experts() gives them to the loader.
    const Mapping map(tp, r, tp, 1, static_cast<int>(c.n_layer), {}, static_cast<int>(c.n_expert), expert_parallel);
    const ExpertRange held = map.experts();
    w.layer_expert_bytes.assign(static_cast<size_t>(c.n_layer), 0);
    w.layer_expert_gpu_pad.assign(static_cast<size_t>(c.n_layer), 0);
    w.ff_units = expert_parallel ? c.ffn_width() : ffn_shard(c, block_size(down[0]), tp, r).size();
    for (const TensorDesc& t : m.tensors) {
      // 3-D: experts {in, out, n_expert}, each cut like a dense matrix.
      if (t.ne.size() > 3 || (t.ne.size() == 3 && !ends_with(t.name, "_exps.weight")))
        fail("tensor '", t.name, "' has ", t.ne.size(), " dimensions; only expert tensors (*_exps) have 3");
      if (t.ne.size() == 3 && t.ne[2] != c.n_expert)
        fail("tensor '", t.name, "' holds ", t.ne[2], " experts, the model has expert_count ", c.n_expert);
      const int64_t ne1 = t.ne.size() > 1 ? t.ne[1] : 1;
      // Matrices of this tensor the rank holds: its experts of a 3-D tensor (each allocated apart), none or
      // one of a per-expert tensor, one otherwise.
      const int exp_index = expert_index(t.name);
      const bool exp = t.ne.size() == 3 || exp_index >= 0;
      const uint64_t n_mat = t.ne.size() == 3 ? static_cast<uint64_t>(held.size())
                                              : (exp_index < 0 || held.contains(exp_index) ? 1 : 0);
      const bool known = t.layer >= 0 || t.name == "token_embd.weight" || t.name == "output.weight" ||
                         t.name == "output_norm.weight";
      if (!known) {  // e.g. rope_freqs.weight: small, needed wherever layers run
        w.other_bytes += t.n_bytes;
        continue;
      }
      const GgmlType dt = t.layer >= 0 ? down[static_cast<size_t>(t.layer)] : down[0];
      // The loader converts norms and biases to f32 (biases sliced like their matrix's rows).
      const bool to_f32 = ends_with(t.name, "_norm.weight") || ends_with(t.name, ".bias");
      // One matrix (of a 3-D tensor: one expert's ne1 rows).
      TensorShard s =
          tensor_shard(t.name, to_f32 ? GgmlType::F32 : t.type, t.ne[0], ne1, c, dt, tp, r, expert_parallel);
      const uint64_t pad = gpu_alloc_pad(s.n_bytes) * n_mat;
      s.n_bytes *= n_mat;
      if (exp && t.layer >= 0) {
        w.layer_expert_bytes[static_cast<size_t>(t.layer)] += s.n_bytes;
        w.layer_expert_gpu_pad[static_cast<size_t>(t.layer)] += pad;
      }
      if (t.layer >= 0) {
        w.layer_bytes[static_cast<size_t>(t.layer)] += s.n_bytes;
        w.layer_gpu_pad[static_cast<size_t>(t.layer)] += pad;
      } else if (t.name == "token_embd.weight") {
        w.token_embd_bytes = s.n_bytes;
        w.token_embd_gpu_pad = pad;
        w.token_embd_row_bytes = static_cast<uint64_t>(row_bytes(t.type, t.ne[0]));
        // Tied: the output is token_embd sliced by vocabulary rows like output.weight.
        if (c.tied_output) {
          w.output_type = t.type;
          w.output_bytes = tensor_shard("output.weight", t.type, t.ne[0], ne1, c, dt, tp, r).n_bytes;
          w.output_gpu_pad = gpu_alloc_pad(w.output_bytes);
        }
      } else if (t.name == "output.weight") {
        if (!c.tied_output) {  // a tied model's loader never reads it
          w.output_type = t.type;
          w.output_bytes = s.n_bytes;
          w.output_gpu_pad = pad;
        }
      } else {
        w.output_norm_bytes = s.n_bytes;
        w.output_norm_gpu_pad = pad;
      }
    }
    w.vocab_rows = vocab_shard(c, tp, r).size();
  }
  return ranks;
}

void check_kv_type(GgmlType t) {
  if (t != GgmlType::F16 && t != GgmlType::F32 && t != GgmlType::BF16 && t != GgmlType::Q8_0 && t != GgmlType::Q4_0)
    fail("KV cache type (--kv-type): '", type_name(t), "' is not supported; use f16, f32, bf16, q8_0 or q4_0");
}

uint64_t kv_bytes_per_token_layer(const ModelConfig& c, int64_t kv_heads, GgmlType kv_type) {
  check_kv_type(kv_type);
  // K and V, each kv_heads x head_dim elements; quantized types in blocks (q8_0: 34 bytes per 32 values).
  return static_cast<uint64_t>(2 * kv_heads * c.head_dim * type_size(kv_type) / block_size(kv_type));
}

uint64_t workspace_bytes(const ModelConfig& c, const RankWeights& r, int64_t batch, int64_t ctx,
                         bool last_stage, bool attention_scores) {
  const int64_t f = 4;  // fp32 activations
  int64_t e = 0;
  e += 3 * batch * c.n_embd;                                        // hidden, its norm, attention out
  e += 2 * batch * (r.q_heads + r.kv_heads) * c.head_dim;           // q, attention result, k, v
  // gate, up (down writes the hidden); a mixture of experts holds them for every chosen (token, expert)
  // pair, the router's logits and those pairs' inputs and outputs
  const int64_t pairs = c.moe() ? batch * c.n_expert_used : batch;
  e += 2 * pairs * std::max<int64_t>(r.ff_units, 1);
  if (c.moe()) e += batch * c.n_expert + 2 * pairs * c.n_embd;
  if (c.qk_norm) e += batch * r.kv_heads * c.head_dim;              // normed k heads
  if (attention_scores) e += batch * r.q_heads * ctx;               // scores, no flash attention
  if (last_stage) e += r.vocab_rows + c.n_vocab;                    // one row: local and gathered logits
  return static_cast<uint64_t>(checked_mul<int64_t>(e, f, "workspace bytes"));
}

double layer_flops_per_token(const ModelConfig& c, int64_t ctx) {
  const double d = static_cast<double>(c.n_embd);
  // A mixture of experts runs its router and n_expert_used experts per token.
  const double ffn = c.moe() ? d * static_cast<double>(c.n_expert) : 3.0 * d * static_cast<double>(c.n_ff);
  const double matmul = 2.0 * (d * static_cast<double>(c.q_dim()) * 2 + d * static_cast<double>(c.kv_dim()) * 2 + ffn) +
                        expert_flops_per_token(c);
  const double attention = 4.0 * static_cast<double>(c.q_dim()) * static_cast<double>(ctx);
  return matmul + attention;
}

double expert_flops_per_token(const ModelConfig& c) {
  if (!c.moe()) return 0.0;
  return 2.0 * 3.0 * static_cast<double>(c.n_embd) * static_cast<double>(c.n_ff_exp) *
         static_cast<double>(c.n_expert_used);
}

}  // namespace shardlm
