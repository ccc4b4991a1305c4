// Prefills one prompt with --pp 2 (started by mpirun -np 2) and writes both ranks' per-micro-batch busy
// intervals (Engine::prefill_trace) to a JSON file on rank 0.
//   pipeline_trace_worker MODEL N_PROMPT MICRO_BATCH(0 = default) OUT.json
#include <cstdio>
#include <cstdlib>
#include <fstream>

#include <nlohmann/json.hpp>

#include "comm/mpi/mpi_comm.h"
#include "runtime/engine.h"

using namespace shardlm;

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: pipeline_trace_worker MODEL N_PROMPT MICRO_BATCH OUT\n");
    return 2;
  }
  try {
    auto comm = make_mpi_communicator(&argc, &argv, 120);
    auto src = open_model_source(argv[1]);
    EngineOptions o;
    o.pp = comm->world_size();
    o.n_threads = 1;
    o.n_batch = 256;  // the whole 256-token prompt in one step, cut into micro-batches (default: 256 / pp)
    o.micro_batch = std::atoi(argv[3]);
    Engine engine(*src, *comm, o);
    const int n = std::atoi(argv[2]);
    std::vector<int32_t> prompt = {1};
    for (int i = 1; i < n; ++i) prompt.push_back(static_cast<int32_t>(3 + (i * 37) % 500));
    SamplerParams greedy;
    greedy.temperature = 0;
    engine.generate(prompt, 1, greedy, -1);
    // Every rank's trace to rank 0: a count, then (start, end) pairs.
    std::vector<double> mine;
    for (const auto& [a, b] : engine.prefill_trace()) mine.insert(mine.end(), {a, b});
    if (comm->rank() != 0) {
      int32_t k = static_cast<int32_t>(mine.size());
      comm->send(&k, sizeof k, 0, 901);
      comm->send(mine.data(), mine.size() * sizeof(double), 0, 902);
      return 0;
    }
    nlohmann::json stages = nlohmann::json::array();
    stages.push_back(mine);
    for (int r = 1; r < comm->world_size(); ++r) {
      int32_t k = 0;
      comm->recv(&k, sizeof k, r, 901);
      std::vector<double> theirs(static_cast<size_t>(k));
      comm->recv(theirs.data(), theirs.size() * sizeof(double), r, 902);
      stages.push_back(theirs);
    }
    std::ofstream(argv[4]) << nlohmann::json{{"stages", stages}}.dump();
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "pipeline_trace_worker: %s\n", e.what());
    return 1;
  }
}
