// Tokenizers on hand-built vocabularies (merge order, byte fallback, special tokens, BOS/EOS) and
// one hand-made broken vocabulary per malformation.
#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>
#include <functional>

#include "core/error.h"
#include "formats/gguf.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/unicode.h"

namespace shardlm {
namespace {

using Ids = std::vector<int32_t>;
const std::string kM = "\xE2\x96\x81";  // U+2581

// <unk> <s> </s>, the 256 byte tokens, then `pieces` with `scores`.
Vocab spm_vocab(const std::vector<std::string>& pieces, const std::vector<float>& scores) {
  Vocab v;
  v.model = Vocab::Model::kSpm;
  v.tokens = {"<unk>", "<s>", "</s>"};
  v.types = {TokenType::kUnknown, TokenType::kControl, TokenType::kControl};
  v.scores = {0, 0, 0};
  for (int b = 0; b < 256; ++b) {
    char buf[8];
    std::snprintf(buf, sizeof buf, "<0x%02X>", b);
    v.tokens.push_back(buf);
    v.types.push_back(TokenType::kByte);
    v.scores.push_back(0);
  }
  for (size_t i = 0; i < pieces.size(); ++i) {
    v.tokens.push_back(pieces[i]);
    v.types.push_back(TokenType::kNormal);
    v.scores.push_back(scores[i]);
  }
  v.unk = 0;
  v.bos = 1;
  v.eos = 2;
  return v;
}
constexpr int32_t kFirst = 259;  // id of pieces[0] in spm_vocab

TEST(Spm, MergesHighestScoreFirstAndTiesGoLeft) {
  // Pieces: a b c ab bc ▁ ; "abc" can become "ab c" or "a bc".
  auto make = [](float ab, float bc) {
    return Tokenizer::create(spm_vocab({"a", "b", "c", "ab", "bc", kM}, {-1, -1, -1, ab, bc, -1}));
  };
  const int32_t a = kFirst, c = kFirst + 2, ab = kFirst + 3, bc = kFirst + 4, m = kFirst + 5;
  EXPECT_EQ(make(-2, -3)->encode("abc", false, false), (Ids{m, ab, c}));
  EXPECT_EQ(make(-3, -2)->encode("abc", false, false), (Ids{m, a, bc}));
  EXPECT_EQ(make(-2, -2)->encode("abc", false, false), (Ids{m, ab, c}));
}

TEST(Spm, UnknownCharactersFallBackToBytes) {
  auto tok = Tokenizer::create(spm_vocab({"a", kM}, {-1, -1}));
  const int32_t a = kFirst, m = kFirst + 1;
  // "é" is C3 A9; byte tokens are 3 + byte.
  EXPECT_EQ(tok->encode("a\xC3\xA9", false, false), (Ids{m, a, 3 + 0xC3, 3 + 0xA9}));
  EXPECT_EQ(tok->decode(tok->encode("a\xC3\xA9 a", true, false)), "a\xC3\xA9 a");
  EXPECT_EQ(tok->token_to_piece(3 + 'x'), "x");
  EXPECT_EQ(tok->token_to_piece(1), "");
}

TEST(Spm, SpacePrefixBosEosAndSpecialTokens) {
  Vocab v = spm_vocab({"a", kM, kM + "a"}, {-1, -1, -0.5f});
  v.add_eos = true;
  auto tok = Tokenizer::create(v);
  const int32_t a = kFirst, m = kFirst + 1, ma = kFirst + 2;
  EXPECT_EQ(tok->encode("a a", true, false), (Ids{1, ma, ma, 2}));
  EXPECT_EQ(tok->encode("", true, false), (Ids{1, 2}));
  EXPECT_EQ(tok->encode("", false, false), Ids{});
  // After a parsed special token the next text gets its own prefix, as in llama.cpp.
  EXPECT_EQ(tok->encode("a</s>a", false, true), (Ids{ma, 2, ma}));
  EXPECT_EQ(tok->decode({1, ma, m, a}), "a a");
  v.add_space_prefix = false;
  auto no_prefix = Tokenizer::create(v);
  EXPECT_EQ(no_prefix->encode("a a", false, false), (Ids{a, ma}));
  EXPECT_EQ(no_prefix->decode({ma}), " a");
}

// Byte-level vocabulary over the characters of "abc " (space is "Ġ" = U+0120) plus merges.
Vocab bpe_vocab(const std::vector<std::string>& merges) {
  Vocab v;
  v.model = Vocab::Model::kBpe;
  v.pre = "gpt-2";
  v.tokens = {"a", "b", "c", "\xC4\xA0", "ab", "bc", "\xC4\xA0" "a", "<|end|>", "<tag>", "abc"};
  v.types.assign(v.tokens.size(), TokenType::kNormal);
  v.types[7] = TokenType::kControl;
  v.types[8] = TokenType::kUserDefined;
  v.merges = merges;
  v.eos = 7;
  v.add_bos = false;
  v.add_space_prefix = false;
  return v;
}

TEST(Bpe, LowestRankMergesFirst) {
  EXPECT_EQ(Tokenizer::create(bpe_vocab({"a b", "b c"}))->encode("abc", false, false), (Ids{4, 2}));
  EXPECT_EQ(Tokenizer::create(bpe_vocab({"b c", "a b"}))->encode("abc", false, false), (Ids{0, 5}));
  EXPECT_EQ(Tokenizer::create(bpe_vocab({"a b", "ab c"}))->encode("abc a", false, false),
            (Ids{9, 3, 0}));
  EXPECT_EQ(Tokenizer::create(bpe_vocab({"Ġ a", "a b", "ab c"}))->encode("abc a", false, false),
            (Ids{9, 6}));
}

TEST(Bpe, IgnoreMergesTakesWholeWords) {
  Vocab v = bpe_vocab({"b c"});
  EXPECT_EQ(Tokenizer::create(v)->encode("abc", false, false), (Ids{0, 5}));
  v.ignore_merges = true;
  EXPECT_EQ(Tokenizer::create(v)->encode("abc", false, false), (Ids{9}));
}

TEST(Bpe, MergesThroughPiecesThatAreNotTokens) {
  // llama.cpp compares strings: "c a" gives "ca" (no token), which "ca b" turns into "cab"... also
  // no token, so the word is spelled with the single-character tokens that exist.
  Vocab v = bpe_vocab({"c a", "ca b"});
  EXPECT_EQ(Tokenizer::create(v)->encode("cab", false, false), (Ids{2, 0, 1}));
  v.tokens.push_back("cab");
  v.types.push_back(TokenType::kNormal);
  EXPECT_EQ(Tokenizer::create(v)->encode("cab", false, false), (Ids{10}));
}

TEST(Bpe, SpecialTokensAndDecoding) {
  auto tok = Tokenizer::create(bpe_vocab({"a b"}));
  EXPECT_EQ(tok->encode("ab<|end|>c", false, true), (Ids{4, 7, 2}));
  const Ids raw = tok->encode("ab<|end|>c", false, false);
  EXPECT_EQ(std::count(raw.begin(), raw.end(), 7), 0);
  // User-defined tokens match even when special tokens are not parsed.
  EXPECT_EQ(tok->encode("a<tag>b", false, false), (Ids{0, 8, 1}));
  EXPECT_EQ(tok->decode({4, 3, 0, 7, 8}), "ab a<tag>");
  EXPECT_EQ(tok->token_to_piece(3), " ");
  Vocab with_eos = bpe_vocab({});
  with_eos.add_eos = true;
  EXPECT_EQ(Tokenizer::create(with_eos)->encode("a", true, false), (Ids{0, 7}));
}

TEST(ByteMapping, IsABijectionOverTheBytes) {
  const auto& b2u = byte_to_unicode();
  for (int b = 0; b < 256; ++b) {
    const Utf8Char c = utf8_decode(b2u[b], 0);
    EXPECT_EQ(c.len, b2u[b].size());
    EXPECT_EQ(unicode_to_byte(c.cp), b);
  }
  EXPECT_EQ(b2u[' '], "\xC4\xA0");  // GPT-2's "Ġ"
  EXPECT_EQ(b2u['\n'], "\xC4\x8A");  // "Ċ"
  EXPECT_EQ(b2u['A'], "A");
}

void expect_error(const std::function<void()>& fn, std::initializer_list<std::string> parts) {
  try {
    fn();
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    for (const std::string& p : parts)
      EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << e.what() << " lacks " << p;
  }
}

TEST(VocabValidation, CreateRefusesInconsistentVocabularies) {
  Vocab v = spm_vocab({"a"}, {0});
  v.scores.pop_back();
  expect_error([&] { Tokenizer::create(v); }, {"scores", "259", "260"});
  v = spm_vocab({"a"}, {0});
  v.bos = 260;
  expect_error([&] { Tokenizer::create(v); }, {"bos", "260"});
  v = spm_vocab({""}, {0});
  expect_error([&] { Tokenizer::create(v); }, {"token 259", "empty"});
  v = spm_vocab({"a"}, {0});
  v.types[259] = TokenType::kByte;
  expect_error([&] { Tokenizer::create(v); }, {"token 259", "<0xNN>"});
  Vocab b = bpe_vocab({"ab"});
  expect_error([&] { Tokenizer::create(b); }, {"merges[0]", "'ab'"});
  b = bpe_vocab({"a b"});
  b.pre = "falcon";
  expect_error([&] { Tokenizer::create(b); }, {"falcon", "qwen2"});
  auto tok = Tokenizer::create(bpe_vocab({}));
  expect_error([&] { tok->token_to_piece(10); }, {"10", "outside"});
  expect_error([&] { tok->decode({-1}); }, {"-1"});
}

// One broken GGUF vocabulary per malformation; `edit` breaks a valid one.
class GgufVocab : public ::testing::Test {
 protected:
  std::string path_ = (std::filesystem::path(::testing::TempDir()) /
                       ("tok_" + std::to_string(::getpid()) + ".gguf")).string();
  void TearDown() override { std::filesystem::remove(path_); }

