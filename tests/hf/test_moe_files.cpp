// Malformed mixture-of-experts files are refused with a message naming the field or tensor, never a crash:
// each case is the tiny-qwen3moe fixture (a Hugging Face directory, one tensor per expert) or its GGUF
// conversion (3-D ffn_*_exps tensors) with one thing broken - the expert count 0 or above the tensors',
// expert_used_count above expert_count, a 3-D tensor whose third dimension is not the expert count (its
// bytes the same), a per-expert checkpoint missing one expert, and old-style GGUF files with one 2-D
// tensor per expert (which load, and which are refused when one expert is missing). Loading goes as far as
// load_weights on a CPU backend, where every tensor is checked.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>

#include "backends/cpu/cpu_backend.h"
#include "formats/gguf.h"
#include "hf_test_util.h"
#include "loader/gguf_export.h"
#include "loader/weights.h"
#include "plan/mapping.h"

namespace shardlm::test {
namespace {

std::string slurp(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// Opens `path` and loads every weight one rank (tp 1) holds, as the engine does.
void open_and_load(const std::string& path) {
  const auto src = open_model_source(path);
  const ModelConfig& c = src->config();
  const Mapping m(1, 0, 1, 1, static_cast<int>(c.n_layer), {}, static_cast<int>(c.n_expert), false);
  auto backend = make_cpu_backend(1);
  load_weights(*src, m, *backend);
}

// The fixture converted to GGUF F16 once per process.
const std::string& base_gguf() {
  static const std::string path = [] {
    const std::string p = std::string(SHARDLM_BINARY_DIR) + "/moe-files-" + std::to_string(::getpid()) + ".gguf";
    export_gguf(*open_model_source(hf_fixture("tiny-qwen3moe")), p, "f16");
    return p;
  }();
  return path;
}

struct RemoveBase {
  ~RemoveBase() { std::remove((std::string(SHARDLM_BINARY_DIR) + "/moe-files-" + std::to_string(::getpid()) + ".gguf").c_str()); }
} remove_base;

// A copy of `in` with its key/values passed through `kv` (return false to drop one; it may add its own to
// the writer) and its tensors through `tensor` (which adds what it wants written in their place).
using TensorEdit = std::function<void(GgufWriter&, const GgufTensorInfo&, const uint8_t*)>;
void rewrite_gguf(const std::string& in, const std::string& out,
                  const std::function<bool(GgufWriter&, const GgufKV&)>& kv, const TensorEdit& tensor) {
  const auto f = GgufFile::open(in);
  GgufWriter w;
  for (const GgufKV& e : f->kvs())
    if (e.key != "general.alignment" && kv(w, e)) w.set_value(e.key, e.value);
  for (const GgufTensorInfo& t : f->tensors()) tensor(w, t, f->tensor_data(t));
  w.write(out);
}
void copy_tensor(GgufWriter& w, const GgufTensorInfo& t, const uint8_t* data) {
  w.add_tensor(t.name, t.type, std::vector<int64_t>(t.ne.begin(), t.ne.begin() + t.n_dims), data);
}

// One key set to a u32 value, the rest copied.
void with_u32(const std::string& key, uint32_t v, const std::string& out) {
  rewrite_gguf(base_gguf(), out,
               [&](GgufWriter& w, const GgufKV& e) {
                 if (e.key != key) return true;
                 w.set_u32(key, v);
                 return false;
               },
               copy_tensor);
}

TEST(MoeFiles, TheConvertedFixtureLoads) { EXPECT_NO_THROW(open_and_load(base_gguf())); }

TEST(MoeFiles, ExpertCountsOutsideTheirRangeAreRefused) {
  TempDir dir;
  const std::string out = (dir.path / "bad.gguf").string();
  with_u32("qwen3moe.expert_count", 0, out);
  expect_error([&] { open_and_load(out); }, {"qwen3moe needs an expert count", "expert_count"});
  with_u32("qwen3moe.expert_count", 5000, out);
  expect_error([&] { open_and_load(out); }, {"expert_count = 5000", "[0, 4096]"});
  // Above the tensors' 8: the first 3-D tensor checked names its third dimension.
  with_u32("qwen3moe.expert_count", 16, out);
  expect_error([&] { open_and_load(out); }, {"bad.gguf", "blk.0.ffn_down_exps.weight", "8, 1]", "third dimension",
                                             "expert_count = 16"});
  with_u32("qwen3moe.expert_used_count", 9, out);
  expect_error([&] { open_and_load(out); }, {"expert_used_count = 9", "expert_count = 8"});
  with_u32("qwen3moe.expert_used_count", 0, out);
  expect_error([&] { open_and_load(out); }, {"expert_used_count = 0"});
}

// ffn_up_exps as {128, 128, 4}: the same bytes as {128, 64, 8}, the experts cut wrongly.
TEST(MoeFiles, ThirdDimensionOtherThanTheExpertCountIsRefused) {
  TempDir dir;
  const std::string out = (dir.path / "bad.gguf").string();
  rewrite_gguf(base_gguf(), out, [](GgufWriter&, const GgufKV&) { return true; },
               [](GgufWriter& w, const GgufTensorInfo& t, const uint8_t* data) {
                 if (t.name != "blk.1.ffn_up_exps.weight") return copy_tensor(w, t, data);
                 ASSERT_EQ(t.n_dims, 3);
                 w.add_tensor(t.name, t.type, {t.ne[0], t.ne[1] * 2, t.ne[2] / 2}, data);
               });
  expect_error([&] { open_and_load(out); }, {"blk.1.ffn_up_exps.weight", "third dimension", "expert_count = 8"});
}

// llama.cpp's older layout: one 2-D blk.L.ffn_*.E.weight per expert. It loads to the same bytes; without
// expert 5 of layer 2's ffn_down it is refused naming both names it looked for.
TEST(MoeFiles, PerExpertGgufLoadsAndAMissingExpertIsRefused) {
  TempDir dir;
  for (bool drop : {false, true}) {
    const std::string out = (dir.path / (drop ? "missing.gguf" : "split.gguf")).string();
    rewrite_gguf(base_gguf(), out, [](GgufWriter&, const GgufKV&) { return true; },
                 [&](GgufWriter& w, const GgufTensorInfo& t, const uint8_t* data) {
                   if (t.n_dims != 3) return copy_tensor(w, t, data);
                   const std::string kind = t.name.substr(0, t.name.size() - std::strlen("_exps.weight"));
                   const uint64_t per = t.n_bytes / static_cast<uint64_t>(t.ne[2]);
                   for (int64_t e = 0; e < t.ne[2]; ++e) {
                     const std::string name = kind + "." + std::to_string(e) + ".weight";
                     if (drop && name == "blk.2.ffn_down.5.weight") continue;
                     w.add_tensor(name, t.type, {t.ne[0], t.ne[1]}, data + per * static_cast<uint64_t>(e));
                   }
                 });
    if (!drop) {
      EXPECT_NO_THROW(open_and_load(out));
    } else {
      expect_error([&] { open_and_load(out); },
                   {"missing.gguf", "expert 5 of layer 2", "blk.2.ffn_down_exps.weight", "blk.2.ffn_down.5.weight"});
    }
  }
}

// The Hugging Face directory with config.json edited, or with one expert's tensor taken out of the
// safetensors file (the rest repacked, as a writer would have written it).
TEST(MoeFiles, HuggingFaceDirectoriesWithBadExpertsAreRefused) {
  const nlohmann::json config = nlohmann::json::parse(slurp(hf_fixture("tiny-qwen3moe/config.json")));
  const std::string st = slurp(hf_fixture("tiny-qwen3moe/model.safetensors"));
  const auto make = [&](const nlohmann::json& cfg, const std::string& drop) {
    auto dir = std::make_unique<TempDir>();
    write_text(dir->path / "config.json", cfg.dump());
    uint64_t hlen = 0;
    std::memcpy(&hlen, st.data(), 8);
    nlohmann::json header = nlohmann::json::parse(st.substr(8, hlen));
    std::vector<std::pair<uint64_t, std::string>> order;  // by data offset
    for (auto& [name, t] : header.items())
      if (name != "__metadata__" && name != drop) order.emplace_back(t["data_offsets"][0].get<uint64_t>(), name);
    std::sort(order.begin(), order.end());
    nlohmann::json out_header = nlohmann::json::object();
    if (header.contains("__metadata__")) out_header["__metadata__"] = header["__metadata__"];
    std::string data;
    for (const auto& [off, name] : order) {
      const auto& t = header[name];
      const uint64_t b = t["data_offsets"][0], e = t["data_offsets"][1];
      out_header[name] = t;
      out_header[name]["data_offsets"] = {data.size(), data.size() + (e - b)};
      data += st.substr(8 + hlen + b, e - b);
    }
    std::string h = out_header.dump();
    while (h.size() % 8 != 0) h += ' ';
    std::vector<uint8_t> bytes = st_bytes(h, 0);
    bytes.insert(bytes.end(), data.begin(), data.end());
    write_file(dir->path / "model.safetensors", bytes);
    return dir;
  };
  {
    auto d = make(config, "");
    EXPECT_NO_THROW(open_and_load(d->str()));  // the repacking itself keeps a good file good
  }
  {
    auto d = make(config, "model.layers.1.mlp.experts.3.up_proj.weight");
    expect_error([&] { open_and_load(d->str()); },
                 {"model.layers.1.mlp.experts.3.up_proj.weight", "blk.1.ffn_up.3.weight", "is missing"});
  }
  for (const auto& [key, value, needle] : std::vector<std::tuple<std::string, int, std::string>>{
           {"num_local_experts", 0, "'num_local_experts' = 0 is below the minimum 1"},
           {"num_experts_per_tok", 9, "'num_experts_per_tok' = 9 exceeds 'num_local_experts' = 8"},
           {"num_experts_per_tok", 0, "'num_experts_per_tok' = 0 is below the minimum 1"},
           {"num_local_experts", 16, "16"}}) {
    SCOPED_TRACE(key + " = " + std::to_string(value));
    nlohmann::json cfg = config;
    cfg[key] = value;
    auto d = make(cfg, "");
    expect_error([&] { open_and_load(d->str()); }, {needle});
  }
}

}  // namespace
}  // namespace shardlm::test
