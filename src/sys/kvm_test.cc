#include "src/sys/kvm.h"

#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <string>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace faultline::sys {
namespace {

using ::testing::HasSubstr;

TEST(KvmSystemTest, MissingDeviceSaysWhatToDo) {
  Result<KvmSystem> kvm = KvmSystem::Open("/nonexistent/kvm");
  ASSERT_FALSE(kvm.has_value());
  EXPECT_THAT(kvm.error().ToString(), HasSubstr("no KVM device"));
  EXPECT_THAT(kvm.error().ToString(), HasSubstr("modprobe"));
}

// As an unprivileged user (a child that drops to nobody), /dev/kvm (0600
// root) is refused with a message that says how to get access.
TEST(KvmSystemTest, PermissionDeniedSaysWhatToDo) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root to drop privileges";
  if (access("/dev/kvm", F_OK) != 0) GTEST_SKIP() << "needs /dev/kvm (this machine has none)";
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    close(fds[0]);
    if (setgid(65534) != 0 || setuid(65534) != 0) _exit(2);
    Result<KvmSystem> kvm = KvmSystem::Open("/dev/kvm");
    std::string message = kvm.has_value() ? "opened" : kvm.error().ToString();
    (void)!write(fds[1], message.data(), message.size());
    _exit(0);
  }
  close(fds[1]);
  char buffer[512] = {};
  ssize_t n = read(fds[0], buffer, sizeof(buffer) - 1);
  close(fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_GT(n, 0);
  std::string message(buffer, n);
  if (message == "opened") GTEST_SKIP() << "/dev/kvm is open to everyone here";
  EXPECT_THAT(message, HasSubstr("permission denied"));
  EXPECT_THAT(message, HasSubstr("run as root or add the user to group kvm"));
}

TEST(KvmVcpuTest, RegistersAndCapabilities) {
  if (access("/dev/kvm", F_OK) != 0) {
    GTEST_SKIP() << "needs /dev/kvm (this machine has none; the software CPU is tested in "
                    "src/hypervisor)";
  }
  Result<KvmSystem> kvm = KvmSystem::Open();
  ASSERT_TRUE(kvm.has_value()) << kvm.error().ToString();
  Result<std::vector<kvm_cpuid_entry2>> cpuid = kvm->SupportedCpuid();
  ASSERT_TRUE(cpuid.has_value()) << cpuid.error().ToString();
  EXPECT_GT(cpuid->size(), 4u);
  Result<std::vector<uint32_t>> msrs = kvm->MsrIndexList();
  ASSERT_TRUE(msrs.has_value()) << msrs.error().ToString();
  EXPECT_GT(msrs->size(), 4u);

  Result<KvmVm> vm = kvm->CreateVm();
  ASSERT_TRUE(vm.has_value()) << vm.error().ToString();
  Result<KvmVcpu> vcpu = vm->CreateVcpu(0);
  ASSERT_TRUE(vcpu.has_value()) << vcpu.error().ToString();
  ASSERT_TRUE(vcpu->SetCpuid(*cpuid).ok());
  Result<kvm_regs> regs = vcpu->GetRegs();
  ASSERT_TRUE(regs.has_value());
  regs->rbx = 0x1234'5678'9abc'def0;
  regs->rip = 0x100000;
  ASSERT_TRUE(vcpu->SetRegs(*regs).ok());
  EXPECT_EQ(vcpu->GetRegs()->rbx, 0x1234'5678'9abc'def0u);
  EXPECT_EQ(vcpu->GetRegs()->rip, 0x100000u);
  Result<uint32_t> khz = vcpu->GetTscKhz();
  ASSERT_TRUE(khz.has_value());
  EXPECT_GT(*khz, 0u);

  // MSR_IA32_TSC (0x10): a restored TSC must never run backwards. (PVM
  // ignores the write and every VM reads the host's TSC, which is monotonic
  // too; with VMX the read-back would be the value written plus elapsed time.)
  MsrEntry before{0x10, 0};
  ASSERT_EQ(*vcpu->GetMsrs({&before, 1}), 1u);
  MsrEntry tsc{0x10, before.data + (1ull << 30)};
  ASSERT_EQ(*vcpu->SetMsrs({&tsc, 1}), 1u);
  MsrEntry read{0x10, 0};
  ASSERT_EQ(*vcpu->GetMsrs({&read, 1}), 1u);
  EXPECT_GE(read.data, before.data);

  // A bad slot is an error naming the ioctl and the slot.
  UserMemoryRegion bad{.slot = 7, .gpa = Gpa(0x1001), .size = 4096, .hva = Hva(uint64_t{0x1000})};
  Status s = vm->SetUserMemoryRegion(bad);
  EXPECT_THAT(s.ToString(), HasSubstr("KVM_SET_USER_MEMORY_REGION slot 7"));
  EXPECT_THAT(s.ToString(), HasSubstr("Invalid argument"));
  EXPECT_STREQ(KvmExitName(KVM_EXIT_MMIO), "KVM_EXIT_MMIO");
}

}  // namespace
}  // namespace faultline::sys
