#include "comm/mpi/mpi_comm.h"

#include <mpi.h>

#include <chrono>
#include <cstdio>
#include <thread>

#include "core/error.h"

namespace shardlm {
namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

void check(int rc, const char* what) {
  if (rc != MPI_SUCCESS) {
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    fail_kind(ErrorKind::kComm, what, " failed: ", std::string(msg, static_cast<size_t>(len)));
  }
}

// Waits for a non-blocking request, yielding the core between polls (ranks may outnumber cores) and
// aborting the whole job when the peer has been silent too long.
class Waiter {
 public:
  Waiter(int rank, double timeout_s, double* spent) : rank_(rank), timeout_(timeout_s), spent_(spent) {}
  void wait(MPI_Request* req, const char* what, int peer) {
    const double t0 = now_s();
    int done = 0;
    int spins = 0;
    for (;;) {
      check(MPI_Test(req, &done, MPI_STATUS_IGNORE), what);
      if (done) break;
      if (++spins > 64) std::this_thread::sleep_for(std::chrono::microseconds(spins > 10000 ? 500 : 20));
      if (now_s() - t0 > timeout_) {
        std::fprintf(stderr,
                     "shardlm: rank %d: %s with %s %d got no answer for %.0f s; that rank has failed or hangs. "
                     "Aborting all ranks.\n",
                     rank_, what, peer >= 0 ? "rank" : "group of", peer >= 0 ? peer : -peer, timeout_);
        std::fflush(stderr);
        MPI_Abort(MPI_COMM_WORLD, 3);
      }
    }
    *spent_ += now_s() - t0;
  }

 private:
  int rank_;
  double timeout_;
  double* spent_;
};

class MpiGroup final : public CommGroup {
 public:
  MpiGroup(MPI_Comm c, int world_rank, double timeout, double* spent) : comm_(c), waiter_(world_rank, timeout, spent) {
    MPI_Comm_size(comm_, &size_);
    MPI_Comm_rank(comm_, &rank_);
  }
  ~MpiGroup() override {
    if (comm_ != MPI_COMM_NULL && comm_ != MPI_COMM_WORLD) MPI_Comm_free(&comm_);
  }
  int size() const override { return size_; }
  int rank() const override { return rank_; }
  void all_reduce_sum(float* buf, size_t n) override {
    if (size_ == 1) return;
    MPI_Request req;
    check(MPI_Iallreduce(MPI_IN_PLACE, buf, static_cast<int>(n), MPI_FLOAT, MPI_SUM, comm_, &req), "all-reduce");
    waiter_.wait(&req, "all-reduce", -size_);
  }
  void all_gather(const float* in, float* out, const std::vector<size_t>& counts) override {
    std::vector<int> c, displ;
    int at = 0;
    for (size_t x : counts) {
      c.push_back(static_cast<int>(x));
      displ.push_back(at);
      at += static_cast<int>(x);
    }
    MPI_Request req;
    check(MPI_Iallgatherv(in, c[static_cast<size_t>(rank_)], MPI_FLOAT, out, c.data(), displ.data(), MPI_FLOAT,
                          comm_, &req),
          "all-gather");
    waiter_.wait(&req, "all-gather", -size_);
  }
  void broadcast(void* buf, size_t bytes, int root) override {
    if (size_ == 1) return;
    MPI_Request req;
    check(MPI_Ibcast(buf, static_cast<int>(bytes), MPI_BYTE, root, comm_, &req), "broadcast");
    waiter_.wait(&req, "broadcast", root);
  }
  void barrier() override {
    MPI_Request req;
    check(MPI_Ibarrier(comm_, &req), "barrier");
    waiter_.wait(&req, "barrier", -size_);
  }

