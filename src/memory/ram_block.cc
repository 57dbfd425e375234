// RamBlock backings: private anonymous memory, memfd (shmem), hugetlbfs
// memfd, and guest_memfd. The file-backed ones are mapped twice: host() is
// what KVM memslots and userfaultfd registrations use, alias() is where the
// VMM writes pages (e.g. received during migration) without faulting.
#include "faultline/ram_block.h"

#include <sys/mman.h>

#include <cerrno>
#include <string>
#include <utility>

#include "src/sys/guest_memfd.h"
#include "src/sys/mapping.h"
#include "src/sys/memfd.h"
#include "src/sys/unique_fd.h"

namespace faultline {
namespace {

class MappedRamBlock final : public RamBlock {
 public:
  // `host` invalid: options.host is the VMM's own mapping, not ours.
  MappedRamBlock(const RamBlockOptions& options, uint64_t page_size, sys::UniqueFd fd,
                 sys::Mapping host, sys::Mapping alias)
      : RamBlock(options.name, options.backing, options.size, page_size),
        fd_(std::move(fd)),
        host_map_(std::move(host)),
        alias_map_(std::move(alias)) {
    host_ = host_map_.valid() ? host_map_.data() : static_cast<uint8_t*>(options.host);
    alias_ = alias_map_.valid() ? alias_map_.data() : nullptr;
  }

  int fd() const override { return fd_.valid() ? fd_.get() : -1; }

  Status Discard(uint64_t offset, uint64_t length) override {
    if (!IsAligned(offset, page_size_) || !IsAligned(length, page_size_)) {
      return Error("RAM block '{}': discard [0x{:x}, +0x{:x}) is not aligned to its {} KiB pages",
                   name_, offset, length, page_size_ >> 10);
    }
    if (offset > size_ || length > size_ - offset) {
      return Error("RAM block '{}': discard [0x{:x}, +0x{:x}) is outside its 0x{:x} bytes", name_,
                   offset, length, size_);
    }
    if (length == 0) return Status::Ok();
    if (backing_ == Backing::kAnonymous) {
      // Private anonymous memory: the pages go away and read back as zeros
      // (or fault as missing when registered with userfaultfd).
      if (::madvise(host_ + offset, length, MADV_DONTNEED) != 0) {
        const int err = errno;
        return ErrnoError(err, "RAM block '{}': madvise(MADV_DONTNEED) [0x{:x}, +0x{:x})", name_,
                          offset, length);
      }
      return Status::Ok();
    }
    // Shared file memory: freeing the file's pages unmaps them from both
    // mappings at once.
    return sys::PunchHole(fd_.get(), offset, length)
        .WithContext(fmt::format("RAM block '{}'", name_));
  }

