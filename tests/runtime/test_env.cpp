// core/env.h: the one rule every environment setting follows (unset or empty: not given; a bad value fails
// naming the variable, the value and what is allowed).
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

#include "core/cuda_tuning.h"
#include "core/env.h"
#include "core/error.h"

namespace shardlm {
namespace {

constexpr const char* kVar = "SHARDLM_TEST_ENV_SWITCH";

TEST(Env, UnsetAndEmptyAreNotGiven) {
  unsetenv(kVar);
  EXPECT_FALSE(env_value(kVar).has_value());
  EXPECT_FALSE(env_switch(kVar, "test").has_value());
  setenv(kVar, "", 1);
  EXPECT_FALSE(env_value(kVar).has_value());
  EXPECT_FALSE(env_switch(kVar, "test").has_value());
  EXPECT_FALSE(parse_switch(kVar, nullptr, "test").has_value());
  unsetenv(kVar);
}

TEST(Env, ZeroAndOneAreTheSwitchesValues) {
  setenv(kVar, "0", 1);
  ASSERT_TRUE(env_switch(kVar, "test").has_value());
  EXPECT_FALSE(*env_switch(kVar, "test"));
  setenv(kVar, "1", 1);
  EXPECT_TRUE(env_switch(kVar, "test").value_or(false));
  EXPECT_EQ(env_value(kVar).value_or(""), "1");
  unsetenv(kVar);
}

TEST(Env, AnythingElseFailsNamingTheVariableTheValueAndTheMeaning) {
  for (const char* bad : {"on", "2", " 1", "true"}) {
    setenv(kVar, bad, 1);
    try {
      env_switch(kVar, "1: something, the default");
      ADD_FAILURE() << "no error for '" << bad << "'";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(std::string(kVar) + "='" + bad + "' is not 0 or 1 (1: something, the default)"),
                std::string::npos)
          << e.what();
    }
  }
  unsetenv(kVar);
}

// The CUDA kernel switches: the applications read them here, the library takes the struct. Unset variables
// leave the defaults; set ones land in their fields; a number outside its range fails naming the variable.
TEST(Env, CudaTuningFromTheEnvironment) {
  const char* vars[] = {"SHARDLM_CUDA_PACK", "SHARDLM_CUDA_TOKENS_MAX", "SHARDLM_CUDA_MMA_MAX", "SHARDLM_CUDA_SKIP",
                        "SHARDLM_CUDA_ATTN_BLOCKS_PER_KV_HEAD"};
  for (const char* v : vars) unsetenv(v);
  const CudaTuning d = cuda_tuning_from_env(), plain;
  EXPECT_EQ(d.pack_weights, plain.pack_weights);
  EXPECT_EQ(d.tokens_max, plain.tokens_max);
  EXPECT_EQ(d.mma_max, plain.mma_max);
  EXPECT_TRUE(d.skip.empty());
  setenv("SHARDLM_CUDA_PACK", "0", 1);
  setenv("SHARDLM_CUDA_TOKENS_MAX", "12", 1);
  setenv("SHARDLM_CUDA_MMA_MAX", "64", 1);
  setenv("SHARDLM_CUDA_SKIP", "norm,attn", 1);
  const CudaTuning t = cuda_tuning_from_env();
  EXPECT_FALSE(t.pack_weights);
  EXPECT_EQ(t.tokens_max, 12);
  EXPECT_EQ(t.mma_max, 64);
  EXPECT_EQ(t.skip, "norm,attn");
  for (const char* bad : {"0", "4097", "12x", "-1"}) {
    setenv("SHARDLM_CUDA_TOKENS_MAX", bad, 1);
    try {
      cuda_tuning_from_env();
      ADD_FAILURE() << "no error for SHARDLM_CUDA_TOKENS_MAX='" << bad << "'";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(std::string("SHARDLM_CUDA_TOKENS_MAX='") + bad + "': expected 1 to 4096"),
                std::string::npos)
          << e.what();
    }
  }
  for (const char* v : vars) unsetenv(v);
}

}  // namespace
}  // namespace shardlm
