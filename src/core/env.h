// Settings read from the environment: measurement and A/B switches, and a few run-time choices. One rule for
// all of them: unset or empty means "not given" (so `VAR=` clears a setting); any other value must be one the
// setting allows, or the program fails naming the variable, the value and what is allowed.
#pragma once

#include <optional>
#include <string>

namespace shardlm {

// The variable's value, or nothing when it is unset or empty.
std::optional<std::string> env_value(const char* name);

// A 0/1 switch given as `value` (the variable's value, or null): nothing when null or empty, else 0 -> false,
// 1 -> true; anything else fails with "NAME='value' is not 0 or 1 (meaning)".
std::optional<bool> parse_switch(const char* name, const char* value, const char* meaning);

// parse_switch of the variable `name` as the environment has it.
std::optional<bool> env_switch(const char* name, const char* meaning);

}  // namespace shardlm
