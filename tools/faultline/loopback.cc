#include "tools/faultline/loopback.h"

#include <chrono>
#include <ctime>
#include <memory>
#include <span>
#include <thread>

#include "src/migration/socket_transport.h"

namespace faultline::cli {

using Clock = std::chrono::steady_clock;

double ProcessCpuMs() {
  return std::chrono::duration<double, std::milli>(
             std::chrono::nanoseconds(std::clock() * (1'000'000'000 / CLOCKS_PER_SEC)))
      .count();
}

Result<LoopbackRate> MeasureLoopback(uint64_t bytes) {
  const migration::Address any_port{"tcp", "127.0.0.1", 0};
  ASSIGN_OR_RETURN(std::unique_ptr<migration::SocketListener> listener,
                   migration::SocketListener::Listen(any_port, migration::TransportOptions()));
  migration::SocketConnector connector({"tcp", "127.0.0.1", listener->port()}, {});
  Result<std::unique_ptr<migration::Channel>> accepted = Error("not accepted");
  std::thread acceptor([&] { accepted = listener->Accept(std::chrono::seconds(10)); });
  Result<std::unique_ptr<migration::Channel>> dialled = connector.Connect();
  acceptor.join();
  if (!dialled.has_value()) return dialled.error();
  if (!accepted.has_value()) return accepted.error();
  constexpr size_t kChunk = 1 << 20;
  const double cpu_start = ProcessCpuMs();
  auto start = Clock::now();
  Status receive_status = Status::Ok();
  std::thread receiver([&] {
    std::vector<uint8_t> buffer(kChunk);
    for (uint64_t got = 0; got < bytes && receive_status.ok(); got += kChunk) {
      receive_status = (*accepted)->Receive(std::span(buffer));
    }
  });
  std::vector<uint8_t> data(kChunk, 0x5a);
  Status send_status = Status::Ok();
  for (uint64_t sent = 0; sent < bytes && send_status.ok(); sent += kChunk) {
    send_status = (*dialled)->Send(std::span<const uint8_t>(data));
  }
  receiver.join();
  RETURN_IF_ERROR(send_status);
  RETURN_IF_ERROR(receive_status);
  double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  const double gib = static_cast<double>(bytes) / (1ull << 30);
  return LoopbackRate{static_cast<double>(bytes) / seconds, (ProcessCpuMs() - cpu_start) / gib};
}

LoopbackRate Mean(const std::vector<LoopbackRate>& runs) {
  return LoopbackRate{(runs[0].bytes_per_sec + runs[1].bytes_per_sec) / 2,
                      (runs[0].cpu_ms_per_gib + runs[1].cpu_ms_per_gib) / 2};
}

}  // namespace faultline::cli
