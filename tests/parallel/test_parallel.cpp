// Every parallel layout against run.c's outputs and against the single-rank run, with real processes
// started by mpirun (oversubscribed: CI has 2 cores).
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <fstream>
#include <thread>

#include "../model/golden.h"

namespace shardlm::test {
namespace {

std::string worker() { return std::string(SHARDLM_BINARY_DIR) + "/tests/parallel/parallel_worker"; }
std::string mpirun_prefix(int np) {
  return "mpirun --allow-run-as-root --oversubscribe --bind-to none --mca mpi_yield_when_idle 1 -np " +
         std::to_string(np) + " ";
}

nlohmann::json run_layout(const std::string& model, int tp, int pp, const std::string& split) {
  // The process id keeps apart the files of test processes that ctest runs at once (each case is its own
  // process, and every one of them makes its model's single-rank reference: same name otherwise).
  const std::string out = std::string(SHARDLM_BINARY_DIR) + "/parallel-" + model + "-tp" + std::to_string(tp) + "-pp" +
                          std::to_string(pp) + (split == "-" ? "" : "-split") + "-" + std::to_string(getpid()) + ".json";
  std::remove(out.c_str());
  const std::string cmd = (tp * pp > 1 ? mpirun_prefix(tp * pp) : std::string()) + worker() + " " +
                          converted_model(model) + " " + model + " " + std::to_string(tp) + " " + std::to_string(pp) +
                          " " + split + " " + out;
  const int rc = std::system(cmd.c_str());
  EXPECT_EQ(rc, 0) << cmd;
  std::ifstream f(out);
  if (!f) return {};
  const nlohmann::json result = nlohmann::json::parse(f);
  std::remove(out.c_str());
  return result;
}

struct Layout {
  const char* model;
  int tp, pp;
  const char* split;
};

class Parallel : public ::testing::TestWithParam<Layout> {};

TEST_P(Parallel, SameTokensAndLogitsAsOneRank) {
  const Layout l = GetParam();
  static std::map<std::string, nlohmann::json> single;  // one single-rank run per model, shared by layouts
  if (!single.count(l.model)) single[l.model] = run_layout(l.model, 1, 1, "-");
  const nlohmann::json& ref = single[l.model];
  const nlohmann::json got = run_layout(l.model, l.tp, l.pp, l.split);
  ASSERT_TRUE(got.contains("cases")) << "worker wrote no result";
  std::printf("layout tp %d pp %d split %s:\n%s", l.tp, l.pp, l.split, got["layout"].get<std::string>().c_str());
  const auto golden = load_golden(l.model);
  ASSERT_EQ(got["cases"].size(), golden.size());
  for (size_t c = 0; c < golden.size(); ++c) {
    SCOPED_TRACE("case " + std::to_string(c));
    const auto& g = got["cases"][c];
    EXPECT_EQ(g["greedy"].get<std::vector<int32_t>>(), golden[c].generated_ids) << "greedy ids differ from run.c";
    EXPECT_EQ(g["sampled"], ref["cases"][c]["sampled"]) << "--temp 0.8 --seed 7 ids differ from one rank";
    // Batch invariance under this layout: every case run as one of many sequences gives its ids alone.
    ASSERT_TRUE(g.contains("batched_greedy") && g.contains("batched_sampled")) << "the worker ran no batched run";
    EXPECT_EQ(g["batched_greedy"], g["greedy"]) << "greedy ids differ between batched and alone";
    EXPECT_EQ(g["batched_sampled"], g["sampled"]) << "sampled ids differ between batched and alone";
    // Log-probabilities (token, then the top 3's ids and values) against the one-rank run: ids exact, values
    // within 1e-4 + 1e-4*|ref| (the tensor-parallel log-sum-exp combines slices in another order and travels
    // as a float).
    const auto lp = g["batched_greedy_logprobs"].get<std::vector<float>>();
    const auto lp1 = ref["cases"][c]["batched_greedy_logprobs"].get<std::vector<float>>();
    ASSERT_EQ(lp.size(), lp1.size());
    ASSERT_FALSE(lp.empty());
    for (size_t i = 0; i < lp.size(); ++i)
      EXPECT_LE(std::abs(lp[i] - lp1[i]), 1e-4 + 1e-4 * std::abs(lp1[i])) << "logprob word " << i << ": " << lp[i]
                                                                           << " vs one rank " << lp1[i];
    ASSERT_EQ(g["logits"].size(), golden[c].logits.size());
    for (size_t k = 0; k < golden[c].logits.size(); ++k) {
      const auto got_l = g["logits"][k].get<std::vector<float>>();
      const auto one_l = ref["cases"][c]["logits"][k].get<std::vector<float>>();
      const auto& gold_l = golden[c].logits[k].logits;
      ASSERT_EQ(got_l.size(), gold_l.size());
      // Against one rank: the same float32 math, only the all-reduce sums partial dot products in
      // another order; 64-element dots of O(1) terms differ by a few ulps: 2e-5 + 2e-5|ref|.
      // Against run.c: the tolerance of the single-rank golden test.
      double worst_one = 0, worst_gold = 0;
      size_t wi = 0;
      for (size_t i = 0; i < got_l.size(); ++i) {
        const double s1 = std::fabs(got_l[i] - one_l[i]) / (2e-5 + 2e-5 * std::fabs(one_l[i]));
        const double s2 = std::fabs(got_l[i] - gold_l[i]) / (1e-4 + 1e-4 * std::fabs(gold_l[i]));
        if (s1 > worst_one || std::isnan(got_l[i])) worst_one = std::isnan(got_l[i]) ? INFINITY : s1, wi = i;
        worst_gold = std::max(worst_gold, s2);
      }
      EXPECT_LE(worst_one, 1.0) << "pos " << golden[c].logits[k].pos << " logit " << wi << ": " << got_l[wi]
                                << " vs one rank " << one_l[wi] << " (" << worst_one << "x tolerance)";
      EXPECT_LE(worst_gold, 1.0) << "pos " << golden[c].logits[k].pos << " vs run.c: " << worst_gold << "x tolerance";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Layouts, Parallel,
    ::testing::Values(Layout{"aidreams260K", 2, 1, "-"}, Layout{"aidreams260K", 4, 1, "-"},
                      Layout{"aidreams260K", 1, 2, "-"}, Layout{"aidreams260K", 1, 4, "-"},
                      Layout{"aidreams260K", 2, 2, "-"}, Layout{"aidreams260K", 1, 2, "3,1"},
                      Layout{"stories260K", 2, 1, "-"}, Layout{"stories260K", 4, 1, "-"},
                      Layout{"stories260K", 8, 1, "-"}, Layout{"stories260K", 1, 2, "-"},
                      Layout{"stories260K", 1, 4, "-"}, Layout{"stories260K", 2, 2, "-"},
                      Layout{"stories260K", 1, 2, "3,1"}),
    [](const ::testing::TestParamInfo<Layout>& i) {
      return std::string(i.param.model) + "_tp" + std::to_string(i.param.tp) + "_pp" + std::to_string(i.param.pp) +
             (std::string(i.param.split) == "-" ? "" : "_split31");
    });

}  // namespace
}  // namespace shardlm::test
