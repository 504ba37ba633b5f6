//! Harness self-test module: each request names the hostcalls to exercise in `x-probe`
//! (comma-separated actions) and reports what it saw in headers and log lines. Test-only: it
//! panics on purpose ("trap") and is never shipped.

use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use std::time::Duration;

// Raw imports, to observe statuses the SDK would turn into panics.
#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_size(map_type: u32, return_size: *mut usize) -> u32;
    fn proxy_get_buffer_status(buffer_type: u32, length: *mut usize, flags: *mut u32) -> u32;
}

fn raw_buffer_status(buffer: u32) -> usize {
    let (mut n, mut f) = (0usize, 0u32);
    match unsafe { proxy_get_buffer_status(buffer, &mut n, &mut f) } {
        0 => n,
        _ => usize::MAX,
    }
}

fn raw_get(map: u32, key: &str) -> u32 {
    let mut p: *mut u8 = std::ptr::null_mut();
    let mut n: usize = 0;
    unsafe { proxy_get_header_map_value(map, key.as_ptr(), key.len(), &mut p, &mut n) }
}

fn raw_size(map: u32) -> (u32, usize) {
    let mut n: usize = 0;
    let s = unsafe { proxy_get_header_map_size(map, &mut n) };
    (s, n)
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(ProbeRoot::default()) });
}}

#[derive(Default)]
struct ProbeRoot {
    queue: Option<u32>,
    ticks: u64,
    /// Actions fixed by config (`actions=a+b`), used instead of the `x-probe` header.
    actions: Option<String>,
    /// A path of the `flags` cluster to fetch on every tick (`tick-fetch=/path`).
    tick_fetch: Option<String>,
}

impl Context for ProbeRoot {
    fn on_http_call_response(&mut self, token: u32, headers: usize, body: usize, _t: usize) {
        log::info!("root callout {token} headers={headers} body={body}");
    }
}

impl RootContext for ProbeRoot {
    fn on_vm_start(&mut self, _size: usize) -> bool {
        let vm = self.get_vm_configuration().unwrap_or_default();
        // WASI: stdout, environment, clock and randomness.
        println!("probe stdout vm_config={}", String::from_utf8_lossy(&vm));
        eprintln!("probe stderr");
        let env = std::env::var("PROBE_ENV").unwrap_or_else(|_| "-".into());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut rnd = [0u8; 8];
        let _ = getrandom::fill(&mut rnd);
        log::info!(
            "vm started env={env} unix={now} random={}",
            u64::from_le_bytes(rnd)
        );
        true
    }

    fn on_configure(&mut self, _size: usize) -> bool {
        let cfg = self
            .get_plugin_configuration()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        for item in cfg.split(';').filter(|s| !s.is_empty()) {
            match item {
                "reject" => {
                    log::warn!("probe: config field `mode` must be one of a, b");
                    return false;
                }
                "trap" => panic!("probe: trap in on_configure"),
                "queue" => {
                    self.queue = Some(self.register_shared_queue("probe-q"));
                }
                s if s.starts_with("actions=") => {
                    self.actions = Some(s[8..].replace('+', ","));
                }
                s if s.starts_with("tick-fetch=") => {
                    self.tick_fetch = Some(s[11..].to_string());
                }
                s if s.starts_with("tick=") => {
                    let ms = s[5..].parse().unwrap_or(0);
                    self.set_tick_period(Duration::from_millis(ms));
                }
                s if s.starts_with("fetch=") => {
                    let path = &s[6..];
                    let r = self.dispatch_http_call(
                        "flags",
                        vec![(":method", "GET"), (":path", path), (":authority", "flags")],
                        None,
                        vec![],
                        Duration::from_secs(1),
                    );
                    log::info!("configure fetch {r:?}");
                }
                other => log::info!("probe: ignoring config item {other}"),
            }
        }
        log::info!("configured with {cfg:?}");
        true
    }

