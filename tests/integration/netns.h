// Two hosts on one machine, for the integration tests: two network
// namespaces joined by a veth pair with a bandwidth limit (tc tbf) on both
// ends, whose link the test can cut in the kernel (`ip link set down`).
//
// Names carry the test process's pid (fl<pid>a, fl<pid>b), so that tests in
// parallel processes never meet, and namespaces left behind by a process
// that died (SIGKILL, a crash) are recognised and removed by the next one.
// Traffic goes only between the two addresses below, which exist only inside
// the namespaces this object made.
#pragma once

#include <string>
#include <vector>

namespace faultline::integration {

class NetnsPair {
 public:
  // One end: its namespace, veth device and address (a /24 shared by both).
  struct End {
    std::string ns;
    std::string device;
    std::string address;
  };

  // Makes both namespaces and the link at `rate` (tc's syntax: "1gbit",
  // "10gbit"), after removing stale ones. If it cannot (not root, no `ip`
  // or `tc`, a command failed), error() says why and nothing is left.
  explicit NetnsPair(const std::string& rate);
  // Deletes both namespaces (which deletes the veth pair), even when a test
  // failed; processes still inside keep theirs until they exit.
  ~NetnsPair();
  NetnsPair(const NetnsPair&) = delete;
  NetnsPair& operator=(const NetnsPair&) = delete;

  // Empty once made; otherwise why not, for GTEST_SKIP.
  const std::string& error() const { return error_; }
  const End& a() const { return a_; }  // the source's side
  const End& b() const { return b_; }  // the destination's side
  const std::string& rate() const { return rate_; }
  // The link rate in bytes per second ("1gbit": 125,000,000).
  double bytes_per_second() const;

  // A command prefix that runs a program inside `end`'s namespace.
  static std::vector<std::string> Exec(const End& end) { return {"ip", "netns", "exec", end.ns}; }

  // Cuts the link in the kernel (side a's device down: neither end has a
  // carrier, every packet is dropped), and brings it back. Empty, or why
  // the command failed.
  std::string LinkDown();
  std::string LinkUp();

 private:
  std::string Make();
  // Runs `command` (argv) and returns "" on success, or the command with
  // its exit status and output.
  static std::string Run(const std::vector<std::string>& command);
  // fl<pid>a/b namespaces whose process no longer exists.
  static void RemoveStale();

  std::string rate_;
  End a_, b_;
  bool made_a_ = false, made_b_ = false;
  std::string error_;
};

}  // namespace faultline::integration
