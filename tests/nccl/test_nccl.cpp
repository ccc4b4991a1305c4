// The NCCL communicator on real GPUs, with processes started by mpirun (one GPU per rank); skipped where
// fewer GPUs are visible than a case needs (CI has none).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "../model/golden.h"
#include "backends/cuda/cuda_backend.h"

namespace shardlm::test {
namespace {

std::string bin(const char* name) { return std::string(SHARDLM_BINARY_DIR) + "/tests/nccl/" + name; }
std::string mpirun(int np) {
  // NVLink multicast stays off on shared machines (a program that uses it can take the host's GPUs down).
  setenv("NCCL_NVLS_ENABLE", "0", 1);
  return "mpirun --allow-run-as-root --oversubscribe --bind-to none -x NCCL_NVLS_ENABLE -np " + std::to_string(np) +
         " ";
}

#define NEED_GPUS(n)                                                                              \
  if (cuda_device_count() < (n)) GTEST_SKIP() << "needs " << (n) << " GPUs, " << cuda_device_count() << " visible"

TEST(Nccl, CollectivesMatchHostSums) {
  NEED_GPUS(2);
  const std::string cmd = mpirun(2) + bin("nccl_collectives");
  EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd;
}

TEST(Nccl, WatchdogAbortsAStalledCollective) {
  NEED_GPUS(2);
  const std::string log = std::string(SHARDLM_BINARY_DIR) + "/nccl-stall.log";
  const std::string cmd = mpirun(2) + bin("nccl_collectives") + " --stall >" + log + " 2>&1";
  EXPECT_NE(std::system(cmd.c_str()), 0);
  std::ifstream f(log);
  std::stringstream ss;
  ss << f.rdbuf();
  EXPECT_NE(ss.str().find("has not completed"), std::string::npos) << ss.str();
}

nlohmann::json run_layout(const std::string& model, int tp, int pp) {
  const std::string out = std::string(SHARDLM_BINARY_DIR) + "/nccl-" + model + "-tp" + std::to_string(tp) + "-pp" +
                          std::to_string(pp) + ".json";
  std::remove(out.c_str());
  const std::string cmd = (tp * pp > 1 ? mpirun(tp * pp) : std::string()) + bin("nccl_golden_worker") + " " +
                          converted_model(model) + " " + model + " " + std::to_string(tp) + " " + std::to_string(pp) +
                          " " + out;
  EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd;
  std::ifstream f(out);
  if (!f) return {};
  return nlohmann::json::parse(f);
}

struct Layout {
  const char* model;
  int tp, pp;
};

class NcclGolden : public ::testing::TestWithParam<Layout> {};

TEST_P(NcclGolden, SameIdsAsOneGpu) {
  const Layout l = GetParam();
  NEED_GPUS(l.tp * l.pp);
  static std::map<std::string, nlohmann::json> single;
  if (!single.count(l.model)) single[l.model] = run_layout(l.model, 1, 1);
  const nlohmann::json& ref = single[l.model];
  ASSERT_TRUE(ref.contains("cases")) << "one-GPU worker wrote no result";
  const nlohmann::json got = run_layout(l.model, l.tp, l.pp);
  ASSERT_TRUE(got.contains("cases")) << "worker wrote no result";
  EXPECT_EQ(got["comm"], "nccl");
  const auto golden = load_golden(l.model);
  ASSERT_EQ(got["cases"].size(), golden.size());
  double worst = 0;
  for (size_t c = 0; c < golden.size(); ++c) {
    SCOPED_TRACE("case " + std::to_string(c));
    const auto& g = got["cases"][c];
    EXPECT_EQ(g["greedy"].get<std::vector<int32_t>>(), golden[c].generated_ids) << "greedy ids differ from run.c";
    EXPECT_EQ(g["greedy"], ref["cases"][c]["greedy"]) << "greedy ids differ from one GPU";
    EXPECT_EQ(g["sampled"], ref["cases"][c]["sampled"]) << "--temp 0.8 --seed 7 ids differ from one GPU";
    for (size_t k = 0; k < g["logits"].size(); ++k) {
      const auto a = g["logits"][k].get<std::vector<float>>();
      const auto b = ref["cases"][c]["logits"][k].get<std::vector<float>>();
      ASSERT_EQ(a.size(), b.size());
      // Only the summation order of the partial dot products differs from one GPU.
      for (size_t i = 0; i < a.size(); ++i)
        worst = std::max(worst, std::fabs(double(a[i]) - b[i]) / (1e-4 + 1e-4 * std::fabs(double(b[i]))));
    }
  }
  std::printf("%s tp %d pp %d: worst logit difference from one GPU %.3f x (1e-4 + 1e-4|x|)\n", l.model, l.tp, l.pp,
              worst);
  EXPECT_LE(worst, 1.0);
}

INSTANTIATE_TEST_SUITE_P(Layouts, NcclGolden,
                         ::testing::Values(Layout{"stories260K", 2, 1}, Layout{"stories260K", 1, 2},
                                           Layout{"stories260K", 2, 2}, Layout{"aidreams260K", 2, 1},
                                           Layout{"aidreams260K", 1, 2}, Layout{"aidreams260K", 2, 2}),
                         [](const auto& p) {
                           return std::string(p.param.model) + "_tp" + std::to_string(p.param.tp) + "_pp" +
                                  std::to_string(p.param.pp);
                         });

}  // namespace
}  // namespace shardlm::test
