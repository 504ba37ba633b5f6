//! The flag router's oracle: the plugin's own pure evaluator, run natively on exactly the flag
//! file each of its VMs holds when a request begins (the inline flags, then the last good
//! fetched file), so every routing header and every variant counter is compared exactly.
//!
//! Which file a VM holds is read from what the plugin reports: every answer to a fetch but a
//! `304` logs one line on the VM that asked (`flags updated` or `flag fetch failed`), and with
//! answers that take no time the answers arrive in the order the source gave them. Each such
//! line is paired with the next answer the source gave; a line that does not fit its answer
//! (a file the native parser accepts, reported failed) is itself a failure.

use std::collections::BTreeMap;

use edge_core::request::HeaderList;
use edge_core::RequestParts;
use flag_router::config::Config;
use flag_router::flags::FlagSet;
use flag_router::policy::{decide, Reporter};
use host_tests::{Edge, UpstreamRequest};

use crate::gen::Req;

/// What the flag source answered to one fetch.
#[derive(Clone, Copy, Debug)]
pub enum Served {
    Fail,
    NotModified,
    /// `docs[i]` with a `200`.
    Doc(usize),
}

/// The flags a VM holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Held {
    Inline,
    Doc(usize),
}

/// One request's expected outcome, from the flags its VM held when it began.
pub struct Expected {
    pub worker: usize,
    /// Every mapped header and the value it must carry (`None`: absent).
    headers: Vec<(String, Option<String>)>,
    counters: Vec<String>,
}

pub struct Oracle {
    config: Config,
    /// Each served document as the plugin's own parser reads it (`None`: refused whole).
    docs: Vec<Option<FlagSet>>,
    /// Per VM index (workers, then the main thread).
    held: Vec<Held>,
    /// Answers of the source not yet paired with a line the plugin logged.
    next_answer: usize,
    /// Lines of the current op's log already read.
    read: usize,
    reporter: Reporter,
    /// Every variant counter's expected total.
    counts: BTreeMap<String, u64>,
}

const UPDATED: &str = "flag-router: flags updated";
const FAILED: &str = "flag-router: flag fetch failed";

impl Oracle {
    /// `None` when the plugin's parser refuses `config` (then the plugin must have refused it).
    pub fn new(config: &str, docs: &[String], vms: usize) -> Option<Oracle> {
        let config = Config::parse(config.as_bytes()).ok()?;
        Some(Oracle {
            config,
            docs: docs
                .iter()
                .map(|d| FlagSet::from_document(d.as_bytes()).ok())
                .collect(),
            held: vec![Held::Inline; vms],
            next_answer: 0,
            read: 0,
            reporter: Reporter::default(),
            counts: BTreeMap::new(),
        })
    }

    /// Reads the lines the plugin logged since the last call, pairing each fetch outcome with
    /// the source's next answer (a `304` logs nothing and changes nothing).
    fn sync(&mut self, edge: &Edge, served: &[Served]) -> Result<(), String> {
        let logs = edge.logs();
        for line in logs.get(self.read..).unwrap_or_default() {
            let updated = line.message.starts_with(UPDATED);
            if !updated && !line.message.starts_with(FAILED) {
                continue;
            }
            while matches!(served.get(self.next_answer), Some(Served::NotModified)) {
                self.next_answer += 1;
            }
            let answer = served.get(self.next_answer).copied();
            self.next_answer += 1;
            let fits = match answer {
                Some(Served::Doc(i)) => self.docs.get(i).is_some_and(Option::is_some) == updated,
                Some(Served::Fail) => !updated,
                _ => false,
            };
            if !fits {
                return Err(format!(
                    "fetch answer {} was {answer:?}, and the VM on worker {} logged {:?}",
                    self.next_answer - 1,
                    line.worker,
                    line.message
                ));
            }
            if let (true, Some(Served::Doc(i))) = (updated, answer) {
                if let Some(h) = self.held.get_mut(line.worker) {
                    *h = Held::Doc(i);
                }
            }
        }
        self.read = logs.len();
        Ok(())
    }

