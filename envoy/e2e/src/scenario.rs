//! The real-Envoy runner of scenario files (`host_tests::scenario`): it generates the Envoy
//! config of the scenario's chain, scripts two [`TestUpstream`]s (the application and the
//! `flags` cluster), sends the steps' requests with real pauses, and writes the same
//! normalised transcript as the harness runner.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::client;
use crate::{Envoy, HeldPort, RecordedRequest, Script, Substitutions, TestUpstream};
use anyhow::{Context, Result};
use host_tests::scenario::{
    answer_for, parse_duration, step_label, upstream_line, Answer, Scenario, Seen, Send,
    StepRecord, Transcript,
};

/// The flags cluster's marker port in generated configs (rewritten to its upstream).
const FLAGS_MARKER: &str = "port_value: 18082";
const AUTHORITY: &str = "edge.test";
const CLIENT_TIMEOUT: Duration = Duration::from_secs(20);

type Routes = Arc<Mutex<BTreeMap<String, Answer>>>;

fn script_of(a: &Answer) -> Script {
    if a.reset {
        return Script::reset();
    }
    let mut s = Script::status(a.status).with_body(a.body.clone());
    for (k, v) in &a.headers {
        s = s.with_header(k.clone(), v.clone());
    }
    if let Some(n) = a.chunks.filter(|n| *n > 1) {
        s = s.chunked(n.min(a.body.len().max(1)), Duration::from_millis(20));
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
    for f in &s.chain {
        if let Some(name) = &f.plugin {
            filters.push_str(&format!(
                r#"            - name: envoy.filters.http.wasm
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
                config:
                  name: {name}
                  root_id: {name}
                  vm_config:
                    runtime: envoy.wasm.runtime.v8
                    code: {{ local: {{ filename: {file} }} }}
                  configuration:
                    "@type": type.googleapis.com/google.protobuf.StringValue
                    value: {config}
"#,
                name = q(name),
                file = q(&format!("dist/{name}.wasm")),
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
    let cluster = |name: &str, port: &str| {
        format!(
            r#"    - name: {name}
      type: STATIC
      connect_timeout: 1s
      load_assignment:
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
        backend = cluster("backend", "port_value: 18080"),
        flags = cluster("flags", FLAGS_MARKER),
    )
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

    let subs = Substitutions::new(backend_addr.port())
        .replace(FLAGS_MARKER, format!("port_value: {}", flags.port()));
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
        t.steps.push(rec);
    }
    drop(envoy);
    Ok(t)
}

/// One request on its own connection from `send.from` (default 127.0.0.1); a body in several
/// chunks goes out chunk by chunk with chunked encoding.
fn send_one(listener: SocketAddr, send: &Send, recorded: &[String]) -> Result<Seen> {
    let from: Option<IpAddr> = match &send.from {
        Some(f) => Some(f.parse().with_context(|| format!("from {f:?}"))?),
        None => None,
    };
    let chunks = send.body_chunks();
    let pieces: Vec<&[u8]> = if send.chunks.unwrap_or(1) > 1 {
        chunks.iter().map(Vec::as_slice).collect()
    } else {
        vec![send.body.as_bytes()]
    };
    let headers: Vec<(&str, &str)> = send
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let res = client::send_from(
        listener,
        from,
        AUTHORITY,
        &send.method,
        &send.path,
        &headers,
        &pieces,
        CLIENT_TIMEOUT,
    )?;
    Ok(Seen::new(
        res.status,
        recorded,
        |h| res.header(h),
        &res.body,
    ))
}
