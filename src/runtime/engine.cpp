#include "runtime/engine.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>

#include "backends/cpu/cpu_backend.h"
#ifdef SHARDLM_HAVE_CUDA
#include "backends/cuda/cuda_backend.h"
#endif
#include "core/error.h"
#include "core/units.h"
#include "plan/expert_offload.h"
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
  if (const Vocab* v = src.vocab(); v && !v->tokens.empty() && static_cast<int64_t>(v->tokens.size()) < c.n_vocab)
    n_tokens_ = static_cast<int64_t>(v->tokens.size());
  if (options_.tp * options_.pp != comm.world_size())
    fail("--tp ", options_.tp, " x --pp ", options_.pp, " = ", options_.tp * options_.pp, " ranks, but ",
         comm.world_size(), " were launched");
  if (options_.n_ctx == 0) options_.n_ctx = default_context(c);
  if (options_.n_ctx < 1 || options_.n_ctx > c.n_ctx_train)
    fail("context size -c ", options_.n_ctx, " is outside [1, ", c.n_ctx_train, "] (the model's training context)");
  if (options_.n_batch < 1 || options_.n_batch > 65536) fail("batch size ", options_.n_batch, " is outside [1, 65536]");
  if (options_.max_num_seqs < 1 || options_.max_num_seqs > 4096)
    fail("--max-num-seqs ", options_.max_num_seqs, " is outside [1, 4096]");
  if (options_.kv_blocks < 0) fail("KV pool of ", options_.kv_blocks, " blocks must be >= 0 (0: sized for --max-num-seqs)");
  options_.n_batch = std::max(std::min(options_.n_batch, options_.n_ctx), options_.max_num_seqs);
  if (options_.micro_batch <= 0) options_.micro_batch = std::max<int64_t>(1, options_.n_batch / options_.pp);
  options_.micro_batch = std::min(options_.micro_batch, options_.n_batch);
  const Mapping mapping(comm.world_size(), comm.rank(), options_.tp, options_.pp, static_cast<int>(c.n_layer),
                        options_.layer_split, static_cast<int>(c.n_expert), options_.expert_parallel);
  // Collective over this host's ranks, so every rank asks, whatever its -t.
  const int host_threads = host_default_cpu_threads(comm);
  const int threads = options_.n_threads > 0 ? options_.n_threads : host_threads;
  cpu_threads_ = threads;
  const LayerRange stage = mapping.layers();
  Placement placement;
  if (options_.backend == "cpu") {
    backend_ = make_cpu_backend(threads);
  } else if (options_.backend == "reference") {
    backend_ = make_reference_backend();
  } else if (options_.backend == "cuda") {
    // The CUDA attention kernels read f32 and f16 caches; quantized caches there are issue 20's next step.
    if (options_.kv_type != GgmlType::F32 && options_.kv_type != GgmlType::F16)
      fail_kind(ErrorKind::kUnsupported, "KV cache type ", type_name(options_.kv_type),
                " is not supported by the cuda backend yet (f32, f16); it runs on the cpu backend");
#ifdef SHARDLM_HAVE_CUDA
    const int n_dev = cuda_device_count();
    if (n_dev == 0) fail_kind(ErrorKind::kUnsupported, "--backend cuda: no CUDA GPU is visible to this process");
    int dev = options_.device;
    if (dev < 0) dev = comm.local_rank() % n_dev;
    backend_ = make_cuda_backend(dev, options_.kv_type, options_.cuda);
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
  // Experts in RAM (--cpu-moe, --n-cpu-moe, -ot): decided from the tensor names alone, as the planner does.
  std::vector<bool> experts_in_ram(static_cast<size_t>(c.n_layer), false);
  if (options_.n_cpu_moe != 0 || !options_.tensor_overrides.empty()) {
    if (options_.backend != "cuda")
      fail("--cpu-moe, --n-cpu-moe and -ot keep experts in RAM beside a GPU: they need --backend cuda (on the ",
           options_.backend, " backend every weight is in RAM already)");
    std::vector<std::string> names;
    for (const SourceTensor& t : src.tensors()) names.push_back(t.name);
    experts_in_ram = expert_layers_in_ram(c, names, options_.n_cpu_moe, options_.tensor_overrides);
  }
  bool any_in_ram = false;
  for (int l = stage.begin; l < stage.end; ++l) any_in_ram = any_in_ram || experts_in_ram[static_cast<size_t>(l)];
  if (options_.backend == "cuda" && (first_gpu_layer > stage.begin || any_in_ram)) cpu_backend_ = make_cpu_backend(threads);
  for (int l = stage.begin; l < stage.end; ++l)
    placement.layers.push_back(l >= first_gpu_layer || !cpu_backend_ ? backend_.get() : cpu_backend_.get());
  if (any_in_ram)
    for (int l = stage.begin; l < stage.end; ++l)
      placement.experts.push_back(experts_in_ram[static_cast<size_t>(l)] ? cpu_backend_.get()
                                                                         : placement.layers[static_cast<size_t>(l - stage.begin)]);
  placement.embd = placement.layers.front();
  placement.out = placement.layers.back();
  ModelWeights w = load_weights(src, mapping, placement, &held_, load_progress);
  std::vector<int> all(static_cast<size_t>(comm.world_size()));
  std::iota(all.begin(), all.end(), 0);
  world_ = comm_.make_group(all);

  // The paged KV cache: one pool per layer, blocks of a size every rank's kernels address (the largest any
  // backend asks for, agreed over the world, since rank 0's block tables serve every rank).
  float bs_mine = 1;
  for (Backend* b : placement.layers) bs_mine = std::max(bs_mine, static_cast<float>(b->kv_block_size(options_.n_ctx)));
  std::vector<float> bs_all(static_cast<size_t>(comm.world_size()));
  world_->all_gather(&bs_mine, bs_all.data(), std::vector<size_t>(bs_all.size(), 1));
  const int64_t block_size =
      std::min<int64_t>(options_.n_ctx, static_cast<int64_t>(*std::max_element(bs_all.begin(), bs_all.end())));
  const int64_t per_seq = kv_blocks_for(options_.n_ctx, block_size);
  const int64_t n_blocks =
      options_.kv_blocks > 0 ? options_.kv_blocks : checked_mul<int64_t>(options_.max_num_seqs, per_seq, "KV pool blocks");
  ModelOptions mo;
  mo.n_batch = options_.n_batch;
  mo.kv = allocate_kv_pools(c, head_shard(c, options_.tp, mapping.tp_rank()).kv_heads.size(), placement.layers, n_blocks,
                            block_size, options_.kv_type, &kv_storage_, &kv_bytes_);
  model_ = std::make_unique<LlamaModel>(c, mapping, comm_, std::move(w), mo);
  if (comm.rank() == 0) {
    SchedulerOptions so;
    so.max_num_seqs = options_.max_num_seqs;
    // With pipeline stages a step is a micro-batch: prompt chunks of micro_batch tokens flow through the
    // stages one behind the other. Decode of every running sequence always fits one step.
    so.max_num_batched_tokens = std::max(options_.pp > 1 ? options_.micro_batch : options_.n_batch, options_.max_num_seqs);
    so.n_ctx = options_.n_ctx;
    so.block_size = block_size;
    so.n_blocks = n_blocks;
    so.prefix_caching = options_.prefix_caching;
    sched_ = std::make_unique<Scheduler>(so);
  }
#ifdef SHARDLM_HAVE_CUDA
  // A mixture of experts reads its routing back to the host inside the step: no graph can hold that.
  if (options_.backend == "cuda" && options_.cuda_graphs && !cpu_backend_ && !c.moe() &&
      (options_.tp == 1 || comm_.accepts_device_memory())) {
    graph_ = std::make_unique<GraphState>(*backend_);
    model_->set_decode_runner(
        [g = graph_.get()](const BatchInfo& b, const std::function<void()>& body) { g->runner.run(b, body); });
    model_->set_greedy_runner(
        [g = graph_.get()](const BatchInfo& b, const std::function<void()>& body) { g->greedy_runner.run(b, body); });
  }
#endif
}

