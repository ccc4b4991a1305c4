// Experts in RAM beside a GPU (--cpu-moe, --n-cpu-moe, -ot): which layers go (expert_layers_in_ram, the
// rule the engine and the planner share), and the model's path for experts held on a backend apart from
// their layer's. That path is exercised here with two CPU backends - the layers on one, the experts on the
// other - so that every copy between them and every buffer of the path runs without a GPU; the logits must
// equal those of the same model with everything on one backend, bit for bit (same kernels, one thread
// each), and transformers' within the e2e bound. The CUDA + CPU case is test_hf_e2e_cuda's.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "backends/cpu/cpu_backend.h"
#include "comm/communicator.h"
#include "hf_reference.h"
#include "hf_test_util.h"
#include "loader/weights.h"
#include "model/llama.h"
#include "plan/expert_offload.h"
#include "plan/shard.h"

namespace shardlm::test {
namespace {

// 4 layers of 3-D experts, and the same with one tensor per expert (a Hugging Face directory's names).
ModelConfig moe_config() {
  ModelConfig c;
  c.arch = "qwen3moe";
  c.n_layer = 4;
  c.n_expert = 8;
  c.n_expert_used = 2;
  return c;
}
std::vector<std::string> names_3d(int n_layer) {
  std::vector<std::string> v = {"token_embd.weight", "output.weight", "output_norm.weight"};
  for (int l = 0; l < n_layer; ++l)
    for (const char* t : {"attn_q.weight", "attn_norm.weight", "ffn_gate_inp.weight", "ffn_gate_exps.weight",
                          "ffn_up_exps.weight", "ffn_down_exps.weight", "ffn_norm.weight"})
      v.push_back("blk." + std::to_string(l) + "." + t);
  return v;
}
std::vector<std::string> names_per_expert(int n_layer, int n_expert) {
  std::vector<std::string> v = {"token_embd.weight"};
  for (int l = 0; l < n_layer; ++l) {
    v.push_back("blk." + std::to_string(l) + ".ffn_gate_inp.weight");
    for (int e = 0; e < n_expert; ++e)
      for (const char* k : {"ffn_gate", "ffn_up", "ffn_down"})
        v.push_back("blk." + std::to_string(l) + "." + k + "." + std::to_string(e) + ".weight");
  }
  return v;
}
std::vector<bool> bits(std::initializer_list<int> v) {
  std::vector<bool> b;
  for (int x : v) b.push_back(x != 0);
  return b;
}

TEST(ExpertsInRam, WhichLayersGo) {
  const ModelConfig c = moe_config();
  for (const auto& names : {names_3d(4), names_per_expert(4, 8)}) {
    SCOPED_TRACE(names.back());
    EXPECT_EQ(expert_layers_in_ram(c, names, 0, {}), bits({0, 0, 0, 0}));
    EXPECT_EQ(expert_layers_in_ram(c, names, 2, {}), bits({1, 1, 0, 0}));
    EXPECT_EQ(expert_layers_in_ram(c, names, 100000, {}), bits({1, 1, 1, 1}));  // --cpu-moe
    // llama.cpp's usual patterns; per-expert names match under their 3-D name.
    EXPECT_EQ(expert_layers_in_ram(c, names, 0, {"exps=CPU"}), bits({1, 1, 1, 1}));
    EXPECT_EQ(expert_layers_in_ram(c, names, 0, {"blk\\.[12]\\.ffn_.*_exps=CPU"}), bits({0, 1, 1, 0}));
    EXPECT_EQ(expert_layers_in_ram(c, names, 0, {"blk\\.(2|3)\\.ffn_(up|down|gate)_exps\\.weight=CPU"}),
              bits({0, 0, 1, 1}));
    // First match wins, and overrides come before --n-cpu-moe (llama.cpp applies -ot first).
    EXPECT_EQ(expert_layers_in_ram(c, names, 0, {"blk\\.0\\.=CUDA0,exps=CPU"}), bits({0, 1, 1, 1}));
    EXPECT_EQ(expert_layers_in_ram(c, names, 3, {"blk\\.1\\.=CUDA"}), bits({1, 0, 1, 0}));
  }
}

TEST(ExpertsInRam, RefusalsNameTheFlagAndValue) {
  const ModelConfig c = moe_config();
  const auto names = names_3d(4);
  expect_error([&] { expert_layers_in_ram(c, names, 0, {"exps"}); }, {"-ot", "'exps'", "PATTERN=DEVICE"});
  expect_error([&] { expert_layers_in_ram(c, names, 0, {"=CPU"}); }, {"'=CPU'", "PATTERN=DEVICE"});
  expect_error([&] { expert_layers_in_ram(c, names, 0, {"exps=GPU7"}); }, {"device 'GPU7'", "CPU, CUDA or CUDA<n>"});
  expect_error([&] { expert_layers_in_ram(c, names, 0, {"a=b=CPU"}); }, {"device 'b=CPU'"});
  expect_error([&] { expert_layers_in_ram(c, names, 0, {"exps=CPU,"}); }, {"''", "PATTERN=DEVICE"});
  expect_error([&] { expert_layers_in_ram(c, names, 0, {"(exps=CPU"}); }, {"'(exps'", "not a regular expression"});
  expect_error([&] { expert_layers_in_ram(c, names, 0, {"attn_q=CPU"}); },
               {"'attn_q=CPU'", "blk.0.attn_q.weight", "only expert tensors"});
  expect_error([&] { expert_layers_in_ram(c, names, 0, {"ffn_gate_inp=CPU"}); }, {"blk.0.ffn_gate_inp.weight", "router"});
  expect_error([&] { expert_layers_in_ram(c, names, 0, {"blk\\.2\\.ffn_down_exps=CPU"}); },
               {"layer 2", "1 of its expert tensors in RAM and 2 on the GPU", "must go together"});
  expect_error([&] { expert_layers_in_ram(c, names, -1, {}); }, {"--n-cpu-moe -1"});
  ModelConfig dense;
  dense.n_layer = 4;
  expect_error([&] { expert_layers_in_ram(dense, names, 1, {}); }, {"--cpu-moe/--n-cpu-moe", "no experts"});
}

// One rank's model over `placement`, all logits of `ids` (n, n_vocab).
std::vector<float> run(const ModelSource& src, Backend& layers, Backend* experts, const std::vector<int32_t>& ids) {
  const ModelConfig& c = src.config();
  const Mapping m(1, 0, 1, 1, static_cast<int>(c.n_layer), {}, static_cast<int>(c.n_expert), false);
  Placement p = Placement::all_on(layers, static_cast<int>(c.n_layer));
  if (experts) p.experts.assign(static_cast<size_t>(c.n_layer), experts);
  ModelWeights w = load_weights(src, m, p);
  if (experts) {
    EXPECT_GT(w.expert_host_bytes, 0u);
    EXPECT_LT(w.expert_host_bytes, w.weight_bytes);
  }
  auto comm = make_single_rank_communicator();
  ModelOptions mo;
  mo.n_batch = 64;
  std::vector<std::unique_ptr<DeviceBuffer>> storage;
  uint64_t kv_bytes = 0;
  const int64_t bs = Backend::kKvBlockSize, n_blocks = 64 / bs;
  mo.kv = allocate_kv_pools(c, c.n_head_kv, w.layer_backend, n_blocks, bs, GgmlType::F32, &storage, &kv_bytes);
  LlamaModel model(c, m, *comm, std::move(w), mo);
  std::vector<int32_t> blocks(static_cast<size_t>(n_blocks));
  for (int64_t b = 0; b < n_blocks; ++b) blocks[static_cast<size_t>(b)] = static_cast<int32_t>(b);
  const BatchInfo batch = BatchInfo::single(0, static_cast<int64_t>(ids.size()), blocks, true);
  EXPECT_TRUE(model.forward(batch, ids.data()));
  std::vector<float> out;
  model.logits(&out);
  return out;
}

TEST(ExpertsApart, SameLogitsAsOneBackendAndTransformers) {
  for (const char* fixture : {"tiny-qwen3moe", "tiny-mixtral"}) {
    SCOPED_TRACE(fixture);
    const std::string dir = hf_fixture(fixture);
    const auto src = open_model_source(dir);
    const auto ref = load_reference(dir);
    auto a = make_cpu_backend(1), b = make_cpu_backend(1);
    for (const RefCase& rc : ref) {
      const std::vector<float> one = run(*src, *a, nullptr, rc.prompt_ids);
      const std::vector<float> apart = run(*src, *a, b.get(), rc.prompt_ids);
      ASSERT_EQ(one.size(), apart.size());
      ASSERT_EQ(one.size(), rc.prompt_ids.size() * rc.logits_last.size());
      EXPECT_EQ(one, apart);
      // Against transformers, as test_hf_e2e bounds these fixtures (exact RoPE frequencies).
      const float* last = apart.data() + (rc.prompt_ids.size() - 1) * rc.logits_last.size();
      EXPECT_LE(worst_share(last, rc.logits_last, 1e-4, 1e-4).share, 1.0);
    }
  }
}

}  // namespace
}  // namespace shardlm::test
