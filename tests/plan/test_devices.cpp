// Parsing of device strings and the datasheet table.
#include <gtest/gtest.h>

#include "core/error.h"
#include "plan/devices.h"

namespace shardlm {
namespace {

constexpr uint64_t GiB = uint64_t{1} << 30;

TEST(Devices, ParseSize) {
  struct Row {
    const char* s;
    uint64_t want;
  } rows[] = {{"24G", 24 * GiB}, {"24g", 24 * GiB}, {"24GiB", 24 * GiB}, {"512M", 512ull << 20},
              {"1.5T", 1536 * GiB}, {"64K", 64 * 1024}, {" 8G ", 8 * GiB},
              // Binary whatever the spelling (issue 23): 24GB is the 24 GiB card people mean.
              {"24GB", 24 * GiB}, {"24gb", 24 * GiB}, {"512MB", 512ull << 20}, {"512MiB", 512ull << 20},
              {"2TB", 2048 * GiB}, {"2TiB", 2048 * GiB}, {"64KB", 64 * 1024}, {"64KiB", 64 * 1024}};
  for (const Row& r : rows) EXPECT_EQ(parse_size(r.s, "--cpu-mem"), r.want) << r.s;
  for (const char* bad : {"24", "G", "", "-1G", "0G", "24Q", "1e3G", "9999999T", "24GBB", "24Gi", "24B", "24iB", "24GB/s"}) {
    try {
      parse_size(bad, "--cpu-mem");
      ADD_FAILURE() << "accepted '" << bad << "'";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("--cpu-mem"), std::string::npos) << e.what();
    }
  }
}

TEST(Devices, ParseGpus) {
  struct Row {
    const char* s;
    size_t n;
    uint64_t cap0;
    double bw0;
  } rows[] = {
      {"24G,24G", 2, 24 * GiB, 936e9},
      {"rtx3090x2", 2, 24576ull << 20, 936e9},
      {"h100x4", 4, 81559ull << 20, 3350e9},
      {"RTX4090", 1, 24564ull << 20, 1008e9},
      {"a100-80g,a100-40g", 2, 81920ull << 20, 2039e9},
      {"24Gx3", 3, 24 * GiB, 936e9},
      {"h200", 1, 143771ull << 20, 4800e9},
      {"l40s x2", 2, 46068ull << 20, 864e9},
  };
  for (const Row& r : rows) {
    SCOPED_TRACE(r.s);
    const auto g = parse_gpus(r.s);
    ASSERT_EQ(g.size(), r.n);
    EXPECT_EQ(g[0].capacity_bytes, r.cap0);
    EXPECT_DOUBLE_EQ(g[0].bandwidth, r.bw0);
  }
  EXPECT_EQ(parse_gpus("h100x4")[0].default_link, "nvlink");
  for (const char* bad : {"", "24G,,24G", "rtx9999", "h100x0", "h100x100", "24", "abc", "24G,"}) {
    try {
      parse_gpus(bad);
      ADD_FAILURE() << "accepted '" << bad << "'";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("--gpus"), std::string::npos) << e.what();
    }
  }
  try {
    parse_gpus("rtx9999");
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("rtx3090"), std::string::npos) << "lists the known GPUs: " << e.what();
  }
}

TEST(Devices, LinksAndMeminfo) {
  EXPECT_EQ(find_link("NVLink").name, "nvlink");
  EXPECT_GT(find_link("pcie4").latency_s, find_link("nvlink").latency_s);
  EXPECT_THROW(find_link("infiniband9"), Error);
  EXPECT_EQ(parse_meminfo("MemFree: 1 kB\nMemTotal:       65536 kB\n"), 65536ull * 1024);
  EXPECT_THROW(parse_meminfo("MemFree: 1 kB\n"), Error);
  EXPECT_THROW(parse_meminfo("MemTotal: lots\n"), Error);
}

TEST(Devices, InventoryFromRequestAndHook) {
  DeviceRequest req;
  req.cpu_mem = "64G";
  req.cpu_cores = 8;
  const DeviceInventory none = make_inventory(req);
  EXPECT_TRUE(none.gpus.empty());
  EXPECT_EQ(none.cpu.capacity_bytes, 64 * GiB);
  EXPECT_EQ(none.link.name, "shm");
  // The CUDA backend's detector fills the GPU list when --gpus is absent.
  const GpuDetector detect = [] { return parse_gpus("rtx4090"); };
  const DeviceInventory det = make_inventory(req, detect);
  ASSERT_EQ(det.gpus.size(), 1u);
  EXPECT_EQ(det.link.name, "pcie4-nop2p");  // GeForce: no peer-to-peer over PCIe
  req.gpus = "h100x2";
  EXPECT_EQ(make_inventory(req, detect).gpus.size(), 2u);  // given GPUs win over detection
  req.link = "carrier-pigeon";
  EXPECT_THROW(make_inventory(req), Error);
}

