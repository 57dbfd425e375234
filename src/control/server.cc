#include "src/control/server.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <span>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "src/control/args.h"

namespace faultline::control {
namespace {

// Deeper requests are refused before parsing: nlohmann's dump and
// destruction recurse, and no command needs more than a few levels.
constexpr int kMaxNesting = 32;
constexpr int kProtocolVersion = 1;

// The deepest bracket nesting outside strings; stops counting past the limit.
int NestingDepth(std::string_view text) {
  int depth = 0, max_depth = 0;
  bool in_string = false, escaped = false;
  for (char c : text) {
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      max_depth = std::max(max_depth, ++depth);
      if (max_depth > kMaxNesting) break;
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return max_depth;
}

nlohmann::json ErrorReply(ControlErrorClass error_class, std::string desc,
                          const nlohmann::json* id = nullptr) {
  nlohmann::json reply = {
      {"error", {{"class", ControlErrorClassName(error_class)}, {"desc", std::move(desc)}}}};
  if (id != nullptr) reply["id"] = *id;
  return reply;
}

std::string Serialize(const nlohmann::json& reply) {
  // Handler strings may carry bytes that are not UTF-8; never throw on them.
  return reply.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

Status FillAddress(const std::string& path, sockaddr_un& addr) {
  addr = {};
  addr.sun_family = AF_UNIX;
  if (path.empty()) return Error("the control socket path is empty");
  if (path.size() >= sizeof(addr.sun_path)) {
    return Error("control socket path '{}' is {} bytes long: at most {} fit in a unix socket", path,
                 path.size(), sizeof(addr.sun_path) - 1);
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  return Status::Ok();
}

// Removes a socket file that nobody listens on; refuses a live or foreign one.
Status ClaimPath(const std::string& path, const sockaddr_un& addr) {
  struct stat st;
  if (lstat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return Status::Ok();
    return ErrnoError(errno, "control socket {}", path);
  }
  if (!S_ISSOCK(st.st_mode)) {
    return ErrnoError(EEXIST, "control socket {}: exists and is not a socket — choose another path",
                      path);
  }
  sys::UniqueFd probe(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!probe) return ErrnoError(errno, "socket");
  if (connect(probe.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) == 0) {
    return ErrnoError(EADDRINUSE,
                      "control socket {}: another process is serving it — stop that VMM or "
                      "choose another path",
                      path);
  }
  if (errno != ECONNREFUSED) return ErrnoError(errno, "control socket {}: probing it", path);
  if (unlink(path.c_str()) != 0 && errno != ENOENT) {
    return ErrnoError(errno, "control socket {}: removing the stale socket", path);
  }
  return Status::Ok();
}

// Grants each of `uids` read and write on `path` (connecting to a unix
// socket needs write permission): the POSIX ACL of mode 0600 plus one named
// user entry each, in the kernel's xattr format (version 2, then tag,
// permissions and id per entry, in tag order; acl(5)).
Status GrantUids(const std::string& path, std::span<const uid_t> uids) {
  enum : uint16_t { kUserObj = 0x01, kUser = 0x02, kGroupObj = 0x04, kMask = 0x10, kOther = 0x20 };
  constexpr uint16_t kReadWrite = 6;
  constexpr uint32_t kNoId = 0xffffffff;
  std::vector<uint8_t> acl;
  auto put = [&acl](uint64_t value, int bytes) {
    for (int i = 0; i < bytes; ++i) acl.push_back(static_cast<uint8_t>(value >> (8 * i)));
  };
  auto entry = [&put](uint16_t tag, uint16_t perm, uint32_t id) {
    put(tag, 2);
    put(perm, 2);
    put(id, 4);
  };
  put(2, 4);  // POSIX_ACL_XATTR_VERSION
  entry(kUserObj, kReadWrite, kNoId);
  std::vector<uid_t> sorted(uids.begin(), uids.end());
  std::sort(sorted.begin(), sorted.end());
  sorted.erase(std::unique(sorted.begin(), sorted.end()), sorted.end());
  for (uid_t uid : sorted) entry(kUser, kReadWrite, uid);
  entry(kGroupObj, 0, kNoId);
  entry(kMask, kReadWrite, kNoId);
  entry(kOther, 0, kNoId);
  if (setxattr(path.c_str(), "system.posix_acl_access", acl.data(), acl.size(), 0) != 0) {
    return ErrnoError(errno,
                      "control socket {}: granting uid(s) {} access (a POSIX ACL; the "
                      "filesystem must support them, or leave out --control-allow-uid)",
                      path, fmt::join(sorted, ", "));
  }
  return Status::Ok();
}

}  // namespace

Result<std::unique_ptr<ControlServer>> ControlServer::Create(std::string path, Options options) {
  sockaddr_un addr;
  RETURN_IF_ERROR(FillAddress(path, addr));
  RETURN_IF_ERROR(ClaimPath(path, addr));
  sys::UniqueFd fd(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd) return ErrnoError(errno, "socket");
  if (bind(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) {
    return ErrnoError(errno, "control socket {}: bind", path);
  }
  // Whoever can connect can migrate the VM away: owner only. Before listen(),
  // so nobody can connect while the mode is still the umask's.
  struct stat st;
  if (chmod(path.c_str(), 0600) != 0 || lstat(path.c_str(), &st) != 0) {
    Status s = ErrnoError(errno, "control socket {}", path);
    unlink(path.c_str());
    return s;
  }
  if (!options.allowed_uids.empty()) {
    if (Status s = GrantUids(path, options.allowed_uids); !s.ok()) {
      unlink(path.c_str());
      return s;
    }
  }
  if (listen(fd.get(), 16) != 0) {
    Status s = ErrnoError(errno, "control socket {}: listen", path);
    unlink(path.c_str());
    return s;
  }
  sys::UniqueFd stop(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!stop) {
    Status s = ErrnoError(errno, "eventfd");
    unlink(path.c_str());
    return s;
  }
  std::unique_ptr<ControlServer> server(new ControlServer(std::move(path), options, std::move(fd),
                                                          std::move(stop), st.st_dev, st.st_ino));
  ControlServer* self = server.get();
  server->Register("query-commands", [self](const nlohmann::json& args) -> Result<nlohmann::json> {
    RETURN_IF_ERROR(JsonFields(args).RejectUnknown({}));
    return nlohmann::json{{"commands", self->Commands()}, {"protocol", kProtocolVersion}};
  });
  return server;
}

ControlServer::ControlServer(std::string path, Options options, sys::UniqueFd listen_fd,
                             sys::UniqueFd stop_fd, dev_t dev, ino_t ino)
    : path_(std::move(path)),
      options_(options),
      listen_fd_(std::move(listen_fd)),
      stop_fd_(std::move(stop_fd)),
      dev_(dev),
      ino_(ino) {}

ControlServer::~ControlServer() {
  Stop();
  // Another server may have replaced a file we left for dead; not ours then.
  struct stat st;
  if (lstat(path_.c_str(), &st) == 0 && st.st_dev == dev_ && st.st_ino == ino_) {
    unlink(path_.c_str());
  }
}

void ControlServer::Register(std::string command, Handler handler) {
  sys::MutexLock lock(handlers_mu_);
  handlers_[std::move(command)] = std::move(handler);
}

std::vector<std::string> ControlServer::Commands() const {
  sys::MutexLock lock(handlers_mu_);
  std::vector<std::string> names;
  for (const auto& [name, handler] : handlers_) names.push_back(name);
  return names;
}

Status ControlServer::Start() {
  sys::MutexLock lock(lifecycle_mu_);
  if (started_ || stopped_) return Error("control server {}: already started", path_);
  started_ = true;
  accept_thread_ = std::thread([this] { AcceptLoop(); });
  return Status::Ok();
}

void ControlServer::Stop() {
  sys::MutexLock lock(lifecycle_mu_);
  if (stopped_) return;
  stopped_ = true;
  uint64_t one = 1;
  // The eventfd stays readable: every present and future poll sees it.
  if (write(stop_fd_.get(), &one, sizeof(one)) != sizeof(one)) {
    std::abort();  // an eventfd write of 1 cannot fail; if it did we'd hang
  }
  if (accept_thread_.joinable()) accept_thread_.join();
  for (auto& c : connections_) {
    if (c->thread.joinable()) c->thread.join();
  }
  connections_.clear();
  listen_fd_.Reset();
}

std::string ControlServer::HandleLine(std::string_view line) const {
  return Serialize(Dispatch(line));
}

nlohmann::json ControlServer::Dispatch(std::string_view line) const {
  using EC = ControlErrorClass;
  if (line.size() > options_.max_request_bytes) {
    return ErrorReply(EC::kInvalidRequest,
                      fmt::format("request of {} bytes exceeds the limit of {} bytes", line.size(),
                                  options_.max_request_bytes));
  }
  if (NestingDepth(line) > kMaxNesting) {
    return ErrorReply(EC::kInvalidRequest,
                      fmt::format("request nests deeper than {} levels", kMaxNesting));
  }
  nlohmann::json request;
  try {
    request = nlohmann::json::parse(line);
  } catch (const nlohmann::json::exception& e) {
    // parse_error, and out_of_range for a number too large for a double
    // (1e999): either is the client's mistake, never the VMM's end.
    return ErrorReply(EC::kInvalidRequest, fmt::format("malformed JSON: {}", e.what()));
  }
  if (!request.is_object()) {
    return ErrorReply(EC::kInvalidRequest,
                      "a request is a JSON object such as {\"execute\": \"query-status\"}");
  }
  const nlohmann::json* id = nullptr;
  if (auto it = request.find("id"); it != request.end()) {
    if (!it->is_string() && !it->is_number()) {
      return ErrorReply(EC::kInvalidRequest, "member 'id' must be a string or a number");
    }
    id = &*it;
  }
  for (const auto& [key, value] : request.items()) {
    if (key != "execute" && key != "arguments" && key != "id") {
      return ErrorReply(EC::kInvalidRequest,
                        fmt::format("unknown request member '{}': use execute, arguments, id", key),
                        id);
    }
  }
  auto execute = request.find("execute");
  if (execute == request.end() || !execute->is_string()) {
    return ErrorReply(EC::kInvalidRequest, "member 'execute' must name a command (a string)", id);
  }
  const std::string& command = execute->get_ref<const std::string&>();
  nlohmann::json no_arguments = nlohmann::json::object();
  const nlohmann::json* args = &no_arguments;
  if (auto it = request.find("arguments"); it != request.end()) {
    if (!it->is_object()) {
      return ErrorReply(EC::kInvalidRequest, "member 'arguments' must be a JSON object", id);
    }
    args = &*it;
  }
  Handler handler;
  {
    sys::MutexLock lock(handlers_mu_);
    auto it = handlers_.find(command);
    if (it != handlers_.end()) handler = it->second;
  }
  if (!handler) {
    return ErrorReply(
        EC::kCommandNotFound,
        fmt::format("unknown command '{}' — 'query-commands' lists the commands", command), id);
  }
  // Exceptions do not leave the server: the client gets them as errors.
  Result<nlohmann::json> result = [&]() -> Result<nlohmann::json> {
    try {
      return handler(*args);
    } catch (const std::exception& e) {
      return Error("{}: internal error: {}", command, e.what());
    }
  }();
  if (!result.has_value()) {
    return ErrorReply(ClassifyStatus(result.error()), DescribeStatus(result.error()), id);
  }
  nlohmann::json reply = {{"return", result->is_null() ? nlohmann::json::object() : *result}};
  if (id != nullptr) reply["id"] = *id;
  return reply;
}

void ControlServer::AcceptLoop() {
  for (;;) {
    if (!WaitFor(listen_fd_.get(), POLLIN, -1)) return;
    int fd = accept4(listen_fd_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) {
      // Out of descriptors: back off instead of spinning on a ready socket.
      if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
        WaitFor(-1, 0, 100);
      }
      continue;  // EAGAIN, EINTR, ECONNABORTED: the next one
    }
    auto connection = std::make_unique<Connection>();
    connection->fd.Reset(fd);
    if (Status peer = CheckPeer(fd); !peer.ok()) {
      if (options_.on_refused) options_.on_refused(peer.ToString());
      Send(fd, Serialize(ErrorReply(ControlErrorClass::kGenericError, peer.ToString())) + "\n");
      continue;  // closed by connection's destructor, nothing read
    }
    connections_.remove_if([](const std::unique_ptr<Connection>& c) {
      if (!c->finished.load(std::memory_order_acquire)) return false;
      c->thread.join();
      return true;
    });
    if (connections_.size() >= options_.max_clients) {
      Send(fd, Serialize(ErrorReply(
                   ControlErrorClass::kGenericError,
                   fmt::format("too many control clients (at most {})", options_.max_clients))) +
                   "\n");
      continue;  // closed by connection's destructor
    }
    Connection* c = connection.get();
    connections_.push_back(std::move(connection));
    c->thread = std::thread([this, c] {
      Serve(*c);
      // Closed here so the client sees EOF now, not when the thread is reaped.
      c->fd.Reset();
      c->finished.store(true, std::memory_order_release);
    });
  }
}

Status ControlServer::CheckPeer(int fd) const {
  ucred peer{};
  socklen_t length = sizeof(peer);
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &peer, &length) != 0) {
    return ErrnoError(errno, "control socket {}: the peer's credentials", path_);
  }
  const uid_t self = geteuid();
  if (peer.uid == self || std::find(options_.allowed_uids.begin(), options_.allowed_uids.end(),
                                    peer.uid) != options_.allowed_uids.end()) {
    return Status::Ok();
  }
  return Error(
      "control socket {}: refused pid {} of uid {}: this VMM runs as uid {} and allows no other "
      "(start it with --control-allow-uid {} to allow that one)",
      path_, peer.pid, peer.uid, self, peer.uid);
}

void ControlServer::Serve(Connection& connection) {
  const int fd = connection.fd.get();
  std::string buffer;
  size_t scanned = 0;  // buffer[0, scanned) holds no newline
  char chunk[4096];
  bool eof = false;
  for (;;) {
    size_t newline;
    while ((newline = buffer.find('\n', scanned)) != std::string::npos) {
      std::string_view line(buffer.data(), newline);
      if (line.ends_with('\r')) line.remove_suffix(1);
      bool blank = line.find_first_not_of(" \t") == std::string_view::npos;
      if (!blank && !Send(fd, HandleLine(line) + "\n")) return;
      buffer.erase(0, newline + 1);
      scanned = 0;
    }
    scanned = buffer.size();
    if (buffer.size() > options_.max_request_bytes) {
      Send(fd, Serialize(ErrorReply(ControlErrorClass::kInvalidRequest,
                                    fmt::format("request exceeds the limit of {} bytes",
                                                options_.max_request_bytes))) +
                   "\n");
      return;
    }
    if (eof) {
      // A last request without its newline still gets an answer.
      if (buffer.find_first_not_of(" \t\r") != std::string::npos)
        Send(fd, HandleLine(buffer) + "\n");
      return;
    }
    if (!WaitFor(fd, POLLIN, -1)) return;
    ssize_t n = recv(fd, chunk, sizeof(chunk), 0);
    if (n < 0) {
      if (errno == EAGAIN || errno == EINTR) continue;
      return;
    }
    if (n == 0) eof = true;
    buffer.append(chunk, static_cast<size_t>(n));
  }
}

bool ControlServer::Send(int fd, std::string_view data) {
  while (!data.empty()) {
    ssize_t n = send(fd, data.data(), data.size(), MSG_NOSIGNAL);
    if (n > 0) {
      data.remove_prefix(static_cast<size_t>(n));
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else if (n < 0 && errno == EAGAIN) {
      if (!WaitFor(fd, POLLOUT, static_cast<int>(options_.write_timeout.count()))) return false;
    } else {
      return false;
    }
  }
  return true;
}

bool ControlServer::WaitFor(int fd, short events, int timeout_ms) {
  // poll ignores a negative fd: WaitFor(-1, 0, ms) just sleeps unless stopped.
  pollfd fds[2] = {{stop_fd_.get(), POLLIN, 0}, {fd, events, 0}};
  for (;;) {
    int n = poll(fds, 2, timeout_ms);
    if (n < 0 && errno == EINTR) continue;  // keeps the full timeout; good enough
    // POLLHUP and POLLERR count as ready: the recv or send that follows
    // reports them.
    return n > 0 && fds[0].revents == 0;
  }
}

}  // namespace faultline::control
