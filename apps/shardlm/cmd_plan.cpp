// `shardlm plan`: will this model fit this machine, how should it be split, and how fast will it run?
// Exit status: 0 the model fits (plan printed), 3 nothing fits (the closest miss and the smallest
// changes that would fit are printed), 2 bad input (flags, files), 1 other errors (thrown as Error).
#include <CLI/CLI.hpp>
#include <algorithm>
#include <charconv>
#include <cmath>
#include <filesystem>
#include <iostream>
#include <new>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "backends/cpu/cpu_backend.h"
#include "cli_common.h"
#include "commands.h"
#include "plan_glue.h"
#include "config/presets.h"
#include "core/error.h"
#include "formats/gguf.h"
#include "plan/cost_model.h"
#include "plan/devices.h"
#include "plan/planner.h"

namespace shardlm {
namespace {

// llama.cpp spells some options as multi-letter single-dash flags (-ngl, -ts, -sm, -mg), which CLI11
// does not accept as short names; they are rewritten to their long forms before parsing.
std::vector<std::string> rewrite_llama_flags(int argc, const char* const* argv) {
  static const std::pair<const char*, const char*> kMap[] = {
      {"-ngl", "--n-gpu-layers"}, {"-ts", "--tensor-split"}, {"-sm", "--split-mode"}, {"-mg", "--main-gpu"},
      {"-ot", "--override-tensor"}, {"-cmoe", "--cpu-moe"}, {"-ncmoe", "--n-cpu-moe"}};
  std::vector<std::string> out;
  for (int i = 0; i < argc; ++i) {
    std::string a = argv[i];
    for (const auto& [from, to] : kMap) {
      const std::string f = from;
      if (a == f) a = to;
      else if (a.rfind(f + "=", 0) == 0) a = std::string(to) + a.substr(f.size());
    }
    out.push_back(a);
  }
  return out;
}

std::vector<double> parse_split(const std::string& s) {
  std::vector<double> v;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    std::istringstream is(item);
    double x = 0;
    if (!(is >> x) || !(is >> std::ws).eof() || !(x > 0))
      fail("layer split (--layer-split): item '", item, "' of '", s, "' is not a positive number");
    v.push_back(x);
  }
  if (v.empty()) fail("layer split (--layer-split): '", s, "' is empty");
  return v;
}

int64_t parse_ctx_arg(const std::string& s) {
  int64_t v = 0;
  const auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || p != s.data() + s.size() || v < 1 || v > kMaxPlanCtx)
    fail("context (--ctx): '", s, "' is neither 'max' nor a whole number in [1, ", kMaxPlanCtx, "]");
  return v;
}

bool looks_like_file(const std::string& m) {
  return m.size() > 5 && m.compare(m.size() - 5, 5, ".gguf") == 0;
}

}  // namespace

