#include "runtime/kv_pool.h"

#include "core/error.h"

namespace shardlm {

KvBlockAllocator::KvBlockAllocator(int64_t n_blocks) {
  if (n_blocks < 1 || n_blocks > (int64_t{1} << 30)) fail("KV pool of ", n_blocks, " blocks is outside [1, 2^30]");
  refs_.assign(static_cast<size_t>(n_blocks), 0);
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
    const int32_t id = *free_.begin();
    free_.erase(free_.begin());
    refs_[static_cast<size_t>(id)] = 1;
    out->push_back(id);
  }
  return true;
}

void KvBlockAllocator::retain(int32_t id) {
  check(id);
  if (refs_[static_cast<size_t>(id)] == 0) fail_kind(ErrorKind::kInternal, "retain of free KV block ", id);
  ++refs_[static_cast<size_t>(id)];
}

void KvBlockAllocator::release(int32_t id) {
  check(id);
  int32_t& r = refs_[static_cast<size_t>(id)];
  if (r == 0) fail_kind(ErrorKind::kInternal, "release of free KV block ", id);
  if (--r == 0) free_.insert(id);
}

void KvBlockAllocator::release_all(const std::vector<int32_t>& ids) {
  for (int32_t id : ids) release(id);
}

int32_t KvBlockAllocator::holders(int32_t id) const {
  check(id);
  return refs_[static_cast<size_t>(id)];
}

}  // namespace shardlm
