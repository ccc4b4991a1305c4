// The NCCL communicator on real GPUs, with processes started by mpirun (one GPU per rank); skipped where
// fewer GPUs are visible than a case needs (CI has none).
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "../model/golden.h"
#include "backends/cuda/cuda_backend.h"
#include "comm/nccl/one_shot_all_reduce.h"
#include "core/error.h"
#include "loader/gguf_export.h"
#include "loader/model_source.h"

namespace shardlm::test {
namespace {

std::string bin(const char* name) { return std::string(SHARDLM_BINARY_DIR) + "/tests/nccl/" + name; }
// `all_reduce` sets SHARDLM_ALLREDUCE for every rank (auto, nccl or oneshot; empty leaves it as it is),
// `fuse` SHARDLM_ALLREDUCE_FUSE (norm, pdl, off; empty: the default).
std::string mpirun(int np, const std::string& all_reduce = "", const std::string& fuse = "") {
  // NVLink multicast stays off on shared machines (a program that uses it can take the host's GPUs down).
  setenv("NCCL_NVLS_ENABLE", "0", 1);
  return "mpirun --allow-run-as-root --oversubscribe --bind-to none -x NCCL_NVLS_ENABLE " +
         (all_reduce.empty() ? std::string() : "-x SHARDLM_ALLREDUCE=" + all_reduce + " ") +
         (fuse.empty() ? std::string() : "-x SHARDLM_ALLREDUCE_FUSE=" + fuse + " ") + "-np " + std::to_string(np) + " ";
}

std::string read_file(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

#define NEED_GPUS(n)                                                                              \
  if (cuda_device_count() < (n)) GTEST_SKIP() << "needs " << (n) << " GPUs, " << cuda_device_count() << " visible"

// Default path: the one-shot kernel for small device all-reduces where the GPUs have peer access.
TEST(Nccl, CollectivesMatchHostSums) {
  NEED_GPUS(2);
  const std::string cmd = mpirun(2, "auto") + bin("nccl_collectives");
  EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd;
}

TEST(Nccl, CollectivesMatchHostSumsWithNcclOnly) {
  NEED_GPUS(2);
  const std::string cmd = mpirun(2, "nccl") + bin("nccl_collectives");
  EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd;
}

// oneshot fails instead of falling back, so this proves the one-shot kernel ran (it needs peer access
// between the two GPUs: NVLink or a PCIe switch that allows it).
TEST(Nccl, OneShotAllReduceMatchesHostSums) {
  NEED_GPUS(2);
  const std::string cmd = mpirun(2, "oneshot") + bin("nccl_collectives");
  EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd;
}

// The one-shot kernel launched the other two ways (the fused norm then falls back to the backend's calls).
TEST(Nccl, OneShotAllReduceWithoutTheFusedNorm) {
  NEED_GPUS(2);
  for (const char* fuse : {"pdl", "off"}) {
    const std::string cmd = mpirun(2, "oneshot", fuse) + bin("nccl_collectives");
    EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd;
  }
}

TEST(Nccl, OneShotAllReduceOnFourGpus) {
  NEED_GPUS(4);
  const std::string cmd = mpirun(4, "oneshot") + bin("nccl_collectives");
  EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd;
}

// The fused kernel with its trace stamps on (SHARDLM_ALLREDUCE_TRACE): the same checks (fp64, the host's
// re-quantization, bits equal across ranks), and every rank prints its trace line at the end.
TEST(Nccl, OneShotFusedNormWithTheTraceOn) {
  NEED_GPUS(2);
  const std::string log = std::string(SHARDLM_BINARY_DIR) + "/oneshot-trace.log";
  const std::string cmd = "SHARDLM_ALLREDUCE_TRACE=1 " + mpirun(2, "oneshot") + "-x SHARDLM_ALLREDUCE_TRACE " +
                          bin("nccl_collectives") + " >" + log + " 2>&1";
  EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd << "\n" << read_file(log);
  const std::string out = read_file(log);
  size_t lines = 0;
  for (size_t at = out.find("all-reduce + norm trace"); at != std::string::npos; at = out.find("all-reduce + norm trace", at + 1))
    ++lines;
  EXPECT_EQ(lines, 2u) << out;
}

// The kernel's earlier receive (one source after the other) and share exchange (release / acquire), kept as
// measurement switches: the same checks must hold with them, on four GPUs where there are (three peers).
TEST(Nccl, OneShotWithSerialPollsAndFencedShares) {
  NEED_GPUS(2);
  const int n = cuda_device_count() >= 4 ? 4 : 2;
  const std::string cmd = "SHARDLM_ALLREDUCE_POLL_TOGETHER=0 SHARDLM_ALLREDUCE_RELAXED_SHARES=0 " +
                          mpirun(n, "oneshot") + "-x SHARDLM_ALLREDUCE_POLL_TOGETHER -x SHARDLM_ALLREDUCE_RELAXED_SHARES " +
                          bin("nccl_collectives");
  EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd;
}

TEST(Nccl, WatchdogAbortsAStalledCollective) {
  NEED_GPUS(2);
  const std::string log = std::string(SHARDLM_BINARY_DIR) + "/nccl-stall.log";
  const std::string cmd = mpirun(2, "nccl") + bin("nccl_collectives") + " --stall >" + log + " 2>&1";
  EXPECT_NE(std::system(cmd.c_str()), 0);
  const std::string out = read_file(log);
  EXPECT_NE(out.find("has not completed"), std::string::npos) << out;
}

// The one-shot kernel stops waiting for the silent peer after the timeout (3 s here) and the watchdog
// names it, instead of the GPU spinning forever.
TEST(Nccl, OneShotGivesUpOnAStalledPeer) {
  NEED_GPUS(2);
  const std::string log = std::string(SHARDLM_BINARY_DIR) + "/oneshot-stall.log";
  const std::string cmd = mpirun(2, "oneshot") + bin("nccl_collectives") + " --stall >" + log + " 2>&1";
  EXPECT_NE(std::system(cmd.c_str()), 0);
  const std::string out = read_file(log);
  EXPECT_NE(out.find("rank 1 did not arrive within 3 s"), std::string::npos) << out;
}

// No GPU needed: the variables are read when the NCCL communicator is made, and a bad value must name
// the variable, the value and what is allowed.
TEST(Nccl, AllReduceSettingsAreValidated) {
  using one_shot::Mode;
  EXPECT_EQ(one_shot::parse_settings(nullptr, nullptr).mode, Mode::kAuto);
  EXPECT_EQ(one_shot::parse_settings("", "").max_bytes, one_shot::kDefaultMaxBytes);
  EXPECT_EQ(one_shot::parse_settings("nccl", nullptr).mode, Mode::kNccl);
  EXPECT_EQ(one_shot::parse_settings("oneshot", "256").mode, Mode::kOneShot);
  EXPECT_EQ(one_shot::parse_settings("auto", "16").max_bytes, size_t{16} << 10);
  EXPECT_EQ(one_shot::parse_settings(nullptr, nullptr, nullptr).fuse, one_shot::Fuse::kNorm);
  EXPECT_EQ(one_shot::parse_settings(nullptr, nullptr, "pdl").fuse, one_shot::Fuse::kPdl);
  EXPECT_EQ(one_shot::parse_settings(nullptr, nullptr, "off").fuse, one_shot::Fuse::kOff);
  EXPECT_FALSE(one_shot::parse_settings(nullptr, nullptr, nullptr, nullptr).trace);
  EXPECT_TRUE(one_shot::parse_settings(nullptr, nullptr, nullptr, "1").trace);
  EXPECT_FALSE(one_shot::parse_settings(nullptr, nullptr, nullptr, "").trace);
  EXPECT_TRUE(one_shot::parse_settings(nullptr, nullptr).poll_together);
  EXPECT_FALSE(one_shot::parse_settings(nullptr, nullptr, nullptr, nullptr, nullptr, "0").poll_together);
  EXPECT_TRUE(one_shot::parse_settings(nullptr, nullptr).relaxed_shares);
  EXPECT_FALSE(one_shot::parse_settings(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, "0").relaxed_shares);
  try {
    one_shot::parse_settings(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, "on");
    ADD_FAILURE() << "SHARDLM_ALLREDUCE_RELAXED_SHARES='on' was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("SHARDLM_ALLREDUCE_RELAXED_SHARES='on' is not 0 or 1"), std::string::npos)
        << e.what();
  }
  for (const char* v : {"yes", "2", " 1"}) {
    try {
      one_shot::parse_settings(nullptr, nullptr, nullptr, v);
      ADD_FAILURE() << "SHARDLM_ALLREDUCE_TRACE='" << v << "' was accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(std::string("SHARDLM_ALLREDUCE_TRACE='") + v + "' is not 0 or 1"),
                std::string::npos)
          << e.what();
    }
  }
  auto message = [](const char* mode, const char* kb, const char* fuse = nullptr) -> std::string {
    try {
      one_shot::parse_settings(mode, kb, fuse);
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::kInvalidInput);
      return e.what();
    }
    return "no error";
  };
  const std::string bad = message("one-shot", nullptr);
  EXPECT_NE(bad.find("SHARDLM_ALLREDUCE='one-shot'"), std::string::npos) << bad;
  EXPECT_NE(bad.find("auto, nccl, oneshot"), std::string::npos) << bad;
  const std::string bad_fuse = message(nullptr, nullptr, "yes");
  EXPECT_NE(bad_fuse.find("SHARDLM_ALLREDUCE_FUSE='yes'"), std::string::npos) << bad_fuse;
  EXPECT_NE(bad_fuse.find("norm, pdl, off"), std::string::npos) << bad_fuse;
  for (const char* kb : {"0", "257", "64k", "-1", " 64", "1e3"}) {
    const std::string m = message(nullptr, kb);
    EXPECT_NE(m.find(std::string("SHARDLM_ALLREDUCE_ONESHOT_MAX_KB='") + kb + "'"), std::string::npos) << m;
    EXPECT_NE(m.find("[1, 256]"), std::string::npos) << m;
  }
}

// `env`: VAR=VALUE words set for every rank; `path`: the GGUF (default: the converted golden model).
nlohmann::json run_layout(const std::string& model, int tp, int pp, const std::string& env = "",
                          const std::string& path = "") {
  // The process id keeps apart the files of test processes that ctest runs at once.
  const std::string out = std::string(SHARDLM_BINARY_DIR) + "/nccl-" + model + "-tp" + std::to_string(tp) + "-pp" +
                          std::to_string(pp) + "-" + std::to_string(getpid()) + ".json";
  std::remove(out.c_str());
  std::string exports;
  for (size_t b = 0; b < env.size();) {
    const size_t e = std::min(env.find(' ', b), env.size());
    const std::string word = env.substr(b, e - b);
    if (!word.empty()) exports += "-x " + word + " ";
    b = e + 1;
  }
  const std::string cmd = (tp * pp > 1 ? mpirun(tp * pp) + exports : env + " ") + bin("nccl_golden_worker") + " " +
                          (path.empty() ? converted_model(model) : path) + " " + model + " " + std::to_string(tp) +
                          " " + std::to_string(pp) + " " + out;
  EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd;
  std::ifstream f(out);
  if (!f) return {};
  const nlohmann::json result = nlohmann::json::parse(f);
  std::remove(out.c_str());
  return result;
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

// The o and down matvecs of packed weights push their outputs into the fused all-reduce's receive areas
// themselves (SHARDLM_ALLREDUCE_PUSH, default on), so that the all-reduce kernel only receives. Against the
// same layout where the all-reduce kernel sends (PUSH=0): the same greedy and sampled ids, as the two do
// the same arithmetic; a word at a wrong place or with a wrong tag gives other sums, or no sum within the
// 30 s timeout. Against one GPU only the greedy ids: the fused norm sums its squares in another order, and
// the int8 rows of the packed matvecs turn that last-bit difference into ~1e-3 of a logit now and then,
// enough to move a --temp 0.8 draw on this random-weight model's flat distribution (seen on 4 x H100,
// 2026-11-26: the sampled ids left one GPU's after 3 and 6 tokens, with and without the push alike).
// tiny-llama31 (Hugging Face fixture) in Q8_0, whose widths are multiples of 32: its o and down projections
// are packed; stories260K's golden prompts (ids < 512 of its 1024) drive it.
TEST(Nccl, MatvecsThatPushTheirSharesGiveTheSameIds) {
  NEED_GPUS(2);
  const std::string q8 = std::string(SHARDLM_BINARY_DIR) + "/test-tiny-llama31-q8_0-" + std::to_string(getpid()) + ".gguf";
  {
    auto src = open_model_source(fixture_path("hf/tiny-llama31"));
    export_gguf(*src, q8, "q8_0");
  }
  const nlohmann::json one = run_layout("stories260K", 1, 1, "", q8);
  const nlohmann::json push = run_layout("stories260K", 2, 1, "SHARDLM_ALLREDUCE_PUSH=1", q8);
  const nlohmann::json send = run_layout("stories260K", 2, 1, "SHARDLM_ALLREDUCE_PUSH=0", q8);
  ASSERT_TRUE(one.contains("cases") && push.contains("cases") && send.contains("cases"));
  const std::string kind_push = push["all_reduce"], kind_send = send["all_reduce"];
  EXPECT_NE(kind_push.find("with their matvec pushing"), std::string::npos) << kind_push;
  EXPECT_EQ(kind_send.find("pushing"), std::string::npos) << kind_send;
  ASSERT_EQ(push["cases"].size(), one["cases"].size());
  for (size_t c = 0; c < one["cases"].size(); ++c) {
    SCOPED_TRACE("case " + std::to_string(c));
    EXPECT_EQ(push["cases"][c]["greedy"], send["cases"][c]["greedy"]);
    EXPECT_EQ(push["cases"][c]["sampled"], send["cases"][c]["sampled"]);
    EXPECT_EQ(push["cases"][c]["greedy"], one["cases"][c]["greedy"]);
  }
  std::remove(q8.c_str());
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
