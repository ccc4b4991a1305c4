#include "ops/candidates.h"

#include <algorithm>
#include <functional>

#include "core/error.h"

namespace shardlm {

std::vector<TokenCandidate> top_candidates_host(const float* logits, int64_t n, int k) {
  if (n < 1 || n > INT32_MAX || k < 1) fail_kind(ErrorKind::kInternal, "top_candidates_host: n = ", n, ", k = ", k);
  const size_t keep = static_cast<size_t>(std::min<int64_t>(k, n));
  std::vector<uint64_t> keys(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) keys[static_cast<size_t>(i)] = candidate_key(logits[i], static_cast<uint32_t>(i));
  std::partial_sort(keys.begin(), keys.begin() + static_cast<std::ptrdiff_t>(keep), keys.end(), std::greater<>());
  std::vector<TokenCandidate> out(keep);
  for (size_t i = 0; i < keep; ++i) out[i] = candidate_from_key(keys[i]);
  return out;
}

}  // namespace shardlm