    /// The op's log lines are about to be cleared: reads what is left of them.
    pub fn end_op(&mut self, edge: &Edge, served: &[Served]) -> Result<(), String> {
        self.sync(edge, served)?;
        self.read = 0;
        Ok(())
    }

    /// What `req`, about to begin on `worker`, must get: the plugin's evaluator on the flags
    /// that worker holds now, at the host's clock.
    pub fn expect(
        &mut self,
        edge: &Edge,
        served: &[Served],
        req: &Req,
        worker: usize,
    ) -> Result<Expected, String> {
        self.sync(edge, served)?;
        let flags = match self.held.get(worker) {
            Some(Held::Doc(i)) => self.docs.get(*i).and_then(Option::as_ref),
            _ => None,
        }
        .unwrap_or(&self.config.flags);
        let view = view(req);
        let d = decide(&self.config, flags, &view, edge.now_ns() / 1_000_000_000);
        let headers = self
            .config
            .headers
            .iter()
            .map(|(_, h)| (h.clone(), d.edits.get(h).map(str::to_string)))
            .collect();
        let counters = d
            .evaluations
            .iter()
            .map(|e| self.reporter.counter(e).to_string())
            .collect();
        Ok(Expected {
            worker,
            headers,
            counters,
        })
    }

    /// Compares what the upstream got (`up`: `None` when the request never reached it) and,
    /// once per op, the counters.
    pub fn check_request(e: &Expected, up: Option<&UpstreamRequest>) -> Result<bool, String> {
        let Some(u) = up else { return Ok(false) };
        for (name, want) in &e.headers {
            let seen: Vec<&[u8]> = u
                .headers
                .iter()
                .filter(|(k, _)| k == name.as_bytes())
                .map(|(_, v)| v.as_slice())
                .collect();
            let want: Vec<&[u8]> = want.iter().map(|v| v.as_bytes()).collect();
            if seen != want {
                return Err(format!(
                    "{name}: the upstream got {:?}, the evaluator says {:?}",
                    seen.iter()
                        .map(|v| String::from_utf8_lossy(v))
                        .collect::<Vec<_>>(),
                    want.iter()
                        .map(|v| String::from_utf8_lossy(v))
                        .collect::<Vec<_>>()
                ));
            }
        }
        Ok(true)
    }

    /// Adds the evaluations of `evaluated` to the expected counters and compares every counter
    /// they touch with the edge's.
    pub fn check_counters(&mut self, edge: &Edge, evaluated: &[Expected]) -> Result<(), String> {
        for e in evaluated {
            for c in &e.counters {
                *self.counts.entry(c.clone()).or_default() += 1;
            }
        }
        for c in evaluated.iter().flat_map(|e| &e.counters) {
            let want = self.counts.get(c).copied();
            let got = edge.metric(c);
            if got != want {
                return Err(format!(
                    "counter {c} is {got:?}, the evaluator counts {want:?}"
                ));
            }
        }
        Ok(())
    }
}

/// The request as the plugin reads it: the headers Envoy's connection manager hands the first
/// filter, and the client's address.
fn view(req: &Req) -> RequestParts {
    let r = req.to_request();
    let mut headers = HeaderList::default();
    headers.push(":authority", r.authority.as_bytes());
    headers.push(":path", r.path.as_bytes());
    headers.push(":method", r.method.as_bytes());
    headers.push(":scheme", b"http");
    for (k, v) in &r.headers {
        headers.push(&String::from_utf8_lossy(k), v);
    }
    headers.push("x-forwarded-proto", b"http");
    RequestParts {
        method: r.method.clone(),
        path: r.path.clone(),
        headers,
        client_ip: None,
    }
    .from_ip(&req.from)
}
