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
// The largest message the one-shot path carries (the limit of SHARDLM_ALLREDUCE_ONESHOT_MAX_KB).
constexpr size_t kMaxMessageBytes = size_t{256} << 10;
// Default SHARDLM_ALLREDUCE_ONESHOT_MAX_KB: decode rows of 8B (16 KB) and 70B (32 KB) models at batch 1-2.
// Above it NCCL's bandwidth-optimal algorithms start to pay off (to be measured: docs/multi_gpu.md).
constexpr size_t kDefaultMaxBytes = size_t{64} << 10;

enum class Mode {
  kAuto,     // one-shot for small device buffers where every pair of GPUs has peer access, NCCL otherwise
  kNccl,     // always NCCL
  kOneShot,  // like kAuto, but a group that cannot use the one-shot path is an error, not a silent fallback
};

// What the one-shot kernel does beyond the sum (SHARDLM_ALLREDUCE_FUSE). Measurement switches: kNorm is
// the fastest (docs/multi_gpu.md has the figures).
enum class Fuse {
  kNorm,  // launched as a programmatic dependent (PDL) and, where the caller asks, with the residual add
          // and RMS norm that follow it (CommGroup::all_reduce_sum_add_rms_norm) in the same kernel
  kPdl,   // launched as a programmatic dependent; the add and norm stay the backend's own kernel
  kOff,   // an ordinary launch: starts after the previous kernel has finished, as NCCL's kernels do
};

struct Settings {
  Mode mode = Mode::kAuto;
  size_t max_bytes = kDefaultMaxBytes;  // all-reduces of at most this many bytes take the one-shot path
  Fuse fuse = Fuse::kNorm;
  bool trace = false;
  bool push = true;      // SHARDLM_ALLREDUCE_PUSH: producers may push their share (CommGroup::device_push_target)
  // SHARDLM_ALLREDUCE_POLL_TOGETHER: the kernel asks for every source's words of a group before it looks at
  // any (0: one source after the other, as before).
  bool poll_together = true;
  // SHARDLM_ALLREDUCE_RELAXED_SHARES: the fused norm's blocks exchange their shares with relaxed 64-bit words
  // (0: release / acquire, as before).
  bool relaxed_shares = true;
};

// SHARDLM_ALLREDUCE (auto|nccl|oneshot, default auto), SHARDLM_ALLREDUCE_ONESHOT_MAX_KB (1..256, default
// 64), SHARDLM_ALLREDUCE_FUSE (norm|pdl|off, default norm), SHARDLM_ALLREDUCE_TRACE (0|1, default 0) and
// SHARDLM_ALLREDUCE_PUSH, SHARDLM_ALLREDUCE_POLL_TOGETHER and SHARDLM_ALLREDUCE_RELAXED_SHARES (0|1, default 1).
// Null or empty means unset. A bad value throws an Error naming the variable, the value and what is allowed.
Settings parse_settings(const char* mode, const char* max_kb, const char* fuse = nullptr,
                        const char* trace = nullptr, const char* push = nullptr, const char* poll_together = nullptr,
                        const char* relaxed_shares = nullptr);
Settings settings_from_env();
std::string describe(Mode m);
std::string describe(Fuse f);

// Launch shape. Block b owns the float4 groups b * kThreads + t + k * kBlocks * kThreads (16 x 512
// threads x one float4 each cover 128 KB per pass) in every call, keeps its own call counter, and only
// talks to block b of its peers (no grid-wide sync). A call launches only the blocks that own data
// (min(kBlocks, ceil(n / 4 / kThreads))): a block that owns nothing would have nothing to send, and leaving
// it out changes nothing for the others, because every member leaves out the same blocks (same n).
constexpr int kBlocks = 16;
constexpr int kThreads = 512;
// The largest message of each channel, in floats: the plain one takes any one-shot message; the fused norm
// needs the whole row in one pass (one float4 per thread).
constexpr size_t kMaxFloats = kMaxMessageBytes / sizeof(float);
constexpr size_t kMaxNormFloats = size_t{4} * kBlocks * kThreads;

// The front of each channel of every member's exchange buffer, zeroed at creation.
struct Flags {
  uint32_t epoch[kBlocks];  // calls block b has finished here; only this rank touches it
  uint32_t error;           // nonzero once a block gave up waiting: later calls return at once
  // The fused norm's sum of squares: block b's share of fused call c as (c + 1) << 32 | float bits,
  // published by this rank's block b for this rank's other blocks (the tag tells this call's share from an
  // older one). The blocks' own counters (epoch) cannot number the call: a block only counts the calls
  // that gave it data, so blocks 0 and 1 disagree after a call of one block.
  alignas(128) uint64_t share[kBlocks];
  // c: fused calls finished here. Every block reads it at its start; block 0 advances it at its end, after
  // it has seen every block's share (each block reads c before publishing its share).
  alignas(128) uint32_t norm_calls;
};
constexpr size_t kFlagsBytes = 4096;
static_assert(sizeof(Flags) <= kFlagsBytes);

