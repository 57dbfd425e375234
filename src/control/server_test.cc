// ControlServer over real unix sockets in a temporary directory.
#include "src/control/server.h"

#include <grp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "src/control/args.h"

namespace faultline::control {
namespace {

using ::testing::HasSubstr;
using Clock = std::chrono::steady_clock;
using nlohmann::json;

class TempDir {
 public:
  TempDir() {
    std::string pattern = "/tmp/fl_control_XXXXXX";
    EXPECT_NE(mkdtemp(pattern.data()), nullptr);
    path_ = pattern;
  }
  ~TempDir() { std::system(("rm -rf " + path_).c_str()); }
  std::string File(const char* name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// A raw protocol client: what a script with socat would do.
class RawClient {
 public:
  explicit RawClient(const std::string& path) {
    fd_.Reset(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_un addr = {};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
    connected_ = connect(fd_.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  }
  bool connected() const { return connected_; }
  bool Write(std::string_view data) {
    while (!data.empty()) {
      ssize_t n = send(fd_.get(), data.data(), data.size(), MSG_NOSIGNAL);
      if (n <= 0) return false;
      data.remove_prefix(static_cast<size_t>(n));
    }
    return true;
  }
  // The next line, or nullopt on EOF or after `timeout`.
  std::optional<std::string> ReadLine(std::chrono::milliseconds timeout = std::chrono::seconds(5)) {
    auto deadline = Clock::now() + timeout;
    for (;;) {
      if (size_t nl = buffer_.find('\n'); nl != std::string::npos) {
        std::string line = buffer_.substr(0, nl);
        buffer_.erase(0, nl + 1);
        return line;
      }
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
      if (left.count() <= 0) return std::nullopt;
      pollfd p = {fd_.get(), POLLIN, 0};
      if (poll(&p, 1, static_cast<int>(left.count())) <= 0) return std::nullopt;
      char chunk[4096];
      ssize_t n = recv(fd_.get(), chunk, sizeof(chunk), 0);
      if (n <= 0) return std::nullopt;
      buffer_.append(chunk, static_cast<size_t>(n));
    }
  }
  json Call(const std::string& request) {
    if (!Write(request + "\n")) return json();
    std::optional<std::string> line = ReadLine();
    return line ? json::parse(*line) : json();
  }
  void ShutdownWrite() { shutdown(fd_.get(), SHUT_WR); }

 private:
  sys::UniqueFd fd_;
  bool connected_ = false;
  std::string buffer_;
};

std::unique_ptr<ControlServer> StartServer(const std::string& path,
                                           ControlServer::Options options = {}) {
  Result<std::unique_ptr<ControlServer>> server = ControlServer::Create(path, options);
  EXPECT_TRUE(server.has_value()) << server.error().ToString();
  if (!server.has_value()) return nullptr;
  (*server)->Register("echo", [](const json& args) -> Result<json> { return args; });
  (*server)->Register("fail", [](const json& args) -> Result<json> {
    ASSIGN_OR_RETURN(uint64_t n, JsonFields(args).Uint("n", 1, 10));
    return WrongState("failing with n={}", n);
  });
  (*server)->Register("throw", [](const json&) -> Result<json> {
    return json::parse("not json");  // throws inside the handler
  });
  EXPECT_TRUE((*server)->Start().ok());
  return std::move(*server);
}

std::string ErrorClass(const json& reply) { return reply["error"]["class"].get<std::string>(); }
std::string ErrorDesc(const json& reply) { return reply["error"]["desc"].get<std::string>(); }

TEST(ControlServerTest, RequestGetsResponseWithItsId) {
  TempDir dir;
  auto server = StartServer(dir.File("ctl.sock"));
  RawClient client(server->path());
  ASSERT_TRUE(client.connected());
  json reply = client.Call(R"({"execute": "echo", "arguments": {"x": [1, 2]}, "id": 41})");
  EXPECT_EQ(reply, json::parse(R"({"return": {"x": [1, 2]}, "id": 41})"));
  reply = client.Call(R"({"execute": "echo", "id": "abc"})");
  EXPECT_EQ(reply, json::parse(R"({"return": {}, "id": "abc"})"));
  reply = client.Call(R"({"execute": "echo"})");
  EXPECT_EQ(reply, json::parse(R"({"return": {}})"));
  reply = client.Call(R"({"execute": "query-commands"})");
  EXPECT_EQ(reply["return"]["commands"],
            json::parse(R"(["echo","fail","query-commands","throw"])"));
}

TEST(ControlServerTest, SocketIsOwnerOnly) {
  TempDir dir;
  auto server = StartServer(dir.File("ctl.sock"));
  struct stat st;
  ASSERT_EQ(lstat(server->path().c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 0777, 0600u);
}

TEST(ControlServerTest, UnknownCommand) {
  TempDir dir;
  auto server = StartServer(dir.File("ctl.sock"));
  RawClient client(server->path());
  json reply = client.Call(R"({"execute": "frobnicate", "id": 3})");
  EXPECT_EQ(ErrorClass(reply), "CommandNotFound");
  EXPECT_THAT(ErrorDesc(reply), HasSubstr("frobnicate"));
  EXPECT_EQ(reply["id"], 3);
}

TEST(ControlServerTest, HandlerErrorsCarryTheirClass) {
  TempDir dir;
  auto server = StartServer(dir.File("ctl.sock"));
  RawClient client(server->path());
  json reply = client.Call(R"({"execute": "fail", "arguments": {"n": 2}})");
  EXPECT_EQ(ErrorClass(reply), "WrongState");
  EXPECT_EQ(ErrorDesc(reply), "failing with n=2");
  reply = client.Call(R"({"execute": "fail", "arguments": {"n": "two"}})");
  EXPECT_EQ(ErrorClass(reply), "InvalidArgument");
  EXPECT_EQ(ErrorDesc(reply), "argument 'n' must be an unsigned integer, got string \"two\"");
  reply = client.Call(R"({"execute": "fail"})");
  EXPECT_EQ(ErrorDesc(reply), "missing argument 'n' (an unsigned integer)");
  reply = client.Call(R"({"execute": "throw", "id": 1})");
  EXPECT_EQ(ErrorClass(reply), "GenericError");
  EXPECT_THAT(ErrorDesc(reply), HasSubstr("throw: internal error"));
}

TEST(ControlServerTest, MalformedRequestsGetErrorsAndTheConnectionSurvives) {
  TempDir dir;
  auto server = StartServer(dir.File("ctl.sock"));
  RawClient client(server->path());
  struct Case {
    const char* request;
    const char* desc;
  } cases[] = {
      {R"({"execute": "echo")", "malformed JSON"},
      {"\xff\xfe", "malformed JSON"},
      {R"(["execute", "echo"])", "a request is a JSON object"},
      {R"({"arguments": {}})", "member 'execute'"},
      {R"({"execute": 7})", "member 'execute'"},
      {R"({"execute": "echo", "arguments": [1]})", "member 'arguments' must be a JSON object"},
      {R"({"execute": "echo", "id": {"a": 1}})", "member 'id'"},
      {R"({"execute": "echo", "exec": 1})", "unknown request member 'exec'"},
      {"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
       "nests deeper"},
  };
  for (const Case& c : cases) {
    json reply = client.Call(c.request);
    ASSERT_TRUE(reply.is_object()) << c.request;
    EXPECT_EQ(ErrorClass(reply), "InvalidRequest") << c.request;
    EXPECT_THAT(ErrorDesc(reply), HasSubstr(c.desc)) << c.request;
  }
  EXPECT_EQ(client.Call(R"({"execute": "echo", "id": 9})")["id"], 9);
}

TEST(ControlServerTest, OversizedRequestGetsAnErrorAndIsDisconnected) {
  TempDir dir;
  ControlServer::Options options;
  options.max_request_bytes = 1024;
  auto server = StartServer(dir.File("ctl.sock"), options);
  RawClient client(server->path());
  std::string big = R"({"execute": "echo", "arguments": {"s": ")" + std::string(100000, 'a');
  client.Write(big);  // may fail part way once the server hangs up
  std::optional<std::string> line = client.ReadLine();
  ASSERT_TRUE(line.has_value());
  json reply = json::parse(*line);
  EXPECT_EQ(ErrorClass(reply), "InvalidRequest");
  EXPECT_THAT(ErrorDesc(reply), HasSubstr("exceeds the limit of 1024 bytes"));
  EXPECT_FALSE(client.ReadLine().has_value());  // closed
  // A request just under the limit is fine, and others are unaffected.
  RawClient other(server->path());
  std::string fits = R"({"execute": "echo", "arguments": {"s": ")" + std::string(900, 'b') + "\"}}";
  EXPECT_EQ(other.Call(fits)["return"]["s"].get<std::string>().size(), 900u);
}

TEST(ControlServerTest, PipelinedSplitAndUnterminatedRequests) {
  TempDir dir;
  auto server = StartServer(dir.File("ctl.sock"));
  RawClient client(server->path());
  // Two requests in one write, a blank line, CRLF, then one split in three.
  ASSERT_TRUE(
      client.Write("{\"execute\":\"echo\",\"id\":1}\n\n{\"execute\":\"echo\",\"id\":2}\r\n"));
  ASSERT_TRUE(client.Write("{\"execute\":"));
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  ASSERT_TRUE(client.Write("\"echo\","));
  ASSERT_TRUE(client.Write("\"id\":3}\n"));
  for (int id = 1; id <= 3; ++id) {
    std::optional<std::string> line = client.ReadLine();
    ASSERT_TRUE(line.has_value()) << id;
    EXPECT_EQ(json::parse(*line)["id"], id);
  }
  // The last request may lack its newline if the client half-closes.
  ASSERT_TRUE(client.Write("{\"execute\":\"echo\",\"id\":4}"));
  client.ShutdownWrite();
  std::optional<std::string> line = client.ReadLine();
  ASSERT_TRUE(line.has_value());
  EXPECT_EQ(json::parse(*line)["id"], 4);
  EXPECT_FALSE(client.ReadLine().has_value());
}

TEST(ControlServerTest, ConcurrentClients) {
  TempDir dir;
  auto server = StartServer(dir.File("ctl.sock"));
  std::atomic<int> calls{0};
  server->Register("count", [&calls](const json& args) -> Result<json> {
    calls.fetch_add(1);
    return args;
  });
  constexpr int kClients = 8, kRequests = 50;
  std::atomic<int> good{0};
  std::vector<std::thread> threads;
  for (int c = 0; c < kClients; ++c) {
    threads.emplace_back([&, c] {
      RawClient client(server->path());
      for (int i = 0; i < kRequests; ++i) {
        json reply =
            client.Call(json{{"execute", "count"}, {"arguments", {{"c", c}}}, {"id", i}}.dump());
        if (reply.is_object() && reply["id"] == i && reply["return"]["c"] == c) good.fetch_add(1);
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(good.load(), kClients * kRequests);
  EXPECT_EQ(calls.load(), kClients * kRequests);
}

TEST(ControlServerTest, SlowHandlerDoesNotBlockOtherClients) {
  TempDir dir;
  auto server = StartServer(dir.File("ctl.sock"));
  server->Register("sleep", [](const json&) -> Result<json> {
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    return json::object();
  });
  RawClient slow(server->path()), fast(server->path());
  ASSERT_TRUE(slow.Write("{\"execute\":\"sleep\"}\n"));
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  auto start = Clock::now();
  EXPECT_TRUE(fast.Call(R"({"execute": "echo"})").contains("return"));
  EXPECT_LT(Clock::now() - start, std::chrono::milliseconds(400));
  EXPECT_TRUE(slow.ReadLine().has_value());
}

TEST(ControlServerTest, TooManyClients) {
  TempDir dir;
  ControlServer::Options options;
  options.max_clients = 2;
  auto server = StartServer(dir.File("ctl.sock"), options);
  RawClient a(server->path()), b(server->path());
  EXPECT_TRUE(a.Call(R"({"execute": "echo"})").contains("return"));
  EXPECT_TRUE(b.Call(R"({"execute": "echo"})").contains("return"));
  RawClient c(server->path());
  std::optional<std::string> line = c.ReadLine();
  ASSERT_TRUE(line.has_value());
  EXPECT_THAT(ErrorDesc(json::parse(*line)), HasSubstr("too many control clients"));
  EXPECT_FALSE(c.ReadLine().has_value());
}

TEST(ControlServerTest, StopWithIdleAndHalfWrittenClientsDoesNotHang) {
  TempDir dir;
  auto server = StartServer(dir.File("ctl.sock"));
  RawClient idle(server->path()), partial(server->path());
  EXPECT_TRUE(idle.Call(R"({"execute": "echo"})").contains("return"));
  ASSERT_TRUE(partial.Write(R"({"execute": "ec)"));
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  auto start = Clock::now();
  server->Stop();
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(1));
  EXPECT_FALSE(idle.ReadLine(std::chrono::seconds(2)).has_value());  // EOF, not a timeout
  server->Stop();                                                    // idempotent
  std::string path = server->path();
  server.reset();
  EXPECT_NE(access(path.c_str(), F_OK), 0) << "socket file left behind";
}

TEST(ControlServerTest, ClientThatNeverReadsIsDropped) {
  TempDir dir;
  ControlServer::Options options;
  options.write_timeout = std::chrono::milliseconds(200);
  auto server = StartServer(dir.File("ctl.sock"), options);
  RawClient greedy(server->path());
  std::string request =
      R"({"execute": "echo", "arguments": {"s": ")" + std::string(8000, 'x') + "\"}}\n";
  // Fill both socket buffers with responses nobody reads; the server must
  // give up on this client rather than block its thread forever.
  std::thread writer([&] {
    for (int i = 0; i < 2000 && greedy.Write(request); ++i) {
    }
  });
  writer.join();
  auto start = Clock::now();
  server->Stop();
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(2));
}

TEST(ControlServerTest, StaleSocketIsReplacedLiveOneRefused) {
  TempDir dir;
  std::string path = dir.File("ctl.sock");
  {
    // A socket file whose listener died without removing it.
    sys::UniqueFd fd(socket(AF_UNIX, SOCK_STREAM, 0));
    sockaddr_un addr = {};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
    ASSERT_EQ(bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  }
  auto server = StartServer(path);
  ASSERT_NE(server, nullptr);
  EXPECT_TRUE(RawClient(path).Call(R"({"execute": "echo"})").contains("return"));

  Result<std::unique_ptr<ControlServer>> second = ControlServer::Create(path);
  ASSERT_FALSE(second.has_value());
  EXPECT_THAT(second.error().ToString(), HasSubstr("another process is serving it"));
  EXPECT_TRUE(RawClient(path).Call(R"({"execute": "echo"})").contains("return"));
}

TEST(ControlServerTest, RefusesNonSocketsAndLongPaths) {
  TempDir dir;
  std::string path = dir.File("plain");
  std::ofstream(path) << "data";
  Result<std::unique_ptr<ControlServer>> server = ControlServer::Create(path);
  ASSERT_FALSE(server.has_value());
  EXPECT_THAT(server.error().ToString(), HasSubstr("exists and is not a socket"));
  server = ControlServer::Create("/tmp/" + std::string(200, 'x'));
  ASSERT_FALSE(server.has_value());
  EXPECT_THAT(server.error().ToString(), HasSubstr("at most 107 fit"));
  server = ControlServer::Create("/nonexistent-dir/ctl.sock");
  ASSERT_FALSE(server.has_value());
  EXPECT_THAT(server.error().ToString(), HasSubstr("bind"));
}

TEST(ControlServerTest, DestructorLeavesAReplacementAlone) {
  TempDir dir;
  std::string path = dir.File("ctl.sock");
  auto server = StartServer(path);
  ASSERT_EQ(unlink(path.c_str()), 0);
  std::ofstream(path) << "someone else's";
  server.reset();
  EXPECT_EQ(access(path.c_str(), F_OK), 0);
}

// Found by the control_json fuzz target: a number too large for a double
// threw out_of_range past the parse_error handler, and the VMM died.
TEST(ControlServerTest, ANumberTooLargeIsAMalformedRequest) {
  TempDir dir;
  auto server = StartServer(dir.File("ctl.sock"));
  for (const char* line : {R"({"execute":"echo","id":1e999})", R"(3e333)",
                           R"({"execute":"echo","arguments":{"a":-1e400}})"}) {
    json reply = json::parse(server->HandleLine(line));
    EXPECT_EQ(reply["error"]["class"], "InvalidRequest") << line << " -> " << reply.dump();
    EXPECT_THAT(reply["error"]["desc"].get<std::string>(), HasSubstr("malformed JSON")) << line;
  }
}

TEST(ControlServerTest, HandleLineWithoutSockets) {
  TempDir dir;
  auto server = StartServer(dir.File("ctl.sock"));
  EXPECT_EQ(server->HandleLine(R"({"execute":"echo","arguments":{"a":"b"},"id":1})"),
            R"({"id":1,"return":{"a":"b"}})");
}

// What a client of another uid got: connect()'s errno (0: connected) and
// the first response line to `request`.
struct ForeignReply {
  int connect_errno = 0;
  std::string line;
};

// Connects to `path` as `uid` from a child process (setresuid) and sends
// `request`. The child uses no allocation: the parent has threads.
ForeignReply AsUid(uid_t uid, const std::string& path, const char* request) {
  int pipe_fds[2];
  EXPECT_EQ(pipe(pipe_fds), 0);
  const pid_t child = fork();
  if (child == 0) {
    close(pipe_fds[0]);
    char buffer[1024] = {};
    int err = 0;
    if (setgroups(0, nullptr) != 0 || setresgid(uid, uid, uid) != 0 ||
        setresuid(uid, uid, uid) != 0) {
      _exit(3);
    }
    const int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un addr = {};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
    ssize_t got = 0;
    if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
      err = errno;
    } else {
      // The server may have refused and closed already: no SIGPIPE, read on.
      (void)!send(fd, request, std::strlen(request), MSG_NOSIGNAL);
      for (ssize_t n; got < static_cast<ssize_t>(sizeof(buffer)) - 1 &&
                      (n = read(fd, buffer + got, sizeof(buffer) - 1 - got)) > 0;) {
        got += n;
        if (std::memchr(buffer, '\n', static_cast<size_t>(got)) != nullptr) break;
      }
    }
    (void)!write(pipe_fds[1], &err, sizeof(err));
    (void)!write(pipe_fds[1], buffer, static_cast<size_t>(got));
    _exit(0);
  }
  close(pipe_fds[1]);
  ForeignReply reply;
  std::string out;
  char chunk[1024];
  for (ssize_t n; (n = read(pipe_fds[0], chunk, sizeof(chunk))) > 0;) out.append(chunk, n);
  close(pipe_fds[0]);
  int status = 0;
  EXPECT_EQ(waitpid(child, &status, 0), child);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
  if (out.size() >= sizeof(int)) {
    std::memcpy(&reply.connect_errno, out.data(), sizeof(int));
    reply.line = out.substr(sizeof(int));
  }
  return reply;
}

constexpr uid_t kNobody = 65534;

class ControlAccessTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (geteuid() != 0) GTEST_SKIP() << "needs root: a client of another uid is made by setresuid";
    ASSERT_EQ(chmod(dir_.File("").c_str(), 0755), 0);  // others may reach the socket file
  }
  std::unique_ptr<ControlServer> Serve(ControlServer::Options options) {
    options.on_refused = [this](const std::string& line) {
      refused_.fetch_add(1);
      last_refusal_ = line;
    };
    auto server = ControlServer::Create(dir_.File("vmm.sock"), options);
    EXPECT_TRUE(server.has_value()) << server.error().ToString();
    if (!server.has_value()) return nullptr;
    (*server)->Register("poke", [this](const json&) -> Result<json> {
      pokes_.fetch_add(1);
      return json::object();
    });
    EXPECT_TRUE((*server)->Start().ok());
    return std::move(*server);
  }

  TempDir dir_;
  std::atomic<int> pokes_{0};
  std::atomic<int> refused_{0};
  std::string last_refusal_;
};

TEST_F(ControlAccessTest, AnotherUidCannotConnectToTheSocketFile) {
  auto server = Serve({});
  ASSERT_TRUE(server);
  struct stat st {};
  ASSERT_EQ(stat(server->path().c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  ForeignReply r = AsUid(kNobody, server->path(), "{\"execute\": \"poke\"}\n");
  EXPECT_EQ(r.connect_errno, EACCES) << r.line;
  EXPECT_EQ(pokes_.load(), 0);
}

// Even when the file lets it connect (a mode changed by hand), a peer of
// another uid is refused by its credentials before any request is read.
TEST_F(ControlAccessTest, AnotherUidIsRefusedByItsCredentialsAndChangesNothing) {
  auto server = Serve({});
  ASSERT_TRUE(server);
  ASSERT_EQ(chmod(server->path().c_str(), 0666), 0);
  ForeignReply r = AsUid(kNobody, server->path(), "{\"execute\": \"poke\", \"id\": 1}\n");
  ASSERT_EQ(r.connect_errno, 0);
  json reply = json::parse(r.line, nullptr, false);
  ASSERT_TRUE(reply.contains("error")) << r.line;
  EXPECT_THAT(reply["error"]["desc"].get<std::string>(), HasSubstr("uid 65534"));
  EXPECT_THAT(reply["error"]["desc"].get<std::string>(), HasSubstr("--control-allow-uid 65534"));
  EXPECT_EQ(pokes_.load(), 0);
  EXPECT_EQ(refused_.load(), 1);
  EXPECT_THAT(last_refusal_, HasSubstr("refused pid"));
  // Its own uid is served as before.
  RawClient self(server->path());
  ASSERT_TRUE(self.connected());
  ASSERT_TRUE(self.Write("{\"execute\": \"poke\"}\n"));
  ASSERT_TRUE(self.ReadLine().has_value());
  EXPECT_EQ(pokes_.load(), 1);
}

TEST_F(ControlAccessTest, AnAllowedUidIsGrantedTheFileAndServed) {
  ControlServer::Options options;
  options.allowed_uids = {kNobody};
  auto server = Serve(options);
  ASSERT_TRUE(server);
  ForeignReply r = AsUid(kNobody, server->path(), "{\"execute\": \"poke\", \"id\": 2}\n");
  ASSERT_EQ(r.connect_errno, 0);
  EXPECT_EQ(json::parse(r.line, nullptr, false), json({{"return", json::object()}, {"id", 2}}))
      << r.line;
  EXPECT_EQ(pokes_.load(), 1);
  // Another uid still may not connect: the ACL names only the allowed one.
  EXPECT_EQ(AsUid(kNobody - 1, server->path(), "{}\n").connect_errno, EACCES);
  EXPECT_EQ(refused_.load(), 0);
}

}  // namespace
}  // namespace faultline::control
