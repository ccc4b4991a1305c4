// Run under `mpirun -np 2` (or more; one GPU per rank): checks the NCCL communicator's all-reduce,
// all-gather (equal and unequal slices), broadcast and send/recv on device memory against sums computed
// on the host, the MPI path for host buffers, an all-reduce captured in a CUDA graph; then the small
// all-reduces that take the one-shot path (sizes around its threshold, 1000 back-to-back calls, 100
// replays of a captured graph with new inputs) against fp64 sums and across ranks bit for bit; and
// prints the latency of 8 KB and 32 KB all-reduces. Exit status 0 when every check passed.
// SHARDLM_ALLREDUCE (auto|nccl|oneshot) picks the all-reduce path, as in shardlm.
//   nccl_collectives            the checks and timings
//   nccl_collectives --stall    rank 1 skips an all-reduce: rank 0 must abort the job (timeout 3 s)
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "comm/mpi/mpi_comm.h"
#include "comm/nccl/nccl_comm.h"
#include "comm/nccl/one_shot_all_reduce.h"

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

struct PinnedBuf {
  explicit PinnedBuf(size_t n) { CK(cudaMallocHost(&p, n * sizeof(float))); }
  ~PinnedBuf() { cudaFreeHost(p); }
  PinnedBuf(const PinnedBuf&) = delete;
  PinnedBuf& operator=(const PinnedBuf&) = delete;
  float* p = nullptr;
};

// Rank `rank`'s input of all-reduce number `call`, element i: every rank can compute every other rank's
// input, so the reference needs no communication, and each call's data differs from the last one's (a
// stale slot or a slot overwritten too early shows). Multiples of 2^-23 in [-1, 1), exact in fp32.
float input(int rank, uint64_t call, size_t i) {
  uint64_t z = (static_cast<uint64_t>(rank) << 56) ^ (call << 28) ^ i;
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return static_cast<float>(static_cast<int64_t>(z >> 40) - (int64_t{1} << 23)) * 0x1p-23f;
}

// `got` (n floats, the result of call `call`) against the fp64 sum of every rank's input. Tolerance
// 1e-6 + 1e-6 |ref|, because fp32 sums of `world` inputs in [-1, 1) round once per addition, by at most
// 2^-24 of the partial sum (|partial| <= k after k terms): with 2 ranks one rounding, <= 6e-8 |ref|; the
// absolute part covers results near zero where the partial sums cancel (up to 4 ranks the bound is
// 2^-24 (2 + 3 + 4) = 5.4e-7). NCCL adds in another order, inside the same bound.
bool close_to_sums(const float* got, size_t n, int world, uint64_t call, const std::string& what, int rank) {
  double worst = 0;
  size_t at = 0;
  double ref_at = 0;
  for (size_t i = 0; i < n; ++i) {
    double ref = 0;
    for (int r = 0; r < world; ++r) ref += input(r, call, i);
    const double tol = 1e-6 + 1e-6 * std::fabs(ref);
    const double share = std::isfinite(got[i]) ? std::fabs(got[i] - ref) / tol : INFINITY;
    if (!(share <= worst)) worst = share, at = i, ref_at = ref;
  }
  if (worst <= 1.0) return true;
  std::fprintf(stderr,
               "rank %d: %s (call %llu, %zu floats): element %zu is %.9g, fp64 sum %.9g, tolerance %.3g "
               "(%.1f x used)\n",
               rank, what.c_str(), static_cast<unsigned long long>(call), n, at, got[at], ref_at,
               1e-6 + 1e-6 * std::fabs(ref_at), worst);
  ++failures;
  return false;
}

uint64_t hash_bits(const float* x, size_t n) {
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < n; ++i) {
    uint32_t b;
    std::memcpy(&b, x + i, 4);
    h = (h ^ b) * 1099511628211ull;
  }
  return h;
}

