#!/usr/bin/env python3
"""Runs every C++ entry of a compile_commands.json with -fsyntax-only (no
object file), JOBS at a time, and fails if any reports an error. Used by
scripts/thread-safety.sh: clang's thread-safety analysis needs the front
end only.

    scripts/syntax_check.py BUILD/compile_commands.json [JOBS] [DONE_IN]

DONE_IN: a Ninja build tree that compiled some of the same files with
clang's -Wthread-safety and -Werror already (scripts/fuzz.sh's): the files
its up-to-date objects were built from are not checked twice. Ignored
unless that build's compile commands carry both flags.
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


def compiled_in(build):
    """Sources of the up-to-date objects of `build`, compiled with
    -Wthread-safety -Werror; empty if it was not configured so."""
    commands = [e for e in json.load(open(f"{build}/compile_commands.json"))
                if e["file"].endswith(".cc")]
    flags = {"-Wthread-safety", "-Werror"}
    if not commands or not all(flags <= set(shlex.split(e.get("command", ""))) for e in commands):
        return set()
    deps = subprocess.run(["ninja", "-C", build, "-t", "deps"], capture_output=True, text=True)
    # "OBJ: #deps N, ... (VALID)", then its inputs, one per indented line:
    # the source is the one OBJ is named after (DIR/x.cc.o from .../x.cc).
    done, source = set(), None
    for line in deps.stdout.splitlines():
        if not line.startswith(" "):
            obj = line.split(":")[0]
            source = "/" + obj.rsplit("/", 1)[-1][: -len(".o")] if line.endswith("(VALID)") else None
        elif source and line.strip().endswith(source):
            done.add(line.strip())
            source = None
    return done


def main():
    # tests/layering/ holds probes that must fail to compile (the layer
    # check's own test); everything else must pass.
    entries = [
        e for e in json.load(open(sys.argv[1]))
        if e["file"].endswith(".cc") and "/tests/layering/" not in e["file"]
    ]
    jobs = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    done = compiled_in(sys.argv[3]) if len(sys.argv) > 3 else set()
    skipped = sum(1 for e in entries if e["file"] in done)
    entries = [e for e in entries if e["file"] not in done]
    failed = 0
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for name, code, err in pool.map(syntax_only, entries):
            if code != 0 or err.strip():
                failed += 1
                print(f"{name}:\n{err}", file=sys.stderr)
    print(f"syntax check: {len(entries)} files, {failed} with diagnostics"
          + (f"; {skipped} more were compiled with the analysis in {sys.argv[3]}" if skipped else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
