// GGUF reader/writer tests. Files are built byte by byte by `Builder` below, written from the GGUF spec
// and independent of GgufWriter, so the reader is never only checked against our own writer. One broken
// file per malformation (after llama.cpp's test-gguf), every prefix of a valid file, random byte flips,
// writer->reader round trips, writer bytes == builder bytes, and the real vocabulary fixtures.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "core/error.h"
#include "formats/gguf.h"
#include "support/fixtures.h"

namespace shardlm {
namespace {

namespace fs = std::filesystem;

// GGUF value type ids, spelled out from the spec rather than taken from the enum under test.
constexpr uint32_t T_UINT8 = 0, T_INT8 = 1, T_UINT16 = 2, T_INT16 = 3, T_UINT32 = 4, T_INT32 = 5,
                   T_FLOAT32 = 6, T_BOOL = 7, T_STRING = 8, T_ARRAY = 9, T_UINT64 = 10,
                   T_INT64 = 11, T_FLOAT64 = 12;
// ggml type ids and their bytes per block / block sizes (ggml-common.h).
constexpr uint32_t G_F32 = 0, G_F16 = 1, G_Q4_0 = 2, G_Q8_0 = 8, G_Q4_K = 12, G_I32 = 26;

uint64_t ggml_bytes(uint32_t type, const std::vector<int64_t>& ne) {
  uint64_t n = 1;
  for (int64_t x : ne) n *= static_cast<uint64_t>(x);
  switch (type) {
    case G_F32: return n * 4;
    case G_F16: return n * 2;
    case G_Q4_0: return n / 32 * 18;
    case G_Q8_0: return n / 32 * 34;
    case G_Q4_K: return n / 256 * 144;
    case G_I32: return n * 4;
  }
  ADD_FAILURE() << "test has no size for ggml type " << type;
  return 0;
}

// Little-endian byte appender.
struct Bytes {
  std::vector<uint8_t> b;
  template <typename T>
  Bytes& put(T v) {
    uint8_t tmp[sizeof(T)];
    std::memcpy(tmp, &v, sizeof(T));
    b.insert(b.end(), tmp, tmp + sizeof(T));
    return *this;
  }
  Bytes& str(const std::string& s) {
    put<uint64_t>(s.size());
    b.insert(b.end(), s.begin(), s.end());
    return *this;
  }
  Bytes& append(const Bytes& o) {
    b.insert(b.end(), o.b.begin(), o.b.end());
    return *this;
  }
};

// Encoded KVs.
Bytes kv_head(const std::string& key, uint32_t type) { return Bytes().str(key).put(type); }
Bytes kv_u32(const std::string& key, uint32_t v) { return kv_head(key, T_UINT32).put(v); }
Bytes kv_str(const std::string& key, const std::string& v) { return kv_head(key, T_STRING).str(v); }
Bytes kv_str_arr(const std::string& key, const std::vector<std::string>& v) {
  Bytes b = kv_head(key, T_ARRAY).put(T_STRING).put<uint64_t>(v.size());
  for (const auto& s : v) b.str(s);
  return b;
}
Bytes kv_f32_arr(const std::string& key, const std::vector<float>& v) {
  Bytes b = kv_head(key, T_ARRAY).put(T_FLOAT32).put<uint64_t>(v.size());
  for (float x : v) b.put(x);
  return b;
}
Bytes kv_i32_arr(const std::string& key, const std::vector<int32_t>& v) {
  Bytes b = kv_head(key, T_ARRAY).put(T_INT32).put<uint64_t>(v.size());
  for (int32_t x : v) b.put(x);
  return b;
}

struct TSpec {
  std::string name;
  uint32_t type;
  std::vector<int64_t> ne;
  uint64_t offset;
  std::optional<uint32_t> n_dims;  // overrides ne.size() in the header
};

// A whole file from the spec: header, KVs, tensor infos, zero padding to `alignment`, then data bytes
// (a position pattern) up to the end of the last tensor unless `data_size` says otherwise.
struct FileSpec {
  uint32_t magic = 0x46554747;
  uint32_t version = 3;
  std::optional<uint64_t> n_tensors, n_kv;
  std::vector<Bytes> kvs;
  std::vector<TSpec> tensors;
  uint64_t alignment = 32;
  std::optional<uint64_t> data_size;

