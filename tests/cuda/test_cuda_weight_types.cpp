// The CUDA backend on the weight types beyond F32/F16/BF16/Q8_0/Q4_0/Q4_K/Q6_K (Q4_1 ... IQ1_M, MXFP4: the
// "grouped" types of src/backends/cuda/kernels.cuh, which take the generic kernels everywhere) against the
// quant library's CPU decoder (dequantize_row, quant/quant.h), an independent reading of the same bytes:
//   * get_rows (embeddings) must equal the CPU decoder bit for bit: both follow ggml's dequantize_row_* float
//     operations in ggml's order without FMA contraction, so any difference is a decoding bug;
//   * decode (n_tok 1), small batches (2..8 tokens: one matvec per token) and prefill (> 8 tokens: the rows
//     dequantized to fp16, then cuBLAS) against fp64 dot products of the CPU-decoded weights;
//   * matmul_group (decode and prefill, mixed with a fast-path type), weights placed the loader's way
//     (place_matmul_weight: never packed), and a decode matvec inside a CUDA graph.
// Rows are 256-multiples for the K/IQ types and multiples of 32 that are not multiples of 256 for the
// 32-element ones (odd block counts: MXFP4 rows of 17-byte blocks have odd lengths); weights also sit at odd
// addresses with odd row strides. Every test skips when no GPU is visible.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "backends/cuda/cuda_backend.h"
#include "core/dtype.h"
#include "core/error.h"
#include "quant/quant.h"

namespace shardlm {
namespace {

const GgmlType kTypes[] = {GgmlType::Q4_1,   GgmlType::Q5_0,    GgmlType::Q5_1,   GgmlType::Q2_K,
                           GgmlType::Q3_K,   GgmlType::Q5_K,    GgmlType::IQ4_NL, GgmlType::IQ4_XS,
                           GgmlType::MXFP4,  GgmlType::IQ3_XXS, GgmlType::IQ3_S,  GgmlType::IQ2_XXS,
                           GgmlType::IQ2_XS, GgmlType::IQ2_S,   GgmlType::IQ1_S,  GgmlType::IQ1_M};

// Row widths per type: two of them, a short and a long one.
std::vector<int64_t> widths(GgmlType t) {
  if (block_size(t) == 256) return {256, 2816};  // 1 and 11 super-blocks
  return {800, 4000};                             // 25 and 125 blocks: not multiples of 256
}

// ---- host data --------------------------------------------------------------------------------------------
// Byte offsets of a block's fp16 scale fields (d, and dmin / m where the format has one); also the fast-path
// types that the group tests mix in.
std::vector<int> f16_fields(GgmlType t) {
  switch (t) {
    case GgmlType::Q4_1:
    case GgmlType::Q5_1:
    case GgmlType::Q4_K:
    case GgmlType::Q5_K: return {0, 2};
    case GgmlType::Q2_K: return {80, 82};
    case GgmlType::Q3_K: return {108};
    case GgmlType::Q6_K: return {208};
    case GgmlType::MXFP4:
    case GgmlType::IQ1_M: return {};  // e8m0 exponent / fp16 spread over the scale nibbles: see rand_rows
    default: return {0};
  }
}

// `rows` random rows of `type` (n elements), `stride` bytes apart: random bytes everywhere (every quant, grid
// index and sign pattern occurs), then finite scales of realistic size with random sign: fp16 2^-10 .. 2^-5
// (normal numbers), MXFP4 exponents 2^-10 .. 2^-7.
std::vector<uint8_t> rand_rows(std::mt19937_64& rng, GgmlType t, int64_t rows, int64_t n, size_t stride) {
  std::vector<uint8_t> b(stride * static_cast<size_t>(rows));
  std::uniform_int_distribution<int> byte(0, 255), mant(0, 1023), ex(5, 10), e8(118, 121);
  for (auto& x : b) x = static_cast<uint8_t>(byte(rng));
  auto f16 = [&] { return static_cast<uint16_t>((byte(rng) & 1) << 15 | ex(rng) << 10 | mant(rng)); };
  const int64_t bs = block_size(t), ts = type_size(t);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < n / bs; ++k) {
      uint8_t* blk = b.data() + static_cast<size_t>(r) * stride + static_cast<size_t>(k * ts);
      for (int off : f16_fields(t)) {
        const uint16_t h = f16();
        std::memcpy(blk + off, &h, 2);
      }
      if (t == GgmlType::MXFP4) blk[0] = static_cast<uint8_t>(e8(rng));
      if (t == GgmlType::IQ1_M) {  // d's nibble i is the top nibble of the u16 scales[i] at bytes 48 + 2i
        const uint16_t h = f16();
        for (int i = 0; i < 4; ++i) blk[49 + 2 * i] = static_cast<uint8_t>((blk[49 + 2 * i] & 0x0F) | (((h >> (4 * i)) & 0xF) << 4));
      }
    }
  return b;
}

// The CPU decoder's values of one row (fails the test, naming the type, while its codec is missing).
std::vector<float> cpu_row(GgmlType t, const uint8_t* row, int64_t n) {
  std::vector<float> y(static_cast<size_t>(n));
  try {
    dequantize_row(t, row, y.data(), n);
  } catch (const std::exception& e) {
    ADD_FAILURE() << "the CPU decoder of " << type_name(t) << " failed: " << e.what();
    std::fill(y.begin(), y.end(), 0.0f);
  }
  return y;
}

// ---- device buffers with sentinels ------------------------------------------------------------------------
constexpr uint8_t kSentinel = 0xA5;
constexpr size_t kGuard = 256;  // keeps the payload 16-byte aligned inside the 256-byte aligned allocation

// `bytes` bytes in the middle of a device buffer, guarded on both sides.
class Guarded {
 public:
  Guarded(Backend& b, size_t bytes) : b_(b), bytes_(bytes) {
    buf_ = b.alloc(bytes + 2 * kGuard);
    const std::vector<uint8_t> init(bytes + 2 * kGuard, kSentinel);
    b.upload(buf_->data(), init.data(), init.size());
  }
  uint8_t* ptr() { return static_cast<uint8_t*>(buf_->data()) + kGuard; }
  float* f() { return reinterpret_cast<float*>(ptr()); }
  void put(const void* host, size_t bytes, size_t at = 0) { b_.upload(ptr() + at, host, bytes); }
  std::vector<float> floats() {
    std::vector<uint8_t> all(bytes_ + 2 * kGuard);
    b_.download(all.data(), buf_->data(), all.size());
    for (size_t i = 0; i < kGuard; ++i)
      if (all[i] != kSentinel || all[kGuard + bytes_ + i] != kSentinel) {
        ADD_FAILURE() << "a guard byte next to the output was overwritten (" << i << ")";
        break;
      }
    std::vector<float> out(bytes_ / 4);
    std::memcpy(out.data(), all.data() + kGuard, out.size() * 4);
    return out;
  }

