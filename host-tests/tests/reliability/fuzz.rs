//! Fuzzing through the harness: random configs (valid and broken) and random lifecycles per
//! plugin on 2 workers. A case fails on a trap, ABI misuse found by the harness, a harness
//! error (e.g. a stream a plugin never continues), or a broken invariant of the plugin.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::rc::Rc;
use std::time::Duration;

use host_tests::{CalloutReply, Edge, Module, Plugin, Response, UpstreamRequest};
use serde_json::json;

use crate::gen::{self, Case, Op, Req, Rng, Up};
use crate::oracle::{Expected, Oracle, Served};

const ROUTE_TIMEOUT: Duration = Duration::from_secs(5);
const VARIANTS: [&str; 5] = ["v1", "v2", "beta", "", "😀-é"];

/// Generates case `seed` for `plugin`.
pub fn generate(plugin: &str, seed: u64) -> Case {
    let mut rng = Rng::new(seed.wrapping_mul(31).wrapping_add(plugin.len() as u64));
    let valid = match plugin {
        "rate_limit" => rate_limit_config(&mut rng),
        "flag_router" => flag_router_config(&mut rng),
        "cached_fallback" => cached_fallback_config(&mut rng),
        _ => idempotency_config(&mut rng),
    };
    let config = if rng.chance(15) {
        gen::mutate(&mut rng, &valid)
    } else {
        valid.to_string()
    };
    let n = rng.range(5, 40);
    let ops = (0..n).map(|_| op(plugin, &mut rng)).collect();
    Case {
        plugin: plugin.to_string(),
        seed,
        config,
        ops,
    }
}

fn rate_limit_config(rng: &mut Rng) -> serde_json::Value {
    let mut rules = vec![json!({
        "name": "checked",
        "match": { "pathPrefix": "/api/" },
        "key": [ { "header": "x-api-key" } ],
        "limit": { "requests": rng.range(1, 6), "window": rng.pick(&["1s", "2s", "10s", "1m"]) },
        "maxKeys": 4096
    })];
    for i in 0..rng.below(3) {
        let parts = [
            json!({"source": "clientIp"}),
            json!({"source": "path"}),
            json!({"source": "method"}),
            json!({"cookie": "sid"}),
            json!({"header": "authorization"}),
        ];
        let key: Vec<_> = (0..rng.range(1, 3))
            .map(|_| rng.pick(&parts).clone())
            .collect();
        rules.push(json!({
            "name": format!("extra{i}"),
            "match": { "pathPrefix": rng.pick(&["/", "/api/", "/x"]) },
            "key": key,
            "limit": { "requests": rng.range(1, 50), "window": rng.pick(&["1s", "30s", "1h"]) },
            "maxKeys": rng.range(1, 64)
        }));
    }
    json!({
        "mode": rng.pick(&["enforce", "enforce", "shadow"]),
        "responseHeaders": rng.chance(50),
        "rules": rules
    })
}

fn expression(rng: &mut Rng, depth: u32) -> serde_json::Value {
    if depth > 3 || rng.chance(30) {
        return match rng.below(6) {
            0 => {
                json!({"var": rng.pick(&["tier", "targetingKey", "$flagd.flagKey", "$flagd.timestamp", "missing.path", "tier.0"])})
            }
            1 => json!(rng.pick(&["on", "off", "x", "beta"])),
            2 => json!(rng.range(0, 100)),
            3 => json!(rng.chance(50)),
            4 => json!(null),
            _ => json!(["on", "off"]),
        };
    }
    // Mostly well-formed (right operator and arity), so that most flags load and evaluate;
    // sometimes an unknown operator or a wrong arity, which must be rejected cleanly.
    let (op, arity) = *rng.pick(&[
        ("if", 3),
        ("==", 2),
        ("!=", 2),
        ("<", 2),
        (">", 2),
        ("in", 2),
        ("and", 2),
        ("or", 3),
        ("!", 1),
        ("cat", 2),
        ("substr", 3),
        ("+", 2),
        ("map", 2),
        ("filter", 2),
        ("reduce", 3),
        ("merge", 2),
        ("starts_with", 2),
        ("missing", 1),
        ("max", 2),
        ("%", 2),
    ]);
    if rng.chance(1) {
        return json!({"nope": [1]});
    }
    if op == "fractional" || rng.chance(5) {
        return json!({"fractional": [["on", rng.range(0, 100)], ["off", rng.range(0, 100)]]});
    }
    if rng.chance(3) {
        let version = if rng.chance(50) {
            json!({"var": "tier"})
        } else {
            json!("1.4.0")
        };
        let cmp = if rng.chance(2) {
            "bad"
        } else {
            *rng.pick(&["=", "^", "~", ">="])
        };
        return json!({"sem_ver": [version, cmp, "1.2.3"]});
    }
    let n = if rng.chance(1) {
        rng.range(0, 4)
    } else {
        arity
    };
    let args: Vec<_> = (0..n).map(|_| expression(rng, depth + 1)).collect();
    json!({ op: args })
}

