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
#include "model/llama.h"
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
    c.max_num_seqs = max_seqs;
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

// The texts of a streamed body's choices, by index, each choice's finish_reason (exactly one per choice)
// and the usage chunk's usage (null without one).
struct StreamedChoices {
  std::vector<std::string> text, finish;
  json usage;
};
StreamedChoices streamed_choices(const std::vector<json>& ev, size_t n, bool chat) {
  StreamedChoices r;
  r.text.resize(n);
  r.finish.resize(n);
  for (const json& e : ev) {
    if (e["choices"].empty()) {
      EXPECT_TRUE(r.usage.is_null()) << "a second usage chunk";
      r.usage = e["usage"];
      continue;
    }
    EXPECT_TRUE(r.usage.is_null()) << "a chunk after the usage chunk";
    EXPECT_EQ(e["choices"].size(), 1u);
    const size_t i = e["choices"][0]["index"];
    EXPECT_LT(i, n);
    if (i >= n) continue;
    EXPECT_TRUE(r.finish[i].empty()) << "choice " << i << " has a chunk after its finish_reason";
    const json& text = chat ? e["choices"][0]["delta"]["content"] : e["choices"][0]["text"];
    if (text.is_string()) r.text[i] += text.get<std::string>();
    if (!e["choices"][0]["finish_reason"].is_null()) r.finish[i] = e["choices"][0]["finish_reason"];
  }
  for (size_t i = 0; i < n; ++i) EXPECT_FALSE(r.finish[i].empty()) << "choice " << i << " has no finish_reason";
  return r;
}

// n > 1: n choices of the same prompt, choice i sampled with seed + i (so choice i equals the n = 1 request
// with that seed), a seeded request repeats, the streamed choices equal the whole ones, and usage counts
// the prompt once and the completion tokens of every choice.
TEST(Service, SeveralChoices) {
  Server s;
  s.start();
  const json base = {{"prompt", "Once upon a time"}, {"max_tokens", 12}, {"ignore_eos", true}, {"seed", 11}};
  json req = base;
  req["n"] = 3;
  auto [status, body] = s.completions(req);
  ASSERT_EQ(status, 200) << body;
  const json j = json::parse(body);
  ASSERT_EQ(j["choices"].size(), 3u);
  int64_t completion_tokens = 0;
  std::vector<std::string> texts;
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(j["choices"][i]["index"], i);
    EXPECT_EQ(j["choices"][i]["finish_reason"], "length");
    texts.push_back(j["choices"][i]["text"]);
    json one = base;
    one["seed"] = 11 + static_cast<int>(i);
    auto [s1, b1] = s.completions(one);
    ASSERT_EQ(s1, 200) << b1;
    const json o = json::parse(b1);
    EXPECT_EQ(o["choices"][0]["text"], texts[i]) << "choice " << i << " is not the request with seed 11 + " << i;
    completion_tokens += o["usage"]["completion_tokens"].get<int64_t>();
  }
  // Sampled at temperature 1: three choices of 12 tokens all alike would mean one seed for all.
  EXPECT_FALSE(texts[0] == texts[1] && texts[1] == texts[2]) << texts[0];
  EXPECT_EQ(j["usage"]["completion_tokens"], completion_tokens);
  EXPECT_EQ(completion_tokens, 36);
  EXPECT_EQ(j["usage"]["prompt_tokens"], static_cast<int64_t>(s.tok->encode("Once upon a time", true, false).size()));
  EXPECT_EQ(json::parse(s.completions(req).second)["choices"], j["choices"]);  // the same seed, the same choices

  req["stream"] = true;
  req["stream_options"] = {{"include_usage", true}};
  auto [s2, sse] = s.completions(req);
  ASSERT_EQ(s2, 200) << sse;
  const StreamedChoices sc = streamed_choices(events(sse), 3, /*chat=*/false);
  EXPECT_EQ(sc.text, texts);
  for (const std::string& f : sc.finish) EXPECT_EQ(f, "length");
  EXPECT_EQ(sc.usage, j["usage"]);
}