// Every rank's values of `mine`, through the group's host path (MPI).
std::vector<uint64_t> from_every_rank(CommGroup& g, const std::vector<uint64_t>& mine) {
  std::vector<uint64_t> all(mine.size() * static_cast<size_t>(g.size()));
  for (int r = 0; r < g.size(); ++r) {
    std::vector<uint64_t> x = mine;
    g.broadcast(x.data(), x.size() * sizeof(uint64_t), r);
    std::memcpy(all.data() + static_cast<size_t>(r) * mine.size(), x.data(), x.size() * sizeof(uint64_t));
  }
  return all;
}

// Every rank must hold the same bits for each call whose all-reduce took the one-shot path (it sums in
// rank order everywhere); NCCL's results are only reported.
void expect_same_bits(CommGroup& g, const std::vector<uint64_t>& hashes, const std::vector<bool>& via_one_shot,
                      const char* what, int rank) {
  const std::vector<uint64_t> all = from_every_rank(g, hashes);
  size_t differ = 0, differ_nccl = 0;
  for (size_t c = 0; c < hashes.size(); ++c)
    for (int r = 1; r < g.size(); ++r)
      if (all[static_cast<size_t>(r) * hashes.size() + c] != all[c]) {
        (via_one_shot[c] ? differ : differ_nccl) += 1;
        if (via_one_shot[c] && differ == 1)
          std::fprintf(stderr, "rank %d: %s: call %zu (one-shot) differs between rank 0 and rank %d\n", rank, what, c,
                       r);
      }
  if (differ) ++failures;
  else if (rank == 0)
    std::printf("ok: %s: one-shot results bit-identical on every rank (%zu of %zu NCCL results differ somewhere)\n",
                what, differ_nccl, hashes.size());
}

void CUDART_CB sleep_on_stream(void* us) {
  std::this_thread::sleep_for(std::chrono::microseconds(*static_cast<const int*>(us)));
}

