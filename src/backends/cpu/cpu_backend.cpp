#include "backends/cpu/cpu_backend.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#include <sys/mman.h>

#include "backends/cpu/cpu_threads.h"
#include "backends/cpu/thread_pool.h"
#include "core/error.h"
#include "quant/quant.h"

namespace shardlm {
namespace {

// Tokens of one sequence whose attention shares one pass over its K and V rows (CpuBackend::attention): each row is
// converted to f32 once per tile instead of once per token. With a group of 4 query heads, 64 query rows a
// matmul_rows call; the scores and weights of a chunk, (64, kAttendChunk) floats, stay within L2.
constexpr int32_t kAttendTile = 16;
// Positions per online-softmax step of the CPU attention: one matmul_rows and one attend_chunk call serve this many.
// One step per 16-position cache block paid the calls' fixed costs 16 times as often (docs/BENCHMARKS.md,
// "Decisions in the source").
constexpr int64_t kAttendChunk = 256;

// 64-byte aligned so SIMD kernels never straddle cache lines on activation rows. Large buffers (packed weights,
// KV caches) are aligned to and advised into 2 MiB pages where the kernel offers them (transparent huge pages in
// "madvise" mode): 512x fewer page faults when a multi-GiB model is packed, and fewer TLB misses as decode
// streams it. `zero` = false leaves the bytes as the allocator gives them, for a buffer its owner fills at once.
class AlignedBuffer final : public DeviceBuffer {
 public:
  AlignedBuffer(size_t n, bool zero) : size_(n) {
    constexpr size_t kHuge = size_t{2} << 20;
    const size_t align = n >= 2 * kHuge ? kHuge : 64;
    const size_t bytes = (n + align - 1) / align * align;
    ptr_ = n ? std::aligned_alloc(align, bytes) : nullptr;
    if (n && !ptr_) fail_kind(ErrorKind::kResource, "out of host memory allocating ", n, " bytes");
    if (ptr_ && align == kHuge) madvise(ptr_, bytes, MADV_HUGEPAGE);  // advice only: ignored where unsupported
    if (ptr_ && zero) std::memset(ptr_, 0, n);
  }
  ~AlignedBuffer() override { std::free(ptr_); }
  void* data() override { return ptr_; }
  size_t size() const override { return size_; }

 private:
  void* ptr_ = nullptr;
  size_t size_;
};

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(int n_threads) : pool_(n_threads > 0 ? n_threads : cpu_core_count()) {}

  std::string name() const override { return cat("cpu(", pool_.size(), " threads, ", cpu_kernel_isa(), ")"); }
  DeviceKind device() const override { return DeviceKind::kCpu; }
  bool supports(GgmlType t) const override { return type_traits(t).compute; }

  std::unique_ptr<DeviceBuffer> alloc(size_t bytes) override { return buffer(bytes, /*zero=*/true); }
  // Types whose kernels read packed rows faster (quant.h's packs_rows) are packed here, once; the rest keep
  // ggml's layout, mapped from the file where the loader can (packs_matmul_weight).
  bool packs_matmul_weight(const WeightView& w) const override { return packs_rows(cpu_isa(), w.type); }
  WeightView place_matmul_weight(const WeightView& host, std::vector<std::unique_ptr<DeviceBuffer>>& storage) override {
    if (host.packed || !packs_matmul_weight(host)) return Backend::place_matmul_weight(host, storage);
    const size_t rb = static_cast<size_t>(row_bytes(host.type, host.n_cols));
    // Not zeroed: every byte is written by pack_rows, on the threads (first touch spread over them).
    auto buf = buffer(rb * static_cast<size_t>(host.n_rows), /*zero=*/false);
    auto* dst = static_cast<uint8_t*>(buf->data());
    const int64_t n_groups = (host.n_rows + kPackRows - 1) / kPackRows;
    pool_.parallel_for(n_groups, 64, [&](int64_t b, int64_t e) {
      const int64_t r0 = b * kPackRows, r1 = std::min(host.n_rows, e * kPackRows);
      pack_rows(host.type, static_cast<const uint8_t*>(host.data) + host.row_stride * r0, host.row_stride,
                r1 - r0, host.n_cols, dst + rb * r0);
    });
    WeightView v = host;
    v.data = dst;
    v.row_stride = rb;
    v.packed = true;
    storage.push_back(std::move(buf));
    return v;
  }
  void upload(void* dst, const void* src, size_t n) override { std::memcpy(dst, src, n); }
  void download(void* dst, const void* src, size_t n) override { std::memcpy(dst, src, n); }
  void synchronize() override {}
  size_t allocated_bytes() const override { return allocated_; }
  void begin_step(const BatchInfo& b) override {
    batch_ = b;
    pos_ = b.token_positions();
  }
  // The logits are host memory already: ranked in place (the default would copy the rows first).
  void top_candidates(const float* logits, int64_t n, const std::vector<CandidateQuery>& rows,
                      std::vector<CandidateAnswer>& out) override {
    top_candidates_of_host_rows(logits, n, rows, out);
  }

