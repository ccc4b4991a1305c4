// safetensors reader (memory-mapped, validating), single files and sharded checkpoints.
//
// Layout: 8-byte little-endian header length N, N bytes of UTF-8 JSON (an object mapping tensor names
// to {dtype, shape, data_offsets} plus an optional "__metadata__" string map), then the data section.
// Nothing from the file is trusted: the header length is capped and checked against the file size, the
// JSON must be valid UTF-8 with no duplicate keys, every size uses checked arithmetic, and the tensors'
// byte ranges must tile the data section exactly (from 0, no gaps, no overlaps, no trailing bytes).
// Tensor data stay in the mapping; a tensor's `data` points into it.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "core/dtype.h"

namespace shardlm {

// Parses JSON text that comes from a file: rejects invalid UTF-8 (naming the byte offset), syntax errors
// and duplicate object keys at any depth (nlohmann would silently keep the last one, so two entries for
// one tensor could hide each other). `name` (a path) appears in every error.
nlohmann::json parse_json_checked(std::string_view text, const std::string& name);

// Reads a whole (small) file, refusing more than `max_bytes`; Error kIo naming the path on failure.
std::string read_small_file(const std::string& path, uint64_t max_bytes);

// Largest header we accept, as the reference Rust implementation does (100 MB): real headers are a
// few hundred kB, and the cap keeps a corrupt length from allocating gigabytes.
inline constexpr uint64_t kSafetensorsMaxHeader = 100'000'000;

struct SafetensorsTensor {
  std::string name;            // as stored, e.g. "model.layers.0.self_attn.q_proj.weight"
  GgmlType type = GgmlType::F32;  // F32, F16 or BF16 (other dtypes are refused by name)
  std::vector<int64_t> shape;  // torch order: shape[0] is the outermost (slowest) dimension
  int64_t n_elements = 0;      // product of shape (1 for a scalar)
  uint64_t offset = 0;         // data_offsets[0], from the start of the data section
  uint64_t n_bytes = 0;        // data_offsets[1] - data_offsets[0] == n_elements * type size
  const uint8_t* data = nullptr;  // into the owning SafetensorsFile's buffer; unaligned in general
};

class SafetensorsFile {
 public:
  // Maps and validates the whole file; throws Error (kIo, kInvalidInput or kUnsupported) naming the path.
  static std::unique_ptr<SafetensorsFile> open(const std::string& path);
  // Validates a buffer (tests, fuzzing); the buffer must outlive the object. `name` appears in errors.
  static std::unique_ptr<SafetensorsFile> from_memory(const uint8_t* data, size_t size, std::string name);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  uint64_t file_size() const { return size_; }
  uint64_t header_size() const { return header_size_; }
  // Tensors sorted by offset (file order).
  const std::vector<SafetensorsTensor>& tensors() const { return tensors_; }
  const SafetensorsTensor* find(std::string_view name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  SafetensorsFile() = default;
  void parse();

  std::string path_;
  const uint8_t* base_ = nullptr;
  uint64_t size_ = 0;
  void* mapping_ = nullptr;  // non-null when we own an mmap of `size_` bytes (munmap in the destructor)
  uint64_t header_size_ = 0;
  std::vector<SafetensorsTensor> tensors_;
  std::map<std::string, size_t, std::less<>> index_;  // name -> tensors_ index
  std::map<std::string, std::string> metadata_;
};

// The weight_map of a model.safetensors.index.json: tensor name -> shard file name. Validates that it
// is a JSON object without duplicate keys whose "weight_map" maps names to plain file names (no path
// separators, no "..", ending in .safetensors). `name` appears in errors.
std::map<std::string, std::string> parse_safetensors_index(std::string_view json_text,
                                                           const std::string& name);

// Every tensor of a Hugging Face checkpoint directory: model.safetensors.index.json and its shards, or
// a single model.safetensors. With an index, every listed tensor must be in the shard it names, and no
// shard may hold a tensor the index does not list (or lists under another shard).
class SafetensorsCheckpoint {
 public:
  static std::unique_ptr<SafetensorsCheckpoint> open_dir(const std::string& dir);

  const std::string& dir() const { return dir_; }
  // Sorted by name.
  const std::vector<const SafetensorsTensor*>& tensors() const { return tensors_; }
  const SafetensorsTensor* find(std::string_view name) const;
  size_t n_files() const { return files_.size(); }
  bool sharded() const { return sharded_; }

 private:
  std::string dir_;
  bool sharded_ = false;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::vector<const SafetensorsTensor*> tensors_;
};

}  // namespace shardlm
