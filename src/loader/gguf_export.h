// Writing models as GGUF files that our loader and llama.cpp both read.
#pragma once

#include <functional>
#include <string>

#include "formats/gguf.h"
#include "loader/imatrix.h"
#include "loader/model_source.h"

namespace shardlm {

// general.* and {arch}.* keys for `c`, and tokenizer.ggml.* for `vocab` (when not null).
void write_model_metadata(GgufWriter& w, const ModelConfig& c, const Vocab* vocab, const std::string& chat_template);

// Converts every tensor of `src` to the types of `scheme` ("" keeps the source types; see presets.h for
// the schemes) and writes a GGUF file, reporting progress in bytes written. With `imatrix`, every tensor it has an
// entry for is quantized with those importances, as llama-quantize --imatrix does (and its type rules that depend
// on one apply). Every tensor's type and importance entry is checked before anything is written: a scheme or
// tensor type that needs an importance matrix without one, or an entry of the wrong size, is an Error.
void export_gguf(const ModelSource& src, const std::string& path, const std::string& scheme,
                 const std::function<void(uint64_t, uint64_t)>& progress = nullptr,
                 const ImportanceMatrix* imatrix = nullptr);

}  // namespace shardlm
