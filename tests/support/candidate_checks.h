// One check shared by the tests of every top-k implementation (host, CUDA): the candidates a backend returned
// against the test's own ranking of the same logits.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "ops/candidates.h"

namespace shardlm::testing_support {

// `order`: every id of `logits` (n) in candidate order, as the test ranked them itself. `top` must hold the first
// min(k, n) of them, with their logits bit for bit (a NaN logit as a NaN).
inline void expect_candidates(const std::vector<TokenCandidate>& top, const std::vector<int>& order,
                              const float* logits /* (n) */, int64_t n, int k, const std::string& what) {
  ASSERT_EQ(top.size(), static_cast<size_t>(std::min<int64_t>(k, n))) << what;
  for (size_t i = 0; i < top.size(); ++i) {
    ASSERT_EQ(top[i].id, order[i]) << what << " rank " << i;
    const float want = logits[static_cast<size_t>(order[i])];
    if (std::isnan(want))
      EXPECT_TRUE(std::isnan(top[i].logit)) << what << " rank " << i;
    else
      EXPECT_EQ(top[i].logit, want) << what << " rank " << i;
  }
}

}  // namespace shardlm::testing_support
