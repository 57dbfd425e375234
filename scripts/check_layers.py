#!/usr/bin/env python3
"""Checks the module layering of Faultline's sources (docs/architecture.md).

Every #include in src/ and include/ is checked against the allowed edges
below; any other edge is an error that names the file, the line and what the
module may include instead. Exit status: 0 if the tree is clean, 1 if not,
2 on a usage error.

    scripts/check_layers.py [ROOT]      # ROOT: the repository (default: ..)

The build enforces the same direction (a module's include path holds only
the modules it links, see CMakeLists.txt); this check also catches what an
include path cannot: relative includes, a sideways edge a transitive link
happens to allow, kernel headers above sys, and src/ in the public headers.
"""

import pathlib
import re
import sys

# module -> the modules it may include, lowest first. Every module may also
# include the public headers (include/faultline/).
ALLOWED = {
    "sys": [],
    "memory": ["sys"],
    "hypervisor": ["sys", "memory"],
    "paging": ["sys", "memory", "hypervisor"],
    "migration": ["sys", "memory", "paging"],
    "embed": ["sys", "memory", "paging", "migration"],
    "control": ["sys", "memory", "paging", "migration"],
    "vmm": ["sys", "memory", "hypervisor", "paging", "migration", "guest"],
}
# KVM's ABI and the kernel's headers: sys wraps them; hypervisor is the one
# layer above it that may speak KVM.
KVM_HEADER = "src/sys/kvm.h"
KVM_USERS = {"sys", "hypervisor"}

QUOTED = re.compile(r'^\s*#\s*include\s+"([^"]+)"')
ANGLED = re.compile(r"^\s*#\s*include\s+<([^>]+)>")


def target_module(path):
    """The module a quoted include names, or None if it is not a module."""
    parts = path.split("/")
    if parts[0] == "src" and len(parts) > 2:
        return parts[1]
    if parts[0] == "guest":
        return "guest"
    return None


def check_module_file(rel, module, lines, errors):
    allowed = ALLOWED[module]
    for number, line in enumerate(lines, 1):
        where = f"{rel}:{number}"
        m = QUOTED.match(line)
        if m:
            inc = m.group(1)
            if inc.startswith("faultline/"):
                continue
            target = target_module(inc)
            if target is None:
                errors.append(
                    f'{where}: #include "{inc}": include module headers by their path from the '
                    'repository root ("src/<module>/...") or public ones as "faultline/..."'
                )
            elif target != module and target not in allowed:
                may = ", ".join(allowed) if allowed else "no other module"
                errors.append(
                    f'{where}: {module} may not include "{inc}" ({target} is not below '
                    f"{module}; {module} may include {may})"
                )
            elif inc == KVM_HEADER and module not in KVM_USERS:
                errors.append(
                    f'{where}: {module} may not include "{inc}": KVM types stay in sys and '
                    "hypervisor (use the hypervisor's or memory's own interfaces)"
                )
            continue
        m = ANGLED.match(line)
        if m and m.group(1).startswith("linux/") and module != "sys":
            errors.append(
                f"{where}: {module} may not include <{m.group(1)}>: kernel headers are "
                "included in src/sys only (src/sys/linux_abi.h defines newer ABI)"
            )


def check_public_file(rel, lines, errors):
    for number, line in enumerate(lines, 1):
        where = f"{rel}:{number}"
        m = QUOTED.match(line)
        if m and not m.group(1).startswith("faultline/"):
            errors.append(
                f'{where}: a public header may include only "faultline/..." headers, '
                f'not "{m.group(1)}" (an embedder has include/ alone)'
            )
        m = ANGLED.match(line)
        if m and m.group(1).startswith("linux/"):
            errors.append(
                f"{where}: a public header may not include <{m.group(1)}> "
                "(an embedder's kernel headers may be older)"
            )


def check(root):
    errors = []
    src = root / "src"
    for directory in sorted(p for p in src.iterdir() if p.is_dir()):
        module = directory.name
        files = sorted(f for f in directory.rglob("*") if f.suffix in (".h", ".cc"))
        if module not in ALLOWED:
            if files:
                errors.append(
                    f"src/{module}/: not a known module; add it to ALLOWED in "
                    "scripts/check_layers.py and to docs/architecture.md"
                )
            continue
        for f in files:
            rel = f.relative_to(root).as_posix()
            check_module_file(rel, module, f.read_text(errors="replace").splitlines(), errors)
    public = root / "include" / "faultline"
    if public.is_dir():
        for f in sorted(public.rglob("*.h")):
            rel = f.relative_to(root).as_posix()
            check_public_file(rel, f.read_text(errors="replace").splitlines(), errors)
    return errors


def main(argv):
    if len(argv) > 2:
        print(__doc__, file=sys.stderr)
        return 2
    root = pathlib.Path(argv[1] if len(argv) == 2 else pathlib.Path(__file__).parent.parent)
    if not (root / "src").is_dir():
        print(f"check_layers: {root} has no src/ (give the repository root)", file=sys.stderr)
        return 2
    errors = check(root)
    for e in errors:
        print(e)
    if errors:
        print(f"check_layers: {len(errors)} include(s) break the layering (docs/architecture.md)")
        return 1
    print(f"check_layers: {root.resolve()}: every include follows the layering")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
