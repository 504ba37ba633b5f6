//! Polling a flagd flag-definition file: conditional requests with `ETag`, and what a reply
//! means. A failed or invalid fetch keeps the last good flags.

use crate::config::Source;
use crate::flags::FlagSet;

/// The outcome of one fetch.
pub enum Fetched {
    /// A new, valid flag set.
    Updated(FlagSet),
    /// 304: the flags are unchanged.
    NotModified,
    /// Kept the last good flags: why.
    Failed(String),
}

#[derive(Default)]
pub struct Poller {
    etag: Option<String>,
}

impl Poller {
    /// The request headers of the next fetch.
    pub fn request(&self, s: &Source) -> Vec<(String, String)> {
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
    pub fn reply(&mut self, status: Option<u32>, etag: Option<String>, body: &[u8]) -> Fetched {
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
    use std::time::Duration;

    fn source() -> Source {
        Source {
            cluster: "flags".into(),
            authority: "flags.internal".into(),
            path: "/flags.json".into(),
            poll_interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
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
    fn failures_and_invalid_files_are_reported_not_applied() {
        let mut p = Poller::default();
        assert!(matches!(p.reply(None, None, b""), Fetched::Failed(_)));
        assert!(matches!(p.reply(Some(503), None, DOC), Fetched::Failed(w) if w.contains("503")));
        let bad =
            br#"{"flags":{"f":{"state":"ENABLED","variants":{"a":"A"},"targeting":{"nope":[]}}}}"#;
        assert!(
            matches!(p.reply(Some(200), Some("\"v2\"".into()), bad), Fetched::Failed(w) if w.contains("flags.f.targeting"))
        );
        assert!(
            !p.request(&source())
                .iter()
                .any(|(k, _)| k == "if-none-match"),
            "a bad file's etag is not kept"
        );
    }
}
