// ConnectUffdBackend, the VMM's side of the page server: real RAM blocks
// registered on a userfaultfd that goes to a PageServer (here in this
// process, its handler threads beside the "vCPU" threads that touch the
// blocks), every page read back, a discard read as zeros, the watcher
// called once when the server goes; and the errors before anything is
// handed over.
#include "src/migration/uffd_backend.h"

#include <sys/mman.h>

#include <atomic>
#include <chrono>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "src/migration/page_server.h"
#include "src/migration/served_memory.h"
#include "tests/integration/page_server_util.h"

namespace faultline::migration {
namespace {

using ::testing::HasSubstr;
using namespace std::chrono_literals;

class UffdBackendTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto reader = SnapshotReader::Open(snap_.dir);
    ASSERT_TRUE(reader.has_value()) << reader.error().ToString();
    auto memory = ServedMemory::FromSnapshot(*reader);
    ASSERT_TRUE(memory.has_value()) << memory.error().ToString();
    PageServerOptions options;
    options.socket_path = snap_.Socket();
    options.client.threads = 2;
    auto server = PageServer::Start(*memory, options);
    ASSERT_TRUE(server.has_value()) << server.error().ToString();
    server_ = std::move(*server);
    for (uint64_t size : {pagetest::kBlock0, pagetest::kBlock1}) {
      auto block = RamBlock::Create({.name = "ram", .size = size});
      ASSERT_TRUE(block.has_value());
      blocks_.push_back(*block);
    }
  }

  pagetest::TestSnapshot snap_;
  std::unique_ptr<PageServer> server_;
  std::vector<std::shared_ptr<RamBlock>> blocks_;
};

TEST_F(UffdBackendTest, BlocksAreServedAndDiscardsReadZero) {
  std::atomic<int> lost{0};
  auto backend = ConnectUffdBackend(snap_.Socket(), blocks_, [&](const Status&) { ++lost; });
  ASSERT_TRUE(backend.has_value()) << backend.error().ToString();
  ASSERT_EQ((*backend)->regions().size(), 2u);
  EXPECT_EQ((*backend)->regions()[1].offset, pagetest::kBlock0);
  // Two "vCPUs", one per block.
  std::atomic<uint64_t> wrong{0};
  {
    std::vector<std::jthread> vcpus;
    uint64_t offset = 0;
    for (const auto& b : blocks_) {
      vcpus.emplace_back([&, b, offset] {
        for (uint64_t at = 0; at < b->size(); at += kPageSize) {
          wrong += std::memcmp(b->host() + at, snap_.bytes.data() + offset + at, kPageSize) != 0;
        }
      });
      offset += b->size();
    }
  }
  EXPECT_EQ(wrong, 0u);
  // The balloon: MADV_DONTNEED (the block's Discard) -> REMOVE -> zeros.
  ASSERT_TRUE(blocks_[1]->Discard(0, 1ull << 20).ok());
  std::jthread([&] {
    for (uint64_t at = 0; at < (1ull << 20); at += 8) {
      wrong += *reinterpret_cast<const volatile uint64_t*>(blocks_[1]->host() + at) != 0;
    }
  }).join();
  EXPECT_EQ(wrong, 0u);
  backend->reset();
  server_->Stop();
  const auto reports = server_->reports();
  ASSERT_EQ(reports.size(), 1u);
  EXPECT_TRUE(reports[0].served);
  EXPECT_EQ(reports[0].pid, ::getpid());
  EXPECT_GE(reports[0].stats.remove_events, 1u);
  EXPECT_EQ(reports[0].stats.errors, 0u);
  EXPECT_EQ(lost, 0);  // destroyed before the server went: no callback
}

TEST_F(UffdBackendTest, WatcherIsCalledOnceWhenTheServerGoes) {
  std::atomic<int> lost{0};
  std::string why;
  auto backend = ConnectUffdBackend(snap_.Socket(), blocks_, [&](const Status& s) {
    why = s.ToString();
    ++lost;
  });
  ASSERT_TRUE(backend.has_value()) << backend.error().ToString();
  while (server_->active_clients() == 0) std::this_thread::sleep_for(1ms);
  const auto stopped = std::chrono::steady_clock::now();
  server_->Stop();
  while (lost == 0 && std::chrono::steady_clock::now() - stopped < 5s) {
    std::this_thread::sleep_for(1ms);
  }
  EXPECT_LT(std::chrono::steady_clock::now() - stopped, 1s);
  EXPECT_EQ(lost, 1);
  EXPECT_THAT(why, HasSubstr("the page server is gone"));
  EXPECT_TRUE((*backend)->server_lost());
}

TEST_F(UffdBackendTest, ErrorsSayWhatToDo) {
  auto nobody = ConnectUffdBackend(snap_.root + "/nobody.sock", blocks_, nullptr);
  ASSERT_FALSE(nobody.has_value());
  EXPECT_THAT(nobody.error().ToString(), HasSubstr("faultline serve-pages --socket"));
  auto none = ConnectUffdBackend(snap_.Socket(), {}, nullptr);
  ASSERT_FALSE(none.has_value());
  EXPECT_THAT(none.error().ToString(), HasSubstr("no RAM blocks"));
}

}  // namespace
}  // namespace faultline::migration
