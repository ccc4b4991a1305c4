#include "runtime/perplexity.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>

#include "core/error.h"

namespace shardlm {

double PerplexityTotals::ppl() const { return count > 0 ? std::exp(nll / static_cast<double>(count)) : 0.0; }

double PerplexityTotals::ppl_error() const {
  if (count < 2) return 0.0;
  const double n = static_cast<double>(count);
  const double mean = nll / n;
  const double var = nll2 / n - mean * mean;
  return var > 0 ? std::sqrt(var / (n - 1)) * ppl() : 0.0;
}

int64_t perplexity_chunks(int64_t n_tokens, const PerplexityOptions& o) {
  if (o.n_ctx < 4) fail("-c ", o.n_ctx, " is too small for perplexity: at least 4 tokens per chunk");
  if (o.n_chunks == 0 || o.n_chunks < -1) fail("--chunks ", o.n_chunks, " must be >= 1 (or -1 for all)");
  if (n_tokens < o.n_ctx)
    fail(n_tokens, " tokens do not fill one chunk of -c ", o.n_ctx, ": give a longer text or a smaller -c");
  const int64_t whole = n_tokens / o.n_ctx;
  return o.n_chunks < 0 ? whole : std::min(whole, o.n_chunks);
}

double token_log_prob(const float* logits, int64_t n_vocab, int32_t token) {
  if (token < 0 || token >= n_vocab) fail("token ", token, " is outside the vocabulary [0, ", n_vocab, ")");
  const float mx = *std::max_element(logits, logits + n_vocab);
  double sum = 0;
  for (int64_t i = 0; i < n_vocab; ++i) sum += std::exp(static_cast<double>(logits[i]) - mx);
  return static_cast<double>(logits[token]) - mx - std::log(sum);
}

PerplexityResult perplexity(Engine& engine, const std::vector<int32_t>& tokens, const PerplexityOptions& o,
                            const std::function<void(int64_t, const PerplexityTotals&)>& on_chunk,
                            const PerplexityRowFn& on_row) {
  PerplexityResult res;
  res.n_tokens = static_cast<int64_t>(tokens.size());
  res.n_chunks = perplexity_chunks(res.n_tokens, o);
  if (o.n_ctx > engine.n_ctx())
    fail("perplexity chunks of ", o.n_ctx, " tokens do not fit the engine's context of ", engine.n_ctx());
  const int64_t first = o.n_ctx / 2;
  const int64_t nv = engine.config().n_vocab;
  std::map<int64_t, int64_t> chunk_of;  // sequence id -> chunk
  if (engine.is_sampler()) {
    for (int64_t c = 0; c < res.n_chunks; ++c) {
      std::vector<int32_t> ids(tokens.begin() + c * o.n_ctx, tokens.begin() + (c + 1) * o.n_ctx);
      if (o.bos >= 0) ids[0] = o.bos;
      SequenceParams p;
      p.score_only = true;
      // Positions first .. n_ctx-2 predict the next token; the last position predicts nothing in the chunk.
      p.score_from = static_cast<int32_t>(first);
      chunk_of[engine.add_sequence(std::move(ids), p)] = c;
    }
  }
  // Per chunk: its sums and how many of its rows arrived; chunks are reported in order once complete.
  std::vector<PerplexityTotals> per(static_cast<size_t>(res.n_chunks));
  const int64_t rows_per_chunk = o.n_ctx - first;  // score_from .. n_ctx-1: the last one is not a prediction
  std::vector<int64_t> rows_seen(static_cast<size_t>(res.n_chunks), 0);
  int64_t reported = 0;
  std::vector<Engine::ScoredRow> rows;
  while (engine.step(nullptr, &rows)) {
    for (const Engine::ScoredRow& r : rows) {
      const int64_t c = chunk_of.at(r.id);
      ++rows_seen[static_cast<size_t>(c)];
      if (r.pos >= o.n_ctx - 1) continue;
      if (static_cast<int64_t>(r.logits.size()) != nv)
        fail_kind(ErrorKind::kInternal, "perplexity: a scored row of ", r.logits.size(), " values, vocabulary ", nv);
      if (on_row) on_row(c, r.pos - first, r.logits.data());
      const int32_t target = tokens[static_cast<size_t>(c * o.n_ctx + r.pos + 1)];
      const double lp = token_log_prob(r.logits.data(), nv, target);
      PerplexityTotals& t = per[static_cast<size_t>(c)];
      t.nll -= lp;
      t.nll2 += lp * lp;
      ++t.count;
    }
    rows.clear();
    while (reported < res.n_chunks && rows_seen[static_cast<size_t>(reported)] == rows_per_chunk) {
      const PerplexityTotals& t = per[static_cast<size_t>(reported)];
      res.totals.nll += t.nll;
      res.totals.nll2 += t.nll2;
      res.totals.count += t.count;
      res.running_ppl.push_back(res.totals.ppl());
      if (on_chunk) on_chunk(reported, res.totals);
      ++reported;
    }
  }
  if (engine.is_sampler() && reported != res.n_chunks)
    fail_kind(ErrorKind::kInternal, "perplexity: ", reported, " of ", res.n_chunks, " chunks completed");
  return res;
}

namespace {

constexpr char kMagic[8] = {'_', 'l', 'o', 'g', 'i', 't', 's', '_'};

int64_t rows_per_chunk(int64_t n_ctx) { return n_ctx - 1 - n_ctx / 2; }
int64_t row_values(int64_t n_vocab) { return 2 * ((n_vocab + 1) / 2) + 4; }  // uint16 per row
int64_t header_bytes(int64_t n_ctx, int64_t n_chunk) { return 8 + 3 * 4 + 4 * n_ctx * n_chunk; }
int64_t row_offset(int64_t n_ctx, int64_t n_vocab, int64_t n_chunk, int64_t chunk, int64_t index) {
  return header_bytes(n_ctx, n_chunk) + (chunk * rows_per_chunk(n_ctx) + index) * row_values(n_vocab) * 2;
}

void write_all(int fd, const void* p, size_t n, int64_t at, const std::string& path) {
  const char* c = static_cast<const char*>(p);
  while (n > 0) {
    const ssize_t w = pwrite(fd, c, n, static_cast<off_t>(at));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) fail_kind(ErrorKind::kIo, "cannot write '", path, "': ", std::strerror(errno));
    c += w;
    n -= static_cast<size_t>(w);
    at += w;
  }
}

void read_all(int fd, void* p, size_t n, int64_t at, const std::string& path) {
  char* c = static_cast<char*>(p);
  while (n > 0) {
    const ssize_t r = pread(fd, c, n, static_cast<off_t>(at));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) fail_kind(ErrorKind::kIo, "cannot read '", path, "' at byte ", at, r == 0 ? ": file too short" : "");
    c += r;
    n -= static_cast<size_t>(r);
    at += r;
  }
}

