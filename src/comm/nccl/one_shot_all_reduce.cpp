#include "comm/nccl/one_shot_all_reduce.h"

#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <type_traits>
#include <vector>

#include "core/env.h"
#include "core/error.h"

namespace shardlm::one_shot {
namespace {

[[noreturn]] void cuda_fail(cudaError_t e, const char* expr, const char* file, int line) {
  fail_kind(ErrorKind::kComm, expr, " failed at ", file, ":", line, ": ", cudaGetErrorString(e));
}

#define SHARDLM_ONE_SHOT_CHECK(expr)                                  \
  do {                                                                \
    const cudaError_t e_ = (expr);                                    \
    if (e_ != cudaSuccess) cuda_fail(e_, #expr, __FILE__, __LINE__); \
  } while (0)

// Setup steps that can fail on one rank only must not throw between two collectives (the others would
// wait in the next one): they return a reason, and the members agree on the first one.
#define SHARDLM_ONE_SHOT_TRY(expr, reason)                                   \
  do {                                                                       \
    const cudaError_t e_ = (expr);                                           \
    if (e_ != cudaSuccess) {                                                 \
      (void)cudaGetLastError();                                              \
      return cat(reason, ": ", #expr, ": ", cudaGetErrorString(e_));         \
    }                                                                        \
  } while (0)

// Fixed-size text, so that it can travel as the bytes of a broadcast.
template <size_t N>
struct Text {
  char s[N] = {};
  void set(const std::string& v) { std::snprintf(s, N, "%s", v.c_str()); }
  std::string str() const { return std::string(s, strnlen(s, N)); }
};

struct Identity {
  Text<64> host;    // gethostname: IPC needs one host
  Text<32> bus_id;  // cudaDeviceGetPCIBusId: names the GPU the same way in every process
};

struct Offer {
  Text<240> why_not;  // empty when this member's part succeeded
  cudaIpcMemHandle_t handle{};
};

// Every member's `mine`, in group order: one broadcast from each member (setup only, at most 8).
template <class T>
std::vector<T> exchange(CommGroup& g, const T& mine) {
  static_assert(std::is_trivially_copyable_v<T>);
  std::vector<T> all(static_cast<size_t>(g.size()));
  for (int r = 0; r < g.size(); ++r) {
    T x = r == g.rank() ? mine : T{};
    g.broadcast(&x, sizeof x, r);
    all[static_cast<size_t>(r)] = x;
  }
  return all;
}

// The first member's complaint, the same text on every member.
std::string first_reason(CommGroup& g, const std::string& mine) {
  Text<240> t;
  t.set(mine);
  for (const auto& x : exchange(g, t))
    if (!x.str().empty()) return x.str();
  return {};
}

std::string rank_list(const std::vector<int>& ranks) {
  std::string s;
  for (int r : ranks) {
    if (!s.empty()) s += ',';
    s += std::to_string(r);
  }
  return s;
}

// Why this member cannot map every peer's memory over a direct GPU-to-GPU path, or "".
std::string check_peers(const std::vector<Identity>& ids, const std::vector<int>& world_ranks, int me, int device) {
  for (size_t p = 0; p < ids.size(); ++p) {
    if (static_cast<int>(p) == me) continue;
    const std::string who = cat("ranks ", world_ranks[static_cast<size_t>(me)], " and ", world_ranks[p]);
    if (ids[p].host.str() != ids[static_cast<size_t>(me)].host.str())
      return cat(who, " are on different hosts (", ids[static_cast<size_t>(me)].host.str(), ", ", ids[p].host.str(),
                 ")");
    if (ids[p].bus_id.str() == ids[static_cast<size_t>(me)].bus_id.str())
      return cat(who, " share the GPU at ", ids[p].bus_id.str());
    int peer_dev = -1;
    if (cudaDeviceGetByPCIBusId(&peer_dev, ids[p].bus_id.s) != cudaSuccess) {
      (void)cudaGetLastError();
      return cat("rank ", world_ranks[p], "'s GPU ", ids[p].bus_id.str(), " is not visible to rank ",
                 world_ranks[static_cast<size_t>(me)], " (CUDA_VISIBLE_DEVICES), so peer access cannot be checked");
    }
    int can = 0;
    SHARDLM_ONE_SHOT_TRY(cudaDeviceCanAccessPeer(&can, device, peer_dev), "peer access check");
    if (!can)
      return cat("GPU ", device, " of rank ", world_ranks[static_cast<size_t>(me)], " cannot access GPU ", peer_dev,
                 " of rank ", world_ranks[p], " directly (cudaDeviceCanAccessPeer)");
  }
  return {};
}

}  // namespace

std::string describe(Mode m) {
  switch (m) {
    case Mode::kAuto:
      return "auto";
    case Mode::kNccl:
      return "nccl";
    case Mode::kOneShot:
      return "oneshot";
  }
  return "?";
}

std::string describe(Fuse f) {
  switch (f) {
    case Fuse::kNorm:
      return "norm";
    case Fuse::kPdl:
      return "pdl";
    case Fuse::kOff:
      return "off";
  }
  return "?";
}

// An empty value counts as unset: `SHARDLM_ALLREDUCE= cmd` is how a shell clears it for one command.
Settings parse_settings(const char* mode, const char* max_kb, const char* fuse, const char* trace,
                        const char* push, const char* poll_together, const char* relaxed_shares) {
  Settings s;
  const auto flag = [](const char* name, const char* v, bool& out, const char* meaning) {
    if (const auto on = parse_switch(name, v, meaning)) out = *on;
  };
  flag("SHARDLM_ALLREDUCE_TRACE", trace, s.trace, "1: time the fused calls; default 0");
  flag("SHARDLM_ALLREDUCE_PUSH", push, s.push, "1: matvecs push their shares, the default");
  flag("SHARDLM_ALLREDUCE_POLL_TOGETHER", poll_together, s.poll_together, "1: every source polled at once, the default");
  flag("SHARDLM_ALLREDUCE_RELAXED_SHARES", relaxed_shares, s.relaxed_shares, "1: relaxed share words, the default");
  if (mode && *mode) {
    const std::string m = mode;
    if (m == "auto") s.mode = Mode::kAuto;
    else if (m == "nccl") s.mode = Mode::kNccl;
    else if (m == "oneshot") s.mode = Mode::kOneShot;
    else fail("SHARDLM_ALLREDUCE='", m, "' is not one of auto, nccl, oneshot");
  }
  if (max_kb && *max_kb) {
    const std::string v = max_kb;
    const size_t limit = kMaxMessageBytes >> 10;
    size_t kb = 0;
    const auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), kb);
    if (ec != std::errc() || end != v.data() + v.size() || kb < 1 || kb > limit)
      fail("SHARDLM_ALLREDUCE_ONESHOT_MAX_KB='", v, "' is not a whole number of KiB in [1, ", limit,
           "] (the one-shot path carries at most ", limit, " KiB)");
    s.max_bytes = kb << 10;
  }
  if (fuse && *fuse) {
    const std::string f = fuse;
    if (f == "norm") s.fuse = Fuse::kNorm;
    else if (f == "pdl") s.fuse = Fuse::kPdl;
    else if (f == "off") s.fuse = Fuse::kOff;
    else fail("SHARDLM_ALLREDUCE_FUSE='", f, "' is not one of norm, pdl, off");
  }
  return s;
}

Settings settings_from_env() {
  return parse_settings(std::getenv("SHARDLM_ALLREDUCE"), std::getenv("SHARDLM_ALLREDUCE_ONESHOT_MAX_KB"),
                        std::getenv("SHARDLM_ALLREDUCE_FUSE"), std::getenv("SHARDLM_ALLREDUCE_TRACE"),
                        std::getenv("SHARDLM_ALLREDUCE_PUSH"), std::getenv("SHARDLM_ALLREDUCE_POLL_TOGETHER"),
                        std::getenv("SHARDLM_ALLREDUCE_RELAXED_SHARES"));
}

OneShotAllReduce::OneShotAllReduce(CommGroup& control, const std::vector<int>& world_ranks, int device,
                                   double timeout_s)
    : control_(control),
      world_ranks_(world_ranks),
      device_(device),
      timeout_s_(timeout_s),
      peers_(world_ranks.size(), nullptr) {}

std::unique_ptr<OneShotAllReduce> OneShotAllReduce::create(CommGroup& control, const std::vector<int>& world_ranks,
                                                           int device, cudaStream_t stream, double timeout_s,
                                                           const Settings& settings, std::string* why_not) {
  const int world = control.size(), me = control.rank();
  SHARDLM_CHECK(world >= 2 && world <= kMaxRanks && world_ranks.size() == static_cast<size_t>(world));

  // 1. Can every pair map each other's memory? Each member checks its own pairs; all take the first no.
  Identity id;
  const std::string no_bus_id = [&]() -> std::string {
    char host[64] = {};
    if (gethostname(host, sizeof host - 1) != 0) std::snprintf(host, sizeof host, "?");
    id.host.set(host);
    SHARDLM_ONE_SHOT_TRY(cudaDeviceGetPCIBusId(id.bus_id.s, static_cast<int>(sizeof id.bus_id.s), device),
                         "GPU identity");
    return {};
  }();
  const std::vector<Identity> ids = exchange(control, id);
  *why_not = first_reason(control, !no_bus_id.empty() ? no_bus_id : check_peers(ids, world_ranks, me, device));
  if (!why_not->empty()) return nullptr;

  // 2. Our buffer, zeroed before any peer can know its handle (and so write a flag into it).
  std::unique_ptr<OneShotAllReduce> os(new OneShotAllReduce(control, world_ranks, device, timeout_s));
  Offer offer;
  offer.why_not.set([&]() -> std::string {
    SHARDLM_ONE_SHOT_TRY(cudaMalloc(&os->mine_, buffer_bytes(world)), "one-shot buffer");
    SHARDLM_ONE_SHOT_TRY(cudaMemsetAsync(os->mine_, 0, buffer_bytes(world), stream), "one-shot buffer");
    SHARDLM_ONE_SHOT_TRY(cudaStreamSynchronize(stream), "one-shot buffer");
    void* h = nullptr;
    SHARDLM_ONE_SHOT_TRY(cudaHostAlloc(&h, sizeof(uint32_t), cudaHostAllocMapped), "one-shot error word");
    os->host_error_ = static_cast<volatile uint32_t*>(h);
    *os->host_error_ = 0;
    void* d = nullptr;
    SHARDLM_ONE_SHOT_TRY(cudaHostGetDevicePointer(&d, h, 0), "one-shot error word");
    os->args_.host_error = static_cast<uint32_t*>(d);
    SHARDLM_ONE_SHOT_TRY(cudaIpcGetMemHandle(&offer.handle, os->mine_), "one-shot buffer export");
    if (settings.trace) {
      const size_t bytes = sizeof(uint64_t) * kTraceCalls * kTracePoints;
      SHARDLM_ONE_SHOT_TRY(cudaMalloc(&os->trace_, bytes), "one-shot trace");
      SHARDLM_ONE_SHOT_TRY(cudaMemset(os->trace_, 0, bytes), "one-shot trace");
    }
    return {};
  }());
  const std::vector<Offer> offers = exchange(control, offer);
  for (size_t r = 0; r < offers.size() && why_not->empty(); ++r)
    if (!offers[r].why_not.str().empty())
      *why_not = cat("rank ", world_ranks[r], ": ", offers[r].why_not.str());
  // The destructor frees what was made; nobody has opened anything yet.
  if (!why_not->empty()) return nullptr;

  // 3. Map every peer's buffer here. A failure anywhere drops the group back to NCCL on every member.
  std::string open_failed;
  for (int p = 0; p < world && open_failed.empty(); ++p) {
    if (p == me) continue;
    void* ptr = nullptr;
    const cudaError_t e =
        cudaIpcOpenMemHandle(&ptr, offers[static_cast<size_t>(p)].handle, cudaIpcMemLazyEnablePeerAccess);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      open_failed = cat("rank ", world_ranks[static_cast<size_t>(me)], " could not map rank ",
                        world_ranks[static_cast<size_t>(p)],
                        "'s buffer: cudaIpcOpenMemHandle: ", cudaGetErrorString(e));
    } else {
      os->peers_[static_cast<size_t>(p)] = static_cast<char*>(ptr);
    }
  }
  float ok = open_failed.empty() ? 1.f : 0.f;
  control.all_reduce_sum(&ok, 1);  // host memory: over MPI
  if (ok != static_cast<float>(world)) {
    *why_not = first_reason(control, open_failed);
    return nullptr;  // the destructor closes what was opened, waits for everyone, then frees
  }

