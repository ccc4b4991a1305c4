// The CUDA backend on one GPU: the public face. No CUDA header is included here, so model, runtime and
// tests build against it with a plain C++ compiler; everything CUDA stays in src/backends/cuda/*.cu(h).
//
// Execution model: every op is enqueued on the backend's own stream and returns without waiting; only
// upload, download, synchronize and cuda_argmax wait. The step's positions (one StepDev per sequence of
// the BatchInfo) live in device memory, written by begin_step with an asynchronous copy, so a decode step
// can be captured once into a CUDA graph and replayed for every later token (CudaGraphRunner below).
//
// KV cache: one pool block per sequence (kv_block_size(n_ctx) = n_ctx), read as one contiguous range by the
// kernels. The decode attention (with its rope and cache store) serves every decoding sequence of a step in one
// launch, each block finding its sequence's row and cache block in that sequence's StepDev; a sequence's prompt
// chunk still launches rope, kv_store and the prefill attention for that sequence alone.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>

#include "core/cuda_tuning.h"
#include "core/dtype.h"
#include "ops/backend.h"

namespace shardlm {

// Number of CUDA devices usable by this process; 0 when there is no driver or no GPU. Never throws.
int cuda_device_count();

// A backend on device `device_index` (0-based). `kv_type` is the element type the caller will give the
// KV cache (F16 default, F32 on request); it only sets defaults, since every KvLayerView carries its type.
// `tuning`: the kernel switches (core/cuda_tuning.h; the defaults are the measured choices).
// Throws Error (kInvalidInput for a bad index, type or tuning value, kResource when the device cannot be
// initialized).
std::unique_ptr<Backend> make_cuda_backend(int device_index, GgmlType kv_type = GgmlType::F16,
                                           const CudaTuning& tuning = CudaTuning{});

// Device-to-device copy bandwidth of a 1 GiB cudaMemcpy, counting bytes read plus written (best of five
// after a warm-up): the ceiling decode's weight reads are measured against.
double cuda_copy_bandwidth(int device_index);

// Greedy sampling on the GPU: index of the largest of logits[0..n) (device memory of `backend`; the lowest
// index wins ties; NaNs are never chosen unless every element is NaN, then 0). Waits for the result.
int32_t cuda_argmax(Backend& backend, const float* logits /* (n), device */, int64_t n);
// The same without waiting: writes the index to `out` (device memory), so it can sit inside a graph.
void cuda_argmax_async(Backend& backend, const float* logits /* (n), device */, int64_t n,
                       int32_t* out /* (1), device */);

// How many packed matvec launches of `backend` used an activation row quantized by the op that produced it
// (rms_norm, add_rms_norm, swiglu, decode attention) instead of quantizing x themselves (tests, bench).
int64_t cuda_prequantized_matvecs(Backend& backend);
// How many matmul_reduce calls of `backend` pushed their outputs to the group's fused all-reduce.
int64_t cuda_pushing_matvecs(Backend& backend);
// What SHARDLM_CUDA_ATTN_OUT4 sets at construction (tests compare the two forms): the decode attention's
// output step with one float4 per thread (true) or one element per thread.
void cuda_set_attention_out4(Backend& backend, bool on);
// What SHARDLM_CUDA_ATTN_BLOCKS_PER_KV_HEAD sets at construction: the decode attention's query heads of a KV
// head over 1, 2 or 4 blocks (never more than the group's size).
void cuda_set_attention_blocks_per_kv_head(Backend& backend, int blocks);
// What SHARDLM_CUDA_TOKENS_MAX sets at construction: steps of 2 .. n tokens multiply packed weights with the
// several-token kernel (1: never), longer ones through cuBLAS; 0 puts back the default, by weight type:
int64_t cuda_tokens_max_default(GgmlType type);
void cuda_set_tokens_max(Backend& backend, int64_t n);
// SHARDLM_CUDA_ATTN_LAST_BLOCK_COMBINE for tests: the decode attention merges its splits in its last block.
void cuda_set_attention_last_block_combine(Backend& backend, bool on);

// The backend's cudaStream_t (as void*, so this header stays CUDA-free), for a communicator that enqueues
// on it (Communicator::bind_stream).
void* cuda_stream(Backend& backend);

// Runs one forward step, capturing it into a CUDA graph and replaying the graph on later steps.
//
//   CudaGraphRunner graph(backend);
//   for each decode token:
//     backend.get_rows(tok_embd, &token, 1, x);          // host ids: outside the graph
//     graph.run(BatchInfo::single(pos, 1, {block}, false), [&] { model.layers_and_head(x, logits); });
//
// run(batch, body) calls backend.begin_step(batch) outside the graph (that copy carries the positions),
// then: on the first call (or after invalidate(), a different batch shape, or a scratch buffer of the
// backend having grown) runs `body` eagerly, so that every lazily sized buffer and cached table exists;
// on the next call captures `body` into a graph and launches it; afterwards only launches the graph.
// The batch shape is n_tok, the number of sequences, each sequence's n_tok and each sequence's cache
// block id: a graph bakes the launch shapes and the KV base pointers, so any change of them captures
// again. `body` must issue the same op sequence with the same pointers and shapes at every call: only the
// positions may change. Inside `body`, begin_step may be called again with the same batch (it is then a
// no-op); get_rows (host ids), upload, download and synchronize throw kUnsupported while capturing.
// The model uses it for one-sequence, one-token decode steps.
class CudaGraphRunner {
 public:
  explicit CudaGraphRunner(Backend& backend);  // throws Error if `backend` is not a CUDA backend
  ~CudaGraphRunner();
  CudaGraphRunner(const CudaGraphRunner&) = delete;
  CudaGraphRunner& operator=(const CudaGraphRunner&) = delete;

  void run(const BatchInfo& batch, const std::function<void()>& body);
  void invalidate();            // drop the graph; the next run() starts over with an eager call
  bool captured() const;        // a graph exists and will be replayed by the next run()
  int64_t captures() const;     // graphs captured so far (for tests and logs)
  int64_t replays() const;      // graph launches so far

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace shardlm
