// The yardstick: every op written the obvious way, single-threaded, accumulating in double, weights
// dequantized row by row with the quant library. Never optimize this file; other backends are tested
// against it.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/error.h"
#include "ops/backend.h"
#include "quant/quant.h"

namespace shardlm {
namespace {

class HostBuffer final : public DeviceBuffer {
 public:
  explicit HostBuffer(size_t n) : bytes_(n) {}
  void* data() override { return bytes_.data(); }
  size_t size() const override { return bytes_.size(); }

 private:
  std::vector<uint8_t> bytes_;
};

// One head's K or V row (head_dim values at element `elem`) as the cache holds it, in f32: the reference
// computes exactly on the stored (converted or quantized) values.
std::vector<float> load_kv(const KvLayerView& kv, const void* base, int64_t elem) {
  std::vector<float> row(static_cast<size_t>(kv.head_dim));
  dequantize_row(kv.type, kv.at(base, elem), row.data(), kv.head_dim);
  return row;
}

class ReferenceBackend final : public Backend {
 public:
  std::string name() const override { return "reference"; }
  DeviceKind device() const override { return DeviceKind::kCpu; }
  bool supports(GgmlType t) const override { return type_traits(t).compute; }

  std::unique_ptr<DeviceBuffer> alloc(size_t bytes) override {
    allocated_ += bytes;
    return std::make_unique<HostBuffer>(bytes);
  }
  void upload(void* dst, const void* src, size_t n) override { std::memcpy(dst, src, n); }
  void download(void* dst, const void* src, size_t n) override { std::memcpy(dst, src, n); }
  void synchronize() override {}
  size_t allocated_bytes() const override { return allocated_; }
  void begin_step(const BatchInfo& b) override {
    batch_ = b;
    pos_ = b.token_positions();
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
    for (int64_t t = 0; t < n_tok; ++t) {
      double ss = 0;
      for (int64_t i = 0; i < n; ++i) ss += double(x[t * n + i]) * x[t * n + i];
      const double scale = 1.0 / std::sqrt(ss / double(n) + eps);
      for (int64_t i = 0; i < n; ++i) y[t * n + i] = float(x[t * n + i] * scale * w[i]);
    }
  }

  void matmul(const WeightView& w, const float* x, float* y, int64_t n_tok) override {
    std::vector<float> row(static_cast<size_t>(w.n_cols));
    for (int64_t r = 0; r < w.n_rows; ++r) {
      dequantize_row(w.type, static_cast<const uint8_t*>(w.data) + w.row_stride * r, row.data(), w.n_cols);
      for (int64_t t = 0; t < n_tok; ++t) {
        double acc = 0;
        for (int64_t c = 0; c < w.n_cols; ++c) acc += double(row[c]) * x[t * w.n_cols + c];
        y[t * w.n_rows + r] = float(acc);
      }
    }
  }

  void add_bias(float* y, const float* b, int64_t n_tok, int64_t n) override {
    for (int64_t t = 0; t < n_tok; ++t)
      for (int64_t i = 0; i < n; ++i) y[t * n + i] += b[i];
  }
  void add(float* y, const float* x, int64_t n) override {
    for (int64_t i = 0; i < n; ++i) y[i] += x[i];
  }
  void swiglu(const float* g, const float* u, float* out, int64_t n) override {
    for (int64_t i = 0; i < n; ++i) out[i] = float(double(g[i]) / (1.0 + std::exp(-double(g[i]))) * u[i]);
  }

  void rope(float* x, int64_t n_tok, int64_t n_heads, int64_t hd, float freq_base,
            const float* freq_factors) override {
    for (int64_t t = 0; t < n_tok; ++t) {
      const double pos = double(pos_[static_cast<size_t>(t)]);
      for (int64_t h = 0; h < n_heads; ++h) {
        float* v = x + (t * n_heads + h) * hd;
        for (int64_t i = 0; i < hd / 2; ++i) {
          double theta = std::pow(double(freq_base), -2.0 * double(i) / double(hd));
          if (freq_factors) theta /= freq_factors[i];
          const double a = pos * theta, c = std::cos(a), s = std::sin(a);
          const double x0 = v[2 * i], x1 = v[2 * i + 1];
          v[2 * i] = float(x0 * c - x1 * s);
          v[2 * i + 1] = float(x0 * s + x1 * c);
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
        quantize_row(kv.type, k + t * width, kv.at(kv.k, row), width);
        quantize_row(kv.type, v + t * width, kv.at(kv.v, row), width);
      }
    }
  }

  void attention(const float* q, const KvLayerView& kv, int64_t n_tok, int64_t n_head, float* out) override {
    const int64_t hd = kv.head_dim, group = n_head / kv.n_head_kv;
    const double scale = 1.0 / std::sqrt(double(hd));
    SHARDLM_CHECK(n_tok == batch_.n_tok, "attention of ", n_tok, " tokens in a step of ", batch_.n_tok);
    for (int64_t s = 0; s < batch_.n_seq(); ++s) {
      const BatchSeq& sq = batch_.seqs[static_cast<size_t>(s)];
      for (int64_t t = sq.tok0; t < sq.tok0 + sq.n_tok; ++t) {
        const int64_t n_pos = sq.pos0 + (t - sq.tok0) + 1;
        std::vector<double> p(static_cast<size_t>(n_pos));
        for (int64_t h = 0; h < n_head; ++h) {
          const float* qh = q + (t * n_head + h) * hd;
          const int64_t kvh = h / group;
          double mx = -INFINITY;
          for (int64_t j = 0; j < n_pos; ++j) {
            const std::vector<float> kr = load_kv(kv, kv.k, batch_.cache_row(kv, s, j) + kvh * hd);
            double d = 0;
            for (int64_t i = 0; i < hd; ++i) d += double(qh[i]) * kr[static_cast<size_t>(i)];
            p[j] = d * scale;
            mx = std::max(mx, p[j]);
          }
          double sum = 0;
          for (auto& e : p) sum += (e = std::exp(e - mx));
          float* o = out + (t * n_head + h) * hd;
          std::vector<double> acc(static_cast<size_t>(hd), 0.0);
          for (int64_t j = 0; j < n_pos; ++j) {
            const std::vector<float> vr = load_kv(kv, kv.v, batch_.cache_row(kv, s, j) + kvh * hd);
            for (int64_t i = 0; i < hd; ++i) acc[static_cast<size_t>(i)] += p[j] * vr[static_cast<size_t>(i)];
          }
          for (int64_t i = 0; i < hd; ++i) o[i] = float(acc[static_cast<size_t>(i)] / sum);
        }
      }
    }
  }

 private:
  BatchInfo batch_;
  std::vector<int32_t> pos_;  // (n_tok) each token's position
  size_t allocated_ = 0;
};

}  // namespace

std::unique_ptr<Backend> make_reference_backend() { return std::make_unique<ReferenceBackend>(); }

}  // namespace shardlm