Engine::~Engine() {
  // The graph references the model's buffers and, under NCCL, its communicators: it goes first (a
  // communicator destroyed under a live graph that captured it made the process hang at exit). The
  // model's buffers belong to the backends, so the model goes before them.
  if (backend_) backend_->synchronize();
  // Plans still in flight reference our buffers; a peer that is gone makes the wait abort the job.
  try {
    while (!plans_in_flight_.empty()) retire_oldest_plan();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "shardlm: rank 0: step plans not delivered at exit: %s\n", e.what());
  }
  graph_.reset();
  model_.reset();
}

std::string Engine::backend_name() const {
  std::string n = backend_->name();
  if (cpu_backend_) n += " + " + cpu_backend_->name() + " (offloaded layers)";
  if (graph_) n += ", CUDA graphs";
  return n;
}

// ---- The wire form of a step: what rank 0 broadcasts ----

struct Engine::WirePlan {
  enum Kind : int32_t { kWork = 0, kIdle = 1, kShutdown = 2 };
  int32_t kind = kIdle;            // idle: rank 0 had nothing to run (every step() returns false)
  std::vector<int32_t> ids;        // (batch.n_tok) input tokens
  BatchInfo batch;
  std::vector<RowRequest> reqs;    // (batch.out_rows.size()) what rank 0's samplers need of each row
  int32_t greedy_steps = 0;        // > 0: a greedy run on the device of at most this many tokens
  std::vector<int32_t> stop_ids;   // the run ends after one of these