 private:
  Backend& b_;
  size_t bytes_;
  std::unique_ptr<DeviceBuffer> buf_;
};

// |got - ref| <= atol + rtol * scale[i], all finite; reports the worst element.
void expect_close(const std::vector<float>& got, const std::vector<double>& ref, const std::vector<double>& scale,
                  double atol, double rtol, const std::string& what) {
  ASSERT_EQ(got.size(), ref.size()) << what;
  double worst = -1;
  size_t wi = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_TRUE(std::isfinite(got[i])) << what << ": non-finite output " << got[i] << " at " << i;
    const double share = std::fabs(got[i] - ref[i]) / (atol + rtol * scale[i]);
    if (share > worst) {
      worst = share;
      wi = i;
    }
  }
  EXPECT_LE(worst, 1.0) << what << ": worst element " << wi << " got " << got[wi] << " ref " << ref[wi] << " tol "
                        << atol + rtol * scale[wi];
}

// A weight in device memory (ggml rows `stride` bytes apart, row 0 `lead` bytes past a 16-byte boundary)
// and its CPU-decoded rows.
struct Weight {
  std::vector<uint8_t> host;           // (rows, stride)
  std::vector<std::vector<float>> deq;  // (rows, cols) from dequantize_row
  std::unique_ptr<Guarded> dev;
  WeightView view;
};