// Issue 23 item 2: the common consumer and data-centre cards by name, with datasheet figures, and a GPU given
// only by size says that its figures are assumed.
TEST(Devices, ConsumerCardsByName) {
  struct Row {
    const char* s;
    size_t n;
    uint64_t cap0;
    double bw0;
    const char* link;
  } rows[] = {
      {"rtx4060-laptop", 1, 8192ull << 20, 256e9, "pcie4-nop2p"},
      {"RTX 4070 Laptop", 1, 8192ull << 20, 256e9, "pcie4-nop2p"},
      {"rtx4090-laptop", 1, 16384ull << 20, 576e9, "pcie4-nop2p"},
      {"rtx3060", 1, 12288ull << 20, 360e9, "pcie4-nop2p"},
      {"rtx3070", 1, 8192ull << 20, 448e9, "pcie4-nop2p"},
      {"rtx3080", 1, 10240ull << 20, 760e9, "pcie4-nop2p"},
      {"rtx4060tix2", 2, 16384ull << 20, 288e9, "pcie4-nop2p"},
      {"rtx4070", 1, 12288ull << 20, 504e9, "pcie4-nop2p"},
      {"rtx4070ti", 1, 12288ull << 20, 504e9, "pcie4-nop2p"},
      {"rtx4080", 1, 16384ull << 20, 716.8e9, "pcie4-nop2p"},
      {"rtx5070ti", 1, 16384ull << 20, 896e9, "pcie5-nop2p"},
      {"rtx5080", 1, 16384ull << 20, 960e9, "pcie5-nop2p"},
      {"rtx5090x2", 2, 32607ull << 20, 1792e9, "pcie5-nop2p"},
      {"a10", 1, 24576ull << 20, 600e9, "pcie4"},
      {"l4x4", 4, 24576ull << 20, 300e9, "pcie4"},
      {"h100-pcie", 1, 81559ull << 20, 2000e9, "pcie5"},
      {"b200x8", 8, 184320ull << 20, 8000e9, "nvlink"},
      {"mi300x", 1, 196608ull << 20, 5300e9, "nvlink"},
      {"mi300xx8", 8, 196608ull << 20, 5300e9, "nvlink"},
      {"24GBx2", 2, 24 * GiB, 936e9, "pcie4"},
  };
  for (const Row& r : rows) {
    SCOPED_TRACE(r.s);
    const auto g = parse_gpus(r.s);
    ASSERT_EQ(g.size(), r.n);
    EXPECT_EQ(g[0].capacity_bytes, r.cap0);
    EXPECT_DOUBLE_EQ(g[0].bandwidth, r.bw0);
    EXPECT_EQ(g[0].default_link, r.link);
    EXPECT_NO_THROW(find_link(g[0].default_link));
    EXPECT_EQ(g[0].bandwidth_source, r.s[0] == '2' ? "assumed (RTX 3090-class)" : "datasheet");
  }
  // Every table entry parses by its key, with a count, and has a link the link table knows.
  for (const GpuSpec& spec : gpu_table()) {
    SCOPED_TRACE(spec.key);
    EXPECT_EQ(parse_gpus(cat(spec.key, "x3")).size(), 3u);
    EXPECT_EQ(find_gpu(spec.key), &spec);
    EXPECT_GT(spec.bandwidth_gbs, 100);
    EXPECT_GT(spec.fp16_tflops, 10);
    EXPECT_NO_THROW(find_link(spec.default_link));
  }
  try {
    parse_gpus("rtx4050");
    ADD_FAILURE() << "accepted rtx4050";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("rtx4060-laptop"), std::string::npos) << "lists the known GPUs: " << e.what();
  }
}

TEST(Devices, GpuOverridesAndSources) {
  DeviceRequest req;
  req.cpu_mem = "64G";
  req.cpu_cores = 8;
  req.gpus = "8G";
  DeviceInventory inv = make_inventory(req);
  EXPECT_DOUBLE_EQ(inv.gpus[0].bandwidth, 936e9);
  bool said = false;
  for (const std::string& n : inv.notes) said |= n.find("--gpu-bandwidth") != std::string::npos;
  EXPECT_TRUE(said) << "a GPU given by size says how to give its figures";
  req.gpu_bandwidth_gbs = 256;
  req.gpu_tflops = 29.1;
  inv = make_inventory(req);
  EXPECT_DOUBLE_EQ(inv.gpus[0].bandwidth, 256e9);
  EXPECT_DOUBLE_EQ(inv.gpus[0].matmul_flops, 29.1e12);
  EXPECT_EQ(inv.gpus[0].bandwidth_source, "--gpu-bandwidth");
  EXPECT_EQ(inv.gpus[0].flops_source, "--gpu-tflops");
  for (double bad : {0.0, -5.0, 1e6}) {
    req.gpu_bandwidth_gbs = bad;
    try {
      make_inventory(req);
      ADD_FAILURE() << "accepted --gpu-bandwidth " << bad;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("--gpu-bandwidth"), std::string::npos) << e.what();
    }
  }
  req.gpu_bandwidth_gbs.reset();
  req.gpu_tflops = 0;
  EXPECT_THROW(make_inventory(req), Error);
}

