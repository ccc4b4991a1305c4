// bench: prompt processing (pp) and generation (tg) tokens/s, median of several runs, beside the
// memory-bandwidth roofline measured in the same run.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <optional>
#include <set>
#include <thread>
#include <tuple>
#include <utility>

#include <nlohmann/json.hpp>

#include "backends/cpu/cpu_backend.h"
#ifdef SHARDLM_HAVE_CUDA
#include "backends/cuda/cuda_backend.h"
#endif
#include "cli_common.h"
#include "commands.h"
#include "core/error.h"
#include "plan/planner.h"
#include "plan_glue.h"
#include "run_flags.h"

// Device memory in use needs the CUDA runtime's header, which builds with the NCCL communicator see (its
// include directory comes with CUDA::cudart); elsewhere bench reports that figure as unknown.
#if defined(SHARDLM_HAVE_CUDA) && defined(__has_include)
#if __has_include(<cuda_runtime_api.h>)
#include <cuda_runtime_api.h>
#define SHARDLM_BENCH_DEVICE_MEMORY 1
#endif
#endif

namespace shardlm {
namespace {


double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

// One rank's memory and communication figures, broadcast by each rank in turn to rank 0. Doubles: byte
// counts stay exact below 2^53. -1 = unknown or not applicable.
struct RankFigures {
  double rank = 0, tp_rank = 0, pp_rank = 0, layer_begin = 0, layer_end = 0;
  double weight_bytes = 0;    // weights this rank loaded (LlamaModel's count)
  double mapped_bytes = 0;    // of which read in place from the file's mapping
  double step_bytes = 0;      // what a decode step reads of them (ModelWeights::step_bytes): the roofline's
  double backend_bytes = 0;   // Backend::allocated_bytes() of the main backend (device memory on CUDA)
  double offload_bytes = 0;   // the CPU backend of offloaded layers (-ngl)
  double cuda_device = -1;
  double device_used = -1;    // cudaMemGetInfo total - free: every context on the GPU, ours included
  double device_total = -1;
  double comm_share = 0;      // median share of the tg runs' time inside communication calls
};

// Memory in use on CUDA device `dev` and its size (bytes), or {-1, -1} where unknown.
std::pair<double, double> device_memory(int dev) {
#ifdef SHARDLM_BENCH_DEVICE_MEMORY
  size_t free_b = 0, total_b = 0;
  if (dev >= 0 && cudaSetDevice(dev) == cudaSuccess && cudaMemGetInfo(&free_b, &total_b) == cudaSuccess)
    return {double(total_b - free_b), double(total_b)};
#else
  (void)dev;
#endif
  return {-1, -1};
}

// The planner's table entry for a CUDA device name: the longest run of leading words it knows ("NVIDIA
// H100 80GB HBM3" -> "NVIDIA H100" -> h100-sxm); nullptr when none.
const GpuSpec* gpu_spec_for(const std::string& cuda_name) {
  std::vector<std::string> words;
  for (size_t b = 0; b < cuda_name.size();) {
    const size_t e = std::min(cuda_name.find(' ', b), cuda_name.size());
    if (e > b) words.push_back(cuda_name.substr(b, e - b));
    b = e + 1;
  }
  for (size_t n = words.size(); n > 0; --n) {
    std::string s;
    for (size_t i = 0; i < n; ++i) s += (i ? " " : "") + words[i];
    if (const GpuSpec* g = find_gpu(s)) return g;
  }
  return nullptr;
}

// What the planner predicts for the layout that ran: the same model, context, batch, KV type, tp x pp,
// layers per stage and -ngl. GPU ranks are planned as `shardlm plan --gpus <name>x<N>` would (datasheet
// bandwidth and the planner's efficiency); CPU ranks with the host bandwidth bench measured.
struct Prediction {
  std::optional<Plan> plan;
  std::string basis;  // what the prediction assumed, or why there is none
  std::vector<CpuKernelRate> kernels;  // the CPU kernels timed for it (CPU ranks, -ngl offload)
};

Prediction predict(const ModelSource& src, const Engine& engine, const EngineOptions& eo, const RunFlags& rf,
                   double host_bw, double device_total) {
  Prediction out;
  const int n_layer = static_cast<int>(engine.config().n_layer);
  const bool offload = eo.backend == "cuda" && eo.n_gpu_layers >= 0 && eo.n_gpu_layers < n_layer;
  std::vector<double> split;
  std::string split_arg;
  if (eo.pp > 1 && !offload)
    for (const LayerRange& r : engine.mapping().stage_layers()) {
      split.push_back(r.size());
      split_arg += cat(split_arg.empty() ? "" : ",", r.size());
    }
  const int64_t ctx = engine.n_ctx(), batch = std::min<int64_t>(eo.n_batch, ctx);
  try {
    const ModelDesc desc = model_desc_from_source(src);
    // The CPU's kernels of the model's weight types, timed here on the threads the run's CPU work used
    // (every CPU rank's): on a CPU where decoding the blocks costs more than reading them they, not the copy
    // bandwidth, bound the decode.
    std::vector<CpuKernelRate>& kernels = out.kernels;
    if (eo.backend == "cpu" || offload)
      kernels = measure_cpu_kernels(desc, engine.cpu_threads() * (eo.backend == "cpu" ? eo.tp * eo.pp : 1));
    std::string timed;
    for (const CpuKernelRate& k : kernels)
      timed += cat(timed.empty() ? cat("; kernels timed here on ", k.threads, " threads: ") : std::string(", "),
                   describe(k));
    if (eo.backend == "cuda") {
      const std::string bn = engine.backend_name();  // "cuda:0 (NVIDIA H100 80GB HBM3), CUDA graphs"
      const size_t a = bn.find('('), b = a == std::string::npos ? a : bn.find(')', a);
      const std::string name = b == std::string::npos ? std::string() : bn.substr(a + 1, b - a - 1);
      const GpuSpec* spec = gpu_spec_for(name);
      DeviceRequest dreq;
      const int world = eo.tp * eo.pp;
      if (spec) dreq.gpus = cat(spec->key, "x", world);
      else if (device_total > 0) dreq.gpus = cat(uint64_t(device_total) >> 20, "Mx", world);
      else fail("the GPU '", name, "' is not in the planner's table and its memory is unknown");
      if (!rf.cpu_mem.empty()) dreq.cpu_mem = rf.cpu_mem;
      // Offloaded layers run on this host's CPU: plan them with the bandwidth measured here, as CPU ranks.
      if (offload && host_bw > 0) dreq.cpu_bandwidth_gbs = host_bw / 1e9;
      if (offload) dreq.cpu_kernels = kernels;
      PlanRequest req;
      req.ctx = ctx;
      req.batch = batch;
      req.kv_type = eo.kv_type;
      req.tp = eo.tp;
      req.pp = eo.pp;
      req.layer_split = split;
      if (offload) req.n_gpu_layers = eo.n_gpu_layers;
      out.plan = make_plan(desc, make_inventory(dreq), req);
      out.basis = cat("shardlm plan -m ", src.path(), " --gpus ", *dreq.gpus, " --tp ", eo.tp, " --pp ", eo.pp,
                      split_arg.empty() ? "" : " --layer-split " + split_arg,
                      offload ? cat(" -ngl ", eo.n_gpu_layers, " --cpu-bandwidth ", std::lround(host_bw / 1e8) / 10.0)
                              : std::string(),
                      " --ctx ", ctx, " --batch ", batch,
                      " --kv-type ", type_name(eo.kv_type), spec ? "" : " (GPU not in the planner's table: sized only)",
                      offload ? timed : std::string());
    } else if (eo.backend == "cpu") {
      RunPlanRequest rq;
      rq.tp = eo.tp;
      rq.pp = eo.pp;
      rq.layer_split = split;
      rq.ctx = ctx;
      rq.batch = batch;
      rq.kv_type = eo.kv_type;
      if (!rf.cpu_mem.empty()) rq.cpu_mem = rf.cpu_mem;
      rq.cpu_bandwidth_gbs = host_bw / 1e9;
      rq.cpu_kernels = kernels;
      out.plan = plan_run(desc, rq).plan;
      out.basis = cat("CPU ranks of this host, host copy bandwidth ", std::lround(host_bw / 1e8) / 10.0,
                      " GB/s as measured here, ctx ", ctx, ", batch ", batch, ", KV ", type_name(eo.kv_type), timed);
    } else {
      out.basis = cat("the planner does not model the ", eo.backend, " backend");
    }
  } catch (const Error& e) {
    out.plan.reset();
    out.basis = cat("planner failed: ", e.what());
  }
  return out;
}

double ratio(double measured, double predicted) { return measured >= 0 && predicted > 0 ? measured / predicted : 0; }

}  // namespace

int cmd_bench(int argc, const char* const* argv) {
  CLI::App app("Measure prompt processing (-p tokens) and generation (-n tokens) speed, median of -r runs, "
               "with the memory-bandwidth roofline of this machine.",
               "bench");
  RunFlags rf;
  rf.add_to(app);
  int64_t n_prompt = 512, n_gen = 128, depth = 0;
  int reps = 3;
  bool json = false;
  app.option_defaults()->always_capture_default();  // --help shows every option's default
  CLI::Option* p_opt = app.add_option("-p,--n-prompt", n_prompt,
                                      "prompt tokens for the pp test (0 skips it; the default shrinks to the context)");
  CLI::Option* n_opt = app.add_option("-n,--n-gen", n_gen,
                                      "generated tokens for the tg test (0 skips it; the default shrinks to the context)");
  app.add_option("-r,--repetitions", reps, "runs of each test (the median is reported)");
  app.add_option("-d,--n-depth", depth,
                 "llama-bench's -d: run pp and tg after this many positions are already in the KV cache (pp at depth "
                 "= the prefill time of depth + p tokens minus that of depth tokens; tg = decode after depth tokens), "
                 "with the decode roofline counting the KV bytes read")
      ->capture_default_str();
  app.add_flag("--json", json, "machine-readable output");
  std::string npl_list;
  app.add_option("--n-parallel", npl_list,
                 "also -npl: batched decode (llama-batched-bench's spelling): comma-separated numbers of sequences decoding "
                 "together, each with a prompt of -p tokens generating -n; reports the aggregate decode tokens/s "
                 "(S_TG) and its share of that step's roofline (weights + KV read per step)");
  bool no_warmup = false;
  app.add_flag("--no-warmup", no_warmup,
               "time the first run too (default: one untimed run of each test first, as llama-bench does: it pays "
               "for lazy setup such as cuBLAS plans, NCCL buffers and the decode graph's capture)");
  if (int rc = parse_cli(app, argc, argv); rc >= 0) return rc;
  if (n_prompt < 0 || n_gen < 0 || (n_prompt == 0 && n_gen == 0)) fail("-p ", n_prompt, " and -n ", n_gen,
                                                                        " must be >= 0 and not both 0");
  if (reps < 1 || reps > 1000) fail("-r ", reps, " is outside [1, 1000]");
  if (depth < 0 || depth > (int64_t{1} << 24)) fail("-d ", depth, " is outside [0, 16777216]");
  const std::string path = rf.model_path();
  auto src = open_model(path);  // once: the planner reads it, then the engine loads from it
  const int64_t train = src->config().n_ctx_train > 0 ? src->config().n_ctx_train : 4096;
  // Defaults fit the model: llama-bench's -p 512 -n 128 are more positions than a small model has (the
  // bundled one is trained on 128), so a default that does not fit shrinks to what does; given values stay.
  std::string fitted;
  if (const int64_t room = (rf.n_ctx > 0 ? rf.n_ctx : train) - depth; room >= 2) {
    if (p_opt->count() == 0 && n_prompt > room) {
      fitted += cat(" -p ", n_prompt, " -> ", room);
      n_prompt = room;
    }
    if (n_opt->count() == 0 && n_gen + 1 > room) {
      fitted += cat(" -n ", n_gen, " -> ", room - 1);
      n_gen = room - 1;
    }
  }
  std::vector<int64_t> npl;
  if (!npl_list.empty()) {
    for (double v : parse_proportions(npl_list, "-npl")) {
      if (v < 1 || v > 4096 || v != std::floor(v)) fail("-npl: ", v, " is not a whole number of sequences in [1, 4096]");
      npl.push_back(static_cast<int64_t>(v));
    }
    if (n_gen < 2) fail("-npl needs -n >= 2 (the decode phase), got ", n_gen);
  }
  EngineOptions eo = rf.resolve(*src, depth + std::max<int64_t>(n_prompt, 1) + n_gen);
  for (int64_t n : npl) eo.max_num_seqs = std::max(eo.max_num_seqs, n);
  if (int rc = maybe_self_launch(eo.tp, eo.pp, argc, argv); rc >= 0) return rc;
  auto comm = make_communicator(rf.comm_timeout);
  const bool rank0 = comm->rank() == 0;
  if (eo.n_ctx == 0) eo.n_ctx = std::min<int64_t>(src->config().n_ctx_train, depth + std::max<int64_t>(n_prompt, 1) + n_gen);
  if (const int64_t need = depth + std::max(n_prompt, n_gen + 1); need > eo.n_ctx) {
    // Name the flag that asks too much, and raise -c only where the model allows it.
    const int64_t room = eo.n_ctx - depth;
    std::vector<std::string> ways;
    if (need <= train) ways.push_back(cat("raise -c to ", need));
    if (room >= 1 && n_prompt > room) ways.push_back(cat("lower -p to ", room));
    if (room >= 2 && n_gen + 1 > room) ways.push_back(cat("lower -n to ", room - 1));
    if (depth > 0) ways.push_back("lower -d");
    std::string advice;
    for (size_t i = 0; i < ways.size(); ++i) advice += (i ? " or " : "") + ways[i];
    fail("-d ", depth, " plus the test's ", std::max(n_prompt, n_gen + 1), " tokens (", n_prompt >= n_gen + 1 ? "-p" : "-n",
         ") need ", need, " positions; the context is ", eo.n_ctx, ", the model's at most ", train, " (", advice, ")");
  }
  if (rank0 && !fitted.empty() && !rf.quiet)
    std::fprintf(stderr, "note: default sizes fitted to the context of %lld:%s\n", static_cast<long long>(eo.n_ctx),
                 fitted.c_str());
  Progress progress("loading", rank0 && !rf.quiet && !json);
  Engine engine(*src, *comm, eo, [&](uint64_t d, uint64_t t) { progress(d, t); });
  progress.finish();
  const std::string report = engine.layout_report();
  if (rank0 && !rf.quiet && !json) std::fprintf(stderr, "%s", report.c_str());

  SamplerParams greedy;
  greedy.temperature = 0;
  const int32_t nv = static_cast<int32_t>(src->config().n_vocab);
  std::vector<double> pp, tg, comm_share;
  bool tokens_on_device = false;  // the tg runs took the device-greedy path
  // With -d: `context` holds the depth's tokens; the pp prompt follows them, and tg decodes after them.
  std::vector<int32_t> context(static_cast<size_t>(depth));
  for (int64_t i = 0; i < depth; ++i) context[size_t(i)] = int32_t((i * 104729 + 7) % nv);
  std::vector<int32_t> prompt = context;
  for (int64_t i = 0; i < n_prompt; ++i) prompt.push_back(int32_t((i * 7919 + 13) % nv));
  const std::vector<int32_t> tg_prompt = depth > 0 ? context : std::vector<int32_t>{1 % nv};
  auto prefill_seconds = [&](const std::vector<int32_t>& ids) {
    return ids.empty() ? 0.0 : engine.generate(ids, 1, greedy, -1).times.prefill_s;
  };
  if (!no_warmup) {  // untimed: the same prompt, and a few decode steps (the graph is captured on the 2nd)
    if (n_prompt > 0) engine.generate(prompt, 1, greedy, -1);
    if (n_gen > 0) engine.generate(tg_prompt, std::min<int64_t>(n_gen + 1, 4), greedy, -1);
  }
  for (int r = 0; r < reps; ++r) {
    if (n_prompt > 0) {
      const double t = prefill_seconds(prompt) - prefill_seconds(context);
      pp.push_back(double(n_prompt) / std::max(t, 1e-9));
    }
    if (n_gen > 0) {
      GenerateResult g = engine.generate(tg_prompt, n_gen + 1, greedy, -1);
      tg.push_back(double(g.times.decode_tokens) / g.times.decode_s);
      comm_share.push_back(g.times.comm_s / std::max(g.times.decode_s + g.times.prefill_s, 1e-12));
      tokens_on_device = g.tokens_on_device;
    }
  }
  // Batched decode: N sequences, each a prompt of -p tokens then -n generated. The prefill phase ends when
  // every sequence has its first token; the decode phase (timed, S_TG) is everything after.
  struct Batched {
    int64_t seqs = 0;
    double tg = 0, pp = 0;  // aggregate tokens/s of the decode and prefill phases
    double avg_ctx = 0;     // mean context of a sequence over the decode phase (for the KV bytes read)
  };
  std::vector<Batched> batched;
  for (int64_t n_seq : npl) {
    Batched bt;
    bt.seqs = n_seq;
    std::set<int64_t> started;  // sequences that have their first token
    int64_t decode_tokens = 0;
    const double t0 = now_s();
    double t1 = t0;
    if (rank0) {
      SequenceParams sp;
      sp.sampling = greedy;
      sp.max_tokens = n_gen;
      for (int64_t i = 0; i < n_seq; ++i) {
        std::vector<int32_t> p(static_cast<size_t>(std::max<int64_t>(n_prompt, 1)));
        for (size_t k = 0; k < p.size(); ++k) p[k] = int32_t((int64_t(k) * 7919 + 13 + i * 104729) % nv);
        engine.add_sequence(std::move(p), sp);
      }
    }
    std::vector<SeqEvent> ev;
    while (engine.step(&ev)) {
      for (const SeqEvent& e : ev) {
        if (e.token < 0) continue;
        if (static_cast<int64_t>(started.size()) == n_seq)
          ++decode_tokens;
        else if (started.insert(e.id).second && static_cast<int64_t>(started.size()) == n_seq)
          t1 = now_s();  // the last sequence's first token: every sequence decodes from here
      }
      ev.clear();
    }
    const double t2 = now_s();
    bt.pp = double(n_seq * std::max<int64_t>(n_prompt, 1)) / std::max(t1 - t0, 1e-9);
    bt.tg = double(decode_tokens) / std::max(t2 - t1, 1e-9);
    bt.avg_ctx = double(std::max<int64_t>(n_prompt, 1)) + double(n_gen) / 2;
    batched.push_back(bt);
  }
  // Every rank reads its own weights once per token; on one host they share the memory bus. Memory is
  // read here, after the runs (KV cache, workspaces and graphs all exist) and before rank 0's bandwidth
  // test allocates its buffers.
  uint64_t all_bytes = 0, step_bytes = 0;  // summed over the ranks' figures
  std::vector<RankFigures> ranks(size_t(comm->world_size()));
  {
    RankFigures mine;
    mine.rank = comm->rank();
    mine.tp_rank = engine.mapping().tp_rank();
    mine.pp_rank = engine.mapping().pp_rank();
    mine.layer_begin = engine.mapping().layers().begin;
    mine.layer_end = engine.mapping().layers().end;
    mine.weight_bytes = double(engine.model().weights().weight_bytes);
    mine.mapped_bytes = double(engine.model().weights().mapped_bytes);
    mine.step_bytes = double(engine.model().weights().step_bytes);
    mine.backend_bytes = double(engine.device_bytes());
    mine.offload_bytes = double(engine.offload_bytes());
    mine.cuda_device = engine.cuda_device();
    std::tie(mine.device_used, mine.device_total) = device_memory(engine.cuda_device());
    mine.comm_share = median(comm_share);
    auto world = comm->make_group([&] {
      std::vector<int> v(size_t(comm->world_size()));
      for (int i = 0; i < comm->world_size(); ++i) v[size_t(i)] = i;
      return v;
    }());
    for (int r = 0; r < comm->world_size(); ++r) {
      RankFigures f = mine;
      world->broadcast(&f, sizeof f, r);
      ranks[size_t(r)] = f;
      all_bytes += uint64_t(f.weight_bytes);
      step_bytes += uint64_t(f.step_bytes);
    }
  }
  if (!rank0) return 0;
  double bw = 0;
  std::string bw_what = "host copy";
#ifdef SHARDLM_HAVE_CUDA
  if (eo.backend == "cuda" && eo.n_gpu_layers < 0) {
    bw = cuda_copy_bandwidth(eo.device < 0 ? 0 : eo.device);
    bw_what = "GPU device-to-device copy";
  }
#endif
  if (bw == 0) bw = measure_host_bandwidth(cpu_core_count(), size_t{256} << 20);
  // Tensor-parallel GPUs read their shards at the same time, each from its own memory; pipeline stages
  // take turns at batch 1, and CPU ranks on one host share one memory bus.
  const int parallel_readers = bw_what == "host copy" ? 1 : eo.tp;
  const double roof = parallel_readers * bw / double(step_bytes);
  // KV bytes one sequence reads per step per position of context: K and V rows of every layer, all ranks.
  const ModelConfig& mc = src->config();
  const double kv_pos = 2.0 * double(mc.n_layer) * double(mc.n_head_kv) * double(mc.head_dim) *
                        double(type_size(eo.kv_type)) / double(block_size(eo.kv_type));
  // tg at depth: each token reads the weights and the cache of depth + (on average) n_gen / 2 positions.
  const double roof_kv = parallel_readers * bw / (double(step_bytes) + (double(depth) + double(n_gen) / 2) * kv_pos);
  nlohmann::json j;
  j["model"] = path;
  j["backend"] = engine.backend_name();
  // The layout is under "layout" only: a top-level "pp" would collide with the prefill test's results.
  j["weight_bytes"] = all_bytes;
  j["step_weight_bytes"] = step_bytes;  // what the roofline counts: the embedding table only as a tied output
  j["bandwidth_bytes_per_s"] = bw;
  j["bandwidth_source"] = bw_what;
  j["roofline_tokens_per_s"] = roof;
  j["n_depth"] = depth;
  if (n_prompt > 0) j["pp"] = {{"n_prompt", n_prompt}, {"tokens_per_s", median(pp)}, {"runs", pp}};
  if (n_gen > 0)
    j["tg"] = {{"n_gen", n_gen}, {"tokens_per_s", median(tg)}, {"runs", tg}, {"roofline_share", median(tg) / roof},
               {"comm_share", median(comm_share)}, {"tokens_on_device", tokens_on_device},
               // Time per token beyond reading the weights at the measured bandwidth: launches, syncs,
               // host work, collectives.
               {"fixed_cost_us_per_token", 1e6 * (1.0 / median(tg) - 1.0 / roof)},
               {"roofline_with_kv_tokens_per_s", roof_kv}, {"roofline_with_kv_share", median(tg) / roof_kv}};
  if (!batched.empty()) {
    nlohmann::json jb = nlohmann::json::array();
    for (const Batched& bt : batched) {
      const double batch_bytes = double(step_bytes) + double(bt.seqs) * bt.avg_ctx * kv_pos;
      const double roof_b = double(bt.seqs) * parallel_readers * bw / batch_bytes;
      jb.push_back({{"sequences", bt.seqs}, {"tg_tokens_per_s", bt.tg}, {"pp_tokens_per_s", bt.pp},
                    {"roofline_tokens_per_s", roof_b}, {"roofline_share", bt.tg / roof_b}});
    }
    j["batched"] = jb;
  }
  j["layout"] = {{"tp", eo.tp}, {"pp", eo.pp}};
  j["device_all_reduce"] = comm->all_reduce_kind();

  // The planner's prediction for this layout beside what was measured.
  const Prediction pred = predict(*src, engine, eo, rf, bw_what == "host copy" ? bw : 0, ranks[0].device_total);
  const DevicePlan* no_plan = nullptr;
  const auto planned = [&](int rank) {
    if (pred.plan)
      for (const DevicePlan& d : pred.plan->chosen.devices)
        if (d.rank == rank) return &d;
    return no_plan;
  };
  // CPU ranks read most weights in place from the file's mapping (not counted by the backend; packed and
  // converted ones are); GPU ranks copy them.
  const auto resident = [&](const RankFigures& f) {
    return f.cuda_device >= 0 ? f.backend_bytes : f.mapped_bytes + f.backend_bytes;
  };
  const auto null_if_unknown = [](double x) { return x < 0 ? nlohmann::json() : nlohmann::json(uint64_t(x)); };
  nlohmann::json jr = nlohmann::json::array();
  for (const RankFigures& f : ranks) {
    nlohmann::json r = {{"rank", int(f.rank)},
                        {"tp_rank", int(f.tp_rank)},
                        {"pp_rank", int(f.pp_rank)},
                        {"layers", {int(f.layer_begin), int(f.layer_end)}},
                        {"weight_bytes", uint64_t(f.weight_bytes)},
                        {"mapped_weight_bytes", uint64_t(f.mapped_bytes)},
                        {"backend_allocated_bytes", uint64_t(f.backend_bytes)},
                        {"offload_allocated_bytes", uint64_t(f.offload_bytes)},
                        // what the planner's figure is compared with: allocations (+ mapped weights on CPU)
                        {"resident_bytes", uint64_t(resident(f))},
                        {"cuda_device", int(f.cuda_device)},
                        {"device_used_bytes", null_if_unknown(f.device_used)},
                        {"device_total_bytes", null_if_unknown(f.device_total)},
                        {"comm_share", f.comm_share}};
    if (const DevicePlan* d = planned(int(f.rank))) {
      r["planned_bytes"] = d->total_bytes;
      r["planned_weight_bytes"] = d->weight_bytes;
      r["planned_kv_bytes"] = d->kv_bytes;
      r["planned_workspace_bytes"] = d->workspace_bytes;
      r["planned_reserve_bytes"] = d->reserve_bytes;
      r["allocated_over_planned"] = ratio(resident(f), double(d->total_bytes));
      if (f.device_used >= 0)
        r["device_used_over_planned_with_reserve"] = ratio(f.device_used, double(d->total_bytes + d->reserve_bytes));
    }
    jr.push_back(r);
  }
  j["ranks"] = jr;
  nlohmann::json jp = {{"basis", pred.basis}};
  for (const CpuKernelRate& k : pred.kernels)
    jp["cpu_kernels"].push_back({{"type", type_name(k.type)}, {"threads", k.threads},
                                 {"decode_bytes_per_s", k.decode_bytes_per_s}, {"prefill_flops", k.prefill_flops}});
  if (pred.plan) {
    const Candidate& c = pred.plan->chosen;
    jp["fits"] = pred.plan->fits;
    jp["decode_tokens_per_s"] = c.decode_tps;
    jp["prefill_tokens_per_s"] = c.prefill_tps;
    if (n_gen > 0) jp["tg_measured_over_predicted"] = ratio(median(tg), c.decode_tps);
    if (n_prompt > 0) jp["pp_measured_over_predicted"] = ratio(median(pp), c.prefill_tps);
    for (const DevicePlan& d : c.devices)
      if (d.rank < 0) jp["offload_cpu_planned_bytes"] = d.total_bytes;
  }
  j["planner"] = jp;
  if (json) {
    std::printf("%s\n", j.dump(2).c_str());
    return 0;
  }
  std::printf("model %s, backend %s, tp %d x pp %d, weights %s\n", path.c_str(), engine.backend_name().c_str(), eo.tp,
              eo.pp, human_bytes(all_bytes).c_str());
  std::printf("%s bandwidth %.2f GB/s%s -> decode roofline %.1f tokens/s (weights read once per token)\n",
              bw_what.c_str(), bw / 1e9, parallel_readers > 1 ? cat(" x ", parallel_readers, " GPUs").c_str() : "", roof);
  const std::string at = depth > 0 ? cat(" @ d", depth) : std::string();
  std::printf("| test  | tokens/s | roofline share | roofline share with KV | comm share |\n"
              "|-------|----------|----------------|------------------------|------------|\n");
  if (n_prompt > 0) std::printf("| pp%lld%s | %8.1f | | | |\n", (long long)n_prompt, at.c_str(), median(pp));
  if (n_gen > 0) {
    std::printf("| tg%lld%s | %8.1f | %.1f%% | %.1f%% (%s KV per position, %s) | %.1f%% |\n", (long long)n_gen, at.c_str(),
                median(tg), 100 * median(tg) / roof, 100 * median(tg) / roof_kv, human_bytes(uint64_t(kv_pos)).c_str(),
                type_name(eo.kv_type), 100 * median(comm_share));
    std::printf("fixed cost per generated token beyond the weight reads: %.1f us%s\n", 1e6 * (1.0 / median(tg) - 1.0 / roof),
                tokens_on_device ? " (greedy tokens kept on the device)" : "");
  }
  if (j.contains("batched")) {
    std::printf("batched decode (-p %lld -n %lld per sequence; S_TG = tokens generated after every sequence's first "
                "/ that time; roofline = weights + each sequence's KV read once per step)\n",
                (long long)std::max<int64_t>(n_prompt, 1), (long long)n_gen);
    std::printf("| sequences | S_TG tokens/s | roofline tokens/s | share | S_PP tokens/s |\n|---|---|---|---|---|\n");
    for (const auto& b : j["batched"])
      std::printf("| %lld | %.1f | %.1f | %.1f%% | %.1f |\n", (long long)b["sequences"].get<int64_t>(),
                  b["tg_tokens_per_s"].get<double>(), b["roofline_tokens_per_s"].get<double>(),
                  100 * b["roofline_share"].get<double>(), b["pp_tokens_per_s"].get<double>());
  }
  // Per-rank memory: the backend's allocations against the planner's weights + KV + workspace, and the
  // device's memory in use (every context on the GPU) against that plus the planner's reserve.
  const auto gib = [](double b) { return b < 0 ? std::string("?") : human_bytes(uint64_t(b)); };
  const auto x = [](double r) { return r > 0 ? cat(std::lround(r * 1000) / 1000.0) : std::string("-"); };
  std::printf("per-rank memory (allocated = the backend's allocations%s; planned = the planner's weights + KV + "
              "workspace; device in use = cudaMemGetInfo total - free, every context on the GPU)\n",
              eo.backend == "cuda" ? "" : " + the weights the loader mapped");
  std::printf("| rank | tp | pp | layers | allocated | planned | ratio | offload | device in use | planned + reserve "
              "| ratio | comm share |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (const RankFigures& f : ranks) {
    const DevicePlan* d = planned(int(f.rank));
    std::printf("| %d | %d | %d | %d..%d | %s | %s | %s | %s | %s | %s | %s | %.1f%% |\n", int(f.rank), int(f.tp_rank),
                int(f.pp_rank), int(f.layer_begin), int(f.layer_end) - 1, gib(resident(f)).c_str(),
                d ? gib(double(d->total_bytes)).c_str() : "-", d ? x(ratio(resident(f), double(d->total_bytes))).c_str() : "-",
                gib(f.offload_bytes).c_str(),
                f.device_total < 0 ? "?" : cat(gib(f.device_used), " of ", gib(f.device_total)).c_str(),
                d ? gib(double(d->total_bytes + d->reserve_bytes)).c_str() : "-",
                d && f.device_used >= 0 ? x(ratio(f.device_used, double(d->total_bytes + d->reserve_bytes))).c_str() : "-",
                100 * f.comm_share);
  }
  if (pred.plan) {
    const Candidate& c = pred.plan->chosen;
    std::printf("planner (%s)%s:", pred.basis.c_str(), pred.plan->fits ? "" : ", layout does not fit");
    if (n_gen > 0)
      std::printf(" decode %.1f tokens/s predicted, %.1f measured (x%s)", c.decode_tps, median(tg),
                  x(ratio(median(tg), c.decode_tps)).c_str());
    if (n_prompt > 0)
      std::printf("%s prefill %.0f predicted, %.0f measured (x%s)", n_gen > 0 ? ";" : "", c.prefill_tps, median(pp),
                  x(ratio(median(pp), c.prefill_tps)).c_str());
    std::printf("\n");
  } else {
    std::printf("planner: %s\n", pred.basis.c_str());
  }
  if (const std::string k = comm->all_reduce_kind(); !k.empty()) std::printf("device all-reduce: %s\n", k.c_str());
  return 0;
}

}  // namespace shardlm