fn flags_doc(rng: &mut Rng) -> serde_json::Value {
    let mut flags = serde_json::Map::new();
    // Always f0..f2: `headers` maps all three, and without a source each must be inline.
    for i in 0..3 {
        let mut variants = serde_json::Map::new();
        for name in ["on", "off", "x"] {
            if rng.chance(97) {
                variants.insert(name.into(), json!(rng.pick(&VARIANTS)));
            }
        }
        let mut flag = json!({
            "state": rng.pick(&["ENABLED", "ENABLED", "DISABLED"]),
            "variants": variants,
            "defaultVariant": variants.keys().nth(rng.below(3) as usize).cloned().unwrap_or_else(|| "on".into()),
        });
        if rng.chance(70) {
            flag["targeting"] = expression(rng, 0);
        }
        flags.insert(format!("f{i}"), flag);
    }
    json!({ "flags": flags })
}

fn flag_router_config(rng: &mut Rng) -> serde_json::Value {
    let doc = flags_doc(rng);
    let mut config = json!({
        "targetingKey": { "header": "x-user-id" },
        "context": { "tier": { "header": "x-tier" } },
        "headers": { "f0": "x-flag-0", "f1": "x-flag-1", "f2": "x-flag-2" },
        "flags": doc["flags"],
    });
    if rng.chance(50) {
        config["source"] = json!({
            "cluster": "flags", "path": "/flags.json",
            "pollInterval": rng.pick(&["1s", "5s"]), "timeout": "1s"
        });
    }
    config
}

fn cached_fallback_config(rng: &mut Rng) -> serde_json::Value {
    let mut c = json!({
        "routes": [ { "pathPrefix": "/api/" } ],
        "maxStale": rng.pick(&["10s", "1h"]),
        "maxEntries": rng.range(1, 64),
        "maxBodyBytes": rng.range(16, 8192),
        "maxTotalBytes": rng.range(8192, 65536),
        "key": { "headers": if rng.chance(50) { json!(["accept-language"]) } else { json!([]) } },
    });
    if rng.chance(50) {
        c["staticFallback"] =
            json!({"status": 503, "headers": {"content-type": "text/plain"}, "body": "static"});
    }
    if rng.chance(50) {
        c["circuitBreaker"] = json!({"failures": rng.range(1, 5), "window": "10s", "openFor": rng.pick(&["1s", "5s"])});
    }
    c
}

fn idempotency_config(rng: &mut Rng) -> serde_json::Value {
    json!({
        "routes": [ { "pathPrefix": "/pay" } ],
        "methods": ["POST", "PUT"],
        "header": "idempotency-key",
        "required": rng.chance(50),
        "scope": [ { "header": "authorization" } ],
        "ttl": "1h",
        "inFlightTimeout": "30s",
        "maxBodyBytes": rng.range(16, 4096),
        "maxEntries": 4096,
        "storeStatuses": rng.pick(&["2xx-4xx", "2xx"]),
    })
}

