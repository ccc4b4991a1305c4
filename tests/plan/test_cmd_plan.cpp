// `shardlm plan` exit statuses: 0 fits, 3 nothing fits, 2 bad flags; bad values throw Error (main()
// turns it into status 2).
#include <gtest/gtest.h>

#include <algorithm>
#include <iostream>
#include <sstream>
#include <vector>

#include "../../apps/shardlm/commands.h"
#include "../../apps/shardlm/run_flags.h"
#include "comm/communicator.h"
#include "core/error.h"
#include "loader/model_source.h"
#include "runtime/engine.h"
#include <nlohmann/json.hpp>

namespace shardlm {
namespace {

int run(const std::vector<const char*>& rest, std::string* out = nullptr) {
  std::vector<const char*> args{"shardlm plan"};  // built whole: g++ 12 warns on insert() at begin
  args.reserve(rest.size() + 1);
  for (const char* a : rest) args.push_back(a);
  std::ostringstream cap, err;
  std::streambuf* old = std::cout.rdbuf(cap.rdbuf());
  std::streambuf* old_err = std::cerr.rdbuf(err.rdbuf());
  struct Restore {
    std::streambuf* o;
    std::streambuf* e;
    ~Restore() {
      std::cout.rdbuf(o);
      std::cerr.rdbuf(e);
    }
  } restore{old, old_err};
  const int rc = cmd_plan(static_cast<int>(args.size()), args.data());
  if (out) *out = cap.str();
  return rc;
}

TEST(CmdPlan, ExitStatuses) {
  std::string out;
  EXPECT_EQ(run({"-m", "llama-3.1-70b", "--gpus", "rtx3090x2", "--cpu-mem", "1K", "--json"}, &out), 0);
  EXPECT_NE(out.find("\"fits\": true"), std::string::npos) << out;
  EXPECT_EQ(run({"-m", "llama-3.1-70b", "--gpus", "rtx4090", "--cpu-mem", "64G", "-ngl", "99"}, &out), 3);
  EXPECT_NE(out.find("DOES NOT FIT"), std::string::npos) << out;
  EXPECT_EQ(run({"-m", "llama-3.1-70b", "--gpus", "24G,24G", "--cpu-mem", "1K", "-sm", "layer", "-ts", "1,1",
                 "--max-model-len", "2048", "--explain"}, &out), 0);
  EXPECT_NE(out.find("layers per stage 40/40"), std::string::npos) << out;
  EXPECT_EQ(run({"-m", "tiny", "--quant", "f32", "--cpu-mem", "8G", "--tensor-parallel-size", "2"}), 0);
  EXPECT_EQ(run({"--no-such-flag"}), 2);
  EXPECT_EQ(run({"-m", "tiny", "--ctx", "many"}), 2);
  EXPECT_EQ(run({"--help"}), 0);
}

TEST(CmdPlan, BadValuesThrowNamedErrors) {
  struct Row {
    std::vector<const char*> args;
    const char* needle;
  } rows[] = {
      {{"-m", "llama-9b"}, "llama-9b"},
      {{"-m", "tiny", "--quant", "q3_k_xl"}, "q3_k_xl"},
      {{"-m", "tiny", "--gpus", "rtx9999"}, "rtx9999"},
      {{"-m", "tiny", "--gpus", "24G,,24G"}, "--gpus"},
      {{"-m", "tiny", "--cpu-mem", "64"}, "--cpu-mem"},
      {{"-m", "tiny", "--gpus", "24G", "--link", "smoke"}, "--link"},
      {{"-m", "tiny", "--kv-type", "q9"}, "--kv-type"},
      {{"-m", "tiny", "--gpus", "24G", "-sm", "diagonal"}, "--split-mode"},
      {{"-m", "tiny", "--gpus", "24G", "-ts", "1,x"}, "--layer-split"},
      {{"-m", "tiny", "--cpu-mem", "8G", "--max-num-seqs", "0"}, "--max-num-seqs"},
      {{"-m", "tiny", "--cpu-mem", "8G", "--max-num-seqs", "4097"}, "--max-num-seqs"},
  };
  for (const Row& r : rows) {
    try {
      run(r.args);
      ADD_FAILURE() << r.needle << ": accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(r.needle), std::string::npos) << e.what();
      EXPECT_EQ(e.exit_code(), 2);
    }
  }
}

TEST(CmdPlan, MaxNumSeqs) {
  std::string out;
  EXPECT_EQ(run({"--help"}, &out), 0);
  EXPECT_NE(out.find("--max-num-seqs"), std::string::npos) << out;
  EXPECT_NE(out.find("--max-num-seqs INT=1"), std::string::npos) << out;  // the default
  EXPECT_EQ(run({"-m", "llama-3.1-8b", "--quant", "bf16", "--gpus", "h100-sxm", "--cpu-mem", "1K",
                 "--max-num-seqs", "16", "--json"}, &out), 0);
  const nlohmann::json j = nlohmann::json::parse(out);
  EXPECT_EQ(j["max_num_seqs"].get<int64_t>(), 16);
  EXPECT_EQ(j["kv_pool_bytes"].get<uint64_t>(), 16ull * 32 * 2 * 8 * 128 * 2 * 4096);
  EXPECT_GE(j["sequences_that_fit"].get<int64_t>(), 16);
  EXPECT_GT(j["aggregate_decode_tokens_per_s"].get<double>(), j["predicted_decode_tokens_per_s"].get<double>());
  EXPECT_EQ(run({"-m", "llama-3.1-8b", "--quant", "bf16", "--gpus", "h100-sxm", "--cpu-mem", "1K",
                 "--max-num-seqs", "4"}, &out), 0);
  EXPECT_NE(out.find("sequences (--max-num-seqs 4): KV pool 2.00 GiB (4 x 4096 positions)"), std::string::npos) << out;
  EXPECT_NE(out.find("predicted aggregate decode"), std::string::npos) << out;
  // 64 x 4096 positions of 70B's KV (80 GiB) cannot fit on 2 x 24 GiB.
  EXPECT_EQ(run({"-m", "llama-3.1-70b", "--gpus", "24G,24G", "--cpu-mem", "1K", "--tp", "2", "--max-num-seqs", "64"},
                &out), 3);
  EXPECT_EQ(run({"-m", "tiny", "--max-num-seqs", "lots"}), 2);
}

// Item 12 of the planner issue: with no flags, `plan` plans what `generate` (the engine) then runs: the
// same context (the trained one, at most 4096), the same prefill batch and the same KV type. The bundled
// model is trained at a context below 4096, so a plan at 4096 (as before) differs from the engine's.
TEST(CmdPlan, DefaultsAreTheEnginesDefaults) {
  const std::string path = std::string(SHARDLM_SOURCE_DIR) + "/models/aidreams260K.gguf";
  const auto src = open_model_source(path);
  auto comm = make_single_rank_communicator();
  RunFlags rf;  // generate's flags, none given: no -c, -b or --kv-type
  rf.model = path;
  rf.quiet = true;
  EngineOptions o = rf.resolve(*src);
  o.n_threads = 1;
  Engine engine(*src, *comm, o);
  ASSERT_LT(src->config().n_ctx_train, 4096);
  std::string out;
  ASSERT_EQ(run({"-m", path.c_str(), "--cpu-mem", "8G", "--json"}, &out), 0) << out;
  const nlohmann::json j = nlohmann::json::parse(out);
  EXPECT_EQ(j["ctx"].get<int64_t>(), engine.n_ctx());
  EXPECT_EQ(j["batch"].get<int64_t>(), std::min(engine.options().n_batch, engine.n_ctx()));
  EXPECT_EQ(j["kv_type"].get<std::string>(), type_name(engine.options().kv_type));
  EXPECT_EQ(j["ctx_train"].get<int64_t>(), src->config().n_ctx_train);
  // A model trained at 128K plans 4096 by default, as generate runs it.
  ASSERT_EQ(run({"-m", "llama-3.1-8b", "--gpus", "h100-sxm", "--cpu-mem", "1K", "--json"}, &out), 0);
  EXPECT_EQ(nlohmann::json::parse(out)["ctx"].get<int64_t>(), 4096);
}

// --ctx max: the largest context that fits, capped by the trained context; one more position does not fit
// on that layout or any other.
TEST(CmdPlan, CtxMaxIsTheLargestThatFits) {
  std::string out;
  // 8B q4_k_m on an H100: the whole trained context (131072) fits.
  ASSERT_EQ(run({"-m", "llama-3.1-8b", "--gpus", "h100-sxm", "--cpu-mem", "1K", "--ctx", "max", "--json"}, &out), 0);
  nlohmann::json j = nlohmann::json::parse(out);
  EXPECT_TRUE(j["ctx_is_max"].get<bool>());
  EXPECT_EQ(j["ctx"].get<int64_t>(), 131072);
  EXPECT_EQ(j["ctx_train"].get<int64_t>(), 131072);
  // 70B q4_k_m on two 3090s: only part of it. The text names the trained context beside the figure.
  ASSERT_EQ(run({"-m", "llama-3.1-70b", "--gpus", "rtx3090x2", "--cpu-mem", "1K", "--ctx", "max", "--json"}, &out), 0);
  j = nlohmann::json::parse(out);
  const int64_t c = j["ctx"].get<int64_t>();
  EXPECT_GT(c, 1024);
  EXPECT_LT(c, 131072);
  EXPECT_EQ(run({"-m", "llama-3.1-70b", "--gpus", "rtx3090x2", "--cpu-mem", "1K", "--ctx",
                 std::to_string(c).c_str()}, &out), 0) << out;
  EXPECT_EQ(run({"-m", "llama-3.1-70b", "--gpus", "rtx3090x2", "--cpu-mem", "1K", "--ctx",
                 std::to_string(c + 1).c_str()}, &out), 3) << out;
  ASSERT_EQ(run({"-m", "llama-3.1-70b", "--gpus", "rtx3090x2", "--cpu-mem", "1K", "--ctx", "max"}, &out), 0);
  EXPECT_NE(out.find("(--ctx max: the largest that fits), trained context 131072"), std::string::npos) << out;
  // Nothing fits at any context: the closest miss is shown (exit 3) with a note saying so.
  ASSERT_EQ(run({"-m", "llama-3.1-70b", "--gpus", "8G", "--cpu-mem", "1K", "--ctx", "max", "--json"}, &out), 3);
  j = nlohmann::json::parse(out);
  EXPECT_FALSE(j["ctx_is_max"].get<bool>());
  EXPECT_NE(j["notes"].dump().find("--ctx max: nothing fits at any context"), std::string::npos) << out;
  EXPECT_EQ(run({"-m", "tiny", "--ctx", "0"}), 2);
  EXPECT_EQ(run({"-m", "tiny", "--ctx", "maximum"}), 2);
}

// When nothing fits, "max context for this layout" is the shown layout's own: pinned to that layout, it fits
// at that context and not one position more; the largest context of any layout is reported apart.
TEST(CmdPlan, MaxContextDescribesTheLayoutShown) {
  std::string out;
  ASSERT_EQ(run({"-m", "llama-3.1-70b", "--gpus", "rtx3090x2", "--cpu-mem", "1K", "--ctx", "131072", "--json"}, &out),
            3);
  const nlohmann::json j = nlohmann::json::parse(out);
  const int64_t own = j["max_context"].get<int64_t>();
  const int64_t any = j["max_context_any_layout"].get<int64_t>();
  ASSERT_GT(own, 0);
  ASSERT_GE(any, own);
  const auto& L = j["layout"];
  const std::string tp = std::to_string(L["tp"].get<int>()), pp = std::to_string(L["pp"].get<int>());
  const std::string ngl = std::to_string(L["n_gpu_layers"].get<int>());
  std::string ts;
  for (const auto& n : L["layer_split"]) {
    if (!ts.empty()) ts += ",";
    ts += std::to_string(n.get<int>());
  }
  const auto pinned = [&](int64_t ctx) {
    const std::string c = std::to_string(ctx);
    return run({"-m", "llama-3.1-70b", "--gpus", "rtx3090x2", "--cpu-mem", "1K", "--tp", tp.c_str(), "--pp",
                pp.c_str(), "-ngl", ngl.c_str(), "-ts", ts.c_str(), "--ctx", c.c_str()});
  };
  EXPECT_EQ(pinned(own), 0);
  EXPECT_EQ(pinned(own + 1), 3);
  const auto free_at = [&](int64_t ctx) {
    const std::string c = std::to_string(ctx);
    return run({"-m", "llama-3.1-70b", "--gpus", "rtx3090x2", "--cpu-mem", "1K", "--ctx", c.c_str()});
  };
  EXPECT_EQ(free_at(any), 0);
  EXPECT_EQ(free_at(any + 1), 3);
  ASSERT_EQ(run({"-m", "llama-3.1-70b", "--gpus", "rtx3090x2", "--cpu-mem", "1K", "--ctx", "131072"}, &out), 3);
  EXPECT_NE(out.find("max context for this layout: " + std::to_string(own) + " (trained context 131072)"),
            std::string::npos) << out;
  EXPECT_NE(out.find("largest context that fits with any layout: " + std::to_string(any)), std::string::npos) << out;
}

}  // namespace
}  // namespace shardlm