 private:
  MPI_Comm comm_;
  int size_ = 1, rank_ = 0;
  Waiter waiter_;
};

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator(int* argc, char*** argv, double timeout) : timeout_(timeout) {
    int inited = 0;
    MPI_Initialized(&inited);
    if (!inited) {
      int provided = 0;
      check(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
      owns_ = true;
    }
    // Errors come back as codes (turned into shardlm::Error) instead of killing the job silently.
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    MPI_Comm_size(MPI_COMM_WORLD, &size_);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    // The ranks that share this host's memory, in world-rank order (the key).
    check(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &local_),
          "MPI_Comm_split_type(MPI_COMM_TYPE_SHARED)");
    MPI_Comm_size(local_, &local_size_);
    MPI_Comm_rank(local_, &local_rank_);
  }
  ~MpiCommunicator() override {
    for (Pending& p : pending_)
      if (p.req != MPI_REQUEST_NULL) MPI_Wait(&p.req, MPI_STATUS_IGNORE);
    if (local_ != MPI_COMM_NULL) MPI_Comm_free(&local_);
    if (owns_) MPI_Finalize();
  }
  int world_size() const override { return size_; }
  int rank() const override { return rank_; }
  int local_rank() const override { return local_rank_; }
  int local_size() const override { return local_size_; }
  void local_all_gather(const void* in, void* out, size_t bytes) override {
    MPI_Request req;
    check(MPI_Iallgather(in, static_cast<int>(bytes), MPI_BYTE, out, static_cast<int>(bytes), MPI_BYTE, local_, &req),
          "all-gather on this host");
    Waiter(rank_, timeout_, &spent_).wait(&req, "all-gather on this host", -local_size_);
  }
  std::string name() const override { return "mpi"; }
  std::unique_ptr<CommGroup> make_group(const std::vector<int>& ranks) override {
    MPI_Group world_group, g;
    MPI_Comm_group(MPI_COMM_WORLD, &world_group);
    MPI_Group_incl(world_group, static_cast<int>(ranks.size()), ranks.data(), &g);
    MPI_Comm c = MPI_COMM_NULL;
    check(MPI_Comm_create_group(MPI_COMM_WORLD, g, 0, &c), "MPI_Comm_create_group");
    MPI_Group_free(&g);
    MPI_Group_free(&world_group);
    return std::make_unique<MpiGroup>(c, rank_, timeout_, &spent_);
  }
  void send(const void* buf, size_t bytes, int peer, int tag) override {
    MPI_Request req;
    check(MPI_Isend(buf, static_cast<int>(bytes), MPI_BYTE, peer, tag, MPI_COMM_WORLD, &req), "send");
    Waiter(rank_, timeout_, &spent_).wait(&req, "send", peer);
  }
  int isend(const void* buf, size_t bytes, int peer, int tag) override {
    MPI_Request req;
    check(MPI_Isend(buf, static_cast<int>(bytes), MPI_BYTE, peer, tag, MPI_COMM_WORLD, &req), "send");
    // Handles are slots in a small table; a finished slot is reused.
    for (size_t i = 0; i < pending_.size(); ++i)
      if (pending_[i].req == MPI_REQUEST_NULL) {
        pending_[i] = {req, peer};
        return static_cast<int>(i);
      }
    pending_.push_back({req, peer});
    return static_cast<int>(pending_.size() - 1);
  }
  void wait_send(int handle) override {
    if (handle < 0 || static_cast<size_t>(handle) >= pending_.size()) return;
    Pending& p = pending_[static_cast<size_t>(handle)];
    if (p.req != MPI_REQUEST_NULL) Waiter(rank_, timeout_, &spent_).wait(&p.req, "send", p.peer);
    p.req = MPI_REQUEST_NULL;
  }
  void recv(void* buf, size_t bytes, int peer, int tag) override {
    MPI_Request req;
    check(MPI_Irecv(buf, static_cast<int>(bytes), MPI_BYTE, peer, tag, MPI_COMM_WORLD, &req), "receive");
    Waiter(rank_, timeout_, &spent_).wait(&req, "receive", peer);
  }
  double comm_seconds() const override { return spent_; }

 private:
  struct Pending {
    MPI_Request req;
    int peer;
  };
  std::vector<Pending> pending_;  // isend requests not yet waited for
  double timeout_;
  bool owns_ = false;
  int size_ = 1, rank_ = 0;
  MPI_Comm local_ = MPI_COMM_NULL;  // this host's ranks of the world
  int local_size_ = 1, local_rank_ = 0;
  double spent_ = 0;
};

}  // namespace

std::unique_ptr<Communicator> make_mpi_communicator(int* argc, char*** argv, double timeout_s) {
  return std::make_unique<MpiCommunicator>(argc, argv, timeout_s);
}

}  // namespace shardlm