// After the flags, each channel holds two parities x world source areas. A member's data for call e
// travels as "LL" words (NCCL's low-latency protocol): every float is stored next to the call's tag in one
// aligned 8-byte pair, so the receiver needs no separate flag and no fence: it polls the pairs themselves
// until every tag is this call's. Area (parity, src) of member m's buffer receives member src's data of
// calls with that parity; 8 bytes per float.
constexpr size_t kLLBytesPerFloat = 8;
// Two independent channels: the plain all-reduce and the one fused with the norm. They launch different
// grids for the same n, and a channel's safety argument (docs/multi_gpu.md) only looks at its own calls.
constexpr int kChannels = 2;
constexpr size_t channel_max_floats(int channel) { return channel == 0 ? kMaxFloats : kMaxNormFloats; }
constexpr size_t area_bytes(int channel) { return channel_max_floats(channel) * kLLBytesPerFloat; }
constexpr size_t channel_bytes(int channel, int world) {
  return kFlagsBytes + 2 * static_cast<size_t>(world) * area_bytes(channel);
}
constexpr size_t channel_offset(int channel, int world) { return channel == 0 ? 0 : channel_bytes(0, world); }
constexpr size_t buffer_bytes(int world) { return channel_bytes(0, world) + channel_bytes(1, world); }

// What the kernel needs; passed by value, so a CUDA graph replays exactly these pointers.
struct KernelArgs {
  float* buf = nullptr;          // (n) this rank's input, overwritten with the sum; any 4-byte alignment
  size_t n = 0;                  // floats; n <= channel_max_floats(channel)
  char* base[kMaxRanks] = {};    // (world) every member's exchange buffer as mapped here; base[rank] is ours
  size_t channel = 0;            // byte offset of this call's channel in every member's buffer
  size_t area = 0;               // bytes of one (parity, source) area of that channel
  AddRmsNormEpilogue norm;       // the fused kernel's epilogue (x, w, y: any 4-byte alignment)
  int rank = 0;                  // this rank's index in the group
  int world = 0;                 // members, 2..kMaxRanks
  uint64_t timeout_ns = 0;       // how long a thread waits for a peer's data before giving up
  uint32_t* host_error = nullptr;  // (1) mapped pinned host word: 1 + the group rank of a peer that never came,
                                   // or kHostErrorNoShare
  uint64_t* trace = nullptr;     // (kTraceCalls, kTracePoints) or null: SHARDLM_ALLREDUCE_TRACE=1
  bool pushed = false;           // the fused call's producer pushed buf's words already: receive only
  bool poll_together = true;     // Settings::poll_together
  bool relaxed_shares = true;    // Settings::relaxed_shares
};
// SHARDLM_ALLREDUCE_TRACE: block 0 of the fused kernel stamps %globaltimer at kTracePoints points of each
// call into a ring of kTraceCalls; the destructor prints the median time between them (measurement only).
// Points: block start, PDL wait over, every peer's data in (block 0's part), shares summed, end.
constexpr int kTraceCalls = 4096;
constexpr int kTracePoints = 5;
// host_error's value when a block of the fused kernel waited in vain for another block's share of the sum
// of squares (only possible after that block gave up on a peer, which names the peer first).
constexpr uint32_t kHostErrorNoShare = 0xFFFFFFFFu;

// Enqueues one all-reduce on `stream`, with args.norm's epilogue when `norm` (args.n <= kMaxNormFloats,
// args.n % 32 == 0 if norm.xq is set), launched as a programmatic dependent unless fuse is kOff; returns
// the launch's error.
cudaError_t launch_kernel(const KernelArgs& args, bool norm, Fuse fuse, cudaStream_t stream);

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
                                                  const Settings& settings, std::string* why_not);
  ~OneShotAllReduce();
  OneShotAllReduce(const OneShotAllReduce&) = delete;
  OneShotAllReduce& operator=(const OneShotAllReduce&) = delete;

  // Enqueues the sum of every member's `buf` into `buf` on `stream` (graph-capturable). Every member
  // must make the same calls with the same n, in the same order, on one stream each.
  void run(float* buf /* (n) */, size_t n, Fuse fuse, cudaStream_t stream);
  // The same, then the epilogue (n <= kMaxNormFloats; n % 32 == 0 if e.xq is set), in the same kernel.
  // pushed: the kernel that wrote buf stored its words at push_target()'s places; this call only receives.
  void run_add_rms_norm(float* buf /* (n) */, size_t n, const AddRmsNormEpilogue& e, cudaStream_t stream,
                        bool pushed = false);
  // Where a producer pushes its share of the next fused call (comm/device_push.h): the fused channel's
  // receive areas of every member and this member's block counters.
  void push_target(DevicePush* out) const;

  // Empty while healthy; once a kernel gave up waiting, the message to fail with (it names this rank,
  // the group and the peer). Reads a host word the GPU writes, without any CUDA call, so the watchdog
  // thread may call it while the stream is busy.
  std::string failure() const;

 private:
  OneShotAllReduce(CommGroup& control, const std::vector<int>& world_ranks, int device, double timeout_s);
  void print_trace() const;  // SHARDLM_ALLREDUCE_TRACE: medians of the stamped phases, to stderr
  // The kernel's arguments for a call on `channel` (0 plain, 1 fused); fails first if a call gave up.
  KernelArgs call_args(float* buf, size_t n, int channel) const;

  CommGroup& control_;
  const std::vector<int> world_ranks_;  // (world)
  const int device_;
  const double timeout_s_;
  char* mine_ = nullptr;                 // our cudaMalloc'd exchange buffer (flags, then two slots)
  std::vector<char*> peers_;             // (world) opened IPC mappings of the others; null at our index
  volatile uint32_t* host_error_ = nullptr;  // (1) cudaHostAlloc'd, mapped: see KernelArgs::host_error
  uint64_t* trace_ = nullptr;                // (kTraceCalls, kTracePoints) device, or null
  KernelArgs args_;
};

}  // namespace shardlm::one_shot
