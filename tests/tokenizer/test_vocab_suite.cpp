// llama.cpp's tokenizer test suites (tests/data/vocab): each text of <vocab>.inp must encode to the ids
// of the matching line of <vocab>.out, with no BOS and special tokens not parsed.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "formats/gguf.h"
#include "support/fixtures.h"
#include "tokenizer/tokenizer.h"

namespace shardlm {
namespace {

std::string read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// test-tokenizer-0 splits the whole file on "\n__ggml_vocab_test__\n": the newline before a separator
// line belongs to the separator, every other newline to the text.
std::vector<std::string> read_texts(const std::string& path) {
  std::string all = read_all(path);
  const std::string sep = "\n__ggml_vocab_test__\n";
  std::vector<std::string> texts;
  for (size_t pos; (pos = all.find(sep)) != std::string::npos;) {
    texts.push_back(all.substr(0, pos));
    all.erase(0, pos + sep.size());
  }
  return texts;
}

std::vector<std::vector<int32_t>> read_ids(const std::string& path) {
  std::istringstream in(read_all(path));
  std::vector<std::vector<int32_t>> out;
  for (std::string line; std::getline(in, line);) {
    std::istringstream ls(line);
    std::vector<int32_t> ids;
    for (int32_t id; ls >> id;) ids.push_back(id);
    out.push_back(std::move(ids));
  }
  return out;
}

// A file of tests/data/vocab; throws naming it when missing.
std::string vocab_fixture(const std::string& name) { return test::fixture_path("vocab/" + name); }

std::unique_ptr<Tokenizer> load(const std::string& name) {
  auto f = GgufFile::open(vocab_fixture(name));
  return Tokenizer::create(vocab_from_gguf(*f));
}

class VocabSuite : public ::testing::TestWithParam<const char*> {};

TEST_P(VocabSuite, EveryTextEncodesToLlamaCppIds) {
  const std::string name = GetParam();
  const auto texts = read_texts(vocab_fixture(name + ".inp"));
  const auto expected = read_ids(vocab_fixture(name + ".out"));
  ASSERT_EQ(texts.size(), 46u);
  ASSERT_EQ(texts.size(), expected.size());
  const auto tok = load(name);
  for (size_t i = 0; i < texts.size(); ++i) {
    EXPECT_EQ(tok->encode(texts[i], /*add_special=*/false, /*parse_special=*/false), expected[i])
        << "text " << i << ": '" << texts[i] << "'";
  }
}

TEST_P(VocabSuite, DecodeRoundTripsEveryText) {
  const std::string name = GetParam();
  const auto tok = load(name);
  for (const std::string& text : read_texts(vocab_fixture(name + ".inp"))) {
    const auto ids = tok->encode(text, true, false);
    // SentencePiece cannot tell " x" from "x" after its own prefix... but it adds exactly one space,
    // which decode removes, so the text comes back byte for byte in both models.
    EXPECT_EQ(tok->decode(ids), text);
  }
}

TEST_P(VocabSuite, EncodesHundredKilobytesQuickly) {
  const std::string name = GetParam();
  std::string big;
  for (const std::string& t : read_texts(vocab_fixture(name + ".inp"))) big += t + "\n";
  while (big.size() < 100 * 1024) big += big;
  big.resize(100 * 1024);
  // Cut at a character boundary so the text stays valid UTF-8.
  while (!big.empty() && (static_cast<uint8_t>(big.back()) & 0xC0) == 0x80) big.pop_back();
  if (!big.empty() && static_cast<uint8_t>(big.back()) >= 0xC0) big.pop_back();
  const auto tok = load(name);
  const auto t0 = std::chrono::steady_clock::now();
  const auto ids = tok->encode(big, false, false);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_GT(ids.size(), 10000u);
#if defined(__OPTIMIZE__) && !defined(__SANITIZE_ADDRESS__)
  // An optimized build takes a few milliseconds; the bound leaves room for a loaded CI runner.
  EXPECT_LT(s, 0.5) << "encoding 100 KB took " << s << " s";
#else
  std::printf("encoding 100 KB took %.3f s (unoptimized or sanitized build: not checked)\n", s);
#endif
  EXPECT_EQ(tok->decode(ids), big);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, VocabSuite,
                         ::testing::Values("ggml-vocab-llama-spm.gguf", "ggml-vocab-gpt-2.gguf"));

TEST(VocabGguf, ReadsSpecialIdsAndFlags) {
  const auto spm = load("ggml-vocab-llama-spm.gguf");
  EXPECT_EQ(spm->n_vocab(), 32000);
  EXPECT_EQ(spm->bos(), 1);
  EXPECT_EQ(spm->eos(), 2);
  EXPECT_EQ(spm->vocab().unk, 0);
  EXPECT_TRUE(spm->vocab().add_bos);
  EXPECT_EQ(spm->vocab().model, Vocab::Model::kSpm);
  const auto gpt2 = load("ggml-vocab-gpt-2.gguf");
  EXPECT_EQ(gpt2->n_vocab(), 50257);
  EXPECT_EQ(gpt2->vocab().model, Vocab::Model::kBpe);
  EXPECT_EQ(gpt2->vocab().pre, "gpt-2");
  EXPECT_EQ(gpt2->eos(), 50256);
}

TEST(VocabGguf, SpecialTokensAndBos) {
  const auto spm = load("ggml-vocab-llama-spm.gguf");
  // "Hello" is 15043 after the prefix space (first line of the suite's " Hello" expectations).
  EXPECT_EQ(spm->encode("Hello", true, false), (std::vector<int32_t>{1, 15043}));
  // Parsed: "<s>" becomes BOS and the text after it gets its own prefix space.
  EXPECT_EQ(spm->encode("<s>Hello", false, true), (std::vector<int32_t>{1, 15043}));
  // Not parsed: "<s>" is spelled with ordinary pieces.
  const auto raw = spm->encode("<s>Hello", false, false);
  EXPECT_GT(raw.size(), 2u);
  EXPECT_EQ(std::count(raw.begin(), raw.end(), 1), 0);
  EXPECT_EQ(spm->decode(raw), "<s>Hello");

  const auto gpt2 = load("ggml-vocab-gpt-2.gguf");
  EXPECT_EQ(gpt2->encode("a<|endoftext|>b", false, true).at(1), 50256);
  EXPECT_EQ(gpt2->token_to_piece(50256), "");
}

}  // namespace
}  // namespace shardlm
