//! `dist/edge.wasm` through the reliability suite, as each plugin goes through it.
//!
//! - `fuzz_edge`: a configuration of random sections (each present or absent, each drawn from
//!   the generator of that plugin's own fuzzer) and a lifecycle mixed from those plugins' op
//!   generators, run through `edge.wasm` and through the four-filter chain of the separate
//!   modules in the README's order. Beyond no trap, no ABI misuse and an answer for every
//!   request, both must give the same answers (status, headers, body, details) and send the
//!   application the same requests, op by op; one loads where the other does, and refuses in
//!   the plugin's words with the field under the section's name. Tables are sized not to fill
//!   (see [`roomy`]).
//! - `flood_edge`: distinct clients, idempotency keys and URLs through the rate limit,
//!   idempotency and cached fallback stages at once, each stage's shared data within the bounds
//!   its own flood asserts.
//! - `race_edge_*`: the critical sections of `race.rs` with all four sections configured.
//!
//! Streams of the two sides are driven one host stage at a time (everything the filters do
//! up to the upstream exchange, the exchange, everything up to the access log), since a step
//! of the chain is one filter's callback and a step of `edge.wasm` all stages' callbacks: the
//! two agree on what another worker can see at those boundaries, not within them. A case with
//! concurrent or aborted streams then runs again through `edge.wasm` alone, interleaved and
//! aborted at every callback as the plugins' fuzzers do, for the same safety checks.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use host_tests::scenario::EDGE_SECTIONS;
use host_tests::{
    Callback, CalloutReply, Edge, FlightId, Module, Plugin, Request, Response, Step, Upstream,
    UpstreamRequest,
};
use serde_json::{json, Value};

use crate::gen::{self, Case, Op, Req, Rng, Up};
use crate::{fuzz, module, race, two_workers};

const ROUTE_TIMEOUT: Duration = Duration::from_secs(5);

/// `edge.wasm` and the four separate modules, compiled once per test.
struct Modules {
    edge: Module,
    plugins: Vec<Module>,
}

impl Modules {
    fn load() -> Modules {
        Modules {
            edge: module("edge"),
            plugins: EDGE_SECTIONS.iter().map(|(p, _)| module(p)).collect(),
        }
    }
}

/// Case `seed`: each section present with even odds, drawn by its plugin's own generator (a
/// section whose generated text is no longer JSON is drawn again, since it cannot be a
/// section), and ops taken in random turns from those plugins' lifecycles.
fn generate(seed: u64) -> Case {
    let mut rng = Rng::new(seed ^ 0xed6e_0001);
    let mut sections = serde_json::Map::new();
    let mut lifecycles: Vec<Vec<Op>> = Vec::new();
    for (i, (plugin, section)) in EDGE_SECTIONS.iter().enumerate() {
        if !rng.chance(50) {
            continue;
        }
        let mut sub = seed.wrapping_mul(4).wrapping_add(i as u64);
        let (value, ops) = loop {
            let case = fuzz::generate(plugin, sub);
            if let Ok(v) = serde_json::from_str::<Value>(&case.config) {
                break (v, case.ops);
            }
            sub = sub.wrapping_add(0x1_0000);
        };
        sections.insert(section.to_string(), roomy(section, value));
        lifecycles.push(ops);
    }
    if lifecycles.is_empty() {
        // Every policy off still runs requests: the filter must pass them through untouched.
        lifecycles.push(fuzz::generate("rate_limit", seed).ops);
    }
    let n = rng.range(5, 40) as usize;
    let mut next = vec![0usize; lifecycles.len()];
    let mut ops = Vec::with_capacity(n);
    for _ in 0..n {
        let k = rng.below(lifecycles.len() as u64) as usize;
        let Some(ops_k) = lifecycles.get(k) else {
            continue;
        };
        if let Some(op) = ops_k.get(next[k] % ops_k.len().max(1)) {
            ops.push(op.clone());
        }
        next[k] += 1;
    }
    Case {
        plugin: "edge".into(),
        seed,
        config: Value::Object(sections).to_string(),
        ops,
    }
}