fn request(plugin: &str, rng: &mut Rng) -> Req {
    let (methods, paths): (&[&str], &[&str]) = match plugin {
        // Mostly one operation, so the same key comes back often (replays, 409s, 422s).
        "idempotency" => (
            &["POST", "POST", "POST", "POST", "PUT", "GET", "PATCH"],
            &["/pay", "/pay", "/pay", "/pay/1", "/pay?x=1", "/other"],
        ),
        "cached_fallback" => (
            &["GET", "GET", "HEAD", "POST"],
            &["/api/a", "/api/b?q=1", "/api/c", "/x"],
        ),
        _ => (
            &["GET", "POST", "DELETE", "OPTIONS"],
            &[
                "/api/a",
                "/api/b?x=1",
                "/other",
                "/API/a",
                "/api",
                "/checkout",
            ],
        ),
    };
    let mut path = rng.pick(paths).to_string();
    if rng.chance(5) {
        path.push_str(&format!(
            "/%{:02X}{}",
            rng.below(256),
            "x".repeat(rng.below(3000) as usize)
        ));
    }
    let mut headers = Vec::new();
    let pool: &[(&str, &[&str])] = &[
        ("x-api-key", &["k1", "k2", "k3", ""]),
        ("authorization", &["Bearer a", "Bearer b"]),
        ("idempotency-key", &["key-1", "key-2", "key-3"]),
        ("x-user-id", &["u1", "u2", "u3"]),
        ("x-tier", &["beta", "free"]),
        ("x-flag-0", &["forged"]),
        ("accept-language", &["en", "de"]),
        ("cookie", &["sid=1", "sid=2; a=b"]),
        ("cache-control", &["no-cache", "max-age=0"]),
    ];
    for (name, values) in pool {
        // The header a plugin keys on is usually there, so its decisions get exercised.
        let chance = match (plugin, *name) {
            ("idempotency", "idempotency-key") | ("rate_limit", "x-api-key") => 85,
            _ => 40,
        };
        if rng.chance(chance) {
            let v = if rng.chance(10) {
                gen::value(rng)
            } else {
                rng.pick(values).as_bytes().to_vec()
            };
            headers.push((name.as_bytes().to_vec(), v));
        }
    }
    for _ in 0..rng.below(3) {
        headers.push((gen::name(rng), gen::value(rng)));
    }
    let chunks = match plugin {
        "idempotency" => {
            // Few distinct bodies, so that duplicates with the same and with another body occur.
            let body = rng
                .pick(&[&b"{\"amount\":1}"[..], b"{\"amount\":2}", b""])
                .to_vec();
            if rng.chance(10) {
                gen::body(rng, 4096)
            } else if body.len() > 3 && rng.chance(30) {
                let (a, b) = body.split_at(3);
                vec![a.to_vec(), b.to_vec()]
            } else if body.is_empty() {
                vec![]
            } else {
                vec![body]
            }
        }
        _ => gen::body(rng, 2048),
    };
    Req {
        method: rng.pick(methods).to_string(),
        path,
        headers,
        chunks,
        from: gen::client(rng),
    }
}

fn op(plugin: &str, rng: &mut Rng) -> Op {
    let headers: &[(&str, &[&str])] = &[
        ("cache-control", &["max-age=60", "no-store", "private", "public, max-age=5", "no-cache", "must-revalidate", "stale-if-error=1", "s-maxage=10"]),
        ("set-cookie", &["a=b"]),
        ("vary", &["accept-language", "*", "accept-language, accept-encoding", "x-a, x-b, x-c, x-d, x-e, x-f, x-g, x-h, x-i, x-j, x-k, x-l, x-m, x-n, x-o, x-p, x-q"]),
        ("content-type", &["application/json"]),
        ("content-length", &["3", "999999"]),
    ];
    match rng.below(12) {
        // Two hours let the 1 h TTLs expire. The flag router has none: its clock is the 1-5 s
        // poll, which two hours would only repeat thousands of times over.
        0 if plugin == "flag_router" => {
            Op::Advance(*rng.pick(&[1, 500, 1000, 2000, 10_000, 60_000]))
        }
        0 => Op::Advance(*rng.pick(&[1, 500, 1000, 2000, 10_000, 60_000, 7_200_000])),
        1 | 2 => {
            let a = request(plugin, rng);
            let b = if rng.chance(60) {
                a.clone()
            } else {
                request(plugin, rng)
            };
            Op::Pair(a, b, gen::upstream(rng, headers), rng.next())
        }
        3 => Op::Abort(
            request(plugin, rng),
            gen::upstream(rng, headers),
            rng.range(1, 12) as u32,
        ),
        _ => Op::Send(request(plugin, rng), gen::upstream(rng, headers)),
    }
}

/// What an upstream answer was, with the unique token its body carries.
struct Answered {
    token: String,
    status: u16,
    headers: Vec<(String, String)>,
    /// The request it answered.
    request: UpstreamRequest,
}

/// Per-case record of what happened, for the invariants.
#[derive(Default)]
struct Book {
    /// rate_limit: admission times per `x-api-key` value, as (op start, op end): the host
    /// clock moves within an op (upstream delays, timeouts).
    admitted: HashMap<Vec<u8>, Vec<(u64, u64)>>,
    /// idempotency: when a scope+key+method+path got a kept response.
    kept: HashMap<Tuple, u64>,
    /// idempotency: every token the upstream answered per scope+key+method+path.
    answers: HashMap<Tuple, BTreeSet<String>>,
    /// cached_fallback: tokens the upstream returned per path that may be replayed.
    replayable: HashMap<String, BTreeSet<String>>,
    /// Decisions an invariant looked at: a limited key, a replay, a stored answer served, a
    /// routing header set. A fuzzer whose invariants never see one proves nothing.
    checked: u64,
}

