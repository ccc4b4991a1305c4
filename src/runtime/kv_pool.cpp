#include "runtime/kv_pool.h"

#include <algorithm>

#include "core/error.h"

namespace shardlm {

KvBlockAllocator::KvBlockAllocator(int64_t n_blocks) {
  if (n_blocks < 1 || n_blocks > (int64_t{1} << 30)) fail("KV pool of ", n_blocks, " blocks is outside [1, 2^30]");
  const auto n = static_cast<size_t>(n_blocks);
  refs_.assign(n, 0);
  gen_.assign(n, 0);
  key_.resize(n);
  cached_.assign(n, false);
  evictable_pos_.resize(n);
  for (int64_t i = 0; i < n_blocks; ++i) free_.insert(free_.end(), static_cast<int32_t>(i));
}

void KvBlockAllocator::check(int32_t id) const {
  if (id < 0 || id >= n_blocks())
    fail_kind(ErrorKind::kInternal, "KV block ", id, " is outside the pool [0, ", n_blocks(), ")");
}

bool KvBlockAllocator::allocate(int64_t n, std::vector<int32_t>* out) {
  if (n < 0) fail_kind(ErrorKind::kInternal, "allocate ", n, " KV blocks");
  if (n > n_free()) return false;
  for (int64_t i = 0; i < n; ++i) {
    int32_t id = 0;
    if (!free_.empty()) {
      id = *free_.begin();
      free_.erase(free_.begin());
    } else {
      id = evictable_.front();
      evictable_.pop_front();
      forget(id);
    }
    refs_[static_cast<size_t>(id)] = 1;
    ++gen_[static_cast<size_t>(id)];  // blocks cached after it (keyed on its old content) stop matching
    out->push_back(id);
  }
  return true;
}

void KvBlockAllocator::retain(int32_t id) {
  check(id);
  int32_t& r = refs_[static_cast<size_t>(id)];
  if (r == 0) {
    if (!cached_[static_cast<size_t>(id)]) fail_kind(ErrorKind::kInternal, "retain of free KV block ", id);
    evictable_.erase(evictable_pos_[static_cast<size_t>(id)]);
  }
  ++r;
}

void KvBlockAllocator::release(int32_t id) {
  check(id);
  int32_t& r = refs_[static_cast<size_t>(id)];
  if (r == 0) fail_kind(ErrorKind::kInternal, "release of free KV block ", id);
  if (--r > 0) return;
  if (cached_[static_cast<size_t>(id)]) {
    evictable_pos_[static_cast<size_t>(id)] = evictable_.insert(evictable_.end(), id);
  } else {
    free_.insert(id);
  }
}

void KvBlockAllocator::release_all(const std::vector<int32_t>& ids) {
  for (int32_t id : ids) release(id);
}

int32_t KvBlockAllocator::holders(int32_t id) const {
  check(id);
  return refs_[static_cast<size_t>(id)];
}

uint64_t KvBlockAllocator::hash(int32_t parent, const int32_t* tokens, int64_t n) const {
  // FNV-1a over the parent's id and generation and the tokens: only a bucket index, every match is
  // checked against the whole key.
  uint64_t h = 1469598103934665603ull;
  const auto mix = [&h](uint64_t v) {
    for (int b = 0; b < 8; ++b) {
      h ^= (v >> (8 * b)) & 0xff;
      h *= 1099511628211ull;
    }
  };
  mix(static_cast<uint64_t>(static_cast<int64_t>(parent)));
  mix(parent >= 0 ? gen_[static_cast<size_t>(parent)] : 0);
  for (int64_t i = 0; i < n; ++i) mix(static_cast<uint32_t>(tokens[i]));
  return h;
}

bool KvBlockAllocator::matches(int32_t id, int32_t parent, const int32_t* tokens, int64_t n) const {
  const Key& k = key_[static_cast<size_t>(id)];
  if (!cached_[static_cast<size_t>(id)] || k.parent != parent) return false;
  if (parent >= 0 && (!cached_[static_cast<size_t>(parent)] || k.parent_gen != gen_[static_cast<size_t>(parent)]))
    return false;
  return static_cast<int64_t>(k.tokens.size()) == n && std::equal(tokens, tokens + n, k.tokens.begin());
}

int32_t KvBlockAllocator::lookup(int32_t parent, const int32_t* tokens, int64_t n) const {
  if (parent >= 0) check(parent);
  const auto [b, e] = by_hash_.equal_range(hash(parent, tokens, n));
  for (auto it = b; it != e; ++it)
    if (matches(it->second, parent, tokens, n)) return it->second;
  return -1;
}

int32_t KvBlockAllocator::publish(int32_t id, int32_t parent, const int32_t* tokens, int64_t n) {
  check(id);
  if (parent >= 0) check(parent);
  if (refs_[static_cast<size_t>(id)] == 0) fail_kind(ErrorKind::kInternal, "publish of free KV block ", id);
  if (cached_[static_cast<size_t>(id)]) {
    if (matches(id, parent, tokens, n)) return id;
    fail_kind(ErrorKind::kInternal, "KV block ", id, " is cached with other content");
  }
  if (const int32_t other = lookup(parent, tokens, n); other >= 0) return other;
  Key& k = key_[static_cast<size_t>(id)];
  k.parent = parent;
  k.parent_gen = parent >= 0 ? gen_[static_cast<size_t>(parent)] : 0;
  k.tokens.assign(tokens, tokens + n);
  k.hash = hash(parent, tokens, n);
  cached_[static_cast<size_t>(id)] = true;
  by_hash_.emplace(k.hash, id);
  return id;
}

void KvBlockAllocator::forget(int32_t id) {
  const Key& k = key_[static_cast<size_t>(id)];
  const auto [b, e] = by_hash_.equal_range(k.hash);
  for (auto it = b; it != e; ++it)
    if (it->second == id) {
      by_hash_.erase(it);
      break;
    }
  cached_[static_cast<size_t>(id)] = false;
  key_[static_cast<size_t>(id)] = Key{};
}

}  // namespace shardlm
