#include "chat_support.h"

#include <algorithm>

#include <nlohmann/json.hpp>

#include "cli_common.h"
#include "core/error.h"

namespace shardlm {

std::string load_chat_template(const std::string& path) {
  // Not standard input: chat reads the conversation from it, serve has nothing there.
  if (path == "-") fail("--chat-template: give a file; standard input cannot hold the template");
  std::string text = read_text_file(path, "--chat-template");
  if (path.size() > 5 && path.substr(path.size() - 5) == ".json") {
    nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
    if (j.is_object() && j.contains("chat_template") && j["chat_template"].is_string())
      return j["chat_template"].get<std::string>();
    fail("--chat-template ", path, ": a .json file must be an object with a \"chat_template\" string");
  }
  if (text.empty()) fail("--chat-template ", path, " is empty");
  return text;
}

std::vector<int32_t> stop_ids_of(const Vocab& v) {
  std::vector<int32_t> ids;
  if (v.eos >= 0) ids.push_back(v.eos);
  static const char* const kEndOfTurn[] = {"<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>",
                                           "<|endoftext|>", "<|END_OF_TURN_TOKEN|>"};
  for (const char* piece : kEndOfTurn) {
    for (size_t i = 0; i < v.tokens.size(); ++i) {
      if (v.tokens[i] != piece) continue;
      const bool special = v.types.empty() || v.types[i] == TokenType::kControl || v.types[i] == TokenType::kUserDefined;
      if (special && std::find(ids.begin(), ids.end(), int32_t(i)) == ids.end()) ids.push_back(int32_t(i));
      break;
    }
  }
  return ids;
}

}  // namespace shardlm
