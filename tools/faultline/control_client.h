// ControlClient: talks to a VMM's control socket (docs/control.md), one
// request at a time, each with a timeout so that a stuck VMM cannot hang the
// CLI.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "faultline/status.h"
#include "src/sys/unique_fd.h"

namespace faultline::cli {

// An answer from the VMM: a return value, or an error with its class.
struct ControlReply {
  nlohmann::json value;     // the "return" member, when ok()
  std::string error_class;  // "CommandNotFound", ...; empty when ok()
  std::string error_desc;
  bool ok() const { return error_class.empty(); }
};

class ControlClient {
 public:
  static constexpr std::chrono::milliseconds kDefaultTimeout{10'000};

  // A clear error when nothing listens on `path`: "no VMM is listening on
  // PATH — start one with `faultline run --control PATH ...`".
  static Result<ControlClient> Connect(std::string path,
                                       std::chrono::milliseconds timeout = kDefaultTimeout);

  ControlClient(ControlClient&&) = default;
  ControlClient& operator=(ControlClient&&) = default;

  // Sends one request and waits for its reply. An error Status only when the
  // exchange itself failed (VMM gone, timeout, garbage); an error reply from
  // the VMM is a ControlReply.
  Result<ControlReply> Call(std::string_view command,
                            const nlohmann::json& args = nlohmann::json::object());
  // Call(), with an error reply turned into an error "COMMAND: desc".
  Result<nlohmann::json> Execute(std::string_view command,
                                 const nlohmann::json& args = nlohmann::json::object());

  const std::string& path() const { return path_; }

 private:
  ControlClient(std::string path, sys::UniqueFd fd, std::chrono::milliseconds timeout)
      : path_(std::move(path)), fd_(std::move(fd)), timeout_(timeout) {}
  Status Closed() const;
  Status SendAll(std::string_view data);
  Result<std::string> ReadLine();

  std::string path_;
  sys::UniqueFd fd_;
  std::chrono::milliseconds timeout_;
  std::string buffer_;  // received bytes not yet consumed
  uint64_t next_id_ = 1;
};

}  // namespace faultline::cli
