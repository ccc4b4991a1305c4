// dot_row / matvec_rows / matmul_rows for every type x ISA x shape against an fp64 dot on the
// *dequantized* weights, so the tolerance measures the kernel, not the quantization.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/error.h"
#include "quant/quant.h"

namespace shardlm {
namespace {

// Every type with CPU kernels (each has a register decoder in every SIMD family).
constexpr GgmlType kTypes[] = {
    GgmlType::F32,  GgmlType::F16,    GgmlType::BF16,   GgmlType::Q8_0,    GgmlType::Q4_0,  GgmlType::Q4_K,
    GgmlType::Q6_K, GgmlType::Q4_1,   GgmlType::Q5_0,   GgmlType::Q5_1,    GgmlType::Q2_K,  GgmlType::Q3_K,
    GgmlType::Q5_K, GgmlType::IQ4_NL, GgmlType::IQ4_XS, GgmlType::MXFP4,   GgmlType::IQ3_XXS, GgmlType::IQ3_S,
    GgmlType::IQ2_XXS, GgmlType::IQ2_XS, GgmlType::IQ2_S, GgmlType::IQ1_S, GgmlType::IQ1_M};
constexpr CpuIsa kIsas[] = {CpuIsa::kScalar, CpuIsa::kAvx2, CpuIsa::kAvx512};
constexpr float kSentinel = -12345.0f;

std::vector<float> random_floats(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& f : v) f = dist(rng);
  return v;
}

// Random blocks of a type that cannot be written without an importance matrix (IQ2_XXS, IQ2_XS, IQ1_S,
// IQ1_M): random bytes with a finite fp16 block scale of about 0.01 (IQ1_M spreads it over the top nibbles
// of its four scale words, bytes 48..55; the others keep it in bytes 0..1).
void random_blocks(GgmlType type, uint8_t* row, int64_t n_cols, std::mt19937& rng) {
  const int64_t nb = n_cols / block_size(type), bytes = type_size(type);
  for (int64_t i = 0; i < nb * bytes; ++i) row[i] = static_cast<uint8_t>(rng());
  const uint16_t d = fp32_to_fp16(0.01f);
  for (int64_t b = 0; b < nb; ++b) {
    uint8_t* blk = row + b * bytes;
    if (type == GgmlType::IQ1_M) {
      for (int k = 0; k < 4; ++k) {
        uint16_t word;
        std::memcpy(&word, blk + 48 + 2 * k, 2);
        word = static_cast<uint16_t>((word & 0x0FFF) | (((d >> (4 * k)) & 0xF) << 12));
        std::memcpy(blk + 48 + 2 * k, &word, 2);
      }
    } else {
      std::memcpy(blk, &d, 2);
    }
  }
}

// Weights for n_rows rows, quantized, each row placed row_stride bytes apart starting at byte `offset`
// of the buffer (an odd offset makes every row unaligned, as a row inside a GGUF tensor may be).
struct Weights {
  std::vector<uint8_t> bytes;
  const uint8_t* base = nullptr;
  size_t stride = 0;
  std::vector<float> deq;  // (n_rows, n_cols) dequantized reference weights
};

Weights make_weights(GgmlType type, int64_t n_rows, int64_t n_cols, size_t extra_stride, size_t offset,
                     uint32_t seed) {
  Weights w;
  const size_t rb = static_cast<size_t>(row_bytes(type, n_cols));
  w.stride = rb + extra_stride;
  w.bytes.assign(offset + w.stride * static_cast<size_t>(n_rows) + 1, 0xA5);
  w.base = w.bytes.data() + offset;
  w.deq.resize(static_cast<size_t>(n_rows * n_cols));
  const auto src = random_floats(static_cast<size_t>(n_rows * n_cols), seed);
  std::mt19937 rng(seed);
  for (int64_t r = 0; r < n_rows; ++r) {
    uint8_t* row = w.bytes.data() + offset + static_cast<size_t>(r) * w.stride;
    if (can_quantize(type)) {
      quantize_row(type, src.data() + r * n_cols, row, n_cols);
    } else {
      random_blocks(type, row, n_cols, rng);
    }
    dequantize_row(type, row, w.deq.data() + r * n_cols, n_cols);
  }
  return w;
}

// Tolerance: fp32 accumulation of n products has a rounding error bounded by about n_terms * 2^-24 *
// sum|w*x| per accumulator; with SIMD lanes (or several accumulators) each chain holds n/8..n/64 terms
// and the errors add like a random walk, so 1e-5 * sum|w*x| is ample for n = 4096 while a wrong element
// (any decode bug changes a term by >= one quantization step, ~1e-2 relative) exceeds it by orders of
// magnitude. The 1e-6 absolute part covers sums that cancel to ~0.
struct Check {
  double worst_share = 0;
  std::string worst;
  void add(double got, double ref, double sum_abs, const std::string& where) {
    const double tol = 1e-6 + 1e-5 * sum_abs;
    const double share = std::isnan(got) ? 1e30 : std::fabs(got - ref) / tol;
    if (share > worst_share) {
      worst_share = share;
      worst = where + ": got " + std::to_string(got) + " ref " + std::to_string(ref) + " tol " +
              std::to_string(tol);
    }
  }
};

// The activations a kernel multiplies: x itself, or its int8 rounding (quantize_activation_q8) dequantized,
// for the families and types that round them (quantizes_activations). Returns, per token and block, half the
// rounding step (d / 2, the largest error of one rounded value; 0 without rounding) in `half_step`.
std::vector<float> kernel_activations(CpuIsa isa, GgmlType type, const std::vector<float>& x, int64_t n_tok,
                                      int64_t ldx, int64_t n_cols, std::vector<double>& half_step) {
  std::vector<float> xr = x;
  half_step.assign(static_cast<size_t>(n_tok * (n_cols / 32 + 1)), 0.0);
  if (!quantizes_activations(isa, type)) return xr;
  std::vector<int8_t> q(static_cast<size_t>(n_cols));
  std::vector<float> d(static_cast<size_t>(n_cols / 32));
  for (int64_t t = 0; t < n_tok; ++t) {
    quantize_activation_q8(x.data() + t * ldx, n_cols, q.data(), d.data());
    for (int64_t i = 0; i < n_cols; ++i) xr[t * ldx + i] = static_cast<float>(q[i]) * d[i / 32];
    for (int64_t b = 0; b < n_cols / 32; ++b) half_step[t * (n_cols / 32 + 1) + b] = d[b] / 2;
  }
  return xr;
}

void run_case(CpuIsa isa, GgmlType type, int64_t n_rows, int64_t n_cols, int64_t n_tok) {
  const std::string name = std::string(cpu_isa_name(isa)) + " " + type_name(type) + " rows=" +
                           std::to_string(n_rows) + " cols=" + std::to_string(n_cols) + " tok=" +
                           std::to_string(n_tok);
  const auto w = make_weights(type, n_rows, n_cols, /*extra_stride=*/n_rows % 2 ? 3 : 0,
                              /*offset=*/1, static_cast<uint32_t>(n_rows * 31 + n_cols));
  const int64_t ldx = n_cols + 5, ldy = n_rows + 2;  // padded so stray writes/reads show up
  const auto x = random_floats(static_cast<size_t>(n_tok * ldx), static_cast<uint32_t>(n_tok + 7));
  // Checked twice: tightly against the activations the kernel multiplies (its rounding reproduced, so
  // any decode or rounding bug shows), and against the exact x within the rounding's own bound.
  std::vector<double> half_step;
  const auto xk = kernel_activations(isa, type, x, n_tok, ldx, n_cols, half_step);
  const auto check = [&](const std::vector<float>& y, const std::string& what) {
    Check c;
    double worst_raw = 0;
    std::string worst_raw_where;
    for (int64_t t = 0; t < n_tok; ++t) {
      for (int64_t r = 0; r < n_rows; ++r) {
        double ref = 0, sum_abs = 0, exact = 0, rounding = 0;
        for (int64_t i = 0; i < n_cols; ++i) {
          const double wi = w.deq[r * n_cols + i];
          const double p = wi * xk[t * ldx + i];
          ref += p;
          sum_abs += std::fabs(p);
          exact += wi * x[t * ldx + i];
          rounding += std::fabs(wi) * half_step[t * (n_cols / 32 + 1) + i / 32];
        }
        const double got = y[t * ldy + r];
        c.add(got, ref, sum_abs, "token " + std::to_string(t) + " row " + std::to_string(r));
        const double raw_share = std::fabs(got - exact) / (1e-6 + 1e-5 * sum_abs + rounding);
        if (!(raw_share <= worst_raw)) {
          worst_raw = std::isnan(raw_share) ? 1e30 : raw_share;
          worst_raw_where = "token " + std::to_string(t) + " row " + std::to_string(r);
        }
      }
      for (int64_t r = n_rows; r < ldy; ++r)
        ASSERT_EQ(y[t * ldy + r], kSentinel) << name << what << ": wrote past n_rows at token " << t;
    }
    EXPECT_LE(c.worst_share, 1.0) << name << what << ": worst " << c.worst << " (share " << c.worst_share << ")";
    EXPECT_LE(worst_raw, 1.0) << name << what << ": against the unrounded activations, worst at " << worst_raw_where;
  };
  std::vector<float> y(static_cast<size_t>(n_tok * ldy), kSentinel);
  matmul_rows(isa, type, w.base, w.stride, n_rows, n_cols, x.data(), ldx, n_tok, y.data(), ldy);
  check(y, "");
  if (packs_rows(isa, type)) {
    // The packed layout: groups of kPackRows rows and a tail in ggml's (n_rows 8, 13 and 21 here).
    const size_t rb = static_cast<size_t>(row_bytes(type, n_cols));
    std::vector<uint8_t> packed(rb * static_cast<size_t>(n_rows) + 1, 0xA5);
    pack_rows(type, w.base, w.stride, n_rows, n_cols, packed.data() + 1);  // odd address, as unaligned as a row
    ASSERT_EQ(packed[0], 0xA5) << name;
    std::vector<float> yp(static_cast<size_t>(n_tok * ldy), kSentinel);
    matmul_packed_rows(isa, type, packed.data() + 1, n_rows, n_cols, x.data(), ldx, n_tok, yp.data(), ldy);
    check(yp, " packed");
  }

  // matvec_rows and dot_row must agree with the same reference (token 0).
  std::vector<float> yv(static_cast<size_t>(n_rows) + 1, kSentinel);
  matvec_rows(isa, type, w.base, w.stride, n_rows, n_cols, x.data(), yv.data());
  EXPECT_EQ(yv[static_cast<size_t>(n_rows)], kSentinel) << name;
  Check cv;
  for (int64_t r = 0; r < n_rows; ++r) {
    double ref = 0, sum_abs = 0;
    for (int64_t i = 0; i < n_cols; ++i) {
      const double p = static_cast<double>(w.deq[r * n_cols + i]) * xk[i];
      ref += p;
      sum_abs += std::fabs(p);
    }
    cv.add(yv[r], ref, sum_abs, "matvec row " + std::to_string(r));
    if (r == n_rows - 1) cv.add(dot_row(isa, type, w.base + r * w.stride, x.data(), n_cols), ref, sum_abs, "dot_row");
  }
  EXPECT_LE(cv.worst_share, 1.0) << name << ": worst " << cv.worst << " (share " << cv.worst_share << ")";
}

TEST(KernelPacked, FloatGroupsAtOddWidthsAndSlabEdges) {
  // F16 / BF16 packed groups take any width: BF16 pairs columns, so an odd width leaves one unpaired column, and
  // the kernels sum slabs of 256 columns, so widths just below, at and past a slab edge change the chain split.
  // 45 rows: decode's 4-group step, one group alone, prefill's 2-group tiles and a 5-row tail.
  for (CpuIsa isa : kIsas) {
    if (!cpu_isa_supported(isa)) continue;
    for (GgmlType type : {GgmlType::F16, GgmlType::BF16}) {
      if (!packs_rows(isa, type)) continue;
      for (int64_t n_cols : {int64_t{1}, int64_t{7}, int64_t{33}, int64_t{255}, int64_t{256}, int64_t{257}, int64_t{513}})
        for (int64_t n_tok : {int64_t{1}, int64_t{6}, int64_t{11}}) run_case(isa, type, 45, n_cols, n_tok);
    }
  }
}

TEST(KernelPacked, IntegerGroupsGiveTheSameBitsInBothFamilies) {
  // The avx512 family's packed integer groups run two groups a vector with VNNI where the CPU has it, the avx2
  // family one group with maddubs: exact integer sums and the same float steps, so the same bits. 45 rows (pairs,
  // a lone group, a 5-row tail), tokens alone and in full and partial tiles.
  if (!cpu_isa_supported(CpuIsa::kAvx512)) GTEST_SKIP() << "avx512 not supported by this CPU";
  for (GgmlType type : {GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_K, GgmlType::Q6_K})
    for (int64_t n_tok : {int64_t{1}, int64_t{3}, int64_t{4}, int64_t{11}, int64_t{13}}) {
      const int64_t n_rows = 45, n_cols = 512;
      const auto w = make_weights(type, n_rows, n_cols, 0, 0, 5);
      // Large and small activations, so that some blocks reach the int8 extremes.
      auto x = random_floats(static_cast<size_t>(n_tok * n_cols), 6);
      for (size_t i = 0; i < x.size(); i += 37) x[i] *= 50;
      std::vector<uint8_t> packed(static_cast<size_t>(row_bytes(type, n_cols) * n_rows));
      pack_rows(type, w.base, w.stride, n_rows, n_cols, packed.data());
      std::vector<float> y2(static_cast<size_t>(n_tok * n_rows)), y5(y2.size());
      matmul_packed_rows(CpuIsa::kAvx2, type, packed.data(), n_rows, n_cols, x.data(), n_cols, n_tok, y2.data(), n_rows);
      matmul_packed_rows(CpuIsa::kAvx512, type, packed.data(), n_rows, n_cols, x.data(), n_cols, n_tok, y5.data(), n_rows);
      for (size_t i = 0; i < y2.size(); ++i)
        ASSERT_EQ(y2[i], y5[i]) << type_name(type) << " tokens " << n_tok << " token " << i / n_rows << " row "
                                << i % n_rows;
    }
}

TEST(KernelPacked, FloatGroupsGiveTheSameBitsInBothFamilies) {
  // The avx512 family runs two groups per vector, the avx2 family one, but every row is the same FMA chain over the
  // same slabs: a model gives the same tokens on either. 45 rows (5 groups: pairs, a lone group, a tail), widths
  // around a slab edge and odd, tokens alone and in full and partial tiles.
  if (!cpu_isa_supported(CpuIsa::kAvx512)) GTEST_SKIP() << "avx512 not supported by this CPU";
  for (GgmlType type : {GgmlType::F16, GgmlType::BF16})
    for (int64_t n_cols : {int64_t{7}, int64_t{257}, int64_t{640}})
      for (int64_t n_tok : {int64_t{1}, int64_t{5}, int64_t{17}}) {
        const int64_t n_rows = 45;
        const auto w = make_weights(type, n_rows, n_cols, 0, 0, 3);
        const auto x = random_floats(static_cast<size_t>(n_tok * n_cols), 4);
        std::vector<uint8_t> packed(static_cast<size_t>(row_bytes(type, n_cols) * n_rows));
        pack_rows(type, w.base, w.stride, n_rows, n_cols, packed.data());
        std::vector<float> y2(static_cast<size_t>(n_tok * n_rows)), y5(y2.size());
        matmul_packed_rows(CpuIsa::kAvx2, type, packed.data(), n_rows, n_cols, x.data(), n_cols, n_tok, y2.data(), n_rows);
        matmul_packed_rows(CpuIsa::kAvx512, type, packed.data(), n_rows, n_cols, x.data(), n_cols, n_tok, y5.data(),
                           n_rows);
        // The tail rows run each family's unpacked kernel, whose order differs: only the groups' rows compare.
        for (int64_t t = 0; t < n_tok; ++t)
          for (int64_t r = 0; r < n_rows / kPackRows * kPackRows; ++r)
            ASSERT_EQ(y2[t * n_rows + r], y5[t * n_rows + r])
                << type_name(type) << " cols " << n_cols << " tokens " << n_tok << " token " << t << " row " << r;
      }
}

class KernelTest : public ::testing::TestWithParam<std::tuple<CpuIsa, GgmlType>> {};

TEST_P(KernelTest, MatchesFp64OnDequantizedWeights) {
  const auto [isa, type] = GetParam();
  if (!cpu_isa_supported(isa)) GTEST_SKIP() << cpu_isa_name(isa) << " not supported by this CPU";
  const int64_t bs = std::max<int64_t>(block_size(type), 32);
  // One block, a few blocks (odd count), and a real hidden size; odd row counts hit the row-tile tail.
  for (int64_t n_cols : {bs, 3 * bs, int64_t{4096}})
    for (int64_t n_rows : {int64_t{1}, int64_t{3}, int64_t{8}, int64_t{13}, int64_t{21}})
      for (int64_t n_tok = 1; n_tok <= 7; ++n_tok) {
        if (n_cols == 4096 && n_tok % 3 != 1) continue;  // keep the big shape to n_tok 1, 4, 7
        run_case(isa, type, n_rows, n_cols, n_tok);
      }
}

std::string param_name(const ::testing::TestParamInfo<std::tuple<CpuIsa, GgmlType>>& info) {
  return std::string(cpu_isa_name(std::get<0>(info.param))) + "_" + type_name(std::get<1>(info.param));
}

INSTANTIATE_TEST_SUITE_P(AllTypesAllIsas, KernelTest,
                         ::testing::Combine(::testing::ValuesIn(kIsas), ::testing::ValuesIn(kTypes)),
                         param_name);

TEST(KernelIsa, AllFamiliesAgreeOnALargeMatmul) {
  // Cross-check the SIMD families against the scalar one on a prefill-like shape (many tokens, so
  // the token-tile loop runs several full tiles plus a tail).
  for (GgmlType type : kTypes) {
    const auto w = make_weights(type, 19, 512, 0, 0, 99);
    const auto x = random_floats(static_cast<size_t>(23 * 512), 5);
    std::vector<float> ys(23 * 19), yi(23 * 19);
    matmul_rows(CpuIsa::kScalar, type, w.base, w.stride, 19, 512, x.data(), 512, 23, ys.data(), 19);
    for (CpuIsa isa : {CpuIsa::kAvx2, CpuIsa::kAvx512}) {
      if (!cpu_isa_supported(isa)) continue;
      matmul_rows(isa, type, w.base, w.stride, 19, 512, x.data(), 512, 23, yi.data(), 19);
      std::vector<double> half_step;
      kernel_activations(isa, type, x, 23, 512, 512, half_step);
      for (size_t i = 0; i < ys.size(); ++i) {
        double sum_abs = 0, rounding = 0;
        const size_t t = i / 19, r = i % 19;
        for (int k = 0; k < 512; ++k) {
          sum_abs += std::fabs(double(w.deq[r * 512 + k]) * x[t * 512 + k]);
          rounding += std::fabs(double(w.deq[r * 512 + k])) * half_step[t * 17 + k / 32];
        }
        // Both are within 1e-5*sum|w*x| of the exact value (see Check), so within twice that apart, plus
        // the activation rounding's bound where the family rounds them.
        ASSERT_NEAR(yi[i], ys[i], 2e-6 + 2e-5 * sum_abs + rounding)
            << cpu_isa_name(isa) << " " << type_name(type) << " token " << t << " row " << r;
      }
    }
  }
}

TEST(KernelIsa, ATokensResultDoesNotDependOnTheOtherTokens) {
  // Batch invariance: a token's outputs have the same bits alone (decode) and inside a 7- or 23-token call
  // (prefill tiles and tails), in every family and type.
  for (CpuIsa isa : kIsas) {
    if (!cpu_isa_supported(isa)) continue;
    for (GgmlType type : kTypes) {
      const int64_t n_rows = 13, n_cols = 256;
      const auto w = make_weights(type, n_rows, n_cols, 0, 0, 7);
      for (int64_t n_tok : {int64_t{7}, int64_t{23}}) {
        const auto x = random_floats(static_cast<size_t>(n_tok * n_cols), 11);
        std::vector<float> all(static_cast<size_t>(n_tok * n_rows)), one(static_cast<size_t>(n_rows));
        matmul_rows(isa, type, w.base, w.stride, n_rows, n_cols, x.data(), n_cols, n_tok, all.data(), n_rows);
        for (int64_t t = 0; t < n_tok; ++t) {
          matvec_rows(isa, type, w.base, w.stride, n_rows, n_cols, x.data() + t * n_cols, one.data());
          for (int64_t r = 0; r < n_rows; ++r)
            ASSERT_EQ(one[r], all[t * n_rows + r]) << cpu_isa_name(isa) << " " << type_name(type) << " token " << t
                                                   << " of " << n_tok << " row " << r;
        }
        if (!packs_rows(isa, type)) continue;
        // Packed rows: 8 in a group and 5 in ggml's layout, decoded alone and in the 4-token tiles and tails.
        std::vector<uint8_t> packed(static_cast<size_t>(row_bytes(type, n_cols) * n_rows));
        pack_rows(type, w.base, w.stride, n_rows, n_cols, packed.data());
        matmul_packed_rows(isa, type, packed.data(), n_rows, n_cols, x.data(), n_cols, n_tok, all.data(), n_rows);
        for (int64_t t = 0; t < n_tok; ++t) {
          matmul_packed_rows(isa, type, packed.data(), n_rows, n_cols, x.data() + t * n_cols, n_cols, 1, one.data(),
                             n_rows);
          for (int64_t r = 0; r < n_rows; ++r)
            ASSERT_EQ(one[r], all[t * n_rows + r]) << cpu_isa_name(isa) << " packed " << type_name(type) << " token "
                                                   << t << " of " << n_tok << " row " << r;
        }
      }
    }
  }
}

TEST(KernelIsa, ActivationRoundingIsLlamaCppsQ8_0) {
  // The rounding equals the reference quantizer's Q8_0 (ggml's quantize_row_q8_0) apart from the scale's
  // fp16 storage: same amax / 127 step, same round-to-nearest.
  const auto x = random_floats(96, 3);
  std::vector<int8_t> q(96);
  std::vector<float> d(3);
  quantize_activation_q8(x.data(), 96, q.data(), d.data());
  std::vector<uint8_t> q8(static_cast<size_t>(row_bytes(GgmlType::Q8_0, 96)));
  quantize_row(GgmlType::Q8_0, x.data(), q8.data(), 96);
  for (int b = 0; b < 3; ++b) {
    float amax = 0;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[32 * b + i]));
    EXPECT_EQ(d[b], amax / 127.0f);
    for (int i = 0; i < 32; ++i)
      EXPECT_EQ(q[32 * b + i], static_cast<int8_t>(q8[34 * b + 2 + i])) << "block " << b << " element " << i;
  }
  std::vector<float> zeros(32, 0.0f);
  quantize_activation_q8(zeros.data(), 32, q.data(), d.data());
  EXPECT_EQ(d[0], 0.0f);
  EXPECT_EQ(q[0], 0);
  EXPECT_THROW(quantize_activation_q8(x.data(), 31, q.data(), d.data()), Error);
}

