// `shardlm chat`: a conversation in the terminal. Each line read is a user message; the whole conversation
// is rendered with the model's chat template and generated from, on any layout (--tp/--pp under mpirun, as
// generate). The engine runs with prefix caching, so each turn computes only what the previous turns did
// not leave in the KV cache (the rendered history repeats the earlier prompt and answer). Ctrl-C stops the
// answer being written and keeps what was written; at the prompt it ends the program, as Ctrl-D does.
#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "chat_support.h"
#include "cli_common.h"
#include "commands.h"
#include "core/error.h"
#include "loader/hf_source.h"
#include "run_flags.h"
#include "serve/text_stream.h"
#include "tokenizer/chat_template.h"

namespace shardlm {
namespace {

// Set by SIGINT (Ctrl-C) and by SIGUSR1 (what the launching process turns Ctrl-C into under mpirun).
std::atomic<bool> g_interrupted{false};

extern "C" void on_interrupt(int) { g_interrupted.store(true); }

void install_interrupt_handlers() {
  struct sigaction sa = {};
  sa.sa_handler = on_interrupt;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = 0;  // no SA_RESTART: a wait for input returns at once with EINTR
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGUSR1, &sa, nullptr);
}

// Lines of standard input, read without blocking the engine: while no line is complete, `idle` runs about
// twice a second (the engine's idle step, which keeps the other ranks' --comm-timeout watchdog quiet).
class LineReader {
 public:
  enum class Status { kLine, kEnd, kInterrupted };

  Status next(std::string* line, const std::function<void()>& idle) {
    for (;;) {
      if (const size_t nl = buf_.find('\n'); nl != std::string::npos) {
        *line = buf_.substr(0, nl);
        buf_.erase(0, nl + 1);
        if (!line->empty() && line->back() == '\r') line->pop_back();
        return Status::kLine;
      }
      if (eof_) {
        if (buf_.empty()) return Status::kEnd;
        *line = std::move(buf_);  // a last line without its newline
        buf_.clear();
        return Status::kLine;
      }
      if (g_interrupted.load()) return Status::kInterrupted;
      pollfd p{0, POLLIN, 0};
      const int r = poll(&p, 1, 500);
      if (r < 0) {
        if (errno == EINTR) continue;
        fail_kind(ErrorKind::kIo, "waiting for standard input: ", std::strerror(errno));
      }
      if (r == 0) {
        idle();
        continue;
      }
      char chunk[4096];
      const ssize_t n = read(0, chunk, sizeof chunk);
      if (n < 0) {
        if (errno == EINTR || errno == EAGAIN) continue;
        fail_kind(ErrorKind::kIo, "reading standard input: ", std::strerror(errno));
      }
      if (n == 0) eof_ = true;
      else buf_.append(chunk, static_cast<size_t>(n));
    }
  }

 private:
  std::string buf_;
  bool eof_ = false;
};

}  // namespace