// Small all-reduces (the one-shot path under SHARDLM_ALLREDUCE=auto|oneshot; NCCL under nccl).
void check_small_all_reduces(Communicator& comm, CommGroup& g, cudaStream_t stream, int rank, int world) {
  const one_shot::Settings settings = one_shot::settings_from_env();
  const size_t max_floats = settings.max_bytes / sizeof(float);
  {
    // Sets the path up (the first eligible call, eager) so that all_reduce_kind() tells the decision.
    DevBuf d(1);
    CK(cudaMemset(d.p, 0, sizeof(float)));
    g.all_reduce_sum(d.p, 1);
    CK(cudaStreamSynchronize(stream));
  }
  const std::string kind = comm.all_reduce_kind();
  if (rank == 0) std::printf("all-reduce path: %s\n", kind.c_str());
  const bool one_shot_on = kind.rfind("oneshot", 0) == 0;
  if (settings.mode == one_shot::Mode::kOneShot && !one_shot_on) {
    std::fprintf(stderr, "rank %d: SHARDLM_ALLREDUCE=oneshot, but the path is '%s'\n", rank, kind.c_str());
    ++failures;
  }
  if (settings.mode == one_shot::Mode::kNccl && one_shot_on) {
    std::fprintf(stderr, "rank %d: SHARDLM_ALLREDUCE=nccl, but the path is '%s'\n", rank, kind.c_str());
    ++failures;
  }
  auto takes_one_shot = [&](size_t n) { return one_shot_on && n <= max_floats; };
  uint64_t call = 1000;  // numbers every all-reduce below, for input()

  // 1. Sizes around the threshold, one view at an odd float offset on odd ranks only (the kernel must not
  //    let the buffer's alignment decide which block sums which elements), with sentinels around each view.
  {
    struct Case {
      size_t n, offset;
    };
    const std::vector<Case> cases = {{1, 0},    {7, 0},    {1024, 0},       {4096, 0},          {16384, 0},
                                     {1023, 1}, {4097, 3}, {max_floats, 0}, {max_floats + 1, 0}};
    std::vector<uint64_t> hashes;
    std::vector<bool> via_one_shot;
    bool all_ok = true;
    for (const Case& c : cases) {
      const size_t off = rank % 2 ? c.offset : 0, pad = 8;
      std::vector<float> h(c.n + off + pad, 12345.f);
      for (size_t i = 0; i < c.n; ++i) h[off + i] = input(rank, call, i);
      DevBuf d(h.size());
      CK(cudaMemcpy(d.p, h.data(), h.size() * sizeof(float), cudaMemcpyHostToDevice));
      g.all_reduce_sum(d.p + off, c.n);
      CK(cudaMemcpyAsync(h.data(), d.p, h.size() * sizeof(float), cudaMemcpyDeviceToHost, stream));
      CK(cudaStreamSynchronize(stream));
      const std::string what = "all-reduce of " + std::to_string(c.n) + " floats at offset " + std::to_string(off);
      all_ok = close_to_sums(h.data() + off, c.n, world, call, what, rank) && all_ok;
      for (size_t i = 0; i < h.size(); ++i)
        if ((i < off || i >= off + c.n) && h[i] != 12345.f) {
          std::fprintf(stderr, "rank %d: %s wrote outside its view (float %zu)\n", rank, what.c_str(), i);
          ++failures, all_ok = false;
          break;
        }
      hashes.push_back(hash_bits(h.data() + off, c.n));
      via_one_shot.push_back(takes_one_shot(c.n));
      ++call;
    }
    if (all_ok && rank == 0)
      std::printf("ok: small all-reduces (1 .. %zu floats, unaligned views) within 1e-6 + 1e-6|ref| of fp64 sums\n",
                  max_floats + 1);
    expect_same_bits(g, hashes, via_one_shot, "small all-reduces", rank);
  }

  // Sizes of the next two checks: one-shot sizes of every kind, and one above the threshold (NCCL) in
  // between, so that the two paths also interleave on the stream.
  const std::vector<size_t> sizes = {1, 7, 1024, 4096, 16384, 2048, max_floats + 1, 513};

  // 2. 1000 back-to-back calls with no host sync between them, each on new data: a rank that reused a
  //    slot while a peer still read it, or read a slot before the peer had filled it, gets a wrong sum.
  //    Every 37th call one rank's stream sleeps 300 us first, so the ranks drift apart.
  {
    const int calls = 1000;
    std::vector<size_t> at(calls + 1, 0);
    for (int c = 0; c < calls; ++c) at[size_t(c) + 1] = at[size_t(c)] + sizes[size_t(c) % sizes.size()];
    std::vector<float> h(at[calls]);
    for (int c = 0; c < calls; ++c)
      for (size_t i = 0; i < at[size_t(c) + 1] - at[size_t(c)]; ++i)
        h[at[size_t(c)] + i] = input(rank, call + size_t(c), i);
    DevBuf d(h.size());
    CK(cudaMemcpy(d.p, h.data(), h.size() * sizeof(float), cudaMemcpyHostToDevice));
    int delay_us = 300;  // read by the stream's host function, before the synchronize below
    g.barrier();
    for (int c = 0; c < calls; ++c) {
      if (c % 37 == 0 && (c / 37) % world == rank) CK(cudaLaunchHostFunc(stream, sleep_on_stream, &delay_us));
      g.all_reduce_sum(d.p + at[size_t(c)], at[size_t(c) + 1] - at[size_t(c)]);
    }
    CK(cudaMemcpyAsync(h.data(), d.p, h.size() * sizeof(float), cudaMemcpyDeviceToHost, stream));
    CK(cudaStreamSynchronize(stream));
    bool all_ok = true;
    std::vector<uint64_t> hashes;
    std::vector<bool> via_one_shot;
    for (int c = 0; c < calls; ++c) {
      const size_t n = at[size_t(c) + 1] - at[size_t(c)];
      if (all_ok)
        all_ok = close_to_sums(h.data() + at[size_t(c)], n, world, call + size_t(c), "back-to-back all-reduce", rank);
      hashes.push_back(hash_bits(h.data() + at[size_t(c)], n));
      via_one_shot.push_back(takes_one_shot(n));
    }
    if (all_ok && rank == 0) std::printf("ok: %d back-to-back all-reduces on changing data\n", calls);
    expect_same_bits(g, hashes, via_one_shot, "back-to-back all-reduces", rank);
    call += calls;
  }

  // 3. The same sizes captured once in a CUDA graph, replayed 100 times, each replay on new inputs copied
  //    in first: the kernel's arguments never change, so its call counter must advance on the device.
  {
    const int replays = 100;
    std::vector<size_t> at(sizes.size() + 1, 0);
    for (size_t k = 0; k < sizes.size(); ++k) at[k + 1] = at[k] + sizes[k];
    const size_t total = at.back();
    PinnedBuf hin(total * replays), hout(total * replays);
    auto call_of = [&](int j, size_t k) { return call + static_cast<uint64_t>(j) * sizes.size() + k; };
    for (int j = 0; j < replays; ++j)
      for (size_t k = 0; k < sizes.size(); ++k)
        for (size_t i = 0; i < sizes[k]; ++i) hin.p[size_t(j) * total + at[k] + i] = input(rank, call_of(j, k), i);
    DevBuf d(total);
    CK(cudaMemset(d.p, 0, total * sizeof(float)));
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed));
    for (size_t k = 0; k < sizes.size(); ++k) g.all_reduce_sum(d.p + at[k], sizes[k]);
    CK(cudaStreamEndCapture(stream, &graph));
    CK(cudaGraphInstantiate(&exec, graph, 0));
    int delay_us = 200;
    for (int j = 0; j < replays; ++j) {
      CK(cudaMemcpyAsync(d.p, hin.p + size_t(j) * total, total * sizeof(float), cudaMemcpyHostToDevice, stream));
      if (j % 10 == rank) CK(cudaLaunchHostFunc(stream, sleep_on_stream, &delay_us));
      CK(cudaGraphLaunch(exec, stream));
      CK(cudaMemcpyAsync(hout.p + size_t(j) * total, d.p, total * sizeof(float), cudaMemcpyDeviceToHost, stream));
    }
    CK(cudaStreamSynchronize(stream));
    CK(cudaGraphExecDestroy(exec));
    CK(cudaGraphDestroy(graph));
    bool all_ok = true;
    std::vector<uint64_t> hashes;
    std::vector<bool> via_one_shot;
    for (int j = 0; j < replays; ++j)
      for (size_t k = 0; k < sizes.size(); ++k) {
        const float* got = hout.p + size_t(j) * total + at[k];
        if (all_ok)
          all_ok = close_to_sums(got, sizes[k], world, call_of(j, k), "all-reduce replayed from a CUDA graph", rank);
        hashes.push_back(hash_bits(got, sizes[k]));
        via_one_shot.push_back(takes_one_shot(sizes[k]));
      }
    if (all_ok && rank == 0)
      std::printf("ok: %zu all-reduces captured in a CUDA graph, %d replays on new inputs\n", sizes.size(), replays);
    expect_same_bits(g, hashes, via_one_shot, "graph replays", rank);
  }
}