TEST(KernelIsa, ParseAndSelect) {
  EXPECT_EQ(parse_cpu_isa("scalar"), CpuIsa::kScalar);
  EXPECT_THROW(parse_cpu_isa("sse9"), Error);
  EXPECT_THROW(parse_cpu_isa(""), Error);
  EXPECT_THROW(parse_cpu_isa(nullptr), Error);
  try {
    parse_cpu_isa("AVX-2");
    FAIL() << "no throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("AVX-2"), std::string::npos) << e.what();
  }
  for (CpuIsa isa : kIsas) {
    if (cpu_isa_supported(isa)) {
      EXPECT_EQ(parse_cpu_isa(cpu_isa_name(isa)), isa);
    } else {
      EXPECT_THROW(parse_cpu_isa(cpu_isa_name(isa)), Error);
    }
  }
  EXPECT_TRUE(cpu_isa_supported(cpu_isa()));
  // The family's name, with "+vnni" where the avx512 family's packed integer groups take VNNI.
  const std::string shown = cpu_kernel_isa(), family = cpu_isa_name(cpu_isa());
  EXPECT_TRUE(shown == family || (cpu_isa() == CpuIsa::kAvx512 && shown == family + "+vnni")) << shown;
}

TEST(KernelValidation, RejectsBadArguments) {
  const auto w = make_weights(GgmlType::Q4_0, 4, 64, 0, 0, 1);
  std::vector<float> x(64 * 3, 0.5f), y(16);
  const CpuIsa s = CpuIsa::kScalar;
  EXPECT_THROW(matvec_rows(s, GgmlType::Q4_0, w.base, w.stride, 4, 63, x.data(), y.data()), Error);
  EXPECT_THROW(matvec_rows(s, GgmlType::Q4_0, w.base, w.stride - 1, 4, 64, x.data(), y.data()), Error);
  EXPECT_THROW(matvec_rows(s, GgmlType::Q4_0, w.base, w.stride, -1, 64, x.data(), y.data()), Error);
  EXPECT_THROW(matvec_rows(s, GgmlType::Q8_1, w.base, w.stride, 4, 64, x.data(), y.data()), Error);  // no kernels
  EXPECT_THROW(matvec_rows(s, GgmlType::Q4_0, nullptr, w.stride, 4, 64, x.data(), y.data()), Error);
  EXPECT_THROW(matvec_rows(s, GgmlType::Q4_0, w.base, w.stride, 4, 64, nullptr, y.data()), Error);
  EXPECT_THROW(matvec_rows(s, GgmlType::Q4_0, w.base, w.stride, 4, 64, x.data(), nullptr), Error);
  EXPECT_THROW(matmul_rows(s, GgmlType::Q4_0, w.base, w.stride, 4, 64, x.data(), 63, 2, y.data(), 4), Error);
  EXPECT_THROW(matmul_rows(s, GgmlType::Q4_0, w.base, w.stride, 4, 64, x.data(), 64, 2, y.data(), 3), Error);
  EXPECT_THROW(matmul_rows(s, GgmlType::Q4_0, w.base, w.stride, 4, 64, x.data(), 64, -1, y.data(), 4), Error);
  EXPECT_THROW(dot_row(s, GgmlType::Q4_K, w.base, x.data(), 64), Error);  // 64 is not a Q4_K multiple
  // Empty work is valid.
  EXPECT_NO_THROW(matvec_rows(s, GgmlType::Q4_0, w.base, w.stride, 0, 64, x.data(), y.data()));
  EXPECT_NO_THROW(matmul_rows(s, GgmlType::Q4_0, w.base, w.stride, 4, 64, x.data(), 64, 0, y.data(), 4));
}


