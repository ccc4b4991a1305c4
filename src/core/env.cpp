#include "core/env.h"

#include <cstdlib>

#include "core/error.h"

namespace shardlm {

std::optional<std::string> env_value(const char* name) {
  const char* v = std::getenv(name);
  if (!v || !*v) return std::nullopt;
  return std::string(v);
}

std::optional<bool> parse_switch(const char* name, const char* value, const char* meaning) {
  if (!value || !*value) return std::nullopt;
  const std::string v = value;
  if (v != "0" && v != "1") fail(name, "='", v, "' is not 0 or 1 (", meaning, ")");
  return v == "1";
}

std::optional<bool> env_switch(const char* name, const char* meaning) {
  return parse_switch(name, std::getenv(name), meaning);
}

}  // namespace shardlm
