//! Wasm instructions per request for each plugin and path, from the harness's fuel metering
//! (deterministic, so comparable across commits), and request lifecycles per second through
//! each plugin in the harness. Run by `./build.sh bench`; prints a Markdown table.

use host_tests::{module_path, Edge, Module, Plugin, Request, Upstream};
use std::collections::BTreeMap;
use std::time::Instant;

struct Case {
    plugin: &'static str,
    path: &'static str,
    config: String,
    /// Sets the edge up (e.g. stores a response first); returns the request to measure.
    setup: fn(&mut Edge) -> anyhow::Result<()>,
    request: fn(u64) -> Request,
}

const RATE: &str = r#"{"rules":[{"name":"api","match":{"pathPrefix":"/api/"},
  "key":[{"source":"clientIp"}],"limit":{"requests":1000000000,"window":"1s"}}]}"#;
const RATE_TIGHT: &str = r#"{"rules":[{"name":"api","match":{"pathPrefix":"/api/"},
  "key":[{"source":"clientIp"}],"limit":{"requests":1,"window":"1h"}}]}"#;
const FLAGS: &str = r#"{"targetingKey":{"header":"x-user-id"},"context":{"tier":{"header":"x-tier"}},
  "headers":{"new-checkout":"x-route-checkout"},"flags":{"new-checkout":{"state":"ENABLED",
  "variants":{"v1":"v1","v2":"v2"},"defaultVariant":"v1","targeting":{"if":[
  {"==":[{"var":"tier"},"beta"]},"v2",{"fractional":[["v1",80],["v2",20]]}]}}}}"#;
const CACHED: &str = r#"{"routes":[{"pathPrefix":"/api/"}],"maxEntries":10000}"#;
const IDEM: &str = r#"{"routes":[{"pathPrefix":"/payments"}],"required":true,"scope":[]}"#;

fn none(_: &mut Edge) -> anyhow::Result<()> {
    Ok(())
}

fn api(_: u64) -> Request {
    Request::get("/api/items").from("10.0.0.1:1000")
}

fn pay(n: u64) -> Request {
    Request::post("/payments")
        .header("idempotency-key", &format!("key-{n}"))
        .body("{\"amount\":10}")
}

/// The four configurations above as `edge.wasm`'s sections.
fn edge_config() -> String {
    format!(
        r#"{{"rateLimit":{RATE},"flagRouter":{FLAGS},"idempotency":{IDEM},"cachedFallback":{CACHED}}}"#
    )
}

