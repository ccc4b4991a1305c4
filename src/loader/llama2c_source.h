// llama2.c checkpoints (run.c's format) and tokenizer files as a ModelSource, for `convert --from llama2c`.
#pragma once

#include <memory>
#include <string>

#include "loader/model_source.h"

namespace shardlm {

// Reads the checkpoint (seven int32 header fields, then float32 arrays in run.c's order) and the tokenizer
// (int32 max_token_length, then per token: float32 score, int32 length, bytes). The vocabulary is turned
// into GGUF's SentencePiece form: spaces become U+2581, "\n<s>\n"/"\n</s>\n" become <s>/</s> (control),
// <0xNN> pieces become byte tokens, id 0 the unknown token. Throws Error naming the file and field.
std::unique_ptr<ModelSource> open_llama2c_source(const std::string& checkpoint, const std::string& tokenizer);

}  // namespace shardlm
