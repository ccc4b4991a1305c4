// What the chat front ends share (serve's chat completions and the interactive `chat`): the chat template
// given on the command line and the tokens that end an assistant's turn.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "tokenizer/tokenizer.h"

namespace shardlm {

// --chat-template: a Jinja file, or a tokenizer_config.json whose "chat_template" is a string. Error names
// the flag and the file.
std::string load_chat_template(const std::string& path);

// The model's end-of-turn tokens, which chat generation stops at besides eos: the pieces the common chat
// formats end a turn with, where the vocabulary has them as special tokens.
std::vector<int32_t> stop_ids_of(const Vocab& v);

}  // namespace shardlm
