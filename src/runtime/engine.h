// One rank's view of a running model: it loads this rank's shards, owns the model and the KV cache, and
// runs prompt processing (micro-batched through the pipeline) and token-by-token generation. Every rank
// calls the same methods with the same arguments; only the sampler rank's results are meaningful for
// printing, and the generated token reaches every rank by broadcast.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "comm/communicator.h"
#include "loader/model_source.h"
#include "loader/weights.h"
#include "model/llama.h"
#include "runtime/sampler.h"

namespace shardlm {

struct EngineOptions {
  int tp = 1;
  int pp = 1;
  std::vector<double> layer_split;  // pipeline stage proportions; empty = even
  int64_t n_ctx = 0;                // 0: the model's training context (capped at 4096)
  int64_t n_batch = 512;            // most tokens in one forward step (llama.cpp's -ub default)
  int64_t micro_batch = 0;          // prompt chunk per pipeline step; 0 = n_batch / pp (at least 1)
  GgmlType kv_type = GgmlType::F32;
  int n_threads = 0;                // CPU threads per rank; 0 = runtime/host_threads.h's default
  std::string backend = "cpu";      // "cpu", "reference" or "cuda"
  int n_gpu_layers = -1;            // cuda: layers on the GPU, the last ones (-1 = all); the rest on the CPU
  bool cuda_graphs = true;          // cuda: replay decode steps as CUDA graphs
  bool full_logits = false;         // decode steps move the whole logits row to the host (else candidates)
  // cuda, greedy decoding without penalties: the token stays on the device and the host enqueues the next
  // step before reading this one's (LlamaModel::step_greedy). SHARDLM_DEVICE_GREEDY=0|1 overrides it.
  bool device_greedy = true;
  int device = -1;                  // cuda: device index; -1 = local rank modulo the devices
};

struct StepTimes {
  double prefill_s = 0, decode_s = 0, comm_s = 0;
  int64_t prefill_tokens = 0, decode_tokens = 0;
};

struct GenerateResult {
  std::vector<int32_t> generated;
  StepTimes times;
  bool tokens_on_device = false;  // decode steps took the device-greedy path (EngineOptions::device_greedy)
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
  std::string backend_name() const;
  // Bytes allocated on the main backend (device memory for CUDA), for per-device memory reports.
  size_t device_bytes() const { return backend_->allocated_bytes(); }
  // Bytes allocated on the CPU backend of offloaded layers (-ngl); 0 without offload.
  size_t offload_bytes() const { return cpu_backend_ ? cpu_backend_->allocated_bytes() : 0; }
  // The CUDA device this rank runs on; -1 for the CPU and reference backends.
  int cuda_device() const { return cuda_device_; }
  bool is_sampler() const { return comm_.rank() == model_->mapping().sampler_rank(); }

  // Generates up to n_predict tokens after `prompt`, stopping at `eos` unless it is < 0. The last token
  // is not fed back, so the context must hold prompt.size() + n_predict - 1 positions. `on_token` runs on
  // every rank as each token is known.
  GenerateResult generate(const std::vector<int32_t>& prompt, int64_t n_predict, const SamplerParams& sp,
                          int32_t eos, const std::function<void(int32_t)>& on_token = nullptr);

  // Logits at every position of `ids` (n_ids, n_vocab), processed from position 0; returned on the
  // sampler rank (empty elsewhere). For tests and perplexity.
  std::vector<float> all_logits(const std::vector<int32_t>& ids);

  // This rank's busy interval [start, end] (steady_clock seconds) for each micro-batch of the last
  // prompt processing (generate or all_logits), waits for the previous stage's hidden state and for the
  // next stage to take ours excluded: the evidence that pipeline stages overlap.
  const std::vector<std::pair<double, double>>& prefill_trace() const { return prefill_trace_; }

  // Per-rank report lines (layers, shards and bytes of each rank), the same text on every rank. A
  // collective: every rank must call it, or the callers wait for the missing ones.
  std::string layout_report();

 private:
  // Runs `ids` through the pipeline from position pos0 in micro-batches; returns the last token's logits
  // on the last stage.
  void prefill(const std::vector<int32_t>& ids, int64_t pos0, std::vector<float>* last_logits, bool all,
               std::vector<float>* all_out);
  int32_t share_token(int32_t token);

  Communicator& comm_;
  EngineOptions options_;
  std::unique_ptr<Backend> backend_;      // where layers run (cpu, reference or cuda)
  std::unique_ptr<Backend> cpu_backend_;  // offloaded layers when backend_ is a GPU
  int cuda_device_ = -1;
  std::unique_ptr<LlamaModel> model_;
  struct GraphState;
  std::unique_ptr<GraphState> graph_;
  std::unique_ptr<CommGroup> world_;
  std::vector<HeldTensor> held_;
  std::vector<std::pair<double, double>> prefill_trace_;
};

}  // namespace shardlm
