// Errors and checked arithmetic shared by every layer.
//
// Library code never exits or aborts on bad input: it throws shardlm::Error with a message that names
// the field, the value and the limit. The command line catches it and exits with status 2 (bad input)
// or 1 (everything else), so one mechanism serves files, flags and requests alike.
#pragma once

#include <cstdint>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>

namespace shardlm {

enum class ErrorKind {
  kInvalidInput,  // a file, flag or request is malformed or out of range (exit status 2)
  kIo,            // a file cannot be opened, read or written (exit status 2)
  kUnsupported,   // well-formed, but a feature we do not implement (exit status 2)
  kResource,      // out of memory or device capacity (exit status 1)
  kComm,          // a peer rank failed or a collective timed out (exit status 1)
  kInternal,      // a bug: an invariant the code itself should have kept (exit status 1)
};

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message, ErrorKind kind = ErrorKind::kInvalidInput)
      : std::runtime_error(message), kind_(kind) {}
  ErrorKind kind() const { return kind_; }
  int exit_code() const {
    return (kind_ == ErrorKind::kInvalidInput || kind_ == ErrorKind::kIo ||
            kind_ == ErrorKind::kUnsupported)
               ? 2
               : 1;
  }

 private:
  ErrorKind kind_;
};

// Concatenates anything streamable: cat("tensor '", name, "' has ", n, " dims") keeps messages readable
// without a formatting dependency that nvcc would also have to digest.
template <typename... Args>
std::string cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

template <typename... Args>
[[noreturn]] void fail(const Args&... args) {
  throw Error(cat(args...), ErrorKind::kInvalidInput);
}

template <typename... Args>
[[noreturn]] void fail_kind(ErrorKind kind, const Args&... args) {
  throw Error(cat(args...), kind);
}

// Invariant checks for conditions only a bug can break (never for validating input).
#define SHARDLM_CHECK(cond, ...)                                                              \
  do {                                                                                        \
    if (!(cond))                                                                              \
      ::shardlm::fail_kind(::shardlm::ErrorKind::kInternal, __FILE__, ":", __LINE__,          \
                           ": internal check failed: " #cond " ", ##__VA_ARGS__);              \
  } while (0)

// Checked arithmetic for sizes that come from files or users. `what` names the quantity in the error.
template <typename T>
T checked_mul(T a, T b, std::string_view what) {
  static_assert(std::is_integral_v<T>);
  T r;
  if (__builtin_mul_overflow(a, b, &r)) fail(what, ": ", a, " * ", b, " overflows");
  return r;
}

template <typename T>
T checked_add(T a, T b, std::string_view what) {
  static_assert(std::is_integral_v<T>);
  T r;
  if (__builtin_add_overflow(a, b, &r)) fail(what, ": ", a, " + ", b, " overflows");
  return r;
}

// Narrowing that refuses to wrap (e.g. a uint64 count from a file into an int64 element count).
template <typename To, typename From>
To checked_cast(From v, std::string_view what) {
  static_assert(std::is_integral_v<To> && std::is_integral_v<From>);
  To r = static_cast<To>(v);
  if (static_cast<From>(r) != v || ((r < To{}) != (v < From{})))
    fail(what, ": value ", +v, " does not fit the range [", +std::numeric_limits<To>::min(), ", ",
         +std::numeric_limits<To>::max(), "]");
  return r;
}

}  // namespace shardlm
