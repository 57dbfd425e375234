// Built only by the test layering.build_takes_downward_include, with
// paging's view of the tree: paging, and memory below it, are visible.
#include "src/memory/guest_memory.h"
#include "src/paging/present_map.h"

int faultline_layering_downward_probe() { return 0; }
