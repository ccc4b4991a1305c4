// Tokenizers: SentencePiece-style BPE ("llama" in GGUF) and byte-level BPE ("gpt2"), read from GGUF
// metadata; the Hugging Face tokenizer.json form is read by tokenizer/hf_tokenizer.h.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace shardlm {

class GgufFile;

// GGUF token types (tokenizer.ggml.token_type).
enum class TokenType : int32_t {
  kUndefined = 0,
  kNormal = 1,
  kUnknown = 2,
  kControl = 3,
  kUserDefined = 4,
  kUnused = 5,
  kByte = 6,
};

// Everything a tokenizer needs, independent of where it came from.
struct Vocab {
  enum class Model { kSpm, kBpe };
  Model model = Model::kSpm;
  std::string pre = "default";         // tokenizer.ggml.pre: "default", "llama-bpe", "qwen2", "gpt-2", ...
  std::vector<std::string> tokens;     // (n_vocab) pieces; SPM pieces use U+2581 for spaces
  std::vector<float> scores;           // (n_vocab) or empty
  std::vector<TokenType> types;        // (n_vocab) or empty (then all kNormal)
  std::vector<std::string> merges;     // BPE only: "a b" in priority order
  int32_t bos = -1, eos = -1, unk = -1, pad = -1;  // -1 when absent
  bool add_bos = true;                 // tokenizer.ggml.add_bos_token
  bool add_eos = false;
  bool add_space_prefix = true;        // SPM: prepend U+2581 (tokenizer.ggml.add_space_prefix)

  // --- Additions (optional; the defaults keep llama.cpp's GGUF behaviour) ---
  // BPE: a pre-tokenized word that is itself a token is emitted without merging (Llama 3's
  // tokenizer.json "ignore_merges"; llama.cpp sets it for the llama3 pre-tokenizers).
  bool ignore_merges = false;

  // Hugging Face tokenizer.json semantics, set by vocab_from_hf_tokenizer (tokenizer/hf_tokenizer.h).
  // With `enabled`, kSpm means Hugging Face's BPE over U+2581-marked text (merge ranks from `merges`,
  // not SentencePiece scores), and text around special tokens is prepared per segment as below.
  struct HfOptions {
    bool enabled = false;
    // kSpm: how U+2581 is put before each text segment (the text between two special tokens).
    //   kFirst/kAlways: Metaspace prepend_scheme; only when the segment does not already start with
    //     U+2581 (after spaces became U+2581); kFirst only for the segment at the start of the text.
    //   kUnconditional: the older Prepend("▁") normalizer: every segment.
    enum class Prepend { kNever, kFirst, kAlways, kUnconditional };
    Prepend prepend = Prepend::kAlways;
    bool split_on_marker = false;   // Metaspace split=true: each U+2581 starts a new word
    bool byte_fallback = false;     // characters outside the vocabulary become <0xNN> tokens
    bool fuse_unk = false;          // consecutive unknown characters give one unk token
    bool add_prefix_space = false;  // kBpe: ByteLevel add_prefix_space (' ' before each segment)
  };
  HfOptions hf;
};

// Reads tokenizer.ggml.* from a GGUF file; throws Error naming the key on anything malformed
// (missing tokens, arrays of different lengths, special ids outside the vocabulary, unknown model).
Vocab vocab_from_gguf(const GgufFile& f);

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  static std::unique_ptr<Tokenizer> create(Vocab vocab);

  // `add_special`: prepend BOS (and append EOS) as the vocabulary asks. `parse_special`: text such as
  // "<s>" matching a control/user-defined token becomes that token instead of being split.
  virtual std::vector<int32_t> encode(std::string_view text, bool add_special,
                                      bool parse_special) const = 0;
  // Text of one token as it appears in output (SPM: U+2581 -> ' ', <0xNN> -> that byte; BPE: byte
  // decoding of the byte-level alphabet). Control tokens give "".
  virtual std::string token_to_piece(int32_t id) const = 0;
  // Concatenated pieces; SPM drops the single leading space the encoder added.
  virtual std::string decode(const std::vector<int32_t>& ids) const = 0;

  const Vocab& vocab() const { return vocab_; }
  int32_t n_vocab() const { return static_cast<int32_t>(vocab_.tokens.size()); }
  int32_t bos() const { return vocab_.bos; }
  int32_t eos() const { return vocab_.eos; }

 protected:
  explicit Tokenizer(Vocab v) : vocab_(std::move(v)) {}
  Vocab vocab_;
};

}  // namespace shardlm