/// The section with tables that never fill in a case: which keys share a slot, and which
/// records a full byte budget samples for eviction, follow the deployment's random key seed
/// and draws, so once a table fills any two deployments answer apart (two restarts of the
/// chain as much as the chain and `edge.wasm`). Only sizes the generator gave as numbers grow;
/// a broken one stays broken. The floods check the bounds.
fn roomy(section: &str, mut v: Value) -> Value {
    let grow = |n: &mut Value, at_least: u64| {
        if let Some(x) = n.as_u64() {
            *n = json!(x.max(at_least));
        }
    };
    match section {
        "rateLimit" => {
            if let Some(rules) = v.get_mut("rules").and_then(Value::as_array_mut) {
                for rule in rules {
                    if let Some(n) = rule.get_mut("maxKeys") {
                        grow(n, 4096);
                    }
                }
            }
        }
        "cachedFallback" | "idempotency" => {
            if let Some(n) = v.get_mut("maxEntries") {
                grow(n, 4096);
            }
            if let Some(n) = v.get_mut("maxTotalBytes") {
                grow(n, 64 << 20);
            }
        }
        _ => {}
    }
    v
}

/// One side of the comparison: an edge and what its upstream handed out.
struct Side {
    edge: Edge,
    current: Rc<RefCell<Up>>,
    /// Plugins in the chain (1 for `edge.wasm`).
    filters: usize,
    /// Streams interleave and abort at every callback, as in the plugins' fuzzers, rather
    /// than at host stages (no comparison then: the chain has more callbacks).
    fine: bool,
}

/// The flag files a case's source serves, drawn as the flag router's fuzzer draws them: flag
/// documents of generated configurations, sometimes broken.
fn flag_docs(seed: u64) -> (Vec<String>, usize, bool) {
    let mut rng = Rng::new(seed ^ 0xf1a9);
    let docs = (0..4)
        .map(|i| {
            let config = fuzz::generate("flag_router", seed.wrapping_add(1000 + i)).config;
            let doc = serde_json::from_str::<Value>(&config)
                .map(|c| json!({ "flags": c["flags"] }))
                .unwrap_or_else(|_| json!({ "flags": {} }));
            if rng.chance(30) {
                gen::mutate(&mut rng, &doc)
            } else {
                doc.to_string()
            }
        })
        .collect();
    (docs, *rng.pick(&[1, 2, 5, 20]), rng.chance(75))
}

/// Builds one side: `plugins` in order, the fuzzer's upstream (every answer's body ends with
/// a token counting the answers) and flag source.
fn side(case: &Case, plugins: Vec<Plugin>, cluster: &str) -> Result<Side, String> {
    let filters = plugins.len();
    let current: Rc<RefCell<Up>> = Rc::new(RefCell::new(Up::Refused));
    let cur = current.clone();
    let counter = Rc::new(RefCell::new(0u64));
    let (docs, every, etags) = flag_docs(case.seed);
    let fetches = Rc::new(RefCell::new(0usize));
    let mut b = Edge::builder()
        .workers(2)
        .seed(case.seed)
        .route_timeout(ROUTE_TIMEOUT);
    for p in plugins {
        b = b.plugin(p);
    }
    b.upstream(move |_req: &UpstreamRequest| {
        let up = cur.borrow().clone();
        let token = match up {
            Up::Respond { .. } => fuzz::next_token(&counter),
            _ => String::new(),
        };
        up.answer(&token)
    })
    .cluster(cluster, move |req| {
        let i = {
            let mut f = fetches.borrow_mut();
            *f += 1;
            *f
        };
        if i % 5 == 4 {
            return CalloutReply::Fail {
                delay: Duration::ZERO,
            };
        }
        let version = i / every;
        let etag = format!("\"v{version}\"");
        if etags && req.header("if-none-match") == Some(etag.as_str()) {
            return CalloutReply::Response {
                headers: vec![(b":status".to_vec(), b"304".to_vec())],
                body: Vec::new(),
                trailers: Vec::new(),
                delay: Duration::ZERO,
            };
        }
        let mut headers = vec![(b":status".to_vec(), b"200".to_vec())];
        if etags {
            headers.push((b"etag".to_vec(), etag.into_bytes()));
        }
        CalloutReply::Response {
            headers,
            body: docs
                .get(version % docs.len())
                .cloned()
                .unwrap_or_default()
                .into_bytes(),
            trailers: Vec::new(),
            delay: Duration::ZERO,
        }
    })
    .build()
    .map(|edge| Side {
        edge,
        current,
        filters,
        fine: false,
    })
    .map_err(|e| format!("{e:#}"))
}

