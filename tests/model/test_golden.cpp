// The whole model on one rank against llama2.c's run.c (an independent float32 implementation).
#include <gtest/gtest.h>

#include <cmath>

#include "golden.h"
#include "runtime/engine.h"

namespace shardlm::test {
namespace {

struct Param {
  const char* model;
  const char* backend;
  GgmlType kv;
};

class Golden : public ::testing::TestWithParam<Param> {};

// Logits: run.c prints 6 significant digits and sums in another order: 1e-4 absolute plus 1e-4 relative
// covers the printing (5e-6 relative) with room for float32 reordering over 64-wide dot products.
constexpr double kAtol = 1e-4, kRtol = 1e-4;
// An F16 KV cache rounds K and V to 11 significant bits; logits move by ~1e-3 at this model size.
constexpr double kAtolF16 = 3e-2, kRtolF16 = 3e-2;

TEST_P(Golden, GreedyIdsAndLogitsMatchRunC) {
  const Param p = GetParam();
  auto src = open_model_source(converted_model(p.model));
  auto comm = make_single_rank_communicator();
  EngineOptions o;
  o.backend = p.backend;
  o.kv_type = p.kv;
  o.n_threads = 2;
  Engine engine(*src, *comm, o);
  auto tok = Tokenizer::create(*src->vocab());
  SamplerParams greedy;
  greedy.temperature = 0;
  const double atol = p.kv == GgmlType::F16 ? kAtolF16 : kAtol, rtol = p.kv == GgmlType::F16 ? kRtolF16 : kRtol;
  int n_cases = 0;
  for (const GoldenCase& g : load_golden(p.model)) {
    SCOPED_TRACE(g.prompt);
    if (!g.prompt.empty()) {
      EXPECT_EQ(tok->encode(g.prompt, true, false), g.prompt_ids) << "tokenizer";
    }
    // run.c stops after emitting BOS (id 1) and never stops at EOS.
    const GenerateResult r = engine.generate(g.prompt_ids, static_cast<int64_t>(g.generated_ids.size()), greedy, 1);
    if (p.kv == GgmlType::F32) {
      EXPECT_EQ(r.generated, g.generated_ids);
    }
    std::vector<int32_t> seq = g.prompt_ids;
    seq.insert(seq.end(), g.generated_ids.begin(), g.generated_ids.end() - 1);
    const std::vector<float> all = engine.all_logits(seq);
    const int64_t nv = engine.config().n_vocab;
    for (const GoldenLogits& gl : g.logits) {
      ASSERT_LT(gl.pos, static_cast<int64_t>(seq.size()));
      double worst = 0;
      int64_t worst_i = -1;
      for (int64_t i = 0; i < nv; ++i) {
        const double ref = gl.logits[size_t(i)], got = all[size_t(gl.pos * nv + i)];
        const double share = std::fabs(got - ref) / (atol + rtol * std::fabs(ref));
        if (!(share <= worst) || std::isnan(got)) worst = std::isnan(got) ? INFINITY : share, worst_i = i;
      }
      EXPECT_LE(worst, 1.0) << "pos " << gl.pos << ": worst logit " << worst_i << " uses " << worst
                            << "x its tolerance (atol " << atol << ", rtol " << rtol << ")";
    }
    ++n_cases;
  }
  EXPECT_GT(n_cases, 0);
}

INSTANTIATE_TEST_SUITE_P(Models, Golden,
                         ::testing::Values(Param{"aidreams260K", "cpu", GgmlType::F32},
                                           Param{"stories260K", "cpu", GgmlType::F32},
                                           Param{"aidreams260K", "reference", GgmlType::F32},
                                           Param{"stories260K", "cpu", GgmlType::F16}),
                         [](const ::testing::TestParamInfo<Param>& i) {
                           return std::string(i.param.model) + "_" + i.param.backend + "_" + type_name(i.param.kv);
                         });

}  // namespace
}  // namespace shardlm::test