// Mean of a per-row quantity and its standard error (llama-perplexity's: 0 for 10 rows or fewer).
std::pair<double, double> mean_err(double sum, double sum2, int64_t count) {
  if (count < 1) return {0.0, 0.0};
  const double n = static_cast<double>(count), f = sum / n, var = sum2 / n - f * f;
  return {f, var > 0 && count > 10 ? std::sqrt(var / (n - 1)) : 0.0};
}

float percentile(const std::vector<float>& sorted, float fraction) {
  if (fraction <= 0) return sorted.front();
  if (fraction >= 1) return sorted.back();
  float p = fraction * static_cast<float>(sorted.size() - 1);
  const size_t ip = static_cast<size_t>(p);
  p -= static_cast<float>(ip);
  return (1 - p) * sorted[ip] + p * sorted[std::min(ip + 1, sorted.size() - 1)];
}

}  // namespace

LogProbWriter::LogProbWriter(const std::string& path, int32_t n_ctx, int32_t n_vocab, int32_t n_chunk,
                             const std::vector<int32_t>& tokens)
    : path_(path), part_(path + ".part"), n_ctx_(n_ctx), n_vocab_(n_vocab), n_chunk_(n_chunk) {
  struct stat st {};
  if (stat(path.c_str(), &st) == 0)
    fail("--kl-divergence-base: '", path, "' exists; it is not overwritten (remove it or name another file)");
  if (static_cast<int64_t>(tokens.size()) < int64_t{n_ctx} * n_chunk)
    fail_kind(ErrorKind::kInternal, "log-prob file: ", tokens.size(), " tokens for ", n_chunk, " chunks of ", n_ctx);
  fd_ = ::open(part_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0) fail_kind(ErrorKind::kIo, "cannot create '", part_, "': ", std::strerror(errno));
  std::vector<char> head(static_cast<size_t>(header_bytes(n_ctx, n_chunk)));
  std::memcpy(head.data(), kMagic, 8);
  const int32_t dims[3] = {n_ctx, n_vocab, n_chunk};
  std::memcpy(head.data() + 8, dims, sizeof dims);
  std::memcpy(head.data() + 20, tokens.data(), static_cast<size_t>(n_ctx) * static_cast<size_t>(n_chunk) * 4);
  write_all(fd_, head.data(), head.size(), 0, part_);
}

