"""tools/trap_panics.py on a small module written here: which bodies become a trap."""

import os
import shutil
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trap_panics import TRAP, trap  # noqa: E402
from trim_callbacks import enc  # noqa: E402


def section(sid, body):
    return bytes([sid]) + enc(len(body)) + body


def vec(items):
    return enc(len(items)) + b"".join(items)


def name(text):
    return enc(len(text)) + text.encode()


PANIC = "_RNvNtCs1_4core9panicking9panic_fmt"
# A Debug impl of a type in core::panicking: it returns, so it must be kept.
DEBUG = "_RNvXs_NtCs1_4core9panickingNtB4_10AssertKindNtNtB6_3fmt5Debug3fmt"
PLUGIN = "_ZN10rate_limit6policy7Limiter6decide17h0123456789abcdefE"
UNWRAP = "_RNvNtCs1_4core6option13unwrap_failed"

BODIES = {
    PANIC: bytes([0, 0x01, 0x0B]),  # nop
    DEBUG: bytes([0, 0x41, 7, 0x0B]),  # i32.const 7
    PLUGIN: bytes([0, 0x01, 0x01, 0x0B]),  # nop nop
    UNWRAP: bytes([0, 0x01, 0x0B]),
}


def module(with_names=True, imports=1, order=(PANIC, DEBUG, PLUGIN, UNWRAP)):
    """`imports` imported functions, then those of `order`."""
    types = vec([b"\x60\x00\x00", b"\x60\x00\x01\x7f"])  # () -> (), () -> i32
    imported = vec([name("env") + name(f"f{i}") + b"\x00\x00" for i in range(imports)])
    funcs = vec([enc(1 if f == DEBUG else 0) for f in order])
    code = vec([enc(len(BODIES[f])) + BODIES[f] for f in order])
    out = b"\0asm\x01\0\0\0" + section(1, types) + section(2, imported)
    out += section(3, funcs) + section(10, code)
    if with_names:
        names = vec([enc(imports + i) + name(f) for i, f in enumerate(order)])
        out += section(0, name("name") + bytes([1]) + enc(len(names)) + names)
    return out


def bodies(wasm):
    """The code section's bodies, each with its size prefix, in order."""
    from trim_callbacks import leb

    i = 8
    while i < len(wasm):
        sid = wasm[i]
        size, body = leb(wasm, i + 1)
        if sid == 10:
            count, j = leb(wasm, body)
            out = []
            for _ in range(count):
                n, k = leb(wasm, j)
                out.append(wasm[j:k + n])
                j = k + n
            return out
        i = body + size
    return []


class TrapPanics(unittest.TestCase):
    def test_only_diverging_functions_become_a_trap(self):
        for imports in (0, 2):
            out, rewritten = trap(module(imports=imports))
            self.assertEqual(rewritten, [PANIC, UNWRAP])
            panic, debug, plugin, unwrap = bodies(out)
            self.assertEqual(panic, TRAP)
            self.assertEqual(unwrap, TRAP)
            self.assertEqual(debug, enc(len(BODIES[DEBUG])) + BODIES[DEBUG])
            self.assertEqual(plugin, enc(len(BODIES[PLUGIN])) + BODIES[PLUGIN])

    def test_a_module_without_names_is_refused(self):
        with self.assertRaises(SystemExit):
            trap(module(with_names=False))

    def test_a_module_without_core_panicking_is_refused(self):
        # Rewriting nothing would leave every panic site's arguments in place unnoticed.
        with self.assertRaises(SystemExit):
            trap(module(order=(DEBUG, PLUGIN, UNWRAP)))

    def test_the_output_is_a_valid_module(self):
        # wasm-opt (binaryen, installed by ./build.sh test) validates what it reads.
        self.assertIsNotNone(shutil.which("wasm-opt"), "wasm-opt (Debian package binaryen)")
        out, _ = trap(module(imports=1))
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "m.wasm")
            with open(path, "wb") as f:
                f.write(out)
            subprocess.run(["wasm-opt", path, "-o", os.devnull], check=True)


if __name__ == "__main__":
    unittest.main()