pub struct Outcome {
    pub rejected: bool,
    pub requests: u64,
    pub checked: u64,
}

fn token_of(body: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(body);
    let start = text.rfind("#tok")?;
    let end = text.get(start + 1..)?.find('#')? + start + 2;
    text.get(start..end).map(str::to_string)
}

/// Runs one case; `Err` says which check failed.
pub fn run(case: &Case, module: &Module) -> Result<Outcome, String> {
    let current: Rc<RefCell<Up>> = Rc::new(RefCell::new(Up::Refused));
    let counter = Rc::new(RefCell::new(0u64));
    let given: Rc<RefCell<Vec<Answered>>> = Rc::new(RefCell::new(Vec::new()));
    let (cur, cnt, giv) = (current.clone(), counter.clone(), given.clone());
    let mut doc_rng = Rng::new(case.seed ^ 0xf1a9);
    let docs: Vec<String> = (0..4)
        .map(|_| {
            if doc_rng.chance(30) {
                let doc = flags_doc(&mut doc_rng);
                gen::mutate(&mut doc_rng, &doc)
            } else {
                flags_doc(&mut doc_rng).to_string()
            }
        })
        .collect();
    // The file changes every `every` fetches; with ETags the source answers a fetch naming the
    // current version `304`, as a file server does (the plugin parses nothing then).
    let every = *doc_rng.pick(&[1, 2, 5, 20]);
    let etags = doc_rng.chance(75);
    let served: Rc<RefCell<Vec<Served>>> = Rc::new(RefCell::new(Vec::new()));
    let answers = served.clone();
    let flag_docs = docs.clone();
    let fetches = Rc::new(RefCell::new(0usize));
    // The source is the cluster the configuration names, even a mutated one's: the plugin
    // cannot know Envoy's clusters, so a name Envoy lacks is the operator's mistake, not the
    // plugin's, and fuzzing it would test nothing but that refusal.
    let cluster = serde_json::from_str::<serde_json::Value>(&case.config)
        .ok()
        .and_then(|c| c["source"]["cluster"].as_str().map(str::to_string))
        .unwrap_or_else(|| "flags".into());
    let built = Edge::builder()
        .plugin(
            Plugin::new(module, case.config.clone())
                .name(&case.plugin)
                .root_id(&case.plugin),
        )
        .workers(2)
        .seed(case.seed)
        .route_timeout(ROUTE_TIMEOUT)
        .upstream(move |req: &UpstreamRequest| {
            let up = cur.borrow().clone();
            let Up::Respond {
                status, headers, ..
            } = &up
            else {
                return up.answer("");
            };
            let token = next_token(&cnt);
            giv.borrow_mut().push(Answered {
                token: token.clone(),
                status: *status,
                headers: headers.clone(),
                request: req.clone(),
            });
            up.answer(&token)
        })
        .cluster(&cluster, move |req| {
            let i = {
                let mut f = fetches.borrow_mut();
                *f += 1;
                *f
            };
            if i % 5 == 4 {
                answers.borrow_mut().push(Served::Fail);
                return CalloutReply::Fail {
                    delay: Duration::ZERO,
                };
            }
            let version = i / every;
            let etag = format!("\"v{version}\"");
            if etags && req.header("if-none-match") == Some(etag.as_str()) {
                answers.borrow_mut().push(Served::NotModified);
                return CalloutReply::Response {
                    headers: vec![(b":status".to_vec(), b"304".to_vec())],
                    body: Vec::new(),
                    trailers: Vec::new(),
                    delay: Duration::ZERO,
                };
            }
            let doc = version % docs.len();
            answers.borrow_mut().push(Served::Doc(doc));
            let mut headers = vec![(b":status".to_vec(), b"200".to_vec())];
            if etags {
                headers.push((b"etag".to_vec(), etag.into_bytes()));
            }
            CalloutReply::Response {
                headers,
                body: docs.get(doc).cloned().unwrap_or_default().into_bytes(),
                trailers: Vec::new(),
                delay: Duration::ZERO,
            }
        })
        .build();
    let mut edge = match built {
        Ok(e) => e,
        Err(e) => {
            let msg = format!("{e:#}");
            if msg.contains("rejected its configuration") && !msg.contains("trap") {
                if std::env::var("FUZZ_SHOW_REJECTIONS").is_ok() {
                    eprintln!("rejected: {}", msg.lines().last().unwrap_or(""));
                }
                return Ok(Outcome {
                    rejected: true,
                    requests: 0,
                    checked: 0,
                });
            }
            return Err(format!(
                "loading failed other than by a clean rejection: {msg}"
            ));
        }
    };
    let config: serde_json::Value = serde_json::from_str(&case.config).unwrap_or_default();
    let mut oracle = if case.plugin == "flag_router" {
        let vms = edge.worker_count() + 1;
        Some(Oracle::new(&case.config, &flag_docs, vms).ok_or_else(|| {
            "the plugin loaded a configuration its own parser refuses natively".to_string()
        })?)
    } else {
        None
    };
    let mut book = Book::default();
    let mut requests = 0;
    // Streams without a worker of their own go round the workers, as `Edge::begin` sends them.
    let mut round_robin = 0usize;
    for (i, op) in case.ops.iter().enumerate() {
        let at = |what: String| format!("op {i} ({}): {what}", describe(op));
        let before = edge.upstream_requests().len();
        let started_ns = edge.now_ns();
        let given_before = given.borrow().len();
        let mut responses: Vec<(Req, Response, bool)> = Vec::new();
        // The flag router's expected outcome per request of this op, taken as it begins.
        let mut expected: Vec<Expected> = Vec::new();
        let mut expect = |edge: &Edge, req: &Req, worker: usize| -> Result<(), String> {
            if let Some(o) = oracle.as_mut() {
                expected.push(o.expect(edge, &served.borrow(), req, worker)?);
            }
            Ok(())
        };
        let workers = edge.worker_count();
        match op {
            Op::Advance(ms) => edge
                .advance(Duration::from_millis(*ms))
                .map_err(|e| at(format!("{e:#}")))?,
            Op::Send(req, up) => {
                *current.borrow_mut() = up.clone();
                // `Edge::send`, in its parts: the flags are those held once due events ran.
                edge.run_pending().map_err(|e| at(format!("{e:#}")))?;
                let id = edge
                    .begin(req.to_request())
                    .map_err(|e| at(format!("{e:#}")))?;
                expect(&edge, req, round_robin % workers).map_err(at)?;
                round_robin += 1;
                let res = edge.finish(id).map_err(|e| at(format!("{e:#}")))?;
                responses.push((req.clone(), res, false));
            }
            Op::Abort(req, up, after) => {
                *current.borrow_mut() = up.clone();
                let id = edge
                    .begin(req.to_request())
                    .map_err(|e| at(format!("{e:#}")))?;
                expect(&edge, req, round_robin % workers).map_err(at)?;
                round_robin += 1;
                for n in 0..*after {
                    let step = edge.step(id).map_err(|e| at(format!("{e:#}")))?;
                    if n == 0 && step != host_tests::Step::Ran(host_tests::Callback::RequestHeaders)
                    {
                        // No evaluation ran: nothing to count.
                        expected.clear();
                    }
                    if let host_tests::Step::Done | host_tests::Step::Waiting = step {
                        break;
                    }
                }
                let res = edge.reset(id).map_err(|e| at(format!("{e:#}")));
                if let Ok(res) = res {
                    responses.push((req.clone(), res, true));
                }
            }
            Op::Pair(a, b, up, schedule) => {
                *current.borrow_mut() = up.clone();
                let res = interleave(&mut edge, [a, b], *schedule, |edge, k, req| {
                    expect(edge, req, k)
                })
                .map_err(at)?;
                for (res, req) in res.into_iter().zip([a, b]) {
                    responses.push((req.clone(), res, false));
                }
            }
        }
        requests += responses.len() as u64;
        for w in 0..edge.worker_count() {
            if edge.vm_failed(w, 0) {
                return Err(at(format!(
                    "the VM on worker {w} trapped; log: {:?}",
                    edge.logs().last()
                )));
            }
        }
        let misuse = edge.abi_misuse();
        if !misuse.is_empty() {
            return Err(at(format!("ABI misuse: {misuse:?}")));
        }
        let ups: Vec<UpstreamRequest> = edge
            .upstream_requests()
            .get(before..)
            .unwrap_or_default()
            .to_vec();
        let answered: Vec<Answered> = given.borrow_mut().drain(given_before..).collect();
        let now = edge.now_ns();
        if std::env::var("FUZZ_TRACE").is_ok() {
            let got: Vec<_> = responses
                .iter()
                .map(|(_, r, _)| (r.status, r.worker))
                .collect();
            eprintln!(
                "op {i} at {now}: {} → {got:?}, {} upstream",
                describe(op),
                ups.len()
            );
        }
        book.checked += responses
            .iter()
            .filter(|(_, r, _)| match case.plugin.as_str() {
                "rate_limit" => r.status == 429,
                "idempotency" => r.header("idempotent-replayed").is_some(),
                "cached_fallback" => r.header("cache-status").is_some_and(|c| c.contains("hit")),
                _ => false,
            })
            .count() as u64;
        let check = match case.plugin.as_str() {
            "rate_limit" => check_rate_limit(&config, &mut book, &ups, started_ns, now),
            "idempotency" => {
                check_idempotency(&config, &mut book, op, &responses, &ups, &answered, now)
            }
            "cached_fallback" => check_cached_fallback(&mut book, &responses, &ups, &answered),
            _ => match oracle.as_mut() {
                Some(o) => check_flag_router(
                    o,
                    &edge,
                    &served.borrow(),
                    &mut book,
                    &responses,
                    &ups,
                    &expected,
                ),
                None => Ok(()),
            },
        };
        check.map_err(at)?;
        // Each op's records are its own: the log and upstream record stay small.
        edge.clear_records();
    }
    Ok(Outcome {
        rejected: false,
        requests,
        checked: book.checked,
    })
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
        Op::Abort(q, _, n) => format!("abort {} after {n}", r(q)),
        Op::Advance(ms) => format!("advance {ms} ms"),
    }
}

