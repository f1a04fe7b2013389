"""Read memcheck logs; fail if any error context has a frame in rategate._core.

An error context is one block of a log: a heading ("Invalid read of size 8",
"Conditional jump or move depends on uninitialised value(s)", "... bytes in
... blocks are definitely lost ...") followed by its frames.  Contexts
without a rategate frame (CPython's, libraries') are counted, not fatal.
"""

from __future__ import annotations

import pathlib
import re
import sys

HEAD = re.compile(r"^==\d+== (\S.*)$")
FRAME = re.compile(r"^==\d+==\s+(?:at|by) 0x[0-9A-F]+: (.*)$")


def contexts(text: str) -> list[list[str]]:
    out: list[list[str]] = []
    cur: list[str] = []
    for line in text.splitlines():
        if re.match(r"^==\d+== ?$", line):
            if cur:
                out.append(cur)
            cur = []
            continue
        cur.append(line)
    if cur:
        out.append(cur)
    return [c for c in out if any(FRAME.match(line) for line in c)]


def main() -> int:
    logs = sorted(pathlib.Path(sys.argv[1]).glob("*.log"))
    # A frame of ours: in the extension's file, or in one of csrc's sources
    # ("(pyengine.c:123)"); not CPython's "pycore_*.h" or "*module.c".
    csrc = pathlib.Path(__file__).resolve().parent.parent / "csrc"
    names = "|".join(re.escape(p.name) for p in sorted(csrc.glob("*.[ch]")))
    ours_re = re.compile(rf"rategate/_core\.|\((?:{names}):\d+\)")
    ours = others = 0
    for log in logs:
        for ctx in contexts(log.read_text(errors="replace")):
            frames = [m.group(1) for line in ctx if (m := FRAME.match(line))]
            if any(ours_re.search(f) for f in frames):
                ours += 1
                print(f"--- {log}:", *ctx, sep="\n")
            else:
                others += 1
    print(f"valgrind: {len(logs)} log(s), {ours} error context(s) in rategate, {others} elsewhere")
    return 1 if ours else 0


if __name__ == "__main__":
    sys.exit(main())
