// ControlServer: the VMM's control socket. A unix stream socket on which
// each request is one line of JSON and gets one line of JSON back, in the
// manner of QMP (docs/control.md has the protocol and every command):
//
//   -> {"execute": "query-migrate", "arguments": {}, "id": 7}
//   <- {"return": {"phase": "precopy", ...}, "id": 7}
//   <- {"error": {"class": "CommandNotFound", "desc": "..."}, "id": 7}
//
// The server knows no commands except "query-commands"; the VMM plugs in
// handlers by name (src/control/migration.h registers the migration commands).
//
// Threads: one accepts connections, one serves each connected client (at
// most Options::max_clients). A client's requests are answered in order;
// different clients' handlers run concurrently, so handlers must be
// thread-safe. Stop() wakes every thread through an eventfd they all poll,
// so it returns as soon as running handlers have returned, however many
// clients are connected and idle.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "faultline/status.h"
#include "src/sys/mutex.h"
#include "src/sys/unique_fd.h"

namespace faultline::control {

class ControlServer {
 public:
  // Gets the request's "arguments" (an empty object when absent). An error
  // Status becomes an error response; see src/control/args.h for its class.
  using Handler = std::function<Result<nlohmann::json>(const nlohmann::json& args)>;

  struct Options {
    // A request line longer than this gets an InvalidRequest error, and the
    // connection is closed (the rest of the line cannot be skipped safely).
    size_t max_request_bytes = 64 << 10;
    // Connections beyond this get an error response and are closed.
    size_t max_clients = 16;
    // A client that does not read its responses for this long is dropped.
    std::chrono::milliseconds write_timeout{5000};
    // Who may use the socket besides this process's effective uid: each is
    // granted read-write on the socket file by a POSIX ACL entry, and
    // accepted by its peer credentials. Every other uid is refused.
    std::vector<uid_t> allowed_uids;
    // Told about each refused peer (one line, no prefix); may be null.
    std::function<void(const std::string&)> on_refused;
  };

  // Binds `path` (mode 0600, plus the ACL entries of allowed_uids) and
  // listens; serves nothing until Start(). A socket file nobody listens on
  // (left by a dead VMM) is replaced; a live one, or any other kind of
  // file, is an error.
  //
  // Every connection's peer credentials (SO_PEERCRED) are checked when it
  // is accepted: a peer of another uid that is not allowed (root included)
  // gets one error response saying so and is closed before any request of
  // it is read, so it changes nothing.
  static Result<std::unique_ptr<ControlServer>> Create(std::string path, Options options);
  static Result<std::unique_ptr<ControlServer>> Create(std::string path) {
    return Create(std::move(path), Options());
  }

  // Stop(), then removes the socket file if it is still the one we bound.
  ~ControlServer();
  ControlServer(const ControlServer&) = delete;
  ControlServer& operator=(const ControlServer&) = delete;

  // Adds or replaces the handler of `command`. Thread-safe, at any time;
  // register before Start() so that no client sees CommandNotFound.
  void Register(std::string command, Handler handler);
  // Registered command names, sorted.
  std::vector<std::string> Commands() const;

  // Starts the accepting thread. Once only.
  Status Start();
  // Closes every connection and joins every thread; idempotent. Waits for
  // handlers that are running, so must not be called from a handler.
  void Stop();

  // One request line (without its newline) to one response line (without
  // its newline). What each connection does; public for tests.
  std::string HandleLine(std::string_view line) const;

  const std::string& path() const { return path_; }

 private:
  struct Connection {
    sys::UniqueFd fd;
    std::thread thread;
    std::atomic<bool> finished{false};
  };

  ControlServer(std::string path, Options options, sys::UniqueFd listen_fd, sys::UniqueFd stop_fd,
                dev_t dev, ino_t ino);
  nlohmann::json Dispatch(std::string_view line) const;
  void AcceptLoop();
  // The peer of `fd` may use the socket; else why not.
  Status CheckPeer(int fd) const;
  void Serve(Connection& connection);
  // Writes all of `data`; false if the client is gone, too slow, or the
  // server is stopping.
  bool Send(int fd, std::string_view data);
  // Waits for `events` on `fd` or for Stop(); true if `fd` is ready.
  bool WaitFor(int fd, short events, int timeout_ms);

  const std::string path_;
  const Options options_;
  sys::UniqueFd listen_fd_;
  sys::UniqueFd stop_fd_;  // an eventfd, readable once Stop() is called
  const dev_t dev_;        // identity of the socket file we bound
  const ino_t ino_;

  // Handlers are copied out under it and called without it.
  mutable sys::Mutex handlers_mu_;
  std::map<std::string, Handler, std::less<>> handlers_ GUARDED_BY(handlers_mu_);

  sys::Mutex lifecycle_mu_;  // serialises Start() and Stop()
  bool started_ GUARDED_BY(lifecycle_mu_) = false;
  bool stopped_ GUARDED_BY(lifecycle_mu_) = false;
  std::thread accept_thread_ GUARDED_BY(lifecycle_mu_);
  // Owned by the accepting thread while it runs, then by Stop().
  std::list<std::unique_ptr<Connection>> connections_;
};

}  // namespace faultline::control
