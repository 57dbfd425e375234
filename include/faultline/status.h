// Status and Result<T>: errors carrying an errno value and the context in
// which it happened ("KVM_SET_USER_MEMORY_REGION2 slot 3: Invalid argument").
//
// Functions that produce nothing return Status; functions that produce a
// value return Result<T>. Both are [[nodiscard]]. Propagate with
// RETURN_IF_ERROR(expr) and ASSIGN_OR_RETURN(lhs, expr).
#pragma once

#include <expected>
#include <string>
#include <string_view>
#include <utility>

#include <fmt/format.h>

namespace faultline {

class [[nodiscard]] Status {
 public:
  Status() = default;  // OK.

  // An error. `code` is an errno value, or 0 when the error does not come
  // from the system (bad input, protocol violation, guest failure).
  Status(int code, std::string message) : code_(code), message_(std::move(message)) {
    if (message_.empty()) message_ = "error";
  }

  static Status Ok() { return Status(); }

  bool ok() const { return message_.empty(); }
  int code() const { return code_; }
  const std::string& message() const { return message_; }

  // "message: strerror(code)" or just "message" when code is 0.
  std::string ToString() const;

  // Returns this error with `context` prepended ("context: message").
  Status WithContext(std::string_view context) const&;
  Status WithContext(std::string_view context) &&;

  friend bool operator==(const Status&, const Status&) = default;

 private:
  int code_ = 0;
  std::string message_;  // Empty if and only if OK.
};

// An error with errno value `code` and a formatted context.
template <typename... Args>
Status ErrnoError(int code, fmt::format_string<Args...> format, Args&&... args) {
  return Status(code, fmt::format(format, std::forward<Args>(args)...));
}

// An error that does not come from the system.
template <typename... Args>
Status Error(fmt::format_string<Args...> format, Args&&... args) {
  return Status(0, fmt::format(format, std::forward<Args>(args)...));
}

template <typename T>
class [[nodiscard]] Result : public std::expected<T, Status> {
 public:
  using Base = std::expected<T, Status>;
  using Base::Base;
  // An error Status converts implicitly, so `return status;` works.
  Result(Status status) : Base(std::unexpect, std::move(status)) {}  // NOLINT
  Result(const Base& b) : Base(b) {}                                 // NOLINT
  Result(Base&& b) : Base(std::move(b)) {}                           // NOLINT

  Status status() const { return this->has_value() ? Status() : this->error(); }
};

namespace internal {
inline Status ToStatus(const Status& s) { return s; }
inline Status ToStatus(Status&& s) { return std::move(s); }
template <typename T>
Status ToStatus(const Result<T>& r) {
  return r.status();
}
}  // namespace internal

}  // namespace faultline

#define FL_CONCAT_INNER_(a, b) a##b
#define FL_CONCAT_(a, b) FL_CONCAT_INNER_(a, b)

// Returns from the enclosing function if `expr` (a Status or Result) failed.
#define RETURN_IF_ERROR(expr)                                           \
  do {                                                                  \
    auto&& fl_status_or_ = (expr);                                      \
    if (!::faultline::internal::ToStatus(fl_status_or_).ok())           \
      return ::faultline::internal::ToStatus(std::move(fl_status_or_)); \
  } while (0)

// `ASSIGN_OR_RETURN(auto x, Foo());` declares x from Foo()'s value, or
// returns Foo()'s error from the enclosing function.
#define ASSIGN_OR_RETURN(lhs, expr) \
  ASSIGN_OR_RETURN_IMPL_(FL_CONCAT_(fl_result_, __LINE__), lhs, expr)
#define ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr)         \
  auto tmp = (expr);                                   \
  if (!tmp.has_value()) return std::move(tmp).error(); \
  lhs = std::move(*tmp)