  std::vector<uint8_t> build() const {
    Bytes b;
    b.put(magic).put(version);
    b.put<uint64_t>(n_tensors.value_or(tensors.size())).put<uint64_t>(n_kv.value_or(kvs.size()));
    for (const auto& kv : kvs) b.append(kv);
    uint64_t end = 0;
    for (const auto& t : tensors) {
      b.str(t.name).put<uint32_t>(t.n_dims.value_or(static_cast<uint32_t>(t.ne.size())));
      for (int64_t x : t.ne) b.put(x);
      b.put(t.type).put(t.offset);
      if (!data_size) end = std::max(end, t.offset + ggml_bytes(t.type, t.ne));
    }
    while (b.b.size() % alignment != 0) b.b.push_back(0);
    const uint64_t n = data_size.value_or(end);
    for (uint64_t i = 0; i < n; ++i) b.b.push_back(static_cast<uint8_t>(i * 7 + 1));
    return b.b;
  }
};

// A small valid file: a 4-token vocabulary and three tensors of three types.
FileSpec valid_spec() {
  FileSpec s;
  s.kvs = {kv_str("general.architecture", "llama"),
           kv_str_arr("tokenizer.ggml.tokens", {"<unk>", "<s>", "</s>", "a"}),
           kv_f32_arr("tokenizer.ggml.scores", {0.f, -1.f, -2.f, -3.5f}),
           kv_i32_arr("tokenizer.ggml.token_type", {2, 3, 3, 1}),
           kv_u32("tokenizer.ggml.bos_token_id", 1)};
  s.tensors = {{"tok_embd.weight", G_F32, {8, 4}, 0, {}},             // 128 bytes at 0
               {"blk.0.attn_q.weight", G_Q4_0, {32, 2}, 128, {}},     // 36 bytes at 128
               {"output_norm.weight", G_F16, {8}, 192, {}}};          // 16 bytes at 192
  return s;
}

std::unique_ptr<GgufFile> parse(const std::vector<uint8_t>& b) {
  return GgufFile::from_memory(b.data(), b.size(), "test.gguf");
}

// Expects an Error whose message names the file and contains every `parts` entry.
void expect_error(const std::vector<uint8_t>& b, const std::vector<std::string>& parts,
                  std::optional<ErrorKind> kind = ErrorKind::kInvalidInput) {
  try {
    parse(b);
    ADD_FAILURE() << "expected an error containing '" << parts.at(0) << "', but the file parsed";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("test.gguf: "), std::string::npos) << msg;
    for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "missing '" << p << "' in: " << msg;
    if (kind) {
      EXPECT_EQ(static_cast<int>(e.kind()), static_cast<int>(*kind)) << msg;
    }
  }
}

TEST(GgufReader, ValidHandBuiltFile) {
  for (uint32_t version : {2u, 3u}) {
    FileSpec s = valid_spec();
    s.version = version;
    const auto b = s.build();
    auto f = parse(b);
    EXPECT_EQ(f->version(), version);
    EXPECT_EQ(f->alignment(), 32u);
    ASSERT_EQ(f->kvs().size(), 5u);
    EXPECT_EQ(f->kvs()[0].key, "general.architecture");
    EXPECT_EQ(f->get_string("general.architecture"), "llama");
    EXPECT_EQ(f->get_uint("tokenizer.ggml.bos_token_id"), 1u);
    EXPECT_EQ(f->get_string_array("tokenizer.ggml.tokens")->at(3), "a");
    EXPECT_EQ(f->get_float_array("tokenizer.ggml.scores")->at(3), -3.5);
    EXPECT_EQ(f->get_int_array("tokenizer.ggml.token_type")->at(0), 2);
    ASSERT_EQ(f->tensors().size(), 3u);
    // Data offset by hand: the header ends at b.size() - 208 data bytes (already a multiple of 32).
    EXPECT_EQ(f->data_offset(), b.size() - 208);
    const GgufTensorInfo* q = f->find_tensor("blk.0.attn_q.weight");
    ASSERT_NE(q, nullptr);
    EXPECT_EQ(q->type, GgmlType::Q4_0);
    EXPECT_EQ(q->n_dims, 2);
    EXPECT_EQ(q->ne[0], 32);
    EXPECT_EQ(q->ne[1], 2);
    EXPECT_EQ(q->ne[2], 1);
    EXPECT_EQ(q->n_elements, 64);
    EXPECT_EQ(q->n_bytes, 36u);
    EXPECT_EQ(q->offset, 128u);
    EXPECT_EQ(f->tensor_data(*q), b.data() + f->data_offset() + 128);
    EXPECT_EQ(f->tensor_data(*q)[0], static_cast<uint8_t>(128 * 7 + 1));
    EXPECT_EQ(f->find_tensor("missing"), nullptr);
    EXPECT_EQ(f->find("missing"), nullptr);
    EXPECT_EQ(f->get_uint("missing"), std::nullopt);
  }
}

TEST(GgufReader, TypedGettersRefuseWrongTypes) {
  FileSpec s = valid_spec();
  s.kvs.push_back(kv_head("neg", T_INT32).put<int32_t>(-3));
  s.kvs.push_back(kv_head("big", T_UINT64).put<uint64_t>(~uint64_t{0}));
  const auto b = s.build();
  auto f = parse(b);
  EXPECT_EQ(f->get_int("neg"), -3);
  EXPECT_EQ(f->get_uint("big"), ~uint64_t{0});
  const auto throws_naming = [](auto fn, const std::string& key) {
    try {
      fn();
      ADD_FAILURE() << "no error for " << key;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("'" + key + "'"), std::string::npos) << e.what();
    }
  };
  throws_naming([&] { f->get_uint("neg"); }, "neg");
  throws_naming([&] { f->get_int("big"); }, "big");
  throws_naming([&] { f->get_string("big"); }, "big");
  throws_naming([&] { f->get_float("general.architecture"); }, "general.architecture");
  throws_naming([&] { f->get_bool("neg"); }, "neg");
  throws_naming([&] { f->get_string_array("tokenizer.ggml.scores"); }, "tokenizer.ggml.scores");
  throws_naming([&] { f->get_float_array("tokenizer.ggml.tokens"); }, "tokenizer.ggml.tokens");
  throws_naming([&] { f->get_int_array("tokenizer.ggml.scores"); }, "tokenizer.ggml.scores");
}

