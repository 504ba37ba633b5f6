#!/usr/bin/env python3
"""Who calls a hot function: the first caller outside it, per sample, from a perf recording
taken with frame pointers (`perf record -g --call-graph fp`). wasmtime's compiled code keeps
frame pointers, so the guest's own callers show, named by the harness's perf map."""

import argparse
import collections
import re
import subprocess
import sys

# Rust symbol hashes (`17h0123456789abcdefE`) say nothing a reader needs.
HASH = re.compile(r"17h[0-9a-f]{16}E")


def stacks(lines):
    """Each sample's frames, leaf first, from `perf script -F ip,sym` output."""
    frames = []
    for line in lines:
        line = line.strip()
        if not line:
            if frames:
                yield frames
            frames = []
            continue
        parts = line.split(None, 1)
        frames.append(parts[1] if len(parts) > 1 else parts[0])
    if frames:
        yield frames


def callers(samples, leaf, through):
    """Counts, for every sample whose leaf matches `leaf`, its first frame that matches
    neither `leaf` nor `through` (helpers to look past, such as `RawVec` growth)."""
    counts = collections.Counter()
    hits = 0
    for frames in samples:
        if not leaf.search(frames[0]):
            continue
        hits += 1
        for frame in frames[1:]:
            if not leaf.search(frame) and not (through and through.search(frame)):
                counts[HASH.sub("", frame)] += 1
                break
        else:
            counts["(no caller)"] += 1
    return hits, counts


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("data", help="perf.data recorded with -g --call-graph fp")
    p.add_argument("leaf", help="regex naming the hot function(s)")
    p.add_argument("--through", help="regex of frames to look past")
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args()
    out = subprocess.run(
        ["perf", "script", "-i", a.data, "-F", "ip,sym"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    through = re.compile(a.through) if a.through else None
    hits, counts = callers(stacks(out.splitlines()), re.compile(a.leaf), through)
    print(f"{hits} samples in {a.leaf}")
    for name, n in counts.most_common(a.top):
        print(f"{n:8} {100 * n / max(hits, 1):5.1f} %  {name[:160]}")


if __name__ == "__main__":
    sys.exit(main())
