//! Proxy-wasm glue: the root context owns the flags (bootstrap, then each good fetch) and polls
//! the source; each request context evaluates against the flags current when it began.

use crate::config::Config;
use crate::config::ValueType;
use crate::flags::FlagSet;
use crate::policy::{decide, type_warning, ContextCounter, Reporter};
use crate::source::{Answer, Fetched, Poller, SourceCounter};
use alloc::boxed::Box;
use alloc::format;
use alloc::rc::Rc;
use alloc::vec::Vec;
use core::cell::RefCell;
use edge_core::throttle::Throttle;
use edge_host::host::{
    callout_response_body, callout_response_header, dispatch_http_call, edit_request_headers,
    load_config, now_ns, set_tick_period_ms, warn_throttled, Action, Context, Counters,
    HostRequest, HttpContext, NamedCounters, RootContext,
};

/// Counters per flag and variant outnumber no flag file: at most this many names get their
/// own counter per worker; a file that keeps renaming variants counts the rest under
/// `flag_router.other`.
pub const MAX_COUNTERS: usize = 512;

pub struct Metrics {
    /// Per flag and variant (named by the flag file).
    counters: NamedCounters,
    /// The source's, defined when a source is configured.
    source: Counters<SourceCounter>,
    /// `context_type_errors`, defined when an attribute has a non-string `type`.
    context: Counters<ContextCounter>,
    reporter: Reporter,
    throttle: Throttle,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            counters: NamedCounters::new(MAX_COUNTERS, "flag_router.other"),
            source: Counters::default(),
            context: Counters::default(),
            reporter: Reporter::default(),
            throttle: Throttle::default(),
        }
    }
}

/// The flags in force, and the counters their outcomes have counted under so far: a warm
/// request neither builds a counter name nor hashes one. An outcome is found by its mapped
/// header's position in the configuration, the address of the set's own variant name (fixed
/// while the set lives, and this cache lives and dies with the set) and the reason. Bounded
/// by the set: at most one entry per mapped flag and variant or reason.
#[derive(Default)]
struct Loaded {
    set: FlagSet,
    ids: RefCell<OutcomeIds>,
}

/// (mapped header's position, variant name's address or 0, reason) and its counter id, in
/// key order: a binary search, and less code than another map type.
type OutcomeIds = Vec<((usize, usize, u8), Option<u32>)>;

impl Loaded {
    fn new(set: FlagSet) -> Rc<Loaded> {
        Rc::new(Loaded {
            set,
            ids: RefCell::default(),
        })
    }
}

#[derive(Default)]
pub struct FlagRouterRoot {
    config: Option<Rc<Config>>,
    flags: Rc<Loaded>,
    poller: Poller,
    metrics: Rc<RefCell<Metrics>>,
}

impl FlagRouterRoot {
    fn fetch(&mut self) {
        let Some(source) = self.config.as_ref().and_then(|c| c.source.clone()) else {
            return;
        };
        let Some(headers) = self.poller.next(&source) else {
            return;
        };
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.metrics.borrow().source.add(SourceCounter::Fetches, 1);
        let timeout = core::time::Duration::from_millis(u64::from(source.timeout_ms()));
        match dispatch_http_call(&source.cluster, headers, timeout) {
            Ok(token) => self.poller.sent(token),
            Err(status) => {
                self.metrics.borrow().source.add(SourceCounter::Errors, 1);
                log::warn!(
                    "flag-router: cannot fetch flags from cluster {}: {status:?}; keeping the last good flags",
                    source.cluster
                );
            }
        }
    }
}

impl Context for FlagRouterRoot {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        let status = callout_response_header(":status").and_then(|s| s.parse::<u32>().ok());
        let etag = callout_response_header("etag");
        let read = || {
            if body_size > 0 {
                callout_response_body(body_size)
            } else {
                Vec::new()
            }
        };
        let answer = Answer {
            status,
            etag,
            body_size,
        };
        let Some(fetched) = self.poller.reply_to(token, answer, read) else {
            return;
        };
        if let Some(counter) = fetched.counter() {
            self.metrics.borrow().source.add(counter, 1);
        }
        match fetched {
            Fetched::Updated(set) => {
                log::info!("flag-router: flags updated ({} flags)", set.flags.len());
                self.flags = Loaded::new(set);
                self.metrics.borrow_mut().reporter.flags_replaced();
            }
            Fetched::NotModified => {}
            Fetched::Failed(why) => {
                log::warn!("flag-router: flag fetch failed: {why}; keeping the last good flags");
            }
        }
    }
}

impl RootContext for FlagRouterRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(mut config) = load_config("flag-router", Config::parse) else {
            return false;
        };
        if let Some(source) = &config.source {
            // Without the timer the file is fetched once and never again: the kill switch
            // would not work, so the configuration is refused before any of it applies.
            if let Err(status) = set_tick_period_ms(source.poll_ms()) {
                log::error!("flag-router: configuration rejected: the host refused the poll timer (status {status})");
                return false;
            }
        }
        self.flags = Loaded::new(core::mem::take(&mut config.flags));
        self.metrics.borrow_mut().reporter.flags_replaced();
        let polled = config.source.is_some();
        if config.context.iter().any(|a| a.kind != ValueType::String) {
            self.metrics.borrow_mut().context = Counters::define("flag_router");
        }
        self.config = Some(Rc::new(config));
        if polled {
            self.metrics.borrow_mut().source = Counters::define("flag_router");
            self.poller = Poller::default();
            self.fetch();
        }
        true
    }

    fn on_tick(&mut self) {
        self.fetch();
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(FlagRouterStream {
            config: self.config.clone(),
            flags: self.flags.clone(),
            metrics: self.metrics.clone(),
        }))
    }
}

pub struct FlagRouterStream {
    config: Option<Rc<Config>>,
    flags: Rc<Loaded>,
    metrics: Rc<RefCell<Metrics>>,
}

impl Context for FlagRouterStream {}

impl HttpContext for FlagRouterStream {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let Some(config) = self.config.clone() else {
            return Action::Continue;
        };
        let d = decide(
            &config,
            &self.flags.set,
            &HostRequest,
            now_ns() / 1_000_000_000,
        );
        if !edit_request_headers(&d.edits) {
            warn_throttled(&self.metrics.borrow().throttle, || {
                "flag-router: the host refused a routing header edit".into()
            });
        }
        let mut metrics = self.metrics.borrow_mut();
        let Metrics {
            counters,
            reporter,
            context,
            throttle,
            ..
        } = &mut *metrics;
        if let Some(first) = d.type_errors.first() {
            context.add(ContextCounter::TypeErrors, d.type_errors.len() as u64);
            warn_throttled(throttle, || format!("flag-router: {}", type_warning(first)));
        }
        let mut ids = self.flags.ids.borrow_mut();
        // One evaluation per mapped header, in the configuration's order.
        for (at, e) in d.evaluations.iter().enumerate() {
            let key = (
                at,
                e.variant.map_or(0, |v| v.as_ptr() as usize),
                e.reason as u8,
            );
            let id = match ids.binary_search_by_key(&key, |(k, _)| *k) {
                Ok(at) => ids.get(at).and_then(|(_, id)| *id),
                Err(at) => {
                    let id = counters.id(reporter.counter(e));
                    ids.insert(at, (key, id));
                    id
                }
            };
            counters.add_id(id, 1);
            if let Some(w) = reporter.warning(e) {
                log::warn!("flag-router: {w}");
            }
            if log::log_enabled!(log::Level::Debug) {
                log::debug!("flag-router: {}", e.describe());
            }
        }
        Action::Continue
    }
}
