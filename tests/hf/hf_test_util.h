// Helpers for the Hugging Face tests: a byte builder for hand-made safetensors files, a scoped
// temporary directory, and an assertion that an Error names the problem.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "core/error.h"
#include "support/fixtures.h"

namespace shardlm::test {

// A Hugging Face fixture (tests/data/hf/<name>, or a file in it); throws naming it when missing.
inline std::string hf_fixture(const std::string& name) { return fixture_path("hf/" + name); }

// 8-byte little-endian length (`declared_len` overrides the real header length), header text, data.
inline std::vector<uint8_t> st_bytes(const std::string& header, uint64_t data_bytes,
                                     std::optional<uint64_t> declared_len = std::nullopt) {
  const uint64_t n = declared_len.value_or(header.size());
  std::vector<uint8_t> b;
  for (int i = 0; i < 8; ++i) b.push_back(static_cast<uint8_t>(n >> (8 * i)));
  b.insert(b.end(), header.begin(), header.end());
  for (uint64_t i = 0; i < data_bytes; ++i) b.push_back(static_cast<uint8_t>(i * 7 + 1));
  return b;
}

inline void write_file(const std::filesystem::path& p, const std::vector<uint8_t>& b) {
  std::ofstream out(p, std::ios::binary);
  out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
  ASSERT_TRUE(out.good()) << p;
}
inline void write_text(const std::filesystem::path& p, const std::string& s) {
  write_file(p, std::vector<uint8_t>(s.begin(), s.end()));
}

struct TempDir {
  std::filesystem::path path;
  TempDir() {
    static int counter = 0;
    path = std::filesystem::temp_directory_path() /
           ("shardlm_hf_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string str() const { return path.string(); }
};

// Fails unless `f` throws shardlm::Error whose message contains every needle.
inline void expect_error(const std::function<void()>& f, const std::vector<std::string>& needles,
                         std::optional<ErrorKind> kind = std::nullopt) {
  try {
    f();
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const auto& n : needles) {
      EXPECT_NE(msg.find(n), std::string::npos) << "'" << n << "' not in: " << msg;
    }
    if (kind) {
      EXPECT_EQ(static_cast<int>(*kind), static_cast<int>(e.kind())) << msg;
    }
    return;
  }
  ADD_FAILURE() << "no shardlm::Error thrown (expected one naming '" << (needles.empty() ? "" : needles[0]) << "')";
}

}  // namespace shardlm::test
