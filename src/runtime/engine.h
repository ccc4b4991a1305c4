// One rank's view of a running model: it loads this rank's shards, owns the model and the paged KV cache,
// and runs many sequences at once (continuous batching).
//
// Rank 0 owns the sequences: its Scheduler (runtime/scheduler.h) plans every step, and the plan (tokens,
// batch descriptor, what each logits row is for) is sent to every rank, so ranks can never disagree
// on a step. Every rank runs the plan through its layers; the last stage's candidates (or logits) travel
// back to rank 0 point-to-point, where the per-sequence samplers pick the tokens. `generate` is a client
// of the same path with one sequence.
#pragma once

#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "comm/communicator.h"
#include "core/cuda_tuning.h"
#include "loader/model_source.h"
#include "loader/weights.h"
#include "model/llama.h"
#include "runtime/sampler.h"
#include "runtime/scheduler.h"

namespace shardlm {

struct EngineOptions {
  int tp = 1;
  int pp = 1;
  // Mixture of experts: partition the experts of each layer over the tp ranks of a stage, each rank holding
  // whole experts (vLLM's --enable-expert-parallel); attention stays tensor-parallel. Off: every rank holds
  // 1/tp of every expert.
  bool expert_parallel = false;
  std::vector<double> layer_split;  // pipeline stage proportions; empty = even
  int64_t n_ctx = 0;                // 0: the model's training context (capped at 4096)
  int64_t n_batch = 512;            // most tokens in one forward step (llama.cpp's -ub default)
  int64_t micro_batch = 0;          // tokens per step with pp > 1 (prompt chunks flow through the stages);
                                    // 0 = n_batch / pp (at least 1)
  int64_t max_num_seqs = 1;         // sequences in one step (and running at once)
  int64_t kv_blocks = 0;            // blocks in the KV pool; 0 = max_num_seqs sequences of n_ctx positions
  // A new sequence's prompt reuses the KV blocks of an earlier one that started with the same tokens
  // (SchedulerOptions::prefix_caching): serve and chat turn it on.
  bool prefix_caching = false;
  GgmlType kv_type = GgmlType::F32;
  int n_threads = 0;                // CPU threads per rank; 0 = runtime/host_threads.h's default
  std::string backend = "cpu";      // "cpu", "reference" or "cuda"
  int n_gpu_layers = -1;            // cuda: layers on the GPU, the last ones (-1 = all); the rest on the CPU
  // cuda, mixture of experts: the experts of the model's first n_cpu_moe layers stay in RAM and run on
  // the CPU while attention, norms and the router run on the GPU (llama.cpp's --n-cpu-moe; --cpu-moe is
  // every layer).
  int n_cpu_moe = 0;
  // cuda: llama.cpp's -ot/--override-tensor, PATTERN=DEVICE: tensors whose name the regular expression
  // matches (searched, ECMAScript) go to DEVICE. This engine moves expert tensors (ffn_*_exps, the three of a
  // layer together) to CPU; CUDA/CUDA<n> of this rank's GPU keeps a tensor there. Anything else is an Error.
  std::vector<std::string> tensor_overrides;
  bool cuda_graphs = true;          // cuda: replay decode steps as CUDA graphs
  bool full_logits = false;         // decode steps move the whole logits row to the host (else candidates)
  // cuda, greedy decoding without penalties of a lone sequence: the token stays on the device and the host
  // enqueues the next step before reading this one's (LlamaModel::step_greedy).
  bool device_greedy = true;
  int device = -1;                  // cuda: device index; -1 = local rank modulo the devices
  CudaTuning cuda;                  // cuda: kernel switches for measurements (core/cuda_tuning.h)
};

struct StepTimes {
  double prefill_s = 0, decode_s = 0, comm_s = 0;
  int64_t prefill_tokens = 0, decode_tokens = 0;  // tokens computed
};

struct GenerateResult {
  std::vector<int32_t> generated;
  StepTimes times;
  bool tokens_on_device = false;  // decode steps took the device-greedy path (EngineOptions::device_greedy)
  int64_t cached_prompt_tokens = 0;  // prefix caching: prompt tokens not computed (times.prefill_tokens excludes them)
};

class Engine {
 public:
  Engine(const ModelSource& src, Communicator& comm, const EngineOptions& options,
         const std::function<void(uint64_t, uint64_t)>& load_progress = nullptr);
  ~Engine();

  const Mapping& mapping() const { return model_->mapping(); }
  const ModelConfig& config() const { return model_->config(); }
  const LlamaModel& model() const { return *model_; }
  const std::vector<HeldTensor>& held() const { return held_; }
  int64_t n_ctx() const { return options_.n_ctx; }
  const EngineOptions& options() const { return options_; }
  std::string backend_name() const;
  // Bytes allocated on the main backend (device memory for CUDA), for per-device memory reports.
  size_t device_bytes() const { return backend_->allocated_bytes(); }
  // Bytes allocated on the CPU backend of offloaded layers (-ngl); 0 without offload.
  size_t offload_bytes() const { return cpu_backend_ ? cpu_backend_->allocated_bytes() : 0; }
  // This rank's KV pool: bytes over all its layers, blocks and positions per block (the same on every rank).
  uint64_t kv_bytes() const { return kv_bytes_; }
  int64_t kv_blocks() const { return model_->kv_blocks(); }
  int64_t kv_block_size() const { return model_->kv_block_size(); }
  // The CUDA device this rank runs on; -1 for the CPU and reference backends.
  int cuda_device() const { return cuda_device_; }
  // The threads of this rank's CPU work (the cpu backend, or the layers -ngl leaves on the CPU): -t, else the
  // host's default share.
  int cpu_threads() const { return cpu_threads_; }
  // The rank that owns the sequences and samples: results of generate/all_logits/step events are here.
  bool is_sampler() const { return comm_.rank() == 0; }

