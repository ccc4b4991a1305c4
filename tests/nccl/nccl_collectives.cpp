// Run under `mpirun -np 2` (or more; one GPU per rank): checks the NCCL communicator's all-reduce,
// all-gather (equal and unequal slices), broadcast and send/recv on device memory against sums computed
// on the host, the MPI path for host buffers, an all-reduce captured in a CUDA graph, and prints the
// latency of an 8 KB all-reduce. Exit status 0 when every check passed.
//   nccl_collectives            the checks and timings
//   nccl_collectives --stall    rank 1 skips an all-reduce: rank 0's watchdog must abort the job (3 s)
#include <cuda_runtime.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <thread>
#include <vector>

#include "comm/mpi/mpi_comm.h"
#include "comm/nccl/nccl_comm.h"

using namespace shardlm;

namespace {

#define CK(x)                                                                                       \
  do {                                                                                              \
    const cudaError_t e_ = (x);                                                                     \
    if (e_ != cudaSuccess) {                                                                        \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));     \
      std::exit(1);                                                                                 \
    }                                                                                               \
  } while (0)

// RAII for the test's own CUDA resources.
struct DevBuf {
  explicit DevBuf(size_t n) { CK(cudaMalloc(&p, n * sizeof(float))); }
  ~DevBuf() { cudaFree(p); }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  float* p = nullptr;
};
struct Stream {
  Stream() { CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)); }
  ~Stream() { cudaStreamDestroy(s); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  cudaStream_t s = nullptr;
};

int failures = 0;
void expect_eq(const std::vector<float>& got, const std::vector<float>& want, const char* what, int rank) {
  for (size_t i = 0; i < want.size(); ++i)
    if (got[i] != want[i]) {
      std::fprintf(stderr, "rank %d: %s: element %zu is %g, expected %g\n", rank, what, i, got[i], want[i]);
      ++failures;
      return;
    }
  if (rank == 0) std::printf("ok: %s\n", what);
}

float value(int rank, size_t i) { return static_cast<float>((rank + 1) * 1000 + static_cast<int>(i % 997)); }

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

