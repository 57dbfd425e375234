#include "tools/faultline/control_client.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <cerrno>
#include <cstring>

#include <fmt/format.h>

namespace faultline::cli {
namespace {

// Replies are small; this only stops a broken peer from eating memory.
constexpr size_t kMaxReplyBytes = 4 << 20;

Status NobodyListening(const std::string& path) {
  return Error("no VMM is listening on {} — start one with `faultline run --control {} ...`", path,
               path);
}

}  // namespace

Result<ControlClient> ControlClient::Connect(std::string path, std::chrono::milliseconds timeout) {
  sockaddr_un addr = {};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path)) {
    return Error("control socket path '{}' must be 1 to {} bytes long", path,
                 sizeof(addr.sun_path) - 1);
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  sys::UniqueFd fd(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return ErrnoError(errno, "socket");
  if (connect(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) {
    // ENOENT: no such file; ECONNREFUSED: a stale socket, or not a socket.
    if (errno == ENOENT || errno == ECONNREFUSED) return NobodyListening(path);
    if (errno == EACCES) {
      return ErrnoError(errno, "control socket {} — it belongs to another user; run as that user",
                        path);
    }
    return ErrnoError(errno, "connect to control socket {}", path);
  }
  return ControlClient(std::move(path), std::move(fd), timeout);
}

Status ControlClient::Closed() const {
  return Error("control socket {}: the VMM closed the connection (did it exit?)", path_);
}

Status ControlClient::SendAll(std::string_view data) {
  while (!data.empty()) {
    ssize_t n = send(fd_.get(), data.data(), data.size(), MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EPIPE || errno == ECONNRESET)) return Closed();
    if (n <= 0) return ErrnoError(errno, "control socket {}: send", path_);
    data.remove_prefix(static_cast<size_t>(n));
  }
  return Status::Ok();
}

Result<std::string> ControlClient::ReadLine() {
  auto deadline = std::chrono::steady_clock::now() + timeout_;
  for (;;) {
    if (size_t nl = buffer_.find('\n'); nl != std::string::npos) {
      std::string line = buffer_.substr(0, nl);
      buffer_.erase(0, nl + 1);
      return line;
    }
    if (buffer_.size() > kMaxReplyBytes) {
      return Error("control socket {}: a reply exceeds {} bytes", path_, kMaxReplyBytes);
    }
    auto left =
        std::chrono::ceil<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      return Error("control socket {}: the VMM did not answer within {} ms", path_,
                   timeout_.count());
    }
    pollfd p = {fd_.get(), POLLIN, 0};
    int ready = poll(&p, 1, static_cast<int>(left.count()));
    if (ready < 0 && errno != EINTR) return ErrnoError(errno, "poll");
    if (ready <= 0) continue;
    char chunk[4096];
    ssize_t n = recv(fd_.get(), chunk, sizeof(chunk), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n == 0 || (n < 0 && errno == ECONNRESET)) return Closed();
    if (n < 0) return ErrnoError(errno, "control socket {}: recv", path_);
    buffer_.append(chunk, static_cast<size_t>(n));
  }
}

Result<ControlReply> ControlClient::Call(std::string_view command, const nlohmann::json& args) {
  uint64_t id = next_id_++;
  nlohmann::json request = {{"execute", command}, {"arguments", args}, {"id", id}};
  const Status sent = SendAll(request.dump() + "\n");
  // A VMM that refuses this client (another uid) says why and closes, which
  // the send may meet first: that line is the answer.
  Result<std::string> read = ReadLine();
  if (!sent.ok() && !read.has_value()) return sent;
  if (!read.has_value()) return read.error();
  const std::string line = std::move(*read);
  nlohmann::json reply = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
  auto garbage = [&](std::string_view why) {
    return Error("control socket {}: bad reply to {} ({}): {:.200}", path_, command, why, line);
  };
  if (reply.is_discarded() || !reply.is_object()) return garbage("not a JSON object");
  // Errors about the request itself may come without an id.
  auto reply_id = reply.find("id");
  if (reply_id != reply.end() && *reply_id != id) return garbage("wrong id");
  ControlReply result;
  if (auto error = reply.find("error"); error != reply.end()) {
    if (!error->is_object()) return garbage("'error' is not an object");
    auto cls = error->find("class");
    auto desc = error->find("desc");
    result.error_class = cls != error->end() && cls->is_string() ? cls->get<std::string>() : "";
    if (result.error_class.empty()) result.error_class = "GenericError";
    result.error_desc = desc != error->end() && desc->is_string() ? desc->get<std::string>() : "";
    return result;
  }
  if (reply_id == reply.end()) return garbage("no id");
  auto value = reply.find("return");
  if (value == reply.end()) return garbage("neither 'return' nor 'error'");
  result.value = *value;
  return result;
}

Result<nlohmann::json> ControlClient::Execute(std::string_view command,
                                              const nlohmann::json& args) {
  ASSIGN_OR_RETURN(ControlReply reply, Call(command, args));
  if (!reply.ok()) return Error("{}: {}", command, reply.error_desc);
  return std::move(reply.value);
}

}  // namespace faultline::cli