  std::vector<int32_t> encode() const {
    std::vector<int32_t> w = {kind, static_cast<int32_t>(batch.n_tok), static_cast<int32_t>(batch.n_seq()),
                              static_cast<int32_t>(batch.max_blocks), static_cast<int32_t>(batch.out_rows.size()),
                              greedy_steps, static_cast<int32_t>(stop_ids.size())};
    w.insert(w.end(), ids.begin(), ids.end());
    for (const BatchSeq& q : batch.seqs) w.insert(w.end(), {q.tok0, q.n_tok, q.pos0});
    w.insert(w.end(), batch.block_table.begin(), batch.block_table.end());
    w.insert(w.end(), batch.out_rows.begin(), batch.out_rows.end());
    for (const RowRequest& r : reqs) {
      w.insert(w.end(), {r.k, static_cast<int32_t>(r.extra.size()), r.lse ? 1 : 0});
      w.insert(w.end(), r.extra.begin(), r.extra.end());
    }
    w.insert(w.end(), stop_ids.begin(), stop_ids.end());
    return w;
  }
  static WirePlan decode(const std::vector<int32_t>& w) {
    WirePlan p;
    size_t at = 0;
    auto next = [&]() {
      if (at >= w.size()) fail_kind(ErrorKind::kComm, "step plan from rank 0 is truncated at ", at);
      return w[at++];
    };
    p.kind = next();
    if (p.kind < kWork || p.kind > kShutdown) fail_kind(ErrorKind::kComm, "step plan from rank 0 has kind ", p.kind);
    p.batch.n_tok = next();
    const int32_t n_seq = next();
    p.batch.max_blocks = next();
    const int32_t n_out = next();
    p.greedy_steps = next();
    const int32_t n_stop = next();
    for (int32_t i = 0; i < p.batch.n_tok; ++i) p.ids.push_back(next());
    for (int32_t i = 0; i < n_seq; ++i) {
      BatchSeq q;
      q.tok0 = next();
      q.n_tok = next();
      q.pos0 = next();
      p.batch.seqs.push_back(q);
    }
    for (int64_t i = 0; i < int64_t{n_seq} * p.batch.max_blocks; ++i) p.batch.block_table.push_back(next());
    for (int32_t i = 0; i < n_out; ++i) p.batch.out_rows.push_back(next());
    for (int32_t i = 0; i < n_out; ++i) {
      RowRequest r;
      r.k = next();
      const int32_t n_extra = next();
      r.lse = next() != 0;
      for (int32_t j = 0; j < n_extra; ++j) r.extra.push_back(next());
      p.reqs.push_back(std::move(r));
    }
    for (int32_t i = 0; i < n_stop; ++i) p.stop_ids.push_back(next());
    if (at != w.size()) fail_kind(ErrorKind::kComm, "step plan from rank 0 has ", w.size() - at, " words too many");
    return p;
  }
};