fn header<'a>(u: &'a UpstreamRequest, name: &str) -> Option<&'a [u8]> {
    u.headers
        .iter()
        .find(|(k, _)| k == name.as_bytes())
        .map(|(_, v)| v.as_slice())
}

/// Admissions of one key never exceed the bucket: `requests` at once plus the refill.
fn check_rate_limit(
    config: &serde_json::Value,
    book: &mut Book,
    ups: &[UpstreamRequest],
    started: u64,
    now: u64,
) -> Result<(), String> {
    let Some(rule) = config["rules"].get(0) else {
        return Ok(());
    };
    if config["mode"] == "shadow" || rule["name"] != "checked" {
        return Ok(());
    }
    let Some(limit) = rule["limit"]["requests"].as_u64() else {
        return Ok(());
    };
    let Some(window) = rule["limit"]["window"]
        .as_str()
        .and_then(|w| host_tests::scenario::parse_duration(w).ok())
    else {
        return Ok(());
    };
    for u in ups {
        let path = u.path().split('?').next().unwrap_or("");
        let Some(key) = header(u, "x-api-key") else {
            continue;
        };
        if !path.starts_with("/api/") || key.is_empty() {
            continue;
        }
        let times = book.admitted.entry(key.to_vec()).or_default();
        times.push((started, now));
        let window_ns = window.as_nanos() as u64;
        // The longest the admissions from the i-th on can have been spread over.
        for (i, (t0, _)) in times.iter().enumerate() {
            let span = now - t0;
            let refill =
                (u128::from(limit) * u128::from(span) / u128::from(window_ns.max(1))) as u64;
            let allowed = limit.saturating_add(refill).saturating_add(1);
            let n = (times.len() - i) as u64;
            if n > allowed {
                return Err(format!(
                    "key {:?}: {n} admissions in {span} ns, bucket allows {allowed} ({limit} per {window:?})",
                    String::from_utf8_lossy(key)
                ));
            }
        }
    }
    Ok(())
}

