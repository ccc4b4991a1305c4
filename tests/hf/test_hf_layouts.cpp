// Every tiny Hugging Face fixture - as its directory and after `shardlm convert --from hf` to GGUF F16 and
// Q8_0 - on one rank, under tp 2 and under pp 2, the mixtures of experts also at tp 2 with expert
// parallelism (real processes started by mpirun, oversubscribed: CI has 2 cores), against transformers'
// reference.json (an independent implementation).
//
// What is asserted, with reasons:
// - Directory and F16: logits at the first and last prompt position within 1e-4 + 1e-4|ref| of the
//   reference when RoPE frequencies are rounded to bf16 as the reference's were (measured worst 4e-6 on
//   one rank: float32 summation order; tp/pp only reorder the sums). bf16 -> f16 is exact for these weights
//   except f16 subnormals below 6e-5, which keep an absolute error under 3e-8 - invisible at 1e-4. Argmax at
//   every position and the 32 greedy tokens identical with the exact frequencies the engine runs.
// - Q8_0: KL(reference softmax || ours) at the first and last position below kKlQ8, argmax flips at
//   no more than 1/8 of the positions, the first 16 greedy tokens equal (see kKlQ8 for the measurements).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>

#include <unistd.h>

#include "hf_reference.h"
#include "hf_test_util.h"

