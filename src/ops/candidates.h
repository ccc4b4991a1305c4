// Token candidates: the largest logits of a vocabulary (or of one rank's slice of it) with their ids, in
// one order that every sampler path and every backend share, so that a token chosen from candidates is
// the token the full logits would give.
//
// Order ("candidate order"): larger logit first; equal logits by lower id; -0 equals +0; NaN after every
// number (NaNs among themselves by lower id). It is the order of the 64-bit key below, largest key first,
// which is how the GPU kernels rank them too.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

namespace shardlm {

struct TokenCandidate {
  float logit = 0.0f;
  int32_t id = 0;  // index into the full vocabulary once a model returns it
};

// Order-preserving key: (ordered bits of the value) << 32 | ~index; NaN has value bits 0.
inline uint64_t candidate_key(float v, uint32_t index) {
  uint32_t ord = 0;
  if (v == v) {
    uint32_t b;
    std::memcpy(&b, &v, sizeof b);
    if (b == 0x80000000u) b = 0;  // -0 -> +0
    ord = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  }
  return (static_cast<uint64_t>(ord) << 32) | static_cast<uint32_t>(~index);
}

// Inverse of candidate_key (the value comes back with -0 as +0).
inline TokenCandidate candidate_from_key(uint64_t key) {
  const uint32_t ord = static_cast<uint32_t>(key >> 32);
  TokenCandidate c;
  c.id = static_cast<int32_t>(~static_cast<uint32_t>(key));
  if (ord == 0) {
    c.logit = __builtin_nanf("");
  } else {
    const uint32_t b = (ord & 0x80000000u) ? (ord & 0x7fffffffu) : ~ord;
    std::memcpy(&c.logit, &b, sizeof b);
  }
  return c;
}

inline bool candidate_before(const TokenCandidate& a, const TokenCandidate& b) {
  return candidate_key(a.logit, static_cast<uint32_t>(a.id)) > candidate_key(b.logit, static_cast<uint32_t>(b.id));
}

// One row's question to Backend::top_candidates: its k >= 1 first candidates and its logits at `extra`.
struct CandidateQuery {
  int k = 1;
  std::vector<int32_t> extra;  // indices into the row, each in [0, n)
};
struct CandidateAnswer {
  std::vector<TokenCandidate> top;  // min(k, n) candidates in candidate order, ids = indices into the row
  std::vector<float> extra_values;  // (extra.size()) the row's logits at the extra ids
};

// The min(k, n) first candidates of logits (n, host) in candidate order, ids = indices; k >= 1.
std::vector<TokenCandidate> top_candidates_host(const float* logits /* (n) */, int64_t n, int k);

}  // namespace shardlm
