// Pre-tokenizer splits against the regexes they implement: hand-picked cases that tell the splits
// apart, and 400 random texts split by Python's `regex` module (pretokenize_cases.json).
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "tokenizer/pretokenize.h"
#include "tokenizer/unicode.h"

namespace shardlm {
namespace {

using Words = std::vector<std::string>;

Words split(std::string_view text, PreSplit kind) {
  Words out;
  for (std::string_view w : pre_split(text, kind)) out.emplace_back(w);
  return out;
}

TEST(PreSplit, DigitsGroupByThreeInLlama3AndOneInQwen2) {
  EXPECT_EQ(split("12345", PreSplit::kLlama3), (Words{"123", "45"}));
  EXPECT_EQ(split("12345", PreSplit::kQwen2), (Words{"1", "2", "3", "4", "5"}));
  EXPECT_EQ(split("12345", PreSplit::kGpt2), (Words{"12345"}));
  EXPECT_EQ(split("$$$ 3.14", PreSplit::kLlama3), (Words{"$$$", " ", "3", ".", "14"}));
}

TEST(PreSplit, ContractionsAreCaseInsensitiveOnlyInLlama3) {
  EXPECT_EQ(split("I'm", PreSplit::kLlama3), (Words{"I", "'m"}));
  EXPECT_EQ(split("I'm", PreSplit::kGpt2), (Words{"I", "'m"}));
  EXPECT_EQ(split("DON'T", PreSplit::kLlama3), (Words{"DON", "'T"}));
  EXPECT_EQ(split("DON'T", PreSplit::kQwen2), (Words{"DON", "'T"}));
  EXPECT_EQ(split("DON'T", PreSplit::kGpt2), (Words{"DON", "'", "T"}));
  EXPECT_EQ(split("we'LL", PreSplit::kLlama3), (Words{"we", "'LL"}));
}

TEST(PreSplit, SpaceRunsLeaveTheLastSpaceToTheNextWord) {
  EXPECT_EQ(split("a   b", PreSplit::kGpt2), (Words{"a", "  ", " b"}));
  EXPECT_EQ(split("a   b", PreSplit::kLlama3), (Words{"a", "  ", " b"}));
  EXPECT_EQ(split("   ", PreSplit::kLlama3), (Words{"   "}));
  EXPECT_EQ(split("end  ", PreSplit::kGpt2), (Words{"end", "  "}));
}

TEST(PreSplit, NewlinesStayTogetherInLlama3) {
  EXPECT_EQ(split("a\n\nb", PreSplit::kLlama3), (Words{"a", "\n\n", "b"}));
  EXPECT_EQ(split("a\n\nb", PreSplit::kGpt2), (Words{"a", "\n", "\n", "b"}));
  EXPECT_EQ(split("Hello  \n  world", PreSplit::kLlama3), (Words{"Hello", "  \n", " ", " world"}));
  EXPECT_EQ(split("x!!\n\ny", PreSplit::kLlama3), (Words{"x", "!!\n\n", "y"}));
  EXPECT_EQ(split("a\r\n\r\n  b", PreSplit::kQwen2), (Words{"a", "\r\n\r\n", " ", " b"}));
}

TEST(PreSplit, UnicodeClasses) {
  EXPECT_EQ(split("Ünïcødé 你好 ١٢٣٤", PreSplit::kLlama3),
            (Words{"Ünïcødé", " 你好", " ", "١٢٣", "٤"}));
  EXPECT_EQ(split("Ünïcødé 你好 ١٢٣٤", PreSplit::kGpt2), (Words{"Ünïcødé", " 你好", " ١٢٣٤"}));
  EXPECT_TRUE(is_letter(0x4F60));
  EXPECT_TRUE(is_number(0x2167));  // Roman numeral eight (Nl)
  EXPECT_FALSE(is_letter(0x0301));  // combining acute accent (Mn)
  EXPECT_TRUE(is_whitespace(0x3000));
  EXPECT_FALSE(is_whitespace(0x200B));  // zero-width space is not White_Space
}

TEST(PreSplit, InvalidUtf8IsKeptAsSymbols) {
  const std::string text = "ab\xff\xfe cd\xc3";
  const Words w = split(text, PreSplit::kGpt2);
  EXPECT_EQ(w, (Words{"ab", "\xff\xfe", " cd", "\xc3"}));
}

TEST(PreSplit, UnknownNameIsAnErrorListingTheSupportedOnes) {
  try {
    pre_split_from_name("deepseek-coder");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("deepseek-coder"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("llama-bpe"), std::string::npos);
  }
}

TEST(PreSplit, MatchesPythonRegexOnRandomTexts) {
  std::ifstream in(std::string(SHARDLM_SOURCE_DIR) + "/tests/tokenizer/pretokenize_cases.json");
  ASSERT_TRUE(in) << "pretokenize_cases.json missing";
  const auto j = nlohmann::json::parse(in);
  const auto& cases = j.at("cases");
  ASSERT_EQ(cases.size(), 400u);
  for (const auto& c : cases) {
    const std::string text = c.at("text");
    for (const char* name : {"gpt-2", "llama-bpe", "qwen2"}) {
      EXPECT_EQ(split(text, pre_split_from_name(name)), c.at(name).get<Words>())
          << name << " on " << nlohmann::json(text).dump();
    }
  }
}

}  // namespace
}  // namespace shardlm
