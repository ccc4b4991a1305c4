// The planner against what the engine really holds: for real GGUF models and every layout tp 1/2/4 x
// pp 1/2/4, the planner's weight bytes per rank equal load_weights()'s count for that rank (loaded in
// process on a CPU backend, no MPI), and its total per rank is within 5% of weights + LlamaModel's
// kv_bytes() + workspace_bytes() (each rank's model built over a stub communicator that only answers
// group sizes). Also the fit check that generate and bench run before loading (plan_glue).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <unistd.h>

#include "../../apps/shardlm/plan_glue.h"
#include "backends/cpu/cpu_backend.h"
#include "core/error.h"
#include "loader/gguf_export.h"
#include "loader/weights.h"
#include "model/golden.h"
#include "model/llama.h"
#include "plan/planner.h"

namespace shardlm {
namespace {

// Only what LlamaModel's constructor uses: group creation. Collectives are never called here.
class StubGroup : public CommGroup {
 public:
  StubGroup(int size, int rank) : size_(size), rank_(rank) {}
  int size() const override { return size_; }
  int rank() const override { return rank_; }
  void all_reduce_sum(float*, size_t) override { ADD_FAILURE() << "collective in a stub"; }
  void all_gather(const float*, float*, const std::vector<size_t>&) override { ADD_FAILURE() << "collective"; }
  void broadcast(void*, size_t, int) override { ADD_FAILURE() << "collective in a stub"; }
  void barrier() override {}

 private:
  int size_, rank_;
};

class StubComm : public Communicator {
 public:
  StubComm(int world, int rank) : world_(world), rank_(rank) {}
  int world_size() const override { return world_; }
  int rank() const override { return rank_; }
  std::string name() const override { return "stub"; }
  int local_rank() const override { return rank_; }
  int local_size() const override { return world_; }
  void local_all_gather(const void*, void*, size_t) override { ADD_FAILURE() << "collective in a stub"; }
  std::unique_ptr<CommGroup> make_group(const std::vector<int>& ranks) override {
    int me = -1;
    for (size_t i = 0; i < ranks.size(); ++i)
      if (ranks[i] == rank_) me = static_cast<int>(i);
    EXPECT_GE(me, 0);
    return std::make_unique<StubGroup>(static_cast<int>(ranks.size()), me);
  }
  void send(const void*, size_t, int, int) override { ADD_FAILURE() << "send in a stub"; }
  void recv(void*, size_t, int, int) override { ADD_FAILURE() << "recv in a stub"; }
  double comm_seconds() const override { return 0; }

