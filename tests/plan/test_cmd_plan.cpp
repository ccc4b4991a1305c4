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
#include "plan/devices.h"
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
      {{"-m", "tiny", "--cpu", "pentium-4"}, "--cpu"},
      {{"-m", "tiny", "--cpu-mem", "8G", "--cpu-cores", "0"}, "--cpu-cores"},
      {{"-m", "tiny", "--cpu-mem", "8G", "--cpu-bandwidth", "80MB/s"}, "--cpu-bandwidth"},
      {{"-m", "tiny", "--cpu-mem", "8G", "--cpu-bandwidth", "0"}, "--cpu-bandwidth"},
      {{"-m", "tiny", "--gpus", "8G", "--gpu-bandwidth", "fast"}, "--gpu-bandwidth"},
      {{"-m", "tiny", "--gpus", "8G", "--gpu-tflops", "-3"}, "--gpu-tflops"},
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

nlohmann::json plan_json(std::vector<const char*> args) {
  args.push_back("--json");
  std::string out;
  const int rc = run(args, &out);
  EXPECT_TRUE(rc == 0 || rc == 3) << rc;
  return nlohmann::json::parse(out);
}

// Issue 23 item 1: planning for another machine never takes this machine's cores, a named CPU brings its
// cores and bandwidth, and the output says where each CPU figure came from.
TEST(CmdPlan, AnotherMachinesCpu) {
  // 70B on one 4090 with the rest in 64 GiB of RAM: the CPU's figures decide the speed.
  nlohmann::json j = plan_json({"-m", "llama-3.1-70b", "--quant", "q4_k_m", "--gpus", "rtx4090", "--cpu-mem", "64G"});
  EXPECT_EQ(j["cpu"]["cores"].get<int>(), kAssumedCpuCores);
  EXPECT_EQ(j["cpu"]["cores_source"], "assumed");
  EXPECT_EQ(j["cpu"]["bandwidth_source"], "assumed");
  EXPECT_EQ(j["cpu"]["mem_source"], "--cpu-mem");
  const double assumed_tps = j["predicted_decode_tokens_per_s"].get<double>();
  const double assumed_prefill = j["predicted_prefill_tokens_per_s"].get<double>();
  j = plan_json({"-m", "llama-3.1-70b", "--quant", "q4_k_m", "--gpus", "rtx4090", "--cpu-mem", "64G", "--cpu",
                 "ryzen-7950x"});
  EXPECT_EQ(j["cpu"]["cores"].get<int>(), 16);
  EXPECT_DOUBLE_EQ(j["cpu"]["bandwidth_bytes_per_s"].get<double>(), 83.2e9);
  EXPECT_EQ(j["cpu"]["bandwidth_source"], "--cpu ryzen-7950x (datasheet peak)");
  // The offloaded layers run at the CPU's bandwidth: 83.2 instead of 20 GB/s is faster, not the same.
  EXPECT_GT(j["predicted_decode_tokens_per_s"].get<double>(), 2 * assumed_tps);
  EXPECT_GT(j["predicted_prefill_tokens_per_s"].get<double>(), assumed_prefill);
  j = plan_json({"-m", "llama-3.1-70b", "--quant", "q4_k_m", "--gpus", "rtx4090", "--cpu-mem", "64G", "--cpu-cores",
                 "24", "--cpu-bandwidth", "80GB/s"});
  EXPECT_EQ(j["cpu"]["cores"].get<int>(), 24);
  EXPECT_EQ(j["cpu"]["cores_source"], "--cpu-cores");
  EXPECT_DOUBLE_EQ(j["cpu"]["bandwidth_bytes_per_s"].get<double>(), 80e9);
  EXPECT_EQ(j["cpu"]["bandwidth_source"], "--cpu-bandwidth");
  std::string out;
  EXPECT_EQ(run({"-m", "llama-3.1-70b", "--gpus", "rtx4090", "--cpu-mem", "64G", "--cpu", "ryzen-7950x"}, &out), 0);
  EXPECT_NE(out.find("CPU: 16 cores (--cpu ryzen-7950x), 64.00 GiB RAM (--cpu-mem), 83.2 GB/s (--cpu ryzen-7950x "
                     "(datasheet peak))"),
            std::string::npos)
      << out;
  EXPECT_EQ(run({"--help"}, &out), 0);
  for (const char* flag : {"--cpu TEXT", "--cpu-cores INT", "--gpu-bandwidth TEXT", "--gpu-tflops FLOAT", "ryzen-7950x",
                           "rtx4060-laptop", "pcie4-nop2p", "G = GB = GiB"})
    EXPECT_NE(out.find(flag), std::string::npos) << flag << "\n" << out;
}

