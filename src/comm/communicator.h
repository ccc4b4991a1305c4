// Collectives and point-to-point messages between ranks, on buffers in the backend's memory.
//
// The model calls all_reduce/all_gather inside its tensor-parallel group and send/recv along the pipeline;
// implementations: a single-rank one (no-ops), MPI (host memory, any number of hosts) and NCCL (device
// memory). Groups are created once from rank lists; each call names the group it runs in.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "comm/device_push.h"

namespace shardlm {

// What follows the all-reduce of a row-parallel matmul's output in a transformer layer: the residual add and
// the next RMS norm (x += sum; y = x / rms(x) * w), for a device communicator to fold into its all-reduce.
struct AddRmsNormEpilogue {
  float* x = nullptr;        // (n) the residual row, updated in place
  const float* w = nullptr;  // (n) the norm's weight
  float* y = nullptr;        // (n) the normalized row
  float eps = 0.0f;
  // (quant_x_words(n)) y's int8 copy in the CUDA backend's activation layout (backends/cuda/quant_x.cuh),
  // for the packed matvec that reads y next; null: none.
  int* xq = nullptr;
};

// A set of ranks that run collectives together (a TP group, a PP group, the world).
class CommGroup {
 public:
  virtual ~CommGroup() = default;
  virtual int size() const = 0;
  virtual int rank() const = 0;  // index of this rank inside the group
  // In-place sum over the group.
  virtual void all_reduce_sum(float* buf /* (n) */, size_t n) = 0;
  // all_reduce_sum(buf), then the epilogue, as one operation where the communicator can (one kernel on the
  // device for one row: the NCCL communicator's one-shot path). Returns false, having done nothing, where
  // it cannot; the caller then runs all_reduce_sum and the epilogue itself. Every member must make the same
  // call with the same n, and get the same answer: the decision may depend only on what all members share
  // (n, the group, the settings, whether buf is device memory), never on a member's own pointers.
  virtual bool all_reduce_sum_add_rms_norm(float* /*buf (n)*/, size_t /*n*/, const AddRmsNormEpilogue& /*e*/) {
    return false;
  }
  // Asked by a backend about to launch the kernel that writes buf, when the next call on this group will be
  // all_reduce_sum_add_rms_norm(buf, n): where that kernel may push its outputs to the other members itself
  // (comm/device_push.h). On true, that call takes the pushed words and does not send buf again, so the
  // kernel must store every one of its n outputs there. False (the default): no push; the call sends.
  // Decided like all_reduce_sum_add_rms_norm, on what every member shares.
  virtual bool device_push_target(const float* /*buf (n)*/, size_t /*n*/, DevicePush* /*out*/) { return false; }
  // out = concatenation of every member's `in` (member i's `counts[i]` floats), in group order.
  virtual void all_gather(const float* in /* (counts[rank]) */, float* out /* (sum counts) */,
                          const std::vector<size_t>& counts) = 0;
  // Root's buffer is copied to every member.
  virtual void broadcast(void* buf, size_t bytes, int root) = 0;
  virtual void barrier() = 0;
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int world_size() const = 0;
  virtual int rank() const = 0;
  virtual std::string name() const = 0;
  // The ranks of this job on this host (MPI_COMM_TYPE_SHARED), numbered in world-rank order: this rank's
  // index among them and their number. Engine picks a GPU and divides the cores with them.
  virtual int local_rank() const = 0;
  virtual int local_size() const = 0;
  // out = every local rank's `in`, in local-rank order: `bytes` host bytes each (the same on all of them).
  // Collective over the ranks of this host.
  virtual void local_all_gather(const void* in, void* out /* (local_size * bytes) */, size_t bytes) = 0;
  // Collective over the world: every rank must call it with the same list, ascending.
  virtual std::unique_ptr<CommGroup> make_group(const std::vector<int>& ranks) = 0;
  // Point-to-point in world ranks; a message is matched by (peer, tag).
  virtual void send(const void* buf, size_t bytes, int peer, int tag) = 0;
  virtual void recv(void* buf, size_t bytes, int peer, int tag) = 0;
  // A send that returns at once: `buf` must stay untouched until wait_send(handle). Pipeline stages use it
  // so that a stage computes its next micro-batch while the previous one is still being delivered (with
  // MPI's rendezvous protocol a blocking send would wait until the receiver next enters MPI). The default
  // sends synchronously and returns -1, which wait_send ignores.
  virtual int isend(const void* buf, size_t bytes, int peer, int tag) {
    send(buf, bytes, peer, tag);
    return -1;
  }
  virtual void wait_send(int /*handle*/) {}
  // Seconds spent inside communication calls so far (bench reports the share).
  virtual double comm_seconds() const = 0;
  // Whether buffers may be in GPU memory (NCCL); otherwise callers stage GPU data through the host.
  virtual bool accepts_device_memory() const { return false; }
  // The CUDA stream (a cudaStream_t) that device-memory calls are enqueued on, so they stay in order with
  // the backend's kernels without a host sync; communicators that stage through the host ignore it.
  virtual void bind_stream(void* /*cuda_stream*/) {}
  // How device-memory all-reduces travel, for reports (e.g. "oneshot<=64KiB, nccl above in the group of
  // ranks 0,1", "nccl"); empty where there is only one way.
  virtual std::string all_reduce_kind() const { return ""; }
};

// One rank, no peers: every collective is the identity.
std::unique_ptr<Communicator> make_single_rank_communicator();

}  // namespace shardlm
