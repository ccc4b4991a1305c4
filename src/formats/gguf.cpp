// GGUF reader and writer. Layout (little-endian):
//   magic "GGUF", u32 version, u64 n_tensors, u64 n_kv,
//   n_kv x { string key, u32 type, value },
//   n_tensors x { string name, u32 n_dims, i64 ne[n_dims], u32 ggml_type, u64 offset },
//   zero padding to `alignment`, then the data section (tensor offsets are relative to its start).
// A string is u64 length + bytes; an array is u32 element type + u64 count + elements.
#include "formats/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <unordered_map>
#include <utility>

#include "core/error.h"

namespace shardlm {

static_assert(std::endian::native == std::endian::little,
              "GGUF is read and written by memcpy of little-endian fields");

namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" read as a little-endian u32
constexpr uint32_t kMaxKnownType = static_cast<uint32_t>(GgufType::FLOAT64);
constexpr uint64_t kDefaultAlignment = 32;
// Alignments above 1 MiB buy nothing (pages are 4 KiB..64 KiB, huge pages 2 MiB are never needed for
// offsets) and a huge value would make the padding itself a way to claim absurd file sizes.
constexpr uint64_t kMaxAlignment = uint64_t{1} << 20;
constexpr int kMaxDims = 4;
// Smallest possible encodings, used to bound counts by the bytes left before anything is reserved.
// A KV: u64 key length + >= 1 key byte (empty keys are rejected) + u32 type + >= 1 value byte.
constexpr uint64_t kMinKvBytes = 8 + 1 + 4 + 1;
// A tensor info: u64 name length + >= 1 name byte + u32 n_dims + >= 1 i64 dim + u32 type + u64 offset.
constexpr uint64_t kMinTensorInfoBytes = 8 + 1 + 4 + 8 + 4 + 8;

uint64_t scalar_size(GgufType t) {
  switch (t) {
    case GgufType::UINT8:
    case GgufType::INT8:
    case GgufType::BOOL:
      return 1;
    case GgufType::UINT16:
    case GgufType::INT16:
      return 2;
    case GgufType::UINT32:
    case GgufType::INT32:
    case GgufType::FLOAT32:
      return 4;
    case GgufType::UINT64:
    case GgufType::INT64:
    case GgufType::FLOAT64:
      return 8;
    case GgufType::STRING:
      return 8;  // the length prefix: the least a string element can take
    case GgufType::ARRAY:
      return 12;  // element type + count
  }
  return 1;
}

bool is_unsigned_int(GgufType t) {
  return t == GgufType::UINT8 || t == GgufType::UINT16 || t == GgufType::UINT32 ||
         t == GgufType::UINT64;
}
bool is_signed_int(GgufType t) {
  return t == GgufType::INT8 || t == GgufType::INT16 || t == GgufType::INT32 ||
         t == GgufType::INT64;
}
bool is_int(GgufType t) { return is_unsigned_int(t) || is_signed_int(t); }
bool is_float(GgufType t) { return t == GgufType::FLOAT32 || t == GgufType::FLOAT64; }

// Names from files are arbitrary bytes; messages show them printable and bounded.
std::string printable(std::string_view s) {
  std::string r;
  const size_t limit = 120;
  for (size_t i = 0; i < s.size() && i < limit; ++i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c >= 0x20 && c < 0x7f && c != '\\') {
      r += static_cast<char>(c);
    } else {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      r += buf;
    }
  }
  if (s.size() > limit) r += cat("...(", s.size(), " bytes)");
  return r;
}

std::string key_field(std::string_view key) { return cat("key '", printable(key), "'"); }
std::string tensor_field(std::string_view name) { return cat("tensor '", printable(name), "'"); }

std::string type_desc(GgufType t) { return gguf_type_name(t); }
std::string value_type_desc(const GgufValue& v) {
  if (v.type == GgufType::ARRAY) return cat("ARRAY of ", gguf_type_name(v.array_type));
  return gguf_type_name(v.type);
}

// Bounds-checked little-endian cursor over the mapped bytes.
class Cursor {
 public:
  Cursor(const uint8_t* data, uint64_t size) : data_(data), size_(size) {}
  uint64_t pos() const { return pos_; }
  uint64_t left() const { return size_ - pos_; }

