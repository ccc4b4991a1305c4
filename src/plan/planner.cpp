#include "plan/planner.h"

#include "plan/expert_offload.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <limits>
#include <map>
#include <optional>
#include <sstream>

#include "config/presets.h"
#include "quant/quant.h"
#include "core/error.h"
#include "plan/expert_offload.h"
#include "plan/mapping.h"

namespace shardlm {
namespace {

constexpr double kActBytes = 4.0;          // fp32 activations travel between devices
constexpr int64_t kMaxBatch = 65536;
constexpr int64_t kMaxNumSeqs = 4096;

// One pipeline stage as evaluated: its devices (tp of them), layers and role.
struct Stage {
  std::vector<Device> devs;
  std::vector<uint64_t> reserve;
  std::vector<int> ranks;  // -1 for the offload CPU
  int tp = 1;
  int pp_rank = 0;
  LayerRange layers;
  bool first = false, last = false;
  bool offload = false;   // the CPU holding the first layers in front of the GPU stages
  bool cpu_rank = false;  // a CPU process of a CPU-only layout
  LinkSpec link;          // all-reduce within the stage
};

class Search {
 public:
  Search(const ModelDesc& m, const DeviceInventory& inv, const PlanRequest& req, const CostParams& p)
      : m_(m), inv_(inv), req_(req), p_(p), mix_(m.matmul_types()) {
    if (req.n_cpu_moe || !req.tensor_overrides.empty()) {
      std::vector<std::string> names;
      for (const TensorDesc& t : m.tensors) names.push_back(t.name);
      pinned_ram_ = expert_layers_in_ram(m.config, names, req.n_cpu_moe.value_or(0), req.tensor_overrides);
      ram_pinned_ = true;
    }
  }

  // Per-rank weights at this tp, or nullptr (with the reason kept) when tp cannot split the model.
  const std::vector<RankWeights>* weights(int tp) {
    if (auto it = rw_.find(tp); it != rw_.end()) return &it->second;
    if (bad_tp_.count(tp)) return nullptr;
    try {
      return &rw_.emplace(tp, rank_weights(m_, tp, req_.expert_parallel)).first->second;
    } catch (const Error& e) {
      bad_tp_[tp] = e.what();
      return nullptr;
    }
  }
  const std::string& bad_tp_reason(int tp) { return bad_tp_[tp]; }

  uint64_t cpu_reserve() const {
    const auto frac = static_cast<uint64_t>(p_.cpu_reserve_fraction * static_cast<double>(inv_.cpu.capacity_bytes));
    return std::max(frac, p_.cpu_reserve_min_bytes);
  }
  uint64_t cpu_usable() const {
    return inv_.cpu.capacity_bytes > cpu_reserve() ? inv_.cpu.capacity_bytes - cpu_reserve() : 0;
  }

  // GPUs a layout of `world` ranks uses: --main-gpu alone for one rank, else the first `world`.
  std::vector<Device> gpus_for(int world) const {
    if (world == 1) return {inv_.gpus.at(static_cast<size_t>(req_.main_gpu))};
    return {inv_.gpus.begin(), inv_.gpus.begin() + world};
  }

  Candidate evaluate(const Layout& L, int64_t ctx);
  // Full search at context `ctx`: every allowed layout, best first.
  std::vector<Candidate> run(int64_t ctx);

 private:
  std::vector<Stage> stages(const Layout& L);
  bool gpu_part_fits(const Candidate& c) const {
    for (const DevicePlan& d : c.devices)
      if (d.kind == PlanDeviceKind::kGpu && !d.fits) return false;
    return true;
  }
  std::vector<int> initial_counts(int tp, int pp, int ngl, const std::vector<Device>& gpus, int64_t ctx);
  std::optional<Candidate> gpu_candidate(int tp, int pp, int ngl, int64_t ctx, const std::vector<bool>& in_ram);
  void add_gpu_layouts(int tp, int pp, int64_t ctx, std::vector<Candidate>& out);
  void add_cpu_layouts(int64_t ctx, std::vector<Candidate>& out);