LogProbWriter::~LogProbWriter() {
  if (fd_ >= 0) {
    ::close(fd_);
    ::unlink(part_.c_str());  // not finished: no partial file is left behind
  }
}

void LogProbWriter::write_row(int64_t chunk, int64_t index, const float* logits) {
  const int64_t nv = row_values(n_vocab_);
  std::vector<uint16_t> row(static_cast<size_t>(nv), 0);
  const float mx = *std::max_element(logits, logits + n_vocab_);
  // Values more than 16 nats below the best one are stored as 0: 65,535 steps then cover 16 nats.
  const float mn = std::max(*std::min_element(logits, logits + n_vocab_), mx - 16);
  double sum = 0;
  for (int32_t i = 0; i < n_vocab_; ++i) sum += std::exp(static_cast<double>(logits[i]) - mx);
  const float lse = static_cast<float>(std::log(sum));
  const float head[2] = {(mx - mn) / 65535.f, mn - mx - lse};  // scale, min_log_prob
  std::memcpy(row.data(), head, sizeof head);
  if (head[0] > 0) {
    const float inv = 1 / head[0];
    for (int32_t i = 0; i < n_vocab_; ++i)
      row[static_cast<size_t>(4 + i)] = logits[i] > mn ? static_cast<uint16_t>(std::lrintf(inv * (logits[i] - mn))) : 0;
  }
  write_all(fd_, row.data(), row.size() * 2, row_offset(n_ctx_, n_vocab_, n_chunk_, chunk, index), part_);
}

void LogProbWriter::finish() {
  if (::fsync(fd_) != 0 || ::close(fd_) != 0)
    fail_kind(ErrorKind::kIo, "cannot write '", part_, "': ", std::strerror(errno));
  fd_ = -1;
  if (std::rename(part_.c_str(), path_.c_str()) != 0)
    fail_kind(ErrorKind::kIo, "cannot rename '", part_, "' to '", path_, "': ", std::strerror(errno));
}

LogProbReader::LogProbReader(const std::string& path) : path_(path) {
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) fail_kind(ErrorKind::kIo, "cannot open '", path, "': ", std::strerror(errno));
  struct stat st {};
  if (fstat(fd_, &st) != 0) fail_kind(ErrorKind::kIo, "cannot stat '", path, "'");
  const int64_t size = static_cast<int64_t>(st.st_size);
  char magic[8] = {};
  int32_t dims[3] = {};
  if (size < 20) fail(path, " is ", size, " bytes: not a log-probability file (llama-perplexity --kl-divergence-base)");
  read_all(fd_, magic, 8, 0, path);
  if (std::memcmp(magic, kMagic, 8) != 0)
    fail(path, " does not start with \"_logits_\": not a log-probability file (llama-perplexity --kl-divergence-base)");
  read_all(fd_, dims, sizeof dims, 8, path);
  n_ctx_ = dims[0];
  n_vocab_ = dims[1];
  n_chunk_ = dims[2];
  if (n_ctx_ < 4 || n_ctx_ > (1 << 24)) fail(path, ": n_ctx ", n_ctx_, " is outside [4, 16777216]");
  if (n_vocab_ < 1 || n_vocab_ > (1 << 24)) fail(path, ": n_vocab ", n_vocab_, " is outside [1, 16777216]");
  if (n_chunk_ < 1 || n_chunk_ > (1 << 24)) fail(path, ": n_chunk ", n_chunk_, " is outside [1, 16777216]");
  const int64_t want = row_offset(n_ctx_, n_vocab_, n_chunk_, n_chunk_, 0);
  if (size != want)
    fail(path, " is ", size, " bytes; n_ctx ", n_ctx_, ", n_vocab ", n_vocab_, " and n_chunk ", n_chunk_, " make ", want,
         " (a truncated or foreign file)");
  tokens_.resize(static_cast<size_t>(n_ctx_) * static_cast<size_t>(n_chunk_));
  read_all(fd_, tokens_.data(), tokens_.size() * 4, 20, path);
  for (size_t i = 0; i < tokens_.size(); ++i)
    if (tokens_[i] < 0 || tokens_[i] >= n_vocab_)
      fail(path, ": token ", i, " is ", tokens_[i], ", outside the vocabulary [0, ", n_vocab_, ")");
}

