#include "backends/cpu/cpu_threads.h"

#include <sched.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cmath>
#include <thread>

#include "core/error.h"

namespace shardlm {

CpuMask CpuMask::range(int first, int count) {
  CpuMask m;
  for (int c = first; c < first + count; ++c) m.add(c);
  return m;
}

CpuMask CpuMask::of(std::initializer_list<int> cpus) {
  CpuMask m;
  for (int c : cpus) m.add(c);
  return m;
}

CpuMask CpuMask::of_this_process() {
  // cpu_set_t holds 1024 CPUs; the kernel refuses (EINVAL) a set smaller than its own, so grow until it fits.
  for (int n = CPU_SETSIZE; n <= (1 << 20); n *= 2) {
    cpu_set_t* set = CPU_ALLOC(n);
    if (!set) break;
    const size_t bytes = CPU_ALLOC_SIZE(n);
    const int rc = sched_getaffinity(0, bytes, set);
    const int err = errno;
    CpuMask m;
    if (rc == 0)
      for (int c = 0; c < n; ++c)
        if (CPU_ISSET_S(c, bytes, set)) m.add(c);
    CPU_FREE(set);
    if (rc == 0) return m;
    if (err != EINVAL) break;
  }
  return range(0, std::max(1, static_cast<int>(std::thread::hardware_concurrency())));
}

void CpuMask::add(int cpu) {
  SHARDLM_CHECK(cpu >= 0, "cpu ", cpu);
  const size_t w = static_cast<size_t>(cpu) / 64;
  if (words_.size() <= w) words_.resize(w + 1, 0);
  words_[w] |= uint64_t{1} << (cpu % 64);
}

bool CpuMask::has(int cpu) const {
  const size_t w = static_cast<size_t>(cpu) / 64;
  return cpu >= 0 && w < words_.size() && ((words_[w] >> (cpu % 64)) & 1) != 0;
}

int CpuMask::count() const {
  int n = 0;
  for (uint64_t w : words_) n += std::popcount(w);
  return n;
}

int default_cpu_threads(const std::vector<CpuMask>& local_masks, int me) {
  SHARDLM_CHECK(me >= 0 && static_cast<size_t>(me) < local_masks.size(), "local rank ", me, " of ",
                local_masks.size());
  const CpuMask& mine = local_masks[static_cast<size_t>(me)];
  double share = 0;
  for (int c = 0; c < mine.n_bits(); ++c) {
    if (!mine.has(c)) continue;
    int sharers = 0;
    for (const CpuMask& m : local_masks) sharers += m.has(c) ? 1 : 0;
    share += 1.0 / sharers;
  }
  // The shares are fractions with small denominators; the margin keeps 24 thirds from summing to 7.999...
  return std::max(1, static_cast<int>(std::floor(share + 1e-6)));
}

}  // namespace shardlm