// ----- one broken file per malformation -----

TEST(GgufMalformed, Header) {
  FileSpec s = valid_spec();
  s.magic = 0x46554746;  // "FGUF"
  expect_error(s.build(), {"header.magic"});
  s = valid_spec();
  s.version = 1;
  expect_error(s.build(), {"header.version", "version 1"}, ErrorKind::kUnsupported);
  s.version = 4;
  expect_error(s.build(), {"header.version", "4"}, ErrorKind::kUnsupported);
  s.version = 0x03000000;  // a big-endian v3 file
  expect_error(s.build(), {"header.version", "big-endian"}, ErrorKind::kUnsupported);
  s = valid_spec();
  s.n_tensors = uint64_t{1} << 60;
  expect_error(s.build(), {"header.n_tensors", "1152921504606846976"});
  s = valid_spec();
  s.n_kv = uint64_t{1} << 60;
  expect_error(s.build(), {"header.n_kv", "1152921504606846976"});
  s = valid_spec();
  s.n_kv = ~uint64_t{0};
  expect_error(s.build(), {"header.n_kv"});
  expect_error({}, {"empty"});
}

TEST(GgufMalformed, EveryPrefixOfAValidFileThrows) {
  const auto full = valid_spec().build();
  ASSERT_NO_THROW(parse(full));
  for (size_t n = 0; n < full.size(); ++n) {
    // A fresh allocation of exactly n bytes, so ASan catches any read past the prefix.
    std::vector<uint8_t> prefix(full.begin(), full.begin() + static_cast<std::ptrdiff_t>(n));
    EXPECT_THROW(parse(prefix), Error) << "prefix of " << n << " of " << full.size() << " bytes parsed";
  }
}

TEST(GgufMalformed, Strings) {
  FileSpec s = valid_spec();
  s.kvs.insert(s.kvs.begin(), Bytes().put<uint64_t>(uint64_t{1} << 62).put(T_UINT32).put<uint32_t>(0));
  expect_error(s.build(), {"kv[0].key", "string length 4611686018427387904"});
  s = valid_spec();
  s.kvs.push_back(kv_head("general.name", T_STRING).put<uint64_t>(1000000));
  expect_error(s.build(), {"key 'general.name'", "string length 1000000"});
  s = valid_spec();
  s.kvs.push_back(kv_str("", "x"));
  expect_error(s.build(), {"kv[5].key", "empty key"});
  s = valid_spec();
  s.kvs.push_back(kv_str("general.architecture", "again"));
  expect_error(s.build(), {"key 'general.architecture'", "duplicate key"});
  // Arbitrary bytes are fine in strings (no UTF-8 requirement); messages escape them.
  s = valid_spec();
  s.kvs.push_back(kv_str(std::string("k\xff\x01", 3), std::string("\xc3\x28\0", 3)));
  auto b = s.build();
  auto f = parse(b);
  EXPECT_EQ(f->get_string(std::string("k\xff\x01", 3)), std::string("\xc3\x28\0", 3));
  s.kvs.push_back(kv_str(std::string("k\xff\x01", 3), "dup"));
  expect_error(s.build(), {"key 'k\\xff\\x01'", "duplicate key"});
}

TEST(GgufMalformed, ValueTypes) {
  FileSpec s = valid_spec();
  s.kvs.push_back(kv_head("bad.type", 13).put<uint32_t>(0));
  expect_error(s.build(), {"key 'bad.type'", "unknown value type 13"});
  s = valid_spec();
  s.kvs.push_back(kv_head("bad.arr", T_ARRAY).put<uint32_t>(77).put<uint64_t>(1).put<uint32_t>(0));
  expect_error(s.build(), {"key 'bad.arr'", "array element type", "unknown value type 77"});
  s = valid_spec();
  s.kvs.push_back(kv_head("nested", T_ARRAY).put(T_ARRAY).put<uint64_t>(1).put(T_UINT8).put<uint64_t>(0));
  expect_error(s.build(), {"key 'nested'", "arrays of arrays"});
  s = valid_spec();
  s.kvs.push_back(kv_head("huge.arr", T_ARRAY).put(T_UINT32).put<uint64_t>(uint64_t{1} << 60));
  expect_error(s.build(), {"key 'huge.arr'", "array length 1152921504606846976"});
  s = valid_spec();
  s.kvs.push_back(kv_head("huge.strs", T_ARRAY).put(T_STRING).put<uint64_t>(uint64_t{1} << 40));
  expect_error(s.build(), {"key 'huge.strs'", "array length"});
  s = valid_spec();
  s.kvs.push_back(kv_head("flag", T_BOOL).put<uint8_t>(2));
  expect_error(s.build(), {"key 'flag'", "BOOL"});
}

