//! Races: two requests on two workers, interleaved at every callback boundary around a critical
//! section (first: A runs k callbacks, then all of B, then the rest of A, for every k, either
//! request first; then random interleavings), and every third trial also loses a
//! compare-and-swap inside the callback (`stage_races`). Zero double admissions and zero double
//! forwards allowed.

use std::time::Duration;

use host_tests::{Edge, Request, Response, Step, Upstream};

use crate::gen::Rng;
use crate::two_workers;

/// The schedule of trial `t` for streams of about `len` callbacks each.
fn schedule(t: u64, len: u64) -> Box<dyn FnMut(usize) -> usize> {
    let exhaustive = 2 * (len + 1);
    if t < exhaustive {
        let first = (t / (len + 1)) as usize;
        let k = (t % (len + 1)) as usize;
        Box::new(move |n| if n < k { first } else { 1 - first })
    } else {
        let mut rng = Rng::new(t);
        Box::new(move |_| rng.below(2) as usize)
    }
}

pub(crate) fn callbacks_of(edge: &mut Edge, req: Request) -> u64 {
    let id = edge.begin(req).expect("begin");
    let mut n = 0;
    while let Step::Ran(_) = edge.step(id).expect("step") {
        n += 1;
    }
    edge.finish(id).expect("finish");
    n
}

/// Runs `trials` races on `edge`: `setup` before each (e.g. let the clock pass), `pair(t)`
/// gives the two requests, and exactly one of them, or the other worker a staged race stands
/// for, may reach the application. `check` sees both responses. Returns the staged trials.
pub(crate) fn run_trials(
    edge: &mut Edge,
    trials: u64,
    len: u64,
    mut setup: impl FnMut(&mut Edge),
    mut pair: impl FnMut(u64) -> (Request, Request),
    mut check: impl FnMut(u64, usize, &[Response; 2]),
) -> u64 {
    let mut staged = 0;
    for t in 0..trials {
        setup(edge);
        if t % 3 == 2 {
            edge.stage_races(1);
        }
        let before = edge.upstream_requests().len();
        let phantoms_before = edge.races_run();
        let (a, b) = pair(t);
        let res = edge.interleave(a, b, schedule(t, len)).expect("interleave");
        let reached = edge.upstream_requests().len() - before;
        // A staged race is a third worker that got there first.
        let phantom = (edge.races_run() - phantoms_before).min(1) as usize;
        staged += phantom as u64;
        assert_eq!(
            reached + phantom,
            1,
            "trial {t}: {reached} reached the application (+{phantom} staged)"
        );
        check(t, reached, &res);
        edge.stage_races(0);
        edge.clear_records();
    }
    assert!(
        trials < 3 || staged > 0,
        "no staged race ever ran: the plugin never compare-and-swapped"
    );
    staged
}

pub fn rate_limit(trials: u64) {
    // Every trial's key stays (1 h window) and a trial charged to the spent overflow bucket
    // (its set of eight all taken) lets no one through: the slots stay well beyond the trials.
    let config = r#"{"rules":[{"name":"one","match":{"pathPrefix":"/"},"key":[{"header":"x-api-key"}],"limit":{"requests":1,"window":"1h"},"maxKeys":1000000}]}"#;
    let mut edge = two_workers("rate_limit", config, |_| Upstream::ok("ok"));
    let len = callbacks_of(&mut edge, Request::get("/").header("x-api-key", "warm-up"));
    let req = |t: u64| Request::get("/").header("x-api-key", &format!("race-{t}"));
    let staged = run_trials(
        &mut edge,
        trials,
        len,
        |_| {},
        |t| (req(t), req(t)),
        |t, reached, res| {
            let limited = res.iter().filter(|r| r.status == 429).count();
            assert_eq!(limited, 2 - reached, "trial {t}");
        },
    );
    println!("race rate_limit last token: {trials} trials ({} interleavings at each boundary, the rest random; {staged} with a compare-and-swap lost to another worker), 0 double admissions", 2 * (len + 1));
}

pub fn idempotency(trials: u64) {
    let config = r#"{"routes":[{"pathPrefix":"/pay"}],"header":"idempotency-key","scope":[],"maxEntries":100000}"#;
    let mut edge = two_workers("idempotency", config, |_| Upstream::ok("charged"));
    let pay = |key: &str| {
        Request::post("/pay")
            .header("idempotency-key", key)
            .body("{\"amount\":1}")
    };
    let len = callbacks_of(&mut edge, pay("warm-up"));
    let req = |t: u64| pay(&format!("race-{t}"));
    let staged = run_trials(
        &mut edge,
        trials,
        len,
        |_| {},
        |t| (req(t), req(t)),
        |t, _, res| one_of_the_pair_ran(t, res),
    );
    println!("race idempotency claim: {trials} trials ({} interleavings at each boundary, the rest random; {staged} with a claim lost to another worker), 0 double forwards", 2 * (len + 1));
}

/// After `openFor`, the circuit lets exactly one probe through however the two requests
/// interleave; the probe fails, the circuit reopens, and the next trial races again. A probe
/// claimed by the staged worker never reports: the next trial proves the circuit is not
/// wedged by it.
pub fn circuit(trials: u64) {
    let config = r#"{"routes":[{"pathPrefix":"/api/"}],"circuitBreaker":{"failures":1,"window":"10s","openFor":"1s"}}"#;
    let mut edge = two_workers("cached_fallback", config, |_| Upstream::status(503));
    let len = callbacks_of(&mut edge, Request::get("/api/x"));
    let advance = |e: &mut Edge| e.advance(Duration::from_millis(1100)).expect("advance");
    let pair = |_| (Request::get("/api/x"), Request::get("/api/x"));
    // Every request the probe did not carry is answered while the circuit is open: a 503
    // problem saying so, with `retry-after`; the probe gets the upstream's own 503.
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
    let staged = run_trials(&mut edge, trials, len, advance, pair, check);
    println!("race cached_fallback circuit probe: {trials} trials ({} interleavings at each boundary, the rest random; {staged} with the probe claimed by another worker), 0 double probes", 2 * (len + 1));
}

/// Two duplicates of one keyed POST raced: each got the application's answer (`charged`) or
/// 409, never a replay of a response that was not there yet.
pub(crate) fn one_of_the_pair_ran(t: u64, res: &[Response; 2]) {
    for r in res {
        let replay = r.header("idempotent-replayed") == Some("true");
        assert!(
            (r.status == 200 && r.body_str() == "charged") || (r.status == 409 && !replay),
            "trial {t}: {} {:?} {}",
            r.status,
            r.header("idempotent-replayed"),
            r.body_str()
        );
    }
}
