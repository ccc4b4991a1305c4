// OpenAI request parsing and response shapes (src/serve/openai.h): every field's type and range, the error
// body and status, and the objects clients parse (whole, streamed, logprobs in both shapes).
#include <gtest/gtest.h>

#include <string>

#include <nlohmann/json.hpp>

#include "serve/metrics.h"
#include "serve/openai.h"

namespace shardlm::serve {
namespace {

using nlohmann::json;

ParseLimits limits() {
  ParseLimits l;
  l.n_vocab = 512;
  return l;
}

CompletionRequest completion_ok(const std::string& body) {
  auto p = parse_completion_request(body, limits());
  EXPECT_TRUE(p.ok()) << (p.ok() ? "" : p.error().message);
  return p.ok() ? p.value() : CompletionRequest{};
}

// The error a body gets: status and param, and the message must mention `needle`.
void expect_error(const std::string& body, int status, const std::string& param, const std::string& needle,
                  bool chat = false) {
  SCOPED_TRACE(body);
  ApiError e;
  if (chat) {
    auto p = parse_chat_request(body, limits());
    ASSERT_FALSE(p.ok());
    e = p.error();
  } else {
    auto p = parse_completion_request(body, limits());
    ASSERT_FALSE(p.ok());
    e = p.error();
  }
  EXPECT_EQ(e.status, status);
  EXPECT_EQ(e.param, param);
  EXPECT_NE(e.message.find(needle), std::string::npos) << e.message;
  const json b = e.body();
  ASSERT_TRUE(b.contains("error"));
  EXPECT_EQ(b["error"]["type"], "invalid_request_error");
  EXPECT_TRUE(b["error"]["message"].is_string());
  EXPECT_TRUE(b["error"].contains("param"));
  EXPECT_TRUE(b["error"].contains("code"));
}

TEST(ParseCompletion, Defaults) {
  const CompletionRequest r = completion_ok(R"({"prompt": "Once upon a time"})");
  EXPECT_FALSE(r.prompt_is_ids);
  EXPECT_EQ(r.prompt, "Once upon a time");
  EXPECT_FALSE(r.common.max_tokens.has_value());
  EXPECT_EQ(r.common.temperature, 1.0);
  EXPECT_EQ(r.common.top_p, 1.0);
  EXPECT_EQ(r.common.top_k, 0);
  EXPECT_EQ(r.common.min_p, 0.0);
  EXPECT_FALSE(r.common.seed.has_value());
  EXPECT_TRUE(r.common.stop.empty());
  EXPECT_FALSE(r.common.stream);
  EXPECT_EQ(r.logprobs, -1);
  EXPECT_FALSE(r.echo);
}

TEST(ParseCompletion, EveryField) {
  const CompletionRequest r = completion_ok(R"({
    "model": "m", "prompt": [1, 2, 3], "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 20,
    "min_p": 0.1, "repetition_penalty": 1.1, "seed": -5, "stop": ["a", "bc"], "presence_penalty": 0.5,
    "frequency_penalty": -0.25, "n": 1, "ignore_eos": true, "echo": false, "logprobs": 3, "stream": true,
    "stream_options": {"include_usage": true}, "user": "ignored", "best_of": 1,
    "response_format": {"type": "text"}, "tool_choice": "none", "logit_bias": {}})");
  EXPECT_EQ(r.common.model, "m");
  EXPECT_EQ(r.common.presence_penalty, 0.5);
  EXPECT_EQ(r.common.frequency_penalty, -0.25);
  EXPECT_TRUE(r.prompt_is_ids);
  EXPECT_EQ(r.prompt_ids, (std::vector<int32_t>{1, 2, 3}));
  EXPECT_EQ(*r.common.max_tokens, 7);
  EXPECT_EQ(r.common.temperature, 0.5);
  EXPECT_EQ(r.common.top_k, 20);
  EXPECT_EQ(*r.common.seed, -5);
  EXPECT_EQ(r.common.stop, (std::vector<std::string>{"a", "bc"}));
  EXPECT_TRUE(r.common.ignore_eos);
  EXPECT_EQ(r.logprobs, 3);
  EXPECT_TRUE(r.common.stream);
  EXPECT_TRUE(r.common.include_usage);
  EXPECT_EQ(r.common.n, 1);
}

TEST(ParseCompletion, ChoiceCount) {
  EXPECT_EQ(completion_ok(R"({"prompt": "x"})").common.n, 1);
  EXPECT_EQ(completion_ok(R"({"prompt": "x", "n": 3})").common.n, 3);
  EXPECT_EQ(completion_ok(R"({"prompt": "x", "n": 128, "best_of": 128})").common.n, 128);
  auto chat = parse_chat_request(R"({"messages": [{"role": "user", "content": "x"}], "n": 4})");
  ASSERT_TRUE(chat.ok()) << chat.error().message;
  EXPECT_EQ(chat.value().common.n, 4);
  // Choice i's seed: the request's plus i, wrapping (a negative seed is its two's complement).
  EXPECT_EQ(choice_seed(7, 0), 7u);
  EXPECT_EQ(choice_seed(7, 3), 10u);
  EXPECT_EQ(choice_seed(~uint64_t(0), 2), 1u);
}

TEST(ParseCompletion, PromptForms) {
  EXPECT_EQ(completion_ok(R"({"prompt": ["one prompt"]})").prompt, "one prompt");
  EXPECT_EQ(completion_ok(R"({"prompt": [[5, 6]]})").prompt_ids, (std::vector<int32_t>{5, 6}));
  EXPECT_EQ(completion_ok(R"({"prompt": "x", "stop": "\n"})").common.stop, (std::vector<std::string>{"\n"}));
  EXPECT_EQ(*completion_ok(R"({"prompt": "x", "max_tokens": 4.0})").common.max_tokens, 4);  // a whole float
  EXPECT_EQ(completion_ok(R"({"prompt": "x", "top_k": -1})").common.top_k, 0);
  EXPECT_FALSE(completion_ok(R"({"prompt": "x", "max_tokens": null, "seed": null})").common.max_tokens.has_value());
}

TEST(ParseCompletion, Errors) {
  expect_error("{not json", 400, "", "not valid JSON");
  // Found by fuzz_openai: a number beyond a double made the JSON library throw out_of_range, not parse_error.
  expect_error(R"({"prompt": "x", "max_tokens": 1e581})", 400, "", "not valid JSON");
  expect_error("[1, 2]", 400, "", "JSON object");
  expect_error("{}", 400, "prompt", "required");
  expect_error(R"({"prompt": ""})", 400, "prompt", "empty");
  expect_error(R"({"prompt": []})", 400, "prompt", "empty");
  expect_error(R"({"prompt": 5})", 400, "prompt", "string or an array");
  expect_error(R"({"prompt": ["a", "b"]})", 400, "prompt", "only one prompt");
  expect_error(R"({"prompt": [1, 512]})", 400, "prompt", "outside the vocabulary [0, 512)");
  expect_error(R"({"prompt": [1, -1]})", 400, "prompt", "outside the vocabulary");
  expect_error(R"({"prompt": [1, "a"]})", 400, "prompt", "integers");
  expect_error(R"({"prompt": "x", "max_tokens": "10"})", 400, "max_tokens", "integer, got string");
  expect_error(R"({"prompt": "x", "max_tokens": 0})", 400, "max_tokens", "outside [1,");
  expect_error(R"({"prompt": "x", "max_tokens": 1.5})", 400, "max_tokens", "integer");
  expect_error(R"({"prompt": "x", "temperature": 3})", 400, "temperature", "outside [0, 2]");
  expect_error(R"({"prompt": "x", "temperature": "hot"})", 400, "temperature", "number");
  expect_error(R"({"prompt": "x", "top_p": 0})", 400, "top_p", "outside (0, 1]");
  expect_error(R"({"prompt": "x", "top_k": -2})", 400, "top_k", "outside");
  expect_error(R"({"prompt": "x", "min_p": 1.5})", 400, "min_p", "outside");
  expect_error(R"({"prompt": "x", "repetition_penalty": 0})", 400, "repetition_penalty", "outside");
  expect_error(R"({"prompt": "x", "presence_penalty": 2.5})", 400, "presence_penalty", "2.5");
  expect_error(R"({"prompt": "x", "frequency_penalty": -3})", 400, "frequency_penalty", "-3");
  expect_error(R"({"prompt": "x", "n": 0})", 400, "n", "outside [1, 128]");
  expect_error(R"({"prompt": "x", "n": 129})", 400, "n", "outside [1, 128]");
  expect_error(R"({"prompt": "x", "n": 1.5})", 400, "n", "integer");
  expect_error(R"({"prompt": "x", "best_of": 3})", 400, "best_of", "only best_of = n (1)");
  expect_error(R"({"prompt": "x", "n": 2, "best_of": 3})", 400, "best_of", "only best_of = n (2)");
  expect_error(R"({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]})", 400, "stop", "more than 4");
  expect_error(R"({"prompt": "x", "stop": [1]})", 400, "stop", "strings");
  expect_error(R"({"prompt": "x", "stop": [""]})", 400, "stop", "empty");
  expect_error(R"({"prompt": "x", "stop": 3})", 400, "stop", "string or an array");
  expect_error(R"({"prompt": "x", "logprobs": 21})", 400, "logprobs", "outside [0, 20]");
  expect_error(R"({"prompt": "x", "logprobs": true})", 400, "logprobs", "integer, got boolean");
  expect_error(R"({"prompt": "x", "echo": 1})", 400, "echo", "boolean");
  expect_error(R"({"prompt": "x", "echo": true, "logprobs": 1})", 400, "echo", "not supported yet");
  expect_error(R"({"prompt": "x", "stream": "yes"})", 400, "stream", "boolean");
  expect_error(R"({"prompt": "x", "stream_options": {"include_usage": true}})", 400, "stream_options",
               "only allowed with 'stream': true");
  expect_error(R"({"prompt": "x", "stream": true, "stream_options": 1})", 400, "stream_options", "object");
  expect_error(R"({"prompt": "x", "seed": "1"})", 400, "seed", "integer");
  expect_error(R"({"prompt": "x", "model": 3})", 400, "model", "string");
  expect_error(R"({"prompt": "x", "logit_bias": {"5": 1}})", 400, "logit_bias", "not supported");
  expect_error(R"({"prompt": "x", "suffix": "tail"})", 400, "suffix", "not supported");
  expect_error(R"({"prompt": "x", "response_format": {"type": "json_object"}})", 400, "response_format",
               "not supported yet");
}

TEST(ParseChat, Messages) {
  auto p = parse_chat_request(R"({"model": "m", "messages": [
      {"role": "system", "content": "Be brief."},
      {"role": "developer", "content": "Really."},
      {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
      {"role": "assistant", "content": "Hello", "name": "bot"}],
    "max_completion_tokens": 9, "max_tokens": 3, "logprobs": true, "top_logprobs": 2})",
                              limits());
  ASSERT_TRUE(p.ok()) << p.error().message;
  const ChatRequest& r = p.value();
  ASSERT_EQ(r.messages.size(), 4u);
  EXPECT_EQ(r.messages[0].role, "system");
  EXPECT_EQ(r.messages[1].role, "system");
  EXPECT_EQ(r.messages[2].content, "Hi\nthere");
  EXPECT_EQ(r.messages[3].role, "assistant");
  EXPECT_EQ(*r.common.max_tokens, 9);  // max_completion_tokens wins over the deprecated max_tokens
  EXPECT_TRUE(r.logprobs);
  EXPECT_EQ(r.top_logprobs, 2);
}

