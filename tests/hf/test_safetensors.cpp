// safetensors reader: one hand-made broken file per malformation (each must be refused with a message
// naming the problem), hand-made good files, and the transformers-written fixtures.
#include <gtest/gtest.h>

#include <cstring>

#include "formats/safetensors.h"
#include "hf_test_util.h"

namespace shardlm {
namespace {

using test::expect_error;
using test::st_bytes;

std::unique_ptr<SafetensorsFile> parse(const std::vector<uint8_t>& b) {
  return SafetensorsFile::from_memory(b.data(), b.size(), "mem.safetensors");
}

void expect_bad(const std::string& header, uint64_t data_bytes, const std::vector<std::string>& needles,
                std::optional<ErrorKind> kind = std::nullopt) {
  const auto b = st_bytes(header, data_bytes);
  expect_error([&] { parse(b); }, needles, kind);
}

// Two F32 tensors of 2 elements (8 bytes each) tiling 16 data bytes.
const char* kGood2 =
    R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})";

TEST(Safetensors, GoodHandMadeFile) {
  const std::string h =
      R"({"__metadata__":{"format":"pt"},"w":{"dtype":"BF16","shape":[2,3],"data_offsets":[4,16]},)"
      R"("s":{"dtype":"F32","shape":[],"data_offsets":[0,4]},"e":{"dtype":"F16","shape":[0,5],"data_offsets":[16,16]}})";
  const auto b = st_bytes(h, 16);
  auto f = parse(b);
  ASSERT_EQ(f->tensors().size(), 3u);
  // Sorted by offset: s [0,4), e/w by (offset, size).
  EXPECT_EQ(f->tensors()[0].name, "s");
  EXPECT_EQ(f->tensors()[0].n_elements, 1);  // a scalar
  const SafetensorsTensor* w = f->find("w");
  ASSERT_NE(w, nullptr);
  EXPECT_EQ(w->type, GgmlType::BF16);
  EXPECT_EQ(w->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(w->n_elements, 6);
  EXPECT_EQ(w->n_bytes, 12u);
  EXPECT_EQ(w->data, b.data() + 8 + h.size() + 4);
  const SafetensorsTensor* e = f->find("e");
  ASSERT_NE(e, nullptr);
  EXPECT_EQ(e->n_elements, 0);
  EXPECT_EQ(f->metadata().at("format"), "pt");
  EXPECT_EQ(f->find("nope"), nullptr);
  EXPECT_EQ(f->header_size(), h.size());
}

TEST(Safetensors, OutOfOrderEntriesThatTileAreFine) {
  // JSON key order (and nlohmann's sorted order) differs from offset order; only the tiling matters.
  const std::string h =
      R"({"z":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[3],"data_offsets":[4,16]}})";
  auto f = parse(st_bytes(h, 16));
  ASSERT_EQ(f->tensors().size(), 2u);
  EXPECT_EQ(f->tensors()[0].name, "z");
  EXPECT_EQ(f->tensors()[1].name, "a");
}

TEST(Safetensors, HeaderWithTrailingSpacesIsFine) {
  // The Rust writer pads the header with spaces to 8-byte alignment.
  auto f = parse(st_bytes(std::string(kGood2) + "     ", 16));
  EXPECT_EQ(f->tensors().size(), 2u);
}

TEST(SafetensorsBad, TooShortForLength) {
  const std::vector<uint8_t> b = {1, 0, 0};
  expect_error([&] { parse(b); }, {"mem.safetensors", "too short"});
}

TEST(SafetensorsBad, HeaderLengthPastEof) {
  const auto b = st_bytes(kGood2, 16, 1000);
  expect_error([&] { parse(b); }, {"header length 1000", "past the end"});
}

TEST(SafetensorsBad, HeaderLengthHuge) {
  const auto b = st_bytes(kGood2, 16, uint64_t{1} << 62);
  expect_error([&] { parse(b); }, {"header length", "exceeds the limit of 100000000"});
}

TEST(SafetensorsBad, HeaderLengthZero) {
  const auto b = st_bytes("", 0);
  expect_error([&] { parse(b); }, {"header length is 0"});
}

TEST(SafetensorsBad, InvalidUtf8) {
  expect_bad("{\"a\xff\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, {"UTF-8", "byte 3"});
  // An overlong encoding of '/' is invalid too, even though every byte looks like UTF-8.
  expect_bad("{\"a\xc0\xaf\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, {"UTF-8"});
}

TEST(SafetensorsBad, NotJson) {
  expect_bad(R"({"a":{"dtype":"F32",)", 0, {"not valid JSON"});
  expect_bad("garbage", 0, {"not valid JSON"});
}

TEST(SafetensorsBad, JsonArray) { expect_bad("[1,2]", 0, {"header is a JSON array", "expected an object"}); }

TEST(SafetensorsBad, DuplicateKey) {
  expect_bad(
      R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
      16, {"duplicate JSON key 'a'"});
  // Inside a tensor entry as well.
  expect_bad(R"({"a":{"dtype":"F32","dtype":"F16","shape":[2],"data_offsets":[0,8]}})", 8,
             {"duplicate JSON key 'dtype'"});
}

TEST(SafetensorsBad, UnknownAndUnsupportedDtype) {
  expect_bad(R"({"w":{"dtype":"Q9","shape":[2],"data_offsets":[0,8]}})", 8, {"tensor 'w'", "unknown dtype 'Q9'"});
  expect_bad(R"({"ids":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}})", 8,
             {"tensor 'ids'", "dtype 'I64' is not supported"}, ErrorKind::kUnsupported);
  expect_bad(R"({"d":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}})", 8, {"tensor 'd'", "'F64' is not supported"},
             ErrorKind::kUnsupported);
  expect_bad(R"({"m":{"dtype":"U8","shape":[8],"data_offsets":[0,8]}})", 8, {"tensor 'm'", "'U8' is not supported"},
             ErrorKind::kUnsupported);
  expect_bad(R"({"w":{"dtype":7,"shape":[2],"data_offsets":[0,8]}})", 8, {"tensor 'w'", "dtype is a JSON number"});
}

TEST(SafetensorsBad, BadShape) {
  expect_bad(R"({"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8,
             {"tensor 'w'", "shape[0] = -2", "not a non-negative integer"});
  expect_bad(R"({"w":{"dtype":"F32","shape":[1,2.0],"data_offsets":[0,8]}})", 8,
             {"tensor 'w'", "shape[1] = 2.0", "not a non-negative integer"});
  expect_bad(R"({"w":{"dtype":"F32","shape":"2","data_offsets":[0,8]}})", 8, {"tensor 'w'", "shape is a JSON string"});
  // Element count that overflows int64.
  expect_bad(R"({"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", 8,
             {"tensor 'w'", "element count", "overflows"});
  // Byte count that overflows (elements fit, times 4 bytes does not).
  expect_bad(R"({"w":{"dtype":"F32","shape":[2305843009213693952,2],"data_offsets":[0,8]}})", 8, {"byte count", "overflows"});
}

TEST(SafetensorsBad, MissingAndUnknownFields) {
  expect_bad(R"({"w":{"dtype":"F32","shape":[2]}})", 8, {"tensor 'w'", "missing field 'data_offsets'"});
  expect_bad(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"strides":[1]}})", 8,
             {"tensor 'w'", "unknown field 'strides'"});
  expect_bad(R"({"w":[1,2]})", 8, {"tensor 'w'", "expected an object"});
  expect_bad(R"({"__metadata__":{"format":1}})", 0, {"__metadata__", "'format'", "expected a string"});
  expect_bad(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", 8, {"tensor 'w'", "expected [begin, end]"});
  expect_bad(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,-8]}})", 8, {"data_offsets[1] = -8"});
}

