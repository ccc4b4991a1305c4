// Switches of the CUDA backend's kernels, for measuring one form against another (docs/cuda_kernels.md). The
// defaults are the measured choices. The library takes them as a value (EngineOptions::cuda,
// make_cuda_backend); the applications and measurement tools fill it from the environment with
// cuda_tuning_from_env, so that a script can flip a switch without a flag for each.
#pragma once

#include <cstdint>
#include <string>

namespace shardlm {

struct CudaTuning {
  bool pack_weights = true;             // SHARDLM_CUDA_PACK: quantized weights repacked for the matvecs (0: ggml layout)
  bool prequant = true;                 // SHARDLM_CUDA_PREQUANT: activations quantized by their producers
  bool fuse_rope = true;                // SHARDLM_CUDA_FUSE_ROPE: decode rope folded into the attention kernel
  bool attn_out4 = true;                // SHARDLM_CUDA_ATTN_OUT4: decode attention output step, one float4 a thread
  int attn_blocks_per_kv_head = 0;      // SHARDLM_CUDA_ATTN_BLOCKS_PER_KV_HEAD: 1, 2 or 4; 0 by the local KV heads
  bool attn_last_block_combine = true;  // SHARDLM_CUDA_ATTN_LAST_BLOCK_COMBINE: splits merged by the last block
  int pk_variant = 0;                   // SHARDLM_PK_VARIANT: packed matvec variant 0 to 4
  int64_t tokens_max = 0;               // SHARDLM_CUDA_TOKENS_MAX: several-token kernel's limit, 1 to 4096; 0 by type
  // SHARDLM_CUDA_MMA_MAX: steps above the several-token kernel's limit and up to this many tokens take the
  // tensor-core kernel for packed weights instead of dequantize-then-cuBLAS. 0 (never) until its second form is
  // measured against cuBLAS: the first lost (docs/BENCHMARKS.md, 2026-12-07 21:59Z).
  int64_t mma_max = 0;
  std::string skip;                     // SHARDLM_CUDA_SKIP: one-token kernel kinds not launched (measurement only)
  bool graph_timing = false;            // SHARDLM_GRAPH_TIMING: events around each decode graph replay
};

// The defaults with every SHARDLM_CUDA_* (and SHARDLM_PK_VARIANT, SHARDLM_GRAPH_TIMING) variable that is set
// applied; a value outside what the field allows fails naming the variable, the value and the range.
CudaTuning cuda_tuning_from_env();

}  // namespace shardlm