// attend_chunk (the CPU attention's online softmax) in every family against an fp64 softmax over all of a row's
// positions at once. Rows of 1 to 300 positions, cut into chunks of 16 as the CPU backend cuts a sequence into
// cache blocks; scores drift upwards over the chunks (so the running maximum grows and earlier sums are rescaled)
// and one chunk lies 200 below the rest (weights that underflow to 0). head_dim 8 to 136: whole vectors, blocks of
// 8/4/2/1 vectors and lanes past the last vector.
TEST(KernelAttend, OnlineSoftmaxMatchesFp64) {
  constexpr int64_t kChunk = 16;
  const std::vector<int64_t> n_pos = {1, 15, 16, 17, 100, 300};  // per query row
  const int64_t n_q = static_cast<int64_t>(n_pos.size()), n_max = 300;
  for (int64_t hd : {8, 24, 64, 128, 136}) {
    const float scale = 1.0f / std::sqrt(float(hd));
    std::mt19937 rng(static_cast<uint32_t>(hd));
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    std::vector<float> scores(static_cast<size_t>(n_q * n_max)), v(static_cast<size_t>(n_max * hd));
    for (int64_t r = 0; r < n_q; ++r)
      for (int64_t j = 0; j < n_max; ++j)
        scores[static_cast<size_t>(r * n_max + j)] =
            8.0f * u(rng) + 0.05f * float(j) - (j / kChunk == 3 ? 200.0f : 0.0f);
    for (auto& x : v) x = u(rng);
    // fp64: softmax of scale * s over the row's positions, weights times V.
    std::vector<double> want(static_cast<size_t>(n_q * hd));
    for (int64_t r = 0; r < n_q; ++r) {
      double mx = -INFINITY, sum = 0;
      const float* sr = scores.data() + r * n_max;
      double* wr = want.data() + r * hd;
      for (int64_t j = 0; j < n_pos[r]; ++j) mx = std::max(mx, double(scale) * sr[j]);
      for (int64_t j = 0; j < n_pos[r]; ++j) {
        const double p = std::exp(double(scale) * sr[j] - mx);
        sum += p;
        for (int64_t i = 0; i < hd; ++i) wr[i] += p * v[static_cast<size_t>(j * hd + i)];
      }
      for (int64_t i = 0; i < hd; ++i) want[static_cast<size_t>(r * hd + i)] /= sum;
    }
    // rows [r0, r1) through every chunk; returns their outputs (rows r0.., hd each).
    const auto run = [&](CpuIsa isa, int64_t r0, int64_t r1) {
      const int64_t nq = r1 - r0;
      std::vector<float> m(static_cast<size_t>(nq), -INFINITY), l(static_cast<size_t>(nq), 0.0f),
          acc(static_cast<size_t>(nq * hd), 0.0f), sc(static_cast<size_t>(nq * kChunk));
      std::vector<int32_t> valid(static_cast<size_t>(nq));
      for (int64_t j0 = 0; j0 < n_max; j0 += kChunk) {
        for (int64_t r = 0; r < nq; ++r) {
          valid[static_cast<size_t>(r)] = static_cast<int32_t>(std::clamp<int64_t>(n_pos[r0 + r] - j0, 0, kChunk));
          for (int64_t j = 0; j < valid[static_cast<size_t>(r)]; ++j)  // the row's positions only: n_max is 300
            sc[static_cast<size_t>(r * kChunk + j)] = scores[static_cast<size_t>((r0 + r) * n_max + j0 + j)];
        }
        attend_chunk(isa, sc.data(), kChunk, valid.data(), nq, v.data() + j0 * hd, hd, hd, scale, m.data(), l.data(),
                     acc.data());
      }
      for (int64_t r = 0; r < nq; ++r)
        for (int64_t i = 0; i < hd; ++i) acc[static_cast<size_t>(r * hd + i)] /= l[static_cast<size_t>(r)];
      return acc;
    };
    for (CpuIsa isa : kIsas) {
      if (!cpu_isa_supported(isa)) continue;
      const std::vector<float> got = run(isa, 0, n_q);
      for (size_t i = 0; i < got.size(); ++i) {
        // 3e-7 + 1e-6 * |ref|: fp32 weights (exp within a few ulp), rescaled up to 19 times, summed over up to 300
        // positions of values in [-1, 1); the outputs are weighted means of those values, mostly below 0.1.
        // Measured worst here (Zen 5, every family and head_dim): 1.0e-7 absolute.
        ASSERT_NEAR(got[i], want[i], 3e-7 + 1e-6 * std::abs(want[i]))
            << cpu_isa_name(isa) << " hd " << hd << " row " << i / hd << " (" << n_pos[i / hd] << " positions)";
      }
      // A row computed alone gives the same bits as inside the call (the CPU backend's batch invariance).
      for (int64_t r = 0; r < n_q; ++r) {
        const std::vector<float> alone = run(isa, r, r + 1);
        EXPECT_EQ(0, std::memcmp(alone.data(), got.data() + r * hd, static_cast<size_t>(hd) * sizeof(float)))
            << cpu_isa_name(isa) << " hd " << hd << " row " << r;
      }
    }
  }
}

