// The planner: which layout (tensor parallel size, pipeline stages, layers per stage, layers left on the
// CPU) runs a model on a machine, whether it fits, and how fast it should decode. docs/planner.md states
// the cost model and its assumptions. Pure: it reads a ModelDesc and a DeviceInventory, touches nothing.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/dtype.h"
#include "plan/cost_model.h"
#include "plan/devices.h"

namespace shardlm {

// llama.cpp's -sm: layer = pipeline stages over the GPUs (tp 1), row/tensor = tensor parallel over the
// GPUs (pp 1), none = one GPU (--main-gpu).
enum class SplitMode { kNone, kLayer, kRow };
SplitMode parse_split_mode(std::string_view s);  // throws Error naming --split-mode

// What the user asked for; unset fields are searched.
struct PlanRequest {
  int64_t ctx = 4096;     // tokens of context the KV cache must hold (--ctx / --max-model-len)
  // --ctx max: plan at the largest context some layout (within the pinned options) fits, capped by the
  // model's trained context (kMaxPlanCtx when the model does not say); `ctx` is then only the fallback
  // reported when nothing fits at any context.
  bool ctx_max = false;
  int64_t batch = 512;    // tokens per forward pass (prefill micro-batch) for the workspace
  // Sequences decoding together (--max-num-seqs): the engine's paged KV pool holds max_num_seqs x ctx
  // positions, and the fit decision counts all of them. 1 = the batch-1 plan.
  int64_t max_num_seqs = 1;
  GgmlType kv_type = GgmlType::F16;
  std::optional<int> tp;
  std::optional<int> pp;
  std::vector<double> layer_split;  // proportions per pipeline stage (-ts); empty = by free memory
  std::optional<int> n_gpu_layers;  // -ngl; values above n_layer mean all (llama.cpp's -ngl 99)
  std::optional<SplitMode> split_mode;
  int main_gpu = 0;
  bool expert_parallel = false;  // --enable-expert-parallel: experts partitioned whole over each stage's tp ranks
  // Mixture of experts on GPUs: the first n layers' experts in RAM (--n-cpu-moe; --cpu-moe = all) and
  // llama.cpp's -ot PATTERN=DEVICE values (plan/expert_offload.h). Unset and no overrides: the planner
  // keeps experts in RAM, the first layers' first, when that is what lets the model fit.
  std::optional<int> n_cpu_moe;
  std::vector<std::string> tensor_overrides;
};

// The constants of the cost model, stated once so that reports can print them.
struct CostParams {
  // GPU decode: weights read at this share of the datasheet bandwidth, plus a fixed time per layer (its
  // ~8 kernels' launch, ramp and tail beyond their bytes). Fitted on H100 SXMs to llama-3.1-8b bf16 and 70b
  // q4_0 on one to four GPUs, and lowered each time the decode kernels shortened a layer, last after the
  // greedy tokens stayed on the device and the decode attention took 4 blocks per KV head
  // (docs/planner.md, Calibration).
  double gpu_bandwidth_efficiency = 0.90;
  double gpu_layer_overhead_s = 16e-6;
  double cpu_bandwidth_efficiency = 0.80;  // share of the configured CPU bandwidth (plain f32/f16/bf16 weights)
  // Block types are decoded in registers and the CPU kernels are bound by that work, not by memory: the
  // decode's share of the copy roofline falls from f16's ~80% to about half for q8_0 and less for the 4-bit
  // types (docs/planner.md, Calibration). Applied to the CPU's weight reads by the type of the model's FFN
  // matrices.
  double cpu_q8_efficiency = 0.55;
  double cpu_q4_efficiency = 0.42;  // q4_0, q4_K, q6_K
  // The other block types, as a share of cpu_q4_efficiency: one AVX2 thread's decode throughput of a 4096 x
  // 4096 weight relative to q4_K's. The 4-5 bit types decode as fast as q4_K or faster (counted as it); below
  // 4 bits the decoding costs more per weight (docs/planner.md, Calibration).
  double cpu_q3_factor = 0.68;  // q3_K
  double cpu_q2_factor = 0.50;  // q2_K, iq3_*, iq2_*
  double cpu_q1_factor = 0.30;  // iq1_s, iq1_m
  // GPU decode of the types without packed kernels (all but f32/f16/bf16/q8_0/q4_0/q4_K/q6_K): the generic
  // group kernel, as a share of gpu_bandwidth_efficiency, fitted to the decode of llama-3.1-8b from gen-model
  // on one H100 with the per-layer overhead kept: these types reach a fifth to a third of the packed kernels'
  // share of the bandwidth (docs/planner.md, Calibration).
  double gpu_generic_factor = 0.29;      // q5_K, q5_0/1, q4_1, iq4_nl, mxfp4
  double gpu_generic_mid_factor = 0.25;  // iq4_xs, q3_K
  double gpu_generic_low_factor = 0.20;  // q2_K and the IQ3/IQ2/IQ1 types
  // Prefill (512-token steps): share of the dense matmul rate for 16-bit weights and for block types
  // (dequantized to 16 bits before each GEMM) at 4096 or more rows per GPU; narrower tensor-parallel
  // shards run smaller GEMMs and the share scales by (rows / 4096)^0.65. Fitted on H100s to 8b and 70b
  // prefill on one to four GPUs (docs/planner.md, Calibration).
  double matmul_efficiency = 0.33;
  double quant_matmul_efficiency = 0.22;
  double cpu_matmul_efficiency = 0.50;  // CPU ranks and offloaded layers
  // Experts in RAM beside a GPU (--cpu-moe): per such layer and token, the activations' round trip (the
  // normed hidden state down, the weighted sum up, each a synchronized copy) and waking the CPU's threads.
  // An estimate, not yet fitted on hardware.
  double cpu_moe_layer_overhead_s = 40e-6;
  uint64_t gpu_reserve_bytes = 768ull << 20;  // CUDA context, cuBLAS workspace, allocator slack
  // Plus, per NCCL communicator a GPU rank joins (its tensor-parallel group, each pipeline neighbour):
  // NCCL's buffers and the one-shot all-reduce's. Multi-GPU ranks use 1-2 GiB beyond their allocations
  // where one GPU stays within gpu_reserve_bytes (docs/planner.md, Calibration).
  uint64_t gpu_comm_reserve_bytes = 600ull << 20;
  double cpu_reserve_fraction = 0.10;         // RAM kept for the OS and other programs ...
  uint64_t cpu_reserve_min_bytes = 2ull << 30;  // ... at least this much
};

struct DevicePlan {
  std::string name;
  PlanDeviceKind kind = PlanDeviceKind::kGpu;
  int rank = -1;     // MPI/NCCL rank (rank = pp_rank * tp + tp_rank); -1 for the offload CPU
  int tp_rank = 0;
  int pp_rank = 0;
  uint64_t capacity_bytes = 0;
  uint64_t reserve_bytes = 0;    // beyond total_bytes: the fixed and per-communicator reserve, and alloc_pad_bytes
  uint64_t alloc_pad_bytes = 0;  // GPU: what whole-page allocations add to the weight shards (gpu_alloc_bytes)
  uint64_t weight_bytes = 0;
  uint64_t kv_bytes = 0;         // the KV pool: max_num_seqs x ctx positions of this device's layers
  uint64_t kv_seq_bytes = 0;     // one sequence of ctx positions (kv_bytes / max_num_seqs)
  uint64_t workspace_bytes = 0;
  uint64_t total_bytes = 0;  // weights + KV + workspace (the reserve is not included)
  int first_layer = -1;      // inclusive; -1 when the device holds no layer
  int last_layer = -1;
  bool has_token_embd = false;
  bool has_output = false;
  bool fits = false;         // total + reserve <= capacity
  double decode_read_bytes = 0;  // bytes read per decoded token
};

struct Layout {
  int tp = 1;
  int pp = 1;
  std::vector<int> layer_split;  // layers per pipeline stage (on the ranks)
  int n_gpu_layers = 0;          // layers on GPUs; the first n_layer - n_gpu_layers run on the CPU
  bool cpu_ranks = false;        // the ranks are CPU processes (no GPU used)
  // (n_layer) layers whose experts stay in RAM and run on the CPU beside GPU layers; empty: none.
  std::vector<bool> experts_in_ram;
  int n_experts_in_ram() const;  // layers with experts in RAM
};

struct Candidate {
  Layout layout;
  std::vector<DevicePlan> devices;  // ranks in rank order, then the offload CPU if any
  bool fits = false;
  std::string why;                  // first device that does not fit, or why the layout is invalid
  double decode_tps = 0;            // predicted batch-1 decode tokens/s at the requested context
  double prefill_tps = 0;
  // With max_num_seqs sequences decoding together, each at the full context: a step reads the weights
  // once and every sequence's KV, plus the fixed per-layer time once; aggregate = N / step time.
  double aggregate_decode_tps = 0;
  // Sequences of ctx positions that fit in what each device has left after weights, workspace and
  // reserve (the smallest over devices holding layers); 0 when not even one does.
  int64_t seqs_that_fit = 0;
  std::string verdict;              // filled for --explain: chosen / why it lost
};

// A suggestion of plan_to_text's "smallest changes that would fit", in a form scripts can act on.
struct Suggestion {
  std::string kind;       // "ctx", "more_gpus", "quant", "cpu_offload" or "none"
  nlohmann::json change;  // what to change: {"ctx": N}, {"add_gpus": k, "gpu": name}, {"quant": "q4_0"},
                          // {"n_gpu_layers": n, "cpu_mem_bytes": b}; {} for "none"
  Layout layout;          // the layout that then fits (tp, pp, n_gpu_layers)
  double decode_tps = 0;  // its predicted batch-1 decode rate
  std::string text;       // the same sentence as in Plan::suggestions
};

struct Plan {
  std::string model;
  int64_t n_params = 0;
  uint64_t weight_bytes = 0;
  int64_t ctx = 0;
  bool ctx_is_max = false;       // ctx was chosen by --ctx max
  int64_t ctx_train = 0;         // the model's trained context (0 = unknown)
  int64_t batch = 0;
  int64_t max_num_seqs = 1;
  uint64_t kv_pool_bytes = 0;    // KV over all devices of the chosen layout: max_num_seqs x ctx positions
  GgmlType kv_type = GgmlType::F16;
  bool fits = false;
  Candidate chosen;              // the best fitting layout, or the closest miss when nothing fits
  int64_t max_context = 0;       // largest context the chosen layout holds for max_num_seqs sequences (0 when none)
  // When nothing fits: the largest context that fits with any layout (0 when none) and that layout's name;
  // the chosen (closest-miss) layout's own figure is max_context.
  int64_t max_context_any = 0;
  std::string max_context_any_layout;
  // The rate with every layer (and expert) on the GPUs: the chosen rate when they all are; with CPU offload
  // the rate if those layers were on the GPUs too; 0 for CPU ranks (JSON null).
  double all_gpu_decode_tps = 0;
  std::vector<Candidate> ranked;     // best first, for --explain
  std::vector<std::string> suggestions;  // when nothing fits: the smallest changes that would
  std::vector<Suggestion> suggestion_details;  // the same, machine-readable (JSON "suggestion_changes")
  DeviceInventory machine;               // the devices, link and CPU figures planned for, with their sources
  std::vector<std::string> notes;        // assumptions and warnings
  CostParams params;
};

// Throws Error for requests that contradict each other or the machine (tp*pp above the GPU count, a
// pinned tp that cannot split the heads, layer_split of the wrong length, bad ctx/batch ...).
Plan make_plan(const ModelDesc& m, const DeviceInventory& inv, const PlanRequest& req,
               const CostParams& params = {});

// The largest context a plan accepts (--ctx / --max-model-len).
constexpr int64_t kMaxPlanCtx = int64_t{1} << 24;

nlohmann::json plan_to_json(const Plan& p);
std::string plan_to_text(const Plan& p, bool explain);

}  // namespace shardlm