TEST(SafetensorsBad, OffsetsGap) {
  expect_bad(
      R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}})",
      20, {"tensor 'b'", "gap of 4 bytes", "tensor 'a'"});
}

TEST(SafetensorsBad, OffsetsOverlap) {
  expect_bad(
      R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
      12, {"tensor 'b'", "overlaps tensor 'a'"});
  // Two tensors on the same bytes.
  expect_bad(
      R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
      8, {"overlaps"});
}

TEST(SafetensorsBad, OutOfOrderWhereItMatters) {
  // Listed in order z, a but by offset the data section starts with 8 bytes that belong to no tensor.
  expect_bad(
      R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[16,24]},"z":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
      24, {"tensor 'z'", "gap of 8 bytes after the header"});
}

TEST(SafetensorsBad, EndBeforeBegin) {
  expect_bad(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", 8, {"tensor 'w'", "end 0 is before begin 8"});
}

TEST(SafetensorsBad, BytesNotShapeProduct) {
  expect_bad(R"({"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}})", 20,
             {"tensor 'w'", "span 20 bytes", "[2, 3] needs 24 bytes"});
  expect_bad(R"({"w":{"dtype":"BF16","shape":[4],"data_offsets":[0,16]}})", 16, {"needs 8 bytes"});
}

TEST(SafetensorsBad, TrailingBytes) {
  expect_bad(kGood2, 20, {"4 trailing bytes", "data section is 20 bytes"});
}

