// What a model costs in bytes: every tensor (block types included), per layer and per rank under tensor
// parallelism (through tensor_shard(), so the planner counts exactly what the loader will allocate), the
// KV cache per token, and the workspace of one forward pass. Pure functions, no hardware.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "config/model_config.h"
#include "core/dtype.h"

namespace shardlm {

class GgufFile;

struct TensorDesc {
  std::string name;          // GGUF name, e.g. "blk.3.ffn_down.weight"
  GgmlType type = GgmlType::F32;
  std::vector<int64_t> ne;   // ggml order, ne[0] = row length
  int layer = -1;            // -1 outside the repeating blocks
  uint64_t n_bytes = 0;      // the whole tensor: row_bytes(type, ne[0]) * ne[1] * ...
  int64_t n_elements() const;
};

// A model as the planner sees it: hyper-parameters plus the type and shape of every tensor.
struct ModelDesc {
  ModelConfig config;
  std::string source;  // "preset llama-3.1-70b, q4_k_m" or the GGUF path, for reports
  std::string scheme;  // quantization scheme for presets; "" for files
  std::vector<TensorDesc> tensors;

  uint64_t weight_bytes() const;  // sum over all tensors
  int64_t n_params() const;       // sum of elements
  const TensorDesc* find(std::string_view name) const;  // nullptr if absent
  // The matrices a decode step multiplies, by type: every tensor of two or more dimensions but the token
  // embedding (of which a step reads one row), which with a tied output is the output matrix and counts.
  struct TypeShare {
    GgmlType type;
    double bytes = 0, params = 0;
  };
  std::vector<TypeShare> matmul_types() const;
};

// The layer a GGUF tensor name belongs to ("blk.{i}.…" gives i), or -1 outside the repeating blocks.
// Throws Error naming `where` and the tensor when i is not a layer of a model with n_layer layers.
int tensor_layer(const std::string& name, int64_t n_layer, const std::string& where);

// Throws Error naming the preset or scheme (and listing the known ones) when either is unknown.
ModelDesc model_desc_from_preset(std::string_view preset, std::string_view scheme);
ModelDesc model_desc_from_config(const ModelConfig& c, std::string_view scheme);
// Types and shapes from the file's tensor infos, hyper-parameters from config_from_gguf(). Throws Error
// when a repeating-block tensor the model needs is missing. (Defined in model_desc_gguf.cpp so that users
// of the rest of the cost model do not link the GGUF reader.)
ModelDesc model_desc_from_gguf(const GgufFile& f);

// Device memory one weight allocation of n bytes takes on a GPU. The CUDA backend gives every matrix shard
// its own cudaMalloc, and the driver hands out allocations of 1 MiB and more in whole 2 MiB pages: 70B Q4_0
// at tp 4 has k/v shards of 1.125 MiB and q/o/gate/up/down shards of 9 or 31.5 MiB, ~0.4 GiB of rounding per
// rank, which is what its ranks used beyond those of the same model in BF16 (whose shards are whole pages;
// docs/planner.md, Calibration). Smaller ones are counted as they are.
uint64_t gpu_alloc_bytes(uint64_t n);
// What that adds to n: gpu_alloc_bytes(n) - n.
uint64_t gpu_alloc_pad(uint64_t n);

// Bytes one tensor-parallel rank holds, split by where they live.
struct RankWeights {
  std::vector<uint64_t> layer_bytes;  // per layer, this rank's shards of blk.{i}.*
  std::vector<uint64_t> layer_expert_bytes;  // per layer, the part of layer_bytes that is experts (a token
                                             // reads n_expert_used of n_expert of them)
  std::vector<uint64_t> layer_gpu_pad;  // per layer, what gpu_alloc_pad adds to those shards on a GPU
  std::vector<uint64_t> layer_expert_gpu_pad;  // per layer, the part of layer_gpu_pad that is experts
  uint64_t token_embd_gpu_pad = 0;      // the same for the other tensors
  uint64_t output_gpu_pad = 0;
  uint64_t output_norm_gpu_pad = 0;
  uint64_t token_embd_bytes = 0;      // replicated lookup table (first stage)
  uint64_t token_embd_row_bytes = 0;  // what a lookup of one token reads
  uint64_t output_bytes = 0;          // this rank's vocabulary rows of the output matrix (last stage);
                                      // tied models: those rows of token_embd (the loader's slice)
  GgmlType output_type = GgmlType::F32;  // the output matrix's (token_embd's for tied models)
  uint64_t output_norm_bytes = 0;     // last stage
  uint64_t other_bytes = 0;           // tensors outside the blocks (rope_freqs): the loader keeps them in
                                      // the config (host), so they are reported but not counted per rank
  int64_t kv_heads = 0;               // KV heads this rank caches
  int64_t q_heads = 0;
  int64_t ff_units = 0;               // FFN columns this rank computes
  int64_t vocab_rows = 0;             // vocabulary rows of the output shard
};

// Per-rank weights at tensor-parallel size tp for every tp_rank, counted as load_weights() counts them:
// matrices in their file type through tensor_shard(), norms and biases converted to f32 (biases sliced).
// Throws Error (from tensor_shard /
// head_shard: the tensor, the slice and the block size) when tp cannot split this model. expert_parallel:
// the experts partitioned whole over the tp ranks (Mapping::experts()).
std::vector<RankWeights> rank_weights(const ModelDesc& m, int tp, bool expert_parallel = false);

// Bytes of K and V for one token in one layer on a rank holding `kv_heads` heads (kv_type f32, f16, bf16, q8_0 or q4_0).
uint64_t kv_bytes_per_token_layer(const ModelConfig& c, int64_t kv_heads, GgmlType kv_type);
// Throws Error naming --kv-type unless t is F16 or F32.
void check_kv_type(GgmlType t);

// Scratch memory of one forward pass over `batch` tokens on one rank (fp32 activations), as LlamaModel
// allocates it: hidden state, its norm and the attention output (3 x batch x n_embd), q and the attention
// result (2 x batch x q_heads x head_dim), k and v, FFN gate and up (2 x batch x ff_units), and on the
// last stage one row of local and one of gathered logits. `attention_scores` adds batch x q_heads x ctx
// scores (GPU kernels without flash attention); the CPU backend's attention works in fixed chunks of
// positions (a few hundred KiB a thread, whatever the context).
uint64_t workspace_bytes(const ModelConfig& c, const RankWeights& r, int64_t batch, int64_t ctx,
                         bool last_stage, bool attention_scores = true);

// Floating-point operations of one token through one layer at context `ctx` (2 per matmul weight plus
// attention's q.k and p.v), for prefill estimates.
double layer_flops_per_token(const ModelConfig& c, int64_t ctx);
// Of that, the n_expert_used experts' FFN matmuls of a mixture of experts (0 for a dense model).
double expert_flops_per_token(const ModelConfig& c);

}  // namespace shardlm