/// Runs the stream's callbacks up to and including the next host stage (the upstream
/// exchange, a buffer-limit answer, the access log), or until it waits or ends; `false` when
/// nothing ran.
fn host_stage(edge: &mut Edge, id: FlightId) -> Result<bool, String> {
    let mut ran = false;
    loop {
        match edge.step(id).map_err(|e| format!("{e:#}"))? {
            Step::Ran(Callback::Upstream | Callback::BufferLimit | Callback::Log) => {
                return Ok(true)
            }
            Step::Ran(_) => ran = true,
            Step::Waiting | Step::Done => return Ok(ran),
        }
    }
}

/// One callback (`fine`) or one host stage of the stream; `false` when nothing ran.
fn advance_stream(edge: &mut Edge, id: FlightId, fine: bool) -> Result<bool, String> {
    if fine {
        let step = edge.step(id).map_err(|e| format!("{e:#}"))?;
        Ok(matches!(step, Step::Ran(_)))
    } else {
        host_stage(edge, id)
    }
}

/// What one op gave the client and sent the application, on one side.
#[derive(Debug, PartialEq)]
struct Seen {
    /// Per request: (status, headers, body, details, reset, worker); `None`: the harness
    /// refused the reset of an ended stream.
    answers: Vec<Option<Answer>>,
    /// What the application received: (worker, headers, body).
    upstream: Vec<(usize, Headers, String)>,
    now_ns: u64,
}

type Headers = Vec<(String, String)>;

type Answer = (u16, Headers, String, String, bool, usize);

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn answer(r: &Response) -> Answer {
    (
        r.status,
        r.headers.iter().map(|(k, v)| (text(k), text(v))).collect(),
        text(&r.body),
        r.details.clone(),
        r.reset,
        r.worker,
    )
}

/// Runs `op` on one side and checks what every fuzzer checks: no trap, no ABI misuse, an
/// answer for every request.
fn apply(s: &mut Side, op: &Op) -> Result<Seen, String> {
    let e = |e: anyhow::Error| format!("{e:#}");
    let before = s.edge.upstream_requests().len();
    let mut answers = Vec::new();
    let (edge, fine) = (&mut s.edge, s.fine);
    match op {
        Op::Advance(ms) => edge.advance(Duration::from_millis(*ms)).map_err(e)?,
        Op::Send(req, up) => {
            *s.current.borrow_mut() = up.clone();
            answers.push(Some(answer(&edge.send(req.to_request()).map_err(e)?)));
        }
        Op::Abort(req, up, after) => {
            *s.current.borrow_mut() = up.clone();
            let id = edge.begin(req.to_request()).map_err(e)?;
            // Host stages: before any callback, after the upstream exchange, or after the
            // response.
            let stages = if fine { *after } else { after % 3 };
            for _ in 0..stages {
                if !advance_stream(edge, id, fine)? {
                    break;
                }
            }
            answers.push(edge.reset(id).ok().map(|r| answer(&r)));
        }
        Op::Pair(a, b, up, schedule) => {
            *s.current.borrow_mut() = up.clone();
            let reqs: [&Req; 2] = [a, b];
            let ids = [
                edge.begin(reqs[0].to_request().worker(0)).map_err(e)?,
                edge.begin(reqs[1].to_request().worker(1)).map_err(e)?,
            ];
            let mut bits = *schedule;
            let mut idle = [false, false];
            while !(idle[0] && idle[1]) {
                let k = (bits & 1) as usize;
                bits = bits.rotate_right(1);
                let which = if idle[k] { 1 - k } else { k };
                if !advance_stream(edge, ids[which], fine)? {
                    idle[which] = true;
                }
            }
            for id in ids {
                answers.push(Some(answer(&edge.finish(id).map_err(e)?)));
            }
        }
    }
    for w in 0..=edge.worker_count() {
        for p in 0..s.filters {
            if edge.vm_failed(w, p) {
                return Err(format!(
                    "the VM of filter {p} on worker {w} trapped; log: {:?}",
                    edge.logs().last()
                ));
            }
        }
    }
    let misuse = edge.abi_misuse();
    if !misuse.is_empty() {
        return Err(format!("ABI misuse: {misuse:?}"));
    }
    // A client that went away has no answer to get; every other one has one.
    let aborted = matches!(op, Op::Abort(..));
    for a in answers.iter().flatten().filter(|_| !aborted) {
        if !(100..=599).contains(&a.0) {
            return Err(format!("a request got no answer: status {}", a.0));
        }
    }
    let upstream = edge
        .upstream_requests()
        .get(before..)
        .unwrap_or_default()
        .iter()
        .map(|u| {
            (
                u.worker,
                // The id Envoy's connection manager generates comes from the host's random
                // stream, which each VM's start also draws on: the chain starts more VMs.
                u.headers
                    .iter()
                    .filter(|(k, _)| k != b"x-request-id")
                    .map(|(k, v)| (text(k), text(v)))
                    .collect(),
                text(&u.body),
            )
        })
        .collect();
    let now_ns = edge.now_ns();
    edge.clear_records();
    Ok(Seen {
        answers,
        upstream,
        now_ns,
    })
}

