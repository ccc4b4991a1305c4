// `shardlm bench` on the bundled model: the JSON keys scripts parse (unchanged), the per-rank memory
// gathered to rank 0, the planner's prediction for the layout that ran, and the device all-reduce kind;
// the same figures in the text report. With MPI also tp 2 and pp 2 (ranks started by the self-launch).
#include <gtest/gtest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>

#include <nlohmann/json.hpp>

namespace {

using nlohmann::json;

struct Result {
  int rc;
  std::string out, err;
};

std::string slurp(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

Result bench(const std::string& args) {
  static int n = 0;
  const std::string base = std::string(SHARDLM_BINARY_DIR) + "/benchcli-" + std::to_string(::getpid()) + "-" +
                           std::to_string(n++);
  const std::string cmd = std::string(SHARDLM_BINARY_DIR) + "/apps/shardlm/shardlm bench -p 16 -n 8 -r 1 -q " + args +
                          " > " + base + ".out 2> " + base + ".err";
  const int st = std::system(cmd.c_str());
  Result r{WIFEXITED(st) ? WEXITSTATUS(st) : 128, slurp(base + ".out"), slurp(base + ".err")};
  std::remove((base + ".out").c_str());
  std::remove((base + ".err").c_str());
  return r;
}

json bench_json(const std::string& args) {
  const Result r = bench("--json " + args);
  EXPECT_EQ(r.rc, 0) << r.err;
  try {
    return json::parse(r.out);
  } catch (const std::exception&) {
    ADD_FAILURE() << "not JSON: " << r.out << "\nstderr: " << r.err;
    return json::object();
  }
}

// Every rank's figures are present, in rank order, consistent with the layout, and beside the planner's.
void check_ranks(const json& j, int tp, int pp) {
  ASSERT_TRUE(j.contains("ranks")) << j.dump();
  const json& ranks = j["ranks"];
  ASSERT_EQ(ranks.size(), size_t(tp * pp));
  uint64_t weights = 0;
  int next_layer = 0;
  for (int r = 0; r < tp * pp; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    const json& x = ranks[size_t(r)];
    EXPECT_EQ(x["rank"], r);
    EXPECT_EQ(x["tp_rank"], r % tp);
    EXPECT_EQ(x["pp_rank"], r / tp);
    const int b = x["layers"][0], e = x["layers"][1];
    if (r % tp == 0) {
      EXPECT_EQ(b, next_layer);
      next_layer = e;
    }
    EXPECT_LT(b, e);
    weights += x["weight_bytes"].get<uint64_t>();
    EXPECT_GT(x["backend_allocated_bytes"].get<uint64_t>(), 0u);
    EXPECT_EQ(x["offload_allocated_bytes"], 0);
    EXPECT_EQ(x["cuda_device"], -1);
    EXPECT_TRUE(x["device_used_bytes"].is_null());  // CPU ranks have no device memory
    EXPECT_GE(x["comm_share"].get<double>(), 0.0);
    EXPECT_LE(x["comm_share"].get<double>(), 1.0);
    // The planner counts what the loader holds (tests/plan checks that exactly); on CPU ranks bench
    // compares it with the mapped weights plus the backend's allocations.
    ASSERT_TRUE(x.contains("planned_bytes")) << x.dump();
    EXPECT_GT(x["planned_bytes"].get<uint64_t>(), 0u);
    EXPECT_EQ(x["planned_bytes"].get<uint64_t>(), x["planned_weight_bytes"].get<uint64_t>() +
                                                      x["planned_kv_bytes"].get<uint64_t>() +
                                                      x["planned_workspace_bytes"].get<uint64_t>());
    EXPECT_EQ(x["resident_bytes"].get<uint64_t>(),
              x["mapped_weight_bytes"].get<uint64_t>() + x["backend_allocated_bytes"].get<uint64_t>());
    EXPECT_LE(x["mapped_weight_bytes"].get<uint64_t>(), x["weight_bytes"].get<uint64_t>());
    const double ratio = x["allocated_over_planned"];
    EXPECT_GT(ratio, 0.5);
    EXPECT_LT(ratio, 2.0);
  }
  EXPECT_EQ(weights, j["weight_bytes"].get<uint64_t>()) << "the ranks' weights add up to the total";
}

void check_planner(const json& j) {
  ASSERT_TRUE(j.contains("planner")) << j.dump();
  const json& p = j["planner"];
  EXPECT_NE(p["basis"].get<std::string>().find("host copy bandwidth"), std::string::npos) << p.dump();
  // CPU ranks: the kernels of the model's weight types timed here, on every rank's threads, set the prediction.
  ASSERT_TRUE(p.contains("cpu_kernels")) << p.dump();
  EXPECT_NE(p["basis"].get<std::string>().find("kernels timed here"), std::string::npos) << p.dump();
  for (const json& k : p["cpu_kernels"]) {
    EXPECT_GT(k["decode_bytes_per_s"].get<double>(), 0.0);
    EXPECT_GT(k["prefill_flops"].get<double>(), 0.0);
    EXPECT_GE(k["threads"].get<int>(), 1);
  }
  EXPECT_TRUE(p["fits"].get<bool>());
  EXPECT_GT(p["decode_tokens_per_s"].get<double>(), 0.0);
  EXPECT_GT(p["prefill_tokens_per_s"].get<double>(), 0.0);
  EXPECT_NEAR(p["tg_measured_over_predicted"].get<double>(),
              j["tg"]["tokens_per_s"].get<double>() / p["decode_tokens_per_s"].get<double>(), 1e-9);
  EXPECT_NEAR(p["pp_measured_over_predicted"].get<double>(),
              j["pp"]["tokens_per_s"].get<double>() / p["prefill_tokens_per_s"].get<double>(), 1e-9);
}

TEST(BenchCli, JsonKeepsItsKeysAndAddsRanksPlannerAndAllReduce) {
  const json j = bench_json("");
  for (const char* k : {"model", "backend", "weight_bytes", "bandwidth_bytes_per_s", "bandwidth_source",
                        "roofline_tokens_per_s", "pp", "tg", "layout"})
    EXPECT_TRUE(j.contains(k)) << k;
  // The roofline counts what a decode step reads: the embedding table only as a tied output (the bundled
  // model's), so here all of the weights.
  EXPECT_EQ(j["step_weight_bytes"].get<uint64_t>(), j["weight_bytes"].get<uint64_t>());
  EXPECT_NEAR(j["roofline_tokens_per_s"].get<double>(),
              j["bandwidth_bytes_per_s"].get<double>() / j["step_weight_bytes"].get<double>(),
              1e-9 * j["roofline_tokens_per_s"].get<double>());
  for (const char* k : {"n_gen", "tokens_per_s", "runs", "roofline_share", "comm_share", "fixed_cost_us_per_token"})
    EXPECT_TRUE(j["tg"].contains(k)) << k;
  EXPECT_TRUE(j["pp"].contains("tokens_per_s"));
  EXPECT_EQ(j["layout"]["tp"], 1);
  EXPECT_EQ(j["device_all_reduce"], "");  // one rank: no device collectives
  check_ranks(j, 1, 1);
  check_planner(j);
}

TEST(BenchCli, TextReportsPerRankMemoryAndThePlanner) {
  const Result r = bench("");
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_NE(r.out.find("| tg8 "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("per-rank memory"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\n| 0 | 0 | 0 | 0.."), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("planner (CPU ranks of this host"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("tokens/s predicted"), std::string::npos) << r.out;
}

// -d (llama-bench's depth): the tests run after that many cached positions; the decode roofline counts the
// KV bytes then (so its share is the larger one, the roofline being lower), and a depth past the context is
// refused naming -d.
TEST(BenchCli, DepthRunsAfterCachedPositionsAndCountsKvBytes) {
  const json j = bench_json("-d 96");
  EXPECT_EQ(j["n_depth"], 96);
  ASSERT_TRUE(j["tg"].contains("roofline_with_kv_tokens_per_s")) << j.dump();
  EXPECT_LT(j["tg"]["roofline_with_kv_tokens_per_s"].get<double>(), j["roofline_tokens_per_s"].get<double>());
  EXPECT_GT(j["pp"]["tokens_per_s"].get<double>(), 0.0);
  const Result t = bench("-d 96");
  EXPECT_NE(t.out.find("| tg8 @ d96 |"), std::string::npos) << t.out;
  EXPECT_NE(t.out.find("| pp16 @ d96 |"), std::string::npos) << t.out;
  const Result bad = bench("-d 200");  // the bundled model's context is 128
  EXPECT_EQ(bad.rc, 2);
  EXPECT_NE(bad.err.find("-d 200"), std::string::npos) << bad.err;
}

#ifdef SHARDLM_E2E_MPI
TEST(BenchCli, TensorParallelRanksReportTheirMemory) {
  const json j = bench_json("--tp 2");
  EXPECT_EQ(j["layout"]["tp"], 2);
  check_ranks(j, 2, 1);
  check_planner(j);
}

TEST(BenchCli, PipelineStagesReportTheirLayersAndMemory) {
  const json j = bench_json("--pp 2");
  EXPECT_EQ(j["layout"]["pp"], 2);
  check_ranks(j, 1, 2);
  check_planner(j);
}
#endif

}  // namespace
