// The endpoints without sockets (src/serve/service.h) over the engine thread (src/serve/engine_loop.h) and
// the real engine with the bundled model: greedy text as Engine::generate gives it, streamed text equal to
// whole text, stop strings, logprobs, seeds, cancellation, a full queue and shutdown.
#include <gtest/gtest.h>

#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "comm/communicator.h"
#include "loader/model_source.h"
#include "runtime/engine.h"
#include "serve/engine_loop.h"
#include "serve/service.h"
#include "tokenizer/tokenizer.h"

namespace shardlm::serve {
namespace {

using nlohmann::json;
using namespace std::chrono_literals;

const std::string kModel = std::string(SHARDLM_SOURCE_DIR) + "/models/aidreams260K.gguf";
// ChatML, as Qwen and others write it (the bundled model has no template of its own).
const char* kChatMl =
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

struct Server {
  std::unique_ptr<ModelSource> src;
  std::unique_ptr<Communicator> comm;
  std::unique_ptr<Engine> engine;
  std::unique_ptr<Tokenizer> tok;
  ServeMetrics metrics;
  std::unique_ptr<EngineLoop> loop;
  std::unique_ptr<Service> service;
  std::thread thread;
  bool running = false;

  explicit Server(EngineLoopOptions lo = {}, int64_t max_seqs = 4) {
    src = open_model_source(kModel);
    comm = make_single_rank_communicator();
    EngineOptions o;
    o.n_threads = 1;
    o.max_num_seqs = max_seqs;
    engine = std::make_unique<Engine>(*src, *comm, o);
    tok = Tokenizer::create(*src->vocab());
    loop = std::make_unique<EngineLoop>(*engine, *tok, &metrics, lo);
    ServiceConfig c;
    c.model_name = "tiny";
    c.chat_template = kChatMl;
    c.stop_ids = {tok->eos()};
    service = std::make_unique<Service>(c, *tok);
    service->ready(loop.get(), engine->n_ctx());
  }
  void start() {
    running = true;
    thread = std::thread([this] { loop->run(); });
  }
  void stop() {
    if (!running) return;
    loop->begin_shutdown();
    thread.join();
    running = false;
  }
  ~Server() { stop(); }

