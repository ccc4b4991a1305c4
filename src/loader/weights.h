// Cuts this rank's slice out of a model source and places it in a backend's memory.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "loader/model_source.h"
#include "model/llama.h"
#include "ops/backend.h"
#include "plan/mapping.h"

namespace shardlm {

// What one rank holds of one tensor, for layout reports ("which rank holds which layers and shards").
struct HeldTensor {
  std::string name;
  GgmlType type;
  int64_t ne0, ne1;      // shard shape (ggml order)
  Range range;           // rows or columns of the full tensor
  ShardKind kind;
  uint64_t bytes;
};

// Which backend holds what: the embedding, the output head, and each of this stage's layers (CPU offload
// puts the first layers on the CPU backend and the rest on a GPU).
struct Placement {
  Backend* embd = nullptr;
  Backend* out = nullptr;
  std::vector<Backend*> layers;  // (stage layers)
  // (stage layers) where each layer's experts live and run, when not with their layer (experts in RAM
  // beside a GPU layer: --cpu-moe); empty: every layer's experts with it.
  std::vector<Backend*> experts;
  static Placement all_on(Backend& b, int n_stage_layers) {
    return {&b, &b, std::vector<Backend*>(static_cast<size_t>(n_stage_layers), &b), {}};
  }
};

// Loads the weights `mapping` assigns to this rank. On a CPU backend, row slices of the file are used in
// place (mapped, no copy); column slices, dtype conversions and device backends copy. Refuses tensors the
// backend cannot compute with, shapes that contradict the config, and splits that would cut a block,
// before allocating. `progress(done, total)` reports bytes.
ModelWeights load_weights(const ModelSource& src, const Mapping& mapping, const Placement& placement,
                          std::vector<HeldTensor>* held = nullptr,
                          const std::function<void(uint64_t, uint64_t)>& progress = nullptr);
// Everything on one backend.
ModelWeights load_weights(const ModelSource& src, const Mapping& mapping, Backend& backend,
                          std::vector<HeldTensor>* held = nullptr,
                          const std::function<void(uint64_t, uint64_t)>& progress = nullptr);

// Checks, without loading, that every tensor this layout needs exists with the expected shape and that
// the TP split keeps whole blocks (experts are not cut under expert parallelism). Throws Error naming the
// tensor.
void check_layout(const ModelSource& src, int tp_size, bool expert_parallel = false);

}  // namespace shardlm
