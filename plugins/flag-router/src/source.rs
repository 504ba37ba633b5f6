//! Polling a flagd flag-definition file: conditional requests with `ETag`, and what a reply
//! means. A failed or invalid fetch keeps the last good flags.

use crate::config::Source;
use crate::flags::FlagSet;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use edge_core::metrics::Counter;

/// The source's counters, `flag_router.<name>` (the per-flag ones are named by the flag file).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceCounter {
    Fetches,
    Updates,
    Errors,
}

impl Counter for SourceCounter {
    const ALL: &'static [SourceCounter] = &[
        SourceCounter::Fetches,
        SourceCounter::Updates,
        SourceCounter::Errors,
    ];

    fn name(self) -> &'static str {
        match self {
            SourceCounter::Fetches => "source_fetches",
            SourceCounter::Updates => "source_updates",
            SourceCounter::Errors => "source_errors",
        }
    }
}

/// The outcome of one fetch.
pub enum Fetched {
    /// A new, valid flag set.
    Updated(FlagSet),
    /// 304: the flags are unchanged.
    NotModified,
    /// Kept the last good flags: why.
    Failed(String),
}

impl Fetched {
    /// The counter a fetch's outcome increments (an unchanged file counts nothing).
    pub fn counter(&self) -> Option<SourceCounter> {
        match self {
            Fetched::Updated(_) => Some(SourceCounter::Updates),
            Fetched::NotModified => None,
            Fetched::Failed(_) => Some(SourceCounter::Errors),
        }
    }
}

/// The answer to a fetch as the callout reports it: its status (`None` when the call failed:
/// reset, timeout, no host), its `ETag`, and the size of its body.
pub struct Answer {
    pub status: Option<u32>,
    pub etag: Option<String>,
    pub body_size: usize,
}

/// The largest flag file read: every worker parses and keeps it.
pub const MAX_FILE_BYTES: usize = 4 << 20;

#[derive(Default)]
pub struct Poller {
    etag: Option<String>,
    /// The token of the fetch on its way: one at a time, so a slow source is not piled on.
    in_flight: Option<u32>,
}

impl Poller {
    /// The request headers of the next fetch, or `None` while one is still on its way.
    pub fn next(&self, s: &Source) -> Option<Vec<(String, String)>> {
        self.in_flight.is_none().then(|| self.request(s))
    }

    /// The fetch was dispatched with `token`.
    pub fn sent(&mut self, token: u32) {
        self.in_flight = Some(token);
    }

    /// The answer to callout `token` (`None` when it is not the fetch this poller waits
    /// for); its body is read by `read` only when it is a flag file of at most
    /// [`MAX_FILE_BYTES`] (a larger one is refused unread).
    pub fn reply_to(
        &mut self,
        token: u32,
        answer: Answer,
        read: impl FnOnce() -> Vec<u8>,
    ) -> Option<Fetched> {
        if self.in_flight != Some(token) {
            return None;
        }
        let Answer {
            status,
            etag,
            body_size,
        } = answer;
        self.in_flight = None;
        if status == Some(200) && body_size > MAX_FILE_BYTES {
            return Some(Fetched::Failed(format!(
                "the flag file is {body_size} bytes, more than {MAX_FILE_BYTES}"
            )));
        }
        // Only a 200's body is a flag file: any other answer is judged by its status, unread.
        let body = if status == Some(200) {
            read()
        } else {
            Vec::new()
        };
        Some(self.reply(status, etag, &body))
    }

    fn request(&self, s: &Source) -> Vec<(String, String)> {
        let mut h = vec![
            (":method".into(), "GET".into()),
            (":path".into(), s.path.clone()),
            (":authority".into(), s.authority.clone()),
            ("accept".into(), "application/json".into()),
        ];
        if let Some(etag) = &self.etag {
            h.push(("if-none-match".into(), etag.clone()));
        }
        h
    }

