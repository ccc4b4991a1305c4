// The Llama-family forward pass (llama, mistral, qwen2) for one rank's slice of the model, written only
// against the ops interface (Backend) and the communicator: the same code runs on one CPU, on tensor- and
// pipeline-parallel CPU ranks over MPI, and on GPUs.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "comm/communicator.h"
#include "config/model_config.h"
#include "ops/backend.h"
#include "plan/mapping.h"
#include "plan/shard.h"

namespace shardlm {

// This rank's weights, in the backend's memory (or mapped from the file on the CPU).
struct LayerWeights {
  const float* attn_norm = nullptr;  // (n_embd)
  WeightView wq;                     // (q_local * head_dim rows, n_embd)
  WeightView wk;                     // (kv_local * head_dim rows, n_embd)
  WeightView wv;                     // (kv_local * head_dim rows, n_embd)
  const float* bq = nullptr;         // (q_local * head_dim) qwen2 only
  const float* bk = nullptr;         // (kv_local * head_dim)
  const float* bv = nullptr;         // (kv_local * head_dim)
  const float* q_norm = nullptr;     // (head_dim) qwen3 only: every q head's RMS norm weights, before RoPE
  const float* k_norm = nullptr;     // (head_dim) the same for k heads
  WeightView wo;                     // (n_embd rows, q_local * head_dim)
  const float* ffn_norm = nullptr;   // (n_embd)
  WeightView w_gate;                 // (ff_local rows, n_embd)
  WeightView w_up;                   // (ff_local rows, n_embd)
  WeightView w_down;                 // (n_embd rows, ff_local)
  // Mixture of experts (ModelConfig::moe(); then w_gate/w_up/w_down are empty): the router, replicated on
  // every rank, and the FFN of each expert this rank holds (Mapping::experts(): all, each cut over the
  // tensor-parallel ranks like a dense FFN, or whole under expert parallelism); element i is expert
  // experts().begin + i.
  WeightView router;                 // (n_expert rows, n_embd)
  std::vector<WeightView> exp_gate;  // (experts held) each (ff_local rows, n_embd)
  std::vector<WeightView> exp_up;    // (experts held) each (ff_local rows, n_embd)
  std::vector<WeightView> exp_down;  // (experts held) each (n_embd rows, ff_local)
  // Where the experts live and run when not on the layer's backend (experts in RAM beside a GPU layer);
  // null: the layer's backend.
  Backend* expert_backend = nullptr;
};

struct ModelWeights {
  WeightView token_embd;                 // (n_vocab rows, n_embd), first stage only, in layer_backend[0]'s memory
  const float* output_norm = nullptr;    // (n_embd), last stage only, in the last layer backend's memory
  WeightView output;                     // (vocab_local rows, n_embd), last stage only, same memory
  std::vector<LayerWeights> layers;      // this stage's layers, in order
  std::vector<Backend*> layer_backend;   // (layers) where each layer's weights live and its ops run
  std::vector<float> rope_freq_factors;  // (head_dim/2) host copy, empty when none
  // Owns whatever had to be copied or converted; mapped weights point into the source instead.
  std::vector<std::unique_ptr<DeviceBuffer>> storage;
  uint64_t weight_bytes = 0;             // bytes of weights this rank holds (mapped or copied)
  uint64_t mapped_bytes = 0;             // of which read in place from the file's mapping (not allocated)
  // What a decode step reads: every tensor once, the embedding table only as the output matrix of a tied model
  // (get_rows reads one row of it a token).
  uint64_t step_bytes = 0;
  uint64_t expert_host_bytes = 0;        // of which experts held apart from their layer (in RAM)
};

struct ModelOptions {
  int64_t n_batch = 256;              // largest step (tokens per forward call)
  // This stage's KV cache pools, one per layer in order, each in its layer's backend memory: owned by the
  // engine (runtime/kv_pool.h), which hands out their blocks to sequences. Same n_blocks and block_size
  // in every layer.
  std::vector<KvLayerView> kv;
};

// The KV cache pools of a stage's layers, one per layer on the backend that runs it: n_blocks blocks of
// block_size positions each, for this rank's KV heads. Buffers go to `storage`; returns the views, and adds
// their bytes to *bytes. The engine owns them; the model only reads and writes through the views.
std::vector<KvLayerView> allocate_kv_pools(const ModelConfig& config, int64_t n_head_kv_local,
                                           const std::vector<Backend*>& layer_backend, int64_t n_blocks,
                                           int64_t block_size, GgmlType type,
                                           std::vector<std::unique_ptr<DeviceBuffer>>* storage, uint64_t* bytes);

// What a step's sampler needs from one row of logits (Sampler::request): the min(k, n_vocab) first logits
// in candidate order, and the logits at the `extra` vocabulary ids. k == 0: the whole row.
struct RowRequest {
  int k = 0;
  std::vector<int32_t> extra;  // distinct ids in [0, n_vocab)
  bool lse = false;            // also the row's log-sum-exp (log-probabilities = logit - lse)
};
struct RowCandidates {
  std::vector<TokenCandidate> top;  // (min(k, n_vocab)) in candidate order, vocabulary ids
  std::vector<float> extra;         // (extra.size()) raw logits at the request's extra ids
  std::vector<float> logits;        // (n_vocab) the whole row, when k == 0
  float lse = 0.0f;                 // log(sum(exp(logits))) over the whole vocabulary, when asked
};

// Runs one step's device work; a CUDA backend replays it as a graph (see CudaGraphRunner). The default
// calls begin_step and the body.
using StepRunner = std::function<void(const BatchInfo&, const std::function<void()>& body)>;

class LlamaModel {
 public:
  // `comm` must outlive the model; TP/PP groups are created here (a collective over the world). Layers may
  // live on different backends (CPU offload: the first layers on the CPU, the rest on a GPU); the hidden
  // state moves through host memory at each boundary.
  LlamaModel(const ModelConfig& config, const Mapping& mapping, Communicator& comm, ModelWeights weights,
             const ModelOptions& options);
  ~LlamaModel();

