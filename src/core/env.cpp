#include "core/env.h"

#include <cstdlib>
#include <type_traits>

#include "core/cuda_tuning.h"
#include "core/error.h"

namespace shardlm {

std::optional<std::string> env_value(const char* name) {
  const char* v = std::getenv(name);
  if (!v || !*v) return std::nullopt;
  return std::string(v);
}

std::optional<bool> parse_switch(const char* name, const char* value, const char* meaning) {
  if (!value || !*value) return std::nullopt;
  const std::string v = value;
  if (v != "0" && v != "1") fail(name, "='", v, "' is not 0 or 1 (", meaning, ")");
  return v == "1";
}

std::optional<bool> env_switch(const char* name, const char* meaning) {
  return parse_switch(name, std::getenv(name), meaning);
}

CudaTuning cuda_tuning_from_env() {
  CudaTuning t;
  const auto flag = [](const char* name, bool& out, const char* meaning) {
    if (const auto on = env_switch(name, meaning)) out = *on;
  };
  const auto number = [](const char* name, long lo, long hi, const char* meaning, auto& out) {
    const auto p = env_value(name);
    if (!p) return;
    char* end = nullptr;
    const long n = std::strtol(p->c_str(), &end, 10);
    if (*end != '\0' || n < lo || n > hi) fail(name, "='", *p, "': expected ", lo, " to ", hi, " (", meaning, ")");
    out = static_cast<std::remove_reference_t<decltype(out)>>(n);
  };
  flag("SHARDLM_CUDA_PACK", t.pack_weights, "0: ggml layout, 1: packed, the default");
  flag("SHARDLM_CUDA_PREQUANT", t.prequant, "default 1");
  flag("SHARDLM_CUDA_FUSE_ROPE", t.fuse_rope, "default 1");
  flag("SHARDLM_CUDA_ATTN_OUT4", t.attn_out4, "default 1");
  flag("SHARDLM_CUDA_ATTN_LAST_BLOCK_COMBINE", t.attn_last_block_combine, "1: no combine kernel, the default");
  flag("SHARDLM_GRAPH_TIMING", t.graph_timing, "1: time each decode graph; default 0");
  number("SHARDLM_CUDA_ATTN_BLOCKS_PER_KV_HEAD", 0, 4, "decode attention blocks per KV head: 1, 2 or 4",
         t.attn_blocks_per_kv_head);
  number("SHARDLM_PK_VARIANT", 0, 4, "packed matvec variant", t.pk_variant);
  number("SHARDLM_CUDA_TOKENS_MAX", 1, 4096, "tokens per step for the several-token kernel", t.tokens_max);
  number("SHARDLM_CUDA_MMA_MAX", 0, 1000000, "tokens per step for the tensor-core kernel", t.mma_max);
  if (const auto p = env_value("SHARDLM_CUDA_SKIP")) t.skip = *p;
  return t;
}

}  // namespace shardlm