 private:
  // Destroyed in reverse order: mappings first, then the file.
  sys::UniqueFd fd_;
  sys::Mapping host_map_;
  sys::Mapping alias_map_;
};

uint64_t PageSizeOf(Backing backing) {
  return backing == Backing::kHugetlb ? kHugePageSize : kPageSize;
}

// Maps the whole of `fd` shared, read-write.
Result<sys::Mapping> MapShared(const RamBlockOptions& options, int fd, const char* role) {
  const std::string what =
      fmt::format("RAM block '{}' ({} {})", options.name, BackingName(options.backing), role);
  return sys::Mapping::Map(options.size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0, what.c_str());
}

Result<std::shared_ptr<RamBlock>> CreateAnonymous(const RamBlockOptions& options) {
  if (options.host != nullptr) {
    return std::make_shared<MappedRamBlock>(options, kPageSize, sys::UniqueFd(), sys::Mapping(),
                                            sys::Mapping());
  }
  const std::string what = fmt::format("RAM block '{}' (anon)", options.name);
  ASSIGN_OR_RETURN(sys::Mapping host, sys::Mapping::Anonymous(options.size, what.c_str()));
  if (options.transparent_huge_pages && ::madvise(host.data(), host.size(), MADV_HUGEPAGE) != 0) {
    const int err = errno;
    return ErrnoError(err,
                      "RAM block '{}': madvise(MADV_HUGEPAGE) (is transparent_hugepage "
                      "enabled? see /sys/kernel/mm/transparent_hugepage/enabled)",
                      options.name);
  }
  return std::make_shared<MappedRamBlock>(options, kPageSize, sys::UniqueFd(), std::move(host),
                                          sys::Mapping());
}

// The memfd of a memfd or hugetlb block: created, or adopted.
Result<sys::UniqueFd> BlockMemfd(const RamBlockOptions& options, bool hugetlb) {
  if (options.adopt_fd >= 0) {
    Result<sys::UniqueFd> fd = sys::AdoptMemfd(options.adopt_fd, hugetlb, options.size);
    if (!fd.has_value()) return fd.error().WithContext(fmt::format("RAM block '{}'", options.name));
    return fd;
  }
  return sys::CreateMemfd(options.name, options.size,
                          hugetlb ? sys::kMemfdHugetlb | sys::kMemfdHuge2Mb : 0);
}

Result<std::shared_ptr<RamBlock>> CreateMemfd(const RamBlockOptions& options) {
  ASSIGN_OR_RETURN(sys::UniqueFd fd, BlockMemfd(options, /*hugetlb=*/false));
  sys::Mapping host;
  if (options.host == nullptr) {
    ASSIGN_OR_RETURN(host, MapShared(options, fd.get(), "host"));
  }
  ASSIGN_OR_RETURN(sys::Mapping alias, MapShared(options, fd.get(), "alias"));
  return std::make_shared<MappedRamBlock>(options, kPageSize, std::move(fd), std::move(host),
                                          std::move(alias));
}

Result<std::shared_ptr<RamBlock>> CreateHugetlb(const RamBlockOptions& options) {
  const std::string what = fmt::format("RAM block '{}'", options.name);
  ASSIGN_OR_RETURN(sys::UniqueFd fd, BlockMemfd(options, /*hugetlb=*/true));
  // A shared hugetlbfs mapping reserves all its pages at mmap time, so a
  // shortage shows here as ENOMEM rather than as a SIGBUS on first touch.
  // (Not checked against /proc/meminfo beforehand: surplus pages, allowed by
  // vm.nr_overcommit_hugepages, may make up the difference.)
  Result<sys::Mapping> host = sys::Mapping();
  if (options.host == nullptr) host = MapShared(options, fd.get(), "host");
  if (!host.has_value()) {
    if (host.error().code() == ENOMEM) {
      return ErrnoError(ENOMEM, "{}", sys::HugePageShortage(what, options.size));
    }
    return host.error();
  }
  // The alias maps the same file, whose pages are already reserved.
  ASSIGN_OR_RETURN(sys::Mapping alias, MapShared(options, fd.get(), "alias"));
  return std::make_shared<MappedRamBlock>(options, kHugePageSize, std::move(fd), std::move(*host),
                                          std::move(alias));
}

Result<std::shared_ptr<RamBlock>> CreateGuestMemfd(const RamBlockOptions& options) {
  if (options.vm_fd < 0) {
    return Error(
        "RAM block '{}': a gmem (guest_memfd) block needs the VM that owns it "
        "(RamBlockOptions::vm_fd)",
        options.name);
  }
  auto fd = sys::CreateGuestMemfd(options.vm_fd, options.size,
                                  sys::kGuestMemfdFlagMmap | sys::kGuestMemfdFlagInitShared);
  if (!fd.has_value()) return fd.error().WithContext(fmt::format("RAM block '{}'", options.name));
  ASSIGN_OR_RETURN(sys::Mapping host, MapShared(options, fd->get(), "host"));
  ASSIGN_OR_RETURN(sys::Mapping alias, MapShared(options, fd->get(), "alias"));
  return std::make_shared<MappedRamBlock>(options, kPageSize, std::move(*fd), std::move(host),
                                          std::move(alias));
}

}  // namespace

const char* BackingName(Backing backing) {
  switch (backing) {
    case Backing::kAnonymous:
      return "anon";
    case Backing::kMemfd:
      return "memfd";
    case Backing::kHugetlb:
      return "hugetlb";
    case Backing::kGuestMemfd:
      return "gmem";
  }
  return "unknown";
}

Result<Backing> ParseBacking(std::string_view name) {
  for (Backing backing :
       {Backing::kAnonymous, Backing::kMemfd, Backing::kHugetlb, Backing::kGuestMemfd}) {
    if (name == BackingName(backing)) return backing;
  }
  return Error("unknown memory backing '{}' (expected anon, memfd, hugetlb or gmem)", name);
}

Result<std::shared_ptr<RamBlock>> RamBlock::Create(const RamBlockOptions& options) {
  const uint64_t page_size = PageSizeOf(options.backing);
  if (options.size == 0 || !IsAligned(options.size, page_size)) {
    return Error("RAM block '{}': size {} is not a non-zero multiple of the {} page size ({})",
                 options.name, options.size, BackingName(options.backing),
                 page_size == kHugePageSize ? "2 MiB" : "4 KiB");
  }
  if (options.adopt_fd >= 0 && options.backing != Backing::kMemfd &&
      options.backing != Backing::kHugetlb) {
    return Error("RAM block '{}': only a memfd or hugetlb block can adopt a descriptor, not {}",
                 options.name, BackingName(options.backing));
  }
  if (options.host != nullptr) {
    if (options.backing == Backing::kGuestMemfd) {
      return Error(
          "RAM block '{}': a gmem block is created by Faultline and cannot adopt a mapping",
          options.name);
    }
    if (options.backing != Backing::kAnonymous && options.adopt_fd < 0) {
      return Error(
          "RAM block '{}': a {} block that adopts the VMM's mapping needs its memfd too "
          "(RamBlockOptions::adopt_fd), for the alias mapping",
          options.name, BackingName(options.backing));
    }
    if (!IsAligned(reinterpret_cast<uintptr_t>(options.host), page_size)) {
      return Error("RAM block '{}': the mapping at {} is not aligned to its {} pages", options.name,
                   fmt::ptr(options.host), page_size == kHugePageSize ? "2 MiB" : "4 KiB");
    }
  }
  if (options.transparent_huge_pages && options.backing != Backing::kAnonymous) {
    return Error("RAM block '{}': transparent huge pages apply to anon blocks only, not {}",
                 options.name, BackingName(options.backing));
  }
  switch (options.backing) {
    case Backing::kAnonymous:
      return CreateAnonymous(options);
    case Backing::kMemfd:
      return CreateMemfd(options);
    case Backing::kHugetlb:
      return CreateHugetlb(options);
    case Backing::kGuestMemfd:
      return CreateGuestMemfd(options);
  }
  return Error("RAM block '{}': invalid backing {}", options.name,
               static_cast<int>(options.backing));
}

}  // namespace faultline
