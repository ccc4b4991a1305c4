// An idle batched engine under tp 2 with real mpirun: rank 0 idles for three times the communicator's
// timeout (heartbeat steps, as a server's engine thread sends them), then runs a request and shuts the
// engine down. Nothing may time out, every rank must exit 0, and the request's ids must equal one rank's.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

namespace {

nlohmann::json run(int tp, double timeout_s, double idle_s) {
  const std::string out = std::string(SHARDLM_BINARY_DIR) + "/idle-tp" + std::to_string(tp) + "-" +
                          std::to_string(getpid()) + ".json";
  std::remove(out.c_str());
  const std::string worker = std::string(SHARDLM_BINARY_DIR) + "/tests/parallel/idle_worker";
  const std::string model = std::string(SHARDLM_SOURCE_DIR) + "/models/aidreams260K.gguf";
  const std::string cmd = (tp > 1 ? "mpirun --allow-run-as-root --oversubscribe --bind-to none -np " + std::to_string(tp) + " "
                                  : std::string()) +
                          worker + " " + model + " " + std::to_string(tp) + " " + std::to_string(timeout_s) + " " +
                          std::to_string(idle_s) + " " + out;
  EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd;
  std::ifstream f(out);
  if (!f) return {};
  const nlohmann::json j = nlohmann::json::parse(f);
  std::remove(out.c_str());
  return j;
}

TEST(IdleEngine, Tp2StaysUpThroughThreeTimeoutsThenServes) {
  const nlohmann::json one = run(1, 2.0, 0.0);
  const nlohmann::json two = run(2, 2.0, 6.0);
  ASSERT_TRUE(one.contains("ids") && two.contains("ids"));
  EXPECT_EQ(two["ids"], one["ids"]) << "the request after the idle period differs from one rank's";
  EXPECT_GE(two["idle_steps"].get<int>(), 20) << "rank 0 did not idle through three timeouts";
  EXPECT_EQ(one["ids"].size(), 8u);
}

}  // namespace