  void need(uint64_t n, std::string_view what) const {
    if (n > left())
      fail(what, ": truncated file: needs ", n, " bytes at offset ", pos_, " but only ", left(),
           " remain (file size ", size_, ")");
  }
  template <typename T>
  T read(std::string_view what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, data_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  std::string read_string(std::string_view what) {
    const uint64_t len = read<uint64_t>(what);
    if (len > left())
      fail(what, ": string length ", len, " exceeds the ", left(), " bytes left in the file");
    std::string s(reinterpret_cast<const char*>(data_ + pos_), static_cast<size_t>(len));
    pos_ += len;
    return s;
  }

 private:
  const uint8_t* data_;
  uint64_t size_;
  uint64_t pos_ = 0;
};

GgufType read_type_id(Cursor& c, std::string_view what) {
  const uint32_t raw = c.read<uint32_t>(what);
  if (raw > kMaxKnownType)
    fail(what, ": unknown value type ", raw, " (known types are 0..", kMaxKnownType, ")");
  return static_cast<GgufType>(raw);
}

bool read_bool(Cursor& c, std::string_view what) {
  const uint8_t b = c.read<uint8_t>(what);
  if (b > 1) fail(what, ": BOOL byte is ", +b, ", expected 0 or 1");
  return b != 0;
}

// Reads one non-array value of type `t` into the array storage of `v` (ints/floats/strings).
void read_element(Cursor& c, GgufType t, GgufValue& v, std::string_view what) {
  switch (t) {
    case GgufType::UINT8: v.ints.push_back(c.read<uint8_t>(what)); break;
    case GgufType::INT8: v.ints.push_back(c.read<int8_t>(what)); break;
    case GgufType::UINT16: v.ints.push_back(c.read<uint16_t>(what)); break;
    case GgufType::INT16: v.ints.push_back(c.read<int16_t>(what)); break;
    case GgufType::UINT32: v.ints.push_back(c.read<uint32_t>(what)); break;
    case GgufType::INT32: v.ints.push_back(c.read<int32_t>(what)); break;
    // UINT64 elements keep their bit pattern; get_int_array refuses values above INT64_MAX.
    case GgufType::UINT64: v.ints.push_back(static_cast<int64_t>(c.read<uint64_t>(what))); break;
    case GgufType::INT64: v.ints.push_back(c.read<int64_t>(what)); break;
    case GgufType::FLOAT32: v.floats.push_back(c.read<float>(what)); break;
    case GgufType::FLOAT64: v.floats.push_back(c.read<double>(what)); break;
    case GgufType::BOOL: v.ints.push_back(read_bool(c, what) ? 1 : 0); break;
    case GgufType::STRING: v.strings.push_back(c.read_string(what)); break;
    case GgufType::ARRAY: SHARDLM_CHECK(false, "nested array reached read_element");
  }
}

GgufValue read_value(Cursor& c, GgufType t, const std::string& what) {
  GgufValue v;
  v.type = t;
  switch (t) {
    case GgufType::UINT8: v.scalar = uint64_t{c.read<uint8_t>(what)}; break;
    case GgufType::UINT16: v.scalar = uint64_t{c.read<uint16_t>(what)}; break;
    case GgufType::UINT32: v.scalar = uint64_t{c.read<uint32_t>(what)}; break;
    case GgufType::UINT64: v.scalar = uint64_t{c.read<uint64_t>(what)}; break;
    case GgufType::INT8: v.scalar = int64_t{c.read<int8_t>(what)}; break;
    case GgufType::INT16: v.scalar = int64_t{c.read<int16_t>(what)}; break;
    case GgufType::INT32: v.scalar = int64_t{c.read<int32_t>(what)}; break;
    case GgufType::INT64: v.scalar = int64_t{c.read<int64_t>(what)}; break;
    case GgufType::FLOAT32: v.scalar = double{c.read<float>(what)}; break;
    case GgufType::FLOAT64: v.scalar = c.read<double>(what); break;
    case GgufType::BOOL: v.scalar = read_bool(c, what); break;
    case GgufType::STRING: v.scalar = c.read_string(what); break;
    case GgufType::ARRAY: {
      v.array_type = read_type_id(c, cat(what, ": array element type"));
      if (v.array_type == GgufType::ARRAY)
        fail(what, ": arrays of arrays are not supported");
      const uint64_t n = c.read<uint64_t>(cat(what, ": array length"));
      const uint64_t min_elem = scalar_size(v.array_type);
      // Bound the count by the bytes left before reserving, so a count of 2^60 fails here.
      if (n > c.left() / min_elem)
        fail(what, ": array length ", n, " of ", gguf_type_name(v.array_type), " needs at least ",
             n, " x ", min_elem, " bytes but only ", c.left(), " remain");
      const size_t count = static_cast<size_t>(n);
      if (v.array_type == GgufType::STRING) {
        v.strings.reserve(count);
      } else if (is_float(v.array_type)) {
        v.floats.reserve(count);
      } else {
        v.ints.reserve(count);
      }
      for (size_t i = 0; i < count; ++i) read_element(c, v.array_type, v, what);
      break;
    }
  }
  return v;
}

bool is_pow2(uint64_t a) { return a != 0 && (a & (a - 1)) == 0; }

uint64_t align_up(uint64_t x, uint64_t a, std::string_view what) {
  const uint64_t r = x % a;
  return r == 0 ? x : checked_add<uint64_t>(x, a - r, what);
}

// Validation of tokenizer arrays and special-token ids, so consumers can index without checks.
void validate_tokenizer(const GgufFile& f) {
  const GgufValue* tokens = f.find("tokenizer.ggml.tokens");
  const auto expect_array = [&](const char* key, GgufType elem) -> const GgufValue* {
    const GgufValue* v = f.find(key);
    if (v == nullptr) return nullptr;
    if (v->type != GgufType::ARRAY || v->array_type != elem)
      fail(key_field(key), ": expected an ARRAY of ", gguf_type_name(elem), ", found ",
           value_type_desc(*v));
    return v;
  };
  expect_array("tokenizer.ggml.tokens", GgufType::STRING);
  expect_array("tokenizer.ggml.merges", GgufType::STRING);
  const GgufValue* scores = expect_array("tokenizer.ggml.scores", GgufType::FLOAT32);
  const GgufValue* types = expect_array("tokenizer.ggml.token_type", GgufType::INT32);
  if (tokens == nullptr) return;
  const uint64_t n_vocab = tokens->array_size();
  for (const GgufValue* v : {scores, types}) {
    if (v == nullptr) continue;
    const char* key = v == scores ? "tokenizer.ggml.scores" : "tokenizer.ggml.token_type";
    if (v->array_size() != n_vocab)
      fail(key_field(key), ": length ", v->array_size(),
           " differs from the length of tokenizer.ggml.tokens ", n_vocab);
  }
  // Every tokenizer.ggml.*_token_id (bos, eos, unknown, padding, separator, eot, eom, fim_*, cls,
  // mask ...) indexes the vocabulary.
  const std::string_view prefix = "tokenizer.ggml.";
  const std::string_view suffix = "_token_id";
  for (const GgufKV& kv : f.kvs()) {
    const std::string_view k = kv.key;
    if (k.size() < prefix.size() + suffix.size() || !k.starts_with(prefix) || !k.ends_with(suffix))
      continue;
    if (kv.value.type == GgufType::ARRAY || !is_int(kv.value.type))
      fail(key_field(k), ": expected an integer token id, found ", value_type_desc(kv.value));
    const bool negative = is_signed_int(kv.value.type) && std::get<int64_t>(kv.value.scalar) < 0;
    const uint64_t id = is_signed_int(kv.value.type)
                            ? static_cast<uint64_t>(std::get<int64_t>(kv.value.scalar))
                            : std::get<uint64_t>(kv.value.scalar);
    if (negative)
      fail(key_field(k), ": token id ", std::get<int64_t>(kv.value.scalar), " is negative");
    if (id >= n_vocab)
      fail(key_field(k), ": token id ", id, " is outside the vocabulary (tokenizer.ggml.tokens has ",
           n_vocab, " entries)");
  }
}

// Closes a file descriptor on scope exit (reader and writer).
struct Fd {
  int fd = -1;
  explicit Fd(int f) : fd(f) {}
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int release() { return std::exchange(fd, -1); }
};

std::string errno_text(int e) { return std::strerror(e); }

}  // namespace

