#include "run_flags.h"

#include <algorithm>
#include <cstdio>
#include <thread>

#include "cli_common.h"
#include "comm/launcher.h"
#include "core/cuda_tuning.h"
#include "core/env.h"
#include "core/error.h"
#include "plan_glue.h"

namespace shardlm {

void RunFlags::add_to(CLI::App& app) {
  app.add_option("-m,--model", model, "GGUF file or Hugging Face directory (default: the bundled model)");
  tp_opt_ = app.add_option("--tp,--tensor-parallel-size", tp,
                           "tensor-parallel ranks (heads and FFN columns split; default: the planner's choice)");
  pp_opt_ = app.add_option("--pp,--pipeline-parallel-size", pp,
                           "pipeline stages (consecutive layer ranges; default: the planner's choice)");
  app.add_flag("--enable-expert-parallel", expert_parallel,
               "mixture of experts: partition each layer's experts whole over a stage's tp ranks, attention "
               "staying tensor-parallel (default: every rank holds 1/tp of every expert)");
  app.add_option("--layer-split,--tensor-split", layer_split,
                 "layers per pipeline stage as proportions, e.g. 3,1 (rounded to whole layers); also -ts");
  app.add_option("--split-mode", split_mode,
                 "llama.cpp's -sm: layer, row, tensor or none; accepted for llama.cpp command lines but not used "
                 "(a note says so): the split is --tp (rows, as row/tensor) and --pp (layers, as layer)");
  app.add_option("-c,--ctx-size,--max-model-len", n_ctx, "context size in tokens (default: model's, at most 4096)");
  app.add_option("-b,--batch-size", n_batch, "largest number of tokens in one forward step");
  app.add_option("--micro-batch", micro_batch, "prompt tokens per pipeline step (default: batch / pp)");
  app.add_option("-t,--threads", threads, "threads per rank, at most this machine's cores (0 = the default: the cores "
                 "this rank may run on, shared among the ranks on the host)");
  app.add_option("--kv-type,--cache-type-k,--cache-type-v", kv_type, "KV cache type: f16, f32 (exact golden checks), bf16, q8_0 or q4_0 (llama.cpp's -ctk/-ctv; one type "
                 "for K and V; q8_0/q4_0 need head_dim a multiple of 32 and the cpu backend)")
      ->capture_default_str();
  app.add_option("--backend", backend, "cpu, cuda, or reference (slow fp64 yardstick)");
  app.add_option("--n-gpu-layers", n_gpu_layers, "with --backend cuda: layers on the GPU (the last ones; the rest run "
                 "on the CPU); also -ngl");
  app.add_flag("--cpu-moe", cpu_moe,
               "with --backend cuda, mixture of experts: keep every layer's experts in RAM and run them on the CPU, "
               "attention and the router on the GPU (also -cmoe)");
  app.add_option("--n-cpu-moe", n_cpu_moe, "with --backend cuda: the experts of the first N layers in RAM (also -ncmoe)")
      ->capture_default_str();
  app.add_option("--override-tensor", tensor_overrides,
                 "with --backend cuda: PATTERN=DEVICE, tensors whose name matches the regular expression go to DEVICE "
                 "(CPU for experts in RAM, e.g. exps=CPU or blk\\.[0-9]\\.ffn_.*_exps=CPU; CUDA0 keeps them on the "
                 "GPU); repeatable or comma-separated, first match wins (also -ot)")
      ->default_str("");  // none by default: the captured "=[]" in --help says nothing
  app.add_flag("--no-cuda-graphs", no_graphs, "with --backend cuda: launch decode kernels one by one");
  app.add_flag("--full-logits", full_logits,
               "move every decode step's whole logits row to the host and sample there (default: the device "
               "returns only the candidates the sampler needs: the top token, or the top-k plus penalized tokens)");
  app.add_option("--comm-timeout", comm_timeout, "seconds a rank waits for a silent peer before aborting the job");
  app.add_flag("-q,--quiet", quiet, "no progress or layout report on stderr");
  app.add_option("--cpu-mem", cpu_mem,
                 "RAM the ranks may use, e.g. 16G (G = GiB; default: /proc/meminfo); a layout that does not fit "
                 "is refused before loading (exit status 2)");
}

EngineOptions RunFlags::engine_options() const {
  EngineOptions o;
  // A switch for measuring only (docs/cuda_kernels.md): the application reads it, the library takes the field.
  if (const auto on = env_switch("SHARDLM_DEVICE_GREEDY", "1: greedy tokens stay on the device, the default"))
    o.device_greedy = *on;
  o.cuda = cuda_tuning_from_env();
  if (tp < 1 || tp > 1024) fail("--tp ", tp, " is outside [1, 1024]");
  if (pp < 1 || pp > 1024) fail("--pp ", pp, " is outside [1, 1024]");
  o.tp = tp;
  o.pp = pp;
  o.expert_parallel = expert_parallel;
  if (!split_mode.empty() && split_mode != "layer" && split_mode != "row" && split_mode != "tensor" &&
      split_mode != "none")
    fail("--split-mode '", split_mode, "' is not one of layer, row, tensor, none");
  if (!layer_split.empty()) o.layer_split = parse_proportions(layer_split, "--layer-split");
  if (!o.layer_split.empty() && static_cast<int>(o.layer_split.size()) != pp)
    fail("--layer-split has ", o.layer_split.size(), " proportions but --pp is ", pp);
  if (n_ctx < 0) fail("-c ", n_ctx, " must be >= 0");
  o.n_ctx = n_ctx;
  if (n_batch < 1) fail("-b ", n_batch, " must be >= 1");
  o.n_batch = n_batch;
  if (micro_batch < 0) fail("--micro-batch ", micro_batch, " must be >= 0");
  o.micro_batch = micro_batch;
  // One rule for every command that runs a model: more threads than cores only slows a rank down (the
  // threads take turns on a core at every step), so such a -t is a mistake, not a request.
  if (const int cores = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
      threads < 0 || threads > cores)
    fail("-t ", threads, " is outside [0, ", cores, "] (0 = the default; ", cores, " = this machine's cores)");
  o.n_threads = threads;
  o.kv_type = parse_kv_type(kv_type, "--kv-type");
  o.backend = backend;
  if (n_gpu_layers < -1) fail("-ngl ", n_gpu_layers, " must be >= 0");
  o.n_gpu_layers = n_gpu_layers;
  if (n_cpu_moe < 0 || n_cpu_moe > 100000) fail("--n-cpu-moe ", n_cpu_moe, " is outside [0, 100000]");
  o.n_cpu_moe = cpu_moe ? 100000 : n_cpu_moe;  // above any layer count: all of them
  o.tensor_overrides = tensor_overrides;
  o.cuda_graphs = !no_graphs;
  o.full_logits = full_logits;
  if (!(comm_timeout >= 1 && comm_timeout <= 86400)) fail("--comm-timeout ", comm_timeout, " is outside [1, 86400]");
  return o;
}

bool RunFlags::layout_given() const {
  return (tp_opt_ && tp_opt_->count() > 0) || (pp_opt_ && pp_opt_->count() > 0) || !layer_split.empty();
}

std::string RunFlags::model_path() const { return model.empty() ? default_model_path() : model; }

EngineOptions RunFlags::resolve(const ModelSource& src, int64_t ctx_if_unset) const {
  EngineOptions o = engine_options();
  if (!cpu_mem.empty()) parse_size(cpu_mem, "--cpu-mem");
  const ModelConfig& c = src.config();
  const int64_t train = c.n_ctx_train > 0 ? c.n_ctx_train : 4096;
  int64_t ctx = o.n_ctx > 0 ? o.n_ctx : ctx_if_unset > 0 ? std::min<int64_t>(train, ctx_if_unset) : default_context(c);
  // Refused before the planner runs: its advice for a context that does not fit in memory could name a
  // context that the engine then refuses for exceeding the training context.
  if (c.n_ctx_train > 0 && o.n_ctx > c.n_ctx_train)
    fail("-c ", o.n_ctx, " is outside [1, ", c.n_ctx_train, "] (the model's training context; 0 = the default, ",
         default_context(c), ")");
  ctx = std::max<int64_t>(ctx, 1);
  RunPlanRequest rq;
  if (layout_given()) {
    rq.tp = o.tp;
    rq.pp = o.pp;
  }
  rq.layer_split = o.layer_split;
  rq.expert_parallel = o.expert_parallel;
  rq.ctx = ctx;
  rq.batch = std::min(o.n_batch, ctx);
  rq.kv_type = o.kv_type;
  rq.max_num_seqs = max_num_seqs;
  if (!cpu_mem.empty()) rq.cpu_mem = cpu_mem;
  const LaunchEnv launch = launch_env();
  rq.world_size = launch.world_size;
  const RunPlan rp = plan_run(model_desc_from_source(src), rq);
  o.tp = rp.tp;
  o.pp = rp.pp;
  if (!quiet && !layout_given() && launch.rank == 0) std::fprintf(stderr, "%s\n", rp.summary.c_str());
  if (!split_mode.empty() && launch.rank == 0)  // even with -q: the flag does not do what it says
    std::fprintf(stderr, "note: --split-mode %s is not used: shardlm splits rows with --tp N and layers with "
                 "--pp N (this run: tp %d x pp %d)\n", split_mode.c_str(), o.tp, o.pp);
  return o;
}

}  // namespace shardlm
