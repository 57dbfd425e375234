// Fakes for tests of the engines over a GuestMemory (memory_vm.h): one
// side's RAM (a real RAM block at GPA 0, dirty pages tracked with
// userfaultfd write-protect), a VmControl whose "vCPU" reads every page once
// started, and a "guest" that writes random pages until paused.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "src/memory/guest_memory.h"
#include "src/memory/memslot_backend.h"
#include "src/migration/memory_vm.h"
#include "src/migration/wire.h"
#include "src/sys/mutex.h"

namespace faultline::migration::testing {

// One side's RAM: one block at GPA 0.
struct Memory {
  VmmOwnedMemslots memslots;
  std::unique_ptr<GuestMemory> memory;
  std::shared_ptr<RamBlock> block;

  Memory(Backing backing, uint64_t bytes) {
    auto created = RamBlock::Create({.name = "ram0", .size = bytes, .backing = backing});
    EXPECT_TRUE(created.has_value()) << created.error().ToString();
    block = *created;
    auto m = GuestMemory::Create(&memslots, {.dirty_mode = DirtyLogMode::kUffdWp});
    EXPECT_TRUE(m.has_value()) << m.error().ToString();
    memory = std::move(*m);
    EXPECT_TRUE(memory->Place(block, Gpa(0)).ok());
  }
  uint8_t* host() const { return block->host(); }
  uint64_t size() const { return block->size(); }
};

// What the fake VMM's vCPUs and devices did, kept by the test (the engines
// own the VmControl).
struct Record {
  sys::Mutex mu;  // a guest write happens wholly before or after a pause
  bool paused GUARDED_BY(mu) = false;
  std::atomic<bool> started{false};
  std::vector<std::vector<uint8_t>> vcpus_loaded;
  std::vector<DeviceBlob> devices_loaded;

  bool IsPaused() {
    sys::MutexLock lock(mu);
    return paused;
  }
};

class FakeControl final : public VmControl {
 public:
  FakeControl(Record& record, uint8_t* memory, uint64_t bytes)
      : r_(record), memory_(memory), bytes_(bytes) {}
  ~FakeControl() override {
    if (vcpu_.joinable()) vcpu_.join();
  }

  uint32_t vcpu_count() const override { return 2; }
  void Pause() override {
    sys::MutexLock lock(r_.mu);
    r_.paused = true;
  }
  void Resume() override {
    sys::MutexLock lock(r_.mu);
    r_.paused = false;
  }
  Result<std::vector<std::vector<uint8_t>>> SaveVcpus() override {
    return std::vector<std::vector<uint8_t>>{{0xc0, 0}, {0xc0, 1}};
  }
  Status LoadVcpus(std::span<const std::vector<uint8_t>> states) override {
    r_.vcpus_loaded.assign(states.begin(), states.end());
    return Status::Ok();
  }
  Result<std::vector<DeviceBlob>> SaveDevices() override {
    return std::vector<DeviceBlob>{{"uart", {1, 2, 3}}, {"rtc", {4}}};
  }
  Status LoadDevices(std::span<const DeviceBlob> devices) override {
    r_.devices_loaded.assign(devices.begin(), devices.end());
    return Status::Ok();
  }
  bool memory_is_zero() const override { return true; }
  void AttachPager(paging::GuestPager*) override {}
  Status PrepareVcpus(paging::GuestPager&) override { return Status::Ok(); }
  // The guest runs here: a vCPU reads every page in a random order, each
  // read a fault until the page arrives.
  Status Start() override {
    r_.started = true;
    vcpu_ = std::thread([this] {
      std::vector<uint64_t> pages(bytes_ / kWirePageSize);
      for (uint64_t i = 0; i < pages.size(); ++i) pages[i] = i;
      std::shuffle(pages.begin(), pages.end(), std::mt19937_64(7));
      uint64_t sum = 0;
      for (uint64_t p : pages) sum += memory_[p * kWirePageSize];
      sum_ = sum;
    });
    return Status::Ok();
  }

 private:
  Record& r_;
  uint8_t* const memory_;
  const uint64_t bytes_;
  std::thread vcpu_;
  std::atomic<uint64_t> sum_{0};
};

// The source's guest: fills the memory (every third page zero), then
// writes random pages until paused.
class Writer {
 public:
  Writer(Memory& m, Record& r) : m_(m), r_(r) {
    std::mt19937_64 rng(1);
    for (uint64_t p = 0; p < m.size() / kWirePageSize; ++p) {
      if (p % 3 != 0) Stamp(p, rng());
    }
    thread_ = std::thread([this] {
      std::mt19937_64 rng(2);
      while (!stop_) {
        bool paused;
        {
          sys::MutexLock lock(r_.mu);
          paused = r_.paused;
          if (!paused) Stamp(rng() % (m_.size() / kWirePageSize), rng() | 1);
        }
        if (paused || ++writes_ % 64 == 0) {
          std::this_thread::sleep_for(std::chrono::microseconds(paused ? 500 : 50));
        }
      }
    });
  }
  ~Writer() { Stop(); }
  void Stop() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
  }
  uint64_t writes() const { return writes_; }

 private:
  void Stamp(uint64_t page, uint64_t value) {
    std::memcpy(m_.host() + page * kWirePageSize + (value % 511) * 8, &value, 8);
  }
  Memory& m_;
  Record& r_;
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> writes_{0};
  std::thread thread_;
};

}  // namespace faultline::migration::testing
