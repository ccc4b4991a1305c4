// Stop strings across token boundaries and incremental UTF-8 (src/serve/text_stream.h): what a client sees
// of the generated text, streamed or whole.
#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "serve/text_stream.h"

namespace shardlm::serve {
namespace {

// Pushes the pieces one by one; returns what was emitted at each push, then finish() last.
std::vector<std::string> run(TextStream& ts, const std::vector<std::string>& pieces) {
  std::vector<std::string> out;
  for (const auto& p : pieces) out.push_back(ts.push(p));
  out.push_back(ts.finish());
  return out;
}

std::string joined(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += x;
  return s;
}

bool valid_utf8(const std::string& s) { return sanitize_utf8(s) == s; }

TEST(Utf8, IncompleteTail) {
  EXPECT_EQ(utf8_incomplete_tail(""), 0u);
  EXPECT_EQ(utf8_incomplete_tail("abc"), 0u);
  EXPECT_EQ(utf8_incomplete_tail("a\xE2"), 1u);          // first byte of € (E2 82 AC)
  EXPECT_EQ(utf8_incomplete_tail("a\xE2\x82"), 2u);
  EXPECT_EQ(utf8_incomplete_tail("a\xE2\x82\xAC"), 0u);  // complete
  EXPECT_EQ(utf8_incomplete_tail("\xF0\x9F\x98"), 3u);   // 3 of the 4 bytes of 😀
  EXPECT_EQ(utf8_incomplete_tail("\xF0\x9F\x98\x80"), 0u);
  EXPECT_EQ(utf8_incomplete_tail("a\x82"), 0u);          // a stray continuation byte never completes
  EXPECT_EQ(utf8_incomplete_tail("\xE2\x41"), 0u);       // lead then ASCII: invalid, nothing to wait for
  EXPECT_EQ(utf8_incomplete_tail("\xE0\x80"), 0u);       // overlong start: can never be valid
  EXPECT_EQ(utf8_incomplete_tail("\xED\xA0"), 0u);       // a surrogate's start
  EXPECT_EQ(utf8_incomplete_tail("\xFF"), 0u);
}

TEST(Utf8, Sanitize) {
  EXPECT_EQ(sanitize_utf8("h\xC3\xA9llo \xE2\x82\xAC \xF0\x9F\x98\x80"), "h\xC3\xA9llo \xE2\x82\xAC \xF0\x9F\x98\x80");
  EXPECT_EQ(sanitize_utf8("a\xFF" "b"), "a\xEF\xBF\xBD" "b");
  EXPECT_EQ(sanitize_utf8("a\xE2\x82"), "a\xEF\xBF\xBD");          // truncated: one replacement
  EXPECT_EQ(sanitize_utf8("\xC0\xAF"), "\xEF\xBF\xBD\xEF\xBF\xBD");  // overlong '/': two invalid bytes
  EXPECT_EQ(sanitize_utf8("\xED\xA0\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");  // a surrogate
  EXPECT_EQ(sanitize_utf8("\xF4\x90\x80\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");  // > U+10FFFF
}

TEST(TextStream, NoStopsEmitsEverythingAtOnce) {
  TextStream ts;
  EXPECT_EQ(run(ts, {"Hello", ",", " world"}), (std::vector<std::string>{"Hello", ",", " world", ""}));
  EXPECT_EQ(ts.text(), "Hello, world");
  EXPECT_FALSE(ts.stopped());
}

TEST(TextStream, HoldsBackHalfCharacters) {
  // "€" split over three tokens (byte-fallback tokens <0xE2><0x82><0xAC>), then a 4-byte emoji over two.
  TextStream ts;
  const auto out = run(ts, {"a", "\xE2", "\x82", "\xAC", "b\xF0\x9F", "\x98\x80"});
  EXPECT_EQ(out, (std::vector<std::string>{"a", "", "", "\xE2\x82\xAC", "b", "\xF0\x9F\x98\x80", ""}));
  for (const auto& o : out) EXPECT_TRUE(valid_utf8(o));
}

TEST(TextStream, IncompleteCharacterAtTheEndBecomesReplacement) {
  TextStream ts;
  EXPECT_EQ(ts.push("x\xE2\x82"), "x");
  EXPECT_EQ(ts.finish(), "\xEF\xBF\xBD");
}

TEST(TextStream, InvalidBytesAreReplacedNotHeld) {
  TextStream ts;
  EXPECT_EQ(ts.push("a\xFF"), "a\xEF\xBF\xBD");
  EXPECT_EQ(ts.push("\x82" "b"), "\xEF\xBF\xBD" "b");
}

TEST(TextStream, StopStringWithinOneToken) {
  TextStream ts({"\n\n"});
  EXPECT_EQ(ts.push("one\n\ntwo"), "one");
  EXPECT_TRUE(ts.stopped());
  EXPECT_EQ(ts.stop_matched(), "\n\n");
  EXPECT_EQ(ts.push("more"), "");
  EXPECT_EQ(ts.finish(), "");
  EXPECT_EQ(ts.text(), "one");
}

TEST(TextStream, StopStringAcrossTokensIsHeldThenDropped) {
  TextStream ts({"END"});
  EXPECT_EQ(ts.push("The E"), "The ");  // "E" could start "END"
  EXPECT_EQ(ts.push("N"), "");          // "EN" still could
  EXPECT_EQ(ts.push("D and more"), "");
  EXPECT_TRUE(ts.stopped());
  EXPECT_EQ(ts.text(), "The ");
}

TEST(TextStream, FalseStartIsReleased) {
  TextStream ts({"END"});
  EXPECT_EQ(ts.push("The E"), "The ");
  EXPECT_EQ(ts.push("Nx"), "ENx");  // "ENx" is no prefix of "END": out it goes
  EXPECT_FALSE(ts.stopped());
  EXPECT_EQ(ts.push("E"), "");
  EXPECT_EQ(ts.finish(), "E");      // generation ended: the held "E" was text after all
  EXPECT_EQ(ts.text(), "The ENxE");
}

TEST(TextStream, OverlappingPrefixes) {
  // "aab": after "aa" the suffix "a" or "aa" may start it; "aaa" then "b" must still match.
  TextStream ts({"aab"});
  EXPECT_EQ(ts.push("xaa"), "x");
  EXPECT_EQ(ts.push("a"), "a");  // "aaa": the first "a" can no longer start "aab"
  EXPECT_EQ(ts.push("b"), "");
  EXPECT_TRUE(ts.stopped());
  EXPECT_EQ(ts.text(), "xa");
}

TEST(TextStream, EarliestOfSeveralStopsWins) {
  TextStream ts({"world", "lo w", "o"});
  EXPECT_EQ(ts.push("hello world"), "hel");  // "lo w" starts at 3, before "o" (4) and "world" (6)
  EXPECT_EQ(ts.stop_matched(), "lo w");
  TextStream t2({"bc", "abcd"});
  EXPECT_EQ(t2.push("xab"), "x");  // "ab" may start "abcd"; "b" may start "bc"
  EXPECT_EQ(t2.push("c"), "a");    // "bc" matched at 2, before "abcd" could complete
  EXPECT_EQ(t2.stop_matched(), "bc");
}

TEST(TextStream, MultibyteStopString) {
  TextStream ts({"\xE2\x82\xAC"});  // "€"
  EXPECT_EQ(ts.push("5 \xE2"), "5 ");
  EXPECT_EQ(ts.push("\x82"), "");
  EXPECT_EQ(ts.push("\xAC!"), "");
  EXPECT_TRUE(ts.stopped());
  EXPECT_EQ(ts.text(), "5 ");
}

TEST(TextStream, PrefixSuffixHelper) {
  EXPECT_EQ(stop_prefix_suffix("abc", {"cde"}), 1u);
  EXPECT_EQ(stop_prefix_suffix("abcd", {"cde", "bcdx"}), 3u);
  EXPECT_EQ(stop_prefix_suffix("abc", {"abc"}), 0u);  // a whole match is not a prefix (matched elsewhere)
  EXPECT_EQ(stop_prefix_suffix("", {"a"}), 0u);
}

// Property: however the text is cut into pieces, the emitted concatenation is the same, is valid UTF-8,
// never contains a stop string, and equals the text before the first stop string (or all of it).
TEST(TextStream, SplitIndependence) {
  const std::string text = "Il \xC3\xA9tait une fois \xE2\x82\xAC 42 \xF0\x9F\x98\x80 STOP! et puis ### fin";
  const std::vector<std::vector<std::string>> stop_sets = {{}, {"STOP"}, {"###"}, {"\xF0\x9F\x98\x80"}, {"zz", "fois \xE2"},
                                                           {"nothing"}};
  std::mt19937 rng(7);
  for (const auto& stops : stop_sets) {
    size_t cut = text.size();
    for (const auto& s : stops) cut = std::min(cut, text.find(s) == std::string::npos ? text.size() : text.find(s));
    const std::string expect = text.substr(0, cut);
    for (int trial = 0; trial < 200; ++trial) {
      std::vector<std::string> pieces;
      for (size_t i = 0; i < text.size();) {
        const size_t n = std::min<size_t>(1 + rng() % 4, text.size() - i);
        pieces.push_back(text.substr(i, n));
        i += n;
      }
      TextStream ts(stops);
      const auto out = run(ts, pieces);
      for (const auto& o : out) ASSERT_TRUE(valid_utf8(o)) << "a piece split a character";
      ASSERT_EQ(joined(out), expect);
      ASSERT_EQ(ts.text(), expect);
      ASSERT_EQ(ts.stopped(), cut != text.size());
    }
  }
}

}  // namespace
}  // namespace shardlm::serve