namespace {

constexpr int kTagRowsSize = 200;  // last stage -> rank 0: the size of a step's rows
constexpr int kTagRows = 201;      // last stage -> rank 0: the rows
constexpr int kTagPlanSize = 202;  // rank 0 -> every rank: the size of a step's plan (words)
constexpr int kTagPlan = 203;      // rank 0 -> every rank: the plan

// Rows as floats (ids as their bits): per row n_top, (logit, id) pairs, n_extra, values, n_logits, values, lse.
std::vector<float> encode_rows(const std::vector<RowCandidates>& rows) {
  std::vector<float> w;
  auto put_int = [&](int32_t v) {
    float f;
    std::memcpy(&f, &v, sizeof f);
    w.push_back(f);
  };
  for (const RowCandidates& r : rows) {
    put_int(static_cast<int32_t>(r.top.size()));
    for (const TokenCandidate& c : r.top) {
      w.push_back(c.logit);
      put_int(c.id);
    }
    put_int(static_cast<int32_t>(r.extra.size()));
    w.insert(w.end(), r.extra.begin(), r.extra.end());
    put_int(static_cast<int32_t>(r.logits.size()));
    w.insert(w.end(), r.logits.begin(), r.logits.end());
    w.push_back(r.lse);
  }
  return w;
}

std::vector<RowCandidates> decode_rows(const std::vector<float>& w, size_t n_rows) {
  std::vector<RowCandidates> rows(n_rows);
  size_t at = 0;
  auto get = [&]() {
    if (at >= w.size()) fail_kind(ErrorKind::kComm, "logits rows from the last stage are truncated");
    return w[at++];
  };
  auto get_int = [&]() {
    const float f = get();
    int32_t v;
    std::memcpy(&v, &f, sizeof v);
    if (v < 0) fail_kind(ErrorKind::kComm, "logits rows from the last stage are malformed");
    return v;
  };
  for (RowCandidates& r : rows) {
    for (int32_t i = get_int(); i > 0; --i) {
      TokenCandidate c;
      c.logit = get();
      c.id = get_int();
      r.top.push_back(c);
    }
    for (int32_t i = get_int(); i > 0; --i) r.extra.push_back(get());
    for (int32_t i = get_int(); i > 0; --i) r.logits.push_back(get());
    r.lse = get();
  }
  return rows;
}

}  // namespace

int64_t Engine::add_sequence(std::vector<int32_t> prompt, const SequenceParams& params) {
  if (!sched_) fail_kind(ErrorKind::kInternal, "add_sequence on rank ", comm_.rank(), ": only rank 0 owns sequences");
  for (int32_t id : prompt)
    if (id < 0 || id >= config().n_vocab)
      fail("prompt token id ", id, " is outside the vocabulary [0, ", config().n_vocab, ")");
  const int64_t id = sched_->add(std::move(prompt), params);
  SamplerParams sp = params.sampling;
  // Ids the tokenizer lacks (padded embedding rows) have no text: never sample them.
  if (n_tokens_ > 0 && (sp.n_valid <= 0 || sp.n_valid > n_tokens_)) sp.n_valid = n_tokens_;
  samplers_.emplace(id, Sampler(sp));
  return id;
}

void Engine::abort_sequence(int64_t id) {
  if (!sched_) fail_kind(ErrorKind::kInternal, "abort_sequence on rank ", comm_.rank(), ": only rank 0 owns sequences");
  sched_->abort(id);
  samplers_.erase(id);
}