TEST(GgufMalformed, Alignment) {
  const auto with_alignment = [](Bytes kv) {
    FileSpec s = valid_spec();
    s.kvs.push_back(std::move(kv));
    return s.build();
  };
  expect_error(with_alignment(kv_u32("general.alignment", 0)), {"key 'general.alignment'", "0"});
  expect_error(with_alignment(kv_u32("general.alignment", 48)), {"key 'general.alignment'", "48", "power of two"});
  expect_error(with_alignment(kv_u32("general.alignment", 1u << 21)), {"key 'general.alignment'", "2097152"});
  expect_error(with_alignment(kv_head("general.alignment", T_UINT64).put<uint64_t>(32)),
               {"key 'general.alignment'", "UINT32", "UINT64"});
  // A valid non-default alignment moves the data section and the offset rule with it.
  FileSpec s = valid_spec();
  s.kvs.push_back(kv_u32("general.alignment", 64));
  s.alignment = 64;
  s.tensors = {{"a", G_F32, {16}, 0, {}}, {"b", G_F32, {8}, 64, {}}};
  auto b = s.build();
  auto f = parse(b);
  EXPECT_EQ(f->alignment(), 64u);
  EXPECT_EQ(f->data_offset() % 64, 0u);
  EXPECT_EQ(f->data_offset(), b.size() - 96);
  s.tensors[1].offset = 96;  // a multiple of 32 but not of 64
  expect_error(s.build(), {"tensor 'b'", "offset 96 is not a multiple of the alignment 64"});
}

TEST(GgufMalformed, TensorInfos) {
  const auto with = [](auto edit) {
    FileSpec s = valid_spec();
    edit(s);
    return s.build();
  };
  expect_error(with([](FileSpec& s) { s.tensors[2].name = "tok_embd.weight"; }),
               {"tensor 'tok_embd.weight'", "duplicate tensor name"});
  expect_error(with([](FileSpec& s) { s.tensors[0].name = ""; }), {"tensor[0].name", "empty"});
  expect_error(with([](FileSpec& s) { s.tensors[1].n_dims = 0; s.tensors[1].ne = {}; }),
               {"tensor 'blk.0.attn_q.weight'", "n_dims 0"});
  expect_error(with([](FileSpec& s) { s.tensors[1].ne = {32, 2, 1, 1, 1}; }),
               {"tensor 'blk.0.attn_q.weight'", "n_dims 5"});
  expect_error(with([](FileSpec& s) { s.tensors[0].ne = {8, 0}; }), {"tensor 'tok_embd.weight'", "ne[1] = 0"});
  expect_error(with([](FileSpec& s) { s.tensors[0].ne = {-5, 4}; s.data_size = 208; }),
               {"tensor 'tok_embd.weight'", "ne[0] = -5"});
  const int64_t big = int64_t{1} << 32;
  expect_error(with([&](FileSpec& s) { s.tensors[0].ne = {big, big, big, 1}; s.data_size = 208; }),
               {"tensor 'tok_embd.weight'", "element count"});
  // Elements fit int64 (2^62) but bytes (2^64) do not.
  const int64_t b31 = int64_t{1} << 31;
  expect_error(with([&](FileSpec& s) { s.tensors[0].ne = {b31, b31}; s.data_size = 208; }),
               {"tensor 'tok_embd.weight'", "byte count"});
  expect_error(with([](FileSpec& s) { s.tensors[2].type = 4; s.data_size = 208; }),  // removed Q4_2
               {"tensor 'output_norm.weight'", "unknown ggml type 4"});
  expect_error(with([](FileSpec& s) { s.tensors[2].type = 1000; s.data_size = 208; }),
               {"tensor 'output_norm.weight'", "unknown ggml type 1000"});
  expect_error(with([](FileSpec& s) { s.tensors[1].ne = {33, 2}; s.data_size = 208; }),
               {"tensor 'blk.0.attn_q.weight'", "ne[0] = 33", "block size 32"});
}

TEST(GgufMalformed, TensorOffsets) {
  const auto with = [](auto edit) {
    FileSpec s = valid_spec();
    edit(s);
    return s.build();
  };
  expect_error(with([](FileSpec& s) { s.tensors[1].offset = 100; s.data_size = 208; }),
               {"tensor 'blk.0.attn_q.weight': offset 100 is not a multiple of the alignment 32"});
  expect_error(with([](FileSpec& s) { s.tensors[1].offset = 96; }),
               {"tensor 'blk.0.attn_q.weight'", "offset 96", "overlaps"});
  expect_error(with([](FileSpec& s) {
                 s.tensors[0].offset = 64;
                 s.tensors[1].offset = 0;
                 s.tensors[2].offset = 192;
               }),
               {"tensor 'blk.0.attn_q.weight'", "out of order"});
  expect_error(with([](FileSpec& s) { s.data_size = 207; }),
               {"tensor 'output_norm.weight'", "past the end of the file"});
  expect_error(with([](FileSpec& s) { s.tensors[2].offset = 1 << 20; s.data_size = 208; }),
               {"tensor 'output_norm.weight'", "past the end of the file"});
  expect_error(with([](FileSpec& s) { s.tensors[2].offset = ~uint64_t{31}; s.data_size = 208; }),
               {"tensor 'output_norm.weight'"});
}

