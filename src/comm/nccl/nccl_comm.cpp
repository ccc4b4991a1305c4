#include "comm/nccl/nccl_comm.h"

#include <cuda_runtime.h>
#include <mpi.h>
#include <nccl.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "comm/nccl/one_shot_all_reduce.h"
#include "core/error.h"

namespace shardlm {
namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

[[noreturn]] void nccl_fail(ncclResult_t r, ncclComm_t comm, const char* expr, const char* file, int line) {
  const char* last = ncclGetLastError(comm);
  fail_kind(ErrorKind::kComm, expr, " failed at ", file, ":", line, ": ", ncclGetErrorString(r),
            (last && *last) ? cat(" (", last, ")") : std::string());
}

[[noreturn]] void cuda_fail(cudaError_t e, const char* expr, const char* file, int line) {
  fail_kind(ErrorKind::kComm, expr, " failed at ", file, ":", line, ": ", cudaGetErrorString(e));
}

#define SHARDLM_NCCL_CHECK(comm, expr)                                         \
  do {                                                                         \
    const ncclResult_t r_ = (expr);                                            \
    if (r_ != ncclSuccess) nccl_fail(r_, comm, #expr, __FILE__, __LINE__);     \
  } while (0)
#define SHARDLM_NCCL_CUDA_CHECK(expr)                                          \
  do {                                                                         \
    const cudaError_t e_ = (expr);                                             \
    if (e_ != cudaSuccess) cuda_fail(e_, #expr, __FILE__, __LINE__);           \
  } while (0)

// Tag of the MPI message that carries a two-rank NCCL id; far above the model's tags.
constexpr int kTagNcclId = 30001;

bool capturing(cudaStream_t s) {
  cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
  SHARDLM_NCCL_CUDA_CHECK(cudaStreamIsCapturing(s, &st));
  return st != cudaStreamCaptureStatusNone;
}

// Extra seconds the watchdog gives an eagerly enqueued one-shot all-reduce: its kernel stops waiting after
// the timeout by itself and names the peer it missed, a better message than "has not completed".
constexpr double kOneShotGraceSeconds = 2;

// What every group and the communicator share: the bound stream and device, the all-reduce settings, and
// the watchdog.
class State {
 public:
  State(int rank, double timeout, one_shot::Settings settings)
      : rank_(rank), timeout_(timeout), settings_(settings), thread_([this] { loop(); }) {}
  ~State() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
    for (auto& p : pending_) cudaEventDestroy(p.ev);
    for (cudaEvent_t e : free_) cudaEventDestroy(e);
  }
  State(const State&) = delete;
  State& operator=(const State&) = delete;

  int rank() const { return rank_; }
  double timeout() const { return timeout_; }
  const one_shot::Settings& all_reduce_settings() const { return settings_; }
  bool bound() const { return bound_; }
  cudaStream_t stream() const { return stream_; }
  int device() const { return device_; }
  void bind(cudaStream_t s) {
    // The stream's device, not the current one: the CUDA backend restores the caller's device after
    // each call, so the current device is not the backend's.
#if CUDART_VERSION >= 12080
    SHARDLM_NCCL_CUDA_CHECK(cudaStreamGetDevice(s, &device_));
#else
    SHARDLM_NCCL_CUDA_CHECK(cudaGetDevice(&device_));
#endif
    stream_ = s;
    bound_ = true;
  }

  // Makes the bound device current for a scope (NCCL setup and events need it), then restores the
  // caller's device.
  class DeviceScope {
   public:
    explicit DeviceScope(const State& s) {
      SHARDLM_NCCL_CUDA_CHECK(cudaGetDevice(&prev_));
      if (prev_ != s.device_) SHARDLM_NCCL_CUDA_CHECK(cudaSetDevice(s.device_));
    }
    ~DeviceScope() { cudaSetDevice(prev_); }
    DeviceScope(const DeviceScope&) = delete;
    DeviceScope& operator=(const DeviceScope&) = delete;

   private:
    int prev_ = 0;
  };

  // A blocking NCCL call (communicator setup): the watchdog aborts the job if it outlasts the timeout.
  class HostScope {
   public:
    HostScope(State& s, std::string what) : s_(s) {
      std::lock_guard<std::mutex> lk(s_.mu_);
      s_.host_what_ = std::move(what);
      s_.host_t0_ = now_s();
    }
    ~HostScope() {
      std::lock_guard<std::mutex> lk(s_.mu_);
      s_.host_what_.clear();
    }
    HostScope(const HostScope&) = delete;
    HostScope& operator=(const HostScope&) = delete;

   private:
    State& s_;
  };

  // Called after an operation was enqueued on the bound stream. Inside a graph capture nothing runs yet,
  // so there is nothing to watch. `grace_s` is added to the timeout for this operation.
  void track(const char* what, const std::string& where, double grace_s = 0) {
    if (capturing(stream_)) return;
    DeviceScope dev(*this);
    std::lock_guard<std::mutex> lk(mu_);
    reap_locked();
    cudaEvent_t ev = nullptr;
    if (!free_.empty()) {
      ev = free_.back();
      free_.pop_back();
    } else {
      SHARDLM_NCCL_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
    }
    SHARDLM_NCCL_CUDA_CHECK(cudaEventRecord(ev, stream_));
    pending_.push_back({ev, now_s(), timeout_ + grace_s, cat(what, " ", where)});
  }

  void add_comm(ncclComm_t c) {
    std::lock_guard<std::mutex> lk(mu_);
    comms_.push_back(c);
  }
  void remove_comm(ncclComm_t c) {
    std::lock_guard<std::mutex> lk(mu_);
    std::erase(comms_, c);
  }

  // One-shot kernels give up on a missing peer by themselves and leave a word in host memory; the
  // watchdog looks at it on every tick. That is the only check for calls replayed from a CUDA graph.
  void add_one_shot(const one_shot::OneShotAllReduce* os) {
    std::lock_guard<std::mutex> lk(mu_);
    one_shots_.push_back(os);
  }
  void remove_one_shot(const one_shot::OneShotAllReduce* os) {
    std::lock_guard<std::mutex> lk(mu_);
    std::erase(one_shots_, os);
  }

  // Which path each group's device all-reduces took, for all_reduce_kind().
  void note_all_reduce_path(const std::string& s) {
    std::lock_guard<std::mutex> lk(mu_);
    if (std::find(paths_.begin(), paths_.end(), s) == paths_.end()) paths_.push_back(s);
  }
  std::string all_reduce_kind() const {
    const size_t kib = settings_.max_bytes >> 10;
    if (settings_.mode == one_shot::Mode::kNccl) return "nccl (SHARDLM_ALLREDUCE=nccl)";
    std::lock_guard<std::mutex> lk(mu_);
    if (paths_.empty())
      return cat("oneshot<=", kib, "KiB where every pair of GPUs has peer access, nccl above (SHARDLM_ALLREDUCE=",
                 one_shot::describe(settings_.mode), "; no device all-reduce yet)");
    std::string s;
    for (const std::string& p : paths_) {
      if (!s.empty()) s += "; ";
      s += p;
    }
    if (pushed_ > 0) s += cat("; ", pushed_, " fused calls enqueued with their matvec pushing the shares");
    return s;
  }
  // A fused all-reduce whose producer pushed the shares (counted for all_reduce_kind()).
  void note_pushed() {
    std::lock_guard<std::mutex> lk(mu_);
    ++pushed_;
  }

 private:
  struct Pending {
    cudaEvent_t ev;
    double t0;
    double limit;  // seconds
    std::string what;
  };

  // Drops finished operations from the front (the stream completes them in order).
  void reap_locked() {
    while (!pending_.empty()) {
      const cudaError_t e = cudaEventQuery(pending_.front().ev);
      if (e == cudaErrorNotReady) break;
      if (e != cudaSuccess) stall_locked(cat(pending_.front().what, " failed: ", cudaGetErrorString(e)));
      free_.push_back(pending_.front().ev);
      pending_.pop_front();
    }
  }

  void loop() {
    std::unique_lock<std::mutex> lk(mu_);
    bool device_set = false;
    while (!cv_.wait_for(lk, std::chrono::milliseconds(100), [this] { return stop_; })) {
      if (!pending_.empty() && !device_set) {
        // Events belong to the bound device's context; make it this thread's too.
        cudaSetDevice(device_);
        device_set = true;
      }
      reap_locked();
      for (const one_shot::OneShotAllReduce* os : one_shots_)
        if (std::string f = os->failure(); !f.empty()) stall_locked(f);
      const double t = now_s();
      if (!pending_.empty() && t - pending_.front().t0 > pending_.front().limit)
        stall_locked(cat(pending_.front().what, " has not completed after ",
                         static_cast<int>(pending_.front().limit), " s; a peer has failed or hangs"));
      if (!host_what_.empty() && t - host_t0_ > timeout_)
        stall_locked(cat(host_what_, " has not returned after ", static_cast<int>(timeout_),
                         " s; a peer has failed or hangs"));
      for (ncclComm_t c : comms_) {
        ncclResult_t r = ncclSuccess;
        if (ncclCommGetAsyncError(c, &r) == ncclSuccess && r != ncclSuccess && r != ncclInProgress)
          stall_locked(cat("NCCL reported an asynchronous error: ", ncclGetErrorString(r)));
      }
    }
  }

  // No way back: the stuck kernels only leave the GPU once their communicators are aborted, and the
  // other ranks must not wait for this one.
  [[noreturn]] void stall_locked(const std::string& msg) {
    std::fprintf(stderr, "shardlm: rank %d: %s. Aborting the NCCL communicators and all ranks.\n", rank_,
                 msg.c_str());
    std::fflush(stderr);
    for (ncclComm_t c : comms_) ncclCommAbort(c);
    comms_.clear();
    MPI_Abort(MPI_COMM_WORLD, 3);
    std::abort();
  }

  const int rank_;
  const double timeout_;
  const one_shot::Settings settings_;
  int64_t pushed_ = 0;  // under mu_
  bool bound_ = false;
  cudaStream_t stream_ = nullptr;
  int device_ = 0;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::deque<Pending> pending_;
  std::vector<cudaEvent_t> free_;
  std::string host_what_;
  double host_t0_ = 0;
  std::vector<ncclComm_t> comms_;
  std::vector<const one_shot::OneShotAllReduce*> one_shots_;
  std::vector<std::string> paths_;
  std::thread thread_;  // last: starts once every member above exists
};

// One ncclComm_t, destroyed with its owner (after the watchdog forgets it).
class NcclComm {
 public:
  NcclComm(State& st, int nranks, const ncclUniqueId& id, int rank, const std::string& what) : st_(st) {
    if (capturing(st.stream()))
      fail_kind(ErrorKind::kComm, "NCCL: first use of ", what,
                " inside a CUDA graph capture; run one eager step before capturing");
    State::DeviceScope dev(st);
    State::HostScope scope(st, cat("NCCL setup of ", what));
    SHARDLM_NCCL_CHECK(nullptr, ncclCommInitRank(&comm_, nranks, id, rank));
    st_.add_comm(comm_);
  }
  ~NcclComm() {
    st_.remove_comm(comm_);
    State::DeviceScope dev(st_);
    ncclCommDestroy(comm_);
  }
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;
  ncclComm_t get() const { return comm_; }

 private:
  State& st_;
  ncclComm_t comm_ = nullptr;
};

class NcclGroup final : public CommGroup {
 public:
  NcclGroup(std::shared_ptr<State> st, std::unique_ptr<CommGroup> mpi, const std::vector<int>& ranks, double* spent)
      : st_(std::move(st)), mpi_(std::move(mpi)), ranks_(ranks), spent_(spent) {
    label_ = "the group of ranks ";
    for (size_t i = 0; i < ranks_.size(); ++i) {
      if (i) label_ += ',';
      label_ += std::to_string(ranks_[i]);
    }
  }
  ~NcclGroup() override {
    if (one_shot_) st_->remove_one_shot(one_shot_.get());  // before the watchdog could read a freed word
  }
  NcclGroup(const NcclGroup&) = delete;
  NcclGroup& operator=(const NcclGroup&) = delete;
  int size() const override { return mpi_->size(); }
  int rank() const override { return mpi_->rank(); }

  void all_reduce_sum(float* buf, size_t n) override {
    if (size() == 1) return;
    if (!on_device(buf)) return mpi_->all_reduce_sum(buf, n);
    const double t0 = now_s();
    const State::DeviceScope dev(*st_);  // enqueue with the stream's device current
    if (one_shot::OneShotAllReduce* os = one_shot_for(n)) {
      os->run(buf, n, st_->all_reduce_settings().fuse, st_->stream());
      st_->track("one-shot all-reduce", cat("in ", label_), kOneShotGraceSeconds);
      *spent_ += now_s() - t0;
      return;
    }
    ncclComm_t c = comm();
    SHARDLM_NCCL_CHECK(c, ncclAllReduce(buf, buf, n, ncclFloat, ncclSum, c, st_->stream()));
    done("all-reduce", t0);
  }

  // The one-shot kernel with the epilogue, for a row the one-shot path takes anyway. Decided on n, the
  // settings and the group alone, so every member takes the same branch.
  bool all_reduce_sum_add_rms_norm(float* buf, size_t n, const AddRmsNormEpilogue& e) override {
    const bool pushed = pending_push_ == buf && pending_push_n_ == n;
    pending_push_ = nullptr;
    if (!fused_path(buf, n)) {
      if (pushed) fail_kind(ErrorKind::kInternal, "one-shot all-reduce: a pushed share without its fused call");
      return false;
    }
    const double t0 = now_s();
    const State::DeviceScope dev(*st_);  // enqueue with the stream's device current
    one_shot::OneShotAllReduce* os = one_shot_for(n);
    if (!os) return false;
    os->run_add_rms_norm(buf, n, e, st_->stream(), pushed);
    if (pushed) st_->note_pushed();
    st_->track("one-shot all-reduce + norm", cat("in ", label_), kOneShotGraceSeconds);
    *spent_ += now_s() - t0;
    return true;
  }

  bool device_push_target(const float* buf, size_t n, DevicePush* out) override {
    if (!st_->all_reduce_settings().push || !fused_path(buf, n)) return false;
    const State::DeviceScope dev(*st_);
    one_shot::OneShotAllReduce* os = one_shot_for(n);  // the first call sets the path up (collective)
    if (!os) return false;
    os->push_target(out);
    pending_push_ = buf;
    pending_push_n_ = n;
    return true;
  }

  void all_gather(const float* in, float* out, const std::vector<size_t>& counts) override {
    if (!on_device(out)) return mpi_->all_gather(in, out, counts);
    const double t0 = now_s();
    const State::DeviceScope dev(*st_);  // enqueue with the stream's device current
    ncclComm_t c = comm();
    bool equal = true;
    for (size_t x : counts) equal = equal && x == counts[0];
    if (equal) {
      SHARDLM_NCCL_CHECK(c, ncclAllGather(in, out, counts[0], ncclFloat, c, st_->stream()));
    } else {
      // Unequal slices: one broadcast per member into its place, fused into one NCCL launch.
      SHARDLM_NCCL_CHECK(c, ncclGroupStart());
      size_t at = 0;
      for (int r = 0; r < size(); ++r) {
        const size_t cnt = counts[static_cast<size_t>(r)];
        SHARDLM_NCCL_CHECK(c, ncclBroadcast(r == rank() ? in : out + at, out + at, cnt, ncclFloat, r, c,
                                            st_->stream()));
        at += cnt;
      }
      SHARDLM_NCCL_CHECK(c, ncclGroupEnd());
    }
    done("all-gather", t0);
  }

  void broadcast(void* buf, size_t bytes, int root) override {
    if (size() == 1) return;
    if (!on_device(buf)) return mpi_->broadcast(buf, bytes, root);
    const double t0 = now_s();
    const State::DeviceScope dev(*st_);  // enqueue with the stream's device current
    ncclComm_t c = comm();
    SHARDLM_NCCL_CHECK(c, ncclBroadcast(buf, buf, bytes, ncclUint8, root, c, st_->stream()));
    done("broadcast", t0);
  }

  void barrier() override { mpi_->barrier(); }

 private:
  bool on_device(const void* p) const;

  // Created at the first device-memory call, which every member makes too.
  ncclComm_t comm() {
    if (!nccl_) {
      ncclUniqueId id{};
      if (rank() == 0) SHARDLM_NCCL_CHECK(nullptr, ncclGetUniqueId(&id));
      mpi_->broadcast(&id, sizeof id, 0);
      nccl_ = std::make_unique<NcclComm>(*st_, size(), id, rank(), cat("a group of ", size()));
    }
    return nccl_->get();
  }

  void done(const char* what, double t0) {
    st_->track(what, cat("in a group of ", size()));
    *spent_ += now_s() - t0;
  }

  // Whether all_reduce_sum_add_rms_norm(buf, n) takes the fused kernel (given the one-shot path): decided on
  // what every member shares.
  bool fused_path(const float* buf, size_t n) const {
    return size() > 1 && st_->all_reduce_settings().fuse == one_shot::Fuse::kNorm && n > 0 &&
           n <= one_shot::kMaxNormFloats && on_device(buf);
  }

  // The one-shot path for an all-reduce of n floats on the device, or null for NCCL. Every member asks
  // with the same n, so all of them reach the setup at the same call.
  one_shot::OneShotAllReduce* one_shot_for(size_t n) {
    const one_shot::Settings& s = st_->all_reduce_settings();
    if (s.mode == one_shot::Mode::kNccl || n == 0 || n > s.max_bytes / sizeof(float)) return nullptr;
    if (!one_shot_decided_) decide_one_shot();
    return one_shot_.get();
  }

  void decide_one_shot() {
    const one_shot::Settings& s = st_->all_reduce_settings();
    std::string why_not;
    if (size() > one_shot::kMaxRanks) {
      why_not = cat("it has ", size(), " ranks, more than ", one_shot::kMaxRanks);
    } else {
      // Like NCCL setup: memory allocation, IPC and MPI exchanges cannot be recorded into a graph.
      if (capturing(st_->stream()))
        fail_kind(ErrorKind::kComm, "one-shot all-reduce: first use in ", label_,
                  " inside a CUDA graph capture; run one eager step before capturing");
      State::HostScope scope(*st_, cat("one-shot all-reduce setup in ", label_));
      one_shot_ = one_shot::OneShotAllReduce::create(*mpi_, ranks_, st_->device(), st_->stream(), st_->timeout(),
                                                     s, &why_not);
    }
    one_shot_decided_ = true;
    if (!one_shot_) {
      if (s.mode == one_shot::Mode::kOneShot)
        fail_kind(ErrorKind::kUnsupported, "SHARDLM_ALLREDUCE=oneshot, but ", label_,
                  " cannot use the one-shot all-reduce: ", why_not, ". Use SHARDLM_ALLREDUCE=auto or nccl");
      st_->note_all_reduce_path(cat("nccl in ", label_, " (no one-shot: ", why_not, ")"));
      return;
    }
    st_->add_one_shot(one_shot_.get());
    st_->note_all_reduce_path(cat("oneshot<=", s.max_bytes >> 10, "KiB (fuse ", one_shot::describe(s.fuse), "), nccl above in ",
                                  label_));
  }

  std::shared_ptr<State> st_;
  std::unique_ptr<CommGroup> mpi_;
  const std::vector<int> ranks_;  // world ranks of the members, in group order
  std::string label_;             // "the group of ranks 0,1", for messages
  double* spent_;
  std::unique_ptr<NcclComm> nccl_;
  bool one_shot_decided_ = false;
  // The buffer (and width) whose producer device_push_target() told to push, for the next fused call.
  const float* pending_push_ = nullptr;
  size_t pending_push_n_ = 0;
  // Last: its destructor waits for the GPU and for the other members, and must run while the NCCL
  // communicator and the MPI group still exist.
  std::unique_ptr<one_shot::OneShotAllReduce> one_shot_;
};

// Host memory (and everything before a stream is bound) goes to MPI; no CUDA call is made for it then,
// so CPU-backend ranks never create a CUDA context.
bool is_device_pointer(const State& st, const void* p) {
  if (!st.bound() || !p) return false;
  cudaPointerAttributes a{};
  if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged;
}

bool NcclGroup::on_device(const void* p) const { return is_device_pointer(*st_, p); }

class NcclCommunicator final : public Communicator {
 public:
  // The settings are read here, so that a bad SHARDLM_ALLREDUCE fails at start-up, not at the first
  // all-reduce.
  NcclCommunicator(std::unique_ptr<Communicator> mpi, double timeout)
      : mpi_(std::move(mpi)), st_(std::make_shared<State>(mpi_->rank(), timeout, one_shot::settings_from_env())) {}
  ~NcclCommunicator() override {
    pairs_.clear();  // before the watchdog state and MPI go
  }
  int world_size() const override { return mpi_->world_size(); }
  int rank() const override { return mpi_->rank(); }
  std::string name() const override { return "nccl"; }
  int local_rank() const override { return mpi_->local_rank(); }
  int local_size() const override { return mpi_->local_size(); }
  void local_all_gather(const void* in, void* out, size_t bytes) override { mpi_->local_all_gather(in, out, bytes); }
  std::unique_ptr<CommGroup> make_group(const std::vector<int>& ranks) override {
    return std::make_unique<NcclGroup>(st_, mpi_->make_group(ranks), ranks, &spent_);
  }
  void send(const void* buf, size_t bytes, int peer, int tag) override {
    if (!is_device_pointer(*st_, buf)) return mpi_->send(buf, bytes, peer, tag);
    const double t0 = now_s();
    const State::DeviceScope dev(*st_);  // enqueue with the stream's device current
    ncclComm_t c = pair(peer);
    SHARDLM_NCCL_CHECK(c, ncclSend(buf, bytes, ncclUint8, rank() < peer ? 1 : 0, c, st_->stream()));
    st_->track("send", cat("to rank ", peer));
    spent_ += now_s() - t0;
  }
  // Host messages only (device ones go in stream order with a blocking send).
  int isend(const void* buf, size_t bytes, int peer, int tag) override {
    if (!is_device_pointer(*st_, buf)) return mpi_->isend(buf, bytes, peer, tag);
    send(buf, bytes, peer, tag);
    return -1;
  }
  void wait_send(int handle) override { mpi_->wait_send(handle); }
  void recv(void* buf, size_t bytes, int peer, int tag) override {
    if (!is_device_pointer(*st_, buf)) return mpi_->recv(buf, bytes, peer, tag);
    const double t0 = now_s();
    const State::DeviceScope dev(*st_);  // enqueue with the stream's device current
    ncclComm_t c = pair(peer);
    SHARDLM_NCCL_CHECK(c, ncclRecv(buf, bytes, ncclUint8, rank() < peer ? 1 : 0, c, st_->stream()));
    st_->track("receive", cat("from rank ", peer));
    spent_ += now_s() - t0;
  }
  // Host time inside calls: for NCCL that is the enqueue, not the transfer (which overlaps the stream).
  double comm_seconds() const override { return spent_ + mpi_->comm_seconds(); }
  bool accepts_device_memory() const override { return st_->bound(); }
  std::string all_reduce_kind() const override { return st_->all_reduce_kind(); }
  void bind_stream(void* cuda_stream) override { st_->bind(static_cast<cudaStream_t>(cuda_stream)); }

 private:
  // Device messages between two ranks use their own two-rank communicator, made at their first message
  // (which both make: a send is always matched by a receive). The lower rank creates the id. NCCL has no
  // tags: messages between a pair are matched in the order they were issued.
  ncclComm_t pair(int peer) {
    auto it = pairs_.find(peer);
    if (it == pairs_.end()) {
      ncclUniqueId id{};
      if (rank() < peer) {
        SHARDLM_NCCL_CHECK(nullptr, ncclGetUniqueId(&id));
        mpi_->send(&id, sizeof id, peer, kTagNcclId);
      } else {
        mpi_->recv(&id, sizeof id, peer, kTagNcclId);
      }
      auto c = std::make_unique<NcclComm>(*st_, 2, id, rank() < peer ? 0 : 1, cat("ranks ", rank(), " and ", peer));
      it = pairs_.emplace(peer, std::move(c)).first;
    }
    return it->second->get();
  }

  std::unique_ptr<Communicator> mpi_;
  std::shared_ptr<State> st_;
  std::map<int, std::unique_ptr<NcclComm>> pairs_;
  double spent_ = 0;
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(std::unique_ptr<Communicator> control, double timeout_s) {
  return std::make_unique<NcclCommunicator>(std::move(control), timeout_s);
}

}  // namespace shardlm
