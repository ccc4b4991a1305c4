#include <cstring>

#include "comm/communicator.h"
#include "core/error.h"

namespace shardlm {
namespace {

class SelfGroup final : public CommGroup {
 public:
  int size() const override { return 1; }
  int rank() const override { return 0; }
  void all_reduce_sum(float*, size_t) override {}
  void all_gather(const float* in, float* out, const std::vector<size_t>& counts) override {
    if (in != out) std::memcpy(out, in, counts.at(0) * sizeof(float));
  }
  void broadcast(void*, size_t, int) override {}
  void barrier() override {}
};

class SingleRankCommunicator final : public Communicator {
 public:
  int world_size() const override { return 1; }
  int rank() const override { return 0; }
  std::string name() const override { return "single"; }
  int local_rank() const override { return 0; }
  int local_size() const override { return 1; }
  void local_all_gather(const void* in, void* out, size_t bytes) override {
    if (in != out) std::memcpy(out, in, bytes);
  }
  std::unique_ptr<CommGroup> make_group(const std::vector<int>& ranks) override {
    SHARDLM_CHECK(ranks.size() == 1 && ranks[0] == 0);
    return std::make_unique<SelfGroup>();
  }
  void send(const void*, size_t, int peer, int) override {
    fail_kind(ErrorKind::kInternal, "send to rank ", peer, " in a single-rank run");
  }
  void recv(void*, size_t, int peer, int) override {
    fail_kind(ErrorKind::kInternal, "recv from rank ", peer, " in a single-rank run");
  }
  double comm_seconds() const override { return 0; }
};

}  // namespace

std::unique_ptr<Communicator> make_single_rank_communicator() {
  return std::make_unique<SingleRankCommunicator>();
}

}  // namespace shardlm
