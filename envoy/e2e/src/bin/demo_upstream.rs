//! The application behind Envoy in `./build.sh demo`: the e2e rig's [`TestUpstream`] on a fixed
//! port with a few endpoints that make each plugin's effect visible by hand.
//!
//! | request                        | answer                                                   |
//! |--------------------------------|----------------------------------------------------------|
//! | `GET /flags.json`              | a flagd flag-definition document (the `flags` cluster's) |
//! | `POST /admin/checkout/disable` | serves its flag `new-checkout` as `DISABLED`             |
//! | `POST /admin/checkout/enable`  | serves it `ENABLED` again                                |
//! | `GET /api/flaky`               | 200 JSON with the time it was made, or 503 while failing |
//! | `POST /admin/fail`             | makes `/api/flaky` answer 503 from now on                |
//! | `POST /admin/recover`          | makes `/api/flaky` answer 200 again                      |
//! | `POST /payments`               | 201 JSON with a new payment id (a replay shows the old id) |
//! | anything else                  | 200 `upstream saw <method> <path>`                       |
//!
//! The flag file has an `ETag` per state and gets a 304 for a matching `If-None-Match`, as a
//! real flag server would. "anything else" adds ` (x-route-checkout: <value>)` when the
//! request has that header, so the demo shows what the flag router decided.
//!
//! Usage: `demo_upstream [port]` (default 18080, the backend marker port of `envoy/*.yaml`).
//! Binds 127.0.0.1, prints one line per request, runs until killed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use edge_e2e::{RecordedRequest, Script, TestUpstream, BACKEND_MARKER_PORT};

/// Served at `/flags.json`, in flagd's flag-definition format, with `STATE` replaced by the
/// flag's state: beta testers get the new checkout, and so does a sticky 20 % of users
/// (bucketed on `targetingKey`, the `x-user-id` header in envoy/edge.yaml).
const FLAGS_JSON: &str = r#"{
  "$schema": "https://flagd.dev/schema/v0/flags.json",
  "flags": {
    "new-checkout": {
      "state": "STATE",
      "variants": { "on": "v2", "off": "v1" },
      "defaultVariant": "off",
      "targeting": {
        "if": [
          { "==": [{ "var": "tier" }, "beta"] }, "on",
          { "fractional": [["on", 20], ["off", 80]] }
        ]
      }
    }
  }
}
"#;

/// The flag router's header, echoed so that the demo shows each request's variant.
const ROUTE_HEADER: &str = "x-route-checkout";

/// What the demo's endpoints change.
#[derive(Default)]
struct State {
    failing: AtomicBool,
    checkout_disabled: AtomicBool,
    payments: AtomicU64,
}

fn main() -> Result<()> {
    let port = match std::env::args().nth(1) {
        Some(arg) => arg
            .parse::<u16>()
            .with_context(|| format!("usage: demo_upstream [port]; {arg:?} is not a port"))?,
        None => BACKEND_MARKER_PORT,
    };
    let upstream = TestUpstream::start_on(("127.0.0.1", port))?;
    let state = State::default();
    upstream.respond_with(move |req| {
        let script = answer(req, &state);
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

fn answer(req: &RecordedRequest, state: &State) -> Script {
    match (req.method.as_str(), req.path_only()) {
        ("GET" | "HEAD", "/flags.json") => flags(req, state),
        ("POST", "/admin/checkout/disable") => {
            state.checkout_disabled.store(true, Ordering::Relaxed);
            Script::json(r#"{"new-checkout":"DISABLED"}"#)
        }
        ("POST", "/admin/checkout/enable") => {
            state.checkout_disabled.store(false, Ordering::Relaxed);
            Script::json(r#"{"new-checkout":"ENABLED"}"#)
        }
        (_, "/api/flaky") if state.failing.load(Ordering::Relaxed) => {
            Script::json(r#"{"error":"the backend is failing; POST /admin/recover heals it"}"#)
                .with_status(503)
        }
        (_, "/api/flaky") => Script::json(format!(
            r#"{{"items":["alpha","beta","gamma"],"generated_at_ms":{}}}"#,
            unix_millis()
        )),
        ("POST", "/admin/fail") => {
            state.failing.store(true, Ordering::Relaxed);
            Script::json(r#"{"flaky":"failing"}"#)
        }
        ("POST", "/admin/recover") => {
            state.failing.store(false, Ordering::Relaxed);
            Script::json(r#"{"flaky":"healthy"}"#)
        }
        ("POST", "/payments") => {
            let n = state.payments.fetch_add(1, Ordering::Relaxed) + 1;
            // The clock keeps ids from two demo runs apart; the counter, ids within a run.
            let id = format!("pay_{:x}_{n}", unix_millis());
            Script::json(format!(
                r#"{{"id":"{id}","status":"created","request_bytes":{}}}"#,
                req.body.len()
            ))
            .with_status(201)
        }
        (method, _) => match req.header(ROUTE_HEADER) {
            Some(variant) => Script::text(format!(
                "upstream saw {method} {} ({ROUTE_HEADER}: {variant})",
                req.path
            )),
            None => Script::echo(method, &req.path),
        },
    }
}

/// The flag file, with an ETag per state so that the flag router's polls get a 304 while
/// nothing changed.
fn flags(req: &RecordedRequest, state: &State) -> Script {
    let flag_state = if state.checkout_disabled.load(Ordering::Relaxed) {
        "DISABLED"
    } else {
        "ENABLED"
    };
    let etag = format!("\"{}\"", flag_state.to_ascii_lowercase());
    if req.header("if-none-match") == Some(etag.as_str()) {
        return Script::status(304).with_header("etag", etag);
    }
    Script::json(FLAGS_JSON.replace("STATE", flag_state)).with_header("etag", etag)
}

fn unix_millis() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}
