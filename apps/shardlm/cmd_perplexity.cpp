// shardlm perplexity: llama-perplexity's method and output on the same files and text (runtime/perplexity.h),
// under every layout and backend that generate runs.
#include <sys/stat.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "cli_common.h"
#include "commands.h"
#include "core/error.h"
#include "run_flags.h"
#include "runtime/perplexity.h"
#include "loader/hf_source.h"
#include "tokenizer/tokenizer.h"

namespace shardlm {

int cmd_perplexity(int argc, const char* const* argv) {
  CLI::App app("Perplexity of a model on a text, as llama.cpp's llama-perplexity computes it: the tokens are cut "
               "into chunks of -c tokens, each evaluated from an empty cache with BOS as its first token, and the "
               "second half of each chunk is scored. Prints the running estimate per chunk, then "
               "'Final estimate: PPL = X +/- Y'. -b / -c chunks are evaluated at once (continuous batching).",
               "perplexity");
  RunFlags rf;
  rf.add_to(app);
  std::string text_file, kl_base, tokenizer_path;
  int64_t n_chunks = -1;
  bool kl = false;
  app.add_option("-f,--file", text_file, "the text (UTF-8), e.g. wiki.test.raw (not with --kl-divergence)");
  app.add_option("--chunks", n_chunks, "evaluate at most this many chunks (-1 = all)")->capture_default_str();
  app.add_option("--kl-divergence-base", kl_base,
                 "without --kl-divergence: also write the log-probabilities of every scored token to this file "
                 "(llama-perplexity's format; an existing file is not overwritten). With it: the base to compare with");
  app.add_flag("--kl-divergence", kl,
               "compare with --kl-divergence-base FILE (made by either tool from the base model): KL divergence, "
               "perplexity ratio and token-probability statistics, on the file's own tokens and context");
  app.add_option("--tokenizer", tokenizer_path,
                 "read the text with this tokenizer (tokenizer.json, a directory holding one, or a GGUF) instead of "
                 "the model's; it may not have more tokens than the model's vocabulary");
  if (int rc = parse_cli(app, argc, argv); rc >= 0) return rc;
  if (kl && kl_base.empty()) fail("--kl-divergence needs --kl-divergence-base FILE (the base model's log-probabilities)");
  if (kl && !text_file.empty()) fail("-f is not used with --kl-divergence: the tokens come from --kl-divergence-base");
  if (!kl && text_file.empty()) fail("--file is required: the text to score (or --kl-divergence with a base file)");

  const std::string path = rf.model_path();
  auto src = open_model(path);
  // --kl-divergence: every rank reads the base file's header (as every rank reads the model).
  std::unique_ptr<LogProbReader> base;
  if (kl) {
    base = std::make_unique<LogProbReader>(kl_base);
    if (base->n_vocab() != src->config().n_vocab)
      fail(kl_base, " holds log-probabilities over ", base->n_vocab(), " tokens; ", path, " has a vocabulary of ",
           src->config().n_vocab);
    if (rf.n_ctx > 0 && rf.n_ctx != base->n_ctx())
      fail("-c ", rf.n_ctx, " differs from the context ", base->n_ctx(), " of ", kl_base, " (leave -c out)");
    rf.n_ctx = base->n_ctx();
  }
  const int64_t train = src->config().n_ctx_train > 0 ? src->config().n_ctx_train : 4096;
  // llama-perplexity's usual context: 512 tokens, or the model's whole (shorter) training context.
  const int64_t n_ctx = rf.n_ctx > 0 ? rf.n_ctx : std::min<int64_t>(512, train);
  if (rf.n_batch < 1) fail("-b ", rf.n_batch, " must be >= 1");
  // As llama-perplexity: -b / -c whole chunks run together (at least one).
  rf.max_num_seqs = std::max<int64_t>(1, rf.n_batch / n_ctx);
  EngineOptions eo = rf.resolve(*src, n_ctx);
  eo.n_ctx = n_ctx;
  eo.max_num_seqs = rf.max_num_seqs;
  if (int rc = maybe_self_launch(eo.tp, eo.pp, argc, argv); rc >= 0) return rc;

  auto comm = make_communicator(rf.comm_timeout);
  const bool rank0 = comm->rank() == 0;
  if (!tokenizer_path.empty()) src = with_tokenizer(std::move(src), load_tokenizer_files(tokenizer_path));
  const Vocab* vocab = src->vocab();
  if (!vocab) fail(path, " has no tokenizer: perplexity needs one to read the text (pass --tokenizer)");
  std::unique_ptr<Tokenizer> tok = Tokenizer::create(*vocab);
  std::vector<int32_t> tokens;
  double tok_ms = 0;
  if (base) {
    tokens = base->tokens();
  } else {
    std::ifstream f(text_file, std::ios::binary);
    if (!f) fail_kind(ErrorKind::kIo, "cannot read the text file '", text_file, "'");
    std::stringstream ss;
    ss << f.rdbuf();
    const auto t0 = std::chrono::steady_clock::now();
    // As llama-perplexity: special tokens added (BOS), none parsed from the text.
    tokens = tok->encode(ss.str(), /*add_special=*/true, /*parse_special=*/false);
    tok_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    // llama-perplexity's rule: at least two chunks of text.
    if (static_cast<int64_t>(tokens.size()) < 2 * n_ctx)
      fail(text_file, " tokenizes to ", tokens.size(), " tokens; perplexity with -c ", n_ctx, " needs at least ",
           2 * n_ctx, " (two chunks): give a longer text or a smaller -c");
  }
  PerplexityOptions po;
  po.n_ctx = n_ctx;
  po.n_chunks = n_chunks;
  po.bos = vocab->add_bos ? vocab->bos : -1;
  const int64_t chunks = perplexity_chunks(static_cast<int64_t>(tokens.size()), po);  // validates before loading
  if (!kl && !kl_base.empty() && rank0) {
    struct stat st {};
    if (stat(kl_base.c_str(), &st) == 0)
      fail("--kl-divergence-base: '", kl_base, "' exists; it is not overwritten (remove it or name another file)");
  }

  Progress progress("loading", rank0 && !rf.quiet);
  Engine engine(*src, *comm, eo, [&](uint64_t d, uint64_t t) { progress(d, t); });
  progress.finish();
  const std::string report = engine.layout_report();
  if (rank0 && !rf.quiet) {
    std::fprintf(stderr, "layout: %d rank(s), tp %d x pp %d, backend %s, context %lld\n%s", comm->world_size(), eo.tp,
                 eo.pp, engine.backend_name().c_str(), static_cast<long long>(engine.n_ctx()), report.c_str());
    std::fprintf(stderr, "perplexity: tokenization took %.3f ms; %zu tokens\n", tok_ms, tokens.size());
    std::fprintf(stderr, "perplexity: calculating perplexity over %lld chunks, n_ctx=%lld, batch_size=%lld, n_seq=%lld\n",
                 static_cast<long long>(chunks), static_cast<long long>(n_ctx), static_cast<long long>(eo.n_batch),
                 static_cast<long long>(eo.max_num_seqs));
  }
  // The base file to write (rank 0), or the statistics against the one read.
  std::unique_ptr<LogProbWriter> writer;
  if (rank0 && !kl && !kl_base.empty())
    writer = std::make_unique<LogProbWriter>(kl_base, static_cast<int32_t>(n_ctx), static_cast<int32_t>(src->config().n_vocab),
                                             static_cast<int32_t>(chunks), tokens);
  KlStats stats;
  std::vector<float> base_row;
  PerplexityRowFn on_row;
  if (writer) {
    on_row = [&](int64_t c, int64_t i, const float* logits) { writer->write_row(c, i, logits); };
  } else if (base && rank0) {
    const int64_t first = n_ctx / 2;
    on_row = [&, first](int64_t c, int64_t i, const float* logits) {
      base->read_row(c, i, &base_row);
      stats.add(logits, base_row, tokens[static_cast<size_t>(c * n_ctx + first + i + 1)]);
    };
  }
  const auto t1 = std::chrono::steady_clock::now();
  const PerplexityResult res = perplexity(engine, tokens, po, [&](int64_t i, const PerplexityTotals& t) {
    if (i == 0 && !rf.quiet) {
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
      std::fprintf(stderr, "perplexity: %.2f seconds for the first chunk(s) - ETA %.2f minutes\n", s,
                   s * static_cast<double>(chunks) / static_cast<double>(eo.max_num_seqs) / 60.0);
    }
    std::printf("[%lld]%.4f,", static_cast<long long>(i + 1), t.ppl());
    std::fflush(stdout);
  }, on_row);
  if (rank0) {
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
    std::printf("\nFinal estimate: PPL = %.4f +/- %.5f\n", res.totals.ppl(), res.totals.ppl_error());
    if (writer) {
      writer->finish();
      if (!rf.quiet) std::fprintf(stderr, "perplexity: log-probabilities written to %s\n", kl_base.c_str());
    }
    if (base) std::printf("\n%s", stats.report().c_str());
    if (!rf.quiet)
      std::fprintf(stderr, "perplexity: %lld tokens scored in %lld chunks; %.2f s (%.1f tokens/s evaluated)\n",
                   static_cast<long long>(res.totals.count), static_cast<long long>(res.n_chunks), s,
                   static_cast<double>(res.n_chunks * n_ctx) / std::max(s, 1e-9));
  }
  return 0;
}

}  // namespace shardlm
