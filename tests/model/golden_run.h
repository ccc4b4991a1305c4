// Runs every golden case of a model through an Engine the way the layout tests compare them: greedy ids
// (run.c's stop rule), ids sampled with --temp 0.8 --seed 7, and the logits at each golden position. Every
// rank of the layout must call it (generation and the logits pass are collective); the logits come back
// on the sampler rank only.
#pragma once

#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "golden.h"
#include "runtime/engine.h"

namespace shardlm::test {

inline nlohmann::json run_golden_cases(Engine& engine, const std::string& golden_name) {
  SamplerParams greedy;
  greedy.temperature = 0;
  SamplerParams sampled;
  sampled.temperature = 0.8f;
  sampled.seed = 7;
  nlohmann::json out = nlohmann::json::array();
  for (const GoldenCase& g : load_golden(golden_name)) {
    nlohmann::json c;
    c["greedy"] = engine.generate(g.prompt_ids, static_cast<int64_t>(g.generated_ids.size()), greedy, 1).generated;
    c["sampled"] = engine.generate(g.prompt_ids, 24, sampled, -1).generated;
    std::vector<int32_t> seq = g.prompt_ids;
    seq.insert(seq.end(), g.generated_ids.begin(), g.generated_ids.end() - 1);
    const std::vector<float> all = engine.all_logits(seq);
    nlohmann::json lg = nlohmann::json::array();
    const int64_t nv = engine.config().n_vocab;
    if (engine.is_sampler())
      for (const auto& gl : g.logits)
        lg.push_back(std::vector<float>(all.begin() + gl.pos * nv, all.begin() + (gl.pos + 1) * nv));
    c["logits"] = lg;
    out.push_back(c);
  }
  // Batch invariance: every case, greedy and sampled, as sequences of one batched run (when the engine
  // takes several at once) must give the ids each gave alone above.
  if (engine.options().max_num_seqs > 1) {
    const std::vector<GoldenCase> cases = load_golden(golden_name);
    std::map<int64_t, std::pair<size_t, std::string>> which;  // sequence id -> (case, "greedy"/"sampled")
    std::map<int64_t, std::vector<int32_t>> got;
    std::map<int64_t, std::vector<float>> logprobs;  // per token: its logprob, then the top 3's (id, logprob)
    if (engine.is_sampler())
      for (size_t i = 0; i < cases.size(); ++i) {
        SequenceParams g;
        g.sampling = greedy;
        g.max_tokens = static_cast<int64_t>(cases[i].generated_ids.size());
        g.stop_ids = {1};
        g.logprobs = 3;  // the log-sum-exp and the top 3 through every layout's exchange
        which[engine.add_sequence(cases[i].prompt_ids, g)] = {i, "batched_greedy"};
        SequenceParams s;
        s.sampling = sampled;
        s.max_tokens = 24;
        which[engine.add_sequence(cases[i].prompt_ids, s)] = {i, "batched_sampled"};
      }
    std::vector<SeqEvent> ev;
    while (engine.step(&ev)) {
      for (const SeqEvent& e : ev)
        if (e.token >= 0) {
          got[e.id].push_back(e.token);
          if (which[e.id].second == "batched_greedy") {
            logprobs[e.id].push_back(e.logprob);
            for (const TokenCandidate& t : e.top_logprobs) logprobs[e.id].insert(logprobs[e.id].end(), {float(t.id), t.logit});
          }
        }
      ev.clear();
    }
    for (const auto& [id, w] : which) {
      out[w.first][w.second] = got[id];
      if (w.second == "batched_greedy") out[w.first]["batched_greedy_logprobs"] = logprobs[id];
    }
  }
  return out;
}

}  // namespace shardlm::test
