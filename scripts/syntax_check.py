#!/usr/bin/env python3
"""Runs every C++ entry of a compile_commands.json with -fsyntax-only (no
object file), JOBS at a time, and fails if any reports an error. Used by
scripts/thread-safety.sh: clang's thread-safety analysis needs the front
end only.

    scripts/syntax_check.py BUILD/compile_commands.json [JOBS]
"""
import json
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor


def syntax_only(entry):
    args = shlex.split(entry["command"]) if "command" in entry else list(entry["arguments"])
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a in ("-o", "-c", "-MF", "-MT", "-MQ"):
            skip = True
            continue
        if a in ("-MD", "-MMD") or a == entry["file"]:
            continue
        out.append(a)
    out += ["-fsyntax-only", entry["file"]]
    r = subprocess.run(out, cwd=entry["directory"], capture_output=True, text=True)
    return entry["file"], r.returncode, r.stderr


def main():
    # tests/layering/ holds probes that must fail to compile (the layer
    # check's own test); everything else must pass.
    entries = [
        e for e in json.load(open(sys.argv[1]))
        if e["file"].endswith(".cc") and "/tests/layering/" not in e["file"]
    ]
    jobs = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    failed = 0
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for name, code, err in pool.map(syntax_only, entries):
            if code != 0 or err.strip():
                failed += 1
                print(f"{name}:\n{err}", file=sys.stderr)
    print(f"syntax check: {len(entries)} files, {failed} with diagnostics")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