  const ModelConfig& config() const { return config_; }
  const Mapping& mapping() const { return mapping_; }
  const ModelWeights& weights() const { return weights_; }
  int64_t kv_blocks() const { return options_.kv.front().n_blocks; }
  int64_t kv_block_size() const { return options_.kv.front().block_size; }
  uint64_t workspace_bytes() const { return workspace_bytes_; }
  int64_t q_heads_local() const { return heads_.q_heads.size(); }
  int64_t kv_heads_local() const { return heads_.kv_heads.size(); }

  // Decode steps (n_tok == 1) of a model that lives on one backend go through `runner` (for CUDA graphs).
  // Only set it when no collective of the step needs host memory (tp == 1, or a device communicator).
  void set_decode_runner(StepRunner runner) { decode_runner_ = std::move(runner); }

  // One step of this stage over `batch`: on the first stage embeds `ids` (batch.n_tok, host), otherwise
  // receives the hidden state from the previous stage; runs this stage's layers; sends to the next stage,
  // or on the last stage computes the logits of batch.out_rows. Every rank of the stage must call it with
  // the same batch. Returns true on the last stage, where rows() may then be called.
  bool forward(const BatchInfo& batch, const int32_t* ids);
  // After a forward that returned true: what the sampler asked of each out row (reqs, one per out row).
  // Tensor-parallel ranks exchange only their candidates, for all rows at once; every rank of the last
  // stage gets the same. Rows whose request has k == 0 get the whole row of logits instead.
  void rows(const std::vector<RowRequest>& reqs, std::vector<RowCandidates>* out);
  // The whole logits of every out row (n_out, n_vocab), on every rank of the last stage (tests, perplexity).
  void logits(std::vector<float>* out);

  // Greedy decoding with the token in device memory (Backend::device_tokens): the host enqueues one step after
  // another without reading a token in between, so the device never waits for the host. Available when the
  // model is one stage on one backend that keeps device tokens, tensor-parallel ranks reduce on the device,
  // and the vocabulary fits ids that travel as floats (< 2^24).
  bool greedy_on_device() const;
  // Like set_decode_runner, for step_greedy's body (a graph of its own: it differs from step's).
  void set_greedy_runner(StepRunner runner) { greedy_runner_ = std::move(runner); }
  // The input token of the next step_greedy (after the steps enqueued so far).
  void set_device_token(int32_t id);
  // Enqueues the decode step `batch` (one sequence, one token) on the device token; the greedy choice of its
  // logits (candidate order over the whole vocabulary, as rows() with k = 1 and a greedy sampler) becomes
  // the device token for the next step, and device_token_at(its position)'s answer. Every rank calls it
  // with the same batch.
  void step_greedy(const BatchInfo& batch);
  // Waits for the step at `pos` (one of the two latest step_greedy calls) and returns its token, the same on
  // every rank. Fails if the logits had no candidate.
  int32_t device_token_at(int64_t pos);

