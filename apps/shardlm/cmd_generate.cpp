#include <cstdio>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "cli_common.h"
#include "commands.h"
#include "core/error.h"
#include "loader/hf_source.h"
#include "run_flags.h"
#include "tokenizer/chat_template.h"

namespace shardlm {

int cmd_generate(int argc, const char* const* argv) {
  CLI::App app("Generate a continuation of a prompt. With --tp/--pp the model is split across ranks "
               "(started through mpirun unless already under MPI); only rank 0 prints.",
               "generate");
  app.option_defaults()->always_capture_default();  // --help shows every option's default
  RunFlags rf;
  rf.add_to(app);
  std::string prompt, prompt_ids, prompt_file;
  int64_t n_predict = 64;
  SamplerParams sp;
  sp.temperature = 0.8f;
  bool ignore_eos = false, json = false, greedy = false, chat = false;
  std::string tokenizer_path, system;
  app.add_option("-p,--prompt", prompt, "prompt text");
  app.add_option("-f,--file", prompt_file, "read the prompt text from a file (- = standard input)");
  app.add_option("--prompt-ids", prompt_ids, "prompt as token ids, e.g. 1,2,3 (no BOS is added)");
  app.add_option("-n,--n-predict", n_predict, "tokens to generate (at most)");
  CLI::Option* temp_opt = app.add_option("--temp", sp.temperature, "temperature; 0 = greedy");
  app.add_flag("--greedy", greedy, "same as --temp 0 (not together with another --temp)");
  app.add_option("--top-k", sp.top_k, "keep the k most likely tokens (0 = off)");
  app.add_option("--top-p", sp.top_p, "nucleus sampling threshold (1 = off)");
  app.add_option("--min-p", sp.min_p, "drop tokens below min-p times the best one's probability (0 = off)");
  app.add_option("--repeat-penalty", sp.repeat_penalty, "penalty for recently seen tokens (1 = off)");
  app.add_option("--presence-penalty", sp.presence_penalty,
                 "subtracted once from the logit of every token in the penalty window (0 = off)");
  app.add_option("--frequency-penalty", sp.frequency_penalty,
                 "subtracted from a token's logit per occurrence in the penalty window (0 = off)");
  app.add_option("--repeat-last-n", sp.repeat_last_n, "how many recent tokens the penalties consider");
  int64_t seed = -1;
  app.add_option("--seed", seed, "random seed (same seed, same output); -1 = a random one, printed on stderr and in "
                 "--json so the run can be repeated");
  app.add_flag("--ignore-eos", ignore_eos, "do not stop at the end-of-sequence token");
  app.add_flag("--chat", chat,
               "render the prompt as a user message with the model's chat template (GGUF tokenizer.chat_template "
               "or tokenizer_config.json) and add_generation_prompt, then tokenize with special tokens parsed");
  app.add_option("--system", system, "with --chat: a system message before the user message");
  app.add_option("--tokenizer", tokenizer_path,
                 "use this tokenizer (tokenizer.json, a directory holding one, or a GGUF) and its chat template "
                 "instead of the model's; it may not have more tokens than the model's vocabulary");
  app.add_flag("--json", json, "print {\"prompt_ids\", \"generated_ids\", \"text\", \"seed\"} as JSON");
  if (int rc = parse_cli(app, argc, argv); rc >= 0) return rc;
  if (greedy && temp_opt->count() > 0 && sp.temperature != 0)
    fail("--greedy and --temp ", sp.temperature, " contradict each other: --greedy is --temp 0; give one of them");
  if (greedy) sp.temperature = 0;
  sp.validate();
  if (seed < -1) fail("--seed ", seed, " is outside [-1, ", INT64_MAX, "] (-1 = a random seed)");
  // As llama.cpp: -1 (the default) draws a seed, which is reported so the run can be repeated with --seed.
  sp.seed = seed >= 0 ? static_cast<uint64_t>(seed) : random_seed();
  if (n_predict < 1 || n_predict > (1 << 24)) fail("-n ", n_predict, " is outside [1, 16777216]");
  if (int(!prompt.empty()) + int(!prompt_ids.empty()) + int(!prompt_file.empty()) > 1)
    fail("give only one of -p, -f and --prompt-ids");
  if (chat && !prompt_ids.empty()) fail("--chat renders text: give the prompt with -p or -f, not --prompt-ids");
  if (!system.empty() && !chat) fail("--system needs --chat");
  const std::string path = rf.model_path();
  auto src = open_model(path);  // once: the planner reads it, then the engine loads from it
  EngineOptions eo = rf.resolve(*src);
  if (int rc = maybe_self_launch(eo.tp, eo.pp, argc, argv); rc >= 0) return rc;

  auto comm = make_communicator(rf.comm_timeout);
  const bool rank0 = comm->rank() == 0;
  if (!tokenizer_path.empty()) src = with_tokenizer(std::move(src), load_tokenizer_files(tokenizer_path));
  const Vocab* vocab = src->vocab();
  std::unique_ptr<Tokenizer> tok;
  if (vocab) tok = Tokenizer::create(*vocab);
  if (!prompt_file.empty()) prompt = read_text_file(prompt_file, "-f");
  if (prompt_ids.empty() && prompt.empty())
    fail(prompt_file.empty() ? std::string("the prompt is empty: give -p TEXT, -f FILE or --prompt-ids")
                             : cat("-f '", prompt_file, "': the prompt is empty"));
  std::vector<int32_t> ids;
  std::string rendered;  // --chat: the template's output
  if (!prompt_ids.empty()) {
    ids = parse_id_list(prompt_ids, "--prompt-ids");
  } else if (chat) {
    if (!tok) fail(path, " has no tokenizer: pass --tokenizer");
    const std::string tmpl = src->chat_template();
    if (tmpl.empty())
      fail(tokenizer_path.empty() ? path : tokenizer_path,
           " has no chat template (GGUF tokenizer.chat_template or tokenizer_config.json chat_template); pass "
           "--tokenizer with one, or drop --chat");
    auto piece_of = [&](int32_t id) {
      return id >= 0 && id < tok->n_vocab() ? vocab->tokens[static_cast<size_t>(id)] : std::string();
    };
    std::vector<ChatMessage> messages;
    if (!system.empty()) messages.push_back({"system", system});
    messages.push_back({"user", prompt});
    rendered = ChatTemplate(tmpl).render(messages, /*add_generation_prompt=*/true, piece_of(vocab->bos),
                                         piece_of(vocab->eos));
    // As transformers' apply_chat_template(tokenize=True): the template writes BOS itself when the model
    // wants one, so no special tokens are added, and written ones ("<s>", "<|im_start|>") are parsed.
    ids = tok->encode(rendered, /*add_special=*/false, /*parse_special=*/true);
    if (ids.empty()) fail("the chat template rendered an empty prompt");
  } else {
    if (!tok) fail(path, " has no tokenizer: pass --prompt-ids");
    ids = tok->encode(prompt, true, false);
    if (ids.empty()) fail("the prompt is empty: give -p TEXT, -f FILE or --prompt-ids");
  }
  for (int32_t id : ids)
    if (id >= src->config().n_vocab)
      fail("--prompt-ids: id ", id, " is outside the vocabulary [0, ", src->config().n_vocab, ")");

  Progress progress("loading", rank0 && !rf.quiet && !json);
  Engine engine(*src, *comm, eo, [&](uint64_t d, uint64_t t) { progress(d, t); });
  progress.finish();
  const std::string report = engine.layout_report();
  if (rank0 && !rf.quiet && !json)
    std::fprintf(stderr, "layout: %d rank(s), tp %d x pp %d, backend %s, context %lld\n%s", comm->world_size(),
                 eo.tp, eo.pp, engine.backend_name().c_str(), static_cast<long long>(engine.n_ctx()),
                 report.c_str());
  const int32_t eos = ignore_eos ? -1 : (vocab ? vocab->eos : -1);
  std::string text;
  auto on_token = [&](int32_t t) {
    const std::string piece = tok ? tok->token_to_piece(t) : "";
    text += piece;
    if (rank0 && !json) {
      std::fputs(piece.c_str(), stdout);
      std::fflush(stdout);
    }
  };
  if (const int64_t need = static_cast<int64_t>(ids.size()) + n_predict - 1; need > engine.n_ctx()) {
    // Advice that can be followed: -c cannot go past the model's training context.
    const int64_t train = src->config().n_ctx_train;
    const int64_t room = engine.n_ctx() - static_cast<int64_t>(ids.size()) + 1;  // the largest -n that fits
    std::string advice;
    if (need <= train) advice = cat("raise -c to ", need, room >= 1 ? cat(" or lower -n to ", room) : std::string());
    else if (room >= 1) advice = cat("lower -n to ", room, " or shorten the prompt; -c cannot exceed the model's ", train);
    else advice = cat("shorten the prompt to at most ", train, " tokens; -c cannot exceed the model's ", train);
    fail("the prompt (", ids.size(), " tokens) plus ", n_predict, " generated tokens need ", need,
         " positions, more than the context size ", engine.n_ctx(), " (", advice, ")");
  }
  if (rank0 && !json && !rf.quiet && sp.temperature > 0)
    std::fprintf(stderr, "seed: %llu (repeat this run with --seed %llu)\n", static_cast<unsigned long long>(sp.seed),
                 static_cast<unsigned long long>(sp.seed));
  if (rank0 && !json && !prompt.empty() && !chat) std::fputs(prompt.c_str(), stdout);
  GenerateResult res = engine.generate(ids, n_predict, sp, eos, on_token);
  if (rank0) {
    if (json) {
      nlohmann::json j;
      j["prompt_ids"] = ids;
      j["generated_ids"] = res.generated;
      j["text"] = text;
      j["seed"] = sp.seed;
      if (chat) j["rendered"] = rendered;
      std::printf("%s\n", j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
    } else {
      std::printf("\n");
      std::fflush(stdout);  // the text ends before the statistics on stderr when both go to one terminal
      if (!rf.quiet)
        std::fprintf(stderr, "prompt: %lld tokens in %.3f s (%.1f tok/s); generated %lld tokens, %.1f tok/s; %.1f%% of "
                     "the time in communication (waiting for peers included)\n",
                     static_cast<long long>(res.times.prefill_tokens), res.times.prefill_s,
                     res.times.prefill_tokens / std::max(res.times.prefill_s, 1e-9),
                     static_cast<long long>(res.generated.size()),
                     res.times.decode_tokens / std::max(res.times.decode_s, 1e-9),
                     100.0 * res.times.comm_s / std::max(res.times.prefill_s + res.times.decode_s, 1e-9));
    }
  }
  return 0;
}

}  // namespace shardlm