TEST(ParseChat, Errors) {
  expect_error(R"({})", 400, "messages", "required", true);
  expect_error(R"({"messages": []})", 400, "messages", "at least one", true);
  expect_error(R"({"messages": "hi"})", 400, "messages", "array", true);
  expect_error(R"({"messages": [1]})", 400, "messages[0]", "object", true);
  expect_error(R"({"messages": [{"content": "x"}]})", 400, "messages[0].role", "string", true);
  expect_error(R"({"messages": [{"role": "tool", "content": "x"}]})", 400, "messages[0].role", "only system", true);
  expect_error(R"({"messages": [{"role": "user"}]})", 400, "messages[0].content", "missing", true);
  expect_error(R"({"messages": [{"role": "user", "content": 5}]})", 400, "messages[0].content", "string or an array",
               true);
  expect_error(R"({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})", 400,
               "messages[0].content[0]", "only text parts", true);
  expect_error(R"({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2})", 400, "top_logprobs",
               "needs 'logprobs'", true);
  expect_error(R"({"messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 21})", 400,
               "top_logprobs", "outside [0, 20]", true);
  expect_error(R"({"messages": [{"role": "user", "content": "x"}], "logprobs": 1})", 400, "logprobs", "boolean", true);
  expect_error(R"({"messages": [{"role": "user", "content": "x"}], "n": 0})", 400, "n", "outside [1, 128]", true);
  expect_error(R"({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]})", 400, "tools",
               "not supported", true);
}

