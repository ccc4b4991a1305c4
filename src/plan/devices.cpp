#include "plan/devices.h"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <fstream>
#include <sstream>
#include <thread>

#include "core/error.h"

namespace shardlm {
namespace {

// A size-only GPU ("--gpus 24G") gets an RTX 3090-class bandwidth and matmul rate; the report says so.
constexpr double kDefaultGpuBandwidth = 936e9;
constexpr double kDefaultGpuFlops = 71e12;
constexpr int kMaxGpus = 64;

std::string normalize(std::string_view s) {
  std::string r;
  for (char ch : s)
    if (ch != '-' && ch != '_' && ch != ' ') r += static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  for (const char* prefix : {"nvidia", "geforce"})
    if (r.rfind(prefix, 0) == 0) r.erase(0, std::string_view(prefix).size());
  return r;
}

std::string trim(std::string_view s) {
  size_t b = 0, e = s.size();
  while (b < e && std::isspace(static_cast<unsigned char>(s[b]))) ++b;
  while (e > b && std::isspace(static_cast<unsigned char>(s[e - 1]))) --e;
  return std::string(s.substr(b, e - b));
}

struct Alias {
  const char* alias;  // normalized spelling
  const char* key;
};
constexpr Alias kAliases[] = {
    {"3090", "rtx3090"},      {"4090", "rtx4090"},       {"5090", "rtx5090"},
    {"a10040", "a100-40g"},   {"a10040gb", "a100-40g"},  {"a10080", "a100-80g"},
    {"a10080gb", "a100-80g"}, {"h100", "h100-sxm"},      {"h100pcie", "h100-pcie"},
    {"h100sxm", "h100-sxm"},  {"h100sxm5", "h100-sxm"},  {"h200sxm", "h200"},
    {"3060", "rtx3060"},      {"rtx306012g", "rtx3060"}, {"rtx306012gb", "rtx3060"},
    {"3070", "rtx3070"},      {"3080", "rtx3080"},       {"4060ti", "rtx4060ti"},
    {"rtx4060ti16g", "rtx4060ti"}, {"rtx4060ti16gb", "rtx4060ti"}, {"4070", "rtx4070"},
    {"4070ti", "rtx4070ti"},  {"4080", "rtx4080"},       {"5070ti", "rtx5070ti"},
    {"5080", "rtx5080"},      {"rtx4060mobile", "rtx4060-laptop"}, {"rtx4070mobile", "rtx4070-laptop"},
    {"rtx4090mobile", "rtx4090-laptop"}, {"b200sxm", "b200"}, {"instinctmi300x", "mi300x"},
};

Device device_from_spec(const GpuSpec& g) {
  Device d;
  d.kind = PlanDeviceKind::kGpu;
  d.name = g.name;
  d.capacity_bytes = g.mem_mib << 20;
  d.bandwidth = g.bandwidth_gbs * 1e9;
  d.matmul_flops = g.fp16_tflops * 1e12;
  d.default_link = g.default_link;
  return d;
}

// Parses a size without throwing; nullopt when `s` is not one.
std::optional<uint64_t> try_size(std::string_view s, std::string* why) {
  const std::string t = trim(s);
  size_t i = 0;
  while (i < t.size() && (std::isdigit(static_cast<unsigned char>(t[i])) || t[i] == '.')) ++i;
  if (i == 0) {
    *why = "it does not start with a number";
    return std::nullopt;
  }
  double v = 0;
  {
    std::istringstream is(t.substr(0, i));
    is >> v;
    if (!is || !is.eof()) {
      *why = "the number is malformed";
      return std::nullopt;
    }
  }
  std::string unit;
  for (char ch : t.substr(i)) unit += static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  // Every spelling is binary: "24GB" is what people write for a 24 GiB card (nvidia-smi's 24576 MiB), and
  // one meaning for G, GB and GiB keeps "--gpus 24GB" and "--gpus 24G" the same machine.
  double mul = 0;
  if (!unit.empty() && unit.size() <= 3 && (unit.size() == 1 || unit.substr(1) == "b" || unit.substr(1) == "ib")) {
    if (unit[0] == 'k') mul = 1024.0;
    else if (unit[0] == 'm') mul = 1024.0 * 1024;
    else if (unit[0] == 'g') mul = 1024.0 * 1024 * 1024;
    else if (unit[0] == 't') mul = 1024.0 * 1024 * 1024 * 1024;
  }
  if (mul == 0) {
    *why = unit.empty() ? "a unit is missing (K, M, G or T, also KB/KiB ...; binary, e.g. 24G = 24GB = 24GiB)"
                        : cat("unit '", t.substr(i), "' is not one of K, M, G, T, KB, MB, GB, TB, KiB, MiB, GiB, TiB ",
                              "(all binary: G = GB = GiB)");
    return std::nullopt;
  }
  const double bytes = v * mul;
  if (!(bytes >= 1.0) || bytes > std::ldexp(1.0, 52)) {
    *why = "it must be between 1 byte and 4 PiB";
    return std::nullopt;
  }
  return static_cast<uint64_t>(std::llround(bytes));
}

}  // namespace

const std::vector<GpuSpec>& gpu_table() {
  // Datasheet figures (docs/planner.md lists the sources). FP16 rate: dense tensor-core FP16 with FP32
  // accumulation (what cuBLAS's FP16 GEMMs use); GeForce cards run that at half their FP16-accumulate rate.
  // Memory: nvidia-smi's MiB where known, else 1024 x the GB on the box. Link: GeForce cards have no
  // peer-to-peer over PCIe (NVIDIA disables it), so their all-reduce goes through host memory (*-nop2p).
  static const std::vector<GpuSpec> kTable = {
      {"rtx3060", "NVIDIA RTX 3060 12GB", 12288, 360, 25.5, "pcie4-nop2p"},
      {"rtx3070", "NVIDIA RTX 3070", 8192, 448, 40.6, "pcie4-nop2p"},
      {"rtx3080", "NVIDIA RTX 3080 10GB", 10240, 760, 59.5, "pcie4-nop2p"},
      {"rtx3090", "NVIDIA RTX 3090", 24576, 936, 71, "pcie4-nop2p"},
      {"rtx4060ti", "NVIDIA RTX 4060 Ti 16GB", 16384, 288, 44.1, "pcie4-nop2p"},
      {"rtx4070", "NVIDIA RTX 4070", 12288, 504, 58.3, "pcie4-nop2p"},
      {"rtx4070ti", "NVIDIA RTX 4070 Ti", 12288, 504, 80.2, "pcie4-nop2p"},
      {"rtx4080", "NVIDIA RTX 4080", 16384, 716.8, 97.5, "pcie4-nop2p"},
      {"rtx4090", "NVIDIA RTX 4090", 24564, 1008, 165.2, "pcie4-nop2p"},
      {"rtx5070ti", "NVIDIA RTX 5070 Ti", 16384, 896, 87.9, "pcie5-nop2p"},
      {"rtx5080", "NVIDIA RTX 5080", 16384, 960, 112.6, "pcie5-nop2p"},
      {"rtx5090", "NVIDIA RTX 5090", 32607, 1792, 209.5, "pcie5-nop2p"},
      {"rtx4060-laptop", "NVIDIA RTX 4060 Laptop", 8192, 256, 29.1, "pcie4-nop2p"},
      {"rtx4070-laptop", "NVIDIA RTX 4070 Laptop", 8192, 256, 40.1, "pcie4-nop2p"},
      {"rtx4090-laptop", "NVIDIA RTX 4090 Laptop", 16384, 576, 79.4, "pcie4-nop2p"},
      {"a10", "NVIDIA A10", 24576, 600, 125, "pcie4"},
      {"l4", "NVIDIA L4", 24576, 300, 121, "pcie4"},
      {"l40s", "NVIDIA L40S", 46068, 864, 362, "pcie4"},
      {"a100-40g", "NVIDIA A100 40GB SXM", 40960, 1555, 312, "nvlink"},
      {"a100-80g", "NVIDIA A100 80GB SXM", 81920, 2039, 312, "nvlink"},
      {"h100-pcie", "NVIDIA H100 PCIe", 81559, 2000, 756, "pcie5"},
      {"h100-sxm", "NVIDIA H100 SXM", 81559, 3350, 989, "nvlink"},
      {"h200", "NVIDIA H200 SXM", 143771, 4800, 989, "nvlink"},
      {"b200", "NVIDIA B200", 184320, 8000, 2250, "nvlink"},
      // Infinity Fabric between MI300X's of one node is modelled as nvlink (not measured).
      {"mi300x", "AMD Instinct MI300X", 196608, 5300, 1307.4, "nvlink"},
  };
  return kTable;
}

const std::vector<CpuSpec>& cpu_table() {
  // Cores: physical cores (the prefill rate is per core). Bandwidth: the datasheet peak of the memory the
  // vendor lists, channels x MT/s x 8 bytes; a measured copy reaches less (docs/planner.md).
  static const std::vector<CpuSpec> kTable = {
      {"ryzen-5800x", "AMD Ryzen 7 5800X (2 x DDR4-3200)", 8, 51.2},
      {"ryzen-5950x", "AMD Ryzen 9 5950X (2 x DDR4-3200)", 16, 51.2},
      {"ryzen-7950x", "AMD Ryzen 9 7950X (2 x DDR5-5200)", 16, 83.2},
      {"ryzen-9950x", "AMD Ryzen 9 9950X (2 x DDR5-5600)", 16, 89.6},
      {"i9-13900k", "Intel Core i9-13900K (2 x DDR5-5600)", 24, 89.6},
      {"i9-14900k", "Intel Core i9-14900K (2 x DDR5-5600)", 24, 89.6},
      {"threadripper-7980x", "AMD Threadripper 7980X (4 x DDR5-5200)", 64, 166.4},
      {"epyc-7763", "AMD EPYC 7763 (8 x DDR4-3200)", 64, 204.8},
      {"epyc-9654", "AMD EPYC 9654 (12 x DDR5-4800)", 96, 460.8},
      {"xeon-8480", "Intel Xeon Platinum 8480+ (8 x DDR5-4800)", 56, 307.2},
  };
  return kTable;
}

const CpuSpec* find_cpu(std::string_view name) {
  const std::string n = normalize(name);
  for (const CpuSpec& c : cpu_table())
    if (!n.empty() && normalize(c.key) == n) return &c;
  return nullptr;
}

std::string cpu_names() {
  std::string s;
  for (const CpuSpec& c : cpu_table()) s += (s.empty() ? "" : ", ") + std::string(c.key);
  return s;
}

double parse_bandwidth_gbs(std::string_view s, std::string_view field) {
  const std::string t = trim(s);
  size_t i = 0;
  while (i < t.size() && (std::isdigit(static_cast<unsigned char>(t[i])) || t[i] == '.')) ++i;
  std::string unit;
  for (char ch : t.substr(i))
    if (ch != ' ') unit += static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  double v = 0;
  std::istringstream is(t.substr(0, i));
  const bool number = i > 0 && (is >> v) && is.eof();
  // GB/s as datasheets print it (1e9 bytes a second); a bare number means the same.
  if (!number || !(unit.empty() || unit == "gb/s" || unit == "gbps" || unit == "gbs"))
    fail(field, ": '", s, "' is not a bandwidth; give GB/s as a number or with its unit (80, 80GB/s)");
  if (!(v > 0 && v < 1e5)) fail(field, ": ", t, " must be above 0 and below 100000 GB/s");
  return v;
}

const GpuSpec* find_gpu(std::string_view name) {
  const std::string n = normalize(name);
  if (n.empty()) return nullptr;
  std::string key = n;
  for (const Alias& a : kAliases)
    if (n == a.alias) key = normalize(a.key);
  for (const GpuSpec& g : gpu_table())
    if (normalize(g.key) == key) return &g;
  return nullptr;
}

std::string gpu_names() {
  std::string s;
  for (const GpuSpec& g : gpu_table()) s += (s.empty() ? "" : ", ") + std::string(g.key);
  return s;
}

const std::vector<LinkSpec>& link_table() {
  // Small-message all-reduce latencies of the order NCCL/MPI reach on each link, and one-direction
  // bandwidth in practice (not the wire rate).
  static const std::vector<LinkSpec> kLinks = {
      // nvlink: the fused one-shot all-reduce inside a decode step on H100s, its matvecs pushing the shares,
      // takes a few us after its wait; at this latency the planner's tensor-parallel figures fit the
      // measurements (docs/planner.md, Calibration).
      {"nvlink", 4e-6, 300e9, true},
      {"pcie5", 15e-6, 40e9, true},
      {"pcie4", 20e-6, 20e9, true},
      // Cards without peer-to-peer (GeForce 30/40/50 over PCIe): NCCL stages each all-reduce through pinned
      // host memory, two PCIe crossings and a host synchronisation per step, so twice the latency and half
      // the bandwidth of the peer-to-peer link. An estimate, not measured here.
      {"pcie5-nop2p", 30e-6, 20e9, false},
      {"pcie4-nop2p", 40e-6, 10e9, false},
      {"ethernet", 60e-6, 1.25e9, false},  // 10 GbE between hosts
      {"shm", 4e-6, 10e9, false},          // MPI shared memory between CPU ranks of one host
  };
  return kLinks;
}

const LinkSpec& find_link(std::string_view name) {
  const std::string n = normalize(name);
  for (const LinkSpec& l : link_table())
    if (normalize(l.name) == n) return l;
  std::string names;
  for (const LinkSpec& l : link_table()) names += (names.empty() ? "" : ", ") + l.name;
  fail("link (--link): '", name, "' is unknown; known links: ", names);
}

uint64_t parse_size(std::string_view s, std::string_view field) {
  std::string why;
  if (auto v = try_size(s, &why)) return *v;
  fail(field, ": '", s, "' is not a size: ", why);
}

std::string format_bytes(uint64_t bytes) {
  std::ostringstream os;
  os.setf(std::ios::fixed);
  os.precision(2);
  os << static_cast<double>(bytes) / (1024.0 * 1024 * 1024) << " GiB";
  return os.str();
}

std::vector<Device> parse_gpus(std::string_view s) {
  std::vector<Device> out;
  if (trim(s).empty()) fail("--gpus: the list is empty; give sizes (24G,24G) or names (", gpu_names(), ")");
  if (trim(s).back() == ',') fail("--gpus '", s, "': the list ends with a comma");
  std::string item;
  std::istringstream is{std::string(s)};
  while (std::getline(is, item, ',')) {
    const std::string it = trim(item);
    if (it.empty()) fail("--gpus '", s, "': an item is empty (two commas in a row or a trailing comma)");
    // Whole item first ("rtx3090" ends in digits after an 'x'), then "<what>x<count>".
    std::string what = it;
    int count = 1;
    std::string size_why;
    const GpuSpec* spec = find_gpu(what);
    // A plain value (not optional) keeps g++'s -Wmaybe-uninitialized quiet across the branches below.
    uint64_t size = 0;
    if (!spec) size = try_size(what, &size_why).value_or(0);
    if (!spec && size == 0) {
      const size_t x = it.find_last_of("xX");
      if (x != std::string::npos && x > 0 && x + 1 < it.size() &&
          std::all_of(it.begin() + static_cast<std::ptrdiff_t>(x) + 1, it.end(),
                      [](char ch) { return std::isdigit(static_cast<unsigned char>(ch)); })) {
        const std::string n = it.substr(x + 1);
        what = it.substr(0, x);
        spec = find_gpu(what);
        if (!spec) size = try_size(what, &size_why).value_or(0);
        // Only a known GPU or a size takes a count; "rtx9999" is an unknown name, not "rt" x 9999.
        if (spec || size != 0) {
          auto [p, ec] = std::from_chars(n.data(), n.data() + n.size(), count);
          if (ec != std::errc() || count < 1 || count > kMaxGpus)
            fail("--gpus item '", it, "': count '", n, "' must be between 1 and ", kMaxGpus);
        }
      }
    }
    if (!spec && size == 0)
      fail("--gpus item '", it, "' is neither a known GPU (", gpu_names(), ") nor a size (", size_why,
           "); a count is written as rtx3090x2 or 24Gx2");
    for (int k = 0; k < count; ++k) {
      if (spec) {
        out.push_back(device_from_spec(*spec));
      } else {
        Device d;
        d.kind = PlanDeviceKind::kGpu;
        d.name = cat("GPU ", format_bytes(size));
        d.capacity_bytes = size;
        d.bandwidth = kDefaultGpuBandwidth;
        d.matmul_flops = kDefaultGpuFlops;
        d.bandwidth_source = "assumed (RTX 3090-class)";
        d.flops_source = "assumed (RTX 3090-class)";
        out.push_back(d);
      }
    }
    if (static_cast<int>(out.size()) > kMaxGpus) fail("--gpus: more than ", kMaxGpus, " GPUs");
  }
  return out;
}

uint64_t parse_meminfo(std::string_view text) {
  std::istringstream is{std::string(text)};
  std::string line;
  while (std::getline(is, line)) {
    if (line.rfind("MemTotal:", 0) != 0) continue;
    std::istringstream ls(line.substr(9));
    uint64_t kb = 0;
    std::string unit;
    if (!(ls >> kb >> unit) || unit != "kB" || kb == 0)
      fail("/proc/meminfo: line '", line, "' is not 'MemTotal: <n> kB'");
    return checked_mul<uint64_t>(kb, 1024, "MemTotal bytes");
  }
  fail("/proc/meminfo: no MemTotal line");
}

CpuInfo detect_cpu() {
  CpuInfo c;
  c.cores = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  c.bandwidth = kDefaultCpuBandwidth;
  std::ifstream f("/proc/meminfo");
  if (f) {
    std::stringstream ss;
    ss << f.rdbuf();
    c.mem_bytes = parse_meminfo(ss.str());
    c.note = "CPU: RAM from /proc/meminfo MemTotal";
  } else {
    c.note = "CPU: /proc/meminfo unreadable, RAM unknown (give --cpu-mem)";
  }
  c.note += "; bandwidth 20 GB/s assumed (give --cpu-bandwidth with a measured figure)";
  return c;
}

std::string describe(const CpuKernelRate& k) {
  return cat(type_name(k.type), " decode ", std::lround(k.decode_bytes_per_s / 1e8) / 10.0, " GB/s, prefill ",
             std::lround(k.prefill_flops / 1e8) / 10.0, " GFLOP/s");
}

DeviceInventory make_inventory(const DeviceRequest& req, const GpuDetector& detect) {
  DeviceInventory inv;
  if (req.gpus) {
    inv.gpus = parse_gpus(*req.gpus);
  } else if (detect) {
    inv.gpus = detect();
    if (inv.gpus.empty()) inv.notes.push_back("no GPU detected: planning for the CPU");
  }
  if (req.gpu_bandwidth_gbs) {
    const double b = *req.gpu_bandwidth_gbs;
    if (!(b > 0 && b < 1e5)) fail("--gpu-bandwidth: ", b, " GB/s must be above 0 and below 100000");
    for (Device& d : inv.gpus) {
      d.bandwidth = b * 1e9;
      d.bandwidth_source = "--gpu-bandwidth";
    }
  }
  if (req.gpu_tflops) {
    const double f = *req.gpu_tflops;
    if (!(f > 0 && f < 1e5)) fail("--gpu-tflops: ", f, " TFLOP/s must be above 0 and below 100000");
    for (Device& d : inv.gpus) {
      d.matmul_flops = f * 1e12;
      d.flops_source = "--gpu-tflops";
    }
  }
  for (const Device& d : inv.gpus)
    if (d.bandwidth_source.rfind("assumed", 0) == 0 || d.flops_source.rfind("assumed", 0) == 0) {
      inv.notes.push_back("GPUs given by size are assumed to have RTX 3090-class bandwidth (936 GB/s) and FP16 rate "
                          "(71 TFLOP/s): a laptop card has a third of that; name the card (e.g. rtx4060-laptop, " 
                          "rtx4090x2) or give --gpu-bandwidth / --gpu-tflops");
      break;
    }
  const CpuSpec* preset = nullptr;
  if (req.cpu) {
    preset = find_cpu(*req.cpu);
    if (!preset) fail("--cpu: '", *req.cpu, "' is unknown; known CPUs: ", cpu_names(),
                      " (or give --cpu-cores and --cpu-bandwidth)");
  }
  const bool other_cores = !req.cpu_is_this_machine && !req.cpu_cores && !preset;
  const bool need_detect = !req.cpu_mem || (!req.cpu_cores && !preset && !other_cores);
  CpuInfo ci;
  if (need_detect) ci = detect_cpu();
  inv.cpu.kind = PlanDeviceKind::kCpu;
  inv.cpu.name = "CPU";
  if (req.cpu_cores) {
    inv.cpu_cores = *req.cpu_cores;
    inv.cpu_cores_source = "--cpu-cores";
  } else if (preset) {
    inv.cpu_cores = preset->cores;
    inv.cpu_cores_source = cat("--cpu ", preset->key);
  } else if (other_cores) {
    inv.cpu_cores = kAssumedCpuCores;
    inv.cpu_cores_source = "assumed";
  } else {
    inv.cpu_cores = ci.cores;
    inv.cpu_cores_source = "this machine's";
  }
  if (inv.cpu_cores < 1 || inv.cpu_cores > 4096)
    fail("--cpu-cores: ", inv.cpu_cores, " must be between 1 and 4096");
  inv.cpu.capacity_bytes = req.cpu_mem ? parse_size(*req.cpu_mem, "--cpu-mem") : ci.mem_bytes;
  inv.cpu_mem_source = req.cpu_mem ? "--cpu-mem" : "this machine's /proc/meminfo";
  if (req.cpu_bandwidth_gbs) {
    const double b = *req.cpu_bandwidth_gbs;
    if (!(b > 0 && b < 1e5)) fail("--cpu-bandwidth: ", b, " GB/s must be above 0 and below 100000");
    inv.cpu.bandwidth = b * 1e9;
    inv.cpu_bandwidth_source = req.cpu_bandwidth_measured ? "measured here" : "--cpu-bandwidth";
  } else if (preset) {
    inv.cpu.bandwidth = preset->bandwidth_gbs * 1e9;
    inv.cpu_bandwidth_source = cat("--cpu ", preset->key, " (datasheet peak)");
  } else {
    inv.cpu.bandwidth = kDefaultCpuBandwidth;
    inv.cpu_bandwidth_source = "assumed";
    inv.notes.push_back("CPU memory bandwidth 20 GB/s assumed (a conservative dual-channel DDR4 figure); "
                        "pass --cpu-bandwidth with a measured value or --cpu with a named CPU");
  }
  inv.cpu.bandwidth_source = inv.cpu_bandwidth_source;
  inv.cpu.matmul_flops = kCpuFlopsPerCore * inv.cpu_cores;
  if (!req.cpu_kernels.empty() && !req.cpu_is_this_machine)
    fail("CPU kernel rates are measured on this machine; they do not apply to a plan for another CPU");
  for (const CpuKernelRate& k : req.cpu_kernels) {
    if (!(k.decode_bytes_per_s > 0 && k.decode_bytes_per_s < 1e14) || !(k.prefill_flops > 0 && k.prefill_flops < 1e17))
      fail("CPU kernel rates of ", type_name(k.type), ": decode ", k.decode_bytes_per_s, " B/s and prefill ",
           k.prefill_flops, " FLOP/s must be positive and finite");
    inv.notes.push_back(cat("CPU kernels timed here on ", k.threads, " threads: ", describe(k)));
  }
  inv.cpu.kernels = req.cpu_kernels;
  if (!req.cpu_mem && ci.mem_bytes != 0) inv.notes.push_back("CPU RAM from /proc/meminfo (MemTotal)");
  if (preset && !req.cpu_mem)
    inv.notes.push_back(cat("--cpu ", preset->key, " without --cpu-mem: the RAM is this machine's; give --cpu-mem "
                            "for the other machine's"));
  if (req.link) {
    inv.link = find_link(*req.link);
    inv.link_source = "--link";
  } else if (inv.gpus.empty()) {
    inv.link = find_link("shm");
    inv.link_source = "CPU ranks of one host";
  } else {
    inv.link = find_link(inv.gpus.front().default_link);
    inv.link_source = cat("default for ", inv.gpus.front().name);
  }
  inv.host_link = find_link("pcie4");
  return inv;
}

}  // namespace shardlm
