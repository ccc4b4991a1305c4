// transformers' reference outputs for the tiny Hugging Face fixtures (reference.json) and the measures
// the tests compare against them with. No gtest here: the mpirun worker includes it too.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "formats/safetensors.h"
#include "loader/model_source.h"

namespace shardlm::test {

struct RefCase {
  std::vector<int32_t> prompt_ids, argmax_all, greedy_32;
  std::vector<float> logits_first, logits_last;
  // The reference's top-1 minus top-2 logit at each greedy step (the newer fixtures; empty otherwise).
  std::vector<float> greedy_margins;
};

inline std::vector<RefCase> load_reference(const std::string& fixture_dir) {
  const auto j = nlohmann::json::parse(read_small_file(fixture_dir + "/reference.json", 64 << 20));
  std::vector<RefCase> r;
  for (const auto& c : j.at("cases"))
    r.push_back({c.at("prompt_ids").get<std::vector<int32_t>>(), c.at("argmax_all").get<std::vector<int32_t>>(),
                 c.at("greedy_32").get<std::vector<int32_t>>(), c.at("logits_first").get<std::vector<float>>(),
                 c.at("logits_last").get<std::vector<float>>(),
                 c.contains("greedy_margins") ? c["greedy_margins"].get<std::vector<float>>() : std::vector<float>{}});
  return r;
}

// Whether the fixture's reference.json was computed with RoPE inverse frequencies rounded to bf16. The first
// five fixtures' were (transformers' inv_freq buffer went through the model's bf16 dtype before the upcast
// to float32); tiny-qwen3, tiny-qwen3moe and tiny-mixtral were reloaded in float32 and use exact ones
// (measured on tiny-qwen3: exact frequencies agree within 1e-4 + 1e-4|ref|, rounded ones miss by 6e-3).
inline bool reference_rounds_rope(const std::string& fixture_dir) {
  std::string name = fixture_dir;
  while (!name.empty() && name.back() == '/') name.pop_back();
  name = name.substr(name.find_last_of('/') + 1);  // npos + 1 == 0: no slash
  for (const char* n : {"tiny-llama2", "tiny-llama31", "tiny-llama31-v4config", "tiny-qwen2", "tiny-mistral"})
    if (name == n) return true;
  return false;
}

// `s` with the RoPE frequencies the fixture's reference used: where those were rounded to bf16, exactly
// that rounding, expressed through rope_freq_factors (theta_i = base^(-2i/d) / factor_i), so that the model
// code is unchanged: then the reference's logits are reproduced to float32 summation noise.
class ReferenceRopeSource final : public ModelSource {
 public:
  ReferenceRopeSource(const ModelSource& s, const std::string& fixture_dir) : s_(s), c_(s.config()) {
    if (!reference_rounds_rope(fixture_dir)) return;
    if (c_.rope_freq_factors.empty()) c_.rope_freq_factors.assign(size_t(c_.head_dim / 2), 1.0f);
    for (int64_t i = 0; i < c_.head_dim / 2; ++i) {
      const float inv = 1.0f / std::pow(c_.rope_freq_base, float(2 * i) / float(c_.head_dim));
      const float theta = inv / c_.rope_freq_factors[size_t(i)];
      uint32_t u;
      std::memcpy(&u, &theta, 4);
      u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000u;  // round to nearest even, as torch's .to(bfloat16)
      float rounded;
      std::memcpy(&rounded, &u, 4);
      c_.rope_freq_factors[size_t(i)] = inv / rounded;
    }
  }
  const ModelConfig& config() const override { return c_; }
  const std::vector<SourceTensor>& tensors() const override { return s_.tensors(); }
  const Vocab* vocab() const override { return s_.vocab(); }
  std::string format_name() const override { return s_.format_name(); }
  std::string path() const override { return s_.path(); }

 private:
  const ModelSource& s_;
  ModelConfig c_;
};

// `s` with its embedding (and output matrix, when untied) grown to `n_vocab` rows by repeating its rows,
// and no tokenizer: a model whose vocabulary fits a real tokenizer (the fixtures' 512/1024 random rows do
// not), for tests of tokenizer pairing and export.
class PaddedVocabSource final : public ModelSource {
 public:
  PaddedVocabSource(const ModelSource& s, int64_t n_vocab) : s_(s), c_(s.config()), tensors_(s.tensors()) {
    c_.n_vocab = n_vocab;
    for (SourceTensor& t : tensors_) {
      if (t.name != "token_embd.weight" && t.name != "output.weight") continue;
      const uint64_t row = t.n_bytes / uint64_t(t.ne[1]);
      auto& buf = owned_.emplace_back(row * uint64_t(n_vocab));
      for (int64_t r = 0; r < n_vocab; ++r) std::memcpy(buf.data() + row * uint64_t(r), t.data + row * uint64_t(r % t.ne[1]), row);
      t.ne[1] = n_vocab;
      t.n_bytes = buf.size();
      t.data = buf.data();
    }
  }
  const ModelConfig& config() const override { return c_; }
  const std::vector<SourceTensor>& tensors() const override { return tensors_; }
  const Vocab* vocab() const override { return nullptr; }
  std::string format_name() const override { return s_.format_name(); }
  std::string path() const override { return s_.path(); }

 private:
  const ModelSource& s_;
  ModelConfig c_;
  std::vector<SourceTensor> tensors_;
  std::vector<std::vector<uint8_t>> owned_;

 public:
  PaddedVocabSource(const PaddedVocabSource&) = delete;
  PaddedVocabSource& operator=(const PaddedVocabSource&) = delete;
};

inline int32_t argmax_of(const float* p, int64_t n) {
  int32_t best = 0;
  for (int64_t i = 1; i < n; ++i)
    if (p[i] > p[best]) best = static_cast<int32_t>(i);
  return best;
}

// Worst |got - ref| / (atol + rtol |ref|) and where; a NaN counts as infinitely bad.
struct Worst {
  double share = 0;
  size_t index = 0;
};
inline Worst worst_share(const float* got, const std::vector<float>& ref, double atol, double rtol) {
  Worst w;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double s = std::isnan(got[i]) ? INFINITY : std::fabs(double(got[i]) - ref[i]) / (atol + rtol * std::fabs(ref[i]));
    if (s > w.share) w = {s, i};
  }
  return w;
}

// KL(softmax(ref) || softmax(got)) in nats, in double precision.
inline double kl_divergence(const std::vector<float>& ref, const float* got) {
  auto log_softmax = [](auto at, size_t n) {
    double mx = -INFINITY;
    for (size_t i = 0; i < n; ++i) mx = std::max(mx, double(at(i)));
    double sum = 0;
    for (size_t i = 0; i < n; ++i) sum += std::exp(double(at(i)) - mx);
    std::vector<double> r(n);
    for (size_t i = 0; i < n; ++i) r[i] = double(at(i)) - mx - std::log(sum);
    return r;
  };
  const size_t n = ref.size();
  const auto lp = log_softmax([&](size_t i) { return ref[i]; }, n);
  const auto lq = log_softmax([&](size_t i) { return got[i]; }, n);
  double kl = 0;
  for (size_t i = 0; i < n; ++i) kl += std::exp(lp[i]) * (lp[i] - lq[i]);
  return std::isnan(kl) ? INFINITY : std::max(kl, 0.0);
}

}  // namespace shardlm::test