TEST(GgufMalformed, Tokenizer) {
  const auto with_kv = [](size_t idx, Bytes kv) {
    FileSpec s = valid_spec();
    s.kvs[idx] = std::move(kv);
    return s.build();
  };
  expect_error(with_kv(1, kv_i32_arr("tokenizer.ggml.tokens", {1, 2, 3, 4})),
               {"key 'tokenizer.ggml.tokens'", "ARRAY of STRING", "ARRAY of INT32"});
  expect_error(with_kv(1, kv_str("tokenizer.ggml.tokens", "abcd")),
               {"key 'tokenizer.ggml.tokens'", "ARRAY of STRING"});
  Bytes f64_scores = kv_head("tokenizer.ggml.scores", T_ARRAY).put(T_FLOAT64).put<uint64_t>(4);
  for (int i = 0; i < 4; ++i) f64_scores.put(0.0);
  expect_error(with_kv(2, f64_scores), {"key 'tokenizer.ggml.scores'", "FLOAT32", "FLOAT64"});
  expect_error(with_kv(2, kv_f32_arr("tokenizer.ggml.scores", {0.f, 1.f, 2.f})),
               {"key 'tokenizer.ggml.scores'", "length 3", "4"});
  expect_error(with_kv(3, kv_f32_arr("tokenizer.ggml.token_type", {0.f, 1.f, 2.f, 3.f})),
               {"key 'tokenizer.ggml.token_type'", "INT32"});
  expect_error(with_kv(3, kv_i32_arr("tokenizer.ggml.token_type", {1, 1, 1, 1, 1})),
               {"key 'tokenizer.ggml.token_type'", "length 5"});
  expect_error(with_kv(4, kv_u32("tokenizer.ggml.bos_token_id", 4)),
               {"key 'tokenizer.ggml.bos_token_id'", "token id 4", "4 entries"});
  expect_error(with_kv(4, kv_u32("tokenizer.ggml.eot_token_id", 99)), {"key 'tokenizer.ggml.eot_token_id'", "99"});
  expect_error(with_kv(4, kv_head("tokenizer.ggml.eos_token_id", T_INT32).put<int32_t>(-1)),
               {"key 'tokenizer.ggml.eos_token_id'", "-1"});
  expect_error(with_kv(4, kv_str("tokenizer.ggml.padding_token_id", "0")),
               {"key 'tokenizer.ggml.padding_token_id'", "integer"});
  Bytes merges = kv_head("tokenizer.ggml.merges", T_ARRAY).put(T_UINT8).put<uint64_t>(1).put<uint8_t>(0);
  expect_error(with_kv(0, merges), {"key 'tokenizer.ggml.merges'", "ARRAY of STRING"});
  // Largest valid id, stored as another integer type, passes.
  auto ok = with_kv(4, kv_head("tokenizer.ggml.unknown_token_id", T_UINT16).put<uint16_t>(3));
  EXPECT_NO_THROW(parse(ok));
}

TEST(GgufMalformed, RandomByteFlipsParseOrThrow) {
  const auto valid = valid_spec().build();
  std::mt19937 rng(12345);
  int parsed = 0, rejected = 0;
  for (int i = 0; i < 3000; ++i) {
    std::vector<uint8_t> b = valid;
    const size_t pos = rng() % b.size();
    const uint8_t v = static_cast<uint8_t>(rng());
    b[pos] = v == b[pos] ? static_cast<uint8_t>(v ^ 0x80) : v;
    try {
      auto f = parse(b);
      // Whatever parsed must keep the invariants consumers rely on.
      for (const auto& t : f->tensors())
        ASSERT_LE(f->data_offset() + t.offset + t.n_bytes, f->file_size()) << t.name;
      ++parsed;
    } catch (const Error&) {
      ++rejected;
    }
  }
  // Data-byte flips parse; header flips mostly don't: both paths must have been taken.
  EXPECT_GT(parsed, 100);
  EXPECT_GT(rejected, 100);
}

// ----- files on disk -----

struct TempDir {
  fs::path dir;
  TempDir() {
    dir = fs::temp_directory_path() / ("shardlm_gguf_test_" + std::to_string(::getpid()) + "_" +
                                       ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::create_directories(dir);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
};

std::vector<uint8_t> read_all(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), {});
}

TEST(GgufOpen, FileErrors) {
  TempDir td;
  try {
    GgufFile::open((td.dir / "missing.gguf").string());
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_EQ(static_cast<int>(e.kind()), static_cast<int>(ErrorKind::kIo));
    EXPECT_NE(std::string(e.what()).find("No such file"), std::string::npos) << e.what();
  }
  try {
    GgufFile::open(td.dir.string());
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("directory"), std::string::npos) << e.what();
  }
  const fs::path empty = td.dir / "empty.gguf";
  std::ofstream(empty).close();
  try {
    GgufFile::open(empty.string());
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("empty"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(empty.string()), std::string::npos) << e.what();
  }
}

