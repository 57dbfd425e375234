// The userfaultfd installers: copy, move, continue and the zero floor.
#include <fcntl.h>

#include <cerrno>
#include <utility>

#include "src/paging/installer.h"

namespace faultline::paging {
namespace {

// Staging slots per block when the caller does not say: enough to keep a
// source with a network-like delay busy, small enough not to matter.
uint32_t DefaultSlots(uint64_t unit) { return unit >= kHugePageSize ? 16 : 1024; }

Destination AcquireStaging(StagingPool& pool, bool may_wait) {
  const int64_t slot = may_wait ? pool.Acquire() : pool.TryAcquire();
  if (slot >= 0) return {pool.data(static_cast<uint32_t>(slot)), slot, nullptr};
  auto page = sys::Mapping::Anonymous(pool.slot_size(), "staging overflow");
  if (!page.has_value()) {
    const uint32_t waited = pool.Acquire();  // out of address space: wait after all
    return {pool.data(waited), waited, nullptr};
  }
  auto owner = std::make_shared<sys::Mapping>(std::move(*page));
  return {{owner->data(), pool.slot_size()}, -1, owner};
}

void ReleaseStaging(StagingPool& pool, Destination& dest) {
  if (dest.slot >= 0) pool.Release(static_cast<uint32_t>(dest.slot));
  dest = {};
}

// copy: the QEMU baseline. The source fills a staging slot, UFFDIO_COPY
// copies it into a fresh page.
class CopyInstaller final : public UffdInstaller {
 public:
  CopyInstaller(RamBlock& block, StagingPool pool)
      : UffdInstaller(InstallerKind::kCopy, block), pool_(std::move(pool)) {}

  Destination Acquire(uint64_t, bool may_wait) override { return AcquireStaging(pool_, may_wait); }
  void Release(Destination& dest) override { ReleaseStaging(pool_, dest); }
  Result<InstallResult> Install(const sys::Userfaultfd& uffd, uint64_t offset,
                                Destination& dest) override {
    ASSIGN_OR_RETURN(sys::UffdFill fill, uffd.Copy(host(offset), dest.data.data(), unit()));
    return InstallResult{fill, fill.done() ? unit() : fill.bytes};
  }

 private:
  StagingPool pool_;
};

// move: anonymous memory. The source fills a staging page, UFFDIO_MOVE
// remaps that page into place; the slot is left without a page until the
// next fetch writes to it.
class MoveInstaller final : public UffdInstaller {
 public:
  MoveInstaller(RamBlock& block, StagingPool pool)
      : UffdInstaller(InstallerKind::kMove, block), pool_(std::move(pool)) {}

  Destination Acquire(uint64_t, bool may_wait) override { return AcquireStaging(pool_, may_wait); }
  void Release(Destination& dest) override { ReleaseStaging(pool_, dest); }
  Result<InstallResult> Install(const sys::Userfaultfd& uffd, uint64_t offset,
                                Destination& dest) override {
    auto moved = uffd.Move(host(offset), Hva(dest.data.data()), unit());
    if (moved.has_value()) return InstallResult{*moved, 0};
    // EBUSY: the kernel would not move this page (pinned, or shared with a
    // child after fork); ENOENT: the source left the slot without a page.
    // Copying is still correct, just not free.
    const int err = moved.error().code();
    if (err != EBUSY && err != ENOENT) return moved.error();
    ASSIGN_OR_RETURN(sys::UffdFill fill, uffd.Copy(host(offset), dest.data.data(), unit()));
    return InstallResult{fill, fill.done() ? unit() : fill.bytes};
  }

 private:
  StagingPool pool_;
};

// continue: memfd and hugetlb. The source writes the page cache through the
// alias mapping (allocating the page there if it was a hole), and
// UFFDIO_CONTINUE maps it at host(). Resolves MISSING and MINOR faults
// alike: the kernel wakes waiters by address, whatever they faulted on.
class ContinueInstaller final : public UffdInstaller {
 public:
  explicit ContinueInstaller(RamBlock& block) : UffdInstaller(InstallerKind::kContinue, block) {}

