// bench: prompt processing (pp) and generation (tg) tokens/s, median of several runs, beside the
// memory-bandwidth roofline measured in the same run.
#include <algorithm>
#include <chrono>
#include <cstring>
#include <thread>

#include <nlohmann/json.hpp>

#include "backends/cpu/cpu_backend.h"
#ifdef SHARDLM_HAVE_CUDA
#include "backends/cuda/cuda_backend.h"
#endif
#include "cli_common.h"
#include "commands.h"
#include "core/error.h"
#include "run_flags.h"

namespace shardlm {
namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Host copy bandwidth with every core copying its own slice, counting bytes read plus written: the
// ceiling a memory-bound decode step can approach on this machine.
double measure_host_bandwidth(int threads) {
  const size_t n = size_t(256) << 20;
  std::vector<uint8_t> a(n, 1), b(n, 2);
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    const double t0 = now_s();
    std::vector<std::thread> pool;
    for (int k = 0; k < threads; ++k)
      pool.emplace_back([&, k] {
        const size_t lo = n * size_t(k) / size_t(threads), hi = n * size_t(k + 1) / size_t(threads);
        std::memcpy(b.data() + lo, a.data() + lo, hi - lo);
      });
    for (auto& t : pool) t.join();
    best = std::max(best, 2.0 * double(n) / (now_s() - t0));
  }
  return best;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

}  // namespace