    /// Interprets a reply; `status` is `None` when the call failed (reset, timeout, no host).
    fn reply(&mut self, status: Option<u32>, etag: Option<String>, body: &[u8]) -> Fetched {
        match status {
            None => Fetched::Failed("no response (connection failure or timeout)".into()),
            Some(304) => Fetched::NotModified,
            Some(200) => match FlagSet::from_document(body) {
                Ok(set) => {
                    self.etag = etag.filter(|e| !e.is_empty());
                    Fetched::Updated(set)
                }
                Err(e) => Fetched::Failed(format!("invalid flag file: {e}")),
            },
            Some(s) => Fetched::Failed(format!("status {s}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::time::Duration;

    fn source() -> Source {
        Source {
            cluster: "flags".into(),
            authority: "flags.internal".into(),
            path: "/flags.json".into(),
            poll_interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
        }
    }

    fn answer(status: Option<u32>, body_size: usize) -> Answer {
        Answer {
            status,
            etag: None,
            body_size,
        }
    }

    const DOC: &[u8] = br#"{"$schema":"https://flagd.dev/schema/v0/flags.json",
        "flags":{"f":{"state":"DISABLED","variants":{"a":"A"},"defaultVariant":"a"}},
        "metadata":{"version":"1"}}"#;

    #[test]
    fn etag_is_sent_back_after_a_good_fetch() {
        let mut p = Poller::default();
        assert!(!p
            .request(&source())
            .iter()
            .any(|(k, _)| k == "if-none-match"));
        assert!(
            matches!(p.reply(Some(200), Some("\"v1\"".into()), DOC), Fetched::Updated(s) if !s.flags.is_empty())
        );
        assert!(p
            .request(&source())
            .contains(&("if-none-match".into(), "\"v1\"".into())));
        assert!(p
            .request(&source())
            .contains(&(":authority".into(), "flags.internal".into())));
        assert!(matches!(
            p.reply(Some(304), None, b""),
            Fetched::NotModified
        ));
    }

    #[test]
    fn one_fetch_at_a_time_and_only_its_reply_counts() {
        let mut p = Poller::default();
        assert!(p.next(&source()).is_some());
        p.sent(7);
        assert!(p.next(&source()).is_none(), "a fetch is on its way");
        assert!(
            p.reply_to(6, answer(Some(200), DOC.len()), || DOC.to_vec())
                .is_none(),
            "a stale token is ignored"
        );
        assert!(matches!(
            p.reply_to(7, answer(Some(304), 0), Vec::new),
            Some(Fetched::NotModified)
        ));
        assert!(p.next(&source()).is_some());
        assert!(
            p.reply_to(7, answer(Some(200), DOC.len()), || DOC.to_vec())
                .is_none(),
            "answered once only"
        );
    }

    #[test]
    fn only_a_200_body_is_read_into_memory() {
        let mut p = Poller::default();
        for status in [Some(500), Some(404), Some(304), None] {
            assert!(p.next(&source()).is_some());
            p.sent(1);
            let read = core::cell::Cell::new(false);
            let _ = p.reply_to(1, answer(status, 3 << 20), || {
                read.set(true);
                Vec::new()
            });
            assert!(!read.get(), "{status:?}: the body was read");
        }
    }

    #[test]
    fn a_file_over_the_limit_is_refused_unread_and_counted_as_an_error() {
        let mut p = Poller::default();
        assert!(p.next(&source()).is_some());
        p.sent(2);
        let read = core::cell::Cell::new(false);
        let r = p.reply_to(2, answer(Some(200), MAX_FILE_BYTES + 1), || {
            read.set(true);
            DOC.to_vec()
        });
        assert!(!read.get(), "the body was read");
        let r = r.unwrap();
        assert!(matches!(&r, Fetched::Failed(w) if w.contains("more than")));
        assert_eq!(r.counter(), Some(SourceCounter::Errors));
        // At the limit it is read.
        assert!(p.next(&source()).is_some());
        p.sent(3);
        let r = p
            .reply_to(3, answer(Some(200), MAX_FILE_BYTES), || DOC.to_vec())
            .unwrap();
        assert_eq!(r.counter(), Some(SourceCounter::Updates));
        assert_eq!(Fetched::NotModified.counter(), None);
        assert_eq!(
            edge_core::metrics::names::<SourceCounter>(&["flag_router"]),
            [
                "flag_router.source_fetches",
                "flag_router.source_updates",
                "flag_router.source_errors"
            ]
        );
    }

    #[test]
    fn failures_and_invalid_files_are_reported_not_applied() {
        let mut p = Poller::default();
        assert!(matches!(p.reply(None, None, b""), Fetched::Failed(_)));
        assert!(matches!(p.reply(Some(503), None, DOC), Fetched::Failed(w) if w.contains("503")));
        let bad = br#"{"flags":{},"$evaluators":[]}"#;
        assert!(
            matches!(p.reply(Some(200), Some("\"v2\"".into()), bad), Fetched::Failed(w) if w.contains("$evaluators"))
        );
        assert!(
            !p.request(&source())
                .iter()
                .any(|(k, _)| k == "if-none-match"),
            "a bad file's etag is not kept"
        );
    }
}