const char* gguf_type_name(GgufType t) {
  switch (t) {
    case GgufType::UINT8: return "UINT8";
    case GgufType::INT8: return "INT8";
    case GgufType::UINT16: return "UINT16";
    case GgufType::INT16: return "INT16";
    case GgufType::UINT32: return "UINT32";
    case GgufType::INT32: return "INT32";
    case GgufType::FLOAT32: return "FLOAT32";
    case GgufType::BOOL: return "BOOL";
    case GgufType::STRING: return "STRING";
    case GgufType::ARRAY: return "ARRAY";
    case GgufType::UINT64: return "UINT64";
    case GgufType::INT64: return "INT64";
    case GgufType::FLOAT64: return "FLOAT64";
  }
  return "UNKNOWN";
}

size_t GgufValue::array_size() const {
  if (type != GgufType::ARRAY) return 0;
  if (array_type == GgufType::STRING) return strings.size();
  if (is_float(array_type)) return floats.size();
  return ints.size();
}

// ---------------------------------------------------------------------------------------------------
// Reader

GgufFile::~GgufFile() {
  if (mapping_ != nullptr) ::munmap(mapping_, static_cast<size_t>(size_));
}

std::unique_ptr<GgufFile> GgufFile::open(const std::string& path) {
  std::unique_ptr<GgufFile> f(new GgufFile());
  f->path_ = path;
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.fd < 0) {
    const int e = errno;
    fail_kind(ErrorKind::kIo, path, ": cannot open GGUF file: ", errno_text(e));
  }
  struct stat st {};
  if (::fstat(fd.fd, &st) != 0) {
    const int e = errno;
    fail_kind(ErrorKind::kIo, path, ": cannot stat GGUF file: ", errno_text(e));
  }
  if (S_ISDIR(st.st_mode))
    fail_kind(ErrorKind::kIo, path, ": is a directory, expected a GGUF file");
  if (!S_ISREG(st.st_mode))
    fail_kind(ErrorKind::kIo, path, ": is not a regular file, expected a GGUF file");
  if (st.st_size == 0)
    fail(path, ": file is empty (0 bytes); a GGUF file starts with the magic 'GGUF'");
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size > std::numeric_limits<size_t>::max())
    fail_kind(ErrorKind::kIo, path, ": file size ", size, " exceeds the address space");
  void* m = ::mmap(nullptr, static_cast<size_t>(size), PROT_READ, MAP_PRIVATE, fd.fd, 0);
  if (m == MAP_FAILED) {
    const int e = errno;
    fail_kind(ErrorKind::kIo, path, ": cannot mmap ", size, " bytes: ", errno_text(e));
  }
  // Owned from here on: the destructor unmaps even when parse() throws.
  f->mapping_ = m;
  f->size_ = size;
  f->base_ = static_cast<const uint8_t*>(m);
  f->parse();
  return f;
}

std::unique_ptr<GgufFile> GgufFile::from_memory(const uint8_t* data, size_t size, std::string name) {
  std::unique_ptr<GgufFile> f(new GgufFile());
  f->path_ = std::move(name);
  f->base_ = data;
  f->size_ = size;
  f->parse();
  return f;
}

