// Batch invariance: B different requests (different prompt lengths, some greedy, some sampled with their
// own seeds) run together through the batched engine give, for each request, exactly the ids it gives alone
// (a batch of one). On the CPU and reference backends every token's arithmetic is independent of what else
// shares its step (kernels_tile.h, the per-token attention), so the comparison is exact. Also: sequences
// joining while others decode, one aborted mid-run, a pool so small that sequences are preempted and
// recomputed, and the pool empty again at the end.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "golden.h"
#include "loader/model_source.h"
#include "runtime/engine.h"

namespace shardlm::test {
namespace {

struct Request {
  std::vector<int32_t> prompt;
  SequenceParams params;
};

// B requests drawn from a fixed seed: prompts of 1-40 tokens, 3-20 generated tokens, every third one
// greedy and the others sampled at temperature 0.8 with their own seed; some with a repetition penalty
// (which asks the last stage for extra logits) and one with a stop id.
std::vector<Request> requests(int b, int32_t n_vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<Request> out;
  for (int i = 0; i < b; ++i) {
    Request r;
    const int len = 1 + static_cast<int>(rng() % 40);
    r.prompt.push_back(1);  // BOS
    for (int t = 1; t < len; ++t) r.prompt.push_back(3 + static_cast<int32_t>(rng() % uint32_t(n_vocab - 3)));
    r.params.max_tokens = 3 + static_cast<int64_t>(rng() % 18);
    if (i % 3 == 0) {
      r.params.sampling.temperature = 0;
    } else {
      r.params.sampling.temperature = 0.8f;
      r.params.sampling.seed = 1000 + static_cast<uint64_t>(i);
    }
    if (i % 5 == 1) r.params.sampling.repeat_penalty = 1.3f;
    if (i % 7 == 2) r.params.stop_ids = {static_cast<int32_t>(r.prompt.back())};
    out.push_back(std::move(r));
  }
  return out;
}

EngineOptions options(const std::string& backend, int64_t max_seqs, int64_t kv_blocks) {
  EngineOptions o;
  o.backend = backend;
  o.n_threads = 2;
  o.n_ctx = 96;
  o.n_batch = 64;
  o.max_num_seqs = max_seqs;
  o.kv_blocks = kv_blocks;
  return o;
}

// Each request alone (generate: a batch of one).
std::vector<std::vector<int32_t>> alone(Engine& e, const std::vector<Request>& reqs) {
  std::vector<std::vector<int32_t>> out;
  for (const Request& r : reqs) {
    const int32_t stop = r.params.stop_ids.empty() ? -1 : r.params.stop_ids[0];
    out.push_back(e.generate(r.prompt, r.params.max_tokens, r.params.sampling, stop).generated);
  }
  return out;
}

// All requests through one engine: `join_at` of them queued at the start, the rest one per step while the
// first ones run; `abort_id` (a position in reqs, or -1) aborted after a few steps.
std::vector<std::vector<int32_t>> batched(Engine& e, const std::vector<Request>& reqs, size_t join_at, int abort_at,
                                          int64_t* most_seqs) {
  std::map<int64_t, size_t> index;
  std::vector<std::vector<int32_t>> out(reqs.size());
  size_t next = 0;
  for (; next < std::min(join_at, reqs.size()); ++next) index[e.add_sequence(reqs[next].prompt, reqs[next].params)] = next;
  std::vector<SeqEvent> ev;
  int steps = 0;
  *most_seqs = 0;
  for (;;) {
    if (next < reqs.size() && steps > 0) {
      index[e.add_sequence(reqs[next].prompt, reqs[next].params)] = next;
      ++next;
    }
    if (abort_at >= 0 && steps == 4) {
      for (const auto& [id, i] : index)
        if (static_cast<int>(i) == abort_at) e.abort_sequence(id);
    }
    *most_seqs = std::max(*most_seqs, e.scheduler()->n_running());
    ev.clear();
    if (!e.step(&ev)) {
      if (next < reqs.size()) continue;
      break;
    }
    ++steps;
    for (const SeqEvent& x : ev)
      if (x.token >= 0) out[index.at(x.id)].push_back(x.token);
  }
  return out;
}

struct Case {
  const char* backend;
  int b;
  int64_t kv_blocks;  // 0: enough for every sequence; small: preemption
};

class Batching : public ::testing::TestWithParam<Case> {};

TEST_P(Batching, EachSequenceGetsItsIdsAlone) {
  const Case c = GetParam();
  auto comm = make_single_rank_communicator();
  auto src = open_model_source(converted_model("stories260K"));
  const int32_t nv = static_cast<int32_t>(src->config().n_vocab);
  const std::vector<Request> reqs = requests(c.b, nv, 42 + static_cast<uint32_t>(c.b));
  Engine one(*src, *comm, options(c.backend, 1, 0));
  const auto want = alone(one, reqs);
  Engine many(*src, *comm, options(c.backend, c.b, c.kv_blocks));
  int64_t most = 0;
  const auto got = batched(many, reqs, static_cast<size_t>((c.b + 1) / 2), -1, &most);
  for (size_t i = 0; i < reqs.size(); ++i)
    EXPECT_EQ(got[i], want[i]) << "request " << i << " (prompt " << reqs[i].prompt.size() << " tokens, temperature "
                               << reqs[i].params.sampling.temperature << ") differs between batched and alone";
  if (c.b > 1) {
    EXPECT_GT(most, 1) << "the sequences never ran together";
  }
  if (c.kv_blocks > 0 && c.b > 1) {
    EXPECT_GT(many.scheduler()->n_preemptions(), 0) << "the small pool preempted nothing";
  }
  EXPECT_EQ(many.scheduler()->blocks().n_free(), many.kv_blocks()) << "blocks were not returned to the pool";
}

INSTANTIATE_TEST_SUITE_P(Sizes, Batching,
                         ::testing::Values(Case{"reference", 1, 0}, Case{"reference", 3, 0}, Case{"cpu", 1, 0},
                                           Case{"cpu", 3, 0}, Case{"cpu", 17, 0}, Case{"cpu", 64, 0},
                                           // 17 sequences of up to 60 positions in 24 blocks of 16: preemption
                                           Case{"cpu", 17, 24}),
                         [](const ::testing::TestParamInfo<Case>& i) {
                           return std::string(i.param.backend) + "_B" + std::to_string(i.param.b) +
                                  (i.param.kv_blocks ? "_small_pool" : "");
                         });

TEST(Batching, AbortedSequenceFreesItsBlocksAndOthersContinue) {
  auto comm = make_single_rank_communicator();
  auto src = open_model_source(converted_model("stories260K"));
  const int32_t nv = static_cast<int32_t>(src->config().n_vocab);
  std::vector<Request> reqs = requests(6, nv, 7);
  for (Request& r : reqs) r.params.max_tokens = 20;
  Engine one(*src, *comm, options("cpu", 1, 0));
  const auto want = alone(one, reqs);
  Engine many(*src, *comm, options("cpu", 6, 0));
  int64_t most = 0;
  const auto got = batched(many, reqs, 6, 2, &most);
  for (size_t i = 0; i < reqs.size(); ++i) {
    if (i == 2) {
      EXPECT_LT(got[i].size(), want[i].size()) << "the aborted sequence ran to its end";
      EXPECT_EQ(got[i], std::vector<int32_t>(want[i].begin(), want[i].begin() + static_cast<ptrdiff_t>(got[i].size())));
    } else {
      EXPECT_EQ(got[i], want[i]) << "request " << i;
    }
  }
  EXPECT_EQ(many.scheduler()->blocks().n_free(), many.kv_blocks());
}

// Prefix caching: requests that share their first 20-45 tokens (three stems, a chat's system prompt and
// history) reuse each other's KV blocks, in a pool large enough to keep them and in one so small that
// cached blocks are evicted and sequences preempted; every request still gets exactly the ids it gets alone
// with nothing cached (a reused row is the row it would compute: the arithmetic of a token is independent
// of its step), and the blocks really were reused. Also the second of two identical requests run one after
// the other, the case of a chat's next turn.
TEST(Batching, PrefixCachingGivesTheIdsOfARunWithoutIt) {
  auto comm = make_single_rank_communicator();
  auto src = open_model_source(converted_model("stories260K"));
  const int32_t nv = static_cast<int32_t>(src->config().n_vocab);
  std::vector<Request> reqs = requests(12, nv, 99);
  std::mt19937 rng(5);
  std::vector<std::vector<int32_t>> stems(3);
  for (auto& st : stems) {
    st.push_back(1);
    const int len = 20 + static_cast<int>(rng() % 26);
    for (int t = 1; t < len; ++t) st.push_back(3 + static_cast<int32_t>(rng() % uint32_t(nv - 3)));
  }
  for (size_t i = 0; i < reqs.size(); ++i) {
    std::vector<int32_t> p = stems[i % 3];
    p.insert(p.end(), reqs[i].prompt.begin() + 1, reqs[i].prompt.begin() + 1 + std::min<ptrdiff_t>(8, ptrdiff_t(reqs[i].prompt.size()) - 1));
    reqs[i].prompt = p;
  }
  reqs.push_back(reqs[0]);  // the same request again
  Engine one(*src, *comm, options("cpu", 1, 0));
  const auto want = alone(one, reqs);
  for (int64_t kv_blocks : {int64_t{0}, int64_t{7}}) {
    SCOPED_TRACE(kv_blocks);
    EngineOptions o = options("cpu", 4, kv_blocks);
    o.prefix_caching = true;
    Engine many(*src, *comm, o);
    int64_t most = 0;
    const auto got = batched(many, reqs, 2, -1, &most);
    for (size_t i = 0; i < reqs.size(); ++i) EXPECT_EQ(got[i], want[i]) << "request " << i;
    const Scheduler& s = *many.scheduler();
    EXPECT_GT(s.prefix_hit_tokens(), many.kv_block_size() * 6) << "the shared stems were not reused";
    if (kv_blocks > 0) {
      EXPECT_GT(s.n_preemptions(), 0) << "the small pool preempted nothing";
    }
    EXPECT_EQ(s.blocks().n_free(), many.kv_blocks()) << "blocks were not returned to the pool";
  }
  // One after the other: the second run of a prompt computes only what the first did not leave in full
  // blocks, and gives the same ids.
  EngineOptions o = options("cpu", 1, 0);
  o.prefix_caching = true;
  Engine e(*src, *comm, o);
  const Request& r = reqs[1];
  const auto first = e.generate(r.prompt, r.params.max_tokens, r.params.sampling, -1);
  const auto second = e.generate(r.prompt, r.params.max_tokens, r.params.sampling, -1);
  EXPECT_EQ(first.generated, second.generated);
  EXPECT_EQ(first.times.prefill_tokens, static_cast<int64_t>(r.prompt.size()));
  const int64_t n = static_cast<int64_t>(r.prompt.size()), bs = e.kv_block_size();
  EXPECT_EQ(second.cached_prompt_tokens, (n - 1) / bs * bs);
  EXPECT_EQ(second.times.prefill_tokens, n - (n - 1) / bs * bs)
      << "the second run computed more of the prompt than what follows its full blocks";
  EXPECT_GT(second.cached_prompt_tokens, 0);
}

TEST(Batching, PromptLargerThanThePoolIsRefused) {
  auto comm = make_single_rank_communicator();
  auto src = open_model_source(converted_model("stories260K"));
  Engine e(*src, *comm, options("cpu", 2, 2));
  std::vector<int32_t> prompt(40, 5);
  try {
    SequenceParams p;
    p.max_tokens = 4;
    e.add_sequence(prompt, p);
    FAIL() << "a 43-position request was accepted by a pool of 2 blocks of 16";
  } catch (const Error& err) {
    EXPECT_NE(std::string(err.what()).find("KV pool of 2 blocks"), std::string::npos) << err.what();
  }
}

// Log-probabilities are those of the raw distribution: log_softmax of the logits at the position the
// token was sampled from, computed here in double from all_logits of the same tokens, and the top
// entries are that distribution's most likely tokens, most likely first. Checked for a greedy and a
// sampled sequence running together.
TEST(Batching, LogprobsAreLogSoftmaxOfTheLogits) {
  auto comm = make_single_rank_communicator();
  auto src = open_model_source(converted_model("stories260K"));
  const int64_t nv = src->config().n_vocab;
  Engine e(*src, *comm, options("cpu", 2, 0));
  std::vector<Request> reqs = requests(2, static_cast<int32_t>(nv), 3);
  std::map<int64_t, size_t> index;
  for (size_t i = 0; i < reqs.size(); ++i) {
    reqs[i].params.logprobs = 5;
    reqs[i].params.stop_ids.clear();
    index[e.add_sequence(reqs[i].prompt, reqs[i].params)] = i;
  }
  std::vector<std::vector<SeqEvent>> got(reqs.size());
  std::vector<SeqEvent> ev;
  while (e.step(&ev)) {
    for (const SeqEvent& x : ev)
      if (x.token >= 0) got[index.at(x.id)].push_back(x);
    ev.clear();
  }
  for (size_t i = 0; i < reqs.size(); ++i) {
    ASSERT_FALSE(got[i].empty());
    std::vector<int32_t> seq = reqs[i].prompt;
    for (const SeqEvent& x : got[i]) seq.push_back(x.token);
    seq.pop_back();  // the last token is never fed back
    const std::vector<float> all = e.all_logits(seq);
    for (size_t t = 0; t < got[i].size(); ++t) {
      const float* row = all.data() + (reqs[i].prompt.size() - 1 + t) * static_cast<size_t>(nv);
      double mx = -INFINITY, sum = 0;
      for (int64_t v = 0; v < nv; ++v) mx = std::max(mx, double(row[v]));
      for (int64_t v = 0; v < nv; ++v) sum += std::exp(double(row[v]) - mx);
      const double lse = mx + std::log(sum);
      // 1e-5 + 1e-5*|ref|: the engine sums exp in double but carries the log-sum-exp as a float.
      auto close = [](double a, double b) { return std::abs(a - b) <= 1e-5 + 1e-5 * std::abs(b); };
      const SeqEvent& x = got[i][t];
      EXPECT_TRUE(close(x.logprob, double(row[x.token]) - lse)) << "seq " << i << " step " << t << ": " << x.logprob
                                                                 << " vs " << double(row[x.token]) - lse;
      const std::vector<TokenCandidate> want = top_candidates_host(row, nv, 5);
      ASSERT_EQ(x.top_logprobs.size(), want.size());
      for (size_t k = 0; k < want.size(); ++k) {
        EXPECT_EQ(x.top_logprobs[k].id, want[k].id) << "seq " << i << " step " << t << " rank " << k;
        EXPECT_TRUE(close(x.top_logprobs[k].logit, double(want[k].logit) - lse));
      }
    }
  }
}

}  // namespace
}  // namespace shardlm::test
