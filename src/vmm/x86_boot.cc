#include "src/vmm/x86_boot.h"

#include <cstring>

#include "guest/abi.h"

namespace faultline::vmm {
namespace {

constexpr uint64_t kPresent = 1ull << 0;
constexpr uint64_t kWritable = 1ull << 1;
constexpr uint64_t kUser = 1ull << 2;  // the workload runs at CPL3
constexpr uint64_t kLargePage = 1ull << 7;

constexpr uint64_t kCr0Pe = 1ull << 0, kCr0Mp = 1ull << 1, kCr0Et = 1ull << 4, kCr0Ne = 1ull << 5,
                   kCr0Wp = 1ull << 16, kCr0Pg = 1ull << 31;
constexpr uint64_t kCr4Pae = 1ull << 5, kCr4Osfxsr = 1ull << 9, kCr4Osxmmexcpt = 1ull << 10;
constexpr uint64_t kEferLme = 1ull << 8, kEferLma = 1ull << 10;

constexpr uint16_t kCodeSelector = 0x08, kDataSelector = 0x10;

// Multiboot v1 information (only the fields the guest reads).
struct MultibootInfo {
  uint32_t flags, mem_lower, mem_upper, boot_device, cmdline, mods_count, mods_addr;
  uint32_t syms[4];
  uint32_t mmap_length, mmap_addr;
};
struct [[gnu::packed]] MultibootMmapEntry {
  uint32_t size;  // of the rest of the entry
  uint64_t base, length;
  uint32_t type;  // 1 = RAM
};
constexpr uint32_t kMbInfoMem = 1u << 0, kMbInfoCmdline = 1u << 2, kMbInfoMmap = 1u << 6;

template <typename T>
void Put(std::span<uint8_t> ram, uint64_t gpa, const T& value) {
  std::memcpy(ram.data() + gpa, &value, sizeof(T));
}

}  // namespace

Status WriteBootStructures(std::span<uint8_t> ram, uint64_t ram_end, std::string_view cmdline) {
  uint64_t gib = AlignUp(ram_end, 1ull << 30) >> 30;
  if (gib > FL_MAX_RAM_GIB) {
    return Error("{} GiB of RAM: the guest's page tables cover at most {} GiB", gib,
                 FL_MAX_RAM_GIB);
  }
  if (cmdline.size() >= FL_CMDLINE_MAX) {
    return Error("guest command line is {} bytes; at most {}", cmdline.size(), FL_CMDLINE_MAX - 1);
  }

  // Page tables: PML4 -> one PDPT -> one page directory per GiB, 2 MiB pages.
  const uint64_t pml4 = FL_PAGE_TABLES_GPA, pdpt = pml4 + kPageSize, pd0 = pdpt + kPageSize;
  std::memset(ram.data() + pml4, 0, (2 + gib) * kPageSize);
  Put(ram, pml4, pdpt | kPresent | kWritable | kUser);
  for (uint64_t g = 0; g < gib; ++g) {
    uint64_t pd = pd0 + g * kPageSize;
    Put(ram, pdpt + g * 8, pd | kPresent | kWritable | kUser);
    for (uint64_t i = 0; i < 512; ++i) {
      uint64_t phys = (g << 30) | (i << 21);
      Put(ram, pd + i * 8, phys | kPresent | kWritable | kUser | kLargePage);
    }
  }

  // Boot GDT: null, 64-bit code, flat data. The guest replaces it at once.
  Put(ram, FL_BOOT_GDT_GPA, uint64_t{0});
  Put(ram, FL_BOOT_GDT_GPA + kCodeSelector, uint64_t{0x00af9b000000ffff});
  Put(ram, FL_BOOT_GDT_GPA + kDataSelector, uint64_t{0x00cf93000000ffff});

  std::memset(ram.data() + FL_CMDLINE_GPA, 0, FL_CMDLINE_MAX);
  std::memcpy(ram.data() + FL_CMDLINE_GPA, cmdline.data(), cmdline.size());

  MultibootMmapEntry mmap[2] = {
      {20, 0, 0x9fc00, 1},
      {20, 0x100000, ram_end - 0x100000, 1},
  };
  std::memcpy(ram.data() + FL_BOOT_MMAP_GPA, mmap, sizeof(mmap));
  MultibootInfo info{};
  info.flags = kMbInfoMem | kMbInfoCmdline | kMbInfoMmap;
  info.mem_lower = 639;
  info.mem_upper = static_cast<uint32_t>((ram_end - 0x100000) >> 10);
  info.cmdline = static_cast<uint32_t>(FL_CMDLINE_GPA);
  info.mmap_length = sizeof(mmap);
  info.mmap_addr = static_cast<uint32_t>(FL_BOOT_MMAP_GPA);
  Put(ram, FL_BOOT_INFO_GPA, info);
  return Status::Ok();
}

void SetupLongModeEntry(hv::VcpuState& s, uint64_t entry64, uint32_t index, uint32_t count) {
  hv::Segment code;
  code.base = 0;
  code.limit = 0xffffffff;
  code.selector = kCodeSelector;
  code.type = 0xb;  // execute/read, accessed
  code.present = 1;
  code.s = 1;
  code.l = 1;
  code.g = 1;
  hv::Segment data = code;
  data.selector = kDataSelector;
  data.type = 0x3;  // read/write, accessed
  data.l = 0;
  data.db = 1;
  s.cs = code;
  s.ds = s.es = s.fs = s.gs = s.ss = data;

  hv::Segment tr;
  tr.limit = 0x67;
  tr.type = 0xb;  // busy 64-bit TSS
  tr.present = 1;
  s.tr = tr;
  hv::Segment ldt;
  ldt.unusable = 1;
  s.ldt = ldt;

  s.gdt = {FL_BOOT_GDT_GPA, 3 * 8 - 1};
  s.idt = {0, 0};
  s.cr0 = kCr0Pe | kCr0Mp | kCr0Et | kCr0Ne | kCr0Wp | kCr0Pg;
  s.cr3 = FL_PAGE_TABLES_GPA;
  s.cr4 = kCr4Pae | kCr4Osfxsr | kCr4Osxmmexcpt;
  s.efer = kEferLme | kEferLma;

  s.gpr = {};
  s.rip = entry64;
  s.rflags = 0x2;
  s.gpr[hv::kRdi] = FL_BOOT_INFO_GPA;
  s.gpr[hv::kRsi] = index;
  s.gpr[hv::kRdx] = count;
}

std::string ExceptionName(uint8_t vector) {
  static constexpr const char* kNames[] = {
      "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "coprocessor overrun",
      "#TS", "#NP", "#SS", "#GP", "#PF", "reserved", "#MF", "#AC", "#MC", "#XM",
      "#VE", "#CP"};
  if (vector < std::size(kNames)) return kNames[vector];
  return fmt::format("vector {}", vector);
}

}  // namespace faultline::vmm
