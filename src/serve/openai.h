// The OpenAI HTTP API as plain values: request bodies of /v1/completions and /v1/chat/completions parsed and
// validated into structs, and the response objects (whole, streamed chunks, logprobs in both of OpenAI's
// shapes, errors) built from plain values. Pure: no engine, no tokenizer, no sockets, so every field's rule
// is unit-tested (tests/serve/test_openai.cpp).
//
// What is accepted, after the OpenAI API reference and vLLM's OpenAI server (the fields a client may send
// that change nothing, such as `user`, are ignored; fields that would change the result and are not
// implemented are refused with 400 rather than silently dropped):
//   both:        model, max_tokens (chat also max_completion_tokens), temperature [0, 2], top_p (0, 1],
//                top_k (-1 or 0 = off), min_p [0, 1], repetition_penalty (0, 10], seed, stop (string or up
//                to 4 strings), presence_penalty / frequency_penalty [-2, 2] (over the last 64 tokens of
//                prompt and output, as llama-server applies them), n [1, kMaxChoices] (each choice an
//                engine sequence of its own; best_of only equal to n), ignore_eos, stream,
//                stream_options.include_usage (with stream only)
//   completions: prompt (a string, token ids, or a list holding one of those), echo, logprobs (0..20)
//   chat:        messages (role system | developer | user | assistant; content a string or a list of
//                {"type": "text", "text": ...} parts), logprobs (bool), top_logprobs (0..20, with logprobs)
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/scheduler.h"
#include "tokenizer/chat_template.h"

namespace shardlm::serve {

// An error as OpenAI returns it: the HTTP status and {"error": {"message", "type", "param", "code"}}.
struct ApiError {
  int status = 400;
  std::string message;
  std::string type = "invalid_request_error";
  std::string param;  // the offending field ("" -> null)
  std::string code;   // a machine-readable reason ("" -> null)

  nlohmann::json body() const;
  std::string body_text() const;  // body().dump()
};

ApiError bad_request(std::string message, std::string param = "", std::string code = "");
ApiError not_found_model(const std::string& model, const std::string& served);  // 404 model_not_found
ApiError body_too_large(uint64_t limit);                                       // 413
ApiError queue_full(int64_t limit);                                            // 429
ApiError bad_api_key();                                                        // 401
ApiError shutting_down();                                                      // 503
ApiError not_ready();                                                          // 503 while loading
ApiError server_error(std::string message);                                    // 500

// A value or the error that stopped the parse.
template <class T>
class Parsed {
 public:
  Parsed(T v) : v_(std::move(v)) {}          // NOLINT: implicit, so parsers `return value;`
  Parsed(ApiError e) : v_(std::move(e)) {}   // NOLINT
  bool ok() const { return v_.index() == 0; }
  explicit operator bool() const { return ok(); }
  const T& value() const { return std::get<0>(v_); }
  T& value() { return std::get<0>(v_); }
  const ApiError& error() const { return std::get<1>(v_); }

