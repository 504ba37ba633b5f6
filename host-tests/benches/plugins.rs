//! Wasm instructions per request for each plugin and path, from the harness's fuel metering
//! (deterministic, so comparable across commits), and request lifecycles per second through
//! each plugin in the harness; then the traces of the Envoy bench's paths that its replays
//! need (`bench/out/traces/`, bench/README.md "The floor"; `--traces` writes only those). Run
//! by `./build.sh bench`; prints Markdown.

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

/// Rollout requests of users enough for both variants' counters to exist: the measured
/// request then defines none, as at steady state.
fn every_variant(e: &mut Edge) -> anyhow::Result<()> {
    for i in 0..16 {
        e.send(Request::get("/checkout").header("x-user-id", &format!("warm-{i}")))?;
    }
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
    let edge = |path, setup, request: fn(u64) -> Request| Case {
        plugin: "edge",
        path,
        config: edge_config(),
        setup,
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
            setup: every_variant,
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
        edge("GET /api/ (limited rule, stored)", none, |_| api(0)),
        edge("GET /checkout (fractional rollout)", every_variant, |n| {
            Request::get("/checkout").header("x-user-id", &format!("user-{n}"))
        }),
        edge("POST /payments (fresh key)", none, pay),
        edge("GET /health (no policy applies)", none, |_| {
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

fn fuel(edge: &Edge) -> BTreeMap<&'static str, u64> {
    edge.costs(0)
        .into_iter()
        .map(|(k, v)| (k, v.fuel))
        .collect()
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
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let traces = root.join("bench").join("out").join("traces");
    // `--traces`: only the traces of the Envoy bench's paths.
    if args.iter().any(|a| a == "--traces") {
        return write_traces(&traces);
    }
    let mut profile = Vec::new();
    println!("| plugin | path | wasm instructions / request | harness lifecycles/s |");
    println!("|---|---|---|---|");
    for case in cases() {
        let mut edge = build(&case)?;
        let (fuel0, calls0) = (fuel(&edge), edge.hostcalls(0));
        let used = edge.send((case.request)(1))?.fuel;
        profile.push(format!(
            "| {} | {} | {} | {} |",
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
    println!("(hostcalls, and guest allocations Envoy makes to hand data over); what they cost in");
    println!("Envoy is measured by the replays (the Floor section).");
    println!();
    println!("| plugin | path | instructions per callback | hostcalls |");
    println!("|---|---|---|---|");
    for line in profile {
        println!("{line}");
    }
    write_traces(&traces)
}

// --- Traces for the Envoy bench's floor -------------------------------------------------------
//
// Each path the Envoy bench measures is recorded here, one request per request type, in the
// state the bench's load reaches (same configurations, same requests, tables as full as after
// thousands of requests), as `bench/out/traces/<name>.json`. `bench/replay` replays a trace in
// Envoy: what it adds over bare Envoy is the measured cost of that path's crossings.

/// The plugin configurations of `bench/envoy_bench.py` (it reads the same file).
const BENCH_CONFIGS: &str = include_str!("../../bench/plugin-configs.json");

/// The configurations the traces are recorded with: `bench/plugin-configs.json`, or the file
/// `EDGE_BENCH_CONFIGS` names, which `envoy_bench.py` reads too (to measure another table
/// size, say).
fn bench_configs() -> anyhow::Result<String> {
    match std::env::var_os("EDGE_BENCH_CONFIGS") {
        Some(path) => std::fs::read_to_string(&path)
            .map_err(|e| anyhow::anyhow!("EDGE_BENCH_CONFIGS={}: {e}", path.to_string_lossy())),
        None => Ok(BENCH_CONFIGS.to_string()),
    }
}

/// A request type of a path: its name (the `x-replay` value), share of the load, request `n`.
type Kind = (&'static str, f64, fn(u64) -> Request);

/// One measured path: the plugins of its Envoy configuration, the load that brings them to
/// steady state and the request types whose traces a replay picks from (`x-replay`).
struct TraceSet {
    name: &'static str,
    /// (module, section of BENCH_CONFIGS; `None`: the whole file, edge.wasm's configuration)
    plugins: Vec<(&'static str, Option<&'static str>)>,
    /// The Envoy bench's request sequence (wrk's Lua), request `n`.
    load: fn(u64) -> Request,
    /// Request types: name, share of the load, the request.
    kinds: Vec<Kind>,
    /// Fresh-key requests to send until the shared-data table stops growing, so that each
    /// claim evicts an old record as after a long Envoy run (the mixes fill it with their
    /// POSTs alone, which their load would take four times as long to send).
    fill: Option<fn(u64) -> Request>,
}

/// For each shared-data key the traces read or write that ends in a number (a table's slot),
/// how many keys of its prefix the run left in shared data: the replay spreads its reads and
/// writes over that many entries, as the plugin's keys spread over its table, instead of
/// touching the one it recorded (`bench/README.md`, "The floor").
fn spread<'a>(
    edge: &Edge,
    traced: impl Iterator<Item = &'a host_tests::TracedCallback>,
) -> serde_json::Map<String, serde_json::Value> {
    use serde_json::Value;
    let mut out = serde_json::Map::new();
    for call in traced.flat_map(|t| &t.calls) {
        let op = call.get("op").and_then(Value::as_str).unwrap_or_default();
        let Some(key) = call.get("key").and_then(Value::as_str) else {
            continue;
        };
        if !op.ends_with("_shared_data") {
            continue;
        }
        let prefix = key.trim_end_matches(|c: char| c.is_ascii_digit());
        if prefix.len() == key.len() || out.contains_key(prefix) {
            continue;
        }
        let n = edge.shared_keys_numbered("", prefix);
        if n > 1 {
            out.insert(prefix.to_string(), Value::from(n));
        }
    }
    out
}

/// A small body as Envoy's HTTP/1 codec hands it to filters: the bytes, then the end of the
/// stream in an empty frame of its own, each a callback into the VM.
fn as_envoy_reads(body: &[u8]) -> Vec<Vec<u8>> {
    vec![body.to_vec(), Vec::new()]
}

fn wrk_get(path: &str) -> Request {
    Request::get(path)
        .authority("127.0.0.1:10000")
        .from("127.0.0.1:40000")
}

fn bench_api(_: u64) -> Request {
    wrk_get("/api/items")
}

fn bench_flagged(n: u64) -> Request {
    wrk_get("/checkout").header("x-user-id", &format!("user-{n}"))
}

fn bench_post(n: u64) -> Request {
    Request::post("/payments")
        .authority("127.0.0.1:10000")
        .from("127.0.0.1:40000")
        .header("idempotency-key", &format!("123456789-{n}"))
        .header("content-type", "application/json")
        .chunks(as_envoy_reads(b"{\"amount\":10}"))
}

/// The chain's mix as `CHAIN` in envoy_bench.py sends it, with the `x-replay` header naming
/// the request type (every mix configuration gets it, so all see the same requests).
fn mix_api(_: u64) -> Request {
    wrk_get("/api/items").header("x-replay", "api")
}

fn mix_checkout(n: u64) -> Request {
    wrk_get("/checkout")
        .header("x-user-id", &format!("user-{n}"))
        .header("x-replay", "checkout")
}

fn mix_pay(n: u64) -> Request {
    Request::post("/payments")
        .authority("127.0.0.1:10000")
        .from("127.0.0.1:40000")
        .header("idempotency-key", &format!("123456789-{n}"))
        .header("x-replay", "pay")
        .chunks(as_envoy_reads(b"{\"amount\":10}"))
}

fn mix(n: u64) -> Request {
    match n % 4 {
        0 => mix_pay(n),
        1 => mix_checkout(n),
        _ => mix_api(n),
    }
}

fn trace_sets() -> Vec<TraceSet> {
    let chain_kinds = || -> Vec<Kind> {
        vec![
            ("api", 0.5, mix_api),
            ("checkout", 0.25, mix_checkout),
            ("pay", 0.25, mix_pay),
        ]
    };
    vec![
        TraceSet {
            name: "rate_limit",
            plugins: vec![("rate_limit", Some("rateLimit"))],
            load: bench_api,
            kinds: vec![("only", 1.0, bench_api)],
            fill: None,
        },
        TraceSet {
            name: "flag_router",
            plugins: vec![("flag_router", Some("flagRouter"))],
            load: bench_flagged,
            kinds: vec![("only", 1.0, bench_flagged)],
            fill: None,
        },
        TraceSet {
            name: "cached_fallback",
            plugins: vec![("cached_fallback", Some("cachedFallback"))],
            load: bench_api,
            kinds: vec![("only", 1.0, bench_api)],
            fill: None,
        },
        TraceSet {
            name: "idempotency_post",
            plugins: vec![("idempotency", Some("idempotency"))],
            load: bench_post,
            kinds: vec![("only", 1.0, bench_post)],
            fill: Some(bench_post),
        },
        TraceSet {
            name: "idempotency_get",
            plugins: vec![("idempotency", Some("idempotency"))],
            load: |_| wrk_get("/payments"),
            kinds: vec![("only", 1.0, |_| wrk_get("/payments"))],
            fill: None,
        },
        TraceSet {
            name: "chain",
            plugins: vec![
                ("rate_limit", Some("rateLimit")),
                ("flag_router", Some("flagRouter")),
                ("idempotency", Some("idempotency")),
                ("cached_fallback", Some("cachedFallback")),
            ],
            load: mix,
            kinds: chain_kinds(),
            fill: Some(mix_pay),
        },
        TraceSet {
            name: "edge",
            plugins: vec![("edge", None)],
            load: mix,
            kinds: chain_kinds(),
            fill: Some(mix_pay),
        },
    ]
}

fn bench_edge(plugins: &[(Module, String)]) -> anyhow::Result<Edge> {
    let mut b = Edge::builder();
    for (module, config) in plugins {
        b = b.plugin(Plugin::new(module, config.as_str()).root_id(module.name()));
    }
    // As envoy_bench.py's upstream answers: a direct response of 60 bytes.
    b.upstream(|_| {
        Upstream::ok("")
            .chunks(as_envoy_reads("ok ".repeat(20).as_bytes()))
            .header("content-type", "text/plain")
    })
    .build()
}

/// The callback exports of a module: the crossings Envoy may make for a stream.
fn callback_exports(module: &Module) -> Vec<String> {
    module
        .exports()
        .into_iter()
        .filter(|e| e.starts_with("proxy_on_") && e != "proxy_on_memory_allocate")
        .collect()
}

/// Fuel of one request's callbacks among `exports`, from a recorded trace.
fn trace_fuel(trace: &[host_tests::TracedCallback]) -> u64 {
    trace.iter().map(|c| c.fuel).sum()
}

/// The op sequence of a trace, per callback, with the sizes Envoy's cost depends on: how a
/// replay is checked against its plugin. Guest allocations follow from the data returned,
/// and a single header read's answer may be the replay's selector: both are left out.
fn op_kinds(trace: &[host_tests::TracedCallback]) -> Vec<String> {
    let mut out = Vec::new();
    for c in trace {
        out.push(c.callback.to_string());
        for v in &c.calls {
            let op = v
                .get("op")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("");
            if op.starts_with('(') {
                continue;
            }
            let size = ["len", "size"]
                .iter()
                .filter(|_| op != "get_header_map_value")
                .find_map(|k| v.get(*k).and_then(serde_json::Value::as_i64));
            out.push(match size {
                Some(n) => format!("{op}({n})"),
                None => op.to_string(),
            });
        }
    }
    out
}

fn write_traces(out: &std::path::Path) -> anyhow::Result<()> {
    use serde_json::{json, Value};
    let configs_text = bench_configs()?;
    let configs: Value = serde_json::from_str(&configs_text)?;
    std::fs::create_dir_all(out)?;
    let replay = Module::from_file(module_path("replay_filter"))?;
    let mut summary = Vec::new();
    for set in trace_sets() {
        let mut plugins = Vec::new();
        for (name, section) in &set.plugins {
            let config = match section {
                Some(s) => configs.get(*s).map(Value::to_string).unwrap_or_default(),
                None => configs_text.clone(),
            };
            plugins.push((Module::from_file(module_path(name))?, config));
        }
        let mut edge = bench_edge(&plugins)?;
        let mut n = 0u64;
        if let Some(fresh) = set.fill {
            // The idempotency table keeps a bounded number of records: once the store stops
            // growing, each fresh key's claim evicts an old one.
            let mut keys = edge.shared_data_usage("").0;
            loop {
                for _ in 0..5000 {
                    n += 1;
                    edge.send(fresh(n))?;
                }
                let now = edge.shared_data_usage("").0;
                if now <= keys || n > 1_000_000 {
                    break;
                }
                keys = now;
            }
        }
        for _ in 0..1000 {
            n += 1;
            edge.send((set.load)(n))?;
        }
        edge.clear_records();
        // traces[plugin][kind]
        let mut traces: Vec<Vec<(&str, f64, Vec<host_tests::TracedCallback>)>> =
            plugins.iter().map(|_| Vec::new()).collect();
        edge.start_trace();
        let mut sent = Vec::new();
        for (kind, share, request) in &set.kinds {
            n += 1;
            sent.push(n);
            for i in 0..plugins.len() {
                edge.take_trace(i);
            }
            edge.send(request(n))?;
            for (i, t) in traces.iter_mut().enumerate() {
                t.push((kind, *share, edge.take_trace(i)));
            }
        }
        let mut docs = Vec::new();
        for (module, _) in &plugins {
            let i = docs.len();
            let kinds = traces.get(i).map_or(&[][..], Vec::as_slice);
            let spread = spread(&edge, kinds.iter().flat_map(|(_, _, t)| t));
            docs.push(json!({
                "spread": spread,
                "module": module.name(),
                "exports": callback_exports(module),
                "filled": set.fill.is_some(),
                "shares": kinds.iter().map(|(k, s, _)| (k.to_string(), json!(s))).collect::<serde_json::Map<_, _>>(),
                "fuel": kinds.iter().map(|(k, _, t)| (k.to_string(), json!(trace_fuel(t)))).collect::<serde_json::Map<_, _>>(),
                "traces": kinds.iter().map(|(k, _, t)| (k.to_string(), json!(t.iter().map(|c| c.to_json()).collect::<Vec<_>>()))).collect::<serde_json::Map<_, _>>(),
            }));
        }
        // The replays in the harness, one per plugin of the chain: their own instructions
        // (the floor counts only the plugins' instructions beyond them) and a check that each
        // makes its plugin's calls, with the same requests.
        let replays: Vec<(Module, String)> = docs
            .iter()
            .map(|d| (replay.clone(), d.to_string()))
            .collect();
        let mut r = bench_edge(&replays)?;
        let mut replay_fuel: Vec<serde_json::Map<String, Value>> =
            docs.iter().map(|_| serde_json::Map::new()).collect();
        let mut mismatched: Vec<Vec<String>> = docs.iter().map(|_| Vec::new()).collect();
        for ((kind, _, request), n) in set.kinds.iter().zip(&sent) {
            r.send(request(n + 1_000_000))?;
            r.start_trace();
            r.send(request(*n))?;
            for (i, (module, _)) in plugins.iter().enumerate() {
                let exports = callback_exports(module);
                let got: Vec<_> = r
                    .take_trace(i)
                    .into_iter()
                    .filter(|c| exports.iter().any(|e| e == c.callback))
                    .collect();
                if let Some(f) = replay_fuel.get_mut(i) {
                    f.insert(kind.to_string(), json!(trace_fuel(&got)));
                }
                let recorded = traces
                    .get(i)
                    .and_then(|t| t.iter().find(|k| k.0 == *kind))
                    .map_or(&[][..], |k| k.2.as_slice());
                let (want, have) = (op_kinds(recorded), op_kinds(&got));
                let differs =
                    (0..want.len().max(have.len())).find(|i| want.get(*i) != have.get(*i));
                if let (Some(at), Some(m)) = (differs, mismatched.get_mut(i)) {
                    m.push(format!(
                        "{kind}: call {at} recorded {:?}, replayed {:?}",
                        want.get(at),
                        have.get(at)
                    ));
                }
            }
        }
        for (i, mut doc) in docs.into_iter().enumerate() {
            let file = if plugins.len() > 1 {
                format!("{}_{}", set.name, set.plugins.get(i).map_or("", |p| p.0))
            } else {
                set.name.to_string()
            };
            let fuel = replay_fuel.get(i).cloned().unwrap_or_default();
            if let Some(o) = doc.as_object_mut() {
                o.insert("replay_fuel".into(), Value::Object(fuel));
            }
            std::fs::write(
                out.join(format!("{file}.json")),
                serde_json::to_string(&doc)?,
            )?;
            let m = mismatched.get(i).cloned().unwrap_or_default();
            summary.push(format!(
                "- trace {file}: {} request type(s), {n} requests sent first{}{}",
                set.kinds.len(),
                doc.get("spread")
                    .and_then(Value::as_object)
                    .filter(|s| !s.is_empty())
                    .map(|s| {
                        let each: Vec<String> =
                            s.iter().map(|(k, n)| format!("{k}N over {n}")).collect();
                        format!("; keys spread: {}", each.join(", "))
                    })
                    .unwrap_or_default(),
                if m.is_empty() {
                    "; the replay makes the same calls".to_string()
                } else {
                    format!("; replay differs: {}", m.join(", "))
                }
            ));
        }
    }
    // What a wasm instruction costs in Envoy: the rate limit replay plus a burn of known size
    // (the burn's instructions are the harness's fuel for that same module and request).
    let base = std::fs::read_to_string(out.join("rate_limit.json"))?;
    let fuel_with = |rounds: u64| -> anyhow::Result<u64> {
        let mut doc: Value = serde_json::from_str(&base)?;
        if let Some(o) = doc.as_object_mut() {
            o.insert("burn".into(), json!(rounds));
        }
        let mut r = bench_edge(&[(replay.clone(), doc.to_string())])?;
        r.send(bench_api(1))?;
        Ok(r.send(bench_api(2))?.fuel)
    };
    let plain = fuel_with(0)?;
    let per_round = (fuel_with(1000)? - plain) as f64 / 1000.0;
    // About a million instructions: some 250 µs at 0.25 ns each, so that the bench's noise
    // (a few µs per request) moves the figure by a few per cent at most.
    let rounds = (1_000_000.0 / per_round.max(1.0)) as u64;
    let burned = fuel_with(rounds)? - plain;
    std::fs::write(
        out.join("burn.json"),
        serde_json::to_string(
            &json!({"trace": "rate_limit", "rounds": rounds, "instructions": burned}),
        )?,
    )?;
    summary.push(format!(
        "- burn: {rounds} rounds = {burned} wasm instructions per request"
    ));
    println!();
    println!("Traces for the Envoy bench's floor (bench/out/traces/):");
    println!();
    for line in summary {
        println!("{line}");
    }
    Ok(())
}