fn cases() -> Vec<Case> {
    let edge = |path, request: fn(u64) -> Request| Case {
        plugin: "edge",
        path,
        config: edge_config(),
        setup: none,
        request,
    };
    vec![
        Case {
            plugin: "rate_limit",
            path: "allowed, known client",
            config: RATE.into(),
            setup: |e| e.send(api(0)).map(drop),
            request: api,
        },
        Case {
            plugin: "rate_limit",
            path: "allowed, new client",
            config: RATE.into(),
            setup: none,
            request: |n| {
                Request::get("/api/items").from(&format!(
                    "10.{}.{}.{}:1000",
                    (n >> 16) & 255,
                    (n >> 8) & 255,
                    n & 255
                ))
            },
        },
        Case {
            plugin: "rate_limit",
            path: "limited (local 429)",
            config: RATE_TIGHT.into(),
            setup: |e| e.send(api(0)).map(drop),
            request: api,
        },
        Case {
            plugin: "rate_limit",
            path: "not matched",
            config: RATE.into(),
            setup: none,
            request: |_| Request::get("/health"),
        },
        Case {
            plugin: "flag_router",
            path: "fractional rollout",
            config: FLAGS.into(),
            setup: none,
            request: |n| Request::get("/checkout").header("x-user-id", &format!("user-{n}")),
        },
        Case {
            plugin: "flag_router",
            path: "targeting match",
            config: FLAGS.into(),
            setup: none,
            request: |_| Request::get("/checkout").header("x-tier", "beta"),
        },
        Case {
            plugin: "cached_fallback",
            path: "store (200 kept)",
            config: CACHED.into(),
            setup: none,
            request: api,
        },
        Case {
            plugin: "cached_fallback",
            path: "serve (503 replaced)",
            config: CACHED.into(),
            setup: |e| {
                e.send(api(0))?;
                e.set_upstream(|_| Upstream::status(503));
                Ok(())
            },
            request: api,
        },
        Case {
            plugin: "cached_fallback",
            path: "not covered",
            config: CACHED.into(),
            setup: none,
            request: |_| Request::get("/health"),
        },
        Case {
            plugin: "idempotency",
            path: "first POST (fresh key)",
            config: IDEM.into(),
            setup: none,
            request: pay,
        },
        Case {
            plugin: "idempotency",
            path: "replay",
            config: IDEM.into(),
            setup: |e| e.send(pay(0)).map(drop),
            request: |_| pay(0),
        },
        Case {
            plugin: "idempotency",
            path: "GET (ignored)",
            config: IDEM.into(),
            setup: none,
            request: |_| Request::get("/payments"),
        },
        // One filter for all four: the paths of the chain's mix.
        edge("GET /api/ (limited rule, stored)", |_| api(0)),
        edge("GET /checkout (fractional rollout)", |n| {
            Request::get("/checkout").header("x-user-id", &format!("user-{n}"))
        }),
        edge("POST /payments (fresh key)", pay),
        edge("GET /health (no policy applies)", |_| {
            Request::get("/health")
        }),
    ]
}