  os->args_.rank = me;
  os->args_.world = world;
  os->args_.timeout_ns = static_cast<uint64_t>(timeout_s * 1e9);
  os->args_.trace = os->trace_;
  os->args_.poll_together = settings.poll_together;
  os->args_.relaxed_shares = settings.relaxed_shares;
  for (int r = 0; r < world; ++r)
    os->args_.base[r] = r == me ? os->mine_ : os->peers_[static_cast<size_t>(r)];
  return os;
}

OneShotAllReduce::~OneShotAllReduce() {
  int prev = 0;
  const bool restore = cudaGetDevice(&prev) == cudaSuccess && prev != device_;
  if (restore) cudaSetDevice(device_);
  // Our last kernels still read the peers' slots; the bound stream may already be gone, so the device.
  cudaDeviceSynchronize();
  if (trace_) print_trace();
  for (char* p : peers_)
    if (p) cudaIpcCloseMemHandle(p);
  // Freeing an exported buffer that another process still has open is undefined: wait until every member
  // has closed its mapping of ours. While an exception unwinds (maybe on this rank only) a barrier could
  // wait for peers that never come, so the buffer is left to the process's exit instead. Every member
  // that reached the constructor gets here at the same point of create() or of the group's teardown, so
  // the barrier does not depend on what this member managed to allocate.
  bool can_free = std::uncaught_exceptions() == 0;
  if (can_free) {
    try {
      control_.barrier();
    } catch (...) {
      can_free = false;
    }
  }
  if (can_free && mine_) cudaFree(mine_);
  if (host_error_) cudaFreeHost(const_cast<uint32_t*>(host_error_));
  if (trace_) cudaFree(trace_);
  (void)cudaGetLastError();
  if (restore) cudaSetDevice(prev);
}