namespace shardlm::test {
namespace {

const std::vector<std::string> kFixtures = {"tiny-llama2", "tiny-llama31", "tiny-llama31-v4config", "tiny-qwen2",
                                            "tiny-mistral", "tiny-qwen3", "tiny-qwen3moe", "tiny-mixtral"};
const std::vector<std::string> kFormats = {"hf", "f16", "q8_0"};

constexpr double kAtol = 1e-4, kRtol = 1e-4;
// Exact frequencies vs the reference's bf16-rounded ones: measured worst 7.1e-3 (see test_hf_e2e.cpp).
constexpr double kAtolExact = 2e-2;
// Q8_0 (one f16 scale per 32 weights, 8-bit values). Measured KL at the first/last positions, identical on
// 1 rank, tp 2 and pp 2: 2.1e-5..3.7e-5 nats (llama2, qwen2, mistral), 9.7e-5..3.0e-4 (llama31: GQA and
// theta 5e5). Bound 1e-3, 3.4x the worst: rounding or summation-order changes pass, while an error
// 10x larger than Q8_0's own (e.g. a block with a wrong scale) fails. F16 measures ~1e-13, so the bound
// measures the quantization alone.
// Argmax: measured flips at 0..2 of 24 positions (near-ties on random weights): asserted <= 3 of 24 and
// <= 1 of 8. Greedy: the 32 tokens diverge after a near-tie (first difference at token 21 at the
// earliest), so the first 16 tokens must equal transformers'.
constexpr double kKlQ8 = 1e-3;

std::string bin() { return std::string(SHARDLM_BINARY_DIR); }
std::string shardlm_exe() { return bin() + "/apps/shardlm/shardlm"; }
// Per process: ctest runs each test in its own process, two at a time.
std::string tmp_name(const std::string& what) { return cat(bin(), "/hf-", ::getpid(), "-", what); }
std::string gguf_path(const std::string& f, const std::string& type) { return tmp_name(f + "-" + type + ".gguf"); }

std::string slurp(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// `shardlm convert --from hf` once per fixture and type; the progress it prints on stderr is checked.
std::string model_path(const std::string& f, const std::string& format) {
  if (format == "hf") return hf_fixture(f);
  static std::map<std::string, bool> done;
  const std::string out = gguf_path(f, format);
  if (!done[out]) {
    const std::string err = out + ".stderr";
    const std::string cmd = shardlm_exe() + " convert --from hf " + hf_fixture(f) + " -o " + out + " --type " +
                            format + " 2> " + err;
    EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd << "\n" << slurp(err);
    const std::string e = slurp(err);
    EXPECT_NE(e.find("writing " + out + " 100%"), std::string::npos) << "no progress on stderr:\n" << e;
    EXPECT_NE(e.find("converting"), std::string::npos) << e;
    std::remove(err.c_str());
    done[out] = true;
  }
  return out;
}

// One mpirun launch per layout and model (cached within this process).
const nlohmann::json& run_layout(int tp, int pp, const std::string& fixture, const std::string& format,
                                 bool ep = false) {
  static std::map<std::string, nlohmann::json> cache;
  const std::string model = model_path(fixture, format);
  const std::string tp_arg = cat(tp, ep ? "ep" : "");
  const std::string key = cat(tp_arg, "x", pp, " ", model);
  if (auto it = cache.find(key); it != cache.end()) return it->second;
  const std::string out = tmp_name(cat("layout-tp", tp_arg, "-pp", pp, "-", fixture, "-", format, ".json"));
  std::remove(out.c_str());
  std::string cmd;
  if (tp * pp > 1)
    cmd = cat("mpirun --allow-run-as-root --oversubscribe --bind-to none --mca mpi_yield_when_idle 1 -np ", tp * pp, " ");
  cmd.append(cat(bin(), "/tests/hf/hf_worker ", out, " ", tp_arg, " ", pp, " ", model, " ", hf_fixture(fixture)));
  EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd;
  std::ifstream in(out);
  nlohmann::json j = in ? nlohmann::json::parse(in) : nlohmann::json::object();
  in.close();
  std::remove(out.c_str());
  return cache[key] = j.contains(model) ? j[model] : nlohmann::json::object();
}

// Converted files are removed when the process ends.
struct Cleanup {
  ~Cleanup() {
    for (const auto& f : kFixtures)
      for (const auto& fmt : kFormats)
        if (fmt != "hf") std::remove(gguf_path(f, fmt).c_str());
  }
} cleanup;

struct Param {
  int tp, pp;
  const char* fixture;
  const char* format;
  bool ep = false;  // --enable-expert-parallel (mixture-of-experts fixtures at tp 2)
};

class HfLayouts : public ::testing::TestWithParam<Param> {};

TEST_P(HfLayouts, MatchesTransformers) {
  const Param p = GetParam();
  const nlohmann::json& res = run_layout(p.tp, p.pp, p.fixture, p.format, p.ep);
  ASSERT_TRUE(res.contains("cases")) << "worker wrote no result";
  const nlohmann::json& got = res["cases"];
  const auto ref = load_reference(hf_fixture(p.fixture));
  ASSERT_EQ(got.size(), ref.size());
  const bool q8 = std::string(p.format) == "q8_0";
  for (size_t c = 0; c < ref.size(); ++c) {
    SCOPED_TRACE(cat(p.fixture, " ", p.format, " tp ", p.tp, p.ep ? " expert-parallel" : "", " pp ", p.pp, ", case ", c));
    const auto first_r = got[c]["first_bf16rope"].get<std::vector<float>>();
    const auto last_r = got[c]["last_bf16rope"].get<std::vector<float>>();
    const auto last = got[c]["last"].get<std::vector<float>>();
    ASSERT_EQ(first_r.size(), ref[c].logits_first.size());
    ASSERT_EQ(last.size(), ref[c].logits_last.size());
    const auto am = got[c]["argmax"].get<std::vector<int32_t>>();
    const auto greedy = got[c]["greedy"].get<std::vector<int32_t>>();
    const double kl_first = kl_divergence(ref[c].logits_first, first_r.data());
    const double kl_last = kl_divergence(ref[c].logits_last, last_r.data());
    const Worst wf = worst_share(first_r.data(), ref[c].logits_first, kAtol, kRtol);
    const Worst wl = worst_share(last_r.data(), ref[c].logits_last, kAtol, kRtol);
    size_t am_diff = 0, greedy_same = 0;
    for (size_t i = 0; i < std::min(am.size(), ref[c].argmax_all.size()); ++i) am_diff += am[i] != ref[c].argmax_all[i];
    while (greedy_same < std::min(greedy.size(), ref[c].greedy_32.size()) &&
           greedy[greedy_same] == ref[c].greedy_32[greedy_same])
      ++greedy_same;
    std::printf("%-22s %-5s tp%d%s pp%d case %zu: KL first %.2e last %.2e; logits %.3gx/%.3gx tol; argmax diffs %zu; "
                "greedy same for %zu of %zu\n",
                p.fixture, p.format, p.tp, p.ep ? "ep" : "", p.pp, c, kl_first, kl_last, wf.share, wl.share, am_diff, greedy_same,
                ref[c].greedy_32.size());
    if (!q8) {
      EXPECT_LE(wf.share, 1.0) << "first position: logit " << wf.index << " " << first_r[wf.index] << " vs "
                               << ref[c].logits_first[wf.index];
      EXPECT_LE(wl.share, 1.0) << "last position: logit " << wl.index << " " << last_r[wl.index] << " vs "
                               << ref[c].logits_last[wl.index];
      EXPECT_LE(worst_share(last.data(), ref[c].logits_last, kAtolExact, 0).share, 1.0) << "exact frequencies";
      EXPECT_EQ(am, ref[c].argmax_all);
      EXPECT_EQ(greedy, ref[c].greedy_32);
    } else {
      EXPECT_LE(kl_first, kKlQ8);
      EXPECT_LE(kl_last, kKlQ8);
      EXPECT_EQ(am.size(), ref[c].argmax_all.size());
      EXPECT_LE(am_diff * 8, am.size()) << "argmax differs at " << am_diff << " of " << am.size() << " positions";
      // Greedy: the first 16 tokens equal, unless they part where the reference's top-2 margin is below
      // twice the largest logit error Q8_0 made at the last prompt position (a near-tie at Q8_0's precision,
      // where either token is right: tiny-mixtral parts at margins 0.012 and 0.009 with errors of 0.02). The
      // margins are transformers' where the fixture has them, else the fp64 reference backend's on the same
      // file (hf_worker): tiny-mistral parts at token 7 on AVX2, whose int8-rounded activations move its 0.0025
      // margin by 0.008 (its Q8_0 logit errors against transformers are 0.04).
      float err = 0;
      for (size_t i = 0; i < last.size(); ++i) err = std::max(err, std::abs(last[i] - ref[c].logits_last[i]));
      const std::vector<float> margins = !ref[c].greedy_margins.empty() ? ref[c].greedy_margins
                                         : got[c].contains("fp64_margins") ? got[c]["fp64_margins"].get<std::vector<float>>()
                                                                           : std::vector<float>{};
      const bool near_tie = greedy_same < margins.size() && margins[greedy_same] < 2 * err;
      if (near_tie)
        std::printf("  parts at token %zu: margin %.4g below twice the logit error %.4g (a near-tie)\n", greedy_same,
                    margins[greedy_same], err);
      if (!near_tie) {
        EXPECT_GE(greedy_same, 16u) << "greedy tokens differ from token " << greedy_same;
      }
    }
  }
}

// tiny-llama31-v4config is tiny-llama31 with a transformers 4.x config.json: the same numbers, bit for bit.
TEST(HfLayouts, V4ConfigGivesTheSameOutputs) {
  for (auto [tp, pp] : {std::pair{1, 1}, {2, 1}, {1, 2}}) {
    for (const auto& fmt : kFormats) {
      const nlohmann::json& a = run_layout(tp, pp, "tiny-llama31", fmt);
      const nlohmann::json& b = run_layout(tp, pp, "tiny-llama31-v4config", fmt);
      ASSERT_TRUE(a.contains("cases") && b.contains("cases"));
      EXPECT_EQ(a["cases"], b["cases"]) << fmt << " tp " << tp << " pp " << pp;
    }
  }
}

std::vector<Param> params() {
  std::vector<Param> r;
  for (auto [tp, pp] : {std::pair{1, 1}, {2, 1}, {1, 2}})
    for (const auto& f : kFixtures)
      for (const auto& fmt : kFormats) r.push_back({tp, pp, f.c_str(), fmt.c_str()});
  for (const char* f : {"tiny-qwen3moe", "tiny-mixtral"})
    for (const auto& fmt : kFormats) r.push_back({2, 1, f, fmt.c_str(), true});
  return r;
}

INSTANTIATE_TEST_SUITE_P(All, HfLayouts, ::testing::ValuesIn(params()), [](const ::testing::TestParamInfo<Param>& i) {
  std::string n = std::string(i.param.fixture) + "_" + i.param.format + "_tp" + std::to_string(i.param.tp) +
                  (i.param.ep ? "ep" : "") + "_pp" + std::to_string(i.param.pp);
  for (char& ch : n)
    if (ch == '-') ch = '_';
  return n;
});

}  // namespace
}  // namespace shardlm::test
