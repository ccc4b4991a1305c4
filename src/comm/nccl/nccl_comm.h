// NCCL for GPU memory, MPI for everything else (GitHub issue 6).
//
// The MPI communicator stays the launcher and control plane: it carries the NCCL unique ids, every
// host-memory buffer (the model's logits all-gather, the engine's token broadcast), barriers, and its own
// watchdog. Device-memory buffers (the tensor-parallel all-reduce of partial sums, pipeline hidden states)
// go through NCCL, enqueued on the stream given to bind_stream: no host sync, so a decode step that
// contains them can be captured in a CUDA graph. Which path a call takes is decided per buffer by
// cudaPointerGetAttributes, once a stream is bound; before that every call goes to MPI.
//
// NCCL communicators are created lazily, at a group's first device-memory collective (collective over
// the group's members, like the call itself) and at the first device message between two ranks (one
// two-rank communicator per peer). Creation is refused inside a CUDA graph capture: run one eager step
// first (CudaGraphRunner does).
//
// Small device all-reduces (up to 64 KiB, SHARDLM_ALLREDUCE_ONESHOT_MAX_KB) take a one-shot kernel over
// NVLink peer memory instead of NCCL where every pair of the group's GPUs has peer access
// (one_shot_all_reduce.h); SHARDLM_ALLREDUCE=auto|nccl|oneshot picks, all_reduce_kind() tells.
//
// Watchdog: NCCL calls return once enqueued, so a dead peer shows up as a kernel that never finishes. A
// thread checks each eagerly enqueued operation (a CUDA event recorded after it) and each communicator's
// asynchronous error; an operation older than the timeout, a blocking NCCL setup call that outlasts it, or
// an asynchronous error makes it print what stalled, ncclCommAbort every communicator and abort the job.
// Operations replayed from a CUDA graph are not tracked; a peer that stalls inside one leaves the other
// ranks waiting in an MPI call (the sampled-token broadcast), where the MPI watchdog aborts the job. A
// one-shot kernel, replayed or not, stops waiting for a peer after the timeout and sets a word in host
// memory that the watchdog checks on every tick.
#pragma once

#include <memory>

#include "comm/communicator.h"

namespace shardlm {

// Wraps `control` (an MPI communicator, world size > 1). `timeout_s` bounds every NCCL operation.
std::unique_ptr<Communicator> make_nccl_communicator(std::unique_ptr<Communicator> control, double timeout_s);

}  // namespace shardlm
