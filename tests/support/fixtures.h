// Test fixtures: reference files kept in the repository under tests/data/ (each folder's README.md says
// where its files came from and their licence). tests/CMakeLists.txt passes that folder as
// SHARDLM_FIXTURES_DIR. Tests reach a fixture through fixture_path(), which throws naming the path when it
// is missing: inside a test an exception is a failure, so a fixture left out of the tree fails the tests
// that need it, never skips them. No gtest here: the mpirun workers include it too.
#pragma once

#include <filesystem>
#include <stdexcept>
#include <string>

namespace shardlm::test {

// "vocab/ggml-vocab-gpt-2.gguf" -> the full path of that file (or folder) under tests/data.
inline std::string fixture_path(const std::string& rel) {
  const std::string p = std::string(SHARDLM_FIXTURES_DIR) + "/" + rel;
  std::error_code ec;
  if (!std::filesystem::exists(p, ec))
    throw std::runtime_error("missing test fixture " + p + " (tests/data/ of the repository: see its README.md)");
  return p;
}

}  // namespace shardlm::test
