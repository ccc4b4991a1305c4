// The machine the planner plans for: GPUs (given on the command line or reported by a detection hook
// the CUDA backend fills), the host CPU and the link between devices. Datasheet tables, parsers for the
// user's strings, no hardware access except reading /proc/meminfo.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/dtype.h"

namespace shardlm {

// Named apart from ops/backend.h's DeviceKind (where a backend runs) so both headers can meet in one file.
enum class PlanDeviceKind { kGpu, kCpu };

// The CPU kernels of one of the model's weight types, timed on this machine by the command that plans (plan,
// bench): they, not the copy bandwidth, bound a CPU's decode when decoding the blocks costs more than
// reading them (docs/planner.md, "CPU kernels timed here").
struct CpuKernelRate {
  GgmlType type = GgmlType::F32;
  double decode_bytes_per_s = 0;  // weight bytes read per second, one token, every thread; > 0
  double prefill_flops = 0;       // FLOP/s of a 64-token matmul, every thread; > 0
  int threads = 1;                // the threads they ran on
};
// "q4_0 decode 9.4 GB/s, prefill 106.6 GFLOP/s", for reports.
std::string describe(const CpuKernelRate& k);

struct Device {
  PlanDeviceKind kind = PlanDeviceKind::kGpu;
  std::string name;             // "RTX 3090", "GPU (24 GiB)", "CPU"
  uint64_t capacity_bytes = 0;  // total memory
  double bandwidth = 0;         // memory bandwidth, bytes/s (datasheet or configured)
  double matmul_flops = 0;      // dense FP16 (GPU) / FP32 (CPU) matmul rate, FLOP/s
  std::string default_link = "pcie4";  // how such cards are usually connected (SXM: nvlink)
  // Where bandwidth and matmul_flops came from: "datasheet", "assumed (...)", "--gpu-bandwidth" ...
  std::string bandwidth_source = "datasheet";
  std::string flops_source = "datasheet";
  // CPU only: the kernels of the model's weight types timed on this machine (CpuKernelRate, this device's
  // share of the threads); empty = not measured, and the planner models the CPU from bandwidth and its
  // per-type efficiency constants instead.
  std::vector<CpuKernelRate> kernels;
};


// Datasheet figures. Memory is the total nvidia-smi reports (MiB), bandwidth and dense FP16 tensor rate
// are NVIDIA's published numbers.
struct GpuSpec {
  const char* key;         // canonical spelling for --gpus, e.g. "rtx3090", "a100-80g", "h100-sxm"
  const char* name;        // "NVIDIA RTX 3090"
  uint64_t mem_mib;
  double bandwidth_gbs;    // GB/s (1e9)
  double fp16_tflops;      // dense
  const char* default_link;  // "nvlink" for SXM parts, "pcie4"/"pcie5" otherwise
};
const std::vector<GpuSpec>& gpu_table();
// Named CPUs for --cpu: physical cores and the datasheet peak memory bandwidth of the memory the vendor
// lists (channels x MT/s x 8 bytes).
struct CpuSpec {
  const char* key;        // "ryzen-7950x"
  const char* name;       // "AMD Ryzen 9 7950X (2 x DDR5-5200)"
  int cores;
  double bandwidth_gbs;   // GB/s (1e9)
};
const std::vector<CpuSpec>& cpu_table();
const CpuSpec* find_cpu(std::string_view name);  // nullptr if unknown
std::string cpu_names();
// "80", "80GB/s", "80 GB/s" -> 80 (GB/s, 1e9 bytes/s). Throws Error naming `field`, the value and the limit.
double parse_bandwidth_gbs(std::string_view s, std::string_view field);
// Accepts the key or an alias ("3090", "rtx-3090", "h100", "H100 SXM"); nullptr if unknown.
const GpuSpec* find_gpu(std::string_view name);
std::string gpu_names();

// Link between devices of one stage (all-reduce) and between stages (activations). Latency is the
// time of one small all-reduce / send as NCCL or MPI achieve it, not the wire latency.
struct LinkSpec {
  std::string name;
  double latency_s = 0;
  double bandwidth = 0;  // bytes/s, one direction
  bool peer_to_peer = true;  // GPUs reach each other directly; false: through host memory (or not GPUs)
};
const std::vector<LinkSpec>& link_table();
const LinkSpec& find_link(std::string_view name);  // throws Error naming --link and the known links

// "24G", "24GB", "24GiB", "512M", "1.5T", "64g" -> bytes. Every unit is binary (G = GB = GiB: 24GB is the
// 24 GiB card people mean). A unit is required. Throws
// Error naming `field`, the value and what is accepted.
uint64_t parse_size(std::string_view s, std::string_view field);
std::string format_bytes(uint64_t bytes);  // "23.41 GiB"

// --gpus: a comma-separated list of sizes ("24G,24G"), GPU names ("rtx3090,rtx4090") or either with a
// count ("rtx3090x2", "h100x4", "24Gx2"). Throws Error naming the item.
std::vector<Device> parse_gpus(std::string_view s);

struct CpuInfo {
  int cores = 1;
  uint64_t mem_bytes = 0;
  double bandwidth = 0;  // bytes/s
  std::string note;      // where the figures came from
};
// Default CPU memory bandwidth when neither measured nor configured: 20 GB/s, what two DDR4 channels
// deliver in practice to one socket's threads (a conservative figure; --cpu-bandwidth overrides it).
constexpr double kDefaultCpuBandwidth = 20e9;
// Sustained FP32 matmul rate per core assumed for prefill on the CPU (AVX2 FMA at ~3 GHz, ~30% of peak).
constexpr double kCpuFlopsPerCore = 30e9;
// Cores of another machine's CPU when neither --cpu nor --cpu-cores says: a common desktop part.
constexpr int kAssumedCpuCores = 8;

// MemTotal from the text of /proc/meminfo, in bytes; throws Error when the line is missing or malformed.
uint64_t parse_meminfo(std::string_view text);
// Cores (std::thread::hardware_concurrency) and /proc/meminfo of this machine; bandwidth = default.
CpuInfo detect_cpu();

// Hook for the CUDA backend: returns the GPUs it sees (capacity and, if measured, bandwidth). Empty
// function = no GPU detection (CPU-only build).
using GpuDetector = std::function<std::vector<Device>()>;

struct DeviceInventory {
  std::vector<Device> gpus;
  Device cpu;       // kind kCpu; capacity = RAM
  int cpu_cores = 1;
  LinkSpec link;    // between GPUs (or CPU ranks: shared memory)
  LinkSpec host_link;  // between the CPU and the GPUs (PCIe) for offloaded layers
  std::vector<std::string> notes;
  // Where each figure came from, for the report: "measured here", "/proc/meminfo", "--cpu-cores",
  // "--cpu ryzen-7950x (datasheet)", "assumed" ...
  std::string cpu_cores_source, cpu_mem_source, cpu_bandwidth_source;
  std::string link_source;  // "--link" or "default for <card>"
};

// What the user said about the machine; unset fields are detected.
struct DeviceRequest {
  std::optional<std::string> gpus;          // --gpus
  std::optional<std::string> cpu_mem;       // --cpu-mem
  std::optional<double> cpu_bandwidth_gbs;  // --cpu-bandwidth (GB/s)
  bool cpu_bandwidth_measured = false;      // cpu_bandwidth_gbs was measured on this machine, not given
  std::optional<std::string> link;          // --link
  std::optional<int> cpu_cores;             // --cpu-cores; detected otherwise
  std::optional<std::string> cpu;           // --cpu PRESET: cores and bandwidth unless given
  std::optional<double> gpu_bandwidth_gbs;  // --gpu-bandwidth: every GPU's, replacing the datasheet's
  std::optional<double> gpu_tflops;         // --gpu-tflops: every GPU's dense FP16 rate
  std::vector<CpuKernelRate> cpu_kernels;   // timed here, per weight type (only when the CPU is this machine's)
  // False when planning for another machine (`plan --cpu-mem` without --cpu): its cores are not this
  // machine's, so kAssumedCpuCores stands in (and is reported as assumed) unless --cpu-cores is given.
  bool cpu_is_this_machine = true;
};
// Builds the inventory: given GPUs, else the detector's, else none (CPU only). CPU cores and bandwidth:
// given, else the --cpu preset's, else detected (cores) / the default (bandwidth); RAM given or detected.
// Default link: the first GPU's (nvlink for SXM parts, PCIe without peer-to-peer for GeForce cards).
// Throws Error naming the flag for unknown names and values out of range.
DeviceInventory make_inventory(const DeviceRequest& req, const GpuDetector& detect = nullptr);

}  // namespace shardlm
