// Golden cases from tests/data/golden (llama2.c's run.c, float32, argmax): loading and the conversion of
// the llama2.c checkpoints of tests/data/models to GGUF, shared by the model and parallel tests.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "../support/fixtures.h"
#include "loader/gguf_export.h"
#include "loader/llama2c_source.h"

namespace shardlm::test {

struct GoldenLogits {
  int64_t pos;
  std::vector<float> logits;  // (n_vocab)
};

struct GoldenCase {
  std::string prompt;
  std::vector<int32_t> prompt_ids;
  std::vector<int32_t> generated_ids;
  std::vector<GoldenLogits> logits;
};

inline std::vector<GoldenCase> load_golden(const std::string& name) {
  const std::string path = fixture_path("golden/" + name + ".greedy.json");
  std::ifstream f(path);
  if (!f) throw std::runtime_error("cannot open " + path);
  const nlohmann::json j = nlohmann::json::parse(f);
  std::vector<GoldenCase> out;
  for (const auto& c : j.at("cases")) {
    GoldenCase g;
    if (c.contains("prompt") && c["prompt"].is_string()) g.prompt = c["prompt"].get<std::string>();
    g.prompt_ids = c.at("prompt_ids").get<std::vector<int32_t>>();
    g.generated_ids = c.at("generated_ids").get<std::vector<int32_t>>();
    for (const auto& l : c.at("logits")) g.logits.push_back({l.at("pos").get<int64_t>(), l.at("logits").get<std::vector<float>>()});
    out.push_back(std::move(g));
  }
  return out;
}

// Converts a llama2.c model of tests/data/models (with the aidreams tokenizer, which stories260K shares) to GGUF in the
// build tree once, the way `shardlm convert --from llama2c` does.
inline std::string converted_model(const std::string& name) {
  const std::string out = std::string(SHARDLM_BINARY_DIR) + "/test-" + name + ".gguf";
  std::ifstream probe(out);
  if (!probe) {
    auto src = open_llama2c_source(fixture_path("models/" + name + ".bin"),
                                   fixture_path("models/aidreams260K.tok512.bin"));
    // A file of this process's own, renamed into place whole: ctest runs test processes at once, and two
    // of them may convert the same model together.
    const std::string part = out + "." + std::to_string(getpid()) + ".part";
    export_gguf(*src, part, "");
    std::rename(part.c_str(), out.c_str());
  }
  return out;
}

}  // namespace shardlm::test