void GgufFile::parse() {
  try {
    if (size_ == 0) fail("file is empty (0 bytes); a GGUF file starts with the magic 'GGUF'");
    Cursor c(base_, size_);
    const uint32_t magic = c.read<uint32_t>("header.magic");
    if (magic != kMagic) {
      char buf[16];
      std::snprintf(buf, sizeof buf, "0x%08x", magic);
      fail("header.magic: ", buf, " is not 'GGUF' (0x46554747); not a GGUF file");
    }
    version_ = c.read<uint32_t>("header.version");
    if (version_ == 1)
      fail_kind(ErrorKind::kUnsupported, "header.version: GGUF version 1 is not supported (only 2 and 3); "
                "re-convert the model with a current llama.cpp");
    if (version_ != 2 && version_ != 3) {
      const uint32_t swapped = __builtin_bswap32(version_);
      if (swapped == 2 || swapped == 3)
        fail_kind(ErrorKind::kUnsupported, "header.version: ", version_,
                  " looks like a big-endian GGUF, which is not supported");
      fail_kind(ErrorKind::kUnsupported, "header.version: ", version_,
                " is not supported (only 2 and 3)");
    }
    const uint64_t n_tensors = c.read<uint64_t>("header.n_tensors");
    const uint64_t n_kv = c.read<uint64_t>("header.n_kv");
    // Bound both counts by the bytes left before reserving anything.
    if (n_tensors > c.left() / kMinTensorInfoBytes)
      fail("header.n_tensors: ", n_tensors, " tensor infos need at least ", kMinTensorInfoBytes,
           " bytes each but only ", c.left(), " bytes remain (limit ", c.left() / kMinTensorInfoBytes,
           ")");
    const uint64_t tensor_min = n_tensors * kMinTensorInfoBytes;  // no overflow: bounded above
    if (n_kv > (c.left() - tensor_min) / kMinKvBytes)
      fail("header.n_kv: ", n_kv, " key/value pairs need at least ", kMinKvBytes,
           " bytes each but only ", c.left() - tensor_min, " bytes remain after the tensor infos (limit ",
           (c.left() - tensor_min) / kMinKvBytes, ")");

    kvs_.clear();
    kvs_.reserve(static_cast<size_t>(n_kv));
    kv_index_.clear();
    for (uint64_t i = 0; i < n_kv; ++i) {
      std::string key = c.read_string(cat("kv[", i, "].key"));
      if (key.empty()) fail("kv[", i, "].key: empty key");
      const std::string field = key_field(key);
      if (kv_index_.count(key) != 0)
        fail(field, ": duplicate key (kv[", i, "], first at kv[", kv_index_.at(key), "])");
      const GgufType t = read_type_id(c, cat(field, ": value type"));
      GgufValue v = read_value(c, t, field);
      kv_index_.emplace(key, kvs_.size());
      kvs_.push_back(GgufKV{std::move(key), std::move(v)});
    }

    alignment_ = kDefaultAlignment;
    if (const GgufValue* a = find("general.alignment")) {
      if (a->type != GgufType::UINT32)
        fail(key_field("general.alignment"), ": expected UINT32, found ", value_type_desc(*a));
      const uint64_t al = std::get<uint64_t>(a->scalar);
      if (!is_pow2(al) || al > kMaxAlignment)
        fail(key_field("general.alignment"), ": ", al,
             " is not a power of two in [1, ", kMaxAlignment, "]");
      alignment_ = al;
    }
    validate_tokenizer(*this);

    tensors_.clear();
    tensors_.reserve(static_cast<size_t>(n_tensors));
    tensor_index_.clear();
    for (uint64_t i = 0; i < n_tensors; ++i) {
      GgufTensorInfo t;
      t.name = c.read_string(cat("tensor[", i, "].name"));
      if (t.name.empty()) fail("tensor[", i, "].name: empty tensor name");
      const std::string field = tensor_field(t.name);
      if (tensor_index_.count(t.name) != 0)
        fail(field, ": duplicate tensor name (tensor[", i, "], first at tensor[",
             tensor_index_.at(t.name), "])");
      const uint32_t n_dims = c.read<uint32_t>(cat(field, ": n_dims"));
      if (n_dims < 1 || n_dims > kMaxDims)
        fail(field, ": n_dims ", n_dims, " is outside [1, ", kMaxDims, "]");
      t.n_dims = static_cast<int>(n_dims);
      for (uint32_t d = 0; d < n_dims; ++d) {
        const int64_t ne = c.read<int64_t>(cat(field, ": ne[", d, "]"));
        if (ne < 1) fail(field, ": ne[", d, "] = ", ne, " must be >= 1");
        t.ne[d] = ne;
      }
      const uint32_t raw_type = c.read<uint32_t>(cat(field, ": type"));
      const TypeTraits* tr = type_traits(raw_type);
      if (tr == nullptr) fail(field, ": unknown ggml type ", raw_type);
      t.type = tr->type;
      t.offset = c.read<uint64_t>(cat(field, ": offset"));

      if (t.ne[0] % tr->block_size != 0)
        fail(field, ": row length ne[0] = ", t.ne[0], " is not a multiple of the ", tr->name,
             " block size ", tr->block_size);
      const std::string ecount = cat(field, ": element count");
      int64_t n_el = 1;
      for (int d = 0; d < kMaxDims; ++d) n_el = checked_mul<int64_t>(n_el, t.ne[d], ecount);
      t.n_elements = n_el;
      const std::string bcount = cat(field, ": byte count");
      int64_t nb = checked_mul<int64_t>(t.ne[0] / tr->block_size, tr->type_size, bcount);
      for (int d = 1; d < kMaxDims; ++d) nb = checked_mul<int64_t>(nb, t.ne[d], bcount);
      t.n_bytes = static_cast<uint64_t>(nb);
      tensor_index_.emplace(t.name, tensors_.size());
      tensors_.push_back(std::move(t));
    }

    data_offset_ = align_up(c.pos(), alignment_, "data offset");
    uint64_t prev_end = 0;
    for (size_t i = 0; i < tensors_.size(); ++i) {
      const GgufTensorInfo& t = tensors_[i];
      const std::string field = tensor_field(t.name);
      if (t.offset % alignment_ != 0)
        fail(field, ": offset ", t.offset, " is not a multiple of the alignment ", alignment_);
      if (i > 0 && t.offset < tensors_[i - 1].offset)
        fail(field, ": offset ", t.offset, " is out of order (before the offset ",
             tensors_[i - 1].offset, " of the previous tensor '", printable(tensors_[i - 1].name),
             "')");
      if (t.offset < prev_end)
        fail(field, ": offset ", t.offset, " overlaps the previous tensor '",
             printable(tensors_[i - 1].name), "', which ends at ", prev_end);
      prev_end = checked_add<uint64_t>(t.offset, t.n_bytes, cat(field, ": end offset"));
      const uint64_t file_end = checked_add<uint64_t>(data_offset_, prev_end, cat(field, ": end"));
      if (file_end > size_)
        fail(field, ": data [", data_offset_ + t.offset, ", ", file_end,
             ") extends past the end of the file (size ", size_, ")");
    }
  } catch (const Error& e) {
    throw Error(cat(path_, ": ", e.what()), e.kind());
  }
}

