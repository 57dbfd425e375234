#include "src/vmm/test_port.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "guest/abi.h"

namespace faultline::vmm {
namespace {

template <typename T>
T As(std::span<const uint8_t> bytes) {
  T value;
  std::memcpy(&value, bytes.data(), sizeof(T));
  return value;
}

size_t ExpectedSize(uint16_t kind) {
  switch (kind) {
    case FL_REPORT_HELLO:
      return sizeof(fl_report_hello);
    case FL_REPORT_PHASE:
      return sizeof(fl_report_phase);
    case FL_REPORT_BAD_PAGE:
      return sizeof(fl_report_bad_page);
    case FL_REPORT_DONE:
      return sizeof(fl_report_done);
    case FL_REPORT_PANIC:
      return sizeof(fl_report_panic);
  }
  return 0;
}

}  // namespace

TestPort::TestPort(uint32_t vcpus, uint32_t tsc_khz, ReadMemory read, Observer observer)
    : read_(std::move(read)), observer_(std::move(observer)) {
  report_.vcpus.resize(vcpus);
  report_.tsc_khz = tsc_khz;
}

bool TestPort::Handles(uint16_t port) {
  return port == FL_PORT_REPORT || port == FL_PORT_COMMAND || port == FL_PORT_EXIT;
}

Status TestPort::Report(uint32_t vcpu, uint32_t gpa) {
  fl_report_header header;
  RETURN_IF_ERROR(read_(Gpa(gpa), {reinterpret_cast<uint8_t*>(&header), sizeof(header)}));
  if (header.magic != FL_REPORT_MAGIC) {
    return Error("vcpu {}: report at {:#x} has bad magic {:#x}", vcpu, gpa, header.magic);
  }
  size_t expected = ExpectedSize(header.kind);
  if (expected == 0 || header.size != expected) {
    return Error("vcpu {}: report at {:#x} of kind {} has size {} (expected {})", vcpu, gpa,
                 header.kind, header.size, expected);
  }
  if (header.vcpu != vcpu) {
    return Error("vcpu {}: report at {:#x} claims to come from vcpu {}", vcpu, gpa, header.vcpu);
  }
  std::vector<uint8_t> bytes(expected);
  RETURN_IF_ERROR(read_(Gpa(gpa), bytes));
  return HandleReport(vcpu, bytes);
}

Status TestPort::HandleReport(uint32_t vcpu, std::span<const uint8_t> bytes) {
  uint16_t kind = As<fl_report_header>(bytes).kind;
  GuestEvent event{GuestEvent::Kind::kHello, vcpu};
  GuestPhase phase;
  GuestBadPage bad;
  {
    sys::MutexLock lock(mu_);
    if (vcpu >= report_.vcpus.size()) return Error("report from unknown vcpu {}", vcpu);
    GuestVcpuReport& v = report_.vcpus[vcpu];
    switch (kind) {
      case FL_REPORT_HELLO: {
        auto r = As<fl_report_hello>(bytes);
        v.booted = true;
        v.region_start = Gpa(r.region_start);
        v.region_end = Gpa(r.region_end);
        v.pages = r.pages;
        v.first_page = Gpa(r.first_page_gpa);
        break;
      }
      case FL_REPORT_PHASE: {
        auto r = As<fl_report_phase>(bytes);
        phase.phase = r.phase;
        phase.generation = r.generation;
        phase.ops = r.ops;
        phase.pages_verified = r.pages_verified;
        phase.bad_pages = r.bad_pages;
        phase.cycles = r.tsc_end - r.tsc_start;
        phase.max_stall_cycles = r.max_stall_cycles;
        phase.checksum = r.checksum;
        std::copy(std::begin(r.hist), std::end(r.hist), phase.histogram.begin());
        phase.probe_ram = r.probe_ram;
        phase.probe_hole = r.probe_hole;
        phase.probe_bad = r.probe_bad;
        v.phases.push_back(phase);
        event.kind = GuestEvent::Kind::kPhase;
        event.phase = &phase;
        break;
      }
      case FL_REPORT_BAD_PAGE: {
        auto r = As<fl_report_bad_page>(bytes);
        bad = {vcpu,         Gpa(r.gpa),      r.expected_generation,
               r.word_index, r.expected_word, r.found_word};
        report_.bad_pages.push_back(bad);
        event.kind = GuestEvent::Kind::kBadPage;
        event.bad_page = &bad;
        break;
      }
      case FL_REPORT_DONE: {
        auto r = As<fl_report_done>(bytes);
        v.done = true;
        v.status = r.status;
        v.pages_verified = r.pages_verified;
        v.bad_pages = r.bad_pages;
        v.max_stall_cycles = r.max_stall_cycles;
        event.kind = GuestEvent::Kind::kDone;
        break;
      }
      case FL_REPORT_PANIC: {
        auto r = As<fl_report_panic>(bytes);
        v.panic =
            fmt::format("CPU exception {} (error code {:#x}) at rip {:#x}, rsp {:#x}, cr2 {:#x}",
                        r.vector, r.error_code, r.rip, r.rsp, r.cr2);
        event.kind = GuestEvent::Kind::kPanic;
        break;
      }
    }
  }
  if (observer_) observer_(event);
  return Status::Ok();
}

void TestPort::Exit(uint32_t vcpu, uint8_t code) {
  {
    sys::MutexLock lock(mu_);
    if (vcpu < report_.vcpus.size()) report_.vcpus[vcpu].exit_code = code;
  }
  if (observer_) observer_(GuestEvent{GuestEvent::Kind::kExit, vcpu});
}

GuestReport TestPort::Snapshot() const {
  sys::MutexLock lock(mu_);
  return report_;
}

}  // namespace faultline::vmm