/// Policy decisions among the answers: limited, replayed, served from the store, refused by
/// idempotency, or routed by a flag.
fn decisions(seen: &Seen) -> u64 {
    let answers = seen.answers.iter().flatten().filter(|a| {
        let has = |name: &str, part: &str| a.1.iter().any(|(k, v)| k == name && v.contains(part));
        a.0 == 429
            || has("idempotent-replayed", "true")
            || has("cache-status", "hit")
            || has("cache-status", "circuit-open")
            || (matches!(a.0, 409 | 422 | 400) && a.3 != "via_upstream")
    });
    let routed = seen
        .upstream
        .iter()
        .filter(|(_, h, _)| h.iter().any(|(k, _)| k.starts_with("x-flag-")));
    (answers.count() + routed.count()) as u64
}

/// The first difference between the two sides' records of an op.
fn difference(chain: &Seen, one: &Seen) -> String {
    for (i, (c, o)) in chain.answers.iter().zip(&one.answers).enumerate() {
        if c != o {
            return format!("answer {i}:\n  chain    {c:?}\n  edge.wasm {o:?}");
        }
    }
    if chain.upstream != one.upstream {
        for (i, (c, o)) in chain.upstream.iter().zip(&one.upstream).enumerate() {
            if c != o {
                return format!("upstream request {i}:\n  chain    {c:?}\n  edge.wasm {o:?}");
            }
        }
        return format!(
            "{} upstream requests through the chain, {} through edge.wasm",
            chain.upstream.len(),
            one.upstream.len()
        );
    }
    format!(
        "clock: chain at {} ns, edge.wasm at {} ns",
        chain.now_ns, one.now_ns
    )
}

/// `edge.wasm` refuses a configuration with the refusing plugin's own words, its field named
/// within the section (`rules[0].limit` → `rateLimit.rules[0].limit`).
fn same_refusal(chain: &str, one: &str) -> Result<(), String> {
    const MARK: &str = "configuration rejected: ";
    let last = |m: &str| m.lines().last().unwrap_or("").to_string();
    let (c, o) = (last(chain), last(one));
    let plugin = c
        .strip_prefix("plugin ")
        .and_then(|r| r.split(' ').next())
        .unwrap_or("");
    let section = EDGE_SECTIONS
        .iter()
        .find(|(p, _)| *p == plugin)
        .map_or("", |(_, s)| *s);
    // `plugin <name> rejected its configuration: <tag>: configuration rejected: <why>`; the
    // edge's reason also carries what its other stages logged before (warnings).
    let ok = c.find(MARK).is_some_and(|at| {
        let tag = c[..at]
            .rsplit("rejected its configuration: ")
            .next()
            .unwrap_or("");
        let why = &c[at + MARK.len()..];
        // The plugin names its whole configuration `configuration`; the edge, the section.
        let within = match why.strip_prefix("configuration: ") {
            Some(rest) => format!("{section}: {rest}"),
            None if why.starts_with('[') => format!("{section}{why}"),
            None => format!("{section}.{why}"),
        };
        o.contains(&format!("{tag}{MARK}{within}"))
    });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "edge.wasm refuses in other words than the plugin, under {section:?}:\n  chain    {c}\n  edge.wasm {o}"
        ))
    }
}