Weight make_weight(Backend& be, std::mt19937_64& rng, GgmlType t, int64_t rows, int64_t cols, size_t pad = 0,
                   size_t lead = 0) {
  Weight w;
  const size_t stride = static_cast<size_t>(row_bytes(t, cols)) + pad;
  w.host = rand_rows(rng, t, rows, cols, stride);
  for (int64_t r = 0; r < rows; ++r) w.deq.push_back(cpu_row(t, w.host.data() + static_cast<size_t>(r) * stride, cols));
  w.dev = std::make_unique<Guarded>(be, w.host.size() + lead);
  w.dev->put(w.host.data(), w.host.size(), lead);
  w.view = WeightView{t, cols, rows, stride, w.dev->ptr() + lead};
  return w;
}

// fp64 y[t, r] = sum_c deq[r][c] x[t, c], and sum_c |deq[r][c] x[t, c]| (the tolerances' scale).
void reference(const Weight& w, const std::vector<float>& x, int64_t n_tok, std::vector<double>& ref,
               std::vector<double>& scale) {
  const int64_t rows = w.view.n_rows, cols = w.view.n_cols;
  ref.assign(static_cast<size_t>(n_tok * rows), 0.0);
  scale.assign(ref.size(), 0.0);
  for (int64_t t = 0; t < n_tok; ++t)
    for (int64_t r = 0; r < rows; ++r) {
      double s = 0, a = 0;
      for (int64_t c = 0; c < cols; ++c) {
        const double p = static_cast<double>(w.deq[r][c]) * x[t * cols + c];
        s += p;
        a += std::fabs(p);
      }
      ref[t * rows + r] = s;
      scale[t * rows + r] = a;
    }
}

// Tolerance of a product of n_tok tokens, relative to sum |w x|. Matvecs (n_tok <= 8 for block types)
// accumulate f32 products of the exact f32 weights: a few eps per term at most, 1e-5 bounds it with margin
// for these widths. Prefill rounds x and the dequantized weights to fp16 before cuBLAS (fp32
// accumulation): 2^-11 relative per operand, so 2^-10 of sum |w x| bounds it.
double rtol_for(int64_t n_tok) { return n_tok > 8 ? 1.0 / 1024 : 1e-5; }
// Absolute floor for rows whose sum |w x| is tiny; far below any product's size here (weights >= ~1e-4).
constexpr double kAtol = 1e-6;

std::vector<float> rand_x(std::mt19937_64& rng, size_t n) {
  std::uniform_real_distribution<float> d(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

class CudaWeightTypes : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device visible";
    be_ = make_cuda_backend(0, GgmlType::F16);
  }

  // matmul of one weight with n_tok tokens of x (x offset by x_off floats: not 16-byte aligned when odd).
  void run_matmul(GgmlType t, int64_t rows, int64_t cols, int64_t n_tok, size_t pad = 0, size_t lead = 0,
                  size_t x_off = 0) {
    const std::string what = std::string("matmul ") + type_name(t) + " " + std::to_string(rows) + "x" +
                             std::to_string(cols) + " n_tok " + std::to_string(n_tok) + " pad " + std::to_string(pad) +
                             " lead " + std::to_string(lead) + " xoff " + std::to_string(x_off);
    SCOPED_TRACE(what);
    Weight w = make_weight(*be_, rng_, t, rows, cols, pad, lead);
    const auto x = rand_x(rng_, static_cast<size_t>(n_tok * cols));
    Guarded xb(*be_, (x.size() + x_off) * 4), yb(*be_, static_cast<size_t>(n_tok * rows) * 4);
    xb.put(x.data(), x.size() * 4, x_off * 4);
    be_->matmul(w.view, xb.f() + x_off, yb.f(), n_tok);
    std::vector<double> ref, scale;
    reference(w, x, n_tok, ref, scale);
    expect_close(yb.floats(), ref, scale, kAtol, rtol_for(n_tok), what);
  }

  std::unique_ptr<Backend> be_;
  std::mt19937_64 rng_{20260301};
};

TEST_F(CudaWeightTypes, SupportedAndOthersRefused) {
  for (GgmlType t : kTypes) EXPECT_TRUE(be_->supports(t)) << type_name(t);
  for (GgmlType t : {GgmlType::Q8_1, GgmlType::Q8_K, GgmlType::TQ1_0, GgmlType::TQ2_0, GgmlType::I8})
    EXPECT_FALSE(be_->supports(t)) << type_name(t);
}

