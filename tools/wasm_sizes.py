#!/usr/bin/env python3
"""Where a module's code bytes go: each function's body size, by name, largest first.

    python3 tools/wasm_sizes.py MODULE.wasm [--top N] [--match REGEX]...

Names need an unstripped module (target/wasm32-wasip1/release/<crate>.wasm; dist/ holds
stripped ones). Each --match prints the total of the functions whose demangled-ish name
matches REGEX, so a share ("the configuration readers") is a command, not a guess.
"""
import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trim_callbacks import leb  # noqa: E402  (the one LEB128 reader of the tools)
from wasm_module import function_names, imported_functions, sections  # noqa: E402


def functions(path):
    b = open(path, "rb").read()
    sizes, names, imported = [], {}, 0
    for sid, _, body, end in sections(b):
        if sid == 2:  # imports: functions among them shift the indices
            imported = imported_functions(b, body)
        elif sid == 10:
            count, j = leb(b, body)
            for _ in range(count):
                ln, k = leb(b, j)
                sizes.append(k - j + ln)
                j = k + ln
        elif sid == 0:
            names = function_names(b, body, end) or names
    return [(size, readable(names.get(imported + k, f"#{k}"))) for k, size in enumerate(sizes)]


def readable(name):
    """Itanium-mangled Rust names as path::segments (enough to read and to match)."""
    if not name.startswith("_ZN"):
        return name
    out, i = [], 3
    while i < len(name) and name[i].isdigit():
        j = i
        while name[j].isdigit():
            j += 1
        n = int(name[i:j])
        out.append(name[j : j + n])
        i = j + n
    if out and re.fullmatch(r"h[0-9a-f]{16}", out[-1]):
        out.pop()
    return "::".join(out).replace("$LT$", "<").replace("$GT$", ">").replace("$u20$", " ").replace("..", "::")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("module")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--match", action="append", default=[], metavar="REGEX")
    a = p.parse_args()
    fs = sorted(functions(a.module), reverse=True)
    print(f"{sum(s for s, _ in fs)} B of code in {len(fs)} functions")
    for s, n in fs[: a.top]:
        print(f"{s:8} {n}")
    for rx in a.match:
        hit = [s for s, n in fs if re.search(rx, n)]
        print(f"{sum(hit):8} B in {len(hit)} functions matching {rx!r}")


if __name__ == "__main__":
    main()
