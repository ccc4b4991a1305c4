#include <cstdio>

#include "cli_common.h"
#include "commands.h"
#include "config/presets.h"
#include "core/error.h"
#include "loader/gguf_export.h"
#include "loader/llama2c_source.h"

namespace shardlm {

int cmd_convert(int argc, const char* const* argv) {
  CLI::App app("Convert a llama2.c checkpoint (with its tokenizer.bin) or a Hugging Face directory to GGUF.",
               "convert");
  std::string from, input, tokenizer, out, type;
  bool quiet = false;
  app.add_option("--from", from, "source format: llama2c or hf")->required();
  app.add_option("input", input, "checkpoint file (llama2c) or model directory (hf)")->required();
  app.add_option("--tokenizer", tokenizer, "llama2.c tokenizer.bin (required with --from llama2c)");
  app.add_option("-o,--output", out, "output GGUF path")->required();
  app.add_option("--type", type, "convert weights to a scheme: " + scheme_names() + " (default: keep)");
  app.add_flag("-q,--quiet", quiet, "no progress output");
  if (int rc = parse_cli(app, argc, argv); rc >= 0) return rc;
  std::unique_ptr<ModelSource> src;
  if (from == "llama2c") {
    if (tokenizer.empty()) fail("--tokenizer is required with --from llama2c");
    src = open_llama2c_source(input, tokenizer);
  } else if (from == "hf") {
    src = open_model(input);
  } else {
    fail("--from '", from, "' is not llama2c or hf");
  }
  Progress progress("writing " + out, !quiet);
  export_gguf(*src, out, type, [&](uint64_t d, uint64_t t) { progress(d, t); });
  progress.finish();
  return 0;
}

}  // namespace shardlm
