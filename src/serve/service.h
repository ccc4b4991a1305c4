// The OpenAI-compatible endpoints without the sockets: each takes a request body and returns a reply (status,
// content type, body) or a ResponseStream that yields the body as the engine produces it (the whole JSON at
// the end, or server-sent events). cmd_serve.cpp only wires these to cpp-httplib; tests drive them
// directly (tests/serve/test_service.cpp).
//
// The HTTP threads call these concurrently: everything here is either immutable after ready() or guarded.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "serve/engine_loop.h"
#include "serve/metrics.h"
#include "serve/openai.h"
#include "tokenizer/chat_template.h"

namespace shardlm {
class Tokenizer;
}

namespace shardlm::serve {

struct ServiceConfig {
  std::string model_name;              // --served-model-name: what /v1/models lists and requests name
  std::vector<std::string> aliases;    // other names accepted in "model" (the -m path)
  std::string chat_template;           // "" : chat completions are refused (400)
  std::string api_key;                 // "" : no key needed
  std::vector<int32_t> stop_ids;       // generation ends at these (eos, end-of-turn) unless ignore_eos
  int64_t default_max_tokens = 16;     // /v1/completions without max_tokens (OpenAI's default)
  int64_t max_num_seqs = 0;            // > 0: a request's `n` may not exceed it (its choices run in one batch)
  int64_t created = 0;                 // unix seconds, for /v1/models
};

struct Reply {
  int status = 200;
  std::string content_type = "application/json";
  std::string body;
};
Reply error_reply(const ApiError& e);

// The body of one generation request, produced as the engine goes. With n > 1 the whole JSON holds the n
// choices in index order; streamed, each choice's chunks carry its index, each choice ends with its own
// finish_reason chunk, and one usage chunk (completion tokens summed over the choices) and one [DONE]
// follow the last.
class ResponseStream {
 public:
  enum class Kind { kCompletion, kChat };
  struct Setup {
    Kind kind = Kind::kCompletion;
    bool stream = false;
    bool include_usage = false;
    ResponseMeta meta;
    int64_t prompt_tokens = 0;
    std::string echo;          // completions with echo: the prompt's text, before the generated text
    int32_t logprobs = -1;     // -1: none
    int32_t n = 1;             // choices
  };
  ResponseStream(Setup s, std::shared_ptr<RequestHandle> h, const Tokenizer& tok);
  ~ResponseStream();  // an unfinished request is cancelled (its client went away)

  bool streaming() const { return s_.stream; }
  const char* content_type() const { return s_.stream ? "text/event-stream" : "application/json"; }
  // Appends the next bytes of the body to `out`, waiting up to `timeout` for the engine. Returns false
  // once the body is complete (the last bytes are in `out`). Without streaming, `out` stays empty until
  // the end, when the whole JSON arrives; status() then tells 200 or the error's status.
  bool next(std::string* out, std::chrono::milliseconds timeout);
  int status() const { return status_; }
  void cancel();

 private:
  std::vector<TokenLogprob> logprob_entries(const std::vector<GeneratedToken>& toks) const;
  nlohmann::json logprobs_json(const std::vector<GeneratedToken>& toks, int64_t offset) const;

  // Adds one choice's news to `out` (streaming: its chunks; else nothing until the whole body).
  void take(Delta& d, std::string* out);

  struct Choice {
    std::string text;                        // whole text (non-streaming)
    std::vector<GeneratedToken> tokens;      // non-streaming: all; streaming: not yet sent
    int64_t chars_sent = 0;                  // streaming completions: text_offset of the next token
    int64_t completion_tokens = 0;
    std::string finish_reason;               // "" while running
  };

  Setup s_;
  std::shared_ptr<RequestHandle> h_;
  const Tokenizer& tok_;
  bool started_ = false, finished_ = false;
  int status_ = 200;
  std::vector<Choice> choices_;              // [n]
  int64_t n_done_ = 0;                       // choices with their finish_reason
  int64_t cached_tokens_ = 0;                // choice 0's: the prompt is counted once
};

class Service {
 public:
  Service(ServiceConfig c, const Tokenizer& tok);

  // After the model loaded: requests are served from here on.
  void ready(EngineLoop* loop, int64_t n_ctx);
  bool is_ready() const { return loop_.load() != nullptr; }
  const ServiceConfig& config() const { return c_; }

  // "Authorization" header value: "Bearer <key>" when an API key is set.
  bool authorized(std::string_view authorization) const;

  struct Started {
    std::optional<Reply> reply;              // an error, answered at once
    std::shared_ptr<ResponseStream> stream;  // else the body as it comes
  };
  Started completions(std::string_view body);
  Started chat(std::string_view body);
  Reply models() const;
  Reply tokenize(std::string_view body) const;
  Reply detokenize(std::string_view body) const;
  Reply health() const;
  Reply metrics(const ServeMetrics& m) const;

  // The chat template's output for `messages` (with the generation prompt), or a 400 error.
  Parsed<std::string> render_chat(const std::vector<ChatMessage>& messages, bool add_generation_prompt) const;

 private:
  std::optional<ApiError> check_model(const std::string& model) const;
  std::optional<ApiError> check_serving() const;
  Started start(ResponseStream::Kind kind, const CommonRequest& r, std::vector<int32_t> prompt, std::string echo,
                int32_t logprobs, int64_t default_max);
  uint64_t random_u64();

  ServiceConfig c_;
  const Tokenizer& tok_;
  std::optional<ChatTemplate> tmpl_;
  std::atomic<EngineLoop*> loop_{nullptr};
  std::atomic<int64_t> n_ctx_{0};
  std::mutex rng_mu_;
  std::mt19937_64 rng_;
};

}  // namespace shardlm::serve