// Issue 23 item 2: an 8 GB card given by size is reported as assumed, and --gpu-bandwidth / a named laptop
// card give the laptop's rate (a third of the RTX 3090-class assumption), not 150 tok/s.
TEST(CmdPlan, GpuBySizeAndOverrides) {
  const std::vector<const char*> base{"-m", "llama-3.1-8b", "--quant", "q4_k_m", "--cpu-mem", "1K", "--ctx", "2048"};
  auto with = [&](std::vector<const char*> extra) {
    std::vector<const char*> a = base;
    a.insert(a.end(), extra.begin(), extra.end());
    return plan_json(a);
  };
  const nlohmann::json sized = with({"--gpus", "8G"});
  EXPECT_EQ(sized["gpus"][0]["bandwidth_source"], "assumed (RTX 3090-class)");
  const nlohmann::json laptop = with({"--gpus", "rtx4060-laptop"});
  const nlohmann::json given = with({"--gpus", "8G", "--gpu-bandwidth", "256GB/s"});
  EXPECT_EQ(given["gpus"][0]["bandwidth_source"], "--gpu-bandwidth");
  const double t_sized = sized["predicted_decode_tokens_per_s"].get<double>();
  const double t_laptop = laptop["predicted_decode_tokens_per_s"].get<double>();
  const double t_given = given["predicted_decode_tokens_per_s"].get<double>();
  // Same bandwidth, same prediction; decode is a bandwidth roofline plus a fixed time per layer, so 256 of
  // 936 GB/s is between 256/936 and 1 of the rate.
  EXPECT_NEAR(t_given, t_laptop, 1e-9 * t_laptop);
  EXPECT_LT(t_laptop, 0.4 * t_sized);
  EXPECT_GT(t_laptop, 256.0 / 936 * t_sized);
  EXPECT_LT(t_laptop, 60.0);
  const nlohmann::json flops = with({"--gpus", "8G", "--gpu-tflops", "20"});
  EXPECT_LT(flops["predicted_prefill_tokens_per_s"].get<double>(), sized["predicted_prefill_tokens_per_s"].get<double>());
  std::string out;
  EXPECT_EQ(run({"-m", "llama-3.1-8b", "--gpus", "8G", "--cpu-mem", "1K", "--ctx", "2048"}, &out), 0);
  EXPECT_NE(out.find("GPU: 1 x GPU 8.00 GiB, 8.00 GiB, 936 GB/s (assumed (RTX 3090-class))"), std::string::npos) << out;
  EXPECT_NE(out.find("(unused with one GPU)"), std::string::npos) << out;
}

// Issue 23 item 3: the link is printed (text, --explain, JSON) and GeForce cards' missing peer-to-peer slows
// tensor parallelism; an NVLink bridge on 3090s is given with --link nvlink.
TEST(CmdPlan, LinkShownAndModelled) {
  nlohmann::json j = plan_json({"-m", "llama-3.1-8b", "--quant", "q4_0", "--gpus", "rtx4090x2", "--cpu-mem", "1K",
                                "--tp", "2"});
  EXPECT_EQ(j["link"]["name"], "pcie4-nop2p");
  EXPECT_FALSE(j["link"]["peer_to_peer"].get<bool>());
  EXPECT_EQ(j["link"]["source"], "default for NVIDIA RTX 4090");
  const double nop2p = j["predicted_decode_tokens_per_s"].get<double>();
  j = plan_json({"-m", "llama-3.1-8b", "--quant", "q4_0", "--gpus", "rtx4090x2", "--cpu-mem", "1K", "--tp", "2",
                 "--link", "pcie4"});
  EXPECT_GT(j["predicted_decode_tokens_per_s"].get<double>(), nop2p);
  nlohmann::json pcie = plan_json({"-m", "llama-3.1-8b", "--quant", "q4_0", "--gpus", "rtx3090x2", "--cpu-mem", "1K",
                                   "--tp", "2"});
  nlohmann::json bridge = plan_json({"-m", "llama-3.1-8b", "--quant", "q4_0", "--gpus", "rtx3090x2", "--cpu-mem",
                                     "1K", "--tp", "2", "--link", "nvlink"});
  EXPECT_EQ(bridge["link"]["name"], "nvlink");
  EXPECT_EQ(bridge["link"]["source"], "--link");
  EXPECT_GT(bridge["predicted_decode_tokens_per_s"].get<double>(), pcie["predicted_decode_tokens_per_s"].get<double>());
  j = plan_json({"-m", "llama-3.1-8b", "--gpus", "h100x2", "--cpu-mem", "1K"});
  EXPECT_EQ(j["link"]["name"], "nvlink");
  std::string out;
  EXPECT_EQ(run({"-m", "llama-3.1-8b", "--gpus", "rtx4090x2", "--cpu-mem", "1K", "--explain"}, &out), 0);
  EXPECT_NE(out.find("link between GPUs: pcie4-nop2p (40 us per small all-reduce, 10.0 GB/s): no peer-to-peer"),
            std::string::npos)
      << out;
  EXPECT_NE(out.find("\nlink: pcie4-nop2p"), std::string::npos) << out;
}