TEST(ParseOther, TokenizeDetokenize) {
  auto t = parse_tokenize_request(R"({"prompt": "hi", "add_special_tokens": false})");
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(t.value().prompt, "hi");
  EXPECT_FALSE(t.value().add_special_tokens);
  auto c = parse_tokenize_request(R"({"messages": [{"role": "user", "content": "hi"}]})");
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(c.value().is_chat);
  EXPECT_FALSE(parse_tokenize_request(R"({"prompt": 3})").ok());
  auto d = parse_detokenize_request(R"({"tokens": [1, 2]})", 512);
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d.value(), (std::vector<int32_t>{1, 2}));
  EXPECT_FALSE(parse_detokenize_request(R"({"tokens": [600]})", 512).ok());
  EXPECT_FALSE(parse_detokenize_request(R"({"tokens": "12"})", 512).ok());
}

TEST(MaxTokens, ContextRules) {
  EXPECT_EQ(resolve_max_tokens(10, std::nullopt, 16, 128).value(), 16);
  EXPECT_EQ(resolve_max_tokens(120, std::nullopt, 16, 128).value(), 8);    // the default shrinks to fit
  EXPECT_EQ(resolve_max_tokens(100, std::nullopt, 0, 128).value(), 28);    // chat: the rest of the context
  EXPECT_EQ(resolve_max_tokens(100, 28, 16, 128).value(), 28);
  auto over = resolve_max_tokens(100, 29, 16, 128);
  ASSERT_FALSE(over.ok());
  EXPECT_EQ(over.error().status, 400);
  EXPECT_EQ(over.error().param, "max_tokens");
  EXPECT_EQ(over.error().code, "context_length_exceeded");
  auto full = resolve_max_tokens(128, std::nullopt, 16, 128);
  ASSERT_FALSE(full.ok());
  EXPECT_EQ(full.error().param, "prompt");
}

