// Tensor-parallel sharding as pure functions of (config, tensor, tp_size, tp_rank): the loader uses them to
// cut weights, the model to size its activations, the planner to count bytes, so the three always agree.
//
// Rules (docs/parallelism.md explains why):
// - Column-parallel (output rows split): attn_q/attn_k/attn_v (+ biases) by heads, ffn_gate/ffn_up by FFN
//   units, output.weight by vocabulary rows (logits are all-gathered).
// - Row-parallel (input columns split, one all-reduce after): attn_output by query heads, ffn_down by FFN units.
// - Replicated: token_embd (a lookup reads one row per token, so splitting saves memory but no bandwidth),
//   all norms.
// - KV heads: split in contiguous ranges (sizes differ by at most one) while tp_size <= n_head_kv; q heads
//   follow their KV head's group. When tp_size > n_head_kv, each KV head is replicated on tp_size/n_head_kv
//   consecutive ranks (needs tp_size % n_head_kv == 0 and n_head % tp_size == 0).
// - FFN units: n_ff is split in units of the block size of ffn_down's type (so a row-parallel slice never
//   cuts a quantization block), sizes differing by at most one unit.
// A layout that would cut a quantized block (e.g. attn_output with an odd number of 64-wide heads per rank
// in Q4_K) is refused by check_shardable() before anything is allocated.
#pragma once

#include <cstdint>
#include <string>

#include "config/model_config.h"
#include "core/dtype.h"

namespace shardlm {

struct Range {
  int64_t begin = 0;
  int64_t end = 0;
  int64_t size() const { return end - begin; }
};

// Part `index` of `n` units split into `parts` contiguous ranges whose sizes differ by at most one
// (the first n % parts ranges are one larger).
Range even_split(int64_t n, int parts, int index);

struct HeadShard {
  Range q_heads;   // query heads this rank computes
  Range kv_heads;  // KV heads it stores (may overlap other ranks' when replicated)
};
// Throws Error when the head counts cannot be split over tp_size (see the rules above).
HeadShard head_shard(const ModelConfig& c, int tp_size, int tp_rank);

// FFN hidden units [begin, end) of this rank; `unit` is the block size of ffn_down's type.
Range ffn_shard(const ModelConfig& c, int64_t unit, int tp_size, int tp_rank);
Range vocab_shard(const ModelConfig& c, int tp_size, int tp_rank);

// The expert of a per-expert matrix name ("blk.3.ffn_up.7.weight" gives 7, for ffn_gate/ffn_up/ffn_down),
// or -1 for any other name (3-D ffn_*_exps tensors included).
int expert_index(const std::string& name);

enum class ShardKind { kReplicated, kRows, kCols };
struct TensorShard {
  ShardKind kind = ShardKind::kReplicated;
  Range range;        // rows (ne[1]) for kRows, columns (ne[0]) for kCols; the whole dim otherwise
  int64_t ne0 = 0;    // shape of the shard (ggml order)
  int64_t ne1 = 0;
  uint64_t n_bytes = 0;
};

// How this rank holds tensor `name` (GGUF naming) of type `type` and full shape (ne0, ne1).
// `down_type` is ffn_down's type of the same layer (FFN units follow its block size). Experts are cut like a
// dense FFN of expert_feed_forward_length, or kept whole under expert parallelism (Mapping::experts() says
// which of them a rank holds).
TensorShard tensor_shard(const std::string& name, GgmlType type, int64_t ne0, int64_t ne1,
                         const ModelConfig& c, GgmlType down_type, int tp_size, int tp_rank,
                         bool expert_parallel = false);

// Throws Error (naming the tensor, its type, the slice and the block size) if any tensor of a model with
// these types would be cut inside a block at this tp_size. `type_of(name)` gives each tensor's type.
void check_shardable(const ModelConfig& c, GgmlType attn_output_type, GgmlType ffn_down_type, int tp_size,
                     bool expert_parallel = false);

}  // namespace shardlm
