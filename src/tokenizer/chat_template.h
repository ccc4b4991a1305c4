// Chat templates: the Jinja subset that Hugging Face chat templates use, rendering byte-identical to
// Jinja2 as transformers configures it (ImmutableSandboxedEnvironment with trim_blocks, lstrip_blocks,
// the loop-controls extension, a `raise_exception(msg)` global and a tojson filter that does not escape
// HTML). Undefined names render empty and are falsy; using one in arithmetic or attribute access is an
// error, as in Jinja2.
//
// Rendering is bounded (output size, loop iterations, recursion depth), so a hostile template from a
// downloaded checkpoint fails with shardlm::Error instead of exhausting memory or hanging.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace shardlm {

struct ChatMessage {
  std::string role;
  std::string content;
};

class ChatTemplate {
 public:
  // Parses the template; throws shardlm::Error naming line and column on syntax errors.
  explicit ChatTemplate(std::string source);

  // Renders with the variables transformers passes: messages (each {role, content}),
  // add_generation_prompt, bos_token and eos_token.
  std::string render(const std::vector<ChatMessage>& messages, bool add_generation_prompt,
                     const std::string& bos_token, const std::string& eos_token) const;

  // Renders with a full context: every key of the JSON object becomes a template variable (messages
  // with extra fields, tools, add_generation_prompt, custom variables).
  // Throws shardlm::Error whose message is exactly the template's text on raise_exception(text), and
  // shardlm::Error naming the template line for runtime errors (e.g. adding a string to a number).
  std::string render(const nlohmann::json& context) const;
  // Same, keeping the caller's key order: nlohmann::json sorts object keys, but a template that
  // prints tool schemas with tojson must list keys in their original order to match transformers.
  std::string render(const nlohmann::ordered_json& context) const;

  struct Impl;

 private:
  // Shared so that copies of a parsed template are cheap; the tree is immutable after parsing.
  std::shared_ptr<const Impl> impl_;
};

}  // namespace shardlm