int cmd_bench(int argc, const char* const* argv) {
  CLI::App app("Measure prompt processing (-p tokens) and generation (-n tokens) speed, median of -r runs, "
               "with the memory-bandwidth roofline of this machine.",
               "bench");
  RunFlags rf;
  rf.add_to(app);
  int64_t n_prompt = 512, n_gen = 128;
  int reps = 3;
  bool json = false;
  app.add_option("-p,--n-prompt", n_prompt, "prompt tokens for the pp test (0 skips it)");
  app.add_option("-n,--n-gen", n_gen, "generated tokens for the tg test (0 skips it)");
  app.add_option("-r,--repetitions", reps, "runs of each test (the median is reported)");
  app.add_flag("--json", json, "machine-readable output");
  if (int rc = parse_cli(app, argc, argv); rc >= 0) return rc;
  if (n_prompt < 0 || n_gen < 0 || (n_prompt == 0 && n_gen == 0)) fail("-p ", n_prompt, " and -n ", n_gen,
                                                                        " must be >= 0 and not both 0");
  if (reps < 1 || reps > 1000) fail("-r ", reps, " is outside [1, 1000]");
  const std::string path = rf.model_path();
  auto src = open_model(path);  // once: the planner reads it, then the engine loads from it
  EngineOptions eo = rf.resolve(*src, std::max<int64_t>(n_prompt, 1) + n_gen);
  if (int rc = maybe_self_launch(eo.tp, eo.pp, argc, argv); rc >= 0) return rc;
  auto comm = make_communicator(rf.comm_timeout);
  const bool rank0 = comm->rank() == 0;
  if (eo.n_ctx == 0) eo.n_ctx = std::min<int64_t>(src->config().n_ctx_train, std::max<int64_t>(n_prompt, 1) + n_gen);
  Progress progress("loading", rank0 && !rf.quiet && !json);
  Engine engine(*src, *comm, eo, [&](uint64_t d, uint64_t t) { progress(d, t); });
  progress.finish();
  const std::string report = engine.layout_report();
  if (rank0 && !rf.quiet && !json) std::fprintf(stderr, "%s", report.c_str());

  SamplerParams greedy;
  greedy.temperature = 0;
  const int32_t nv = static_cast<int32_t>(src->config().n_vocab);
  std::vector<double> pp, tg, comm_share;
  for (int r = 0; r < reps; ++r) {
    if (n_prompt > 0) {
      std::vector<int32_t> prompt(static_cast<size_t>(n_prompt));
      for (int64_t i = 0; i < n_prompt; ++i) prompt[size_t(i)] = int32_t((i * 7919 + 13) % nv);
      GenerateResult g = engine.generate(prompt, 1, greedy, -1);
      pp.push_back(double(n_prompt) / g.times.prefill_s);
    }
    if (n_gen > 0) {
      GenerateResult g = engine.generate({1 % nv}, n_gen + 1, greedy, -1);
      tg.push_back(double(g.times.decode_tokens) / g.times.decode_s);
      comm_share.push_back(g.times.comm_s / std::max(g.times.decode_s + g.times.prefill_s, 1e-12));
    }
  }
  // Every rank reads its own weights once per token; on one host they share the memory bus.
  uint64_t my_bytes = engine.model().weights().weight_bytes, all_bytes = 0;
  {
    auto world = comm->make_group([&] {
      std::vector<int> v(size_t(comm->world_size()));
      for (int i = 0; i < comm->world_size(); ++i) v[size_t(i)] = i;
      return v;
    }());
    for (int r = 0; r < comm->world_size(); ++r) {
      uint64_t b = my_bytes;
      world->broadcast(&b, sizeof b, r);
      all_bytes += b;
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
  if (bw == 0) bw = measure_host_bandwidth(cpu_core_count());
  // Tensor-parallel GPUs read their shards at the same time, each from its own memory; pipeline stages
  // take turns at batch 1, and CPU ranks on one host share one memory bus.
  const int parallel_readers = bw_what == "host copy" ? 1 : eo.tp;
  const double roof = parallel_readers * bw / double(all_bytes);
  nlohmann::json j;
  j["model"] = path;
  j["backend"] = engine.backend_name();
  j["tp"] = eo.tp;
  j["pp"] = eo.pp;
  j["weight_bytes"] = all_bytes;
  j["bandwidth_bytes_per_s"] = bw;
  j["bandwidth_source"] = bw_what;
  j["roofline_tokens_per_s"] = roof;
  if (n_prompt > 0) j["pp"] = {{"n_prompt", n_prompt}, {"tokens_per_s", median(pp)}, {"runs", pp}};
  if (n_gen > 0)
    j["tg"] = {{"n_gen", n_gen}, {"tokens_per_s", median(tg)}, {"runs", tg}, {"roofline_share", median(tg) / roof},
               {"comm_share", median(comm_share)},
               // Time per token beyond reading the weights at the measured bandwidth: launches, syncs,
               // host work, collectives.
               {"fixed_cost_us_per_token", 1e6 * (1.0 / median(tg) - 1.0 / roof)}};
  j["layout"] = {{"tp", eo.tp}, {"pp", eo.pp}};
  if (json) {
    std::printf("%s\n", j.dump(2).c_str());
    return 0;
  }
  std::printf("model %s, backend %s, tp %d x pp %d, weights %s\n", path.c_str(), engine.backend_name().c_str(), eo.tp,
              eo.pp, human_bytes(all_bytes).c_str());
  std::printf("%s bandwidth %.2f GB/s%s -> decode roofline %.1f tokens/s (weights read once per token)\n",
              bw_what.c_str(), bw / 1e9, parallel_readers > 1 ? cat(" x ", parallel_readers, " GPUs").c_str() : "", roof);
  std::printf("| test  | tokens/s | roofline share | comm share |\n|-------|----------|----------------|------------|\n");
  if (n_prompt > 0) std::printf("| pp%-3lld | %8.1f |                |            |\n", (long long)n_prompt, median(pp));
  if (n_gen > 0) {
    std::printf("| tg%-3lld | %8.1f | %13.1f%% | %9.1f%% |\n", (long long)n_gen, median(tg), 100 * median(tg) / roof,
                100 * median(comm_share));
    std::printf("fixed cost per generated token beyond the weight reads: %.1f us\n", 1e6 * (1.0 / median(tg) - 1.0 / roof));
  }
  if (const std::string k = comm->all_reduce_kind(); !k.empty()) std::printf("device all-reduce: %s\n", k.c_str());
  return 0;
}

}  // namespace shardlm