int cmd_plan(int argc, const char* const* argv) {
  CLI::App app{
      "Plan how a model is split over this machine's (or the given) GPUs and CPU: per-device memory, "
      "whether it fits, predicted decode speed and the largest context.\n"
      "Exit status: 0 fits, 3 nothing fits (suggestions printed), 2 bad input.",
      "shardlm plan"};
  std::string model, quant = "q4_k_m", kv_type = "f16", layer_split, split_mode;
  std::optional<std::string> gpus, cpu_mem, link, cpu_bw, cpu, gpu_bw;
  std::optional<int> cpu_cores;
  std::optional<double> gpu_tflops;
  std::optional<int> tp, pp, ngl;
  bool expert_parallel = false;
  bool cpu_moe = false;
  std::optional<int> n_cpu_moe;
  std::vector<std::string> tensor_overrides;
  std::string ctx_arg;  // a number or "max"; empty: what generate uses, min(trained context, 4096)
  int64_t batch = 512, max_num_seqs = 1;
  int main_gpu = 0;
  bool explain = false, json = false;
  app.add_option("-m,--model", model, "GGUF file, or a preset: " + preset_names())->required();
  auto* quant_opt = app.add_option("--quant", quant, "quantization scheme for presets (" + scheme_names() +
                                                         "); with a GGUF, plan as if re-quantized")
                        ->capture_default_str();
  app.add_option("--gpus", gpus,
                 "GPUs: sizes (24G,24G; G = GB = GiB, binary), names (" + gpu_names() +
                     ") or counts (rtx3090x2, h100x4). Default: none (CPU only)");
  app.add_option("--gpu-bandwidth", gpu_bw,
                 "every GPU's memory bandwidth in GB/s (e.g. 256 or 256GB/s), replacing the datasheet's (default: the "
                 "named card's; 936, an RTX 3090's, for a GPU given by size)");
  app.add_option("--gpu-tflops", gpu_tflops,
                 "every GPU's dense FP16 matmul rate in TFLOP/s (default: the named card's; 71 for a GPU given by size)");
  app.add_option("--cpu", cpu,
                 "the CPU planned for, by name: " + cpu_names() +
                     " (its cores and datasheet memory bandwidth; --cpu-cores/--cpu-bandwidth override). Default: this "
                     "machine's");
  app.add_option("--cpu-cores", cpu_cores,
                 "CPU cores for prefill and CPU ranks (1..4096; default: this machine's, or " +
                     std::to_string(kAssumedCpuCores) + ", an assumption, with --cpu-mem)");
  app.add_option("--cpu-mem", cpu_mem,
                 "CPU RAM for offload / CPU ranks, e.g. 64G (binary; default: /proc/meminfo). Planning for another "
                 "machine: its cores and bandwidth are then assumed unless --cpu/--cpu-cores/--cpu-bandwidth say");
  app.add_option("--cpu-bandwidth", cpu_bw,
                 "CPU memory bandwidth in GB/s, e.g. 80 or 80GB/s (default: measured here with a 256 MiB copy on every "
                 "core; the --cpu preset's; 20, an assumption, with --cpu-mem, which plans for another machine's CPU)");
  app.add_option("--link", link,
                 "link between GPUs: nvlink, pcie4, pcie5, pcie4-nop2p, pcie5-nop2p (no peer-to-peer: all-reduce through "
                 "host memory), ethernet, shm (default: the first GPU's: nvlink for SXM parts, pcie*-nop2p for GeForce "
                 "cards, e.g. --link nvlink for RTX 3090s with a bridge)");
  app.add_option("--ctx,--max-model-len,-c,--ctx-size", ctx_arg,
                 "context length the KV cache must hold, or 'max': the largest that fits, up to the trained context "
                 "(default: as generate, the model's trained context up to 4096)")
      ->check([](const std::string& v) -> std::string {
        if (v == "max") return "";
        try {
          parse_ctx_arg(v);
        } catch (const Error& e) {
          return e.what();
        }
        return "";
      });
  app.add_option("-b,--batch-size,--batch", batch, "tokens per forward pass (prefill micro-batch)")->capture_default_str();
  app.add_option("--max-num-seqs", max_num_seqs,
                 "sequences decoding together (1..4096): the KV pool holds max-num-seqs x ctx positions and must "
                 "fit; also prints how many sequences fit and the aggregate decode tokens/s")
      ->capture_default_str();
  app.add_option("--kv-type", kv_type, "KV cache type: f16, f32, bf16, q8_0 or q4_0")->capture_default_str();
  app.add_option("--tp,--tensor-parallel-size", tp, "pin the tensor parallel size");
  app.add_option("--pp,--pipeline-parallel-size", pp, "pin the number of pipeline stages");
  app.add_flag("--cpu-moe", cpu_moe, "mixture of experts: every layer's experts in RAM, run by the CPU (also -cmoe)");
  app.add_option("--n-cpu-moe", n_cpu_moe, "mixture of experts: the first N layers' experts in RAM (also -ncmoe; "
                 "default: the planner keeps the fewest in RAM that let the model fit)");
  app.add_option("--override-tensor", tensor_overrides,
                 "PATTERN=DEVICE as llama.cpp's -ot, e.g. exps=CPU (expert tensors only; repeatable; also -ot)");
  app.add_flag("--enable-expert-parallel", expert_parallel,
               "mixture of experts: partition each layer's experts whole over a stage's tp ranks (default: every "
               "rank holds 1/tp of every expert)");
  app.add_option("--layer-split,--tensor-split", layer_split,
                 "layer proportions per pipeline stage, e.g. 3,1 (also -ts)");
  app.add_option("--n-gpu-layers", ngl, "layers on the GPUs, the rest on the CPU (also -ngl; 99 = all)");
  app.add_option("--split-mode", split_mode, "layer (pipeline), row/tensor (tensor parallel), none (also -sm)");
  app.add_option("--main-gpu", main_gpu, "the GPU used with --split-mode none (also -mg)")->capture_default_str();
  app.add_flag("--explain", explain, "list the candidate layouts and why each lost");
  app.add_flag("--json", json, "print the plan as JSON");

  const std::vector<std::string> args = rewrite_llama_flags(argc, argv);
  std::vector<const char*> cargs;
  for (const std::string& a : args) cargs.push_back(a.c_str());
  try {
    app.parse(static_cast<int>(cargs.size()), cargs.data());
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    return 2;
  }

  ModelDesc desc;
  if (const Preset* p = find_preset(model); p != nullptr && !std::filesystem::exists(model)) {
    desc = model_desc_from_preset(model, quant);
  } else if (looks_like_file(model) || std::filesystem::exists(model)) {
    // GGUF files and Hugging Face directories alike, through the same model source the runtime loads.
    desc = model_desc_from_source(*open_model(model));
    if (quant_opt->count() > 0) {
      const std::string src = desc.source;
      desc = model_desc_from_config(desc.config, quant);
      desc.source = cat(src, " re-quantized as ", quant);
    }
  } else {
    fail("model (-m): '", model, "' is neither a GGUF file nor a preset; presets: ", preset_names());
  }

  DeviceRequest dreq;
  dreq.gpus = gpus;
  dreq.cpu_mem = cpu_mem;
  if (cpu_bw) dreq.cpu_bandwidth_gbs = parse_bandwidth_gbs(*cpu_bw, "--cpu-bandwidth");
  if (gpu_bw) dreq.gpu_bandwidth_gbs = parse_bandwidth_gbs(*gpu_bw, "--gpu-bandwidth");
  dreq.gpu_tflops = gpu_tflops;
  dreq.cpu = cpu;
  dreq.cpu_cores = cpu_cores;
  // --cpu-mem or --cpu: the plan is for another machine's CPU, whose cores are not these.
  dreq.cpu_is_this_machine = !cpu_mem && !cpu;
  // Planning for this machine's CPU (neither --cpu-mem nor --cpu): its bandwidth decides the speed of
  // offloaded layers and CPU ranks, so measure it (~0.1 s) rather than assume.
  // The same 256 MiB copy as bench's, so that both report the same figure; without the memory for it the
  // planner keeps its stated assumption.
  std::optional<double> measured_gbs;
  if (!cpu_bw && dreq.cpu_is_this_machine) {
    try {
      measured_gbs = measure_host_bandwidth(cpu_core_count(), size_t{256} << 20) / 1e9;
      dreq.cpu_bandwidth_gbs = measured_gbs;
      dreq.cpu_bandwidth_measured = true;
    } catch (const std::bad_alloc&) {
      measured_gbs.reset();
    }
  }
  // And, on this machine, the CPU kernels of the model's weight types (~0.3 s each, as bench does): where
  // decoding the blocks costs more than reading them, they bound CPU layers' decode, not the bandwidth.
  if (dreq.cpu_is_this_machine) dreq.cpu_kernels = measure_cpu_kernels(desc, dreq.cpu_cores.value_or(cpu_core_count()));
  dreq.link = link;
  DeviceInventory inv = make_inventory(dreq);  // GPU detection joins with the CUDA backend
  if (measured_gbs)
    inv.notes.push_back(cat("CPU memory bandwidth ", std::lround(*measured_gbs * 10) / 10.0,
                            " GB/s, measured here (a 256 MiB copy on ", cpu_core_count(),
                            " threads); --cpu-bandwidth overrides"));

  PlanRequest req;
  if (ctx_arg == "max") {
    req.ctx_max = true;
    req.ctx = default_context(desc.config);  // reported only when nothing fits
  } else if (ctx_arg.empty()) {
    req.ctx = default_context(desc.config);  // generate's, serve's and the engine's
  } else {
    req.ctx = parse_ctx_arg(ctx_arg);
  }
  // As generate: a prefill step holds at most the whole context (run_flags' resolve).
  req.batch = std::min(batch, req.ctx);
  req.max_num_seqs = max_num_seqs;  // make_plan validates 1..4096, naming --max-num-seqs
  const std::optional<GgmlType> kv = parse_type(kv_type);
  if (!kv) fail("KV cache type (--kv-type): '", kv_type, "' is unknown; use f16, f32, bf16, q8_0 or q4_0");
  req.kv_type = *kv;
  req.tp = tp;
  req.expert_parallel = expert_parallel;
  if (cpu_moe) req.n_cpu_moe = 100000;  // above any layer count: all
  else if (n_cpu_moe) req.n_cpu_moe = *n_cpu_moe;
  req.tensor_overrides = tensor_overrides;
  req.pp = pp;
  if (!layer_split.empty()) req.layer_split = parse_split(layer_split);
  req.n_gpu_layers = ngl;
  if (!split_mode.empty()) req.split_mode = parse_split_mode(split_mode);
  req.main_gpu = main_gpu;

  const Plan plan = make_plan(desc, inv, req);
  if (json) std::cout << plan_to_json(plan).dump(2) << "\n";
  else std::cout << plan_to_text(plan, explain);
  return plan.fits ? 0 : 3;
}

}  // namespace shardlm
