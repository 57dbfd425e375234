// Framed messages over a Channel: MessageWriter numbers and sends frames,
// MessageReader receives, checks and decodes them. A Link bundles a channel
// with its writer and reader, because the frame sequence numbers of a
// channel continue from the handshake into the migration.
//
// The receive path for pages copies each page once, from the socket to its
// final place: Read() returns a Pages message's header (block, pass and the
// validated index list) before any page data has been read; the caller then
// decides where each page goes (a guest page, or a scratch page for a page
// it must not overwrite) and ReceivePageData() reads the data straight there
// with one scatter receive.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "faultline/status.h"
#include "src/migration/transport.h"
#include "src/migration/wire.h"

namespace faultline::migration {

// Sends frames on one channel. One sending thread at a time.
class MessageWriter {
 public:
  explicit MessageWriter(Channel& channel) : channel_(channel) {}

  // Any message but a PagesHeader.
  Status Send(const Message& message);
  // One Pages message: `data[i]` is the 4 KiB of `header.pages[i]`.
  // The header, index list and every page go out in one gather write; the
  // page data is not copied in user space.
  Status SendPages(const PagesHeader& header, std::span<const ConstBuffer> data);

  // Any message but a PagesHeader, with descriptors attached to its frame
  // (Channel::SendWithFds: a unix: channel only).
  Status SendWithFds(const Message& message, std::span<const int> fds);

  uint64_t frames_sent() const { return next_seq_; }

 private:
  Channel& channel_;
  uint64_t next_seq_ = 0;
  std::vector<ConstBuffer> parts_;  // reused by SendPages
};

// Receives frames on one channel. One receiving thread at a time.
class MessageReader {
 public:
  explicit MessageReader(Channel& channel) : channel_(channel) {}

  // The session's block list, which page messages are checked against. Set
  // once the Hello is known; `blocks` must outlive the reader.
  void set_blocks(const std::vector<BlockInfo>* blocks) { context_.blocks = blocks; }

  // The next message, with its frame header checked (sync, type, length,
  // sequence number) and its payload decoded and validated. For a Pages
  // message, returns its PagesHeader; the caller must then consume the data
  // with ReceivePageData or DiscardPageData before calling Read again.
  // EAGAIN (nothing arrived within the channel's I/O timeout) leaves the
  // reader intact; Read may be called again.
  Result<Message> Read();
  // Read() for a message that may carry descriptors (at most `max_fds`,
  // Channel::ReceiveWithFds), which go to `fds`. Not for Pages messages.
  Result<Message> ReadWithFds(std::vector<sys::UniqueFd>& fds, size_t max_fds);

  // Receives the pending Pages message's data: page i into destinations[i],
  // each exactly kWirePageSize bytes, one per index of the header.
  Status ReceivePageData(std::span<const MutableBuffer> destinations);
  // Reads and drops the pending page data (a scratch page per page).
  Status DiscardPageData();

  bool page_data_pending() const { return pending_pages_ > 0; }
  // After Read() failed: true if the frame was received whole and only its
  // payload was refused (a bad index, say), so the next Read() may go on
  // with the next frame (a post-copy source rejects one bad page request
  // and keeps serving).
  bool last_error_left_stream_intact() const { return last_error_left_stream_intact_; }
  uint64_t frames_received() const { return next_seq_; }

 private:
  Result<Message> ReadPagesHeader(const FrameHeader& frame);
  // The rest of Read() once the frame header is in `raw`.
  Result<Message> ReadAfterHeader(std::span<const uint8_t, kFrameHeaderSize> raw);

  Channel& channel_;
  DecodeContext context_;
  uint64_t next_seq_ = 0;
  uint32_t pending_pages_ = 0;
  bool last_error_left_stream_intact_ = false;
  std::vector<uint8_t> payload_;  // reused; at most MaxPayload() of a non-page message
  std::vector<uint8_t> scratch_;  // one page, for DiscardPageData
};

// A channel with its framing state.
class Link {
 public:
  explicit Link(std::unique_ptr<Channel> channel)
      : channel_(std::move(channel)), writer_(*channel_), reader_(*channel_) {}
  Link(const Link&) = delete;
  Link& operator=(const Link&) = delete;

  Channel& channel() { return *channel_; }
  const Channel& channel() const { return *channel_; }
  MessageWriter& writer() { return writer_; }
  MessageReader& reader() { return reader_; }

 private:
  std::unique_ptr<Channel> channel_;  // declared first: writer_ and reader_ refer to it
  MessageWriter writer_;
  MessageReader reader_;
};

// Reads the next message, which must be a T. An Error message from the peer
// becomes an error Status quoting it; any other type is a protocol error
// naming what was expected.
template <typename T>
Result<T> Expect(MessageReader& reader, const char* context);

// The Status for an Error message received from the peer.
Status PeerError(const ErrorMessage& message);

template <typename T>
Result<T> Expect(MessageReader& reader, const char* context) {
  ASSIGN_OR_RETURN(Message message, reader.Read());
  if (auto* m = std::get_if<T>(&message)) return std::move(*m);
  if (auto* e = std::get_if<ErrorMessage>(&message)) return PeerError(*e);
  return Error("{}: expected {}, got {}", context, MessageTypeName(TypeOf(Message(T{}))),
               MessageTypeName(TypeOf(message)));
}

}  // namespace faultline::migration
