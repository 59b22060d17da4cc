// Typed errors and check macros.
//
// Library code never exits: it throws one of these, and only main() catches. main() prints one line
// (what went wrong, where, and the config key when there is one) and aborts the whole job, so no rank is
// left waiting in a collective. Check macros name the failed statement and file:line.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace moe {

enum class ErrorKind {
  kConfig,    // a configuration value is wrong; key() names it
  kInput,     // a file the user gave us (data, checkpoint) is missing or malformed
  kComm,      // a communicator call failed
  kResource,  // a device ran out of memory: the job asked for more than the machine has, not a bug
  kInternal,  // a broken invariant: a bug in this code
};

const char* error_kind_name(ErrorKind kind);

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message, std::string key = "")
      : std::runtime_error(message), kind_(kind), key_(std::move(key)) {}
  ErrorKind kind() const { return kind_; }
  // The configuration key the error is about, or "" when none.
  const std::string& key() const { return key_; }
  // Set when every rank is known to raise this same error at the same point (configuration checks run
  // on identical input everywhere): main() can then stop cleanly without aborting the job.
  bool collective() const { return collective_; }
  void mark_collective() { collective_ = true; }

 private:
  ErrorKind kind_;
  std::string key_;
  bool collective_ = false;
};

class ConfigError : public Error {
 public:
  ConfigError(const std::string& key, const std::string& message)
      : Error(ErrorKind::kConfig, key.empty() ? message : key + ": " + message, key) {}
};

class InputError : public Error {
 public:
  InputError(const std::string& what, const std::string& message, std::string key = "")
      : Error(ErrorKind::kInput, what + ": " + message, std::move(key)) {}
};

class CommError : public Error {
 public:
  explicit CommError(const std::string& message, std::string key = "") : Error(ErrorKind::kComm, message, std::move(key)) {}
};

// Out of device memory: what was requested and what the device had, in one line.
class ResourceError : public Error {
 public:
  explicit ResourceError(const std::string& message) : Error(ErrorKind::kResource, message) {}
};

class InternalError : public Error {
 public:
  explicit InternalError(const std::string& message) : Error(ErrorKind::kInternal, message) {}
};

// e, marked as raised by every rank together (every rank saw the same input and throws the same error at the
// same point), for a clean stop with one line: throw collective(ConfigError(key, "..."));
template <typename E>
E collective(E e) {
  e.mark_collective();
  return e;
}

// Runs f, marking an error it throws as raised by every rank together (for work every rank does alike,
// such as parsing the same arguments), so that main stops the job cleanly with one line.
template <typename F>
auto on_every_rank(F f) {
  try {
    return f();
  } catch (Error& e) {
    e.mark_collective();
    throw;
  }
}

namespace detail {
template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream out;
  (out << ... << args);
  return out.str();
}
}  // namespace detail

}  // namespace moe

#define MOE_STRINGIFY_(x) #x
#define MOE_STRINGIFY(x) MOE_STRINGIFY_(x)

// MOE_CHECK(cond, message parts...): a broken invariant is a bug; report the statement and file:line.
#define MOE_CHECK(cond, ...)                                                                    \
  do {                                                                                          \
    if (!(cond)) {                                                                              \
      throw ::moe::InternalError(::moe::detail::concat(                                         \
          "check failed: " #cond " at " __FILE__ ":" MOE_STRINGIFY(__LINE__) ": ", __VA_ARGS__)); \
    }                                                                                           \
  } while (0)