bool Engine::greedy_run_possible(const StepPlan& plan) const {
  if (!options_.device_greedy || options_.full_logits || !model_->greedy_on_device()) return false;
  if (plan.seqs.size() != 1 || plan.batch.n_tok != 1 || !plan.seqs[0].samples) return false;
  if (sched_->n_running() != 1 || sched_->n_waiting() != 0) return false;
  // Decode only: the step that samples the first token stays a plain step (even for a one-token prompt), so
  // the prompt's processing ends where generate's timing says it does.
  const int64_t id = plan.seqs[0].id;
  if (static_cast<int64_t>(sched_->tokens(id).size()) <= sched_->prompt_length(id)) return false;
  return samplers_.at(id).plain_greedy() && sched_->params(id).logprobs < 0;
}

void Engine::shutdown() {
  if (!sched_) fail_kind(ErrorKind::kInternal, "shutdown on rank ", comm_.rank(), ": rank 0 stops the engine");
  if (stopped_) return;
  WirePlan w;
  w.kind = WirePlan::kShutdown;
  publish_plan(w.encode());
  // Delivered before this rank may go on to tear MPI down.
  while (!plans_in_flight_.empty()) retire_oldest_plan();
  stopped_ = true;
}

void Engine::publish_plan(std::vector<int32_t> wire) {
  // Sent, not broadcast: a collective's root can wait until the others enter it (OpenMPI did, when the
  // previous micro-batch's hidden state still held its shared-memory fragments), and a first pipeline
  // stage waiting for the next stage to finish a micro-batch computes nothing meanwhile: the stages ran
  // one at a time. Rank 0 goes on at once; a few plans may be in flight.
  constexpr size_t kMaxInFlight = 4;
  while (plans_in_flight_.size() >= kMaxInFlight) retire_oldest_plan();
  PlanInFlight& p = plans_in_flight_.emplace_back();  // a deque: its elements stay where they are
  p.n = wire.size();
  p.wire = std::move(wire);
  for (int r = 1; r < comm_.world_size(); ++r) {
    p.handles.push_back(comm_.isend(&p.n, sizeof p.n, r, kTagPlanSize));
    p.handles.push_back(comm_.isend(p.wire.data(), p.wire.size() * sizeof(int32_t), r, kTagPlan));
  }
}

void Engine::retire_oldest_plan() {
  for (int h : plans_in_flight_.front().handles) comm_.wait_send(h);
  plans_in_flight_.pop_front();
}

std::vector<int32_t> Engine::receive_plan() {
  uint64_t n = 0;
  comm_.recv(&n, sizeof n, 0, kTagPlanSize);
  if (n > (uint64_t{1} << 30)) fail_kind(ErrorKind::kComm, "step plan from rank 0 claims ", n, " words");
  std::vector<int32_t> wire(n);
  comm_.recv(wire.data(), n * sizeof(int32_t), 0, kTagPlan);
  return wire;
}

void Engine::run_plan(const WirePlan& w, std::vector<RowCandidates>* rows) {
  const double t0 = now_s(), c0 = comm_.comm_seconds();
  const bool last = model_->forward(w.batch, w.ids.data());
  if (last) model_->rows(w.reqs, rows);
  const double t1 = now_s(), waited = comm_.comm_seconds() - c0;
  if (tracing_) {
    // Time spent waiting on peers is not work: a first stage waits at the end (its send), later stages
    // mostly at the start (the receive); tensor-parallel all-reduces in between count as waiting too.
    if (mapping().is_first_stage())
      prefill_trace_.emplace_back(t0, t1 - waited);
    else
      prefill_trace_.emplace_back(t0 + waited, t1);
  }
  if (w.reqs.empty() || mapping().is_last_stage() == (comm_.rank() == 0)) return;
  // The rows travel from the last stage's first rank to rank 0, which samples.
  const int from = mapping().sampler_rank();
  if (comm_.rank() == from) {
    const std::vector<float> wire = encode_rows(*rows);
    const uint64_t n = wire.size();
    comm_.send(&n, sizeof n, 0, kTagRowsSize);
    comm_.send(wire.data(), n * sizeof(float), 0, kTagRows);
  } else if (comm_.rank() == 0) {
    uint64_t n = 0;
    comm_.recv(&n, sizeof n, from, kTagRowsSize);
    std::vector<float> wire(n);
    comm_.recv(wire.data(), n * sizeof(float), from, kTagRows);
    *rows = decode_rows(wire, w.reqs.size());
  }
}

