#include "src/migration/snapshot_files.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <unistd.h>

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
