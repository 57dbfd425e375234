// PrecopyPasses: the source's pre-copy passes, for both sources
// (MigrationSource, PostcopySource). It keeps the dirty set of every block
// (at first every page: pass 0 sends them all), harvests the VM's dirty log
// into it after each pass, and sends a pass from it over the session's page
// channels (page_sender.h). What to do after a pass (another, or the
// switchover) is the engine's.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "faultline/ram_block.h"
#include "src/memory/dirty_bitmap.h"
#include "src/migration/handshake.h"
#include "src/migration/migratable.h"
#include "src/migration/page_sender.h"
#include "src/migration/source.h"

namespace faultline::migration {

class PrecopyPasses {
 public:
  // `vm`, `session` and `pages_sent` must outlive this object.
  PrecopyPasses(SourceVm& vm, std::vector<std::shared_ptr<RamBlock>> blocks, Session& session,
                const SourceOptions& options, std::atomic<uint64_t>& pages_sent);

  // Sends the dirty set as pass `pass` and empties it; `final`: the
  // stop-and-copy pass, which ends each page channel with ChannelEnd.
  Result<PassStats> Send(uint32_t pass, bool final);
  // A pre-copy pass: Send, Harvest (the pass's dirty_after) and PassEnd on
  // `main`.
  Result<PassStats> Run(uint32_t pass, Link& main);
  // Merges the pages dirtied since the last harvest into the dirty set and
  // returns how many pages it holds.
  Result<uint64_t> Harvest();

  const std::vector<std::shared_ptr<RamBlock>>& blocks() const { return blocks_; }
  std::vector<DirtyBitmap>& dirty() { return dirty_; }  // by block, 4 KiB pages
  uint64_t total_pages() const { return total_pages_; }

 private:
  SourceVm& vm_;
  const std::vector<std::shared_ptr<RamBlock>> blocks_;
  PageSender sender_;
  std::vector<DirtyBitmap> dirty_;
  DirtyBitmap taken_;  // TakeDirty's scratch
  uint64_t total_pages_ = 0;
};

}  // namespace faultline::migration
