#include "src/hypervisor/hypervisor.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "src/hypervisor/kvm_machine.h"
#include "src/hypervisor/tcg_machine.h"

namespace faultline::hv {

const char* AccelName(Accel accel) { return accel == Accel::kKvm ? "kvm" : "tcg"; }

const char* AccelChoiceName(AccelChoice choice) {
  switch (choice) {
    case AccelChoice::kKvm:
      return "kvm";
    case AccelChoice::kTcg:
      return "tcg";
    case AccelChoice::kAuto:
      break;
  }
  return "auto";
}

Result<AccelChoice> ParseAccel(std::string_view text) {
  if (text == "auto") return AccelChoice::kAuto;
  if (text == "kvm") return AccelChoice::kKvm;
  if (text == "tcg") return AccelChoice::kTcg;
  return Error(
      "unknown accelerator '{}' — use auto (KVM when /dev/kvm opens, else the software CPU), "
      "kvm or tcg",
      text);
}

AccelProbe ProbeAccel() {
  const int fd = ::open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (fd >= 0) {
    ::close(fd);
    return {Accel::kKvm, ""};
  }
  return {Accel::kTcg, fmt::format("/dev/kvm: {}", std::strerror(errno))};
}

Result<std::unique_ptr<Vm>> CreateVm(const VmOptions& options) {
  switch (options.accel) {
    case AccelChoice::kKvm:
      return CreateKvmVm(options);
    case AccelChoice::kTcg:
      return CreateTcgVm(options);
    case AccelChoice::kAuto:
      break;
  }
  AccelProbe probe = ProbeAccel();
  if (probe.accel == Accel::kKvm) return CreateKvmVm(options);
  if (options.on_fallback) options.on_fallback(probe.why);
  return CreateTcgVm(options);
}

}  // namespace faultline::hv
