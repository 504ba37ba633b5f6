#!/usr/bin/env python3
"""What each plugin costs inside Envoy: CPU per request, throughput and latency, side by side
with bare Envoy, Envoy's native local_ratelimit filter and an empty wasm filter.

Run by `./build.sh bench` (which builds the modules first). Every configuration runs in its own
Envoy (`--concurrency 1`, pinned to CPU 0), all started up front; an upstream Envoy answering
200 directly and the load generator `wrk` share CPU 1. Rounds are interleaved (A B C ... A B C
...), and each measurement is Envoy's own CPU time (user + system, from /proc/<pid>/stat) over
the interval divided by the requests served. Latency is measured separately at a fixed request
rate (wrk connections paced by `delay()`).

Then, when the `etcd` binary is there, idempotency with its records in etcd (1 and 3 members,
started on loopback ports) against the local store and no plugin: added p50/p99 latency,
claims/s and Envoy CPU per keyed POST (`--etcd-only` measures just that, into OUT_DIR/etcd.md).

Usage: envoy_bench.py ENVOY DIST_DIR EMPTY_MODULE OUT_DIR [--rounds N] [--seconds S]
Writes OUT_DIR/envoy.md and OUT_DIR/results.svg and prints the table.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

CLK_TCK = os.sysconf("SC_CLK_TCK")

HERE = os.path.dirname(os.path.abspath(__file__))
# The plugins' configurations; the harness bench records its traces with the same file.
# `EDGE_BENCH_CONFIGS` names another for both (a smaller idempotency table, say).
with open(os.environ.get("EDGE_BENCH_CONFIGS") or os.path.join(HERE, "plugin-configs.json")) as _f:
    PLUGIN_CONFIGS = json.load(_f)
RATE_LIMIT = PLUGIN_CONFIGS["rateLimit"]
FLAG_ROUTER = PLUGIN_CONFIGS["flagRouter"]
CACHED_FALLBACK = PLUGIN_CONFIGS["cachedFallback"]
IDEMPOTENCY = PLUGIN_CONFIGS["idempotency"]

# Lua for wrk: what each configuration's requests look like.
GET_API = 'wrk.method = "GET"\nwrk.path = "/api/items"\n'
FLAGGED = """
counter = 0
request = function()
  counter = counter + 1
  return wrk.format("GET", "/checkout", { ["x-user-id"] = "user-" .. counter })
end
"""
FRESH_POST = """
math.randomseed(os.time() + math.floor(os.clock() * 1000000))
prefix = tostring(math.random(1, 1000000000))
counter = 0
request = function()
  counter = counter + 1
  return wrk.format("POST", "/payments",
    { ["idempotency-key"] = prefix .. "-" .. counter, ["content-type"] = "application/json" },
    '{"amount":10}')
end
"""
GET_PAYMENTS = 'wrk.method = "GET"\nwrk.path = "/payments"\n'
# `x-replay` names the request type: a replay filter picks that type's trace by it. Every mix
# configuration sends it, so all serve the same requests.
CHAIN = """
math.randomseed(os.time() + math.floor(os.clock() * 1000000))
prefix = tostring(math.random(1, 1000000000))
counter = 0
request = function()
  counter = counter + 1
  local kind = counter % 4
  if kind == 0 then
    return wrk.format("POST", "/payments",
      { ["idempotency-key"] = prefix .. "-" .. counter, ["x-replay"] = "pay" }, '{"amount":10}')
  elseif kind == 1 then
    return wrk.format("GET", "/checkout", { ["x-user-id"] = "user-" .. counter, ["x-replay"] = "checkout" })
  else
    return wrk.format("GET", "/api/items", { ["x-replay"] = "api" })
  end
end
"""


def wasm_filter(name, path, config):
    return {
        "name": "envoy.filters.http.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": name,
                "root_id": name,
                "vm_config": {
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": path}},
                },
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": json.dumps(config),
                },
            },
        },
    }


NATIVE_RATELIMIT = {
    "name": "envoy.filters.http.local_ratelimit",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
        "stat_prefix": "bench",
        "token_bucket": {
            "max_tokens": 1000000000,
            "tokens_per_fill": 1000000000,
            "fill_interval": "1s",
        },
        "filter_enabled": {"default_value": {"numerator": 100, "denominator": "HUNDRED"}},
        "filter_enforced": {"default_value": {"numerator": 100, "denominator": "HUNDRED"}},
    },
}
BUFFER = {
    "name": "envoy.filters.http.buffer",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
        "max_request_bytes": 1048576,
    },
}


def replay_filters(traces_dir, replay_module, work):
    """A replay filter per trace file (`host-tests/benches/plugins.rs` writes them): its
    configuration is the trace, its module a copy of `bench/replay` that exports only the
    callbacks the traced plugin's module exports, since each is a crossing Envoy makes."""
    out = {}
    for f in sorted(os.listdir(traces_dir)):
        if not f.endswith(".json") or f == "burn.json":
            continue
        name = f[:-5]
        with open(os.path.join(traces_dir, f)) as fh:
            trace = json.load(fh)
        module = os.path.join(work, f"replay_{name}.wasm")
        shutil.copyfile(replay_module, module)
        subprocess.run([sys.executable, os.path.join(HERE, "..", "tools", "trim_callbacks.py"), module,
                        "--keep", ",".join(trace["exports"])], check=True, capture_output=True)
        out[name] = (trace, module)
    return out