// The weights attend_chunk leaves in the score rows are exp(scale * s - max) within 3 ulp (the SIMD families' exp
// is a polynomial; the scalar family's is std::exp), 0 (or a subnormal) below fp32's normal range.
TEST(KernelAttend, WeightsAreExpWithinThreeUlp) {
  constexpr int64_t kN = 37, kHd = 16;  // whole vectors and a tail in both families
  std::vector<float> s0(kN), v(kN * kHd, 0.5f);
  for (int64_t j = 0; j < kN; ++j) s0[j] = -0.37f * float(j * j) / 4.0f + (j == 5 ? 10.0f : 0.0f);  // down to -123
  const int32_t n = kN;
  for (CpuIsa isa : kIsas) {
    if (!cpu_isa_supported(isa)) continue;
    std::vector<float> s = s0, m(1, -INFINITY), l(1, 0.0f), acc(kHd, 0.0f);
    attend_chunk(isa, s.data(), kN, &n, 1, v.data(), kHd, kHd, 1.0f, m.data(), l.data(), acc.data());
    EXPECT_EQ(m[0], 10.0f - 0.37f * 25.0f / 4.0f) << cpu_isa_name(isa);
    for (int64_t j = 0; j < kN; ++j) {
      const float x = s0[j] - m[0];  // the kernel's argument, rounded as it rounds it
      if (x < -87.0f) {  // below the normal range: 0, or std::exp's subnormal
        EXPECT_TRUE(s[j] >= 0.0f && s[j] < 1.2e-38f) << cpu_isa_name(isa) << " exp(" << x << ") = " << s[j];
        continue;
      }
      const double want = std::exp(double(x));
      EXPECT_NEAR(s[j], want, 3.0 * 1.2e-7 * want) << cpu_isa_name(isa) << " exp(" << x << ")";
    }
  }
}

TEST(KernelAttend, RejectsMorePositionsThanTheScoreRow) {
  std::vector<float> s(16), v(64), m(1, -INFINITY), l(1), acc(64);
  const int32_t n = 17;
  EXPECT_THROW(attend_chunk(CpuIsa::kScalar, s.data(), 16, &n, 1, v.data(), 64, 64, 1.0f, m.data(), l.data(),
                            acc.data()),
               Error);
  EXPECT_THROW(attend_chunk(CpuIsa::kScalar, s.data(), 16, &n, 1, v.data(), 32, 64, 1.0f, m.data(), l.data(),
                            acc.data()),
               Error);  // ldv < hd
}

}  // namespace
}  // namespace shardlm