TEST(SequenceParamsOf, Mapping) {
  CommonRequest r;
  r.temperature = 0;
  r.top_k = 5;
  r.seed = 42;
  const SequenceParams p = sequence_params(r, 12, {2, 7}, 3, 99);
  EXPECT_EQ(p.max_tokens, 12);
  EXPECT_EQ(p.sampling.temperature, 0.0f);
  EXPECT_EQ(p.sampling.top_k, 5);
  EXPECT_EQ(p.sampling.seed, 42u);
  EXPECT_EQ(p.stop_ids, (std::vector<int32_t>{2, 7}));
  EXPECT_EQ(p.logprobs, 3);
  r.seed.reset();
  r.ignore_eos = true;
  const SequenceParams q = sequence_params(r, 12, {2, 7}, -1, 99);
  EXPECT_EQ(q.sampling.seed, 99u);
  EXPECT_TRUE(q.stop_ids.empty());
}

TEST(ErrorBodies, StatusesAndShape) {
  EXPECT_EQ(not_found_model("x", "y").status, 404);
  EXPECT_EQ(not_found_model("x", "y").code, "model_not_found");
  EXPECT_EQ(body_too_large(10).status, 413);
  EXPECT_EQ(queue_full(3).status, 429);
  EXPECT_EQ(bad_api_key().status, 401);
  EXPECT_EQ(shutting_down().status, 503);
  const json b = bad_request("m", "p").body();
  EXPECT_EQ(b, json::parse(R"({"error": {"message": "m", "type": "invalid_request_error", "param": "p", "code": null}})"));
}

const ResponseMeta kMeta{"cmpl-1", 1700000000, "tiny"};

