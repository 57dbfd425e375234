// A snapshot for the page-server tests: two blocks whose memory file (the
// blocks end to end) has data pages, scattered zero pages and one zero
// 2 MiB unit, written with the real snapshot writer, and the same bytes as
// one flat file (what a VMM must read back).
#pragma once

#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "src/memory/guest_memory.h"
#include "src/migration/memory_vm.h"
#include "src/migration/memory_vm_fakes.h"
#include "src/migration/snapshot.h"

namespace faultline::pagetest {

inline constexpr uint64_t kBlock0 = 6ull << 20;
inline constexpr uint64_t kBlock1 = 10ull << 20;
inline constexpr uint64_t kMemory = kBlock0 + kBlock1;

// Page p of the memory file: zero when p % 3 == 0 or in [8 MiB, 10 MiB),
// else words that name the page.
inline bool ZeroPage(uint64_t p) { return p % 3 == 0 || (p >= 2048 && p < 2560); }
inline void FillPage(uint8_t* page, uint64_t p) {
  auto* w = reinterpret_cast<uint64_t*>(page);
  for (uint64_t i = 0; i < 512; ++i) w[i] = ZeroPage(p) ? 0 : (p << 20 | i) * 0x9e37 + 1;
}

struct TestSnapshot {
  std::string root;  // a temporary directory
  std::string dir;   // the snapshot
  std::string flat;  // the memory file as one flat file
  std::vector<uint8_t> bytes;

  TestSnapshot() {
    char tmpl[] = "/tmp/faultline-pages-XXXXXX";
    EXPECT_NE(::mkdtemp(tmpl), nullptr);
    root = tmpl;
    dir = root + "/snap";
    flat = root + "/memory.bin";
    bytes.resize(kMemory);
    for (uint64_t p = 0; p < kMemory / kPageSize; ++p) FillPage(bytes.data() + p * kPageSize, p);
    std::ofstream(flat, std::ios::binary)
        .write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(kMemory));
    Write();
  }
  ~TestSnapshot() { std::filesystem::remove_all(root); }

  // Two anonymous blocks at GPA 0 and 6 MiB, paused, written.
  void Write() {
    VmmOwnedMemslots memslots;
    auto memory = GuestMemory::Create(&memslots, {.dirty_mode = DirtyLogMode::kUffdWp});
    ASSERT_TRUE(memory.has_value()) << memory.error().ToString();
    uint64_t at = 0;
    for (uint64_t size : {kBlock0, kBlock1}) {
      auto block = RamBlock::Create({.name = at == 0 ? "ram0" : "ram1", .size = size});
      ASSERT_TRUE(block.has_value()) << block.error().ToString();
      std::memcpy((*block)->host(), bytes.data() + at, size);
      ASSERT_TRUE((*memory)->Place(*block, Gpa(at)).ok());
      at += size;
    }
    migration::testing::Record record;
    auto vm = migration::MakeMemorySource(
        **memory, std::make_unique<migration::testing::FakeControl>(record, nullptr, 0));
    migration::SnapshotOptions options;
    options.live = false;
    options.resume = false;
    auto stats = migration::WriteSnapshot(*vm, dir, options);
    ASSERT_TRUE(stats.has_value()) << stats.error().ToString();
  }

  std::string Socket(const std::string& name = "pages.sock") const { return root + "/" + name; }
};

}  // namespace faultline::pagetest