// Embedding lookups: bit for bit the CPU decoder's floats, for tables at 16-byte aligned and odd addresses
// with tight and odd row strides.
TEST_F(CudaWeightTypes, GetRowsEqualsCpuDecoder) {
  for (GgmlType t : kTypes)
    for (int64_t cols : widths(t))
      for (auto [pad, lead] : {std::pair<size_t, size_t>{0, 0}, {3, 1}}) {
        const std::string what = std::string("get_rows ") + type_name(t) + " cols " + std::to_string(cols) + " pad " +
                                 std::to_string(pad) + " lead " + std::to_string(lead);
        SCOPED_TRACE(what);
        const int64_t rows = 37;
        Weight w = make_weight(*be_, rng_, t, rows, cols, pad, lead);
        const std::vector<int32_t> ids = {5, 0, 36, 5, 17, 2, 33};
        Guarded out(*be_, ids.size() * static_cast<size_t>(cols) * 4);
        be_->get_rows(w.view, ids.data(), static_cast<int64_t>(ids.size()), out.f());
        const auto got = out.floats();
        int64_t bad = 0;
        for (size_t i = 0; i < ids.size(); ++i)
          for (int64_t c = 0; c < cols; ++c) {
            const float g = got[i * cols + c], r = w.deq[ids[i]][c];
            if (std::memcmp(&g, &r, 4) != 0 && bad++ < 5)
              ADD_FAILURE() << what << ": row " << ids[i] << " element " << c << " got " << g << " cpu " << r;
          }
        EXPECT_EQ(bad, 0) << what << ": elements that differ from the CPU decoder";
      }
}

// Decode: one token, odd row counts, weights at odd addresses / strides, x not 16-byte aligned.
TEST_F(CudaWeightTypes, MatvecDecode) {
  for (GgmlType t : kTypes)
    for (int64_t cols : widths(t)) {
      run_matmul(t, 1, cols, 1);
      run_matmul(t, 37, cols, 1);
      run_matmul(t, 300, cols, 1, 3, 1, 1);
    }
  for (GgmlType t : kTypes) run_matmul(t, 4099, block_size(t) == 256 ? 4096 : 4064, 1);  // a layer-sized weight
}

// 2..8 tokens: one matvec per token.
TEST_F(CudaWeightTypes, MatmulSmallBatch) {
  for (GgmlType t : kTypes) {
    const auto w = widths(t);
    run_matmul(t, 37, w[0], 2);
    run_matmul(t, 129, w[1], 5, 3, 1, 1);
    run_matmul(t, 65, w[1], 8);
  }
}

// Prefill (> 8 tokens): dequantized to fp16, then cuBLAS.
TEST_F(CudaWeightTypes, MatmulPrefill) {
  for (GgmlType t : kTypes) {
    const auto w = widths(t);
    run_matmul(t, 129, w[0], 9);
    run_matmul(t, 300, w[1], 64, 3, 1, 0);
    run_matmul(t, 33, w[1], 17, 0, 0, 1);
  }
}

