// Attention over a paged KV cache at real shapes, CPU backend against the fp64 reference backend: head_dim 64
// and 128, GQA groups 4 and 8, each sequence's blocks scattered over the pool and out of order, contexts of
// 1, 31, 32, 33, 4,095 and 32,768 positions, several sequences of different lengths in one step (decode
// tokens and a prompt chunk together). Both backends store the step's K/V rows through kv_store into the
// same pool layout, so a block-table mistake in either shows as a mismatch, and the cache rows the step
// wrote are compared too. Every cache type (f32, f16, bf16, q8_0, q4_0): the CPU backend against the fp64
// reference reading the same stored values (the same tolerance for all), and against the fp64 reference on
// an f32 cache (the type's own rounding: a tolerance per type, measured and written below).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "backends/cpu/cpu_backend.h"
#include "ops/backend.h"
#include "quant/quant.h"

namespace shardlm::test {
namespace {

struct Shape {
  int64_t head_dim, n_head_kv, group;  // query heads = n_head_kv * group
  std::vector<int32_t> ctx;            // per sequence: positions in the cache after the step
  std::vector<int32_t> n_tok;          // per sequence: tokens of the step (the last n_tok positions)
};

std::string name(const Shape& s) {
  std::ostringstream n;
  n << "hd" << s.head_dim << "_gqa" << s.group;
  for (size_t i = 0; i < s.ctx.size(); ++i) n << "_" << s.n_tok[i] << "at" << s.ctx[i];
  return n.str();
}

class PagedAttention : public ::testing::TestWithParam<Shape> {};

TEST_P(PagedAttention, CpuMatchesTheFp64Reference) {
  const Shape sh = GetParam();
  const int64_t bs = Backend::kKvBlockSize, hd = sh.head_dim, nkv = sh.n_head_kv, nh = nkv * sh.group;
  const int64_t n_seq = static_cast<int64_t>(sh.ctx.size());
  // Blocks of every sequence, shuffled over a pool with a few spare blocks, so that no sequence's blocks are
  // consecutive or in order.
  int64_t max_blocks = 0, total_blocks = 0;
  for (int32_t c : sh.ctx) {
    max_blocks = std::max<int64_t>(max_blocks, (c + bs - 1) / bs);
    total_blocks += (c + bs - 1) / bs;
  }
  const int64_t n_blocks = total_blocks + 3;
  std::vector<int32_t> ids(static_cast<size_t>(n_blocks));
  std::iota(ids.begin(), ids.end(), 0);
  std::mt19937 rng(static_cast<uint32_t>(hd * 131 + sh.group * 7 + n_seq));
  std::shuffle(ids.begin(), ids.end(), rng);
  BatchInfo batch;
  batch.max_blocks = max_blocks;
  batch.block_table.assign(static_cast<size_t>(n_seq * max_blocks), -1);
  size_t next_id = 0;
  for (int64_t s = 0; s < n_seq; ++s) {
    BatchSeq q;
    q.tok0 = static_cast<int32_t>(batch.n_tok);
    q.n_tok = sh.n_tok[static_cast<size_t>(s)];
    q.pos0 = sh.ctx[static_cast<size_t>(s)] - q.n_tok;
    batch.seqs.push_back(q);
    batch.n_tok += q.n_tok;
    for (int64_t b = 0; b < (q.ctx() + bs - 1) / bs; ++b) batch.block_table[static_cast<size_t>(s * max_blocks + b)] = ids[next_id++];
  }
  batch.validate(n_blocks, bs);

  // The pool: earlier positions filled with values in [-1, 1) (as a prefix's K/V rows would be); the step's
  // own rows come from kv_store. F32 cache, so both backends read the same values.
  const int64_t row = nkv * hd, pool_elems = n_blocks * bs * row;
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> k_pool(static_cast<size_t>(pool_elems)), v_pool(static_cast<size_t>(pool_elems));
  for (auto& x : k_pool) x = u(rng);
  for (auto& x : v_pool) x = u(rng);
  std::vector<float> q(static_cast<size_t>(batch.n_tok * nh * hd)), k(static_cast<size_t>(batch.n_tok * row)),
      v(static_cast<size_t>(batch.n_tok * row));
  // Queries scaled so that softmax is neither flat nor one-hot over thousands of positions.
  for (auto& x : q) x = 2.0f * u(rng);
  for (auto& x : k) x = u(rng);
  for (auto& x : v) x = u(rng);

  // The pool as `type` stores it: each position's row converted (or quantized) from the f32 values.
  auto pool_bytes = [&](GgmlType type, const std::vector<float>& vals) {
    const KvLayerView shape{type, n_blocks, bs, nkv, hd, nullptr, nullptr};
    std::vector<uint8_t> bytes(static_cast<size_t>(n_blocks * bs * shape.row_bytes()));
    for (int64_t r = 0; r < n_blocks * bs; ++r)
      quantize_row(type, vals.data() + r * row, bytes.data() + r * shape.row_bytes(), row);
    return bytes;
  };
  auto run = [&](Backend& b, GgmlType type, std::vector<float>* out, std::vector<uint8_t>* k_after,
                 std::vector<uint8_t>* v_after) {
    const std::vector<uint8_t> kp = pool_bytes(type, k_pool), vp = pool_bytes(type, v_pool);
    auto kb = b.alloc(kp.size()), vb = b.alloc(vp.size());
    std::memcpy(kb->data(), kp.data(), kp.size());
    std::memcpy(vb->data(), vp.data(), vp.size());
    KvLayerView kv{type, n_blocks, bs, nkv, hd, kb->data(), vb->data()};
    b.begin_step(batch);
    b.kv_store(kv, k.data(), v.data(), batch.n_tok);
    out->assign(q.size(), 0.0f);
    b.attention(q.data(), kv, batch.n_tok, nh, out->data());
    k_after->assign(kb->as<uint8_t>(), kb->as<uint8_t>() + kp.size());
    v_after->assign(vb->as<uint8_t>(), vb->as<uint8_t>() + vp.size());
  };
  auto ref = make_reference_backend();
  auto cpu = make_cpu_backend(2);
  std::vector<float> want, got, exact;
  std::vector<uint8_t> k_ref, v_ref, k_cpu, v_cpu;
  run(*ref, GgmlType::F32, &exact, &k_ref, &v_ref);
  run(*cpu, GgmlType::F32, &got, &k_cpu, &v_cpu);
  want = exact;
  // Stores are copies: the pools must be the same bits, and the step's rows must sit where its block table
  // says.
  EXPECT_EQ(k_cpu, k_ref);
  EXPECT_EQ(v_cpu, v_ref);
  for (int64_t s = 0; s < n_seq; ++s) {
    const BatchSeq& bq = batch.seqs[static_cast<size_t>(s)];
    for (int32_t t = 0; t < bq.n_tok; ++t) {
      // Where the layout puts position p, written out here rather than through BatchInfo::cache_row.
      const int64_t p = bq.pos0 + t;
      const int64_t at = (int64_t{batch.block_table[static_cast<size_t>(s * max_blocks + p / bs)]} * bs + p % bs) * row;
      ASSERT_EQ(0, std::memcmp(&k_ref[static_cast<size_t>(at) * sizeof(float)], &k[static_cast<size_t>((bq.tok0 + t) * row)],
                               static_cast<size_t>(row) * sizeof(float)))
          << "sequence " << s << " token " << t << " K row not at its block";
    }
  }
  // 1e-5 + 1e-4*|ref|: float32 dot products over head_dim and a float32 softmax accumulated over up to 32,768
  // positions (the reference accumulates in double); outputs are O(1) weighted means of values in [-1, 1).
  auto worst_share = [](const std::vector<float>& g, const std::vector<float>& w, double atol, double rtol,
                        const std::string& what) {
    double worst = 0;
    size_t worst_i = 0;
    for (size_t i = 0; i < w.size(); ++i) {
      const double share = std::abs(double(g[i]) - w[i]) / (atol + rtol * std::abs(double(w[i])));
      if (!std::isfinite(g[i])) ADD_FAILURE() << what << ": output " << i << " is " << g[i];
      if (share > worst) worst = share, worst_i = i;
    }
    EXPECT_LE(worst, 1.0) << what << ": worst output " << worst_i << ": " << g[worst_i] << " vs " << w[worst_i] << " ("
                          << worst << "x the tolerance)";
    return worst;
  };
  worst_share(got, want, 1e-5, 1e-4, "f32 cache");
  // The other types. Against the reference on the same stored values: the f32 tolerance. Against the exact
  // (f32-cache) result: the type's rounding of K and V. Measured worst absolute output error over these
  // shapes (2026-12-06): f16 3.0e-4, bf16 2.4e-3, q8_0 4.6e-3, q4_0 0.122 (values in [-1, 1): q8_0 steps of
  // up to 1/127, q4_0 of 1/8); tolerances at about 2x, absolute because outputs are means near 0.
  struct TypeTol {
    GgmlType type;
    double atol_vs_exact;
  };
  for (const TypeTol& tt : {TypeTol{GgmlType::F16, 1e-3}, TypeTol{GgmlType::BF16, 5e-3}, TypeTol{GgmlType::Q8_0, 1e-2},
                            TypeTol{GgmlType::Q4_0, 0.25}}) {
    if (sh.ctx.size() == 1 && sh.ctx[0] > 4096 && tt.type != GgmlType::Q8_0) continue;  // the long context: q8_0 only
    const std::string tn = type_name(tt.type);
    run(*ref, tt.type, &want, &k_ref, &v_ref);
    run(*cpu, tt.type, &got, &k_cpu, &v_cpu);
    EXPECT_EQ(k_cpu, k_ref) << tn << ": both backends store the same bytes";
    EXPECT_EQ(v_cpu, v_ref) << tn;
    worst_share(got, want, 1e-5, 1e-4, tn + " cache, reference on the same stored values");
    const double share = worst_share(got, exact, tt.atol_vs_exact, 0, tn + " cache against the f32 cache's result");
    std::printf("%s: worst error against the f32 cache %.2e\n", tn.c_str(), share * tt.atol_vs_exact);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, PagedAttention,
    ::testing::Values(Shape{64, 2, 4, {1}, {1}}, Shape{128, 2, 8, {31}, {1}}, Shape{64, 2, 4, {32}, {1}},
                      Shape{128, 1, 8, {33}, {1}},
                      // decode of three sequences of different lengths and a prompt chunk in one step
                      Shape{128, 2, 4, {33, 4095, 17, 70}, {1, 1, 17, 20}},
                      Shape{64, 2, 8, {4095, 32, 1}, {1, 1, 1}},
                      // a long context: 2,048 blocks scattered over the pool
                      Shape{128, 1, 4, {32768}, {1}}),
    [](const ::testing::TestParamInfo<Shape>& i) { return name(i.param); });


// A token's attention output is the same bits whatever else its step holds: a 40-token prompt chunk in one step,
// the same tokens over three steps (13, 1 and 26 tokens: other tiles), and the 40 tokens behind another sequence's
// decode token and a short chunk (other jobs, other threads). The CPU backend cuts positions at cache-block
// boundaries and computes every query row on its own (CpuBackend::attention); the serving engine relies on this
// (a request's tokens do not depend on the other requests, and a preempted sequence recomputes exactly).
TEST(PagedAttentionBatch, ATokensOutputDoesNotDependOnTheStep) {
  const int64_t bs = Backend::kKvBlockSize;
  for (const GgmlType type : {GgmlType::F32, GgmlType::Q8_0}) {
    for (const int64_t hd : {64, 128}) {
      const int64_t nkv = 2, group = 4, nh = nkv * group, row = nkv * hd;
      // Sequence 0: the chunk's, positions [0, 75); sequence 1: 100 positions; sequence 2: 9. Blocks shuffled.
      const std::vector<int32_t> ctx = {75, 100, 9};
      const int64_t max_blocks = (100 + bs - 1) / bs, n_blocks = 3 * max_blocks;
      std::vector<int32_t> ids(static_cast<size_t>(n_blocks));
      std::iota(ids.begin(), ids.end(), 0);
      std::mt19937 rng(static_cast<uint32_t>(hd + static_cast<int>(type)));
      std::shuffle(ids.begin(), ids.end(), rng);
      // Every position's K/V row already in the pool (no kv_store: the steps below only read).
      std::uniform_real_distribution<float> u(-1.0f, 1.0f);
      const KvLayerView shape{type, n_blocks, bs, nkv, hd, nullptr, nullptr};
      std::vector<float> vals(static_cast<size_t>(row));
      auto cpu = make_cpu_backend(2);
      auto kb = cpu->alloc(static_cast<size_t>(n_blocks * bs * shape.row_bytes()));
      auto vb = cpu->alloc(static_cast<size_t>(n_blocks * bs * shape.row_bytes()));
      for (int64_t r = 0; r < n_blocks * bs; ++r) {
        for (auto& x : vals) x = u(rng);
        quantize_row(type, vals.data(), kb->as<uint8_t>() + r * shape.row_bytes(), row);
        for (auto& x : vals) x = u(rng);
        quantize_row(type, vals.data(), vb->as<uint8_t>() + r * shape.row_bytes(), row);
      }
      const KvLayerView kv{type, n_blocks, bs, nkv, hd, kb->data(), vb->data()};
      // Queries of every position of every sequence, 2 * U(-1, 1).
      std::vector<std::vector<float>> qs(ctx.size());
      for (size_t s = 0; s < ctx.size(); ++s) {
        qs[s].resize(static_cast<size_t>(ctx[s] * nh * hd));
        for (auto& x : qs[s]) x = 2.0f * u(rng);
      }
      // One step of (sequence, first position, tokens) parts; returns each part's outputs.
      struct Part {
        int32_t seq, pos0, n_tok;
      };
      const auto step = [&](const std::vector<Part>& parts) {
        BatchInfo batch;
        batch.max_blocks = max_blocks;
        std::vector<float> q;
        for (const Part& p : parts) {
          BatchSeq bq;
          bq.tok0 = static_cast<int32_t>(batch.n_tok);
          bq.n_tok = p.n_tok;
          bq.pos0 = p.pos0;
          batch.seqs.push_back(bq);
          batch.n_tok += p.n_tok;
          const int64_t used = (p.pos0 + p.n_tok + bs - 1) / bs;
          for (int64_t b = 0; b < max_blocks; ++b)
            batch.block_table.push_back(b < used ? ids[static_cast<size_t>(p.seq * max_blocks + b)] : -1);
          const float* from = qs[static_cast<size_t>(p.seq)].data() + p.pos0 * nh * hd;
          q.insert(q.end(), from, from + p.n_tok * nh * hd);
        }
        batch.validate(n_blocks, bs);
        std::vector<float> out(q.size());
        cpu->begin_step(batch);
        cpu->attention(q.data(), kv, batch.n_tok, nh, out.data());
        std::vector<std::vector<float>> per_part;
        size_t at = 0;
        for (const Part& p : parts) {
          per_part.emplace_back(out.begin() + static_cast<std::ptrdiff_t>(at),
                                out.begin() + static_cast<std::ptrdiff_t>(at + static_cast<size_t>(p.n_tok * nh * hd)));
          at += static_cast<size_t>(p.n_tok * nh * hd);
        }
        return per_part;
      };
      const std::vector<float> whole = step({{0, 35, 40}})[0];
      std::vector<float> split;
      for (const Part& p : {Part{0, 35, 13}, Part{0, 48, 1}, Part{0, 49, 26}}) {
        const std::vector<float> o = step({p})[0];
        split.insert(split.end(), o.begin(), o.end());
      }
      const std::vector<float> mixed = step({{1, 99, 1}, {2, 0, 9}, {0, 35, 40}})[2];
      const std::string what = std::string(type_name(type)) + " hd " + std::to_string(hd);
      ASSERT_EQ(whole.size(), split.size());
      const size_t bytes = whole.size() * sizeof(float);
      EXPECT_EQ(0, std::memcmp(whole.data(), split.data(), bytes)) << what << ": over three steps";
      EXPECT_EQ(0, std::memcmp(whole.data(), mixed.data(), bytes)) << what << ": in a mixed step";
      // Not all zeros or copies of one row: the outputs differ from token to token.
      EXPECT_NE(0, std::memcmp(whole.data(), whole.data() + nh * hd, static_cast<size_t>(nh * hd) * sizeof(float)));
    }
  }
}

}  // namespace
}  // namespace shardlm::test