KernelArgs OneShotAllReduce::call_args(float* buf, size_t n, int channel) const {
  if (const std::string f = failure(); !f.empty())
    fail_kind(ErrorKind::kComm, "rank ", world_ranks_[static_cast<size_t>(control_.rank())], ": ", f);
  KernelArgs a = args_;
  a.buf = buf;
  a.n = n;
  a.channel = channel_offset(channel, a.world);
  a.area = area_bytes(channel);
  return a;
}

void OneShotAllReduce::run(float* buf, size_t n, Fuse fuse, cudaStream_t stream) {
  SHARDLM_CHECK(n * sizeof(float) <= kMaxMessageBytes, "one-shot all-reduce of ", n, " floats");
  SHARDLM_ONE_SHOT_CHECK(launch_kernel(call_args(buf, n, 0), false, fuse, stream));
}

void OneShotAllReduce::push_target(DevicePush* out) const {
  static_assert(DevicePush::kMaxRanks >= kMaxRanks);
  static_assert(offsetof(Flags, epoch) == 0);
  *out = DevicePush{};
  const size_t channel = channel_offset(1, args_.world);
  for (int p = 0; p < args_.world; ++p)
    out->areas[p] = p == args_.rank ? nullptr : args_.base[p] + channel + kFlagsBytes;
  out->epochs = reinterpret_cast<const uint32_t*>(args_.base[args_.rank] + channel);
  out->area_bytes = area_bytes(1);
  out->world = args_.world;
  out->rank = args_.rank;
  out->block_floats = 4 * kThreads;
  out->blocks = kBlocks;
}