std::vector<int32_t> Engine::greedy_run(const WirePlan& w) {
  // Every rank enqueues the step after this one before it waits for this one's token (known on every rank
  // without a message), so the device goes from step to step without the host in between. A step
  // enqueued ahead that turns out not to be needed (a stop token) only writes a KV row the sequence's
  // reserved blocks hold and nothing reads.
  const int64_t n = w.greedy_steps;
  BatchInfo b = w.batch;
  const int64_t p0 = b.seqs[0].pos0;
  auto at = [&](int64_t pos) {
    b.seqs[0].pos0 = static_cast<int32_t>(pos);
    return b;
  };
  model_->set_device_token(w.ids[0]);
  std::vector<int32_t> out;
  bool ahead = false;  // the step at pos is already enqueued
  for (int64_t pos = p0;; ++pos) {
    if (!ahead) model_->step_greedy(at(pos));
    ahead = static_cast<int64_t>(out.size()) + 1 < n;
    if (ahead) model_->step_greedy(at(pos + 1));
    const int32_t tok = model_->device_token_at(pos);
    out.push_back(tok);
    if (static_cast<int64_t>(out.size()) >= n ||
        std::find(w.stop_ids.begin(), w.stop_ids.end(), tok) != w.stop_ids.end())
      break;
  }
  if (ahead) backend_->synchronize();  // the unneeded step: done before anything else uses the device
  return out;
}

