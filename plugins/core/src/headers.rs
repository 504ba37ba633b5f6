//! Header edits as a policy decides them and the glue applies them (edge-host's
//! `edit_request_headers` and `edit_response_headers`): one shape for every plugin, request or
//! response.

use alloc::string::String;
use alloc::vec::Vec;
/// Remove `remove`, then set `set`: a plugin strips what a client must not choose (a routing
/// header, a verdict marker) before it sets its own. `S` is `String`, or `&str` borrowed from
/// the configuration where a request must not allocate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderEdits<S = String> {
    pub remove: Vec<S>,
    pub set: Vec<(S, S)>,
}

impl<S> Default for HeaderEdits<S> {
    fn default() -> Self {
        HeaderEdits {
            remove: Vec::new(),
            set: Vec::new(),
        }
    }
}

impl<S: AsRef<str>> HeaderEdits<S> {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty()
    }

    /// The value set for `name` (tests and logs).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.set
            .iter()
            .find(|(k, _)| k.as_ref().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_ref())
    }
}
