#include "src/migration/snapshot_files.h"

#include <fcntl.h>
#include <limits.h>
#include <openssl/evp.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <vector>

#include <cerrno>

#include <fmt/format.h>

#include "src/migration/wire.h"

namespace faultline::migration {

Result<sys::UniqueFd> OpenFile(const std::string& path, int flags) {
  sys::UniqueFd fd(::open(path.c_str(), flags | O_CLOEXEC, 0600));
  if (!fd.valid()) return ErrnoError(errno, "snapshot: opening {}", path);
  return fd;
}

Status WriteAll(int fd, const uint8_t* data, uint64_t size, uint64_t offset,
                const std::string& path) {
  for (uint64_t done = 0; done < size;) {
    const ssize_t n = ::pwrite(fd, data + done, size - done, static_cast<off_t>(offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return ErrnoError(n < 0 ? errno : EIO, "snapshot: writing {}", path);
    done += static_cast<uint64_t>(n);
  }
  return Status::Ok();
}

Status ReadAll(int fd, uint8_t* data, uint64_t size, uint64_t offset, const std::string& path) {
  for (uint64_t done = 0; done < size;) {
    const ssize_t n = ::pread(fd, data + done, size - done, static_cast<off_t>(offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return ErrnoError(errno, "snapshot: reading {}", path);
    if (n == 0) return Error("snapshot: {} ends at {:#x}: truncated", path, offset + done);
    done += static_cast<uint64_t>(n);
  }
  return Status::Ok();
}

Status ReadScattered(int fd, std::span<const std::span<uint8_t>> dests, uint64_t offset,
                     const std::string& path) {
  std::vector<iovec> iov;
  iov.reserve(dests.size());
  for (std::span<uint8_t> d : dests) iov.push_back({d.data(), d.size()});
  size_t first = 0;
  while (first < iov.size()) {
    const int count = static_cast<int>(std::min<size_t>(iov.size() - first, IOV_MAX));
    const ssize_t n = ::preadv(fd, &iov[first], count, static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return ErrnoError(errno, "snapshot: reading {}", path);
    if (n == 0) return Error("snapshot: {} ends at {:#x}: truncated", path, offset);
    offset += static_cast<uint64_t>(n);
    // Skip what was read; a partly read buffer continues where it stopped.
    for (size_t left = static_cast<size_t>(n); left > 0;) {
      const size_t take = std::min(left, iov[first].iov_len);
      iov[first].iov_base = static_cast<uint8_t*>(iov[first].iov_base) + take;
      iov[first].iov_len -= take;
      left -= take;
      if (iov[first].iov_len == 0) ++first;
    }
    while (first < iov.size() && iov[first].iov_len == 0) ++first;
  }
  return Status::Ok();
}

void AdviseWillNeed(int fd, uint64_t offset, uint64_t length) {
  (void)::posix_fadvise(fd, static_cast<off_t>(offset), static_cast<off_t>(length),
                        POSIX_FADV_WILLNEED);
}

std::string Sha256(std::span<const uint8_t> bytes) {
  uint8_t digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  EVP_Digest(bytes.data(), bytes.size(), digest, &length, EVP_sha256(), nullptr);
  std::string hex;
  hex.reserve(2 * length);
  for (unsigned int i = 0; i < length; ++i) hex += fmt::format("{:02x}", digest[i]);
  return hex;
}

Result<DirtyBitmap> FileDataPages(int fd, uint64_t size, const std::string& path) {
  DirtyBitmap data(size / kWirePageSize);
  for (off_t at = 0; static_cast<uint64_t>(at) < size;) {
    const off_t start = ::lseek(fd, at, SEEK_DATA);
    if (start < 0 && errno == ENXIO) break;  // holes to the end
    if (start < 0) return ErrnoError(errno, "snapshot: finding the data of {}", path);
    if (static_cast<uint64_t>(start) >= size) break;
    off_t end = ::lseek(fd, start, SEEK_HOLE);
    if (end < 0) return ErrnoError(errno, "snapshot: finding the holes of {}", path);
    end = std::min<off_t>(end, static_cast<off_t>(size));
    const uint64_t first = static_cast<uint64_t>(start) / kWirePageSize;
    const uint64_t last = (static_cast<uint64_t>(end) + kWirePageSize - 1) / kWirePageSize;
    data.SetRange(first, last - first);
    at = end;
  }
  return data;
}

}  // namespace faultline::migration