    fn on_tick(&mut self) {
        self.ticks += 1;
        let id = proxy_wasm::hostcalls::define_metric(MetricType::Counter, "probe_ticks");
        if let Ok(id) = id {
            let _ = proxy_wasm::hostcalls::increment_metric(id, 1);
        }
        log::info!("tick {}", self.ticks);
        if let Some(path) = &self.tick_fetch {
            let r = self.dispatch_http_call(
                "flags",
                vec![(":method", "GET"), (":path", path), (":authority", "flags")],
                None,
                vec![],
                Duration::from_secs(1),
            );
            log::info!("tick fetch {r:?}");
        }
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        while let Ok(Some(item)) = self.dequeue_shared_queue(queue_id) {
            log::info!("dequeued {}", String::from_utf8_lossy(&item));
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Probe {
            id: context_id,
            actions: Vec::new(),
            fixed: self.actions.clone(),
            cas: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Probe {
    id: u32,
    actions: Vec<String>,
    fixed: Option<String>,
    cas: Option<(u64, Option<u32>)>,
}

impl Probe {
    fn has(&self, a: &str) -> bool {
        self.actions.iter().any(|x| x == a)
    }

    fn prop(&self, path: &[&str]) -> String {
        match self.get_property(path.to_vec()) {
            Some(v)
                if v.len() == 8
                    && (path == ["response", "code"]
                        || path.ends_with(&["port"])
                        || path == ["connection", "id"]
                        || path == ["request", "time"]) =>
            {
                let mut b = [0u8; 8];
                b.copy_from_slice(&v);
                i64::from_le_bytes(b).to_string()
            }
            Some(v) => String::from_utf8_lossy(&v).into_owned(),
            None => "<none>".into(),
        }
    }

    fn counter(&self) -> u64 {
        let key = "probe.counter";
        loop {
            let (value, cas) = self.get_shared_data(key);
            let n = value
                .and_then(|v| String::from_utf8(v).ok())
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(0)
                + 1;
            match self.set_shared_data(key, Some(n.to_string().as_bytes()), cas) {
                Ok(()) => return n,
                Err(Status::CasMismatch) => continue,
                Err(e) => {
                    log::error!("set_shared_data failed: {e:?}");
                    return 0;
                }
            }
        }
    }
}

impl Context for Probe {
    fn on_http_call_response(&mut self, _token: u32, _nh: usize, body: usize, _nt: usize) {
        let status = self
            .get_http_call_response_header(":status")
            .unwrap_or_else(|| "none".into());
        let body = self
            .get_http_call_response_body(0, body)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let (code, msg) = proxy_wasm::hostcalls::get_grpc_status().unwrap_or((99, None));
        let msg = msg.unwrap_or_default();
        self.set_http_request_header("x-callout", Some(&format!("{status}:{body}:{code}:{msg}")));
        self.resume_http_request();
    }

    fn on_grpc_call_response(&mut self, _token: u32, status: u32, size: usize) {
        // A reply's body, or for a failed call the status message the host reports.
        let msg = if status == 0 {
            self.get_grpc_call_response_body(0, size)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        } else {
            let (_, message) = proxy_wasm::hostcalls::get_grpc_status().unwrap_or((99, None));
            message.unwrap_or_default()
        };
        self.set_http_request_header("x-grpc", Some(&format!("{status}:{msg}")));
        self.resume_http_request();
    }
}

impl HttpContext for Probe {
    fn on_http_request_headers(&mut self, _n: usize, eos: bool) -> Action {
        self.actions = self
            .fixed
            .clone()
            .or_else(|| self.get_http_request_header("x-probe"))
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().to_string())
            .collect();
        log::info!(
            "request headers ctx={} eos={eos} actions={:?}",
            self.id,
            self.actions
        );
        if self.has("trap") {
            panic!("probe: trap on request headers");
        }
        if self.has("headers") {
            // Names arrive lower-cased; writes are visible to the upstream.
            let pairs = self.get_http_request_headers();
            let names: Vec<String> = pairs.iter().map(|(k, _)| k.clone()).collect();
            self.add_http_request_header("X-Added", "1");
            self.set_http_request_header("x-replaced", Some("new"));
            self.set_http_request_header("x-removed", None);
            self.set_http_request_header("x-names", Some(&names.join(",")));
            let (st, size) = raw_size(0);
            self.set_http_request_header("x-map-size", Some(&format!("{st}:{size}")));
            self.set_http_request_header("x-missing", Some(&raw_get(0, "nope").to_string()));
        }
        if self.has("props") {
            for (name, path) in [
                ("source", vec!["source", "address"]),
                ("source-port", vec!["source", "port"]),
                ("path", vec!["request", "path"]),
                ("method", vec!["request", "method"]),
                ("host", vec!["request", "host"]),
                ("id", vec!["request", "id"]),
                ("plugin", vec!["plugin_name"]),
                ("root", vec!["plugin_root_id"]),
                ("code", vec!["response", "code"]),
                ("nope", vec!["no", "such"]),
            ] {
                let v = self.prop(&path);
                self.set_http_request_header(&format!("x-prop-{name}"), Some(&v));
            }
        }
        if self.has("shared") {
            let n = self.counter();
            self.set_http_request_header("x-counter", Some(&n.to_string()));
        }
        if self.has("cas-read") {
            let (v, cas) = self.get_shared_data("probe.race");
            let n = v
                .and_then(|v| String::from_utf8(v).ok())
                .and_then(|s| s.parse().ok())
                .unwrap_or(0u64);
            self.cas = Some((n, cas));
        }
        if self.has("metrics") {
            use proxy_wasm::hostcalls::*;
            if let (Ok(c), Ok(g), Ok(h)) = (
                define_metric(MetricType::Counter, "probe_requests"),
                define_metric(MetricType::Gauge, "probe_gauge"),
                define_metric(MetricType::Histogram, "probe_hist"),
            ) {
                let _ = increment_metric(c, 1);
                let _ = record_metric(g, 42);
                let _ = increment_metric(g, -2);
                let _ = record_metric(h, 7);
                let bad = increment_metric(c, 0);
                log::info!("metric zero increment: {bad:?}");
            }
        }
        if self.has("enqueue") {
            match self.resolve_shared_queue("", "probe-q") {
                Some(q) => {
                    let r = self.enqueue_shared_queue(q, Some(b"hello"));
                    log::info!("enqueue {r:?}");
                }
                None => log::info!("queue not found"),
            }
        }
        if self.has("foreign") {
            match proxy_wasm::hostcalls::call_foreign_function("echo", Some(b"abc")) {
                Ok(v) => {
                    let v = v.map(|b| String::from_utf8_lossy(&b).into_owned());
                    self.set_http_request_header("x-foreign", v.as_deref());
                }
                Err(e) => log::info!("foreign failed {e:?}"),
            }
        }
        if self.has("pairs") {
            // Replace the whole map; Envoy lower-cases what it stores.
            let mut pairs = self.get_http_request_headers();
            pairs.retain(|(k, _)| k != "x-drop");
            pairs.push(("X-Whole".into(), "map".into()));
            let refs: Vec<(&str, &str)> = pairs
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            self.set_http_request_headers(refs);
        }
        if self.has("setprop") {
            self.set_property(vec!["probe", "mark"], Some(b"m1"));
            let back = self.prop(&["probe", "mark"]);
            self.set_http_request_header("x-setprop", Some(&back));
        }
        if self.has("loglevel") {
            let level = proxy_wasm::hostcalls::get_log_level()
                .map(|l| format!("{l:?}"))
                .unwrap_or_else(|e| format!("{e:?}"));
            self.set_http_request_header("x-log-level", Some(&level));
        }
        if self.has("grpc-stream") {
            match self.open_grpc_stream("grpc", "probe.Service", "Watch", vec![]) {
                Ok(token) => {
                    let sent = proxy_wasm::hostcalls::send_grpc_stream_message(
                        token,
                        Some(b"hello"),
                        false,
                    );
                    self.cancel_grpc_stream(token);
                    let again = proxy_wasm::hostcalls::cancel_grpc_stream(token);
                    self.set_http_request_header(
                        "x-grpc-stream",
                        Some(&format!("{}:{sent:?}:{again:?}", token & 3)),
                    );
                }
                Err(e) => self.set_http_request_header("x-grpc-stream", Some(&format!("{e:?}"))),
            }
        }
        if self.has("prop-of") {
            // A property another filter set: its path in `x-probe-path`, segments split by `/`.
            let path = self
                .get_http_request_header("x-probe-path")
                .unwrap_or_default();
            let segments: Vec<&str> = path.split('/').collect();
            let v = self.prop(&segments);
            self.set_http_request_header("x-prop-of", Some(&v));
        }
        if self.has("grpc-reply") {
            self.send_grpc_response(GrpcStatusCode::Aborted, Some("msg"), vec![]);
            return Action::Pause;
        }
        if self.has("local") {
            self.send_http_response(418, vec![("x-local", "yes")], Some(b"teapot"));
            return Action::Continue;
        }
        if self.has("close") {
            self.reset_http_request();
            return Action::Pause;
        }
        if self.has("callout") {
            let r = self.dispatch_http_call(
                "flags",
                vec![
                    (":method", "GET"),
                    (":path", "/flags.json"),
                    (":authority", "flags"),
                ],
                None,
                vec![],
                Duration::from_secs(2),
            );
            match r {
                Ok(_) => return Action::Pause,
                Err(e) => {
                    self.set_http_request_header("x-callout", Some(&format!("error:{e:?}")));
                }
            }
        }
        if self.has("grpc") {
            let r = self.dispatch_grpc_call(
                "grpc",
                "probe.Service",
                "Ping",
                vec![],
                Some(b"ping"),
                Duration::from_secs(1),
            );
            if r.is_ok() {
                return Action::Pause;
            }
            self.set_http_request_header("x-grpc", Some(&format!("error:{r:?}")));
        }
        if self.has("pause") {
            return Action::Pause;
        }
        Action::Continue
    }

    fn on_http_request_body(&mut self, size: usize, eos: bool) -> Action {
        let status = raw_buffer_status(0);
        log::info!("request body size={size} eos={eos} status_size={status}");
        if self.has("after") {
            log::info!("get after continue: {}", raw_get(0, ":path"));
        }
        if self.has("buffer") {
            if !eos {
                return Action::Pause;
            }
            let body = self.get_http_request_body(0, size).unwrap_or_default();
            self.set_http_request_body(0, size, &body.to_ascii_uppercase());
        }
        if self.has("prepend") {
            self.set_http_request_body(0, 0, b">>");
        }
        Action::Continue
    }

    fn on_http_request_trailers(&mut self, n: usize) -> Action {
        log::info!("request trailers n={n}");
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, eos: bool) -> Action {
        let code = self.prop(&["response", "code"]);
        let details = self.prop(&["response", "code_details"]);
        let status = self.get_http_response_header(":status").unwrap_or_default();
        log::info!(
            "response headers ctx={} status={status} code={code} details={details} eos={eos}",
            self.id
        );
        self.set_http_response_header("x-probe-status", Some(&status));
        self.set_http_response_header("x-probe-details", Some(&details));
        if let Some((n, cas)) = self.cas.take() {
            let r = self.set_shared_data("probe.race", Some((n + 1).to_string().as_bytes()), cas);
            self.set_http_response_header("x-cas", Some(if r.is_ok() { "ok" } else { "mismatch" }));
        }
        if self.has("crlf") {
            self.set_http_response_header("x-crlf", Some("a\r\nx-injected: b"));
        }
        if self.has("resp-local") {
            self.send_http_response(299, vec![("x-resp-local", "yes")], Some(b"replaced"));
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, eos: bool) -> Action {
        log::info!("response body size={size} eos={eos}");
        if self.has("resp-buffer") {
            if !eos {
                return Action::Pause;
            }
            let body = self.get_http_response_body(0, size).unwrap_or_default();
            let mut out = b"[".to_vec();
            out.extend_from_slice(&body);
            out.push(b']');
            self.set_http_response_body(0, size, &out);
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        let path = self.get_http_request_header(":path").unwrap_or_default();
        let code = self.prop(&["response", "code"]);
        log::info!("log ctx={} path={path} code={code}", self.id);
    }
}
