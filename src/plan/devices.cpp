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
  static const std::vector<GpuSpec> kTable = {
      {"rtx3090", "NVIDIA RTX 3090", 24576, 936, 71, "pcie4"},
      {"rtx4090", "NVIDIA RTX 4090", 24564, 1008, 165.2, "pcie4"},
      {"rtx5090", "NVIDIA RTX 5090", 32607, 1792, 209.5, "pcie5"},
      {"a100-40g", "NVIDIA A100 40GB SXM", 40960, 1555, 312, "nvlink"},
      {"a100-80g", "NVIDIA A100 80GB SXM", 81920, 2039, 312, "nvlink"},
      {"l40s", "NVIDIA L40S", 46068, 864, 362, "pcie4"},
      {"h100-pcie", "NVIDIA H100 PCIe", 81559, 2000, 756, "pcie5"},
      {"h100-sxm", "NVIDIA H100 SXM", 81559, 3350, 989, "nvlink"},
      {"h200", "NVIDIA H200 SXM", 143771, 4800, 989, "nvlink"},
  };
  return kTable;
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
      // The fused one-shot all-reduce in a decode step on H100s, its matvecs pushing the shares (2026-11-26
      // 23:18Z): ~4.3 us after its wait at tp 4 (trace); the planner's tp figures then fit within 7%.
      {"nvlink", 4e-6, 300e9},
      {"pcie5", 15e-6, 40e9},
      {"pcie4", 20e-6, 20e9},
      {"ethernet", 60e-6, 1.25e9},  // 10 GbE between hosts
      {"shm", 4e-6, 10e9},          // MPI shared memory between CPU ranks of one host
  };
  return kLinks;
}

const LinkSpec& find_link(std::string_view name) {
  const std::string n = normalize(name);
  for (const LinkSpec& l : link_table())
    if (l.name == n) return l;
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

DeviceInventory make_inventory(const DeviceRequest& req, const GpuDetector& detect) {
  DeviceInventory inv;
  if (req.gpus) {
    inv.gpus = parse_gpus(*req.gpus);
    for (const Device& d : inv.gpus)
      if (d.name.rfind("GPU ", 0) == 0) {
        inv.notes.push_back("GPUs given by size are assumed to have RTX 3090-class bandwidth (936 GB/s) "
                            "and FP16 rate (71 TFLOP/s); name the model (e.g. rtx4090x2) for its datasheet figures");
        break;
      }
  } else if (detect) {
    inv.gpus = detect();
    if (inv.gpus.empty()) inv.notes.push_back("no GPU detected: planning for the CPU");
  }
  const bool need_detect = !req.cpu_mem || !req.cpu_cores;
  CpuInfo ci;
  if (need_detect) ci = detect_cpu();
  inv.cpu.kind = PlanDeviceKind::kCpu;
  inv.cpu.name = "CPU";
  inv.cpu_cores = req.cpu_cores ? *req.cpu_cores : ci.cores;
  if (inv.cpu_cores < 1) fail("CPU cores: ", inv.cpu_cores, " must be >= 1");
  inv.cpu.capacity_bytes = req.cpu_mem ? parse_size(*req.cpu_mem, "--cpu-mem") : ci.mem_bytes;
  if (req.cpu_bandwidth_gbs) {
    const double b = *req.cpu_bandwidth_gbs;
    if (!(b > 0 && b < 1e5)) fail("--cpu-bandwidth: ", b, " GB/s must be in (0, 100000)");
    inv.cpu.bandwidth = b * 1e9;
  } else {
    inv.cpu.bandwidth = kDefaultCpuBandwidth;
    inv.notes.push_back("CPU memory bandwidth 20 GB/s assumed (a conservative dual-channel DDR4 figure); "
                        "pass --cpu-bandwidth with a measured value");
  }
  inv.cpu.matmul_flops = kCpuFlopsPerCore * inv.cpu_cores;
  if (!req.cpu_mem && ci.mem_bytes != 0) inv.notes.push_back("CPU RAM from /proc/meminfo (MemTotal)");
  if (req.link) {
    inv.link = find_link(*req.link);
  } else if (inv.gpus.empty()) {
    inv.link = find_link("shm");
  } else {
    inv.link = find_link(inv.gpus.front().default_link);
  }
  inv.host_link = find_link("pcie4");
  return inv;
}

}  // namespace shardlm