  // Device memory a GPU rank needs beyond its allocations: the fixed reserve plus one share per NCCL
  // communicator it joins (the tensor-parallel group; one per pipeline neighbour).
  uint64_t gpu_reserve(int tp, int pp, int stage) const {
    const int comms = (tp > 1 ? 1 : 0) + (pp > 1 ? ((stage == 0 || stage == pp - 1) ? 1 : 2) : 0);
    return p_.gpu_reserve_bytes + static_cast<uint64_t>(comms) * p_.gpu_comm_reserve_bytes;
  }
  // Layer 0's FFN gate: the dense one or, in a mixture of experts, the experts' (3-D or expert 0's).
  const TensorDesc* ffn_gate() const {
    for (const char* n : {"blk.0.ffn_gate.weight", "blk.0.ffn_gate_exps.weight", "blk.0.ffn_gate.0.weight"})
      if (const TensorDesc* t = m_.find(n)) return t;
    return nullptr;
  }
  bool block_weights() const {
    const TensorDesc* t = ffn_gate();
    return t && block_size(t->type) > 1;
  }
  // Share of the dense matmul rate a prefill step achieves on `dev` with tp-way shards (see CostParams).
  double matmul_efficiency(const Device& dev, int tp) const {
    if (dev.kind != PlanDeviceKind::kGpu) return p_.cpu_matmul_efficiency;
    const double e = block_weights() ? p_.quant_matmul_efficiency : p_.matmul_efficiency;
    const double rows = static_cast<double>(m_.config.n_embd) / tp;
    return rows >= 4096 ? e : e * std::pow(rows / 4096.0, 0.65);
  }
  // The type of the model's FFN matrices (most of its bytes), which sets the decode efficiency below.
  std::optional<GgmlType> ffn_type() const {
    const TensorDesc* t = ffn_gate();
    if (!t) return std::nullopt;
    return t->type;
  }
  // CPU decode efficiency for this model's weight type (see CostParams).
  double cpu_efficiency() const {
    const auto t = ffn_type();
    if (!t) return p_.cpu_bandwidth_efficiency;
    switch (*t) {
      case GgmlType::F32: case GgmlType::F16: case GgmlType::BF16: return p_.cpu_bandwidth_efficiency;
      case GgmlType::Q8_0: return p_.cpu_q8_efficiency;
      case GgmlType::Q3_K: return p_.cpu_q4_efficiency * p_.cpu_q3_factor;
      case GgmlType::Q2_K: case GgmlType::IQ3_XXS: case GgmlType::IQ3_S: case GgmlType::IQ2_XXS:
      case GgmlType::IQ2_XS: case GgmlType::IQ2_S:
        return p_.cpu_q4_efficiency * p_.cpu_q2_factor;
      case GgmlType::IQ1_S: case GgmlType::IQ1_M: return p_.cpu_q4_efficiency * p_.cpu_q1_factor;
      default: return p_.cpu_q4_efficiency;  // q4_0, q4_K, q6_K and the 4-5 bit types
    }
  }
  // The rate of the CPU kernels timed on this machine (Device::kernels) over the model's mix of types, each
  // type weighing by `weight` (its bytes for decode, its parameters for prefill): sum(w) / sum(w_t / rate_t),
  // so a tied Q6_K output beside Q4_0 layers counts by its share. 0 when `dev` is no CPU or a type is untimed.
  double timed_rate(const Device& dev, double ModelDesc::TypeShare::*weight, double CpuKernelRate::*rate) const {
    if (dev.kind != PlanDeviceKind::kCpu || dev.kernels.empty()) return 0;
    double total = 0, s = 0;
    for (const ModelDesc::TypeShare& t : mix_) {
      const auto k = std::find_if(dev.kernels.begin(), dev.kernels.end(),
                                  [&](const CpuKernelRate& r) { return r.type == t.type; });
      if (k == dev.kernels.end()) return 0;
      total += t.*weight;
      s += t.*weight / ((*k).*rate);
    }
    return s > 0 ? total / s : 0;
  }
  // Bytes per second a decode step reads on `dev`: the timed kernels', else the bandwidth at the type's
  // efficiency.
  double decode_rate(const Device& dev) const {
    const double timed = timed_rate(dev, &ModelDesc::TypeShare::bytes, &CpuKernelRate::decode_bytes_per_s);
    if (timed > 0) return timed;
    return dev.bandwidth * (dev.kind == PlanDeviceKind::kGpu ? gpu_efficiency() : cpu_efficiency());
  }
  // FLOP/s of a prefill on `dev`: the timed kernels', else the modelled rate.
  double prefill_rate(const Device& dev, int tp) const {
    const double timed = timed_rate(dev, &ModelDesc::TypeShare::params, &CpuKernelRate::prefill_flops);
    if (timed > 0) return timed;
    return dev.matmul_flops * matmul_efficiency(dev, tp);
  }
  // GPU decode efficiency for this model's weight type: the packed kernels' types reach
  // gpu_bandwidth_efficiency, the others run the generic group kernel (see CostParams).
  double gpu_efficiency() const {
    const auto t = ffn_type();
    if (!t) return p_.gpu_bandwidth_efficiency;
    switch (*t) {
      case GgmlType::F32: case GgmlType::F16: case GgmlType::BF16: case GgmlType::Q8_0: case GgmlType::Q4_0:
      case GgmlType::Q4_K: case GgmlType::Q6_K:
        return p_.gpu_bandwidth_efficiency;
      case GgmlType::IQ4_XS: case GgmlType::Q3_K: return p_.gpu_bandwidth_efficiency * p_.gpu_generic_mid_factor;
      case GgmlType::Q2_K: case GgmlType::IQ3_XXS: case GgmlType::IQ3_S: case GgmlType::IQ2_XXS: case GgmlType::IQ2_XS:
      case GgmlType::IQ2_S: case GgmlType::IQ1_S: case GgmlType::IQ1_M:
        return p_.gpu_bandwidth_efficiency * p_.gpu_generic_low_factor;
      default: return p_.gpu_bandwidth_efficiency * p_.gpu_generic_factor;
    }
  }

