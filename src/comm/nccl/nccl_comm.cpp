#include "comm/nccl/nccl_comm.h"

#include <cuda_runtime.h>
#include <mpi.h>
#include <nccl.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

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

// What every group and the communicator share: the bound stream and device, and the watchdog.
class State {
 public:
  State(int rank, double timeout) : rank_(rank), timeout_(timeout), thread_([this] { loop(); }) {}
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
  // so there is nothing to watch.
  void track(const char* what, const std::string& where) {
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
    pending_.push_back({ev, now_s(), cat(what, " ", where)});
  }

  void add_comm(ncclComm_t c) {
    std::lock_guard<std::mutex> lk(mu_);
    comms_.push_back(c);
  }
  void remove_comm(ncclComm_t c) {
    std::lock_guard<std::mutex> lk(mu_);
    std::erase(comms_, c);
  }

 private:
  struct Pending {
    cudaEvent_t ev;
    double t0;
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
      const double t = now_s();
      if (!pending_.empty() && t - pending_.front().t0 > timeout_)
        stall_locked(cat(pending_.front().what, " has not completed after ", static_cast<int>(timeout_),
                         " s; a peer has failed or hangs"));
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
  bool bound_ = false;
  cudaStream_t stream_ = nullptr;
  int device_ = 0;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::deque<Pending> pending_;
  std::vector<cudaEvent_t> free_;
  std::string host_what_;
  double host_t0_ = 0;
  std::vector<ncclComm_t> comms_;
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
  NcclGroup(std::shared_ptr<State> st, std::unique_ptr<CommGroup> mpi, double* spent)
      : st_(std::move(st)), mpi_(std::move(mpi)), spent_(spent) {}
  int size() const override { return mpi_->size(); }
  int rank() const override { return mpi_->rank(); }

  void all_reduce_sum(float* buf, size_t n) override {
    if (size() == 1) return;
    if (!on_device(buf)) return mpi_->all_reduce_sum(buf, n);
    const double t0 = now_s();
    const State::DeviceScope dev(*st_);  // enqueue with the stream's device current
    ncclComm_t c = comm();
    SHARDLM_NCCL_CHECK(c, ncclAllReduce(buf, buf, n, ncclFloat, ncclSum, c, st_->stream()));
    done("all-reduce", t0);
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

  std::shared_ptr<State> st_;
  std::unique_ptr<CommGroup> mpi_;
  double* spent_;
  std::unique_ptr<NcclComm> nccl_;
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
  NcclCommunicator(std::unique_ptr<Communicator> mpi, double timeout)
      : mpi_(std::move(mpi)), st_(std::make_shared<State>(mpi_->rank(), timeout)) {}
  ~NcclCommunicator() override {
    pairs_.clear();  // before the watchdog state and MPI go
  }
  int world_size() const override { return mpi_->world_size(); }
  int rank() const override { return mpi_->rank(); }
  std::string name() const override { return "nccl"; }
  std::unique_ptr<CommGroup> make_group(const std::vector<int>& ranks) override {
    return std::make_unique<NcclGroup>(st_, mpi_->make_group(ranks), &spent_);
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
