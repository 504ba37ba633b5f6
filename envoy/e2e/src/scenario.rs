//! The real-Envoy runner of scenario files (`host_tests::scenario`): it generates the Envoy
//! config of the scenario's chain, scripts a [`TestUpstream`] for the application and for each
//! HTTP callout cluster (`flags` always) and a [`GrpcServer`] for each gRPC one, sends the
//! steps' requests (HTTP/1.1, or HTTP/2 for `protocol: h2`) with real pauses, and writes the
//! same normalised transcript as the harness runner.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::http2::{self, GrpcServer, H2Request};
use crate::{client, http};
use crate::{Envoy, HeldPort, RecordedRequest, Script, Substitutions, TestUpstream};
use anyhow::{Context, Result};
use host_tests::scenario::{
    answer_for, call_line, parse_duration, step_label, upstream_line, Answer, Scenario, Seen, Send,
    StepRecord, Transcript,
};
use std::io::BufReader;

/// The flags cluster's marker port in generated configs (rewritten to its upstream).
const FLAGS_MARKER: &str = "port_value: 18082";
const AUTHORITY: &str = "edge.test";
const CLIENT_TIMEOUT: Duration = Duration::from_secs(20);

type Routes = Arc<Mutex<BTreeMap<String, Answer>>>;

fn script_of(a: &Answer) -> Script {
    if a.reset {
        return Script::reset();
    }
    let body = a.full_body();
    let mut s = Script::status(a.status).with_body(body.clone());
    for (k, v) in &a.headers {
        s = s.with_header(k.clone(), v.clone());
    }
    if let Some(n) = a.chunks.filter(|n| *n > 1) {
        s = s.chunked(n.min(body.len().max(1)), Duration::from_millis(20));
    }
    s.with_delay(a.delay().unwrap_or_default())
}

fn serve(up: &TestUpstream, routes: &Routes, unrouted_404: bool) {
    let routes = Arc::clone(routes);
    up.respond_with(move |req: &RecordedRequest| {
        let routes = routes.lock().unwrap_or_else(PoisonError::into_inner);
        match answer_for(&routes, &req.path) {
            Some(a) => Some(script_of(a)),
            None if unrouted_404 => Some(Script::status(404)),
            None => None,
        }
    });
}

