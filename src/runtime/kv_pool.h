// The paged KV cache's bookkeeping: which of a rank's fixed-size KV blocks are free and how many
// sequences hold each one. The blocks themselves (one pool per layer, the same ids in every layer) are
// KvLayerView buffers the engine allocates; this class only hands out ids, so it is a pure value that the
// scheduler owns and tests can drive without a model.
#pragma once

#include <cstdint>
#include <set>
#include <vector>

namespace shardlm {

class KvBlockAllocator {
 public:
  explicit KvBlockAllocator(int64_t n_blocks);

  int64_t n_blocks() const { return static_cast<int64_t>(refs_.size()); }
  int64_t n_free() const { return static_cast<int64_t>(free_.size()); }
  int64_t n_used() const { return n_blocks() - n_free(); }

  // Takes n free blocks, lowest ids first, each with one holder, appended to `out`. Returns false and
  // takes nothing when fewer than n are free.
  bool allocate(int64_t n, std::vector<int32_t>* out);
  // One more holder of a block in use (a prompt prefix shared by several sequences).
  void retain(int32_t id);
  // One fewer holder; the block is free again when none is left. Releasing a free block is a bug and throws.
  void release(int32_t id);
  void release_all(const std::vector<int32_t>& ids);
  int32_t holders(int32_t id) const;

 private:
  void check(int32_t id) const;
  std::vector<int32_t> refs_;  // (n_blocks) holders of each block
  std::set<int32_t> free_;     // ids with no holder, ascending
};

// Blocks of `block_size` positions needed to hold `positions` positions.
inline int64_t kv_blocks_for(int64_t positions, int64_t block_size) { return (positions + block_size - 1) / block_size; }

}  // namespace shardlm
