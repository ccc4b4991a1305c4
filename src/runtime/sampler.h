// Token selection from logits: greedy, or llama.cpp's chain of repetition penalty, top-k, temperature,
// top-p, min-p and a seeded draw. The same seed and logits give the same token on every machine.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

namespace shardlm {

struct SamplerParams {
  float temperature = 0.0f;    // <= 0: greedy (argmax, lowest id on ties)
  int32_t top_k = 40;          // <= 0: off
  float top_p = 0.95f;         // >= 1: off
  float min_p = 0.05f;         // <= 0: off
  float repeat_penalty = 1.0f; // 1: off
  int32_t repeat_last_n = 64;  // tokens of history the penalty looks at
  uint64_t seed = 0;
  // Throws Error naming the parameter when out of range.
  void validate() const;
};

class Sampler {
 public:
  explicit Sampler(const SamplerParams& p);
  // `history`: prompt and generated tokens so far (for the repetition penalty).
  int32_t sample(const float* logits /* (n_vocab) */, int64_t n_vocab, const std::vector<int32_t>& history);

 private:
  SamplerParams p_;
  std::mt19937_64 rng_;
};

int32_t argmax(const float* logits /* (n) */, int64_t n);

}  // namespace shardlm
