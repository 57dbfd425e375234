// Installers: how a fetched page gets into a RAM block, chosen per block.
//
//   copy      MISSING faults, UFFDIO_COPY from a staging slot (two copies:
//             the source's into the slot, the kernel's into the page; the
//             QEMU baseline). anon, memfd, hugetlb.
//   move      MISSING faults on anonymous memory; the source writes a staging
//             page, UFFDIO_MOVE remaps that very page into place (no copy).
//   continue  MISSING|MINOR faults on memfd or hugetlb; the source writes the
//             page cache through the block's alias mapping, UFFDIO_CONTINUE
//             maps it (no copy). 2 MiB at a time on hugetlb.
//   zero      the floor for benchmarks: every fault gets a zero page with no
//             source work (UFFDIO_ZEROPAGE; on hugetlb, which has no zero
//             page, UFFDIO_CONTINUE of pages allocated beforehand).
//   hole      no userfaultfd: missing ranges have no KVM memslot, and the
//             vCPU's own exit brings the chunk in (HolePager, needs a VM).
//
// A UffdInstaller is shared by all the fault queues of its block: its
// methods are thread-safe and take the queue's userfaultfd as an argument
// (each queue has registered its own part of the block).
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string_view>

#include "faultline/ram_block.h"
#include "faultline/status.h"
#include "src/paging/staging_pool.h"
#include "src/sys/mapping.h"
#include "src/sys/userfaultfd.h"

namespace faultline::paging {

enum class InstallerKind : uint8_t { kCopy, kMove, kContinue, kZero, kHole };

const char* InstallerName(InstallerKind kind);  // "copy", "move", ...
Result<InstallerKind> ParseInstaller(std::string_view name);
// OK if `kind` can demand-page a block with `backing`; else why not and what
// to use instead.
Status CheckInstaller(InstallerKind kind, Backing backing);
// The installer that pages `backing` with the fewest copies.
InstallerKind BestInstaller(Backing backing);

// Where a fetch writes one install unit.
struct Destination {
  std::span<uint8_t> data;
  int64_t slot = -1;  // the staging slot, or -1
  // A one-off staging page, when the pool was empty and waiting was not
  // allowed (a handler thread must keep reading its userfaultfd).
  std::shared_ptr<sys::Mapping> overflow;
};

// What one install attempt did.
struct InstallResult {
  sys::UffdFill fill;
  uint64_t bytes_copied = 0;  // bytes the installer copied (not the source)
};

class UffdInstaller {
 public:
  static Result<std::unique_ptr<UffdInstaller>> Create(InstallerKind kind, RamBlock& block,
                                                       uint32_t staging_slots);
  virtual ~UffdInstaller() = default;
  UffdInstaller(const UffdInstaller&) = delete;
  UffdInstaller& operator=(const UffdInstaller&) = delete;

  InstallerKind kind() const { return kind_; }
  RamBlock& block() const { return block_; }
  // Bytes per install: the block's page size (4 KiB, or 2 MiB on hugetlb).
  uint64_t unit() const { return block_.page_size(); }
  Hva host(uint64_t offset) const { return Hva(block_.host() + offset); }

  // How the block's parts must be registered, and the userfaultfd features
  // that needs (plus THREAD_ID, EVENT_REMOVE and POISON, which every
  // installer uses).
  virtual sys::UffdMode modes() const { return sys::UffdMode::kMissing; }
  uint64_t features() const;
  // False for the floor: faults are resolved without asking the source.
  virtual bool uses_source() const { return true; }
  // Called once before any registration (the hugetlb floor allocates its
  // pages here).
  virtual Status Prepare() { return Status::Ok(); }

  // A buffer for the unit at `offset`. With `may_wait`, waits for a free
  // staging slot; without, takes a one-off page when none is free.
  virtual Destination Acquire(uint64_t offset, bool may_wait) = 0;
  virtual void Release(Destination& dest) { (void)dest; }
  // One attempt to put the fetched unit in place, waking its faulters. The
  // caller retries kRetry and handles kExists.
  virtual Result<InstallResult> Install(const sys::Userfaultfd& uffd, uint64_t offset,
                                        Destination& dest) = 0;
  // One attempt to install a unit of zeros (the floor; discarded pages).
  // `minor`: the fault said the page is in the page cache, only unmapped.
  virtual Result<InstallResult> InstallZero(const sys::Userfaultfd& uffd, uint64_t offset,
                                            bool minor);
  // One attempt to install a poisoned unit: accesses raise SIGBUS.
  Result<sys::UffdFill> Poison(const sys::Userfaultfd& uffd, uint64_t offset,
                               sys::UffdWake wake = sys::UffdWake::kWake) const;
  // Makes pages already present in [offset, offset + length) accessible
  // without faults, as few ioctls as possible (continue: one range
  // UFFDIO_CONTINUE; the others: nothing, the pages are mapped already).
  virtual Status MarkPresent(const sys::Userfaultfd& uffd, uint64_t offset, uint64_t length);

 protected:
  UffdInstaller(InstallerKind kind, RamBlock& block) : kind_(kind), block_(block) {}
  // A zero unit through UFFDIO_COPY from never-written memory (hugetlb has
  // no UFFDIO_ZEROPAGE).
  Result<InstallResult> CopyZeros(const sys::Userfaultfd& uffd, uint64_t offset);

  const InstallerKind kind_;
  RamBlock& block_;
  sys::Mapping zeros_;  // unit() bytes, never written; mapped on first use
  std::once_flag zeros_once_;
  Status zeros_status_;
};

}  // namespace faultline::paging
