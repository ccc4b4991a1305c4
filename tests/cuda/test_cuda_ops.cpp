// Cross-backend op suite for the CUDA backend: every op x weight type x representative shapes against
// plain fp64 loops written here from ggml's block layouts (independent of both the CUDA kernels and the
// quant library). Outputs are surrounded by sentinel words and checked for NaN/Inf; inputs are random
// with fixed seeds, never zeros. Every test skips when no GPU is visible.
//
// Tolerances are `atol + rtol * scale` where `scale` is the fp64 sum of |terms| of the quantity (e.g.
// sum_c |w_rc x_c| for a dot product): float32 summation in another order errs by a few eps per term at
// most, so rtol ~ 1e-5 bounds it with margin for n up to 14336 (eps * sqrt(n) ~ 7e-6 typical).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "backends/cuda/cuda_backend.h"
#include "backends/cuda/pack.h"
#include "core/dtype.h"
#include "core/error.h"
#include "support/candidate_checks.h"

namespace shardlm {
namespace {

// ---- host helpers --------------------------------------------------------------------------------------
uint16_t to_f16(float f) {  // round to nearest even; no NaN inputs here
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  if (x >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow -> inf
  if (x < 0x38800000u) {                                                 // subnormal half
    float a;
    std::memcpy(&a, &x, 4);
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(a * 16777216.0f)));
  }
  const uint32_t mant_odd = (x >> 13) & 1u;
  x += 0xfffu + mant_odd;
  return static_cast<uint16_t>(sign | ((x - 0x38000000u) >> 13));
}
double f16(uint16_t h) {
  const int e = (h >> 10) & 0x1f, m = h & 0x3ff;
  const double s = (h & 0x8000) ? -1.0 : 1.0;
  if (e == 0) return s * std::ldexp(m, -24);
  if (e == 31) return m ? std::numeric_limits<double>::quiet_NaN() : s * INFINITY;
  return s * std::ldexp(1024 + m, e - 25);
}
uint16_t to_bf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  x += 0x7fffu + ((x >> 16) & 1u);
  return static_cast<uint16_t>(x >> 16);
}
double bf16(uint16_t h) {
  const uint32_t x = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

std::vector<float> rand_floats(std::mt19937_64& rng, size_t n, float lo = -1.0f, float hi = 1.0f) {
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// A random row of `type` (n elements): random quants, finite positive scales of realistic size.
std::vector<uint8_t> rand_row(std::mt19937_64& rng, GgmlType type, int64_t n) {
  std::vector<uint8_t> b(static_cast<size_t>(row_bytes(type, n)));
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f), sc(0.002f, 0.03f);
  for (auto& x : b) x = static_cast<uint8_t>(byte(rng));
  auto put16 = [&](size_t off, uint16_t v) { std::memcpy(b.data() + off, &v, 2); };
  const int64_t bs = block_size(type), ts = type_size(type);
  for (int64_t blk = 0; blk < n / bs; ++blk) {
    const size_t o = static_cast<size_t>(blk * ts);
    switch (type) {
      case GgmlType::F32:
        for (int64_t i = 0; i < n; ++i) {
          const float f = u(rng);
          std::memcpy(b.data() + 4 * i, &f, 4);
        }
        return b;
      case GgmlType::F16:
        for (int64_t i = 0; i < n; ++i) put16(2 * i, to_f16(u(rng)));
        return b;
      case GgmlType::BF16:
        for (int64_t i = 0; i < n; ++i) put16(2 * i, to_bf16(u(rng)));
        return b;
      case GgmlType::Q8_0:
      case GgmlType::Q4_0: put16(o, to_f16(sc(rng))); break;
      case GgmlType::Q4_K:
        put16(o, to_f16(sc(rng) * 0.1f));
        put16(o + 2, to_f16(sc(rng) * 0.1f));
        break;
      case GgmlType::Q6_K: put16(o + 208, to_f16(sc(rng) * 0.1f)); break;
      default: ADD_FAILURE() << "no generator for " << type_name(type);
    }
  }
  return b;
}

// fp64 dequantization, written from ggml-common.h / ggml-quants.c.
std::vector<double> deq_row(GgmlType type, const uint8_t* p, int64_t n) {
  std::vector<double> y(static_cast<size_t>(n));
  auto rd16 = [](const uint8_t* q) { return static_cast<uint16_t>(q[0] | (q[1] << 8)); };
  switch (type) {
    case GgmlType::F32:
      for (int64_t i = 0; i < n; ++i) {
        float f;
        std::memcpy(&f, p + 4 * i, 4);
        y[i] = f;
      }
      break;
    case GgmlType::F16:
      for (int64_t i = 0; i < n; ++i) y[i] = f16(rd16(p + 2 * i));
      break;
    case GgmlType::BF16:
      for (int64_t i = 0; i < n; ++i) y[i] = bf16(rd16(p + 2 * i));
      break;
    case GgmlType::Q8_0:
      for (int64_t b = 0; b < n / 32; ++b) {
        const uint8_t* q = p + 34 * b;
        for (int j = 0; j < 32; ++j) y[32 * b + j] = f16(rd16(q)) * static_cast<int8_t>(q[2 + j]);
      }
      break;
    case GgmlType::Q4_0:
      for (int64_t b = 0; b < n / 32; ++b) {
        const uint8_t* q = p + 18 * b;
        const double d = f16(rd16(q));
        for (int j = 0; j < 16; ++j) {
          y[32 * b + j] = d * ((q[2 + j] & 0xF) - 8);
          y[32 * b + j + 16] = d * ((q[2 + j] >> 4) - 8);
        }
      }
      break;
    case GgmlType::Q4_K:
      for (int64_t b = 0; b < n / 256; ++b) {
        const uint8_t* q = p + 144 * b;
        const double d = f16(rd16(q)), dmin = f16(rd16(q + 2));
        const uint8_t* s = q + 4;
        const uint8_t* qs = q + 16;
        for (int j = 0; j < 8; ++j) {
          int sc, m;
          if (j < 4) {
            sc = s[j] & 63;
            m = s[j + 4] & 63;
          } else {
            sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
            m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
          }
          for (int l = 0; l < 32; ++l) {
            const int v = (j & 1) ? (qs[32 * (j / 2) + l] >> 4) : (qs[32 * (j / 2) + l] & 0xF);
            y[256 * b + 32 * j + l] = d * sc * v - dmin * m;
          }
        }
      }
      break;
    case GgmlType::Q6_K:
      for (int64_t b = 0; b < n / 256; ++b) {
        const uint8_t* q = p + 210 * b;
        const double d = f16(rd16(q + 208));
        for (int h = 0; h < 2; ++h) {
          const uint8_t* ql = q + 64 * h;
          const uint8_t* qh = q + 128 + 32 * h;
          const int8_t* sc = reinterpret_cast<const int8_t*>(q + 192 + 8 * h);
          double* o = y.data() + 256 * b + 128 * h;
          for (int l = 0; l < 32; ++l) {
            const int is = l / 16;
            o[l] = d * sc[is] * (((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32);
            o[l + 32] = d * sc[is + 2] * (((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32);
            o[l + 64] = d * sc[is + 4] * (((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
            o[l + 96] = d * sc[is + 6] * (((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
          }
        }
      }
      break;
    default: ADD_FAILURE() << "no dequantizer for " << type_name(type);
  }
  return y;
}

// A batch of one sequence in pool block 0: the single-sequence steps of the tests below, on KV views of one
// block of n_ctx positions (the CUDA backend's block per sequence, kv_block_size(n_ctx) = n_ctx).
BatchInfo one_seq(int64_t pos0, int64_t n_tok) { return BatchInfo::single(pos0, n_tok, {0}, false); }

// ---- device buffers with sentinels ------------------------------------------------------------------------
constexpr uint32_t kSentinel = 0x7fbadbadu;  // a NaN payload no kernel produces
constexpr size_t kGuardWords = 64;

// `n` floats (or `bytes` bytes) in the middle of a device buffer whose guards hold kSentinel.
class Guarded {
 public:
  Guarded(Backend& b, size_t bytes) : b_(b), bytes_(bytes) {
    buf_ = b.alloc(bytes + 2 * kGuardWords * 4);
    std::vector<uint32_t> init((bytes + 3) / 4 + 2 * kGuardWords, kSentinel);
    b.upload(buf_->data(), init.data(), bytes + 2 * kGuardWords * 4);
  }
  void* ptr() { return static_cast<uint8_t*>(buf_->data()) + kGuardWords * 4; }
  float* f() { return static_cast<float*>(ptr()); }
  void put(const void* host) { b_.upload(ptr(), host, bytes_); }
  template <typename T>
  std::vector<T> get() {
    std::vector<uint8_t> all(bytes_ + 2 * kGuardWords * 4);
    b_.download(all.data(), buf_->data(), all.size());
    for (size_t i = 0; i < kGuardWords * 4; ++i) {
      const uint8_t want = reinterpret_cast<const uint8_t*>(&kSentinel)[i % 4];
      EXPECT_EQ(all[i], want) << "guard before the output overwritten at byte " << i;
      EXPECT_EQ(all[kGuardWords * 4 + bytes_ + i], want) << "guard after the output overwritten at byte " << i;
      if (all[i] != want || all[kGuardWords * 4 + bytes_ + i] != want) break;
    }
    std::vector<T> out(bytes_ / sizeof(T));
    std::memcpy(out.data(), all.data() + kGuardWords * 4, bytes_);
    return out;
  }

 private:
  Backend& b_;
  size_t bytes_;
  std::unique_ptr<DeviceBuffer> buf_;
};

// a and b hold the same bytes (their guards checked on the way).
void expect_same_bytes(Guarded& a, Guarded& b, const std::string& what) {
  const auto va = a.get<uint8_t>(), vb = b.get<uint8_t>();
  ASSERT_EQ(va.size(), vb.size()) << what;
  EXPECT_EQ(std::memcmp(va.data(), vb.data(), va.size()), 0) << what << " differs";
}

// Element-wise |got - ref| <= atol + rtol * scale[i] (scale defaults to |ref|), all finite; reports the worst.
void expect_close(const std::vector<float>& got, const std::vector<double>& ref, double atol, double rtol,
                  const std::string& what, const std::vector<double>* scale = nullptr) {
  ASSERT_EQ(got.size(), ref.size()) << what;
  double worst = -1;
  size_t wi = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_TRUE(std::isfinite(got[i])) << what << ": non-finite output " << got[i] << " at " << i;
    const double tol = atol + rtol * (scale ? (*scale)[i] : std::fabs(ref[i]));
    const double share = std::fabs(got[i] - ref[i]) / tol;
    if (share > worst) {
      worst = share;
      wi = i;
    }
  }
  const double tol = atol + rtol * (scale ? (*scale)[wi] : std::fabs(ref[wi]));
  EXPECT_LE(worst, 1.0) << what << ": worst element " << wi << " got " << got[wi] << " ref " << ref[wi]
                        << " tol " << tol << " (" << worst * 100 << "% of it)";
}

class CudaOps : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device visible";
    be_ = make_cuda_backend(0, GgmlType::F16);
  }
  std::unique_ptr<Backend> be_;
  std::mt19937_64 rng_{20251126};
};

const GgmlType kTypes[] = {GgmlType::F32, GgmlType::F16, GgmlType::BF16, GgmlType::Q8_0,
                           GgmlType::Q4_0, GgmlType::Q4_K, GgmlType::Q6_K};

struct HostWeight {
  std::vector<uint8_t> bytes;  // n_rows * stride (+ lead offset)
  std::vector<std::vector<double>> deq;
  size_t stride;
};

HostWeight make_host_weight(std::mt19937_64& rng, GgmlType t, int64_t rows, int64_t cols, size_t extra_stride) {
  HostWeight w;
  w.stride = static_cast<size_t>(row_bytes(t, cols)) + extra_stride;
  w.bytes.assign(w.stride * rows, 0xEE);
  for (int64_t r = 0; r < rows; ++r) {
    auto row = rand_row(rng, t, cols);
    std::memcpy(w.bytes.data() + r * w.stride, row.data(), row.size());
    w.deq.push_back(deq_row(t, row.data(), cols));
  }
  return w;
}

// ---- matmul -----------------------------------------------------------------------------------------------
// The packed kernels' view of x, written from their documented scheme: per 32 elements d = max|x| / 127
// (float division), q = round-half-even(x * (127 / max|x|)) with float products; returns d * q in fp64.
// `bound[u]` = d / 2 for each 32-element unit: |x - d q| can be at most that.
std::vector<double> int8_view_of_x(const float* x, int64_t n, std::vector<double>* half_step = nullptr) {
  std::vector<double> out(static_cast<size_t>(n));
  if (half_step) half_step->assign(static_cast<size_t>(n / 32), 0.0);
  for (int64_t u = 0; u < n / 32; ++u) {
    float a = 0.0f;
    for (int j = 0; j < 32; ++j) a = std::max(a, std::fabs(x[32 * u + j]));
    const float d = a / 127.0f, id = a > 0.0f ? 127.0f / a : 0.0f;
    for (int j = 0; j < 32; ++j) {
      const float prod = x[32 * u + j] * id;
      out[32 * u + j] = static_cast<double>(d) * std::nearbyint(prod);
    }
    if (half_step) (*half_step)[u] = d / 2.0;
  }
  return out;
}

// Checks a packed decode product y (n_rows) of `deq` (rows, cols) and x: tightly against the fp64 product
// with x as the kernel quantizes it (f32 summation: 1e-5 of sum |w dq|), and against the float x within
// the quantization bound sum_u d_u/2 * sum_{j in u} |w_j| (+ that same summation term).
void expect_packed_matvec(const std::vector<float>& y, const std::vector<std::vector<double>>& deq, const float* x,
                          int64_t cols, const std::string& what) {
  std::vector<double> half;
  const auto xq = int8_view_of_x(x, cols, &half);
  const size_t rows = deq.size();
  std::vector<double> ref_q(rows), scale_q(rows), ref_f(rows), bound(rows);
  for (size_t r = 0; r < rows; ++r) {
    double sq = 0, aq = 0, sf = 0, b = 0;
    for (int64_t k = 0; k < cols; ++k) {
      sq += deq[r][k] * xq[k];
      aq += std::fabs(deq[r][k] * xq[k]);
      sf += deq[r][k] * x[k];
      b += std::fabs(deq[r][k]) * half[k / 32];
    }
    ref_q[r] = sq;
    scale_q[r] = aq;
    ref_f[r] = sf;
    bound[r] = b + 1e-5 * aq;
  }
  expect_close(y, ref_q, 1e-6, 1e-5, what + " (vs int8 x)", &scale_q);
  expect_close(y, ref_f, 1e-6, 1.0, what + " (vs float x, quantization bound)", &bound);
}

struct MatCase {
  int64_t rows, cols, n_tok;
  size_t extra_stride;  // bytes of padding between rows (2: rows only 2-byte aligned)
  size_t lead;          // bytes between the buffer start and row 0
  size_t x_offset;      // floats by which x is offset (1: x not 16-byte aligned -> generic kernel)
};

// pack: place the weight with place_matmul_weight (the loader's path: packed layout where the type has
// one) instead of uploading ggml rows.
void run_matmul(Backend& be, std::mt19937_64& rng, GgmlType t, const MatCase& c, bool pack = false) {
  pack = pack && cuda_detail::packable(t, c.cols);
  const std::string what = std::string(pack ? "packed " : "") + "matmul " + type_name(t) + " " + std::to_string(c.rows) + "x" +
                           std::to_string(c.cols) + " n_tok " + std::to_string(c.n_tok) + " pad " +
                           std::to_string(c.extra_stride) + " lead " + std::to_string(c.lead) + " xoff " +
                           std::to_string(c.x_offset);
  SCOPED_TRACE(what);
  const HostWeight hw = make_host_weight(rng, t, c.rows, c.cols, c.extra_stride);
  Guarded wbuf(be, hw.bytes.size() + c.lead);
  std::vector<uint8_t> wb(c.lead, 0xCD);
  wb.insert(wb.end(), hw.bytes.begin(), hw.bytes.end());
  wbuf.put(wb.data());
  WeightView w{t, c.cols, c.rows, hw.stride, static_cast<uint8_t*>(wbuf.ptr()) + c.lead};
  std::vector<std::unique_ptr<DeviceBuffer>> storage;
  if (pack) {
    w = be.place_matmul_weight(WeightView{t, c.cols, c.rows, hw.stride, hw.bytes.data()}, storage);
    EXPECT_TRUE(w.packed);
  }
  const auto x = rand_floats(rng, c.n_tok * c.cols + c.x_offset);
  Guarded xbuf(be, x.size() * 4), ybuf(be, c.n_tok * c.rows * 4);
  xbuf.put(x.data());
  be.matmul(w, xbuf.f() + c.x_offset, ybuf.f(), c.n_tok);
  const auto y = ybuf.get<float>();
  std::vector<double> ref(c.n_tok * c.rows), scale(c.n_tok * c.rows);
  for (int64_t tk = 0; tk < c.n_tok; ++tk)
    for (int64_t r = 0; r < c.rows; ++r) {
      double s = 0, a = 0;
      for (int64_t k = 0; k < c.cols; ++k) {
        const double p = hw.deq[r][k] * x[c.x_offset + tk * c.cols + k];
        s += p;
        a += std::fabs(p);
      }
      ref[tk * c.rows + r] = s;
      scale[tk * c.rows + r] = a;
    }
  // Decode kernels and f32 GEMMs accumulate in f32: 1e-5 of sum|w x|. The cuBLAS path of F16/BF16/quant
  // weights rounds x (and dequantized weights) to 16 bits first: 2^-10 (fp16, both operands) or 2^-8
  // (bf16, x only) of sum|w x| bounds that rounding.
  // Packed weights take the several-token kernel (int8 x, as one token) up to the type's limit, other
  // quantized layouts the per-token matvec up to 8; cuBLAS beyond.
  const int64_t matvec_max = pack ? cuda_tokens_max_default(t) : 8;
  const bool gemm = c.n_tok > 1 && (block_size(t) == 1 ? t != GgmlType::F32 : c.n_tok > matvec_max);  // cuBLAS or the tensor-core kernel: the same 16-bit operands
  if (pack && !gemm) {
    for (int64_t tk = 0; tk < c.n_tok; ++tk) {
      const std::vector<float> yt(y.begin() + tk * c.rows, y.begin() + (tk + 1) * c.rows);
      expect_packed_matvec(yt, hw.deq, x.data() + c.x_offset + tk * c.cols, c.cols, what + " token " + std::to_string(tk));
    }
    return;
  }
  const double rtol = !gemm ? 1e-5 : (t == GgmlType::BF16 ? 1.0 / 256 : 1.0 / 1024);
  expect_close(y, ref, 1e-6, rtol, what, &scale);
}

TEST_F(CudaOps, MatvecEveryTypeAndShape) {
  const MatCase cases[] = {
      {1, 256, 1, 0, 0, 0},     {7, 256, 1, 0, 0, 0},     {33, 512, 1, 0, 0, 0},   {257, 4096, 1, 0, 0, 0},
      {4097, 4096, 1, 0, 0, 0}, {129, 14336, 1, 0, 0, 0}, {5, 768, 1, 0, 0, 0},
      // enough rows for the 32-rows-per-warp variant of the block-format kernel, odd item counts
      {8451, 768, 1, 0, 0, 0},  {4300, 1280, 1, 0, 0, 0},
  };
  for (GgmlType t : kTypes)
    for (const auto& c : cases) run_matmul(*be_, rng_, t, c);
}

TEST_F(CudaOps, MatvecUnalignedRowsAndInputs) {
  for (GgmlType t : kTypes) {
    // rows 2-byte aligned only (quantized types stage them through shared memory; plain types fall back)
    run_matmul(*be_, rng_, t, {67, 512, 1, 2, 0, 0});
    run_matmul(*be_, rng_, t, {19, 1024, 1, 0, 2, 0});
    // x not 16-byte aligned: the element-by-element kernel
    run_matmul(*be_, rng_, t, {23, 512, 1, 0, 0, 1});
  }
}

// Packed weights (pack.h): the decode kernel with int8 x, per-token decode for n_tok <= 8, the packed
// dequantization before cuBLAS for prefill; odd row counts, widths that are not a multiple of 1024, x
// not 16-byte aligned.
TEST_F(CudaOps, PackedMatvecAndPrefill) {
  const MatCase cases[] = {
      {1, 256, 1, 0, 0, 0},      {7, 256, 1, 0, 0, 0},      {33, 512, 1, 0, 0, 0},    {257, 4096, 1, 0, 0, 0},
      {4097, 4096, 1, 0, 0, 0},  {129, 14336, 1, 0, 0, 0},  {5, 768, 1, 0, 0, 0},     {8451, 768, 1, 0, 0, 0},
      {23, 512, 1, 0, 0, 1},     {31, 1280, 3, 0, 0, 0},    {129, 512, 7, 0, 0, 0},   {257, 1024, 64, 0, 0, 0},
      {65, 28672, 1, 0, 0, 0},   {17, 96, 1, 0, 0, 0},
      // the tensor-core kernel (above the several-token kernel's limit): rows and tokens not multiples of its
      // 128-row x 64-token tiles, columns over several slices; 300 tokens go to cuBLAS
      {129, 4096, 100, 0, 0, 0}, {70, 1024, 300, 0, 0, 0},
  };
  for (GgmlType t : {GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_K, GgmlType::Q6_K})
    for (const auto& c : cases)
      if (cuda_detail::packable(t, c.cols)) run_matmul(*be_, rng_, t, c, true);
  // Steps above the several-token kernel's limit by each many-token path, whatever the default: the
  // tensor-core kernel up to 256 tokens, dequantize-then-cuBLAS.
  for (int64_t mma_max : {int64_t{256}, int64_t{0}}) {
    CudaTuning tuning;
    tuning.mma_max = mma_max;
    auto be = make_cuda_backend(0, GgmlType::F16, tuning);
    for (GgmlType t : {GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_K, GgmlType::Q6_K})
      for (const MatCase& c : {MatCase{129, 4096, 100, 0, 0, 0}, MatCase{257, 1024, 64, 0, 0, 0}})
        run_matmul(*be, rng_, t, c, true);
  }
}

// The 16-bit operands of many-token steps, seen through one-hot rows of x: token t's x is 1 at column j_t and 0
// elsewhere, so y[t, r] is the weight W[r, j_t] as the kernel holds it (one product with 1, fp32 sums of zeros).
// Both the tensor-core kernel (100 tokens) and dequantize-then-cuBLAS (300 tokens) must hold the fp64 reference
// value rounded to fp16: exactly for Q8_0 and Q4_0 (their products d * q are exact in fp32, so one rounding to
// fp16 is the only one), within one fp16 step for the K types (the kernels form d * sc * q - dmin * m in fp32,
// a second rounding before fp16's).
TEST_F(CudaOps, ManyTokenStepsSeeEachWeightAsItsFp16) {
  const int64_t rows = 130, cols = 1024;
  CudaTuning tuning;
  tuning.mma_max = 256;  // 100 tokens by the tensor-core kernel, whatever the default
  auto be_mma = make_cuda_backend(0, GgmlType::F16, tuning);
  Backend& b = *be_mma;
  for (GgmlType t : {GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_K, GgmlType::Q6_K}) {
    const HostWeight hw = make_host_weight(rng_, t, rows, cols, 0);
    std::vector<std::unique_ptr<DeviceBuffer>> storage;
    const WeightView w = b.place_matmul_weight(WeightView{t, cols, rows, hw.stride, hw.bytes.data()}, storage);
    ASSERT_TRUE(w.packed);
    for (int64_t n_tok : {int64_t{100}, int64_t{300}}) {
      std::vector<float> x(static_cast<size_t>(n_tok * cols), 0.0f);
      auto col = [&](int64_t tk) { return (tk * 37 + 5) % cols; };
      for (int64_t tk = 0; tk < n_tok; ++tk) x[static_cast<size_t>(tk * cols + col(tk))] = 1.0f;
      Guarded xb(b, x.size() * 4), yb(b, n_tok * rows * 4);
      xb.put(x.data());
      b.matmul(w, xb.f(), yb.f(), n_tok);
      const auto y = yb.get<float>();
      int bad = 0;
      for (int64_t tk = 0; tk < n_tok; ++tk)
        for (int64_t r = 0; r < rows; ++r) {
          const double ref = hw.deq[static_cast<size_t>(r)][static_cast<size_t>(col(tk))];
          const double want = f16(to_f16(static_cast<float>(ref)));
          const double got = y[static_cast<size_t>(tk * rows + r)];
          // one fp16 step at |ref| (2^-24 below the normal range) for the K types; none for Q8_0 and Q4_0
          const double step = std::ldexp(1.0, std::max(std::ilogb(std::max(std::fabs(ref), 1e-30)), -14) - 10);
          const double tol = (t == GgmlType::Q8_0 || t == GgmlType::Q4_0) ? 0.0 : step;
          if (std::fabs(got - want) > tol && ++bad <= 5)
            ADD_FAILURE() << type_name(t) << " " << n_tok << " tokens: W[" << r << ", " << col(tk) << "] = " << ref
                          << ", fp16 " << want << ", kernel " << got;
        }
      EXPECT_EQ(bad, 0) << type_name(t) << " " << n_tok << " tokens";
    }
  }
}

// Batch invariance of the packed matmul: a step of n_tok tokens (the several-token kernel, in passes of 8, 4
// or 2 tokens by the row width) gives each token the bytes of its own one-token matvec, for a single weight and
// a group sharing x. Widths: 96 (3 units, an odd count: padded x rows), 4096, 14336 (8 tokens a pass) and
// 28672 (4 a pass).
TEST_F(CudaOps, SeveralTokensGiveEachTokenItsOneTokenBits) {
  struct Shape {
    int64_t rows, cols;
  };
  const Shape shapes[] = {{37, 96}, {300, 4096}, {65, 14336}, {9, 28672}};
  cuda_set_tokens_max(*be_, 64);  // 17 and 64 tokens too (the default sends them to cuBLAS)
  for (GgmlType t : {GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_K, GgmlType::Q6_K}) {
    for (const Shape& sh : shapes) {
      if (!cuda_detail::packable(t, sh.cols)) continue;
      const HostWeight a = make_host_weight(rng_, t, sh.rows, sh.cols, 0), b = make_host_weight(rng_, t, 24, sh.cols, 0);
      std::vector<std::unique_ptr<DeviceBuffer>> storage;
      const WeightView wa = be_->place_matmul_weight(WeightView{t, sh.cols, sh.rows, a.stride, a.bytes.data()}, storage);
      const WeightView wb = be_->place_matmul_weight(WeightView{t, sh.cols, 24, b.stride, b.bytes.data()}, storage);
      ASSERT_TRUE(wa.packed && wb.packed);
      for (int64_t n_tok : {int64_t{2}, int64_t{3}, int64_t{8}, int64_t{9}, int64_t{17}, int64_t{64}}) {
        const std::string what = std::string(type_name(t)) + " " + std::to_string(sh.rows) + "x" +
                                 std::to_string(sh.cols) + " n_tok " + std::to_string(n_tok);
        SCOPED_TRACE(what);
        const auto x = rand_floats(rng_, n_tok * sh.cols, -3.0f, 3.0f);
        Guarded xb(*be_, x.size() * 4), ya(*be_, n_tok * sh.rows * 4), yb(*be_, n_tok * 24 * 4),
            ga(*be_, n_tok * sh.rows * 4), gb(*be_, n_tok * 24 * 4), one(*be_, n_tok * sh.rows * 4),
            oneb(*be_, n_tok * 24 * 4);
        xb.put(x.data());
        be_->matmul(wa, xb.f(), ya.f(), n_tok);
        const WeightView ws[2] = {wa, wb};
        float* ys[2] = {ga.f(), gb.f()};
        be_->matmul_group(ws, 2, xb.f(), ys, n_tok);
        for (int64_t k = 0; k < n_tok; ++k) {
          be_->matmul(wa, xb.f() + k * sh.cols, one.f() + k * sh.rows, 1);
          be_->matmul(wb, xb.f() + k * sh.cols, oneb.f() + k * 24, 1);
        }
        expect_same_bytes(ya, one, "matmul of n_tok tokens against one-token matmuls");
        expect_same_bytes(ga, one, "matmul_group's first weight against one-token matmuls");
        expect_same_bytes(gb, oneb, "matmul_group's second weight against one-token matmuls");
      }
    }
  }
}

TEST_F(CudaOps, MatmulPrefill) {
  for (GgmlType t : kTypes) {
    run_matmul(*be_, rng_, t, {129, 512, 7, 0, 0, 0});
    run_matmul(*be_, rng_, t, {257, 1024, 64, 0, 0, 0});
  }
}

// matmul_group: q/k/v- and gate/up-like groups (same x) against the fp64 loop, decode (one launch for the
// group) and prefill (x converted once); a group of mixed types falls back to one matmul per weight.
void run_matmul_group(Backend& be, std::mt19937_64& rng, const std::vector<GgmlType>& types,
                      const std::vector<int64_t>& rows, int64_t cols, int64_t n_tok, bool pack = false) {
  std::string what = pack ? "packed matmul_group" : "matmul_group";
  for (size_t i = 0; i < types.size(); ++i) what += std::string(" ") + type_name(types[i]) + ":" + std::to_string(rows[i]);
  what += " cols " + std::to_string(cols) + " n_tok " + std::to_string(n_tok);
  SCOPED_TRACE(what);
  const int n = static_cast<int>(types.size());
  std::vector<HostWeight> hw;
  std::vector<std::unique_ptr<Guarded>> wb, yb;
  std::vector<WeightView> ws;
  std::vector<float*> ys;
  std::vector<std::unique_ptr<DeviceBuffer>> storage;
  std::vector<bool> packed(static_cast<size_t>(n), false);
  for (int i = 0; i < n; ++i) {
    hw.push_back(make_host_weight(rng, types[i], rows[i], cols, 0));
    wb.push_back(std::make_unique<Guarded>(be, hw[i].bytes.size()));
    wb[i]->put(hw[i].bytes.data());
    ws.push_back(WeightView{types[i], cols, rows[i], hw[i].stride, wb[i]->ptr()});
    if (pack && cuda_detail::packable(types[i], cols)) {
      ws[i] = be.place_matmul_weight(WeightView{types[i], cols, rows[i], hw[i].stride, hw[i].bytes.data()}, storage);
      packed[i] = ws[i].packed;
    }
    yb.push_back(std::make_unique<Guarded>(be, n_tok * rows[i] * 4));
    ys.push_back(yb[i]->f());
  }
  const auto x = rand_floats(rng, n_tok * cols);
  Guarded xb(be, x.size() * 4);
  xb.put(x.data());
  be.matmul_group(ws.data(), n, xb.f(), ys.data(), n_tok);
  for (int i = 0; i < n; ++i) {
    const auto y = yb[i]->get<float>();
    std::vector<double> ref(n_tok * rows[i]), scale(n_tok * rows[i]);
    for (int64_t tk = 0; tk < n_tok; ++tk)
      for (int64_t r = 0; r < rows[i]; ++r) {
        double s = 0, a = 0;
        for (int64_t k = 0; k < cols; ++k) {
          const double p = hw[i].deq[r][k] * x[tk * cols + k];
          s += p;
          a += std::fabs(p);
        }
        ref[tk * rows[i] + r] = s;
        scale[tk * rows[i] + r] = a;
      }
    const GgmlType t = types[i];
    const bool gemm = n_tok > 1 && (block_size(t) == 1 ? t != GgmlType::F32 : n_tok > (packed[i] ? cuda_tokens_max_default(t) : 8));
    if (packed[i] && !gemm) {
      for (int64_t tk = 0; tk < n_tok; ++tk) {
        const std::vector<float> yt(y.begin() + tk * rows[i], y.begin() + (tk + 1) * rows[i]);
        expect_packed_matvec(yt, hw[i].deq, x.data() + tk * cols, cols, what + " weight " + std::to_string(i));
      }
      continue;
    }
    const double rtol = !gemm ? 1e-5 : (t == GgmlType::BF16 ? 1.0 / 256 : 1.0 / 1024);
    expect_close(y, ref, 1e-6, rtol, what + " weight " + std::to_string(i), &scale);
  }
}

TEST_F(CudaOps, MatmulGroup) {
  for (GgmlType t : kTypes) {
    run_matmul_group(*be_, rng_, {t, t, t}, {512, 128, 128}, 512, 1);   // q/k/v
    run_matmul_group(*be_, rng_, {t, t}, {1029, 1029}, 1024, 1);        // gate/up, rows not a multiple of 8
    run_matmul_group(*be_, rng_, {t, t, t, t}, {7, 33, 1, 300}, 256, 1);
    run_matmul_group(*be_, rng_, {t, t, t}, {256, 64, 64}, 512, 64);    // prefill
    run_matmul_group(*be_, rng_, {t, t}, {100, 60}, 512, 5);
  }
  // mixed types (Q4_K_M: v in Q6_K) and more than 4 weights: one matmul per weight
  run_matmul_group(*be_, rng_, {GgmlType::Q4_K, GgmlType::Q4_K, GgmlType::Q6_K}, {512, 128, 128}, 512, 1);
  run_matmul_group(*be_, rng_, {GgmlType::BF16, GgmlType::BF16, GgmlType::BF16, GgmlType::BF16, GgmlType::BF16},
                   {16, 8, 8, 24, 40}, 256, 1);
}

TEST_F(CudaOps, PackedMatmulGroup) {
  for (GgmlType t : {GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_K, GgmlType::Q6_K}) {
    run_matmul_group(*be_, rng_, {t, t, t}, {512, 128, 128}, 512, 1, true);
    run_matmul_group(*be_, rng_, {t, t}, {1029, 1029}, 1024, 1, true);
    run_matmul_group(*be_, rng_, {t, t, t, t}, {7, 33, 1, 300}, 256, 1, true);
    run_matmul_group(*be_, rng_, {t, t, t}, {256, 64, 64}, 512, 64, true);
    run_matmul_group(*be_, rng_, {t, t}, {100, 60}, 512, 5, true);
  }
  run_matmul_group(*be_, rng_, {GgmlType::Q4_K, GgmlType::Q4_K, GgmlType::Q6_K}, {512, 128, 128}, 512, 1, true);
}

TEST_F(CudaOps, GetRowsEveryType) {
  for (GgmlType t : kTypes) {
    SCOPED_TRACE(type_name(t));
    const int64_t rows = 37, cols = 512;
    const HostWeight hw = make_host_weight(rng_, t, rows, cols, 0);
    Guarded tb(*be_, hw.bytes.size());
    tb.put(hw.bytes.data());
    const std::vector<int32_t> ids = {5, 0, 36, 5, 17, 2, 33};
    Guarded out(*be_, ids.size() * cols * 4);
    be_->get_rows(WeightView{t, cols, rows, hw.stride, tb.ptr()}, ids.data(), static_cast<int64_t>(ids.size()),
                  out.f());
    std::vector<double> ref;
    for (int32_t id : ids) ref.insert(ref.end(), hw.deq[id].begin(), hw.deq[id].end());
    // d * q products are exact in f32 for every format: only the final rounding to f32 differs
    expect_close(out.get<float>(), ref, 0.0, 1e-7, "get_rows");
  }
  const std::vector<uint8_t> dummy(1024 * 4);
  Guarded tb(*be_, dummy.size());
  const int32_t bad = 1024;
  EXPECT_THROW(be_->get_rows(WeightView{GgmlType::F32, 1, 1024, 4, tb.ptr()}, &bad, 1, tb.f()), Error);
}

// ---- element-wise ------------------------------------------------------------------------------------------
TEST_F(CudaOps, RmsNormAddBiasSwiglu) {
  for (int64_t n_tok : {1, 7}) {
    const int64_t n = 4096;
    const auto x = rand_floats(rng_, n_tok * n), w = rand_floats(rng_, n, 0.5f, 1.5f);
    Guarded xb(*be_, x.size() * 4), wb(*be_, n * 4), yb(*be_, x.size() * 4);
    xb.put(x.data());
    wb.put(w.data());
    be_->rms_norm(xb.f(), wb.f(), yb.f(), n_tok, n, 1e-5f);
    std::vector<double> ref(x.size());
    for (int64_t t = 0; t < n_tok; ++t) {
      double ss = 0;
      for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(x[t * n + i]) * x[t * n + i];
      const double s = 1.0 / std::sqrt(ss / n + 1e-5);
      for (int64_t i = 0; i < n; ++i) ref[t * n + i] = x[t * n + i] * s * w[i];
    }
    // f32 sum of squares (relative 1e-6) then two f32 products
    expect_close(yb.get<float>(), ref, 1e-6, 1e-5, "rms_norm");

    const auto b = rand_floats(rng_, n);
    Guarded bb(*be_, n * 4);
    bb.put(b.data());
    be_->add_bias(xb.f(), bb.f(), n_tok, n);
    std::vector<double> r2(x.size());
    for (int64_t i = 0; i < n_tok * n; ++i) r2[i] = static_cast<double>(x[i]) + b[i % n];
    expect_close(xb.get<float>(), r2, 0.0, 1e-7, "add_bias");  // one f32 rounding
  }
  const int64_t n = 14336 + 3;
  const auto g = rand_floats(rng_, n, -6.0f, 6.0f), u = rand_floats(rng_, n), a = rand_floats(rng_, n);
  Guarded gb(*be_, n * 4), ub(*be_, n * 4), ob(*be_, n * 4);
  gb.put(g.data());
  ub.put(u.data());
  be_->swiglu(gb.f(), ub.f(), ob.f(), n);
  std::vector<double> ref(n), r2(n);
  for (int64_t i = 0; i < n; ++i) ref[i] = g[i] / (1.0 + std::exp(-static_cast<double>(g[i]))) * u[i];
  expect_close(ob.get<float>(), ref, 1e-7, 1e-6, "swiglu");  // expf is within 2 ulp
  ub.put(a.data());
  be_->add(gb.f(), ub.f(), n);
  for (int64_t i = 0; i < n; ++i) r2[i] = static_cast<double>(g[i]) + a[i];
  expect_close(gb.get<float>(), r2, 0.0, 1e-7, "add");
}

// The fused ops must give exactly what the separate ops give (the model relies on that: CPU backends
// run the separate ones): the same float operations in the same order, so bit for bit.
TEST_F(CudaOps, FusedAddNormAndRopeKvStoreEqualTheSeparateOps) {
  Backend& b = *be_;
  for (int64_t n : {4096, 1001}) {  // vectorized and scalar paths
    SCOPED_TRACE("add_rms_norm n " + std::to_string(n));
    const int64_t n_tok = 3;
    const auto x = rand_floats(rng_, n_tok * n), dl = rand_floats(rng_, n_tok * n), w = rand_floats(rng_, n, 0.5f, 1.5f);
    Guarded x1(b, x.size() * 4), x2(b, x.size() * 4), d(b, dl.size() * 4), wb(b, w.size() * 4), y1(b, x.size() * 4),
        y2(b, x.size() * 4);
    x1.put(x.data());
    x2.put(x.data());
    d.put(dl.data());
    wb.put(w.data());
    b.add(x1.f(), d.f(), n_tok * n);
    b.rms_norm(x1.f(), wb.f(), y1.f(), n_tok, n, 1e-5f);
    b.add_rms_norm(x2.f(), d.f(), wb.f(), y2.f(), n_tok, n, 1e-5f);
    const auto a1 = x1.get<float>(), a2 = x2.get<float>(), b1 = y1.get<float>(), b2 = y2.get<float>();
    ASSERT_EQ(a1.size(), a2.size());
    EXPECT_EQ(std::memcmp(a1.data(), a2.data(), a1.size() * 4), 0) << "x after the add differs";
    EXPECT_EQ(std::memcmp(b1.data(), b2.data(), b1.size() * 4), 0) << "normalized output differs";
    // and against fp64: (x + delta) / rms * w
    std::vector<double> ref(b2.size());
    for (int64_t t = 0; t < n_tok; ++t) {
      double ss = 0;
      for (int64_t i = 0; i < n; ++i) {
        const double v = static_cast<double>(x[t * n + i]) + dl[t * n + i];
        ss += v * v;
      }
      const double sc = 1.0 / std::sqrt(ss / n + 1e-5);
      for (int64_t i = 0; i < n; ++i) ref[t * n + i] = (static_cast<double>(x[t * n + i]) + dl[t * n + i]) * sc * w[i];
    }
    expect_close(b2, ref, 1e-6, 1e-5, "add_rms_norm vs fp64");  // f32 sum of squares over n: a few eps
  }
  for (GgmlType kvt : {GgmlType::F16, GgmlType::F32}) {
    SCOPED_TRACE(std::string("rope_kv_store ") + type_name(kvt));
    const int64_t H = 8, HKV = 2, D = 64, n_ctx = 32, n_tok = 3, pos0 = 5;
    const size_t kvb = static_cast<size_t>(n_ctx * HKV * D) * (kvt == GgmlType::F16 ? 2 : 4);
    const auto q = rand_floats(rng_, n_tok * H * D), k = rand_floats(rng_, n_tok * HKV * D),
               v = rand_floats(rng_, n_tok * HKV * D);
    std::vector<float> ff(D / 2);
    for (size_t i = 0; i < ff.size(); ++i) ff[i] = 1.0f + 0.1f * static_cast<float>(i % 5);
    Guarded q1(b, q.size() * 4), q2(b, q.size() * 4), k1(b, k.size() * 4), k2(b, k.size() * 4), vb(b, v.size() * 4),
        kc1(b, kvb), vc1(b, kvb), kc2(b, kvb), vc2(b, kvb);
    q1.put(q.data());
    q2.put(q.data());
    k1.put(k.data());
    k2.put(k.data());
    vb.put(v.data());
    const std::vector<uint8_t> zero(kvb, 0);
    for (Guarded* g : {&kc1, &vc1, &kc2, &vc2}) g->put(zero.data());
    const KvLayerView kv1{kvt, 1, n_ctx, HKV, D, kc1.ptr(), vc1.ptr()}, kv2{kvt, 1, n_ctx, HKV, D, kc2.ptr(), vc2.ptr()};
    b.begin_step(one_seq(pos0, n_tok));
    b.rope(q1.f(), n_tok, H, D, 500000.0f, ff.data());
    b.rope(k1.f(), n_tok, HKV, D, 500000.0f, ff.data());
    b.kv_store(kv1, k1.f(), vb.f(), n_tok);
    b.rope_kv_store(q2.f(), k2.f(), vb.f(), kv2, n_tok, H, 500000.0f, ff.data());
    expect_same_bytes(q1, q2, "q");
    expect_same_bytes(k1, k2, "k");
    expect_same_bytes(kc1, kc2, "K cache");
    expect_same_bytes(vc1, vc2, "V cache");
    // The cache rows of the step were written (not still the zeros they started as).
    const auto kc = kc2.get<uint8_t>();
    const size_t row = kvb / n_ctx;
    bool written = false;
    for (size_t i = pos0 * row; i < (pos0 + n_tok) * row; ++i) written = written || kc[i] != 0;
    EXPECT_TRUE(written);
  }
}

// rms_norm, add_rms_norm, swiglu and decode attention quantize their one-token output for the packed matvec
// that follows; the product must be bit for bit the one the matvec gets by quantizing x itself, and a write
// to the row in between must make the matvec quantize the new row.
TEST_F(CudaOps, ProducerQuantizedActivationsEqualTheMatvecsOwn) {
  Backend& b = *be_;
  for (GgmlType t : {GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_K, GgmlType::Q6_K}) {
    for (int64_t cols : {int64_t{4096}, int64_t{14336}}) {
      SCOPED_TRACE(std::string(type_name(t)) + " cols " + std::to_string(cols));
      const int64_t rows = 300;
      HostWeight hw = make_host_weight(rng_, t, rows, cols, 0);
      std::vector<std::unique_ptr<DeviceBuffer>> storage;
      const WeightView w = b.place_matmul_weight(WeightView{t, cols, rows, hw.stride, hw.bytes.data()}, storage);
      ASSERT_TRUE(w.packed);
      const WeightView group[2] = {w, w};
      const auto x = rand_floats(rng_, cols), d = rand_floats(rng_, cols), nw = rand_floats(rng_, cols, 0.5f, 1.5f);
      Guarded xb(b, cols * 4), db(b, cols * 4), wb(b, cols * 4), yb(b, cols * 4), o1(b, rows * 4), o2(b, rows * 4),
          o3(b, rows * 4);
      xb.put(x.data());
      db.put(d.data());
      wb.put(nw.data());
      int64_t used = cuda_prequantized_matvecs(b);
      // rms_norm -> matmul (pre-quantized) against the same matmul again (x quantized by the matvec).
      b.rms_norm(xb.f(), wb.f(), yb.f(), 1, cols, 1e-5f);
      b.matmul(w, yb.f(), o1.f(), 1);
      EXPECT_EQ(cuda_prequantized_matvecs(b), ++used);
      b.matmul(w, yb.f(), o2.f(), 1);
      EXPECT_EQ(cuda_prequantized_matvecs(b), used);
      expect_same_bytes(o1, o2, "rms_norm -> matmul");
      // add_rms_norm -> matmul_group of two.
      b.add_rms_norm(xb.f(), db.f(), wb.f(), yb.f(), 1, cols, 1e-5f);
      float* ys[2] = {o1.f(), o3.f()};
      b.matmul_group(group, 2, yb.f(), ys, 1);
      EXPECT_EQ(cuda_prequantized_matvecs(b), ++used);
      b.matmul(w, yb.f(), o2.f(), 1);
      expect_same_bytes(o1, o2, "add_rms_norm -> matmul_group");
      expect_same_bytes(o3, o2, "add_rms_norm -> matmul_group, second weight");
      // swiglu -> matmul.
      b.swiglu(xb.f(), db.f(), yb.f(), cols);
      b.matmul(w, yb.f(), o1.f(), 1);
      EXPECT_EQ(cuda_prequantized_matvecs(b), ++used);
      b.matmul(w, yb.f(), o2.f(), 1);
      expect_same_bytes(o1, o2, "swiglu -> matmul");
      expect_packed_matvec(o1.get<float>(), hw.deq, yb.get<float>().data(), cols, "swiglu -> matmul against fp64");
      if (cols == 4096) {  // decode attention (32 heads x 128) -> the o projection
        const int64_t H = 32, HKV = 8, D = 128, n_ctx = 64;
        const auto kc = rand_floats(rng_, n_ctx * HKV * D), vc = rand_floats(rng_, n_ctx * HKV * D),
                   q = rand_floats(rng_, H * D);
        Guarded kb(b, kc.size() * 4), vb(b, vc.size() * 4), qb(b, q.size() * 4);
        kb.put(kc.data());
        vb.put(vc.data());
        qb.put(q.data());
        const KvLayerView kv{GgmlType::F32, 1, n_ctx, HKV, D, kb.ptr(), vb.ptr()};
        b.begin_step(one_seq(40, 1));
        b.attention(qb.f(), kv, 1, H, yb.f());
        b.matmul(w, yb.f(), o1.f(), 1);
        EXPECT_EQ(cuda_prequantized_matvecs(b), ++used);
        b.matmul(w, yb.f(), o2.f(), 1);
        expect_same_bytes(o1, o2, "attention -> matmul");
      }
      // A write between producer and matmul: the stale quantized row must not be used.
      b.rms_norm(xb.f(), wb.f(), yb.f(), 1, cols, 1e-5f);
      b.add(yb.f(), db.f(), cols);
      b.matmul(w, yb.f(), o1.f(), 1);
      EXPECT_EQ(cuda_prequantized_matvecs(b), used) << "a stale quantized row was used";
      // The result is the product with the updated row, against fp64 (int8 view of x, as the op suite checks).
      expect_packed_matvec(o1.get<float>(), hw.deq, yb.get<float>().data(), cols, "matmul of the row written after rms_norm");
    }
  }
}

// The decode attention's output step with one float4 per thread (the default) against one element per
// thread: the same float operations per element and an exact int8 row, so the same bits, for the output and
// for the o projection that reads its int8 row. (KvStoreAndAttention checks the default against fp64.)
TEST_F(CudaOps, AttentionFloat4OutputStepEqualsTheOneElementStep) {
  Backend& b = *be_;
  const int64_t n_ctx = 160, rows = 300;
  for (int64_t D : {int64_t{64}, int64_t{128}}) {
    for (int64_t HKV : {int64_t{1}, int64_t{2}, int64_t{8}}) {
      for (int64_t G : {int64_t{1}, int64_t{4}, int64_t{8}}) {
        const int64_t H = HKV * G, cols = H * D;
        SCOPED_TRACE("head_dim " + std::to_string(D) + " kv heads " + std::to_string(HKV) + " group " + std::to_string(G));
        HostWeight hw = make_host_weight(rng_, GgmlType::Q4_0, rows, cols, 0);
        std::vector<std::unique_ptr<DeviceBuffer>> storage;
        const WeightView w =
            b.place_matmul_weight(WeightView{GgmlType::Q4_0, cols, rows, hw.stride, hw.bytes.data()}, storage);
        const auto kc = rand_floats(rng_, n_ctx * HKV * D), vc = rand_floats(rng_, n_ctx * HKV * D),
                   q = rand_floats(rng_, H * D);
        Guarded kb(b, kc.size() * 2), vb(b, vc.size() * 2), qb(b, q.size() * 4), a0(b, cols * 4), a1(b, cols * 4),
            o0(b, rows * 4), o1(b, rows * 4);
        std::vector<uint16_t> kh(kc.size()), vh(vc.size());
        for (size_t i = 0; i < kc.size(); ++i) kh[i] = to_f16(kc[i]), vh[i] = to_f16(vc[i]);
        kb.put(kh.data());
        vb.put(vh.data());
        qb.put(q.data());
        const KvLayerView kv{GgmlType::F16, 1, n_ctx, HKV, D, kb.ptr(), vb.ptr()};
        // pos 40: one block covers the context and writes the output; pos 150: three splits and the combine.
        for (int64_t pos : {int64_t{40}, int64_t{150}}) {
          b.begin_step(one_seq(pos, 1));
          const int64_t pre = cuda_prequantized_matvecs(b);
          cuda_set_attention_out4(b, false);
          b.attention(qb.f(), kv, 1, H, a0.f());
          b.matmul(w, a0.f(), o0.f(), 1);
          cuda_set_attention_out4(b, true);
          b.attention(qb.f(), kv, 1, H, a1.f());
          b.matmul(w, a1.f(), o1.f(), 1);
          EXPECT_EQ(cuda_prequantized_matvecs(b), pre + 2) << "both forms write the o projection's int8 row";
          expect_same_bytes(a0, a1, "attention output at pos " + std::to_string(pos));
          expect_same_bytes(o0, o1, "o projection at pos " + std::to_string(pos));
        }
      }
    }
  }
}

TEST_F(CudaOps, RopeAdjacentPairsWithFreqFactors) {
  for (int64_t head_dim : {64, 128})
    for (int64_t pos0 : {0, 1000, 100000})
      for (bool use_ff : {false, true}) {
        const int64_t n_tok = 7, n_heads = 4;
        SCOPED_TRACE(::testing::Message() << "head_dim " << head_dim << " pos0 " << pos0 << " ff " << use_ff);
        const auto x = rand_floats(rng_, n_tok * n_heads * head_dim);
        const auto ff = rand_floats(rng_, head_dim / 2, 1.0f, 8.0f);
        Guarded xb(*be_, x.size() * 4);
        xb.put(x.data());
        be_->begin_step(one_seq(pos0, n_tok));
        be_->rope(xb.f(), n_tok, n_heads, head_dim, 500000.0f, use_ff ? ff.data() : nullptr);
        std::vector<double> ref(x.size());
        for (int64_t t = 0; t < n_tok; ++t)
          for (int64_t h = 0; h < n_heads; ++h)
            for (int64_t i = 0; i < head_dim / 2; ++i) {
              double th = std::pow(500000.0, -2.0 * i / head_dim);
              if (use_ff) th /= ff[i];
              const double a = (pos0 + t) * th, c = std::cos(a), s = std::sin(a);
              const size_t o = (t * n_heads + h) * head_dim + 2 * i;
              ref[o] = x[o] * c - x[o + 1] * s;
              ref[o + 1] = x[o] * s + x[o + 1] * c;
            }
        // angle in double on the GPU too; what remains is f32 rounding of the products (|x| <= 1)
        expect_close(xb.get<float>(), ref, 1e-6, 1e-6, "rope");
      }
}

// ---- KV cache and attention ---------------------------------------------------------------------------------
struct AttnCase {
  GgmlType kv;
  int64_t head_dim, n_head_kv, group, n_tok, pos0, n_ctx;
};

// A KV cache's bytes holding `v` (f16: rounded to nearest even; f32: as is).
std::vector<uint8_t> cache_bytes(GgmlType kv, const std::vector<float>& v) {
  const size_t es = kv == GgmlType::F16 ? 2 : 4;
  std::vector<uint8_t> raw(v.size() * es);
  for (size_t i = 0; i < v.size(); ++i) {
    if (kv == GgmlType::F16) {
      const uint16_t h = to_f16(v[i]);
      std::memcpy(&raw[2 * i], &h, 2);
    } else {
      std::memcpy(&raw[4 * i], &v[i], 4);
    }
  }
  return raw;
}

void run_attention(Backend& be, std::mt19937_64& rng, const AttnCase& c) {
  const std::string what = ::testing::PrintToString(std::vector<int64_t>{c.head_dim, c.n_head_kv, c.group, c.n_tok,
                                                                         c.pos0, c.n_ctx}) +
                           " kv " + type_name(c.kv);
  SCOPED_TRACE(what);
  const int64_t D = c.head_dim, HKV = c.n_head_kv, H = HKV * c.group, row = HKV * D;
  const size_t es = c.kv == GgmlType::F16 ? 2 : 4;
  // Earlier positions: random contents written directly; then kv_store adds this step's rows.
  auto kc = rand_floats(rng, c.n_ctx * row), vc = rand_floats(rng, c.n_ctx * row);
  const std::vector<uint8_t> kraw = cache_bytes(c.kv, kc), vraw = cache_bytes(c.kv, vc);
  auto round_kv = [&](float v) { return c.kv == GgmlType::F16 ? static_cast<float>(f16(to_f16(v))) : v; };
  Guarded kb(be, kraw.size()), vb(be, vraw.size());
  kb.put(kraw.data());
  vb.put(vraw.data());
  const auto k = rand_floats(rng, c.n_tok * row), v = rand_floats(rng, c.n_tok * row);
  const auto q = rand_floats(rng, c.n_tok * H * D, -2.0f, 2.0f);
  Guarded knew(be, k.size() * 4), vnew(be, v.size() * 4), qb(be, q.size() * 4), ob(be, q.size() * 4);
  knew.put(k.data());
  vnew.put(v.data());
  qb.put(q.data());
  const KvLayerView kv{c.kv, 1, c.n_ctx, HKV, D, kb.ptr(), vb.ptr()};
  be.begin_step(one_seq(c.pos0, c.n_tok));
  be.kv_store(kv, knew.f(), vnew.f(), c.n_tok);
  be.attention(qb.f(), kv, c.n_tok, H, ob.f());
  for (int64_t i = 0; i < c.n_tok * row; ++i) {
    kc[c.pos0 * row + i] = k[i];
    vc[c.pos0 * row + i] = v[i];
  }
  // the cache holds exactly the rounded rows, and nothing else changed
  const auto kdev = kb.get<uint8_t>();
  for (int64_t i = 0; i < c.n_ctx * row; i += 97) {
    const double got = es == 2 ? f16(static_cast<uint16_t>(kdev[2 * i] | (kdev[2 * i + 1] << 8)))
                               : [&] { float f; std::memcpy(&f, &kdev[4 * i], 4); return static_cast<double>(f); }();
    ASSERT_EQ(got, static_cast<double>(round_kv(kc[i]))) << "k cache element " << i;
  }
  std::vector<double> ref(q.size());
  for (int64_t t = 0; t < c.n_tok; ++t)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t kh = h / c.group, len = c.pos0 + t + 1;
      std::vector<double> s(len);
      double m = -INFINITY;
      for (int64_t p = 0; p < len; ++p) {
        double a = 0;
        for (int64_t d = 0; d < D; ++d) a += static_cast<double>(q[(t * H + h) * D + d]) * round_kv(kc[p * row + kh * D + d]);
        s[p] = a / std::sqrt(static_cast<double>(D));
        m = std::max(m, s[p]);
      }
      double l = 0;
      for (auto& e : s) l += (e = std::exp(e - m));
      for (int64_t d = 0; d < D; ++d) {
        double a = 0;
        for (int64_t p = 0; p < len; ++p) a += s[p] * round_kv(vc[p * row + kh * D + d]);
        ref[(t * H + h) * D + d] = a / l;
      }
    }
  // f32 scores (|q.k| <= 2*D), exp2f within 2 ulp, f32 sums over up to ~1000 positions: the outputs are
  // convex combinations of values in [-1, 1], so an absolute 2e-5 plus 1e-4 relative bounds it
  expect_close(ob.get<float>(), ref, 2e-5, 1e-4, "attention " + what);
}

TEST_F(CudaOps, KvStoreAndAttention) {
  const AttnCase cases[] = {
      // decode (flash-decoding kernel, several splits at pos ~1000)
      {GgmlType::F16, 128, 8, 4, 1, 0, 64},     {GgmlType::F16, 128, 8, 4, 1, 1000, 2048},
      {GgmlType::F16, 64, 4, 8, 1, 999, 1024},  {GgmlType::F32, 128, 2, 1, 1, 1000, 1024},
      {GgmlType::F32, 64, 8, 2, 1, 37, 128},
      // decode: partial and exact 32-position tiles, one split of several, the last cache position, G = 8
      {GgmlType::F16, 128, 8, 4, 1, 31, 64},    {GgmlType::F16, 128, 8, 4, 1, 32, 64},
      {GgmlType::F16, 128, 8, 4, 1, 100, 4096}, {GgmlType::F16, 128, 4, 8, 1, 4095, 4096},
      {GgmlType::F32, 128, 8, 8, 1, 500, 1024},
      // generic kernel: prefill, odd head_dim, group sizes without a decode instantiation
      {GgmlType::F16, 128, 8, 4, 7, 0, 64},     {GgmlType::F16, 64, 2, 8, 64, 0, 128},
      {GgmlType::F32, 128, 4, 1, 7, 1000, 1024}, {GgmlType::F16, 96, 2, 3, 1, 500, 1024},
      {GgmlType::F32, 80, 1, 1, 5, 3, 16},
      // tiled prefill kernel: several 32/64-token query tiles and 64-position key tiles, pos0 off the tiles
      {GgmlType::F16, 128, 8, 4, 100, 30, 256}, {GgmlType::F32, 64, 2, 4, 70, 100, 256},
      {GgmlType::F16, 64, 4, 2, 2, 500, 1024},  {GgmlType::F16, 128, 2, 4, 130, 0, 130},
  };
  for (const auto& c : cases) run_attention(*be_, rng_, c);
}

// A decode attention case of the bit-for-bit comparisons below, and its random inputs.
struct DecodeAttnCase {
  GgmlType kv;
  int64_t head_dim, n_head_kv, group, pos0, n_ctx;
  std::string name() const {
    return ::testing::PrintToString(std::vector<int64_t>{head_dim, n_head_kv, group, pos0, n_ctx}) + " kv " + type_name(kv);
  }
  size_t cache_bytes() const { return static_cast<size_t>(n_ctx * n_head_kv * head_dim) * (kv == GgmlType::F16 ? 2 : 4); }
};
struct DecodeAttnInputs {
  std::vector<uint8_t> kraw, vraw;  // (n_ctx, n_head_kv, head_dim) cache contents of earlier positions
  std::vector<float> q, k, v;       // (n_head_kv * group, head_dim) and the step's (n_head_kv, head_dim) k, v
};
DecodeAttnInputs decode_attn_inputs(std::mt19937_64& rng, const DecodeAttnCase& c) {
  const int64_t D = c.head_dim, HKV = c.n_head_kv;
  DecodeAttnInputs in;
  // Earlier positions: random finite cache contents (f16 or f32 bit patterns of values in [-1, 1]).
  in.kraw = cache_bytes(c.kv, rand_floats(rng, c.n_ctx * HKV * D));
  in.vraw = cache_bytes(c.kv, rand_floats(rng, c.n_ctx * HKV * D));
  in.q = rand_floats(rng, HKV * c.group * D, -2.0f, 2.0f);
  in.k = rand_floats(rng, HKV * D);
  in.v = rand_floats(rng, HKV * D);
  return in;
}

// rope_attention's fused decode form (rotation and the new cache rows inside the attention kernel) against the
// same backend's unfused composition (rope_kv_store's kernel, then attention): the rotation is the same double
// arithmetic and the attention kernel the same, so caches and outputs must agree bit for bit; the unfused
// ops are checked against fp64 above.
TEST_F(CudaOps, FusedRopeAttentionEqualsTheUnfusedOps) {
  Backend& b = *be_;
  const DecodeAttnCase cases[] = {{GgmlType::F16, 128, 8, 4, 0, 64},     {GgmlType::F16, 128, 8, 4, 37, 4096},
                                  {GgmlType::F16, 128, 4, 8, 4095, 4096}, {GgmlType::F16, 64, 2, 8, 999, 1024},
                                  {GgmlType::F32, 128, 8, 4, 32, 64},    {GgmlType::F32, 64, 4, 1, 300, 512}};
  for (const DecodeAttnCase& c : cases) {
    SCOPED_TRACE(c.name());
    const int64_t D = c.head_dim, HKV = c.n_head_kv, H = HKV * c.group;
    const size_t kvb = c.cache_bytes();
    const DecodeAttnInputs in = decode_attn_inputs(rng_, c);
    const auto& [kraw, vraw, q, k, v] = in;
    std::vector<float> ff(D / 2);
    for (size_t i = 0; i < ff.size(); ++i) ff[i] = 1.0f + 0.25f * static_cast<float>(i % 3);
    Guarded q1(b, q.size() * 4), q2(b, q.size() * 4), k1(b, k.size() * 4), k2(b, k.size() * 4), vb(b, v.size() * 4),
        kc1(b, kvb), vc1(b, kvb), kc2(b, kvb), vc2(b, kvb), o1(b, q.size() * 4), o2(b, q.size() * 4);
    for (auto [g, d] : {std::pair{&q1, q.data()}, std::pair{&q2, q.data()}, std::pair{&k1, k.data()},
                        std::pair{&k2, k.data()}, std::pair{&vb, v.data()}})
      g->put(d);
    kc1.put(kraw.data());
    kc2.put(kraw.data());
    vc1.put(vraw.data());
    vc2.put(vraw.data());
    const KvLayerView kv1{c.kv, 1, c.n_ctx, HKV, D, kc1.ptr(), vc1.ptr()},
        kv2{c.kv, 1, c.n_ctx, HKV, D, kc2.ptr(), vc2.ptr()};
    b.begin_step(one_seq(c.pos0, 1));
    b.Backend::rope_attention(q1.f(), k1.f(), vb.f(), kv1, 1, H, 500000.0f, ff.data(), o1.f());
    b.rope_attention(q2.f(), k2.f(), vb.f(), kv2, 1, H, 500000.0f, ff.data(), o2.f());
    expect_same_bytes(kc1, kc2, "K cache");
    expect_same_bytes(vc1, vc2, "V cache");
    expect_same_bytes(o1, o2, "attention output");
    // The step's row was stored (it differs from the random contents it replaced).
    const auto kc = kc2.get<uint8_t>();
    const size_t row = kvb / static_cast<size_t>(c.n_ctx);
    EXPECT_NE(std::memcmp(kc.data() + c.pos0 * row, kraw.data() + c.pos0 * row, row), 0);
  }
}

// SHARDLM_CUDA_ATTN_BLOCKS_PER_KV_HEAD (a KV head's query heads over 2 or 4 blocks) and SHARDLM_CUDA_ATTN_LAST_BLOCK_COMBINE
// (the splits merged by the attention kernel's last block instead of a combine kernel), alone and together.
// Every head's arithmetic is the same in each form, so the outputs, the int8 row and the cache rows stored by
// the fused rope form must be the default form's bits, with one split (one block covers the context) and with
// several. Each form runs two attention calls (plain, then fused) on the same counters: the in-kernel combine
// must leave them at zero for the next call.
TEST_F(CudaOps, DecodeAttentionFormsGiveTheSameBits) {
  Backend& b = *be_;
  const DecodeAttnCase cases[] = {{GgmlType::F16, 128, 2, 8, 40, 64},   {GgmlType::F16, 128, 2, 8, 999, 1024},
                                  {GgmlType::F16, 128, 8, 4, 37, 4096}, {GgmlType::F16, 64, 4, 2, 150, 512},
                                  {GgmlType::F32, 128, 1, 8, 300, 512}, {GgmlType::F32, 64, 2, 4, 0, 64},
                                  {GgmlType::F16, 128, 2, 8, 4095, 4096}, {GgmlType::F32, 64, 8, 1, 700, 1024}};
  constexpr int kForms = 6;  // f % 3: 1, 2 or 4 blocks per KV head; f / 3: last-block combine
  for (const DecodeAttnCase& c : cases) {
    SCOPED_TRACE(c.name());
    const int64_t D = c.head_dim, HKV = c.n_head_kv, H = HKV * c.group;
    const size_t kvb = c.cache_bytes();
    const DecodeAttnInputs in = decode_attn_inputs(rng_, c);
    const auto& [kraw, vraw, q, k, v] = in;
    // The o projection reads the attention's int8 row: it must be the same too.
    const int64_t rows = 64;
    HostWeight hw = make_host_weight(rng_, GgmlType::Q4_0, rows, H * D, 0);
    std::vector<std::unique_ptr<DeviceBuffer>> storage;
    const WeightView w = b.place_matmul_weight(WeightView{GgmlType::Q4_0, H * D, rows, hw.stride, hw.bytes.data()}, storage);
    Guarded qb(b, q.size() * 4), kb(b, k.size() * 4), vb(b, v.size() * 4);
    qb.put(q.data());
    kb.put(k.data());
    vb.put(v.data());
    std::vector<Guarded> kc, vc, plain, fused, proj;
    for (int f = 0; f < kForms; ++f) {
      kc.emplace_back(b, kvb);
      vc.emplace_back(b, kvb);
      plain.emplace_back(b, q.size() * 4);
      fused.emplace_back(b, q.size() * 4);
      proj.emplace_back(b, rows * 4);
    }
    std::vector<float> ff(D / 2, 1.0f);
    b.begin_step(one_seq(c.pos0, 1));
    for (int f = 0; f < kForms; ++f) {
      cuda_set_attention_blocks_per_kv_head(b, 1 << (f % 3));
      cuda_set_attention_last_block_combine(b, f / 3 == 1);
      kc[f].put(kraw.data());
      vc[f].put(vraw.data());
      const KvLayerView kv{c.kv, 1, c.n_ctx, HKV, D, kc[f].ptr(), vc[f].ptr()};
      b.attention(qb.f(), kv, 1, H, plain[f].f());
      b.matmul(w, plain[f].f(), proj[f].f(), 1);
      // The fused form (rope of q and of the step's k, the step's row stored) on its own copy of the cache.
      Guarded q2(b, q.size() * 4), k2(b, k.size() * 4);
      q2.put(q.data());
      k2.put(k.data());
      b.rope_attention(q2.f(), k2.f(), vb.f(), kv, 1, H, 500000.0f, ff.data(), fused[f].f());
    }
    cuda_set_attention_blocks_per_kv_head(b, 1);
    cuda_set_attention_last_block_combine(b, false);
    for (int f = 1; f < kForms; ++f) {
      SCOPED_TRACE("form " + std::to_string(f));
      expect_same_bytes(plain[0], plain[f], "attention output");
      expect_same_bytes(proj[0], proj[f], "o projection of its int8 row");
      expect_same_bytes(fused[0], fused[f], "fused rope attention output");
      expect_same_bytes(kc[0], kc[f], "K cache after the fused form");
      expect_same_bytes(vc[0], vc[f], "V cache after the fused form");
    }
  }
}

// ---- batches of several sequences in a pool of cache blocks -----------------------------------------------
// One sequence of a test batch: its tokens in the step, its first position and its pool block.
struct SeqSpec {
  int32_t n_tok, pos0, block;
};

// The batch of these sequences in this order (tokens grouped by sequence), one block each (max_blocks 1: the
// CUDA backend's block holds a whole context), logits for each sequence's last token.
BatchInfo batch_of(const std::vector<SeqSpec>& seqs) {
  BatchInfo b;
  for (const SeqSpec& q : seqs) {
    b.seqs.push_back(BatchSeq{static_cast<int32_t>(b.n_tok), q.n_tok, q.pos0});
    b.n_tok += q.n_tok;
    b.block_table.push_back(q.block);
    b.out_rows.push_back(static_cast<int32_t>(b.n_tok - 1));
  }
  b.max_blocks = 1;
  return b;
}

std::string describe(const std::vector<SeqSpec>& seqs) {
  std::string out;
  // Appended piece by piece: GCC 12 reports a false -Wrestrict on "(" + std::string.
  for (const SeqSpec& q : seqs) {
    out += '(';
    out += std::to_string(q.n_tok);
    out += " tok at pos ";
    out += std::to_string(q.pos0);
    out += ", block ";
    out += std::to_string(q.block);
    out += ") ";
  }
  return out;
}

// Element i of a cache's raw bytes.
double cache_at(GgmlType kv, const std::vector<uint8_t>& raw, size_t i) {
  if (kv == GgmlType::F16) return f16(static_cast<uint16_t>(raw[2 * i] | (raw[2 * i + 1] << 8)));
  float f;
  std::memcpy(&f, &raw[4 * i], 4);
  return f;
}

// Several sequences of different lengths and positions in one step, each in its own block of a pool of 4
// (blocks out of order, one left unused), through rope_attention: the CUDA backend launches its kernels once
// per sequence with that sequence's positions, rows and block. Against the reference backend on the same pool:
// the rows the step wrote (and no other row), and the attention outputs.
TEST_F(CudaOps, BatchOfSequencesInPoolBlocksMatchesTheReference) {
  Backend& b = *be_;
  auto ref = make_reference_backend();
  const int64_t n_blocks = 4, block = 160;  // block_size = n_ctx: one block per sequence
  const int64_t HKV = 2, G = 4, H = HKV * G;
  const std::vector<std::vector<SeqSpec>> batches = {
      // decode of three sequences: one split of the decode kernel (pos 5, 40) and several (pos 130 of 160)
      {{1, 5, 2}, {1, 40, 0}, {1, 130, 3}},
      // a 7-token prompt chunk (the prefill kernel) between two decode tokens: its rows start at token 1
      {{1, 40, 3}, {7, 9, 1}, {1, 130, 0}},
  };
  for (GgmlType kvt : {GgmlType::F16, GgmlType::F32}) {
    for (int64_t D : {int64_t{64}, int64_t{128}}) {
      for (const auto& spec : batches) {
        const std::string what = describe(spec) + "head_dim " + std::to_string(D) + " kv " + type_name(kvt);
        SCOPED_TRACE(what);
        const BatchInfo batch = batch_of(spec);
        ASSERT_NO_THROW(batch.validate(n_blocks, block)) << "the test's batch is malformed";
        const int64_t row = HKV * D, n_tok = batch.n_tok, n_rows = n_blocks * block;
        // Every row of every block starts random (the earlier positions the step attends to); the step writes
        // its own positions.
        const std::vector<uint8_t> kraw = cache_bytes(kvt, rand_floats(rng_, n_rows * row)),
                                   vraw = cache_bytes(kvt, rand_floats(rng_, n_rows * row));
        const auto q = rand_floats(rng_, n_tok * H * D, -2.0f, 2.0f), k = rand_floats(rng_, n_tok * row),
                   v = rand_floats(rng_, n_tok * row);
        std::vector<float> ff(D / 2);
        for (size_t i = 0; i < ff.size(); ++i) ff[i] = 1.0f + 0.25f * static_cast<float>(i % 3);

        // CUDA: the fused form (decode sequences in one kernel each) and the unfused composition
        // (rope_kv_store for all sequences, then attention), each on its own copy of the pool.
        Guarded q1(b, q.size() * 4), q2(b, q.size() * 4), k1(b, k.size() * 4), k2(b, k.size() * 4),
            vb(b, v.size() * 4), kc1(b, kraw.size()), vc1(b, vraw.size()), kc2(b, kraw.size()), vc2(b, vraw.size()),
            o1(b, q.size() * 4), o2(b, q.size() * 4);
        for (auto [g, d] : {std::pair{&q1, q.data()}, std::pair{&q2, q.data()}, std::pair{&k1, k.data()},
                            std::pair{&k2, k.data()}, std::pair{&vb, v.data()}})
          g->put(d);
        kc1.put(kraw.data());
        kc2.put(kraw.data());
        vc1.put(vraw.data());
        vc2.put(vraw.data());
        const KvLayerView kv1{kvt, n_blocks, block, HKV, D, kc1.ptr(), vc1.ptr()},
            kv2{kvt, n_blocks, block, HKV, D, kc2.ptr(), vc2.ptr()};
        b.begin_step(batch);
        b.rope_attention(q1.f(), k1.f(), vb.f(), kv1, n_tok, H, 500000.0f, ff.data(), o1.f());
        b.Backend::rope_attention(q2.f(), k2.f(), vb.f(), kv2, n_tok, H, 500000.0f, ff.data(), o2.f());
        // Same kernels per sequence either way (FusedRopeAttentionEqualsTheUnfusedOps for one sequence).
        expect_same_bytes(kc1, kc2, "K pool, fused against unfused");
        expect_same_bytes(vc1, vc2, "V pool, fused against unfused");
        expect_same_bytes(o1, o2, "attention output, fused against unfused");

        // Reference: rope(q), rope(k), kv_store, attention, on a host copy of the same pool.
        std::vector<uint8_t> kref = kraw, vref = vraw;
        std::vector<float> qr = q, kr = k, oref(q.size());
        const KvLayerView kvr{kvt, n_blocks, block, HKV, D, kref.data(), vref.data()};
        ref->begin_step(batch);
        ref->rope_attention(qr.data(), kr.data(), v.data(), kvr, n_tok, H, 500000.0f, ff.data(), oref.data());

        // The pool: V rows are stored as given (the same rounding to f16, or none): equal everywhere. K rows the
        // step wrote are rotated keys: within f32 rounding of the reference's double rotation (1e-6, as the
        // rope test), which under f16 may move a value to the neighbouring f16 (one unit: < 2^-10 relative).
        // Every other row (other positions, other blocks, the unused block) keeps its bytes.
        const auto kdev = kc1.get<uint8_t>(), vdev = vc1.get<uint8_t>();
        EXPECT_TRUE(vdev == vref) << "V pool differs from the reference's";
        std::vector<char> written(static_cast<size_t>(n_rows), 0);  // (n_blocks * block) pool rows
        for (int64_t s = 0; s < batch.n_seq(); ++s)
          for (int32_t p = batch.seqs[s].pos0; p < batch.seqs[s].ctx(); ++p)
            written[static_cast<size_t>(batch.blocks(s)[0] * block + p)] = 1;
        std::vector<float> kgot;
        std::vector<double> kwant;
        for (int64_t r = 0; r < n_rows; ++r) {
          const size_t es = kvt == GgmlType::F16 ? 2 : 4, off = static_cast<size_t>(r * row) * es;
          if (!written[static_cast<size_t>(r)]) {
            ASSERT_EQ(std::memcmp(kdev.data() + off, kraw.data() + off, static_cast<size_t>(row) * es), 0)
                << "K row " << r % block << " of block " << r / block << " changed, but the step did not write it";
            continue;
          }
          for (int64_t i = 0; i < row; ++i) {
            kgot.push_back(static_cast<float>(cache_at(kvt, kdev, static_cast<size_t>(r * row + i))));
            kwant.push_back(cache_at(kvt, kref, static_cast<size_t>(r * row + i)));
          }
        }
        ASSERT_EQ(static_cast<int64_t>(kgot.size()), n_tok * row);
        expect_close(kgot, kwant, 1e-6, kvt == GgmlType::F16 ? 1e-3 : 1e-6, "K rows written by the step");

        // The outputs, against the reference's attention over the pool the CUDA backend wrote (with the
        // reference's rotated q): a rotated key one f16 unit off moves a score by up to ~4e-4, more than the
        // attention's own error, so this comparison isolates the attention from the K rounding checked above.
        // f32 scores (|q.k| <= 2*D), exp2f within 2 ulp, f32 sums over up to 131 positions: the outputs are
        // convex combinations of values in [-1, 1], so an absolute 2e-5 plus 1e-4 relative bounds it (as
        // KvStoreAndAttention).
        std::vector<uint8_t> kcuda = kdev, vcuda = vdev;
        const KvLayerView kvc{kvt, n_blocks, block, HKV, D, kcuda.data(), vcuda.data()};
        std::vector<float> oc(q.size());
        ref->attention(qr.data(), kvc, n_tok, H, oc.data());
        const std::vector<float> got = o1.get<float>();
        expect_close(got, std::vector<double>(oc.begin(), oc.end()), 2e-5, 1e-4, "attention " + what);
        // With an f32 cache the keys agree to f32 rounding: the whole step against the reference's own.
        if (kvt == GgmlType::F32)
          expect_close(got, std::vector<double>(oref.begin(), oref.end()), 2e-5, 1e-4, "rope_attention " + what);
      }
    }
  }
}

// One launch of the decode kernel serves every decoding sequence of a step (each block reads its sequence's
// row and cache block from the step's StepDev): each sequence's output, and the K/V rows it stores, must have
// the bytes of the same sequence stepped alone. 17 sequences (positions 0, 31, 32, 33, ..., 159: one split
// and several) in shuffled blocks of a pool of 20, and a prompt chunk among them (its blocks skip).
TEST_F(CudaOps, DecodeSequencesInOneLaunchEqualEachAlone) {
  const int64_t HKV = 2, G = 4, H = HKV * G, D = 128, row = HKV * D, n_blocks = 20, block = 160;
  std::vector<SeqSpec> spec;
  const int32_t pos[] = {0, 31, 32, 33, 5, 159, 64, 1, 100, 127, 128, 129, 2, 90, 158, 17, 40};
  for (int i = 0; i < 17; ++i) spec.push_back({1, pos[i], static_cast<int32_t>((i * 7 + 3) % n_blocks)});
  spec.insert(spec.begin() + 5, SeqSpec{6, 20, 16});  // a prompt chunk (block 16: no decode sequence uses it)
  const BatchInfo batch = batch_of(spec);
  ASSERT_NO_THROW(batch.validate(n_blocks, block)) << "the test's batch is malformed";
  const int64_t n_tok = batch.n_tok;
  const std::vector<uint8_t> kraw = cache_bytes(GgmlType::F16, rand_floats(rng_, n_blocks * block * row)),
                             vraw = cache_bytes(GgmlType::F16, rand_floats(rng_, n_blocks * block * row));
  const auto q = rand_floats(rng_, n_tok * H * D, -2.0f, 2.0f), k = rand_floats(rng_, n_tok * row),
             v = rand_floats(rng_, n_tok * row);
  Guarded qb(*be_, q.size() * 4), kb(*be_, k.size() * 4), vb(*be_, v.size() * 4), kc(*be_, kraw.size()),
      vc(*be_, vraw.size()), ob(*be_, q.size() * 4), kc1(*be_, kraw.size()), vc1(*be_, vraw.size()),
      o1(*be_, H * D * 4);
  qb.put(q.data());
  kb.put(k.data());
  vb.put(v.data());
  kc.put(kraw.data());
  vc.put(vraw.data());
  const KvLayerView kv{GgmlType::F16, n_blocks, block, HKV, D, kc.ptr(), vc.ptr()};
  be_->begin_step(batch);
  be_->rope_attention(qb.f(), kb.f(), vb.f(), kv, n_tok, H, 500000.0f, nullptr, ob.f());
  const auto all = ob.get<float>();
  const auto kall = kc.get<uint8_t>(), vall = vc.get<uint8_t>();
  for (int64_t s = 0; s < batch.n_seq(); ++s) {
    const BatchSeq& sq = batch.seqs[static_cast<size_t>(s)];
    if (sq.n_tok != 1) continue;
    SCOPED_TRACE("sequence " + std::to_string(s) + " at position " + std::to_string(sq.pos0));
    kc1.put(kraw.data());
    vc1.put(vraw.data());
    const KvLayerView kv1{GgmlType::F16, n_blocks, block, HKV, D, kc1.ptr(), vc1.ptr()};
    const int32_t blk = batch.blocks(s)[0];
    be_->begin_step(BatchInfo::single(sq.pos0, 1, {blk}, false));
    be_->rope_attention(qb.f() + sq.tok0 * H * D, kb.f() + sq.tok0 * row, vb.f() + sq.tok0 * row, kv1, 1, H,
                        500000.0f, nullptr, o1.f());
    const auto alone = o1.get<float>();
    EXPECT_EQ(std::memcmp(alone.data(), all.data() + sq.tok0 * H * D, alone.size() * 4), 0)
        << "output differs from the sequence stepped alone";
    const auto k1 = kc1.get<uint8_t>(), v1 = vc1.get<uint8_t>();
    const size_t off = static_cast<size_t>((blk * block + sq.pos0) * row) * 2, bytes = static_cast<size_t>(row) * 2;
    EXPECT_EQ(std::memcmp(k1.data() + off, kall.data() + off, bytes), 0) << "stored K row differs";
    EXPECT_EQ(std::memcmp(v1.data() + off, vall.data() + off, bytes), 0) << "stored V row differs";
    EXPECT_NE(std::memcmp(k1.data() + off, kraw.data() + off, bytes), 0) << "the K row was not stored";
  }
}

// A captured graph bakes each sequence's cache block (the KV base pointers): a step of the sequence in another
// block must be captured again, and must write and read that block; a new position alone replays. The graph
// and an eager backend on the same inputs must agree bit for bit at every step.
TEST_F(CudaOps, GraphCapturesAgainWhenTheCacheBlockChanges) {
  auto eager = make_cuda_backend(0, GgmlType::F16);
  const int64_t HKV = 2, G = 4, D = 64, H = HKV * G, row = HKV * D, n_blocks = 2, block = 64;
  const std::vector<uint8_t> kraw = cache_bytes(GgmlType::F16, rand_floats(rng_, n_blocks * block * row)),
                             vraw = cache_bytes(GgmlType::F16, rand_floats(rng_, n_blocks * block * row));
  const auto q = rand_floats(rng_, H * D, -2.0f, 2.0f), k = rand_floats(rng_, row), v = rand_floats(rng_, row);
  struct Side {
    Backend* be;
    std::unique_ptr<Guarded> q, k, v, out, kc, vc;
  };
  auto setup = [&](Backend& be) {
    Side s{&be, std::make_unique<Guarded>(be, q.size() * 4), std::make_unique<Guarded>(be, k.size() * 4),
           std::make_unique<Guarded>(be, v.size() * 4), std::make_unique<Guarded>(be, q.size() * 4),
           std::make_unique<Guarded>(be, kraw.size()), std::make_unique<Guarded>(be, vraw.size())};
    s.q->put(q.data());
    s.k->put(k.data());
    s.v->put(v.data());
    s.kc->put(kraw.data());
    s.vc->put(vraw.data());
    return s;
  };
  Side a = setup(*be_), e = setup(*eager);
  // Re-uploads q and k for every step outside the body: with SHARDLM_CUDA_FUSE_ROPE=0 rope_attention rotates
  // them in place, and both sides must start each step from the same inputs.
  auto body = [H, HKV, D, n_blocks, block](Side& s) {
    return [&s, H, HKV, D, n_blocks, block] {
      const KvLayerView kv{GgmlType::F16, n_blocks, block, HKV, D, s.kc->ptr(), s.vc->ptr()};
      s.be->rope_attention(s.q->f(), s.k->f(), s.v->f(), kv, 1, H, 10000.0f, nullptr, s.out->f());
    };
  };
  CudaGraphRunner graph(*be_);
  auto fa = body(a), fe = body(e);
  // (position, block): eager, capture, replay, replay in block 0; eager, capture, replay in block 1; back to
  // block 0: eager, capture.
  const std::pair<int32_t, int32_t> steps[] = {{0, 0}, {1, 0}, {2, 0}, {3, 0}, {4, 1},
                                               {5, 1}, {6, 1}, {7, 0}, {8, 0}};
  for (const auto& [pos, blk] : steps) {
    SCOPED_TRACE("position " + std::to_string(pos) + " in block " + std::to_string(blk));
    for (Side* s : {&a, &e}) {
      s->q->put(q.data());
      s->k->put(k.data());
    }
    const BatchInfo batch = BatchInfo::single(pos, 1, {blk}, false);
    graph.run(batch, fa);
    eager->begin_step(batch);
    fe();
    expect_same_bytes(*a.out, *e.out, "attention output, graph against eager");
    for (float f : a.out->get<float>()) ASSERT_TRUE(std::isfinite(f));
  }
  expect_same_bytes(*a.kc, *e.kc, "K pool, graph against eager");
  expect_same_bytes(*a.vc, *e.vc, "V pool, graph against eager");
  EXPECT_EQ(graph.captures(), 3) << "one capture per cache block change (block 0, 1, then 0 again)";
  EXPECT_EQ(graph.replays(), 6) << "each capture's launch and the replays after it";
  // Each block's rows written where the steps in that block put them: the graph wrote block 1 (not only 0).
  const auto kc = a.kc->get<uint8_t>();
  const size_t row_bytes = static_cast<size_t>(row) * 2;
  for (const auto& [pos, blk] : steps) {
    const size_t off = static_cast<size_t>(blk * block + pos) * row_bytes;
    EXPECT_NE(std::memcmp(kc.data() + off, kraw.data() + off, row_bytes), 0)
        << "position " << pos << " of block " << blk << " was not written";
  }
}

// ---- argmax, graphs, memory, errors ---------------------------------------------------------------------------
TEST_F(CudaOps, Argmax) {
  const int64_t n = 128256;
  auto x = rand_floats(rng_, n, -10.0f, 10.0f);
  x[77777] = 50.0f;
  x[99999] = 50.0f;  // tie: the lower index wins
  x[12] = std::numeric_limits<float>::quiet_NaN();
  Guarded xb(*be_, n * 4);
  xb.put(x.data());
  EXPECT_EQ(cuda_argmax(*be_, xb.f(), n), 77777);
  int32_t best = 0;  // NaN at 12 never wins
  for (int32_t i = 1; i < 5000; ++i)
    if (std::isnan(x[best]) || (!std::isnan(x[i]) && x[i] > x[best])) best = i;
  EXPECT_EQ(cuda_argmax(*be_, xb.f(), 5000), best);
}

// Device top-k (one to three rounds of block sorts, the atomic argmax for k = 1, the host path above 256)
// against a plain sort in candidate order on the host; extra ids gathered from the same row.
TEST_F(CudaOps, TopCandidatesMatchAHostSort) {
  for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{4096}, int64_t{4097}, int64_t{128256}, int64_t{152064}}) {
    std::vector<float> x = rand_floats(rng_, n, -4.0f, 4.0f);
    for (auto& v : x) v = std::round(v * 8.0f) / 8.0f;  // many exact ties
    if (n > 100) {
      x[3] = std::numeric_limits<float>::quiet_NaN();
      x[50] = -0.0f;
      x[51] = 0.0f;
      x[n - 1] = 4.0f;
    }
    std::vector<int> order(static_cast<size_t>(n));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
      const float va = x[size_t(a)], vb = x[size_t(b)];
      if (std::isnan(va) != std::isnan(vb)) return std::isnan(vb);
      return !std::isnan(va) && va > vb;  // ties keep index order (stable)
    });
    Guarded xb(*be_, n * 4);
    xb.put(x.data());
    const std::vector<int32_t> extra = {0, static_cast<int32_t>(n - 1), static_cast<int32_t>(n / 2)};
    for (int k : {1, 2, 40, 256, 300}) {
      std::vector<CandidateAnswer> ans;
      be_->top_candidates(xb.f(), n, {CandidateQuery{k, extra}}, ans);
      ASSERT_EQ(ans.size(), 1u);
      testing_support::expect_candidates(ans[0].top, order, x.data(), n, k,
                                         "n " + std::to_string(n) + " k " + std::to_string(k));
      ASSERT_EQ(ans[0].extra_values.size(), 3u);
      for (int e = 0; e < 3; ++e)
        EXPECT_EQ(std::memcmp(&ans[0].extra_values[size_t(e)], &x[size_t(extra[size_t(e)])], 4), 0) << "extra " << e;
    }
    (void)xb.get<float>();  // guards intact
  }
}

// A step's rows asked together (one wait): each row's answer is the one a plain sort of that row gives.
TEST_F(CudaOps, TopCandidatesOfSeveralRowsEachMatchAHostSort) {
  const int64_t n = 4099, n_rows = 5;
  std::vector<float> x = rand_floats(rng_, n * n_rows, -4.0f, 4.0f);
  for (auto& v : x) v = std::round(v * 8.0f) / 8.0f;  // many exact ties
  Guarded xb(*be_, n * n_rows * 4);
  xb.put(x.data());
  // all k = 1 (one argmax launch for the rows), mixed (a kernel per row), one row past the device's k (host)
  for (const std::vector<int>& ks :
       {std::vector<int>{1, 1, 1, 1, 1}, std::vector<int>{1, 7, 1, 256, 2}, std::vector<int>{1, 300, 3, 1, 1}}) {
    std::vector<CandidateQuery> q(n_rows);
    for (int64_t r = 0; r < n_rows; ++r) {
      q[size_t(r)].k = ks[size_t(r)];
      for (int64_t e = 0; e < r; ++e) q[size_t(r)].extra.push_back(static_cast<int32_t>((e * 977 + r * 31) % n));
    }
    std::vector<CandidateAnswer> ans;
    be_->top_candidates(xb.f(), n, q, ans);
    ASSERT_EQ(ans.size(), size_t(n_rows));
    for (int64_t r = 0; r < n_rows; ++r) {
      const float* row = x.data() + r * n;
      std::vector<int> order(static_cast<size_t>(n));
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return row[a] > row[b]; });  // no NaN here
      testing_support::expect_candidates(ans[size_t(r)].top, order, row, n, ks[size_t(r)],
                                         "row " + std::to_string(r) + " k " + std::to_string(ks[size_t(r)]));
      ASSERT_EQ(ans[size_t(r)].extra_values.size(), q[size_t(r)].extra.size());
      for (size_t e = 0; e < q[size_t(r)].extra.size(); ++e)
        EXPECT_EQ(ans[size_t(r)].extra_values[e], row[q[size_t(r)].extra[e]]) << "row " << r << " extra " << e;
    }
  }
  (void)xb.get<float>();  // guards intact
}

TEST_F(CudaOps, GraphReplayMatchesEagerSteps) {
  // A miniature decode step: norm, matvec, rope, kv_store, attention, argmax. The graph and the eager
  // backend must agree bit for bit at every position (same kernels, positions read from device memory).
  auto eager = make_cuda_backend(0, GgmlType::F16);
  const int64_t E = 256, HKV = 2, G = 4, D = 64, H = HKV * G, n_ctx = 64;
  const HostWeight hw = make_host_weight(rng_, GgmlType::Q4_K, H * D, E, 0);
  const auto w_norm = rand_floats(rng_, E, 0.5f, 1.5f), x0 = rand_floats(rng_, E);
  const auto ff = rand_floats(rng_, D / 2, 1.0f, 4.0f);
  struct Side {
    Backend* be;
    std::unique_ptr<DeviceBuffer> w, nw, x, xn, q, k, v, att, kc, vc, tok;
  };
  auto setup = [&](Backend& be) {
    Side s;
    s.be = &be;
    s.w = be.alloc(hw.bytes.size());
    be.upload(s.w->data(), hw.bytes.data(), hw.bytes.size());
    s.nw = be.alloc(E * 4);
    be.upload(s.nw->data(), w_norm.data(), E * 4);
    s.x = be.alloc(E * 4);
    be.upload(s.x->data(), x0.data(), E * 4);
    s.xn = be.alloc(E * 4);
    s.q = be.alloc(H * D * 4);
    s.att = be.alloc(H * D * 4);
    s.kc = be.alloc(n_ctx * HKV * D * 2);
    s.vc = be.alloc(n_ctx * HKV * D * 2);
    s.tok = be.alloc(4);
    return s;
  };
  Side a = setup(*be_), b = setup(*eager);
  auto body = [&](Side& s) {
    return [&s, &hw, &ff, E, H, HKV, D, n_ctx] {
      Backend& be = *s.be;
      const WeightView w{GgmlType::Q4_K, E, H * D, hw.stride, s.w->data()};
      const KvLayerView kv{GgmlType::F16, 1, n_ctx, HKV, D, s.kc->data(), s.vc->data()};
      be.rms_norm(s.x->as<float>(), s.nw->as<float>(), s.xn->as<float>(), 1, E, 1e-5f);
      be.matmul(w, s.xn->as<float>(), s.q->as<float>(), 1);
      be.rope(s.q->as<float>(), 1, H, D, 10000.0f, ff.data());
      be.kv_store(kv, s.q->as<float>(), s.q->as<float>() + HKV * D, 1);
      be.attention(s.q->as<float>(), kv, 1, H, s.att->as<float>());
      be.add(s.x->as<float>(), s.att->as<float>(), E);  // the state feeds the next step
      cuda_argmax_async(be, s.att->as<float>(), H * D, s.tok->as<int32_t>());
    };
  };
  CudaGraphRunner graph(*be_);
  auto fa = body(a), fb = body(b);
  for (int64_t pos = 0; pos < 12; ++pos) {
    graph.run(one_seq(pos, 1), fa);
    eager->begin_step(one_seq(pos, 1));
    fb();
    std::vector<float> ga(H * D), gb(H * D);
    be_->download(ga.data(), a.att->data(), ga.size() * 4);
    eager->download(gb.data(), b.att->data(), gb.size() * 4);
    ASSERT_EQ(0, std::memcmp(ga.data(), gb.data(), ga.size() * 4)) << "graph and eager differ at pos " << pos;
    for (float f : ga) ASSERT_TRUE(std::isfinite(f));
  }
  EXPECT_EQ(graph.captures(), 1);
  EXPECT_EQ(graph.replays(), 11);
  EXPECT_TRUE(graph.captured());
}

TEST_F(CudaOps, MemoryAccountingAndErrors) {
  const size_t before = be_->allocated_bytes();
  {
    auto buf = be_->alloc(10u << 20);
    EXPECT_GE(be_->allocated_bytes(), before + (10u << 20));
  }
  EXPECT_EQ(be_->allocated_bytes(), before);
  EXPECT_THROW(make_cuda_backend(cuda_device_count(), GgmlType::F16), Error);
  EXPECT_THROW(make_cuda_backend(0, GgmlType::Q8_0), Error);
  EXPECT_TRUE(be_->supports(GgmlType::Q4_K));
  EXPECT_TRUE(be_->supports(GgmlType::Q5_K));  // the generic kernels (test_cuda_weight_types.cpp)
  EXPECT_FALSE(be_->supports(GgmlType::TQ2_0));
  auto buf = be_->alloc(4096);
  try {
    be_->matmul(WeightView{GgmlType::TQ2_0, 256, 1, 66, buf->data()}, buf->as<float>(), buf->as<float>(), 1);
    ADD_FAILURE() << "TQ2_0 accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kUnsupported);
  }
  EXPECT_NE(be_->name().find("cuda:0"), std::string::npos);
}

TEST(CudaNoGpu, DeviceCountNeverThrows) {
  EXPECT_NO_THROW((void)cuda_device_count());
  EXPECT_GE(cuda_device_count(), 0);
}

}  // namespace
}  // namespace shardlm