type Tuple = (Option<Vec<u8>>, Vec<u8>, String, String);

fn tuple_of(
    config: &serde_json::Value,
    method: &str,
    path: &str,
    auth: Option<&[u8]>,
    key: Option<&[u8]>,
) -> Option<Tuple> {
    let key = key?;
    let plain = !key.is_empty()
        && key.len() <= 64
        && key.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-');
    let methods: Vec<&str> = config["methods"]
        .as_array()?
        .iter()
        .filter_map(|m| m.as_str())
        .collect();
    if !plain || !methods.contains(&method) || !path.starts_with("/pay") {
        return None;
    }
    // The scope as configured (a mutated config may have dropped it); an empty
    // authorization is no authorization: both are the unauthenticated scope.
    let scoped = match config.get("scope") {
        // Absent or null: the default, `[{"header":"authorization"}]`.
        None | Some(serde_json::Value::Null) => true,
        Some(s) => s
            .as_array()
            .is_some_and(|parts| parts.iter().any(|p| p["header"] == "authorization")),
    };
    let auth = auth.filter(|a| scoped && !a.is_empty()).map(<[u8]>::to_vec);
    Some((auth, key.to_vec(), method.to_string(), path.to_string()))
}

fn check_idempotency(
    config: &serde_json::Value,
    book: &mut Book,
    op: &Op,
    responses: &[(Req, Response, bool)],
    ups: &[UpstreamRequest],
    answered: &[Answered],
    now: u64,
) -> Result<(), String> {
    let two_xx_only = config["storeStatuses"] == "2xx";
    let ttl_ns = 3_600_000_000_000u64;
    // Forwarded again while a kept response lives, or twice within one pair: a double spend.
    let mut this_op: HashMap<Tuple, usize> = HashMap::new();
    for u in ups {
        let Some(t) = tuple_of(
            config,
            u.method(),
            u.path(),
            header(u, "authorization"),
            header(u, "idempotency-key"),
        ) else {
            continue;
        };
        if let Some(at) = book.kept.get(&t) {
            if now.saturating_sub(*at) + 60_000_000_000 < ttl_ns {
                return Err(format!(
                    "{t:?} reached the upstream again while its response was kept"
                ));
            }
        }
        *this_op.entry(t.clone()).or_default() += 1;
        // A second forward within one pair is a retry only if the first was released.
        let released = match op {
            Op::Pair(
                _,
                _,
                Up::Respond {
                    status, delay_ms, ..
                },
                _,
            ) => {
                let keepable = if two_xx_only {
                    (200..300).contains(status)
                } else {
                    (200..500).contains(status)
                };
                !keepable || Duration::from_millis(*delay_ms) >= ROUTE_TIMEOUT
            }
            _ => true,
        };
        if this_op[&t] > 1 && !released {
            return Err(format!("{t:?} reached the upstream twice at once"));
        }
    }
    // What the application answered, per request it received (whether or not the client got it).
    for a in answered {
        let u = &a.request;
        let t = tuple_of(
            config,
            u.method(),
            u.path(),
            header(u, "authorization"),
            header(u, "idempotency-key"),
        );
        if let Some(t) = t {
            book.answers.entry(t).or_default().insert(a.token.clone());
        }
    }
    let tuple = |req: &Req| {
        tuple_of(
            config,
            &req.method,
            &req.path,
            req.header("authorization"),
            req.header("idempotency-key"),
        )
    };
    // Answers first (a pair's replay may come before, in order, the answer it replays).
    for (req, res, aborted) in responses {
        let Some(t) = tuple(req) else { continue };
        if res.header("idempotent-replayed") == Some("true") {
            continue;
        }
        let Some(token) = token_of(&res.body) else {
            continue;
        };
        let Some(a) = answered.iter().find(|a| a.token == token) else {
            continue;
        };
        let keepable = if two_xx_only {
            (200..300).contains(&a.status)
        } else {
            (200..500).contains(&a.status)
        };
        if keepable && !aborted && res.status == a.status && res.details == "via_upstream" {
            book.kept.insert(t, now);
        }
    }
    for (req, res, _) in responses {
        let Some(t) = tuple(req) else { continue };
        if res.header("idempotent-replayed") == Some("true") {
            let token = token_of(&res.body);
            let known = book.answers.get(&t);
            if !token
                .as_ref()
                .is_some_and(|tok| known.is_some_and(|k| k.contains(tok)))
            {
                return Err(format!(
                    "replayed a response that {t:?} never got: token {token:?}"
                ));
            }
        }
    }
    Ok(())
}

