// GuestImage: the test guest's ELF file, parsed and checked before anything
// is written into guest memory.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "faultline/status.h"
#include "faultline/types.h"

namespace faultline::vmm {

struct GuestSegment {
  Gpa gpa;
  std::vector<uint8_t> bytes;  // file contents
  uint64_t memory_size = 0;    // >= bytes.size(); the rest is zero (bss)
};

class GuestImage {
 public:
  // Reads an ELF32 or ELF64 x86 file with a multiboot v1 header followed by
  // struct fl_image_header (guest/abi.h) in its first 8 KiB.
  static Result<GuestImage> Load(const std::string& path);
  static Result<GuestImage> Parse(std::span<const uint8_t> file, const std::string& path);

  const std::vector<GuestSegment>& segments() const { return segments_; }
  Gpa entry64() const { return entry64_; }
  Gpa image_end() const { return image_end_; }

  // Copies the segments into `ram`, which is guest memory from GPA 0.
  Status CopyInto(std::span<uint8_t> ram) const;

 private:
  std::vector<GuestSegment> segments_;
  Gpa entry64_;
  Gpa image_end_;
};

}  // namespace faultline::vmm
