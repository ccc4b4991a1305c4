// Pre-tokenizers of byte-level BPE: split text into words before merges, as the regexes of GPT-2,
// Llama 3 and Qwen2 do. Hand-written matchers (like llama.cpp's unicode.cpp) rather than std::regex,
// which knows neither \p{L} nor \p{N} and is slow.
#pragma once

#include <string_view>
#include <vector>

namespace shardlm {

enum class PreSplit {
  kNone,    // the whole text is one word
  kGpt2,    // 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
  kLlama3,  // (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|
            //   \s*[\r\n]+|\s+(?!\S)|\s+
  kQwen2,   // as kLlama3 with \p{N} (one digit per word)
};

// Maps tokenizer.ggml.pre to a split; throws Error naming the value and the supported names.
PreSplit pre_split_from_name(std::string_view pre);

// Splits `text` into consecutive, non-empty views covering it exactly. Invalid UTF-8 bytes count as
// symbols (neither letter, number nor space), as U+FFFD would.
std::vector<std::string_view> pre_split(std::string_view text, PreSplit kind);

}  // namespace shardlm
