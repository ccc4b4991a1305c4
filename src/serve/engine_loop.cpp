#include "serve/engine_loop.h"

#include <algorithm>

#include "core/error.h"
#include "model/llama.h"
#include "runtime/engine.h"
#include "tokenizer/tokenizer.h"

namespace shardlm::serve {

namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

void Delta::merge(Delta&& later) {
  text += later.text;
  for (GeneratedToken& t : later.tokens) tokens.push_back(std::move(t));
  if (!later.finish_reason.empty()) finish_reason = later.finish_reason;
  if (later.error) error = std::move(later.error);
  completion_tokens = std::max(completion_tokens, later.completion_tokens);
  cached_tokens = std::max(cached_tokens, later.cached_tokens);
}

bool RequestHandle::wait(std::vector<Delta>* out, std::chrono::milliseconds timeout) {
  out->clear();
  std::unique_lock<std::mutex> l(mu_);
  if (!cv_.wait_for(l, timeout, [&] { return !queue_.empty(); })) return false;
  while (!queue_.empty()) {
    Delta& d = queue_.front();
    auto same = std::find_if(out->begin(), out->end(), [&](const Delta& o) { return o.index == d.index; });
    if (same == out->end())
      out->push_back(std::move(d));
    else
      same->merge(std::move(d));
    queue_.pop_front();
  }
  return true;
}

void RequestHandle::cancel() {
  if (cancelled_.exchange(true)) return;
  if (wake_) wake_();
}

void RequestHandle::post(Delta d) {
  {
    std::lock_guard<std::mutex> l(mu_);
    queue_.push_back(std::move(d));
  }
  cv_.notify_all();
}

EngineLoop::EngineLoop(Engine& engine, const Tokenizer& tok, ServeMetrics* metrics, EngineLoopOptions options)
    : engine_(engine), tok_(tok), metrics_(metrics), o_(options) {}

void EngineLoop::wake() {
  {
    std::lock_guard<std::mutex> l(mu_);
    woken_ = true;
  }
  cv_.notify_all();
}

Parsed<std::shared_ptr<RequestHandle>> EngineLoop::submit(Submission s) {
  auto h = std::make_shared<RequestHandle>([this] { wake(); });
  SHARDLM_CHECK(s.n >= 1, "a submission needs at least one choice, got n = ", s.n);
  {
    std::lock_guard<std::mutex> l(mu_);
    if (shutdown_.load() || failed_.load()) return serve::shutting_down();
    if (outstanding_.load() + s.n > o_.max_outstanding) return queue_full(o_.max_outstanding);
    outstanding_ += s.n;
    incoming_.push_back(Incoming{std::move(s), h, now_s()});
  }
  cv_.notify_all();
  return h;
}

void EngineLoop::begin_shutdown(bool now) {
  {
    std::lock_guard<std::mutex> l(mu_);
    shutdown_ = true;
    if (now) shutdown_now_ = true;
    woken_ = true;
  }
  cv_.notify_all();
}

void EngineLoop::admit(Incoming& in) {
  if (in.h->cancelled()) {
    outstanding_ -= in.s.n;
    return;
  }
  const int64_t n_prompt = static_cast<int64_t>(in.s.prompt.size());
  std::vector<int64_t> ids;
  try {
    for (int32_t i = 0; i < in.s.n; ++i) {
      SequenceParams p = in.s.params;
      p.sampling.seed = choice_seed(in.s.params.sampling.seed, i);
      ids.push_back(engine_.add_sequence(in.s.prompt, p));
    }
  } catch (const Error& e) {
    // What the HTTP side did not check (it checks the context and the vocabulary): a KV pool too small.
    // The request fails whole: the choices already added are taken back.
    for (int64_t id : ids) engine_.abort_sequence(id);
    Delta d;
    d.error = e.kind() == ErrorKind::kInvalidInput ? bad_request(e.what()) : server_error(e.what());
    in.h->post(std::move(d));
    outstanding_ -= in.s.n;
    return;
  }
  // The metrics count sequences, as the engine sees them: each choice's prompt is looked up in the prefix
  // cache and each choice finishes (usage, the client's view, counts the prompt once).
  if (metrics_) metrics_->add_prompt_tokens(n_prompt * in.s.n);
  for (int32_t i = 0; i < in.s.n; ++i) {
    Live lv;
    lv.h = in.h;
    lv.index = i;
    lv.text = TextStream(in.s.stop);
    lv.stop_ids = in.s.params.stop_ids;
    lv.logprobs = in.s.params.logprobs;
    lv.t_arrival = in.t_arrival;
    live_.emplace(ids[static_cast<size_t>(i)], std::move(lv));
  }
}

void EngineLoop::finish(std::map<int64_t, Live>::iterator it, Delta d, const std::string& reason) {
  Live& lv = it->second;
  d.index = lv.index;
  d.text += lv.text.finish();
  d.finish_reason = reason;
  d.completion_tokens = lv.generated;
  if (metrics_) {
    metrics_->observe_e2e(now_s() - lv.t_arrival);
    metrics_->count_finished(reason);
  }
  // Counted out before the reader hears of the end: a client that sends its next request at once must not
  // find this one still holding a place (429 at the limit).
  std::shared_ptr<RequestHandle> h = std::move(lv.h);
  live_.erase(it);
  --outstanding_;
  h->post(std::move(d));
}

void EngineLoop::fail_all(const ApiError& e) {
  failed_ = true;
  for (auto& [id, lv] : live_) {
    Delta d;
    d.error = e;
    lv.h->post(std::move(d));
  }
  live_.clear();
  std::deque<Incoming> rest;
  {
    std::lock_guard<std::mutex> l(mu_);
    rest.swap(incoming_);
  }
  for (Incoming& in : rest) {
    Delta d;
    d.error = e;
    in.h->post(std::move(d));
  }
  outstanding_ = 0;
}

void EngineLoop::publish_gauges() {
  if (!metrics_) return;
  const Scheduler* s = engine_.scheduler();
  int64_t queued = 0;
  {
    std::lock_guard<std::mutex> l(mu_);
    queued = static_cast<int64_t>(incoming_.size());
  }
  const double nb = s ? double(s->blocks().n_blocks()) : 0;
  metrics_->set_gauges(s ? s->n_running() : 0, (s ? s->n_waiting() : 0) + queued,
                       nb > 0 ? double(s->blocks().n_used()) / nb : 0);
  if (s) metrics_->set_prefix_cache(s->prefix_query_tokens(), s->prefix_hit_tokens());
  // This rank's memory, counted as `shardlm bench` counts it: a CUDA rank copies its weights to the device,
  // so the backend's allocations are all of it; a CPU rank reads most weights in place from the file's
  // mapping, beside what the backend allocated (packed weights, KV cache, workspace). Offloaded layers (-ngl)
  // keep their KV on the CPU backend.
  std::vector<DeviceMemory> mem;
  if (engine_.cuda_device() >= 0) {
    mem.push_back({"cuda" + std::to_string(engine_.cuda_device()), double(engine_.device_bytes())});
    if (engine_.offload_bytes() > 0) mem.push_back({"cpu", double(engine_.offload_bytes())});
  } else {
    mem.push_back({"cpu", double(engine_.model().weights().mapped_bytes) + double(engine_.device_bytes())});
  }
  metrics_->set_device_memory(std::move(mem));
}

void EngineLoop::run() {
  std::vector<SeqEvent> events;
  double deadline = -1;
  try {
    for (;;) {
      std::deque<Incoming> batch;
      {
        std::unique_lock<std::mutex> l(mu_);
        const bool busy = !live_.empty();
        if (!busy && incoming_.empty() && !woken_)
          cv_.wait_for(l, std::chrono::duration<double>(o_.idle_step_s),
                       [&] { return !incoming_.empty() || woken_; });
        woken_ = false;
        batch.swap(incoming_);
      }
      for (Incoming& in : batch) admit(in);
      // Clients that went away.
      for (auto it = live_.begin(); it != live_.end();) {
        auto next = std::next(it);
        if (it->second.h->cancelled()) {
          engine_.abort_sequence(it->first);
          finish(it, Delta{}, "abort");
        }
        it = next;
      }
      if (shutdown_.load()) {
        if (deadline < 0) deadline = now_s() + o_.shutdown_timeout_s;
        if (shutdown_now_.load() || now_s() >= deadline) {
          while (!live_.empty()) {
            engine_.abort_sequence(live_.begin()->first);
            finish(live_.begin(), Delta{}, "abort");
          }
        }
        if (live_.empty()) break;
      }
      events.clear();
      engine_.step(&events);  // also when idle: the heartbeat of the other ranks' loops
      const double t = now_s();
      for (SeqEvent& e : events) {
        auto it = live_.find(e.id);
        if (it == live_.end()) continue;
        Live& lv = it->second;
        Delta d;
        d.index = lv.index;
        std::string reason = finish_reason_name(e.finish);
        if (e.token >= 0) {
          ++lv.generated;
          if (metrics_) {
            metrics_->add_generation_tokens(1);
            if (lv.generated == 1)
              metrics_->observe_ttft(t - lv.t_arrival);
            else
              metrics_->observe_itl(t - lv.t_last);
          }
          lv.t_last = t;
          GeneratedToken g;
          g.id = e.token;
          g.logprob = e.logprob;
          g.top = std::move(e.top_logprobs);
          d.tokens.push_back(std::move(g));
          // A stop id (eos, end of turn) ends the text without text of its own, as OpenAI servers show it.
          const bool stop_id = e.finish == FinishReason::kStop &&
                               std::find(lv.stop_ids.begin(), lv.stop_ids.end(), e.token) != lv.stop_ids.end();
          if (!stop_id) d.text = lv.text.push(tok_.token_to_piece(e.token));
          if (lv.text.stopped() && e.finish == FinishReason::kNone) {
            engine_.abort_sequence(e.id);
            reason = "stop";
          } else if (lv.text.stopped()) {
            reason = "stop";
          }
        }
        d.completion_tokens = lv.generated;
        d.cached_tokens = e.cached_prompt_tokens;
        if (!reason.empty())
          finish(it, std::move(d), reason);
        else
          lv.h->post(std::move(d));
      }
      publish_gauges();
    }
  } catch (const std::exception& e) {
    fail_all(server_error(std::string("the engine failed: ") + e.what()));
    publish_gauges();
    throw;
  }
  // Submitted between the last look at the queue and the shutdown: refused as any later request is.
  std::deque<Incoming> late;
  {
    std::lock_guard<std::mutex> l(mu_);
    late.swap(incoming_);
  }
  for (Incoming& in : late) {
    Delta d;
    d.error = serve::shutting_down();
    in.h->post(std::move(d));
    outstanding_ -= in.s.n;
  }
  publish_gauges();
  engine_.shutdown();
}

}  // namespace shardlm::serve
