//! dist/flag_router.wasm in a real Envoy 1.40 on two workers, with the config users read
//! (`envoy/flag-router.yaml`: flag `new-checkout` sends `x-tier: beta` to the `canary` cluster
//! through `x-route-checkout: v2`, everybody else to `stable`; the flag file is polled every
//! second from the `flags` cluster). Three test upstreams stand in for `stable`, `canary` and
//! the flag file server. Checks that Envoy routes on the header the plugin sets, that a forged
//! header is stripped, the fetch at load, the kill switch through the polled file, that a bad
//! fetch keeps the last good flags, and that Envoy refuses bad targeting.
//!
//! Seen in Envoy 1.40 (and relied on here):
//! - Envoy picks the route again after a wasm filter changed request headers (it clears the
//!   route cache), so the header set by the plugin decides the cluster.
//! - `proxy_http_call` dispatched from `on_configure` works: the flag file is fetched at load.
//! - Besides one root context per worker, Envoy configures the plugin on the main thread too,
//!   and that root context also runs its tick timer: with `--concurrency 2`, every poll is
//!   three fetches, and the `source_*` counters grow by three per poll. At load there is one
//!   more, short-lived main-thread instance: its fetch is dispatched and then cancelled when
//!   Envoy drops that instance (`cluster.flags.upstream_rq_cancelled` 1), so `source_fetches`
//!   starts at four while the flag server sees three requests.
//! - A flag server that resets the connection (or refuses it) and one that answers after the
//!   fetch timeout do not reach the plugin as a failed call: Envoy answers the callout itself
//!   with a 503 or 504, which the plugin counts as a bad status.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use edge_e2e::{Envoy, RecordedRequest, Script, Substitutions, TestUpstream};

const CONFIG: &str = "flag-router.yaml";
const HEADER: &str = "x-route-checkout";
/// Marker ports of the `canary` and `flags` clusters in envoy/flag-router.yaml (`stable` uses
/// the rig's backend marker, 18080).
const CANARY_MARKER: &str = "port_value: 18081";
const FLAGS_MARKER: &str = "port_value: 18082";
/// `"pollInterval": "1s"` in envoy/flag-router.yaml.
const POLL: Duration = Duration::from_secs(1);
/// The configured settings the constants above stand for, and the targeting test (d) breaks.
const POLL_SETTING: &str = r#""pollInterval": "1s""#;
const TARGETING: &str = r#"{ "==": [ { "var": "tier" }, "beta" ] }"#;
/// `"timeout": "1s"` in envoy/flag-router.yaml.
const FETCH_TIMEOUT: Duration = Duration::from_secs(1);
/// Root contexts that fetch the flag file: one per worker (`--concurrency 2`) plus the main
/// thread's (see the top of this file).
const ROOT_CONTEXTS: u64 = 3;
/// Generous, for a loaded machine; each wait normally ends within one poll.
const STAT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the kill switch may take: one poll, plus the fetch, plus slack for a loaded machine.
const SWITCH_TIMEOUT: Duration = Duration::from_secs(3);

/// Fails when the config no longer has what this file's constants assume.
fn check_config() -> Result<()> {
    let text = std::fs::read_to_string(edge_e2e::workspace_root().join("envoy").join(CONFIG))?;
    for needle in [CANARY_MARKER, FLAGS_MARKER, POLL_SETTING, TARGETING] {
        ensure!(
            text.matches(needle).count() == 1,
            "envoy/{CONFIG} no longer says {needle} once: update the constants in this file"
        );
    }
    Ok(())
}

/// The flagd file served by the `flags` upstream, as the tests change it while Envoy runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// The current document, with an ETag that changes with it; 304 to a matching If-None-Match.
    Serve,
    /// 500 with a body.
    Error,
    /// 200 with a body that is JSON but not a flag file (and an ETag of its own).
    Garbage,
    /// Resets the connection without an answer.
    Reset,
    /// Answers after the fetch timeout (`"timeout": "1s"`).
    Slow,
}

struct Served {
    doc: String,
    version: u32,
    mode: Mode,
}

/// The `flags` cluster's server: a [`TestUpstream`] whose answer the test switches.
struct FlagServer {
    upstream: TestUpstream,
    served: Arc<Mutex<Served>>,
    not_modified: Arc<AtomicUsize>,
}

