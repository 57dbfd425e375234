// Error classes of control-socket responses, and typed access to the members
// of a JSON object (a request's "arguments", or a reply the CLI reads back)
// with errors that name the member and the expected type.
//
// A handler chooses the error class of its response by the Status it
// returns: InvalidArgument() (EINVAL), NotSupported() (ENOTSUP) and
// WrongState() (EBUSY) map to their classes, anything else is GenericError.
// The server adds InvalidRequest and CommandNotFound itself (docs/control.md).
#pragma once

#include <cerrno>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "faultline/status.h"

namespace faultline::control {

enum class ControlErrorClass {
  kGenericError,
  kInvalidRequest,   // not a request: bad JSON, too large, wrong members
  kCommandNotFound,  // no handler of that name
  kInvalidArgument,  // a missing, ill-typed or out-of-range argument
  kNotSupported,     // a command this VMM does not implement (yet)
  kWrongState,       // valid, but not now (a migration is already running)
};

// "GenericError", "InvalidRequest", ...
const char* ControlErrorClassName(ControlErrorClass error_class);
ControlErrorClass ClassifyStatus(const Status& status);
// The "desc" of an error response: the message alone for the classed errors
// above (their errno is a marker, not a system error), else ToString().
std::string DescribeStatus(const Status& status);

template <typename... Args>
Status InvalidArgument(fmt::format_string<Args...> format, Args&&... args) {
  return Status(EINVAL, fmt::format(format, std::forward<Args>(args)...));
}
template <typename... Args>
Status NotSupported(fmt::format_string<Args...> format, Args&&... args) {
  return Status(ENOTSUP, fmt::format(format, std::forward<Args>(args)...));
}
template <typename... Args>
Status WrongState(fmt::format_string<Args...> format, Args&&... args) {
  return Status(EBUSY, fmt::format(format, std::forward<Args>(args)...));
}

// Reads members of one JSON object. Every accessor fails with
// InvalidArgument naming the member: "missing argument 'to' (a string)",
// "argument 'channels' must be an unsigned integer, got string \"four\"",
// "argument 'channels' is 0: must be 1 to 16". `object` must outlive this
// and may be null (no arguments), which reads as an empty object.
class JsonFields {
 public:
  // `noun` is "argument" for requests, "field" for replies.
  explicit JsonFields(const nlohmann::json& object, std::string_view noun = "argument");

  // An error unless the JSON value is an object (or null).
  Status CheckObject() const;
  // An error naming the first member not in `known`.
  Status RejectUnknown(std::initializer_list<std::string_view> known) const;

  bool Has(std::string_view name) const;

  Result<std::string> String(std::string_view name) const;
  Result<std::optional<std::string>> OptionalString(std::string_view name) const;
  Result<uint64_t> Uint(std::string_view name, uint64_t min = 0, uint64_t max = UINT64_MAX) const;
  Result<std::optional<uint64_t>> OptionalUint(std::string_view name, uint64_t min = 0,
                                               uint64_t max = UINT64_MAX) const;
  Result<bool> Bool(std::string_view name) const;
  Result<std::optional<bool>> OptionalBool(std::string_view name) const;
  // Any number (integer or not).
  Result<double> Number(std::string_view name) const;

 private:
  // The member, or nullptr when absent (a member that is JSON null counts as
  // absent, so optional members may be sent as null).
  const nlohmann::json* Find(std::string_view name) const;
  Status Missing(std::string_view name, std::string_view type) const;
  Status IllTyped(std::string_view name, std::string_view type, const nlohmann::json& value) const;

  const nlohmann::json& object_;
  std::string noun_;
};

}  // namespace faultline::control