TEST(Responses, Completion) {
  const json j = completion_response(kMeta, "text", nullptr, "length", Usage{5, 3, 4});
  EXPECT_EQ(j["object"], "text_completion");
  EXPECT_EQ(j["id"], "cmpl-1");
  EXPECT_EQ(j["created"], 1700000000);
  EXPECT_EQ(j["model"], "tiny");
  ASSERT_EQ(j["choices"].size(), 1u);
  EXPECT_EQ(j["choices"][0]["index"], 0);
  EXPECT_EQ(j["choices"][0]["text"], "text");
  EXPECT_TRUE(j["choices"][0]["logprobs"].is_null());
  EXPECT_EQ(j["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(j["usage"], json::parse(R"({"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
                                        "prompt_tokens_details": {"cached_tokens": 4}})"));
}

TEST(Responses, SeveralChoices) {
  const json lp = json{{"content", json::array()}};
  const json c = completion_response(kMeta, {{"a", nullptr, "stop"}, {"bc", lp, "length"}}, Usage{5, 7});
  ASSERT_EQ(c["choices"].size(), 2u);
  for (size_t i = 0; i < 2; ++i) EXPECT_EQ(c["choices"][i]["index"], i);
  EXPECT_EQ(c["choices"][0]["text"], "a");
  EXPECT_EQ(c["choices"][1]["text"], "bc");
  EXPECT_TRUE(c["choices"][0]["logprobs"].is_null());
  EXPECT_EQ(c["choices"][1]["logprobs"], lp);
  EXPECT_EQ(c["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(c["choices"][1]["finish_reason"], "length");
  EXPECT_EQ(c["usage"]["total_tokens"], 12);
  const json h = chat_response(kMeta, {{"x", nullptr, "stop"}, {"y", nullptr, "stop"}, {"z", nullptr, "abort"}},
                               Usage{1, 3});
  ASSERT_EQ(h["choices"].size(), 3u);
  EXPECT_EQ(h["choices"][2]["index"], 2);
  EXPECT_EQ(h["choices"][2]["message"]["content"], "z");
  EXPECT_EQ(h["choices"][2]["finish_reason"], "abort");
  EXPECT_EQ(completion_chunk(kMeta, "a", nullptr, "", false, 5)["choices"][0]["index"], 5);
  EXPECT_EQ(chat_chunk(kMeta, std::nullopt, std::string("b"), nullptr, "", false, 3)["choices"][0]["index"], 3);
}

TEST(Responses, Chat) {
  const json j = chat_response(kMeta, "hi", nullptr, "stop", Usage{2, 1});
  EXPECT_EQ(j["object"], "chat.completion");
  EXPECT_EQ(j["choices"][0]["message"], json::parse(R"({"role": "assistant", "content": "hi"})"));
  EXPECT_EQ(j["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(j["usage"]["total_tokens"], 3);
}

TEST(Responses, Chunks) {
  json c = completion_chunk(kMeta, "a", nullptr, "", true);
  EXPECT_EQ(c["object"], "text_completion");
  EXPECT_TRUE(c["choices"][0]["finish_reason"].is_null());
  EXPECT_TRUE(c.contains("usage") && c["usage"].is_null());
  EXPECT_FALSE(completion_chunk(kMeta, "a", nullptr, "", false).contains("usage"));
  json first = chat_chunk(kMeta, std::string("assistant"), std::string(""), nullptr, "", false);
  EXPECT_EQ(first["object"], "chat.completion.chunk");
  EXPECT_EQ(first["choices"][0]["delta"], json::parse(R"({"role": "assistant", "content": ""})"));
  json last = chat_chunk(kMeta, std::nullopt, std::nullopt, nullptr, "stop", false);
  EXPECT_EQ(last["choices"][0]["delta"], json::object());
  EXPECT_EQ(last["choices"][0]["finish_reason"], "stop");
  json u = usage_chunk(kMeta, "chat.completion.chunk", Usage{4, 2});
  EXPECT_TRUE(u["choices"].empty());
  EXPECT_EQ(u["usage"]["total_tokens"], 6);
  EXPECT_EQ(sse_event(json{{"a", 1}}), "data: {\"a\":1}\n\n");
  EXPECT_EQ(kSseDone, "data: [DONE]\n\n");
}

TEST(Responses, Logprobs) {
  std::vector<TokenLogprob> toks = {{" a", -0.5f, {{" a", -0.5f}, {" b", -1.5f}}},
                                    {"\xC3\xA9", -0.25f, {{"\xC3\xA9", -0.25f}, {"x", -2.0f}}}};
  const json legacy = completion_logprobs(toks, 10);
  EXPECT_EQ(legacy["tokens"], json::parse(R"([" a", "é"])"));
  EXPECT_EQ(legacy["token_logprobs"], json::parse("[-0.5, -0.25]"));
  EXPECT_EQ(legacy["top_logprobs"][0], json::parse(R"({" a": -0.5, " b": -1.5})"));
  EXPECT_EQ(legacy["text_offset"], json::parse("[10, 12]"));  // characters, not bytes: "é" is one
  const json chat = chat_logprobs(toks);
  ASSERT_EQ(chat["content"].size(), 2u);
  EXPECT_EQ(chat["content"][1]["token"], "\xC3\xA9");
  EXPECT_EQ(chat["content"][1]["bytes"], json::parse("[195, 169]"));
  EXPECT_EQ(chat["content"][0]["top_logprobs"][1], json::parse(R"({"token": " b", "logprob": -1.5, "bytes": [32, 98]})"));
  // Half a character in a token: the JSON text stays valid (U+FFFD), the bytes keep the truth.
  std::vector<TokenLogprob> half = {{"\xE2", -1.0f, {}}};
  const std::string text = dump(chat_logprobs(half));
  EXPECT_TRUE(json::accept(text));
  EXPECT_NE(text.find("[226]"), std::string::npos);
}

TEST(Responses, Models) {
  const json m = models_response("tiny", 5, 128);
  EXPECT_EQ(m["object"], "list");
  EXPECT_EQ(m["data"][0]["id"], "tiny");
  EXPECT_EQ(m["data"][0]["object"], "model");
  EXPECT_EQ(m["data"][0]["max_model_len"], 128);
}

TEST(Metrics, PrometheusText) {
  ServeMetrics m;
  m.set_gauges(2, 3, 0.25);
  m.add_prompt_tokens(10);
  m.add_generation_tokens(4);
  m.observe_ttft(0.03);
  m.observe_itl(0.02);
  m.observe_itl(100);
  m.observe_e2e(1.2);
  m.count_finished("stop");
  const std::string t = m.render("tiny \"m\"");
  EXPECT_NE(t.find("# TYPE shardlm:num_requests_running gauge\nshardlm:num_requests_running{model_name=\"tiny \\\"m\\\"\"} 2\n"),
            std::string::npos)
      << t;
  EXPECT_NE(t.find("shardlm:num_requests_waiting{model_name=\"tiny \\\"m\\\"\"} 3\n"), std::string::npos);
  EXPECT_NE(t.find("shardlm:kv_cache_usage_perc{model_name=\"tiny \\\"m\\\"\"} 0.25\n"), std::string::npos);
  EXPECT_NE(t.find("shardlm:prompt_tokens_total{model_name=\"tiny \\\"m\\\"\"} 10\n"), std::string::npos);
  EXPECT_NE(t.find("shardlm:generation_tokens_total{model_name=\"tiny \\\"m\\\"\"} 4\n"), std::string::npos);
  EXPECT_NE(t.find("# TYPE shardlm:time_to_first_token_seconds histogram"), std::string::npos);
  EXPECT_NE(t.find("shardlm:time_to_first_token_seconds_bucket{model_name=\"tiny \\\"m\\\"\",le=\"0.04\"} 1\n"),
            std::string::npos);
  EXPECT_NE(t.find("shardlm:time_to_first_token_seconds_bucket{model_name=\"tiny \\\"m\\\"\",le=\"0.02\"} 0\n"),
            std::string::npos);
  EXPECT_NE(t.find("shardlm:inter_token_latency_seconds_bucket{model_name=\"tiny \\\"m\\\"\",le=\"80\"} 1\n"),
            std::string::npos);
  EXPECT_NE(t.find("shardlm:inter_token_latency_seconds_bucket{model_name=\"tiny \\\"m\\\"\",le=\"+Inf\"} 2\n"),
            std::string::npos);
  EXPECT_NE(t.find("shardlm:inter_token_latency_seconds_count{model_name=\"tiny \\\"m\\\"\"} 2\n"), std::string::npos);
  EXPECT_NE(t.find("shardlm:e2e_request_latency_seconds_sum{model_name=\"tiny \\\"m\\\"\"} 1.2"), std::string::npos);
  // No devices reported: no device gauge; then one line per device.
  EXPECT_EQ(t.find("device_memory_used_bytes"), std::string::npos);
  m.set_device_memory({{"cuda0", 3e9}, {"cpu", 123456}});
  const std::string d = m.render("tiny");
  EXPECT_NE(d.find("# TYPE shardlm:device_memory_used_bytes gauge\n"
                   "shardlm:device_memory_used_bytes{model_name=\"tiny\",device=\"cuda0\"} 3000000000\n"
                   "shardlm:device_memory_used_bytes{model_name=\"tiny\",device=\"cpu\"} 123456\n"),
            std::string::npos)
      << d;
}

}  // namespace
}  // namespace shardlm::serve