  void log_sum_exp_parts(const float* logits, int64_t n, double* max_out, double* sum_out) override {
    log_sum_exp_parts_host(logits, n, max_out, sum_out);  // host memory already
  }

  void get_rows(const WeightView& table, const int32_t* ids, int64_t n_tok, float* out) override {
    for (int64_t t = 0; t < n_tok; ++t) {
      SHARDLM_CHECK(ids[t] >= 0 && ids[t] < table.n_rows, "token id ", ids[t]);
      dequantize_row(table.type, static_cast<const uint8_t*>(table.data) + table.row_stride * ids[t],
                     out + t * table.n_cols, table.n_cols);
    }
  }

  void gather_rows(const float* x, const int32_t* rows, int64_t n_rows, int64_t width, float* out) override {
    for (int64_t i = 0; i < n_rows; ++i)
      std::memcpy(out + i * width, x + int64_t{rows[i]} * width, static_cast<size_t>(width) * sizeof(float));
  }

  void rms_norm(const float* x, const float* w, float* y, int64_t n_tok, int64_t n, float eps) override {
    pool_.parallel_for(n_tok, 8, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const float* xr = x + t * n;
        float* yr = y + t * n;
        double ss = 0;  // double: the golden logits are compared at 1e-4 and n can be 8192
        for (int64_t i = 0; i < n; ++i) ss += double(xr[i]) * xr[i];
        const float scale = float(1.0 / std::sqrt(ss / double(n) + eps));
        for (int64_t i = 0; i < n; ++i) yr[i] = xr[i] * scale * w[i];
      }
    });
  }

  void matmul(const WeightView& w, const float* x, float* y, int64_t n_tok) override {
    // Rows are split across threads in whole packed groups; every thread reads its rows once for all tokens.
    const int64_t n_groups = (w.n_rows + kPackRows - 1) / kPackRows;
    const int64_t grain = std::max<int64_t>(2, n_groups / (pool_.size() * 4));
    pool_.parallel_for(n_groups, grain, [&](int64_t b, int64_t e) {
      const int64_t r0 = b * kPackRows, r1 = std::min(w.n_rows, e * kPackRows);
      rows_matmul(w, r0, r1, x, n_tok, y + r0);
    });
  }

  void matmul_experts(const WeightView* const* sets, int n_sets, int n_experts, const int64_t* bounds,
                      const float* x, float* const* ys) override {
    // One job for every (set, expert, row chunk) with tokens: the threads start once for all of them.
    struct Item {
      int set, expert;
      int64_t r0, r1;  // weight rows
    };
    std::vector<Item> items;
    int64_t total_rows = 0;
    for (int s = 0; s < n_sets; ++s)
      for (int e = 0; e < n_experts; ++e)
        if (bounds[e + 1] > bounds[e]) total_rows += sets[s][e].n_rows;
    if (total_rows == 0) return;
    // A multiple of kPackRows: a chunk of a packed matrix starts at a group.
    const int64_t grain = std::max<int64_t>(16, total_rows / (pool_.size() * 4) / kPackRows * kPackRows);
    for (int s = 0; s < n_sets; ++s)
      for (int e = 0; e < n_experts; ++e) {
        if (bounds[e + 1] <= bounds[e]) continue;
        for (int64_t r = 0; r < sets[s][e].n_rows; r += grain)
          items.push_back({s, e, r, std::min(sets[s][e].n_rows, r + grain)});
      }
    pool_.parallel_for(static_cast<int64_t>(items.size()), 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const Item& it = items[static_cast<size_t>(i)];
        const WeightView& w = sets[it.set][it.expert];
        const int64_t t0 = bounds[it.expert], n_tok = bounds[it.expert + 1] - t0;
        rows_matmul(w, it.r0, it.r1, x + t0 * w.n_cols, n_tok, ys[it.set] + t0 * w.n_rows + it.r0);
      }
    });
  }

  void add_bias(float* y, const float* b, int64_t n_tok, int64_t n) override {
    for (int64_t t = 0; t < n_tok; ++t)
      for (int64_t i = 0; i < n; ++i) y[t * n + i] += b[i];
  }
  void add(float* y, const float* x, int64_t n) override {
    for (int64_t i = 0; i < n; ++i) y[i] += x[i];
  }
  void swiglu(const float* g, const float* u, float* out, int64_t n) override {
    pool_.parallel_for(n, 4096, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) out[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
    });
  }

  void rope(float* x, int64_t n_tok, int64_t n_heads, int64_t hd, float freq_base,
            const float* freq_factors) override {
    // Angles in double: at positions of 100k+ a float angle loses the low bits that the golden
    // logits still see.
    std::vector<double> theta(static_cast<size_t>(hd / 2));
    for (int64_t i = 0; i < hd / 2; ++i) {
      theta[i] = std::pow(double(freq_base), -2.0 * double(i) / double(hd));
      if (freq_factors) theta[i] /= freq_factors[i];
    }
    for (int64_t t = 0; t < n_tok; ++t) {
      const double pos = double(pos_[static_cast<size_t>(t)]);
      for (int64_t i = 0; i < hd / 2; ++i) {
        const double a = pos * theta[i];
        const float c = float(std::cos(a)), s = float(std::sin(a));
        for (int64_t h = 0; h < n_heads; ++h) {
          float* v = x + (t * n_heads + h) * hd;
          const float x0 = v[2 * i], x1 = v[2 * i + 1];
          v[2 * i] = x0 * c - x1 * s;
          v[2 * i + 1] = x0 * s + x1 * c;
        }
      }
    }
  }

  void kv_store(const KvLayerView& kv, const float* k, const float* v, int64_t n_tok) override {
    const int64_t width = kv.row_width();
    SHARDLM_CHECK(n_tok == batch_.n_tok, "kv_store of ", n_tok, " tokens in a step of ", batch_.n_tok);
    for (int64_t s = 0; s < batch_.n_seq(); ++s) {
      const BatchSeq& q = batch_.seqs[static_cast<size_t>(s)];
      for (int64_t t = q.tok0; t < q.tok0 + q.n_tok; ++t) {
        const int64_t row = batch_.cache_row(kv, s, q.pos0 + (t - q.tok0));
        if (kv.type == GgmlType::F32) {
          std::memcpy(static_cast<float*>(kv.k) + row, k + t * width, static_cast<size_t>(width) * sizeof(float));
          std::memcpy(static_cast<float*>(kv.v) + row, v + t * width, static_cast<size_t>(width) * sizeof(float));
        } else {
          // Converted (f16, bf16) or quantized (q8_0, q4_0: 32-value blocks, each head whole) as it is stored.
          quantize_row(kv.type, k + t * width, kv.at(kv.k, row), width);
          quantize_row(kv.type, v + t * width, kv.at(kv.v, row), width);
        }
      }
    }
  }

  void attention(const float* q, const KvLayerView& kv, int64_t n_tok, int64_t n_head, float* out) override {
    const int64_t hd = kv.head_dim, group = n_head / kv.n_head_kv, bs = kv.block_size;
    const float scale = 1.0f / std::sqrt(float(hd));
    SHARDLM_CHECK(n_tok == batch_.n_tok, "attention of ", n_tok, " tokens in a step of ", batch_.n_tok);
    // One job per (sequence, tile of up to kAttendTile of its tokens, KV head): the tile's tokens and the group of
    // query heads of that KV head are the job's query rows, so each K and V row of the sequence is converted to f32
    // once per tile rather than once per token. The positions are taken kAttendChunk at a time (flash attention's
    // online softmax: attend_chunk), their rows gathered from the cache blocks into f32 (one dequantize_rows call a
    // block) and scored by one F32 matmul_rows call with the query rows as its tokens. F32, not the cache type's
    // kernels: those round q to int8 for q8_0 / q4_0, and the scores keep the stored values' precision. Chunks
    // start at multiples of kAttendChunk whatever the tile, and every query row is computed on its own, so a token's
    // output does not depend on the rest of the batch.
    struct Job {
      int32_t s, t0, t1, kvh;  // sequence, its tokens [t0, t1) in the step, KV head
      int64_t cost;            // query rows x positions read: the dearest jobs start first
    };
    std::vector<Job> jobs;
    for (int64_t s = 0; s < batch_.n_seq(); ++s) {
      const BatchSeq& sq = batch_.seqs[static_cast<size_t>(s)];
      for (int32_t t0 = sq.tok0; t0 < sq.tok0 + sq.n_tok; t0 += kAttendTile) {
        const int32_t t1 = std::min(t0 + kAttendTile, sq.tok0 + sq.n_tok);
        for (int32_t kvh = 0; kvh < kv.n_head_kv; ++kvh)
          jobs.push_back({static_cast<int32_t>(s), t0, t1, kvh, int64_t{t1 - t0} * (pos_[t1 - 1] + 1)});
      }
    }
    std::stable_sort(jobs.begin(), jobs.end(), [](const Job& a, const Job& b) { return a.cost > b.cost; });
    const int64_t chunk = std::max<int64_t>(bs, kAttendChunk / bs * bs);  // positions a step, whole blocks
    const size_t row_bytes = static_cast<size_t>(kv.row_bytes());
    const CpuIsa isa = cpu_isa();
    std::atomic<size_t> next{0};
    // Each thread takes the next job as it finishes one (job costs differ by the tiles' positions); no more threads
    // than jobs are woken.
    const int64_t n_parts = std::min<int64_t>(pool_.size(), static_cast<int64_t>(jobs.size()));
    pool_.parallel_for(n_parts, 1, [&](int64_t, int64_t) {
      const int64_t max_q = kAttendTile * group;
      // The thread's buffers, kept from call to call (pool threads live as long as the backend) and never zeroed:
      // every element is written before it is read.
      thread_local std::vector<float> scratch;
      thread_local std::vector<int32_t> n_valid;  // (n_q) each row's positions in the chunk
      const size_t need = static_cast<size_t>(max_q * (2 * hd + chunk + 2) + 2 * chunk * hd);
      if (scratch.size() < need) scratch.resize(need);
      if (n_valid.size() < static_cast<size_t>(max_q)) n_valid.resize(static_cast<size_t>(max_q));
      float* const qt = scratch.data();            // (n_q, hd) the job's query rows
      float* const acc = qt + max_q * hd;          // (n_q, hd) weighted V sums
      float* const sc = acc + max_q * hd;          // (n_q, chunk) scores, then weights
      float* const m = sc + max_q * chunk;         // (n_q) running maxima
      float* const l = m + max_q;                  // (n_q) running weight sums
      float* const kf = l + max_q;                 // (chunk, hd) K rows as f32
      float* const vf = kf + chunk * hd;           // (chunk, hd) V rows as f32
      for (size_t ji; (ji = next.fetch_add(1, std::memory_order_relaxed)) < jobs.size();) {
        const Job& job = jobs[ji];
        const int64_t n_q = int64_t{job.t1 - job.t0} * group;
        for (int64_t t = job.t0; t < job.t1; ++t)
          std::memcpy(qt + (t - job.t0) * group * hd, q + (t * n_head + job.kvh * group) * hd,
                      static_cast<size_t>(group * hd) * sizeof(float));
        std::fill_n(m, n_q, -INFINITY);
        std::fill_n(l, n_q, 0.0f);
        std::fill_n(acc, n_q * hd, 0.0f);
        const int64_t n_max = pos_[static_cast<size_t>(job.t1 - 1)] + 1;  // the tile's last token sees the most
        for (int64_t j0 = 0; j0 < n_max; j0 += chunk) {
          const int64_t c = std::min(chunk, n_max - j0);
          // This head's slice of the chunk's rows, block by block (consecutive rows within a block).
          for (int64_t b0 = j0; b0 < j0 + c; b0 += bs) {
            const int64_t elem = batch_.cache_row(kv, job.s, b0) + job.kvh * hd, rows = std::min(bs, j0 + c - b0);
            dequantize_rows(kv.type, kv.at(kv.k, elem), row_bytes, rows, hd, kf + (b0 - j0) * hd, hd);
            dequantize_rows(kv.type, kv.at(kv.v, elem), row_bytes, rows, hd, vf + (b0 - j0) * hd, hd);
          }
          for (int64_t r = 0; r < n_q; ++r)
            n_valid[static_cast<size_t>(r)] = static_cast<int32_t>(
                std::clamp<int64_t>(pos_[static_cast<size_t>(job.t0 + r / group)] + 1 - j0, 0, c));
          matmul_rows(isa, GgmlType::F32, kf, static_cast<size_t>(hd) * sizeof(float), c, hd, qt, hd, n_q, sc, chunk);
          attend_chunk(isa, sc, chunk, n_valid.data(), n_q, vf, hd, hd, scale, m, l, acc);
        }
        for (int64_t r = 0; r < n_q; ++r) {
          const int64_t t = job.t0 + r / group, h = job.kvh * group + r % group;
          const float inv = 1.0f / l[r];
          for (int64_t i = 0; i < hd; ++i) out[(t * n_head + h) * hd + i] = acc[r * hd + i] * inv;
        }
      }
    });
  }

 private:
  // A counted host buffer (allocated_bytes), zeroed or left for its owner to fill.
  std::unique_ptr<DeviceBuffer> buffer(size_t bytes, bool zero) {
    allocated_ += bytes;
    return std::make_unique<AlignedBuffer>(bytes, zero);
  }
  // Rows [r0, r1) of w times n_tok tokens of x into y (n_tok rows n_rows apart, from row r0); on one thread.
  // A packed w's r0 is a multiple of kPackRows.
  static void rows_matmul(const WeightView& w, int64_t r0, int64_t r1, const float* x /* (n_tok, n_cols) */,
                          int64_t n_tok, float* y /* (n_tok, w.n_rows) from row r0 */) {
    const auto* rows = static_cast<const uint8_t*>(w.data) + w.row_stride * r0;
    if (w.packed)
      matmul_packed_rows(w.type, rows, r1 - r0, w.n_cols, x, w.n_cols, n_tok, y, w.n_rows);
    else
      matmul_rows(w.type, rows, w.row_stride, r1 - r0, w.n_cols, x, w.n_cols, n_tok, y, w.n_rows);
  }

  ThreadPool pool_;
  BatchInfo batch_;
  std::vector<int32_t> pos_;  // (n_tok) each token's position
  size_t allocated_ = 0;
};

}  // namespace

int cpu_core_count() { return std::max(1, CpuMask::of_this_process().count()); }

std::unique_ptr<Backend> make_cpu_backend(int n_threads) { return std::make_unique<CpuBackend>(n_threads); }

}  // namespace shardlm