// q/k/v- and gate/up-like groups (same x): decode (the group launch declines these types, one matvec per
// weight), prefill (x converted to fp16 once), and a mixed group with a fast-path type.
TEST_F(CudaWeightTypes, MatmulGroup) {
  auto run = [&](const std::vector<GgmlType>& types, const std::vector<int64_t>& rows, int64_t cols, int64_t n_tok) {
    std::string what = "matmul_group";
    for (size_t i = 0; i < types.size(); ++i) what += std::string(" ") + type_name(types[i]) + ":" + std::to_string(rows[i]);
    what += " cols " + std::to_string(cols) + " n_tok " + std::to_string(n_tok);
    SCOPED_TRACE(what);
    std::vector<Weight> ws;
    std::vector<WeightView> views;
    std::vector<std::unique_ptr<Guarded>> yb;
    std::vector<float*> ys;
    for (size_t i = 0; i < types.size(); ++i) {
      ws.push_back(make_weight(*be_, rng_, types[i], rows[i], cols));
      views.push_back(ws.back().view);
      yb.push_back(std::make_unique<Guarded>(*be_, static_cast<size_t>(n_tok * rows[i]) * 4));
      ys.push_back(yb.back()->f());
    }
    const auto x = rand_x(rng_, static_cast<size_t>(n_tok * cols));
    Guarded xb(*be_, x.size() * 4);
    xb.put(x.data(), x.size() * 4);
    be_->matmul_group(views.data(), static_cast<int>(views.size()), xb.f(), ys.data(), n_tok);
    for (size_t i = 0; i < types.size(); ++i) {
      std::vector<double> ref, scale;
      reference(ws[i], x, n_tok, ref, scale);
      expect_close(yb[i]->floats(), ref, scale, kAtol, rtol_for(n_tok), what + " weight " + std::to_string(i));
    }
  };
  for (GgmlType t : kTypes) {
    const int64_t cols = widths(t)[1];
    run({t, t, t}, {512, 128, 128}, cols, 1);
    run({t, t}, {300, 300}, cols, 4);
    run({t, t, t}, {256, 64, 64}, cols, 33);
  }
  // Q5_K_M / Q3_K_M / IQ-mix style layers: a grouped type beside a fast-path one (and the other way round)
  run({GgmlType::Q5_K, GgmlType::Q5_K, GgmlType::Q6_K}, {512, 128, 128}, 1024, 1);
  run({GgmlType::Q4_K, GgmlType::IQ4_XS, GgmlType::Q3_K}, {256, 64, 64}, 1024, 1);
  run({GgmlType::Q8_0, GgmlType::MXFP4}, {100, 60}, 2880, 1);
  run({GgmlType::IQ2_XS, GgmlType::Q4_K}, {256, 64}, 1024, 40);
}

// The loader's path for matmul weights: place_matmul_weight keeps these types in ggml's layout (no packing),
// and the placed copy multiplies like the uploaded rows, decode and prefill.
TEST_F(CudaWeightTypes, PlacedWeightsStayUnpacked) {
  for (GgmlType t : kTypes) {
    const int64_t rows = 67, cols = widths(t)[1];
    const std::string what = std::string("placed ") + type_name(t);
    SCOPED_TRACE(what);
    Weight w = make_weight(*be_, rng_, t, rows, cols);
    std::vector<std::unique_ptr<DeviceBuffer>> storage;
    const WeightView placed =
        be_->place_matmul_weight(WeightView{t, cols, rows, w.view.row_stride, w.host.data()}, storage);
    EXPECT_FALSE(placed.packed);
    EXPECT_EQ(placed.row_stride, w.view.row_stride);
    for (int64_t n_tok : {1, 12}) {
      const auto x = rand_x(rng_, static_cast<size_t>(n_tok * cols));
      Guarded xb(*be_, x.size() * 4), yb(*be_, static_cast<size_t>(n_tok * rows) * 4);
      xb.put(x.data(), x.size() * 4);
      be_->matmul(placed, xb.f(), yb.f(), n_tok);
      std::vector<double> ref, scale;
      reference(w, x, n_tok, ref, scale);
      expect_close(yb.floats(), ref, scale, kAtol, rtol_for(n_tok), what + " n_tok " + std::to_string(n_tok));
    }
  }
}

// A decode matvec captured into a CUDA graph and replayed (the model's decode steps run this way) gives the
// eager result, bit for bit (same kernel, same inputs).
TEST_F(CudaWeightTypes, DecodeInsideCudaGraph) {
  for (GgmlType t : {GgmlType::Q5_K, GgmlType::IQ2_XXS, GgmlType::MXFP4}) {
    SCOPED_TRACE(type_name(t));
    const int64_t rows = 300, cols = widths(t)[1];
    Weight w = make_weight(*be_, rng_, t, rows, cols);
    const auto x = rand_x(rng_, static_cast<size_t>(cols));
    Guarded xb(*be_, x.size() * 4), y0(*be_, static_cast<size_t>(rows) * 4), y1(*be_, static_cast<size_t>(rows) * 4);
    xb.put(x.data(), x.size() * 4);
    be_->matmul(w.view, xb.f(), y0.f(), 1);
    CudaGraphRunner graph(*be_);
    for (int step = 0; step < 3; ++step)
      graph.run(BatchInfo::single(step, 1, {0}, false), [&] { be_->matmul(w.view, xb.f(), y1.f(), 1); });
    EXPECT_GE(graph.replays(), 1);
    const auto a = y0.floats(), b = y1.floats();
    EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * 4), 0);
  }
}

}  // namespace
}  // namespace shardlm