TEST(Service, SeveralChoicesChatEchoLogprobs) {
  Server s;
  s.start();
  const json msgs = {{{"role", "user"}, {"content", "Tell me a story"}}};
  const json req = {{"messages", msgs}, {"max_tokens", 6}, {"n", 2}, {"seed", 3}, {"ignore_eos", true},
                    {"logprobs", true}, {"top_logprobs", 1}};
  auto [status, body] = s.chat(req);
  ASSERT_EQ(status, 200) << body;
  const json j = json::parse(body);
  ASSERT_EQ(j["choices"].size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    // Each choice's logprobs are its own tokens.
    std::string joined;
    for (const json& t : j["choices"][i]["logprobs"]["content"]) joined += t["token"].get<std::string>();
    EXPECT_EQ(joined, j["choices"][i]["message"]["content"]);
    EXPECT_EQ(j["choices"][i]["logprobs"]["content"].size(), 6u);
  }
  json sreq = req;
  sreq["stream"] = true;
  auto [s2, sse] = s.chat(sreq);
  ASSERT_EQ(s2, 200) << sse;
  const auto ev = events(sse);
  // Every choice opens with its role chunk and closes with an empty delta carrying its finish_reason.
  std::vector<int> roles(2, 0), closes(2, 0);
  for (const json& e : ev) {
    const size_t i = e["choices"][0]["index"];
    ASSERT_LT(i, 2u);
    if (e["choices"][0]["delta"].contains("role")) {
      EXPECT_EQ(closes[i] + roles[i], 0) << "the role chunk is not choice " << i << "'s first";
      ++roles[i];
    }
    if (e["choices"][0]["delta"] == json::object()) ++closes[i];
  }
  EXPECT_EQ(roles, (std::vector<int>{1, 1}));
  EXPECT_EQ(closes, (std::vector<int>{1, 1}));
  const StreamedChoices sc = streamed_choices(ev, 2, /*chat=*/true);
  for (size_t i = 0; i < 2; ++i) EXPECT_EQ(sc.text[i], j["choices"][i]["message"]["content"]);

  // Completions with echo: every choice starts with the prompt, streamed or not; legacy logprobs per choice.
  json creq = {{"prompt", "Once"}, {"max_tokens", 5}, {"n", 2}, {"echo", true}, {"seed", 4}, {"ignore_eos", true}};
  auto [s3, whole] = s.completions(creq);
  ASSERT_EQ(s3, 200) << whole;
  const json w = json::parse(whole);
  ASSERT_EQ(w["choices"].size(), 2u);
  creq["stream"] = true;
  const StreamedChoices ec = streamed_choices(events(s.completions(creq).second), 2, /*chat=*/false);
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(w["choices"][i]["text"].get<std::string>().rfind("Once", 0), 0u) << w["choices"][i]["text"];
    EXPECT_EQ(ec.text[i], w["choices"][i]["text"]);
  }
  auto [s4, lpb] = s.completions({{"prompt", "Once"}, {"max_tokens", 5}, {"n", 2}, {"logprobs", 2}, {"seed", 4},
                                  {"ignore_eos", true}});
  ASSERT_EQ(s4, 200) << lpb;
  const json l = json::parse(lpb);
  for (size_t i = 0; i < 2; ++i) {
    std::string joined;
    for (const json& t : l["choices"][i]["logprobs"]["tokens"]) joined += t.get<std::string>();
    EXPECT_EQ(joined, l["choices"][i]["text"]);
    EXPECT_EQ(l["choices"][i]["text"], w["choices"][i]["text"].get<std::string>().substr(4)) << "seed 4 + " << i;
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
  auto [sn, nbody] = s.completions({{"prompt", "x"}, {"n", 5}});  // more than the 4 sequences at once
  EXPECT_EQ(sn, 400);
  EXPECT_NE(nbody.find("--max-num-seqs"), std::string::npos) << nbody;
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

// A streaming client of `n` choices leaves after the first chunk: every one of its sequences is aborted.
void expect_cancelled_stream_aborted(int n) {
  Server s;
  s.start();
  auto st = s.service->completions(json{{"prompt", "Once"}, {"max_tokens", 120}, {"ignore_eos", true},
                                        {"n", n}, {"stream", true}}.dump());
  ASSERT_TRUE(st.stream);
  EXPECT_EQ(s.loop->outstanding(), n);
  std::string out;
  st.stream->next(&out, 1000ms);
  st.stream.reset();  // the client left
  const auto t0 = std::chrono::steady_clock::now();
  while (s.loop->outstanding() > 0 && std::chrono::steady_clock::now() - t0 < 10s) std::this_thread::sleep_for(10ms);
  EXPECT_EQ(s.loop->outstanding(), 0);
  EXPECT_NE(s.metrics.render("tiny").find("finished_reason=\"abort\"} " + std::to_string(n)), std::string::npos)
      << s.metrics.render("tiny");
}

TEST(Service, CancelledStreamIsAborted) { expect_cancelled_stream_aborted(1); }

TEST(Service, CancelledSeveralChoicesAreAllAborted) { expect_cancelled_stream_aborted(3); }

// A request's choices are admitted together or not at all: 3 choices do not fit a queue of 2 sequences
// (429, nothing queued), 2 do.
TEST(Service, SeveralChoicesQueueAllOrNothing) {
  EngineLoopOptions lo;
  lo.max_outstanding = 2;
  Server s(lo);
  auto three = s.service->completions(json{{"prompt", "Once"}, {"max_tokens", 3}, {"n", 3}}.dump());
  ASSERT_TRUE(three.reply);
  EXPECT_EQ(three.reply->status, 429);
  EXPECT_EQ(s.loop->outstanding(), 0);
  auto two = s.service->completions(json{{"prompt", "Once"}, {"max_tokens", 3}, {"n", 2}}.dump());
  ASSERT_TRUE(two.stream);
  EXPECT_EQ(s.loop->outstanding(), 2);
  s.start();
  auto [status, body] = s.call(std::move(two));
  ASSERT_EQ(status, 200) << body;
  EXPECT_EQ(json::parse(body)["choices"].size(), 2u);
  EXPECT_EQ(s.loop->outstanding(), 0);
}

// /metrics' device memory on the CPU backend: the mapped weights plus what the backend allocated, the KV pool
// among it.
TEST(Service, DeviceMemoryGauge) {
  Server s;
  s.start();
  ASSERT_EQ(s.completions({{"prompt", "Once"}, {"max_tokens", 2}}).first, 200);
  const std::string m = s.metrics.render("tiny");
  const std::string key = "shardlm:device_memory_used_bytes{model_name=\"tiny\",device=\"cpu\"} ";
  const size_t at = m.find(key);
  ASSERT_NE(at, std::string::npos) << m;
  const double used = std::stod(m.substr(at + key.size()));
  const double weights = double(s.engine->model().weights().weight_bytes);
  EXPECT_GT(weights, 0);
  // Weights read in place from the file plus the backend's allocations (packed weights, KV cache, workspace).
  EXPECT_EQ(used, double(s.engine->model().weights().mapped_bytes) + double(s.engine->device_bytes()));
  EXPECT_GE(used, weights + double(s.engine->kv_bytes()));
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