int main(int argc, char** argv) {
  const bool stall = argc > 1 && std::strcmp(argv[1], "--stall") == 0;
  int n_dev = 0;
  if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev < 1) {
    std::fprintf(stderr, "nccl_collectives: no GPU\n");
    return 77;
  }
  auto comm = make_nccl_communicator(make_mpi_communicator(&argc, &argv, 60), stall ? 3 : 60);
  const int rank = comm->rank(), world = comm->world_size();
  CK(cudaSetDevice(rank % n_dev));
  Stream stream;
  comm->bind_stream(stream.s);
  std::vector<int> all(static_cast<size_t>(world));
  for (int r = 0; r < world; ++r) all[static_cast<size_t>(r)] = r;
  auto g = comm->make_group(all);

  if (stall) {
    DevBuf d(1024);
    if (rank == 0) {
      g->barrier();
      g->all_reduce_sum(d.p, 1024);  // creates the communicator with rank 1, then waits for its half
      g->all_reduce_sum(d.p, 1024);
      cudaStreamSynchronize(stream.s);  // never returns: the watchdog aborts first
    } else {
      g->barrier();
      g->all_reduce_sum(d.p, 1024);
      std::this_thread::sleep_for(std::chrono::seconds(30));
    }
    std::fprintf(stderr, "rank %d: the stall was not detected\n", rank);
    return 1;
  }

  // All-reduce of an odd size (not a multiple of NCCL's chunking).
  const size_t n = 100003;
  std::vector<float> h(n), want(n, 0.f), got(n);
  for (size_t i = 0; i < n; ++i) h[i] = value(rank, i);
  for (int r = 0; r < world; ++r)
    for (size_t i = 0; i < n; ++i) want[i] += value(r, i);
  DevBuf d(n);
  CK(cudaMemcpy(d.p, h.data(), n * sizeof(float), cudaMemcpyHostToDevice));
  g->all_reduce_sum(d.p, n);
  CK(cudaMemcpyAsync(got.data(), d.p, n * sizeof(float), cudaMemcpyDeviceToHost, stream.s));
  CK(cudaStreamSynchronize(stream.s));
  expect_eq(got, want, "device all-reduce (NCCL)", rank);

  // Host buffer: MPI path.
  std::vector<float> hh = h;
  g->all_reduce_sum(hh.data(), n);
  expect_eq(hh, want, "host all-reduce (MPI)", rank);

  // All-gather, unequal slices (grouped broadcasts) and equal ones (ncclAllGather).
  for (int equal = 0; equal < 2; ++equal) {
    std::vector<size_t> counts;
    size_t total = 0;
    for (int r = 0; r < world; ++r) counts.push_back(equal ? 777 : 500 + 37 * static_cast<size_t>(r)), total += counts.back();
    const size_t mine = counts[static_cast<size_t>(rank)];
    std::vector<float> in(mine), wantg;
    for (size_t i = 0; i < mine; ++i) in[i] = value(rank, i);
    for (int r = 0; r < world; ++r)
      for (size_t i = 0; i < counts[static_cast<size_t>(r)]; ++i) wantg.push_back(value(r, i));
    DevBuf din(mine), dout(total);
    CK(cudaMemcpy(din.p, in.data(), mine * sizeof(float), cudaMemcpyHostToDevice));
    g->all_gather(din.p, dout.p, counts);
    std::vector<float> gotg(total);
    CK(cudaMemcpyAsync(gotg.data(), dout.p, total * sizeof(float), cudaMemcpyDeviceToHost, stream.s));
    CK(cudaStreamSynchronize(stream.s));
    expect_eq(gotg, wantg, equal ? "device all-gather, equal slices" : "device all-gather, unequal slices", rank);
    std::vector<float> hostg(total);
    g->all_gather(in.data(), hostg.data(), counts);
    expect_eq(hostg, wantg, "host all-gather (MPI)", rank);
  }

  // Broadcast from the last rank.
  {
    std::vector<float> b(4096), wantb(4096);
    for (size_t i = 0; i < b.size(); ++i) b[i] = value(rank, i), wantb[i] = value(world - 1, i);
    DevBuf db(b.size());
    CK(cudaMemcpy(db.p, b.data(), b.size() * sizeof(float), cudaMemcpyHostToDevice));
    g->broadcast(db.p, b.size() * sizeof(float), world - 1);
    CK(cudaMemcpyAsync(b.data(), db.p, b.size() * sizeof(float), cudaMemcpyDeviceToHost, stream.s));
    CK(cudaStreamSynchronize(stream.s));
    expect_eq(b, wantb, "device broadcast", rank);
  }

  // Send/recv along a ring of device buffers (the pipeline's hidden-state hand-off).
  {
    const size_t m = 4096 * 7;
    std::vector<float> s(m), wants(m), r(m);
    const int next = (rank + 1) % world, prev = (rank + world - 1) % world;
    for (size_t i = 0; i < m; ++i) s[i] = value(rank, i), wants[i] = value(prev, i);
    DevBuf ds(m), dr(m);
    CK(cudaMemcpy(ds.p, s.data(), m * sizeof(float), cudaMemcpyHostToDevice));
    // Even ranks send first, odd ranks receive first: each pair's messages are issued in a matching order.
    for (int phase = 0; phase < 2; ++phase) {
      if ((rank % 2 == 0) == (phase == 0)) comm->send(ds.p, m * sizeof(float), next, 7);
      else comm->recv(dr.p, m * sizeof(float), prev, 7);
    }
    CK(cudaMemcpyAsync(r.data(), dr.p, m * sizeof(float), cudaMemcpyDeviceToHost, stream.s));
    CK(cudaStreamSynchronize(stream.s));
    expect_eq(r, wants, "device send/recv ring", rank);
  }

  // Captured in a CUDA graph, replayed twice: sum of sums.
  {
    const size_t m = 2048;
    std::vector<float> x(m), wantx(m, 0.f), gotx(m);
    for (size_t i = 0; i < m; ++i) x[i] = value(rank, i);
    for (int r = 0; r < world; ++r)
      for (size_t i = 0; i < m; ++i) wantx[i] += value(r, i);
    for (size_t i = 0; i < m; ++i) wantx[i] *= static_cast<float>(world);
    DevBuf dx(m);
    CK(cudaMemcpy(dx.p, x.data(), m * sizeof(float), cudaMemcpyHostToDevice));
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CK(cudaStreamBeginCapture(stream.s, cudaStreamCaptureModeRelaxed));
    g->all_reduce_sum(dx.p, m);
    CK(cudaStreamEndCapture(stream.s, &graph));
    CK(cudaGraphInstantiate(&exec, graph, 0));
    CK(cudaGraphLaunch(exec, stream.s));
    CK(cudaGraphLaunch(exec, stream.s));
    CK(cudaMemcpyAsync(gotx.data(), dx.p, m * sizeof(float), cudaMemcpyDeviceToHost, stream.s));
    CK(cudaStreamSynchronize(stream.s));
    expect_eq(gotx, wantx, "device all-reduce in a CUDA graph, replayed twice", rank);
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
  }

  // Latency of an 8 KB all-reduce (2048 floats, the decode step's (1, n_embd=2048) message size class):
  // eager one at a time (enqueue + stream sync), and 100 captured in one graph (the decode path).
  {
    const size_t m = 2048;
    DevBuf dx(m);
    CK(cudaMemset(dx.p, 0, m * sizeof(float)));
    for (int i = 0; i < 50; ++i) g->all_reduce_sum(dx.p, m);
    CK(cudaStreamSynchronize(stream.s));
    g->barrier();
    const int iters = 1000;
    double t0 = now_s();
    for (int i = 0; i < iters; ++i) {
      g->all_reduce_sum(dx.p, m);
      CK(cudaStreamSynchronize(stream.s));
    }
    const double eager_us = (now_s() - t0) / iters * 1e6;
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CK(cudaStreamBeginCapture(stream.s, cudaStreamCaptureModeRelaxed));
    for (int i = 0; i < 100; ++i) g->all_reduce_sum(dx.p, m);
    CK(cudaStreamEndCapture(stream.s, &graph));
    CK(cudaGraphInstantiate(&exec, graph, 0));
    CK(cudaGraphLaunch(exec, stream.s));
    CK(cudaStreamSynchronize(stream.s));
    g->barrier();
    t0 = now_s();
    for (int i = 0; i < 20; ++i) CK(cudaGraphLaunch(exec, stream.s));
    CK(cudaStreamSynchronize(stream.s));
    const double graph_us = (now_s() - t0) / (20 * 100) * 1e6;
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    std::vector<float> hx(m, 0.f);
    g->barrier();
    t0 = now_s();
    for (int i = 0; i < iters; ++i) g->all_reduce_sum(hx.data(), m);
    const double mpi_us = (now_s() - t0) / iters * 1e6;
    if (rank == 0)
      std::printf("8 KB all-reduce, %d ranks: NCCL eager (enqueue + sync) %.1f us, NCCL in a CUDA graph %.1f us, "
                  "MPI host memory %.1f us\n",
                  world, eager_us, graph_us, mpi_us);
  }
  g->barrier();
  if (rank == 0) std::printf("%s\n", failures ? "FAILED" : "ALL PASSED");
  return failures ? 1 : 0;
}
