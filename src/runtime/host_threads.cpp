#include "runtime/host_threads.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#include "backends/cpu/cpu_threads.h"

namespace shardlm {

int host_default_cpu_threads(Communicator& comm) {
  const CpuMask mine = CpuMask::of_this_process();
  const size_t n = static_cast<size_t>(comm.local_size());
  // Masks end at their highest CPU, so their lengths may differ: agree on the longest, then gather.
  const uint64_t my_words = mine.words().size();
  std::vector<uint64_t> lengths(n);
  comm.local_all_gather(&my_words, lengths.data(), sizeof my_words);
  const size_t words = static_cast<size_t>(*std::max_element(lengths.begin(), lengths.end()));
  std::vector<uint64_t> padded = mine.words();
  padded.resize(words, 0);
  std::vector<uint64_t> all(n * words);  // (local_size, words)
  if (words > 0) comm.local_all_gather(padded.data(), all.data(), words * sizeof(uint64_t));
  std::vector<CpuMask> masks;
  for (size_t r = 0; r < n; ++r)
    masks.emplace_back(std::vector<uint64_t>(all.begin() + static_cast<ptrdiff_t>(r * words),
                                             all.begin() + static_cast<ptrdiff_t>((r + 1) * words)));
  return default_cpu_threads(masks, comm.local_rank());
}

}  // namespace shardlm
