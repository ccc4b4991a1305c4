// --max-num-seqs: the KV pool of N sequences in the fit decision, the sequences that fit, and the aggregate
// decode rate of N sequences decoding together (issue 18 item 10), checked against hand computations.
#include <gtest/gtest.h>

#include <cmath>

#include "config/presets.h"
#include "core/error.h"
#include "plan/planner.h"

namespace shardlm {
namespace {

constexpr uint64_t GiB = uint64_t{1} << 30;
constexpr uint64_t MiB = uint64_t{1} << 20;

DeviceInventory machine(const char* gpus, const char* cpu_mem) {
  DeviceRequest r;
  if (gpus != nullptr) r.gpus = gpus;
  r.cpu_mem = cpu_mem;
  r.cpu_cores = 16;
  return make_inventory(r);
}

const ModelDesc& llama8_bf16() {
  static const ModelDesc m = model_desc_from_preset("llama-3.1-8b", "bf16");
  return m;
}

// Llama 3.1 8B bf16 by hand: d 4096, vocabulary 128256, 32 layers, 8 KV heads of 128, FFN 14336.
constexpr double kD = 4096, kV = 128256, kL = 32, kKv = 1024, kFf = 14336;
double weights_8b() {
  const double matrices = 2.0 * (2 * kV * kD + kL * (2 * kD * kD + 2 * kD * kKv + 3 * kD * kFf));
  const double norms = 4.0 * (kD + kL * 2 * kD);
  return matrices + norms;
}
// Bytes one step of n sequences at context ctx reads: every weight but the embedding table once, one
// embedding row and the KV of ctx positions per sequence.
double step_read_8b(double n, double ctx) {
  return weights_8b() - 2.0 * kV * kD + n * 2.0 * kD + n * kL * 2 * 8 * 128 * 2 * ctx;
}

TEST(PlanBatch, OneSequenceIsTodaysPlan) {
  PlanRequest one;
  one.max_num_seqs = 1;
  const Plan d = make_plan(llama8_bf16(), machine("h100-sxm", "1K"), PlanRequest{});
  const Plan p = make_plan(llama8_bf16(), machine("h100-sxm", "1K"), one);
  ASSERT_TRUE(p.fits);
  EXPECT_EQ(d.max_num_seqs, 1);  // the default
  EXPECT_EQ(p.chosen.decode_tps, d.chosen.decode_tps);
  EXPECT_EQ(p.max_context, d.max_context);
  ASSERT_EQ(p.chosen.devices.size(), 1u);
  const DevicePlan& g = p.chosen.devices[0];
  const uint64_t kv = 32ull * 2 * 8 * 128 * 2 * 4096;  // 512 MiB
  EXPECT_EQ(g.kv_bytes, kv);
  EXPECT_EQ(g.kv_seq_bytes, kv);
  EXPECT_EQ(p.kv_pool_bytes, kv);
  // The batch-1 roofline of test_planner, and the aggregate of one sequence is the same number.
  const double expect = 1.0 / (step_read_8b(1, 4096) / (0.90 * 3350e9) + kL * 16e-6);
  EXPECT_NEAR(p.chosen.decode_tps / expect, 1.0, 1e-6);
  EXPECT_DOUBLE_EQ(p.chosen.aggregate_decode_tps, p.chosen.decode_tps);
  const nlohmann::json j = plan_to_json(p);
  EXPECT_EQ(j["max_num_seqs"].get<int64_t>(), 1);
  EXPECT_EQ(j["kv_pool_bytes"].get<uint64_t>(), kv);
  EXPECT_DOUBLE_EQ(j["aggregate_decode_tokens_per_s"].get<double>(), j["predicted_decode_tokens_per_s"].get<double>());
  EXPECT_EQ(j["sequences_that_fit"].get<int64_t>(), p.chosen.seqs_that_fit);
}

TEST(PlanBatch, SixtyFourSequencesMultiplyTheKvBy64) {
  const ModelDesc m = model_desc_from_preset("llama-3.1-70b", "q4_k_m");
  PlanRequest req;
  req.tp = 2;  // the same layout either way (nothing else is searched)
  const Plan p1 = make_plan(m, machine("24G,24G", "1K"), req);
  req.max_num_seqs = 64;
  const Plan p64 = make_plan(m, machine("24G,24G", "1K"), req);
  ASSERT_TRUE(p1.fits);
  ASSERT_EQ(p1.chosen.devices.size(), p64.chosen.devices.size());
  for (size_t i = 0; i < p1.chosen.devices.size(); ++i) {
    const DevicePlan &a = p1.chosen.devices[i], &b = p64.chosen.devices[i];
    EXPECT_EQ(b.kv_bytes, 64 * a.kv_bytes) << i;
    EXPECT_EQ(b.kv_seq_bytes, a.kv_bytes) << i;
    EXPECT_EQ(b.weight_bytes, a.weight_bytes) << i;
    EXPECT_EQ(b.workspace_bytes, a.workspace_bytes) << i;
    EXPECT_EQ(b.total_bytes - a.total_bytes, 63 * a.kv_bytes) << i;
  }
  // 80 layers x 2 x 8 heads x 128 x 2 bytes x 4096 positions = 1.25 GiB per sequence over the two ranks.
  EXPECT_EQ(p1.kv_pool_bytes, 80ull * 2 * 8 * 128 * 2 * 4096);
  EXPECT_EQ(p64.kv_pool_bytes, 64 * p1.kv_pool_bytes);
  EXPECT_EQ(plan_to_json(p64)["kv_pool_bytes"].get<uint64_t>(), 64 * p1.kv_pool_bytes);
  // 80 GiB of KV cannot fit beside 40 GiB of weights on 2 x 24 GiB: the fit decision counts the pool.
  EXPECT_FALSE(p64.fits);
  EXPECT_EQ(p64.chosen.seqs_that_fit, p1.chosen.seqs_that_fit);  // a property of the layout, not of N
  EXPECT_LT(p1.chosen.seqs_that_fit, 64);
}

TEST(PlanBatch, SequencesThatFitOnA24GiBGpu) {
  // 8B bf16 on one 24 GiB GPU at context 4096, batch 512, no RAM to offload to.
  const Plan p = make_plan(llama8_bf16(), machine("24G", "1K"), PlanRequest{});
  ASSERT_TRUE(p.fits) << plan_to_text(p, true);
  ASSERT_EQ(p.chosen.devices.size(), 1u);
  const DevicePlan& g = p.chosen.devices[0];
  // Every bf16 shard is whole 2 MiB pages (32, 8, 112 and 1002 MiB), so the reserve is the fixed 768 MiB.
  EXPECT_EQ(g.alloc_pad_bytes, 0u);
  EXPECT_EQ(g.reserve_bytes, 768 * MiB);
  EXPECT_EQ(static_cast<double>(g.weight_bytes), weights_8b());
  // Workspace in fp32 elements: 3 x 512 x d, 2 x 512 x (32 + 8) x 128, 2 x 512 x ff, 512 x 32 x 4096
  // scores, one row of local and one of gathered logits.
  const uint64_t ws = 4ull * (3 * 512 * 4096 + 2 * 512 * 40 * 128 + 2 * 512 * 14336 + 512 * 32 * 4096 + 2 * 128256);
  EXPECT_EQ(g.workspace_bytes, ws);
  const uint64_t w = static_cast<uint64_t>(weights_8b());
  const uint64_t kv_seq = 512 * MiB;
  const int64_t fit = static_cast<int64_t>((24 * GiB - 768 * MiB - w - ws) / kv_seq);
  EXPECT_EQ(fit, 15);  // 24 - 0.75 - 14.96 - 0.39 = 7.9 GiB of 0.5 GiB sequences
  EXPECT_EQ(p.chosen.seqs_that_fit, fit);
  EXPECT_EQ(plan_to_json(p)["sequences_that_fit"].get<int64_t>(), fit);
  // The fit decision agrees: that many sequences fit, one more does not.
  PlanRequest req;
  req.max_num_seqs = fit;
  const Plan at = make_plan(llama8_bf16(), machine("24G", "1K"), req);
  EXPECT_TRUE(at.fits) << plan_to_text(at, true);
  EXPECT_EQ(at.chosen.seqs_that_fit, fit);
  req.max_num_seqs = fit + 1;
  EXPECT_FALSE(make_plan(llama8_bf16(), machine("24G", "1K"), req).fits);
}

TEST(PlanBatch, AggregateDecodeGrowsButWeightsAreReadOncePerStep) {
  PlanRequest req;
  const Plan one = make_plan(llama8_bf16(), machine("h100-sxm", "1K"), req);
  const double b1 = one.chosen.decode_tps;
  double prev = b1;
  for (int64_t n : {2, 8, 32, 64}) {
    req.max_num_seqs = n;
    const Plan p = make_plan(llama8_bf16(), machine("h100-sxm", "1K"), req);
    ASSERT_TRUE(p.fits) << n;
    EXPECT_EQ(p.chosen.decode_tps, b1) << n;  // the batch-1 figure does not move
    const double agg = p.chosen.aggregate_decode_tps;
    EXPECT_GT(agg, prev) << n;
    EXPECT_GT(agg, b1) << n;
    EXPECT_LT(agg, static_cast<double>(n) * b1) << n;
    // By hand: n / (the step's bytes at 0.90 of 3350 GB/s + 16 us per layer once).
    const double expect = static_cast<double>(n) / (step_read_8b(static_cast<double>(n), 4096) / (0.90 * 3350e9) + kL * 16e-6);
    EXPECT_NEAR(agg / expect, 1.0, 1e-6) << n;
    prev = agg;
  }
  const std::string text = plan_to_text(make_plan(llama8_bf16(), machine("h100-sxm", "1K"), req), false);
  EXPECT_NE(text.find("max-num-seqs 64"), std::string::npos) << text;
  EXPECT_NE(text.find("predicted aggregate decode"), std::string::npos) << text;
  EXPECT_NE(text.find("each at context 4096"), std::string::npos) << text;
}

TEST(PlanBatch, MaxNumSeqsIsValidated) {
  for (int64_t n : {int64_t{0}, int64_t{-1}, int64_t{4097}}) {
    PlanRequest req;
    req.max_num_seqs = n;
    try {
      make_plan(llama8_bf16(), machine("h100-sxm", "1K"), req);
      ADD_FAILURE() << n << " accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("--max-num-seqs"), std::string::npos) << e.what();
      EXPECT_EQ(e.exit_code(), 2);
    }
  }
  PlanRequest req;
  req.max_num_seqs = 4096;
  EXPECT_NO_THROW(make_plan(model_desc_from_preset("tiny", "f32"), machine(nullptr, "8G"), req));
}

}  // namespace
}  // namespace shardlm