/// Runs `case` through `edge.wasm` and through the chain; `Err` says where they part or
/// which check failed.
fn run(case: &Case, m: &Modules) -> Result<fuzz::Outcome, String> {
    let config: Value = serde_json::from_str(&case.config).map_err(|e| e.to_string())?;
    let cluster = config["flagRouter"]["source"]["cluster"]
        .as_str()
        .unwrap_or("flags")
        .to_string();
    let mut chain_plugins = Vec::new();
    for (i, (plugin, section)) in EDGE_SECTIONS.iter().enumerate() {
        if let Some(v) = config.get(section) {
            chain_plugins.push(
                Plugin::new(&m.plugins[i], v.to_string())
                    .name(plugin)
                    .root_id(plugin),
            );
        }
    }
    let one = Plugin::new(&m.edge, case.config.clone())
        .name("edge")
        .root_id("edge");
    let (chain, one) = match (
        side(case, chain_plugins, &cluster),
        side(case, vec![one], &cluster),
    ) {
        (Ok(c), Ok(o)) => (c, o),
        (Err(c), Err(o)) => {
            let clean = |m: &str| m.contains("rejected its configuration") && !m.contains("trap");
            if clean(&c) && clean(&o) {
                if std::env::var("FUZZ_SHOW_REJECTIONS").is_ok() {
                    eprintln!(
                        "rejected:\n  chain    {}\n  edge.wasm {}",
                        c.lines().last().unwrap_or(""),
                        o.lines().last().unwrap_or("")
                    );
                }
                same_refusal(&c, &o)?;
                return Ok(fuzz::Outcome {
                    rejected: true,
                    requests: 0,
                    checked: 0,
                });
            }
            return Err(format!(
                "loading failed other than by a clean rejection:\n  chain    {c}\n  edge.wasm {o}"
            ));
        }
        (Ok(_), Err(o)) => return Err(format!("edge.wasm refuses what the chain loads: {o}")),
        (Err(c), Ok(_)) => return Err(format!("edge.wasm loads what the chain refuses: {c}")),
    };
    let (mut chain, mut one) = (chain, one);
    let mut outcome = fuzz::Outcome {
        rejected: false,
        requests: 0,
        checked: 0,
    };
    for (i, op) in case.ops.iter().enumerate() {
        let at = |side: &str, why: String| format!("op {i} ({}) {side}: {why}", describe(op));
        let c = apply(&mut chain, op).map_err(|w| at("through the chain", w))?;
        let o = apply(&mut one, op).map_err(|w| at("through edge.wasm", w))?;
        if c != o {
            return Err(at(
                "",
                format!("the chain and edge.wasm differ: {}", difference(&c, &o)),
            ));
        }
        outcome.requests += o.answers.len() as u64;
        outcome.checked += decisions(&o);
    }
    // The streams again through edge.wasm alone, at every callback boundary.
    if case
        .ops
        .iter()
        .any(|op| matches!(op, Op::Pair(..) | Op::Abort(..)))
    {
        let one = Plugin::new(&m.edge, case.config.clone())
            .name("edge")
            .root_id("edge");
        let mut fine = side(case, vec![one], &cluster)?;
        fine.fine = true;
        for (i, op) in case.ops.iter().enumerate() {
            apply(&mut fine, op).map_err(|w| {
                format!(
                    "op {i} ({}) through edge.wasm, one callback at a time: {w}",
                    describe(op)
                )
            })?;
        }
    }
    Ok(outcome)
}

fn describe(op: &Op) -> String {
    let r = |q: &Req| {
        format!(
            "{} {}",
            q.method,
            q.path.chars().take(40).collect::<String>()
        )
    };
    match op {
        Op::Send(q, _) => format!("send {}", r(q)),
        Op::Pair(a, b, _, _) => format!("pair {} | {}", r(a), r(b)),
        Op::Abort(q, _, n) => format!(
            "abort {} after {} host stages or {n} callbacks",
            r(q),
            n % 3
        ),
        Op::Advance(ms) => format!("advance {ms} ms"),
    }
}

/// Drops every op the failure does not need, as the plugins' fuzzers do.
fn shrink(mut case: Case, mut why: String, m: &Modules) -> (Case, String) {
    let mut i = 0;
    while i < case.ops.len() {
        let mut smaller = case.clone();
        smaller.ops.remove(i);
        match run(&smaller, m) {
            Err(w) => {
                case = smaller;
                why = w;
            }
            Ok(_) => i += 1,
        }
    }
    (case, why)
}

