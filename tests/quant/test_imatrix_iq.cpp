// Importance-matrix quantization of the IQ types (quantize_row_imatrix for IQ2_XXS, IQ2_XS, IQ1_S, IQ1_M,
// IQ3_XXS, IQ3_S, IQ2_S): round-trip error bounds, that importance moves the error away from the columns
// it favours, and that the lazily built grid-search tables are safe to build from two threads at once.
// Byte identity with ggml_quantize_chunk(type, x, y, 0, 1, n, imatrix) was checked against libggml outside
// the repository (see the commit message); here the FNV-1a hashes of libggml's bytes for one fixed row pin it,
// and the other tests pin the quality and the behaviour.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <latch>
#include <random>
#include <thread>
#include <vector>

#include "core/dtype.h"
#include "quant/quant.h"

namespace shardlm {
namespace {

constexpr GgmlType kTypes[] = {GgmlType::IQ2_XXS, GgmlType::IQ2_XS, GgmlType::IQ1_S, GgmlType::IQ1_M,
                               GgmlType::IQ3_XXS, GgmlType::IQ3_S,  GgmlType::IQ2_S};

std::vector<float> gaussian(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.f, 1.f);
  std::vector<float> v(n);
  for (auto& f : v) f = dist(rng);
  return v;
}

// Positive importances spread over a factor of 100 (as llama-imatrix's mean squared activations are).
std::vector<float> importance(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.f, 1.f);
  std::vector<float> v(n);
  for (auto& f : v) f = std::pow(10.f, dist(rng));
  return v;
}

std::vector<uint8_t> quantize(GgmlType type, const std::vector<float>& x, const std::vector<float>& imatrix) {
  std::vector<uint8_t> q(row_bytes(type, static_cast<int64_t>(x.size())));
  quantize_row_imatrix(type, x.data(), q.data(), static_cast<int64_t>(x.size()), imatrix.data());
  return q;
}

std::vector<float> round_trip(GgmlType type, const std::vector<float>& x, const std::vector<float>& imatrix) {
  const std::vector<uint8_t> q = quantize(type, x, imatrix);
  std::vector<float> y(x.size());
  dequantize_row(type, q.data(), y.data(), static_cast<int64_t>(x.size()));
  return y;
}

// sqrt(sum (x-y)^2 / sum x^2) over the columns i with pick(i).
template <typename Pick>
double relative_rms(const std::vector<float>& x, const std::vector<float>& y, Pick pick) {
  double num = 0, den = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    if (!pick(i)) continue;
    num += (double(x[i]) - y[i]) * (double(x[i]) - y[i]);
    den += double(x[i]) * x[i];
  }
  return std::sqrt(num / den);
}

// First in the file, so that the grid-search tables are still unbuilt: both threads start together and
// race to build each type's table (function-local statics); each must see a complete table, so both get
// the bytes that one thread alone gets afterwards.
TEST(IqImatrix, LazyTablesAreThreadSafe) {
  const std::vector<float> x = gaussian(2048, 7);
  const std::vector<float> w = importance(2048, 8);
  std::vector<std::vector<uint8_t>> got[2];
  std::latch start(2);
  auto work = [&](int t) {
    start.arrive_and_wait();
    for (const GgmlType type : kTypes) got[t].push_back(quantize(type, x, w));
  };
  std::thread a(work, 0), b(work, 1);
  a.join();
  b.join();
  for (size_t k = 0; k < std::size(kTypes); ++k) {
    SCOPED_TRACE(type_name(kTypes[k]));
    EXPECT_EQ(got[0][k], got[1][k]);
    EXPECT_EQ(got[0][k], quantize(kTypes[k], x, w));
  }
}

// ggml_quantize_chunk(type, x, y, 0, 1, 2048, w) of libggml for the row below, hashed (FNV-1a 64). The row
// comes from an integer generator, so it is the same everywhere: roughly gaussian values with an outlier
// every 97 columns and an all-zero group; importances with a zero every 37 columns.
uint64_t fnv1a(const std::vector<uint8_t>& b) {
  uint64_t h = 14695981039346656037ull;
  for (const uint8_t c : b) h = (h ^ c) * 1099511628211ull;
  return h;
}

