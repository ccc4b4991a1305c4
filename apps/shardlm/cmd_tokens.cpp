// tokenize / detokenize.
#include <cstdio>
#include <fstream>
#include <filesystem>
#include <sstream>

#include <nlohmann/json.hpp>

#include "cli_common.h"
#include "commands.h"
#include "core/error.h"
#include "formats/gguf.h"

namespace shardlm {
namespace {

// Vocabulary-only GGUF files have no model config, so tokenizers come from the file directly.
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::is_directory(path, ec)) {
    auto f = GgufFile::open(path);
    if (!f->find("tokenizer.ggml.tokens")) fail(path, ": no tokenizer in this file (tokenizer.ggml.tokens missing)");
    return Tokenizer::create(vocab_from_gguf(*f));
  }
  auto src = open_model(path);
  if (!src->vocab()) fail(path, ": this model directory has no tokenizer");
  return Tokenizer::create(*src->vocab());
}

}  // namespace

int cmd_tokenize(int argc, const char* const* argv) {
  CLI::App app("Turn text into token ids.", "tokenize");
  std::string model, text, text_file;
  bool no_bos = false, json = false, parse_special = false, pieces = false;
  app.add_option("-m,--model", model, "GGUF file (a vocabulary-only file works) or HF directory");
  app.add_option("--text,-p", text, "text to tokenize");
  app.add_option("--text-file,-f", text_file, "read the text from a file (- = standard input)");
  app.add_flag("--no-bos", no_bos, "do not add the BOS token");
  app.add_flag("--parse-special", parse_special, "turn written special tokens such as <s> into their ids");
  app.add_flag("--pieces", pieces, "print each id with its piece");
  app.add_flag("--json", json, "print {\"ids\": [...]}, with --pieces also \"pieces\": [...] (one string per id)");
  if (int rc = parse_cli(app, argc, argv); rc >= 0) return rc;
  if (!text.empty() && !text_file.empty()) fail("give only one of --text and --text-file");
  if (!text_file.empty()) text = read_text_file(text_file, "--text-file");
  auto tok = load_tokenizer(model.empty() ? default_model_path() : model);
  const std::vector<int32_t> ids = tok->encode(text, !no_bos, parse_special);
  if (json) {
    nlohmann::json j;
    j["ids"] = ids;
    if (pieces) {
      std::vector<std::string> p;
      for (int32_t id : ids) p.push_back(tok->token_to_piece(id));
      j["pieces"] = p;
    }
    // A piece may be part of a UTF-8 character: such bytes become U+FFFD rather than ending the run.
    std::printf("%s\n", j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
  } else if (pieces) {
    for (int32_t id : ids) std::printf("%6d '%s'\n", id, tok->token_to_piece(id).c_str());
  } else {
    for (size_t i = 0; i < ids.size(); ++i) std::printf(i ? ",%d" : "%d", ids[i]);
    std::printf("\n");
  }
  return 0;
}

int cmd_detokenize(int argc, const char* const* argv) {
  CLI::App app("Turn token ids into text.", "detokenize");
  std::string model, ids_s;
  bool json = false;
  app.add_option("-m,--model", model, "GGUF file or HF directory");
  app.add_option("--ids", ids_s, "comma-separated ids, e.g. 1,2,3")->required();
  app.add_flag("--json", json, "print {\"ids\": [...], \"text\": \"...\"}");
  if (int rc = parse_cli(app, argc, argv); rc >= 0) return rc;
  auto tok = load_tokenizer(model.empty() ? default_model_path() : model);
  const std::vector<int32_t> ids = parse_id_list(ids_s, "--ids");
  for (int32_t id : ids)
    if (id >= tok->n_vocab()) fail("--ids: id ", id, " is outside the vocabulary [0, ", tok->n_vocab(), ")");
  const std::string text = tok->decode(ids);
  if (json) {
    nlohmann::json j;
    j["ids"] = ids;
    j["text"] = text;
    std::printf("%s\n", j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
  } else {
    std::printf("%s\n", text.c_str());
  }
  return 0;
}

}  // namespace shardlm
