#include <cstdio>
#include <filesystem>
#include <optional>

#include "cli_common.h"
#include "commands.h"
#include "config/presets.h"
#include "core/error.h"
#include "loader/gguf_export.h"
#include "loader/hf_source.h"
#include "loader/imatrix.h"
#include "loader/llama2c_source.h"
#include "loader/model_source.h"

namespace shardlm {

int cmd_convert(int argc, const char* const* argv) {
  CLI::App app("Convert a llama2.c checkpoint (with its tokenizer.bin), a Hugging Face directory or a GGUF file "
               "to GGUF, optionally quantizing with one of llama-quantize's schemes.",
               "convert");
  std::string from, input, tokenizer, out, type, imatrix_path;
  bool quiet = false, allow_requantize = false;
  app.add_option("--from", from, "source format: llama2c, hf or gguf")->required();
  app.add_option("input", input, "checkpoint file (llama2c), model directory (hf) or GGUF file (gguf)")->required();
  app.add_option("--tokenizer", tokenizer,
                 "llama2.c tokenizer.bin (required with --from llama2c); with --from hf, a tokenizer.json, a "
                 "directory holding one, or a GGUF whose vocabulary replaces the directory's");
  app.add_option("-o,--output", out, "output GGUF path")->required();
  app.add_option("--type", type, "convert weights to a scheme: " + scheme_names() + " (default: keep)");
  app.add_option("--imatrix", imatrix_path,
                 "importance matrix from llama-imatrix (GGUF): quantize with it as llama-quantize --imatrix does; "
                 "needed by iq3_xs, iq3_xxs, q2_k_s, iq2_m, iq2_s, iq2_xs, iq2_xxs, iq1_m, iq1_s");
  app.add_flag("--allow-requantize", allow_requantize,
               "with --from gguf: quantize tensors that are already quantized (llama-quantize's flag; quality "
               "suffers compared with quantizing from F16/F32)");
  app.add_flag("-q,--quiet", quiet, "no progress output");
  if (int rc = parse_cli(app, argc, argv); rc >= 0) return rc;
  std::unique_ptr<ModelSource> src;
  // Every file the conversion reads: the output may be none of them (checked before anything is written).
  std::vector<std::string> inputs;
  auto add_inputs = [&](const std::string& p) {
    std::error_code ec;
    if (!std::filesystem::is_directory(p, ec)) {
      inputs.push_back(p);
      return;
    }
    // A checkpoint directory: its weights, configs and tokenizer files. GGUF files there are not read, so a
    // previous conversion written into the directory may be replaced.
    for (const auto& e : std::filesystem::directory_iterator(p, ec))
      if (e.is_regular_file(ec) && e.path().extension() != ".gguf") inputs.push_back(e.path().string());
  };
  add_inputs(input);
  if (!tokenizer.empty()) add_inputs(tokenizer);
  if (!imatrix_path.empty()) inputs.push_back(imatrix_path);
  write_output_file(out, "-o", inputs, nullptr);  // refuses now, before the (long) reading
  if (from == "llama2c") {
    if (tokenizer.empty()) fail("--tokenizer is required with --from llama2c");
    src = open_llama2c_source(input, tokenizer);
  } else if (from == "hf") {
    std::error_code ec;
    if (!std::filesystem::is_directory(input, ec))
      fail("--from hf: '", input, "' is not a directory (a Hugging Face checkpoint is a folder with config.json and "
           "*.safetensors)");
    src = open_model(input);
    if (!tokenizer.empty()) src = with_tokenizer(std::move(src), load_tokenizer_files(tokenizer));
  } else if (from == "gguf") {
    src = open_model_source(input);
    if (src->format_name() != "gguf") fail("--from gguf: '", input, "' is not a GGUF file");
    if (!type.empty() && !allow_requantize)
      for (const SourceTensor& t : src->tensors())
        if (t.n_dims >= 2 && t.type != GgmlType::F32 && t.type != GgmlType::F16 && t.type != GgmlType::BF16)
          fail("--from gguf: tensor '", t.name, "' is already quantized (", type_name(t.type),
               "); quantize from an F16/F32 file, or pass --allow-requantize");
    if (!tokenizer.empty()) fail("--tokenizer is not used with --from gguf (the GGUF's vocabulary is kept)");
  } else {
    fail("--from '", from, "' is not llama2c, hf or gguf");
  }
  if (!quiet) {
    const ModelConfig& c = src->config();
    std::fprintf(stderr, "converting %s (%s, %s, %lld layers, vocab %lld) to %s as %s\n", input.c_str(),
                 src->format_name().c_str(), c.arch.c_str(), static_cast<long long>(c.n_layer),
                 static_cast<long long>(c.n_vocab), out.c_str(), type.empty() ? "the source types" : type.c_str());
    if (!src->vocab()) std::fprintf(stderr, "note: no tokenizer in %s; the GGUF will have none\n", input.c_str());
  }
  std::optional<ImportanceMatrix> imatrix;
  if (!imatrix_path.empty()) {
    if (type.empty()) fail("--imatrix needs --type (a quantization scheme)");
    imatrix = load_imatrix(imatrix_path);
    if (!quiet)
      std::fprintf(stderr, "importance matrix %s: %zu entries, %lld chunks%s%s\n", imatrix_path.c_str(),
                   imatrix->entries.size(), static_cast<long long>(imatrix->chunk_count),
                   imatrix->datasets.empty() ? "" : " of ", imatrix->datasets.empty() ? "" : imatrix->datasets[0].c_str());
  }
  write_output_file(out, "-o", inputs, [&](const std::string& tmp) {
    Progress progress("writing " + out, !quiet);
    export_gguf(*src, tmp, type, [&](uint64_t d, uint64_t t) { progress(d, t); }, imatrix ? &*imatrix : nullptr);
    progress.finish();
  });
  return 0;
}

}  // namespace shardlm