fn check_cached_fallback(
    book: &mut Book,
    responses: &[(Req, Response, bool)],
    ups: &[UpstreamRequest],
    answered: &[Answered],
) -> Result<(), String> {
    let _ = ups;
    for (req, res, _) in responses {
        let cc = |a: &Answered, name: &str| {
            a.headers
                .iter()
                .any(|(k, v)| k == "cache-control" && v.contains(name))
        };
        if let Some(token) = token_of(&res.body) {
            if let Some(a) = answered.iter().find(|a| a.token == token) {
                let has = |n: &str| a.headers.iter().any(|(k, _)| k == n);
                let vary_star = a
                    .headers
                    .iter()
                    .any(|(k, v)| k == "vary" && v.contains('*'));
                let authorized =
                    req.header("authorization").is_some() && !cc(a, "public") && !cc(a, "s-maxage");
                let forbidden = has("set-cookie")
                    || cc(a, "no-store")
                    || cc(a, "private")
                    || authorized
                    || vary_star;
                if !forbidden {
                    book.replayable
                        .entry(req.path.clone())
                        .or_default()
                        .insert(token);
                }
            }
        }
        let hit = res
            .header("cache-status")
            .is_some_and(|c| c.contains("hit"));
        if !hit {
            continue;
        }
        if res.header("set-cookie").is_some() {
            return Err("a stored response was replayed with set-cookie".into());
        }
        if !matches!(req.method.as_str(), "GET" | "HEAD") {
            return Err(format!("a {} was answered from the store", req.method));
        }
        if req.method == "GET" {
            let token = token_of(&res.body);
            let ok = token.as_ref().is_some_and(|t| {
                book.replayable
                    .get(&req.path)
                    .is_some_and(|s| s.contains(t))
            });
            if !ok {
                return Err(format!(
                    "{} was answered with {token:?}, which is not a replayable answer of that URL (replayable: {:?})",
                    req.path,
                    book.replayable.get(&req.path)
                ));
            }
        }
    }
    Ok(())
}