 private:
  int world_, rank_;
};

std::vector<std::string> models() {
  return {std::string(SHARDLM_SOURCE_DIR) + "/models/aidreams260K.gguf", test::converted_model("stories260K")};
}

TEST(PlanVsLoader, WeightBytesEqualAndTotalsWithinFivePercent) {
  constexpr int64_t kCtx = 256, kBatch = 64;
  // Also Q4_0 layers with a tied Q6_K output, as llama-quantize writes them: where the CPU kernels pack those
  // types (quant.h's packs_rows) the output is a packed copy beside the mapped embedding, and counts.
  const std::string q4 = std::string(SHARDLM_BINARY_DIR) + "/plan-vs-loader-q4_0-" + std::to_string(::getpid()) + ".gguf";
  export_gguf(*open_model_source(test::fixture_path("quant/aidreams-w256-f16.gguf")), q4, "q4_0");
  std::vector<std::string> paths = models();
  paths.push_back(q4);
  for (const std::string& path : paths) {
    SCOPED_TRACE(path);
    const auto src = open_model_source(path);
    const ModelDesc desc = model_desc_from_source(*src);
    const ModelConfig& c = src->config();
    DeviceRequest dreq;
    dreq.cpu_mem = "64G";
    dreq.cpu_cores = 16;
    DeviceInventory inv = make_inventory(dreq);
    inv.gpus.clear();
    int checked = 0;
    for (int tp : {1, 2, 4})
      for (int pp : {1, 2, 4}) {
        if (pp > c.n_layer) continue;
        SCOPED_TRACE(testing::Message() << "tp " << tp << " pp " << pp);
        PlanRequest req;
        req.ctx = kCtx;
        req.batch = kBatch;
        req.kv_type = GgmlType::F32;
        req.tp = tp;
        req.pp = pp;
        const Plan plan = make_plan(desc, inv, req);
        ASSERT_TRUE(plan.fits);
        ASSERT_EQ(plan.chosen.layout.tp, tp);
        ASSERT_EQ(plan.chosen.layout.pp, pp);
        ASSERT_EQ(plan.chosen.devices.size(), static_cast<size_t>(tp * pp));
        for (int r = 0; r < tp * pp; ++r) {
          SCOPED_TRACE(testing::Message() << "rank " << r);
          const DevicePlan& d = plan.chosen.devices[static_cast<size_t>(r)];
          ASSERT_EQ(d.rank, r);
          const Mapping mapping(tp * pp, r, tp, pp, static_cast<int>(c.n_layer));
          EXPECT_EQ(d.first_layer, mapping.layers().begin);
          EXPECT_EQ(d.last_layer, mapping.layers().end - 1);
          auto backend = make_cpu_backend(1);
          std::vector<HeldTensor> held;
          ModelWeights w = load_weights(*src, mapping, *backend, &held);
          uint64_t held_sum = 0;
          for (const HeldTensor& h : held) held_sum += h.bytes;
          ASSERT_EQ(held_sum, w.weight_bytes);
          EXPECT_EQ(d.weight_bytes, w.weight_bytes);
          const uint64_t weights = w.weight_bytes;
          StubComm comm(tp * pp, r);
          ModelOptions mo;
          mo.n_batch = kBatch;
          // The engine's pool for one sequence of kCtx positions (a multiple of the block size).
          static_assert(kCtx % Backend::kKvBlockSize == 0);
          std::vector<std::unique_ptr<DeviceBuffer>> kv_storage;
          uint64_t kv_bytes = 0;
          mo.kv = allocate_kv_pools(c, head_shard(c, tp, mapping.tp_rank()).kv_heads.size(), w.layer_backend,
                                    kCtx / Backend::kKvBlockSize, Backend::kKvBlockSize, GgmlType::F32, &kv_storage,
                                    &kv_bytes);
          const LlamaModel model(c, mapping, comm, std::move(w), mo);
          EXPECT_EQ(d.kv_bytes, kv_bytes);
          const double truth = static_cast<double>(weights + kv_bytes + model.workspace_bytes());
          EXPECT_LE(std::abs(static_cast<double>(d.total_bytes) - truth), 0.05 * truth)
              << "planner " << d.total_bytes << " (weights " << d.weight_bytes << ", KV " << d.kv_bytes
              << ", workspace " << d.workspace_bytes << ") vs engine " << truth << " (workspace "
              << model.workspace_bytes() << ")";
          ++checked;
        }
      }
    EXPECT_GE(checked, 1 + 2 + 4 + 2 + 4 + 8 + 4 + 8 + 16);
  }
  std::remove(q4.c_str());
}

// Mixtures of experts, as Hugging Face directories (one 2-D tensor per expert) and converted to GGUF Q8_0
// (3-D ffn_*_exps, each expert allocated apart): the planner's bytes per rank equal the loader's at tp 1/2/4
// x pp 1/2, with every rank holding 1/tp of every expert and under expert parallelism (whole experts, 8
// over 2 or 4 ranks). Q8_0 experts of width 64 cannot be cut 4 ways (a block is 32 wide): refused without
// expert parallelism, planned with it.
TEST(PlanVsLoader, MixtureOfExpertsWeightBytesEqualWithAndWithoutExpertParallelism) {
  DeviceRequest dreq;
  dreq.cpu_mem = "64G";
  dreq.cpu_cores = 16;
  DeviceInventory inv = make_inventory(dreq);
  inv.gpus.clear();
  for (const char* fixture : {"tiny-qwen3moe", "tiny-mixtral"})
    for (bool gguf : {false, true}) {
      const std::string dir = std::string(SHARDLM_SOURCE_DIR) + "/tests/data/hf/" + fixture;
      std::string path = dir;
      if (gguf) {
        path = std::string(SHARDLM_BINARY_DIR) + "/plan-vs-loader-" + fixture + "-" + std::to_string(::getpid()) + ".gguf";
        export_gguf(*open_model_source(dir), path, "q8_0");
      }
      SCOPED_TRACE(path);
      const auto src = open_model_source(path);
      const ModelDesc desc = model_desc_from_source(*src);
      const ModelConfig& c = src->config();
      ASSERT_TRUE(c.moe());
      int checked = 0;
      std::map<std::pair<int, int>, uint64_t> total;  // (tp, pp): bytes over all ranks without expert parallelism
      for (bool ep : {false, true})
        for (int tp : {1, 2, 4})
          for (int pp : {1, 2}) {
            if (ep && tp == 1) continue;
            SCOPED_TRACE(testing::Message() << "tp " << tp << " pp " << pp << (ep ? " expert-parallel" : ""));
            PlanRequest req;
            req.ctx = 256;
            req.batch = 64;
            req.kv_type = GgmlType::F32;
            req.tp = tp;
            req.pp = pp;
            req.expert_parallel = ep;
            if (gguf && !ep && c.ffn_width() / 32 < tp) {
              // tiny-qwen3moe's Q8_0 experts, 64 wide, are 2 blocks of 32: tp 4 would cut blocks; whole
              // experts need no cut. (tiny-mixtral's are 128 wide.)
              try {
                make_plan(desc, inv, req);
                ADD_FAILURE() << "tp 4 accepted";
              } catch (const Error& e) {
                EXPECT_NE(std::string(e.what()).find("a split would cut a quantization block"), std::string::npos)
                    << e.what();
              }
              checked += tp * pp;
              continue;
            }
            const Plan plan = make_plan(desc, inv, req);
            ASSERT_TRUE(plan.fits);
            ASSERT_EQ(plan.chosen.devices.size(), static_cast<size_t>(tp * pp));
            uint64_t sum = 0;
            for (int r = 0; r < tp * pp; ++r) {
              const Mapping mapping(tp * pp, r, tp, pp, static_cast<int>(c.n_layer), {}, static_cast<int>(c.n_expert), ep);
              auto backend = make_cpu_backend(1);
              const ModelWeights w = load_weights(*src, mapping, *backend);
              EXPECT_EQ(plan.chosen.devices[static_cast<size_t>(r)].weight_bytes, w.weight_bytes) << "rank " << r;
              sum += w.weight_bytes;
              ++checked;
            }
            // Expert parallelism stores each expert once per stage, as the tensor-parallel cut does (in tp
            // slices): the same bytes over the stage's ranks.
            if (!ep) {
              total[{tp, pp}] = sum;
            } else if (total.count({tp, pp})) {
              EXPECT_EQ(sum, total.at({tp, pp}));
            }
          }
      EXPECT_EQ(checked, (1 + 2 + 4) * 3 + (2 + 4) * 3);
      if (gguf) std::remove(path.c_str());
    }
}

TEST(PlanGlue, TinyModelStaysOnOneRankAndPinnedLayoutsAreKept) {
  const auto src = open_model_source(std::string(SHARDLM_SOURCE_DIR) + "/models/aidreams260K.gguf");
  const ModelDesc m = model_desc_from_source(*src);
  RunPlanRequest rq;
  rq.ctx = 256;
  rq.cpu_mem = "16G";
  rq.cpu_cores = 8;
  RunPlan rp = plan_run(m, rq);
  EXPECT_EQ(rp.tp, 1);
  EXPECT_EQ(rp.pp, 1);
  EXPECT_NE(rp.summary.find("tp 1 x pp 1"), std::string::npos) << rp.summary;
  rq.tp = 2;
  rq.pp = 2;
  rp = plan_run(m, rq);
  EXPECT_EQ(rp.tp, 2);
  EXPECT_EQ(rp.pp, 2);
  // Under mpirun -np 4 without a layout: a layout of 4 ranks.
  rq.tp.reset();
  rq.pp.reset();
  rq.world_size = 4;
  rp = plan_run(m, rq);
  EXPECT_EQ(rp.tp * rp.pp, 4);
}

TEST(PlanGlue, LayoutOverTheRamIsRefusedWithTheNumbers) {
  // Llama 3.1 8B q4_k_m (4.92 GB of weights) cannot fit 4 GiB of RAM on any layout; with 64 GiB it fits
  // on one rank.
  const ModelDesc m = model_desc_from_preset("llama-3.1-8b", "q4_k_m");
  RunPlanRequest rq;
  rq.ctx = 4096;
  rq.kv_type = GgmlType::F16;
  rq.cpu_cores = 8;
  rq.cpu_mem = "64G";
  const RunPlan ok = plan_run(m, rq);
  EXPECT_EQ(ok.tp, 1);
  EXPECT_EQ(ok.pp, 1);
  for (bool pinned : {false, true}) {
    SCOPED_TRACE(pinned);
    rq.cpu_mem = "4G";
    if (pinned) {
      rq.tp = 2;
      rq.pp = 1;
    }
    try {
      plan_run(m, rq);
      ADD_FAILURE() << "no error";
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_EQ(e.exit_code(), 2);
      EXPECT_NE(msg.find("does not fit"), std::string::npos) << msg;
      EXPECT_NE(msg.find("needs"), std::string::npos) << msg;
      EXPECT_NE(msg.find("has"), std::string::npos) << msg;
      EXPECT_NE(msg.find("4.00 GiB"), std::string::npos) << msg;
      EXPECT_NE(msg.find(pinned ? "CPU rank 1" : "CPU needs"), std::string::npos) << msg;
    }
  }
  rq.cpu_mem = "lots";
  EXPECT_THROW(plan_run(m, rq), Error);
}

}  // namespace
}  // namespace shardlm
