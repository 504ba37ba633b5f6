//! The playground's engine: the plugins' own config parsers and policy cores behind three
//! JSON-in/JSON-out functions, so the page (this crate compiled with wasm-bindgen) and the
//! native tests run exactly the code the modules run.
//!
//! - [`check`]: edge-check's findings for an Envoy YAML, or one plugin's JSON configuration;
//! - [`flags`]: a flagd flag file evaluated for a context or a request (mapped by a flag-router
//!   configuration), and the variant split over synthetic users;
//! - [`sequence`]: requests through a chain of plugins with a controlled clock.
//!
//! Each takes and returns JSON text; a malformed input is an `{"error": ...}` answer, never a
//! trap (a trap would leave the page without its engine).

mod check;
mod flags;
mod input;
mod sequence;

use wasm_bindgen::prelude::wasm_bindgen;

pub use sequence::BASE_TIME_NS;

/// `{"text": "...", "kind": "auto" | "envoy" | "rate_limit" | ...}` → findings.
#[wasm_bindgen]
pub fn check(input: &str) -> String {
    answer(input, check::run)
}

/// A flagd file with a context or request headers → variant, value and reason per flag, and
/// the split over synthetic users.
#[wasm_bindgen]
pub fn flags(input: &str) -> String {
    answer(input, flags::run)
}

/// A chain and a request sequence → each policy's decision per request, the answers, and
/// each rate limit rule's remaining tokens over time.
#[wasm_bindgen]
pub fn sequence(input: &str) -> String {
    answer(input, sequence::run)
}

fn answer(input: &str, run: fn(&serde_json::Value) -> Result<serde_json::Value, String>) -> String {
    let out = match serde_json::from_str::<serde_json::Value>(input) {
        Ok(v) => run(&v).unwrap_or_else(|e| serde_json::json!({ "error": e })),
        Err(e) => serde_json::json!({ "error": format!("the input is not JSON: {e}") }),
    };
    out.to_string()
}