// ---- 4. The all-reduce fused with the residual add and RMS norm (CommGroup::all_reduce_sum_add_rms_norm).
// Call c's inputs: this rank's share input(rank, c, i), the residual 4 * input(kXTag, c, i) and the weight
// 1 + input(kWTag, c, i) / 2 (the same on every rank, as the model's are).
constexpr int kXTag = 100, kWTag = 101;
constexpr float kEps = 1e-5f;
float residual_in(uint64_t call, size_t i) { return 4.0f * input(kXTag, call, i); }
float weight_in(uint64_t call, size_t i) { return 1.0f + 0.5f * input(kWTag, call, i); }

struct FusedCall {
  size_t n, off;  // floats, and the views' offset into their buffers (unaligned when odd)
  uint64_t call;
  bool quantize;  // asks for y's int8 row too
};

// One call's device buffers, views at `off`, 8 sentinel floats after each view.
struct FusedBufs {
  explicit FusedBufs(const FusedCall& c)
      : n(c.n), off(c.off), buf(c.n + c.off + 8), x(c.n + c.off + 8), y(c.n + c.off + 8), w(c.n + c.off),
        xq(c.n / 4 + 2 * (c.n / 32) + 1) {}
  // This rank's inputs, uploaded (also before each graph replay).
  void load(const FusedCall& c, int rank, cudaStream_t s) {
    hb.assign(n + off + 8, 12345.f);
    hx = hb;
    std::vector<float> hy = hb, hw(n + off, 0.f);
    for (size_t i = 0; i < n; ++i) {
      hb[off + i] = input(rank, c.call, i);
      hx[off + i] = residual_in(c.call, i);
      hw[off + i] = weight_in(c.call, i);
    }
    CK(cudaMemcpyAsync(buf.p, hb.data(), hb.size() * 4, cudaMemcpyHostToDevice, s));
    CK(cudaMemcpyAsync(x.p, hx.data(), hx.size() * 4, cudaMemcpyHostToDevice, s));
    CK(cudaMemcpyAsync(y.p, hy.data(), hy.size() * 4, cudaMemcpyHostToDevice, s));
    CK(cudaMemcpyAsync(w.p, hw.data(), hw.size() * 4, cudaMemcpyHostToDevice, s));
  }
  bool enqueue(CommGroup& g, bool quantize) {
    AddRmsNormEpilogue e;
    e.x = x.p + off;
    e.w = w.p + off;
    e.y = y.p + off;
    e.eps = kEps;
    e.xq = quantize ? reinterpret_cast<int*>(xq.p) : nullptr;
    return g.all_reduce_sum_add_rms_norm(buf.p + off, n, e);
  }
  // Results, into host vectors of the same shapes (pinned copies are not needed: the checks are slow anyway).
  void fetch(cudaStream_t s, std::vector<float>* ob, std::vector<float>* ox, std::vector<float>* oy,
             std::vector<uint32_t>* oq) {
    ob->resize(n + off + 8), ox->resize(n + off + 8), oy->resize(n + off + 8), oq->resize(n / 4 + 2 * (n / 32));
    CK(cudaMemcpyAsync(ob->data(), buf.p, ob->size() * 4, cudaMemcpyDeviceToHost, s));
    CK(cudaMemcpyAsync(ox->data(), x.p, ox->size() * 4, cudaMemcpyDeviceToHost, s));
    CK(cudaMemcpyAsync(oy->data(), y.p, oy->size() * 4, cudaMemcpyDeviceToHost, s));
    CK(cudaMemcpyAsync(oq->data(), xq.p, oq->size() * 4, cudaMemcpyDeviceToHost, s));
  }
  size_t n, off;
  DevBuf buf, x, y, w, xq;
  std::vector<float> hb, hx;  // what load() uploaded
};