bool Engine::step(std::vector<SeqEvent>* events, std::vector<ScoredRow>* scored) {
  const int64_t nv = config().n_vocab;
  StepPlan plan;
  WirePlan w;
  std::vector<int32_t> wire;
  if (sched_ && stopped_) fail_kind(ErrorKind::kInternal, "step after shutdown");
  if (sched_) {
    plan = sched_->schedule();
    w.kind = plan.empty() ? WirePlan::kIdle : WirePlan::kWork;
    if (w.kind == WirePlan::kWork) {
      w.ids = plan.ids;
      w.batch = plan.batch;
      for (int64_t si : plan.row_seq) {
        const PlannedSeq& ps = plan.seqs[static_cast<size_t>(si)];
        RowRequest rq;
        if (!ps.scores && !options_.full_logits) {
          const CandidateRequest cr = samplers_.at(ps.id).request(sched_->tokens(ps.id), nv);
          rq.k = cr.k;
          rq.extra = cr.extra;
          // Log-probabilities: the row's log-sum-exp, and at least the N most likely tokens (a superset of
          // what the sampler asked for gives it the same token: see Sampler::request).
          const int32_t lp = sched_->params(ps.id).logprobs;
          if (lp >= 0) {
            rq.lse = true;
            if (rq.k > 0) rq.k = static_cast<int>(std::min<int64_t>(std::max(rq.k, lp), nv));
          }
        }
        w.reqs.push_back(std::move(rq));
      }
      if (greedy_run_possible(plan)) {
        // As many tokens as it may still generate, and blocks for every position the run can reach.
        const int64_t id = plan.seqs[0].id;
        const SequenceParams& sp = sched_->params(id);
        const int64_t len = static_cast<int64_t>(sched_->tokens(id).size());  // its last token is this step's input
        const int64_t generated = len - sched_->prompt_length(id);
        const int64_t n = std::min(sp.max_tokens - generated, n_ctx() - len + 1);
        if (n > 1 && sched_->reserve(id, len + n - 1, &w.batch)) {
          w.greedy_steps = static_cast<int32_t>(n);
          w.stop_ids = sp.stop_ids;
        }
      }
    }
    wire = w.encode();
  }
  if (sched_)
    publish_plan(std::move(wire));
  else
    w = WirePlan::decode(receive_plan());
  last_step_rows_ = w.kind == WirePlan::kWork && !w.batch.out_rows.empty();
  last_step_greedy_run_ = w.kind == WirePlan::kWork && w.greedy_steps > 0;
  if (w.kind == WirePlan::kShutdown) stopped_ = true;
  if (w.kind != WirePlan::kWork) return false;

  if (w.greedy_steps > 0) {
    const std::vector<int32_t> toks = greedy_run(w);
    last_step_tokens_ = static_cast<int64_t>(toks.size());
    if (sched_) {
      const int64_t id = plan.seqs[0].id;
      std::vector<SeqEvent> ev = sched_->commit_run(id, toks);
      for (const SeqEvent& e : ev)
        if (e.finish != FinishReason::kNone) samplers_.erase(e.id);
      if (events) events->insert(events->end(), ev.begin(), ev.end());
    }
    return true;
  }

  std::vector<RowCandidates> rows;
  run_plan(w, &rows);
  last_step_tokens_ = 0;
  for (const PlannedSeq& ps : plan.seqs) last_step_tokens_ += ps.samples ? 1 : 0;
  if (!sched_) {
    // Other ranks count the step's logits rows: the tokens sampled when no sequence is score_only (generate).
    last_step_tokens_ = static_cast<int64_t>(w.reqs.size());
    return true;
  }
  std::vector<int32_t> sampled;
  std::vector<size_t> sampled_row;  // the row each sampled token came from
  for (size_t r = 0; r < rows.size(); ++r) {
    const PlannedSeq& ps = plan.seqs[static_cast<size_t>(plan.row_seq[r])];
    if (ps.scores) {
      if (scored) {
        const BatchSeq& bs = plan.batch.seqs[static_cast<size_t>(plan.row_seq[r])];
        scored->push_back(ScoredRow{ps.id, bs.pos0 + (plan.batch.out_rows[r] - bs.tok0), std::move(rows[r].logits)});
      }
      continue;
    }
    Sampler& smp = samplers_.at(ps.id);
    if (!rows[r].logits.empty()) {
      sampled.push_back(smp.sample(rows[r].logits.data(), nv, sched_->tokens(ps.id)));
    } else {
      const CandidateRequest cr{w.reqs[r].k, w.reqs[r].extra};
      sampled.push_back(smp.sample_candidates(rows[r].top, cr, rows[r].extra, sched_->tokens(ps.id)));
    }
    sampled_row.push_back(r);
  }
  // Log-probabilities of the raw distribution, for the sequences that asked, before commit forgets them.
  std::map<int64_t, std::pair<float, std::vector<TokenCandidate>>> lps;
  for (size_t i = 0; i < sampled.size(); ++i) {
    const size_t r = sampled_row[i];
    const PlannedSeq& ps = plan.seqs[static_cast<size_t>(plan.row_seq[r])];
    const int32_t n_top = sched_->params(ps.id).logprobs;
    if (n_top < 0) continue;
    const RowCandidates& c = rows[r];
    std::vector<TokenCandidate> top = c.top;
    if (!c.logits.empty()) top = top_candidates_host(c.logits.data(), nv, std::max(n_top, 1));
    float logit = NAN;
    if (!c.logits.empty()) logit = c.logits[static_cast<size_t>(sampled[i])];
    for (const TokenCandidate& t : c.top)
      if (t.id == sampled[i]) logit = t.logit;
    for (size_t e = 0; e < w.reqs[r].extra.size(); ++e)
      if (w.reqs[r].extra[e] == sampled[i]) logit = c.extra[e];
    top.resize(std::min(top.size(), static_cast<size_t>(n_top)));
    for (TokenCandidate& t : top) t.logit -= c.lse;
    lps[ps.id] = {logit - c.lse, std::move(top)};
  }
  std::vector<SeqEvent> ev = sched_->commit(plan, sampled);
  for (SeqEvent& e : ev)
    if (auto it = lps.find(e.id); it != lps.end() && e.token >= 0) {
      e.logprob = it->second.first;
      e.top_logprobs = std::move(it->second.second);
    }
  for (const SeqEvent& e : ev)
    if (e.finish != FinishReason::kNone) samplers_.erase(e.id);
  if (events) events->insert(events->end(), ev.begin(), ev.end());
  return true;
}

