#include "src/migration/postcopy_session.h"

namespace faultline::migration {

Result<std::unique_ptr<Link>> ConnectPriorityChannel(Connector& connector, const Session& session,
                                                     const AuthKey& key) {
  ASSIGN_OR_RETURN(auto channel, connector.Connect());
  auto link = std::make_unique<Link>(std::move(channel));
  RETURN_IF_ERROR(link->channel().SetLowLatency(true));
  link->reader().set_blocks(session.blocks.get());
  ChannelHello bind{session.hello.session_id, 0, ChannelKind::kPriority, {}};
  if (session.ack.features & kFeatureAuth) {
    bind.mac = ChannelProof(key, bind.session_id, 0, ChannelKind::kPriority, session.hello.nonce,
                            session.ack.nonce);
  }
  RETURN_IF_ERROR(link->writer().Send(bind).WithContext("priority channel"));
  ASSIGN_OR_RETURN(ChannelAck ack, Expect<ChannelAck>(link->reader(), "priority channel bind"));
  if (ack.session_id != bind.session_id || ack.kind != ChannelKind::kPriority) {
    return Error("priority channel: ChannelAck for session {:#x} kind {}", ack.session_id,
                 static_cast<int>(ack.kind));
  }
  return link;
}

Result<std::unique_ptr<Link>> AcceptPriorityChannel(Acceptor& acceptor, const Session& session,
                                                    const AuthKey& key,
                                                    std::chrono::milliseconds timeout,
                                                    int max_strays) {
  for (int strays = 0;; ++strays) {
    ASSIGN_OR_RETURN(auto channel, acceptor.Accept(timeout));
    auto link = std::make_unique<Link>(std::move(channel));
    link->reader().set_blocks(session.blocks.get());
    Result<ChannelHello> hello = Expect<ChannelHello>(link->reader(), "priority channel");
    Status why;
    if (!hello) {
      why = hello.error();
    } else if (hello->session_id != session.hello.session_id) {
      why = Error("ChannelHello for session {:#x}, but this session is {:#x}", hello->session_id,
                  session.hello.session_id);
    } else if (hello->kind != ChannelKind::kPriority || hello->index != 0) {
      why = Error("ChannelHello: expected the priority channel, got kind {} index {}",
                  static_cast<int>(hello->kind), hello->index);
    } else if ((session.ack.features & kFeatureAuth) &&
               !MacEqual(hello->mac, ChannelProof(key, hello->session_id, 0, ChannelKind::kPriority,
                                                  session.hello.nonce, session.ack.nonce))) {
      why = Error("ChannelHello: the priority channel failed authentication");
    }
    if (why.ok()) {
      RETURN_IF_ERROR(link->channel().SetLowLatency(true));
      RETURN_IF_ERROR(
          link->writer().Send(ChannelAck{hello->session_id, 0, ChannelKind::kPriority}));
      return link;
    }
    (void)link->writer().Send(ErrorMessage{ErrorCode::kProtocol, why.ToString()});
    if (strays + 1 >= max_strays) return why.WithContext("priority channel");
  }
}

}  // namespace faultline::migration
