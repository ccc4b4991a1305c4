// Token selection from logits: greedy, or llama.cpp's chain of repetition penalty, top-k, temperature,
// top-p, min-p and a seeded draw. The same seed and logits give the same token on every machine.
#pragma once

#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include "ops/candidates.h"

namespace shardlm {

struct SamplerParams {
  float temperature = 0.0f;    // <= 0: greedy (argmax, lowest id on ties)
  int32_t top_k = 40;          // <= 0: off
  float top_p = 0.95f;         // >= 1: off
  float min_p = 0.05f;         // <= 0: off
  float repeat_penalty = 1.0f; // 1: off
  // OpenAI's and llama.cpp's additive penalties: logit -= count * frequency_penalty + (count > 0) *
  // presence_penalty, count being the token's occurrences in the penalty window (after the repetition
  // penalty, as llama.cpp orders them). 0: off.
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  int32_t repeat_last_n = 64;  // tokens of history the penalties look at (llama.cpp's penalty_last_n)
  uint64_t seed = 0;
  // Ids at or above this are never chosen (0: every id may be). A tokenizer may have fewer tokens than the
  // model's vocabulary (embedding rows padded to a multiple); a padded id has no text, so sampling one would
  // end the run. The engine sets it from the model's tokenizer.
  int64_t n_valid = 0;
  // Throws Error naming the parameter when out of range.
  void validate() const;
};

// What a sampler needs from a step instead of the full logits: the k first raw logits in candidate order
// plus the raw logits of `extra` (the tokens the repetition penalty touches). k == 0: it needs them all
// (temperature > 0 with top-k off, or more candidates than are worth ranking on a device).
struct CandidateRequest {
  int k = 0;
  std::vector<int32_t> extra;  // distinct ids in [0, n_vocab)
};

class Sampler {
 public:
  // Above this many candidates the full logits are fetched instead.
  static constexpr int kMaxCandidates = 1024;

  explicit Sampler(const SamplerParams& p);
  // `history`: prompt and generated tokens so far (for the repetition penalty).
  int32_t sample(const float* logits /* (n_vocab) */, int64_t n_vocab, const std::vector<int32_t>& history);

  // Same params and history give the same request on every rank. Why candidates suffice: the penalty
  // changes only the m extra tokens, so the final top-k lies within the raw top-(k + m) and the extras
  // (a token outside both is beaten by k unpenalized tokens before and after the penalty).
  CandidateRequest request(const std::vector<int32_t>& history, int64_t n_vocab) const;
  // Greedy with no penalty: the token is the first logit in candidate order whatever the history.
  // With masked ids the device's argmax could pick a padded one, so masking also rules it out.
  bool plain_greedy() const { return p_.temperature <= 0 && !penalty_on() && p_.n_valid <= 0; }
  // The token sample() would return for the full logits, given what request() asked for; consumes the
  // random stream exactly as sample() does.
  // `history` is the one request() was given (the penalties' counts come from it).
  int32_t sample_candidates(const std::vector<TokenCandidate>& top, const CandidateRequest& req,
                            const std::vector<float>& extra_values /* (req.extra.size()) */,
                            const std::vector<int32_t>& history);

 private:
  // A penalty changes any logit at all.
  bool penalty_on() const {
    return p_.repeat_last_n > 0 &&
           (p_.repeat_penalty != 1.0f || p_.presence_penalty != 0.0f || p_.frequency_penalty != 0.0f);
  }
  // The ids that may be chosen: [0, usable(n_vocab)).
  int64_t usable(int64_t n_vocab) const { return p_.n_valid > 0 ? std::min(n_vocab, p_.n_valid) : n_vocab; }
  // The distinct tokens of the penalty window, in order of first appearance, and how often each occurs.
  std::vector<int32_t> penalized(const std::vector<int32_t>& history, int64_t n_vocab,
                                 std::vector<int32_t>* counts = nullptr) const;
  float penalize(float v, int32_t count) const {
    v = v > 0 ? v / p_.repeat_penalty : v * p_.repeat_penalty;
    return v - static_cast<float>(count) * p_.frequency_penalty - p_.presence_penalty;
  }
  // The chain after the penalty: `c` holds every token that can still be chosen (all of them, or the
  // candidates), with penalized logits.
  int32_t pick(std::vector<TokenCandidate> c);

  SamplerParams p_;
  std::mt19937_64 rng_;
};

// Index of the first largest logit in candidate order (NaN never wins over a number).
int32_t argmax(const float* logits /* (n) */, int64_t n);

}  // namespace shardlm
