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
  EXPECT_EQ(det.link.name, "pcie4");
  req.gpus = "h100x2";
  EXPECT_EQ(make_inventory(req, detect).gpus.size(), 2u);  // given GPUs win over detection
  req.link = "carrier-pigeon";
  EXPECT_THROW(make_inventory(req), Error);
}

}  // namespace
}  // namespace shardlm
