// `shardlm plan` exit statuses: 0 fits, 3 nothing fits, 2 bad flags; bad values throw Error (main()
// turns it into status 2).
#include <gtest/gtest.h>

#include <iostream>
#include <sstream>
#include <vector>

#include "../../apps/shardlm/commands.h"
#include "core/error.h"
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

}  // namespace
}  // namespace shardlm
