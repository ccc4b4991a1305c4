// Unicode helpers for the tokenizers: lenient UTF-8 decoding, the character classes the pre-tokenizer
// regexes use (\p{L}, \p{N}, \s), and GPT-2's byte <-> printable-character mapping.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace shardlm {

struct CodepointRange {
  uint32_t first, last;  // inclusive
};

namespace unicode_data {
// Generated tables (unicode_data.cpp), sorted and disjoint.
extern const CodepointRange kLetterRanges[];
extern const size_t kLetterRanges_size;
extern const CodepointRange kNumberRanges[];
extern const size_t kNumberRanges_size;
}  // namespace unicode_data

// Replacement for bytes that do not start a valid UTF-8 sequence; its class (a symbol) is what the
// regex engines of llama.cpp and Hugging Face give such input.
inline constexpr uint32_t kReplacementChar = 0xFFFD;

// Decodes one codepoint at `s[pos]`. Invalid or truncated sequences decode as kReplacementChar with
// length 1, so every byte of the input stays covered by exactly one unit and nothing is dropped.
struct Utf8Char {
  uint32_t cp;
  uint32_t len;  // bytes, 1..4
};
Utf8Char utf8_decode(std::string_view s, size_t pos);

// Byte length of the UTF-8 sequence a lead byte announces (1 for continuation bytes), the way
// SentencePiece-style tokenizers split text into characters without validating it.
inline size_t utf8_len_from_lead(uint8_t b) {
  static constexpr uint8_t kLen[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
  return kLen[b >> 4];
}

void utf8_append(std::string& out, uint32_t cp);

bool is_letter(uint32_t cp);      // \p{L}
bool is_number(uint32_t cp);      // \p{N}
bool is_whitespace(uint32_t cp);  // \s: the Unicode White_Space property

// GPT-2's bytes_to_unicode: each byte maps to one printable codepoint (its UTF-8 form is what
// byte-level BPE vocabularies store).
const std::array<std::string, 256>& byte_to_unicode();
// Inverse; -1 for codepoints outside the 256 the mapping produces.
int unicode_to_byte(uint32_t cp);

}  // namespace shardlm
