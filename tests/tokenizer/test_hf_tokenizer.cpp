// Hugging Face tokenizer.json: the fixtures' expected ids (computed by `tokenizers` itself) and
// hand-written files for the semantics that differ from llama.cpp.
#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>
#include <functional>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "support/fixtures.h"
#include "tokenizer/hf_tokenizer.h"

namespace shardlm {
namespace {

using Ids = std::vector<int32_t>;
using json = nlohmann::json;
// A file or folder of tests/data/tokenizers; throws naming it when missing.
std::string tok_fixture(const std::string& rel) { return test::fixture_path("tokenizers/" + rel); }

json load_json(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot open " + path);
  return json::parse(in);
}

// Parsing a 3.5 MB tokenizer.json takes seconds under the sanitizers: load each fixture once.
const Tokenizer& fixture(const std::string& name) {
  static std::map<std::string, std::unique_ptr<Tokenizer>> cache;
  auto& t = cache[name];
  if (!t) t = load_hf_tokenizer(tok_fixture(name));
  return *t;
}

class HfFixture : public ::testing::TestWithParam<const char*> {};

TEST_P(HfFixture, EveryTextEncodesToTheIdsOfHuggingFaceTokenizers) {
  const json exp = load_json(tok_fixture(std::string(GetParam()) + "/expected_ids.json"));
  const auto& texts = exp.at("texts");
  const auto& ids = exp.at("ids");
  ASSERT_EQ(texts.size(), 46u);
  ASSERT_EQ(texts.size(), ids.size());
  const Tokenizer* tok = &fixture(GetParam());
  for (size_t i = 0; i < texts.size(); ++i) {
    const std::string text = texts[i];
    EXPECT_EQ(tok->encode(text, /*add_special=*/false, /*parse_special=*/false), ids[i].get<Ids>())
        << "text " << i << ": " << texts[i].dump();
  }
}

TEST_P(HfFixture, DecodeRoundTrips) {
  const json exp = load_json(tok_fixture(std::string(GetParam()) + "/expected_ids.json"));
  const Tokenizer* tok = &fixture(GetParam());
  for (const auto& t : exp.at("texts")) {
    const std::string text = t;
    // Metaspace cannot tell " x" from "x" (both give "▁x"), and its decoder drops the leading space.
    if (tok->vocab().model == Vocab::Model::kSpm && text.starts_with(' ')) continue;
    EXPECT_EQ(tok->decode(tok->encode(text, true, false)), text) << t.dump();
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, HfFixture, ::testing::Values("gpt2", "llama2"));

TEST(HfTokenizer, Llama2SpecialsAndBosComeFromTheFiles) {
  // Through the .json path here (the other tests pass the directory).
  const auto tok = load_hf_tokenizer(tok_fixture("llama2/tokenizer.json"));
  EXPECT_EQ(tok->bos(), 1);
  EXPECT_EQ(tok->eos(), 2);
  EXPECT_TRUE(tok->vocab().add_bos);
  EXPECT_FALSE(tok->vocab().add_eos);
  EXPECT_EQ(tok->vocab().model, Vocab::Model::kSpm);
  EXPECT_EQ(tok->vocab().types[3], TokenType::kByte);
  // "Hello" with BOS: ids from the llama2 expected_ids.json case "Hello".
  EXPECT_EQ(tok->encode("Hello", true, false), (Ids{1, 15043}));
  EXPECT_EQ(tok->encode("</s>", false, true), (Ids{2}));
  const Tokenizer* gpt2 = &fixture("gpt2");
  EXPECT_FALSE(gpt2->vocab().add_bos);
  EXPECT_EQ(gpt2->vocab().pre, "gpt-2");
  EXPECT_EQ(gpt2->eos(), 50256);  // "<|endoftext|>", found by name (no config)
}

// A small SentencePiece-style tokenizer.json; `pre` and `normalizer` vary per test.
json spm_json(const json& pre, const json& normalizer) {
  json vocab = {{"<unk>", 0}, {"<s>", 1}, {"</s>", 2}, {"\xE2\x96\x81", 3}, {"a", 4},
                {"\xE2\x96\x81" "a", 5}, {"b", 6}, {"<0x62>", 7}};
  return {
      {"version", "1.0"},
      {"added_tokens",
       json::array({{{"id", 0}, {"content", "<unk>"}, {"special", true}},
                    {{"id", 1}, {"content", "<s>"}, {"special", true}},
                    {{"id", 2}, {"content", "</s>"}, {"special", true}}})},
      {"normalizer", normalizer},
      {"pre_tokenizer", pre},
      {"post_processor", nullptr},
      {"decoder", nullptr},
      {"model",
       {{"type", "BPE"}, {"vocab", vocab}, {"merges", json::array({json::array({"\xE2\x96\x81", "a"})})},
        {"byte_fallback", true}, {"fuse_unk", true}, {"unk_token", "<unk>"}}},
  };
}

class HfFiles : public ::testing::Test {
 protected:
  std::string dir_ = (std::filesystem::path(::testing::TempDir()) /
                      ("hf_tok_" + std::to_string(::getpid()))).string();
  void SetUp() override { std::filesystem::create_directories(dir_); }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::unique_ptr<Tokenizer> load(const json& tok, const json& cfg = nullptr) {
    std::ofstream(dir_ + "/tokenizer.json") << tok.dump();
    if (!cfg.is_null()) std::ofstream(dir_ + "/tokenizer_config.json") << cfg.dump();
    return load_hf_tokenizer(dir_);
  }
  std::string error_of(const json& tok, const json& cfg = nullptr) {
    try {
      load(tok, cfg);
    } catch (const Error& e) {
      return e.what();
    }
    return "(no error)";
  }
};

json metaspace(const char* scheme) {
  return {{"type", "Metaspace"}, {"replacement", "\xE2\x96\x81"}, {"prepend_scheme", scheme}, {"split", false}};
}

TEST_F(HfFiles, MetaspaceFirstPrependsOnlyAtTheStartAndNeverTwice) {
  const auto tok = load(spm_json(metaspace("first"), nullptr));
  EXPECT_EQ(tok->encode("a", false, false), (Ids{5}));
  EXPECT_EQ(tok->encode(" a", false, false), (Ids{5}));  // llama.cpp would give ▁ ▁a
  EXPECT_EQ(tok->encode("a</s>a", false, true), (Ids{5, 2, 4}));
  EXPECT_EQ(tok->encode("</s>a", false, true), (Ids{2, 4}));
}

TEST_F(HfFiles, MetaspaceAlwaysPrependsToEverySegment) {
  const auto tok = load(spm_json(metaspace("always"), nullptr));
  EXPECT_EQ(tok->encode("a</s>a", false, true), (Ids{5, 2, 5}));
  EXPECT_EQ(tok->encode(" a", false, false), (Ids{5}));
  // Not parsed: "</s>" is spelled; "<" etc. are not in the vocabulary and have no byte token, so
  // fuse_unk gives one <unk> for the run; "b" is a token.
  EXPECT_EQ(tok->encode("a</b", false, false), (Ids{5, 0, 6}));
}

TEST_F(HfFiles, PrependNormalizerPrependsEvenBeforeASpace) {
  const json norm = {{"type", "Sequence"},
                     {"normalizers", json::array({{{"type", "Prepend"}, {"prepend", "\xE2\x96\x81"}},
                                                  {{"type", "Replace"}, {"pattern", {{"String", " "}}},
                                                   {"content", "\xE2\x96\x81"}}})}};
  const auto tok = load(spm_json(nullptr, norm));
  EXPECT_EQ(tok->encode(" a", false, false), (Ids{3, 5}));
  EXPECT_EQ(tok->encode("a</s>a", false, true), (Ids{5, 2, 5}));
}

TEST_F(HfFiles, ConfigAddPrefixSpaceChoosesTheSchemeLikeTransformers) {
  const json tok = spm_json(metaspace("always"), nullptr);
  EXPECT_EQ(load(tok, {{"add_prefix_space", true}, {"legacy", false}})->encode("a</s>a", false, true),
            (Ids{5, 2, 4}));
  EXPECT_EQ(load(tok, {{"add_prefix_space", false}})->encode("a", false, false), (Ids{4}));
}

TEST_F(HfFiles, ByteFallbackAndDecoding) {
  const auto tok = load(spm_json(metaspace("first"), nullptr));
  // "b" is a token, so its byte token is not used; "c" has none and becomes <unk>.
  EXPECT_EQ(tok->encode("ab", false, false), (Ids{5, 6}));
  EXPECT_EQ(tok->decode({1, 5, 7, 3, 4}), "ab a");
  EXPECT_EQ(tok->token_to_piece(7), "b");
}

TEST_F(HfFiles, Llama3StyleSplitThenByteLevel) {
  const std::string llama3 =
      R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
  json tok = {
      {"added_tokens", json::array({{{"id", 6}, {"content", "<|eot_id|>"}, {"special", true}}})},
      {"normalizer", nullptr},
      {"pre_tokenizer",
       {{"type", "Sequence"},
        {"pretokenizers",
         json::array({{{"type", "Split"}, {"pattern", {{"Regex", llama3}}}, {"behavior", "Isolated"}, {"invert", false}},
                      {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}})}}},
      {"post_processor",
       {{"type", "TemplateProcessing"},
        {"single", json::array({{{"SpecialToken", {{"id", "<|eot_id|>"}, {"type_id", 0}}}},
                                {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}})}}},
      {"model",
       {{"type", "BPE"}, {"ignore_merges", true},
        {"vocab", {{"1", 0}, {"2", 1}, {"3", 2}, {"4", 3}, {"12", 4}, {"123", 5}}},
        {"merges", json::array({"1 2"})}}},
  };
  const auto t = load(tok);
  EXPECT_EQ(t->vocab().pre, "llama-bpe");
  // "1234" splits into "123" (a token, taken whole by ignore_merges) and "4".
  EXPECT_EQ(t->encode("1234", true, false), (Ids{6, 5, 3}));
  tok["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "\\d+";
  const std::string err = error_of(tok);
  EXPECT_NE(err.find("pre_tokenizer.pretokenizers[0].pattern.Regex"), std::string::npos) << err;
}

TEST_F(HfFiles, MalformedFilesNameTheField) {
  json tok = spm_json(metaspace("first"), nullptr);
  struct Case {
    std::function<void(json&)> edit;
    std::string expect;
  };
  const std::vector<Case> cases = {
      {[](json& j) { j["model"]["type"] = "Unigram"; }, "model.type"},
      {[](json& j) { j["model"]["vocab"]["b"] = 4; }, "id 4"},
      {[](json& j) { j["model"]["vocab"].erase("b"); }, "no token has id 6"},
      {[](json& j) { j["model"]["vocab"]["b"] = "x"; }, "model.vocab[\"b\"]"},
      {[](json& j) { j["model"]["merges"] = json::array({"a"}); }, "model.merges[0]"},
      {[](json& j) { j["model"]["merges"] = json::array({"a c"}); }, "model.merges[0]"},
      {[](json& j) { j["pre_tokenizer"]["prepend_scheme"] = "sometimes"; }, "prepend_scheme"},
      {[](json& j) { j["pre_tokenizer"]["type"] = "Whitespace"; }, "pre_tokenizer.type"},
      {[](json& j) { j["normalizer"] = {{"type", "Lowercase"}}; }, "normalizer.type"},
      {[](json& j) { j["added_tokens"][1]["content"] = "<S>"; }, "added_tokens[1]"},
      {[](json& j) { j["model"]["unk_token"] = "<?>"; }, "model.unk_token"},
      {[](json& j) { j.erase("model"); }, "model"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    json broken = tok;
    cases[i].edit(broken);
    const std::string err = error_of(broken);
    EXPECT_NE(err.find(cases[i].expect), std::string::npos) << "case " << i << ": " << err;
    EXPECT_NE(err.find("tokenizer.json"), std::string::npos) << "case " << i << ": " << err;
  }
  std::ofstream(dir_ + "/tokenizer.json") << "{\"model\": ";
  EXPECT_THROW(load_hf_tokenizer(dir_), Error);
  EXPECT_NE(error_of(tok, {{"eos_token", "<eos>"}}).find("eos_token"), std::string::npos);
  EXPECT_THROW(load_hf_tokenizer(dir_ + "/missing"), Error);
}

}  // namespace
}  // namespace shardlm
