// Runs the reference.json cases of tiny Hugging Face fixtures under one layout (started by mpirun with
// tp*pp ranks, or alone) and writes what the sampler rank saw to a JSON file, per model:
//   reference-RoPE engine (ReferenceRopeSource: frequencies as transformers computed them): logits at the first and last position;
//   the engine as it runs the model (exact frequencies): argmax at every position, the last position's
//   logits and 32 greedy tokens (no stop token); where the fixture has no greedy margins, the fp64 reference
//   backend's margins along transformers' greedy tokens (fp64_margins).
// Several models per launch, so that a layout costs one mpirun start.
//   hf_worker OUT.json TP PP MODEL FIXTURE_DIR [MODEL FIXTURE_DIR ...]
// MODEL is an HF directory or a GGUF file; FIXTURE_DIR holds the reference.json to take prompts from.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>

#include <nlohmann/json.hpp>

#include "comm/mpi/mpi_comm.h"
#include "hf_reference.h"
#include "runtime/engine.h"

using namespace shardlm;

int main(int argc, char** argv) {
  if (argc < 6 || (argc - 4) % 2 != 0) {
    std::fprintf(stderr, "usage: hf_worker OUT TP[ep] PP MODEL FIXTURE_DIR [MODEL FIXTURE_DIR ...]  (2ep: tp 2 with "
                         "expert parallelism)\n");
    return 2;
  }
  try {
    auto comm = launched_by_mpi() ? make_mpi_communicator(&argc, &argv, 120) : make_single_rank_communicator();
    EngineOptions o;
    o.tp = std::atoi(argv[2]);
    o.expert_parallel = std::string(argv[2]).find("ep") != std::string::npos;
    o.pp = std::atoi(argv[3]);
    o.n_threads = 1;
    o.micro_batch = 4;  // several micro-batches per prompt, so the pipeline path is exercised
    SamplerParams greedy;
    greedy.temperature = 0;
    nlohmann::json out = nlohmann::json::object();
    bool sampler = false;
    for (int a = 4; a + 1 < argc; a += 2) {
      const auto src = open_model_source(argv[a]);
      const auto ref = test::load_reference(argv[a + 1]);
      nlohmann::json cases = nlohmann::json::array();
      for (size_t i = 0; i < ref.size(); ++i) cases.push_back(nlohmann::json::object());
      {
        const test::ReferenceRopeSource rounded(*src, argv[a + 1]);
        Engine e(rounded, *comm, o);
        const int64_t nv = e.config().n_vocab;
        for (size_t i = 0; i < ref.size(); ++i) {
          const auto& ids = ref[i].prompt_ids;
          const std::vector<float> all = e.all_logits(ids);
          if (!e.is_sampler()) continue;
          cases[i]["first_bf16rope"] = std::vector<float>(all.begin(), all.begin() + nv);
          cases[i]["last_bf16rope"] = std::vector<float>(all.end() - nv, all.end());
        }
      }
      Engine e(*src, *comm, o);
      sampler = e.is_sampler();
      const int64_t nv = e.config().n_vocab;
      for (size_t i = 0; i < ref.size(); ++i) {
        const auto& ids = ref[i].prompt_ids;
        const std::vector<float> all = e.all_logits(ids);
        const auto gen = e.generate(ids, static_cast<int64_t>(ref[i].greedy_32.size()), greedy, -1).generated;
        if (!e.is_sampler()) continue;
        std::vector<int32_t> am;
        for (size_t p = 0; p < ids.size(); ++p) am.push_back(test::argmax_of(all.data() + p * size_t(nv), nv));
        cases[i]["argmax"] = am;
        cases[i]["first"] = std::vector<float>(all.begin(), all.begin() + nv);
        cases[i]["last"] = std::vector<float>(all.end() - nv, all.end());
        cases[i]["greedy"] = gen;
      }
      if (sampler && ref.size() > 0 && ref[0].greedy_margins.empty()) {
        // Fixtures without transformers' greedy margins: the fp64 reference backend's, on this same file, one
        // rank, teacher-forced along transformers' greedy tokens. Margin k = logit of greedy token k minus the
        // best other logit; the test takes a parting at token k as a near-tie only where it is small.
        auto solo = make_single_rank_communicator();
        EngineOptions ro;
        ro.backend = "reference";
        Engine fp64(*src, *solo, ro);
        for (size_t i = 0; i < ref.size(); ++i) {
          std::vector<int32_t> ids = ref[i].prompt_ids;
          const auto& g = ref[i].greedy_32;
          ids.insert(ids.end(), g.begin(), g.end() - (g.empty() ? 0 : 1));
          const std::vector<float> all = fp64.all_logits(ids);
          std::vector<float> margins;
          for (size_t k = 0; k < g.size(); ++k) {
            const float* l = all.data() + (ref[i].prompt_ids.size() - 1 + k) * size_t(nv);
            float other = -INFINITY;
            for (int64_t v = 0; v < nv; ++v)
              if (v != g[k]) other = std::max(other, l[v]);
            margins.push_back(l[g[k]] - other);
          }
          cases[i]["fp64_margins"] = margins;
        }
      }
      out[argv[a]] = {{"cases", cases}, {"layout", e.layout_report()}};
    }
    if (sampler) {
      std::ofstream f(argv[1]);
      f << out.dump();
      if (!f) throw std::runtime_error(std::string("cannot write ") + argv[1]);
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "hf_worker: %s\n", e.what());
    return 1;
  }
}
