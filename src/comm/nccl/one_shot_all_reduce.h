// A one-shot all-reduce over NVLink peer memory for small device buffers (GitHub issue 6, item 3).
//
// Tensor-parallel decode all-reduces a (tokens, n_embd) row twice per layer: 8-32 KB. For messages that
// small NCCL's cost is its fixed latency (~6.4 us inside a CUDA graph between two H100s), not bandwidth.
// Here every member maps every other member's buffer (CUDA IPC), and one kernel per call does the whole
// exchange: each rank copies its input into its own slot, tells its peers through a flag, waits for
// theirs, and reads and sums every member's slot in the same rank order (so every rank gets the same
// bits). docs/multi_gpu.md ("One-shot all-reduce") describes the protocol and why it is safe to replay.
//
// The NCCL communicator owns one of these per group, made at the group's first eligible all-reduce.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.h"

namespace shardlm::one_shot {

// The largest group: every block polls one flag per peer with one thread each, and the kernel argument
// holds one pointer per member.
constexpr int kMaxRanks = 8;
// Bytes of one data slot: the largest message the one-shot path can carry.
constexpr size_t kSlotBytes = size_t{256} << 10;
// Default SHARDLM_ALLREDUCE_ONESHOT_MAX_KB: decode rows of 8B (16 KB) and 70B (32 KB) models at batch 1-2.
// Above it NCCL's bandwidth-optimal algorithms start to pay off (to be measured: docs/multi_gpu.md).
constexpr size_t kDefaultMaxBytes = size_t{64} << 10;

enum class Mode {
  kAuto,     // one-shot for small device buffers where every pair of GPUs has peer access, NCCL otherwise
  kNccl,     // always NCCL
  kOneShot,  // like kAuto, but a group that cannot use the one-shot path is an error, not a silent fallback
};

struct Settings {
  Mode mode = Mode::kAuto;
  size_t max_bytes = kDefaultMaxBytes;  // all-reduces of at most this many bytes take the one-shot path
};

// SHARDLM_ALLREDUCE (auto|nccl|oneshot, default auto) and SHARDLM_ALLREDUCE_ONESHOT_MAX_KB (1..256,
// default 64). Null means unset. A bad value throws an Error naming the variable, the value and what is
// allowed.
Settings parse_settings(const char* mode, const char* max_kb);
Settings settings_from_env();
std::string describe(Mode m);

// Launch shape: fixed, because each block keeps its own call counter and only talks to the same block of
// its peers (no grid-wide sync); a grid that changed with n would let the counters drift apart.
// 16 x 512 threads x one float4 each cover 128 KB per pass.
constexpr int kBlocks = 16;
constexpr int kThreads = 512;

// The front of every member's exchange buffer, zeroed at creation. Two data slots of kSlotBytes follow
// at kFlagsBytes; call e uses slot e % 2.
struct Flags {
  uint32_t epoch[kBlocks];  // calls block b has finished here; only this rank touches it
  uint32_t error;           // nonzero once a block gave up waiting: later calls return at once
  // arrived[b][p] = e + 1 once member p's block b has put call e's data in p's slot; written by p.
  // Its own cache lines, away from the words this rank writes.
  alignas(128) uint32_t arrived[kBlocks][kMaxRanks];
};
constexpr size_t kFlagsBytes = 4096;
static_assert(sizeof(Flags) <= kFlagsBytes);
constexpr size_t kBufferBytes = kFlagsBytes + 2 * kSlotBytes;

// What the kernel needs; passed by value, so a CUDA graph replays exactly these pointers.
struct KernelArgs {
  float* buf = nullptr;          // (n) this rank's input, overwritten with the sum; any 4-byte alignment
  size_t n = 0;                  // floats; n * 4 <= kSlotBytes
  char* base[kMaxRanks] = {};    // (world) every member's exchange buffer as mapped here; base[rank] is ours
  int rank = 0;                  // this rank's index in the group
  int world = 0;                 // members, 2..kMaxRanks
  uint64_t timeout_ns = 0;       // how long a block waits for a peer's flag before giving up
  uint32_t* host_error = nullptr;  // (1) mapped pinned host word: 1 + the group rank of a peer that never came
};

// Enqueues one all-reduce on `stream`; returns the launch's error (cudaGetLastError).
cudaError_t launch_kernel(const KernelArgs& args, cudaStream_t stream);

// One group's exchange buffers. Creation is collective over the group's MPI control group.
class OneShotAllReduce {
 public:
  // Called by every member at the group's first eligible all-reduce, outside a graph capture, with the
  // bound stream's device current. Returns null and says why in `why_not` when some pair of members
  // cannot map each other's memory (different hosts, a GPU shared by two ranks or not visible, no peer
  // access, an IPC failure); every member gets the same answer.
  // `world_ranks` are the members' world ranks, in group order (for messages).
  static std::unique_ptr<OneShotAllReduce> create(CommGroup& control, const std::vector<int>& world_ranks,
                                                  int device, cudaStream_t stream, double timeout_s,
                                                  std::string* why_not);
  ~OneShotAllReduce();
  OneShotAllReduce(const OneShotAllReduce&) = delete;
  OneShotAllReduce& operator=(const OneShotAllReduce&) = delete;

  // Enqueues the sum of every member's `buf` into `buf` on `stream` (graph-capturable). Every member
  // must make the same calls with the same n, in the same order, on one stream each.
  void run(float* buf /* (n) */, size_t n, cudaStream_t stream);

  // Empty while healthy; once a kernel gave up waiting, the message to fail with (it names this rank,
  // the group and the peer). Reads a host word the GPU writes, without any CUDA call, so the watchdog
  // thread may call it while the stream is busy.
  std::string failure() const;

 private:
  OneShotAllReduce(CommGroup& control, const std::vector<int>& world_ranks, int device, double timeout_s);

  CommGroup& control_;
  const std::vector<int> world_ranks_;  // (world)
  const int device_;
  const double timeout_s_;
  char* mine_ = nullptr;                 // our cudaMalloc'd exchange buffer (flags, then two slots)
  std::vector<char*> peers_;             // (world) opened IPC mappings of the others; null at our index
  volatile uint32_t* host_error_ = nullptr;  // (1) cudaHostAlloc'd, mapped: see KernelArgs::host_error
  KernelArgs args_;
};

}  // namespace shardlm::one_shot