/// The Envoy config of a scenario: one listener, its chain, the router with the rewrites and
/// the route timeout, and the `backend` and `flags` clusters (marker ports).
pub fn envoy_config(s: &Scenario) -> String {
    let q = |v: &str| serde_json::Value::String(v.to_string()).to_string();
    let mut routes = String::new();
    if let Some(d) = &s.direct_response {
        routes.push_str(&format!(
            "                - match: {{ prefix: \"/\" }}\n                  direct_response: {{ status: {}, body: {{ inline_string: {} }} }}\n",
            d.status,
            q(&d.body)
        ));
    }
    for r in &s.rewrites {
        routes.push_str(&format!(
            "                - match: {{ prefix: {}, headers: [ {{ name: {}, string_match: {{ exact: {} }} }} ] }}\n                  route: {{ cluster: backend, prefix_rewrite: {}, timeout: {}s }}\n",
            q(&r.prefix), q(&r.header), q(&r.value), q(&r.rewrite), s.route_timeout().as_secs_f64()
        ));
    }
    routes.push_str(&format!(
        "                - match: {{ prefix: \"/\" }}\n                  route: {{ cluster: backend, timeout: {}s }}\n",
        s.route_timeout().as_secs_f64()
    ));
    let mut filters = String::new();
    let sets_metadata = s
        .steps
        .iter()
        .flat_map(|step| step.send.iter().chain(step.together.iter().flatten()))
        .any(|send| !send.metadata.is_empty());
    if sets_metadata {
        // The dynamic metadata another filter would set: a Lua filter first in the chain
        // copies it from a header the client sends, and removes the header.
        filters.push_str(
            r#"            - name: envoy.filters.http.lua
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua
                default_source_code:
                  inline_string: |
                    function envoy_on_request(h)
                      local v = h:headers():get("x-scenario-metadata")
                      if v then
                        h:headers():remove("x-scenario-metadata")
                        for ns, key, value in string.gmatch(v, "([^|;]+)|([^|;]+)|([^|;]*)") do
                          h:streamInfo():dynamicMetadata():set(ns, key, value)
                        end
                      end
                    end
"#,
        );
    }
    for f in &s.chain {
        if f.is_wasm() {
            let file = match f.module_file(&s.dir) {
                Some(file) => std::path::absolute(&file)
                    .unwrap_or(file)
                    .to_string_lossy()
                    .into_owned(),
                None => format!("dist/{}.wasm", f.plugin.clone().unwrap_or_default()),
            };
            let name = f.filter_name().unwrap_or_default();
            let root_id = f.root_id().unwrap_or_default();
            filters.push_str(&format!(
                r#"            - name: envoy.filters.http.wasm
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
                config:
                  name: {name}
                  root_id: {root_id}
                  vm_config:
                    vm_id: {vm_id}
                    runtime: envoy.wasm.runtime.v8
                    code: {{ local: {{ filename: {file} }} }}
                  configuration:
                    "@type": type.googleapis.com/google.protobuf.StringValue
                    value: {config}
"#,
                name = q(&name),
                root_id = q(&root_id),
                vm_id = q(&f.vm_id()),
                file = q(&file),
                config = q(&f.config_string()),
            ));
        }
        if let Some(max) = f.buffer {
            filters.push_str(&format!(
                r#"            - name: envoy.filters.http.buffer
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer
                max_request_bytes: {max}
"#
            ));
        }
    }
    let cluster = |name: &str, port: &str, grpc: bool| {
        // A gRPC cluster speaks HTTP/2 to its server (gRPC has no HTTP/1.1 form).
        let h2 = if grpc {
            r#"      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config:
            http2_protocol_options: {}
"#
        } else {
            ""
        };
        format!(
            r#"    - name: {name}
      type: STATIC
      connect_timeout: 1s
{h2}      load_assignment:
        cluster_name: {name}
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    socket_address: {{ address: 127.0.0.1, {port} }}
"#
        )
    };
    format!(
        r#"admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: 9901 }}
static_resources:
  listeners:
    - name: main
      address:
        socket_address: {{ address: 127.0.0.1, port_value: 10000 }}
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: ingress
                codec_type: AUTO
                route_config:
                  name: local
                  virtual_hosts:
                    - name: all
                      domains: ["*"]
                      routes:
{routes}                http_filters:
{filters}                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
{backend}{flags}"#,
        routes = indent(&routes, 6),
        filters = indent(&filters, 6),
        backend = cluster("backend", "port_value: 18080", false),
        flags = callout_clusters(s)
            .iter()
            .map(|(name, marker)| cluster(name, marker, is_grpc(s, name)))
            .collect::<String>(),
    )
}

/// The scenario's HTTP callout clusters with their marker ports: `flags` (always there, as
/// the plugins here expect it) on 18082, the others from 18100 in name order.
fn callout_clusters(s: &Scenario) -> Vec<(String, String)> {
    let mut out = vec![("flags".to_string(), FLAGS_MARKER.to_string())];
    for (i, name) in s.clusters.keys().filter(|n| *n != "flags").enumerate() {
        out.push((name.clone(), format!("port_value: {}", 18100 + i)));
    }
    out
}

fn is_grpc(s: &Scenario, cluster: &str) -> bool {
    s.clusters.get(cluster).is_some_and(|c| c.grpc)
}

/// A callout cluster's server: HTTP, or gRPC over HTTP/2.
enum Callee {
    Http(TestUpstream),
    Grpc(GrpcServer),
}

impl Callee {
    fn port(&self) -> u16 {
        match self {
            Callee::Http(up) => up.port(),
            Callee::Grpc(server) => server.port(),
        }
    }

    /// The calls received since the last time, as `(:method, :path)`.
    fn take_calls(&self) -> Vec<(String, String)> {
        match self {
            Callee::Http(up) => {
                let calls = up.requests().into_iter().map(|r| (r.method, r.path));
                let calls = calls.collect();
                up.clear();
                calls
            }
            Callee::Grpc(server) => {
                let calls = server.calls().into_iter().map(|c| (c.method, c.path));
                let calls = calls.collect();
                server.clear();
                calls
            }
        }
    }
}

/// The answers each callout cluster serves, by name.
fn cluster_routes(s: &Scenario) -> BTreeMap<String, BTreeMap<String, Answer>> {
    let mut out = BTreeMap::new();
    out.insert("flags".to_string(), s.flags.clone());
    for (name, cluster) in &s.clusters {
        let routes = cluster
            .answers
            .iter()
            .map(|(path, a)| (path.clone(), a.as_answer()))
            .collect();
        out.insert(name.clone(), routes);
    }
    out
}

fn indent(text: &str, by: usize) -> String {
    let pad = " ".repeat(by);
    text.lines().map(|l| format!("{pad}{l}\n")).collect()
}