def configurations(dist, empty, replays=None, burn=None):
    def mod(name):
        return os.path.join(dist, name + ".wasm")

    def rp(name, extra=None):
        trace, module = replays[name]
        return wasm_filter("replay_" + name, module, dict(trace, **(extra or {})))

    rl = wasm_filter("rate_limit", mod("rate_limit"), RATE_LIMIT)
    fr = wasm_filter("flag_router", mod("flag_router"), FLAG_ROUTER)
    cf = wasm_filter("cached_fallback", mod("cached_fallback"), CACHED_FALLBACK)
    idem = wasm_filter("idempotency", mod("idempotency"), IDEMPOTENCY)
    # (name, what the requests exercise, filters before the router, wrk Lua)
    configs = [
        ("bare", "Envoy alone (the floor)", [], GET_API),
        ("native local_ratelimit", "Envoy's C++ filter, never limiting", [NATIVE_RATELIMIT], GET_API),
        ("empty wasm", "a do-nothing proxy-wasm filter", [wasm_filter("empty", empty, {})], GET_API),
        ("rate_limit", "request allowed (one bucket per client)", [rl], GET_API),
        ("flag_router", "flag evaluated (fractional rollout, new user each request)", [fr], FLAGGED),
        ("cached_fallback", "200 response stored (GET /api/items)", [cf], GET_API),
        ("bare POST", "Envoy alone with the buffer filter, the POSTs below (their floor)", [BUFFER], FRESH_POST),
        ("idempotency POST", "POST with a fresh key: claimed, forwarded, stored", [idem, BUFFER], FRESH_POST),
        ("idempotency GET", "GET the plugin ignores", [idem, BUFFER], GET_PAYMENTS),
        ("bare mix", "Envoy alone with the buffer filter, the chain's mixed requests (its floor)", [BUFFER], CHAIN),
        ("4 empty wasm", "four do-nothing wasm filters, the chain's requests (the least four filters cost)",
         [wasm_filter(f"empty{i}", empty, {}) for i in range(3)] + [BUFFER, wasm_filter("empty3", empty, {})], CHAIN),
        ("full chain", "edge.yaml's four plugins, the same mixed requests", [rl, fr, idem, BUFFER, cf], CHAIN),
        ("edge.wasm", "the same four configurations as one filter (edge-single.yaml), the same requests",
         [wasm_filter("edge", mod("edge"), {"rateLimit": RATE_LIMIT, "flagRouter": FLAG_ROUTER,
                                            "idempotency": IDEMPOTENCY, "cachedFallback": CACHED_FALLBACK}),
          BUFFER], CHAIN),
    ]
    if not replays:
        return configs
    # A replay beside each target: the same requests, the plugin's recorded crossings only.
    shadows = {
        "rate_limit": ("replay rate_limit", [rp("rate_limit")]),
        "flag_router": ("replay flag_router", [rp("flag_router")]),
        "cached_fallback": ("replay cached_fallback", [rp("cached_fallback")]),
        "idempotency POST": ("replay idempotency POST", [rp("idempotency_post"), BUFFER]),
        "idempotency GET": ("replay idempotency GET", [rp("idempotency_get"), BUFFER]),
        "full chain": ("replay chain", [rp("chain_rate_limit"), rp("chain_flag_router"),
                                        rp("chain_idempotency"), BUFFER, rp("chain_cached_fallback")]),
        "edge.wasm": ("replay edge.wasm", [rp("edge"), BUFFER]),
    }
    out = []
    for c in configs:
        out.append(c)
        if c[0] in shadows:
            name, filters = shadows[c[0]]
            out.append((name, f"{c[0]}'s recorded crossings replayed (bench/replay), its requests", filters, c[3]))
        if c[0] == "rate_limit" and burn:
            out.append(("replay rate_limit + burn",
                        f"the rate_limit replay plus {burn['instructions']} wasm instructions per request",
                        [rp("rate_limit", {"burn": burn["rounds"]})], c[3]))
    return out


# Configurations whose filters are our plugins' modules (what `--compare` runs twice).
PLUGIN_CONFIGS_MEASURED = ("rate_limit", "flag_router", "cached_fallback", "idempotency POST",
                           "idempotency GET", "full chain", "edge.wasm")


def with_compared(configs, others):
    """`configs` with, after each plugin configuration, its twin from `others` (the same
    requests and filters, another build's modules), compared against the same bare Envoy."""
    twins = {c[0]: c for c in others}
    out = []
    for c in configs:
        out.append(c)
        if c[0] in PLUGIN_CONFIGS_MEASURED and c[0] in twins:
            name = f"{c[0]} (compared)"
            _, _, filters, script = twins[c[0]]
            out.append((name, f"{c[1]}; the compared build's modules", filters, script))
            if c[0] in FLOOR_OF:
                FLOOR_OF[name] = FLOOR_OF[c[0]]
    return out


