#include "src/migration/handshake.h"

#include <cerrno>

namespace faultline::migration {

void Session::Shutdown() {
  if (main) main->channel().Shutdown();
  for (auto& link : pages) {
    if (link) link->channel().Shutdown();
  }
}

ChannelStats Session::stats() const {
  ChannelStats sum;
  auto add = [&sum](const Link* link) {
    if (link == nullptr) return;
    const ChannelStats s = link->channel().stats();
    sum.bytes_sent += s.bytes_sent;
    sum.bytes_received += s.bytes_received;
    sum.send_calls += s.send_calls;
    sum.receive_calls += s.receive_calls;
  };
  add(main.get());
  for (const auto& link : pages) add(link.get());
  return sum;
}

Status SendError(Link& link, ErrorCode code, Status status) {
  (void)link.writer().Send(ErrorMessage{code, status.ToString()});
  return status;
}

namespace {

// The source's checks of the destination's answer.
Status CheckAck(const Hello& hello, const HelloAck& ack, const AuthKey& key) {
  if (ack.session_id != hello.session_id) {
    return Error("HelloAck for session {:#x}, expected {:#x}", ack.session_id, hello.session_id);
  }
  if (ack.version < hello.min_version || ack.version > hello.max_version) {
    return Error("HelloAck chose protocol version {}, outside the offered {}..{}", ack.version,
                 hello.min_version, hello.max_version);
  }
  if (ack.page_channels != hello.page_channels) {
    return Error("HelloAck: {} page channels, {} were asked for", ack.page_channels,
                 hello.page_channels);
  }
  if ((ack.features & ~hello.features_offered) != 0) {
    return Error("HelloAck accepted features {:#x} that were not offered",
                 ack.features & ~hello.features_offered);
  }
  if ((hello.features_required & ~ack.features) != 0) {
    return Error("the destination did not accept required features {:#x}",
                 hello.features_required & ~ack.features);
  }
  if ((ack.features & kFeatureAuth) && !MacEqual(ack.mac, DestinationProof(key, hello, ack))) {
    return Error(
        "authentication failed: the destination's proof does not match (different "
        "keys?)");
  }
  return Status::Ok();
}

}  // namespace

Result<Session> ConnectSession(Connector& connector, const SourceSessionOptions& options) {
  RETURN_IF_ERROR(ValidateBlocks(options.blocks));
  if (options.page_channels == 0 || options.page_channels > kMaxPageChannels) {
    return Error("{} page channels (1 to {} allowed)", options.page_channels, kMaxPageChannels);
  }
  Session session;
  Hello& hello = session.hello;
  hello.page_channels = options.page_channels;
  hello.blocks = options.blocks;
  hello.features_offered = options.extra_features;
  hello.hello_flags = static_cast<uint32_t>(options.accel);
  if (!options.key.empty()) {
    RETURN_IF_ERROR(ValidateKey(options.key));
    hello.features_offered |= kFeatureAuth;
    hello.features_required |= kFeatureAuth;
  }
  ASSIGN_OR_RETURN(hello.session_id, RandomSessionId());
  ASSIGN_OR_RETURN(hello.nonce, RandomNonce());

  session.blocks = std::make_shared<const std::vector<BlockInfo>>(options.blocks);

  ASSIGN_OR_RETURN(auto main_channel, connector.Connect());
  session.main = std::make_unique<Link>(std::move(main_channel));
  Link& main = *session.main;
  RETURN_IF_ERROR(main.channel().SetLowLatency(true));
  main.reader().set_blocks(session.blocks.get());
  RETURN_IF_ERROR(main.writer().Send(hello));
  Result<HelloAck> answered = Expect<HelloAck>(main.reader(), "handshake");
  if (!answered.has_value() && answered.error().code() == ECONNRESET) {
    return answered.error().WithContext(
        "the destination hung up on the Hello (a destination that requires TLS does so to a "
        "plaintext source: check --tls-dir on both ends)");
  }
  ASSIGN_OR_RETURN(session.ack, std::move(answered));
  const HelloAck& ack = session.ack;
  if (Status s = CheckAck(hello, ack, options.key); !s.ok()) {
    return SendError(main, (ack.features & kFeatureAuth) ? ErrorCode::kAuth : ErrorCode::kProtocol,
                     std::move(s));
  }
  const bool auth = (ack.features & kFeatureAuth) != 0;
  if (auth) RETURN_IF_ERROR(main.writer().Send(Auth{SourceProof(options.key, hello, ack)}));

  // Page channels: dial all, then collect the acks, so that the
  // destination's accept loop and the dialling overlap.
  for (uint16_t i = 0; i < options.page_channels; ++i) {
    Result<std::unique_ptr<Channel>> channel = connector.Connect();
    if (!channel) {
      return SendError(main, ErrorCode::kResource,
                       channel.error().WithContext(fmt::format("page channel {}", i)));
    }
    auto link = std::make_unique<Link>(std::move(*channel));
    link->reader().set_blocks(session.blocks.get());
    ChannelHello bind{hello.session_id, i, ChannelKind::kPage, {}};
    if (auth) {
      bind.mac = ChannelProof(options.key, hello.session_id, i, ChannelKind::kPage, hello.nonce,
                              ack.nonce);
    }
    RETURN_IF_ERROR(link->writer().Send(bind).WithContext(fmt::format("page channel {}", i)));
    session.pages.push_back(std::move(link));
  }
  for (uint16_t i = 0; i < options.page_channels; ++i) {
    Result<ChannelAck> bound = Expect<ChannelAck>(session.pages[i]->reader(), "page channel bind");
    if (!bound) return bound.error().WithContext(fmt::format("page channel {}", i));
    if (bound->session_id != hello.session_id || bound->index != i) {
      return SendError(main, ErrorCode::kProtocol,
                       Error("page channel {}: ChannelAck for session {:#x} channel {}", i,
                             bound->session_id, bound->index));
    }
  }
  return session;
}

Result<Session> AcceptSession(Acceptor& acceptor, SessionReceiver& receiver,
                              const AcceptOptions& options) {
  Session session;
  int strays = 0;
  auto stray = [&](Status why) -> Status {
    if (++strays > options.max_stray_connections) {
      return why.WithContext(
          fmt::format("giving up after {} connections that were not part of "
                      "the session; last one",
                      strays));
    }
    return Status::Ok();
  };

  // The main channel: the first connection that opens with a Hello.
  while (!session.main) {
    ASSIGN_OR_RETURN(auto channel, acceptor.Accept(options.timeout));
    auto link = std::make_unique<Link>(std::move(channel));
    Result<Message> first = link->reader().Read();
    const Hello* hello = first ? std::get_if<Hello>(&*first) : nullptr;
    if (hello == nullptr) {
      RETURN_IF_ERROR(stray(
          first ? Error("connection opened with {}, not Hello", MessageTypeName(TypeOf(*first)))
                : first.error()));
      continue;
    }
    if (Status s = receiver.OnMessage(*first); !s.ok()) {
      return SendError(*link, receiver.error_code(), std::move(s).WithContext("handshake"));
    }
    session.main = std::move(link);
  }
  Link& main = *session.main;
  session.hello = receiver.hello();
  session.ack = receiver.ack();
  session.blocks = std::make_shared<const std::vector<BlockInfo>>(receiver.blocks());
  main.reader().set_blocks(session.blocks.get());
  RETURN_IF_ERROR(main.channel().SetLowLatency(true));
  RETURN_IF_ERROR(main.writer().Send(session.ack));
  if (receiver.phase() == ReceiverPhase::kAwaitAuth) {
    ASSIGN_OR_RETURN(Message auth, main.reader().Read());
    if (Status s = receiver.OnMessage(auth); !s.ok()) {
      return SendError(main, receiver.error_code(), std::move(s).WithContext("handshake"));
    }
  }

  session.pages.resize(session.hello.page_channels);
  while (!receiver.all_channels_bound()) {
    ASSIGN_OR_RETURN(auto channel, acceptor.Accept(options.timeout));
    auto link = std::make_unique<Link>(std::move(channel));
    link->reader().set_blocks(session.blocks.get());
    Result<ChannelHello> hello = Expect<ChannelHello>(link->reader(), "new channel");
    Result<ChannelAck> ack =
        hello ? receiver.BindChannel(*hello) : Result<ChannelAck>(hello.error());
    if (!ack) {
      // Tell the peer on that connection; the session itself is unharmed
      // unless there are too many of these.
      (void)link->writer().Send(ErrorMessage{ErrorCode::kProtocol, ack.error().ToString()});
      if (Status s = stray(ack.error()); !s.ok()) return SendError(main, ErrorCode::kProtocol, s);
      continue;
    }
    RETURN_IF_ERROR(link->writer().Send(*ack));
    session.pages[ack->index] = std::move(link);
  }
  return session;
}

}  // namespace faultline::migration
