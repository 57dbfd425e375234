#include "faultline/status.h"

#include <cstring>

namespace faultline {

std::string Status::ToString() const {
  if (ok()) return "OK";
  if (code_ == 0) return message_;
  return fmt::format("{}: {}", message_, std::strerror(code_));
}

Status Status::WithContext(std::string_view context) const& {
  Status copy = *this;
  return std::move(copy).WithContext(context);
}

Status Status::WithContext(std::string_view context) && {
  if (ok()) return *this;
  message_ = fmt::format("{}: {}", context, message_);
  return std::move(*this);
}

}  // namespace faultline
