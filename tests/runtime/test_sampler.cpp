// Token selection: the candidate ranking (ops/candidates.h) against a plain sort, and the sampler's
// candidate path against an independent, direct implementation of llama.cpp's chain on the full logits.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "ops/candidates.h"
#include "runtime/sampler.h"
#include "support/candidate_checks.h"

namespace shardlm {
namespace {

// Candidate order, written out: larger value first, NaN last, ties (and NaNs) by lower id; -0 == +0.
bool ref_before(float a, int ia, float b, int ib) {
  const bool na = std::isnan(a), nb = std::isnan(b);
  if (na != nb) return nb;
  if (!na && a != b) return a > b;
  return ia < ib;
}

std::vector<float> random_logits(std::mt19937_64& rng, int64_t n, bool specials) {
  std::uniform_real_distribution<float> u(-8.0f, 8.0f);
  std::vector<float> l(static_cast<size_t>(n));
  for (auto& x : l) x = std::round(u(rng) * 4.0f) / 4.0f;  // coarse values: many exact ties
  if (specials && n > 8) {
    l[1] = std::numeric_limits<float>::quiet_NaN();
    l[3] = -0.0f;
    l[4] = 0.0f;
    l[5] = std::numeric_limits<float>::infinity();
    l[6] = -std::numeric_limits<float>::infinity();
  }
  return l;
}

TEST(Candidates, HostTopKMatchesAPlainSort) {
  std::mt19937_64 rng(1);
  for (int64_t n : {1, 2, 9, 100, 5000}) {
    for (bool specials : {false, true}) {
      const std::vector<float> l = random_logits(rng, n, specials);
      std::vector<int> idx(static_cast<size_t>(n));
      std::iota(idx.begin(), idx.end(), 0);
      std::sort(idx.begin(), idx.end(), [&](int a, int b) { return ref_before(l[size_t(a)], a, l[size_t(b)], b); });
      for (int k : {1, 3, 40, 7000}) {
        testing_support::expect_candidates(top_candidates_host(l.data(), n, k), idx, l.data(), n, k,
                                           "n " + std::to_string(n) + " k " + std::to_string(k));
      }
    }
  }
}

TEST(Candidates, KeyRoundTripsAndOrders) {
  for (float v : {-3.5f, -0.0f, 0.0f, 1e-30f, 2.0f, std::numeric_limits<float>::infinity()}) {
    const TokenCandidate c = candidate_from_key(candidate_key(v, 17));
    EXPECT_EQ(c.id, 17);
    EXPECT_EQ(c.logit, v);
  }
  EXPECT_TRUE(std::isnan(candidate_from_key(candidate_key(std::nanf(""), 3)).logit));
  EXPECT_GT(candidate_key(-1e30f, 5), candidate_key(std::nanf(""), 0));   // any number beats NaN
  EXPECT_GT(candidate_key(1.0f, 2), candidate_key(1.0f, 3));              // ties: lower id first
  EXPECT_EQ(candidate_key(-0.0f, 4), candidate_key(0.0f, 4));
  EXPECT_GT(candidate_key(std::nanf(""), 0), 0u);                          // 0 stays free for padding
}

// llama.cpp's chain on the full logits, written independently of Sampler.
int32_t reference_sample(std::vector<float> l, const SamplerParams& p, const std::vector<int32_t>& history,
                         std::mt19937_64& rng) {
  const int64_t n = static_cast<int64_t>(l.size());
  if (p.repeat_last_n > 0) {
    // llama.cpp's penalties sampler: over the window, each distinct token: the repetition penalty, then
    // minus count * frequency and presence once.
    std::map<int32_t, int> count;
    const size_t from = history.size() > size_t(p.repeat_last_n) ? history.size() - size_t(p.repeat_last_n) : 0;
    for (size_t i = from; i < history.size(); ++i)
      if (history[i] >= 0 && history[i] < n) ++count[history[i]];
    for (const auto& [t, c] : count) {
      float& v = l[size_t(t)];
      if (p.repeat_penalty != 1.0f) v = v > 0 ? v / p.repeat_penalty : v * p.repeat_penalty;
      v -= float(c) * p.frequency_penalty + (c > 0 ? p.presence_penalty : 0.0f);
    }
  }
  std::vector<int> idx(static_cast<size_t>(n));
  std::iota(idx.begin(), idx.end(), 0);
  std::sort(idx.begin(), idx.end(), [&](int a, int b) { return ref_before(l[size_t(a)], a, l[size_t(b)], b); });
  if (p.temperature <= 0) return idx[0];
  if (p.top_k > 0 && p.top_k < n) idx.resize(size_t(p.top_k));
  std::vector<double> w;
  for (int i : idx) w.push_back(std::exp((double(l[size_t(i)]) - double(l[size_t(idx[0])])) / p.temperature));
  const double s = std::accumulate(w.begin(), w.end(), 0.0);
  for (auto& x : w) x /= s;
  size_t keep = w.size();
  if (p.top_p < 1) {
    double c = 0;
    keep = 0;
    while (keep < w.size()) {
      c += w[keep++];
      if (c >= p.top_p) break;
    }
  }
  if (p.min_p > 0) {
    size_t m = 1;
    while (m < keep && w[m] >= w[0] * p.min_p) ++m;
    keep = m;
  }
  w.resize(keep);
  const double total = std::accumulate(w.begin(), w.end(), 0.0);
  const double u = double(rng() >> 11) * (1.0 / 9007199254740992.0) * total;
  double c = 0;
  for (size_t i = 0; i < w.size(); ++i) {
    c += w[i];
    if (u < c) return idx[i];
  }
  return idx[w.size() - 1];
}

TEST(Sampler, FullAndCandidatePathsMatchTheReferenceChain) {
  std::mt19937_64 data(11);
  const int64_t n = 3000;
  struct Case {
    float temp, top_p, min_p, penalty;
    int top_k, last_n;
    float presence = 0, frequency = 0;
  };
  const Case cases[] = {
      {0.0f, 0.95f, 0.05f, 1.0f, 40, 64},   {0.0f, 0.95f, 0.05f, 1.3f, 40, 64},  {0.0f, 1.0f, 0.0f, 0.7f, 40, 64},
      {0.8f, 0.95f, 0.05f, 1.0f, 40, 64},   {0.8f, 1.0f, 0.0f, 1.0f, 1, 64},     {1.5f, 0.9f, 0.0f, 1.2f, 10, 16},
      {1.0f, 1.0f, 0.0f, 0.5f, 40, 64},     {2.0f, 1.0f, 0.1f, 1.1f, 300, 64},  {0.7f, 0.95f, 0.05f, 1.0f, 0, 64},
      {5.0f, 0.99f, 0.0f, 1.4f, 2999, 64},
      // presence / frequency penalties, alone and with the repetition penalty (the history repeats 7).
      {0.0f, 0.95f, 0.05f, 1.0f, 40, 64, 1.5f, 0.0f}, {0.0f, 0.95f, 0.05f, 1.0f, 40, 64, 0.0f, 2.0f},
      {0.8f, 0.95f, 0.05f, 1.2f, 40, 64, 0.5f, 0.7f}, {1.0f, 1.0f, 0.0f, 1.0f, 20, 16, -1.0f, -0.5f},
  };
  int candidate_runs = 0;
  for (const Case& cs : cases) {
    SamplerParams p;
    p.temperature = cs.temp;
    p.top_k = cs.top_k;
    p.top_p = cs.top_p;
    p.min_p = cs.min_p;
    p.repeat_penalty = cs.penalty;
    p.repeat_last_n = cs.last_n;
    p.presence_penalty = cs.presence;
    p.frequency_penalty = cs.frequency;
    p.seed = 5;
    Sampler full(p), cand(p);
    std::mt19937_64 ref_rng(p.seed);
    std::vector<int32_t> history = {7, 7, 12, 2999, 0};
    for (int step = 0; step < 40; ++step) {
      const std::vector<float> l = random_logits(data, n, step % 3 == 0);
      // Penalized ids among the top: make some history tokens the largest logits.
      std::vector<float> lp = l;
      for (size_t i = 0; i < history.size() && i < 4; ++i) lp[size_t(history[history.size() - 1 - i])] = 9.0f;
      const int32_t want = reference_sample(lp, p, history, ref_rng);
      EXPECT_EQ(full.sample(lp.data(), n, history), want) << "case temp " << cs.temp << " step " << step;
      const CandidateRequest req = cand.request(history, n);
      int32_t got;
      if (req.k > 0) {
        ++candidate_runs;
        std::vector<float> extra;
        for (int32_t e : req.extra) extra.push_back(lp[size_t(e)]);
        got = cand.sample_candidates(top_candidates_host(lp.data(), n, req.k), req, extra, history);
      } else {
        EXPECT_TRUE(cs.temp > 0 && (cs.top_k == 0 || cs.top_k + 1 > Sampler::kMaxCandidates))
            << "only top-k off or too many candidates need the full logits";
        got = cand.sample(lp.data(), n, history);
      }
      EXPECT_EQ(got, want) << "candidates, case temp " << cs.temp << " penalty " << cs.penalty << " step " << step;
      history.push_back(want);
    }
  }
  EXPECT_GT(candidate_runs, 300);
}

TEST(Sampler, RequestSizes) {
  SamplerParams p;
  p.temperature = 0;
  EXPECT_EQ(Sampler(p).request({1, 2, 3}, 100).k, 1);
  p.repeat_penalty = 1.1f;
  const CandidateRequest r = Sampler(p).request({1, 2, 2, 3, 500}, 100);  // 500 is outside the vocabulary
  EXPECT_EQ(r.k, 4);
  EXPECT_EQ(r.extra, (std::vector<int32_t>{1, 2, 3}));
  p.temperature = 0.8f;
  p.top_k = 0;
  EXPECT_EQ(Sampler(p).request({1}, 100).k, 0);
  p.top_k = Sampler::kMaxCandidates;
  EXPECT_EQ(Sampler(p).request({1}, 100000).k, 0);  // 1024 + 1 penalized: too many to rank on a device
  p.top_k = 40;
  EXPECT_EQ(Sampler(p).request({1}, 30).k, 30);     // never more than the vocabulary
}

// Issue 23 item 8: ids at or above n_valid (padded rows a smaller tokenizer lacks) are never chosen, even
// when their logits are the largest, in every mode; and the candidate path is bypassed (full logits).
TEST(Sampler, MaskedIdsAreNeverChosen) {
  const int64_t n = 64, valid = 40;
  std::vector<float> l(static_cast<size_t>(n), 0.0f);
  for (int64_t i = 0; i < n; ++i) l[size_t(i)] = i >= valid ? 10.0f : float(i % 7) * 0.1f;
  std::vector<SamplerParams> modes(4);
  modes[1].temperature = 1.0f;
  modes[2].temperature = 2.0f, modes[2].top_k = 0, modes[2].top_p = 1, modes[2].min_p = 0;
  modes[3].repeat_penalty = 1.5f;
  for (SamplerParams p : modes) {
    p.n_valid = valid;
    Sampler s(p);
    EXPECT_EQ(s.request({}, n).k, 0) << "the device's top-k could all be masked ids";
    EXPECT_FALSE(s.plain_greedy()) << "the device's argmax could be a masked id";
    std::vector<int32_t> history = {41, 5};
    for (int i = 0; i < 200; ++i) EXPECT_LT(s.sample(l.data(), n, history), valid) << p.temperature;
  }
  SamplerParams open;  // n_valid 0: every id may be chosen
  EXPECT_GE(Sampler(open).sample(l.data(), n, {}), valid);
}

}  // namespace
}  // namespace shardlm
