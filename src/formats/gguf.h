// GGUF v2/v3 reader (memory-mapped, validating) and writer.
//
// The reader checks every field before use with checked arithmetic and throws shardlm::Error naming the
// field and value; nothing from the file is trusted. Tensor data stay in the mapping: tensor_data()
// returns a pointer into it, so loading a model costs no copy until a backend needs one.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <variant>
#include <vector>

#include "core/dtype.h"

namespace shardlm {

// Values are GGUF's `gguf_type`.
enum class GgufType : uint32_t {
  UINT8 = 0,
  INT8 = 1,
  UINT16 = 2,
  INT16 = 3,
  UINT32 = 4,
  INT32 = 5,
  FLOAT32 = 6,
  BOOL = 7,
  STRING = 8,
  ARRAY = 9,
  UINT64 = 10,
  INT64 = 11,
  FLOAT64 = 12,
};
const char* gguf_type_name(GgufType t);

// One metadata value. Arrays keep their element type and elements in the matching vector
// (integers widened to int64/uint64, floats to double), so huge token arrays stay compact.
struct GgufValue {
  GgufType type = GgufType::UINT8;
  // Scalars: exactly one alternative is set according to `type`.
  std::variant<std::monostate, uint64_t, int64_t, double, bool, std::string> scalar;
  // Arrays (type == ARRAY): element type and the elements in one of these.
  GgufType array_type = GgufType::UINT8;
  std::vector<std::string> strings;
  std::vector<int64_t> ints;      // signed and unsigned integer and bool elements
  std::vector<double> floats;     // FLOAT32 / FLOAT64 elements
  size_t array_size() const;
};

struct GgufKV {
  std::string key;
  GgufValue value;
};

struct GgufTensorInfo {
  std::string name;
  GgmlType type = GgmlType::F32;
  int n_dims = 0;
  std::array<int64_t, 4> ne{1, 1, 1, 1};  // ggml order: ne[0] is the row length (innermost)
  uint64_t offset = 0;                    // from the start of the data section
  uint64_t n_bytes = 0;                   // checked: row_bytes(type, ne[0]) * ne[1] * ne[2] * ne[3]
  int64_t n_elements = 0;
};

class GgufFile {
 public:
  // Maps and validates the whole file; throws Error with the path in the message: kIo when it cannot be
  // opened/mapped (or is a directory), kUnsupported for GGUF v1, v4+ and big-endian files,
  // kInvalidInput for any malformed field. Also validated: general.alignment (UINT32, power of two,
  // <= 1 MiB), tokenizer.ggml.{tokens,merges} STRING arrays, scores FLOAT32 / token_type INT32 arrays
  // as long as tokens, and every tokenizer.ggml.*_token_id an integer < the token count.
  // With no tensors, data_offset() may lie past the end of the file (nothing is read there).
  static std::unique_ptr<GgufFile> open(const std::string& path);
  // Validates a buffer (for tests and fuzzing); the buffer must outlive the object.
  static std::unique_ptr<GgufFile> from_memory(const uint8_t* data, size_t size, std::string name);
  ~GgufFile();
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;

  const std::string& path() const { return path_; }
  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  uint64_t file_size() const { return size_; }
  uint64_t data_offset() const { return data_offset_; }

  const std::vector<GgufKV>& kvs() const { return kvs_; }
  const GgufValue* find(std::string_view key) const;

  // Typed getters. Missing key: nullopt (or the default). Present with the wrong type: Error naming
  // the key, the expected and the actual type. Integer getters accept any integer type whose value
  // fits; float getters accept FLOAT32/FLOAT64.
  std::optional<uint64_t> get_uint(std::string_view key) const;
  std::optional<int64_t> get_int(std::string_view key) const;
  std::optional<double> get_float(std::string_view key) const;
  std::optional<bool> get_bool(std::string_view key) const;
  std::optional<std::string> get_string(std::string_view key) const;
  // Array getters: Error if the key holds another type or another element type.
  std::optional<std::vector<std::string>> get_string_array(std::string_view key) const;
  std::optional<std::vector<double>> get_float_array(std::string_view key) const;
  // UINT64 elements are kept by bit pattern in GgufValue::ints; this getter refuses any above INT64_MAX.
  std::optional<std::vector<int64_t>> get_int_array(std::string_view key) const;

  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  const GgufTensorInfo* find_tensor(std::string_view name) const;
  const uint8_t* tensor_data(const GgufTensorInfo& t) const { return base_ + data_offset_ + t.offset; }

 private:
  GgufFile() = default;
  void parse();

  std::string path_;
  const uint8_t* base_ = nullptr;
  uint64_t size_ = 0;
  void* mapping_ = nullptr;  // non-null when we own an mmap of `size_` bytes
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  uint64_t data_offset_ = 0;
  std::vector<GgufKV> kvs_;
  std::vector<GgufTensorInfo> tensors_;
  // Heterogeneous lookup so find(string_view) does not allocate.
  struct NameHash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
  };
  std::unordered_map<std::string, size_t, NameHash, std::equal_to<>> kv_index_;      // key -> kvs_ index
  std::unordered_map<std::string, size_t, NameHash, std::equal_to<>> tensor_index_;  // name -> tensors_ index
};

// Writes GGUF v3. Tensor payloads are produced by callbacks at write time, so multi-GB files
// (gen-model's 70B presets) are streamed without holding every tensor in memory.
class GgufWriter {
 public:
  GgufWriter();
  void set_alignment(uint32_t a);
  void set_u32(const std::string& key, uint32_t v);
  void set_i32(const std::string& key, int32_t v);
  void set_u64(const std::string& key, uint64_t v);
  void set_f32(const std::string& key, float v);
  void set_bool(const std::string& key, bool v);
  void set_string(const std::string& key, const std::string& v);
  void set_string_array(const std::string& key, const std::vector<std::string>& v);
  void set_f32_array(const std::string& key, const std::vector<float>& v);
  void set_i32_array(const std::string& key, const std::vector<int32_t>& v);
  // Raw value (any type, for tests that build odd files and for copying metadata).
  void set_value(const std::string& key, const GgufValue& v);

  using Fill = std::function<void(uint8_t* dst, size_t n_bytes)>;
  // `ne` in ggml order (ne[0] = row length), 1..4 dims.
  void add_tensor(const std::string& name, GgmlType type, std::vector<int64_t> ne, Fill fill);
  void add_tensor(const std::string& name, GgmlType type, std::vector<int64_t> ne, const void* data);

  // Sparse: write the header and tensors of up to 1 MiB (norms, rope_freqs), and leave the rest of the
  // data section as a hole of zeros whose fill callbacks never run.
  // For testing metadata of 40+ GB presets on machines without the disk for them.
  void set_sparse(bool sparse) { sparse_ = sparse; }

  // Writes the file; `progress(done_bytes, total_bytes)` is called after each tensor when set.
  void write(const std::string& path,
             const std::function<void(uint64_t, uint64_t)>& progress = nullptr) const;

 private:
  struct PendingTensor {
    std::string name;
    GgmlType type;
    std::vector<int64_t> ne;
    uint64_t n_bytes;
    Fill fill;
  };
  uint32_t alignment_ = 32;
  bool sparse_ = false;
  std::vector<GgufKV> kvs_;
  std::vector<PendingTensor> tensors_;
};

}  // namespace shardlm
