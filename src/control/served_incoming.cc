#include "src/control/served_incoming.h"

#include <utility>

#include "src/migration/memory_vm.h"

namespace faultline::control {

// What the migration engines see of this VM: its state is dropped, its start
// makes the memory servable, and the post-copy pager it is handed serves
// the page server's fetches.
class ServedIncomingVm::Control final : public migration::VmControl {
 public:
  explicit Control(ServedIncomingVm& vm) : vm_(vm) {}

  uint32_t vcpu_count() const override { return 0; }  // takes any count
  void Pause() override {}
  void Resume() override {}
  Result<std::vector<std::vector<uint8_t>>> SaveVcpus() override {
    return Error("serve-pages: the guest runs in the VMMs it serves, not here");
  }
  // The state runs nowhere here (see the header).
  Status LoadVcpus(std::span<const std::vector<uint8_t>>) override { return Status::Ok(); }
  Result<std::vector<migration::DeviceBlob>> SaveDevices() override {
    return Error("serve-pages: the guest runs in the VMMs it serves, not here");
  }
  Status LoadDevices(std::span<const migration::DeviceBlob>) override { return Status::Ok(); }
  bool memory_is_zero() const override { return true; }
  void AttachPager(paging::GuestPager* pager) override { vm_.AttachPager(pager); }
  Status PrepareVcpus(paging::GuestPager&) override { return Status::Ok(); }
  Status Start() override {
    vm_.Servable();
    return Status::Ok();
  }

 private:
  ServedIncomingVm& vm_;
};

Result<std::unique_ptr<ServedIncomingVm>> ServedIncomingVm::Create(
    std::vector<RamBlockOptions> blocks, std::function<void()> on_servable) {
  if (blocks.empty()) return Error("serve-pages: no memory to receive");
  std::unique_ptr<ServedIncomingVm> vm(new ServedIncomingVm(std::move(on_servable)));
  // No dirty tracking runs here; the one mode that needs no accelerator.
  GuestMemoryOptions options;
  options.dirty_mode = DirtyLogMode::kUffdWp;
  ASSIGN_OR_RETURN(vm->memory_, GuestMemory::Create(&vm->backend_, options));
  Gpa next(0);
  for (const RamBlockOptions& block_options : blocks) {
    ASSIGN_OR_RETURN(std::shared_ptr<RamBlock> block, RamBlock::Create(block_options));
    const uint64_t align = block->page_size();
    next = Gpa((next.value + align - 1) / align * align);
    RETURN_IF_ERROR(vm->memory_->Place(block, next));
    vm->bases_.push_back(next);
    vm->blocks_.push_back(std::move(block));
    next = next + block_options.size;
  }
  return vm;
}

ServedIncomingVm::~ServedIncomingVm() = default;

std::unique_ptr<migration::DestinationVm> ServedIncomingVm::MakeDestination() {
  return migration::MakeMemoryDestination(*memory_, std::make_unique<Control>(*this));
}

std::unique_ptr<migration::PostcopyDestinationVm> ServedIncomingVm::MakePostcopyDestination(
    migration::PostcopyVmOptions options) {
  return migration::MakeMemoryPostcopyDestination(*memory_, std::make_unique<Control>(*this),
                                                  std::move(options));
}

Status ServedIncomingVm::Start() {
  Servable();
  return Status::Ok();
}

void ServedIncomingVm::Servable() {
  {
    sys::WriterLock lock(pager_mu_);
    if (served_) return;
    served_ = true;
  }
  if (on_servable_) on_servable_();
}

void ServedIncomingVm::AttachPager(paging::GuestPager* pager) {
  sys::WriterLock lock(pager_mu_);
  pager_ = pager;
}

Status ServedIncomingVm::EnsurePresent(uint32_t block, uint64_t offset, uint64_t length) {
  sys::ReaderLock lock(pager_mu_);
  if (!served_) {
    return Error(
        "serve-pages: the guest's memory has not arrived yet (the migration has not "
        "reached its switchover)");
  }
  if (pager_ == nullptr) return Status::Ok();  // pre-copy: everything is here
  return pager_->EnsurePresent(bases_[block] + offset, length);
}

Result<std::shared_ptr<const migration::ServedMemory>> ServedIncomingVm::Served() {
  return migration::ServedMemory::FromBlocks(
      blocks_, [this](uint32_t block, uint64_t offset, uint64_t length) {
        return EnsurePresent(block, offset, length);
      });
}

}  // namespace faultline::control