// y's int8 row as backends/cuda/quant_x.cuh defines it, from y's bits: per 32 elements d = max|y| / 127,
// q = round-half-even(y * (127 / max|y|)), s = d * sum q; words of 4 int8, then the d's, then the s's.
std::vector<uint32_t> quantize_row(const float* y, size_t n) {
  std::vector<uint32_t> out(n / 4 + 2 * (n / 32), 0);
  for (size_t u = 0; u < n / 32; ++u) {
    float a = 0.f;
    for (size_t j = 0; j < 32; ++j) a = std::max(a, std::fabs(y[32 * u + j]));
    const float d = a / 127.0f, id = a > 0.0f ? 127.0f / a : 0.0f;
    int sum = 0;
    for (size_t j = 0; j < 32; ++j) {
      const int q = static_cast<int>(std::nearbyint(y[32 * u + j] * id));
      sum += q;
      out[(32 * u + j) / 4] |= (static_cast<uint32_t>(q) & 0xFFu) << (8 * (j % 4));
    }
    const float sd = d * static_cast<float>(sum);
    std::memcpy(&out[n / 4 + u], &d, 4);
    std::memcpy(&out[n / 4 + n / 32 + u], &sd, 4);
  }
  return out;
}

// Checks one fused call's results; appends the hash of everything it wrote (for the cross-rank check).
bool check_fused_call(const FusedCall& c, int world, int rank, const std::vector<float>& b, const std::vector<float>& x,
                      const std::vector<float>& y, const std::vector<uint32_t>& q, const std::string& what,
                      std::vector<uint64_t>* hashes) {
  const size_t n = c.n, off = c.off;
  bool ok = close_to_sums(b.data() + off, n, world, c.call, what + ": the sum", rank);
  // x = residual + sum: the sum's own tolerance (close_to_sums) plus one more rounding, 2^-24 |x|.
  double worst_x = 0, worst_y = 0, ss = 0;
  for (size_t i = 0; i < n; ++i) {
    double sum = 0;
    for (int r = 0; r < world; ++r) sum += input(r, c.call, i);
    const double ref = residual_in(c.call, i) + sum;
    worst_x = std::max(worst_x, std::fabs(x[off + i] - ref) / (2e-6 + 2e-6 * std::fabs(ref)));
    ss += static_cast<double>(x[off + i]) * x[off + i];
  }
  // y against the fp64 norm of the x it got: the fp32 sum of squares is a tree of at most 29 roundings of
  // positive terms (4 per thread, 5 per warp, 4 per block, 16 blocks), <= 29 * 2^-24 = 1.7e-6 relative;
  // the square root, division and two products add four more; 1e-5 |ref| leaves a margin.
  const double scale = 1.0 / std::sqrt(ss / static_cast<double>(n) + kEps);
  for (size_t i = 0; i < n; ++i) {
    const double ref = x[off + i] * scale * weight_in(c.call, i);
    worst_y = std::max(worst_y, std::fabs(y[off + i] - ref) / (1e-6 + 1e-5 * std::fabs(ref)));
  }
  for (size_t i = n + off; i < n + off + 8; ++i)
    if (b[i] != 12345.f || x[i] != 12345.f || y[i] != 12345.f) {
      std::fprintf(stderr, "rank %d: %s (%zu floats) wrote past its view\n", rank, what.c_str(), n);
      ok = false;
    }
  if (!(worst_x <= 1.0) || !(worst_y <= 1.0)) {
    std::fprintf(stderr, "rank %d: %s (%zu floats, call %llu): x at %.2f x its tolerance, y at %.2f x\n", rank,
                 what.c_str(), n, static_cast<unsigned long long>(c.call), worst_x, worst_y);
    ok = false;
  }
  if (c.quantize && quantize_row(y.data() + off, n) != q) {
    std::fprintf(stderr, "rank %d: %s (%zu floats): the int8 row is not y's (quant_x.cuh's scheme)\n", rank,
                 what.c_str(), n);
    ok = false;
  }
  uint64_t h = hash_bits(b.data() + off, n) ^ (hash_bits(x.data() + off, n) * 3) ^ (hash_bits(y.data() + off, n) * 5);
  if (c.quantize) h ^= hash_bits(reinterpret_cast<const float*>(q.data()), q.size()) * 7;
  hashes->push_back(h);
  if (!ok) ++failures;
  return ok;
}

