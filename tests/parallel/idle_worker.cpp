// A serving engine's life under mpirun: rank 0 stays idle for IDLE_S seconds (an idle step every 0.2 s,
// as a server's engine thread does), longer than the communicator's TIMEOUT_S, then runs one greedy request,
// then shuts the engine down; the other ranks follow rank 0's plans until the shutdown. Rank 0 writes the
// generated ids to OUT.json. A follower whose wait outlasted the timeout would fail the run instead.
//   idle_worker MODEL TP TIMEOUT_S IDLE_S OUT.json
#include <chrono>
#include <cstdio>
#include <fstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "comm/mpi/mpi_comm.h"
#include "loader/model_source.h"
#include "runtime/engine.h"

using namespace shardlm;

int main(int argc, char** argv) {
  if (argc != 6) {
    std::fprintf(stderr, "usage: idle_worker MODEL TP TIMEOUT_S IDLE_S OUT\n");
    return 2;
  }
  try {
    const double timeout = std::atof(argv[3]), idle = std::atof(argv[4]);
    auto comm = launched_by_mpi() ? make_mpi_communicator(&argc, &argv, timeout) : make_single_rank_communicator();
    auto src = open_model_source(argv[1]);
    EngineOptions o;
    o.tp = std::atoi(argv[2]);
    o.n_threads = 1;
    o.n_ctx = 64;
    o.max_num_seqs = 2;
    Engine engine(*src, *comm, o);
    if (comm->rank() != 0) {
      while (!engine.stopped()) engine.step();
      return 0;
    }
    using clock = std::chrono::steady_clock;
    const auto t0 = clock::now();
    int idle_steps = 0;
    while (std::chrono::duration<double>(clock::now() - t0).count() < idle) {
      if (engine.step()) {
        std::fprintf(stderr, "idle_worker: an idle step ran work\n");
        return 1;
      }
      ++idle_steps;
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    SequenceParams p;
    p.sampling.temperature = 0;
    p.max_tokens = 8;
    engine.add_sequence({1, 5, 9, 13}, p);
    std::vector<int32_t> ids;
    std::vector<SeqEvent> ev;
    while (engine.step(&ev)) {
      for (const SeqEvent& e : ev)
        if (e.token >= 0) ids.push_back(e.token);
      ev.clear();
    }
    engine.shutdown();
    std::ofstream(argv[5]) << nlohmann::json{{"ids", ids}, {"idle_steps", idle_steps}}.dump();
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "idle_worker: %s\n", e.what());
    return 1;
  }
}
