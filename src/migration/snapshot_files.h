// The file operations snapshot.cc (writing) and snapshot_restore.cc
// (reading) share. Errors name the file.
#pragma once

#include <cstdint>
#include <span>
#include <string>

#include "faultline/status.h"
#include "src/memory/dirty_bitmap.h"
#include "src/sys/unique_fd.h"

namespace faultline::migration {

Result<sys::UniqueFd> OpenFile(const std::string& path, int flags);
Status WriteAll(int fd, const uint8_t* data, uint64_t size, uint64_t offset,
                const std::string& path);
// Fails on a file that ends before offset + size (truncated).
Status ReadAll(int fd, uint8_t* data, uint64_t size, uint64_t offset, const std::string& path);
// Reads the file's bytes from `offset` on into `dests` in turn (preadv).
Status ReadScattered(int fd, std::span<const std::span<uint8_t>> dests, uint64_t offset,
                     const std::string& path);
// Asks the kernel to start reading [offset, offset + length) into the page
// cache, without waiting (a hint: failures are ignored).
void AdviseWillNeed(int fd, uint64_t offset, uint64_t length);
std::string Sha256(std::span<const uint8_t> bytes);
// The 4 KiB pages of the file's first `size` bytes that hold data (the rest
// are holes, SEEK_DATA/SEEK_HOLE).
Result<DirtyBitmap> FileDataPages(int fd, uint64_t size, const std::string& path);

}  // namespace faultline::migration
