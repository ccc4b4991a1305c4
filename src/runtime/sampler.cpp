#include "runtime/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <unordered_set>

#include "core/error.h"

namespace shardlm {

void SamplerParams::validate() const {
  if (!std::isfinite(temperature) || temperature < 0 || temperature > 100)
    fail("--temp ", temperature, " is outside [0, 100]");
  if (top_k < 0) fail("--top-k ", top_k, " must be >= 0 (0 disables it)");
  if (!(top_p > 0 && top_p <= 1)) fail("--top-p ", top_p, " is outside (0, 1]");
  if (!(min_p >= 0 && min_p < 1)) fail("--min-p ", min_p, " is outside [0, 1)");
  if (!(repeat_penalty > 0 && repeat_penalty <= 10)) fail("--repeat-penalty ", repeat_penalty, " is outside (0, 10]");
  if (repeat_last_n < 0) fail("--repeat-last-n ", repeat_last_n, " must be >= 0");
}

Sampler::Sampler(const SamplerParams& p) : p_(p), rng_(p.seed) { p_.validate(); }

int32_t argmax(const float* logits, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i)
    if (logits[i] > logits[best]) best = i;
  return static_cast<int32_t>(best);
}

int32_t Sampler::sample(const float* logits, int64_t n_vocab, const std::vector<int32_t>& history) {
  std::vector<float> l(logits, logits + n_vocab);
  if (p_.repeat_penalty != 1.0f && p_.repeat_last_n > 0) {
    // llama.cpp's rule: each distinct recent token once; positive logits divided, negative multiplied.
    std::unordered_set<int32_t> seen;
    const size_t from = history.size() > size_t(p_.repeat_last_n) ? history.size() - size_t(p_.repeat_last_n) : 0;
    for (size_t i = from; i < history.size(); ++i) {
      const int32_t t = history[i];
      if (t < 0 || t >= n_vocab || !seen.insert(t).second) continue;
      l[size_t(t)] = l[size_t(t)] > 0 ? l[size_t(t)] / p_.repeat_penalty : l[size_t(t)] * p_.repeat_penalty;
    }
  }
  if (p_.temperature <= 0) return argmax(l.data(), n_vocab);

  std::vector<int32_t> idx(static_cast<size_t>(n_vocab));
  std::iota(idx.begin(), idx.end(), 0);
  // Descending by logit, ties by id, so the candidate order never depends on the sort's stability.
  auto by_logit = [&](int32_t a, int32_t b) { return l[size_t(a)] > l[size_t(b)] || (l[size_t(a)] == l[size_t(b)] && a < b); };
  size_t keep = idx.size();
  if (p_.top_k > 0 && size_t(p_.top_k) < keep) {
    keep = size_t(p_.top_k);
    std::partial_sort(idx.begin(), idx.begin() + long(keep), idx.end(), by_logit);
    idx.resize(keep);
  } else {
    std::sort(idx.begin(), idx.end(), by_logit);
  }
  std::vector<double> prob(idx.size());
  const double mx = l[size_t(idx[0])];
  double sum = 0;
  for (size_t i = 0; i < idx.size(); ++i) sum += (prob[i] = std::exp((l[size_t(idx[i])] - mx) / p_.temperature));
  for (auto& x : prob) x /= sum;
  if (p_.top_p < 1) {
    double cum = 0;
    size_t n = 0;
    while (n < prob.size()) {
      cum += prob[n++];
      if (cum >= p_.top_p) break;
    }
    prob.resize(n);
  }
  if (p_.min_p > 0) {
    const double floor = prob[0] * p_.min_p;
    size_t n = 1;
    while (n < prob.size() && prob[n] >= floor) ++n;
    prob.resize(n);
  }
  double total = std::accumulate(prob.begin(), prob.end(), 0.0);
  // A uniform draw from 53 random bits, so the result is the same for every standard library.
  const double u = double(rng_() >> 11) * (1.0 / 9007199254740992.0) * total;
  double cum = 0;
  for (size_t i = 0; i < prob.size(); ++i) {
    cum += prob[i];
    if (u < cum) return idx[i];
  }
  return idx[prob.size() - 1];
}

}  // namespace shardlm
