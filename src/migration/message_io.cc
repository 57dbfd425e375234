#include "src/migration/message_io.h"

#include <cerrno>

namespace faultline::migration {

Status MessageWriter::Send(const Message& message) {
  if (std::holds_alternative<PagesHeader>(message)) {
    return Error("MessageWriter::Send: Pages messages go through SendPages");
  }
  const std::vector<uint8_t> frame = EncodeFrame(message, next_seq_);
  RETURN_IF_ERROR(channel_.Send(frame));
  ++next_seq_;
  return Status::Ok();
}

Status MessageWriter::SendWithFds(const Message& message, std::span<const int> fds) {
  if (std::holds_alternative<PagesHeader>(message)) {
    return Error("MessageWriter::SendWithFds: Pages messages go through SendPages");
  }
  const std::vector<uint8_t> frame = EncodeFrame(message, next_seq_);
  RETURN_IF_ERROR(channel_.SendWithFds(frame, fds));
  ++next_seq_;
  return Status::Ok();
}

Status MessageWriter::SendPages(const PagesHeader& header, std::span<const ConstBuffer> data) {
  if (data.size() != header.pages.size()) {
    return Error("SendPages: {} page buffers for {} indices", data.size(), header.pages.size());
  }
  const std::vector<uint8_t> prefix = EncodePagesPrefix(header, next_seq_);
  parts_.clear();
  parts_.push_back(prefix);
  for (const ConstBuffer& page : data) {
    if (page.size() != kWirePageSize) {
      return Error("SendPages: a {}-byte buffer for a {}-byte page", page.size(), kWirePageSize);
    }
    parts_.push_back(page);
  }
  RETURN_IF_ERROR(channel_.SendGather(parts_));
  ++next_seq_;
  return Status::Ok();
}

namespace {

// The peer closed the stream inside a message (ECONNRESET after some of its
// bytes): a protocol error (EPROTO) saying that the message was truncated,
// and which. ECONNRESET stays for a stream closed between messages.
Status InsideMessage(Status status, MessageType type) {
  if (status.ok() || status.code() != ECONNRESET) return status;
  return Status(EPROTO,
                fmt::format("truncated {} message ({})", MessageTypeName(type), status.message()));
}

}  // namespace

Result<Message> MessageReader::Read() {
  last_error_left_stream_intact_ = false;
  if (pending_pages_ > 0) {
    return Error("MessageReader::Read: the data of the previous Pages message was not consumed");
  }
  uint8_t raw[kFrameHeaderSize];
  RETURN_IF_ERROR(channel_.Receive(raw));
  return ReadAfterHeader(raw);
}

Result<Message> MessageReader::ReadWithFds(std::vector<sys::UniqueFd>& fds, size_t max_fds) {
  last_error_left_stream_intact_ = false;
  if (pending_pages_ > 0) {
    return Error("MessageReader::Read: the data of the previous Pages message was not consumed");
  }
  uint8_t raw[kFrameHeaderSize];
  ASSIGN_OR_RETURN(fds, channel_.ReceiveWithFds(raw, max_fds));
  Result<Message> message = ReadAfterHeader(raw);
  if (message.has_value() && std::holds_alternative<PagesHeader>(*message)) {
    return Error("MessageReader::ReadWithFds: a Pages message where descriptors may come");
  }
  return message;
}

Result<Message> MessageReader::ReadAfterHeader(std::span<const uint8_t, kFrameHeaderSize> raw) {
  ASSIGN_OR_RETURN(FrameHeader frame, DecodeFrameHeader(raw));
  if (frame.seq != next_seq_) {
    return Error("{}: frame sequence number {}, expected {} (frames lost, repeated or reordered)",
                 MessageTypeName(frame.type), frame.seq, next_seq_);
  }
  ++next_seq_;
  if (frame.type == MessageType::kPages) return ReadPagesHeader(frame);
  // DecodeFrameHeader bounded frame.length by MaxPayload(type) (at most a
  // few MiB), so this allocation is bounded too.
  payload_.resize(frame.length);
  RETURN_IF_ERROR(InsideMessage(channel_.Receive(payload_), frame.type));
  Result<Message> message = DecodePayload(frame.type, payload_, context_);
  // The whole frame was read: the stream is still aligned on a frame boundary.
  last_error_left_stream_intact_ = !message.has_value();
  return message;
}

Result<Message> MessageReader::ReadPagesHeader(const FrameHeader& frame) {
  uint8_t fixed[kPagesFixedSize];
  RETURN_IF_ERROR(InsideMessage(channel_.Receive(fixed), MessageType::kPages));
  ASSIGN_OR_RETURN(
      PagesPrefix prefix,
      DecodePagesFixed(std::span<const uint8_t, kPagesFixedSize>(fixed), frame.length, context_));
  payload_.resize(prefix.index_bytes());  // at most 4 * kMaxPagesPerBatch
  RETURN_IF_ERROR(InsideMessage(channel_.Receive(payload_), MessageType::kPages));
  ASSIGN_OR_RETURN(PagesHeader header, DecodePagesIndices(prefix, payload_, context_));
  pending_pages_ = prefix.count;
  return header;
}

Status MessageReader::ReceivePageData(std::span<const MutableBuffer> destinations) {
  if (destinations.size() != pending_pages_) {
    return Error("ReceivePageData: {} destinations for {} pending pages", destinations.size(),
                 pending_pages_);
  }
  for (const MutableBuffer& d : destinations) {
    if (d.size() != kWirePageSize) {
      return Error("ReceivePageData: a {}-byte destination for a {}-byte page", d.size(),
                   kWirePageSize);
    }
  }
  pending_pages_ = 0;  // whatever happens next, the frame is over for this reader
  return InsideMessage(channel_.ReceiveScatter(destinations), MessageType::kPages);
}

Status MessageReader::DiscardPageData() {
  // One scratch page reused for every page: a single scatter receive.
  scratch_.resize(kWirePageSize);
  std::vector<MutableBuffer> sink(pending_pages_, MutableBuffer(scratch_));
  pending_pages_ = 0;
  RETURN_IF_ERROR(InsideMessage(channel_.ReceiveScatter(sink), MessageType::kPages));
  return Status::Ok();
}

Status PeerError(const ErrorMessage& message) {
  return Error("peer reported error (code {}): {}", static_cast<uint32_t>(message.code),
               message.text);
}

}  // namespace faultline::migration
