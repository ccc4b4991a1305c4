// The real `shardlm` binary, run as a user runs it: output, exit status 2 with a message naming the
// problem, self-launch through mpirun, and a rank killed mid-generation. Expectations come from run.c's
// golden outputs (tests/data/golden) and from the presets' published parameter counts.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "support/fixtures.h"

namespace {

using Clock = std::chrono::steady_clock;

const std::string kBin = std::string(SHARDLM_BINARY_DIR) + "/apps/shardlm/shardlm";
const std::string kModel = std::string(SHARDLM_SOURCE_DIR) + "/models/aidreams260K.gguf";
std::string tmp(const std::string& name) { return std::string(SHARDLM_BINARY_DIR) + "/e2e-" + name; }

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// A started `shardlm` process with stdout and stderr going to files.
struct Proc {
  pid_t pid = -1;
  std::string out_path, err_path;
  int status = -1;

  explicit Proc(const std::vector<std::string>& args, const std::string& tag = "run") {
    static int n = 0;
    out_path = tmp(tag + std::to_string(getpid()) + "-" + std::to_string(n) + ".out");
    err_path = tmp(tag + std::to_string(getpid()) + "-" + std::to_string(n++) + ".err");
    std::vector<std::string> a = {kBin};
    a.insert(a.end(), args.begin(), args.end());
    pid = fork();
    if (pid == 0) {
      const int o = open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      const int e = open(err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      if (o < 0 || e < 0) _exit(126);
      dup2(o, 1);
      dup2(e, 2);
      std::vector<char*> c;
      for (auto& s : a) c.push_back(s.data());
      c.push_back(nullptr);
      execv(kBin.c_str(), c.data());
      _exit(127);
    }
  }
  // Waits up to `seconds`; false on timeout (the process keeps running).
  bool wait(double seconds) {
    const auto end = Clock::now() + std::chrono::duration<double>(seconds);
    for (;;) {
      const pid_t r = waitpid(pid, &status, WNOHANG);
      if (r == pid) return true;
      if (Clock::now() > end) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
  int exit_code() const { return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status); }
  std::string out() const { return slurp(out_path); }
  std::string err() const { return slurp(err_path); }
};

struct Result {
  int rc;
  std::string out, err;
};

Result run(const std::vector<std::string>& args, double timeout = 120) {
  Proc p(args);
  if (!p.wait(timeout)) {
    kill(p.pid, SIGKILL);
    p.wait(10);
    ADD_FAILURE() << "timed out";
  }
  Result r{p.exit_code(), p.out(), p.err()};
  std::remove(p.out_path.c_str());
  std::remove(p.err_path.c_str());
  return r;
}

nlohmann::json golden_case0() {
  const std::string path = shardlm::test::fixture_path("golden/aidreams260K.greedy.json");
  std::ifstream f(path);
  if (!f) throw std::runtime_error("cannot open " + path);
  return nlohmann::json::parse(f)["cases"][0];
}

std::vector<int32_t> golden_first(size_t n) {
  auto ids = golden_case0()["generated_ids"].get<std::vector<int32_t>>();
  ids.resize(n);
  return ids;
}

nlohmann::json parse_json(const Result& r) {
  try {
    return nlohmann::json::parse(r.out);
  } catch (const std::exception& e) {
    ADD_FAILURE() << "not JSON: " << r.out << "\nstderr: " << r.err;
    return {};
  }
}

const std::vector<std::string> kGreedy = {"generate", "-m", kModel, "-p", "Once upon a time", "-n", "20",
                                          "--greedy", "--ignore-eos", "--json"};

TEST(Generate, GreedyMatchesRunC) {
  const Result r = run(kGreedy);
  ASSERT_EQ(r.rc, 0) << r.err;
  const auto j = parse_json(r);
  EXPECT_EQ(j["generated_ids"].get<std::vector<int32_t>>(), golden_first(20));
  EXPECT_EQ(j["prompt_ids"], golden_case0()["prompt_ids"]);
  // `text` is the continuation only: run.c printed prompt + continuation.
  const std::string text = j["text"].get<std::string>();
  const std::string gold = golden_case0()["text"].get<std::string>();
  const std::string prompt = "Once upon a time";
  ASSERT_EQ(gold.rfind(prompt, 0), 0u);
  EXPECT_FALSE(text.empty());
  EXPECT_EQ(text.rfind(prompt, 0), std::string::npos) << "text repeats the prompt: " << text;
  EXPECT_EQ(gold.substr(prompt.size(), text.size()), text);
}

#ifdef SHARDLM_E2E_MPI
TEST(Generate, TensorParallelSelfLaunchGivesSameIds) {
  for (const char* tp : {"2", "3"}) {  // 3 splits the 4 heads unevenly (2, 1, 1)
    auto args = kGreedy;
    args.insert(args.end(), {"--tp", tp});
    const Result r = run(args);
    ASSERT_EQ(r.rc, 0) << "--tp " << tp << ": " << r.err;
    EXPECT_EQ(parse_json(r)["generated_ids"].get<std::vector<int32_t>>(), golden_first(20)) << "--tp " << tp;
  }
}
#endif

TEST(Generate, SeededSamplingIsReproducible) {
  const std::vector<std::string> args = {"generate", "-m", kModel, "-p", "Once upon a time", "-n", "24",
                                         "--seed", "7", "--temp", "0.8", "--ignore-eos", "--json"};
  const Result a = run(args), b = run(args);
  ASSERT_EQ(a.rc, 0) << a.err;
  EXPECT_EQ(a.out, b.out);
  EXPECT_EQ(parse_json(a)["generated_ids"].size(), 24u);
  auto other = args;
  other[8] = "8";  // another seed: some other continuation (24 tokens at 0.8 from a 512 vocabulary)
  EXPECT_NE(run(other).out, a.out);
}

void expect_usage_error(const std::vector<std::string>& args, const std::vector<std::string>& words) {
  const Result r = run(args);
  std::string joined;
  for (const auto& a : args) joined += a + " ";
  EXPECT_EQ(r.rc, 2) << joined << "\n" << r.err;
  for (const auto& w : words) EXPECT_NE(r.err.find(w), std::string::npos) << joined << ": '" << w << "' not in:\n" << r.err;
}

TEST(Errors, ExitTwoWithMessageNamingTheProblem) {
  expect_usage_error({"generate", "-m", tmp("no-such-model.gguf"), "-n", "2"}, {"no-such-model.gguf", "does not exist"});
  expect_usage_error({"generate", "-m", kModel, "--bogus-flag"}, {"--bogus-flag"});
  expect_usage_error({"generate", "-m", kModel, "-n", "abc"}, {"abc", "n-predict"});
  expect_usage_error({"generate", "-m", kModel, "-c", "8", "-n", "4", "-p",
                      "Once upon a time there was a little girl who liked to play in the garden"},
                     {"context size 8"});
  expect_usage_error({"generate", "-m", kModel, "--prompt-ids", "1,99999", "-n", "2"}, {"99999", "vocabulary"});
  expect_usage_error({"generate", "-m", kModel, "--layer-split", "1,2,3", "--pp", "2", "-n", "2"},
                     {"--layer-split", "3", "--pp"});
  const std::string not_gguf = tmp("not-a-model.gguf");
  std::ofstream(not_gguf) << "this is plain text, not a GGUF file\n";
  expect_usage_error({"inspect", not_gguf}, {"not-a-model.gguf", "GGUF"});
}

#ifdef SHARDLM_E2E_MPI
TEST(Errors, ImpossibleTensorSplitExitsTwo) {
  // 5 ranks cannot share 4 query heads; every rank reports it and mpirun passes the status on.
  expect_usage_error({"generate", "-m", kModel, "--tp", "5", "-n", "2", "-p", "hi", "-q"},
                     {"tensor parallel size 5", "4 query heads"});
}
#endif

TEST(Tokens, TokenizeMatchesRunCAndRoundTrips) {
  const Result r = run({"tokenize", "-m", kModel, "--text", "Once upon a time", "--json"});
  ASSERT_EQ(r.rc, 0) << r.err;
  const auto ids = parse_json(r)["ids"].get<std::vector<int32_t>>();
  EXPECT_EQ(ids, golden_case0()["prompt_ids"].get<std::vector<int32_t>>());
  std::string list;
  for (int32_t id : ids) {
    if (!list.empty()) list += ',';
    list += std::to_string(id);
  }
  const Result d = run({"detokenize", "-m", kModel, "--ids", list});
  ASSERT_EQ(d.rc, 0) << d.err;
  EXPECT_EQ(d.out, "Once upon a time\n");
}

TEST(Tokens, TokenizeWithoutTextIsEmpty) {
  // Decided behaviour: no text is the empty text, which is just BOS (or nothing with --no-bos).
  Result r = run({"tokenize", "-m", kModel, "--json"});
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_EQ(parse_json(r)["ids"], nlohmann::json::array({1}));
  r = run({"tokenize", "-m", kModel, "--no-bos", "--json"});
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_EQ(parse_json(r)["ids"], nlohmann::json::array());
}

TEST(GenModel, SmallPresetRuns) {
  const std::string path = tmp("tiny-q8_0.gguf");
  Result r = run({"gen-model", "--arch", "tiny", "--type", "q8_0", "-o", path, "-q"});
  ASSERT_EQ(r.rc, 0) << r.err;
  r = run({"generate", "-m", path, "-n", "4", "--prompt-ids", "1,2,3", "--json", "--ignore-eos"});
  ASSERT_EQ(r.rc, 0) << r.err;
  const auto j = parse_json(r);
  EXPECT_EQ(j["prompt_ids"], nlohmann::json::array({1, 2, 3}));
  const auto ids = j["generated_ids"].get<std::vector<int32_t>>();
  ASSERT_EQ(ids.size(), 4u);
  for (int32_t id : ids) EXPECT_TRUE(id >= 0 && id < 512) << id;
  std::remove(path.c_str());
}

TEST(GenModel, SparsePresetsHavePublishedParameterCounts) {
  // Meta's model cards: Llama 3.1 8B has 8.03e9 parameters, 70B has 70.6e9.
  for (const auto& [arch, expect] : {std::pair<std::string, double>{"llama-3.1-8b", 8.03e9}, {"llama-3.1-70b", 70.6e9}}) {
    const std::string path = tmp(arch + "-sparse.gguf");
    Result r = run({"gen-model", "--arch", arch, "--type", "q4_0", "--sparse", "-o", path, "-q"});
    ASSERT_EQ(r.rc, 0) << r.err;
    struct stat st{};
    ASSERT_EQ(stat(path.c_str(), &st), 0);
    EXPECT_LT(static_cast<double>(st.st_blocks) * 512, 64e6) << arch << ": a sparse file should cost no disk";
    r = run({"inspect", "--json", "--no-tensors", path});
    ASSERT_EQ(r.rc, 0) << r.err;
    const auto j = parse_json(r);
    ASSERT_TRUE(j.contains("n_params")) << r.out.substr(0, 2000);
    const double n = j["n_params"].get<double>();
    EXPECT_NEAR(n, expect, 0.005 * expect) << arch;
    std::remove(path.c_str());
  }
}

#ifdef SHARDLM_E2E_MPI
std::vector<pid_t> children(pid_t parent) {
  std::vector<pid_t> out;
  for (const auto& e : std::filesystem::directory_iterator("/proc")) {
    const std::string name = e.path().filename();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::ifstream f(e.path() / "stat");
    std::string s((std::istreambuf_iterator<char>(f)), {});
    const auto close = s.rfind(')');
    if (close == std::string::npos) continue;
    std::istringstream rest(s.substr(close + 2));
    char state = 0;
    pid_t ppid = 0;
    rest >> state >> ppid;
    if (ppid == parent && state != 'Z') out.push_back(static_cast<pid_t>(std::stol(name)));
  }
  return out;
}

bool alive(pid_t pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
  if (!f) return false;
  std::string s((std::istreambuf_iterator<char>(f)), {});
  const auto close = s.rfind(')');
  return close != std::string::npos && s.size() > close + 2 && s[close + 2] != 'Z';
}

TEST(Failure, KilledRankStopsTheOthersWithAMessage) {
  // A model whose 511-token generation with the fp64 reference backend takes long enough to be caught
  // mid-way; generation has begun once rank 0 has printed tokens.
  const std::string path = tmp("kill-tiny-k.gguf");
  Result g = run({"gen-model", "--arch", "tiny-k", "--type", "f32", "-o", path, "-q"});
  ASSERT_EQ(g.rc, 0) << g.err;
  Proc p({"generate", "-m", path, "--tp", "2", "-c", "512", "-n", "511", "--prompt-ids", "1", "--ignore-eos",
          "--backend", "reference", "-t", "1", "--comm-timeout", "10"},
         "kill");
  const auto start = Clock::now();
  while (p.out().size() < 20 && Clock::now() - start < std::chrono::seconds(60) && !p.wait(0))
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  ASSERT_GE(p.out().size(), 20u) << "generation did not start (or ended): " << p.err();
  std::vector<pid_t> mpirun = children(p.pid);
  ASSERT_EQ(mpirun.size(), 1u) << "expected the launcher's one mpirun child";
  std::vector<pid_t> ranks = children(mpirun[0]);
  ASSERT_EQ(ranks.size(), 2u) << "expected 2 ranks under mpirun";
  ASSERT_EQ(kill(ranks[1], SIGKILL), 0);
  const auto killed = Clock::now();
  const bool exited = p.wait(30);
  if (!exited) {
    kill(p.pid, SIGKILL);
    kill(mpirun[0], SIGKILL);
    for (pid_t r : ranks) kill(r, SIGKILL);
    p.wait(5);
  }
  ASSERT_TRUE(exited) << "the launcher still runs 30 s after a rank was killed";
  const double took = std::chrono::duration<double>(Clock::now() - killed).count();
  const std::string err = p.err();
  std::printf("launcher exited %.1f s after the kill with status %d; stderr tail:\n%s\n", took, p.exit_code(),
              err.substr(err.size() > 1500 ? err.size() - 1500 : 0).c_str());
  EXPECT_NE(p.exit_code(), 0);
  EXPECT_TRUE(err.find("process rank 1") != std::string::npos || err.find("rank 1 ") != std::string::npos)
      << "stderr does not name the failed rank 1";
  bool any = false;
  for (int i = 0; i < 100; ++i) {  // reparented ranks may take a moment to be reaped
    any = alive(mpirun[0]) || alive(ranks[0]) || alive(ranks[1]);
    if (!any) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_FALSE(any) << "a process of the run is still alive";
  std::remove(p.out_path.c_str());
  std::remove(p.err_path.c_str());
  std::remove(path.c_str());
}
#endif

}  // namespace