TEST(GgufOpen, RealVocabFixtures) {
  auto spm = GgufFile::open(test::fixture_path("vocab/ggml-vocab-llama-spm.gguf"));
  EXPECT_EQ(spm->version(), 3u);
  EXPECT_EQ(spm->get_string("general.architecture"), "llama");
  EXPECT_EQ(spm->get_string("tokenizer.ggml.model"), "llama");
  const auto tokens = spm->get_string_array("tokenizer.ggml.tokens");
  ASSERT_TRUE(tokens.has_value());
  ASSERT_EQ(tokens->size(), 32000u);
  EXPECT_EQ(tokens->at(0), "<unk>");
  EXPECT_EQ(tokens->at(1), "<s>");
  EXPECT_EQ(tokens->at(2), "</s>");
  EXPECT_EQ(tokens->at(3), "<0x00>");
  EXPECT_EQ(spm->get_float_array("tokenizer.ggml.scores")->size(), 32000u);
  EXPECT_EQ(spm->get_uint("tokenizer.ggml.bos_token_id"), 1u);
  EXPECT_EQ(spm->get_uint("tokenizer.ggml.eos_token_id"), 2u);
  EXPECT_EQ(spm->get_uint("llama.vocab_size"), 32000u);
  EXPECT_TRUE(spm->tensors().empty());

  auto gpt2 = GgufFile::open(test::fixture_path("vocab/ggml-vocab-gpt-2.gguf"));
  EXPECT_EQ(gpt2->version(), 3u);
  EXPECT_EQ(gpt2->get_string("tokenizer.ggml.model"), "gpt2");
  const auto gtok = gpt2->get_string_array("tokenizer.ggml.tokens");
  ASSERT_EQ(gtok->size(), 50257u);
  EXPECT_EQ(gtok->at(50256), "<|endoftext|>");
  EXPECT_EQ(gtok->at(0), "!");
  EXPECT_EQ(gpt2->get_string_array("tokenizer.ggml.merges")->size(), 50000u);
  EXPECT_EQ(gpt2->get_uint("tokenizer.ggml.bos_token_id"), 50256u);
}

// ----- writer -----

// The writer, given the same content as valid_spec(), must produce exactly the builder's bytes.
TEST(GgufWriter, MatchesHandBuiltBytes) {
  TempDir td;
  const FileSpec s = valid_spec();
  auto expected = s.build();
  // The writer pads between tensors with zeros where the builder put its pattern: bytes [164, 192)
  // of the 208-byte data section (q4_0 tensor ends at 128 + 36, the next starts at 192).
  const size_t data_start = expected.size() - 208;
  std::fill(expected.begin() + static_cast<std::ptrdiff_t>(data_start + 164),
            expected.begin() + static_cast<std::ptrdiff_t>(data_start + 192), 0);
  auto ref = parse(expected);
  GgufWriter w;
  w.set_string("general.architecture", "llama");
  w.set_string_array("tokenizer.ggml.tokens", {"<unk>", "<s>", "</s>", "a"});
  w.set_f32_array("tokenizer.ggml.scores", {0.f, -1.f, -2.f, -3.5f});
  w.set_i32_array("tokenizer.ggml.token_type", {2, 3, 3, 1});
  w.set_u32("tokenizer.ggml.bos_token_id", 1);
  for (const auto& t : ref->tensors()) {
    std::vector<int64_t> ne(t.ne.begin(), t.ne.begin() + t.n_dims);
    w.add_tensor(t.name, t.type, ne, ref->tensor_data(t));
  }
  const fs::path out = td.dir / "w.gguf";
  w.write(out.string());
  EXPECT_EQ(read_all(out), expected);
  EXPECT_FALSE(fs::exists(out.string() + ".tmp"));
}

GgufValue scalar(GgufType t, std::variant<std::monostate, uint64_t, int64_t, double, bool, std::string> v) {
  GgufValue x;
  x.type = t;
  x.scalar = std::move(v);
  return x;
}

