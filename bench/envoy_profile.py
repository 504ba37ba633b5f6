#!/usr/bin/env python3
"""Where Envoy's CPU goes for bench configurations: guest code against Envoy's own.

    python3 bench/envoy_profile.py "edge.wasm,replay edge.wasm" [SECONDS]

Runs each named configuration of envoy_bench.py (its Envoy, requests and replays; needs
`./build.sh build`, `.tools/envoy` and the harness's traces in bench/out/traces) under
`perf record -p` while wrk loads it, then prints its CPU per request and the share of samples
per DSO. V8's compiled wasm is the `[JIT]` DSO: its share times the CPU per request is what
the guest's code costs, which the bench's burn loop underprices (bench/README.md).

With two configurations or more, it then compares Envoy's own code between the first and each
other one by 64 KB region of the binary (Envoy ships stripped: samples are addresses), in µs
per request: whether Envoy does more work in a few places (a few regions) or runs all of its
code slower (the difference spread over them all).
"""
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import envoy_bench as eb  # noqa: E402

ROOT = os.path.dirname(HERE)
REGION_BITS = 16


def regions(report, us):
    """µs per request by 64 KB region, from `perf report --sort sym` lines of a stripped DSO."""
    out = {}
    for line in report.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+\[\.\]\s+0x([0-9a-f]+)\s*$", line)
        if m:
            r = int(m.group(2), 16) >> REGION_BITS
            out[r] = out.get(r, 0.0) + float(m.group(1)) * us / 100
    return out


def compare(first, other, top=8):
    """Lines saying where Envoy's code costs more beside `first` than beside `other`."""
    keys = set(first) | set(other)
    diff = sorted(((first.get(k, 0.0) - other.get(k, 0.0), k) for k in keys), reverse=True)
    total = sum(d for d, _ in diff)
    lines = [f"  {total:+.1f} µs in all, over {len(keys)} regions; the largest:"]
    for d, k in diff[:top]:
        lines.append(f"  {d:+6.2f} µs  0x{k << REGION_BITS:x}  ({first.get(k, 0.0):.2f} against "
                     f"{other.get(k, 0.0):.2f})")
    return lines


def main():
    wanted = sys.argv[1].split(",")
    seconds = int(sys.argv[2]) if len(sys.argv) > 2 else 6
    os.chdir(ROOT)
    envoy = ".tools/envoy/envoy/_bin/envoy"
    work = tempfile.mkdtemp(prefix="edge-profile-")
    replays = eb.replay_filters("bench/out/traces", "target/modules/replay_filter.wasm", work)
    configs = eb.configurations(os.path.abspath("dist"),
                                os.path.abspath("target/modules/empty_filter.wasm"), replays, None)
    upstream = eb.Envoy(envoy, "upstream", eb.envoy_yaml([eb.BUFFER], 0, True), 1, work)
    started = []
    profiled = []
    try:
        for name, _, filters, script in configs:
            if name not in wanted:
                continue
            e = eb.Envoy(envoy, name, eb.envoy_yaml(filters, upstream.port, False), 0, work)
            started.append(e)
            safe = re.sub(r"[^a-z0-9]+", "_", name.lower())
            lua = os.path.join(work, safe + ".lua")
            with open(lua, "w") as f:
                f.write(script)
            if name in eb.FILLED:
                fill = os.path.join(work, "fill.lua")
                with open(fill, "w") as f:
                    f.write(eb.FRESH_POST)
                sent, _ = eb.fill(e, fill, 16)
                print(f"{name}: table full after {sent} fresh POSTs", flush=True)
            eb.wrk(e.port, lua, 2, 16)
            data = os.path.join(work, safe + ".perf")
            perf = subprocess.Popen(["perf", "record", "-q", "-F", "4999", "-o", data, "-p", str(e.proc.pid)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            before = e.cpu_seconds()
            r = eb.wrk(e.port, lua, seconds, 16)
            us = (e.cpu_seconds() - before) * 1e6 / max(1, r["requests"])
            perf.send_signal(2)
            perf.wait()
            print(f"{name}: {us:.1f} µs/request", flush=True)
            report = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", "dso",
                                     "-q", "-g", "none"], capture_output=True, text=True).stdout
            for line in report.splitlines():
                m = re.match(r"\s*([\d.]+)%\s+(.+?)\s*$", line)
                if m and float(m.group(1)) >= 0.5:
                    share = float(m.group(1))
                    print(f"  {share:5.1f} %  {us * share / 100:6.1f} µs  {m.group(2)}")
            own = subprocess.run(["perf", "report", "-i", data, "--no-children", "--dsos", "envoy",
                                  "--sort", "sym", "-q", "-g", "none"],
                                 capture_output=True, text=True).stdout
            profiled.append((name, regions(own, us)))
        for name, by_region in profiled[1:]:
            first, base = profiled[0]
            print(f"Envoy's own code, {first} against {name}, by 64 KB region:")
            print("\n".join(compare(base, by_region)))
    finally:
        for e in started:
            e.stop()
        upstream.stop()


if __name__ == "__main__":
    main()
