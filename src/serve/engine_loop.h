// The engine thread of `shardlm serve` and the queue between it and the HTTP threads.
//
// The Engine is not thread-safe and its steps are collectives of every rank, so exactly one thread (rank
// 0's, the one that initialized MPI) touches it: EngineLoop::run(). HTTP threads only submit() requests
// into a mutex-guarded queue and read each request's results from its RequestHandle. Per step the engine
// thread: admits what was queued (Engine::add_sequence), aborts the sequences whose clients left or whose
// text hit a stop string, runs one step (also when idle, at least every idle_step_s: the tiny broadcast
// that keeps the other ranks in step), turns each sampled token into text (TextStream: stop strings, whole
// UTF-8 characters) and posts a Delta to the request's handle.
//
// Shutdown (SIGTERM): begin_shutdown() stops admitting (503); running and queued requests get
// shutdown_timeout_s to finish, then are aborted (finish_reason "abort"); run() then calls
// Engine::shutdown(), which releases the other ranks' loops, and returns.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "ops/candidates.h"
#include "runtime/scheduler.h"
#include "serve/metrics.h"
#include "serve/openai.h"
#include "serve/text_stream.h"

namespace shardlm {
class Engine;
class Tokenizer;
}  // namespace shardlm

namespace shardlm::serve {

struct GeneratedToken {
  int32_t id = -1;
  float logprob = 0;                       // with SequenceParams::logprobs >= 0
  std::vector<TokenCandidate> top;         // the most likely tokens (logit = log-probability)
};

// What happened to one choice of a request since the last Delta its reader took.
struct Delta {
  int32_t index = 0;                       // the choice (0 .. n-1)
  std::string text;                        // new text: whole characters, nothing of a stop string
  std::vector<GeneratedToken> tokens;      // tokens sampled since (the stop-id token included)
  std::string finish_reason;               // "" while running; then "stop", "length" or "abort"
  std::optional<ApiError> error;           // the request failed (the end)
  int64_t completion_tokens = 0;           // generated so far
  int64_t cached_tokens = 0;               // prompt tokens taken from the prefix cache
  bool done() const { return !finish_reason.empty() || error.has_value(); }
  void merge(Delta&& later);
};

// One request as both sides see it: its n choices are n engine sequences posting here. The reader (an
// HTTP thread) waits for deltas; cancel() tells the engine thread to abort every sequence of the request at
// its next step (a client that went away).
class RequestHandle {
 public:
  explicit RequestHandle(std::function<void()> wake) : wake_(std::move(wake)) {}

  // Waits up to `timeout` for news and merges everything queued into `out` (cleared first): one Delta per
  // choice that had news, in the order the news came. True when there was news; false on timeout.
  bool wait(std::vector<Delta>* out, std::chrono::milliseconds timeout);
  void cancel();
  bool cancelled() const { return cancelled_.load(); }

  void post(Delta d);  // engine thread

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Delta> queue_;
  std::atomic<bool> cancelled_{false};
  std::function<void()> wake_;
};

// A request ready for the engine: tokens and parameters, plus the stop strings the text is cut at. Its n
// choices are n sequences of the same prompt (the prefix cache shares the prompt's full blocks), choice i
// sampled with the seed choice_seed(params.sampling.seed, i).
struct Submission {
  std::vector<int32_t> prompt;
  SequenceParams params;
  std::vector<std::string> stop;
  int32_t n = 1;
};

struct EngineLoopOptions {
  int64_t max_outstanding = 80;   // sequences (a request's n choices count n) admitted and not finished
                                  // (running + waiting); more -> 429
  double shutdown_timeout_s = 30; // after begin_shutdown(), how long running requests may go on
  double idle_step_s = 0.5;       // an idle engine steps at least this often (< 1 s, the idle protocol)
};

class EngineLoop {
 public:
  // `tok` turns tokens into text. `metrics` may be null.
  EngineLoop(Engine& engine, const Tokenizer& tok, ServeMetrics* metrics, EngineLoopOptions options);

  // Any thread: queues a request, all its n choices or none: 429 when they would pass max_outstanding,
  // 503 after begin_shutdown().
  Parsed<std::shared_ptr<RequestHandle>> submit(Submission s);
  // Any thread (a signal's): stop admitting; what runs gets shutdown_timeout_s to finish. A second call
  // with `now` true ends it at once (aborting what runs).
  void begin_shutdown(bool now = false);
  bool shutting_down() const { return shutdown_.load(); }
  int64_t outstanding() const { return outstanding_.load(); }

  // The engine thread's body: returns after the engine's shutdown(); an engine error fails every request
  // (500) and is rethrown.
  void run();

 private:
  struct Incoming {
    Submission s;
    std::shared_ptr<RequestHandle> h;
    double t_arrival = 0;
  };
  struct Live {
    std::shared_ptr<RequestHandle> h;
    int32_t index = 0;               // the choice
    TextStream text;
    std::vector<int32_t> stop_ids;
    int32_t logprobs = -1;
    int64_t generated = 0;
    double t_arrival = 0, t_last = 0;
  };
  void wake();
  void admit(Incoming& in);
  void finish(std::map<int64_t, Live>::iterator it, Delta d, const std::string& reason);
  void fail_all(const ApiError& e);
  void publish_gauges();

  Engine& engine_;
  const Tokenizer& tok_;
  ServeMetrics* metrics_;
  EngineLoopOptions o_;

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Incoming> incoming_;  // guarded by mu_
  bool woken_ = false;             // guarded by mu_
  std::atomic<bool> shutdown_{false}, shutdown_now_{false}, failed_{false};
  std::atomic<int64_t> outstanding_{0};

  std::map<int64_t, Live> live_;   // engine thread only: engine sequence id -> request
};

}  // namespace shardlm::serve
