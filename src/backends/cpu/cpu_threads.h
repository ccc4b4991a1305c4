// How many threads a CPU rank runs by default: the logical CPUs it may run on, shared with the other ranks
// of its host that may run on them too. Pure functions over affinity masks, so the rule is tested with
// made-up masks; Engine gathers the real masks of the host's ranks (runtime/host_threads.h).
#pragma once

#include <cstdint>
#include <initializer_list>
#include <vector>

namespace shardlm {

// A set of logical CPUs, bit i = CPU i (sched_getaffinity's cpu_set_t as 64-bit words).
class CpuMask {
 public:
  CpuMask() = default;
  explicit CpuMask(std::vector<uint64_t> words) : words_(std::move(words)) {}
  // CPUs first .. first+count-1, e.g. range(0, 16) for a 16-CPU host.
  static CpuMask range(int first, int count);
  static CpuMask of(std::initializer_list<int> cpus);
  // The CPUs this process may run on (sched_getaffinity, any number of CPUs); all of
  // std::thread::hardware_concurrency() in the unlikely case the call fails.
  static CpuMask of_this_process();

  void add(int cpu);
  bool has(int cpu) const;
  int count() const;
  const std::vector<uint64_t>& words() const { return words_; }
  int n_bits() const { return static_cast<int>(words_.size()) * 64; }

 private:
  std::vector<uint64_t> words_;
};

// Threads for the rank `me` of a host whose ranks may run on `local_masks` (indexed by local rank): each
// of its CPUs is divided evenly among the ranks that may run on it, and the rank gets the whole number of
// CPUs its shares add up to, at least 1. Ranks that share every CPU split them (2 ranks on 16: 8 each;
// 3 ranks: 5 each); ranks bound to disjoint CPUs each get theirs; a rank whose mask another's covers only
// in part keeps the CPUs it has alone (16 CPUs, one of them shared with a rank bound to it: 15). The
// threads of all ranks then add up to at most the CPUs of the host, unless there are more ranks than CPUs
// (every rank still runs 1).
int default_cpu_threads(const std::vector<CpuMask>& local_masks, int me);

}  // namespace shardlm
