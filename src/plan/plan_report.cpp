// Text and JSON renderings of a Plan. The JSON field names are a stable interface (scripts and the
// runtime read them); add fields, never rename.
#include <iomanip>
#include <sstream>

#include "core/error.h"
#include "plan/planner.h"

namespace shardlm {
namespace {

nlohmann::json device_json(const DevicePlan& d) {
  nlohmann::json j;
  j["name"] = d.name;
  j["kind"] = d.kind == PlanDeviceKind::kGpu ? "gpu" : "cpu";
  j["rank"] = d.rank;
  j["tp_rank"] = d.tp_rank;
  j["pp_rank"] = d.pp_rank;
  j["capacity_bytes"] = d.capacity_bytes;
  j["reserve_bytes"] = d.reserve_bytes;
  j["alloc_pad_bytes"] = d.alloc_pad_bytes;
  j["weight_bytes"] = d.weight_bytes;
  j["kv_bytes"] = d.kv_bytes;
  j["kv_sequence_bytes"] = d.kv_seq_bytes;
  j["workspace_bytes"] = d.workspace_bytes;
  j["total_bytes"] = d.total_bytes;
  // `layers` is [first, last], both inclusive (kept for existing readers); layer_begin/layer_end are the
  // half-open range [begin, end) that bench and the loader use (LayerRange). Both 0 when no layer.
  j["layers"] = d.first_layer >= 0 ? nlohmann::json::array({d.first_layer, d.last_layer}) : nlohmann::json::array();
  j["layer_begin"] = d.first_layer >= 0 ? d.first_layer : 0;
  j["layer_end"] = d.first_layer >= 0 ? d.last_layer + 1 : 0;
  j["token_embd"] = d.has_token_embd;
  j["output"] = d.has_output;
  j["fits"] = d.fits;
  return j;
}

nlohmann::json link_json(const LinkSpec& l, const std::string& source) {
  return {{"name", l.name},
          {"latency_s", l.latency_s},
          {"bandwidth_bytes_per_s", l.bandwidth},
          {"peer_to_peer", l.peer_to_peer},
          {"source", source}};
}

std::string gbs(double bytes_per_s) {
  std::ostringstream os;
  os << std::fixed << std::setprecision(bytes_per_s < 100e9 ? 1 : 0) << bytes_per_s / 1e9;
  return os.str();
}

std::string link_text(const LinkSpec& l) {
  std::ostringstream os;
  os << l.name << " (" << l.latency_s * 1e6 << " us per small all-reduce, " << gbs(l.bandwidth) << " GB/s"
     << (l.peer_to_peer ? ", peer-to-peer" : "") << ")";
  if (!l.peer_to_peer && l.name.find("nop2p") != std::string::npos)
    os << ": no peer-to-peer between the cards, every all-reduce goes through host memory";
  return os.str();
}

std::string gib(uint64_t b) {
  std::ostringstream os;
  os << std::fixed << std::setprecision(2) << static_cast<double>(b) / (1024.0 * 1024 * 1024);
  return os.str();
}

std::string rate(double v) {
  std::ostringstream os;
  os << std::fixed << std::setprecision(v < 10 ? 2 : 1) << v;
  return os.str();
}

}  // namespace

nlohmann::json plan_to_json(const Plan& p) {
  nlohmann::json j;
  const Layout& L = p.chosen.layout;
  j["model"] = p.model;
  j["n_params"] = p.n_params;
  j["fits"] = p.fits;
  j["weight_bytes"] = p.weight_bytes;
  j["ctx"] = p.ctx;
  j["batch"] = p.batch;
  j["kv_type"] = type_name(p.kv_type);
  j["max_num_seqs"] = p.max_num_seqs;
  j["kv_pool_bytes"] = p.kv_pool_bytes;
  j["layout"] = {{"tp", L.tp},
                 {"pp", L.pp},
                 {"layer_split", L.layer_split},
                 {"n_gpu_layers", L.n_gpu_layers},
                 {"cpu_ranks", L.cpu_ranks},
                 {"experts_in_ram_layers", L.n_experts_in_ram()}};
  j["devices"] = nlohmann::json::array();
  for (const DevicePlan& d : p.chosen.devices) j["devices"].push_back(device_json(d));
  j["predicted_decode_tokens_per_s"] = p.chosen.decode_tps;
  j["predicted_prefill_tokens_per_s"] = p.chosen.prefill_tps;
  // null for CPU ranks or no fitting layout; otherwise the rate with everything on the GPUs.
  j["all_gpu_decode_tokens_per_s"] = p.all_gpu_decode_tps > 0 ? nlohmann::json(p.all_gpu_decode_tps) : nlohmann::json();
  j["sequences_that_fit"] = p.chosen.seqs_that_fit;
  // max_num_seqs sequences decoding together, each at the full context ctx.
  j["aggregate_decode_tokens_per_s"] = p.chosen.aggregate_decode_tps;
  j["max_context"] = p.max_context;  // of the chosen (or closest-miss) layout
  j["ctx_is_max"] = p.ctx_is_max;
  j["ctx_train"] = p.ctx_train;
  if (!p.fits) {
    j["max_context_any_layout"] = p.max_context_any;
    j["max_context_any_layout_name"] = p.max_context_any_layout;
  }
  j["why_not"] = p.fits ? "" : p.chosen.why;
  j["candidates"] = nlohmann::json::array();
  for (const Candidate& c : p.ranked)
    j["candidates"].push_back({{"verdict", c.verdict},
                               {"fits", c.fits},
                               {"tp", c.layout.tp},
                               {"pp", c.layout.pp},
                               {"layer_split", c.layout.layer_split},
                               {"n_gpu_layers", c.layout.n_gpu_layers},
                               {"experts_in_ram_layers", c.layout.n_experts_in_ram()},
                               {"predicted_decode_tokens_per_s", c.decode_tps},
                               {"sequences_that_fit", c.seqs_that_fit},
                               {"aggregate_decode_tokens_per_s", c.aggregate_decode_tps}});
  j["suggestions"] = p.suggestions;
  j["suggestion_changes"] = nlohmann::json::array();
  for (const Suggestion& sg : p.suggestion_details)
    j["suggestion_changes"].push_back({{"kind", sg.kind},
                                       {"change", sg.change},
                                       {"tp", sg.layout.tp},
                                       {"pp", sg.layout.pp},
                                       {"n_gpu_layers", sg.layout.n_gpu_layers},
                                       {"predicted_decode_tokens_per_s", sg.decode_tps},
                                       {"text", sg.text}});
  // The machine planned for, each figure with where it came from (datasheet, given, measured, assumed).
  const DeviceInventory& M = p.machine;
  j["link"] = link_json(M.link, M.link_source);
  j["cpu"] = {{"cores", M.cpu_cores},
              {"cores_source", M.cpu_cores_source},
              {"mem_bytes", M.cpu.capacity_bytes},
              {"mem_source", M.cpu_mem_source},
              {"bandwidth_bytes_per_s", M.cpu.bandwidth},
              {"bandwidth_source", M.cpu_bandwidth_source}};
  j["gpus"] = nlohmann::json::array();
  for (const Device& g : M.gpus)
    j["gpus"].push_back({{"name", g.name},
                         {"capacity_bytes", g.capacity_bytes},
                         {"bandwidth_bytes_per_s", g.bandwidth},
                         {"bandwidth_source", g.bandwidth_source},
                         {"matmul_flops", g.matmul_flops},
                         {"flops_source", g.flops_source}});
  j["notes"] = p.notes;
  j["assumptions"] = {{"gpu_bandwidth_efficiency", p.params.gpu_bandwidth_efficiency},
                      {"gpu_layer_overhead_s", p.params.gpu_layer_overhead_s},
                      {"cpu_bandwidth_efficiency", p.params.cpu_bandwidth_efficiency},
                      {"matmul_efficiency", p.params.matmul_efficiency},
                      {"quant_matmul_efficiency", p.params.quant_matmul_efficiency},
                      {"gpu_reserve_bytes", p.params.gpu_reserve_bytes},
                      {"gpu_comm_reserve_bytes", p.params.gpu_comm_reserve_bytes},
                      {"cpu_matmul_efficiency", p.params.cpu_matmul_efficiency},
                      {"cpu_reserve_fraction", p.params.cpu_reserve_fraction},
                      {"cpu_reserve_min_bytes", p.params.cpu_reserve_min_bytes}};
  return j;
}

std::string plan_to_text(const Plan& p, bool explain) {
  std::ostringstream os;
  const Layout& L = p.chosen.layout;
  os << "model: " << p.model << "  (" << rate(static_cast<double>(p.n_params) / 1e9) << "e9 params, "
     << gib(p.weight_bytes) << " GiB = " << rate(static_cast<double>(p.weight_bytes) / 1e9) << " GB of weights)\n";
  os << "context " << p.ctx << (p.ctx_is_max ? " (--ctx max: the largest that fits)" : "")
     << (p.ctx_train > 0 ? cat(", trained context ", p.ctx_train) : std::string(", trained context unknown"))
     << ", batch " << p.batch << ", KV cache " << type_name(p.kv_type) << "\n";
  // The machine's figures and where each came from, so that a plan for another machine says what it
  // assumed of it.
  const DeviceInventory& M = p.machine;
  for (size_t i = 0; i < M.gpus.size();) {
    size_t k = i;
    while (k < M.gpus.size() && M.gpus[k].name == M.gpus[i].name && M.gpus[k].bandwidth == M.gpus[i].bandwidth &&
           M.gpus[k].matmul_flops == M.gpus[i].matmul_flops)
      ++k;
    const Device& g = M.gpus[i];
    os << "GPU: " << (k - i) << " x " << g.name << ", " << gib(g.capacity_bytes) << " GiB, " << gbs(g.bandwidth)
       << " GB/s (" << g.bandwidth_source << "), " << rate(g.matmul_flops / 1e12) << " TFLOP/s FP16 (" << g.flops_source
       << ")\n";
    i = k;
  }
  if (!M.gpus.empty())
    os << "link between GPUs: " << link_text(M.link) << ", " << M.link_source
       << (M.gpus.size() == 1 ? " (unused with one GPU)" : "") << "\n";
  os << "CPU: " << M.cpu_cores << " cores (" << M.cpu_cores_source << "), " << gib(M.cpu.capacity_bytes) << " GiB RAM ("
     << M.cpu_mem_source << "), " << gbs(M.cpu.bandwidth) << " GB/s (" << M.cpu_bandwidth_source << ")\n";
  os << (p.fits ? "FITS" : "DOES NOT FIT") << ": " << (L.cpu_ranks ? "CPU ranks" : "GPU ranks") << " tp " << L.tp
     << " x pp " << L.pp << ", " << L.n_gpu_layers << " GPU layers";
  if (L.pp > 1) {
    os << ", layers per stage";
    for (size_t i = 0; i < L.layer_split.size(); ++i) os << (i ? "/" : " ") << L.layer_split[i];
  }
  if (!L.cpu_ranks && L.n_experts_in_ram() > 0) {
    // As llama.cpp spells it when the layers are the first ones.
    int prefix = 0;
    while (prefix < static_cast<int>(L.experts_in_ram.size()) && L.experts_in_ram[static_cast<size_t>(prefix)]) ++prefix;
    os << ", experts of " << L.n_experts_in_ram() << " layers in RAM";
    if (prefix == L.n_experts_in_ram())
      os << (prefix == static_cast<int>(L.experts_in_ram.size()) ? " (--cpu-moe)" : cat(" (--n-cpu-moe ", prefix, ")"));
  }
  os << "\n\n";
  os << std::left << std::setw(22) << "device" << std::right << std::setw(6) << "rank" << std::setw(10) << "layers"
     << std::setw(10) << "weights" << std::setw(9) << "KV" << std::setw(11) << "workspace" << std::setw(9) << "total"
     << std::setw(10) << "usable" << "  (GiB)\n";
  for (const DevicePlan& d : p.chosen.devices) {
    const std::string layers = d.first_layer >= 0 ? cat(d.first_layer, "-", d.last_layer) : std::string("-");
    const uint64_t usable = d.capacity_bytes > d.reserve_bytes ? d.capacity_bytes - d.reserve_bytes : 0;
    os << std::left << std::setw(22) << d.name.substr(0, 21) << std::right << std::setw(6)
       << (d.rank >= 0 ? std::to_string(d.rank) : std::string("-")) << std::setw(10) << layers << std::setw(10)
       << gib(d.weight_bytes) << std::setw(9) << gib(d.kv_bytes) << std::setw(11) << gib(d.workspace_bytes)
       << std::setw(9) << gib(d.total_bytes) << std::setw(10) << gib(usable) << (d.fits ? "  ok" : "  OVER")
       << (d.has_token_embd ? " +embd" : "") << (d.has_output ? " +output" : "") << "\n";
  }
  os << "\npredicted decode: " << rate(p.chosen.decode_tps) << " tok/s (batch 1, context full), prefill: "
     << rate(p.chosen.prefill_tps) << " tok/s\n";
  os << "sequences (--max-num-seqs " << p.max_num_seqs << "): KV pool " << gib(p.kv_pool_bytes) << " GiB ("
     << p.max_num_seqs << " x " << p.ctx << " positions); " << p.chosen.seqs_that_fit << " sequences of context "
     << p.ctx << " fit after weights and workspace\n";
  os << "predicted aggregate decode: " << rate(p.chosen.aggregate_decode_tps) << " tok/s with " << p.max_num_seqs
     << (p.max_num_seqs == 1 ? " sequence" : " sequences")
     << " decoding together (each at context " << p.ctx << "; weights read once per step)\n";
  os << "max context for this layout" << (p.max_num_seqs > 1 ? cat(" (", p.max_num_seqs, " sequences)") : std::string())
     << ": " << p.max_context
     << (p.fits || p.max_context > 0 ? std::string() : std::string(" (its weights and workspace alone do not fit)"))
     << (p.ctx_train > 0 ? cat(" (trained context ", p.ctx_train, ")") : std::string()) << "\n";
  if (!p.fits)
    os << "largest context that fits with any layout: " << p.max_context_any
       << (p.max_context_any > 0 ? cat(" (", p.max_context_any_layout, ")") : std::string(" (none)")) << "\n";
  if (!p.fits) {
    os << "why: " << p.chosen.why << "\n";
    os << "smallest changes that would fit:\n";
    for (const std::string& s : p.suggestions) os << "  - " << s << "\n";
  }
  for (const std::string& n : p.notes) os << "note: " << n << "\n";
  if (explain) {
    os << "\nlink: " << link_text(M.link) << " [" << M.link_source << "]; host link for offloaded layers: "
       << link_text(M.host_link) << "\n";
    os << "\ncandidates (best first):\n";
    for (const Candidate& c : p.ranked) os << "  " << c.verdict << "\n";
    os << "\nassumptions: decode = sum over pipeline stages of (bytes read per token by the slowest rank / "
          "bandwidth x efficiency + a fixed time per GPU layer) + 2 all-reduces per layer + hops; aggregate decode = "
          "max-num-seqs / the same step reading the weights once and every sequence's KV at the full context; GPU "
          "efficiency "
       << p.params.gpu_bandwidth_efficiency << " + " << p.params.gpu_layer_overhead_s * 1e6 << " us per layer, CPU "
       << p.params.cpu_bandwidth_efficiency << "; prefill at " << p.params.matmul_efficiency << " (16-bit weights) or "
       << p.params.quant_matmul_efficiency
       << " (block types) of the dense matmul rate, less for GPU shards under 4096 rows; GPU reserve "
       << gib(p.params.gpu_reserve_bytes) << " GiB + " << gib(p.params.gpu_comm_reserve_bytes)
       << " GiB per NCCL communicator of the rank + the weight shards' rounding to whole 2 MiB pages (allocations of "
          "1 MiB and more); a mixture of experts reads n_e(1-(1-k/n_e)^B) of its n_e experts for B tokens, experts in "
          "RAM at the CPU's bandwidth + "
       << p.params.cpu_moe_layer_overhead_s * 1e6 << " us per such layer; see docs/planner.md\n";
  }
  return os.str();
}

}  // namespace shardlm
