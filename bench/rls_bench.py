#!/usr/bin/env python3
"""What a global rate limit rule costs inside Envoy: a rule that asks the rate limit service
(envoy/ratelimit-service, Redis behind it, both on loopback) beside the same rule local-only
and bare Envoy. Added p50/p99 latency at a fixed rate, requests/s at full load, and Envoy's CPU
per request, measured as envoy_bench.py measures (Envoy `--concurrency 1` on CPU 0; wrk, the
upstream, the service and Redis on CPU 1).

Run by `./build.sh bench` after envoy_bench.py.
Usage: rls_bench.py ENVOY DIST_DIR SERVICE_BINARY OUT_DIR [--rounds N] [--seconds S]
Writes OUT_DIR/rls.md and prints it.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from envoy_bench import BUFFER, Envoy, envoy_yaml, free_port, wasm_filter, wrk  # noqa: E402

# Every request from the bench's one client is checked and none is limited: what is measured is
# the check itself.
LOCAL_RULE = {"name": "bench", "key": [{"source": "clientIp"}],
              "limit": {"requests": 1000000000, "window": "1s"}}
GLOBAL_RULE = dict(LOCAL_RULE, **{"global": {"cluster": "ratelimit", "domain": "bench",
                                             "timeout": "1s", "failureMode": "local"}})
SERVICE_LIMITS = """domain: bench
descriptors:
  - key: rule
    value: bench
    descriptors:
      - key: client_ip
        rate_limit: { unit: second, requests_per_unit: 1000000000 }
"""
GET = 'wrk.method = "GET"\nwrk.path = "/api/x"\n'


def rls_cluster(port):
    return {
        "name": "ratelimit", "type": "STATIC", "connect_timeout": "0.25s",
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}},
        "load_assignment": {"cluster_name": "ratelimit", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]},
    }


def start(cmd, log, ready):
    proc = subprocess.Popen(["taskset", "-c", "1"] + cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 20
    while not ready():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise SystemExit(f"{cmd[0]} did not start")
        time.sleep(0.05)
    return proc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("envoy")
    ap.add_argument("dist")
    ap.add_argument("service")
    ap.add_argument("out")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--paced-rps", type=int, default=500)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="edge-rls-bench-")
    procs, envoys = [], []
    try:
        redis_port = free_port()
        procs.append(start(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                            "--save", "", "--appendonly", "no"],
                           open(os.path.join(work, "redis.log"), "w"),
                           lambda: subprocess.run(["redis-cli", "-p", str(redis_port), "ping"],
                                                  capture_output=True, text=True).stdout.strip() == "PONG"))
        limits = os.path.join(work, "limits.yaml")
        with open(limits, "w") as f:
            f.write(SERVICE_LIMITS)
        rls_port = free_port()
        service_log = os.path.join(work, "service.log")
        procs.append(start([args.service, "--config", limits, "--redis", f"redis://127.0.0.1:{redis_port}",
                            "--listen", f"127.0.0.1:{rls_port}"], open(service_log, "w"),
                           lambda: "listening on" in open(service_log).read()))
        upstream = Envoy(args.envoy, "upstream", envoy_yaml([BUFFER], 0, True), 1, work)
        envoys.append(upstream)
        module = os.path.join(os.path.abspath(args.dist), "rate_limit.wasm")
        plan = [("bare", []),
                ("local rule", [wasm_filter("rate_limit", module, {"rules": [LOCAL_RULE]})]),
                ("global rule", [wasm_filter("rate_limit", module, {"rules": [GLOBAL_RULE]})])]
        subjects = []
        for name, filters in plan:
            e = Envoy(args.envoy, "rls bench " + name,
                      envoy_yaml(filters, upstream.port, False, [rls_cluster(rls_port)]), 0, work)
            envoys.append(e)
            subjects.append((name, e))
        lua = os.path.join(work, "get.lua")
        with open(lua, "w") as f:
            f.write(GET)
        conns = 10
        paced = lua + ".paced.lua"
        with open(paced, "w") as f:
            f.write(GET + f"delay = function() return {max(1, round(conns * 1000 / args.paced_rps))} end\n")
        for _, e in subjects:
            wrk(e.port, lua, 1, args.connections)
        cpu = {n: [] for n, _ in subjects}
        rps = {n: [] for n, _ in subjects}
        bad = {n: 0 for n, _ in subjects}
        for _ in range(args.rounds):
            for n, e in subjects:
                before, t0 = e.cpu_seconds(), time.time()
                r = wrk(e.port, lua, args.seconds, args.connections)
                cpu[n].append((e.cpu_seconds() - before) * 1e6 / max(1, r["requests"]))
                rps[n].append(r["requests"] / (time.time() - t0))
                bad[n] += r["non2xx"]
        lat = {n: wrk(e.port, paced, args.seconds, conns, latency=True) for n, e in subjects}
    finally:
        for e in envoys:
            e.stop()
        for p in procs:
            p.terminate()
            p.wait(10)

    def added(n, floor, key):
        a, b = lat[n].get(key), lat[floor].get(key)
        return f"{a - b:+.2f}" if a is not None and b is not None else "n/a"

    lines = [
        "## Rate limiting with a global rule (the rate limit service on loopback)",
        "",
        "GETs that one rule checks and never limits: local-only, or also asked of "
        "envoy/ratelimit-service (Redis behind it), which shares CPU 1 with wrk and the upstream. "
        f"Latency paced at about {args.paced_rps} requests/s (10 connections); requests/s and CPU at "
        f"{args.connections} connections, median of {args.rounds} rounds of {args.seconds} s.",
        "",
        "| configuration | p50 / p99 ms | added p50 / p99 over bare | added p50 / p99 over the local rule | requests/s | Envoy CPU µs per request | non-2xx |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, _ in subjects:
        p = lat[n]
        shown = f"{p['p50']:.2f} / {p['p99']:.2f}" if "p50" in p and "p99" in p else "n/a"
        lines.append(f"| {n} | {shown} | {added(n, 'bare', 'p50')} / {added(n, 'bare', 'p99')} | "
                     f"{added(n, 'local rule', 'p50')} / {added(n, 'local rule', 'p99')} | "
                     f"{statistics.median(rps[n]):.0f} | {statistics.median(cpu[n]):.1f} | "
                     f"{bad[n] + lat[n]['non2xx']} |")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "rls.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
