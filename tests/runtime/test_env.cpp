// core/env.h: the one rule every environment setting follows (unset or empty: not given; a bad value fails
// naming the variable, the value and what is allowed).
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

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

}  // namespace
}  // namespace shardlm