TEST(GgufWriter, RoundTripEveryTypeAndTensorType) {
  TempDir td;
  GgufWriter w;
  w.set_alignment(64);
  w.set_value("u8", scalar(GgufType::UINT8, uint64_t{255}));
  w.set_value("i8", scalar(GgufType::INT8, int64_t{-128}));
  w.set_value("u16", scalar(GgufType::UINT16, uint64_t{65535}));
  w.set_value("i16", scalar(GgufType::INT16, int64_t{-32768}));
  w.set_u32("u32", 4000000000u);
  w.set_i32("i32", -2000000000);
  w.set_f32("f32", 0.1f);
  w.set_bool("bool", true);
  w.set_string("str", std::string("x\0y", 3));
  w.set_u64("u64", ~uint64_t{0});
  w.set_value("i64", scalar(GgufType::INT64, int64_t{-(int64_t{1} << 62)}));
  w.set_value("f64", scalar(GgufType::FLOAT64, 1.0 / 3.0));
  w.set_u32("replaced", 1);
  const std::vector<GgufType> int_elems = {GgufType::UINT8, GgufType::INT8,  GgufType::UINT16,
                                           GgufType::INT16, GgufType::UINT32, GgufType::INT32,
                                           GgufType::UINT64, GgufType::INT64, GgufType::BOOL};
  for (GgufType et : int_elems) {
    GgufValue a;
    a.type = GgufType::ARRAY;
    a.array_type = et;
    a.ints = et == GgufType::BOOL ? std::vector<int64_t>{1, 0, 1}
             : (et == GgufType::UINT8 || et == GgufType::UINT16 || et == GgufType::UINT32 || et == GgufType::UINT64)
                 ? std::vector<int64_t>{0, 1, 200}
                 : std::vector<int64_t>{-100, 0, 100};
    w.set_value(std::string("arr.") + gguf_type_name(et), a);
  }
  GgufValue f64a;
  f64a.type = GgufType::ARRAY;
  f64a.array_type = GgufType::FLOAT64;
  f64a.floats = {1e300, -0.5};
  w.set_value("arr.FLOAT64", f64a);
  w.set_f32_array("arr.FLOAT32", {1.5f, -2.25f});
  w.set_string_array("arr.STRING", {"", "a", std::string("\xff\0", 2)});
  w.set_i32_array("arr.empty", {});
  w.set_u32("replaced", 2);  // replaces in place: stays before the arrays

  struct T {
    std::string name;
    GgmlType type;
    std::vector<int64_t> ne;
    uint64_t n_bytes;  // by hand from ggml block sizes
  };
  const std::vector<T> ts = {{"f32.1d", GgmlType::F32, {3}, 12},
                             {"f16.2d", GgmlType::F16, {5, 3}, 30},
                             {"q4_0.3d", GgmlType::Q4_0, {64, 2, 2}, 2 * 18 * 4},
                             {"q8_0.4d", GgmlType::Q8_0, {32, 1, 2, 3}, 34 * 6},
                             {"q4_K", GgmlType::Q4_K, {256, 2}, 144 * 2},
                             {"i32", GgmlType::I32, {7}, 28}};
  std::vector<std::pair<uint64_t, uint64_t>> progress;
  for (size_t i = 0; i < ts.size(); ++i)
    w.add_tensor(ts[i].name, ts[i].type, ts[i].ne, [i](uint8_t* dst, size_t n) {
      for (size_t k = 0; k < n; ++k) dst[k] = static_cast<uint8_t>(k * 31 + i);
    });
  const fs::path out = td.dir / "rt.gguf";
  w.write(out.string(), [&](uint64_t done, uint64_t total) { progress.emplace_back(done, total); });

  auto f = GgufFile::open(out.string());
  EXPECT_EQ(f->version(), 3u);
  EXPECT_EQ(f->alignment(), 64u);
  EXPECT_EQ(f->kvs()[0].key, "general.alignment");
  EXPECT_EQ(f->get_uint("u8"), 255u);
  EXPECT_EQ(f->find("u8")->type, GgufType::UINT8);
  EXPECT_EQ(f->get_int("i8"), -128);
  EXPECT_EQ(f->find("i8")->type, GgufType::INT8);
  EXPECT_EQ(f->get_uint("u16"), 65535u);
  EXPECT_EQ(f->get_int("i16"), -32768);
  EXPECT_EQ(f->get_uint("u32"), 4000000000u);
  EXPECT_EQ(f->get_int("i32"), -2000000000);
  EXPECT_EQ(f->get_float("f32"), static_cast<double>(0.1f));
  EXPECT_EQ(f->get_bool("bool"), true);
  EXPECT_EQ(f->get_string("str"), std::string("x\0y", 3));
  EXPECT_EQ(f->get_uint("u64"), ~uint64_t{0});
  EXPECT_EQ(f->get_int("i64"), -(int64_t{1} << 62));
  EXPECT_EQ(f->get_float("f64"), 1.0 / 3.0);
  EXPECT_EQ(f->get_uint("replaced"), 2u);
  EXPECT_EQ(f->kvs()[13].key, "replaced");
  for (GgufType et : int_elems) {
    const std::string key = std::string("arr.") + gguf_type_name(et);
    const GgufValue* v = f->find(key);
    ASSERT_NE(v, nullptr) << key;
    EXPECT_EQ(v->array_type, et) << key;
    if (et == GgufType::BOOL) {
      EXPECT_EQ(v->ints, (std::vector<int64_t>{1, 0, 1}));
    } else {
      EXPECT_EQ(f->get_int_array(key)->at(2), v->ints[0] == 0 ? 200 : 100) << key;
      EXPECT_EQ(v->array_size(), 3u);
    }
  }
  EXPECT_EQ(*f->get_float_array("arr.FLOAT64"), (std::vector<double>{1e300, -0.5}));
  EXPECT_EQ(*f->get_float_array("arr.FLOAT32"), (std::vector<double>{1.5, -2.25}));
  EXPECT_EQ(*f->get_string_array("arr.STRING"), (std::vector<std::string>{"", "a", std::string("\xff\0", 2)}));
  EXPECT_EQ(f->find("arr.empty")->array_size(), 0u);

  ASSERT_EQ(f->tensors().size(), ts.size());
  uint64_t expect_off = 0;
  const auto bytes = read_all(out);
  EXPECT_EQ(f->data_offset() % 64, 0u);
  for (size_t i = 0; i < ts.size(); ++i) {
    const GgufTensorInfo& t = f->tensors()[i];
    EXPECT_EQ(t.name, ts[i].name);
    EXPECT_EQ(t.type, ts[i].type);
    EXPECT_EQ(t.n_dims, static_cast<int>(ts[i].ne.size()));
    EXPECT_EQ(t.n_bytes, ts[i].n_bytes) << t.name;
    EXPECT_EQ(t.offset, expect_off) << t.name;
    for (uint64_t k = 0; k < t.n_bytes; ++k)
      ASSERT_EQ(bytes[f->data_offset() + t.offset + k], static_cast<uint8_t>(k * 31 + i)) << t.name << " byte " << k;
    // Padding between tensors is zero.
    const uint64_t next = (expect_off + t.n_bytes + 63) / 64 * 64;
    if (i + 1 < ts.size()) {
      for (uint64_t k = expect_off + t.n_bytes; k < next; ++k) ASSERT_EQ(bytes[f->data_offset() + k], 0) << k;
    }
    expect_off = next;
  }
  ASSERT_EQ(progress.size(), ts.size());
  uint64_t total = 0, done = 0;
  for (const auto& t : ts) total += t.n_bytes;
  for (size_t i = 0; i < ts.size(); ++i) {
    done += ts[i].n_bytes;
    EXPECT_EQ(progress[i], std::make_pair(done, total));
  }
}