void check_fused_norm(Communicator& comm, CommGroup& g, cudaStream_t stream, int rank, int world) {
  const one_shot::Settings settings = one_shot::settings_from_env();
  const bool one_shot_on = comm.all_reduce_kind().rfind("oneshot", 0) == 0;
  auto fusable = [&](size_t n) {
    return one_shot_on && settings.fuse == one_shot::Fuse::kNorm && n * sizeof(float) <= settings.max_bytes &&
           n <= one_shot::kMaxNormFloats;
  };
  uint64_t call = 500000;
  // a. Single calls: decode rows of 2048/4096/8192 (the models' n_embd), odd multiples of 32, views at an
  //    odd float offset on odd ranks, with and without the int8 row. Where the path is off, the call must
  //    say so and leave every buffer as it was.
  {
    std::vector<uint64_t> hashes;
    std::vector<bool> via;
    bool all_ok = true;
    int fused = 0;
    for (const size_t n : {size_t{32}, size_t{96}, size_t{2048}, size_t{4096}, size_t{4128}, size_t{8192}, size_t{16384}})
      for (const size_t off : {size_t{0}, size_t{1}})
        for (const bool quantize : {false, true}) {
          const FusedCall c{n, rank % 2 ? off : 0, call++, quantize};
          FusedBufs d(c);
          d.load(c, rank, stream);
          const bool took = d.enqueue(g, quantize);
          std::vector<float> b, x, y;
          std::vector<uint32_t> q;
          d.fetch(stream, &b, &x, &y, &q);
          CK(cudaStreamSynchronize(stream));
          const std::string what = "fused all-reduce + norm, offset " + std::to_string(c.off);
          if (took != fusable(n)) {
            std::fprintf(stderr, "rank %d: %s of %zu floats: fused = %d, expected %d\n", rank, what.c_str(), n, took,
                         fusable(n));
            ++failures, all_ok = false;
            continue;
          }
          if (!took) {
            if (b != d.hb || x != d.hx) {
              std::fprintf(stderr, "rank %d: %s declined but changed its buffers\n", rank, what.c_str());
              ++failures, all_ok = false;
            }
            continue;
          }
          ++fused;
          all_ok = check_fused_call(c, world, rank, b, x, y, q, what, &hashes) && all_ok;
          via.push_back(true);
        }
    if (all_ok && rank == 0 && fused > 0)
      std::printf("ok: %d fused all-reduce + add + norm calls (32 .. 16384 floats, unaligned views, int8 rows) "
                  "within their tolerances; the others declined and left their buffers alone\n", fused);
    if (all_ok && rank == 0 && fused == 0)
      std::printf("ok: every fused all-reduce + add + norm call declined (the path is off) and left its buffers alone\n");
    if (!hashes.empty()) expect_same_bits(g, hashes, via, "fused all-reduce + norm", rank);
  }
  if (!fusable(8192)) {
    if (rank == 0) std::printf("fused all-reduce + norm is off here: the interleaving checks are skipped\n");
    return;
  }
  // b. Fused calls interleaved with plain all-reduces (one-shot and NCCL) back to back, without host syncs,
  //    every 17th with one rank's stream asleep first; then c. the same captured once in a CUDA graph and
  //    replayed on new inputs. The two kernels use separate channels whose counters must each advance.
  for (const bool graph : {false, true}) {
    const std::vector<size_t> fsizes = {8192, 4096, 96, 2048};
    const std::vector<size_t> psizes = {8192, 1024, 20000};
    const int ops = graph ? 8 : 240, replays = graph ? 20 : 1;
    std::vector<FusedCall> calls;
    std::vector<std::unique_ptr<FusedBufs>> bufs;
    std::vector<std::unique_ptr<DevBuf>> plain;
    std::vector<size_t> plain_n;
    for (int k = 0; k < ops; ++k) {
      if (k % 2 == 0) {
        calls.push_back({fsizes[size_t(k / 2) % fsizes.size()], size_t(rank % 2) * size_t(k % 4 == 0), 0, k % 4 != 0});
        bufs.push_back(std::make_unique<FusedBufs>(calls.back()));
      } else {
        plain_n.push_back(psizes[size_t(k / 2) % psizes.size()]);
        plain.push_back(std::make_unique<DevBuf>(plain_n.back()));
      }
    }
    cudaGraphExec_t exec = nullptr;
    auto enqueue_all = [&] {
      bool all_fused = true;
      for (int k = 0; k < ops; ++k) {
        if (k % 2 == 0) all_fused = bufs[size_t(k / 2)]->enqueue(g, calls[size_t(k / 2)].quantize) && all_fused;
        else g.all_reduce_sum(plain[size_t(k / 2)]->p, plain_n[size_t(k / 2)]);
      }
      return all_fused;
    };
    bool all_ok = true;
    std::vector<uint64_t> hashes;
    int delay_us = 250;
    for (int j = 0; j < replays; ++j) {
      for (size_t f = 0; f < calls.size(); ++f) {
        calls[f].call = call++;
        bufs[f]->load(calls[f], rank, stream);
      }
      for (size_t p = 0; p < plain.size(); ++p) CK(cudaMemsetAsync(plain[p]->p, 0, plain_n[p] * 4, stream));
      if (j % 3 == rank % 3) CK(cudaLaunchHostFunc(stream, sleep_on_stream, &delay_us));
      bool took = true;
      if (!graph) {
        g.barrier();
        took = enqueue_all();
      } else {
        if (!exec) {
          cudaGraph_t gr;
          CK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed));
          took = enqueue_all();
          CK(cudaStreamEndCapture(stream, &gr));
          CK(cudaGraphInstantiate(&exec, gr, 0));
          CK(cudaGraphDestroy(gr));
        }
        CK(cudaGraphLaunch(exec, stream));
      }
      if (!took) {
        std::fprintf(stderr, "rank %d: a fused call declined in the interleaving check\n", rank);
        ++failures;
        return;
      }
      std::vector<std::vector<float>> b(calls.size()), x(calls.size()), y(calls.size());
      std::vector<std::vector<uint32_t>> q(calls.size());
      for (size_t f = 0; f < calls.size(); ++f) bufs[f]->fetch(stream, &b[f], &x[f], &y[f], &q[f]);
      CK(cudaStreamSynchronize(stream));
      for (size_t f = 0; f < calls.size() && all_ok; ++f)
        all_ok = check_fused_call(calls[f], world, rank, b[f], x[f], y[f], q[f],
                                  graph ? "fused call replayed from a CUDA graph" : "fused call between plain ones",
                                  &hashes);
    }
    if (exec) CK(cudaGraphExecDestroy(exec));
    if (all_ok && rank == 0)
      std::printf("ok: %zu fused calls interleaved with %zu plain all-reduces%s\n", calls.size() * size_t(replays),
                  plain.size() * size_t(replays), graph ? ", captured in a CUDA graph and replayed" : ", back to back");
    if (all_ok)
      expect_same_bits(g, hashes, std::vector<bool>(hashes.size(), true),
                       graph ? "fused calls in a graph" : "interleaved fused calls", rank);
  }
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
      g->all_reduce_sum(d.p, 1024);  // sets the path up with rank 1, then waits for its half
      g->all_reduce_sum(d.p, 1024);
      // NCCL: never returns, the watchdog aborts first. One-shot: returns when the kernel gives up after
      // the timeout; the watchdog sees its error word at its next tick (0.1 s) and aborts.
      cudaStreamSynchronize(stream.s);
      std::this_thread::sleep_for(std::chrono::seconds(5));
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
  expect_eq(got, want, "device all-reduce (NCCL: above the one-shot threshold)", rank);

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
    DevBuf dx(m), warm(m);
    CK(cudaMemcpy(dx.p, x.data(), m * sizeof(float), cudaMemcpyHostToDevice));
    // One eager call of the size first, as CudaGraphRunner does: a path is set up outside any capture.
    CK(cudaMemset(warm.p, 0, m * sizeof(float)));
    g->all_reduce_sum(warm.p, m);
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

  check_small_all_reduces(*comm, *g, stream.s, rank, world);
  check_fused_norm(*comm, *g, stream.s, rank, world);

  // Latency of 8 KB and 32 KB all-reduces (2048 and 8192 floats: a decode row of n_embd 2048, and of a
  // 70B model's 8192): eager one at a time (enqueue + stream sync), and 100 captured in one graph (the
  // decode path), on the path SHARDLM_ALLREDUCE picks; host memory through MPI for 8 KB.
  for (const size_t m : {size_t{2048}, size_t{8192}}) {
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
    const bool via_one_shot = comm->all_reduce_kind().rfind("oneshot", 0) == 0 &&
                              m * sizeof(float) <= one_shot::settings_from_env().max_bytes;
    if (rank == 0)
      std::printf("%zu KB all-reduce, %d ranks, %s: eager (enqueue + sync) %.1f us, in a CUDA graph %.1f us\n",
                  m * sizeof(float) / 1024, world, via_one_shot ? "one-shot" : "NCCL", eager_us, graph_us);
    if (m != 2048) continue;
    std::vector<float> hx(m, 0.f);
    g->barrier();
    t0 = now_s();
    for (int i = 0; i < iters; ++i) g->all_reduce_sum(hx.data(), m);
    const double mpi_us = (now_s() - t0) / iters * 1e6;
    if (rank == 0) std::printf("8 KB all-reduce, %d ranks, MPI host memory: %.1f us\n", world, mpi_us);
  }
  g->barrier();
  if (rank == 0) std::printf("%s\n", failures ? "FAILED" : "ALL PASSED");
  return failures ? 1 : 0;
}
