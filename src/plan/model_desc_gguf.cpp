// Kept apart from cost_model.cpp so that programs using presets only do not link the GGUF reader.
#include <algorithm>
#include <charconv>

#include "core/error.h"
#include "formats/gguf.h"
#include "plan/cost_model.h"

namespace shardlm {

ModelDesc model_desc_from_gguf(const GgufFile& f) {
  ModelDesc m;
  m.config = config_from_gguf(f);
  m.source = f.path();
  for (const GgufTensorInfo& ti : f.tensors()) {
    TensorDesc t;
    t.name = ti.name;
    t.type = ti.type;
    t.ne.assign(ti.ne.begin(), ti.ne.begin() + std::max(ti.n_dims, 1));
    t.n_bytes = ti.n_bytes;
    // "blk.{i}." names the repeating block; anything else lives outside the layers.
    t.layer = tensor_layer(t.name, m.config.n_layer, f.path());
    m.tensors.push_back(std::move(t));
  }
  if (m.find("token_embd.weight") == nullptr) fail(f.path(), ": tensor 'token_embd.weight' is missing");
  if (m.find("output.weight") == nullptr) m.config.tied_output = true;
  return m;
}

int tensor_layer(const std::string& name, int64_t n_layer, const std::string& where) {
  if (name.rfind("blk.", 0) != 0) return -1;
  const char* b = name.data() + 4;
  const char* e = name.data() + name.size();
  int l = -1;
  auto [p, ec] = std::from_chars(b, e, l);
  if (ec != std::errc() || p == e || *p != '.' || l < 0 || l >= n_layer)
    fail(where, ": tensor '", name, "' names a layer outside [0, ", n_layer, ")");
  return l;
}

}  // namespace shardlm
