#include "src/paging/installer.h"

#include <utility>

namespace faultline::paging {

namespace {
constexpr InstallerKind kAllKinds[] = {InstallerKind::kCopy, InstallerKind::kMove,
                                       InstallerKind::kContinue, InstallerKind::kZero,
                                       InstallerKind::kHole};
}  // namespace

const char* InstallerName(InstallerKind kind) {
  switch (kind) {
    case InstallerKind::kCopy:
      return "copy";
    case InstallerKind::kMove:
      return "move";
    case InstallerKind::kContinue:
      return "continue";
    case InstallerKind::kZero:
      return "zero";
    case InstallerKind::kHole:
      return "hole";
  }
  return "unknown";
}

Result<InstallerKind> ParseInstaller(std::string_view name) {
  for (InstallerKind kind : kAllKinds) {
    if (name == InstallerName(kind)) return kind;
  }
  return Error("unknown installer '{}' (expected copy, move, continue, zero or hole)", name);
}

Status CheckInstaller(InstallerKind kind, Backing backing) {
  const char* b = BackingName(backing);
  if (kind == InstallerKind::kHole) return Status::Ok();  // every backing
  if (backing == Backing::kGuestMemfd) {
    return Error(
        "installer '{}' cannot page a gmem block: guest_memfd mappings cannot be registered "
        "with userfaultfd on this kernel — use --installer hole",
        InstallerName(kind));
  }
  switch (kind) {
    case InstallerKind::kMove:
      if (backing != Backing::kAnonymous) {
        return Error(
            "installer 'move' needs anonymous memory (UFFDIO_MOVE), not {} — use continue for "
            "memfd and hugetlb",
            b);
      }
      return Status::Ok();
    case InstallerKind::kContinue:
      if (backing == Backing::kAnonymous) {
        return Error(
            "installer 'continue' needs a shared file with an alias mapping (memfd or hugetlb), "
            "not anon — use move for anonymous memory");
      }
      return Status::Ok();
    default:
      return Status::Ok();
  }
}

InstallerKind BestInstaller(Backing backing) {
  switch (backing) {
    case Backing::kAnonymous:
      return InstallerKind::kMove;
    case Backing::kMemfd:
    case Backing::kHugetlb:
      return InstallerKind::kContinue;
    case Backing::kGuestMemfd:
      return InstallerKind::kHole;
  }
  return InstallerKind::kCopy;
}

uint64_t UffdInstaller::features() const {
  uint64_t f = sys::kUffdFeatureThreadId | sys::kUffdFeatureEventRemove | sys::kUffdFeaturePoison;
  const bool minor = sys::HasMode(modes(), sys::UffdMode::kMinor);
  switch (block_.backing()) {
    case Backing::kMemfd:
      f |= sys::kUffdFeatureMissingShmem | (minor ? sys::kUffdFeatureMinorShmem : 0);
      break;
    case Backing::kHugetlb:
      f |= sys::kUffdFeatureMissingHugetlbfs | (minor ? sys::kUffdFeatureMinorHugetlbfs : 0);
      break;
    default:
      break;
  }
  if (kind_ == InstallerKind::kMove) f |= sys::kUffdFeatureMove;
  return f;
}

Result<InstallResult> UffdInstaller::CopyZeros(const sys::Userfaultfd& uffd, uint64_t offset) {
  std::call_once(zeros_once_, [&] {
    auto zeros = sys::Mapping::Anonymous(unit(), "installer zero unit");
    if (zeros.has_value()) {
      zeros_ = std::move(*zeros);
    } else {
      zeros_status_ = zeros.error();
    }
  });
  RETURN_IF_ERROR(zeros_status_);
  ASSIGN_OR_RETURN(sys::UffdFill fill, uffd.Copy(host(offset), zeros_.data(), unit()));
  return InstallResult{fill, fill.done() ? unit() : 0};
}

Result<InstallResult> UffdInstaller::InstallZero(const sys::Userfaultfd& uffd, uint64_t offset,
                                                 bool minor) {
  if (minor) {
    // The page is in the page cache (only its mapping was zapped): map it
    // as it is. Writing zeros over it would destroy data if this fault
    // raced with an install.
    ASSIGN_OR_RETURN(sys::UffdFill fill, uffd.Continue(host(offset), unit()));
    return InstallResult{fill, 0};
  }
  if (block_.backing() == Backing::kHugetlb) return CopyZeros(uffd, offset);
  ASSIGN_OR_RETURN(sys::UffdFill fill, uffd.ZeroPage(host(offset), unit()));
  return InstallResult{fill, 0};
}

Result<sys::UffdFill> UffdInstaller::Poison(const sys::Userfaultfd& uffd, uint64_t offset,
                                            sys::UffdWake wake) const {
  return uffd.Poison(host(offset), unit(), wake);
}

Status UffdInstaller::MarkPresent(const sys::Userfaultfd& uffd, uint64_t offset, uint64_t length) {
  (void)uffd;
  (void)offset;
  (void)length;
  return Status::Ok();
}

}  // namespace faultline::paging
