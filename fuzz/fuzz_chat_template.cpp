// libFuzzer target: the Jinja chat-template engine on a template and a context that both come from the input
// (split at the first NUL byte: template, then a JSON context such as {"messages": [...],
// "add_generation_prompt": true}). Parse errors and render errors are shardlm::Error; nothing may crash,
// hang (loops are bounded by the engine's limits) or read out of bounds.
#include <cstdint>
#include <cstring>
#include <string>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "tokenizer/chat_template.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace shardlm;
  const char* p = reinterpret_cast<const char*>(data);
  const char* nul = static_cast<const char*>(std::memchr(p, 0, size));
  const std::string tmpl(p, nul ? static_cast<size_t>(nul - p) : size);
  const std::string ctx = nul ? std::string(nul + 1, p + size) : std::string();
  try {
    ChatTemplate t(tmpl);
    nlohmann::json context = nlohmann::json::parse(ctx, nullptr, /*allow_exceptions=*/false);
    if (!context.is_object())
      context = {{"messages", {{{"role", "user"}, {"content", ctx}}}}, {"add_generation_prompt", true}};
    (void)t.render(context);
    (void)t.render({{"system", "s"}, {"user", ctx}}, true, "<s>", "</s>");
  } catch (const Error&) {
  }
  return 0;
}
