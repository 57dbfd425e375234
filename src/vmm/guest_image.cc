#include "src/vmm/guest_image.h"

#include <elf.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <iterator>

#include "guest/abi.h"

namespace faultline::vmm {
namespace {

constexpr uint32_t kMultibootMagic = 0x1BADB002;
constexpr size_t kMultibootSearch = 8192;
constexpr uint64_t kMaxImageEnd = 64ull << 20;  // the image lives in low memory

template <typename T>
bool ReadAt(std::span<const uint8_t> file, uint64_t offset, T* out) {
  if (offset > file.size() || file.size() - offset < sizeof(T)) return false;
  std::memcpy(out, file.data() + offset, sizeof(T));
  return true;
}

// Program headers of either class, normalised.
struct Phdr {
  uint32_t type;
  uint64_t offset, paddr, filesz, memsz;
};

template <typename Ehdr, typename PhdrT>
Result<std::vector<Phdr>> ReadPhdrs(std::span<const uint8_t> file, const std::string& path) {
  Ehdr ehdr;
  if (!ReadAt(file, 0, &ehdr)) return Error("{}: truncated ELF header", path);
  if (ehdr.e_machine != EM_X86_64 && ehdr.e_machine != EM_386) {
    return Error("{}: ELF machine {} is not x86", path, ehdr.e_machine);
  }
  if (ehdr.e_phentsize != sizeof(PhdrT) || ehdr.e_phnum == 0 || ehdr.e_phnum > 64) {
    return Error("{}: bad ELF program header table ({} entries of {} bytes)", path, ehdr.e_phnum,
                 ehdr.e_phentsize);
  }
  std::vector<Phdr> out;
  for (unsigned i = 0; i < ehdr.e_phnum; ++i) {
    PhdrT p;
    if (!ReadAt(file, ehdr.e_phoff + uint64_t{i} * sizeof(PhdrT), &p)) {
      return Error("{}: ELF program header {} is past the end of the file", path, i);
    }
    out.push_back({p.p_type, p.p_offset, p.p_paddr, p.p_filesz, p.p_memsz});
  }
  return out;
}

Status LoadSegments(std::span<const uint8_t> file, const std::vector<Phdr>& phdrs,
                    const std::string& path, std::vector<GuestSegment>* out) {
  for (const Phdr& p : phdrs) {
    if (p.type != PT_LOAD || p.memsz == 0) continue;
    if (p.filesz > p.memsz || p.offset > file.size() || file.size() - p.offset < p.filesz) {
      return Error("{}: PT_LOAD segment at {:#x} lies outside the file", path, p.paddr);
    }
    if (p.paddr < FL_IMAGE_BASE || p.paddr + p.memsz > kMaxImageEnd ||
        p.paddr + p.memsz < p.paddr) {
      return Error("{}: PT_LOAD segment [{:#x}, +{:#x}) is outside [{:#x}, {:#x})", path, p.paddr,
                   p.memsz, FL_IMAGE_BASE, kMaxImageEnd);
    }
    GuestSegment seg;
    seg.gpa = Gpa(p.paddr);
    seg.bytes.assign(file.begin() + p.offset, file.begin() + p.offset + p.filesz);
    seg.memory_size = p.memsz;
    out->push_back(std::move(seg));
  }
  if (out->empty()) return Error("{}: no loadable segments", path);
  return Status::Ok();
}

}  // namespace

Result<GuestImage> GuestImage::Load(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return ErrnoError(errno,
                      "guest image {} — pass an existing file with --guest, or build the "
                      "default guest (cmake --build <build dir>)",
                      path);
  }
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)),
                             std::istreambuf_iterator<char>());
  return Parse(bytes, path);
}

Result<GuestImage> GuestImage::Parse(std::span<const uint8_t> file, const std::string& path) {
  if (file.size() < EI_NIDENT || std::memcmp(file.data(), ELFMAG, SELFMAG) != 0) {
    return Error("{}: not an ELF file — the guest must be the multiboot ELF built from guest/",
                 path);
  }
  std::vector<Phdr> phdrs;
  if (file[EI_CLASS] == ELFCLASS64) {
    ASSIGN_OR_RETURN(phdrs, (ReadPhdrs<Elf64_Ehdr, Elf64_Phdr>(file, path)));
  } else if (file[EI_CLASS] == ELFCLASS32) {
    ASSIGN_OR_RETURN(phdrs, (ReadPhdrs<Elf32_Ehdr, Elf32_Phdr>(file, path)));
  } else {
    return Error("{}: unknown ELF class {}", path, file[EI_CLASS]);
  }

  GuestImage image;
  // The multiboot header: 4-byte aligned in the first 8 KiB, checksummed.
  size_t limit = std::min(file.size(), kMultibootSearch);
  for (size_t off = 0; off + 12 + sizeof(fl_image_header) <= limit; off += 4) {
    uint32_t magic = 0, flags = 0, checksum = 0;
    ReadAt(file, off, &magic);
    if (magic != kMultibootMagic) continue;
    ReadAt(file, off + 4, &flags);
    ReadAt(file, off + 8, &checksum);
    if (static_cast<uint32_t>(magic + flags + checksum) != 0) continue;
    // The Faultline header follows the multiboot header, whose length
    // depends on its flags (address fields with bit 16, video with bit 2).
    for (size_t hoff : {off + 12, off + 32, off + 48}) {
      fl_image_header header;
      if (!ReadAt(file, hoff, &header) || header.magic != FL_IMAGE_MAGIC) continue;
      if (header.version != FL_IMAGE_VERSION) {
        return Error("{}: guest ABI version {} but this VMM speaks version {} — rebuild the guest",
                     path, header.version, FL_IMAGE_VERSION);
      }
      if (header.entry64 < FL_IMAGE_BASE || header.entry64 >= header.image_end ||
          header.image_end > kMaxImageEnd) {
        return Error("{}: bad Faultline image header (entry64 {:#x}, image_end {:#x})", path,
                     header.entry64, header.image_end);
      }
      image.entry64_ = Gpa(header.entry64);
      image.image_end_ = Gpa(header.image_end);
      RETURN_IF_ERROR(LoadSegments(file, phdrs, path, &image.segments_));
      return image;
    }
    return Error("{}: multiboot header without a Faultline image header — not a Faultline guest",
                 path);
  }
  return Error("{}: no multiboot header in the first 8 KiB — not a Faultline guest", path);
}

Status GuestImage::CopyInto(std::span<uint8_t> ram) const {
  for (const GuestSegment& seg : segments_) {
    if (seg.gpa.value + seg.memory_size > ram.size()) {
      return Error("guest segment [{:#x}, +{:#x}) does not fit in {} MiB of RAM", seg.gpa.value,
                   seg.memory_size, ram.size() >> 20);
    }
    std::memcpy(ram.data() + seg.gpa.value, seg.bytes.data(), seg.bytes.size());
    std::memset(ram.data() + seg.gpa.value + seg.bytes.size(), 0,
                seg.memory_size - seg.bytes.size());
  }
  return Status::Ok();
}

}  // namespace faultline::vmm