  const ModelDesc& m_;
  const DeviceInventory& inv_;
  const PlanRequest& req_;
  const CostParams& p_;
  const std::vector<ModelDesc::TypeShare> mix_;  // the matrices' types (ModelDesc::matmul_types)
  std::map<int, std::vector<RankWeights>> rw_;
  std::map<int, std::string> bad_tp_;
  bool ram_pinned_ = false;        // --n-cpu-moe / --cpu-moe / -ot given
  std::vector<bool> pinned_ram_;   // (n_layer) their experts-in-RAM layers
};

std::vector<Stage> Search::stages(const Layout& L) {
  const int n_layer = static_cast<int>(m_.config.n_layer);
  std::vector<Stage> out;
  const int n_cpu = L.cpu_ranks ? 0 : n_layer - L.n_gpu_layers;
  if (n_cpu > 0) {
    Stage s;
    s.devs = {inv_.cpu};
    s.reserve = {cpu_reserve()};
    s.ranks = {-1};
    s.layers = {0, n_cpu};
    s.first = true;
    s.offload = true;
    s.link = inv_.host_link;
    out.push_back(s);
  }
  const int world = L.tp * L.pp;
  std::vector<Device> devs;
  if (L.cpu_ranks) {
    for (int r = 0; r < world; ++r) {
      Device d = inv_.cpu;
      d.name = world == 1 ? "CPU" : cat("CPU rank ", r);
      d.capacity_bytes = cpu_usable() / static_cast<uint64_t>(world);
      d.bandwidth = inv_.cpu.bandwidth / L.tp;  // a stage's ranks read memory at the same time
      d.matmul_flops = inv_.cpu.matmul_flops / world;
      // Timed kernels: each rank runs on its share of the threads (the engine divides the cores among the
      // host's ranks), whatever the layout.
      for (CpuKernelRate& k : d.kernels) {
        k.decode_bytes_per_s /= world;
        k.prefill_flops /= world;
      }
      devs.push_back(d);
    }
  } else {
    devs = gpus_for(world);
  }
  int at = n_cpu;
  for (int s = 0; s < L.pp; ++s) {
    Stage st;
    st.tp = L.tp;
    st.pp_rank = s;
    st.cpu_rank = L.cpu_ranks;
    st.link = L.cpu_ranks ? find_link("shm") : inv_.link;
    for (int t = 0; t < L.tp; ++t) {
      st.devs.push_back(devs[static_cast<size_t>(s * L.tp + t)]);
      st.reserve.push_back(L.cpu_ranks ? 0 : gpu_reserve(L.tp, L.pp, s));
      st.ranks.push_back(Mapping::rank_of(s, t, L.tp));
    }
    st.layers = {at, at + L.layer_split[static_cast<size_t>(s)]};
    at = st.layers.end;
    st.first = s == 0 && n_cpu == 0;
    st.last = s == L.pp - 1;
    out.push_back(st);
  }
  SHARDLM_CHECK(at == n_layer, "layers assigned ", at, " of ", n_layer);
  return out;
}

Candidate Search::evaluate(const Layout& L, int64_t ctx) {
  const ModelConfig& c = m_.config;
  Candidate cand;
  cand.layout = L;
  cand.fits = true;
  double decode_s = 0, prefill_s = 0, step_s = 0;  // step_s: one decode step of all max_num_seqs sequences
  const double n_seqs = static_cast<double>(req_.max_num_seqs);
  int64_t seqs_fit = std::numeric_limits<int64_t>::max();
  const std::vector<Stage> st = stages(L);
  // Experts in RAM beside the GPU ranks (--cpu-moe): the host holds them for every rank, and its CPU reads
  // them; one device entry sums them.
  DevicePlan ram;
  ram.name = "CPU (experts)";
  ram.kind = PlanDeviceKind::kCpu;
  ram.pp_rank = -1;
  ram.capacity_bytes = inv_.cpu.capacity_bytes;
  ram.reserve_bytes = cpu_reserve();
  const double pick = c.moe() ? static_cast<double>(c.n_expert_used) / static_cast<double>(c.n_expert) : 0.0;
  // Share of a layer's experts that B tokens read: n_e(1 - (1 - k/n_e)^B) distinct experts of n_e on
  // average (uniform routing); k/n_e at batch 1. A tensor-parallel rank holds a slice of every expert, an
  // expert-parallel one whole experts: the same share either way.
  const auto read_share = [&](double tokens) { return c.moe() ? 1.0 - std::pow(1.0 - pick, tokens) : 0.0; };
  for (size_t si = 0; si < st.size(); ++si) {
    const Stage& s = st[si];
    const std::vector<RankWeights>* rws = weights(s.tp);
    SHARDLM_CHECK(rws != nullptr, "tp ", s.tp, " was not validated");
    const int nl = s.layers.size();
    double stage_read_s = 0, stage_flop_s = 0, stage_step_s = 0;
    for (int t = 0; t < s.tp; ++t) {
      const RankWeights& w = (*rws)[static_cast<size_t>(t)];
      const Device& dev = s.devs[static_cast<size_t>(t)];
      DevicePlan d;
      d.name = dev.name;
      d.kind = dev.kind;
      d.rank = s.ranks[static_cast<size_t>(t)];
      d.tp_rank = s.offload ? 0 : t;
      d.pp_rank = s.offload ? -1 : s.pp_rank;
      d.capacity_bytes = dev.capacity_bytes;
      d.reserve_bytes = s.reserve[static_cast<size_t>(t)];
      uint64_t layer_w = 0, layer_pad = 0, expert_w = 0, ram_w = 0;
      int ram_layers = 0;
      for (int l = s.layers.begin; l < s.layers.end; ++l) {
        const size_t li = static_cast<size_t>(l);
        const bool in_ram = dev.kind == PlanDeviceKind::kGpu && !L.experts_in_ram.empty() && L.experts_in_ram[li];
        layer_w += w.layer_bytes[li];
        layer_pad += w.layer_gpu_pad[li];
        if (in_ram) {
          layer_w -= w.layer_expert_bytes[li];
          layer_pad -= w.layer_expert_gpu_pad[li];
          ram_w += w.layer_expert_bytes[li];
          ++ram_layers;
        } else {
          expert_w += w.layer_expert_bytes[li];
        }
      }
      if (ram_layers > 0) {
        ram.weight_bytes += ram_w;
        // The FFN's buffers on the host (LlamaModel's e_*): xn and o, k rows of inputs and outputs, gate/up.
        const int64_t k = c.n_expert_used, b = req_.batch;
        ram.workspace_bytes += static_cast<uint64_t>(4 * b * (2 * c.n_embd + 2 * k * c.n_embd + 2 * k * w.ff_units));
      }
      // As load_weights counts: a tied output on a CPU rank that also maps the embedding costs nothing
      // extra (it points into the mapped table) unless the CPU kernels pack its type (quant.h's packs_rows,
      // this machine's kernel family); a device copies it. rope_freqs stays in the config.
      const bool tied_in_place = c.tied_output && s.first && dev.kind == PlanDeviceKind::kCpu &&
                                 !packs_rows(cpu_isa(), w.output_type);
      d.weight_bytes = layer_w + (s.first ? w.token_embd_bytes : 0) +
                       (s.last ? w.output_norm_bytes + (tied_in_place ? 0 : w.output_bytes) : 0);
      if (dev.kind == PlanDeviceKind::kGpu) {
        d.alloc_pad_bytes = layer_pad + (s.first ? w.token_embd_gpu_pad : 0) +
                            (s.last ? w.output_norm_gpu_pad + w.output_gpu_pad : 0);
        d.reserve_bytes += d.alloc_pad_bytes;
      }
      d.kv_seq_bytes = checked_mul<uint64_t>(
          checked_mul<uint64_t>(kv_bytes_per_token_layer(c, w.kv_heads, req_.kv_type), static_cast<uint64_t>(ctx),
                                "KV bytes"),
          static_cast<uint64_t>(nl), "KV bytes");
      d.kv_bytes = checked_mul<uint64_t>(d.kv_seq_bytes, static_cast<uint64_t>(req_.max_num_seqs), "KV pool bytes");
      d.workspace_bytes = workspace_bytes(c, w, req_.batch, ctx, s.last, dev.kind == PlanDeviceKind::kGpu);
      d.total_bytes = d.weight_bytes + d.kv_bytes + d.workspace_bytes;
      d.fits = d.total_bytes + d.reserve_bytes <= d.capacity_bytes;
      if (d.kv_seq_bytes > 0) {
        const uint64_t fixed = d.weight_bytes + d.workspace_bytes + d.reserve_bytes;
        const uint64_t left = d.capacity_bytes > fixed ? d.capacity_bytes - fixed : 0;
        seqs_fit = std::min(seqs_fit, static_cast<int64_t>(left / d.kv_seq_bytes));
      }
      if (nl > 0) {
        d.first_layer = s.layers.begin;
        d.last_layer = s.layers.end - 1;
      }
      d.has_token_embd = s.first;
      d.has_output = s.last;
      // Decode reads every weight of the rank once, one embedding row, the KV cache of the context and
      // (tied output) only this rank's vocabulary share of the shared table.
      const double out_read = static_cast<double>(w.output_bytes);
      const double embd_row = s.first ? static_cast<double>(w.token_embd_row_bytes) : 0.0;
      const double out_part = s.last ? static_cast<double>(w.output_norm_bytes) + out_read : 0.0;
      // A mixture of experts reads, of its experts, those its tokens chose (read_share).
      const auto expert_read = [&](double tokens) { return static_cast<double>(expert_w) * read_share(tokens); };
      const double dense_w = static_cast<double>(layer_w - expert_w);
      d.decode_read_bytes = dense_w + expert_read(1.0) + static_cast<double>(d.kv_seq_bytes) + embd_row + out_part;
      // Experts in RAM: the CPU reads their share at its bandwidth, shared by the stage's ranks, plus the
      // round trip of each such layer's activations; the GPU waits meanwhile.
      const auto ram_s = [&](double tokens) {
        if (ram_layers == 0) return 0.0;
        return static_cast<double>(ram_w) * read_share(tokens) / (inv_.cpu.bandwidth / s.tp * cpu_efficiency()) +
               ram_layers * p_.cpu_moe_layer_overhead_s;
      };
      const double rate = decode_rate(dev);
      const double overhead_s = dev.kind == PlanDeviceKind::kGpu ? nl * p_.gpu_layer_overhead_s : 0.0;
      stage_read_s = std::max(stage_read_s, d.decode_read_bytes / rate + overhead_s + ram_s(1.0));
      // A step of N sequences: the weights once, every sequence's KV (the whole pool, each sequence at the
      // full context) and embedding row, the per-layer overhead once. At N = 1 this is the batch-1 figure.
      const double step_read = dense_w + expert_read(n_seqs) + static_cast<double>(d.kv_bytes) + n_seqs * embd_row + out_part;
      stage_step_s = std::max(stage_step_s, step_read / rate + overhead_s + ram_s(n_seqs));
      // Prefill: the experts of layers in RAM are multiplied by the CPU (all ranks' shares together).
      const double ram_flops = ram_layers * expert_flops_per_token(c) / s.tp;
      const double flops = nl * layer_flops_per_token(c, std::max<int64_t>(1, ctx / 2)) / s.tp - ram_flops +
                           (s.last ? 2.0 * static_cast<double>(c.n_embd) * static_cast<double>(c.n_vocab) / s.tp : 0.0);
      stage_flop_s = std::max(stage_flop_s, flops / prefill_rate(dev, s.tp) +
                                                ram_flops * s.tp / (inv_.cpu.matmul_flops * p_.cpu_matmul_efficiency));
      if (!d.fits && cand.fits) {
        cand.fits = false;
        cand.why = cat(d.name, d.rank >= 0 ? cat(" (rank ", d.rank, ")") : std::string(), " needs ",
                       format_bytes(d.total_bytes), " + ", format_bytes(d.reserve_bytes), " reserve > ",
                       format_bytes(d.capacity_bytes));
      }
      cand.devices.push_back(d);
    }
    // Communication of a step carrying `rows` tokens' activations (1 for batch 1, N for N sequences).
    const auto comm = [&](double rows) {
      double comm_s = 0;
      if (s.tp > 1) {
        // Two all-reduces per layer (after attention and after the FFN), ring volume 2(tp-1)/tp.
        const double ar = s.link.latency_s +
                          2.0 * (s.tp - 1) / s.tp * rows * static_cast<double>(c.n_embd) * kActBytes / s.link.bandwidth;
        comm_s += 2.0 * nl * ar;
        // The last stage exchanges only its token candidates (a few hundred bytes), not its logits.
        if (s.last) comm_s += s.link.latency_s;
      }
      if (si > 0) {  // hop from the previous stage
        const LinkSpec& hop = st[si - 1].offload ? inv_.host_link : s.link;
        comm_s += hop.latency_s + rows * static_cast<double>(c.n_embd) * kActBytes / hop.bandwidth;
      }
      return comm_s;
    };
    decode_s += stage_read_s + comm(1.0);
    step_s += stage_step_s + comm(n_seqs);
    prefill_s += stage_flop_s;
  }
  if (ram.weight_bytes > 0) {
    // With layers offloaded as well (-ngl), the offload CPU's share of the RAM is taken already.
    for (const DevicePlan& d : cand.devices)
      if (d.rank < 0 && d.kind == PlanDeviceKind::kCpu)
        ram.capacity_bytes = ram.capacity_bytes > d.total_bytes ? ram.capacity_bytes - d.total_bytes : 0;
    ram.total_bytes = ram.weight_bytes + ram.workspace_bytes;
    ram.fits = ram.total_bytes + ram.reserve_bytes <= ram.capacity_bytes;
    ram.decode_read_bytes = static_cast<double>(ram.weight_bytes) * read_share(1.0);
    if (!ram.fits && cand.fits) {
      cand.fits = false;
      cand.why = cat(ram.name, " needs ", format_bytes(ram.total_bytes), " + ", format_bytes(ram.reserve_bytes),
                     " reserve > ", format_bytes(ram.capacity_bytes));
    }
    cand.devices.push_back(ram);
  }
  cand.decode_tps = decode_s > 0 ? 1.0 / decode_s : 0;
  cand.aggregate_decode_tps = step_s > 0 ? n_seqs / step_s : 0;
  cand.seqs_that_fit = seqs_fit == std::numeric_limits<int64_t>::max() ? 0 : seqs_fit;
  cand.prefill_tps = prefill_s > 0 ? 1.0 / prefill_s : 0;
  // The offload CPU is listed after the ranks.
  std::stable_sort(cand.devices.begin(), cand.devices.end(),
                   [](const DevicePlan& a, const DevicePlan& b) { return (a.rank < 0) < (b.rank < 0); });
  return cand;
}

std::vector<int> Search::initial_counts(int tp, int pp, int ngl, const std::vector<Device>& gpus, int64_t ctx) {
  if (!req_.layer_split.empty()) {
    std::vector<int> counts;
    for (const LayerRange& r : split_layers(ngl, pp, req_.layer_split)) counts.push_back(r.size());
    return counts;
  }
  // Layers in proportion to what each stage has left after its fixed costs (embedding, output,
  // workspace, reserve): the smallest rank of a stage decides.
  const ModelConfig& c = m_.config;
  const std::vector<RankWeights>& rws = *weights(tp);
  const bool offload = ngl < c.n_layer;
  std::vector<double> props;
  for (int s = 0; s < pp; ++s) {
    double free_min = std::numeric_limits<double>::max();
    for (int t = 0; t < tp; ++t) {
      const RankWeights& w = rws[static_cast<size_t>(t)];
      const bool first = s == 0 && !offload, last = s == pp - 1;
      const double fixed = static_cast<double>((first ? w.token_embd_bytes : 0) +
                                               (last ? w.output_norm_bytes + w.output_bytes : 0) +
                                               workspace_bytes(c, w, req_.batch, ctx, last) + gpu_reserve(tp, pp, s));
      const double cap = static_cast<double>(gpus[static_cast<size_t>(s * tp + t)].capacity_bytes);
      free_min = std::min(free_min, cap - fixed);
    }
    props.push_back(std::max(free_min, 1.0));
  }
  std::vector<int> counts;
  for (const LayerRange& r : split_layers(ngl, pp, props)) counts.push_back(r.size());
  return counts;
}

// The layout (tp, pp) with `ngl` layers on the GPUs; the split is rebalanced one layer at a time from the
// most overfull stage to the one with most room while that helps (layers differ in size under q4_k_m).
std::optional<Candidate> Search::gpu_candidate(int tp, int pp, int ngl, int64_t ctx, const std::vector<bool>& in_ram) {
  if (ngl < pp) return std::nullopt;
  Layout L;
  L.tp = tp;
  L.pp = pp;
  L.n_gpu_layers = ngl;
  L.experts_in_ram = in_ram;
  L.layer_split = initial_counts(tp, pp, ngl, gpus_for(tp * pp), ctx);
  Candidate best = evaluate(L, ctx);
  if (!req_.layer_split.empty() || pp == 1) return best;
  for (int iter = 0; iter < ngl && !gpu_part_fits(best); ++iter) {
    // Slack per stage = min over its ranks of capacity - reserve - total.
    std::vector<double> slack(static_cast<size_t>(pp), std::numeric_limits<double>::max());
    for (const DevicePlan& d : best.devices)
      if (d.rank >= 0)
        slack[static_cast<size_t>(d.pp_rank)] = std::min(
            slack[static_cast<size_t>(d.pp_rank)],
            static_cast<double>(d.capacity_bytes) - static_cast<double>(d.reserve_bytes + d.total_bytes));
    const auto worst = static_cast<size_t>(std::min_element(slack.begin(), slack.end()) - slack.begin());
    const auto roomy = static_cast<size_t>(std::max_element(slack.begin(), slack.end()) - slack.begin());
    if (slack[roomy] <= 0 || L.layer_split[worst] <= 1) break;
    Layout next = best.layout;
    next.layer_split[worst] -= 1;
    next.layer_split[roomy] += 1;
    Candidate c = evaluate(next, ctx);
    double worst_after = std::numeric_limits<double>::max();
    for (const DevicePlan& d : c.devices)
      if (d.rank >= 0)
        worst_after = std::min(worst_after, static_cast<double>(d.capacity_bytes) -
                                                static_cast<double>(d.reserve_bytes + d.total_bytes));
    if (worst_after <= slack[worst]) break;  // no longer improving
    best = c;
    L = next;
  }
  return best;
}

void Search::add_gpu_layouts(int tp, int pp, int64_t ctx, std::vector<Candidate>& out) {
  const int n_layer = static_cast<int>(m_.config.n_layer);
  if (pp > n_layer) return;
  if (req_.n_gpu_layers) {
    const int ngl = std::min(*req_.n_gpu_layers, n_layer);
    if (ngl < pp) return;  // reported by make_plan when pinned
    if (auto c = gpu_candidate(tp, pp, ngl, ctx, pinned_ram_)) out.push_back(*c);
    return;
  }
  std::optional<Candidate> full = gpu_candidate(tp, pp, n_layer, ctx, pinned_ram_);
  if (full && (gpu_part_fits(*full) || inv_.cpu.capacity_bytes == 0)) {
    out.push_back(*full);
    return;
  }
  // A mixture of experts that does not fit: keep the experts of the first N layers in RAM (what
  // llama.cpp's --n-cpu-moe does), the smallest N whose GPU part fits (binary search: the GPU part shrinks
  // as N grows); attention, norms and router stay on the GPUs.
  if (m_.config.moe() && !ram_pinned_ && inv_.cpu.capacity_bytes > 0) {
    const auto prefix = [&](int n) {
      std::vector<bool> v(static_cast<size_t>(n_layer), false);
      for (int l = 0; l < n; ++l) v[static_cast<size_t>(l)] = true;
      return v;
    };
    int lo = 1, hi = n_layer;  // hi: candidate known or assumed to fit
    std::optional<Candidate> best;
    if (auto all = gpu_candidate(tp, pp, n_layer, ctx, prefix(n_layer)); all && gpu_part_fits(*all)) {
      best = all;
      while (lo < hi) {
        const int mid = (lo + hi) / 2;
        std::optional<Candidate> c = gpu_candidate(tp, pp, n_layer, ctx, prefix(mid));
        if (c && gpu_part_fits(*c)) {
          hi = mid;
          best = c;
        } else {
          lo = mid + 1;
        }
      }
    }
    if (best) out.push_back(*best);
  }
  // Offload: the largest number of GPU layers whose GPU part fits (binary search; fit shrinks with layers).
  int lo = pp - 1, hi = n_layer - 1;  // lo: known fitting (pp-1 = none), hi: candidate upper bound
  std::optional<Candidate> best;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    std::optional<Candidate> c = gpu_candidate(tp, pp, mid, ctx, pinned_ram_);
    if (c && gpu_part_fits(*c)) {
      lo = mid;
      best = c;
    } else {
      hi = mid - 1;
    }
  }
  if (best) out.push_back(*best);
  if (full) out.push_back(*full);  // kept for --explain: why all-GPU lost
}

void Search::add_cpu_layouts(int64_t ctx, std::vector<Candidate>& out) {
  const int n_layer = static_cast<int>(m_.config.n_layer);
  std::vector<int> tps, pps;
  if (req_.tp) tps = {*req_.tp};
  else
    for (int t = 1; t <= std::min(8, inv_.cpu_cores); t *= 2) tps.push_back(t);
  if (req_.pp) pps = {*req_.pp};
  else
    for (int q = 1; q <= std::min(4, inv_.cpu_cores); q *= 2) pps.push_back(q);
  for (int tp : tps)
    for (int pp : pps) {
      if (tp * pp > std::max(inv_.cpu_cores, 1) && !(req_.tp && req_.pp)) continue;
      if (pp > n_layer || weights(tp) == nullptr) continue;
      Layout L;
      L.tp = tp;
      L.pp = pp;
      L.cpu_ranks = true;
      for (const LayerRange& r : split_layers(n_layer, pp, req_.layer_split)) L.layer_split.push_back(r.size());
      out.push_back(evaluate(L, ctx));
    }
}

// Worst device as a share of what it may use; ranks non-fitting candidates by how close they came.
double overflow(const Candidate& c) {
  double w = 0;
  for (const DevicePlan& d : c.devices)
    w = std::max(w, static_cast<double>(d.total_bytes + d.reserve_bytes) / std::max<double>(1.0, static_cast<double>(d.capacity_bytes)));
  return w;
}

bool better(const Candidate& a, const Candidate& b) {
  if (a.fits != b.fits) return a.fits;
  if (!a.fits) return overflow(a) < overflow(b);
  if (std::abs(a.decode_tps - b.decode_tps) > 1e-9 * std::max(a.decode_tps, b.decode_tps))
    return a.decode_tps > b.decode_tps;
  const int wa = a.layout.tp * a.layout.pp, wb = b.layout.tp * b.layout.pp;
  if (wa != wb) return wa < wb;
  return a.layout.tp < b.layout.tp;
}

std::vector<Candidate> Search::run(int64_t ctx) {
  std::vector<Candidate> out;
  const int n_gpu = static_cast<int>(inv_.gpus.size());
  const bool gpu_allowed = n_gpu > 0 && !(req_.n_gpu_layers && *req_.n_gpu_layers == 0);
  if (gpu_allowed) {
    for (int world = 1; world <= n_gpu; ++world)
      for (int tp = 1; tp <= world; ++tp) {
        if (world % tp != 0) continue;
        const int pp = world / tp;
        if (req_.tp && tp != *req_.tp) continue;
        if (req_.pp && pp != *req_.pp) continue;
        if (req_.split_mode == SplitMode::kNone && world != 1) continue;
        if (req_.split_mode == SplitMode::kLayer && (tp != 1 || (!req_.pp && pp != n_gpu))) continue;
        if (req_.split_mode == SplitMode::kRow && (pp != 1 || (!req_.tp && tp != n_gpu))) continue;
        if (!req_.layer_split.empty() && static_cast<int>(req_.layer_split.size()) != pp) continue;
        if (weights(tp) == nullptr) continue;
        add_gpu_layouts(tp, pp, ctx, out);
      }
  }
  const bool cpu_allowed = !gpu_allowed || (!req_.n_gpu_layers && !req_.split_mode && !req_.tp && !req_.pp &&
                                            req_.layer_split.empty());
  if (cpu_allowed && inv_.cpu.capacity_bytes > 0) add_cpu_layouts(ctx, out);
  std::stable_sort(out.begin(), out.end(), better);
  return out;
}

std::string layout_name(const Layout& L, int n_layer) {
  std::string s = L.cpu_ranks ? cat("CPU tp ", L.tp, " pp ", L.pp) : cat("GPU tp ", L.tp, " pp ", L.pp);
  if (L.pp > 1) {
    s += " split ";
    for (size_t i = 0; i < L.layer_split.size(); ++i) s += cat(i ? "/" : "", L.layer_split[i]);
  }
  if (!L.cpu_ranks && L.n_gpu_layers < n_layer) s += cat(", ", n_layer - L.n_gpu_layers, " layers on CPU");
  if (!L.cpu_ranks && L.n_experts_in_ram() > 0) s += cat(", experts of ", L.n_experts_in_ram(), " layers in RAM");
  return s;
}

std::string tps(double v) {
  std::ostringstream os;
  os.setf(std::ios::fixed);
  os.precision(v < 10 ? 2 : 1);
  os << v;
  return os.str();
}

void validate_request(const ModelDesc& m, const DeviceInventory& inv, const PlanRequest& req) {
  const ModelConfig& c = m.config;
  if (c.n_layer < 1 || c.n_embd < 1 || c.n_head < 1 || c.n_head_kv < 1 || c.head_dim < 1 || c.n_vocab < 1 ||
      c.n_ff < 1)
    fail("model '", m.source, "': hyper-parameters must be positive (n_layer ", c.n_layer, ", n_embd ", c.n_embd,
         ", n_head ", c.n_head, ", n_head_kv ", c.n_head_kv, ")");
  if (req.ctx < 1 || req.ctx > kMaxPlanCtx) fail("context (--ctx): ", req.ctx, " must be in [1, ", kMaxPlanCtx, "]");
  if (req.batch < 1 || req.batch > kMaxBatch) fail("batch (--batch): ", req.batch, " must be in [1, ", kMaxBatch, "]");
  if (req.max_num_seqs < 1 || req.max_num_seqs > kMaxNumSeqs)
    fail("sequences (--max-num-seqs): ", req.max_num_seqs, " must be in [1, ", kMaxNumSeqs, "]");
  check_kv_type(req.kv_type);
  const int n_gpu = static_cast<int>(inv.gpus.size());
  if (req.tp && *req.tp < 1) fail("tensor parallel size (--tp): ", *req.tp, " must be >= 1");
  if (req.pp && *req.pp < 1) fail("pipeline parallel size (--pp): ", *req.pp, " must be >= 1");
  if (req.pp && *req.pp > c.n_layer)
    fail("pipeline parallel size (--pp): ", *req.pp, " exceeds the model's ", c.n_layer, " layers");
  if (req.n_gpu_layers && *req.n_gpu_layers < 0)
    fail("GPU layers (-ngl): ", *req.n_gpu_layers, " must be >= 0");
  if (req.n_gpu_layers && *req.n_gpu_layers > 0 && n_gpu == 0)
    fail("GPU layers (-ngl): ", *req.n_gpu_layers, " asked for, but there is no GPU (give --gpus)");
  if (req.main_gpu < 0 || (n_gpu > 0 && req.main_gpu >= n_gpu))
    fail("main GPU (--main-gpu): ", req.main_gpu, " is outside [0, ", std::max(n_gpu, 1), ")");
  for (double x : req.layer_split)
    if (!std::isfinite(x) || x <= 0) fail("layer split (--layer-split): ", x, " must be a positive number");
  if (n_gpu > 0 && !(req.n_gpu_layers && *req.n_gpu_layers == 0)) {
    const int tp = req.tp.value_or(1), pp = req.pp.value_or(1);
    if (tp * pp > n_gpu)
      fail("--tp ", tp, " x --pp ", pp, " = ", tp * pp, " ranks exceed the ", n_gpu, " GPUs");
    if (req.split_mode == SplitMode::kLayer && req.tp && *req.tp != 1)
      fail("--split-mode layer means --tp 1, but --tp ", *req.tp, " was given");
    if (req.split_mode == SplitMode::kRow && req.pp && *req.pp != 1)
      fail("--split-mode row/tensor means --pp 1, but --pp ", *req.pp, " was given");
    if (!req.layer_split.empty()) {
      const size_t want = req.pp ? static_cast<size_t>(*req.pp)
                          : req.split_mode == SplitMode::kLayer ? static_cast<size_t>(n_gpu)
                                                                : req.layer_split.size();
      if (req.layer_split.size() != want)
        fail("layer split (--layer-split): ", req.layer_split.size(), " proportions for ", want, " pipeline stages");
    }
    if (req.n_gpu_layers && req.pp && std::min<int64_t>(*req.n_gpu_layers, c.n_layer) < *req.pp)
      fail("GPU layers (-ngl): ", *req.n_gpu_layers, " is fewer than the ", *req.pp, " pipeline stages");
  }
  if (req.tp) {
    try {
      rank_weights(m, *req.tp, req.expert_parallel);
    } catch (const Error& e) {
      fail("tensor parallel size (--tp) ", *req.tp, " cannot split this model: ", e.what());
    }
  }
}

}  // namespace

