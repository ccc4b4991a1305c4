// libFuzzer target: the server's request parsing (HTTP body to request struct) for every endpoint that takes
// a body: completions, chat completions, tokenize, detokenize. Each either parses or gives the 4xx error
// object; nothing may crash, throw anything else, or read out of bounds.
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "serve/openai.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace shardlm::serve;
  const std::string_view body(reinterpret_cast<const char*>(data), size);
  ParseLimits lim;
  lim.n_vocab = 512;
  auto check = [](const auto& parsed) {
    if (!parsed.ok() && (parsed.error().status < 400 || parsed.error().status > 499)) std::abort();
  };
  check(parse_completion_request(body, lim));
  check(parse_chat_request(body, lim));
  check(parse_tokenize_request(body));
  check(parse_detokenize_request(body, 512));
  return 0;
}
