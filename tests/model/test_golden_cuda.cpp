// The golden cases on the GPU (skipped where no GPU is visible): identical greedy ids with an F32 KV
// cache, with part of the layers offloaded to the CPU (-ngl), and with an F16 KV cache a divergence is
// accepted only where the reference's top-two logits are closer than F16 rounding can explain.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>

#include "backends/cuda/cuda_backend.h"
#include "golden.h"
#include "runtime/engine.h"

namespace shardlm::test {
namespace {

std::unique_ptr<Engine> make_engine(const ModelSource& src, Communicator& comm, GgmlType kv, int ngl, bool graphs,
                                    bool device_greedy = false) {
  EngineOptions o;
  o.device_greedy = device_greedy;
  o.backend = "cuda";
  o.kv_type = kv;
  o.n_gpu_layers = ngl;
  o.cuda_graphs = graphs;
  o.n_threads = 2;
  return std::make_unique<Engine>(src, comm, o);
}

struct Param {
  const char* model;
  int ngl;
  bool graphs;
};
class GoldenCuda : public ::testing::TestWithParam<Param> {};

TEST_P(GoldenCuda, F32CacheGivesRunCsIdsAndLogits) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA GPU visible";
  const Param p = GetParam();
  auto src = open_model_source(converted_model(p.model));
  auto comm = make_single_rank_communicator();
  auto engine = make_engine(*src, *comm, GgmlType::F32, p.ngl, p.graphs);
  SamplerParams greedy;
  greedy.temperature = 0;
  for (const GoldenCase& g : load_golden(p.model)) {
    EXPECT_EQ(engine->generate(g.prompt_ids, static_cast<int64_t>(g.generated_ids.size()), greedy, 1).generated,
              g.generated_ids);
    std::vector<int32_t> seq = g.prompt_ids;
    seq.insert(seq.end(), g.generated_ids.begin(), g.generated_ids.end() - 1);
    const std::vector<float> all = engine->all_logits(seq);
    const int64_t nv = engine->config().n_vocab;
    for (const GoldenLogits& gl : g.logits) {
      double worst = 0;
      for (int64_t i = 0; i < nv; ++i) {
        const double ref = gl.logits[size_t(i)], got = all[size_t(gl.pos * nv + i)];
        // As on the CPU (1e-4 + 1e-4|ref|): fp32 everywhere, only the summation order differs.
        const double share = std::fabs(got - ref) / (1e-4 + 1e-4 * std::fabs(ref));
        worst = std::isnan(got) ? INFINITY : std::max(worst, share);
      }
      EXPECT_LE(worst, 1.0) << "pos " << gl.pos;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Layouts, GoldenCuda,
                         ::testing::Values(Param{"aidreams260K", -1, true}, Param{"stories260K", -1, true},
                                           Param{"stories260K", -1, false}, Param{"aidreams260K", 2, true},
                                           Param{"stories260K", 3, true}),
                         [](const ::testing::TestParamInfo<Param>& i) {
                           return std::string(i.param.model) + "_ngl" + std::to_string(i.param.ngl < 0 ? 99 : i.param.ngl) +
                                  (i.param.graphs ? "_graphs" : "_eager");
                         });

// A decode graph keeps the addresses it captured: a logits pass over many positions in between must not move
// the buffer the graph writes decode logits into (it did: the graph then wrote into a freed buffer).
TEST(GoldenCudaGraphs, LogitsOfManyPositionsDoNotBreakACapturedDecodeGraph) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA GPU visible";
  auto src = open_model_source(converted_model("stories260K"));
  auto comm = make_single_rank_communicator();
  auto engine = make_engine(*src, *comm, GgmlType::F32, -1, true);
  SamplerParams greedy;
  greedy.temperature = 0;
  const auto cases = load_golden("stories260K");
  const GoldenCase& g = cases.front();
  const auto n = static_cast<int64_t>(g.generated_ids.size());
  EXPECT_EQ(engine->generate(g.prompt_ids, n, greedy, 1).generated, g.generated_ids);  // captures the graph
  std::vector<int32_t> longest;
  for (const GoldenCase& c : cases) {
    std::vector<int32_t> seq = c.prompt_ids;
    seq.insert(seq.end(), c.generated_ids.begin(), c.generated_ids.end() - 1);
    if (seq.size() > longest.size()) longest = seq;
  }
  engine->all_logits(longest);  // logits of every position: the largest logits buffer of the run
  EXPECT_EQ(engine->generate(g.prompt_ids, n, greedy, 1).generated, g.generated_ids);  // replays the graph
}

// Greedy decoding with the token on the device (the host enqueues each step before reading the one before):
// run.c's ids for every case, with graphs and without, the end-of-text id 1 stopping a generation while a
// step is already enqueued ahead, generations of one and two tokens, and a normal generation in between.
TEST(GoldenCudaDeviceGreedy, GivesRunCsIds) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA GPU visible";
  if (std::getenv("SHARDLM_DEVICE_GREEDY")) GTEST_SKIP() << "SHARDLM_DEVICE_GREEDY is set: it overrides the option";
  for (const char* model : {"stories260K", "aidreams260K"})
    for (bool graphs : {true, false}) {
      SCOPED_TRACE(std::string(model) + (graphs ? " graphs" : " eager"));
      auto src = open_model_source(converted_model(model));
      auto comm = make_single_rank_communicator();
      auto engine = make_engine(*src, *comm, GgmlType::F32, -1, graphs, true);
      SamplerParams greedy;
      greedy.temperature = 0;
      for (const GoldenCase& g : load_golden(model)) {
        const auto n = static_cast<int64_t>(g.generated_ids.size());
        const GenerateResult r = engine->generate(g.prompt_ids, n, greedy, -1);
        EXPECT_TRUE(r.tokens_on_device);
        EXPECT_EQ(r.generated, g.generated_ids);
        // Stopping at an id the golden run produces partway: the ids up to it, and nothing after.
        const int32_t stop = g.generated_ids[g.generated_ids.size() / 2];
        const auto at = std::find(g.generated_ids.begin(), g.generated_ids.end(), stop);
        EXPECT_EQ(engine->generate(g.prompt_ids, n, greedy, stop).generated,
                  std::vector<int32_t>(g.generated_ids.begin(), at + 1));
        EXPECT_EQ(engine->generate(g.prompt_ids, 1, greedy, -1).generated,
                  std::vector<int32_t>(g.generated_ids.begin(), g.generated_ids.begin() + 1));
        EXPECT_EQ(engine->generate(g.prompt_ids, 2, greedy, -1).generated,
                  std::vector<int32_t>(g.generated_ids.begin(), g.generated_ids.begin() + 2));
        // A sampled generation takes the host path; greedy afterwards is on the device again.
        SamplerParams sampled;
        sampled.temperature = 0.8f;
        EXPECT_FALSE(engine->generate(g.prompt_ids, 4, sampled, -1).tokens_on_device);
        EXPECT_EQ(engine->generate(g.prompt_ids, n, greedy, -1).generated, g.generated_ids);
      }
    }
}

TEST(GoldenCudaF16, DivergesOnlyWhereTopTwoAreClose) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA GPU visible";
  for (const char* model : {"aidreams260K", "stories260K"}) {
    auto src = open_model_source(converted_model(model));
    auto comm = make_single_rank_communicator();
    auto gpu = make_engine(*src, *comm, GgmlType::F16, -1, true);
    EngineOptions o;
    o.n_threads = 2;
    Engine cpu(*src, *comm, o);  // fp32 reference logits along the golden sequence
    SamplerParams greedy;
    greedy.temperature = 0;
    for (const GoldenCase& g : load_golden(model)) {
      const auto got = gpu->generate(g.prompt_ids, static_cast<int64_t>(g.generated_ids.size()), greedy, 1).generated;
      size_t i = 0;
      while (i < got.size() && i < g.generated_ids.size() && got[i] == g.generated_ids[i]) ++i;
      if (i == g.generated_ids.size()) continue;
      // First divergence at generated index i: the logits that chose it were computed at position
      // len(prompt) - 1 + i. F16 keeps 11 significant bits: K and V of magnitude ~4 move by ~2e-3, and a
      // logit by at most a few times that; a top-two gap below 0.05 is within what that can flip.
      std::vector<int32_t> seq = g.prompt_ids;
      seq.insert(seq.end(), g.generated_ids.begin(), g.generated_ids.end() - 1);
      const auto all = cpu.all_logits(seq);
      const int64_t nv = cpu.config().n_vocab, pos = static_cast<int64_t>(g.prompt_ids.size()) - 1 + int64_t(i);
      std::vector<float> row(all.begin() + pos * nv, all.begin() + (pos + 1) * nv);
      std::partial_sort(row.begin(), row.begin() + 2, row.end(), std::greater<float>());
      EXPECT_LT(row[0] - row[1], 0.05f) << model << ": F16 cache diverged at generated token " << i
                                        << " where the reference's top-two gap is " << row[0] - row[1];
    }
  }
}

}  // namespace
}  // namespace shardlm::test
