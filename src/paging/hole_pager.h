// HolePager: demand paging without userfaultfd, for every backing including
// guest_memfd (which userfaultfd cannot register). A chunk that is not
// present has no KVM memslot: it is a hole in the guest-physical map, and a
// vCPU touching it exits to its own thread with the address
// (KVM_EXIT_MMIO). The VMM then fetches the chunk straight into the block's
// memory, maps it (a new memslot, created without pausing the other vCPUs)
// and completes the access that exited.
//
// Memslots are cut at the chunk size while paging (GuestMemory's memslot
// granule), so mapping a chunk only ever adds a slot; Finish() merges them
// back with one pause. Each chunk is fetched once: the first thread to want
// it fetches, the others wait on its state.
//
// What KVM reads itself (the guest's page tables, CPL0 code and stacks,
// instruction bytes it emulates) cannot go through an MMIO exit, so the VMM
// makes those chunks present before the vCPUs run (EnsurePresent).
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <vector>

#include "faultline/ram_block.h"
#include "faultline/status.h"
#include "src/memory/dirty_bitmap.h"
#include "src/memory/guest_memory.h"
#include "src/paging/page_state.h"
#include "src/paging/pager_context.h"
#include "src/paging/present_map.h"
#include "src/sys/mutex.h"

namespace faultline::paging {

inline constexpr uint64_t kMinHoleChunk = 4096;
inline constexpr uint64_t kMaxHoleChunk = 2ull << 20;

class HolePager {
 public:
  using Clock = std::chrono::steady_clock;
  enum class Outcome {
    kNotOurs,   // not in a chunk this pager maps (RAM, or someone else's hole)
    kPresent,   // the chunk's data is in the block: complete the access
    kPoisoned,  // the source could not supply it
  };

  // Punches a hole for every chunk of `block` (placed in `memory`) that is
  // not wholly in `present` and sets the memslot granule to `chunk`. Before
  // the vCPUs run. `chunk`: a power of two in [4 KiB, 2 MiB], a multiple of
  // the block's page size.
  static Result<std::unique_ptr<HolePager>> Create(PagerContext& ctx, GuestMemory& memory,
                                                   std::shared_ptr<RamBlock> block,
                                                   uint32_t source_block, const PresentMap& present,
                                                   uint64_t chunk);

  // Brings in the chunk holding `gpa` if it is one of ours (fetching it, or
  // waiting for whoever is) and maps it if it can without waiting (a vCPU
  // thread must not wait for a layout change: it could be what that change
  // waits for). `vcpu_thread`: the caller is a vCPU thread.
  Outcome Resolve(Gpa gpa, bool vcpu_thread);
  // The VMM's own access: every chunk overlapping the range present and
  // mapped, so that GuestMemory can read it. Errors name a poisoned chunk.
  Status EnsurePresent(Gpa gpa, uint64_t length, bool vcpu_thread);
  // Fetches and maps every chunk still missing (a background push, or the
  // last step before Finish). Not on a vCPU thread.
  Status PushAll();
  // Once every chunk is present: maps any still pending and merges the
  // memslots back to `granule` (pausing the vCPUs once). Not on a vCPU thread.
  Status Finish(uint64_t granule);

  // Where guest-physical `gpa` (Contains) lives in the block.
  uint8_t* HostFor(Gpa gpa) const { return block_->host() + (gpa - base_); }
  bool Contains(Gpa gpa) const { return gpa >= base_ && gpa - base_ < chunks_ * chunk_; }
  // Whether the page holding `gpa` was in the present map at Create (a
  // vCPU exit on it is a fault on a present page: for a chunk only partly
  // present, the price of mapping whole chunks).
  bool WasPresent(Gpa gpa) const {
    return Contains(gpa) && initial_present_.Contains((gpa - base_) / block_->page_size());
  }
  uint64_t chunk() const { return chunk_; }
  uint64_t missing_chunks() const;
  const RamBlock& block() const { return *block_; }

 private:
  HolePager(PagerContext& ctx, GuestMemory& memory, std::shared_ptr<RamBlock> block,
            uint32_t source_block, uint64_t chunk, Gpa base, uint64_t chunks);
  Gpa ChunkGpa(uint64_t c) const { return base_ + c * chunk_; }
  struct Run {
    uint64_t page, count;  // 4 KiB pages of the block
  };
  // One fetch of every run, straight into the block, waited for: the runs
  // that failed (to try again), and whether the source lost one.
  struct Round {
    std::vector<Run> failed;
    bool unavailable = false;
    Status error;  // of the last run that did not fill
  };
  // Fetches the missing pages of chunk `c` (owned: kFetching) into the block
  // and settles it present or poisoned.
  void FetchChunk(uint64_t c);
  std::vector<Run> MissingRuns(uint64_t c) const;
  Round FetchRound(const std::vector<Run>& runs, bool retry);
  // Maps chunk `c`; with `may_wait`, through a paused layout change if the
  // pause-free path is busy. False if it is still a hole.
  bool Map(uint64_t c, bool may_wait);
  void AddPendingMap(uint64_t c);
  void RetryPendingMaps();

  PagerContext& ctx_;
  GuestMemory& memory_;
  std::shared_ptr<RamBlock> block_;
  const uint32_t source_block_;
  const uint64_t chunk_;
  const Gpa base_;         // the block's placement
  const uint64_t chunks_;  // in the block's in-use range
  PageStateTable states_;  // per chunk; kPresent once its data is in
  // 4 KiB pages of the block present at Create; read-only afterwards.
  DirtyBitmap present_;
  PresentMap initial_present_;  // fixed after Create

  std::vector<uint8_t> ours_;  // per chunk: punched by us (fixed after Create)
  // Held across a layout change (FillHole may pause the vCPUs): vCPU
  // threads only try it.
  sys::Mutex map_mu_;
  std::vector<uint8_t> mapped_ GUARDED_BY(map_mu_);             // per chunk
  sys::Mutex pending_mu_ ACQUIRED_AFTER(map_mu_);               // never held across a layout change
  std::vector<uint64_t> pending_maps_ GUARDED_BY(pending_mu_);  // present, still holes
};

}  // namespace faultline::paging