LogProbReader::~LogProbReader() {
  if (fd_ >= 0) ::close(fd_);
}

void LogProbReader::read_row(int64_t chunk, int64_t index, std::vector<float>* log_probs) const {
  if (chunk < 0 || chunk >= n_chunk_ || index < 0 || index >= rows_per_chunk(n_ctx_))
    fail_kind(ErrorKind::kInternal, "log-prob row (", chunk, ", ", index, ") outside the file");
  std::vector<uint16_t> row(static_cast<size_t>(row_values(n_vocab_)));
  read_all(fd_, row.data(), row.size() * 2, row_offset(n_ctx_, n_vocab_, n_chunk_, chunk, index), path_);
  float head[2];
  std::memcpy(head, row.data(), sizeof head);
  log_probs->resize(static_cast<size_t>(n_vocab_));
  for (int32_t i = 0; i < n_vocab_; ++i) (*log_probs)[static_cast<size_t>(i)] = head[0] * row[static_cast<size_t>(4 + i)] + head[1];
}

void KlStats::add(const float* logits, const std::vector<float>& base, int32_t token) {
  const int64_t n = static_cast<int64_t>(base.size());
  const float* best = std::max_element(logits, logits + n);
  const float mx = *best;
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(static_cast<double>(logits[i]) - mx);
  const double lse = mx + std::log(sum);  // log p_i = logits[i] - lse
  const double nll = lse - logits[token], nll_base = -static_cast<double>(base[static_cast<size_t>(token)]);
  sum_nll += nll;
  sum_nll2 += nll * nll;
  sum_nll_base += nll_base;
  sum_nll_base2 += nll_base * nll_base;
  sum_nll_nll_base += nll * nll_base;
  // KL(base || ours) = sum p_base (log p_base - log p); tokens the file stored as "16 nats below the best"
  // (or lower) carry no probability worth counting, as in llama-perplexity.
  double kld = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double lb = base[static_cast<size_t>(i)];
    if (lb > -16.0) kld += std::exp(lb) * (lb - (logits[i] - lse));
  }
  sum_kld += kld;
  sum_kld2 += kld * kld;
  kld_values.push_back(static_cast<float>(kld));
  if (std::max_element(base.begin(), base.end()) - base.begin() == best - logits) ++n_same_top;
  const double p_diff = std::exp(-nll) - std::exp(-nll_base);
  sum_p_diff += p_diff;
  sum_p_diff2 += p_diff * p_diff;
  sum_p_diff4 += p_diff * p_diff * p_diff * p_diff;
  p_diff_values.push_back(static_cast<float>(p_diff));
  ++count;
}

