// A model on disk, whatever its format: its config, its tokenizer vocabulary and its weight tensors
// under GGUF names and ggml layouts. The model and the sharding code only ever see this interface, so
// GGUF files and Hugging Face directories load, split and run through the same path.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "config/model_config.h"
#include "core/dtype.h"
#include "tokenizer/tokenizer.h"

namespace shardlm {

struct SourceTensor {
  std::string name;                         // GGUF name, e.g. "blk.3.attn_q.weight"
  GgmlType type = GgmlType::F32;
  int n_dims = 0;
  std::array<int64_t, 4> ne{1, 1, 1, 1};    // ggml order: ne[0] is the row length
  const uint8_t* data = nullptr;            // mapped from the file or owned by the source; lives as long as it
  uint64_t n_bytes = 0;
};

class ModelSource {
 public:
  virtual ~ModelSource() = default;
  virtual const ModelConfig& config() const = 0;
  virtual const std::vector<SourceTensor>& tensors() const = 0;
  // nullptr when the source carries no tokenizer (HF directories without tokenizer.json, bare GGUFs).
  virtual const Vocab* vocab() const = 0;
  // Chat template text (GGUF tokenizer.chat_template / tokenizer_config.json), empty when absent.
  virtual std::string chat_template() const { return {}; }
  virtual std::string format_name() const = 0;  // "gguf", "hf-safetensors"
  virtual std::string path() const = 0;

  // Throws Error naming the tensor when absent.
  const SourceTensor& tensor(const std::string& name) const;
  const SourceTensor* find_tensor(const std::string& name) const;
};

// A .gguf file, or a directory holding config.json + *.safetensors (Hugging Face layout).
std::unique_ptr<ModelSource> open_model_source(const std::string& path);

}  // namespace shardlm
