// serve: an OpenAI-compatible HTTP server over the batched engine (docs/serve.md).
//
// Threads of rank 0: the main thread is the engine thread (it initialized MPI and is the only one that
// touches the Engine: serve::EngineLoop::run), cpp-httplib's pool answers HTTP (serve::Service, which only
// queues requests and reads their results), and a signal thread turns SIGTERM/SIGINT/SIGUSR1 into a
// graceful shutdown. The other ranks follow rank 0's steps until it shuts the engine down.
#include <signal.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "chat_support.h"
#include "cli_common.h"
#include "commands.h"
#include "core/error.h"
#include "run_flags.h"

#ifdef SHARDLM_HAVE_HTTPLIB
#include <httplib.h>

#include "serve/connection.h"
#include "serve/engine_loop.h"
#include "serve/metrics.h"
#include "serve/service.h"
#include "tokenizer/tokenizer.h"
#endif

namespace shardlm {

#ifndef SHARDLM_HAVE_HTTPLIB

int cmd_serve(int, const char* const*) {
  fail_kind(ErrorKind::kUnsupported,
            "this shardlm was built without cpp-httplib, so it has no HTTP server: install libcpp-httplib-dev "
            "(scripts/setup.sh does) and rebuild");
}

#else

namespace {

using namespace std::chrono_literals;

std::string default_model_name(const std::string& path) {
  std::filesystem::path p(path);
  while (!p.empty() && p.filename().empty()) p = p.parent_path();  // "dir/" -> "dir"
  std::string name = p.filename().string();
  if (name.size() > 5 && name.substr(name.size() - 5) == ".gguf") name.resize(name.size() - 5);
  return name.empty() ? path : name;
}

bool protected_path(const std::string& path) {
  return path.rfind("/v1/", 0) == 0 || path == "/tokenize" || path == "/detokenize";
}

void send(httplib::Response& res, const serve::Reply& r) {
  res.status = r.status;
  res.set_content(r.body, r.content_type.c_str());
}

// A generation request's reply: the whole JSON, or server-sent events as the engine produces them.
void answer(const httplib::Request& req, httplib::Response& res, serve::Service::Started st) {
  if (st.reply) return send(res, *st.reply);
  std::shared_ptr<serve::ResponseStream> stream = std::move(st.stream);
  if (!stream->streaming()) {
    // The handler's thread waits for the end, looking at the connection meanwhile (nothing is written
    // before the end, so no failed write would tell): a client that left has its sequences aborted at
    // the engine's next step, and the loop ends with their "abort". Where the socket cannot be found,
    // the request runs to its max_tokens.
    const std::optional<serve::ClientConnection> conn =
        serve::ClientConnection::find(req.local_addr, req.local_port, req.remote_addr, req.remote_port);
    std::string body;
    while (stream->next(&body, 50ms)) {
      if (conn && conn->closed()) stream->cancel();
    }
    res.status = stream->status();
    res.set_content(body, stream->content_type());
    return;
  }
  res.set_header("Cache-Control", "no-cache");
  res.set_header("X-Accel-Buffering", "no");
  res.set_chunked_content_provider(stream->content_type(), [stream](size_t, httplib::DataSink& sink) {
    std::string out;
    bool more = true;
    auto quiet_since = std::chrono::steady_clock::now();
    while (more && out.empty()) {
      more = stream->next(&out, 200ms);
      if (more && out.empty() && std::chrono::steady_clock::now() - quiet_since > 2s) {
        // An SSE comment while nothing comes (a long prefill, a full batch): clients ignore it, and a
        // write that fails tells us the client left.
        static constexpr char kPing[] = ": ping\n\n";
        if (!sink.write(kPing, sizeof kPing - 1)) {
          stream->cancel();
          return false;
        }
        quiet_since = std::chrono::steady_clock::now();
      }
    }
    if (!out.empty() && !sink.write(out.data(), out.size())) {
      stream->cancel();  // the client left: its sequence is aborted at the engine's next step
      return false;
    }
    if (!more) sink.done();
    return true;
  });
}

// Stops and joins the HTTP and signal threads, on every way out of cmd_serve (an exception while loading
// included). Declared after what those threads use (the service, the engine loop), so it runs first.
struct Threads {
  httplib::Server* svr = nullptr;
  std::thread http, signals;
  std::atomic<bool> done{false};
  void stop() {
    done = true;
    if (svr && http.joinable()) {
      // stop() before the listener runs would not end it: wait for it to start (it does at once).
      for (int i = 0; i < 500 && !svr->is_running(); ++i) std::this_thread::sleep_for(10ms);
      svr->stop();  // closes the listener; the pool finishes the requests it holds, then joins
      http.join();
    }
    if (signals.joinable()) signals.join();
  }
  ~Threads() { stop(); }
};

}  // namespace

int cmd_serve(int argc, const char* const* argv) {
  CLI::App app("Serve the model over an OpenAI-compatible HTTP API (POST /v1/completions, /v1/chat/completions; "
               "GET /v1/models, /health, /metrics; POST /tokenize, /detokenize). With --tp/--pp the model is split "
               "across ranks (started through mpirun unless already under MPI); rank 0 serves HTTP. SIGTERM: "
               "stop taking requests, finish the running ones (--shutdown-timeout), exit 0. See docs/serve.md.",
               "serve");
  RunFlags rf;
  rf.add_to(app);
  std::string host = "127.0.0.1", served_name, api_key, chat_template_path;
  int port = 8080;
  int64_t max_num_seqs = 16, max_queue = 64, max_body_bytes = int64_t(4) << 20;
  bool prefix_caching = true;
  double shutdown_timeout = 30;
  app.add_option("--host", host, "address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface)");
  app.add_option("--port", port, "TCP port (0: any free port; the chosen one is printed)");
  app.add_option("--max-num-seqs", max_num_seqs, "sequences running at once (in one batch)");
  app.add_option("--max-num-batched-tokens", rf.n_batch, "most tokens in one forward step (same as -b)");
  app.add_flag("--enable-prefix-caching,!--no-enable-prefix-caching", prefix_caching,
               "reuse the KV blocks of earlier prompts that start with the same tokens (vLLM's flag; usage reports "
               "prompt_tokens_details.cached_tokens)")
      ->capture_default_str();
  app.add_option("--served-model-name", served_name,
                 "the model's name in the API (default: the model file's name without .gguf)");
  app.add_option("--api-key", api_key,
                 "require 'Authorization: Bearer KEY' on /v1/*, /tokenize and /detokenize (default: "
                 "$SHARDLM_API_KEY; none: open)");
  app.add_option("--chat-template", chat_template_path,
                 "chat template for /v1/chat/completions: a Jinja file, or a tokenizer_config.json (default: the "
                 "model's own)");
  app.add_option("--max-queue", max_queue,
                 "sequences (a request of n choices counts n) that may wait beyond --max-num-seqs; more get 429");
  app.add_option("--max-body-bytes", max_body_bytes, "largest request body; larger ones get 413");
  app.add_option("--shutdown-timeout", shutdown_timeout,
                 "seconds running requests may take to finish after SIGTERM before they are aborted");
  if (int rc = parse_cli(app, argc, argv); rc >= 0) return rc;
  if (host.empty()) fail("--host is empty");
  if (port < 0 || port > 65535) fail("--port ", port, " is outside [0, 65535]");
  if (max_num_seqs < 1 || max_num_seqs > 4096) fail("--max-num-seqs ", max_num_seqs, " is outside [1, 4096]");
  if (max_queue < 0 || max_queue > 100000) fail("--max-queue ", max_queue, " is outside [0, 100000]");
  if (max_body_bytes < 1024 || max_body_bytes > (int64_t(1) << 30))
    fail("--max-body-bytes ", max_body_bytes, " is outside [1024, 1073741824]");
  if (!(shutdown_timeout >= 0 && shutdown_timeout <= 86400))
    fail("--shutdown-timeout ", shutdown_timeout, " is outside [0, 86400]");
  if (app.count("--api-key") && api_key.empty()) fail("--api-key is empty");
  if (api_key.empty())
    if (const char* k = std::getenv("SHARDLM_API_KEY"); k && *k) api_key = k;
  if (app.count("--served-model-name") && served_name.empty()) fail("--served-model-name is empty");
  std::string chat_template;
  if (!chat_template_path.empty()) chat_template = load_chat_template(chat_template_path);

  const std::string path = rf.model_path();
  auto src = open_model(path);
  const Vocab* vocab = src->vocab();
  if (!vocab) fail(path, " has no tokenizer, which the server needs to turn text into tokens and back");
  if (chat_template.empty()) chat_template = src->chat_template();
  rf.max_num_seqs = max_num_seqs;    // the planner checks the KV pool of that many full contexts
  EngineOptions eo = rf.resolve(*src);
  eo.max_num_seqs = max_num_seqs;
  eo.prefix_caching = prefix_caching;
  if (int rc = maybe_self_launch(eo.tp, eo.pp, argc, argv, SIGUSR1); rc >= 0) return rc;

  // Every thread from here on (MPI's, HTTP's) inherits a mask without these: the signal thread of rank 0
  // takes them, and on the other ranks they wait unhandled (rank 0 ends those ranks through the engine).
  sigset_t term;
  sigemptyset(&term);
  sigaddset(&term, SIGTERM);
  sigaddset(&term, SIGINT);
  sigaddset(&term, SIGUSR1);
  pthread_sigmask(SIG_BLOCK, &term, nullptr);
  signal(SIGPIPE, SIG_IGN);  // a client that left is a failed write, not the end of the server

  auto comm = make_communicator(rf.comm_timeout);
  const bool rank0 = comm->rank() == 0;
  std::unique_ptr<Tokenizer> tok = Tokenizer::create(*vocab);

  serve::ServiceConfig sc;
  sc.model_name = served_name.empty() ? default_model_name(path) : served_name;
  sc.aliases = {path};
  sc.chat_template = chat_template;
  sc.api_key = api_key;
  sc.stop_ids = stop_ids_of(*vocab);
  sc.max_num_seqs = max_num_seqs;
  std::unique_ptr<serve::Service> service;
  serve::ServeMetrics metrics;
  std::unique_ptr<serve::EngineLoop> loop;
  httplib::Server svr;
  Threads threads;
  std::atomic<serve::EngineLoop*> loop_ptr{nullptr};
  std::atomic<int> signals_seen{0};
  int bound_port = port;
  if (rank0) {
    service = std::make_unique<serve::Service>(sc, *tok);  // a chat template's syntax error stops us here
    const size_t n_http = static_cast<size_t>(std::min<int64_t>(max_num_seqs + max_queue + 8, 1024));
    svr.new_task_queue = [n_http] { return new httplib::ThreadPool(n_http); };
    svr.set_payload_max_length(static_cast<size_t>(max_body_bytes));
    svr.set_keep_alive_timeout(2);  // idle keep-alive connections hold a pool thread (and shutdown) this long
    serve::Service& s = *service;
    svr.set_pre_routing_handler([&s](const httplib::Request& req, httplib::Response& res) {
      if (protected_path(req.path) && !s.authorized(req.get_header_value("Authorization"))) {
        send(res, serve::error_reply(serve::bad_api_key()));
        return httplib::Server::HandlerResponse::Handled;
      }
      return httplib::Server::HandlerResponse::Unhandled;
    });
    svr.set_error_handler([max_body_bytes](const httplib::Request& req, httplib::Response& res) {
      if (!res.body.empty()) return;  // our own error replies
      serve::ApiError e;
      if (res.status == 413) {
        e = serve::body_too_large(static_cast<uint64_t>(max_body_bytes));
      } else if (res.status == 404) {
        e.status = 404;
        e.message = "No such endpoint: " + req.method + " " + req.path;
        e.code = "not_found";
      } else {
        e.status = res.status;
        e.message = "HTTP error " + std::to_string(res.status);
      }
      res.set_content(e.body_text(), "application/json");
    });
    svr.Post("/v1/completions", [&s](const httplib::Request& req, httplib::Response& res) {
      answer(req, res, s.completions(req.body));
    });
    svr.Post("/v1/chat/completions", [&s](const httplib::Request& req, httplib::Response& res) {
      answer(req, res, s.chat(req.body));
    });
    svr.Get("/v1/models", [&s](const httplib::Request&, httplib::Response& res) { send(res, s.models()); });
    svr.Get("/health", [&s](const httplib::Request&, httplib::Response& res) { send(res, s.health()); });
    svr.Get("/metrics", [&s, &metrics](const httplib::Request&, httplib::Response& res) {
      send(res, s.metrics(metrics));
    });
    svr.Post("/tokenize", [&s](const httplib::Request& req, httplib::Response& res) { send(res, s.tokenize(req.body)); });
    svr.Post("/detokenize", [&s](const httplib::Request& req, httplib::Response& res) {
      send(res, s.detokenize(req.body));
    });
    // Bound before the model loads: a port in use fails at once, and /health answers 503 while loading.
    if (port == 0) {
      bound_port = svr.bind_to_any_port(host);
      if (bound_port <= 0) fail_kind(ErrorKind::kIo, "cannot listen on ", host, " (any port)");
    } else if (!svr.bind_to_port(host.c_str(), port)) {
      fail_kind(ErrorKind::kIo, "cannot listen on ", host, ":", port, " (in use, or not an address of this machine)");
    }
    threads.svr = &svr;
    threads.http = std::thread([&svr] { svr.listen_after_bind(); });
    threads.signals = std::thread([&] {
      while (!threads.done.load()) {
        timespec ts{0, 200 * 1000 * 1000};
        siginfo_t info;
        const int sig = sigtimedwait(&term, &info, &ts);
        if (sig <= 0) continue;
        const int n = ++signals_seen;
        std::fprintf(stderr, "serve: %s: %s\n", sig == SIGINT ? "SIGINT" : sig == SIGUSR1 ? "SIGUSR1" : "SIGTERM",
                     n == 1 ? "taking no new requests; finishing the running ones" : "aborting the running requests");
        if (serve::EngineLoop* l = loop_ptr.load()) l->begin_shutdown(n > 1);
      }
    });
  }

  Progress progress("loading", rank0 && !rf.quiet);
  Engine engine(*src, *comm, eo, [&](uint64_t d, uint64_t t) { progress(d, t); });
  progress.finish();
  const std::string report = engine.layout_report();
  if (!rank0) {
    while (!engine.stopped()) engine.step();
    return 0;
  }
  if (!rf.quiet)
    std::fprintf(stderr,
                 "layout: %d rank(s), tp %d x pp %d, backend %s, context %lld, %lld sequences at once, prefix caching "
                 "%s\n%s",
                 comm->world_size(), eo.tp, eo.pp, engine.backend_name().c_str(),
                 static_cast<long long>(engine.n_ctx()), static_cast<long long>(max_num_seqs),
                 prefix_caching ? "on" : "off", report.c_str());
  serve::EngineLoopOptions lo;
  lo.max_outstanding = max_num_seqs + max_queue;
  lo.shutdown_timeout_s = shutdown_timeout;
  loop = std::make_unique<serve::EngineLoop>(engine, *tok, &metrics, lo);
  loop_ptr = loop.get();
  if (signals_seen.load() > 0) loop->begin_shutdown(signals_seen.load() > 1);  // a signal while loading
  service->ready(loop.get(), engine.n_ctx());
  std::printf("serving '%s' (context %lld)%s\nlistening on http://%s:%d\n", sc.model_name.c_str(),
              static_cast<long long>(engine.n_ctx()), api_key.empty() ? "" : ", API key required", host.c_str(),
              bound_port);
  std::fflush(stdout);
  loop->run();  // until a signal's shutdown has finished the running requests
  threads.stop();  // the last responses written, every connection closed
  if (!rf.quiet) std::fprintf(stderr, "serve: stopped\n");
  return 0;
}

#endif  // SHARDLM_HAVE_HTTPLIB

}  // namespace shardlm
