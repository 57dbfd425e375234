// Built only by the test layering.build_refuses_upward_include, with
// paging's view of the tree: vmm is above paging, so this must not compile.
#include "src/vmm/vm.h"

int faultline_layering_upward_probe() { return 0; }
