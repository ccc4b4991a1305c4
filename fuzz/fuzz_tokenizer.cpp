// libFuzzer target: text a client sends, through the tokenizers of the fixtures (SentencePiece-style llama
// vocabulary from GGUF, byte-level BPE from GGUF, and the two tokenizer.json files): encode with and without
// special-token parsing, decode the ids back, and token_to_piece every id. The first byte picks the
// tokenizer and the flags; the rest is the text. Nothing may crash, hang or read out of bounds, and every id
// must lie in the vocabulary.
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "core/error.h"
#include "formats/gguf.h"
#include "tokenizer/hf_tokenizer.h"
#include "tokenizer/tokenizer.h"

namespace {

std::vector<std::unique_ptr<shardlm::Tokenizer>>& tokenizers() {
  static std::vector<std::unique_ptr<shardlm::Tokenizer>> t = [] {
    std::vector<std::unique_ptr<shardlm::Tokenizer>> v;
    const std::string data = SHARDLM_FUZZ_DATA_DIR;
    for (const char* g : {"/vocab/ggml-vocab-llama-spm.gguf", "/vocab/ggml-vocab-gpt-2.gguf"})
      v.push_back(shardlm::Tokenizer::create(shardlm::vocab_from_gguf(*shardlm::GgufFile::open(data + g))));
    for (const char* j : {"/tokenizers/llama2/tokenizer.json", "/tokenizers/gpt2/tokenizer.json"})
      v.push_back(shardlm::load_hf_tokenizer(data + j));
    return v;
  }();
  return t;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace shardlm;
  if (size < 1) return 0;
  auto& all = tokenizers();
  const Tokenizer& tok = *all[data[0] % all.size()];
  const bool parse_special = (data[0] >> 4) & 1;
  const std::string text(reinterpret_cast<const char*>(data + 1), size - 1);
  try {
    const std::vector<int32_t> ids = tok.encode(text, /*add_special=*/(data[0] >> 5) & 1, parse_special);
    for (int32_t id : ids)
      if (id < 0 || id >= tok.n_vocab()) std::abort();  // an id outside the vocabulary
    std::string back;
    for (int32_t id : ids) back += tok.token_to_piece(id);
    (void)tok.decode(ids);
  } catch (const Error&) {
  }
  return 0;
}