  void write(const std::function<void(GgufWriter&)>& edit, bool with_tokens = true) {
    GgufWriter w;
    w.set_string("general.architecture", "llama");
    w.set_string("tokenizer.ggml.model", "gpt2");
    w.set_string("tokenizer.ggml.pre", "llama-bpe");
    if (with_tokens) w.set_string_array("tokenizer.ggml.tokens", {"a", "b", "ab", "<|eot|>"});
    w.set_i32_array("tokenizer.ggml.token_type", {1, 1, 1, 3});
    w.set_string_array("tokenizer.ggml.merges", {"a b"});
    w.set_u32("tokenizer.ggml.eos_token_id", 3);
    edit(w);
    w.write(path_);
  }
  Vocab read() { return vocab_from_gguf(*GgufFile::open(path_)); }
};

TEST_F(GgufVocab, ValidFileReadsEveryField) {
  write([](GgufWriter& w) { w.set_bool("tokenizer.ggml.add_eos_token", true); });
  const Vocab v = read();
  EXPECT_EQ(v.model, Vocab::Model::kBpe);
  EXPECT_EQ(v.pre, "llama-bpe");
  EXPECT_TRUE(v.ignore_merges);
  EXPECT_TRUE(v.add_bos);  // llama.cpp's default for the llama3 pre-tokenizer
  EXPECT_TRUE(v.add_eos);
  EXPECT_EQ(v.eos, 3);
  EXPECT_EQ(v.bos, -1);
  EXPECT_EQ(v.types[3], TokenType::kControl);
  EXPECT_EQ(Tokenizer::create(v)->encode("ab", false, false), (Ids{2}));
}

TEST_F(GgufVocab, MissingTokensSaysThereIsNoTokenizer) {
  write([](GgufWriter&) {}, /*with_tokens=*/false);
  expect_error([&] { read(); }, {"no tokenizer in " + path_ + " (tokenizer.ggml.tokens missing)"});
}

TEST_F(GgufVocab, EachMalformationNamesItsKey) {
  const std::vector<std::pair<std::function<void(GgufWriter&)>, std::vector<std::string>>> cases = {
      {[](GgufWriter& w) { w.set_string("tokenizer.ggml.model", "bert"); },
       {"tokenizer.ggml.model", "bert", "llama, gpt2"}},
      {[](GgufWriter& w) { w.set_string("tokenizer.ggml.pre", "tekken"); },
       {"tokenizer.ggml.pre", "tekken"}},
      {[](GgufWriter& w) { w.set_f32_array("tokenizer.ggml.scores", {0, 0}); },
       {"tokenizer.ggml.scores", "2", "4"}},
      {[](GgufWriter& w) { w.set_i32_array("tokenizer.ggml.token_type", {1, 1, 1}); },
       {"tokenizer.ggml.token_type", "3", "4"}},
      {[](GgufWriter& w) { w.set_i32_array("tokenizer.ggml.token_type", {1, 1, 9, 3}); },
       {"tokenizer.ggml.token_type[2]", "9"}},
      {[](GgufWriter& w) { w.set_u32("tokenizer.ggml.eos_token_id", 4); },
       {"tokenizer.ggml.eos_token_id", "4"}},
      {[](GgufWriter& w) { w.set_u32("tokenizer.ggml.bos_token_id", 100); },
       {"tokenizer.ggml.bos_token_id", "100"}},
      {[](GgufWriter& w) { w.set_string_array("tokenizer.ggml.tokens", {"a", "", "ab", "c"}); },
       {"tokenizer.ggml.tokens[1]", "empty"}},
      {[](GgufWriter& w) { w.set_string_array("tokenizer.ggml.tokens", {}); },
       {"tokenizer.ggml.tokens"}},
      {[](GgufWriter& w) { w.set_string_array("tokenizer.ggml.merges", {}); },
       {"tokenizer.ggml.merges"}},
      {[](GgufWriter& w) { w.set_i32_array("tokenizer.ggml.tokens", {1, 2}); },
       {"tokenizer.ggml.tokens"}},
      {[](GgufWriter& w) { w.set_u32("tokenizer.ggml.model", 1); }, {"tokenizer.ggml.model"}},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    SCOPED_TRACE(i);
    write(cases[i].first);
    try {
      const Vocab v = read();
      Tokenizer::create(v);
      ADD_FAILURE() << "case " << i << ": no error";
    } catch (const Error& e) {
      for (const std::string& p : cases[i].second)
        EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << e.what() << " lacks " << p;
    }
  }
}

}  // namespace
}  // namespace shardlm
