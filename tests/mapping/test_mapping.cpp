// The rank layout and the sharding rules, for every rank of several layouts, with no hardware: the
// expected values are written out by hand from the convention rank = pp_rank * tp_size + tp_rank.
#include <gtest/gtest.h>

#include "core/error.h"
#include "plan/mapping.h"
#include "plan/shard.h"

namespace shardlm {
namespace {

std::vector<std::pair<int, int>> ranges(const std::vector<LayerRange>& v) {
  std::vector<std::pair<int, int>> r;
  for (const auto& l : v) r.emplace_back(l.begin, l.end);
  return r;
}

TEST(SplitLayers, LargestRemainderWithAtLeastOneLayer) {
  using V = std::vector<std::pair<int, int>>;
  EXPECT_EQ(ranges(split_layers(5, 2, {3, 1})), (V{{0, 4}, {4, 5}}));  // the example
  EXPECT_EQ(ranges(split_layers(5, 2, {})), (V{{0, 3}, {3, 5}}));      // even: remainder to the first stage
  EXPECT_EQ(ranges(split_layers(80, 2, {1, 1})), (V{{0, 40}, {40, 80}}));
  EXPECT_EQ(ranges(split_layers(4, 4, {})), (V{{0, 1}, {1, 2}, {2, 3}, {3, 4}}));
  // 100:1 over 4 layers still leaves the small stage one layer.
  EXPECT_EQ(ranges(split_layers(4, 2, {100, 1})), (V{{0, 3}, {3, 4}}));
  // 32 layers as 24G:12G:12G -> 16, 8, 8.
  EXPECT_EQ(ranges(split_layers(32, 3, {24, 12, 12})), (V{{0, 16}, {16, 24}, {24, 32}}));
  EXPECT_THROW(split_layers(3, 4, {}), Error);           // more stages than layers
  EXPECT_THROW(split_layers(8, 2, {1, 0}), Error);       // non-positive proportion
  EXPECT_THROW(split_layers(8, 2, {1, 2, 3}), Error);    // count mismatch
}

TEST(Mapping, EveryRankOfTp2Pp2) {
  // rank: (pp_rank, tp_rank), tp group, pp group, prev, next
  struct E {
    int pp, tp;
    std::vector<int> tp_group, pp_group;
    int prev, next;
  };
  const std::vector<E> want = {
      {0, 0, {0, 1}, {0, 2}, -1, 2},
      {0, 1, {0, 1}, {1, 3}, -1, 3},
      {1, 0, {2, 3}, {0, 2}, 0, -1},
      {1, 1, {2, 3}, {1, 3}, 1, -1},
  };
  for (int r = 0; r < 4; ++r) {
    const Mapping m(4, r, 2, 2, 5);
    SCOPED_TRACE(m.describe());
    EXPECT_EQ(m.pp_rank(), want[r].pp);
    EXPECT_EQ(m.tp_rank(), want[r].tp);
    EXPECT_EQ(m.tp_group(), want[r].tp_group);
    EXPECT_EQ(m.pp_group(), want[r].pp_group);
    EXPECT_EQ(m.prev_stage_rank(), want[r].prev);
    EXPECT_EQ(m.next_stage_rank(), want[r].next);
    EXPECT_EQ(m.sampler_rank(), 2);
    EXPECT_EQ(m.layers().begin, want[r].pp == 0 ? 0 : 3);
    EXPECT_EQ(m.layers().end, want[r].pp == 0 ? 3 : 5);
    EXPECT_EQ(Mapping::rank_of(m.pp_rank(), m.tp_rank(), 2), r);
  }
}

// Expert parallelism: the experts of every layer partitioned over a stage's tp ranks, the first n % tp
// ranks holding one more; the same ranges on every stage; all experts everywhere without it.
TEST(Mapping, ExpertRangesOfEveryRank) {
  struct E {
    int tp, pp, n_expert;
    std::vector<std::pair<int, int>> per_tp_rank;  // [begin, end) by tp_rank
  };
  const std::vector<E> cases = {
      {2, 2, 8, {{0, 4}, {4, 8}}},
      {4, 1, 128, {{0, 32}, {32, 64}, {64, 96}, {96, 128}}},
      {3, 1, 8, {{0, 3}, {3, 6}, {6, 8}}},
      {4, 2, 6, {{0, 2}, {2, 4}, {4, 5}, {5, 6}}},
      {2, 1, 2, {{0, 1}, {1, 2}}},
  };
  for (const E& e : cases)
    for (int r = 0; r < e.tp * e.pp; ++r) {
      const Mapping m(e.tp * e.pp, r, e.tp, e.pp, 4, {}, e.n_expert, true);
      SCOPED_TRACE(m.describe());
      const auto want = e.per_tp_rank[static_cast<size_t>(m.tp_rank())];
      EXPECT_TRUE(m.expert_parallel());
      EXPECT_EQ(m.experts().begin, want.first);
      EXPECT_EQ(m.experts().end, want.second);
      EXPECT_NE(m.describe().find("experts " + std::to_string(want.first) + ".." + std::to_string(want.second - 1)),
                std::string::npos);
      const Mapping dense(e.tp * e.pp, r, e.tp, e.pp, 4, {}, e.n_expert, false);
      EXPECT_EQ(dense.experts().begin, 0);
      EXPECT_EQ(dense.experts().end, e.n_expert);
    }
  // No experts, or fewer than ranks: refused by name.
  for (auto [n, tp] : {std::pair{0, 2}, {3, 4}}) {
    try {
      Mapping(tp, 0, tp, 1, 4, {}, n, true);
      ADD_FAILURE() << n << " experts over tp " << tp;
    } catch (const Error& err) {
      EXPECT_NE(std::string(err.what()).find("--enable-expert-parallel"), std::string::npos) << err.what();
    }
  }
  EXPECT_EQ(Mapping(2, 1, 2, 1, 4).experts().size(), 0);  // a dense model holds no experts
}

TEST(Mapping, Tp4Pp2WithUnevenSplit) {
  for (int r = 0; r < 8; ++r) {
    const Mapping m(8, r, 4, 2, 32, {3, 1});
    EXPECT_EQ(m.pp_rank(), r / 4);
    EXPECT_EQ(m.tp_rank(), r % 4);
    EXPECT_EQ(m.layers().size(), r < 4 ? 24 : 8);
    EXPECT_EQ(m.next_stage_rank(), r < 4 ? r + 4 : -1);
    EXPECT_EQ(m.is_first_stage(), r < 4);
  }
}

TEST(Mapping, RejectsBadLayouts) {
  EXPECT_THROW(Mapping(3, 0, 2, 2, 8), Error);   // world != tp * pp
  EXPECT_THROW(Mapping(4, 4, 2, 2, 8), Error);   // rank out of range
  EXPECT_THROW(Mapping(1, 0, 0, 1, 8), Error);   // tp 0
  EXPECT_THROW(Mapping(4, 0, 1, 4, 3), Error);   // more stages than layers
}

ModelConfig cfg(int64_t n_head, int64_t n_kv, int64_t n_ff, int64_t hd = 8) {
  ModelConfig c;
  c.n_vocab = 512;
  c.n_embd = n_head * hd;
  c.n_layer = 5;
  c.n_head = n_head;
  c.n_head_kv = n_kv;
  c.head_dim = hd;
  c.n_ff = n_ff;
  c.n_ctx_train = 512;
  return c;
}

TEST(Shard, UnevenFfnColumnsDifferByAtMostOne) {
  // 172 FFN columns (f32 ffn_down: unit 1) over 8 ranks: 4 ranks of 22 and 4 of 21, contiguous.
  const ModelConfig c = cfg(8, 4, 172);
  int64_t at = 0;
  for (int r = 0; r < 8; ++r) {
    const Range f = ffn_shard(c, 1, 8, r);
    EXPECT_EQ(f.begin, at);
    EXPECT_EQ(f.size(), r < 4 ? 22 : 21);
    at = f.end;
  }
  EXPECT_EQ(at, 172);
}

TEST(Shard, KvHeadsSplitThenReplicated) {
  const ModelConfig c = cfg(8, 4, 64);  // stories260K's heads: 8 query, 4 KV
  // tp 2: two KV heads each, their four query heads follow.
  EXPECT_EQ(head_shard(c, 2, 1).kv_heads.begin, 2);
  EXPECT_EQ(head_shard(c, 2, 1).q_heads.begin, 4);
  EXPECT_EQ(head_shard(c, 2, 1).q_heads.end, 8);
  // tp 8 > 4 KV heads: each KV head replicated on 2 ranks; rank r has query head r and KV head r / 2.
  for (int r = 0; r < 8; ++r) {
    const HeadShard h = head_shard(c, 8, r);
    EXPECT_EQ(h.q_heads.begin, r);
    EXPECT_EQ(h.q_heads.size(), 1);
    EXPECT_EQ(h.kv_heads.begin, r / 2);
    EXPECT_EQ(h.kv_heads.size(), 1);
  }
  // tp 3 <= 4 KV heads: 2, 1, 1 KV heads (and 4, 2, 2 query heads).
  EXPECT_EQ(head_shard(c, 3, 0).q_heads.size(), 4);
  EXPECT_EQ(head_shard(c, 3, 2).q_heads.size(), 2);
  EXPECT_THROW(head_shard(c, 6, 0), Error);  // 6 > 4 KV heads but not a multiple of 4
}

TEST(Shard, RefusesASplitThatCutsABlock) {
  // head_dim 8 with Q4_0 (32-element blocks): 1 query head per rank is 8 columns of attn_output -> cut.
  const ModelConfig c = cfg(4, 4, 256);
  EXPECT_NO_THROW(check_shardable(c, GgmlType::F32, GgmlType::F32, 4));
  try {
    check_shardable(c, GgmlType::Q4_0, GgmlType::Q4_0, 4);
    FAIL() << "expected a refusal";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("attn_output"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("block"), std::string::npos) << e.what();
  }
  // FFN of 256 in Q4_K (256-element blocks) has one block: tp 2 would cut it.
  EXPECT_THROW(ffn_shard(c, 256, 2, 0), Error);
}

}  // namespace
}  // namespace shardlm
