#include "serve/openai.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>

namespace shardlm::serve {

using nlohmann::json;

// ---- Errors ----

json ApiError::body() const {
  json e;
  e["message"] = message;
  e["type"] = type;
  e["param"] = param.empty() ? json(nullptr) : json(param);
  e["code"] = code.empty() ? json(nullptr) : json(code);
  return json{{"error", e}};
}

std::string ApiError::body_text() const { return dump(body()); }

ApiError bad_request(std::string message, std::string param, std::string code) {
  ApiError e;
  e.status = 400;
  e.message = std::move(message);
  e.param = std::move(param);
  e.code = std::move(code);
  return e;
}

ApiError not_found_model(const std::string& model, const std::string& served) {
  ApiError e;
  e.status = 404;
  e.message = "The model '" + model + "' does not exist; this server serves '" + served + "'";
  e.param = "model";
  e.code = "model_not_found";
  return e;
}

ApiError body_too_large(uint64_t limit) {
  ApiError e;
  e.status = 413;
  e.message = "The request body is larger than " + std::to_string(limit) + " bytes (--max-body-bytes)";
  e.code = "request_too_large";
  return e;
}

ApiError queue_full(int64_t limit) {
  ApiError e;
  e.status = 429;
  e.message = "The server is busy: at most " + std::to_string(limit) +
              " sequences (a request of n choices counts n) may run or wait at once (--max-num-seqs plus "
              "--max-queue), and this request's would pass that; retry later";
  e.code = "queue_full";
  return e;
}

ApiError bad_api_key() {
  ApiError e;
  e.status = 401;
  e.message = "Incorrect or missing API key: send 'Authorization: Bearer <key>'";
  e.code = "invalid_api_key";
  return e;
}

ApiError shutting_down() {
  ApiError e;
  e.status = 503;
  e.type = "server_error";
  e.message = "The server is shutting down and takes no new requests";
  e.code = "shutting_down";
  return e;
}

ApiError not_ready() {
  ApiError e;
  e.status = 503;
  e.type = "server_error";
  e.message = "The model is still loading";
  e.code = "loading";
  return e;
}

ApiError server_error(std::string message) {
  ApiError e;
  e.status = 500;
  e.type = "server_error";
  e.message = std::move(message);
  return e;
}

// ---- Parsing ----

namespace {

const char* type_name(const json& v) {
  if (v.is_null()) return "null";
  if (v.is_boolean()) return "boolean";
  if (v.is_number_integer()) return "integer";
  if (v.is_number()) return "number";
  if (v.is_string()) return "string";
  if (v.is_array()) return "array";
  return "object";
}

std::string show(const json& v) {
  std::string s = v.dump(-1, ' ', false, json::error_handler_t::replace);
  if (s.size() > 60) s = s.substr(0, 57) + "...";
  return s;
}

[[noreturn]] void bad(const std::string& param, const std::string& message) { throw bad_request(message, param); }

json parse_body(std::string_view body) {
  json j;
  try {
    j = json::parse(body.begin(), body.end());
  } catch (const json::exception& e) {
    // parse_error, and out_of_range for numbers beyond a double (1e999): both are the client's malformed body.
    throw bad_request(std::string("The request body is not valid JSON: ") + e.what(), "", "invalid_json");
  }
  if (!j.is_object()) throw bad_request(std::string("The request body must be a JSON object, got ") + type_name(j));
  return j;
}

// Each reader: absent or null -> nothing; a wrong type or range -> 400 naming the field.
const json* field(const json& o, const char* key) {
  auto it = o.find(key);
  if (it == o.end() || it->is_null()) return nullptr;
  return &*it;
}

std::optional<double> get_number(const json& o, const char* key, double lo, double hi, bool lo_open = false) {
  const json* v = field(o, key);
  if (!v) return std::nullopt;
  if (!v->is_number())
    bad(key, std::string("'") + key + "' must be a number, got " + type_name(*v) + " " + show(*v));
  const double d = v->get<double>();
  if (!std::isfinite(d) || d > hi || (lo_open ? d <= lo : d < lo)) {
    std::ostringstream os;
    os << "'" << key << "' is " << show(*v) << ", outside " << (lo_open ? "(" : "[") << lo << ", " << hi << "]";
    bad(key, os.str());
  }
  return d;
}

std::optional<int64_t> get_int(const json& o, const char* key, int64_t lo, int64_t hi) {
  const json* v = field(o, key);
  if (!v) return std::nullopt;
  int64_t i = 0;
  if (v->is_number_unsigned()) {
    const uint64_t u = v->get<uint64_t>();
    i = u > uint64_t(std::numeric_limits<int64_t>::max()) ? std::numeric_limits<int64_t>::max() : int64_t(u);
  } else if (v->is_number_integer()) {
    i = v->get<int64_t>();
  } else if (v->is_number_float() && std::isfinite(v->get<double>()) && v->get<double>() == std::floor(v->get<double>()) &&
             std::fabs(v->get<double>()) < 9e15) {
    i = static_cast<int64_t>(v->get<double>());
  } else {
    bad(key, std::string("'") + key + "' must be an integer, got " + type_name(*v) + " " + show(*v));
  }
  if (i < lo || i > hi)
    bad(key, std::string("'") + key + "' is " + show(*v) + ", outside [" + std::to_string(lo) + ", " +
                 std::to_string(hi) + "]");
  return i;
}

std::optional<bool> get_bool(const json& o, const char* key) {
  const json* v = field(o, key);
  if (!v) return std::nullopt;
  if (!v->is_boolean()) bad(key, std::string("'") + key + "' must be a boolean, got " + type_name(*v) + " " + show(*v));
  return v->get<bool>();
}

std::optional<std::string> get_string(const json& o, const char* key) {
  const json* v = field(o, key);
  if (!v) return std::nullopt;
  if (!v->is_string()) bad(key, std::string("'") + key + "' must be a string, got " + type_name(*v) + " " + show(*v));
  return v->get<std::string>();
}

void parse_common(const json& o, CommonRequest& r, const ParseLimits& lim, bool chat) {
  if (auto m = get_string(o, "model")) r.model = *m;
  if (auto n = get_int(o, "n", 1, kMaxChoices)) r.n = static_cast<int32_t>(*n);
  // best_of > n would generate choices to throw away, ranked by their logprob: not implemented.
  if (auto b = get_int(o, "best_of", 1, kMaxChoices); b && *b != r.n)
    bad("best_of", "'best_of' is " + std::to_string(*b) + ": only best_of = n (" + std::to_string(r.n) +
                       ") is supported");
  constexpr int64_t kMaxTok = int64_t(1) << 30;
  r.max_tokens = get_int(o, "max_tokens", 1, kMaxTok);
  if (chat) {
    if (auto m = get_int(o, "max_completion_tokens", 1, kMaxTok)) r.max_tokens = *m;  // the newer name wins
  }
  if (auto t = get_number(o, "temperature", 0, 2)) r.temperature = *t;
  if (auto p = get_number(o, "top_p", 0, 1, /*lo_open=*/true)) r.top_p = *p;
  if (auto k = get_int(o, "top_k", -1, 1 << 20)) r.top_k = *k < 0 ? 0 : static_cast<int32_t>(*k);
  if (auto p = get_number(o, "min_p", 0, 1)) r.min_p = *p;
  if (auto p = get_number(o, "repetition_penalty", 0, 10, /*lo_open=*/true)) r.repetition_penalty = *p;
  if (auto p = get_number(o, "presence_penalty", -2, 2)) r.presence_penalty = *p;
  if (auto p = get_number(o, "frequency_penalty", -2, 2)) r.frequency_penalty = *p;
  r.seed = get_int(o, "seed", std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max());
  if (const json* s = field(o, "stop")) {
    if (s->is_string()) {
      r.stop.push_back(s->get<std::string>());
    } else if (s->is_array()) {
      for (const json& e : *s) {
        if (!e.is_string()) bad("stop", std::string("'stop' entries must be strings, got ") + type_name(e));
        r.stop.push_back(e.get<std::string>());
      }
    } else {
      bad("stop", std::string("'stop' must be a string or an array of strings, got ") + type_name(*s));
    }
    if (r.stop.size() > lim.max_stop)
      bad("stop", "'stop' has " + std::to_string(r.stop.size()) + " strings, more than " + std::to_string(lim.max_stop));
    for (const std::string& st : r.stop) {
      if (st.empty()) bad("stop", "'stop' strings must not be empty");
      if (st.size() > lim.max_stop_bytes)
        bad("stop", "a 'stop' string has " + std::to_string(st.size()) + " bytes, more than " +
                        std::to_string(lim.max_stop_bytes));
    }
  }
  if (auto b = get_bool(o, "ignore_eos")) r.ignore_eos = *b;
  if (auto b = get_bool(o, "stream")) r.stream = *b;
  if (const json* so = field(o, "stream_options")) {
    if (!so->is_object()) bad("stream_options", std::string("'stream_options' must be an object, got ") + type_name(*so));
    if (!r.stream) bad("stream_options", "'stream_options' is only allowed with 'stream': true");
    if (auto b = get_bool(*so, "include_usage")) r.include_usage = *b;
  }
  if (const json* rf = field(o, "response_format");
      rf && !(rf->is_object() && (rf->empty() || (rf->contains("type") && (*rf)["type"] == "text"))))
    bad("response_format", "'response_format' other than {\"type\": \"text\"} is not supported yet");
  for (const char* k : {"logit_bias", "tools", "functions", "guided_json", "guided_regex"}) {
    const json* v = field(o, k);
    if (v && !(v->is_object() && v->empty()) && !(v->is_array() && v->empty()))
      bad(k, std::string("'") + k + "' is not supported yet");
  }
  if (const json* v = field(o, "tool_choice");
      v && !(v->is_string() && (v->get<std::string>() == "none" || v->get<std::string>() == "auto")))
    bad("tool_choice", "'tool_choice' is not supported yet");
}

std::vector<int32_t> parse_ids(const json& a, const char* param, int32_t n_vocab) {
  std::vector<int32_t> ids;
  ids.reserve(a.size());
  for (const json& e : a) {
    if (!e.is_number_integer())
      bad(param, std::string("'") + param + "' token ids must be integers, got " + type_name(e) + " " + show(e));
    const int64_t v = e.is_number_unsigned() ? int64_t(std::min<uint64_t>(e.get<uint64_t>(), 1u << 31)) : e.get<int64_t>();
    if (v < 0 || (n_vocab > 0 && v >= n_vocab) || v > std::numeric_limits<int32_t>::max())
      bad(param, std::string("'") + param + "' token id " + std::to_string(v) + " is outside the vocabulary [0, " +
                     std::to_string(n_vocab) + ")");
    ids.push_back(static_cast<int32_t>(v));
  }
  return ids;
}

std::string message_content(const json& m, size_t i) {
  const std::string param = "messages[" + std::to_string(i) + "].content";
  auto it = m.find("content");
  if (it == m.end() || it->is_null()) bad(param, "'" + param + "' is missing");
  if (it->is_string()) return it->get<std::string>();
  if (!it->is_array())
    bad(param, "'" + param + "' must be a string or an array of text parts, got " + type_name(*it));
  std::string text;
  for (size_t k = 0; k < it->size(); ++k) {
    const json& part = (*it)[k];
    const std::string pp = param + "[" + std::to_string(k) + "]";
    if (!part.is_object()) bad(pp, "'" + pp + "' must be an object {\"type\": \"text\", \"text\": ...}");
    auto t = part.find("type");
    if (t == part.end() || !t->is_string()) bad(pp, "'" + pp + ".type' must be a string");
    if (t->get<std::string>() != "text")
      bad(pp, "'" + pp + ".type' is '" + t->get<std::string>() + "': only text parts are supported");
    auto x = part.find("text");
    if (x == part.end() || !x->is_string()) bad(pp, "'" + pp + ".text' must be a string");
    if (!text.empty()) text += "\n";  // as vLLM joins text parts
    text += x->get<std::string>();
  }
  return text;
}

std::vector<ChatMessage> parse_messages(const json& o) {
  const json* ms = field(o, "messages");
  if (!ms) bad("messages", "'messages' is required");
  if (!ms->is_array()) bad("messages", std::string("'messages' must be an array, got ") + type_name(*ms));
  if (ms->empty()) bad("messages", "'messages' must hold at least one message");
  std::vector<ChatMessage> out;
  for (size_t i = 0; i < ms->size(); ++i) {
    const json& m = (*ms)[i];
    const std::string p = "messages[" + std::to_string(i) + "]";
    if (!m.is_object()) bad(p, "'" + p + "' must be an object, got " + std::string(type_name(m)));
    auto r = m.find("role");
    if (r == m.end() || !r->is_string()) bad(p + ".role", "'" + p + ".role' must be a string");
    std::string role = r->get<std::string>();
    if (role == "developer") role = "system";  // OpenAI's newer name for system messages
    if (role != "system" && role != "user" && role != "assistant")
      bad(p + ".role", "'" + p + ".role' is '" + role + "': only system, user and assistant are supported");
    out.push_back({role, message_content(m, i)});
  }
  return out;
}

}  // namespace

Parsed<CompletionRequest> parse_completion_request(std::string_view body, const ParseLimits& lim) {
  try {
    const json o = parse_body(body);
    CompletionRequest r;
    parse_common(o, r.common, lim, /*chat=*/false);
    const json* p = field(o, "prompt");
    if (!p) bad("prompt", "'prompt' is required");
    const json* one = p;
    if (p->is_array() && !p->empty() && (p->at(0).is_string() || p->at(0).is_array())) {
      // A list of prompts (a batch): one is accepted.
      if (p->size() != 1)
        bad("prompt", "'prompt' holds " + std::to_string(p->size()) + " prompts: only one prompt per request is supported");
      one = &p->at(0);
    }
    if (one->is_string()) {
      r.prompt = one->get<std::string>();
      if (r.prompt.empty()) bad("prompt", "'prompt' is empty");
    } else if (one->is_array()) {
      r.prompt_is_ids = true;
      r.prompt_ids = parse_ids(*one, "prompt", lim.n_vocab);
      if (r.prompt_ids.empty()) bad("prompt", "'prompt' is an empty list of token ids");
    } else {
      bad("prompt", std::string("'prompt' must be a string or an array of token ids, got ") + type_name(*one));
    }
    if (auto e = get_bool(o, "echo")) r.echo = *e;
    if (auto l = get_int(o, "logprobs", 0, SequenceParams::kMaxTopLogprobs)) r.logprobs = static_cast<int32_t>(*l);
    if (r.echo && r.logprobs >= 0) bad("echo", "'echo' together with 'logprobs' (prompt logprobs) is not supported yet");
    if (const json* s = field(o, "suffix"); s && !(s->is_string() && s->get<std::string>().empty()))
      bad("suffix", "'suffix' is not supported");
    return r;
  } catch (const ApiError& e) {
    return e;
  }
}

Parsed<ChatRequest> parse_chat_request(std::string_view body, const ParseLimits& lim) {
  try {
    const json o = parse_body(body);
    ChatRequest r;
    parse_common(o, r.common, lim, /*chat=*/true);
    r.messages = parse_messages(o);
    if (auto l = get_bool(o, "logprobs")) r.logprobs = *l;
    if (auto t = get_int(o, "top_logprobs", 0, SequenceParams::kMaxTopLogprobs)) {
      if (!r.logprobs && *t > 0) bad("top_logprobs", "'top_logprobs' needs 'logprobs': true");
      r.top_logprobs = static_cast<int32_t>(*t);
    }
    return r;
  } catch (const ApiError& e) {
    return e;
  }
}

Parsed<TokenizeRequest> parse_tokenize_request(std::string_view body) {
  try {
    const json o = parse_body(body);
    TokenizeRequest r;
    if (field(o, "messages")) {
      r.is_chat = true;
      r.messages = parse_messages(o);
      r.add_special_tokens = false;  // the template writes BOS itself
      if (auto b = get_bool(o, "add_generation_prompt")) r.add_generation_prompt = *b;
    } else {
      auto p = get_string(o, "prompt");
      if (!p) bad("prompt", "'prompt' (a string) or 'messages' is required");
      r.prompt = *p;
    }
    if (auto b = get_bool(o, "add_special_tokens")) r.add_special_tokens = *b;
    return r;
  } catch (const ApiError& e) {
    return e;
  }
}

Parsed<std::vector<int32_t>> parse_detokenize_request(std::string_view body, int32_t n_vocab) {
  try {
    const json o = parse_body(body);
    const json* t = field(o, "tokens");
    if (!t) bad("tokens", "'tokens' is required");
    if (!t->is_array()) bad("tokens", std::string("'tokens' must be an array of token ids, got ") + type_name(*t));
    return parse_ids(*t, "tokens", n_vocab);
  } catch (const ApiError& e) {
    return e;
  }
}

Parsed<int64_t> resolve_max_tokens(int64_t prompt_tokens, std::optional<int64_t> max_tokens, int64_t default_max,
                                   int64_t n_ctx) {
  const int64_t room = n_ctx - prompt_tokens;
  if (room < 1) {
    ApiError e = bad_request("This model's maximum context length is " + std::to_string(n_ctx) +
                                 " tokens; the prompt has " + std::to_string(prompt_tokens) +
                                 " tokens, which leaves no room to generate. Shorten the prompt.",
                             "prompt", "context_length_exceeded");
    return e;
  }
  if (max_tokens) {
    if (*max_tokens > room)
      return bad_request("This model's maximum context length is " + std::to_string(n_ctx) + " tokens. However, you requested " +
                             std::to_string(prompt_tokens + *max_tokens) + " tokens (" + std::to_string(prompt_tokens) +
                             " in the prompt, " + std::to_string(*max_tokens) +
                             " for the completion). Reduce the prompt or 'max_tokens'.",
                         "max_tokens", "context_length_exceeded");
    return *max_tokens;
  }
  return default_max > 0 ? std::min(default_max, room) : room;
}

SequenceParams sequence_params(const CommonRequest& r, int64_t max_tokens, const std::vector<int32_t>& stop_ids,
                               int32_t logprobs, uint64_t seed) {
  SequenceParams p;
  p.max_tokens = max_tokens;
  p.sampling.temperature = static_cast<float>(r.temperature);
  p.sampling.top_k = r.top_k;
  p.sampling.top_p = static_cast<float>(r.top_p);
  p.sampling.min_p = static_cast<float>(r.min_p);
  p.sampling.repeat_penalty = static_cast<float>(r.repetition_penalty);
  p.sampling.presence_penalty = static_cast<float>(r.presence_penalty);
  p.sampling.frequency_penalty = static_cast<float>(r.frequency_penalty);
  p.sampling.seed = r.seed ? static_cast<uint64_t>(*r.seed) : seed;
  if (!r.ignore_eos) p.stop_ids = stop_ids;
  p.logprobs = logprobs;
  return p;
}

// ---- Responses ----

std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

namespace {

// Characters (code points) in UTF-8 bytes: the bytes that do not continue a character.
int64_t count_chars(const std::string& s) {
  int64_t n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  return n;
}

json bytes_of(const std::string& s) {
  json a = json::array();
  for (unsigned char c : s) a.push_back(int(c));
  return a;
}

}  // namespace

json completion_logprobs(const std::vector<TokenLogprob>& tokens, int64_t offset0) {
  json toks = json::array(), lps = json::array(), tops = json::array(), offs = json::array();
  int64_t off = offset0;
  for (const TokenLogprob& t : tokens) {
    toks.push_back(t.token);
    lps.push_back(t.logprob);
    json d = json::object();
    for (const auto& [tok, lp] : t.top) d[tok] = lp;
    d[t.token] = t.logprob;
    tops.push_back(d);
    offs.push_back(off);
    off += count_chars(t.token);
  }
  return json{{"tokens", toks}, {"token_logprobs", lps}, {"top_logprobs", tops}, {"text_offset", offs}};
}

json chat_logprobs(const std::vector<TokenLogprob>& tokens) {
  json content = json::array();
  for (const TokenLogprob& t : tokens) {
    json top = json::array();
    for (const auto& [tok, lp] : t.top) top.push_back(json{{"token", tok}, {"logprob", lp}, {"bytes", bytes_of(tok)}});
    content.push_back(json{{"token", t.token}, {"logprob", t.logprob}, {"bytes", bytes_of(t.token)}, {"top_logprobs", top}});
  }
  return json{{"content", content}};
}

json usage_json(const Usage& u) {
  return json{{"prompt_tokens", u.prompt_tokens},
              {"completion_tokens", u.completion_tokens},
              {"total_tokens", u.prompt_tokens + u.completion_tokens},
              {"prompt_tokens_details", {{"cached_tokens", u.cached_tokens}}}};
}

namespace {

json head(const ResponseMeta& m, const char* object) {
  return json{{"id", m.id}, {"object", object}, {"created", m.created}, {"model", m.model}};
}

json finish_json(const std::string& f) { return f.empty() ? json(nullptr) : json(f); }

}  // namespace

json completion_response(const ResponseMeta& m, const std::vector<ChoiceResult>& choices, const Usage& u) {
  json j = head(m, "text_completion");
  j["choices"] = json::array();
  for (size_t i = 0; i < choices.size(); ++i)
    j["choices"].push_back(json{{"index", i}, {"text", choices[i].text}, {"logprobs", choices[i].logprobs},
                                {"finish_reason", finish_json(choices[i].finish_reason)}});
  j["usage"] = usage_json(u);
  return j;
}

json chat_response(const ResponseMeta& m, const std::vector<ChoiceResult>& choices, const Usage& u) {
  json j = head(m, "chat.completion");
  j["choices"] = json::array();
  for (size_t i = 0; i < choices.size(); ++i)
    j["choices"].push_back(json{{"index", i},
                                {"message", json{{"role", "assistant"}, {"content", choices[i].text}}},
                                {"logprobs", choices[i].logprobs},
                                {"finish_reason", finish_json(choices[i].finish_reason)}});
  j["usage"] = usage_json(u);
  return j;
}

json completion_response(const ResponseMeta& m, const std::string& text, const json& logprobs,
                         const std::string& finish_reason, const Usage& u) {
  return completion_response(m, {ChoiceResult{text, logprobs, finish_reason}}, u);
}

json chat_response(const ResponseMeta& m, const std::string& content, const json& logprobs,
                   const std::string& finish_reason, const Usage& u) {
  return chat_response(m, {ChoiceResult{content, logprobs, finish_reason}}, u);
}

json completion_chunk(const ResponseMeta& m, const std::string& text, const json& logprobs,
                      const std::string& finish_reason, bool include_usage, int32_t index) {
  json j = head(m, "text_completion");
  j["choices"] = json::array({json{{"index", index}, {"text", text}, {"logprobs", logprobs},
                                   {"finish_reason", finish_json(finish_reason)}}});
  if (include_usage) j["usage"] = nullptr;
  return j;
}

json chat_chunk(const ResponseMeta& m, const std::optional<std::string>& role, const std::optional<std::string>& content,
                const json& logprobs, const std::string& finish_reason, bool include_usage, int32_t index) {
  json j = head(m, "chat.completion.chunk");
  json delta = json::object();
  if (role) delta["role"] = *role;
  if (content) delta["content"] = *content;
  j["choices"] = json::array({json{{"index", index}, {"delta", delta}, {"logprobs", logprobs},
                                   {"finish_reason", finish_json(finish_reason)}}});
  if (include_usage) j["usage"] = nullptr;
  return j;
}

json usage_chunk(const ResponseMeta& m, const char* object, const Usage& u) {
  json j = head(m, object);
  j["choices"] = json::array();
  j["usage"] = usage_json(u);
  return j;
}

std::string sse_event(const json& j) { return "data: " + dump(j) + "\n\n"; }

json models_response(const std::string& name, int64_t created, int64_t max_model_len) {
  return json{{"object", "list"},
              {"data", json::array({json{{"id", name},
                                         {"object", "model"},
                                         {"created", created},
                                         {"owned_by", "shardlm"},
                                         {"root", name},
                                         {"max_model_len", max_model_len}}})}};
}

}  // namespace shardlm::serve
