#include "runtime/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <limits>
#include <unordered_map>
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
  if (n_valid < 0) fail("sampler: n_valid ", n_valid, " must be >= 0");
  if (repeat_last_n < 0) fail("--repeat-last-n ", repeat_last_n, " must be >= 0");
  if (!(presence_penalty >= -2 && presence_penalty <= 2))
    fail("--presence-penalty ", presence_penalty, " is outside [-2, 2]");
  if (!(frequency_penalty >= -2 && frequency_penalty <= 2))
    fail("--frequency-penalty ", frequency_penalty, " is outside [-2, 2]");
}

Sampler::Sampler(const SamplerParams& p) : p_(p), rng_(p.seed) { p_.validate(); }

int32_t argmax(const float* logits, int64_t n) {
  // Candidate order: the first largest number; NaN only when everything is NaN (then index 0).
  int64_t best = -1;
  for (int64_t i = 0; i < n; ++i) {
    const float v = logits[i];
    if (v != v) continue;
    if (best < 0 || v > logits[best]) best = i;
  }
  return static_cast<int32_t>(best < 0 ? 0 : best);
}

std::vector<int32_t> Sampler::penalized(const std::vector<int32_t>& history, int64_t n_vocab,
                                        std::vector<int32_t>* counts) const {
  std::vector<int32_t> out;
  if (counts) counts->clear();
  if (!penalty_on()) return out;
  // llama.cpp's rule: each distinct recent token penalized once, with its count in the window.
  std::unordered_map<int32_t, size_t> index;
  const size_t from = history.size() > size_t(p_.repeat_last_n) ? history.size() - size_t(p_.repeat_last_n) : 0;
  for (size_t i = from; i < history.size(); ++i) {
    const int32_t t = history[i];
    if (t < 0 || t >= n_vocab) continue;
    auto [it, fresh] = index.emplace(t, out.size());
    if (fresh) {
      out.push_back(t);
      if (counts) counts->push_back(1);
    } else if (counts) {
      ++(*counts)[it->second];
    }
  }
  return out;
}

int32_t Sampler::sample(const float* logits, int64_t n_vocab, const std::vector<int32_t>& history) {
  n_vocab = usable(n_vocab);  // masked ids are the highest ones: the first n_valid logits are the choice
  std::vector<int32_t> counts;
  const std::vector<int32_t> pen = penalized(history, n_vocab, &counts);
  if (p_.temperature <= 0) {  // greedy: one pass, no candidate list
    if (pen.empty()) return argmax(logits, n_vocab);
    std::vector<float> l(logits, logits + n_vocab);
    for (size_t i = 0; i < pen.size(); ++i) l[size_t(pen[i])] = penalize(l[size_t(pen[i])], counts[i]);
    return argmax(l.data(), n_vocab);
  }
  std::vector<TokenCandidate> c(static_cast<size_t>(n_vocab));
  for (int64_t i = 0; i < n_vocab; ++i) c[size_t(i)] = TokenCandidate{logits[i], static_cast<int32_t>(i)};
  for (size_t i = 0; i < pen.size(); ++i) c[size_t(pen[i])].logit = penalize(c[size_t(pen[i])].logit, counts[i]);
  return pick(std::move(c));
}

CandidateRequest Sampler::request(const std::vector<int32_t>& history, int64_t n_vocab) const {
  CandidateRequest r;
  if (p_.temperature > 0 && p_.top_k <= 0) return r;  // the whole distribution takes part
  // Masked ids could fill the device's top-k, leaving fewer than k that may be chosen: take every logit.
  if (usable(n_vocab) < n_vocab) return r;
  r.extra = penalized(history, n_vocab);
  const int64_t k = (p_.temperature > 0 ? p_.top_k : 1) + static_cast<int64_t>(r.extra.size());
  if (k > kMaxCandidates) {
    r.extra.clear();
    return r;
  }
  r.k = static_cast<int>(std::min<int64_t>(k, n_vocab));
  return r;
}

int32_t Sampler::sample_candidates(const std::vector<TokenCandidate>& top, const CandidateRequest& req,
                                   const std::vector<float>& extra_values, const std::vector<int32_t>& history) {
  if (top.empty() || extra_values.size() != req.extra.size())
    fail_kind(ErrorKind::kInternal, "sample_candidates: ", top.size(), " candidates, ", extra_values.size(),
              " values for ", req.extra.size(), " extra ids");
  std::vector<TokenCandidate> c;
  std::unordered_set<int32_t> pen(req.extra.begin(), req.extra.end());
  for (const TokenCandidate& t : top)
    if (!pen.count(t.id)) c.push_back(t);
  // The counts of the same window that request() saw (req.extra is its distinct tokens, in order).
  std::vector<int32_t> counts;
  const std::vector<int32_t> ids = penalized(history, std::numeric_limits<int32_t>::max(), &counts);
  if (ids != req.extra)
    fail_kind(ErrorKind::kInternal, "sample_candidates: the history's penalized tokens differ from the request's");
  for (size_t i = 0; i < req.extra.size(); ++i)
    c.push_back(TokenCandidate{penalize(extra_values[i], counts[i]), req.extra[i]});
  return pick(std::move(c));
}

int32_t Sampler::pick(std::vector<TokenCandidate> c) {
  if (p_.temperature <= 0) return std::min_element(c.begin(), c.end(), candidate_before)->id;
  size_t keep = c.size();
  if (p_.top_k > 0 && size_t(p_.top_k) < keep) {
    keep = size_t(p_.top_k);
    std::partial_sort(c.begin(), c.begin() + long(keep), c.end(), candidate_before);
    c.resize(keep);
  } else {
    std::sort(c.begin(), c.end(), candidate_before);
  }
  std::vector<double> prob(c.size());
  const double mx = c[0].logit;
  double sum = 0;
  for (size_t i = 0; i < c.size(); ++i) sum += (prob[i] = std::exp((c[i].logit - mx) / p_.temperature));
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
    if (u < cum) return c[i].id;
  }
  return c[prob.size() - 1].id;
}

}  // namespace shardlm