impl FlagServer {
    fn start(doc: &str) -> Result<FlagServer> {
        let upstream = TestUpstream::start()?;
        let served = Arc::new(Mutex::new(Served {
            doc: doc.to_string(),
            version: 1,
            mode: Mode::Serve,
        }));
        let not_modified = Arc::new(AtomicUsize::new(0));
        {
            let served = Arc::clone(&served);
            let not_modified = Arc::clone(&not_modified);
            upstream.respond_with(move |req| {
                let served = served.lock().unwrap_or_else(|e| e.into_inner());
                Some(answer(&served, req, &not_modified))
            });
        }
        Ok(FlagServer {
            upstream,
            served,
            not_modified,
        })
    }

    fn set(&self, f: impl FnOnce(&mut Served)) {
        f(&mut self.served.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Serves a new document (under a new ETag).
    fn serve(&self, doc: &str) {
        self.set(|s| {
            s.doc = doc.to_string();
            s.version += 1;
            s.mode = Mode::Serve;
        });
    }

    fn fail(&self, mode: Mode) {
        self.set(|s| s.mode = mode);
    }

    fn fetches(&self) -> Vec<RecordedRequest> {
        self.upstream.requests_to("/flags.json")
    }
}

fn answer(served: &Served, req: &RecordedRequest, not_modified: &AtomicUsize) -> Script {
    if req.path_only() != "/flags.json" {
        return Script::status(404);
    }
    let etag = format!("\"v{}\"", served.version);
    match served.mode {
        Mode::Error => Script::text("flag store unavailable").with_status(500),
        Mode::Garbage => Script::json(r#"{"flags": 7}"#).with_header("etag", "\"garbage\""),
        Mode::Reset => Script::reset(),
        Mode::Slow => Script::json(served.doc.clone()).with_delay(FETCH_TIMEOUT * 2),
        Mode::Serve if req.header("if-none-match") == Some(etag.as_str()) => {
            not_modified.fetch_add(1, Ordering::Relaxed);
            Script::status(304).with_header("etag", etag)
        }
        Mode::Serve => Script::json(served.doc.clone()).with_header("etag", etag),
    }
}

/// A flag file with `new-checkout` in `state`, "on" (→ canary) for everybody.
fn everyone_on(state: &str) -> String {
    format!(
        r#"{{"$schema":"https://flagd.dev/schema/v0/flags.json","flags":{{"new-checkout":{{"state":"{state}","variants":{{"on":"v2","off":"v1"}},"defaultVariant":"on"}}}}}}"#
    )
}

/// The same flag as the inline one in envoy/flag-router.yaml: beta testers on, others off.
fn beta_on() -> String {
    format!(
        r#"{{"flags":{{"new-checkout":{{"state":"ENABLED","variants":{{"on":"v2","off":"v1"}},"defaultVariant":"off","targeting":{{"if":[{TARGETING},"on","off"]}}}}}}}}"#
    )
}

/// The two application versions; each answers every path with its own name.
struct Apps {
    stable: TestUpstream,
    canary: TestUpstream,
}

impl Apps {
    fn start() -> Result<Apps> {
        let stable = TestUpstream::start()?;
        stable.route("/*", Script::text("stable"));
        let canary = TestUpstream::start()?;
        canary.route("/*", Script::text("canary"));
        Ok(Apps { stable, canary })
    }
}

fn substitutions(apps: &Apps, flags: &FlagServer) -> Result<Substitutions> {
    check_config()?;
    Ok(Substitutions::upstream(&apps.stable)
        .replace(CANARY_MARKER, format!("port_value: {}", apps.canary.port()))
        .replace(
            FLAGS_MARKER,
            format!("port_value: {}", flags.upstream.port()),
        ))
}

fn flag_router_envoy(subs: &Substitutions) -> Result<Envoy> {
    Envoy::start_with(CONFIG, subs, &["--concurrency", "2"])
}

/// Sends `GET path` with `headers` and returns which application answered.
fn reached(envoy: &Envoy, path: &str, headers: &[(&str, &str)]) -> Result<String> {
    let res = envoy.request("GET", path, headers, b"")?;
    ensure!(
        res.status == 200,
        "GET {path} {headers:?}: {} {}",
        res.status,
        res.text()
    );
    Ok(res.text())
}

/// `n` plain requests (one connection each, so both workers take some); where they went.
fn spread(envoy: &Envoy, n: usize) -> Result<Vec<String>> {
    (0..n)
        .map(|i| reached(envoy, &format!("/checkout?n={i}"), &[]))
        .collect()
}

fn counter(name: &str) -> String {
    format!("wasmcustom.flag_router.{name}")
}

fn stat(envoy: &Envoy, name: &str) -> Result<u64> {
    Ok(envoy.stat(&counter(name))?.unwrap_or(0))
}

/// Waits until every root context has fetched `n` more times with outcome `what`
/// (`source_updates` or `source_errors`) than `before`; returns how long that took.
fn wait_for_each_context(envoy: &Envoy, what: &str, before: u64) -> Result<Duration> {
    let started = Instant::now();
    envoy.wait_for_stat(&counter(what), before + ROOT_CONTEXTS, STAT_TIMEOUT)?;
    Ok(started.elapsed())
}

#[test]
fn requests_are_routed_by_the_flag_and_a_forged_route_header_is_stripped() -> Result<()> {
    let apps = Apps::start()?;
    let flags = FlagServer::start(&beta_on())?;
    let envoy = flag_router_envoy(&substitutions(&apps, &flags)?)?;

    // Each kind several times, one connection each, so both workers route some.
    let rounds = 8;
    for i in 0..rounds {
        let user = format!("user-{i}");
        let beta = [("x-tier", "beta"), ("x-user-id", user.as_str())];
        assert_eq!(reached(&envoy, &format!("/beta/{i}"), &beta)?, "canary");
        let free = [("x-tier", "free"), ("x-user-id", user.as_str())];
        assert_eq!(reached(&envoy, &format!("/free/{i}"), &free)?, "stable");
        assert_eq!(reached(&envoy, &format!("/anon/{i}"), &[])?, "stable");
        // A client naming the canary route itself: the plugin removes its header first.
        let forged = [(HEADER, "v2")];
        assert_eq!(reached(&envoy, &format!("/forged/{i}"), &forged)?, "stable");
        let forged_free = [(HEADER, "v2"), ("x-tier", "free")];
        let path = format!("/forged-free/{i}");
        assert_eq!(reached(&envoy, &path, &forged_free)?, "stable");
    }

    // What each application saw: only beta requests at the canary, with the flag's value;
    // everything else at stable with `v1`, the forged `v2` replaced (not added to).
    let canary = apps.canary.requests();
    assert_eq!(canary.len(), rounds);
    for req in &canary {
        assert!(req.path.starts_with("/beta/"), "{} at canary", req.path);
        let values: Vec<&str> = req
            .headers
            .iter()
            .filter(|(n, _)| n == HEADER)
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(values, ["v2"], "{}", req.path);
    }
    let stable = apps.stable.requests();
    assert_eq!(stable.len(), 4 * rounds);
    for req in &stable {
        assert!(!req.path.starts_with("/beta/"), "{} at stable", req.path);
        let values: Vec<&str> = req
            .headers
            .iter()
            .filter(|(n, _)| n == HEADER)
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(values, ["v1"], "{}", req.path);
    }

    let per_worker = envoy.connections_per_worker(2)?;
    // All 40 on one worker happens with probability 2^-39; then this test proves less.
    assert!(
        per_worker.iter().all(|n| *n > 0),
        "connections per worker: {per_worker:?}"
    );

    envoy.wait_for_stat(
        &counter("new-checkout.variant.off"),
        4 * rounds as u64,
        STAT_TIMEOUT,
    )?;
    assert_eq!(stat(&envoy, "new-checkout.variant.on")?, rounds as u64);
    assert_eq!(stat(&envoy, "new-checkout.variant.off")?, 4 * rounds as u64);
    assert_eq!(envoy.stat(&counter("new-checkout.error"))?, None);
    assert_eq!(
        envoy.stat("cluster.canary.upstream_rq_total")?,
        Some(rounds as u64)
    );
    assert_eq!(
        envoy.stat("cluster.stable.upstream_rq_total")?,
        Some(4 * rounds as u64)
    );
    Ok(())
}

#[test]
fn the_flag_file_is_fetched_at_load_by_every_root_context_before_the_first_poll() -> Result<()> {
    let apps = Apps::start()?;
    // The inline flags send only beta testers to canary; the served file sends everybody.
    let flags = FlagServer::start(&everyone_on("ENABLED"))?;
    // No poll during this test: every fetch seen is the one made in on_configure.
    let subs = substitutions(&apps, &flags)?.replace(POLL_SETTING, r#""pollInterval": "1h""#);
    let envoy = flag_router_envoy(&subs)?;

    wait_for_each_context(&envoy, "source_updates", 0)?;
    assert_eq!(spread(&envoy, 10)?, vec!["canary"; 10]);
    // Nothing more arrives: one fetch per root context (two workers and the main thread).
    std::thread::sleep(Duration::from_millis(300));
    let fetches = flags.fetches();
    assert_eq!(fetches.len() as u64, ROOT_CONTEXTS, "{fetches:#?}");
    for f in &fetches {
        assert_eq!(f.method, "GET");
        assert_eq!(f.header("host"), Some("flags.internal"));
        assert_eq!(f.header("accept"), Some("application/json"));
        assert_eq!(
            f.header("if-none-match"),
            None,
            "the first fetch is unconditional"
        );
    }
    assert_eq!(stat(&envoy, "source_updates")?, ROOT_CONTEXTS);
    // Defined at load (0) once a source is configured: no fetch failed.
    assert_eq!(envoy.stat(&counter("source_errors"))?, Some(0));
    // Plus the fetch of the main thread's first, dropped instance (see the top of this file).
    assert_eq!(stat(&envoy, "source_fetches")?, ROOT_CONTEXTS + 1);
    assert_eq!(envoy.stat("cluster.flags.upstream_rq_cancelled")?, Some(1));
    Ok(())
}

#[test]
fn disabling_the_served_flag_moves_all_traffic_to_stable_within_a_few_polls() -> Result<()> {
    let apps = Apps::start()?;
    let flags = FlagServer::start(&everyone_on("ENABLED"))?;
    let envoy = flag_router_envoy(&substitutions(&apps, &flags)?)?;

    wait_for_each_context(&envoy, "source_updates", 0)?;
    assert_eq!(spread(&envoy, 10)?, vec!["canary"; 10]);
    // Unchanged file: polls are conditional and answered 304, which is no update.
    wait_304s(&flags, ROOT_CONTEXTS as usize)?;
    let updates = stat(&envoy, "source_updates")?;
    assert_eq!(updates, ROOT_CONTEXTS, "a 304 is not an update");

    // The kill switch: the same Envoy, a new file.
    flags.serve(&everyone_on("DISABLED"));
    let took = wait_for_each_context(&envoy, "source_updates", updates)?;
    eprintln!("kill switch: every root context had the DISABLED flag {took:?} after the flip");
    assert!(
        took <= SWITCH_TIMEOUT,
        "took {took:?}, poll interval {POLL:?}"
    );
    assert_eq!(spread(&envoy, 10)?, vec!["stable"; 10]);
    // With the flag off the plugin sets nothing, so only its stripping stands between a
    // forged header and the canary route.
    assert_eq!(
        reached(&envoy, "/checkout?forged=1", &[(HEADER, "v2")])?,
        "stable"
    );
    // DISABLED means no header at all (Envoy's default route), not `v1`.
    let last = apps.stable.requests();
    assert!(last.iter().all(|r| r.header(HEADER).is_none()), "{last:#?}");
    // The flip was noticed through a conditional request carrying the old ETag.
    assert!(
        flags
            .fetches()
            .iter()
            .any(|f| f.header("if-none-match") == Some("\"v1\"")),
        "no conditional fetch with the first ETag"
    );

    // 10 spread requests and the forged one.
    envoy.wait_for_stat(&counter("new-checkout.disabled"), 11, STAT_TIMEOUT)?;
    assert_eq!(stat(&envoy, "new-checkout.variant.on")?, 10);
    assert_eq!(stat(&envoy, "new-checkout.disabled")?, 11);
    assert!(envoy.log().contains("flags updated (1 flags)"));
    Ok(())
}

/// Waits until the flag server answered `n` conditional polls with 304.
fn wait_304s(flags: &FlagServer, n: usize) -> Result<()> {
    edge_e2e::wait_until(STAT_TIMEOUT, &format!("{n} answers 304"), || {
        Ok((flags.not_modified.load(Ordering::Relaxed) >= n).then_some(()))
    })
}

#[test]
fn a_failing_or_invalid_flag_file_keeps_the_last_good_flags() -> Result<()> {
    let apps = Apps::start()?;
    let flags = FlagServer::start(&everyone_on("ENABLED"))?;
    let envoy = flag_router_envoy(&substitutions(&apps, &flags)?)?;

    wait_for_each_context(&envoy, "source_updates", 0)?;
    assert_eq!(spread(&envoy, 6)?, vec!["canary"; 6]);

    // Every root context fails a poll in each way (each polls once a second, so three
    // warnings of a kind are one from each); traffic keeps going to canary.
    for (mode, why) in [
        (Mode::Error, "status 500"),
        (
            Mode::Garbage,
            "invalid flag file: flags: expected an object",
        ),
        // Envoy's own answers to a reset connection and to the fetch timeout.
        (Mode::Reset, "status 503"),
        (Mode::Slow, "status 504"),
    ] {
        flags.fail(mode);
        let line = format!("flag fetch failed: {why}; keeping the last good flags");
        edge_e2e::wait_until(
            STAT_TIMEOUT,
            &format!("{ROOT_CONTEXTS} warnings {line:?} (mode {mode:?})"),
            || Ok((envoy.log().matches(&line).count() as u64 >= ROOT_CONTEXTS).then_some(())),
        )?;
        assert_eq!(spread(&envoy, 6)?, vec!["canary"; 6], "after {mode:?}");
    }
    let errors = stat(&envoy, "source_errors")?;
    assert!(errors >= 4 * ROOT_CONTEXTS, "source_errors {errors}");
    assert_eq!(stat(&envoy, "source_updates")?, ROOT_CONTEXTS);

    // The poller goes on: a good file is taken again, and the invalid file's ETag was never
    // sent back.
    flags.serve(&everyone_on("DISABLED"));
    wait_for_each_context(&envoy, "source_updates", ROOT_CONTEXTS)?;
    assert_eq!(spread(&envoy, 6)?, vec!["stable"; 6]);
    assert!(
        !flags
            .fetches()
            .iter()
            .any(|f| f.header("if-none-match") == Some("\"garbage\"")),
        "an invalid file's ETag was sent back"
    );
    Ok(())
}

#[test]
fn envoy_refuses_an_unknown_targeting_operator_and_the_log_names_the_field() -> Result<()> {
    let apps = Apps::start()?;
    let flags = FlagServer::start(&beta_on())?;
    let broken = TARGETING.replace("==", "regex");
    let subs = substitutions(&apps, &flags)?.replace(TARGETING, broken);

    edge_e2e::assert_refused(
        || flag_router_envoy(&subs),
        "flag_router",
        r#"flags.new-checkout.targeting: unknown operator "regex""#,
    )?;
    // Nothing was routed and nothing fetched: the plugin stopped at its config.
    assert!(flags.fetches().is_empty());
    Ok(())
}

#[test]
fn the_edge_chain_routes_the_checkout_by_the_flag_from_the_applications_flag_file() -> Result<()> {
    // envoy/edge.yaml: the application serves the flag file too (`flags` → the backend), and
    // the plugin has no inline flags, so routing starts with the fetch at load.
    let upstream = TestUpstream::start()?;
    upstream.route("/flags.json", Script::json(beta_on()));
    let envoy = Envoy::start_with(
        "edge.yaml",
        &Substitutions::upstream(&upstream),
        &["--concurrency", "2"],
    )?;
    wait_for_each_context(&envoy, "source_updates", 0)?;

    let beta = [("x-tier", "beta")];
    for (headers, path, variant) in [
        (&beta[..], "/v2/checkout?step=1", "v2"),
        (&[], "/checkout?step=1", "v1"),
        (&[(HEADER, "v2")], "/checkout?step=1", "v1"),
    ] {
        upstream.clear();
        let answer = reached(&envoy, "/checkout?step=1", headers)?;
        assert_eq!(answer, format!("upstream saw GET {path}"));
        // Polls of the flag file may come in between.
        let seen: Vec<RecordedRequest> = upstream
            .requests()
            .into_iter()
            .filter(|r| r.path_only() != "/flags.json")
            .collect();
        assert_eq!(seen.len(), 1, "{headers:?}: {seen:#?}");
        assert_eq!(seen[0].path, path, "{headers:?}");
        assert_eq!(seen[0].header(HEADER), Some(variant), "{headers:?}");
    }
    Ok(())
}