  sys::UffdMode modes() const override { return sys::UffdMode::kMissing | sys::UffdMode::kMinor; }
  Status Prepare() override {
    if (block_.backing() != Backing::kHugetlb) return Status::Ok();
    // Allocates every huge page of the file now (the kernel zeroes each,
    // 2 MiB at a time), so that a fault pays for its one copy through the
    // alias and not also for allocating and clearing the page. hugetlb
    // pages are reserved when the block is mapped, so this takes no memory
    // the block did not hold already; pages present keep their contents.
    if (::fallocate(block_.fd(), 0, 0, static_cast<off_t>(block_.size())) != 0) {
      const int err = errno;
      return ErrnoError(err, "continue installer: allocating the huge pages of block '{}'",
                        block_.name());
    }
    return Status::Ok();
  }
  Destination Acquire(uint64_t offset, bool) override {
    return {{block_.alias() + offset, unit()}, -1, nullptr};
  }
  Result<InstallResult> Install(const sys::Userfaultfd& uffd, uint64_t offset,
                                Destination&) override {
    ASSIGN_OR_RETURN(sys::UffdFill fill, uffd.Continue(host(offset), unit()));
    return InstallResult{fill, 0};
  }
  Status MarkPresent(const sys::Userfaultfd& uffd, uint64_t offset, uint64_t length) override {
    // One ioctl per maximal run. The kernel stops early (kRetry with the
    // bytes done) when the address space is changing, and at a page mapped
    // already (kExists): step over that page and go on.
    uint64_t done = 0;
    while (done < length) {
      auto fill = uffd.Continue(host(offset + done), length - done);
      if (!fill.has_value()) {
        return fill.error().WithContext(fmt::format(
            "marking block '{}' [{:#x}, +{:#x}) present (is every page of it in the page "
            "cache?)",
            block_.name(), offset + done, length - done));
      }
      if (fill->done()) break;
      done += fill->bytes;
      if (fill->outcome == sys::UffdFill::Outcome::kExists) done += unit();
    }
    return Status::Ok();
  }
};

// zero: the floor. Faults get zeros without the source: UFFDIO_ZEROPAGE, or
// on hugetlb (no zero page) UFFDIO_CONTINUE of pages allocated by Prepare.
class ZeroInstaller final : public UffdInstaller {
 public:
  explicit ZeroInstaller(RamBlock& block) : UffdInstaller(InstallerKind::kZero, block) {}

  sys::UffdMode modes() const override {
    return block_.backing() == Backing::kHugetlb ? sys::UffdMode::kMissing | sys::UffdMode::kMinor
                                                 : sys::UffdMode::kMissing;
  }
  bool uses_source() const override { return false; }
  Status Prepare() override {
    if (block_.backing() != Backing::kHugetlb) return Status::Ok();
    // Allocates (and zeroes) every huge page in the file now, outside the
    // measured faults; each fault is then a MINOR fault.
    if (::fallocate(block_.fd(), 0, 0, static_cast<off_t>(block_.size())) != 0) {
      const int err = errno;
      return ErrnoError(err, "zero floor: allocating the huge pages of block '{}'", block_.name());
    }
    return Status::Ok();
  }
  Destination Acquire(uint64_t, bool) override { return {}; }
  Result<InstallResult> Install(const sys::Userfaultfd& uffd, uint64_t offset,
                                Destination&) override {
    return InstallZero(uffd, offset, block_.backing() == Backing::kHugetlb);
  }
};

}  // namespace

Result<std::unique_ptr<UffdInstaller>> UffdInstaller::Create(InstallerKind kind, RamBlock& block,
                                                             uint32_t staging_slots) {
  RETURN_IF_ERROR(CheckInstaller(kind, block.backing()));
  const uint64_t unit = block.page_size();
  const uint32_t slots = staging_slots != 0 ? staging_slots : DefaultSlots(unit);
  std::unique_ptr<UffdInstaller> installer;
  switch (kind) {
    case InstallerKind::kCopy: {
      ASSIGN_OR_RETURN(StagingPool pool, StagingPool::Create(unit, slots));
      installer = std::make_unique<CopyInstaller>(block, std::move(pool));
      break;
    }
    case InstallerKind::kMove: {
      ASSIGN_OR_RETURN(StagingPool pool, StagingPool::Create(unit, slots));
      installer = std::make_unique<MoveInstaller>(block, std::move(pool));
      break;
    }
    case InstallerKind::kContinue:
      installer = std::make_unique<ContinueInstaller>(block);
      break;
    case InstallerKind::kZero:
      installer = std::make_unique<ZeroInstaller>(block);
      break;
    case InstallerKind::kHole:
      return Error("installer 'hole' does not use userfaultfd: page the block with a HolePager");
  }
  RETURN_IF_ERROR(installer->Prepare());
  return installer;
}

}  // namespace faultline::paging
