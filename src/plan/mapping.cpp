#include "plan/mapping.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/error.h"

namespace shardlm {

std::vector<LayerRange> split_layers(int n_layer, int n_stages, const std::vector<double>& proportions) {
  if (n_stages < 1) fail("pipeline stages: ", n_stages, " must be >= 1");
  if (n_layer < n_stages)
    fail("pipeline stages: ", n_stages, " stages need at least one layer each, but the model has ",
         n_layer, " layers");
  std::vector<double> w = proportions;
  if (w.empty()) w.assign(static_cast<size_t>(n_stages), 1.0);
  if (static_cast<int>(w.size()) != n_stages)
    fail("layer split: ", w.size(), " proportions given for ", n_stages, " pipeline stages");
  double total = 0;
  for (double x : w) {
    if (!std::isfinite(x) || x <= 0) fail("layer split: proportion ", x, " must be a positive number");
    total += x;
  }
  // Largest remainder over all layers (3,1 over 5 layers: 3.75 and 1.25 give 4 and 1), then any stage
  // left empty takes a layer from the currently largest stage, so every stage has at least one.
  std::vector<int> count(static_cast<size_t>(n_stages), 0);
  std::vector<std::pair<double, int>> rem;
  int given = 0;
  for (int s = 0; s < n_stages; ++s) {
    const double exact = n_layer * w[static_cast<size_t>(s)] / total;
    const int whole = static_cast<int>(std::floor(exact));
    count[static_cast<size_t>(s)] = whole;
    given += whole;
    rem.emplace_back(exact - whole, s);
  }
  // Larger remainder first; ties go to the earlier stage.
  std::stable_sort(rem.begin(), rem.end(), [](auto& a, auto& b) { return a.first > b.first; });
  for (int i = 0; i < n_layer - given; ++i) count[static_cast<size_t>(rem[static_cast<size_t>(i)].second)] += 1;
  for (int s = 0; s < n_stages; ++s) {
    if (count[static_cast<size_t>(s)] > 0) continue;
    const auto largest = std::max_element(count.begin(), count.end()) - count.begin();
    count[static_cast<size_t>(largest)] -= 1;
    count[static_cast<size_t>(s)] = 1;
  }
  std::vector<LayerRange> out;
  int at = 0;
  for (int c : count) {
    out.push_back({at, at + c});
    at += c;
  }
  return out;
}

Mapping::Mapping(int world_size, int rank, int tp_size, int pp_size, int n_layer,
                 const std::vector<double>& layer_split, int n_expert, bool expert_parallel)
    : world_size_(world_size), rank_(rank), tp_size_(tp_size), pp_size_(pp_size), n_expert_(n_expert),
      expert_parallel_(expert_parallel) {
  if (tp_size < 1) fail("tensor parallel size (--tp): ", tp_size, " must be >= 1");
  if (pp_size < 1) fail("pipeline parallel size (--pp): ", pp_size, " must be >= 1");
  if (world_size != tp_size * pp_size)
    fail("world size ", world_size, " does not equal tp * pp = ", tp_size, " * ", pp_size, " = ",
         tp_size * pp_size, " (launch exactly tp*pp ranks)");
  if (rank < 0 || rank >= world_size) fail("rank ", rank, " is outside [0, ", world_size, ")");
  stages_ = split_layers(n_layer, pp_size, layer_split);
  if (n_expert < 0) fail("expert_count ", n_expert, " must be >= 0");
  if (expert_parallel && n_expert == 0)
    fail("--enable-expert-parallel: the model has no experts (it is not a mixture of experts)");
  if (expert_parallel && n_expert < tp_size)
    fail("--enable-expert-parallel: ", n_expert, " experts cannot be partitioned over tensor parallel size ",
         tp_size, " (every rank must hold at least one expert)");
}

ExpertRange Mapping::experts_of(int tp_rank) const {
  if (tp_rank < 0 || tp_rank >= tp_size_) fail("tp rank ", tp_rank, " is outside [0, ", tp_size_, ")");
  if (!expert_parallel_) return {0, n_expert_};
  const int base = n_expert_ / tp_size_, extra = n_expert_ % tp_size_;
  const int begin = tp_rank * base + std::min(tp_rank, extra);
  return {begin, begin + base + (tp_rank < extra ? 1 : 0)};
}

std::vector<int> Mapping::tp_group() const {
  std::vector<int> g;
  for (int t = 0; t < tp_size_; ++t) g.push_back(rank_of(pp_rank(), t, tp_size_));
  return g;
}

std::vector<int> Mapping::pp_group() const {
  std::vector<int> g;
  for (int p = 0; p < pp_size_; ++p) g.push_back(rank_of(p, tp_rank(), tp_size_));
  return g;
}

int Mapping::prev_stage_rank() const {
  return is_first_stage() ? -1 : rank_of(pp_rank() - 1, tp_rank(), tp_size_);
}

int Mapping::next_stage_rank() const {
  return is_last_stage() ? -1 : rank_of(pp_rank() + 1, tp_rank(), tp_size_);
}

std::string Mapping::describe() const {
  const LayerRange l = layers();
  const ExpertRange e = experts();
  return cat("rank ", rank_, " (pp ", pp_rank(), "/", pp_size_, ", tp ", tp_rank(), "/", tp_size_,
             ") layers ", l.begin, "..", l.end - 1,
             expert_parallel_ ? cat(" experts ", e.begin, "..", e.end - 1) : std::string());
}

}  // namespace shardlm
