// Perplexity of a model on a text, by llama.cpp's `llama-perplexity` method, so that the two tools' figures
// can be compared on the same file: the tokens are cut into chunks of n_ctx tokens (the tail that does not
// fill a chunk is dropped), each chunk is evaluated from an empty cache with its first token replaced by BOS
// (when the model adds one), and the negative log-likelihood is taken over the second half of each chunk
// only (positions first .. n_ctx-2 predict tokens first+1 .. n_ctx-1, first = n_ctx/2), so every scored
// token has at least n_ctx/2 tokens of context.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "runtime/engine.h"

namespace shardlm {

struct PerplexityOptions {
  int64_t n_ctx = 512;     // tokens per chunk (llama-perplexity's -c)
  int64_t n_chunks = -1;   // chunks to evaluate; -1 = every whole chunk of the text
  int32_t bos = -1;        // replaces each chunk's first token when >= 0 (the vocabulary's add_bos)
};

// Running totals over the scored tokens of the chunks done so far.
struct PerplexityTotals {
  double nll = 0;     // sum of -log p(token)
  double nll2 = 0;    // sum of log p(token)^2
  int64_t count = 0;  // tokens scored
  double ppl() const;
  double ppl_error() const;  // standard error of the estimate (llama.cpp's: ppl * sd(log p) / sqrt(count - 1))
};

struct PerplexityResult {
  int64_t n_tokens = 0;                   // tokens in the text
  int64_t n_chunks = 0;                   // chunks evaluated
  std::vector<double> running_ppl;        // (n_chunks) the estimate after each chunk, in chunk order
  PerplexityTotals totals;
};

// Number of whole chunks the tokens give (at least one, else Error).
int64_t perplexity_chunks(int64_t n_tokens, const PerplexityOptions& o);

// What the caller sees of each scored row on rank 0: the chunk, the index of the row among the chunk's
// scored rows (0 .. n_ctx - first - 2: position first + index predicts token first + index + 1), and the
// row's logits (n_vocab). Rows of different chunks interleave; rows of one chunk come in order.
using PerplexityRowFn = std::function<void(int64_t chunk, int64_t index, const float* logits)>;

// Every rank calls it (it drives Engine::step). Rank 0 queues every chunk as a score_only sequence; the
// engine runs up to its max_num_seqs chunks at once, and `on_chunk(i, totals)` is called on rank 0 after
// chunk i and all chunks before it are done (chunk order, whatever order they finish in). The result is
// complete on rank 0; other ranks get n_tokens and n_chunks only.
PerplexityResult perplexity(Engine& engine, const std::vector<int32_t>& tokens, const PerplexityOptions& o,
                            const std::function<void(int64_t, const PerplexityTotals&)>& on_chunk = nullptr,
                            const PerplexityRowFn& on_row = nullptr);

// ---- llama.cpp's log-probability file (llama-perplexity --kl-divergence-base FILE) ----
// Written by a perplexity run of the base model, read by a run of the model under test, by either tool:
//   "_logits_", int32 n_ctx, int32 n_vocab, int32 n_chunk, int32 tokens[n_chunk * n_ctx] (the text's, before
//   BOS replaced each chunk's first), then per chunk and per scored row (n_ctx - 1 - n_ctx/2 of them) nv =
//   2 * ((n_vocab + 1) / 2) + 4 uint16: float scale, float min_log_prob, then n_vocab quantized values
//   (log p = scale * q + min_log_prob; q = 0 for tokens more than 16 nats below the best one), padding.
class LogProbWriter {
 public:
  // Creates path + ".part" (renamed to `path` by finish(): a run that fails leaves no truncated file under
  // the user's name). Refuses a `path` that exists.
  LogProbWriter(const std::string& path, int32_t n_ctx, int32_t n_vocab, int32_t n_chunk,
                const std::vector<int32_t>& tokens);
  ~LogProbWriter();
  void write_row(int64_t chunk, int64_t index, const float* logits);
  void finish();

 private:
  std::string path_, part_;
  int fd_ = -1;
  int32_t n_ctx_, n_vocab_, n_chunk_;
};

class LogProbReader {
 public:
  explicit LogProbReader(const std::string& path);  // validates the header and the file's size
  ~LogProbReader();
  int32_t n_ctx() const { return n_ctx_; }
  int32_t n_vocab() const { return n_vocab_; }
  int32_t n_chunk() const { return n_chunk_; }
  const std::vector<int32_t>& tokens() const { return tokens_; }  // (n_chunk * n_ctx)
  // The row's log-probabilities (n_vocab), decoded.
  void read_row(int64_t chunk, int64_t index, std::vector<float>* log_probs) const;

 private:
  std::string path_;
  int fd_ = -1;
  int32_t n_ctx_ = 0, n_vocab_ = 0, n_chunk_ = 0;
  std::vector<int32_t> tokens_;
};

// KL divergence of the model under test from the base, over scored rows, with llama-perplexity
// --kl-divergence's statistics.
struct KlStats {
  double sum_nll = 0, sum_nll2 = 0, sum_nll_base = 0, sum_nll_base2 = 0, sum_nll_nll_base = 0;
  double sum_kld = 0, sum_kld2 = 0, sum_p_diff = 0, sum_p_diff2 = 0, sum_p_diff4 = 0;
  int64_t n_same_top = 0, count = 0;
  std::vector<float> kld_values, p_diff_values;  // (count) per row
  // One row: our logits (n_vocab), the base's log-probabilities (n_vocab), the token that follows.
  void add(const float* logits, const std::vector<float>& base_log_probs, int32_t token);
  // The report: "====== Perplexity statistics ======" ... "Same top p: ...", as llama-perplexity prints it.
  std::string report() const;
};

// log p(token) under the softmax of one logits row, in double precision.
double token_log_prob(const float* logits, int64_t n_vocab, int32_t token);

}  // namespace shardlm