// Issue 23 item 3: GeForce cards have no peer-to-peer over PCIe; a 3090 pair may have an NVLink bridge.
TEST(Devices, LinksOfConsumerCards) {
  const LinkSpec& host = find_link("pcie4-nop2p");
  EXPECT_FALSE(host.peer_to_peer);
  EXPECT_GT(host.latency_s, find_link("pcie4").latency_s);
  EXPECT_LT(host.bandwidth, find_link("pcie4").bandwidth);
  EXPECT_TRUE(find_link("nvlink").peer_to_peer);
  DeviceRequest req;
  req.cpu_mem = "64G";
  req.cpu_cores = 8;
  req.gpus = "rtx4090x2";
  DeviceInventory inv = make_inventory(req);
  EXPECT_EQ(inv.link.name, "pcie4-nop2p");
  EXPECT_EQ(inv.link_source, "default for NVIDIA RTX 4090");
  req.gpus = "rtx3090x2";
  req.link = "nvlink";
  inv = make_inventory(req);
  EXPECT_EQ(inv.link.name, "nvlink");
  EXPECT_EQ(inv.link_source, "--link");
  try {
    req.link = "pcie3";
    make_inventory(req);
    ADD_FAILURE() << "accepted pcie3";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("pcie4-nop2p"), std::string::npos) << "lists the links: " << e.what();
  }
}

// Issue 23 item 1: another machine's CPU by name or by figures, each figure reported with its source.
TEST(Devices, CpuPresetsAndSources) {
  DeviceRequest req;
  req.cpu_mem = "64G";
  req.cpu = "ryzen-7950x";
  DeviceInventory inv = make_inventory(req);
  EXPECT_EQ(inv.cpu_cores, 16);
  EXPECT_DOUBLE_EQ(inv.cpu.bandwidth, 83.2e9);  // 2 channels x 5200 MT/s x 8 bytes
  EXPECT_DOUBLE_EQ(inv.cpu.matmul_flops, 16 * kCpuFlopsPerCore);
  EXPECT_EQ(inv.cpu_cores_source, "--cpu ryzen-7950x");
  EXPECT_EQ(inv.cpu_bandwidth_source, "--cpu ryzen-7950x (datasheet peak)");
  EXPECT_EQ(inv.cpu_mem_source, "--cpu-mem");
  // Given figures win over the preset's.
  req.cpu_cores = 12;
  req.cpu_bandwidth_gbs = 70;
  inv = make_inventory(req);
  EXPECT_EQ(inv.cpu_cores, 12);
  EXPECT_DOUBLE_EQ(inv.cpu.bandwidth, 70e9);
  EXPECT_EQ(inv.cpu_cores_source, "--cpu-cores");
  EXPECT_EQ(inv.cpu_bandwidth_source, "--cpu-bandwidth");
  // Another machine without --cpu: its cores are assumed, never this machine's.
  DeviceRequest other;
  other.cpu_mem = "64G";
  other.cpu_is_this_machine = false;
  inv = make_inventory(other);
  EXPECT_EQ(inv.cpu_cores, kAssumedCpuCores);
  EXPECT_EQ(inv.cpu_cores_source, "assumed");
  EXPECT_EQ(inv.cpu_bandwidth_source, "assumed");
  for (const CpuSpec& c : cpu_table()) {
    SCOPED_TRACE(c.key);
    EXPECT_EQ(find_cpu(c.key), &c);
    EXPECT_GT(c.cores, 0);
    EXPECT_GT(c.bandwidth_gbs, 20);
  }
  // A named CPU without --cpu-mem takes this machine's RAM, and says so.
  DeviceRequest named;
  named.cpu = "epyc-9654";
  inv = make_inventory(named);
  EXPECT_EQ(inv.cpu_cores, 96);
  EXPECT_EQ(inv.cpu_mem_source, "this machine's /proc/meminfo");
  bool said = false;
  for (const std::string& n : inv.notes) said |= n.find("without --cpu-mem") != std::string::npos;
  EXPECT_TRUE(said);
  other.cpu = "pentium-4";
  try {
    make_inventory(other);
    ADD_FAILURE() << "accepted pentium-4";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--cpu"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("ryzen-7950x"), std::string::npos) << "lists the CPUs: " << e.what();
  }
  other.cpu.reset();
  other.cpu_cores = 0;
  EXPECT_THROW(make_inventory(other), Error);
}

TEST(Devices, ParseBandwidth) {
  for (const char* s : {"80", "80GB/s", "80 GB/s", "80gb/s", " 80 ", "80GBps"}) EXPECT_DOUBLE_EQ(parse_bandwidth_gbs(s, "--cpu-bandwidth"), 80) << s;
  EXPECT_DOUBLE_EQ(parse_bandwidth_gbs("83.2", "--cpu-bandwidth"), 83.2);
  for (const char* bad : {"", "fast", "80MB/s", "80 GiB/s", "0", "-1", "1e6", "100000", "80GB"}) {
    try {
      parse_bandwidth_gbs(bad, "--cpu-bandwidth");
      ADD_FAILURE() << "accepted '" << bad << "'";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("--cpu-bandwidth"), std::string::npos) << e.what();
    }
  }
}

}  // namespace
}  // namespace shardlm
