// Hugging Face tokenizers: tokenizer.json (+ tokenizer_config.json) read into a Vocab whose
// `hf` options make Tokenizer::create follow Hugging Face's semantics rather than llama.cpp's.
//
// Supported (anything else is refused with an Error of kind kUnsupported naming the JSON field):
//   model        BPE (vocab, merges as "a b" strings or [a, b] pairs, byte_fallback, fuse_unk,
//                ignore_merges, unk_token); dropout is ignored (it only matters for training).
//   byte-level   pre_tokenizer ByteLevel (use_regex: GPT-2's split; add_prefix_space), or
//                Sequence[Split(Regex = the GPT-2, Llama 3 or Qwen2 pattern, Isolated), ByteLevel(use_regex
//                false)]: model kBpe, Vocab::pre "gpt-2" / "llama-bpe" / "qwen2" / "none".
//   SentencePiece-style   pre_tokenizer Metaspace (replacement U+2581; prepend_scheme first/always/
//                never or the older add_prefix_space; split), or normalizers Prepend("▁") + Replace(" ",
//                "▁"): model kSpm with merge ranks and byte fallback.
//   normalizer   the above, and NFC, which is taken as the identity (exact for text already in NFC,
//                which is nearly all text; decomposed input may tokenize differently).
//   added_tokens special ones become kControl (matched only with parse_special), the others
//                kUserDefined (always matched); longest match first, scanning left to right. The
//                lstrip/rstrip/single_word/normalized flags are ignored.
//   BOS/EOS      add_bos/add_eos from a TemplateProcessing post-processor (a special token before
//                or after $A), overridden by tokenizer_config.json's add_bos_token/add_eos_token; bos,
//                eos, unk, pad ids from tokenizer_config.json's *_token entries (string or
//                {"content": ...}), else "<s>"/"<|begin_of_text|>" and "</s>"/"<|endoftext|>" if present.
//   tokenizer_config.json add_prefix_space with a Metaspace pre-tokenizer picks prepend_scheme as
//                transformers' Llama tokenizers do: true -> "always" ("first" when legacy is false),
//                false -> "never".
#pragma once

#include <memory>
#include <string>

#include "tokenizer/tokenizer.h"

namespace shardlm {

// `tokenizer_config_path_or_empty`: "" to read tokenizer.json alone. Throws Error naming the file and
// the JSON field on anything malformed or unsupported.
Vocab vocab_from_hf_tokenizer(const std::string& tokenizer_json_path,
                              const std::string& tokenizer_config_path_or_empty);

// A checkpoint directory (tokenizer.json and, when present, tokenizer_config.json inside it) or the
// path of a tokenizer.json (its sibling tokenizer_config.json is read when present).
std::unique_ptr<Tokenizer> load_hf_tokenizer(const std::string& dir_or_json_path);

}  // namespace shardlm
