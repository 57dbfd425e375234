#include "src/control/args.h"

#include <algorithm>

namespace faultline::control {

const char* ControlErrorClassName(ControlErrorClass error_class) {
  switch (error_class) {
    case ControlErrorClass::kGenericError:
      return "GenericError";
    case ControlErrorClass::kInvalidRequest:
      return "InvalidRequest";
    case ControlErrorClass::kCommandNotFound:
      return "CommandNotFound";
    case ControlErrorClass::kInvalidArgument:
      return "InvalidArgument";
    case ControlErrorClass::kNotSupported:
      return "NotSupported";
    case ControlErrorClass::kWrongState:
      return "WrongState";
  }
  return "GenericError";
}

ControlErrorClass ClassifyStatus(const Status& status) {
  switch (status.code()) {
    case EINVAL:
      return ControlErrorClass::kInvalidArgument;
    case ENOTSUP:
      return ControlErrorClass::kNotSupported;
    case EBUSY:
      return ControlErrorClass::kWrongState;
    default:
      return ControlErrorClass::kGenericError;
  }
}

std::string DescribeStatus(const Status& status) {
  if (ClassifyStatus(status) != ControlErrorClass::kGenericError) return status.message();
  return status.ToString();
}

namespace {

// A short rendering of an offending value for an error message.
std::string Abbreviate(const nlohmann::json& value) {
  std::string text = value.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  constexpr size_t kMax = 40;
  if (text.size() > kMax) text = text.substr(0, kMax) + "...";
  return text;
}

}  // namespace

JsonFields::JsonFields(const nlohmann::json& object, std::string_view noun)
    : object_(object), noun_(noun) {}

Status JsonFields::CheckObject() const {
  if (object_.is_object() || object_.is_null()) return Status::Ok();
  return InvalidArgument("{}s must be a JSON object, got {}", noun_, object_.type_name());
}

Status JsonFields::RejectUnknown(std::initializer_list<std::string_view> known) const {
  if (!object_.is_object()) return Status::Ok();
  for (const auto& [key, value] : object_.items()) {
    if (std::find(known.begin(), known.end(), key) == known.end()) {
      std::string list;
      for (std::string_view k : known) list += fmt::format("{}'{}'", list.empty() ? "" : ", ", k);
      if (list.empty()) return InvalidArgument("unexpected {} '{}': this takes none", noun_, key);
      return InvalidArgument("unexpected {} '{}': expected {}", noun_, key, list);
    }
  }
  return Status::Ok();
}

const nlohmann::json* JsonFields::Find(std::string_view name) const {
  if (!object_.is_object()) return nullptr;
  auto it = object_.find(name);
  if (it == object_.end() || it->is_null()) return nullptr;
  return &*it;
}

bool JsonFields::Has(std::string_view name) const { return Find(name) != nullptr; }

Status JsonFields::Missing(std::string_view name, std::string_view type) const {
  return InvalidArgument("missing {} '{}' ({})", noun_, name, type);
}

Status JsonFields::IllTyped(std::string_view name, std::string_view type,
                            const nlohmann::json& value) const {
  return InvalidArgument("{} '{}' must be {}, got {} {}", noun_, name, type, value.type_name(),
                         Abbreviate(value));
}

Result<std::optional<std::string>> JsonFields::OptionalString(std::string_view name) const {
  const nlohmann::json* value = Find(name);
  if (value == nullptr) return std::optional<std::string>();
  if (!value->is_string()) return IllTyped(name, "a string", *value);
  return std::optional<std::string>(value->get<std::string>());
}

Result<std::string> JsonFields::String(std::string_view name) const {
  ASSIGN_OR_RETURN(std::optional<std::string> value, OptionalString(name));
  if (!value) return Missing(name, "a string");
  return std::move(*value);
}

Result<std::optional<uint64_t>> JsonFields::OptionalUint(std::string_view name, uint64_t min,
                                                         uint64_t max) const {
  const nlohmann::json* value = Find(name);
  if (value == nullptr) return std::optional<uint64_t>();
  // Parsed JSON holds a non-negative integer as unsigned, but json built in
  // C++ from an int is signed: accept both, but not -1 or 2.5.
  bool non_negative =
      value->is_number_unsigned() || (value->is_number_integer() && value->get<int64_t>() >= 0);
  if (!non_negative) return IllTyped(name, "an unsigned integer", *value);
  uint64_t v = value->get<uint64_t>();
  if (v < min || v > max) {
    if (max == UINT64_MAX)
      return InvalidArgument("{} '{}' is {}: must be at least {}", noun_, name, v, min);
    return InvalidArgument("{} '{}' is {}: must be {} to {}", noun_, name, v, min, max);
  }
  return std::optional<uint64_t>(v);
}

Result<uint64_t> JsonFields::Uint(std::string_view name, uint64_t min, uint64_t max) const {
  ASSIGN_OR_RETURN(std::optional<uint64_t> value, OptionalUint(name, min, max));
  if (!value) return Missing(name, "an unsigned integer");
  return *value;
}

Result<std::optional<bool>> JsonFields::OptionalBool(std::string_view name) const {
  const nlohmann::json* value = Find(name);
  if (value == nullptr) return std::optional<bool>();
  if (!value->is_boolean()) return IllTyped(name, "true or false", *value);
  return std::optional<bool>(value->get<bool>());
}

Result<bool> JsonFields::Bool(std::string_view name) const {
  ASSIGN_OR_RETURN(std::optional<bool> value, OptionalBool(name));
  if (!value) return Missing(name, "true or false");
  return *value;
}

Result<double> JsonFields::Number(std::string_view name) const {
  const nlohmann::json* value = Find(name);
  if (value == nullptr) return Missing(name, "a number");
  if (!value->is_number()) return IllTyped(name, "a number", *value);
  return value->get<double>();
}

}  // namespace faultline::control