int Layout::n_experts_in_ram() const {
  return static_cast<int>(std::count(experts_in_ram.begin(), experts_in_ram.end(), true));
}

SplitMode parse_split_mode(std::string_view s) {
  std::string l;
  for (char ch : s) l += static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  if (l == "layer") return SplitMode::kLayer;
  if (l == "row" || l == "tensor") return SplitMode::kRow;
  if (l == "none") return SplitMode::kNone;
  fail("split mode (--split-mode): '", s, "' is unknown; use layer, row, tensor or none");
}

Plan make_plan(const ModelDesc& m, const DeviceInventory& inv, const PlanRequest& asked, const CostParams& params) {
  validate_request(m, inv, asked);
  const ModelConfig& c = m.config;
  const int n_layer = static_cast<int>(c.n_layer);
  Plan plan;
  plan.model = m.source;
  plan.n_params = m.n_params();
  plan.weight_bytes = m.weight_bytes();
  plan.ctx_train = c.n_ctx_train;
  plan.batch = asked.batch;
  plan.max_num_seqs = asked.max_num_seqs;
  plan.kv_type = asked.kv_type;
  plan.params = params;
  plan.notes = inv.notes;
  plan.machine = inv;
  const auto suggest = [&](std::string text, std::string kind, nlohmann::json change, const Candidate* cc) {
    Suggestion sg;
    sg.kind = std::move(kind);
    sg.change = std::move(change);
    if (cc) {
      sg.layout = cc->layout;
      sg.decode_tps = cc->decode_tps;
    }
    sg.text = text;
    plan.suggestions.push_back(std::move(text));
    plan.suggestion_details.push_back(std::move(sg));
  };

  Search search(m, inv, asked, params);
  // The request with the context it is planned at: --ctx max searches it (fit shrinks monotonically with
  // context, so the largest fitting one is found by bisection), capped by the trained context.
  PlanRequest req = asked;
  if (asked.ctx_max) {
    const int64_t cap = c.n_ctx_train > 0 ? std::min(c.n_ctx_train, kMaxPlanCtx) : kMaxPlanCtx;
    const auto fits_at = [&](int64_t x) {
      const auto r = search.run(x);
      return !r.empty() && r.front().fits;
    };
    if (fits_at(cap)) {
      req.ctx = cap;
      plan.ctx_is_max = true;
    } else if (fits_at(1)) {
      int64_t lo = 1, hi = cap - 1;
      while (lo < hi) {
        const int64_t mid = lo + (hi - lo + 1) / 2;
        if (fits_at(mid)) lo = mid;
        else hi = mid - 1;
      }
      req.ctx = lo;
      plan.ctx_is_max = true;
    } else {
      plan.notes.push_back(cat("--ctx max: nothing fits at any context; the closest miss is shown at context ",
                               req.ctx));
    }
  }
  plan.ctx = req.ctx;
  std::vector<Candidate> ranked = search.run(req.ctx);
  if (ranked.empty()) {
    if (inv.cpu.capacity_bytes == 0 && inv.gpus.empty())
      fail("no device to plan for: no GPU given (--gpus) and the CPU's RAM is unknown (give --cpu-mem)");
    fail("no layout matches the pinned options (--tp/--pp/--split-mode/--layer-split/-ngl) on ",
         inv.gpus.size(), " GPUs");
  }
  plan.chosen = ranked.front();
  plan.fits = plan.chosen.fits;
  for (const DevicePlan& d : plan.chosen.devices)
    plan.kv_pool_bytes = checked_add<uint64_t>(plan.kv_pool_bytes, d.kv_bytes, "KV pool bytes");

  // --explain: why each runner-up lost.
  for (size_t i = 0; i < ranked.size() && plan.ranked.size() < 8; ++i) {
    Candidate cand = ranked[i];
    const std::string name = layout_name(cand.layout, n_layer);
    if (i == 0) cand.verdict = cat(name, ": chosen", plan.fits ? "" : " (closest miss)");
    else if (!cand.fits) cand.verdict = cat(name, ": does not fit: ", cand.why);
    else cand.verdict = cat(name, ": fits but slower, ", tps(cand.decode_tps), " vs ", tps(plan.chosen.decode_tps), " tok/s");
    plan.ranked.push_back(cand);
  }
  for (int tp = 2; tp <= std::max<int>(2, static_cast<int>(inv.gpus.size())); ++tp)
    if (search.weights(tp) == nullptr) plan.notes.push_back(cat("tp ", tp, " not possible: ", search.bad_tp_reason(tp)));

  const Layout& L = plan.chosen.layout;
  if (plan.fits) {
    // Largest context for the chosen layout (fit shrinks monotonically with context).
    int64_t hi = std::max<int64_t>(c.n_ctx_train > 0 ? c.n_ctx_train : kMaxPlanCtx, req.ctx);
    int64_t lo = req.ctx;
    if (search.evaluate(L, hi).fits) lo = hi;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo + 1) / 2;
      if (search.evaluate(L, mid).fits) lo = mid;
      else hi = mid - 1;
    }
    plan.max_context = lo;
    // With every layer on the GPUs the chosen rate is the all-GPU rate (the offload cases below replace it).
    if (!L.cpu_ranks) plan.all_gpu_decode_tps = plan.chosen.decode_tps;
    if (!L.cpu_ranks && L.n_experts_in_ram() > 0) {
      Layout on_gpu = L;
      on_gpu.experts_in_ram.clear();
      const double gpu_tps = search.evaluate(on_gpu, req.ctx).decode_tps;
      plan.all_gpu_decode_tps = gpu_tps;
      plan.notes.push_back(cat("the experts of ", L.n_experts_in_ram(), " of ", n_layer,
                               " layers stay in RAM and run on the CPU (attention and the router on the GPU): predicted ",
                               tps(plan.chosen.decode_tps), " tok/s instead of ", tps(gpu_tps),
                               " tok/s with every expert on the GPUs"));
    }
    if (!L.cpu_ranks && L.n_gpu_layers < n_layer) {
      Layout all = L;
      all.n_gpu_layers = n_layer;
      all.experts_in_ram.clear();  // every layer and its experts on the GPUs
      all.layer_split.clear();
      for (const LayerRange& r : split_layers(n_layer, L.pp, {})) all.layer_split.push_back(r.size());
      plan.all_gpu_decode_tps = search.evaluate(all, req.ctx).decode_tps;
      plan.notes.push_back(cat(n_layer - L.n_gpu_layers, " of ", n_layer, " layers run on the CPU: predicted ",
                               tps(plan.chosen.decode_tps), " tok/s instead of ", tps(plan.all_gpu_decode_tps),
                               " tok/s with every layer on the GPUs (",
                               tps(plan.all_gpu_decode_tps / plan.chosen.decode_tps), "x slower)"));
    }
  } else {
    // The closest miss's own largest context (0 when its weights alone do not fit), then the largest that
    // fits with any layout, which may be another one: each is reported as what it is.
    {
      int64_t lo = 0, hi = req.ctx - 1;
      while (lo < hi) {
        const int64_t mid = lo + (hi - lo + 1) / 2;
        if (search.evaluate(L, mid).fits) lo = mid;
        else hi = mid - 1;
      }
      plan.max_context = lo;
    }
    int64_t lo = 0, hi = req.ctx - 1;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo + 1) / 2;
      const auto r = search.run(mid);
      if (!r.empty() && r.front().fits) lo = mid;
      else hi = mid - 1;
    }
    plan.max_context_any = lo;
    if (lo > 0) {
      const Candidate cc = search.run(lo).front();
      plan.max_context_any_layout = layout_name(cc.layout, n_layer);
      suggest(cat("a shorter context: --ctx ", lo, " fits (", plan.max_context_any_layout, ", ", tps(cc.decode_tps),
                  " tok/s)"),
              "ctx", {{"ctx", lo}}, &cc);
    }
    // One or more GPUs like the largest one.
    if (!inv.gpus.empty()) {
      const Device big = *std::max_element(inv.gpus.begin(), inv.gpus.end(), [](const Device& a, const Device& b) {
        return a.capacity_bytes < b.capacity_bytes;
      });
      PlanRequest free_req = req;
      free_req.tp.reset();
      free_req.pp.reset();
      free_req.layer_split.clear();
      free_req.split_mode.reset();
      free_req.n_gpu_layers.reset();
      for (int k = 1; k <= 8; ++k) {
        DeviceInventory more = inv;
        for (int i = 0; i < k; ++i) more.gpus.push_back(big);
        Search s2(m, more, free_req, params);
        const auto r = s2.run(req.ctx);
        if (!r.empty() && r.front().fits) {
          suggest(cat(k, " more ", big.name, " (", format_bytes(big.capacity_bytes), "): fits as ",
                      layout_name(r.front().layout, n_layer), ", ", tps(r.front().decode_tps), " tok/s"),
                  "more_gpus", {{"add_gpus", k}, {"gpu", big.name}, {"gpu_capacity_bytes", big.capacity_bytes}},
                  &r.front());
          break;
        }
      }
    }
    // A lower-bit quantization of the same model.
    for (const char* scheme : {"q8_0", "q6_k", "q4_k_m", "q4_0"}) {
      ModelDesc alt;
      try {
        alt = model_desc_from_config(c, scheme);
      } catch (const Error&) {
        continue;  // rows that this scheme cannot hold
      }
      if (alt.weight_bytes() >= plan.weight_bytes) continue;
      Search s2(alt, inv, req, params);
      const auto r = s2.run(req.ctx);
      if (!r.empty() && r.front().fits) {
        suggest(cat("a lower-bit quantization: ", scheme, " (", format_bytes(alt.weight_bytes()), ") fits as ",
                    layout_name(r.front().layout, n_layer), ", ", tps(r.front().decode_tps), " tok/s"),
                "quant", {{"quant", scheme}, {"weight_bytes", alt.weight_bytes()}}, &r.front());
        break;
      }
    }
    // CPU offload with enough RAM.
    if (!inv.gpus.empty()) {
      DeviceInventory big_ram = inv;
      big_ram.cpu.capacity_bytes = uint64_t{1} << 50;
      PlanRequest r2 = req;
      r2.n_gpu_layers.reset();
      Search s2(m, big_ram, r2, params);
      const auto r = s2.run(req.ctx);
      if (!r.empty() && r.front().fits) {
        const Candidate& cc = r.front();
        uint64_t cpu_need = 0;
        for (const DevicePlan& d : cc.devices)
          if (d.kind == PlanDeviceKind::kCpu) cpu_need += d.total_bytes;
        const uint64_t ram = cpu_need + std::max(params.cpu_reserve_min_bytes,
                                                 static_cast<uint64_t>(static_cast<double>(cpu_need) * params.cpu_reserve_fraction / (1 - params.cpu_reserve_fraction)));
        if (cpu_need > 0 && ram <= inv.cpu.capacity_bytes)  // only the pinned -ngl kept it off the CPU
          suggest(cat("CPU offload with the RAM you have: -ngl ", cc.layout.n_gpu_layers, " (",
                      layout_name(cc.layout, n_layer), "), predicted ", tps(cc.decode_tps), " tok/s"),
                  "cpu_offload", {{"n_gpu_layers", cc.layout.n_gpu_layers}, {"cpu_mem_bytes", inv.cpu.capacity_bytes}},
                  &cc);
        else if (cpu_need > 0)
          suggest(cat("CPU offload with about ", format_bytes(ram), " of RAM (--cpu-mem; have ",
                      format_bytes(inv.cpu.capacity_bytes), "): ", layout_name(cc.layout, n_layer), ", predicted ",
                      tps(cc.decode_tps), " tok/s"),
                  "cpu_offload", {{"n_gpu_layers", cc.layout.n_gpu_layers}, {"cpu_mem_bytes", ram}}, &cc);
      }
    }
    if (plan.suggestions.empty())
      suggest("no single change found; the model needs more memory", "none", nlohmann::json::object(), nullptr);
  }
  if (c.n_ctx_train > 0 && req.ctx > c.n_ctx_train)
    plan.notes.push_back(cat("context ", req.ctx, " exceeds the model's trained context ", c.n_ctx_train));
  if (!inv.gpus.empty() && (req.kv_type == GgmlType::Q8_0 || req.kv_type == GgmlType::Q4_0))
    plan.notes.push_back(cat("the cuda backend does not run ", type_name(req.kv_type),
                             " caches yet (the cpu backend does): this is what they will need; use --kv-type f16 on GPUs "
                             "today"));
  return plan;
}

}  // namespace shardlm
