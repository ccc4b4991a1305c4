#include "formats/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <set>
#include <nlohmann/json.hpp>

#include "core/error.h"

namespace shardlm {

using nlohmann::json;

namespace {

// Offset of the first byte that breaks UTF-8 (overlong forms, surrogates and code points past U+10FFFF
// included), or nullopt when the text is valid.
std::optional<size_t> utf8_error(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    const unsigned c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    unsigned cp;
    if ((c & 0xE0) == 0xC0) {
      len = 2;
      cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3;
      cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4;
      cp = c & 0x07;
    } else {
      return i;
    }
    if (i + len > n) return i;
    for (size_t k = 1; k < len; ++k) {
      if ((p[i + k] & 0xC0) != 0x80) return i;
      cp = (cp << 6) | (p[i + k] & 0x3F);
    }
    static constexpr unsigned kMinForLen[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < kMinForLen[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return i;
    i += len;
  }
  return std::nullopt;
}

const char* json_type(const json& j) { return j.type_name(); }

// safetensors dtypes that are well-formed but that we have no kernels for; named apart from unknown
// spellings so the error says "unsupported" rather than "corrupt".
bool known_unsupported_dtype(const std::string& d) {
  static const std::set<std::string> kKnown = {"BOOL", "U8",  "I8",      "I16",     "U16",
                                               "I32",  "U32", "I64",     "U64",     "F64",
                                               "C64",  "F4",  "F6_E2M3", "F6_E3M2", "F8_E4M3",
                                               "F8_E5M2", "F8_E8M0"};
  return kKnown.count(d) != 0;
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

// Owns a read-only file descriptor until the mapping exists.
struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

}  // namespace

json parse_json_checked(std::string_view text, const std::string& name) {
  if (auto bad = utf8_error(text))
    fail(name, ": not valid UTF-8 at byte ", *bad, " (JSON text must be UTF-8)");
  // One set of seen keys per open object; nlohmann reports keys through the callback before it stores
  // them, which is the only point where a duplicate is still visible.
  std::vector<std::set<std::string>> open_objects;
  std::string duplicate;
  json::parser_callback_t cb = [&](int /*depth*/, json::parse_event_t ev, json& parsed) {
    switch (ev) {
      case json::parse_event_t::object_start:
        open_objects.emplace_back();
        break;
      case json::parse_event_t::object_end:
        if (!open_objects.empty()) open_objects.pop_back();
        break;
      case json::parse_event_t::key:
        if (!open_objects.empty() && parsed.is_string() &&
            !open_objects.back().insert(parsed.get<std::string>()).second && duplicate.empty())
          duplicate = parsed.get<std::string>();
        break;
      default:
        break;
    }
    return true;
  };
  json j;
  try {
    j = json::parse(text.begin(), text.end(), cb, /*allow_exceptions=*/true, /*ignore_comments=*/false);
  } catch (const json::exception& e) {
    fail(name, ": not valid JSON: ", e.what());
  }
  if (!duplicate.empty()) fail(name, ": duplicate JSON key '", duplicate, "'");
  return j;
}

std::string read_small_file(const std::string& path, uint64_t max_bytes) {
  std::error_code ec;
  const auto size = std::filesystem::file_size(path, ec);
  if (ec) fail_kind(ErrorKind::kIo, path, ": cannot read: ", ec.message());
  if (size > max_bytes)
    fail(path, ": file is ", size, " bytes, more than the limit of ", max_bytes, " for this kind of file");
  std::ifstream in(path, std::ios::binary);
  if (!in) fail_kind(ErrorKind::kIo, path, ": cannot open: ", std::strerror(errno));
  std::string text(size, '\0');
  if (!in.read(text.data(), static_cast<std::streamsize>(size)))
    fail_kind(ErrorKind::kIo, path, ": read failed");
  return text;
}

// ---------------------------------------------------------------------------------------------------
// SafetensorsFile

std::unique_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  Fd f;
  f.fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (f.fd < 0) fail_kind(ErrorKind::kIo, path, ": cannot open: ", std::strerror(errno));
  struct stat st {};
  if (::fstat(f.fd, &st) != 0) fail_kind(ErrorKind::kIo, path, ": cannot stat: ", std::strerror(errno));
  if (!S_ISREG(st.st_mode)) fail_kind(ErrorKind::kIo, path, ": not a regular file");
  std::unique_ptr<SafetensorsFile> r(new SafetensorsFile());
  r->path_ = path;
  r->size_ = static_cast<uint64_t>(st.st_size);
  if (r->size_ > 0) {
    void* m = ::mmap(nullptr, r->size_, PROT_READ, MAP_PRIVATE, f.fd, 0);
    if (m == MAP_FAILED) fail_kind(ErrorKind::kIo, path, ": mmap failed: ", std::strerror(errno));
    r->mapping_ = m;
    r->base_ = static_cast<const uint8_t*>(m);
  }
  r->parse();  // on throw, r's destructor unmaps
  return r;
}

std::unique_ptr<SafetensorsFile> SafetensorsFile::from_memory(const uint8_t* data, size_t size,
                                                              std::string name) {
  std::unique_ptr<SafetensorsFile> r(new SafetensorsFile());
  r->path_ = std::move(name);
  r->base_ = data;
  r->size_ = size;
  r->parse();
  return r;
}

SafetensorsFile::~SafetensorsFile() {
  if (mapping_ != nullptr) ::munmap(mapping_, size_);
}

const SafetensorsTensor* SafetensorsFile::find(std::string_view name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

void SafetensorsFile::parse() {
  const std::string& p = path_;
  if (size_ < 8) fail(p, ": file is ", size_, " bytes, too short for the 8-byte header length");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | base_[i];  // little-endian whatever the host
  if (n > kSafetensorsMaxHeader)
    fail(p, ": header length ", n, " exceeds the limit of ", kSafetensorsMaxHeader, " bytes");
  if (n > size_ - 8)
    fail(p, ": header length ", n, " runs past the end of the file (", size_ - 8,
         " bytes follow the length field)");
  if (n == 0) fail(p, ": header length is 0 (the header must be a JSON object)");
  header_size_ = n;
  const std::string_view text(reinterpret_cast<const char*>(base_ + 8), n);
  const json h = parse_json_checked(text, p + " header");
  if (!h.is_object()) fail(p, ": header is a JSON ", json_type(h), ", expected an object");

  const uint64_t data_size = size_ - 8 - n;
  for (const auto& [key, v] : h.items()) {
    if (key == "__metadata__") {
      if (!v.is_object()) fail(p, ": __metadata__ is a JSON ", json_type(v), ", expected an object");
      for (const auto& [mk, mv] : v.items()) {
        if (!mv.is_string())
          fail(p, ": __metadata__ entry '", mk, "' is a JSON ", json_type(mv), ", expected a string");
        metadata_[mk] = mv.get<std::string>();
      }
      continue;
    }
    if (key.empty()) fail(p, ": a tensor has an empty name");
    if (!v.is_object())
      fail(p, ": tensor '", key, "': entry is a JSON ", json_type(v), ", expected an object");
    for (const auto& [field, unused] : v.items()) {
      (void)unused;
      if (field != "dtype" && field != "shape" && field != "data_offsets")
        fail(p, ": tensor '", key, "': unknown field '", field, "' (expected dtype, shape, data_offsets)");
    }
    for (const char* field : {"dtype", "shape", "data_offsets"})
      if (!v.contains(field)) fail(p, ": tensor '", key, "': missing field '", field, "'");

    SafetensorsTensor t;
    t.name = key;
    const json& dt = v["dtype"];
    if (!dt.is_string()) fail(p, ": tensor '", key, "': dtype is a JSON ", json_type(dt), ", expected a string");
    const std::string d = dt.get<std::string>();
    if (d == "F32") {
      t.type = GgmlType::F32;
    } else if (d == "F16") {
      t.type = GgmlType::F16;
    } else if (d == "BF16") {
      t.type = GgmlType::BF16;
    } else if (known_unsupported_dtype(d)) {
      fail_kind(ErrorKind::kUnsupported, p, ": tensor '", key, "': dtype '", d,
                "' is not supported (supported: F32, F16, BF16)");
    } else {
      fail(p, ": tensor '", key, "': unknown dtype '", d, "'");
    }

    const json& sh = v["shape"];
    if (!sh.is_array()) fail(p, ": tensor '", key, "': shape is a JSON ", json_type(sh), ", expected an array");
    // Eight dimensions is far beyond any weight we load; the cap only bounds the work on a corrupt file.
    if (sh.size() > 8) fail(p, ": tensor '", key, "': shape has ", sh.size(), " dimensions, the limit is 8");
    int64_t elems = 1;
    for (size_t i = 0; i < sh.size(); ++i) {
      const json& e = sh[i];
      // nlohmann types a non-negative integer literal as unsigned; -1 is signed and 2.0 is a float.
      if (!e.is_number_unsigned())
        fail(p, ": tensor '", key, "': shape[", i, "] = ", e.dump(), " is not a non-negative integer");
      const int64_t dim = checked_cast<int64_t>(e.get<uint64_t>(), cat(p, ": tensor '", key, "': shape[", i, "]"));
      t.shape.push_back(dim);
      elems = checked_mul(elems, dim, cat(p, ": tensor '", key, "': element count"));
    }
    t.n_elements = elems;
    const uint64_t need = checked_mul(static_cast<uint64_t>(elems), static_cast<uint64_t>(type_size(t.type)),
                                      cat(p, ": tensor '", key, "': byte count"));

    const json& off = v["data_offsets"];
    if (!off.is_array() || off.size() != 2)
      fail(p, ": tensor '", key, "': data_offsets is ", off.dump(), ", expected [begin, end]");
    for (size_t i = 0; i < 2; ++i)
      if (!off[i].is_number_unsigned())
        fail(p, ": tensor '", key, "': data_offsets[", i, "] = ", off[i].dump(), " is not a non-negative integer");
    const uint64_t begin = off[0].get<uint64_t>();
    const uint64_t end = off[1].get<uint64_t>();
    if (end < begin)
      fail(p, ": tensor '", key, "': data_offsets end ", end, " is before begin ", begin);
    if (end - begin != need)
      fail(p, ": tensor '", key, "': data_offsets [", begin, ", ", end, "] span ", end - begin,
           " bytes but dtype ", d, " x shape ", shape_str(t.shape), " needs ", need, " bytes");
    if (end > data_size)
      fail(p, ": tensor '", key, "': data_offsets end ", end, " is past the data section of ", data_size,
           " bytes (file truncated?)");
    t.offset = begin;
    t.n_bytes = need;
    tensors_.push_back(std::move(t));
  }

  // The byte ranges must tile the data section: sorted by begin, each starts where the previous ended.
  std::sort(tensors_.begin(), tensors_.end(), [](const SafetensorsTensor& a, const SafetensorsTensor& b) {
    if (a.offset != b.offset) return a.offset < b.offset;
    if (a.n_bytes != b.n_bytes) return a.n_bytes < b.n_bytes;
    return a.name < b.name;
  });
  uint64_t expected = 0;
  const SafetensorsTensor* prev = nullptr;
  for (const auto& t : tensors_) {
    if (t.offset < expected)
      fail(p, ": tensor '", t.name, "': data_offsets begin ", t.offset, " overlaps tensor '", prev->name,
           "', which ends at ", expected);
    if (t.offset > expected)
      fail(p, ": tensor '", t.name, "': data_offsets begin ", t.offset, " leaves a gap of ",
           t.offset - expected, " bytes after ", prev ? cat("tensor '", prev->name, "'") : std::string("the header"),
           " (which ends at ", expected, ")");
    expected = t.offset + t.n_bytes;
    prev = &t;
  }
  if (expected != data_size)
    fail(p, ": ", data_size - expected, " trailing bytes: the data section is ", data_size,
         " bytes but the tensors cover only ", expected);

  const uint8_t* data = base_ + 8 + n;
  for (size_t i = 0; i < tensors_.size(); ++i) {
    tensors_[i].data = data + tensors_[i].offset;
    index_.emplace(tensors_[i].name, i);
  }
}

// ---------------------------------------------------------------------------------------------------
// Sharded checkpoints

namespace {

// An index holds one line per tensor; 100 MB is thousands of times what the largest models need.
constexpr uint64_t kMaxIndexBytes = 100'000'000;

void check_shard_name(const std::string& shard, const std::string& tensor, const std::string& name) {
  const bool bad = shard.empty() || shard == "." || shard == ".." ||
                   shard.find('/') != std::string::npos || shard.find('\\') != std::string::npos ||
                   shard.find('\0') != std::string::npos || shard.find("..") != std::string::npos;
  if (bad)
    fail(name, ": weight_map['", tensor, "'] = '", shard,
         "' is not a plain file name in the checkpoint directory (no path separators or '..')");
  static constexpr std::string_view kExt = ".safetensors";
  if (shard.size() <= kExt.size() || shard.compare(shard.size() - kExt.size(), kExt.size(), kExt) != 0)
    fail(name, ": weight_map['", tensor, "'] = '", shard, "' does not end in .safetensors");
}

}  // namespace

std::map<std::string, std::string> parse_safetensors_index(std::string_view json_text,
                                                           const std::string& name) {
  const json j = parse_json_checked(json_text, name);
  if (!j.is_object()) fail(name, ": is a JSON ", json_type(j), ", expected an object");
  auto it = j.find("weight_map");
  if (it == j.end()) fail(name, ": missing field 'weight_map'");
  if (!it->is_object()) fail(name, ": weight_map is a JSON ", json_type(*it), ", expected an object");
  if (it->empty()) fail(name, ": weight_map is empty");
  std::map<std::string, std::string> map;
  for (const auto& [tensor, shard] : it->items()) {
    if (tensor.empty()) fail(name, ": weight_map has an empty tensor name");
    if (!shard.is_string())
      fail(name, ": weight_map['", tensor, "'] is a JSON ", json_type(shard), ", expected a file name");
    const std::string s = shard.get<std::string>();
    check_shard_name(s, tensor, name);
    map.emplace(tensor, s);
  }
  return map;
}

std::unique_ptr<SafetensorsCheckpoint> SafetensorsCheckpoint::open_dir(const std::string& dir) {
  namespace fs = std::filesystem;
  auto r = std::make_unique<SafetensorsCheckpoint>();
  r->dir_ = dir;
  const fs::path index_path = fs::path(dir) / "model.safetensors.index.json";
  const fs::path single_path = fs::path(dir) / "model.safetensors";
  std::error_code ec;
  if (fs::exists(index_path, ec)) {
    r->sharded_ = true;
    const std::string iname = index_path.string();
    const auto weight_map = parse_safetensors_index(read_small_file(iname, kMaxIndexBytes), iname);
    std::map<std::string, const SafetensorsFile*> shards;
    for (const auto& [tensor, shard] : weight_map) {
      if (shards.count(shard)) continue;
      const fs::path sp = fs::path(dir) / shard;
      if (!fs::is_regular_file(sp, ec))
        fail(iname, ": shard '", shard, "' (named for tensor '", tensor, "') does not exist in ", dir);
      r->files_.push_back(SafetensorsFile::open(sp.string()));
      shards[shard] = r->files_.back().get();
    }
    for (const auto& [tensor, shard] : weight_map)
      if (shards.at(shard)->find(tensor) == nullptr)
        fail(iname, ": tensor '", tensor, "' is missing: the index places it in shard '", shard,
             "', which does not contain it");
    for (const auto& [shard, file] : shards) {
      for (const auto& t : file->tensors()) {
        auto w = weight_map.find(t.name);
        if (w == weight_map.end())
          fail(file->path(), ": holds tensor '", t.name, "', which ", iname, " does not list (unexpected tensor)");
        if (w->second != shard)
          fail(file->path(), ": holds tensor '", t.name, "', which ", iname, " places in shard '", w->second,
               "' (duplicate tensor)");
        r->tensors_.push_back(&t);
      }
    }
  } else if (fs::exists(single_path, ec)) {
    r->files_.push_back(SafetensorsFile::open(single_path.string()));
    for (const auto& t : r->files_.back()->tensors()) r->tensors_.push_back(&t);
  } else {
    fail_kind(ErrorKind::kIo, dir, ": no model.safetensors.index.json or model.safetensors found");
  }
  std::sort(r->tensors_.begin(), r->tensors_.end(),
            [](const SafetensorsTensor* a, const SafetensorsTensor* b) { return a->name < b->name; });
  return r;
}

const SafetensorsTensor* SafetensorsCheckpoint::find(std::string_view name) const {
  auto it = std::lower_bound(tensors_.begin(), tensors_.end(), name,
                             [](const SafetensorsTensor* t, std::string_view n) { return t->name < n; });
  return (it != tensors_.end() && (*it)->name == name) ? *it : nullptr;
}

}  // namespace shardlm