TEST(IqImatrix, MatchesGgmlBytes) {
  constexpr int n = 2048;
  std::vector<float> x(n), w(n);
  uint32_t s = 12345u;
  auto next = [&s] {
    s = s * 1664525u + 1013904223u;
    return static_cast<float>(s >> 8) / 16777216.f;
  };
  for (int i = 0; i < n; ++i) {
    // Operands named so their evaluation order is fixed.
    const float a = next(), b = next(), c = next();
    x[i] = (a + b + c - 1.5f) * (i % 97 == 0 ? 8.f : 1.f);
    w[i] = i % 37 == 0 ? 0.f : 0.01f + 4 * next();
  }
  for (int i = 512; i < 544; ++i) x[i] = 0;
  const struct {
    GgmlType type;
    uint64_t hash;
  } cases[] = {
      {GgmlType::IQ2_XXS, 0xe8e6f31e6c724962ull}, {GgmlType::IQ2_XS, 0xc969ef0c5723ac03ull},
      {GgmlType::IQ1_S, 0x33d4b437891587b1ull},   {GgmlType::IQ1_M, 0x868136106667257dull},
      {GgmlType::IQ3_XXS, 0xedbbc343595892aaull}, {GgmlType::IQ3_S, 0x8ec82d2934749370ull},
      {GgmlType::IQ2_S, 0xc90992fc6280d04dull},
  };
  for (const auto& c : cases) EXPECT_EQ(fnv1a(quantize(c.type, x, w)), c.hash) << type_name(c.type);
}

// Gaussian rows with random importances. The bounds are the relative RMS errors measured here (16
// super-blocks, seeds fixed: IQ2_XXS 0.3745, IQ2_XS 0.3349, IQ1_S 0.5303, IQ1_M 0.5103, IQ3_XXS 0.2071,
// IQ3_S 0.1488, IQ2_S 0.2634) plus 15%: a broken search or scale fit costs far more than that, while other
// data (another standard library's normal_distribution) or other float contraction moves them by a few %.
TEST(IqImatrix, RoundTripError) {
  struct Case {
    GgmlType type;
    double bound;
  };
  const Case cases[] = {
      {GgmlType::IQ2_XXS, 0.431}, {GgmlType::IQ2_XS, 0.385}, {GgmlType::IQ1_S, 0.610},
      {GgmlType::IQ1_M, 0.587},   {GgmlType::IQ3_XXS, 0.238}, {GgmlType::IQ3_S, 0.172},
      {GgmlType::IQ2_S, 0.303},
  };
  const std::vector<float> x = gaussian(4096, 11);
  const std::vector<float> w = importance(4096, 12);
  for (const Case& c : cases) {
    const double err = relative_rms(x, round_trip(c.type, x, w), [](size_t) { return true; });
    EXPECT_LT(err, c.bound) << type_name(c.type);
  }
}

// One column in 8 made 100x as important as the rest: its error must drop well below what it is under
// uniform importance. Measured (relative RMS on those columns, uniform -> focused): IQ2_XXS 0.365 -> 0.202
// (x0.55), IQ2_XS x0.54, IQ1_S x0.65, IQ1_M x0.42, IQ3_XXS x0.43, IQ3_S x0.60, IQ2_S 0.245 -> 0.161 (x0.66);
// the bound is the weakest of these plus 15%.
TEST(IqImatrix, ImportanceLowersErrorWhereItIsHigh) {
  const std::vector<float> x = gaussian(4096, 21);
  const std::vector<float> uniform(x.size(), 1.f);
  std::vector<float> focused(x.size(), 1.f);
  for (size_t i = 0; i < x.size(); i += 8) focused[i] = 100.f;
  auto favoured = [](size_t i) { return i % 8 == 0; };
  for (const GgmlType type : kTypes) {
    const double before = relative_rms(x, round_trip(type, x, uniform), favoured);
    const double after = relative_rms(x, round_trip(type, x, focused), favoured);
    EXPECT_LT(after, 0.76 * before) << type_name(type);
  }
}

}  // namespace
}  // namespace shardlm
