#include "plan/shard.h"

#include <algorithm>
#include <cstring>

#include "core/error.h"

namespace shardlm {

Range even_split(int64_t n, int parts, int index) {
  SHARDLM_CHECK(parts >= 1 && index >= 0 && index < parts);
  const int64_t base = n / parts, extra = n % parts;
  const int64_t begin = index * base + std::min<int64_t>(index, extra);
  return {begin, begin + base + (index < extra ? 1 : 0)};
}

HeadShard head_shard(const ModelConfig& c, int tp_size, int tp_rank) {
  const int64_t group = c.n_head / c.n_head_kv;  // query heads per KV head
  HeadShard s;
  if (tp_size <= c.n_head_kv) {
    s.kv_heads = even_split(c.n_head_kv, tp_size, tp_rank);
    s.q_heads = {s.kv_heads.begin * group, s.kv_heads.end * group};
    return s;
  }
  // More ranks than KV heads: replicate each KV head over tp_size / n_head_kv ranks.
  if (tp_size % c.n_head_kv != 0 || c.n_head % tp_size != 0)
    fail("tensor parallel size ", tp_size, " cannot split ", c.n_head, " query heads and ", c.n_head_kv,
         " KV heads: above n_head_kv it must be a multiple of n_head_kv (", c.n_head_kv,
         ") and divide n_head (", c.n_head, ")");
  const int64_t q_per_rank = c.n_head / tp_size;
  s.q_heads = {tp_rank * q_per_rank, (tp_rank + 1) * q_per_rank};
  const int64_t kv = s.q_heads.begin / group;
  s.kv_heads = {kv, kv + 1};
  return s;
}

Range ffn_shard(const ModelConfig& c, int64_t unit, int tp_size, int tp_rank) {
  const int64_t n_ff = c.ffn_width();  // every expert is cut the same way
  if (n_ff % unit != 0)
    fail(c.moe() ? "expert_feed_forward_length " : "n_ff ", n_ff, " is not a multiple of ffn_down's block size ", unit);
  const int64_t units = n_ff / unit;
  if (units < tp_size)
    fail("tensor parallel size ", tp_size, " exceeds the ", units, " blocks of ", unit,
         " FFN columns in ffn_down: a split would cut a quantization block");
  const Range r = even_split(units, tp_size, tp_rank);
  return {r.begin * unit, r.end * unit};
}

Range vocab_shard(const ModelConfig& c, int tp_size, int tp_rank) {
  return even_split(c.n_vocab, tp_size, tp_rank);
}

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

TensorShard make(ShardKind kind, Range r, int64_t ne0, int64_t ne1, GgmlType type, const std::string& name) {
  TensorShard s;
  s.kind = kind;
  s.range = r;
  s.ne0 = kind == ShardKind::kCols ? r.size() : ne0;
  s.ne1 = kind == ShardKind::kRows ? r.size() : ne1;
  if (kind == ShardKind::kCols && (r.begin % block_size(type) != 0 || r.end % block_size(type) != 0))
    fail("tensor '", name, "' (", type_name(type), "): columns [", r.begin, ", ", r.end,
         ") of this rank would cut a block of ", block_size(type),
         " elements; choose a tensor parallel size that keeps whole blocks");
  s.n_bytes = static_cast<uint64_t>(checked_mul<int64_t>(row_bytes(type, s.ne0), s.ne1, "shard bytes"));
  return s;
}

}  // namespace

int expert_index(const std::string& name) {
  for (const char* kind : {".ffn_gate.", ".ffn_up.", ".ffn_down."}) {
    const size_t at = name.find(kind);
    if (at == std::string::npos || !ends_with(name, ".weight")) continue;
    const size_t b = at + std::strlen(kind), e = name.size() - 7;
    if (b >= e || e - b > 6 || name.find_first_not_of("0123456789", b) != e) continue;
    return std::stoi(name.substr(b, e - b));
  }
  return -1;
}

TensorShard tensor_shard(const std::string& name, GgmlType type, int64_t ne0, int64_t ne1,
                         const ModelConfig& c, GgmlType down_type, int tp_size, int tp_rank, bool expert_parallel) {
  // The router is small and every rank routes its tokens itself.
  if (tp_size == 1 || name == "token_embd.weight" || ends_with(name, "_norm.weight") ||
      ends_with(name, "ffn_gate_inp.weight"))
    return make(ShardKind::kReplicated, {0, ne1}, ne0, ne1, type, name);
  if (name == "output.weight")
    return make(ShardKind::kRows, vocab_shard(c, tp_size, tp_rank), ne0, ne1, type, name);
  const HeadShard h = head_shard(c, tp_size, tp_rank);
  const int64_t hd = c.head_dim;
  // A bias is 1-D: ggml gives it ne = [n, 1], so its "output rows" are the elements of ne[0]. Slicing
  // ne[1] (length 1) would keep the whole vector on every rank and count n * n bytes.
  const bool vector = ends_with(name, ".bias") && ne1 == 1;
  const ShardKind out_rows = vector ? ShardKind::kCols : ShardKind::kRows;
  if (ends_with(name, "attn_q.weight") || ends_with(name, "attn_q.bias"))
    return make(out_rows, {h.q_heads.begin * hd, h.q_heads.end * hd}, ne0, ne1, type, name);
  if (ends_with(name, "attn_k.weight") || ends_with(name, "attn_v.weight") ||
      ends_with(name, "attn_k.bias") || ends_with(name, "attn_v.bias"))
    return make(out_rows, {h.kv_heads.begin * hd, h.kv_heads.end * hd}, ne0, ne1, type, name);
  if (ends_with(name, "attn_output.weight"))
    return make(ShardKind::kCols, {h.q_heads.begin * hd, h.q_heads.end * hd}, ne0, ne1, type, name);
  // An expert (one slice of ffn_*_exps, or blk.L.ffn_*.E.weight) is cut like a dense FFN of its width, or
  // held whole by the rank its expert belongs to under expert parallelism (the loader and the planner take
  // only that rank's experts).
  const auto expert = [&](const char* kind) {
    return ends_with(name, std::string(kind) + "_exps.weight") ||
           (expert_index(name) >= 0 && name.find(std::string(kind) + ".") != std::string::npos);
  };
  const bool is_expert = expert("ffn_gate") || expert("ffn_up") || expert("ffn_down");
  if (is_expert && expert_parallel) return make(ShardKind::kReplicated, {0, ne1}, ne0, ne1, type, name);
  const Range f = ffn_shard(c, block_size(down_type), tp_size, tp_rank);
  const auto is = [&](const char* kind) { return ends_with(name, std::string(kind) + ".weight") || expert(kind); };
  if (is("ffn_gate") || is("ffn_up")) return make(ShardKind::kRows, f, ne0, ne1, type, name);
  if (is("ffn_down")) return make(ShardKind::kCols, f, ne0, ne1, type, name);
  fail("tensor '", name, "' has no tensor-parallel sharding rule");
}

void check_shardable(const ModelConfig& c, GgmlType attn_output_type, GgmlType ffn_down_type, int tp_size,
                     bool expert_parallel) {
  for (int r = 0; r < tp_size; ++r) {
    tensor_shard("blk.0.attn_output.weight", attn_output_type, c.q_dim(), c.n_embd, c, ffn_down_type,
                 tp_size, r);
    if (!expert_parallel)  // whole experts are never cut
      tensor_shard(c.moe() ? "blk.0.ffn_down_exps.weight" : "blk.0.ffn_down.weight", ffn_down_type, c.ffn_width(),
                   c.n_embd, c, ffn_down_type, tp_size, r);
  }
}

}  // namespace shardlm