const GgufValue* GgufFile::find(std::string_view key) const {
  const auto it = kv_index_.find(key);
  return it == kv_index_.end() ? nullptr : &kvs_[it->second].value;
}

const GgufTensorInfo* GgufFile::find_tensor(std::string_view name) const {
  const auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

namespace {

[[noreturn]] void wrong_type(const std::string& path, std::string_view key, const char* expected,
                             const GgufValue& v) {
  fail(path, ": ", key_field(key), ": expected ", expected, ", found ", value_type_desc(v));
}

}  // namespace

std::optional<uint64_t> GgufFile::get_uint(std::string_view key) const {
  const GgufValue* v = find(key);
  if (v == nullptr) return std::nullopt;
  if (is_unsigned_int(v->type)) return std::get<uint64_t>(v->scalar);
  if (is_signed_int(v->type)) {
    const int64_t x = std::get<int64_t>(v->scalar);
    if (x < 0) fail(path_, ": ", key_field(key), ": value ", x, " is negative, expected >= 0");
    return static_cast<uint64_t>(x);
  }
  wrong_type(path_, key, "an unsigned integer", *v);
}

std::optional<int64_t> GgufFile::get_int(std::string_view key) const {
  const GgufValue* v = find(key);
  if (v == nullptr) return std::nullopt;
  if (is_signed_int(v->type)) return std::get<int64_t>(v->scalar);
  if (is_unsigned_int(v->type)) {
    const uint64_t x = std::get<uint64_t>(v->scalar);
    if (x > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      fail(path_, ": ", key_field(key), ": value ", x, " exceeds the INT64 limit ",
           std::numeric_limits<int64_t>::max());
    return static_cast<int64_t>(x);
  }
  wrong_type(path_, key, "an integer", *v);
}

std::optional<double> GgufFile::get_float(std::string_view key) const {
  const GgufValue* v = find(key);
  if (v == nullptr) return std::nullopt;
  if (is_float(v->type)) return std::get<double>(v->scalar);
  wrong_type(path_, key, "FLOAT32 or FLOAT64", *v);
}

std::optional<bool> GgufFile::get_bool(std::string_view key) const {
  const GgufValue* v = find(key);
  if (v == nullptr) return std::nullopt;
  if (v->type == GgufType::BOOL) return std::get<bool>(v->scalar);
  wrong_type(path_, key, "BOOL", *v);
}

std::optional<std::string> GgufFile::get_string(std::string_view key) const {
  const GgufValue* v = find(key);
  if (v == nullptr) return std::nullopt;
  if (v->type == GgufType::STRING) return std::get<std::string>(v->scalar);
  wrong_type(path_, key, "STRING", *v);
}

std::optional<std::vector<std::string>> GgufFile::get_string_array(std::string_view key) const {
  const GgufValue* v = find(key);
  if (v == nullptr) return std::nullopt;
  if (v->type == GgufType::ARRAY && v->array_type == GgufType::STRING) return v->strings;
  wrong_type(path_, key, "an ARRAY of STRING", *v);
}

std::optional<std::vector<double>> GgufFile::get_float_array(std::string_view key) const {
  const GgufValue* v = find(key);
  if (v == nullptr) return std::nullopt;
  if (v->type == GgufType::ARRAY && is_float(v->array_type)) return v->floats;
  wrong_type(path_, key, "an ARRAY of FLOAT32 or FLOAT64", *v);
}

std::optional<std::vector<int64_t>> GgufFile::get_int_array(std::string_view key) const {
  const GgufValue* v = find(key);
  if (v == nullptr) return std::nullopt;
  if (v->type != GgufType::ARRAY || !is_int(v->array_type))
    wrong_type(path_, key, "an ARRAY of integers", *v);
  if (v->array_type == GgufType::UINT64) {
    for (size_t i = 0; i < v->ints.size(); ++i)
      if (v->ints[i] < 0)
        fail(path_, ": ", key_field(key), ": element ", i, " = ", static_cast<uint64_t>(v->ints[i]),
             " exceeds the INT64 limit ", std::numeric_limits<int64_t>::max());
  }
  return v->ints;
}

// ---------------------------------------------------------------------------------------------------
// Writer

namespace {

void validate_key(const std::string& key) {
  if (key.empty()) fail("GGUF writer: empty key");
}

uint64_t tensor_bytes(const std::string& name, GgmlType type, const std::vector<int64_t>& ne) {
  const std::string field = cat("GGUF writer: ", tensor_field(name));
  if (name.empty()) fail("GGUF writer: empty tensor name");
  if (ne.empty() || ne.size() > static_cast<size_t>(kMaxDims))
    fail(field, ": n_dims ", ne.size(), " is outside [1, ", kMaxDims, "]");
  for (size_t d = 0; d < ne.size(); ++d)
    if (ne[d] < 1) fail(field, ": ne[", d, "] = ", ne[d], " must be >= 1");
  const TypeTraits* tr = type_traits(static_cast<uint32_t>(type));
  if (tr == nullptr) fail(field, ": unknown ggml type ", static_cast<uint32_t>(type));
  if (ne[0] % tr->block_size != 0)
    fail(field, ": row length ne[0] = ", ne[0], " is not a multiple of the ", tr->name,
         " block size ", tr->block_size);
  const std::string bcount = cat(field, ": byte count");
  int64_t nb = checked_mul<int64_t>(ne[0] / tr->block_size, tr->type_size, bcount);
  int64_t n_el = ne[0];
  for (size_t d = 1; d < ne.size(); ++d) {
    nb = checked_mul<int64_t>(nb, ne[d], bcount);
    n_el = checked_mul<int64_t>(n_el, ne[d], cat(field, ": element count"));
  }
  (void)n_el;  // only its overflow check matters: sub-byte types can overflow elements before bytes
  return static_cast<uint64_t>(nb);
}

// Header bytes in memory: small next to the tensor data, and simpler to pad exactly.
class ByteSink {
 public:
  std::vector<uint8_t> buf;
  template <typename T>
  void put(T v) {
    const auto* p = reinterpret_cast<const uint8_t*>(&v);
    buf.insert(buf.end(), p, p + sizeof(T));
  }
  void put_string(const std::string& s) {
    put<uint64_t>(s.size());
    buf.insert(buf.end(), s.begin(), s.end());
  }
};

template <typename To>
To narrow_elem(int64_t v, GgufType t, const std::string& key) {
  if constexpr (std::is_same_v<To, uint64_t>) {
    (void)t;
    (void)key;
    return static_cast<uint64_t>(v);  // UINT64 elements are stored by bit pattern
  } else {
    return checked_cast<To>(v, cat("GGUF writer: ", key_field(key), ": ", gguf_type_name(t),
                                   " element"));
  }
}

void put_int_elem(ByteSink& s, GgufType t, int64_t v, const std::string& key) {
  switch (t) {
    case GgufType::UINT8: s.put(narrow_elem<uint8_t>(v, t, key)); break;
    case GgufType::INT8: s.put(narrow_elem<int8_t>(v, t, key)); break;
    case GgufType::UINT16: s.put(narrow_elem<uint16_t>(v, t, key)); break;
    case GgufType::INT16: s.put(narrow_elem<int16_t>(v, t, key)); break;
    case GgufType::UINT32: s.put(narrow_elem<uint32_t>(v, t, key)); break;
    case GgufType::INT32: s.put(narrow_elem<int32_t>(v, t, key)); break;
    case GgufType::UINT64: s.put(narrow_elem<uint64_t>(v, t, key)); break;
    case GgufType::INT64: s.put(v); break;
    case GgufType::BOOL:
      if (v != 0 && v != 1) fail("GGUF writer: ", key_field(key), ": BOOL element ", v, " is not 0 or 1");
      s.put(static_cast<uint8_t>(v));
      break;
    default: SHARDLM_CHECK(false, "not an integer type");
  }
}

// Checks that the alternative/vector matching `v.type` is the one filled, so write() cannot
// meet an inconsistent value.
void validate_value(const std::string& key, const GgufValue& v) {
  const std::string field = cat("GGUF writer: ", key_field(key));
  if (static_cast<uint32_t>(v.type) > kMaxKnownType)
    fail(field, ": unknown value type ", static_cast<uint32_t>(v.type));
  if (v.type == GgufType::ARRAY) {
    if (static_cast<uint32_t>(v.array_type) > kMaxKnownType)
      fail(field, ": unknown array element type ", static_cast<uint32_t>(v.array_type));
    if (v.array_type == GgufType::ARRAY) fail(field, ": arrays of arrays are not supported");
    const bool s = v.array_type == GgufType::STRING, f = is_float(v.array_type);
    if ((!s && !v.strings.empty()) || (!f && !v.floats.empty()) || ((s || f) && !v.ints.empty()))
      fail(field, ": elements stored in a vector that does not match the element type ",
           gguf_type_name(v.array_type));
    if (!s && !f) {
      ByteSink scratch;  // range-checks every element now rather than at write time
      for (int64_t x : v.ints) {
        scratch.buf.clear();
        put_int_elem(scratch, v.array_type, x, key);
      }
    }
    return;
  }
  bool ok = false;
  if (is_unsigned_int(v.type)) {
    ok = std::holds_alternative<uint64_t>(v.scalar);
    if (ok && v.type != GgufType::UINT64) {
      const uint64_t x = std::get<uint64_t>(v.scalar);
      const uint64_t lim = v.type == GgufType::UINT8    ? 0xff
                           : v.type == GgufType::UINT16 ? 0xffff
                                                        : 0xffffffffu;
      if (x > lim) fail(field, ": value ", x, " exceeds the ", gguf_type_name(v.type), " limit ", lim);
    }
  } else if (is_signed_int(v.type)) {
    ok = std::holds_alternative<int64_t>(v.scalar);
    if (ok && v.type != GgufType::INT64) {
      ByteSink scratch;
      put_int_elem(scratch, v.type, std::get<int64_t>(v.scalar), key);
    }
  } else if (is_float(v.type)) {
    ok = std::holds_alternative<double>(v.scalar);
  } else if (v.type == GgufType::BOOL) {
    ok = std::holds_alternative<bool>(v.scalar);
  } else if (v.type == GgufType::STRING) {
    ok = std::holds_alternative<std::string>(v.scalar);
  }
  if (!ok) fail(field, ": scalar does not hold the alternative for type ", type_desc(v.type));
}

void put_value(ByteSink& s, const std::string& key, const GgufValue& v) {
  s.put(static_cast<uint32_t>(v.type));
  switch (v.type) {
    case GgufType::UINT8: s.put(static_cast<uint8_t>(std::get<uint64_t>(v.scalar))); break;
    case GgufType::UINT16: s.put(static_cast<uint16_t>(std::get<uint64_t>(v.scalar))); break;
    case GgufType::UINT32: s.put(static_cast<uint32_t>(std::get<uint64_t>(v.scalar))); break;
    case GgufType::UINT64: s.put(std::get<uint64_t>(v.scalar)); break;
    case GgufType::INT8:
    case GgufType::INT16:
    case GgufType::INT32:
    case GgufType::INT64: put_int_elem(s, v.type, std::get<int64_t>(v.scalar), key); break;
    case GgufType::FLOAT32: s.put(static_cast<float>(std::get<double>(v.scalar))); break;
    case GgufType::FLOAT64: s.put(std::get<double>(v.scalar)); break;
    case GgufType::BOOL: s.put(static_cast<uint8_t>(std::get<bool>(v.scalar) ? 1 : 0)); break;
    case GgufType::STRING: s.put_string(std::get<std::string>(v.scalar)); break;
    case GgufType::ARRAY: {
      s.put(static_cast<uint32_t>(v.array_type));
      s.put<uint64_t>(v.array_size());
      if (v.array_type == GgufType::STRING) {
        for (const auto& x : v.strings) s.put_string(x);
      } else if (v.array_type == GgufType::FLOAT32) {
        for (double x : v.floats) s.put(static_cast<float>(x));
      } else if (v.array_type == GgufType::FLOAT64) {
        for (double x : v.floats) s.put(x);
      } else {
        for (int64_t x : v.ints) put_int_elem(s, v.array_type, x, key);
      }
      break;
    }
  }
}

// Writes all of [p, p+n) or throws kIo (ENOSPC, EIO ...); retries short writes and EINTR.
void write_all(int fd, const uint8_t* p, uint64_t n, const std::string& path) {
  while (n > 0) {
    const size_t chunk = static_cast<size_t>(std::min<uint64_t>(n, uint64_t{1} << 30));
    const ssize_t w = ::write(fd, p, chunk);
    if (w < 0) {
      if (errno == EINTR) continue;
      const int e = errno;
      fail_kind(ErrorKind::kIo, path, ": write failed: ", errno_text(e));
    }
    if (w == 0) fail_kind(ErrorKind::kIo, path, ": write made no progress");
    p += w;
    n -= static_cast<uint64_t>(w);
  }
}

// Removes the temporary file unless the write completed and it was renamed.
struct TmpFile {
  std::string path;
  bool keep = false;
  ~TmpFile() {
    if (!keep) ::unlink(path.c_str());
  }
};

}  // namespace

GgufWriter::GgufWriter() = default;

void GgufWriter::set_alignment(uint32_t a) {
  GgufValue v;
  v.type = GgufType::UINT32;
  v.scalar = uint64_t{a};
  set_value("general.alignment", v);
}

void GgufWriter::set_value(const std::string& key, const GgufValue& v) {
  validate_key(key);
  validate_value(key, v);
  if (key == "general.alignment") {
    if (v.type != GgufType::UINT32)
      fail("GGUF writer: ", key_field(key), ": expected UINT32, found ", value_type_desc(v));
    const uint64_t a = std::get<uint64_t>(v.scalar);
    if (!is_pow2(a) || a > kMaxAlignment)
      fail("GGUF writer: ", key_field(key), ": ", a, " is not a power of two in [1, ", kMaxAlignment,
           "]");
    alignment_ = static_cast<uint32_t>(a);
  }
  for (auto& kv : kvs_) {
    if (kv.key == key) {
      kv.value = v;  // replacing keeps the original position, so output order stays stable
      return;
    }
  }
  kvs_.push_back(GgufKV{key, v});
}

void GgufWriter::set_u32(const std::string& key, uint32_t v) {
  GgufValue x;
  x.type = GgufType::UINT32;
  x.scalar = uint64_t{v};
  set_value(key, x);
}
void GgufWriter::set_i32(const std::string& key, int32_t v) {
  GgufValue x;
  x.type = GgufType::INT32;
  x.scalar = int64_t{v};
  set_value(key, x);
}
void GgufWriter::set_u64(const std::string& key, uint64_t v) {
  GgufValue x;
  x.type = GgufType::UINT64;
  x.scalar = v;
  set_value(key, x);
}
void GgufWriter::set_f32(const std::string& key, float v) {
  GgufValue x;
  x.type = GgufType::FLOAT32;
  x.scalar = double{v};
  set_value(key, x);
}
void GgufWriter::set_bool(const std::string& key, bool v) {
  GgufValue x;
  x.type = GgufType::BOOL;
  x.scalar = v;
  set_value(key, x);
}
void GgufWriter::set_string(const std::string& key, const std::string& v) {
  GgufValue x;
  x.type = GgufType::STRING;
  x.scalar = v;
  set_value(key, x);
}
void GgufWriter::set_string_array(const std::string& key, const std::vector<std::string>& v) {
  GgufValue x;
  x.type = GgufType::ARRAY;
  x.array_type = GgufType::STRING;
  x.strings = v;
  set_value(key, x);
}
void GgufWriter::set_f32_array(const std::string& key, const std::vector<float>& v) {
  GgufValue x;
  x.type = GgufType::ARRAY;
  x.array_type = GgufType::FLOAT32;
  x.floats.assign(v.begin(), v.end());
  set_value(key, x);
}
void GgufWriter::set_i32_array(const std::string& key, const std::vector<int32_t>& v) {
  GgufValue x;
  x.type = GgufType::ARRAY;
  x.array_type = GgufType::INT32;
  x.ints.assign(v.begin(), v.end());
  set_value(key, x);
}

void GgufWriter::add_tensor(const std::string& name, GgmlType type, std::vector<int64_t> ne,
                            Fill fill) {
  const uint64_t n_bytes = tensor_bytes(name, type, ne);
  if (!fill) fail("GGUF writer: ", tensor_field(name), ": no fill callback");
  for (const auto& t : tensors_)
    if (t.name == name) fail("GGUF writer: ", tensor_field(name), ": duplicate tensor name");
  tensors_.push_back(PendingTensor{name, type, std::move(ne), n_bytes, std::move(fill)});
}

void GgufWriter::add_tensor(const std::string& name, GgmlType type, std::vector<int64_t> ne,
                            const void* data) {
  if (data == nullptr) fail("GGUF writer: ", tensor_field(name), ": null data pointer");
  const auto* src = static_cast<const uint8_t*>(data);
  add_tensor(name, type, std::move(ne),
             [src](uint8_t* dst, size_t n) { std::memcpy(dst, src, n); });
}

constexpr uint64_t kSparseSmallTensor = 1 << 20;

void GgufWriter::write(const std::string& path,
                       const std::function<void(uint64_t, uint64_t)>& progress) const {
  const uint64_t align = alignment_;
  // Offsets first: each tensor starts at the previous end rounded up to the alignment.
  std::vector<uint64_t> offsets;
  offsets.reserve(tensors_.size());
  uint64_t data_size = 0, total_payload = 0;
  for (const auto& t : tensors_) {
    const uint64_t off = align_up(data_size, align, "GGUF writer: data offset");
    offsets.push_back(off);
    data_size = checked_add<uint64_t>(off, t.n_bytes, "GGUF writer: data size");
    total_payload = checked_add<uint64_t>(total_payload, t.n_bytes, "GGUF writer: payload");
  }

  ByteSink h;
  h.put(kMagic);
  h.put<uint32_t>(3);
  h.put<uint64_t>(tensors_.size());
  h.put<uint64_t>(kvs_.size());
  for (const auto& kv : kvs_) {
    h.put_string(kv.key);
    put_value(h, kv.key, kv.value);
  }
  for (size_t i = 0; i < tensors_.size(); ++i) {
    const auto& t = tensors_[i];
    h.put_string(t.name);
    h.put<uint32_t>(static_cast<uint32_t>(t.ne.size()));
    for (int64_t x : t.ne) h.put(x);
    h.put(static_cast<uint32_t>(t.type));
    h.put(offsets[i]);
  }
  h.buf.resize(static_cast<size_t>(align_up(h.buf.size(), align, "GGUF writer: header size")), 0);

  // Written under a temporary name and renamed at the end, so a crash or a full disk never
  // leaves a half-written file under the final name.
  TmpFile tmp{path + ".tmp"};
  Fd fd(::open(tmp.path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (fd.fd < 0) {
    const int e = errno;
    fail_kind(ErrorKind::kIo, tmp.path, ": cannot create: ", errno_text(e));
  }
  write_all(fd.fd, h.buf.data(), h.buf.size(), tmp.path);

  static const uint8_t kZeros[kMaxAlignment] = {};
  uint64_t pos = 0, done = 0;
  if (sparse_) {
    // Header only; the data section becomes a hole of zeros that costs no disk blocks.
    if (::ftruncate(fd.fd, static_cast<off_t>(h.buf.size() + data_size)) != 0) {
      const int e = errno;
      fail_kind(ErrorKind::kIo, tmp.path, ": cannot extend to ", h.buf.size() + data_size, " bytes: ", errno_text(e));
    }
  }
  if (sparse_) {
    // Small tensors (norms, rope_freqs) are still written: readers validate their values.
    for (size_t i = 0; i < tensors_.size(); ++i) {
      const auto& t = tensors_[i];
      if (t.n_bytes > kSparseSmallTensor) continue;
      std::unique_ptr<uint8_t[]> buf(new uint8_t[static_cast<size_t>(t.n_bytes)]);
      t.fill(buf.get(), static_cast<size_t>(t.n_bytes));
      if (::pwrite(fd.fd, buf.get(), t.n_bytes, static_cast<off_t>(h.buf.size() + offsets[i])) !=
          static_cast<ssize_t>(t.n_bytes)) {
        const int e = errno;
        fail_kind(ErrorKind::kIo, tmp.path, ": write failed: ", errno_text(e));
      }
    }
  }
  for (size_t i = 0; i < tensors_.size() && !sparse_; ++i) {
    const auto& t = tensors_[i];
    write_all(fd.fd, kZeros, offsets[i] - pos, tmp.path);
    // Exactly n_bytes, so a Fill that overruns is caught by the sanitizers.
    std::unique_ptr<uint8_t[]> buf(new uint8_t[static_cast<size_t>(t.n_bytes)]);
    t.fill(buf.get(), static_cast<size_t>(t.n_bytes));
    write_all(fd.fd, buf.get(), t.n_bytes, tmp.path);
    pos = offsets[i] + t.n_bytes;
    done += t.n_bytes;
    if (progress) progress(done, total_payload);
  }
  if (::fsync(fd.fd) != 0) {
    const int e = errno;
    fail_kind(ErrorKind::kIo, tmp.path, ": fsync failed: ", errno_text(e));
  }
  if (::close(fd.release()) != 0) {
    const int e = errno;
    fail_kind(ErrorKind::kIo, tmp.path, ": close failed: ", errno_text(e));
  }
  if (::rename(tmp.path.c_str(), path.c_str()) != 0) {
    const int e = errno;
    fail_kind(ErrorKind::kIo, path, ": cannot rename ", tmp.path, " to it: ", errno_text(e));
  }
  tmp.keep = true;
}

}  // namespace shardlm