/// `after - before` per name, largest first, as `name n` items.
fn delta<K: Ord + Copy + std::fmt::Display>(
    before: &BTreeMap<K, u64>,
    after: &BTreeMap<K, u64>,
) -> String {
    let mut d: Vec<(u64, K)> = after
        .iter()
        .map(|(k, v)| (v - before.get(k).copied().unwrap_or(0), *k))
        .filter(|(n, _)| *n > 0)
        .collect();
    d.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    d.iter()
        .map(|(n, k)| format!("{} {n}", k.to_string().trim_start_matches("proxy_")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Hostcalls that hand data to the VM: Envoy allocates in the guest for each (about 1 µs with
/// the allocation, bench/README.md); the others cost about 0.2 µs.
const DATA_HOSTCALLS: [&str; 6] = [
    "proxy_get_header_map_value",
    "proxy_get_header_map_pairs",
    "proxy_get_property",
    "proxy_get_shared_data",
    "proxy_get_buffer_bytes",
    "proxy_get_status",
];

/// One request's Envoy CPU by bench/README.md's cost model, from what the harness counted:
/// callbacks 1 µs, data hostcalls 1 µs, other hostcalls 0.2 µs, 0.25 ns per instruction.
fn model_us(callbacks: u64, hostcalls: &BTreeMap<&str, u64>, instructions: u64) -> f64 {
    let (data, other) =
        hostcalls
            .iter()
            .filter(|(k, _)| !k.starts_with('('))
            .fold((0, 0), |(d, o), (k, n)| {
                if DATA_HOSTCALLS.contains(k) {
                    (d + n, o)
                } else {
                    (d, o + n)
                }
            });
    callbacks as f64 + data as f64 + 0.2 * other as f64 + instructions as f64 * 0.25e-3
}

/// `after - before` per name.
fn diff<'a>(
    before: &BTreeMap<&'a str, u64>,
    after: &BTreeMap<&'a str, u64>,
) -> BTreeMap<&'a str, u64> {
    after
        .iter()
        .map(|(k, v)| (*k, v - before.get(k).copied().unwrap_or(0)))
        .collect()
}

fn fuel(edge: &Edge) -> BTreeMap<&'static str, u64> {
    edge.costs(0)
        .into_iter()
        .map(|(k, v)| (k, v.fuel))
        .collect()
}

fn callbacks(edge: &Edge) -> u64 {
    edge.costs(0).values().map(|c| c.calls).sum()
}

/// `--loop PLUGIN/PATH SECONDS`: sends that case's request over and over, for a sampling
/// profiler to attribute the guest's time to its functions (bench/README.md, "Profiling").
fn repeat(which: &str, seconds: f64) -> anyhow::Result<()> {
    let Some(case) = cases()
        .into_iter()
        .find(|c| format!("{}/{}", c.plugin, c.path).starts_with(which))
    else {
        anyhow::bail!("no case starts with {which:?}");
    };
    let mut edge = build(&case)?;
    let t = Instant::now();
    let mut n = 0u64;
    while t.elapsed().as_secs_f64() < seconds {
        edge.send((case.request)(n + 1))?;
        n += 1;
    }
    eprintln!("{n} requests of {}/{}", case.plugin, case.path);
    Ok(())
}

fn build(case: &Case) -> anyhow::Result<Edge> {
    let module = Module::from_file(module_path(case.plugin))?;
    let mut edge = Edge::builder()
        .plugin(Plugin::new(&module, case.config.as_str()))
        .upstream(|_| {
            Upstream::ok("{\"items\":[1,2,3]}").header("content-type", "application/json")
        })
        .build()?;
    (case.setup)(&mut edge)?;
    // The first request of a path defines counters and warms caches: measure the second.
    edge.send((case.request)(0))?;
    Ok(edge)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--loop") {
        let which = args.get(i + 1).map_or("", String::as_str);
        let secs = args.get(i + 2).and_then(|s| s.parse().ok()).unwrap_or(5.0);
        return repeat(which, secs);
    }
    let mut profile = Vec::new();
    let mut models = Vec::new();
    println!("| plugin | path | wasm instructions / request | harness lifecycles/s |");
    println!("|---|---|---|---|");
    for case in cases() {
        let mut edge = build(&case)?;
        let (fuel0, calls0, entries0) = (fuel(&edge), edge.hostcalls(0), callbacks(&edge));
        let used = edge.send((case.request)(1))?.fuel;
        let model = model_us(
            callbacks(&edge) - entries0,
            &diff(&calls0, &edge.hostcalls(0)),
            used,
        );
        models.push((case.plugin, case.path, model));
        profile.push(format!(
            "| {} | {} | {} | {} | {model:.1} |",
            case.plugin,
            case.path,
            delta(&fuel0, &fuel(&edge)),
            delta(&calls0, &edge.hostcalls(0))
        ));
        let n = 2000u64;
        let t = Instant::now();
        for i in 0..n {
            edge.send((case.request)(i + 2))?;
        }
        let rate = n as f64 / t.elapsed().as_secs_f64();
        println!("| {} | {} | {used} | {rate:.0} |", case.plugin, case.path);
    }
    println!();
    println!(
        "Where one request goes: wasm instructions per callback, and the crossings into Envoy"
    );
    println!("(hostcalls, and guest allocations Envoy makes to hand data over), and the Envoy CPU");
    println!("that makes by bench/README.md's cost model.");
    println!();
    println!("| plugin | path | instructions per callback | hostcalls | cost model µs |");
    println!("|---|---|---|---|---|");
    for line in profile {
        println!("{line}");
    }
    // The Envoy bench's chain mix: half GET /api/, a quarter fresh POSTs, a quarter /checkout.
    let edge = |path: &str| {
        models
            .iter()
            .find(|(p, q, _)| *p == "edge" && q.starts_with(path))
            .map_or(0.0, |(_, _, m)| *m)
    };
    let mix =
        0.5 * edge("GET /api/") + 0.25 * edge("POST /payments") + 0.25 * edge("GET /checkout");
    println!();
    println!("- edge.wasm on the Envoy bench's chain mix, by the cost model: {mix:.1} µs added per request");
    Ok(())
}
