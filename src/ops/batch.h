// The batch descriptor of one forward step: which sequences it holds, which tokens belong to each, their
// positions, where each sequence's KV rows live in the paged cache, and which rows need logits. A single
// request is a batch of one sequence; decode of B requests is B sequences of one token each; a prompt chunk
// is one sequence of many tokens; a step may mix both.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace shardlm {

// One layer's KV cache pool in a backend's memory: n_blocks blocks of block_size positions each. Position p
// of a sequence lives in pool block table[p / block_size] (the sequence's block table, BatchInfo) at row
// p % block_size. Every layer of a rank has a pool of the same shape and the same block ids, so one block
// table serves all layers.
struct KvLayerView {
  GgmlType type = GgmlType::F32;  // F32, F16, BF16, Q8_0 or Q4_0 (kv_type_check)
  int64_t n_blocks = 0;           // blocks in the pool
  int64_t block_size = 0;         // positions per block
  int64_t n_head_kv = 0;
  int64_t head_dim = 0;
  void* k = nullptr;  // (n_blocks, block_size, n_head_kv, head_dim)
  void* v = nullptr;  // (n_blocks, block_size, n_head_kv, head_dim)

  int64_t row_width() const { return n_head_kv * head_dim; }  // elements of one position's K (or V) row
  // Bytes of one position's K (or V) row. Quantized types store each head's head_dim values as whole
  // 32-value blocks (kv_type_check), so a head's slice starts at a block boundary.
  int64_t row_bytes() const { return row_width() / block_size_of_type() * type_bytes(); }
  // Element index (cache_row() + head * head_dim + i, i a multiple of the type's block) to its address.
  const void* at(const void* base, int64_t elem) const {
    return static_cast<const char*>(base) + elem / block_size_of_type() * type_bytes();
  }
  void* at(void* base, int64_t elem) const { return static_cast<char*>(base) + elem / block_size_of_type() * type_bytes(); }

 private:
  int64_t block_size_of_type() const { return shardlm::block_size(type); }
  int64_t type_bytes() const { return shardlm::type_size(type); }
};

// KV cache types the CPU and reference backends store and read: f32, f16, bf16, and, for head_dim a
// multiple of 32 (llama.cpp refuses them otherwise too), q8_0 and q4_0 blocks written as each token's K/V is
// stored and read inside attention. Throws Error naming the type and the head_dim.
void kv_type_check(GgmlType type, int64_t head_dim);
// Parses "f32", "f16", "bf16", "q8_0", "q4_0" (Error naming `flag` otherwise).
GgmlType parse_kv_type(const std::string& s, const std::string& flag);

// One sequence's share of a step. Its tokens are [tok0, tok0 + n_tok) of the step, at positions
// [pos0, pos0 + n_tok); after the step its cache holds positions [0, pos0 + n_tok) and the step's queries
// attend causally over them.
struct BatchSeq {
  int32_t tok0 = 0;   // first token of this sequence within the step
  int32_t n_tok = 0;  // its tokens in this step (1 in decode), >= 1
  int32_t pos0 = 0;   // position of its first token in the sequence
  int32_t ctx() const { return pos0 + n_tok; }  // positions in the cache after the step
};

struct BatchInfo {
  int64_t n_tok = 0;                  // tokens in the step: the sum of seqs[s].n_tok, in sequence order
  std::vector<BatchSeq> seqs;         // (n_seq) in token order: seqs[0].tok0 = 0, each starting where the last ends
  int64_t max_blocks = 0;             // columns of block_table: blocks of the longest possible sequence
  std::vector<int32_t> block_table;   // (n_seq, max_blocks) pool block ids; row s's first
                                      // ceil(seqs[s].ctx() / block_size) entries are valid, the rest -1
  std::vector<int32_t> out_rows;      // tokens (indices into the step) whose logits are wanted, ascending

  int64_t n_seq() const { return static_cast<int64_t>(seqs.size()); }
  const int32_t* blocks(int64_t s) const { return block_table.data() + s * max_blocks; }
  // Position of each token (n_tok) and the sequence each token belongs to (n_tok), in step order.
  std::vector<int32_t> token_positions() const;
  std::vector<int32_t> token_seqs() const;
  // Element offset of position `pos` of sequence s's K (or V) row in a pool laid out as kv describes.
  int64_t cache_row(const KvLayerView& kv, int64_t s, int64_t pos) const {
    return (int64_t{blocks(s)[pos / kv.block_size]} * kv.block_size + pos % kv.block_size) * kv.row_width();
  }
  // Throws Error naming the field when the descriptor is inconsistent (token ranges, block table, out rows)
  // or does not fit `kv_blocks` blocks of `block_size` positions.
  void validate(int64_t kv_blocks, int64_t block_size) const;

  // A batch of one sequence: tokens [0, n_tok) at positions [pos0, pos0 + n_tok), cache blocks `blocks`
  // (its block table), logits for the last token or for all.
  static BatchInfo single(int64_t pos0, int64_t n_tok, const std::vector<int32_t>& blocks, bool all_logits);
};

}  // namespace shardlm