def envoy_yaml(filters, upstream_port, direct, extra_clusters=()):
    route = (
        {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok " * 20}}}
        if direct
        else {"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}
    )
    cfg = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "main",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                                        "stat_prefix": "bench",
                                        "route_config": {
                                            "virtual_hosts": [
                                                {"name": "all", "domains": ["*"], "routes": [route]}
                                            ]
                                        },
                                        "http_filters": filters
                                        + [
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {
                                                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                                                },
                                            }
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": []
            if direct
            else [
                {
                    "name": "upstream",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": "upstream",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": "127.0.0.1",
                                                    "port_value": upstream_port,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ]
            + list(extra_clusters),
        },
    }
    return json.dumps(cfg)


class Envoy:
    def __init__(self, binary, name, yaml_text, cpu, workdir):
        self.name = name
        safe = re.sub(r"[^a-z0-9]+", "_", name.lower())
        self.config = os.path.join(workdir, safe + ".json")
        self.admin_file = os.path.join(workdir, safe + ".admin")
        self.log = open(os.path.join(workdir, safe + ".log"), "w")
        with open(self.config, "w") as f:
            f.write(yaml_text)
        self.proc = subprocess.Popen(
            ["taskset", "-c", str(cpu), binary, "-c", self.config, "--concurrency", "1",
             "--disable-hot-restart", "--base-id", str(abs(hash(safe + str(os.getpid()))) % 100000),
             "--admin-address-path", self.admin_file, "--log-level", "warning"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.admin = None
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"Envoy for '{name}' exited; see {self.log.name}")
            if os.path.exists(self.admin_file):
                addr = open(self.admin_file).read().strip()
                if addr:
                    try:
                        if self.get(f"http://{addr}/ready").strip() == "LIVE":
                            self.admin = addr
                            break
                    except OSError:
                        pass
            time.sleep(0.1)
        if self.admin is None:
            raise SystemExit(f"Envoy for '{name}' did not become ready; see {self.log.name}")
        listeners = json.loads(self.get(f"http://{self.admin}/listeners?format=json"))
        self.port = listeners["listener_statuses"][0]["local_address"]["socket_address"]["port_value"]

    @staticmethod
    def get(url):
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.read().decode()

    def counter(self, name):
        """A counter's value from the admin interface (0 when Envoy has no such stat)."""
        query = urllib.parse.quote(f"^{re.escape(name)}$")
        for line in self.get(f"http://{self.admin}/stats?filter={query}").splitlines():
            if line.startswith(name + ":"):
                return int(line.split(":", 1)[1])
        return 0

    def cpu_seconds(self):
        fields = open(f"/proc/{self.proc.pid}/stat").read().rsplit(")", 1)[1].split()
        # After the command name: state is field 3, utime 14 and stime 15 (1-based).
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def rss_kib(self):
        for line in open(f"/proc/{self.proc.pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def wrk(port, lua_path, seconds, connections, latency=False):
    cmd = ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", lua_path]
    if latency:
        cmd.append("--latency")
    cmd.append(f"http://127.0.0.1:{port}")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    if not m:
        raise SystemExit("cannot read wrk's output:\n" + out)
    requests = int(m.group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    result = {"requests": requests, "non2xx": int(bad.group(1)) if bad else 0,
              "socket_errors": errors.group(1) if errors else ""}
    if latency:
        for p in ("50", "99"):
            lm = re.search(rf"^\s+{p}(?:\.000)?%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
            if lm:
                v = float(lm.group(1))
                result["p" + p] = v / 1000 if lm.group(2) == "us" else v * (1000 if lm.group(2) == "s" else 1)
    return result


# Configurations whose requests include fresh idempotency keys, into a table of bounded size
# (`maxEntries`, 100,000 by default). Until every slot has held a record, a claim writes a
# shared-data entry Envoy has never had; after, it evicts an old record and rewrites its entry,
# as in a proxy that has run for a while. The harness records the replays' traces after that
# point (host-tests' `fill`), so the plugin is measured there too.
FILLED = ("idempotency POST", "full chain", "edge.wasm")
EVICTED = "wasmcustom.idempotency.evicted"
# Fresh-key POSTs per batch of the fill, and the most it sends (the harness needed 290,000).
FILL_SECONDS = 3
FILL_LIMIT = 600_000


def fill(envoy, fresh_post_lua, connections):
    """Sends fresh-key POSTs until nearly every claim evicts a record: the table is full.
    Returns the POSTs sent and the last batch's share of claims that evicted."""
    sent, share = 0, 0.0
    while sent < FILL_LIMIT:
        before = envoy.counter(EVICTED)
        n = wrk(envoy.port, fresh_post_lua, FILL_SECONDS, connections)["requests"]
        sent += n
        share = (envoy.counter(EVICTED) - before) / max(1, n)
        if share >= 0.995:
            break
    return sent, share


# The bare Envoy serving the same requests, where it is not `bare`.
FLOOR_OF = {"bare POST": "bare", "idempotency POST": "bare POST", "bare mix": "bare",
            "4 empty wasm": "bare mix", "full chain": "bare mix", "edge.wasm": "bare mix",
            "replay idempotency POST": "bare POST", "replay chain": "bare mix", "replay edge.wasm": "bare mix"}
# Each target's replay and the trace files of its filters (bench/out/traces/).
REPLAY_OF = {"rate_limit": ("replay rate_limit", ["rate_limit"]),
             "flag_router": ("replay flag_router", ["flag_router"]),
             "cached_fallback": ("replay cached_fallback", ["cached_fallback"]),
             "idempotency POST": ("replay idempotency POST", ["idempotency_post"]),
             "idempotency GET": ("replay idempotency GET", ["idempotency_get"]),
             "full chain": ("replay chain", ["chain_rate_limit", "chain_flag_router", "chain_idempotency",
                                             "chain_cached_fallback"]),
             "edge.wasm": ("replay edge.wasm", ["edge"])}
# Reference configurations (grey in the chart); the rest run our plugins.
FLOORS = ("bare", "native local_ratelimit", "empty wasm", "bare POST", "bare mix", "4 empty wasm")


def svg_chart(rows, path):
    width, bar_h, gap, left = 760, 22, 8, 190
    top = 40
    height = top + len(rows) * (bar_h + gap) + 30
    peak = max(r["median"] for r in rows) or 1
    scale = (width - left - 90) / peak
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="13">',
           f'<text x="{left}" y="22" font-size="15" font-weight="bold">Envoy CPU per request '
           f'(median µs, --concurrency 1)</text>']
    for i, r in enumerate(rows):
        y = top + i * (bar_h + gap)
        w = max(1, r["median"] * scale)
        colour = "#888" if r["name"] in FLOORS or r["name"].startswith("replay") else "#2b6cb0"
        out.append(f'<text x="{left - 8}" y="{y + 16}" text-anchor="end">{r["name"]}</text>')
        out.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{colour}"/>')
        out.append(f'<text x="{left + w + 6:.1f}" y="{y + 16}">{r["median"]:.1f} µs '
                   f'({r["median"] / rows[0]["median"]:.2f}×)</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


# --- idempotency with its records in etcd -------------------------------------------------------

IDEMPOTENCY_ETCD = dict(IDEMPOTENCY, store={"etcd": {"cluster": "etcd", "timeout": "500ms", "retries": 1}})


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdCluster:
    """n etcd members on loopback (pinned to CPU 1 with wrk and the upstream), each with its
    own data directory; ready when every member answers GET /health."""

    def __init__(self, n, workdir):
        ports = [(free_port(), free_port()) for _ in range(n)]
        self.client_ports = [c for c, _ in ports]
        cluster = ",".join(f"m{i}=http://127.0.0.1:{p}" for i, (_, p) in enumerate(ports))
        self.procs = []
        for i, (client, peer) in enumerate(ports):
            log = open(os.path.join(workdir, f"etcd{n}-m{i}.log"), "w")
            self.procs.append(subprocess.Popen(
                ["taskset", "-c", "1", "etcd", f"--name=m{i}",
                 f"--data-dir={os.path.join(workdir, f'etcd{n}-m{i}')}",
                 f"--listen-client-urls=http://127.0.0.1:{client}",
                 f"--advertise-client-urls=http://127.0.0.1:{client}",
                 f"--listen-peer-urls=http://127.0.0.1:{peer}",
                 f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                 f"--initial-cluster={cluster}", f"--initial-cluster-token=bench-{os.getpid()}-{n}",
                 "--initial-cluster-state=new", "--log-level=warn"],
                stdout=log, stderr=subprocess.STDOUT))
        deadline = time.time() + 30
        for port in self.client_ports:
            while True:
                try:
                    if '"true"' in Envoy.get(f"http://127.0.0.1:{port}/health"):
                        break
                except OSError:
                    pass
                if time.time() > deadline:
                    self.stop()
                    raise SystemExit(f"etcd ({n} members) did not become healthy")
                time.sleep(0.1)

    def cluster(self):
        """The Envoy cluster of the members, as envoy/idempotency-etcd.yaml writes it."""
        return {
            "name": "etcd", "type": "STATIC", "connect_timeout": "0.25s",
            "load_assignment": {"cluster_name": "etcd", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
                for p in self.client_ports]}]},
            "health_checks": [{"timeout": "0.5s", "interval": "1s", "no_traffic_interval": "1s",
                               "unhealthy_threshold": 1, "healthy_threshold": 1,
                               "http_health_check": {"path": "/health"}}],
            "outlier_detection": {"split_external_local_origin_errors": True,
                                  "consecutive_local_origin_failure": 1, "consecutive_5xx": 3,
                                  "interval": "1s", "base_ejection_time": "2s", "max_ejection_percent": 100},
        }

    def txn_ms(self, n=300):
        """Median of `n` direct insert-if-absent transactions (one kept-alive connection): the
        round trip the plugin pays per claim, without Envoy."""
        import base64
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.client_ports[0], timeout=5)
        times = []
        for i in range(n):
            k = base64.b64encode(f"bench/direct/{os.getpid()}/{i}".encode()).decode()
            body = json.dumps({"compare": [{"key": k, "target": "CREATE", "create_revision": "0"}],
                               "success": [{"request_put": {"key": k, "value": "eA=="}}],
                               "failure": [{"request_range": {"key": k}}]})
            t0 = time.perf_counter()
            conn.request("POST", "/v3/kv/txn", body, {"content-type": "application/json"})
            conn.getresponse().read()
            times.append((time.perf_counter() - t0) * 1000)
        conn.close()
        return statistics.median(times)

    def stop(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def etcd_bench(args, work, upstream):
    """Keyed POSTs (a fresh key each: claimed, forwarded, recorded) with the records in etcd (1
    and 3 members), against the local store and no plugin: added p50/p99 latency at a fixed
    rate, claims/s at full load, and Envoy's CPU per keyed POST. Returns the markdown lines."""
    dist = os.path.abspath(args.dist)
    idem_local = wasm_filter("idempotency", os.path.join(dist, "idempotency.wasm"), IDEMPOTENCY)
    idem_etcd = wasm_filter("idempotency", os.path.join(dist, "idempotency.wasm"), IDEMPOTENCY_ETCD)
    rows = {}
    direct = {}
    lua = os.path.join(work, "etcd_fresh_post.lua")
    with open(lua, "w") as f:
        f.write(FRESH_POST)
    paced = lua + ".paced.lua"
    # Paced well under what etcd sustains here (a few hundred claims/s on 2 CPUs), so the
    # latency is a request's own, not a queue's.
    conns = 10
    delay_ms = max(1, round(conns * 1000 / args.etcd_paced_rps))
    with open(paced, "w") as f:
        f.write(FRESH_POST + f"\ndelay = function() return {delay_ms} end\n")
    plan = [("bare POST", None, [BUFFER]), ("local store", None, [idem_local, BUFFER]),
            ("etcd, 1 member", 1, [idem_etcd, BUFFER]), ("etcd, 3 members", 3, [idem_etcd, BUFFER])]
    for name, members, filters in plan:
        etcd = EtcdCluster(members, work) if members else None
        e = None
        try:
            clusters = [etcd.cluster()] if etcd else []
            e = Envoy(args.envoy, "etcd bench " + name, envoy_yaml(filters, upstream.port, False, clusters), 0, work)
            wrk(e.port, lua, 1, args.connections)
            cpu, rps, bad = [], [], 0
            for _ in range(args.rounds):
                before, t0 = e.cpu_seconds(), time.time()
                r = wrk(e.port, lua, args.seconds, args.connections)
                elapsed = time.time() - t0
                cpu.append((e.cpu_seconds() - before) * 1e6 / max(1, r["requests"]))
                rps.append(r["requests"] / elapsed)
                bad += r["non2xx"]
            lat = wrk(e.port, paced, args.seconds, conns, latency=True)
            rows[name] = {"cpu": statistics.median(cpu), "rps": statistics.median(rps),
                          "p50": lat.get("p50"), "p99": lat.get("p99"), "bad": bad + lat["non2xx"]}
            if etcd:
                direct[name] = etcd.txn_ms()
            print(f"etcd bench: {name} done", flush=True)
        finally:
            if e:
                e.stop()
            if etcd:
                etcd.stop()

    def added(name, floor, key):
        a, b = rows[name].get(key), rows[floor].get(key)
        return f"{a - b:+.2f}" if a is not None and b is not None else "n/a"

    lines = [
        "## Idempotency with records in etcd",
        "",
        "POSTs with a fresh key each (claimed, forwarded, recorded: two etcd transactions), Envoy "
        "`--concurrency 1` on CPU 0; etcd, wrk and the upstream share CPU 1, so claims/s is bound by "
        f"etcd's share of that CPU. Latency paced at about {args.etcd_paced_rps} requests/s "
        f"(10 connections); claims/s and CPU at {args.connections} connections.",
        "",
        "| configuration | p50 / p99 ms | added p50 / p99 over no plugin | added p50 / p99 over the local store | direct txn p50 ms | claims/s (requests/s) | Envoy CPU µs per keyed POST | non-2xx |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, _, _ in plan:
        r = rows[name]
        lat = f"{r['p50']:.2f} / {r['p99']:.2f}" if r["p50"] is not None and r["p99"] is not None else "n/a"
        txn = f"{direct[name]:.2f}" if name in direct else ""
        lines.append(
            f"| {name} | {lat} | {added(name, 'bare POST', 'p50')} / {added(name, 'bare POST', 'p99')} | "
            f"{added(name, 'local store', 'p50')} / {added(name, 'local store', 'p99')} | {txn} | "
            f"{r['rps']:.0f} | {r['cpu']:.1f} | {r['bad']} |"
        )
    lines.append("")
    for name in ("etcd, 1 member", "etcd, 3 members"):
        r, floor = rows[name], rows["local store"]
        if r["p50"] is not None and floor["p50"] is not None:
            own = r["p50"] - floor["p50"] - 2 * direct[name]
            lines.append(f"- {name}: added p50 over the local store {r['p50'] - floor['p50']:.2f} ms, of which "
                         f"two etcd round trips (claim, completion) are {2 * direct[name]:.2f} ms measured "
                         f"directly: the plugin's own part is about {own:.2f} ms (target < 1 ms: "
                         f"**{'pass' if own < 1 else 'missed'}**)")
    return lines


def crossings(trace):
    """Callbacks and hostcalls (and the guest allocations Envoy makes to hand data over) per
    request of a trace file, weighted by each request type's share of the load."""
    counts = {}
    for kind, share in trace["shares"].items():
        for cb in trace["traces"][kind]:
            counts["callbacks"] = counts.get("callbacks", 0) + share
            for call in cb["calls"]:
                counts[call["op"]] = counts.get(call["op"], 0) + share
    return counts


# A run is judged only when it can tell configurations apart: the middle half of bare Envoy's
# rounds within this share of their median (one slow round is the machine's and the median
# absorbs it), and no replay dearer than the plugin it replays (it makes the same crossings
# and none of the work, so a dearer one is noise).
MAX_BARE_SPREAD = 0.15


def run_problems(rows):
    """Why this run's ratios cannot judge the targets (empty when they can)."""
    by = {r["name"]: r for r in rows}
    out = []
    for name in ("bare", "bare POST", "bare mix"):
        r = by.get(name)
        if not r or "middle" not in r:
            continue
        low, high = r["middle"]
        if high - low > MAX_BARE_SPREAD * r["median"]:
            out.append(f"the middle half of {name}'s rounds spread {low:.1f}–{high:.1f} µs around a "
                       f"median of {r['median']:.1f} (more than {MAX_BARE_SPREAD:.0%})")
    for target, (replay, _) in REPLAY_OF.items():
        if target in by and replay in by and by[replay]["median"] > by[target]["median"]:
            out.append(f"{replay} ({by[replay]['median']:.1f} µs) cost more than {target} "
                       f"({by[target]['median']:.1f} µs), which makes the same crossings and does the work")
    return out


def floor_section(medians, replays, burn, unrecorded):
    """Each target's floor, measured in this run: what its replay (the same crossings, no
    policy) added over the same bare Envoy, plus the plugin's wasm instructions beyond the
    replay's (harness fuel) at the cost per instruction the burn measured. Returns the
    markdown lines and, per target, its figures."""
    out = {"lines": []}
    plain, burned = medians.get("replay rate_limit"), medians.get("replay rate_limit + burn")
    if plain is None or burned is None or not burn:
        return out
    ns = (burned - plain) * 1000 / burn["instructions"]
    lines = [
        "## Floor",
        "",
        "What each target's decisions cannot avoid, measured in this run: its **replay** "
        "(bench/replay: the plugin's recorded callbacks and hostcalls, same kinds, sizes and order, "
        "no policy work) added over the same bare Envoy, plus the plugin's wasm instructions beyond the "
        f"replay's own (harness fuel) at **{ns:.3f} ns per instruction**: the rate_limit replay with "
        f"{burn['instructions']} instructions more per request cost {burned - plain:+.1f} µs "
        f"({burned:.1f} against {plain:.1f} µs). Traces: `bench/out/traces/` (host-tests/benches/plugins.rs).",
        "",
        "| target | measured added µs | replay added µs | instructions beyond the replay | their µs | floor µs | measured ÷ floor | measured − floor µs | the replay's crossings per request | replay µs per crossing |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (replay, files) in REPLAY_OF.items():
        if name not in medians or replay not in medians or any(f not in replays for f in files):
            continue
        base = medians[FLOOR_OF.get(name, "bare")]
        measured, crossed = medians[name] - base, medians[replay] - base
        instructions, counts = 0.0, {}
        for f in files:
            trace = replays[f][0]
            for kind, share in trace["shares"].items():
                instructions += share * (trace["fuel"][kind] - trace["replay_fuel"].get(kind, 0))
            for k, v in crossings(trace).items():
                counts[k] = counts.get(k, 0) + v
        instr_us = instructions * ns / 1000
        floor = crossed + instr_us
        ratio = measured / floor if floor > 0 else float("inf")
        out[name] = {"ratio": ratio, "floor": floor}
        total = sum(counts.values())
        parts = [f"{counts.pop('callbacks', 0):g} callbacks"] + [
            f"{k} {v:g}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
        lines.append(f"| {name} | {measured:.1f} | {crossed:.1f} | {instructions:.0f} | {instr_us:.1f} | "
                     f"{floor:.1f} | {ratio:.2f} | {measured - floor:+.1f} | {', '.join(parts)} | "
                     f"{crossed / total if total else 0:.2f} |")
    lines.append("")
    missing = {k: v for k, v in unrecorded.items() if v > 0}
    lines.append("Callbacks Envoy made into a replay that its trace does not have (per request; each is a "
                 "crossing the harness did not record, so the replay may miss its hostcalls): "
                 + (", ".join(f"{k} {v:.2f}" for k, v in sorted(missing.items())) if missing else "none") + ".")
    lines.append("")
    out["lines"] = lines
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("envoy")
    ap.add_argument("dist")
    ap.add_argument("empty")
    ap.add_argument("out")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--paced-rps", type=int, default=1000)
    ap.add_argument("--etcd-paced-rps", type=int, default=100)
    ap.add_argument("--etcd-only", action="store_true",
                    help="measure only idempotency with etcd (needs the etcd binary)")
    ap.add_argument("--traces", default=os.path.join(HERE, "out", "traces"),
                    help="the harness's traces (cargo bench -p host-tests --bench plugins); "
                         "without them no replays and no floor")
    ap.add_argument("--replay", default=os.path.join(HERE, "..", "target", "modules", "replay_filter.wasm"),
                    help="the replay module (bench/replay, built by ./build.sh)")
    ap.add_argument("--only", default="",
                    help="comma-separated configurations to measure (their floors, bare and the empty "
                         "filter are added); for development runs")
    ap.add_argument("--no-etcd", action="store_true", help="skip the etcd measurements")
    ap.add_argument("--compare", default="",
                    help="another build's dist directory: each plugin configuration also runs with its "
                         "modules, named '<configuration> (compared)', in the same interleaved rounds; "
                         "for A/B runs of a build setting")
    args = ap.parse_args()
    if os.cpu_count() < 2:
        raise SystemExit("the bench pins Envoy and wrk to separate CPUs: it needs 2")

    work = tempfile.mkdtemp(prefix="edge-bench-")
    if args.etcd_only:
        upstream = Envoy(args.envoy, "upstream", envoy_yaml([BUFFER], 0, True), 1, work)
        try:
            lines = etcd_bench(args, work, upstream)
        finally:
            upstream.stop()
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "etcd.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        print("\n".join(lines))
        return
    envoys = []
    etcd_lines = []
    try:
        # The upstream reads a request's body before it answers: answering first would make it
        # close the connection, and every POST would pay for a new one.
        upstream = Envoy(args.envoy, "upstream", envoy_yaml([BUFFER], 0, True), 1, work)
        envoys.append(upstream)
        replays, burn = None, None
        if os.path.isdir(args.traces) and os.path.exists(args.replay):
            replays = replay_filters(args.traces, args.replay, work)
            burn_file = os.path.join(args.traces, "burn.json")
            if os.path.exists(burn_file):
                with open(burn_file) as f:
                    burn = json.load(f)
        else:
            print(f"no traces in {args.traces} or no {args.replay}: no replays, no floor", flush=True)
        configs = configurations(os.path.abspath(args.dist), os.path.abspath(args.empty), replays, burn)
        if args.compare:
            configs = with_compared(configs, configurations(os.path.abspath(args.compare),
                                                             os.path.abspath(args.empty)))
        if args.only:
            wanted = {w.strip() for w in args.only.split(",")} | {"bare", "empty wasm"}
            for w in list(wanted):
                if w in REPLAY_OF:
                    wanted |= {REPLAY_OF[w][0], "replay rate_limit", "replay rate_limit + burn"}
            for w in list(wanted):
                while w in FLOOR_OF:
                    w = FLOOR_OF[w]
                    wanted.add(w)
            for w in list(wanted):
                wanted.add(FLOOR_OF.get(w, "bare"))
            configs = [c for c in configs if c[0] in wanted or c[0].removesuffix(" (compared)") in wanted]
        lua = {}
        for name, _, filters, script in configs:
            envoys.append(Envoy(args.envoy, name, envoy_yaml(filters, upstream.port, False), 0, work))
            path = os.path.join(work, re.sub(r"[^a-z0-9]+", "_", name.lower()) + ".lua")
            with open(path, "w") as f:
                f.write(script)
            lua[name] = path
        subjects = envoys[1:]
        fresh_post = os.path.join(work, "fill.lua")
        with open(fresh_post, "w") as f:
            f.write(FRESH_POST)
        served = {}
        print(f"warming up {len(subjects)} Envoys ...", flush=True)
        for e in subjects:
            if e.name.removesuffix(" (compared)") in FILLED:
                sent, share = fill(e, fresh_post, args.connections)
                print(f"  {e.name}: table full after {sent} fresh POSTs ({share:.1%} of the last "
                      f"batch's claims evicted a record)", flush=True)
            served[e.name] = wrk(e.port, lua[e.name], 1, args.connections)["requests"]
        # After the fill: what the measured run itself adds.
        rss_start = {e.name: e.rss_kib() for e in subjects}
        samples = {e.name: [] for e in subjects}
        rates = {e.name: [] for e in subjects}
        problems = {e.name: 0 for e in subjects}
        for rnd in range(args.rounds):
            for e in subjects:
                before, t0 = e.cpu_seconds(), time.time()
                r = wrk(e.port, lua[e.name], args.seconds, args.connections)
                cpu, elapsed = e.cpu_seconds() - before, time.time() - t0
                samples[e.name].append(cpu * 1e6 / max(1, r["requests"]))
                rates[e.name].append(r["requests"] / elapsed)
                problems[e.name] += r["non2xx"]
                served[e.name] += r["requests"]
            print(f"round {rnd + 1}/{args.rounds} done", flush=True)
        # Callbacks Envoy made into a replay that its trace did not record: the replay (and so
        # the floor) is missing them.
        unrecorded = {e.name: e.counter("wasmcustom.replay_unrecorded") / max(1, served[e.name])
                      for e in subjects if e.name.startswith("replay")}
        # Latency at a fixed rate: connections paced by delay().
        conns = 10
        delay_ms = max(1, round(conns * 1000 / args.paced_rps))
        latency = {}
        for e in subjects:
            paced = lua[e.name] + ".paced.lua"
            with open(paced, "w") as f:
                f.write(open(lua[e.name]).read() + f"\ndelay = function() return {delay_ms} end\n")
            latency[e.name] = wrk(e.port, paced, args.seconds, conns, latency=True)
        rss_end = {e.name: e.rss_kib() for e in subjects}
        if args.no_etcd:
            etcd_lines = []
        elif shutil.which("etcd"):
            etcd_lines = etcd_bench(args, work, upstream)
        else:
            etcd_lines = ["## Idempotency with records in etcd", "",
                          "Not measured: the `etcd` binary (Debian package etcd-server) is missing."]
    finally:
        for e in envoys:
            e.stop()

    rows = []
    for e in subjects:
        s = samples[e.name]
        middle = sorted(s)[len(s) // 4:len(s) - len(s) // 4] or s
        rows.append({"name": e.name, "median": statistics.median(s), "min": min(s), "max": max(s),
                     "middle": (min(middle), max(middle)),
                     "rps": statistics.median(rates[e.name]),
                     "p50": latency[e.name].get("p50"), "p99": latency[e.name].get("p99"),
                     "non2xx": problems[e.name], "rss": (rss_start[e.name], rss_end[e.name])})
    bare = rows[0]["median"]
    empty = next(r for r in rows if r["name"] == "empty wasm")["median"]
    empty_added = empty - bare
    what = {name: desc for name, desc, _, _ in configs}

    lines = [
        "# Benchmarks: what each plugin costs inside Envoy",
        "",
        f"Envoy 1.40.0, `--concurrency 1` pinned to CPU 0; wrk (1 thread, {args.connections} connections) "
        f"and an upstream Envoy answering 200 share CPU 1. {args.rounds} interleaved rounds of "
        f"{args.seconds} s per configuration; CPU is Envoy's user + system time over each round "
        "divided by the requests it served. Latency: a separate run paced at about "
        f"{args.paced_rps} requests/s (10 connections, wrk `delay()`). Machine: {os.cpu_count()} CPUs.",
        "",
        "Each configuration is compared with the bare Envoy that serves the same requests: `bare` "
        "for GETs, `bare POST` for the idempotent POSTs, `bare mix` for the chain's mixed requests.",
        "",
        "| configuration | requests | CPU µs/request (median, min–max) | × bare | added over its bare | added ÷ empty wasm's | requests/s | p50 / p99 ms at fixed rate | RSS KiB start → end |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    medians = {r["name"]: r["median"] for r in rows}
    for r in rows:
        floor = medians[FLOOR_OF.get(r["name"], "bare")]
        added = r["median"] - floor
        ratio_empty = (added / empty_added) if empty_added > 0 and r["name"] not in ("bare", "bare POST", "bare mix") else None
        lat = (f"{r['p50']:.2f} / {r['p99']:.2f}" if r["p50"] is not None and r["p99"] is not None else "n/a")
        lines.append(
            f"| {r['name']} | {what[r['name']]} | {r['median']:.1f} ({r['min']:.1f}–{r['max']:.1f}) | "
            f"{r['median'] / floor:.2f} | {added:+.1f} | "
            f"{'' if ratio_empty is None else f'{ratio_empty:.2f}'} | {r['rps']:.0f} | {lat} | "
            f"{r['rss'][0]} → {r['rss'][1]} |"
        )
    bad = {k: v for k, v in problems.items() if v}
    lines.append("")
    if bad:
        lines.append(f"Non-2xx answers during the runs (should be none): {bad}")
        lines.append("")
    floors = floor_section(medians, replays, burn, unrecorded) if replays else {}
    lines += floors.get("lines", [])
    lines.append("## Targets")
    lines.append("")
    lines.append("Each target is met, or within 10 % of its floor (the Floor section), or missed.")
    lines.append("")
    problems_of_run = run_problems(rows)
    if problems_of_run:
        lines.append("**This run judges no target**: the machine's noise exceeds the differences "
                     "it would measure. " + "; ".join(problems_of_run) + ". Its ratios are printed "
                     "for the record only; run `./build.sh bench` again on a quieter machine.")
        lines.append("")

    def verdict(name, met):
        if problems_of_run:
            return "not judged (noisy run)"
        if met:
            return "met"
        f = floors.get(name)
        if f and f["ratio"] <= 1.1:
            return f"within 10 % of its floor ({f['ratio']:.2f} × its floor)"
        return f"missed ({f['ratio']:.2f} × its floor)" if f else "missed"

    # Added CPU over the configuration's bare Envoy, as a multiple of the empty filter's.
    for name, target in (("rate_limit", 2.0), ("flag_router", 1.8), ("cached_fallback", 2.5),
                         ("idempotency POST", 4.0), ("idempotency GET", 1.3)):
        if name not in medians:
            continue
        floor_name = FLOOR_OF.get(name, "bare")
        added = medians[name] - medians[floor_name]
        ratio = added / empty_added if empty_added > 0 else float("inf")
        against = f" over {floor_name}" if floor_name != "bare" else ""
        lines.append(f"- {name}: added {added:.1f} µs{against} = {ratio:.2f} × the empty filter's "
                     f"{empty_added:.1f} µs; target ≤ {target}: **{verdict(name, ratio <= target)}**")
    if "bare mix" in medians:
        mix = medians["bare mix"]
        for name, target in (("full chain", 2.0), ("edge.wasm", 1.5)):
            if name not in medians:
                continue
            m = medians[name]
            lines.append(f"- {name}: {m:.1f} µs/request = {m / mix:.2f} × bare on the same requests "
                         f"({mix:.1f} µs); target ≤ {target}: **{verdict(name, m <= target * mix)}**")
        if {"4 empty wasm", "full chain", "edge.wasm"} <= medians.keys():
            four = medians["4 empty wasm"]
            lines.append(f"- four empty wasm filters alone: {four / mix:.2f} × bare; one edge.wasm filter saves "
                         f"{medians['full chain'] - medians['edge.wasm']:.1f} µs/request over the chain")
    lines += [""] + etcd_lines
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "envoy.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    svg_chart(rows, os.path.join(args.out, "results.svg"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
