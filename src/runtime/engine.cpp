#include "runtime/engine.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <numeric>

#include "backends/cpu/cpu_backend.h"
#ifdef SHARDLM_HAVE_CUDA
#include "backends/cuda/cuda_backend.h"
#endif
#include "core/env.h"
#include "core/error.h"
#include "core/units.h"
#include "runtime/host_threads.h"

namespace shardlm {
namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

#ifdef SHARDLM_HAVE_CUDA
struct Engine::GraphState {
  explicit GraphState(Backend& b) : runner(b), greedy_runner(b) {}
  CudaGraphRunner runner;
  CudaGraphRunner greedy_runner;  // LlamaModel::step_greedy's body, a graph of its own
};
#else
struct Engine::GraphState {};
#endif

Engine::Engine(const ModelSource& src, Communicator& comm, const EngineOptions& options,
               const std::function<void(uint64_t, uint64_t)>& load_progress)
    : comm_(comm), options_(options) {
  const ModelConfig& c = src.config();
  if (options_.tp * options_.pp != comm.world_size())
    fail("--tp ", options_.tp, " x --pp ", options_.pp, " = ", options_.tp * options_.pp, " ranks, but ",
         comm.world_size(), " were launched");
  if (options_.n_ctx == 0) options_.n_ctx = std::min<int64_t>(c.n_ctx_train, 4096);
  if (options_.n_ctx < 1 || options_.n_ctx > c.n_ctx_train)
    fail("context size -c ", options_.n_ctx, " is outside [1, ", c.n_ctx_train, "] (the model's training context)");
  if (options_.n_batch < 1 || options_.n_batch > 65536) fail("batch size ", options_.n_batch, " is outside [1, 65536]");
  options_.n_batch = std::min(options_.n_batch, options_.n_ctx);
  if (options_.micro_batch <= 0) options_.micro_batch = std::max<int64_t>(1, options_.n_batch / options_.pp);
  options_.micro_batch = std::min(options_.micro_batch, options_.n_batch);
  const Mapping mapping(comm.world_size(), comm.rank(), options_.tp, options_.pp, static_cast<int>(c.n_layer),
                        options_.layer_split);
  // Collective over this host's ranks, so every rank asks, whatever its -t.
  const int host_threads = host_default_cpu_threads(comm);
  const int threads = options_.n_threads > 0 ? options_.n_threads : host_threads;
  const LayerRange stage = mapping.layers();
  Placement placement;
  if (options_.backend == "cpu") {
    backend_ = make_cpu_backend(threads);
  } else if (options_.backend == "reference") {
    backend_ = make_reference_backend();
  } else if (options_.backend == "cuda") {
#ifdef SHARDLM_HAVE_CUDA
    const int n_dev = cuda_device_count();
    if (n_dev == 0) fail_kind(ErrorKind::kUnsupported, "--backend cuda: no CUDA GPU is visible to this process");
    int dev = options_.device;
    if (dev < 0) dev = comm.local_rank() % n_dev;
    backend_ = make_cuda_backend(dev, options_.kv_type);
    cuda_device_ = dev;
    // A device communicator (NCCL) enqueues its collectives on the backend's stream.
    comm.bind_stream(cuda_stream(*backend_));
#else
    fail_kind(ErrorKind::kUnsupported, "--backend cuda: this build has no CUDA backend (configure with -DSHARDLM_CUDA=ON)");
#endif
  } else {
    fail("--backend '", options_.backend, "' is not one of cpu, reference, cuda");
  }
  if (options_.n_gpu_layers >= 0 && options_.backend != "cuda")
    fail("-ngl ", options_.n_gpu_layers, " needs --backend cuda");
  const int ngl = options_.n_gpu_layers < 0 ? static_cast<int>(c.n_layer)
                                            : std::min<int>(options_.n_gpu_layers, static_cast<int>(c.n_layer));
  // llama.cpp's -ngl: the last ngl layers run on the GPU, the first ones (and their embedding) on the CPU.
  const int first_gpu_layer = static_cast<int>(c.n_layer) - ngl;
  if (options_.backend == "cuda" && first_gpu_layer > stage.begin) cpu_backend_ = make_cpu_backend(threads);
  for (int l = stage.begin; l < stage.end; ++l)
    placement.layers.push_back(l >= first_gpu_layer || !cpu_backend_ ? backend_.get() : cpu_backend_.get());
  placement.embd = placement.layers.front();
  placement.out = placement.layers.back();
  ModelWeights w = load_weights(src, mapping, placement, &held_, load_progress);
  ModelOptions mo;
  mo.n_ctx = options_.n_ctx;
  mo.n_batch = options_.n_batch;
  mo.kv_type = options_.kv_type;
  model_ = std::make_unique<LlamaModel>(c, mapping, comm_, std::move(w), mo);
#ifdef SHARDLM_HAVE_CUDA
  if (options_.backend == "cuda" && options_.cuda_graphs && !cpu_backend_ &&
      (options_.tp == 1 || comm_.accepts_device_memory())) {
    graph_ = std::make_unique<GraphState>(*backend_);
    model_->set_decode_runner(
        [g = graph_.get()](const StepInfo& st, const std::function<void()>& body) { g->runner.run(st, body); });
    model_->set_greedy_runner(
        [g = graph_.get()](const StepInfo& st, const std::function<void()>& body) { g->greedy_runner.run(st, body); });
  }
#endif
  if (const auto on = env_switch("SHARDLM_DEVICE_GREEDY", "1: greedy tokens stay on the device, the default"))
    options_.device_greedy = *on;
  std::vector<int> all(static_cast<size_t>(comm.world_size()));
  std::iota(all.begin(), all.end(), 0);
  world_ = comm_.make_group(all);
}

Engine::~Engine() {
  // The graph references the model's buffers and, under NCCL, its communicators: it goes first (a
  // communicator destroyed under a live graph that captured it made the process hang at exit). The
  // model's buffers belong to the backends, so the model goes before them.
  if (backend_) backend_->synchronize();
  graph_.reset();
  model_.reset();
}

std::string Engine::backend_name() const {
  std::string n = backend_->name();
  if (cpu_backend_) n += " + " + cpu_backend_->name() + " (offloaded layers)";
  if (graph_) n += ", CUDA graphs";
  return n;
}

void Engine::prefill(const std::vector<int32_t>& ids, int64_t pos0, std::vector<float>* last_logits, bool all,
                     std::vector<float>* all_out) {
  const int64_t n = static_cast<int64_t>(ids.size());
  const int64_t mb = options_.micro_batch;
  prefill_trace_.clear();
  // Chunks flow through the stages one after another: while stage s works on chunk i, stage s-1 is
  // already on chunk i+1, because every stage is its own process and only waits for its input.
  for (int64_t at = 0; at < n; at += mb) {
    const int64_t len = std::min(mb, n - at);
    std::vector<float> lg;
    const bool last_chunk = at + len == n;
    const double t0 = now_s(), c0 = comm_.comm_seconds();
    const bool has_logits = model_->step(ids.data() + at, len, pos0 + at, all, (all || last_chunk) ? &lg : nullptr);
    // Time spent waiting on peers is not work: a first stage waits at the end (its send), later stages
    // mostly at the start (the receive); tensor-parallel all-reduces in between count as waiting too.
    const double t1 = now_s(), waited = comm_.comm_seconds() - c0;
    if (mapping().is_first_stage())
      prefill_trace_.emplace_back(t0, t1 - waited);
    else
      prefill_trace_.emplace_back(t0 + waited, t1);
    if (has_logits) {
      if (all && all_out) all_out->insert(all_out->end(), lg.begin(), lg.end());
      if (last_chunk && last_logits) {
        if (all)
          last_logits->assign(lg.end() - config().n_vocab, lg.end());
        else
          *last_logits = std::move(lg);
      }
    }
  }
}

int32_t Engine::share_token(int32_t token) {
  world_->broadcast(&token, sizeof token, model_->mapping().sampler_rank());
  return token;
}

GenerateResult Engine::generate(const std::vector<int32_t>& prompt, int64_t n_predict, const SamplerParams& sp,
                                int32_t eos, const std::function<void(int32_t)>& on_token) {
  if (prompt.empty()) fail("the prompt is empty: give at least one token");
  if (n_predict < 1) fail("-n ", n_predict, " must be >= 1");
  const int64_t need = static_cast<int64_t>(prompt.size()) + n_predict - 1;
  if (need > options_.n_ctx)
    fail("the prompt (", prompt.size(), " tokens) plus ", n_predict, " generated tokens need ", need,
         " positions, more than the context size ", options_.n_ctx, " (raise -c or lower -n)");
  for (int32_t id : prompt)
    if (id < 0 || id >= config().n_vocab)
      fail("prompt token id ", id, " is outside the vocabulary [0, ", config().n_vocab, ")");
  Sampler sampler(sp);
  GenerateResult res;
  std::vector<int32_t> history = prompt;
  const double comm0 = comm_.comm_seconds();
  double t0 = now_s();
  std::vector<float> logits, extra_values;
  std::vector<TokenCandidate> top;
  prefill(prompt, 0, &logits, false, nullptr);
  int32_t tok = -1;
  if (is_sampler()) tok = sampler.sample(logits.data(), config().n_vocab, history);
  tok = share_token(tok);
  res.times.prefill_s = now_s() - t0;
  res.times.prefill_tokens = static_cast<int64_t>(prompt.size());
  t0 = now_s();
  int64_t pos = static_cast<int64_t>(prompt.size());
  // Greedy on the device: every rank enqueues the step after this one before it waits for this one's token
  // (known on every rank without a broadcast), so the device goes from step to step without the host in
  // between. A step enqueued ahead that turns out not to be needed (end of text) only wrote a KV row past
  // the end of this generation.
  const bool on_device = options_.device_greedy && !options_.full_logits && sampler.plain_greedy() &&
                         model_->greedy_on_device();
  res.tokens_on_device = on_device;
  bool ahead = false;  // the step at pos is already enqueued
  if (on_device && n_predict > 1) model_->set_device_token(tok);
  for (;;) {
    res.generated.push_back(tok);
    history.push_back(tok);
    if (on_token) on_token(tok);
    if (static_cast<int64_t>(res.generated.size()) >= n_predict || (eos >= 0 && tok == eos)) break;
    if (on_device) {
      if (!ahead) model_->step_greedy(pos);
      ahead = static_cast<int64_t>(res.generated.size()) + 1 < n_predict;
      if (ahead) model_->step_greedy(pos + 1);
      tok = model_->device_token_at(pos);
      ++pos;
      ++res.times.decode_tokens;
      continue;
    }
    // Every rank derives the same request from the same params and history.
    const CandidateRequest req = options_.full_logits ? CandidateRequest{} : sampler.request(history, config().n_vocab);
    int32_t next = -1;
    if (req.k > 0) {
      model_->step_candidates(tok, pos, req.k, req.extra, &top, &extra_values);
      if (is_sampler()) next = sampler.sample_candidates(top, req, extra_values);
    } else {
      logits.clear();
      model_->step(&tok, 1, pos, false, &logits);
      if (is_sampler()) next = sampler.sample(logits.data(), config().n_vocab, history);
    }
    ++pos;
    tok = share_token(next);
    ++res.times.decode_tokens;
  }
  if (ahead) backend_->synchronize();  // the unneeded step: done before anything else uses the device
  res.times.decode_s = now_s() - t0;
  res.times.comm_s = comm_.comm_seconds() - comm0;
  return res;
}

std::vector<float> Engine::all_logits(const std::vector<int32_t>& ids) {
  if (static_cast<int64_t>(ids.size()) > options_.n_ctx)
    fail(ids.size(), " tokens do not fit the context size ", options_.n_ctx);
  std::vector<float> out;
  prefill(ids, 0, nullptr, true, &out);
  if (!is_sampler()) out.clear();
  return out;
}

std::string Engine::layout_report() {
  const Mapping& m = model_->mapping();
  std::string mine = cat("  ", m.describe(), ": weights ", human_bytes(model_->weights().weight_bytes), ", KV cache ",
                         human_bytes(model_->kv_bytes()), ", workspace ", human_bytes(model_->workspace_bytes()),
                         "; q heads [", head_shard(config(), m.tp_size(), m.tp_rank()).q_heads.begin, ", ",
                         head_shard(config(), m.tp_size(), m.tp_rank()).q_heads.end, "), kv heads [",
                         model_->kv_heads_local() ? head_shard(config(), m.tp_size(), m.tp_rank()).kv_heads.begin : 0,
                         ", ", head_shard(config(), m.tp_size(), m.tp_rank()).kv_heads.end, ")",
                         m.is_first_stage() ? ", embedding" : "", m.is_last_stage() ? ", output" : "");
  // Gather every rank's line on rank 0 through fixed-size broadcasts (reports are tiny).
  std::string all;
  for (int r = 0; r < comm_.world_size(); ++r) {
    char buf[512] = {0};
    if (r == comm_.rank()) std::strncpy(buf, mine.c_str(), sizeof buf - 1);
    world_->broadcast(buf, sizeof buf, r);
    all += buf;
    all += "\n";
  }
  return all;
}

}  // namespace shardlm
