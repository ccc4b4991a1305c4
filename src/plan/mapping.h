// The rank layout: one value type, one convention, no hardware.
//
// Convention (used everywhere, also by NCCL and by the planner):  rank = pp_rank * tp_size + tp_rank.
// Tensor-parallel groups are runs of consecutive ranks; pipeline stage s owns ranks [s*tp, (s+1)*tp).
//
// Worked examples (world_size = tp_size * pp_size):
//   tp 2, pp 1:  ranks 0,1 form one TP group; one stage holding every layer.
//   tp 1, pp 2:  rank 0 = stage 0 (first layers, embedding), rank 1 = stage 1 (last layers, output).
//   tp 2, pp 2:  stage 0 = ranks {0,1} (tp_rank 0,1), stage 1 = ranks {2,3}; rank 3 has pp_rank 1, tp_rank 1,
//                its TP group is {2,3}, its pipeline group is {1,3}, its previous-stage peer is rank 1.
//   tp 4, pp 2 with layer split 3,1 over 32 layers: stage 0 = ranks 0..3, layers [0,24); stage 1 = ranks 4..7,
//                layers [24,32). Activations go from rank r to rank r + tp (same tp_rank, next stage).
//   Expert parallelism (vLLM's --enable-expert-parallel), 8 experts at tp 2, pp 2: ranks 0 and 2 hold
//                experts 0..3 of their stage's layers, ranks 1 and 3 experts 4..7, each expert whole;
//                attention stays tensor-parallel. Without it every rank holds 1/tp of every expert.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace shardlm {

struct LayerRange {
  int begin = 0;  // first layer owned
  int end = 0;    // one past the last
  int size() const { return end - begin; }
  bool contains(int l) const { return l >= begin && l < end; }
};

// Rounds `proportions` (one positive weight per stage) to whole layers by largest remainder, at least one
// layer per stage: {3,1} over 5 layers gives {4,1}. Throws Error when there are more stages than layers or
// a weight is not a positive finite number. Empty proportions mean equal weights for `n_stages`.
std::vector<LayerRange> split_layers(int n_layer, int n_stages, const std::vector<double>& proportions);

// Experts [begin, end) of every mixture-of-experts layer that one rank holds.
struct ExpertRange {
  int begin = 0;
  int end = 0;
  int size() const { return end - begin; }
  bool contains(int e) const { return e >= begin && e < end; }
};

class Mapping {
 public:
  // Throws Error when tp_size/pp_size are < 1, rank is outside [0, tp*pp), the layer split is invalid, or
  // expert_parallel is asked for a model without experts (n_expert 0) or with fewer experts than tp_size.
  Mapping(int world_size, int rank, int tp_size, int pp_size, int n_layer,
          const std::vector<double>& layer_split = {}, int n_expert = 0, bool expert_parallel = false);

  int world_size() const { return world_size_; }
  int rank() const { return rank_; }
  int tp_size() const { return tp_size_; }
  int pp_size() const { return pp_size_; }
  int tp_rank() const { return rank_ % tp_size_; }
  int pp_rank() const { return rank_ / tp_size_; }
  bool is_first_stage() const { return pp_rank() == 0; }
  bool is_last_stage() const { return pp_rank() == pp_size_ - 1; }

  static int rank_of(int pp_rank, int tp_rank, int tp_size) { return pp_rank * tp_size + tp_rank; }
  std::vector<int> tp_group() const;  // ranks sharing this rank's stage, ascending
  std::vector<int> pp_group() const;  // ranks with this rank's tp_rank, one per stage, ascending
  int prev_stage_rank() const;        // -1 on the first stage
  int next_stage_rank() const;        // -1 on the last stage
  // The rank of the last stage with tp_rank 0: it samples and broadcasts the token.
  int sampler_rank() const { return rank_of(pp_size_ - 1, 0, tp_size_); }

  const std::vector<LayerRange>& stage_layers() const { return stages_; }
  LayerRange layers() const { return stages_[static_cast<size_t>(pp_rank())]; }
  LayerRange layers_of_stage(int pp_rank) const { return stages_.at(static_cast<size_t>(pp_rank)); }

  bool expert_parallel() const { return expert_parallel_; }
  // The experts this rank holds whole under expert parallelism: its tp_rank's share of n_expert, sizes
  // differing by at most one (the first n_expert % tp ranks hold one more); otherwise all n_expert, each
  // cut over the tensor-parallel ranks like a dense FFN (tensor_shard). Empty for a dense model.
  ExpertRange experts() const { return experts_of(tp_rank()); }
  ExpertRange experts_of(int tp_rank) const;

  std::string describe() const;  // "rank 3 (pp 1/2, tp 1/2) layers 2..3[ experts 4..7]"

 private:
  int world_size_, rank_, tp_size_, pp_size_;
  int n_expert_ = 0;
  bool expert_parallel_ = false;
  std::vector<LayerRange> stages_;
};

}  // namespace shardlm