#[test]
fn fuzz_edge() {
    let m = Modules::load();
    let budget = std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok());
    let cases = crate::env_u64("FUZZ_CASES", 60);
    let first_seed = if budget.is_some() {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    } else {
        0
    };
    let started = Instant::now();
    let mut tally = fuzz::Tally::default();
    for (path, case) in crate::saved_cases("edge") {
        tally.cases += 1;
        match run(&case, &m) {
            Ok(o) => {
                tally.requests += o.requests;
                tally.checked += o.checked;
            }
            Err(why) => tally
                .failures
                .push((case, format!("{} fails again: {why}", path.display()))),
        }
    }
    let mut seed = first_seed;
    loop {
        let done = match budget {
            Some(secs) => started.elapsed() >= Duration::from_secs_f64(secs),
            None => tally.cases >= cases,
        };
        if done {
            break;
        }
        let case = generate(seed);
        seed = seed.wrapping_add(1);
        tally.cases += 1;
        match run(&case, &m) {
            Ok(o) => {
                tally.requests += o.requests;
                tally.rejected += u64::from(o.rejected);
                tally.checked += o.checked;
            }
            Err(why) => {
                let (case, why) = shrink(case, why, &m);
                let detail = format!("\n  config {}", case.config);
                crate::save_failure("edge", case.seed, &case, &why, &detail);
                tally.failures.push((case, why));
                if tally.failures.len() >= 3 {
                    break;
                }
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!("fuzz {}", fuzz::tally_line("edge", &tally, secs));
    assert!(
        tally.failures.is_empty(),
        "edge: {} failing case(s); first: {}",
        tally.failures.len(),
        tally.failures.first().map_or("", |f| f.1.as_str())
    );
    assert!(
        tally.checked > 0,
        "edge: no case reached a decision of a policy"
    );
}

/// Shared data per stage: (keys, bytes) under each plugin's prefix (`<plugin>/edge/...`), then
/// under any other name.
fn usage_by_stage(edge: &Edge) -> Vec<(usize, usize)> {
    let mut out = vec![(0, 0); EDGE_SECTIONS.len() + 1];
    for (key, size) in edge.shared_data_sizes("") {
        let at = EDGE_SECTIONS
            .iter()
            .position(|(p, _)| key.starts_with(format!("{p}/").as_bytes()));
        if let Some(slot) = out.get_mut(at.unwrap_or(EDGE_SECTIONS.len())) {
            slot.0 += 1;
            slot.1 += key.len() + size;
        }
    }
    out
}

/// Each round of the flood brings a new client, a new idempotency key and a new URL (a hot
/// client every 10th round): the three stateful stages fill at once in one filter, each within
/// its own flood's bound (`flood.rs`), and each still decides as before afterwards.
#[test]
fn flood_edge() {
    const MAX_KEYS: usize = 1000;
    const MAX_ENTRIES: usize = 1000;
    const MAX_BYTES: usize = 256 * 1024;
    let n = crate::env_u64("FLOOD_KEYS", 20_000);
    let config = json!({
        "rateLimit": {"rules": [{"name": "api", "match": {"pathPrefix": "/rl/"},
            "key": [{"header": "x-api-key"}], "limit": {"requests": 5, "window": "1h"},
            "maxKeys": MAX_KEYS}]},
        "idempotency": {"routes": [{"pathPrefix": "/pay"}], "header": "idempotency-key",
            "scope": [], "maxEntries": MAX_ENTRIES, "maxTotalBytes": MAX_BYTES,
            "maxBodyBytes": 4096},
        "cachedFallback": {"routes": [{"pathPrefix": "/api/"}], "maxEntries": MAX_ENTRIES,
            "maxTotalBytes": MAX_BYTES, "maxBodyBytes": 4096},
    });
    let (paid, cached) = ("r".repeat(700), "c".repeat(700));
    let mut edge = two_workers("edge", config.to_string(), move |req| {
        if req.path().starts_with("/pay") {
            Upstream::ok(paid.clone())
        } else {
            Upstream::ok(cached.clone()).header("cache-control", "max-age=60")
        }
    });
    let limited = |key: &str| Request::get("/rl/x").header("x-api-key", key);
    let pay = |i: u64| {
        Request::post("/pay")
            .header("idempotency-key", &format!("key-{i}"))
            .body("{\"amount\":1}")
    };
    let item = |i: u64| Request::get(&format!("/api/item/{i}"));
    let started = Instant::now();
    let mut peak = vec![(0usize, 0usize); EDGE_SECTIONS.len() + 1];
    let mut sample = |edge: &Edge| {
        for (p, u) in peak.iter_mut().zip(usage_by_stage(edge)) {
            *p = (p.0.max(u.0), p.1.max(u.1));
        }
    };
    let mut hot_admitted = 0;
    for i in 0..n {
        // A new client: admitted, or charged to the overflow bucket once the slots are full.
        let res = edge
            .send(limited(&format!("flood-{i}")))
            .expect("a flood request");
        assert!(matches!(res.status, 200 | 429), "status {}", res.status);
        let res = edge.send(pay(i)).expect("a flood request");
        assert_eq!(res.status, 200, "{}", res.body_str());
        let res = edge.send(item(i)).expect("a flood request");
        assert_eq!(res.status, 200, "{}", res.body_str());
        if i % 10 == 0 {
            let hot = edge.send(limited("hot")).expect("a hot request");
            if hot.status == 200 {
                hot_admitted += 1;
            }
            assert!(
                hot_admitted <= 5,
                "the hot client was admitted {hot_admitted} times by request {i}"
            );
        }
        if i % 100 == 0 {
            sample(&edge);
            edge.clear_records();
        }
    }
    sample(&edge);
    assert_eq!(hot_admitted, 5, "the hot client's first 5 requests pass");
    // Still deciding after the flood: the newest key replays, the newest URL is served from
    // the store when the application fails.
    let replay = edge.send(pay(n - 1)).expect("a replay");
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    edge.set_upstream(|_| Upstream::status(503));
    let last = edge.send(item(n - 1)).expect("a request");
    assert_eq!(last.status, 200, "the newest answer survives the flood");
    let secs = started.elapsed().as_secs_f64();
    // The bounds of flood.rs, per stage.
    let bounds = [
        (MAX_KEYS + 2, (MAX_KEYS + 2) * 160),
        (0, 0),
        (2 * MAX_ENTRIES + 2, MAX_BYTES + MAX_ENTRIES * 100),
        (2 * MAX_ENTRIES + 3, MAX_BYTES + MAX_ENTRIES * 100),
    ];
    println!(
        "flood edge             {n:>8} distinct keys per stage in {secs:.1}s ({:.0} requests/s)",
        (3 * n + n / 10) as f64 / secs.max(1e-9)
    );
    for (i, ((plugin, _), (keys, bytes))) in EDGE_SECTIONS.iter().zip(&peak).enumerate() {
        let (bound_keys, bound_bytes) = bounds[i];
        if *plugin == "flag_router" {
            assert_eq!(
                (*keys, *bytes),
                (0, 0),
                "the flag router keeps no shared data"
            );
            continue;
        }
        println!("  {plugin:<16} peak {keys} shared-data keys (bound {bound_keys}), {bytes} bytes (bound {bound_bytes})");
        assert!(*keys <= bound_keys, "{plugin}: {keys} keys > {bound_keys}");
        assert!(
            *bytes <= bound_bytes,
            "{plugin}: {bytes} bytes > {bound_bytes}"
        );
    }
    let others = peak.last().copied().unwrap_or_default();
    assert_eq!(others, (0, 0), "shared data outside the stages' names");
    for (i, plugin) in [(2, "idempotency"), (3, "cached_fallback")] {
        assert!(
            peak[i].1 >= MAX_BYTES * 9 / 10,
            "{plugin}: only {} bytes kept",
            peak[i].1
        );
    }
}

/// The four sections of a race: `under_test` as `race.rs` configures its plugin, the others
/// on but matching nothing the race sends, so that the staged compare-and-swap is the
/// critical section's own.
fn race_config(under_test: (&str, Value)) -> String {
    let mut c = json!({
        "rateLimit": {"rules": [{"name": "other", "match": {"pathPrefix": "/limited/"},
            "key": [{"header": "x-api-key"}], "limit": {"requests": 1, "window": "1h"}}]},
        "flagRouter": {"targetingKey": {"header": "x-user-id"},
            "headers": {"f0": "x-flag-0"},
            "flags": {"f0": {"state": "ENABLED", "variants": {"on": "v1", "off": "v2"},
                "defaultVariant": "on"}}},
        "idempotency": {"routes": [{"pathPrefix": "/other-pay"}]},
        "cachedFallback": {"routes": [{"pathPrefix": "/cached/"}]},
    });
    c[under_test.0] = under_test.1;
    c.to_string()
}

#[test]
fn race_edge_rate_limit_last_token() {
    let trials = crate::env_u64("RACE_TRIALS", 500);
    // Every trial's key stays (1 h window) and a trial charged to the spent overflow bucket
    // (its set of eight all taken) lets no one through: the slots stay well beyond the trials.
    let config = race_config((
        "rateLimit",
        json!({"rules": [{"name": "one", "match": {"pathPrefix": "/"},
            "key": [{"header": "x-api-key"}], "limit": {"requests": 1, "window": "1h"},
            "maxKeys": 1000000}]}),
    ));
    let mut edge = two_workers("edge", config, |_| Upstream::ok("ok"));
    let len = race::callbacks_of(&mut edge, Request::get("/").header("x-api-key", "warm-up"));
    let req = |t: u64| Request::get("/").header("x-api-key", &format!("race-{t}"));
    let staged = race::run_trials(
        &mut edge,
        trials,
        len,
        |_| {},
        |t| (req(t), req(t)),
        |t, reached, res| {
            let limited = res.iter().filter(|r| r.status == 429).count();
            assert_eq!(limited, 2 - reached, "trial {t}");
            for r in res.iter().filter(|r| r.status == 200) {
                assert_eq!(r.body_str(), "ok", "trial {t}");
            }
        },
    );
    println!("race edge rate_limit last token: {trials} trials ({} interleavings at each boundary, the rest random; {staged} with a compare-and-swap lost to another worker), 0 double admissions", 2 * (len + 1));
}

#[test]
fn race_edge_idempotency_claim() {
    let trials = crate::env_u64("RACE_TRIALS", 500);
    let config = race_config((
        "idempotency",
        json!({"routes": [{"pathPrefix": "/pay"}], "header": "idempotency-key", "scope": [],
            "maxEntries": 100000}),
    ));
    let mut edge = two_workers("edge", config, |_| Upstream::ok("charged"));
    let pay = |key: &str| {
        Request::post("/pay")
            .header("idempotency-key", key)
            .body("{\"amount\":1}")
    };
    let len = race::callbacks_of(&mut edge, pay("warm-up"));
    let staged = race::run_trials(
        &mut edge,
        trials,
        len,
        |_| {},
        |t| {
            let key = format!("race-{t}");
            (pay(&key), pay(&key))
        },
        |t, _, res| race::one_of_the_pair_ran(t, res),
    );
    println!("race edge idempotency claim: {trials} trials ({} interleavings at each boundary, the rest random; {staged} with a claim lost to another worker), 0 double forwards", 2 * (len + 1));
}

#[test]
fn race_edge_circuit_breaker_probe() {
    let trials = crate::env_u64("RACE_TRIALS", 500);
    let config = race_config((
        "cachedFallback",
        json!({"routes": [{"pathPrefix": "/api/"}],
            "circuitBreaker": {"failures": 1, "window": "10s", "openFor": "1s"}}),
    ));
    let mut edge = two_workers("edge", config, |_| Upstream::status(503));
    let len = race::callbacks_of(&mut edge, Request::get("/api/x"));
    let advance = |e: &mut Edge| e.advance(Duration::from_millis(1100)).expect("advance");
    let pair = |_| (Request::get("/api/x"), Request::get("/api/x"));
    let check = |t: u64, reached: usize, res: &[Response; 2]| {
        let local: Vec<&Response> = res
            .iter()
            .filter(|r| {
                r.header("cache-status")
                    .is_some_and(|c| c.contains("detail=circuit-open"))
            })
            .collect();
        assert_eq!(local.len(), 2 - reached, "trial {t}: {res:?}");
        for r in local {
            assert_eq!(r.status, 503, "trial {t}");
            assert!(r.header("retry-after").is_some(), "trial {t}");
        }
    };
    let staged = race::run_trials(&mut edge, trials, len, advance, pair, check);
    println!("race edge cached_fallback circuit probe: {trials} trials ({} interleavings at each boundary, the rest random; {staged} with the probe claimed by another worker), 0 double probes", 2 * (len + 1));
}
