// Vocabulary from GGUF metadata (tokenizer.ggml.*), with llama.cpp's defaults where a key is absent.
#include <string>

#include "core/error.h"
#include "formats/gguf.h"
#include "tokenizer/pretokenize.h"
#include "tokenizer/tokenizer.h"

namespace shardlm {
namespace {

int32_t special_id(const GgufFile& f, const char* key, int32_t fallback, size_t n_vocab) {
  const std::optional<uint64_t> v = f.get_uint(key);
  if (!v) return fallback;
  if (*v >= n_vocab) fail(f.path(), ": ", key, " = ", *v, " is outside the vocabulary [0, ", n_vocab, ")");
  return static_cast<int32_t>(*v);
}

}  // namespace

Vocab vocab_from_gguf(const GgufFile& f) {
  Vocab v;
  std::optional<std::vector<std::string>> tokens = f.get_string_array("tokenizer.ggml.tokens");
  if (!tokens) fail("no tokenizer in ", f.path(), " (tokenizer.ggml.tokens missing)");
  const size_t n = tokens->size();
  if (n == 0) fail(f.path(), ": tokenizer.ggml.tokens is empty");
  if (n > static_cast<size_t>(INT32_MAX))
    fail(f.path(), ": tokenizer.ggml.tokens has ", n, " entries, more than the limit ", INT32_MAX);
  for (size_t i = 0; i < n; ++i)
    if ((*tokens)[i].empty()) fail(f.path(), ": tokenizer.ggml.tokens[", i, "] is empty");
  v.tokens = std::move(*tokens);

  const std::optional<std::string> model = f.get_string("tokenizer.ggml.model");
  if (!model) fail(f.path(), ": tokenizer.ggml.model missing (tokens are present)");
  if (*model == "llama") {
    v.model = Vocab::Model::kSpm;
  } else if (*model == "gpt2") {
    v.model = Vocab::Model::kBpe;
  } else {
    fail_kind(ErrorKind::kUnsupported, f.path(), ": tokenizer.ggml.model '", *model,
              "' is not supported (supported: llama, gpt2)");
  }
  v.pre = f.get_string("tokenizer.ggml.pre").value_or("default");

  if (auto scores = f.get_float_array("tokenizer.ggml.scores")) {
    if (scores->size() != n)
      fail(f.path(), ": tokenizer.ggml.scores has ", scores->size(), " entries but tokenizer.ggml.tokens has ", n);
    v.scores.assign(scores->begin(), scores->end());
  }
  if (auto types = f.get_int_array("tokenizer.ggml.token_type")) {
    if (types->size() != n)
      fail(f.path(), ": tokenizer.ggml.token_type has ", types->size(),
           " entries but tokenizer.ggml.tokens has ", n);
    v.types.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      const int64_t t = (*types)[i];
      if (t < 0 || t > 6) fail(f.path(), ": tokenizer.ggml.token_type[", i, "] = ", t, " (valid 0..6)");
      v.types.push_back(static_cast<TokenType>(t));
    }
  }
  if (auto merges = f.get_string_array("tokenizer.ggml.merges")) v.merges = std::move(*merges);

  const bool spm = v.model == Vocab::Model::kSpm;
  if (!spm) {
    if (v.merges.empty()) fail(f.path(), ": tokenizer.ggml.merges missing for tokenizer.ggml.model 'gpt2'");
    try {
      const PreSplit split = pre_split_from_name(v.pre);
      // Llama 3's tokenizer emits words that are tokens unmerged; llama.cpp mirrors it.
      v.ignore_merges = split == PreSplit::kLlama3;
    } catch (const Error& e) {
      throw Error(cat(f.path(), ": ", e.what()), e.kind());
    }
  }
  // llama.cpp's defaults: SentencePiece vocabularies put <unk>, <s>, </s> at 0, 1, 2.
  v.bos = special_id(f, "tokenizer.ggml.bos_token_id", spm && n > 1 ? 1 : -1, n);
  v.eos = special_id(f, "tokenizer.ggml.eos_token_id", spm && n > 2 ? 2 : -1, n);
  v.unk = special_id(f, "tokenizer.ggml.unknown_token_id", spm ? 0 : -1, n);
  v.pad = special_id(f, "tokenizer.ggml.padding_token_id", -1, n);
  v.add_bos = f.get_bool("tokenizer.ggml.add_bos_token").value_or(spm || v.ignore_merges);
  v.add_eos = f.get_bool("tokenizer.ggml.add_eos_token").value_or(false);
  v.add_space_prefix = f.get_bool("tokenizer.ggml.add_space_prefix").value_or(spm);
  return v;
}

}  // namespace shardlm
