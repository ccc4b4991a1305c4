#include "config/presets.h"

#include <algorithm>
#include <cctype>

#include "core/error.h"

namespace shardlm {
namespace {

// Builds a config from the published hyper-parameters (the models' config.json); head_dim is
// n_embd / n_head for every model listed here.
ModelConfig make(const char* arch, const char* name, int64_t n_vocab, int64_t n_embd, int64_t n_layer,
                 int64_t n_head, int64_t n_head_kv, int64_t n_ff, int64_t n_ctx_train, float rms_eps,
                 float rope_base) {
  ModelConfig c;
  c.arch = arch;
  c.name = name;
  c.n_vocab = n_vocab;
  c.n_embd = n_embd;
  c.n_layer = n_layer;
  c.n_head = n_head;
  c.n_head_kv = n_head_kv;
  c.head_dim = n_embd / n_head;
  c.n_ff = n_ff;
  c.n_ctx_train = n_ctx_train;
  c.rms_eps = rms_eps;
  c.rope_freq_base = rope_base;
  return c;
}

ModelConfig llama3(const char* name, int64_t n_embd, int64_t n_layer, int64_t n_head, int64_t n_ff,
                   float rope_factor) {
  ModelConfig c = make("llama", name, 128256, n_embd, n_layer, n_head, 8, n_ff, 131072, 1e-5f, 500000.0f);
  c.rope_scaling.type = "llama3";
  c.rope_scaling.factor = rope_factor;
  c.rope_scaling.low_freq_factor = 1.0f;
  c.rope_scaling.high_freq_factor = 4.0f;
  c.rope_scaling.original_context = 8192;
  return c;
}

std::vector<Preset> build_presets() {
  std::vector<Preset> p;
  {
    ModelConfig c = llama3("Llama 3.2 1B", 2048, 16, 32, 8192, 32.0f);
    c.tied_output = true;  // Llama 3.2 1B/3B reuse token_embd as the output matrix
    p.push_back({"llama-3.2-1b", "Llama 3.2 1B (16 layers, GQA 32/8, tied output)", c});
  }
  p.push_back({"llama-3.1-8b", "Llama 3.1 8B (32 layers, GQA 32/8)",
               llama3("Llama 3.1 8B", 4096, 32, 32, 14336, 8.0f)});
  p.push_back({"llama-3.1-70b", "Llama 3.1 70B (80 layers, GQA 64/8)",
               llama3("Llama 3.1 70B", 8192, 80, 64, 28672, 8.0f)});
  p.push_back({"llama-3.1-405b", "Llama 3.1 405B (126 layers, GQA 128/8)",
               llama3("Llama 3.1 405B", 16384, 126, 128, 53248, 8.0f)});
  p.push_back({"llama-2-7b", "Llama 2 7B (32 layers, MHA 32 heads)",
               make("llama", "Llama 2 7B", 32000, 4096, 32, 32, 32, 11008, 4096, 1e-5f, 10000.0f)});
  p.push_back({"llama-2-13b", "Llama 2 13B (40 layers, MHA 40 heads)",
               make("llama", "Llama 2 13B", 32000, 5120, 40, 40, 40, 13824, 4096, 1e-5f, 10000.0f)});
  p.push_back({"llama-2-70b", "Llama 2 70B (80 layers, GQA 64/8)",
               make("llama", "Llama 2 70B", 32000, 8192, 80, 64, 8, 28672, 4096, 1e-5f, 10000.0f)});
  p.push_back({"mistral-7b", "Mistral 7B v0.3 (32 layers, GQA 32/8, vocab 32768)",
               make("llama", "Mistral 7B v0.3", 32768, 4096, 32, 32, 8, 14336, 32768, 1e-5f, 1000000.0f)});
  {
    ModelConfig c = make("qwen2", "Qwen2.5 7B", 152064, 3584, 28, 28, 4, 18944, 32768, 1e-6f, 1000000.0f);
    c.qkv_bias = true;
    p.push_back({"qwen2.5-7b", "Qwen2.5 7B (28 layers, GQA 28/4, q/k/v biases)", c});
  }
  {
    ModelConfig c = make("qwen2", "Qwen2.5 72B", 152064, 8192, 80, 64, 8, 29568, 32768, 1e-6f, 1000000.0f);
    c.qkv_bias = true;
    p.push_back({"qwen2.5-72b", "Qwen2.5 72B (80 layers, GQA 64/8, q/k/v biases)", c});
  }
  // Qwen3 (dense and MoE): q/k RMS norms per head, head_dim given apart from n_embd / n_head.
  const auto qwen3 = [](ModelConfig c, int64_t head_dim) {
    c.head_dim = head_dim;
    c.qk_norm = true;
    return c;
  };
  const auto moe = [](ModelConfig c, int64_t n_expert, int64_t used, int64_t n_ff_exp) {
    c.n_expert = n_expert;
    c.n_expert_used = used;
    c.n_ff_exp = n_ff_exp;
    return c;
  };
  // Qwen3 8B's config.json: head_dim 128 given, q/k norms, no biases, untied output.
  p.push_back({"qwen3-8b", "Qwen3 8B (36 layers, GQA 32/8, q/k norms)",
               qwen3(make("qwen3", "Qwen3 8B", 151936, 4096, 36, 32, 8, 12288, 40960, 1e-6f, 1000000.0f), 128)});
  // Qwen3-30B-A3B's config.json: 32 heads of 128 on a 2048-wide model, 128 experts of 768, 8 per token.
  p.push_back({"qwen3-30b-a3b", "Qwen3 30B-A3B (48 layers, 128 experts of 768, 8 per token)",
               moe(qwen3(make("qwen3moe", "Qwen3 30B A3B", 151936, 2048, 48, 32, 4, 6144, 40960, 1e-6f, 1000000.0f), 128),
                   128, 8, 768)});
  p.push_back({"qwen3-235b-a22b", "Qwen3 235B-A22B (94 layers, 128 experts of 1536, 8 per token)",
               moe(qwen3(make("qwen3moe", "Qwen3 235B A22B", 151936, 4096, 94, 64, 4, 12288, 40960, 1e-6f, 1000000.0f),
                         128),
                   128, 8, 1536)});
  p.push_back({"mixtral-8x7b", "Mixtral 8x7B (32 layers, 8 experts of 14336, 2 per token)",
               moe(make("llama", "Mixtral 8x7B", 32000, 4096, 32, 32, 8, 14336, 32768, 1e-5f, 1000000.0f), 8, 2,
                   14336)});
  // Test shapes. "tiny" is the smallest useful Llama (head_dim 16, GQA 2): fine for f32/f16/q8_0/q4_0,
  // while K-quant schemes fall back to 32-blocks on its 64-wide rows exactly as llama.cpp would.
  // "tiny-k" and "tiny-qwen2" keep every row length a multiple of 256 so K-quants apply unchanged.
  p.push_back({"tiny", "test model: dim 64, 4 layers, 4 heads / 2 KV heads, n_ff 192, vocab 512",
               make("llama", "tiny", 512, 64, 4, 4, 2, 192, 512, 1e-5f, 10000.0f)});
  p.push_back({"tiny-k", "test model for K-quants: dim 256, 4 layers, 4 heads / 2 KV heads, n_ff 512",
               make("llama", "tiny-k", 512, 256, 4, 4, 2, 512, 512, 1e-5f, 10000.0f)});
  // 16 layers and GQA 4 reach every layer rule of llama.cpp's schemes (the first 16th, eighth, use_more_bits)
  // and its grouped-query rules (n_gqa >= 4).
  p.push_back({"tiny-gqa4", "test model for quantization schemes: dim 256, 16 layers, 4 heads / 1 KV head, n_ff 512",
               make("llama", "tiny-gqa4", 512, 256, 16, 4, 1, 512, 512, 1e-5f, 10000.0f)});
  {
    ModelConfig c = make("qwen2", "tiny-qwen2", 1024, 256, 4, 4, 2, 768, 512, 1e-6f, 1000000.0f);
    c.qkv_bias = true;
    p.push_back({"tiny-qwen2", "test model, Qwen2 style: dim 256, 4 layers, q/k/v biases, n_ff 768", c});
  }
  // head_dim 64 with 8 heads of a 256-wide model: q is 512 wide, wider than the hidden state, as in
  // Qwen3-30B-A3B (head_dim 128, 32 heads, dim 2048).
  p.push_back({"tiny-qwen3", "test model, Qwen3 style: dim 256, 4 layers, 8 heads of 64 / 2 KV heads, q/k norms",
               qwen3(make("qwen3", "tiny-qwen3", 1024, 256, 4, 8, 2, 768, 512, 1e-6f, 1000000.0f), 64)});
  p.push_back({"tiny-qwen3moe", "test model, Qwen3-MoE style: dim 256, 4 layers, 8 experts of 256, 2 per token",
               moe(qwen3(make("qwen3moe", "tiny-qwen3moe", 1024, 256, 4, 4, 2, 768, 512, 1e-6f, 1000000.0f), 64), 8, 2,
                   256)});
  p.push_back({"tiny-mixtral", "test model, Mixtral style: dim 256, 4 layers, 8 experts of 512, 2 per token",
               moe(make("llama", "tiny-mixtral", 512, 256, 4, 4, 2, 512, 512, 1e-5f, 1000000.0f), 8, 2, 512)});
  return p;
}

std::string lower(std::string_view s) {
  std::string r(s);
  std::transform(r.begin(), r.end(), r.begin(), [](unsigned char ch) { return std::tolower(ch); });
  return r;
}

bool ends_with(const std::string& s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// llama.cpp's file types (llama_ftype) by llama-quantize's names. The last nine need an importance matrix
// (llama-quantize refuses them without one: tensor_requires_imatrix), and so do we.
struct Scheme {
  const char* name;
  int ftype;            // llama_ftype, written as general.file_type
  GgmlType base;        // llama_ftype_get_default_type
  bool needs_imatrix;
};
constexpr std::array<Scheme, 30> kSchemes = {{
    {"f32", 0, GgmlType::F32, false},         {"f16", 1, GgmlType::F16, false},
    {"bf16", 32, GgmlType::BF16, false},      {"q8_0", 7, GgmlType::Q8_0, false},
    {"q6_k", 18, GgmlType::Q6_K, false},      {"q5_k_m", 17, GgmlType::Q5_K, false},
    {"q5_k_s", 16, GgmlType::Q5_K, false},    {"q5_1", 9, GgmlType::Q5_1, false},
    {"q5_0", 8, GgmlType::Q5_0, false},       {"q4_k_m", 15, GgmlType::Q4_K, false},
    {"q4_k_s", 14, GgmlType::Q4_K, false},    {"q4_1", 3, GgmlType::Q4_1, false},
    {"q4_0", 2, GgmlType::Q4_0, false},       {"iq4_nl", 25, GgmlType::IQ4_NL, false},
    {"iq4_xs", 30, GgmlType::IQ4_XS, false},  {"q3_k_l", 13, GgmlType::Q3_K, false},
    {"q3_k_m", 12, GgmlType::Q3_K, false},    {"q3_k_s", 11, GgmlType::Q3_K, false},
    {"iq3_m", 27, GgmlType::IQ3_S, false},    {"iq3_s", 26, GgmlType::IQ3_S, false},
    {"q2_k", 10, GgmlType::Q2_K, false},
    {"iq3_xs", 22, GgmlType::IQ3_S, true},    {"iq3_xxs", 23, GgmlType::IQ3_XXS, true},
    {"q2_k_s", 21, GgmlType::Q2_K, true},     {"iq2_m", 29, GgmlType::IQ2_S, true},
    {"iq2_s", 28, GgmlType::IQ2_XS, true},    {"iq2_xs", 20, GgmlType::IQ2_XS, true},
    {"iq2_xxs", 19, GgmlType::IQ2_XXS, true}, {"iq1_m", 31, GgmlType::IQ1_M, true},
    {"iq1_s", 24, GgmlType::IQ1_S, true},
}};

const Scheme* find_scheme(std::string_view name) {
  const std::string l = lower(name);
  for (const Scheme& k : kSchemes)
    if (l == k.name) return &k;
  return nullptr;
}

// llama.cpp's use_more_bits(): the first and last eighth of the layers plus every third layer between.
bool use_more_bits(int64_t i_layer, int64_t n_layer) {
  return i_layer < n_layer / 8 || i_layer >= 7 * n_layer / 8 || (i_layer - n_layer / 8) % 3 == 2;
}

// llama.cpp's fallback when a row does not hold whole blocks of the chosen type (llama-quant.cpp,
// "convert_incompatible_tensor"): K-types drop to a 32-block type, and to F16 if even that does not fit.
GgmlType fallback(GgmlType t, const TensorSpec& spec) {
  const int64_t nx = spec.ne.at(0);
  if (nx % block_size(t) == 0) return t;
  GgmlType f;
  switch (t) {
    case GgmlType::IQ1_S: case GgmlType::IQ1_M: case GgmlType::IQ2_XXS: case GgmlType::IQ2_XS:
    case GgmlType::IQ2_S: case GgmlType::IQ3_XXS: case GgmlType::IQ3_S: case GgmlType::IQ4_XS:
      f = GgmlType::IQ4_NL;
      break;
    case GgmlType::Q2_K: case GgmlType::Q3_K: f = GgmlType::Q4_0; break;
    case GgmlType::Q4_K: f = GgmlType::Q5_0; break;
    case GgmlType::Q5_K: f = GgmlType::Q5_1; break;
    case GgmlType::Q6_K: f = GgmlType::Q8_0; break;
    default:
      fail("tensor '", spec.name, "': row length ", nx, " is not a multiple of the ", type_name(t),
           " block size ", block_size(t), " and llama.cpp has no fallback for ", type_name(t));
  }
  return nx % block_size(f) == 0 ? f : GgmlType::F16;
}

}  // namespace

const std::vector<Preset>& presets() {
  static const std::vector<Preset> kPresets = build_presets();  // immutable after first use
  return kPresets;
}

const Preset* find_preset(std::string_view name) {
  const std::string l = lower(name);
  for (const Preset& p : presets())
    if (p.name == l) return &p;
  return nullptr;
}

std::string preset_names() {
  std::string s;
  for (const Preset& p : presets()) s += (s.empty() ? "" : ", ") + p.name;
  return s;
}

std::vector<TensorSpec> model_tensors(const ModelConfig& c) {
  std::vector<TensorSpec> t;
  t.push_back({"token_embd.weight", {c.n_embd, c.n_vocab}, -1});
  for (int64_t i = 0; i < c.n_layer; ++i) {
    const int l = static_cast<int>(i);
    const std::string b = cat("blk.", i, ".");
    t.push_back({b + "attn_norm.weight", {c.n_embd}, l});
    t.push_back({b + "attn_q.weight", {c.n_embd, c.q_dim()}, l});
    if (c.qkv_bias) t.push_back({b + "attn_q.bias", {c.q_dim()}, l});
    t.push_back({b + "attn_k.weight", {c.n_embd, c.kv_dim()}, l});
    if (c.qkv_bias) t.push_back({b + "attn_k.bias", {c.kv_dim()}, l});
    t.push_back({b + "attn_v.weight", {c.n_embd, c.kv_dim()}, l});
    if (c.qkv_bias) t.push_back({b + "attn_v.bias", {c.kv_dim()}, l});
    if (c.qk_norm) t.push_back({b + "attn_q_norm.weight", {c.head_dim}, l});
    if (c.qk_norm) t.push_back({b + "attn_k_norm.weight", {c.head_dim}, l});
    t.push_back({b + "attn_output.weight", {c.q_dim(), c.n_embd}, l});
    t.push_back({b + "ffn_norm.weight", {c.n_embd}, l});
    if (c.moe()) {  // llama.cpp's 3-D expert tensors {in, out, n_expert}
      t.push_back({b + "ffn_gate_inp.weight", {c.n_embd, c.n_expert}, l});
      t.push_back({b + "ffn_gate_exps.weight", {c.n_embd, c.n_ff_exp, c.n_expert}, l});
      t.push_back({b + "ffn_up_exps.weight", {c.n_embd, c.n_ff_exp, c.n_expert}, l});
      t.push_back({b + "ffn_down_exps.weight", {c.n_ff_exp, c.n_embd, c.n_expert}, l});
    } else {
      t.push_back({b + "ffn_gate.weight", {c.n_embd, c.n_ff}, l});
      t.push_back({b + "ffn_up.weight", {c.n_embd, c.n_ff}, l});
      t.push_back({b + "ffn_down.weight", {c.n_ff, c.n_embd}, l});
    }
  }
  t.push_back({"output_norm.weight", {c.n_embd}, -1});
  if (!c.tied_output) t.push_back({"output.weight", {c.n_embd, c.n_vocab}, -1});
  return t;
}

bool is_known_scheme(std::string_view scheme) { return find_scheme(scheme) != nullptr; }

std::string scheme_names() {
  std::string s;
  for (const Scheme& k : kSchemes) s += (s.empty() ? "" : ", ") + std::string(k.name);
  return s;
}

int scheme_file_type(std::string_view scheme) {
  const Scheme* k = find_scheme(scheme);
  return k == nullptr ? -1 : k->ftype;
}

bool scheme_needs_imatrix(std::string_view scheme) {
  const Scheme* k = find_scheme(scheme);
  return k != nullptr && k->needs_imatrix;
}

bool tensor_needs_imatrix(std::string_view name, GgmlType type) {
  if (name == "token_embd.weight" || name == "output.weight") return false;  // llama.cpp exempts both
  switch (type) {
    case GgmlType::IQ3_XXS: case GgmlType::IQ2_XXS: case GgmlType::IQ2_XS: case GgmlType::IQ2_S:
    case GgmlType::IQ1_M: case GgmlType::IQ1_S:
      return true;
    default: return false;  // (and Q2_K tensors of a q2_k_s file: see convert)
  }
}

// Mirrors llama.cpp's llama_tensor_get_type (src/llama-quant.cpp) for dense models and mixtures of experts,
// tensor by tensor, in its order of precedence:
// - 1-D tensors (norms, biases) are never quantized and stay F32 (as the converter writes them).
// - Float schemes (f32/f16/bf16) convert every 2-D tensor; llama_tensor_get_type is not consulted.
// - output.weight (or token_embd when the output is tied): Q8_0 when its rows do not hold whole blocks of
//   the scheme's type, Q5_K for the IQ1/IQ2/IQ3_XXS schemes, else Q6_K unless the scheme's type is Q8_0.
// - attn_v (the i-th of n is layer i here: one per layer), ffn_down, attn_output, attn_q/k and ffn_gate/up get
//   other types by the scheme's rules below, including the "70B" bump (80 layers is how llama.cpp's llama/qwen2
//   loaders classify LLM_TYPE_70B), the grouped-query rules (n_gqa = n_head / n_head_kv) and the rules that
//   depend on whether an importance matrix is given (`imatrix`).
// - Every choice then falls back as llama.cpp does when the row length is not a block multiple.
GgmlType tensor_type_for_scheme(std::string_view scheme, const TensorSpec& t, const ModelConfig& c, bool imatrix) {
  const Scheme* k = find_scheme(scheme);
  if (k == nullptr) fail("quantization scheme '", scheme, "' is unknown; known: ", scheme_names());
  if (t.ne.empty()) fail("tensor '", t.name, "' has no dimensions");
  if (t.ne.size() == 1) return GgmlType::F32;
  // The router stays F32, as llama.cpp's converter writes it and llama-quantize leaves it.
  if (ends_with(t.name, "ffn_gate_inp.weight")) return GgmlType::F32;
  if (k->base == GgmlType::F32 || k->base == GgmlType::F16 || k->base == GgmlType::BF16) return k->base;

  using G = GgmlType;
  const std::string s = k->name;
  const int64_t n_gqa = c.n_head_kv > 0 ? c.n_head / c.n_head_kv : 1;
  const int64_t i = t.layer, n = c.n_layer;
  const bool is_output = t.name == "output.weight" || (c.tied_output && t.name == "token_embd.weight");
  const bool iq_low = s == "iq2_xxs" || s == "iq2_xs" || s == "iq1_s" || s == "iq2_s" || s == "iq2_m" || s == "iq1_m";
  const bool iq2_sm = s == "iq2_s" || s == "iq2_m";
  // Mixtures of experts: ffn_*_exps (and one tensor per expert) are FFN tensors of their layer, as
  // llama.cpp's name search puts them; its 8-expert rules (Mixtral-8x7B's) bump attention.
  const auto has = [&](const char* part) { return t.name.find(part) != std::string::npos; };
  const bool experts8 = c.n_expert == 8;
  G type = k->base;
  if (is_output) {
    if (t.ne.at(0) % block_size(k->base) != 0) type = G::Q8_0;
    else if (iq_low || s == "iq3_xxs") type = G::Q5_K;
    else if (k->base != G::Q8_0) type = G::Q6_K;
  } else if (t.name == "token_embd.weight") {
    if (s == "iq2_xxs" || s == "iq2_xs" || s == "iq1_s" || s == "iq1_m") type = G::Q2_K;
    else if (iq2_sm || s == "iq3_xxs") type = G::IQ3_S;
  } else if (iq_low) {
    if (ends_with(t.name, "attn_v.weight")) {
      type = n_gqa >= 4 || c.n_expert >= 4 ? G::Q4_K : iq2_sm ? G::IQ3_S : G::Q2_K;
    } else if (experts8 && ends_with(t.name, "attn_k.weight")) {
      type = G::Q4_K;
    } else if (has("ffn_down")) {
      if (i < n / 8) type = iq2_sm ? G::IQ3_S : G::Q2_K;
    } else if (ends_with(t.name, "attn_output.weight")) {
      if (experts8) type = G::Q5_K;
      else if (s == "iq1_s" || s == "iq1_m") type = G::IQ2_XXS;
      else if (iq2_sm) type = G::IQ3_S;
    }
  } else if (ends_with(t.name, "attn_v.weight")) {
    if (s == "q2_k") type = n_gqa >= 4 ? G::Q4_K : G::Q3_K;
    else if (s == "q2_k_s" && n_gqa >= 4) type = G::Q4_K;
    else if (s == "iq3_xxs") type = n_gqa >= 4 ? G::Q4_K : !imatrix ? G::IQ3_S : G::IQ3_XXS;
    else if ((s == "iq3_xs" || s == "iq3_s") && n_gqa >= 4) type = G::Q4_K;
    else if (s == "iq3_m") type = G::Q4_K;
    else if (s == "q3_k_m") type = i < 2 ? G::Q5_K : G::Q4_K;
    else if (s == "q3_k_l") type = G::Q5_K;
    else if ((s == "iq4_nl" || s == "iq4_xs") && n_gqa >= 4) type = G::Q5_K;
    else if ((s == "q4_k_m" || s == "q5_k_m") && use_more_bits(i, n)) type = G::Q6_K;
    else if (s == "q4_k_s" && i < 4) type = G::Q5_K;
    if (n == 80 && (type == G::Q3_K || type == G::Q4_K)) type = G::Q5_K;
    if (experts8) type = G::Q8_0;  // "bumping this to Q8_0 trades just ~128MB"
  } else if (ends_with(t.name, "attn_k.weight") && experts8) {
    type = G::Q8_0;
  } else if (ends_with(t.name, "attn_k.weight") || ends_with(t.name, "attn_q.weight")) {
    if (s == "iq3_xs") type = G::IQ3_XXS;
    else if (s == "iq3_xxs") type = G::IQ2_S;
  } else if (has("ffn_down")) {
    if (s == "q2_k") type = G::Q3_K;
    else if (s == "q2_k_s") { if (i < n / 8) type = G::Q4_K; }
    else if (s == "iq3_xxs" && !imatrix) type = i < n / 8 ? G::Q4_K : G::Q3_K;
    else if (s == "q3_k_m") type = i < n / 16 ? G::Q5_K : G::Q4_K;  // not Falcon: always Q4_K
    else if (s == "iq3_m" && (i < n / 8 || (experts8 && use_more_bits(i, n)))) type = G::Q4_K;
    else if (s == "q3_k_l") type = G::Q5_K;
    else if (s == "q4_k_m") { if (use_more_bits(i, n)) type = G::Q6_K; }
    else if (i < n / 8 && (s == "iq4_nl" || s == "iq4_xs") && !imatrix) type = G::Q5_K;
    else if (s == "q5_k_m" && use_more_bits(i, n)) type = G::Q6_K;
    else if (s == "q4_k_s" && i < n / 8) type = G::Q5_K;
    else if ((s == "q4_0" || s == "q5_0") && imatrix && i < n / 8) type = s == "q4_0" ? G::Q4_1 : G::Q5_1;
  } else if (ends_with(t.name, "attn_output.weight")) {
    if (experts8) {
      if (s == "q2_k" || s == "iq3_xs" || s == "iq3_xxs" || s == "q3_k_s" || s == "q3_k_m" || s == "iq4_nl" ||
          s == "q4_k_s" || s == "q4_k_m" || s == "iq3_s" || s == "iq3_m" || s == "iq4_xs")
        type = G::Q5_K;
    } else if (s == "q2_k") type = G::Q3_K;
    else if (s == "iq3_xxs") type = G::IQ3_S;
    else if (s == "q3_k_m") type = G::Q4_K;
    else if (s == "q3_k_l") type = G::Q5_K;
    else if (s == "iq3_m") type = G::Q4_K;
  } else if (has("ffn_gate") || has("ffn_up")) {
    if (s == "iq3_xs" && i >= n / 8 && i < 7 * n / 8) type = G::IQ3_XXS;
  }
  return fallback(type, t);
}

}  // namespace shardlm