  // Seconds spent in collectives and stage messages (from the communicator).
  double comm_seconds() const { return comm_.comm_seconds(); }

 private:
  struct Segment;  // consecutive layers on one backend, with their KV cache views and activations
  // One layer on the segment's buffers. add_pending: x still lacks the previous layer's FFN output (o holds
  // this rank's share of it, not yet all-reduced); the layer leaves its own there too, for the next layer
  // or the end of the segment to reduce and add.
  void layer(Segment& seg, int index, int64_t n_tok, bool add_pending);
  // The mixture-of-experts FFN of one layer on xn (n_tok, n_embd) into o, this rank's share (the dense FFN's
  // counterpart): the router's top n_expert_used experts per token are chosen on the host, the token rows
  // grouped by expert, each expert's matmuls run once over its rows, and the outputs summed with their
  // weights.
  void moe_ffn(Segment& seg, const LayerWeights& w, int64_t n_tok);
  // o = its sum over the tensor-parallel group, x += o, xn = rms_norm(x) * w: one backend op (one kernel
  // on CUDA with NCCL) where the communicator reads device memory.
  void reduce_add_norm(Backend& b, float* o, float* x, const float* w, float* xn, int64_t n_tok);
  // The output norm and head over the batch's out rows, into logits_for(out rows).
  void head(const BatchInfo& batch);
  // Segment s's device work of a step: its layers, the last reduce and add, the head on the last stage.
  void segment_body(size_t s, const BatchInfo& batch);
  void check_batch(const BatchInfo& batch) const;
  // Collectives and messages on backend memory, staged through the host when the communicator
  // cannot read device memory.
  void all_reduce(Backend& b, float* buf, size_t n);
  // Whether collectives and messages on b's memory go to the communicator as they are (device memory and a
  // communicator that reads it, such as NCCL), with no host sync or staging.
  bool device_collectives(const Backend& b) const;
  // Whether layers on b sum their row-parallel outputs over the tensor-parallel group with the backend's
  // device op (all_reduce_add_rms_norm), which a matmul_reduce before it may feed directly.
  bool reduces_on_device(const Backend& b) const;
  void send_hidden(Backend& b, float* x, size_t n);
  void recv_hidden(Backend& b, float* x, size_t n);

  ModelConfig config_;
  Mapping mapping_;
  Communicator& comm_;
  ModelWeights weights_;
  ModelOptions options_;
  HeadShard heads_;
  Range vocab_;
  int64_t ff_local_ = 0;
  std::unique_ptr<CommGroup> tp_group_;
  std::vector<size_t> vocab_counts_;  // per TP rank: vocabulary rows of the output shard
  std::vector<std::unique_ptr<Segment>> segments_;
  std::vector<float> host_stage_;     // host copy for staged collectives
  // Two host buffers for hidden states in flight to the next stage, used in turn with isend, and the
  // handle of the send each one is part of (-1 when free).
  std::vector<float> send_buf_[2];
  int send_handle_[2] = {-1, -1};
  int send_slot_ = 0;
  // Logits of this rank's vocabulary slice for the out rows of a step, in the last segment's backend. One
  // row (decode of one sequence) lives in a buffer that is never reallocated, because a captured CUDA graph
  // keeps its address; steps that want the logits of several rows use a second buffer that grows on demand.
  std::unique_ptr<DeviceBuffer> logits_row_;   // (1, vocab_local)
  std::unique_ptr<DeviceBuffer> logits_rows_;  // (rows, vocab_local), rows > 1
  float* logits_for(int64_t rows);
  StepRunner decode_runner_;
  StepRunner greedy_runner_;
  std::unique_ptr<DeviceBuffer> greedy_cands_;  // (tp, 4) step_greedy's candidates, one slot per TP rank
  int64_t n_out_ = 0;  // out rows of the last forward
  uint64_t workspace_bytes_ = 0;
};

}  // namespace shardlm