 private:
  std::variant<T, ApiError> v_;
};

// Fields both endpoints share.
inline constexpr int32_t kMaxChoices = 128;  // `n` beyond this is refused while parsing; the server's
                                             // --max-num-seqs may bound it lower (Service)

struct CommonRequest {
  std::string model;                   // "" when absent
  int32_t n = 1;                       // choices, each sampled independently (choice_seed)
  std::optional<int64_t> max_tokens;   // absent or null: the endpoint's default
  double temperature = 1.0;            // OpenAI's default
  double top_p = 1.0;
  int32_t top_k = 0;                   // 0 = off (-1 is accepted as off)
  double min_p = 0.0;
  double repetition_penalty = 1.0;
  double presence_penalty = 0.0, frequency_penalty = 0.0;
  std::optional<int64_t> seed;         // absent: the server draws one
  std::vector<std::string> stop;       // stop strings, never returned in the text
  bool ignore_eos = false;
  bool stream = false;
  bool include_usage = false;          // stream_options.include_usage
};

struct CompletionRequest {
  CommonRequest common;
  bool prompt_is_ids = false;
  std::string prompt;                  // when !prompt_is_ids
  std::vector<int32_t> prompt_ids;     // when prompt_is_ids (used as given: no BOS is added)
  bool echo = false;
  int32_t logprobs = -1;               // -1 none; N: the sampled token's and the N most likely
};

struct ChatRequest {
  CommonRequest common;
  std::vector<ChatMessage> messages;   // roles system, user, assistant ("developer" becomes "system")
  bool logprobs = false;
  int32_t top_logprobs = 0;
};

struct ParseLimits {
  int32_t n_vocab = 0;                 // > 0: prompt token ids must lie in [0, n_vocab)
  size_t max_stop = 4;                 // stop strings
  size_t max_stop_bytes = 1024;        // bytes of one stop string
};

Parsed<CompletionRequest> parse_completion_request(std::string_view body, const ParseLimits& limits = {});
Parsed<ChatRequest> parse_chat_request(std::string_view body, const ParseLimits& limits = {});

// POST /tokenize {"prompt": str, "add_special_tokens": bool = true} or {"messages": [...],
// "add_generation_prompt": bool = true} (rendered with the chat template); POST /detokenize {"tokens": [ids]}.
struct TokenizeRequest {
  bool is_chat = false;
  std::string prompt;
  std::vector<ChatMessage> messages;
  bool add_special_tokens = true;
  bool add_generation_prompt = true;
};
Parsed<TokenizeRequest> parse_tokenize_request(std::string_view body);
Parsed<std::vector<int32_t>> parse_detokenize_request(std::string_view body, int32_t n_vocab);

// The number of tokens to generate, or the error OpenAI's servers give: max_tokens must leave the prompt
// room in the context (prompt + max_tokens <= n_ctx). Absent, it is min(default_max, n_ctx - prompt), with
// default_max <= 0 meaning "until the context is full" (chat's default).
Parsed<int64_t> resolve_max_tokens(int64_t prompt_tokens, std::optional<int64_t> max_tokens, int64_t default_max,
                                   int64_t n_ctx);

// The engine's parameters for a request: sampling fields, max_tokens, the stop token ids (eos and
// end-of-turn ids unless ignore_eos) and logprobs (-1 none). `seed` is used when the request has none.
SequenceParams sequence_params(const CommonRequest& r, int64_t max_tokens, const std::vector<int32_t>& stop_ids,
                               int32_t logprobs, uint64_t seed);

// The sampler seed of choice `index` of a request whose seed (given or drawn) is `seed`: seed + index
// (wrapping), so choice 0 samples as the same request with n = 1 does, and a seeded request with n > 1
// repeats every one of its choices.
inline uint64_t choice_seed(uint64_t seed, int32_t index) { return seed + static_cast<uint64_t>(index); }

// ---- Responses ----

// One generated token with its log-probability and the most likely alternatives (most likely first).
struct TokenLogprob {
  std::string token;                                  // the token's text (its bytes; may be part of a character)
  float logprob = 0;
  std::vector<std::pair<std::string, float>> top;
};

struct Usage {
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  int64_t cached_tokens = 0;  // of prompt_tokens, found in the prefix cache (OpenAI's prompt_tokens_details)
};

struct ResponseMeta {
  std::string id;       // "cmpl-..." or "chatcmpl-..."
  int64_t created = 0;  // unix seconds
  std::string model;
};

// A response's text as JSON text: invalid UTF-8 (never produced by the text stream, but token pieces in
// logprobs may be parts of characters) is replaced by U+FFFD.
std::string dump(const nlohmann::json& j);

// /v1/completions' legacy logprobs: {tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset},
// offsets in characters of the choice's text, the first token's being `offset0` (after an echoed prompt).
// The sampled token is in its top_logprobs dict too, as vLLM reports it.
nlohmann::json completion_logprobs(const std::vector<TokenLogprob>& tokens, int64_t offset0);
// Chat's {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}.
nlohmann::json chat_logprobs(const std::vector<TokenLogprob>& tokens);

// One choice of a whole response. `logprobs` null when not asked for. finish_reason "stop", "length" or
// "abort".
struct ChoiceResult {
  std::string text;
  nlohmann::json logprobs;
  std::string finish_reason;
};

// Whole responses: choices[i].index = i.
nlohmann::json completion_response(const ResponseMeta& m, const std::vector<ChoiceResult>& choices, const Usage& u);
nlohmann::json chat_response(const ResponseMeta& m, const std::vector<ChoiceResult>& choices, const Usage& u);
// The same with one choice.
nlohmann::json completion_response(const ResponseMeta& m, const std::string& text, const nlohmann::json& logprobs,
                                   const std::string& finish_reason, const Usage& u);
nlohmann::json chat_response(const ResponseMeta& m, const std::string& content, const nlohmann::json& logprobs,
                             const std::string& finish_reason, const Usage& u);
// Streamed chunks: one choice each, `index` saying which (with n > 1 the choices' chunks interleave);
// finish_reason "" -> null. With include_usage every chunk carries "usage": null and usage_chunk
// (choices: []) comes last, before [DONE].
nlohmann::json completion_chunk(const ResponseMeta& m, const std::string& text, const nlohmann::json& logprobs,
                                const std::string& finish_reason, bool include_usage, int32_t index = 0);
// A choice's first chat chunk has role (delta {"role": "assistant", "content": ""}); its last has an empty
// delta.
nlohmann::json chat_chunk(const ResponseMeta& m, const std::optional<std::string>& role,
                          const std::optional<std::string>& content, const nlohmann::json& logprobs,
                          const std::string& finish_reason, bool include_usage, int32_t index = 0);
nlohmann::json usage_chunk(const ResponseMeta& m, const char* object, const Usage& u);
nlohmann::json usage_json(const Usage& u);

// Server-sent events: "data: <json>\n\n", and the stream's end.
std::string sse_event(const nlohmann::json& j);
inline constexpr std::string_view kSseDone = "data: [DONE]\n\n";

// GET /v1/models: one model.
nlohmann::json models_response(const std::string& name, int64_t created, int64_t max_model_len);

}  // namespace shardlm::serve