void OneShotAllReduce::run_add_rms_norm(float* buf, size_t n, const AddRmsNormEpilogue& e, cudaStream_t stream,
                                        bool pushed) {
  SHARDLM_CHECK(n >= 1 && n <= kMaxNormFloats && (!e.xq || n % 32 == 0) && e.x && e.w && e.y,
                "one-shot all-reduce + norm of ", n, " floats (an int8 row needs a multiple of 32)");
  KernelArgs a = call_args(buf, n, 1);
  a.norm = e;
  a.pushed = pushed;
  SHARDLM_ONE_SHOT_CHECK(launch_kernel(a, true, Fuse::kNorm, stream));
}

void OneShotAllReduce::print_trace() const {
  std::vector<uint64_t> t(static_cast<size_t>(kTraceCalls) * kTracePoints);
  if (cudaMemcpy(t.data(), trace_, t.size() * sizeof(uint64_t), cudaMemcpyDeviceToHost) != cudaSuccess) {
    (void)cudaGetLastError();
    return;
  }
  // Calls whose five stamps were all written (the ring keeps the last kTraceCalls).
  std::vector<double> phase[kTracePoints - 1];
  for (int c = 0; c < kTraceCalls; ++c) {
    const uint64_t* p = &t[static_cast<size_t>(c) * kTracePoints];
    bool whole = true;
    for (int k = 0; k < kTracePoints; ++k) whole = whole && p[k] != 0 && (k == 0 || p[k] >= p[k - 1]);
    if (!whole) continue;
    for (int k = 1; k < kTracePoints; ++k) phase[k - 1].push_back(1e-3 * static_cast<double>(p[k] - p[k - 1]));
  }
  if (phase[0].empty()) return;
  const auto median = [](std::vector<double> v) {
    std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(v.size() / 2), v.end());
    return v[v.size() / 2];
  };
  std::fprintf(stderr,
               "shardlm: one-shot all-reduce + norm trace, rank %d of the group of ranks %s, %zu calls (medians, us):"
               " start to PDL wait over %.2f, to every peer's data %.2f, to the shares summed %.2f, to the end %.2f\n",
               world_ranks_[static_cast<size_t>(control_.rank())], rank_list(world_ranks_).c_str(), phase[0].size(),
               median(phase[0]), median(phase[1]), median(phase[2]), median(phase[3]));
}

std::string OneShotAllReduce::failure() const {
  const uint32_t e = host_error_ ? *host_error_ : 0;
  if (e == 0) return {};
  if (e == kHostErrorNoShare)
    return cat("one-shot all-reduce + norm in the group of ranks ", rank_list(world_ranks_),
               ": a block's share of the sum of squares did not come within ", timeout_s_, " s (internal error)");
  const size_t peer = e - 1;
  return cat("one-shot all-reduce in the group of ranks ", rank_list(world_ranks_), ": rank ",
             peer < world_ranks_.size() ? world_ranks_[peer] : -1, " did not arrive within ", timeout_s_,
             " s; it has failed or hangs");
}

}  // namespace shardlm::one_shot
