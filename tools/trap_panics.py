#!/usr/bin/env python3
"""Turns the bodies of core's and alloc's panicking functions into the trap they end in.

The modules are `no_std` and their panic handler (edge-host) is a bare trap, yet every panic
call site still builds the panic's message and location: core's panicking functions take
them, and only a nightly build of core drops them. With those functions' bodies a single
`unreachable`, wasm-opt removes the arguments at each call site (and the call, inlined into
a trap). A panic still traps where it did, with nothing written before: what the handler
did with the message (nothing) is unchanged.

Only functions that never return are rewritten: the names below are `-> !` in core, alloc
and bytes (prost's buffer type). A function is matched by its mangled path (v0 or legacy
mangling) and must have no results: a matched function that returns a value (a Debug impl of
one of core::panicking's types) is kept.

Usage: trap_panics.py MODULE.wasm   (rewrites MODULE.wasm in place; needs the name section,
which `strip = "debuginfo"` keeps). Prints how many bodies it rewrote; refuses a module in
which it finds no function of core::panicking, since every Rust module has them.
"""

import re
import sys

from trim_callbacks import enc, leb
from wasm_module import function_names, imported_functions, sections

# Mangled path segments (length-prefixed identifiers) of functions that diverge.
DIVERGING = [
    r"4core9panicking",  # every function of core::panicking is `-> !`
    r"4core6option13unwrap_failed",
    r"4core6option13expect_failed",
    r"4core6result13unwrap_failed",
    r"4core4cell22panic_already_borrowed",
    r"4core4cell30panic_already_mutably_borrowed",
    r"4core5slice5index\d+slice_\w*fail",
    r"4core3str16slice_error_fail",
    r"4core3str19slice_error_fail_rt",
    r"5alloc7raw_vec12handle_error",
    r"5alloc7raw_vec17capacity_overflow",
    r"5alloc5alloc18handle_alloc_error",
    r"5alloc3vec.*13assert_failed",
    r"5bytes13panic_advance",
    r"rust_begin_unwind",
]
PATTERN = re.compile("|".join(f"(?:{p})" for p in DIVERGING))

# A body with no locals, `unreachable`, `end`.
TRAP = enc(3) + bytes([0, 0x00, 0x0B])


def result_counts(module, body):
    """Each type's number of results."""
    count, j = leb(module, body)
    out = []
    for _ in range(count):
        if module[j] != 0x60:
            raise SystemExit("type section entry is not a function type")
        params, j = leb(module, j + 1)
        j += params
        results, j = leb(module, j)
        j += results
        out.append(results)
    return out


def function_types(module, body):
    count, j = leb(module, body)
    out = []
    for _ in range(count):
        t, j = leb(module, j)
        out.append(t)
    return out


def trap(module):
    secs = sections(module)
    imported, names, results, types = 0, None, [], []
    for sid, _, body, end in secs:
        if sid == 1:
            results = result_counts(module, body)
        elif sid == 2:
            imported = imported_functions(module, body)
        elif sid == 3:
            types = function_types(module, body)
        elif sid == 0 and names is None:
            names = function_names(module, body, end)
    if names is None:
        raise SystemExit("no name section: build with `strip = \"debuginfo\"`, not `true`")
    out, rewritten = bytearray(module[:8]), []
    for sid, start, body, end in secs:
        if sid != 10:
            out += module[start:end]
            continue
        count, j = leb(module, body)
        code = bytearray(enc(count))
        for f in range(count):
            size, k = leb(module, j)
            name = names.get(imported + f, "")
            # A function with results returns (a Debug impl of a panicking type): kept.
            if PATTERN.search(name) and not results[types[f]]:
                code += TRAP
                rewritten.append(name)
            else:
                code += module[j:k + size]
            j = k + size
        out += bytes([10]) + enc(len(code)) + code
    # Every Rust module has core's panic_fmt: none found means the names changed, and the
    # tool would go on silently rewriting nothing.
    if not any("4core9panicking" in name for name in rewritten):
        raise SystemExit("no core::panicking function found: have the mangled names changed?")
    return bytes(out), rewritten


def main():
    path = sys.argv[1]
    with open(path, "rb") as f:
        trapped, rewritten = trap(f.read())
    with open(path, "wb") as f:
        f.write(trapped)
    print(len(rewritten))


if __name__ == "__main__":
    main()
