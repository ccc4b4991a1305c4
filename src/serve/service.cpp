#include "serve/service.h"

#include <algorithm>
#include <cstdio>
#include <ctime>

#include "core/error.h"
#include "tokenizer/tokenizer.h"

namespace shardlm::serve {

using nlohmann::json;

Reply error_reply(const ApiError& e) {
  Reply r;
  r.status = e.status;
  r.body = e.body_text();
  return r;
}

// ---- ResponseStream ----

ResponseStream::ResponseStream(Setup s, std::shared_ptr<RequestHandle> h, const Tokenizer& tok)
    : s_(std::move(s)), h_(std::move(h)), tok_(tok) {}

ResponseStream::~ResponseStream() {
  if (!finished_) h_->cancel();
}

void ResponseStream::cancel() { h_->cancel(); }

std::vector<TokenLogprob> ResponseStream::logprob_entries(const std::vector<GeneratedToken>& toks) const {
  std::vector<TokenLogprob> out;
  out.reserve(toks.size());
  for (const GeneratedToken& g : toks) {
    TokenLogprob t;
    t.token = tok_.token_to_piece(g.id);
    t.logprob = g.logprob;
    for (const TokenCandidate& c : g.top) t.top.emplace_back(tok_.token_to_piece(c.id), c.logit);
    out.push_back(std::move(t));
  }
  return out;
}

json ResponseStream::logprobs_json(const std::vector<GeneratedToken>& toks, int64_t offset) const {
  if (s_.logprobs < 0) return nullptr;
  const auto entries = logprob_entries(toks);
  return s_.kind == Kind::kChat ? chat_logprobs(entries) : completion_logprobs(entries, offset);
}

namespace {

int64_t count_chars(const std::string& s) {
  int64_t n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  return n;
}

}  // namespace

bool ResponseStream::next(std::string* out, std::chrono::milliseconds timeout) {
  if (finished_) return false;
  const bool chat = s_.kind == Kind::kChat;
  const char* object = chat ? "chat.completion.chunk" : "text_completion";
  if (choices_.empty()) choices_.resize(static_cast<size_t>(s_.n));
  if (s_.stream && !started_) {
    started_ = true;
    // The first events at once: each choice's role (chat) or echoed prompt (completions), as vLLM sends them.
    if (chat) {
      for (int32_t i = 0; i < s_.n; ++i)
        *out += sse_event(
            chat_chunk(s_.meta, std::string("assistant"), std::string(), nullptr, "", s_.include_usage, i));
      return true;
    }
    if (!s_.echo.empty()) {
      for (int32_t i = 0; i < s_.n; ++i) {
        *out += sse_event(completion_chunk(s_.meta, s_.echo, nullptr, "", s_.include_usage, i));
        choices_[static_cast<size_t>(i)].chars_sent = count_chars(s_.echo);
      }
      return true;
    }
  }
  started_ = true;
  std::vector<Delta> ds;
  if (!h_->wait(&ds, timeout)) return true;
  for (Delta& d : ds) {
    if (!d.error) continue;
    // One failed choice fails the request: the others are aborted (the destructor's cancel is skipped, so
    // here).
    finished_ = true;
    h_->cancel();
    status_ = d.error->status;
    if (s_.stream) {
      *out += "data: " + d.error->body_text() + "\n\n";
      *out += kSseDone;
    } else {
      *out += d.error->body_text();
    }
    return false;
  }
  for (Delta& d : ds) take(d, out);
  if (n_done_ < s_.n) return true;
  finished_ = true;
  Usage usage{s_.prompt_tokens, 0, cached_tokens_};
  for (const Choice& c : choices_) usage.completion_tokens += c.completion_tokens;
  if (!s_.stream) {
    std::vector<ChoiceResult> results;
    for (const Choice& c : choices_)
      results.push_back(ChoiceResult{chat ? c.text : s_.echo + c.text, logprobs_json(c.tokens, count_chars(s_.echo)),
                                     c.finish_reason});
    *out += dump(chat ? chat_response(s_.meta, results, usage) : completion_response(s_.meta, results, usage));
    return false;
  }
  if (s_.include_usage) *out += sse_event(usage_chunk(s_.meta, object, usage));
  *out += kSseDone;
  return false;
}

void ResponseStream::take(Delta& d, std::string* out) {
  SHARDLM_CHECK(d.index >= 0 && d.index < s_.n, "news of choice ", d.index, " of a request with ", s_.n, " choices");
  Choice& c = choices_[static_cast<size_t>(d.index)];
  if (!c.finish_reason.empty()) return;  // nothing follows a choice's end
  c.completion_tokens = std::max(c.completion_tokens, d.completion_tokens);
  if (d.index == 0) cached_tokens_ = std::max(cached_tokens_, d.cached_tokens);
  for (GeneratedToken& t : d.tokens) c.tokens.push_back(std::move(t));
  if (d.done()) {
    c.finish_reason = d.finish_reason;
    ++n_done_;
  }
  if (!s_.stream) {
    c.text += d.text;
    return;
  }
  const bool chat = s_.kind == Kind::kChat;
  // Streaming: a chunk when there is text (the tokens' logprobs ride along), the finish in the choice's last.
  const bool logprobs_due = s_.logprobs >= 0 && !c.tokens.empty();
  if (!d.text.empty() || (d.done() && (logprobs_due || !chat))) {
    const json lp = logprobs_json(c.tokens, c.chars_sent);
    if (chat) {
      *out += sse_event(chat_chunk(s_.meta, std::nullopt, d.text, lp, "", s_.include_usage, d.index));
    } else {
      *out += sse_event(
          completion_chunk(s_.meta, d.text, lp, d.done() ? d.finish_reason : "", s_.include_usage, d.index));
    }
    for (const GeneratedToken& g : c.tokens) c.chars_sent += count_chars(tok_.token_to_piece(g.id));
    c.tokens.clear();
  }
  if (d.done() && chat)
    *out += sse_event(
        chat_chunk(s_.meta, std::nullopt, std::nullopt, nullptr, d.finish_reason, s_.include_usage, d.index));
}

// ---- Service ----

Service::Service(ServiceConfig c, const Tokenizer& tok) : c_(std::move(c)), tok_(tok), rng_(std::random_device{}()) {
  if (!c_.chat_template.empty()) tmpl_.emplace(c_.chat_template);  // a syntax error fails here, at startup
  if (c_.created == 0) c_.created = static_cast<int64_t>(std::time(nullptr));
}

void Service::ready(EngineLoop* loop, int64_t n_ctx) {
  n_ctx_ = n_ctx;
  loop_ = loop;
}

bool Service::authorized(std::string_view authorization) const {
  if (c_.api_key.empty()) return true;
  constexpr std::string_view kBearer = "Bearer ";
  if (authorization.substr(0, kBearer.size()) != kBearer) return false;
  const std::string_view key = authorization.substr(kBearer.size());
  // Constant time in the key's length: no early exit on the first differing byte.
  if (key.size() != c_.api_key.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < key.size(); ++i) diff |= static_cast<unsigned char>(key[i] ^ c_.api_key[i]);
  return diff == 0;
}

uint64_t Service::random_u64() {
  std::lock_guard<std::mutex> l(rng_mu_);
  return rng_();
}

std::optional<ApiError> Service::check_model(const std::string& model) const {
  if (model.empty() || model == c_.model_name) return std::nullopt;
  for (const std::string& a : c_.aliases)
    if (model == a) return std::nullopt;
  return not_found_model(model, c_.model_name);
}

std::optional<ApiError> Service::check_serving() const {
  EngineLoop* loop = loop_.load();
  if (!loop) return not_ready();
  if (loop->shutting_down()) return shutting_down();
  return std::nullopt;
}

Parsed<std::string> Service::render_chat(const std::vector<ChatMessage>& messages, bool add_generation_prompt) const {
  if (!tmpl_)
    return bad_request("This model has no chat template: start the server with --chat-template FILE, or use "
                       "/v1/completions",
                       "messages", "no_chat_template");
  const Vocab& v = tok_.vocab();
  auto piece = [&](int32_t id) {
    return id >= 0 && id < tok_.n_vocab() ? v.tokens[static_cast<size_t>(id)] : std::string();
  };
  try {
    return tmpl_->render(messages, add_generation_prompt, piece(v.bos), piece(v.eos));
  } catch (const Error& e) {
    // raise_exception("Conversation roles must alternate ...") and friends: the request's fault.
    return bad_request(std::string("The chat template refused the messages: ") + e.what(), "messages");
  }
}

Service::Started Service::start(ResponseStream::Kind kind, const CommonRequest& r, std::vector<int32_t> prompt,
                                std::string echo, int32_t logprobs, int64_t default_max) {
  Started st;
  if (prompt.empty()) {
    st.reply = error_reply(bad_request("The prompt is empty after tokenization", "prompt"));
    return st;
  }
  const int64_t n_prompt = static_cast<int64_t>(prompt.size());
  Parsed<int64_t> max_tokens = resolve_max_tokens(n_prompt, r.max_tokens, default_max, n_ctx_.load());
  if (!max_tokens) {
    st.reply = error_reply(max_tokens.error());
    return st;
  }
  if (c_.max_num_seqs > 0 && r.n > c_.max_num_seqs) {
    st.reply = error_reply(bad_request("'n' is " + std::to_string(r.n) + ", more than the " +
                                           std::to_string(c_.max_num_seqs) +
                                           " sequences this server runs at once (--max-num-seqs)",
                                       "n"));
    return st;
  }
  Submission sub;
  sub.params = sequence_params(r, max_tokens.value(), c_.stop_ids, logprobs, random_u64());
  sub.stop = r.stop;
  sub.n = r.n;
  sub.prompt = std::move(prompt);
  try {
    sub.params.sampling.validate();
  } catch (const Error& e) {
    st.reply = error_reply(bad_request(e.what()));
    return st;
  }
  Parsed<std::shared_ptr<RequestHandle>> h = loop_.load()->submit(std::move(sub));
  if (!h) {
    st.reply = error_reply(h.error());
    return st;
  }
  ResponseStream::Setup s;
  s.kind = kind;
  s.stream = r.stream;
  s.include_usage = r.include_usage;
  s.prompt_tokens = n_prompt;
  s.echo = std::move(echo);
  s.logprobs = logprobs;
  s.n = r.n;
  char id[40];
  std::snprintf(id, sizeof id, "%s-%016llx%08llx", kind == ResponseStream::Kind::kChat ? "chatcmpl" : "cmpl",
                static_cast<unsigned long long>(random_u64()), static_cast<unsigned long long>(random_u64() >> 32));
  s.meta = ResponseMeta{id, static_cast<int64_t>(std::time(nullptr)), c_.model_name};
  st.stream = std::make_shared<ResponseStream>(std::move(s), std::move(h.value()), tok_);
  return st;
}

Service::Started Service::completions(std::string_view body) {
  if (auto e = check_serving()) return {error_reply(*e), nullptr};
  ParseLimits lim;
  lim.n_vocab = tok_.n_vocab();
  Parsed<CompletionRequest> p = parse_completion_request(body, lim);
  if (!p) return {error_reply(p.error()), nullptr};
  const CompletionRequest& r = p.value();
  if (auto e = check_model(r.common.model)) return {error_reply(*e), nullptr};
  std::vector<int32_t> ids;
  std::string echo;
  if (r.prompt_is_ids) {
    ids = r.prompt_ids;
    if (r.echo) echo = tok_.decode(ids);
  } else {
    // As `shardlm generate -p`: BOS as the vocabulary asks, special-token text kept as text.
    ids = tok_.encode(r.prompt, /*add_special=*/true, /*parse_special=*/false);
    if (r.echo) echo = r.prompt;
  }
  return start(ResponseStream::Kind::kCompletion, r.common, std::move(ids), std::move(echo), r.logprobs,
               c_.default_max_tokens);
}

Service::Started Service::chat(std::string_view body) {
  if (auto e = check_serving()) return {error_reply(*e), nullptr};
  ParseLimits lim;
  lim.n_vocab = tok_.n_vocab();
  Parsed<ChatRequest> p = parse_chat_request(body, lim);
  if (!p) return {error_reply(p.error()), nullptr};
  const ChatRequest& r = p.value();
  if (auto e = check_model(r.common.model)) return {error_reply(*e), nullptr};
  Parsed<std::string> rendered = render_chat(r.messages, /*add_generation_prompt=*/true);
  if (!rendered) return {error_reply(rendered.error()), nullptr};
  // As transformers' apply_chat_template(tokenize=True): the template writes BOS itself (no second one),
  // and special tokens it writes ("<|im_start|>") are parsed.
  std::vector<int32_t> ids = tok_.encode(rendered.value(), /*add_special=*/false, /*parse_special=*/true);
  const int32_t logprobs = r.logprobs ? r.top_logprobs : -1;
  return start(ResponseStream::Kind::kChat, r.common, std::move(ids), "", logprobs, /*default_max=*/0);
}

Reply Service::models() const {
  if (auto e = check_serving()) return error_reply(*e);
  Reply r;
  r.body = dump(models_response(c_.model_name, c_.created, n_ctx_.load()));
  return r;
}

Reply Service::tokenize(std::string_view body) const {
  if (auto e = check_serving()) return error_reply(*e);
  Parsed<TokenizeRequest> p = parse_tokenize_request(body);
  if (!p) return error_reply(p.error());
  const TokenizeRequest& t = p.value();
  std::vector<int32_t> ids;
  if (t.is_chat) {
    Parsed<std::string> rendered = render_chat(t.messages, t.add_generation_prompt);
    if (!rendered) return error_reply(rendered.error());
    ids = tok_.encode(rendered.value(), t.add_special_tokens, /*parse_special=*/true);
  } else {
    ids = tok_.encode(t.prompt, t.add_special_tokens, /*parse_special=*/false);
  }
  Reply r;
  r.body = dump(json{{"tokens", ids}, {"count", ids.size()}, {"max_model_len", n_ctx_.load()}});
  return r;
}

Reply Service::detokenize(std::string_view body) const {
  if (auto e = check_serving()) return error_reply(*e);
  Parsed<std::vector<int32_t>> p = parse_detokenize_request(body, tok_.n_vocab());
  if (!p) return error_reply(p.error());
  Reply r;
  r.body = dump(json{{"prompt", tok_.decode(p.value())}});
  return r;
}

Reply Service::health() const {
  EngineLoop* loop = loop_.load();
  if (!loop) return error_reply(not_ready());
  if (loop->shutting_down()) return error_reply(shutting_down());
  Reply r;
  r.body = "{}";
  return r;
}

Reply Service::metrics(const ServeMetrics& m) const {
  Reply r;
  r.content_type = "text/plain; version=0.0.4; charset=utf-8";
  r.body = m.render(c_.model_name);
  return r;
}

}  // namespace shardlm::serve