TEST(SafetensorsBad, Truncated) {
  expect_bad(kGood2, 12, {"tensor 'b'", "end 16 is past the data section of 12 bytes", "truncated"});
  // Cut inside the header: the declared length runs past the end.
  const auto full = st_bytes(kGood2, 16);
  const std::vector<uint8_t> cut(full.begin(), full.begin() + 40);
  expect_error([&] { parse(cut); }, {"past the end"});
}

TEST(SafetensorsFile, OpenMissingFileIsIoError) {
  expect_error([] { SafetensorsFile::open("/nonexistent/x.safetensors"); }, {"/nonexistent/x.safetensors", "cannot open"},
               ErrorKind::kIo);
}

TEST(SafetensorsFile, OpenFromDiskMatchesMemory) {
  test::TempDir dir;
  const auto b = st_bytes(kGood2, 16);
  test::write_file(dir.path / "x.safetensors", b);
  auto f = SafetensorsFile::open((dir.path / "x.safetensors").string());
  ASSERT_EQ(f->tensors().size(), 2u);
  EXPECT_EQ(std::memcmp(f->find("b")->data, b.data() + 8 + std::strlen(kGood2) + 8, 8), 0);
  // A broken file on disk names its path.
  test::write_file(dir.path / "bad.safetensors", st_bytes(kGood2, 17));
  expect_error([&] { SafetensorsFile::open((dir.path / "bad.safetensors").string()); }, {"bad.safetensors", "trailing"});
}

// ---- sharded checkpoints (index.json) ----

std::string one_tensor(const std::string& name) {
  return "{\"" + name + "\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}";
}
std::string index_json(const std::vector<std::pair<std::string, std::string>>& m) {
  std::string s = R"({"metadata":{"total_size":16},"weight_map":{)";
  for (size_t i = 0; i < m.size(); ++i) {
    if (i) s += ',';
    s += '"';
    s += m[i].first;
    s += "\":\"";
    s += m[i].second;
    s += '"';
  }
  return s + "}}";
}

struct ShardedDir {
  test::TempDir dir;
  ShardedDir() {
    test::write_file(dir.path / "s1.safetensors", st_bytes(one_tensor("a"), 8));
    test::write_file(dir.path / "s2.safetensors", st_bytes(one_tensor("b"), 8));
  }
  void index(const std::vector<std::pair<std::string, std::string>>& m) {
    test::write_text(dir.path / "model.safetensors.index.json", index_json(m));
  }
};

TEST(SafetensorsIndex, Good) {
  ShardedDir d;
  d.index({{"a", "s1.safetensors"}, {"b", "s2.safetensors"}});
  auto c = SafetensorsCheckpoint::open_dir(d.dir.str());
  EXPECT_TRUE(c->sharded());
  EXPECT_EQ(c->n_files(), 2u);
  ASSERT_EQ(c->tensors().size(), 2u);
  ASSERT_NE(c->find("b"), nullptr);
  EXPECT_EQ(c->find("b")->n_bytes, 8u);
  EXPECT_EQ(c->find("c"), nullptr);
}

TEST(SafetensorsIndex, MissingShard) {
  ShardedDir d;
  d.index({{"a", "s1.safetensors"}, {"b", "s3.safetensors"}});
  expect_error([&] { SafetensorsCheckpoint::open_dir(d.dir.str()); }, {"shard 's3.safetensors'", "'b'", "does not exist"});
}

TEST(SafetensorsIndex, MissingTensor) {
  ShardedDir d;
  d.index({{"a", "s1.safetensors"}, {"b", "s2.safetensors"}, {"c", "s2.safetensors"}});
  expect_error([&] { SafetensorsCheckpoint::open_dir(d.dir.str()); }, {"tensor 'c' is missing", "s2.safetensors"});
}

TEST(SafetensorsIndex, ExtraTensor) {
  ShardedDir d;
  d.index({{"a", "s1.safetensors"}});
  test::write_file(d.dir.path / "s1.safetensors",
                   st_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                            R"("x":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
                            12));
  expect_error([&] { SafetensorsCheckpoint::open_dir(d.dir.str()); }, {"tensor 'x'", "does not list", "unexpected"});
}

