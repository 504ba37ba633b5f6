//! The real-Envoy end-to-end rig: a scriptable [`TestUpstream`], an [`Envoy`] process guard that
//! starts the configs in `envoy/` with free ports, a blocking [`client`], a stats reader, and
//! for scenario files a scripted gRPC server and an HTTP/2 client ([`http2`]).
//!
//! Nothing here is global: every test makes its own upstream and Envoy, so tests run in
//! parallel, and every process or thread a test starts ends when its guard drops.
//!
//! ```no_run
//! use edge_e2e::{Envoy, Script, Substitutions, TestUpstream};
//! # fn main() -> anyhow::Result<()> {
//! let upstream = TestUpstream::start()?;
//! upstream.route("/flags.json", Script::json(r#"{"flags":{}}"#));
//! let envoy = Envoy::start("plain.yaml", &Substitutions::upstream(&upstream))?;
//! assert_eq!(envoy.get("/flags.json")?.status, 200);
//! # Ok(())
//! # }
//! ```

pub mod client;
mod envoy;
mod http;
pub mod http2;
pub mod scenario;
mod upstream;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

pub use client::Response;
pub use envoy::{
    envoy_binary, Envoy, Stats, Substitutions, ADMIN_MARKER_PORT, BACKEND_MARKER_PORT,
    LISTENER_MARKER_PORT, READY_TIMEOUT,
};
pub use upstream::{HeldPort, RecordedRequest, Script, TestUpstream};

/// The workspace root (two levels above this crate), where `dist/` and `.tools/` live.
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .nth(2)
        .unwrap_or(manifest)
        .to_path_buf()
}

/// Polls `check` every 20 ms until it yields a value or `timeout` passes. Envoy and plugins act
/// asynchronously (background fetches, stats flushes), so tests wait for an outcome rather than
/// sleep a guessed time. `what` names the awaited outcome in the timeout error.
pub fn wait_until<T>(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check()? {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Checks that Envoy refused to start because plugin `plugin` (the filter's `name`) rejected
/// its configuration with `reason` (typically `field.path: message`), and did so while loading
/// rather than at the ready timeout. `start` starts that Envoy.
pub fn assert_refused(
    start: impl FnOnce() -> Result<Envoy>,
    plugin: &str,
    reason: &str,
) -> Result<()> {
    let begun = Instant::now();
    let err = match start() {
        Ok(_) => bail!("Envoy started; expected it to refuse {plugin}'s configuration ({reason})"),
        Err(e) => format!("{e:#}"),
    };
    let took = begun.elapsed();
    if took >= Duration::from_secs(10) {
        bail!("Envoy took {took:?} to refuse the configuration: it should fail while loading");
    }
    // Envoy 1.40 logs the plugin's own line, then gives up on the filter:
    //   wasm log <plugin>: <plugin>: configuration rejected: <field>: <message>
    //   error `Unable to create Wasm plugin <plugin>` initializing config ...
    for needle in [
        "exited before becoming ready".to_string(),
        format!("configuration rejected: {reason}"),
        format!("Unable to create Wasm plugin {plugin}"),
    ] {
        if !err.contains(&needle) {
            bail!("expected {needle:?} in Envoy's failure:\n{err}");
        }
    }
    Ok(())
}