GenerateResult Engine::generate(const std::vector<int32_t>& prompt, int64_t n_predict, const SamplerParams& sp,
                                int32_t eos, const std::function<void(int32_t)>& on_token) {
  if (prompt.empty()) fail("the prompt is empty: give at least one token");
  if (n_predict < 1) fail("-n ", n_predict, " must be >= 1");
  const int64_t need = static_cast<int64_t>(prompt.size()) + n_predict - 1;
  if (need > options_.n_ctx)
    fail("the prompt (", prompt.size(), " tokens) plus ", n_predict, " generated tokens need ", need,
         " positions, more than the context size ", options_.n_ctx,
         options_.n_ctx < config().n_ctx_train ? cat(" (lower -n, or raise -c up to the model's ", config().n_ctx_train, ")")
                                               : cat(" (the model's largest: lower -n or shorten the prompt)"));
  for (int32_t id : prompt)
    if (id < 0 || id >= config().n_vocab)
      fail("prompt token id ", id, " is outside the vocabulary [0, ", config().n_vocab, ")");
  sp.validate();
  if (sched_) {
    SequenceParams p;
    p.sampling = sp;
    p.max_tokens = n_predict;
    if (eos >= 0) p.stop_ids.push_back(eos);
    add_sequence(prompt, p);
  }
  GenerateResult res;
  prefill_trace_.clear();
  tracing_ = true;
  const double comm0 = comm_.comm_seconds();
  double t0 = now_s();
  bool prefilled = false;
  std::vector<SeqEvent> ev;
  while (step(&ev)) {
    if (!prefilled && last_step_rows_) {
      // The step that sampled the first token ends the prompt's processing.
      prefilled = true;
      tracing_ = false;
      res.times.prefill_s = now_s() - t0;
      res.times.prefill_tokens = static_cast<int64_t>(prompt.size());
      t0 = now_s();
    } else if (prefilled) {
      res.times.decode_tokens += last_step_tokens_;
      res.tokens_on_device = res.tokens_on_device || last_step_greedy_run_;
    }
    for (const SeqEvent& e : ev)
      if (e.token >= 0) {
        if (res.generated.empty()) {
          // Prefix caching: the prompt positions found in the cache were not computed.
          res.cached_prompt_tokens = e.cached_prompt_tokens;
          res.times.prefill_tokens -= e.cached_prompt_tokens;
        }
        res.generated.push_back(e.token);
        if (on_token) on_token(e.token);
      }
    ev.clear();
  }
  tracing_ = false;
  res.times.decode_s = now_s() - t0;
  res.times.comm_s = comm_.comm_seconds() - comm0;
  return res;
}

std::vector<float> Engine::all_logits(const std::vector<int32_t>& ids) {
  if (static_cast<int64_t>(ids.size()) > options_.n_ctx)
    fail(ids.size(), " tokens do not fit the context size ", options_.n_ctx);
  if (sched_) {
    SequenceParams p;
    p.score_only = true;
    add_sequence(ids, p);
  }
  prefill_trace_.clear();
  tracing_ = true;
  std::vector<ScoredRow> rows;
  while (step(nullptr, &rows)) {
  }
  tracing_ = false;
  std::vector<float> out;
  if (!sched_) return out;
  const size_t nv = static_cast<size_t>(config().n_vocab);
  out.resize(ids.size() * nv);
  for (const ScoredRow& r : rows) std::copy(r.logits.begin(), r.logits.end(), out.begin() + static_cast<ptrdiff_t>(size_t(r.pos) * nv));
  return out;
}

std::string Engine::layout_report() {
  const Mapping& m = model_->mapping();
  const uint64_t in_ram = model_->weights().expert_host_bytes;
  std::string mine = cat("  ", m.describe(), ": weights ", human_bytes(model_->weights().weight_bytes),
                         in_ram > 0 ? cat(" (experts in RAM ", human_bytes(in_ram), ")") : std::string(), ", KV cache ",
                         human_bytes(kv_bytes_), ", workspace ", human_bytes(model_->workspace_bytes()),
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