TEST(SafetensorsIndex, TensorInTwoShards) {
  ShardedDir d;
  test::write_file(d.dir.path / "s2.safetensors",
                   st_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                            R"("b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
                            16));
  d.index({{"a", "s1.safetensors"}, {"b", "s2.safetensors"}});
  expect_error([&] { SafetensorsCheckpoint::open_dir(d.dir.str()); }, {"s2.safetensors", "tensor 'a'", "duplicate"});
}

TEST(SafetensorsIndex, PathTraversal) {
  ShardedDir d;
  d.index({{"a", "../s1.safetensors"}});
  expect_error([&] { SafetensorsCheckpoint::open_dir(d.dir.str()); }, {"'../s1.safetensors'", "path separators"});
  d.index({{"a", "sub/s1.safetensors"}});
  expect_error([&] { SafetensorsCheckpoint::open_dir(d.dir.str()); }, {"path separators"});
  d.index({{"a", ".."}});
  expect_error([&] { SafetensorsCheckpoint::open_dir(d.dir.str()); }, {"'..'"});
  d.index({{"a", "s1.bin"}});
  expect_error([&] { SafetensorsCheckpoint::open_dir(d.dir.str()); }, {"does not end in .safetensors"});
}

TEST(SafetensorsIndex, MalformedIndexJson) {
  ShardedDir d;
  test::write_text(d.dir.path / "model.safetensors.index.json", R"({"weight_map":{"a":"s1.safetensors","a":"s2.safetensors"}})");
  expect_error([&] { SafetensorsCheckpoint::open_dir(d.dir.str()); }, {"index.json", "duplicate JSON key 'a'"});
  test::write_text(d.dir.path / "model.safetensors.index.json", R"({"metadata":{}})");
  expect_error([&] { SafetensorsCheckpoint::open_dir(d.dir.str()); }, {"missing field 'weight_map'"});
  test::write_text(d.dir.path / "model.safetensors.index.json", R"({"weight_map":{"a":3}})");
  expect_error([&] { SafetensorsCheckpoint::open_dir(d.dir.str()); }, {"weight_map['a']", "expected a file name"});
}

TEST(SafetensorsIndex, EmptyDirectory) {
  test::TempDir d;
  expect_error([&] { SafetensorsCheckpoint::open_dir(d.str()); }, {"no model.safetensors"}, ErrorKind::kIo);
}

// ---- the transformers-written fixtures ----

TEST(SafetensorsFixtures, AllFiveOpen) {
  // Expected counts from the architectures: 9 tensors per layer (+3 q/k/v biases for qwen2), embedding,
  // final norm, and lm_head unless tied.
  const std::vector<std::pair<std::string, size_t>> cases = {
      {"tiny-llama2", 4 * 9 + 3}, {"tiny-llama31", 4 * 9 + 2}, {"tiny-llama31-v4config", 4 * 9 + 2},
      {"tiny-qwen2", 4 * 12 + 3}, {"tiny-mistral", 4 * 9 + 3}};
  for (const auto& [name, count] : cases) {
    SCOPED_TRACE(name);
    auto c = SafetensorsCheckpoint::open_dir(test::hf_fixture(name));
    EXPECT_EQ(c->tensors().size(), count);
    for (const auto* t : c->tensors()) EXPECT_EQ(t->type, GgmlType::BF16) << t->name;
  }
}

TEST(SafetensorsFixtures, ShardedLlama2) {
  auto c = SafetensorsCheckpoint::open_dir(test::hf_fixture("tiny-llama2"));
  EXPECT_TRUE(c->sharded());
  EXPECT_EQ(c->n_files(), 4u);
  const auto* lm = c->find("lm_head.weight");
  ASSERT_NE(lm, nullptr);
  EXPECT_EQ(lm->shape, (std::vector<int64_t>{512, 256}));
  const auto* down = c->find("model.layers.3.mlp.down_proj.weight");
  ASSERT_NE(down, nullptr);
  EXPECT_EQ(down->shape, (std::vector<int64_t>{256, 768}));
}

TEST(SafetensorsFixtures, Llama31Bytes) {
  auto c = SafetensorsCheckpoint::open_dir(test::hf_fixture("tiny-llama31"));
  EXPECT_FALSE(c->sharded());
  const auto* e = c->find("model.embed_tokens.weight");
  ASSERT_NE(e, nullptr);
  EXPECT_EQ(e->shape, (std::vector<int64_t>{1024, 256}));
  // First four bf16 values of the embedding, read by Python's struct module from the same file.
  const uint16_t want[4] = {15518, 15504, 15728, 48559};
  uint16_t got[4];
  std::memcpy(got, e->data, sizeof got);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(got[i], want[i]) << i;
}

}  // namespace
}  // namespace shardlm