  // The whole body and status of a request, streamed or not.
  std::pair<int, std::string> call(Service::Started st) {
    if (st.reply) return {st.reply->status, st.reply->body};
    std::string body;
    const auto t0 = std::chrono::steady_clock::now();
    while (st.stream->next(&body, 100ms)) {
      if (std::chrono::steady_clock::now() - t0 > 60s) ADD_FAILURE() << "no end in 60 s";
    }
    return {st.stream->status(), body};
  }
  std::pair<int, std::string> completions(const json& body) { return call(service->completions(body.dump())); }
  std::pair<int, std::string> chat(const json& body) { return call(service->chat(body.dump())); }
};

// The data lines of an SSE body, parsed; "[DONE]" must be last.
std::vector<json> events(const std::string& body) {
  std::vector<json> out;
  size_t pos = 0;
  bool done = false;
  while (pos < body.size()) {
    const size_t end = body.find("\n\n", pos);
    EXPECT_NE(end, std::string::npos) << "an event without its blank line";
    if (end == std::string::npos) break;
    const std::string ev = body.substr(pos, end - pos);
    pos = end + 2;
    EXPECT_EQ(ev.rfind("data: ", 0), 0u) << ev;
    EXPECT_FALSE(done) << "an event after [DONE]";
    if (ev == "data: [DONE]") {
      done = true;
      continue;
    }
    out.push_back(json::parse(ev.substr(6)));
  }
  EXPECT_TRUE(done) << "no [DONE]";
  return out;
}

std::string greedy_generate(Server& s, const std::string& prompt, int64_t n, float presence = 0,
                            float frequency = 0) {
  SamplerParams greedy;
  greedy.temperature = 0;
  greedy.presence_penalty = presence;
  greedy.frequency_penalty = frequency;
  const auto ids = s.tok->encode(prompt, true, false);
  const GenerateResult r = s.engine->generate(ids, n, greedy, s.tok->eos());
  std::string text;
  for (int32_t t : r.generated)
    if (t != s.tok->eos()) text += s.tok->token_to_piece(t);
  return text;
}

TEST(Service, GreedyCompletionMatchesGenerateStreamedOrNot) {
  Server s;
  const std::string expect = greedy_generate(s, "Once upon a time", 24);
  ASSERT_FALSE(expect.empty());
  s.start();
  auto [status, body] = s.completions({{"prompt", "Once upon a time"}, {"max_tokens", 24}, {"temperature", 0}});
  ASSERT_EQ(status, 200) << body;
  const json j = json::parse(body);
  EXPECT_EQ(j["choices"][0]["text"], expect);
  EXPECT_EQ(j["usage"]["prompt_tokens"], static_cast<int64_t>(s.tok->encode("Once upon a time", true, false).size()));
  EXPECT_LE(j["usage"]["completion_tokens"].get<int64_t>(), 24);
  const std::string fr = j["choices"][0]["finish_reason"];
  EXPECT_TRUE(fr == "length" || fr == "stop") << fr;

  auto [s2, sse] = s.completions({{"prompt", "Once upon a time"},
                                  {"max_tokens", 24},
                                  {"temperature", 0},
                                  {"stream", true},
                                  {"stream_options", {{"include_usage", true}}}});
  ASSERT_EQ(s2, 200);
  const auto ev = events(sse);
  ASSERT_GE(ev.size(), 2u);
  std::string streamed;
  for (size_t i = 0; i + 1 < ev.size(); ++i) {
    EXPECT_EQ(ev[i]["object"], "text_completion");
    EXPECT_TRUE(ev[i]["usage"].is_null());
    streamed += ev[i]["choices"][0]["text"].get<std::string>();
  }
  EXPECT_EQ(streamed, expect);
  EXPECT_EQ(ev[ev.size() - 2]["choices"][0]["finish_reason"], fr);
  EXPECT_TRUE(ev.back()["choices"].empty());
  EXPECT_EQ(ev.back()["usage"], j["usage"]);
}

// presence_penalty / frequency_penalty reach the sampler: the request's greedy text equals generate's with
// the same penalties, and differs from the unpenalized text (the bundled model repeats words within 40
// tokens, so the penalties change its choice).
TEST(Service, PresenceAndFrequencyPenalties) {
  Server s;
  const std::string plain = greedy_generate(s, "Once upon a time", 40);
  const std::string pen = greedy_generate(s, "Once upon a time", 40, 0.8f, 1.2f);
  ASSERT_NE(plain, pen);
  s.start();
  auto [status, body] = s.completions({{"prompt", "Once upon a time"}, {"max_tokens", 40}, {"temperature", 0},
                                       {"presence_penalty", 0.8}, {"frequency_penalty", 1.2}});
  ASSERT_EQ(status, 200) << body;
  EXPECT_EQ(json::parse(body)["choices"][0]["text"], pen);
}

TEST(Service, StopStringCutsTheText) {
  Server s;
  const std::string full = greedy_generate(s, "Once upon a time", 30);
  ASSERT_GT(full.size(), 12u);
  const std::string stop = full.substr(6, 3);  // somewhere inside, likely across a token boundary
  const std::string expect = full.substr(0, full.find(stop));
  s.start();
  for (bool stream : {false, true}) {
    SCOPED_TRACE(stream);
    json req = {{"prompt", "Once upon a time"}, {"max_tokens", 30}, {"temperature", 0}, {"stop", {"zzzz", stop}},
                {"stream", stream}};
    auto [status, body] = s.completions(req);
    ASSERT_EQ(status, 200) << body;
    std::string text, finish;
    if (stream) {
      for (const json& e : events(body)) {
        text += e["choices"][0]["text"].get<std::string>();
        if (!e["choices"][0]["finish_reason"].is_null()) finish = e["choices"][0]["finish_reason"];
      }
    } else {
      const json j = json::parse(body);
      text = j["choices"][0]["text"];
      finish = j["choices"][0]["finish_reason"];
    }
    EXPECT_EQ(text, expect);
    EXPECT_EQ(finish, "stop");
  }
}

TEST(Service, LogprobsAndSeeds) {
  Server s;
  s.start();
  auto [status, body] = s.completions({{"prompt", "Once"}, {"max_tokens", 5}, {"logprobs", 3}, {"seed", 7},
                                       {"ignore_eos", true}});
  ASSERT_EQ(status, 200) << body;
  const json j = json::parse(body);
  const json& lp = j["choices"][0]["logprobs"];
  ASSERT_EQ(lp["tokens"].size(), 5u);
  ASSERT_EQ(lp["token_logprobs"].size(), 5u);
  ASSERT_EQ(lp["top_logprobs"].size(), 5u);
  ASSERT_EQ(lp["text_offset"].size(), 5u);
  std::string joined;
  for (size_t i = 0; i < 5; ++i) {
    EXPECT_LE(lp["token_logprobs"][i].get<double>(), 0.0);
    EXPECT_GE(lp["top_logprobs"][i].size(), 1u);
    EXPECT_LE(lp["top_logprobs"][i].size(), 4u);  // the 3 best plus the sampled token
    joined += lp["tokens"][i].get<std::string>();
  }
  EXPECT_EQ(joined, j["choices"][0]["text"]);
  // The same seed, the same text; sampling at temperature 1 with top-k off.
  auto [s2, body2] = s.completions({{"prompt", "Once"}, {"max_tokens", 5}, {"logprobs", 3}, {"seed", 7},
                                    {"ignore_eos", true}});
  EXPECT_EQ(json::parse(body2)["choices"][0]["text"], j["choices"][0]["text"]);

  auto [s3, chat] = s.chat({{"messages", {{{"role", "user"}, {"content", "Hi"}}}}, {"max_tokens", 4},
                            {"logprobs", true}, {"top_logprobs", 2}, {"seed", 1}, {"ignore_eos", true}});
  ASSERT_EQ(s3, 200) << chat;
  const json c = json::parse(chat);
  EXPECT_EQ(c["object"], "chat.completion");
  EXPECT_EQ(c["choices"][0]["message"]["role"], "assistant");
  const json& content = c["choices"][0]["logprobs"]["content"];
  ASSERT_EQ(content.size(), 4u);
  for (const json& t : content) {
    EXPECT_TRUE(t["token"].is_string());
    EXPECT_TRUE(t["bytes"].is_array());
    EXPECT_EQ(t["top_logprobs"].size(), 2u);
    EXPECT_GE(t["top_logprobs"][0]["logprob"].get<double>(), t["top_logprobs"][1]["logprob"].get<double>());
  }
}

TEST(Service, ChatStreamShape) {
  Server s;
  s.start();
  auto [status, body] = s.chat({{"messages", {{{"role", "system"}, {"content", "Be brief."}},
                                              {{"role", "user"}, {"content", "Tell me a story"}}}},
                                {"max_completion_tokens", 8}, {"temperature", 0}, {"stream", true}});
  ASSERT_EQ(status, 200) << body;
  const auto ev = events(body);
  ASSERT_GE(ev.size(), 2u);
  EXPECT_EQ(ev.front()["choices"][0]["delta"], json::parse(R"({"role": "assistant", "content": ""})"));
  EXPECT_EQ(ev.back()["choices"][0]["delta"], json::object());
  EXPECT_FALSE(ev.back()["choices"][0]["finish_reason"].is_null());
  std::string streamed;
  for (size_t i = 1; i + 1 < ev.size(); ++i) streamed += ev[i]["choices"][0]["delta"]["content"].get<std::string>();
  auto [s2, whole] = s.chat({{"messages", {{{"role", "system"}, {"content", "Be brief."}},
                                           {{"role", "user"}, {"content", "Tell me a story"}}}},
                             {"max_completion_tokens", 8}, {"temperature", 0}});
  EXPECT_EQ(json::parse(whole)["choices"][0]["message"]["content"], streamed);
}

TEST(Service, BadRequests) {
  Server s;
  s.start();
  EXPECT_EQ(s.call(s.service->completions("{oops")).first, 400);
  EXPECT_EQ(s.completions({{"prompt", "x"}, {"model", "gpt-4"}}).first, 404);
  EXPECT_EQ(s.completions({{"prompt", "x"}, {"n", 2}}).first, 400);
  EXPECT_EQ(s.completions({{"prompt", "x"}, {"max_tokens", 1000}}).first, 400);  // context 128
  std::string longp;
  for (int i = 0; i < 200; ++i) longp += " word";
  auto [st, body] = s.completions({{"prompt", longp}});
  EXPECT_EQ(st, 400);
  EXPECT_NE(body.find("context_length_exceeded"), std::string::npos) << body;
  EXPECT_EQ(s.chat({{"messages", json::array()}}).first, 400);
  // Still serving.
  EXPECT_EQ(s.completions({{"prompt", "x"}, {"max_tokens", 2}}).first, 200);
  EXPECT_EQ(s.service->health().status, 200);
  EXPECT_EQ(s.service->models().status, 200);
  const Reply t = s.service->tokenize(R"({"prompt": "Once upon"})");
  ASSERT_EQ(t.status, 200);
  const json ids = json::parse(t.body)["tokens"];
  const Reply d = s.service->detokenize(json{{"tokens", ids}}.dump());
  EXPECT_EQ(json::parse(d.body)["prompt"], "Once upon");
}

TEST(Service, CancelledStreamIsAborted) {
  Server s;
  s.start();
  auto st = s.service->completions(json{{"prompt", "Once"}, {"max_tokens", 120}, {"ignore_eos", true},
                                        {"stream", true}}.dump());
  ASSERT_TRUE(st.stream);
  std::string out;
  st.stream->next(&out, 1000ms);
  st.stream.reset();  // the client left
  const auto t0 = std::chrono::steady_clock::now();
  while (s.loop->outstanding() > 0 && std::chrono::steady_clock::now() - t0 < 10s) std::this_thread::sleep_for(10ms);
  EXPECT_EQ(s.loop->outstanding(), 0);
  EXPECT_NE(s.metrics.render("tiny").find("finished_reason=\"abort\"} 1"), std::string::npos);
}

TEST(Service, QueueFullAndShutdown) {
  EngineLoopOptions lo;
  lo.max_outstanding = 1;
  Server s(lo);
  // The loop is not running yet: the first request waits in the queue, the second finds it full.
  auto first = s.service->completions(json{{"prompt", "Once"}, {"max_tokens", 3}}.dump());
  ASSERT_TRUE(first.stream);
  auto second = s.service->completions(json{{"prompt", "Once"}, {"max_tokens", 3}}.dump());
  ASSERT_TRUE(second.reply);
  EXPECT_EQ(second.reply->status, 429);
  // Shutdown: new requests get 503, the queued one still finishes, then the loop ends.
  s.loop->begin_shutdown();
  EXPECT_EQ(s.service->completions(json{{"prompt", "Once"}}.dump()).reply->status, 503);
  EXPECT_EQ(s.service->health().status, 503);
  s.start();
  auto [status, body] = s.call(std::move(first));
  EXPECT_EQ(status, 200) << body;
  s.thread.join();
  s.running = false;
  EXPECT_TRUE(s.engine->stopped());
}

}  // namespace
}  // namespace shardlm::serve
