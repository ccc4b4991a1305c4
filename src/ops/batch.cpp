#include "ops/batch.h"

#include <cmath>

#include "ops/backend.h"

#include "core/error.h"

namespace shardlm {

std::vector<int32_t> BatchInfo::token_positions() const {
  std::vector<int32_t> pos(static_cast<size_t>(n_tok));
  for (const BatchSeq& s : seqs)
    for (int32_t t = 0; t < s.n_tok; ++t) pos[static_cast<size_t>(s.tok0 + t)] = s.pos0 + t;
  return pos;
}

std::vector<int32_t> BatchInfo::token_seqs() const {
  std::vector<int32_t> seq(static_cast<size_t>(n_tok));
  for (size_t i = 0; i < seqs.size(); ++i)
    for (int32_t t = 0; t < seqs[i].n_tok; ++t) seq[static_cast<size_t>(seqs[i].tok0 + t)] = static_cast<int32_t>(i);
  return seq;
}

void kv_type_check(GgmlType type, int64_t head_dim) {
  switch (type) {
    case GgmlType::F32: case GgmlType::F16: case GgmlType::BF16: return;
    case GgmlType::Q8_0: case GgmlType::Q4_0:
      if (head_dim % block_size(type) != 0)
        fail("KV cache type ", type_name(type), " stores each head in ", block_size(type), "-value blocks; this model's "
             "head_dim ", head_dim, " is not a multiple of ", block_size(type), " (use f16 or f32)");
      return;
    default:
      fail("KV cache type ", type_name(type), " is not supported (f32, f16, bf16, q8_0, q4_0)");
  }
}

GgmlType parse_kv_type(const std::string& s, const std::string& flag) {
  if (s == "f32") return GgmlType::F32;
  if (s == "f16") return GgmlType::F16;
  if (s == "bf16") return GgmlType::BF16;
  if (s == "q8_0") return GgmlType::Q8_0;
  if (s == "q4_0") return GgmlType::Q4_0;
  fail(flag, " '", s, "' is not one of f32, f16, bf16, q8_0, q4_0");
}

void BatchInfo::validate(int64_t kv_blocks, int64_t block_size) const {
  if (seqs.empty()) fail("batch: no sequence in the step");
  if (block_size < 1) fail("batch: KV block size ", block_size, " must be >= 1");
  if (max_blocks < 1 || static_cast<int64_t>(block_table.size()) != n_seq() * max_blocks)
    fail("batch: block table holds ", block_table.size(), " entries for ", n_seq(), " sequences of ", max_blocks,
         " blocks");
  int64_t next = 0;
  for (int64_t s = 0; s < n_seq(); ++s) {
    const BatchSeq& q = seqs[static_cast<size_t>(s)];
    if (q.tok0 != next || q.n_tok < 1 || q.pos0 < 0)
      fail("batch: sequence ", s, " has tokens [", q.tok0, ", +", q.n_tok, ") at position ", q.pos0,
           "; expected tokens from ", next, ", at least one, at a position >= 0");
    next += q.n_tok;
    const int64_t need = (int64_t{q.ctx()} + block_size - 1) / block_size;
    if (need > max_blocks)
      fail("batch: sequence ", s, " reaches position ", q.ctx(), ", beyond its ", max_blocks, " blocks of ", block_size);
    for (int64_t b = 0; b < need; ++b) {
      const int32_t id = blocks(s)[b];
      if (id < 0 || id >= kv_blocks)
        fail("batch: sequence ", s, " block ", b, " is pool block ", id, ", outside [0, ", kv_blocks, ")");
    }
  }
  if (next != n_tok) fail("batch: sequences hold ", next, " tokens, the step ", n_tok);
  for (size_t i = 0; i < out_rows.size(); ++i)
    if (out_rows[i] < 0 || out_rows[i] >= n_tok || (i > 0 && out_rows[i] <= out_rows[i - 1]))
      fail("batch: logits row ", out_rows[i], " is outside [0, ", n_tok, ") or not ascending");
}

BatchInfo BatchInfo::single(int64_t pos0, int64_t n_tok, const std::vector<int32_t>& blocks, bool all_logits) {
  BatchInfo b;
  b.n_tok = n_tok;
  b.seqs.push_back(BatchSeq{0, checked_cast<int32_t>(n_tok, "batch tokens"), checked_cast<int32_t>(pos0, "batch position")});
  b.max_blocks = static_cast<int64_t>(blocks.size());
  b.block_table = blocks;
  if (all_logits) {
    for (int64_t t = 0; t < n_tok; ++t) b.out_rows.push_back(static_cast<int32_t>(t));
  } else {
    b.out_rows.push_back(static_cast<int32_t>(n_tok - 1));
  }
  return b;
}

void Backend::log_sum_exp_parts_host(const float* logits, int64_t n, double* max_out, double* sum_out) {
  double mx = -INFINITY;
  for (int64_t i = 0; i < n; ++i)
    if (std::isfinite(logits[i]) && logits[i] > mx) mx = logits[i];
  double sum = 0;
  if (std::isfinite(mx))
    for (int64_t i = 0; i < n; ++i)
      if (std::isfinite(logits[i])) sum += std::exp(double(logits[i]) - mx);
  *max_out = mx;
  *sum_out = sum;
}

}  // namespace shardlm
