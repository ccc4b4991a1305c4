// shardlm perplexity (runtime/perplexity.h): llama-perplexity's method on our engine.
// - The running estimates and the final one equal a direct computation in this file: each chunk (BOS
//   first) through all_logits of a one-sequence engine on the fp64 reference backend, -log softmax of the
//   next token over the second half, summed in long double: the batched, score_from path against the
//   plain one.
// - Several chunks at once (max_num_seqs 3, chunked prefill) give exactly what one chunk at a time gives
//   (batch invariance of the CPU backend).
// - llama.cpp's log-probability file (--kl-divergence-base): what is written reads back within the format's
//   quantization step, truncated, foreign and existing files are refused, and KlStats gives the KL divergence
//   of known distributions.
// (Agreement with llama.cpp's llama-perplexity on the same files: test_e2e's Perplexity.* tests.)
#include <gtest/gtest.h>

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <random>
#include <sstream>

#include "golden.h"
#include "loader/model_source.h"
#include "runtime/perplexity.h"
#include "tokenizer/tokenizer.h"

namespace shardlm::test {
namespace {

std::vector<int32_t> text_tokens(const ModelSource& src) {
  std::ifstream f(fixture_path("text/fsf-licenses.txt"), std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return Tokenizer::create(*src.vocab())->encode(ss.str(), true, false);
}

EngineOptions options(const std::string& backend, int64_t n_ctx, int64_t seqs, int64_t n_batch) {
  EngineOptions o;
  o.backend = backend;
  o.n_threads = 2;
  o.n_ctx = n_ctx;
  o.max_num_seqs = seqs;
  o.n_batch = n_batch;
  return o;
}

// The direct computation: PerplexityTotals after each chunk.
std::vector<double> direct_running_ppl(Engine& e, const std::vector<int32_t>& toks, int64_t n_ctx, int64_t chunks,
                                       int32_t bos) {
  const int64_t nv = e.config().n_vocab, first = n_ctx / 2;
  long double nll = 0;
  int64_t count = 0;
  std::vector<double> out;
  for (int64_t c = 0; c < chunks; ++c) {
    std::vector<int32_t> ids(toks.begin() + c * n_ctx, toks.begin() + (c + 1) * n_ctx);
    ids[0] = bos;
    const std::vector<float> all = e.all_logits(ids);
    for (int64_t p = first; p < n_ctx - 1; ++p) {
      const float* row = all.data() + p * nv;
      long double mx = row[0], sum = 0;
      for (int64_t v = 1; v < nv; ++v) mx = std::max<long double>(mx, row[v]);
      for (int64_t v = 0; v < nv; ++v) sum += std::exp(static_cast<long double>(row[v]) - mx);
      nll -= static_cast<long double>(row[toks[static_cast<size_t>(c * n_ctx + p + 1)]]) - mx - std::log(sum);
      ++count;
    }
    out.push_back(static_cast<double>(std::exp(nll / count)));
  }
  return out;
}

TEST(Perplexity, EqualsDirectComputationOnReference) {
  auto comm = make_single_rank_communicator();
  auto src = open_model_source(converted_model("stories260K"));
  const std::vector<int32_t> toks = text_tokens(*src);
  PerplexityOptions po;
  po.n_ctx = 64;
  po.n_chunks = 5;
  po.bos = src->vocab()->bos;
  Engine one(*src, *comm, options("reference", 64, 1, 64));
  const std::vector<double> want = direct_running_ppl(one, toks, 64, 5, po.bos);
  Engine many(*src, *comm, options("reference", 64, 3, 48));  // 3 chunks at once, 48-token steps
  const PerplexityResult got = perplexity(many, toks, po);
  ASSERT_EQ(got.running_ppl.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    std::printf("chunk %zu: %.6f vs %.6f\n", i, got.running_ppl[i], want[i]);
    // 1e-9 relative: the same float logits, log-sum-exp in double here and long double there.
    EXPECT_NEAR(got.running_ppl[i], want[i], 1e-9 * want[i]) << "chunk " << i;
  }
  EXPECT_EQ(got.totals.count, 5 * 31);
}

std::string tmp_path(const std::string& name) {
  return std::string(SHARDLM_BINARY_DIR) + "/ppl-" + std::to_string(getpid()) + "-" + name;
}

// Rows of random logits (spread over 40 nats, so some fall below the format's 16-nat floor) written and
// read back: each log-probability within half a quantization step (+ float rounding) of log_softmax, and
// the ones below the floor read as the floor.
TEST(LogProbFile, RoundTripsWithinTheQuantizationStep) {
  const int32_t n_ctx = 8, nv = 101, n_chunk = 3;  // 3 scored rows per chunk; odd vocabulary: padding
  std::vector<int32_t> toks(n_ctx * n_chunk);
  for (size_t i = 0; i < toks.size(); ++i) toks[i] = static_cast<int32_t>((i * 7) % nv);
  const std::string path = tmp_path("roundtrip.kl");
  std::remove(path.c_str());
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> u(-20.f, 20.f);
  std::vector<std::vector<float>> rows;
  {
    LogProbWriter w(path, n_ctx, nv, n_chunk, toks);
    for (int c = n_chunk - 1; c >= 0; --c)  // any order: rows land at their own offsets
      for (int i = 0; i < 3; ++i) {
        std::vector<float> l(nv);
        for (float& x : l) x = u(rng);
        w.write_row(c, i, l.data());
        rows.push_back(l);
      }
    w.finish();
  }
  LogProbReader r(path);
  EXPECT_EQ(r.n_ctx(), n_ctx);
  EXPECT_EQ(r.n_vocab(), nv);
  EXPECT_EQ(r.n_chunk(), n_chunk);
  EXPECT_EQ(r.tokens(), toks);
  size_t k = 0;
  std::vector<float> got;
  for (int c = n_chunk - 1; c >= 0; --c)
    for (int i = 0; i < 3; ++i, ++k) {
      r.read_row(c, i, &got);
      const std::vector<float>& l = rows[k];
      const double mx = *std::max_element(l.begin(), l.end());
      double sum = 0;
      for (float x : l) sum += std::exp(x - mx);
      const double lse = mx + std::log(sum);
      const double step = 16.0 / 65535;  // max - floor is 16 nats here (the logits span 40)
      for (int v = 0; v < nv; ++v) {
        const double want = std::max<double>(l[v], mx - 16) - lse;
        EXPECT_NEAR(got[v], want, step / 2 + 1e-5 + 1e-6 * std::abs(want)) << "chunk " << c << " row " << i << " token " << v;
      }
    }
  std::remove(path.c_str());
}

TEST(LogProbFile, RefusesExistingTruncatedAndForeignFilesAndLeavesNoPartialFile) {
  const std::string path = tmp_path("refuse.kl");
  std::vector<int32_t> toks(16, 1);
  std::ofstream(path) << "user data";
  EXPECT_THROW(LogProbWriter(path, 8, 10, 2, toks), Error) << "an existing file is not overwritten";
  EXPECT_THROW(LogProbReader{path}, Error) << "not a log-probability file";
  std::remove(path.c_str());
  {
    LogProbWriter w(path, 8, 10, 2, toks);  // never finished: no file under either name afterwards
  }
  EXPECT_FALSE(std::ifstream(path));
  EXPECT_FALSE(std::ifstream(path + ".part"));
  {
    LogProbWriter w(path, 8, 10, 2, toks);
    std::vector<float> l(10, 0.f);
    for (int c = 0; c < 2; ++c)
      for (int i = 0; i < 3; ++i) w.write_row(c, i, l.data());
    w.finish();
  }
  ASSERT_NO_THROW(LogProbReader{path});
  ASSERT_EQ(truncate(path.c_str(), 100), 0);
  try {
    LogProbReader r(path);
    ADD_FAILURE() << "a truncated file was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("truncated"), std::string::npos) << e.what();
  }
  std::remove(path.c_str());
}

// KL(base || q) of two known distributions over 3 tokens, the perplexity ratio, same-top agreement.
TEST(KlStats, KnownDistributions) {
  const std::vector<float> base = {std::log(0.7f), std::log(0.2f), std::log(0.1f)};
  const float q[3] = {std::log(0.5f), std::log(0.3f), std::log(0.2f)};  // logits = log-probs (lse 0)
  KlStats s;
  for (int i = 0; i < 20; ++i) s.add(q, base, 0);
  const double want = 0.7 * std::log(0.7 / 0.5) + 0.2 * std::log(0.2 / 0.3) + 0.1 * std::log(0.1 / 0.2);
  EXPECT_NEAR(s.sum_kld / s.count, want, 1e-6);
  EXPECT_NEAR(s.sum_nll / s.count, -std::log(0.5), 1e-6);
  EXPECT_NEAR(s.sum_nll_base / s.count, -std::log(0.7), 1e-6);
  EXPECT_EQ(s.n_same_top, 20);
  const std::string rep = s.report();
  EXPECT_NE(rep.find("Mean    KLD:"), std::string::npos) << rep;
  EXPECT_NE(rep.find("Same top p: 100.000"), std::string::npos) << rep;
}

}  // namespace
}  // namespace shardlm::test