  // ---- Many sequences (continuous batching) ----
  // Rank 0 only: queues a sequence (validated: ids in the vocabulary, it fits the context and the pool;
  // Error otherwise) and returns its id.
  int64_t add_sequence(std::vector<int32_t> prompt, const SequenceParams& params);
  // Rank 0 only: ends a sequence; its blocks are free at once.
  void abort_sequence(int64_t id);
  // One forward step over what rank 0's scheduler planned; every rank must call it. Returns false on every
  // rank when rank 0 had nothing to run. On rank 0, `events` receives what happened to each sequence (a
  // sampled token, a finish) and `logits` the rows of score_only sequences (id, position, n_vocab values).
  struct ScoredRow {
    int64_t id = 0;
    int32_t pos = 0;
    std::vector<float> logits;  // (n_vocab)
  };
  // A serving loop: rank 0's engine thread calls step() whenever there may be work, and at least every
  // second while idle (an idle step is a tiny message: the other ranks' --comm-timeout watchdog never
  // fires on an idle server); the other ranks loop `while (!engine.stopped()) engine.step();`.
  bool step(std::vector<SeqEvent>* events = nullptr, std::vector<ScoredRow>* scored = nullptr);
  // Rank 0: the other ranks' next step() returns false and stopped() becomes true on every rank.
  void shutdown();
  bool stopped() const { return stopped_; }
  const Scheduler* scheduler() const { return sched_.get(); }  // rank 0 only (null elsewhere)

  // Generates up to n_predict tokens after `prompt` (one sequence through step()), stopping at `eos` unless
  // it is < 0. The last token is not fed back, so the context must hold prompt.size() + n_predict - 1
  // positions. Every rank calls it; the tokens and `on_token` calls are on rank 0 (is_sampler()).
  GenerateResult generate(const std::vector<int32_t>& prompt, int64_t n_predict, const SamplerParams& sp,
                          int32_t eos, const std::function<void(int32_t)>& on_token = nullptr);

  // Logits at every position of `ids` (n_ids, n_vocab), processed from position 0; returned on rank 0
  // (empty elsewhere). For tests and perplexity.
  std::vector<float> all_logits(const std::vector<int32_t>& ids);

  // This rank's busy interval [start, end] (steady_clock seconds) for each step of the last generate or
  // all_logits, up to its first logits, waits for the previous stage's hidden state and for the next stage
  // to take ours excluded: the evidence that pipeline stages overlap.
  const std::vector<std::pair<double, double>>& prefill_trace() const { return prefill_trace_; }

  // Per-rank report lines (layers, shards and bytes of each rank), the same text on every rank. A
  // collective: every rank must call it, or the callers wait for the missing ones.
  std::string layout_report();

 private:
  struct WirePlan;  // a step as every rank receives it
  // Rank 0 runs a lone greedy sequence's decode on the device token (LlamaModel::step_greedy) for as many
  // tokens as it may generate, every rank enqueueing a step before it reads the last one's token.
  bool greedy_run_possible(const StepPlan& plan) const;
  void run_plan(const WirePlan& w, std::vector<RowCandidates>* rows);
  std::vector<int32_t> greedy_run(const WirePlan& w);
  // Rank 0 sends each step's plan to every other rank without waiting for it to arrive; they receive it.
  void publish_plan(std::vector<int32_t> wire);
  void retire_oldest_plan();  // waits until the oldest plan in flight was delivered
  std::vector<int32_t> receive_plan();

  int cpu_threads_ = 1;
  Communicator& comm_;
  EngineOptions options_;
  std::unique_ptr<Backend> backend_;      // where layers run (cpu, reference or cuda)
  std::unique_ptr<Backend> cpu_backend_;  // offloaded layers when backend_ is a GPU
  int cuda_device_ = -1;
  std::vector<std::unique_ptr<DeviceBuffer>> kv_storage_;  // (2 * layers of this stage) the KV pools
  uint64_t kv_bytes_ = 0;
  std::unique_ptr<LlamaModel> model_;
  struct GraphState;
  std::unique_ptr<GraphState> graph_;
  std::unique_ptr<CommGroup> world_;
  struct PlanInFlight {
    uint64_t n = 0;              // words in wire (sent first)
    std::vector<int32_t> wire;   // (n) the encoded plan
    std::vector<int> handles;    // isend handles, two per other rank
  };
  std::deque<PlanInFlight> plans_in_flight_;  // rank 0: plans sent, not yet known delivered
  std::vector<HeldTensor> held_;
  std::unique_ptr<Scheduler> sched_;             // rank 0
  std::map<int64_t, Sampler> samplers_;          // rank 0: one per live sequence
  int64_t n_tokens_ = 0;                         // the tokenizer's size when smaller than n_vocab, else 0
  std::vector<std::pair<double, double>> prefill_trace_;
  bool tracing_ = false;                         // generate/all_logits: record steps until the first logits
  bool stopped_ = false;                         // a shutdown plan was sent or received
  bool last_step_greedy_run_ = false;            // the last step() was a greedy run on the device
  bool last_step_rows_ = false;                  // the last step() had logits rows (it sampled or scored)
  int64_t last_step_tokens_ = 0;                 // tokens the last step() sampled
};

}  // namespace shardlm
