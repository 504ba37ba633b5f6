//! JSON text to a [`Value`] tree and back, through serde_json.
//!
//! serde_json's parser is generic over its reader, so it is compiled into whichever crate
//! calls it, with that crate's optimisation level. The plugins' crates are built for speed
//! (the request path), yet they parse JSON almost only at configure time; through this crate,
//! built for size (`Cargo.toml`'s `[profile.release.package.edge-json]`), a module is about
//! 0.85 KB smaller, unless its plugin also builds JSON objects per request (the flag router:
//! then the map code exists twice, 0.5-0.7 KB more).

#![no_std]

extern crate alloc;
#[cfg(test)]
extern crate std;

use alloc::string::String;
use alloc::vec::Vec;
pub use serde_json::{Error, Map, Value};

/// The JSON tree of `bytes`, or serde_json's error (with its line and column).
#[inline(never)]
pub fn from_slice(bytes: &[u8]) -> Result<Value, Error> {
    serde_json::from_slice(bytes)
}

/// `value` as compact JSON text.
#[inline(never)]
pub fn to_vec(value: &Value) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(value)
}

/// `value` as compact JSON text, what its `Display` writes; through here, a module holds one
/// serialiser, built for size, instead of a second one behind `Display`.
#[inline(never)]
pub fn to_text(value: &Value) -> String {
    // A `Value` always serialises: its keys are strings, its numbers finite.
    to_vec(value)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .unwrap_or_default()
}
