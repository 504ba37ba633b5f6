//! The application behind Envoy in `./build.sh demo`: the e2e rig's [`TestUpstream`] on a fixed
//! port with a few endpoints that make each plugin's effect visible by hand.
//!
//! | request                | answer                                                        |
//! |------------------------|---------------------------------------------------------------|
//! | `GET /flags.json`      | a flagd flag-definition document (the `flags` cluster's file) |
//! | `GET /api/flaky`       | 200 JSON with the time it was made, or 503 while failing      |
//! | `POST /admin/fail`     | makes `/api/flaky` answer 503 from now on                     |
//! | `POST /admin/recover`  | makes `/api/flaky` answer 200 again                           |
//! | `POST /payments`       | 201 JSON with a new payment id (a replay shows the old id)    |
//! | anything else          | 200 `upstream saw <method> <path>`                            |
//!
//! Usage: `demo_upstream [port]` (default 18080, the backend marker port of `envoy/*.yaml`).
//! Binds 127.0.0.1, prints one line per request, runs until killed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use edge_e2e::{RecordedRequest, Script, TestUpstream, BACKEND_MARKER_PORT};

/// Served at `/flags.json`, in flagd's flag-definition format.
const FLAGS_JSON: &str = r#"{
  "$schema": "https://flagd.dev/schema/v0/flags.json",
  "flags": {
    "new-checkout": {
      "state": "ENABLED",
      "variants": { "on": true, "off": false },
      "defaultVariant": "off",
      "targeting": { "if": [{ "==": [{ "var": "user" }, "beta"] }, "on", "off"] }
    },
    "backend-version": {
      "state": "ENABLED",
      "variants": { "v1": "v1", "v2": "v2" },
      "defaultVariant": "v1",
      "targeting": { "fractional": [["v1", 90], ["v2", 10]] }
    }
  }
}
"#;

fn main() -> Result<()> {
    let port = match std::env::args().nth(1) {
        Some(arg) => arg
            .parse::<u16>()
            .with_context(|| format!("usage: demo_upstream [port]; {arg:?} is not a port"))?,
        None => BACKEND_MARKER_PORT,
    };
    let upstream = TestUpstream::start_on(("127.0.0.1", port))?;
    let failing = AtomicBool::new(false);
    let payments = AtomicU64::new(0);
    upstream.respond_with(move |req| {
        let script = answer(req, &failing, &payments);
        println!("upstream: {} {} -> {}", req.method, req.path, script.status);
        Some(script)
    });
    println!(
        "demo upstream listening on http://{} (Ctrl-C stops it)",
        upstream.addr()
    );
    // Connections are served on the upstream's own threads; this one only keeps it alive.
    loop {
        std::thread::park();
    }
}

fn answer(req: &RecordedRequest, failing: &AtomicBool, payments: &AtomicU64) -> Script {
    match (req.method.as_str(), req.path_only()) {
        ("GET" | "HEAD", "/flags.json") => Script::json(FLAGS_JSON),
        (_, "/api/flaky") if failing.load(Ordering::Relaxed) => {
            Script::json(r#"{"error":"the backend is failing; POST /admin/recover heals it"}"#)
                .with_status(503)
        }
        (_, "/api/flaky") => Script::json(format!(
            r#"{{"items":["alpha","beta","gamma"],"generated_at_ms":{}}}"#,
            unix_millis()
        )),
        ("POST", "/admin/fail") => {
            failing.store(true, Ordering::Relaxed);
            Script::json(r#"{"flaky":"failing"}"#)
        }
        ("POST", "/admin/recover") => {
            failing.store(false, Ordering::Relaxed);
            Script::json(r#"{"flaky":"healthy"}"#)
        }
        ("POST", "/payments") => {
            let n = payments.fetch_add(1, Ordering::Relaxed) + 1;
            // The clock keeps ids from two demo runs apart; the counter, ids within a run.
            let id = format!("pay_{:x}_{n}", unix_millis());
            Script::json(format!(
                r#"{{"id":"{id}","status":"created","request_bytes":{}}}"#,
                req.body.len()
            ))
            .with_status(201)
        }
        (method, _) => Script::echo(method, &req.path),
    }
}

fn unix_millis() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}
