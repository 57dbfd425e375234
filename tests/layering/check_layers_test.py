#!/usr/bin/env python3
"""Tests scripts/check_layers.py: clean on the real tree, and each kind of
forbidden include in a copy of it fails the check and names the file.

    check_layers_test.py REPOSITORY_ROOT
"""

import pathlib
import shutil
import subprocess
import sys
import tempfile
import unittest

ROOT = pathlib.Path(sys.argv.pop(1) if len(sys.argv) > 1 else pathlib.Path(__file__).parents[2])
SCRIPT = ROOT / "scripts" / "check_layers.py"


def run(root):
    r = subprocess.run([sys.executable, str(SCRIPT), str(root)], capture_output=True, text=True)
    return r.returncode, r.stdout + r.stderr


class CheckLayersTest(unittest.TestCase):
    def setUp(self):
        self.tmp = pathlib.Path(tempfile.mkdtemp(prefix="check_layers_"))
        for d in ("src", "include"):
            shutil.copytree(ROOT / d, self.tmp / d)

    def tearDown(self):
        shutil.rmtree(self.tmp)

    def add_line(self, rel, line):
        path = self.tmp / rel
        path.write_text(line + "\n" + path.read_text())

    def assert_refused(self, rel, *words):
        code, out = run(self.tmp)
        self.assertEqual(code, 1, out)
        self.assertIn(rel + ":1:", out)
        for w in words:
            self.assertIn(w, out)

    def test_the_copy_is_clean(self):
        code, out = run(self.tmp)
        self.assertEqual(code, 0, out)

    def test_upward_include(self):
        self.add_line("src/paging/present_map.h", '#include "src/vmm/vm.h"')
        self.assert_refused("src/paging/present_map.h", "paging may not include", "src/vmm/vm.h")

    def test_sideways_include(self):
        # migration and hypervisor: neither is below the other in the list.
        self.add_line("src/migration/wire.h", '#include "src/hypervisor/hypervisor.h"')
        self.assert_refused("src/migration/wire.h", "migration may not include")

    def test_relative_include(self):
        self.add_line("src/memory/dirty_bitmap.cc", '#include "../vmm/vm.h"')
        self.assert_refused("src/memory/dirty_bitmap.cc", "repository root")

    def test_kvm_below_the_hypervisor(self):
        self.add_line("src/memory/guest_memory.cc", '#include "src/sys/kvm.h"')
        self.assert_refused("src/memory/guest_memory.cc", "KVM types stay in sys and hypervisor")

    def test_kernel_header_above_sys(self):
        self.add_line("src/paging/installer.cc", "#include <linux/userfaultfd.h>")
        self.assert_refused("src/paging/installer.cc", "<linux/userfaultfd.h>")

    def test_public_header_including_src(self):
        self.add_line("include/faultline/status.h", '#include "src/sys/unique_fd.h"')
        self.assert_refused("include/faultline/status.h", "public header")

    def test_public_header_including_kernel_header(self):
        self.add_line("include/faultline/types.h", "#include <linux/kvm.h>")
        self.assert_refused("include/faultline/types.h", "<linux/kvm.h>")

    def test_unknown_module(self):
        (self.tmp / "src" / "scratch").mkdir(exist_ok=True)
        (self.tmp / "src" / "scratch" / "x.h").write_text("#pragma once\n")
        code, out = run(self.tmp)
        self.assertEqual(code, 1, out)
        self.assertIn("src/scratch/: not a known module", out)


if __name__ == "__main__":
    unittest.main(verbosity=2)