TEST(GgufWriter, RejectsBadInput) {
  GgufWriter w;
  EXPECT_THROW(w.set_u32("", 1), Error);
  EXPECT_THROW(w.set_alignment(0), Error);
  EXPECT_THROW(w.set_alignment(48), Error);
  EXPECT_THROW(w.set_alignment(1u << 21), Error);
  EXPECT_THROW(w.set_value("general.alignment", scalar(GgufType::UINT64, uint64_t{32})), Error);
  EXPECT_THROW(w.set_value("x", scalar(GgufType::UINT8, uint64_t{256})), Error);
  EXPECT_THROW(w.set_value("x", scalar(GgufType::INT16, int64_t{40000})), Error);
  EXPECT_THROW(w.set_value("x", scalar(GgufType::STRING, uint64_t{1})), Error);
  EXPECT_THROW(w.set_value("x", scalar(static_cast<GgufType>(13), uint64_t{1})), Error);
  GgufValue nested;
  nested.type = GgufType::ARRAY;
  nested.array_type = GgufType::ARRAY;
  EXPECT_THROW(w.set_value("x", nested), Error);
  const auto fill = [](uint8_t*, size_t) {};
  EXPECT_THROW(w.add_tensor("t", GgmlType::F32, {}, fill), Error);
  EXPECT_THROW(w.add_tensor("t", GgmlType::F32, {1, 1, 1, 1, 1}, fill), Error);
  EXPECT_THROW(w.add_tensor("t", GgmlType::F32, {4, 0}, fill), Error);
  EXPECT_THROW(w.add_tensor("t", GgmlType::F32, {-4}, fill), Error);
  EXPECT_THROW(w.add_tensor("t", GgmlType::Q4_0, {33}, fill), Error);
  EXPECT_THROW(w.add_tensor("", GgmlType::F32, {4}, fill), Error);
  EXPECT_THROW(w.add_tensor("t", GgmlType::F32, {int64_t{1} << 62, 4}, fill), Error);
  w.add_tensor("t", GgmlType::F32, {4}, fill);
  try {
    w.add_tensor("t", GgmlType::F32, {4}, fill);
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("tensor 't'"), std::string::npos) << e.what();
  }
}

TEST(GgufWriter, FailuresLeaveNoFileUnderTheFinalName) {
  TempDir td;
  // A Fill that throws (e.g. a source file read error) aborts the write.
  GgufWriter w;
  w.add_tensor("t", GgmlType::F32, {4}, [](uint8_t*, size_t) { throw Error("fill failed"); });
  const fs::path out = td.dir / "f.gguf";
  EXPECT_THROW(w.write(out.string()), Error);
  EXPECT_FALSE(fs::exists(out));
  EXPECT_FALSE(fs::exists(out.string() + ".tmp"));
  // Unwritable location: kIo with the reason.
  try {
    GgufWriter().write((td.dir / "no" / "such" / "dir.gguf").string());
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_EQ(static_cast<int>(e.kind()), static_cast<int>(ErrorKind::kIo));
    EXPECT_NE(std::string(e.what()).find("No such file"), std::string::npos) << e.what();
  }
}

// Disk full stands in as a file-size limit: write() then fails with EFBIG, like ENOSPC mid-file.
TEST(GgufWriter, WriteErrorIsIoError) {
  TempDir td;
  GgufWriter w;
  std::vector<uint8_t> payload(1 << 20, 7);
  w.add_tensor("big", GgmlType::I8, {static_cast<int64_t>(payload.size())}, payload.data());
  const fs::path out = td.dir / "full.gguf";
  rlimit old{};
  ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &old), 0);
  rlimit lim = old;
  lim.rlim_cur = 64 * 1024;
  auto old_handler = signal(SIGXFSZ, SIG_IGN);
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &lim), 0);
  std::optional<Error> err;
  try {
    w.write(out.string());
  } catch (const Error& e) {
    err = e;
  }
  setrlimit(RLIMIT_FSIZE, &old);
  signal(SIGXFSZ, old_handler);
  ASSERT_TRUE(err.has_value());
  EXPECT_EQ(static_cast<int>(err->kind()), static_cast<int>(ErrorKind::kIo)) << err->what();
  EXPECT_NE(std::string(err->what()).find("write failed"), std::string::npos) << err->what();
  EXPECT_FALSE(fs::exists(out));
  EXPECT_FALSE(fs::exists(out.string() + ".tmp"));
}

}  // namespace
}  // namespace shardlm