std::string KlStats::report() const {
  if (count < 2) return "too few scored tokens for statistics\n";
  std::string out;
  char line[160];
  auto put = [&](const char* fmt, auto... v) {
    std::snprintf(line, sizeof line, fmt, v...);
    out += line;
  };
  const double n = static_cast<double>(count);
  const auto lp = mean_err(sum_nll, sum_nll2, count), lb = mean_err(sum_nll_base, sum_nll_base2, count);
  const double cov = count < 10 ? 0.0 : (sum_nll_nll_base / n - (sum_nll / n) * (sum_nll_base / n)) / (n - 1);
  const double ppl = std::exp(lp.first), ppl_base = std::exp(lb.first);
  const double ratio = lp.first - lb.first;
  const double ratio_err = std::sqrt(std::max(0.0, lp.second * lp.second + lb.second * lb.second - 2 * cov));
  out += "====== Perplexity statistics ======\n";
  put("Mean PPL(Q)                   : %10.6f ± %10.6f\n", ppl, ppl * lp.second);
  put("Mean PPL(base)                : %10.6f ± %10.6f\n", ppl_base, ppl_base * lb.second);
  put("Cor(ln(PPL(Q)), ln(PPL(base))): %6.2f%%\n", lp.second * lb.second > 0 ? 100.0 * cov / (lp.second * lb.second) : 100.0);
  put("Mean ln(PPL(Q)/PPL(base))     : %10.6f ± %10.6f\n", ratio, ratio_err);
  put("Mean PPL(Q)/PPL(base)         : %10.6f ± %10.6f\n", std::exp(ratio), std::exp(ratio) * ratio_err);
  const double pu = ppl * lp.second, pbu = ppl_base * lb.second;
  put("Mean PPL(Q)-PPL(base)         : %10.6f ± %10.6f\n\n", ppl - ppl_base,
      std::sqrt(std::max(0.0, pu * pu + pbu * pbu - 2 * ppl * ppl_base * cov)));
  std::vector<float> k = kld_values, d = p_diff_values;
  std::sort(k.begin(), k.end());
  std::sort(d.begin(), d.end());
  const auto kl = mean_err(sum_kld, sum_kld2, count);
  out += "====== KL divergence statistics ======\n";
  put("Mean    KLD: %10.6f ± %10.6f\n", kl.first, kl.second);
  put("Maximum KLD: %10.6f\n", static_cast<double>(k.back()));
  for (float f : {0.999f, 0.99f, 0.95f, 0.90f}) put("%4.1f%%   KLD: %10.6f\n", 100.0 * f, static_cast<double>(percentile(k, f)));
  put("Median  KLD: %10.6f\n", static_cast<double>(percentile(k, 0.5f)));
  for (float f : {0.10f, 0.05f, 0.01f, 0.001f}) put("%4.1f%%   KLD: %10.6f\n", 100.0 * f, static_cast<double>(percentile(k, f)));
  put("Minimum KLD: %10.6f\n\n", static_cast<double>(k.front()));
  const auto pd = mean_err(sum_p_diff, sum_p_diff2, count), mse = mean_err(sum_p_diff2, sum_p_diff4, count);
  const double rms = std::sqrt(mse.first);
  out += "====== Token probability statistics ======\n";
  put("Mean    Δp: %6.3f ± %5.3f %%\n", 100.0 * pd.first, 100.0 * pd.second);
  put("Maximum Δp: %6.3f%%\n", 100.0 * d.back());
  for (float f : {0.999f, 0.99f, 0.95f, 0.90f, 0.75f}) put("%4.1f%%   Δp: %6.3f%%\n", 100.0 * f, 100.0 * percentile(d, f));
  put("Median  Δp: %6.3f%%\n", 100.0 * percentile(d, 0.5f));
  for (float f : {0.25f, 0.10f, 0.05f, 0.01f, 0.001f}) put("%4.1f%%   Δp: %6.3f%%\n", 100.0 * f, 100.0 * percentile(d, f));
  put("Minimum Δp: %6.3f%%\n", 100.0 * d.front());
  put("RMS Δp    : %6.3f ± %5.3f %%\n", 100.0 * rms, rms > 0 ? 100.0 * 0.5 / rms * mse.second : 0.0);
  const double top = static_cast<double>(n_same_top) / n;
  put("Same top p: %6.3f ± %5.3f %%\n", 100.0 * top, 100.0 * std::sqrt(top * (1 - top) / (n - 1)));
  return out;
}

}  // namespace shardlm
