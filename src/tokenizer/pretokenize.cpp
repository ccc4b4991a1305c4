#include "tokenizer/pretokenize.h"

#include <cstdint>
#include <string>

#include "core/error.h"
#include "tokenizer/unicode.h"

namespace shardlm {

PreSplit pre_split_from_name(std::string_view pre) {
  if (pre == "default" || pre == "gpt-2" || pre == "gpt2") return PreSplit::kGpt2;
  if (pre == "llama-bpe" || pre == "llama3" || pre == "llama-v3") return PreSplit::kLlama3;
  if (pre == "qwen2") return PreSplit::kQwen2;
  if (pre == "none") return PreSplit::kNone;
  fail_kind(ErrorKind::kUnsupported, "tokenizer.ggml.pre: unsupported pre-tokenizer '", pre,
            "' (supported: default, gpt-2, gpt2, llama-bpe, llama3, llama-v3, qwen2, none)");
}

namespace {

// The text decoded once: codepoints, their classes and byte offsets, so the matchers can look
// ahead by codepoint index and emit byte ranges.
class Cpts {
 public:
  explicit Cpts(std::string_view text) {
    for (size_t pos = 0; pos < text.size();) {
      const Utf8Char c = utf8_decode(text, pos);
      uint8_t f = 0;
      if (is_letter(c.cp)) f |= kLetter;
      else if (is_number(c.cp)) f |= kNumber;
      else if (is_whitespace(c.cp)) f |= kSpace;
      cp_.push_back(c.cp);
      flags_.push_back(f);
      off_.push_back(pos);
      pos += c.len;
    }
    off_.push_back(text.size());
  }
  size_t size() const { return cp_.size(); }
  // Out of range reads as codepoint 0 with no class, which no matcher accepts.
  uint32_t cp(size_t i) const { return i < cp_.size() ? cp_[i] : 0; }
  bool in(size_t i) const { return i < cp_.size(); }
  bool letter(size_t i) const { return in(i) && (flags_[i] & kLetter); }
  bool number(size_t i) const { return in(i) && (flags_[i] & kNumber); }
  bool space(size_t i) const { return in(i) && (flags_[i] & kSpace); }
  // [^\s\p{L}\p{N}]
  bool other(size_t i) const { return in(i) && flags_[i] == 0; }
  size_t offset(size_t i) const { return off_[i]; }

 private:
  static constexpr uint8_t kLetter = 1, kNumber = 2, kSpace = 4;
  std::vector<uint32_t> cp_;
  std::vector<uint8_t> flags_;
  std::vector<size_t> off_;
};

uint32_t ascii_lower(uint32_t c) { return (c >= 'A' && c <= 'Z') ? c + 32 : c; }

// Length (in codepoints) of an English contraction at i: 's 't 'm 'd (2) or 're 've 'll (3); 0 if none.
size_t contraction(const Cpts& c, size_t i, bool case_insensitive) {
  if (c.cp(i) != '\'' || !c.in(i + 1)) return 0;
  const auto low = [&](size_t k) { return case_insensitive ? ascii_lower(c.cp(k)) : c.cp(k); };
  const uint32_t a = low(i + 1);
  if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
  if (!c.in(i + 2)) return 0;
  const uint32_t b = low(i + 2);
  if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
  return 0;
}

// Whitespace alternatives shared by all splits: \s+(?!\S) leaves the last space of a run for the
// word after it; a run at the end of the text (or before nothing else) is taken whole by \s+.
size_t match_spaces(const Cpts& c, size_t i) {
  size_t n = 0;
  while (c.space(i + n)) ++n;
  if (n > 1 && c.in(i + n)) return n - 1;
  return n;
}

size_t match_gpt2(const Cpts& c, size_t i) {
  if (size_t n = contraction(c, i, false)) return n;
  const size_t j = i + (c.cp(i) == ' ' ? 1 : 0);  // optional leading space
  size_t k = j;
  if (c.letter(j)) {
    while (c.letter(k)) ++k;
    return k - i;
  }
  if (c.number(j)) {
    while (c.number(k)) ++k;
    return k - i;
  }
  if (c.other(j)) {
    while (c.other(k)) ++k;
    return k - i;
  }
  if (size_t n = match_spaces(c, i)) return n;
  return 1;
}

size_t match_llama3(const Cpts& c, size_t i, size_t max_digits) {
  if (size_t n = contraction(c, i, true)) return n;
  const uint32_t cp = c.cp(i);
  // [^\r\n\p{L}\p{N}]?\p{L}+
  if (cp != '\r' && cp != '\n' && !c.number(i) && (c.letter(i) || c.letter(i + 1))) {
    size_t k = i + 1;
    while (c.letter(k)) ++k;
    return k - i;
  }
  // \p{N}{1,max}
  if (c.number(i)) {
    size_t k = i;
    while (c.number(k) && k - i < max_digits) ++k;
    return k - i;
  }
  //  ?[^\s\p{L}\p{N}]+[\r\n]*
  const size_t j = i + (cp == ' ' ? 1 : 0);
  if (c.other(j)) {
    size_t k = j;
    while (c.other(k)) ++k;
    while (c.cp(k) == '\r' || c.cp(k) == '\n') ++k;
    return k - i;
  }
  // \s*[\r\n]+ : the longest whitespace run that ends in a line break
  size_t n = 0, last_break = 0;
  while (c.space(i + n)) {
    if (c.cp(i + n) == '\r' || c.cp(i + n) == '\n') last_break = n + 1;
    ++n;
  }
  if (last_break > 0) return last_break;
  if (size_t m = match_spaces(c, i)) return m;
  return 1;
}

}  // namespace

std::vector<std::string_view> pre_split(std::string_view text, PreSplit kind) {
  std::vector<std::string_view> words;
  if (text.empty()) return words;
  if (kind == PreSplit::kNone) {
    words.push_back(text);
    return words;
  }
  const Cpts c(text);
  for (size_t i = 0; i < c.size();) {
    size_t n = 0;
    switch (kind) {
      case PreSplit::kGpt2: n = match_gpt2(c, i); break;
      case PreSplit::kLlama3: n = match_llama3(c, i, 3); break;
      case PreSplit::kQwen2: n = match_llama3(c, i, 1); break;
      case PreSplit::kNone: n = c.size() - i; break;
    }
    SHARDLM_CHECK(n > 0 && i + n <= c.size());
    words.push_back(text.substr(c.offset(i), c.offset(i + n) - c.offset(i)));
    i += n;
  }
  return words;
}

}  // namespace shardlm