// Issue 23 item 5: the JSON's all-GPU rate, half-open layer ranges and machine-readable suggestions.
TEST(CmdPlan, JsonFields) {
  nlohmann::json j = plan_json({"-m", "llama-3.1-8b", "--gpus", "rtx4090", "--cpu-mem", "1K"});
  EXPECT_DOUBLE_EQ(j["all_gpu_decode_tokens_per_s"].get<double>(), j["predicted_decode_tokens_per_s"].get<double>());
  j = plan_json({"-m", "tiny", "--quant", "f32", "--cpu-mem", "8G"});
  EXPECT_TRUE(j["all_gpu_decode_tokens_per_s"].is_null()) << j["all_gpu_decode_tokens_per_s"];
  // Offloaded: the all-GPU rate is the faster one.
  j = plan_json({"-m", "llama-3.1-70b", "--gpus", "rtx4090", "--cpu-mem", "64G"});
  EXPECT_GT(j["all_gpu_decode_tokens_per_s"].get<double>(), j["predicted_decode_tokens_per_s"].get<double>());
  // Experts in RAM (a mixture of experts on a 12 GiB card): the all-GPU rate has them on the GPU.
  j = plan_json({"-m", "qwen3-30b-a3b", "--quant", "q4_k_m", "--gpus", "12G", "--cpu-mem", "32G"});
  ASSERT_GT(j["layout"]["experts_in_ram_layers"].get<int>(), 0) << j["layout"];
  EXPECT_GT(j["all_gpu_decode_tokens_per_s"].get<double>(), j["predicted_decode_tokens_per_s"].get<double>());

  j = plan_json({"-m", "llama-3.1-70b", "--gpus", "24G,24G", "--cpu-mem", "1K", "-sm", "layer", "-ts", "1,1", "--ctx",
                 "2048"});
  int covered = 0, expect_begin = 0;
  for (const nlohmann::json& d : j["devices"]) {
    const int b = d["layer_begin"].get<int>(), e = d["layer_end"].get<int>();
    EXPECT_EQ(b, expect_begin);  // half-open ranges tile the layers
    EXPECT_EQ(b, d["layers"][0].get<int>());
    EXPECT_EQ(e, d["layers"][1].get<int>() + 1);  // `layers` stays inclusive
    covered += e - b;
    expect_begin = e;
  }
  EXPECT_EQ(covered, 80);
  EXPECT_EQ(j["devices"][0]["layer_end"].get<int>(), 40);

  j = plan_json({"-m", "llama-3.1-70b", "--gpus", "rtx4090", "--cpu-mem", "64G", "-ngl", "99"});
  ASSERT_FALSE(j["fits"].get<bool>());
  ASSERT_EQ(j["suggestion_changes"].size(), j["suggestions"].size());
  ASSERT_FALSE(j["suggestion_changes"].empty());
  bool more_gpus = false, quant = false;
  for (size_t i = 0; i < j["suggestion_changes"].size(); ++i) {
    const nlohmann::json& s = j["suggestion_changes"][i];
    EXPECT_EQ(s["text"], j["suggestions"][i]);
    if (s["kind"] == "more_gpus") {
      more_gpus = true;
      EXPECT_GE(s["change"]["add_gpus"].get<int>(), 1);
      EXPECT_EQ(s["change"]["gpu"], "NVIDIA RTX 4090");
      EXPECT_GT(s["predicted_decode_tokens_per_s"].get<double>(), 0);
    }
    if (s["kind"] == "quant") {
      quant = true;
      const std::string q = s["change"]["quant"].get<std::string>();
      EXPECT_NE(s["text"].get<std::string>().find(q), std::string::npos);
    }
  }
  EXPECT_TRUE(more_gpus) << j["suggestion_changes"];
  // 8B F16 (16 GB) with a 32k context on a 16 GB card: a shorter context or Q8_0 fits; the suggested --ctx is a
  // number, the same as in the sentence.
  j = plan_json({"-m", "llama-3.1-8b", "--quant", "f16", "--gpus", "rtx4060ti", "--cpu-mem", "1K", "--ctx", "32768",
                 "-ngl", "99"});
  ASSERT_FALSE(j["fits"].get<bool>());
  bool ctx = false;
  for (const nlohmann::json& s : j["suggestion_changes"]) {
    if (s["kind"] == "quant") {
      quant = true;
      EXPECT_EQ(s["change"]["quant"], "q8_0") << s;
    }
    if (s["kind"] == "ctx") {
      ctx = true;
      const int64_t n = s["change"]["ctx"].get<int64_t>();
      EXPECT_GT(n, 0);
      EXPECT_NE(s["text"].get<std::string>().find(cat("--ctx ", n, " ")), std::string::npos) << s;
    }
  }
  EXPECT_TRUE(ctx) << j["suggestion_changes"];
  EXPECT_TRUE(quant) << j["suggestion_changes"];
}

}  // namespace
}  // namespace shardlm