/// Runs a scenario against Envoy 1.40 with `--concurrency 2`.
pub fn run_in_envoy(s: &Scenario) -> Result<Transcript> {
    let backend_routes: Routes = Arc::new(Mutex::new(s.upstream.clone()));
    let flag_routes: Routes = Arc::new(Mutex::new(s.flags.clone()));
    let mut backend = Some(TestUpstream::start()?);
    // While the backend is down its port stays held (refusing), so it can come back on it.
    let mut held: Option<HeldPort> = None;
    let backend_addr = backend
        .as_ref()
        .map(TestUpstream::addr)
        .context("upstream")?;
    if let Some(b) = &backend {
        serve(b, &backend_routes, false);
    }
    let flags = TestUpstream::start()?;
    serve(&flags, &flag_routes, true);
    let mut subs = Substitutions::new(backend_addr.port())
        .replace(FLAGS_MARKER, format!("port_value: {}", flags.port()));
    let routes = cluster_routes(s);
    let mut others = Vec::new();
    let mut other_names = Vec::new();
    for (name, marker) in callout_clusters(s).into_iter().skip(1) {
        let callee = match s.clusters.get(&name).filter(|c| c.grpc) {
            Some(c) => Callee::Grpc(GrpcServer::start(c.answers.clone())?),
            None => {
                let up = TestUpstream::start()?;
                let served = routes.get(&name).cloned().unwrap_or_default();
                serve(&up, &Arc::new(Mutex::new(served)), true);
                Callee::Http(up)
            }
        };
        subs = subs.replace(marker, format!("port_value: {}", callee.port()));
        other_names.push(name);
        others.push(callee);
    }
    if let Some(flags_routes) = routes
        .get("flags")
        .filter(|_| s.clusters.contains_key("flags"))
    {
        flag_routes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(flags_routes.clone());
    }
    let config = envoy_config(s);
    let envoy = match Envoy::start_text(
        &config,
        "the scenario's chain",
        &subs,
        &["--concurrency", "2"],
    ) {
        Ok(e) => e,
        Err(e) => {
            return Ok(Transcript {
                refused: Some(format!("{e:#}")),
                steps: Vec::new(),
            })
        }
    };
    // A plugin that fetches at load has its first document before traffic, as in the harness.
    if !s.flags.is_empty() {
        let _ = flags.wait_for_requests_to(
            s.flags
                .keys()
                .next()
                .map_or("/", |k| k.trim_end_matches('*')),
            1,
            Duration::from_secs(5),
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let listener = SocketAddr::from(([127, 0, 0, 1], envoy.listener_port()));
    let recorded = s.recorded_headers();
    let mut t = Transcript::default();
    let mut seen_before_down = Vec::new();
    for step in &s.steps {
        let mut rec = StepRecord {
            label: step_label(step),
            responses: Vec::new(),
            upstream: Vec::new(),
            calls: Vec::new(),
        };
        if let Some(send) = &step.send {
            for _ in 0..step.times.unwrap_or(1) {
                rec.responses.push(send_one(listener, send, &recorded)?);
            }
        } else if let Some(group) = &step.together {
            let handles: Vec<_> = group
                .iter()
                .cloned()
                .map(|send| {
                    let recorded = recorded.clone();
                    std::thread::spawn(move || send_one(listener, &send, &recorded))
                })
                .collect();
            for h in handles {
                let res = h
                    .join()
                    .map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
                rec.responses.push(res);
            }
            rec.responses.sort();
        } else if let Some(w) = &step.wait {
            std::thread::sleep(parse_duration(w)?);
        } else if let Some(down) = step.upstream_down {
            if down {
                if let Some(b) = backend.take() {
                    seen_before_down = b.requests();
                    held = Some(b.stop_keeping_port()?);
                }
            } else if backend.is_none() {
                let b = match held.take() {
                    Some(port) => TestUpstream::start_held(port)?,
                    None => TestUpstream::start_on(backend_addr)?,
                };
                serve(&b, &backend_routes, false);
                backend = Some(b);
            }
        } else {
            if let Some(a) = &step.answer {
                backend_routes
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .extend(a.clone());
            }
            if let Some(f) = &step.flags {
                flag_routes
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .extend(f.clone());
            }
        }
        let mut got = std::mem::take(&mut seen_before_down);
        if let Some(b) = &backend {
            got.extend(b.requests());
            b.clear();
        }
        for u in got {
            let headers: Vec<(String, Option<String>)> = s
                .upstream_headers
                .iter()
                .map(|h| (h.clone(), u.header(h).map(str::to_string)))
                .collect();
            rec.upstream
                .push(upstream_line(&u.method, &u.path, &headers, u.body.len()));
        }
        rec.upstream.sort();
        let flag_calls = flags.requests().into_iter().map(|r| (r.method, r.path));
        let flag_calls: Vec<_> = flag_calls.collect();
        flags.clear();
        let declared = std::iter::once(("flags", flag_calls))
            .chain(
                other_names
                    .iter()
                    .map(String::as_str)
                    .zip(others.iter().map(Callee::take_calls)),
            )
            .filter(|(name, _)| s.clusters.contains_key(*name));
        for (name, calls) in declared {
            for (method, path) in calls {
                rec.calls.push(call_line(name, &method, &path));
            }
        }
        rec.calls.sort();
        t.steps.push(rec);
    }
    drop(envoy);
    drop(others);
    Ok(t)
}

/// One request on its own connection from `send.from` (default 127.0.0.1); a body in several
/// chunks goes out chunk by chunk with chunked encoding. A response whose body is cut short
/// (Envoy reset the stream after the headers) is recorded as its headers, then the reset.
fn send_one(listener: SocketAddr, send: &Send, recorded: &[String]) -> Result<Seen> {
    let from: Option<IpAddr> = match &send.from {
        Some(f) => Some(f.parse().with_context(|| format!("from {f:?}"))?),
        None => None,
    };
    let method = send.wire_method();
    let body = send.wire_body();
    let chunks = send.body_chunks();
    let pieces: Vec<&[u8]> = if send.chunks.unwrap_or(1) > 1 && !send.grpc {
        chunks.iter().map(Vec::as_slice).collect()
    } else {
        vec![body.as_slice()]
    };
    let mut wire_headers = send.wire_headers();
    let metadata: Vec<String> = send
        .metadata
        .iter()
        .flat_map(|(ns, entries)| entries.iter().map(move |(k, v)| format!("{ns}|{k}|{v}")))
        .collect();
    if !metadata.is_empty() {
        wire_headers.push(("x-scenario-metadata".into(), metadata.join(";")));
    }
    let headers: Vec<(&str, &str)> = wire_headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    if send.protocol.as_deref() == Some("h2") {
        let h2_headers = h2_headers(&method, &headers, &pieces);
        let h2_headers: Vec<(&str, &str)> = h2_headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let req = H2Request {
            method: &method,
            path: &send.path,
            authority: AUTHORITY,
            headers: &h2_headers,
            pieces: &pieces,
        };
        let res = http2::send(listener, from, &req, CLIENT_TIMEOUT)?;
        let seen = Seen::new(res.status, recorded, |h| res.header(h), &res.body);
        return Ok(if res.reset {
            Seen {
                body: String::new(),
                ..seen
            }
            .reset_after_headers()
        } else {
            seen
        });
    }
    let stream = client::connect(listener, from, CLIENT_TIMEOUT)?;
    client::write_request(&stream, AUTHORITY, &method, &send.path, &headers, &pieces)?;
    let mut reader = BufReader::new(&stream);
    loop {
        let head = http::read_head(&mut reader)?.context("connection closed before a response")?;
        let status: u16 = head
            .start_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line {:?}", head.start_line))?;
        if (100..200).contains(&status) {
            continue;
        }
        let framing = http::Framing::of_response(&head, &method, status)?;
        let seen =
            |body: &[u8]| Seen::new(status, recorded, |h| http::header(&head.headers, h), body);
        return Ok(match http::read_body(&mut reader, framing) {
            Ok(body) => seen(&body),
            Err(_) => seen(b"").reset_after_headers(),
        });
    }
}

/// An HTTP/2 request's headers as the harness gives them: `content-length` for a body sent in
/// one piece (or any POST, PUT, PATCH), none for one in several (HTTP/2 has no chunked
/// encoding: each piece is its own DATA frame).
fn h2_headers(method: &str, headers: &[(&str, &str)], pieces: &[&[u8]]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let has = |name: &str| headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
    let body_len: usize = pieces.iter().map(|p| p.len()).sum();
    let one_piece = pieces.iter().filter(|p| !p.is_empty()).count() <= 1;
    if one_piece
        && (body_len > 0 || matches!(method, "POST" | "PUT" | "PATCH"))
        && !has("content-length")
    {
        out.push(("content-length".into(), body_len.to_string()));
    }
    out.extend(headers.iter().map(|(n, v)| (n.to_string(), v.to_string())));
    out
}
