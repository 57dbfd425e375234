#include "src/control/migration.h"

#include <string>
#include <utility>

#include "src/control/args.h"

namespace faultline::control {

Status MigrationControl::Resume(const std::optional<MigrationTarget>&) {
  return NotSupported(
      "migrate-resume is not supported yet: this VMM cannot recover a broken post-copy "
      "migration");
}

Status MigrationControl::StartPostcopy() {
  return NotSupported(
      "migrate-start-postcopy is not supported yet: this VMM cannot switch a running migration "
      "to post-copy");
}

namespace {

class UnavailableMigrationControl final : public MigrationControl {
 public:
  Status Start(const MigrateRequest&) override {
    return NotSupported("this VMM has no migration engine yet, so it cannot migrate");
  }
  MigrationStatus Query() override { return MigrationStatus(); }
  Status Cancel() override { return WrongState("no migration is active"); }
};

nlohmann::json Empty() { return nlohmann::json::object(); }

}  // namespace

std::shared_ptr<MigrationControl> MakeUnavailableMigrationControl() {
  return std::make_shared<UnavailableMigrationControl>();
}

void RegisterMigrationCommands(ControlServer& server, std::shared_ptr<MigrationControl> control) {
  server.Register("migrate", [control](const nlohmann::json& args) -> Result<nlohmann::json> {
    ASSIGN_OR_RETURN(MigrateRequest request, ParseMigrateRequest(args));
    // A friendlier message than the engine's; the engine still checks, as
    // two clients may race here.
    MigrationStatus now = control->Query();
    if (IsActive(now.phase)) {
      return WrongState(
          "a migration to {} is already active (phase {}): follow it with `faultline migrate "
          "--watch` or stop it with `faultline migrate --cancel`",
          now.to, MigrationPhaseName(now.phase));
    }
    RETURN_IF_ERROR(control->Start(request));
    return Empty();
  });
  server.Register("query-migrate", [control](const nlohmann::json& args) -> Result<nlohmann::json> {
    RETURN_IF_ERROR(JsonFields(args).RejectUnknown({}));
    return nlohmann::json(control->Query());
  });
  auto cancel = [control](const nlohmann::json& args) -> Result<nlohmann::json> {
    RETURN_IF_ERROR(JsonFields(args).RejectUnknown({}));
    RETURN_IF_ERROR(control->Cancel());
    return Empty();
  };
  server.Register("migrate-cancel", cancel);
  server.Register("cancel", cancel);
  server.Register("migrate-resume",
                  [control](const nlohmann::json& args) -> Result<nlohmann::json> {
                    JsonFields f(args);
                    RETURN_IF_ERROR(f.RejectUnknown({"to"}));
                    ASSIGN_OR_RETURN(std::optional<std::string> to_text, f.OptionalString("to"));
                    std::optional<MigrationTarget> to;
                    if (to_text) {
                      ASSIGN_OR_RETURN(to, ParseMigrationTarget(*to_text));
                    }
                    RETURN_IF_ERROR(control->Resume(to));
                    return Empty();
                  });
  server.Register("migrate-start-postcopy",
                  [control](const nlohmann::json& args) -> Result<nlohmann::json> {
                    RETURN_IF_ERROR(JsonFields(args).RejectUnknown({}));
                    RETURN_IF_ERROR(control->StartPostcopy());
                    return Empty();
                  });
}

void RegisterStatusCommand(ControlServer& server, std::function<VmStatus()> status) {
  server.Register(
      "query-status",
      [status = std::move(status)](const nlohmann::json& args) -> Result<nlohmann::json> {
        RETURN_IF_ERROR(JsonFields(args).RejectUnknown({}));
        return nlohmann::json(status());
      });
}

}  // namespace faultline::control