/// Every request of the op got exactly the headers, and counted exactly the variants, that
/// the plugin's own evaluator gives on the flags its VM held when it began.
fn check_flag_router(
    oracle: &mut Oracle,
    edge: &Edge,
    served: &[Served],
    book: &mut Book,
    responses: &[(Req, Response, bool)],
    ups: &[UpstreamRequest],
    expected: &[Expected],
) -> Result<(), String> {
    for e in expected {
        if let Some((_, r, _)) = responses.iter().find(|(_, r, _)| r.worker != e.worker) {
            if expected.len() == 1 {
                return Err(format!(
                    "the stream ran on worker {}, not {} as streams go round",
                    r.worker, e.worker
                ));
            }
        }
        let up = ups.iter().find(|u| u.worker == e.worker);
        if Oracle::check_request(e, up)? {
            book.checked += 1;
        }
    }
    if ups.len() > expected.len() {
        return Err(format!(
            "{} upstream requests for {} streams",
            ups.len(),
            expected.len()
        ));
    }
    oracle.end_op(edge, served)?;
    oracle.check_counters(edge, expected)
}

/// `Edge::interleave` in its parts: `reqs[0]` on worker 0 and `reqs[1]` on worker 1, one
/// callback at a time as the schedule's bits choose (a stream with none left yields), then
/// both finished; `first` runs just before each stream's first callback.
fn interleave(
    edge: &mut Edge,
    reqs: [&Req; 2],
    schedule: u64,
    mut first: impl FnMut(&Edge, usize, &Req) -> Result<(), String>,
) -> Result<[Response; 2], String> {
    let e = |e: anyhow::Error| format!("{e:#}");
    let ids = [
        edge.begin(reqs[0].to_request().worker(0)).map_err(e)?,
        edge.begin(reqs[1].to_request().worker(1)).map_err(e)?,
    ];
    let mut bits = schedule;
    let mut idle = [false, false];
    let mut started = [false, false];
    while !(idle[0] && idle[1]) {
        let k = (bits & 1) as usize;
        bits = bits.rotate_right(1);
        let which = if idle[k] { 1 - k } else { k };
        if !started[which] {
            started[which] = true;
            first(edge, which, reqs[which])?;
        }
        if !matches!(edge.step(ids[which]).map_err(e)?, host_tests::Step::Ran(_)) {
            idle[which] = true;
        }
    }
    let [x, y] = ids;
    Ok([edge.finish(x).map_err(e)?, edge.finish(y).map_err(e)?])
}

/// Per plugin: cases run, requests sent, configs rejected, failures (first few kept).
#[derive(Default)]
pub struct Tally {
    pub cases: u64,
    pub requests: u64,
    pub rejected: u64,
    pub checked: u64,
    pub failures: Vec<(Case, String)>,
}

pub fn tally_line(plugin: &str, t: &Tally, secs: f64) -> String {
    format!(
        "{plugin:<16} {:>7} cases {:>8} requests ({:>6.0} requests/s) {:>6} configs rejected {:>7} decisions checked {:>3} failures",
        t.cases,
        t.requests,
        t.requests as f64 / secs.max(1e-9),
        t.rejected,
        t.checked,
        t.failures.len()
    )
}

/// The next answer's token, `#tok<n>#`: each of a case's upstream answers is told apart by it.
pub(crate) fn next_token(counter: &RefCell<u64>) -> String {
    let mut c = counter.borrow_mut();
    *c += 1;
    format!("#tok{c}#")
}
