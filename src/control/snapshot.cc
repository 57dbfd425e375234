#include "src/control/snapshot.h"

#include "src/control/args.h"

namespace faultline::control {

Result<SnapshotRequest> ParseSnapshotRequest(const nlohmann::json& args) {
  JsonFields f(args);
  RETURN_IF_ERROR(f.CheckObject());
  RETURN_IF_ERROR(f.RejectUnknown({"dir", "live", "resume"}));
  SnapshotRequest r;
  ASSIGN_OR_RETURN(r.dir, f.String("dir"));
  if (r.dir.empty()) return InvalidArgument("argument 'dir' is empty: give the directory to write");
  ASSIGN_OR_RETURN(std::optional<bool> live, f.OptionalBool("live"));
  r.live = live.value_or(true);
  ASSIGN_OR_RETURN(std::optional<bool> resume, f.OptionalBool("resume"));
  r.resume = resume.value_or(true);
  return r;
}

void to_json(nlohmann::json& j, const SnapshotRequest& request) {
  j = {{"dir", request.dir}, {"live", request.live}, {"resume", request.resume}};
}

nlohmann::json SnapshotReply(const std::string& dir, const migration::SnapshotStats& stats) {
  return {{"dir", dir},
          {"passes", stats.passes},
          {"data_pages", stats.data_pages},
          {"zero_pages", stats.zero_pages},
          {"pause_us", stats.pause.count()},
          {"total_us", stats.total.count()}};
}

void RegisterSnapshotCommand(ControlServer& server, migration::SourceVm& vm,
                             std::function<Status()> may_start, std::function<void()> done) {
  server.Register("snapshot",
                  [&vm, may_start = std::move(may_start),
                   done = std::move(done)](const nlohmann::json& args) -> Result<nlohmann::json> {
                    ASSIGN_OR_RETURN(SnapshotRequest request, ParseSnapshotRequest(args));
                    RETURN_IF_ERROR(may_start());
                    migration::SnapshotOptions options;
                    options.live = request.live;
                    options.resume = request.resume;
                    Result<migration::SnapshotStats> stats =
                        migration::WriteSnapshot(vm, request.dir, options);
                    done();
                    if (!stats.has_value()) return stats.error();
                    return SnapshotReply(request.dir, *stats);
                  });
}

}  // namespace faultline::control
