// The paged KV cache's bookkeeping: which of a rank's fixed-size KV blocks are free, how many sequences
// hold each one, and which full blocks hold a known token prefix (prefix caching). The blocks themselves
// (one pool per layer, the same ids in every layer) are KvLayerView buffers the engine allocates; this
// class only hands out ids, so it is a pure value that the scheduler owns and tests can drive without a
// model.
#pragma once

#include <cstdint>
#include <list>
#include <set>
#include <unordered_map>
#include <vector>

namespace shardlm {

class KvBlockAllocator {
 public:
  explicit KvBlockAllocator(int64_t n_blocks);

  int64_t n_blocks() const { return static_cast<int64_t>(refs_.size()); }
  // Blocks no sequence holds: never used or freed, plus cached ones kept for a later prefix match (they are
  // given out again, least recently released first, when no other block is left).
  int64_t n_free() const { return static_cast<int64_t>(free_.size() + evictable_.size()); }
  int64_t n_used() const { return n_blocks() - n_free(); }
  int64_t n_cached() const { return static_cast<int64_t>(by_hash_.size()); }  // held or not

  // Takes n blocks no sequence holds, each with one holder, appended to `out`: never-cached ones first
  // (lowest ids first), then cached ones, least recently released first (their content is forgotten).
  // Returns false and takes nothing when fewer than n are free.
  bool allocate(int64_t n, std::vector<int32_t>* out);
  // One more holder of a block in use (a prompt prefix shared by several sequences), or of a cached block
  // that lookup() found (held by nobody until now).
  void retain(int32_t id);
  // One fewer holder; the block is free again when none is left (kept for prefix matches when cached).
  // Releasing a free block is a bug and throws.
  void release(int32_t id);
  void release_all(const std::vector<int32_t>& ids);
  int32_t holders(int32_t id) const;

  // ---- Prefix caching ----
  // A full block is known by its tokens and by the cached block before it in its sequence (`parent`, -1
  // for a sequence's first block): a key that names the whole prefix, checked exactly on every match (a
  // hash collision cannot hand out another prefix's KV rows). When a parent block is given out for new
  // content, the blocks cached after it can no longer match.
  //
  // The cached block that holds `tokens` (n of them, a whole block) after `parent`, or -1.
  int32_t lookup(int32_t parent, const int32_t* tokens, int64_t n) const;
  // Records that held block `id` now holds `tokens` after `parent` (its KV rows are computed). Returns the
  // block that is cached for that content from now on: `id`, or an earlier block that already holds it
  // (then `id` stays uncached). Sequences chain their next block's key to the returned block.
  int32_t publish(int32_t id, int32_t parent, const int32_t* tokens, int64_t n);

 private:
  struct Key {
    int32_t parent = -1;
    uint64_t parent_gen = 0;  // the parent's generation when this block was cached
    uint64_t hash = 0;        // its by_hash_ bucket
    std::vector<int32_t> tokens;
  };
  void check(int32_t id) const;
  uint64_t hash(int32_t parent, const int32_t* tokens, int64_t n) const;
  bool matches(int32_t id, int32_t parent, const int32_t* tokens, int64_t n) const;
  void forget(int32_t id);  // drops a cached block's key (it is about to hold new content)

  std::vector<int32_t> refs_;   // (n_blocks) holders of each block
  std::vector<uint64_t> gen_;   // (n_blocks) bumped each time a block is given out for new content
  std::vector<Key> key_;        // (n_blocks) the content key of cached blocks
  std::vector<bool> cached_;    // (n_blocks) whether key_ is valid
  std::set<int32_t> free_;      // uncached ids with no holder, ascending
  std::list<int32_t> evictable_;  // cached ids with no holder, least recently released first
  std::vector<std::list<int32_t>::iterator> evictable_pos_;  // (n_blocks) valid while in evictable_
  std::unordered_multimap<uint64_t, int32_t> by_hash_;       // key hash -> cached block
};

// Blocks of `block_size` positions needed to hold `positions` positions.
inline int64_t kv_blocks_for(int64_t positions, int64_t block_size) { return (positions + block_size - 1) / block_size; }

}  // namespace shardlm