int cmd_chat(int argc, const char* const* argv) {
  CLI::App app(
      "Chat with a model in the terminal: each line is a user message, answered with the model's chat template "
      "over the whole conversation (kept in the KV cache between turns). /clear forgets the conversation, /exit or "
      "Ctrl-D ends it, Ctrl-C stops an answer. With --tp/--pp the model is split across ranks, as for generate.",
      "chat");
  RunFlags rf;
  rf.add_to(app);
  SamplerParams sp;
  sp.temperature = 0.8f;
  int64_t n_predict = -1;
  bool greedy = false, prefix_caching = true;
  std::string system, tokenizer_path, chat_template_path;
  app.add_option("-n,--n-predict", n_predict,
                 "most tokens per answer (-1: until the end of the turn or a full context)")
      ->capture_default_str();
  app.add_option("--temp", sp.temperature, "temperature; 0 = greedy")->capture_default_str();
  app.add_flag("--greedy", greedy, "same as --temp 0");
  app.add_option("--top-k", sp.top_k, "keep the k most likely tokens (0 = off)")->capture_default_str();
  app.add_option("--top-p", sp.top_p, "nucleus sampling threshold (1 = off)")->capture_default_str();
  app.add_option("--min-p", sp.min_p, "drop tokens below min-p times the best one's probability (0 = off)")
      ->capture_default_str();
  app.add_option("--repeat-penalty", sp.repeat_penalty, "penalty for recently seen tokens (1 = off)")
      ->capture_default_str();
  app.add_option("--seed", sp.seed, "random seed of the sampler (same seed, same answers)")->capture_default_str();
  app.add_option("--system,--system-prompt", system, "a system message before the conversation");
  app.add_option("--tokenizer", tokenizer_path,
                 "use this tokenizer (tokenizer.json, a directory holding one, or a GGUF) and its chat template");
  app.add_option("--chat-template", chat_template_path,
                 "a Jinja chat template file, or a tokenizer_config.json holding one (default: the model's)");
  app.add_flag("--enable-prefix-caching,!--no-enable-prefix-caching", prefix_caching,
               "keep the conversation's KV blocks between turns, so a turn computes only its new tokens")
      ->capture_default_str();
  if (int rc = parse_cli(app, argc, argv); rc >= 0) return rc;
  if (greedy) {
    if (app.count("--temp") && sp.temperature != 0)
      fail("--greedy and --temp ", sp.temperature, " contradict each other: give one of them");
    sp.temperature = 0;
  }
  sp.validate();
  if (n_predict != -1 && (n_predict < 1 || n_predict > (1 << 24)))
    fail("-n ", n_predict, " is outside [1, 16777216] (or -1: until the end of the turn)");
  std::string tmpl_text;
  if (!chat_template_path.empty()) tmpl_text = load_chat_template(chat_template_path);

  const std::string path = rf.model_path();
  auto src = open_model(path);
  EngineOptions eo = rf.resolve(*src);
  eo.prefix_caching = prefix_caching;
  // Under mpirun, Ctrl-C at this (launching) process reaches the ranks as SIGUSR1.
  if (int rc = maybe_self_launch(eo.tp, eo.pp, argc, argv, SIGUSR1); rc >= 0) return rc;
  install_interrupt_handlers();

  auto comm = make_communicator(rf.comm_timeout);
  const bool rank0 = comm->rank() == 0;
  if (!tokenizer_path.empty()) src = with_tokenizer(std::move(src), load_tokenizer_files(tokenizer_path));
  const Vocab* vocab = src->vocab();
  if (!vocab) fail(path, " has no tokenizer: pass --tokenizer");
  if (tmpl_text.empty()) tmpl_text = src->chat_template();
  if (tmpl_text.empty())
    fail(tokenizer_path.empty() ? path : tokenizer_path,
         " has no chat template (GGUF tokenizer.chat_template or tokenizer_config.json chat_template); pass "
         "--chat-template FILE or --tokenizer with one");
  const ChatTemplate tmpl(tmpl_text);
  std::unique_ptr<Tokenizer> tok = Tokenizer::create(*vocab);
  const auto piece_of = [&](int32_t id) {
    return id >= 0 && id < tok->n_vocab() ? vocab->tokens[static_cast<size_t>(id)] : std::string();
  };
  const std::vector<int32_t> stop_ids = stop_ids_of(*vocab);

  Progress progress("loading", rank0 && !rf.quiet);
  Engine engine(*src, *comm, eo, [&](uint64_t d, uint64_t t) { progress(d, t); });
  progress.finish();
  const std::string report = engine.layout_report();
  if (!rank0) {
    while (!engine.stopped()) engine.step();
    return 0;
  }
  const int64_t n_ctx = engine.n_ctx();
  if (!rf.quiet)
    std::fprintf(stderr,
                 "layout: %d rank(s), tp %d x pp %d, backend %s, context %lld, prefix caching %s\n%s"
                 "chat: type a message and press Enter; /clear forgets the conversation, /exit or Ctrl-D ends it, "
                 "Ctrl-C stops an answer\n",
                 comm->world_size(), eo.tp, eo.pp, engine.backend_name().c_str(), static_cast<long long>(n_ctx),
                 prefix_caching ? "on" : "off", report.c_str());
  const bool tty = isatty(0) != 0;
  std::vector<ChatMessage> history;  // user and assistant turns, oldest first
  LineReader input;
  std::vector<SeqEvent> events;
  for (;;) {
    if (tty) {
      std::fputs("> ", stdout);
      std::fflush(stdout);
    }
    std::string line;
    const LineReader::Status st = input.next(&line, [&] { engine.step(); });
    if (st != LineReader::Status::kLine) {
      if (tty) std::fputs("\n", stdout);
      break;
    }
    if (line.empty()) continue;
    if (line == "/exit" || line == "/quit") break;
    if (line == "/clear") {
      history.clear();
      if (!rf.quiet) std::fprintf(stderr, "(the conversation is cleared)\n");
      continue;
    }
    if (line[0] == '/' && line.find(' ') == std::string::npos) {
      std::fprintf(stderr, "unknown command '%s': /clear forgets the conversation, /exit ends it\n", line.c_str());
      continue;
    }
    history.push_back({"user", line});
    // The conversation rendered; the oldest turns are dropped while it leaves no room for an answer.
    std::vector<int32_t> ids;
    int64_t dropped = 0;
    for (;;) {
      std::vector<ChatMessage> messages;
      if (!system.empty()) messages.push_back({"system", system});
      messages.insert(messages.end(), history.begin(), history.end());
      const std::string rendered = tmpl.render(messages, /*add_generation_prompt=*/true, piece_of(vocab->bos),
                                               piece_of(vocab->eos));
      ids = tok->encode(rendered, /*add_special=*/false, /*parse_special=*/true);
      const int64_t want = n_predict > 0 ? n_predict : 1;
      if (static_cast<int64_t>(ids.size()) + want - 1 <= n_ctx || history.size() <= 1) break;
      history.erase(history.begin(), history.begin() + (history.size() > 2 && history[1].role == "assistant" ? 2 : 1));
      ++dropped;
    }
    const int64_t room = n_ctx - static_cast<int64_t>(ids.size()) + 1;  // tokens an answer may have
    if (ids.empty() || room < (n_predict > 0 ? n_predict : 1)) {
      std::fprintf(stderr,
                   "error: the message with the template is %zu tokens, which leaves no room for %s in the context "
                   "of %lld (-c); write a shorter one\n",
                   ids.size(), n_predict > 0 ? (std::to_string(n_predict) + " tokens").c_str() : "an answer",
                   static_cast<long long>(n_ctx));
      history.pop_back();
      continue;
    }
    if (dropped > 0 && !rf.quiet)
      std::fprintf(stderr, "(the %lld oldest turn(s) no longer fit the context of %lld and were dropped)\n",
                   static_cast<long long>(dropped), static_cast<long long>(n_ctx));
    SequenceParams params;
    params.sampling = sp;
    params.max_tokens = n_predict > 0 ? n_predict : room;
    params.stop_ids = stop_ids;
    g_interrupted.store(false);
    const auto t0 = std::chrono::steady_clock::now();
    const int64_t id = engine.add_sequence(ids, params);
    serve::TextStream text;
    std::string answer;
    int64_t generated = 0, cached = 0;
    bool done = false, stopped = false;
    while (!done) {
      events.clear();
      engine.step(&events);
      for (const SeqEvent& e : events) {
        if (e.id != id) continue;
        if (e.token >= 0) {
          ++generated;
          cached = e.cached_prompt_tokens;
          const bool end_of_turn = e.finish == FinishReason::kStop &&
                                   std::find(stop_ids.begin(), stop_ids.end(), e.token) != stop_ids.end();
          if (!end_of_turn) {
            const std::string out = text.push(tok->token_to_piece(e.token));
            answer += out;
            std::fputs(out.c_str(), stdout);
            std::fflush(stdout);
          }
        }
        if (e.finish != FinishReason::kNone) done = true;
      }
      if (!done && g_interrupted.load()) {
        engine.abort_sequence(id);
        stopped = true;
        done = true;
      }
    }
    g_interrupted.store(false);
    const std::string tail = text.finish();
    answer += tail;
    std::fputs(tail.c_str(), stdout);
    std::fputs("\n", stdout);
    std::fflush(stdout);
    history.push_back({"assistant", answer});
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (!rf.quiet)
      std::fprintf(stderr, "[%s%zu prompt tokens, %lld from the cache; %lld generated in %.2f s]\n",
                   stopped ? "stopped; " : "", ids.size(), static_cast<long long>(cached),
                   static_cast<long long>(generated), s);
  }
  engine.shutdown();
  return 0;
}

}  // namespace shardlm
