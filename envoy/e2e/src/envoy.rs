//! A real Envoy process per test: started from one of the YAML files in `envoy/` with its fixed
//! ports rewritten (see [`Substitutions`]), waited on until it serves, and killed on drop.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{self, File};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::client::{self, Response};
use crate::upstream::TestUpstream;
use crate::workspace_root;

/// How long Envoy may take to become ready. V8 compiles every wasm module at start, which takes
/// a few seconds on a loaded machine running tests in parallel.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Lines of Envoy's log shown in a start error and when a test panics.
const ERROR_TAIL_LINES: usize = 40;
const PANIC_TAIL_LINES: usize = 200;

/// Marker port of the listener in the checked-in configs.
pub const LISTENER_MARKER_PORT: u16 = 10000;
/// Marker port of the admin interface in the checked-in configs.
pub const ADMIN_MARKER_PORT: u16 = 9901;
/// Marker port of the backend (application and flag server) in the checked-in configs.
pub const BACKEND_MARKER_PORT: u16 = 18080;

/// How a checked-in config is adapted to one test run.
///
/// The YAML files in `envoy/` are valid as they are (for `envoy --mode validate` and the demo,
/// run from the repository root) and use fixed marker values that are rewritten textually:
///
/// | in the file          | becomes                                   |
/// |----------------------|-------------------------------------------|
/// | `port_value: 10000`  | `port_value: 0` (listener, any free port) |
/// | `port_value: 9901`   | `port_value: 0` (admin, any free port)    |
/// | `port_value: 18080`  | `port_value: <upstream port>`             |
/// | `filename: dist/`    | `filename: <workspace root>/dist/`        |
///
/// Ports are matched as whole numbers, so `port_value: 100001` is left alone. A config must
/// contain the admin marker: the rig finds everything else through the admin interface.
#[derive(Clone, Debug)]
pub struct Substitutions {
    pub upstream_port: u16,
    /// Where `dist/` points; the workspace's `dist/` when `None`.
    pub dist_dir: Option<PathBuf>,
    /// Further literal replacements, applied after the markers (e.g. a plugin setting).
    pub extra: Vec<(String, String)>,
}

impl Substitutions {
    /// Points every backend cluster at `upstream_port`.
    pub fn new(upstream_port: u16) -> Substitutions {
        Substitutions {
            upstream_port,
            dist_dir: None,
            extra: Vec::new(),
        }
    }

    /// Points every backend cluster at `upstream`.
    pub fn upstream(upstream: &TestUpstream) -> Substitutions {
        Substitutions::new(upstream.port())
    }

    /// Loads wasm modules from `dir` instead of the workspace's `dist/`.
    pub fn dist_dir(mut self, dir: impl Into<PathBuf>) -> Substitutions {
        self.dist_dir = Some(dir.into());
        self
    }

    /// Also replaces every `from` with `to`.
    pub fn replace(mut self, from: impl Into<String>, to: impl Into<String>) -> Substitutions {
        self.extra.push((from.into(), to.into()));
        self
    }

    /// Rewrites a config's text.
    pub fn apply(&self, yaml: &str) -> Result<String> {
        let admin = format!("port_value: {ADMIN_MARKER_PORT}");
        let has_admin = replace_port(yaml, &admin, &admin).is_some();
        if !has_admin {
            bail!("config has no admin `{admin}`: the rig needs the admin interface");
        }
        let mut out = yaml.to_string();
        for (marker, port) in [
            (LISTENER_MARKER_PORT, 0),
            (ADMIN_MARKER_PORT, 0),
            (BACKEND_MARKER_PORT, self.upstream_port),
        ] {
            let marker = format!("port_value: {marker}");
            if let Some(rewritten) = replace_port(&out, &marker, &format!("port_value: {port}")) {
                out = rewritten;
            }
        }
        let dist = match &self.dist_dir {
            Some(dir) => dir.clone(),
            None => workspace_root().join("dist"),
        };
        let dist = dist.to_string_lossy();
        let dist = dist.trim_end_matches('/');
        out = out
            .replace("filename: dist/", &format!("filename: {dist}/"))
            .replace("filename: \"dist/", &format!("filename: \"{dist}/"));
        for (from, to) in &self.extra {
            out = out.replace(from.as_str(), to);
        }
        Ok(out)
    }
}

/// Replaces `marker` where it is not followed by another digit; `None` when it never occurs.
fn replace_port(text: &str, marker: &str, with: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut found = false;
    while let Some(i) = rest.find(marker) {
        let end = i + marker.len();
        let whole = !rest[end..].starts_with(|c: char| c.is_ascii_digit());
        out.push_str(&rest[..i]);
        out.push_str(if whole { with } else { &rest[i..end] });
        found |= whole;
        rest = &rest[end..];
    }
    out.push_str(rest);
    found.then_some(out)
}

/// Where the Envoy binary is: `ENVOY_BIN`, else the copy `./build.sh` installs.
pub fn envoy_binary() -> Result<PathBuf> {
    locate_envoy(std::env::var_os("ENVOY_BIN"), &workspace_root())
}

fn locate_envoy(from_env: Option<OsString>, root: &Path) -> Result<PathBuf> {
    let path = match from_env {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => root.join(".tools/envoy/envoy/_bin/envoy"),
    };
    if !path.is_file() {
        bail!(
            "Envoy not found: run ./build.sh (it installs Envoy 1.40.0 into .tools/); looked at {}",
            path.display()
        );
    }
    Ok(path)
}

/// A running Envoy. Dropping it kills the process; if the test is panicking, the end of
/// Envoy's log is printed first so the failure shows what Envoy saw.
pub struct Envoy {
    process: Process,
    admin: SocketAddr,
    /// Listener name → bound port, in the order the admin interface lists them.
    listeners: Vec<(String, u16)>,
}

impl Envoy {
    /// Starts Envoy on `config` (relative to `envoy/`, or absolute) and waits until it serves.
    pub fn start(config: impl AsRef<Path>, subs: &Substitutions) -> Result<Envoy> {
        Envoy::start_with(config, subs, &[])
    }

    /// Like [`Envoy::start`], with extra command-line arguments; `--concurrency` and
    /// `--log-level` given here replace the rig's defaults (2 workers, `info`).
    pub fn start_with(
        config: impl AsRef<Path>,
        subs: &Substitutions,
        extra_args: &[&str],
    ) -> Result<Envoy> {
        let config = workspace_root().join("envoy").join(config.as_ref());
        let text =
            fs::read_to_string(&config).with_context(|| format!("reading {}", config.display()))?;
        Envoy::start_text(&text, &config.display().to_string(), subs, extra_args)
    }

    /// Like [`Envoy::start_with`], for a config given as text (generated by a test); `label`
    /// names it in errors.
    pub fn start_text(
        text: &str,
        label: &str,
        subs: &Substitutions,
        extra_args: &[&str],
    ) -> Result<Envoy> {
        let binary = envoy_binary()?;
        let text = subs
            .apply(text)
            .with_context(|| format!("rewriting {label}"))?;

        let dir = TempDir::new()?;
        let config_path = dir.path.join("envoy.yaml");
        let admin_path = dir.path.join("admin-address");
        let log_path = dir.path.join("envoy.log");
        fs::write(&config_path, text)?;
        // Envoy logs to stderr unbuffered; a file (rather than a pipe) never blocks it and can
        // be read at any time.
        let log = File::create(&log_path)?;

        let mut cmd = Command::new(&binary);
        cmd.arg("-c")
            .arg(&config_path)
            .arg("--disable-hot-restart")
            .arg("--admin-address-path")
            .arg(&admin_path);
        let given = |flag: &str| {
            extra_args
                .iter()
                .any(|a| *a == flag || a.starts_with(&format!("{flag}=")))
        };
        if !given("--concurrency") {
            cmd.args(["--concurrency", "2"]);
        }
        if !given("--log-level") && !given("-l") {
            cmd.args(["--log-level", "info"]);
        }
        let child = cmd
            .args(extra_args)
            .current_dir(workspace_root())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut process = Process {
            child,
            dir,
            log_path,
        };
        let (admin, listeners) = process
            .wait_ready(&admin_path, READY_TIMEOUT)
            .with_context(|| format!("starting Envoy on {label}"))?;
        Ok(Envoy {
            process,
            admin,
            listeners,
        })
    }

    /// Port of the first listener (0 if the config has none).
    pub fn listener_port(&self) -> u16 {
        self.listeners.first().map_or(0, |(_, port)| *port)
    }

    /// Port of the listener called `name` in the config.
    pub fn listener_port_named(&self, name: &str) -> Option<u16> {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, port)| *port)
    }

    pub fn admin_port(&self) -> u16 {
        self.admin.port()
    }

    /// `http://127.0.0.1:<listener port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.listener_port())
    }

    /// `GET path` through the listener.
    pub fn get(&self, path: &str) -> Result<Response> {
        client::get(&self.url(path))
    }

    /// A request through the listener.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Response> {
        client::request(method, &self.url(path), headers, body)
    }

    /// `GET path` on the admin interface.
    pub fn admin(&self, path: &str) -> Result<Response> {
        admin_get(self.admin, path, client::DEFAULT_TIMEOUT)
    }

    /// Downstream connections each of the first `workers` worker threads accepted (from the
    /// listener's per-worker stats), to show that a test's traffic really used them all.
    pub fn connections_per_worker(&self, workers: usize) -> Result<Vec<u64>> {
        let stats = self.stats()?;
        Ok((0..workers)
            .map(|w| {
                let suffix = format!(".worker_{w}.downstream_cx_total");
                stats
                    .with_prefix("listener.")
                    .filter(|(name, _)| name.ends_with(&suffix))
                    .map(|(_, n)| n)
                    .sum()
            })
            .collect())
    }

    /// Every counter and gauge, from the admin `/stats`.
    pub fn stats(&self) -> Result<Stats> {
        let res = self.admin("/stats")?;
        if res.status != 200 {
            bail!("admin /stats answered {}: {}", res.status, res.text());
        }
        Ok(Stats::parse(&res.text()))
    }

    /// One counter or gauge; `None` when Envoy has no stat of that name.
    pub fn stat(&self, name: &str) -> Result<Option<u64>> {
        Ok(self.stats()?.get(name))
    }

    /// Waits until a counter or gauge reaches `at_least`, and returns its value.
    pub fn wait_for_stat(&self, name: &str, at_least: u64, timeout: Duration) -> Result<u64> {
        crate::wait_until(timeout, &format!("stat {name} >= {at_least}"), || {
            Ok(self.stat(name)?.filter(|v| *v >= at_least))
        })
    }

    /// Envoy's log so far (stdout and stderr). Plugin lines look like
    /// `wasm log <plugin> <root_id>: <message>`.
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// Waits until Envoy's log contains `needle`, e.g. a plugin's message after a config push.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Result<()> {
        crate::wait_until(timeout, &format!("{needle:?} in Envoy's log"), || {
            Ok(self.log().contains(needle).then_some(()))
        })
    }
}

/// Counters and gauges by full name, e.g. `cluster.backend.upstream_rq_total`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats(pub BTreeMap<String, u64>);

impl Stats {
    /// Parses the admin `/stats` text format, `name: value` per line. Histograms and text
    /// readouts have non-numeric values and are left out.
    pub fn parse(text: &str) -> Stats {
        Stats(
            text.lines()
                .filter_map(|line| {
                    let (name, value) = line.rsplit_once(": ")?;
                    Some((name.to_string(), value.trim().parse().ok()?))
                })
                .collect(),
        )
    }

    pub fn get(&self, name: &str) -> Option<u64> {
        self.0.get(name).copied()
    }

    /// The stats whose names start with `prefix`, e.g. a plugin's own metrics.
    pub fn with_prefix<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a str, u64)> {
        self.0
            .range(prefix.to_string()..)
            .take_while(move |(name, _)| name.starts_with(prefix))
            .map(|(name, value)| (name.as_str(), *value))
    }
}

fn admin_get(admin: SocketAddr, path: &str, timeout: Duration) -> Result<Response> {
    client::send(admin, &admin.to_string(), "GET", path, &[], b"", timeout)
        .with_context(|| format!("admin GET {path}"))
}

#[derive(Deserialize)]
struct ListenerStatuses {
    listener_statuses: Vec<ListenerStatus>,
}

#[derive(Deserialize)]
struct ListenerStatus {
    name: String,
    local_address: Address,
}

#[derive(Deserialize)]
struct Address {
    socket_address: SocketAddress,
}

#[derive(Deserialize)]
struct SocketAddress {
    port_value: u16,
}

/// The Envoy child process and its files; owns the cleanup.
struct Process {
    child: Child,
    dir: TempDir,
    log_path: PathBuf,
}

impl Process {
    fn log(&self) -> String {
        fs::read(&self.log_path)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Readiness is: the admin address file is written, admin `/ready` says `LIVE`, and every
    /// listener has its port bound. Returns the admin address and the listener ports.
    fn wait_ready(
        &mut self,
        admin_path: &Path,
        timeout: Duration,
    ) -> Result<(SocketAddr, Vec<(String, u16)>)> {
        let deadline = Instant::now() + timeout;
        let probe = Duration::from_secs(1);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "Envoy exited before becoming ready ({status}){}\n--- end of Envoy's log ---\n{}",
                    self.hint(),
                    self.log_tail(ERROR_TAIL_LINES)
                );
            }
            if let Some(ready) = Self::probe(admin_path, probe) {
                return Ok(ready);
            }
            if Instant::now() >= deadline {
                bail!(
                    "Envoy not ready after {timeout:?}\n--- end of Envoy's log ---\n{}",
                    self.log_tail(ERROR_TAIL_LINES)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// One readiness check; `None` while Envoy is still starting.
    fn probe(admin_path: &Path, timeout: Duration) -> Option<(SocketAddr, Vec<(String, u16)>)> {
        let admin: SocketAddr = fs::read_to_string(admin_path).ok()?.trim().parse().ok()?;
        let ready = admin_get(admin, "/ready", timeout).ok()?;
        if ready.status != 200 || ready.text().trim() != "LIVE" {
            return None;
        }
        let listeners = admin_get(admin, "/listeners?format=json", timeout).ok()?;
        let listeners: ListenerStatuses = serde_json::from_slice(&listeners.body).ok()?;
        let ports: Vec<(String, u16)> = listeners
            .listener_statuses
            .into_iter()
            .map(|l| (l.name, l.local_address.socket_address.port_value))
            .collect();
        ports
            .iter()
            .all(|(_, port)| *port != 0)
            .then_some((admin, ports))
    }

    /// A pointer to the usual fix, for errors people will hit often.
    fn hint(&self) -> &'static str {
        if self.log().contains("Invalid path") {
            "\nhint: a file named in the config is missing; wasm modules are built into dist/ by ./build.sh"
        } else {
            ""
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // SIGKILL: nothing of Envoy's outlives the test that needs a graceful drain.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            self.dir.keep = true;
            eprintln!(
                "--- last {PANIC_TAIL_LINES} lines of Envoy's log (files kept in {}) ---\n{}\n--- end of Envoy's log ---",
                self.dir.path.display(),
                self.log_tail(PANIC_TAIL_LINES)
            );
        }
    }
}

/// A fresh directory under the system temp dir, removed on drop unless `keep` is set.
struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    fn new() -> Result<TempDir> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let base = std::env::temp_dir();
        // `create_dir` fails if the name is taken, so parallel tests never share a directory.
        for n in 0u32.. {
            let path = base.join(format!("edge-e2e-{}-{nanos}-{n}", std::process::id()));
            match fs::create_dir(&path) {
                Ok(()) => return Ok(TempDir { path, keep: false }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
            }
        }
        bail!("no free temporary directory name")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_rewritten_as_whole_numbers_only() {
        let yaml = "admin: {port_value: 9901}\nl: {port_value: 10000}\nb: {port_value: 18080}\n\
                    c: {port_value: 180800}\nfilename: dist/a.wasm\n";
        let out = Substitutions::new(4242)
            .dist_dir("/x/dist/")
            .replace("a.wasm", "b.wasm")
            .apply(yaml)
            .unwrap();
        assert_eq!(
            out,
            "admin: {port_value: 0}\nl: {port_value: 0}\nb: {port_value: 4242}\n\
             c: {port_value: 180800}\nfilename: /x/dist/b.wasm\n"
        );
    }

    #[test]
    fn config_without_admin_marker_is_refused() {
        let err = Substitutions::new(1)
            .apply("port_value: 99010")
            .unwrap_err();
        assert!(err.to_string().contains("port_value: 9901"), "{err}");
    }

    #[test]
    fn stats_keep_counters_and_gauges_only() {
        let stats = Stats::parse(
            "cluster.a.rq: 3\ncluster.a.ms: No recorded values\nserver.version: \"1.40\"\n\
             cluster.b.rq: 1\nserver.live: 1\n",
        );
        assert_eq!(stats.get("cluster.a.rq"), Some(3));
        assert_eq!(stats.get("cluster.a.ms"), None);
        assert_eq!(stats.0.len(), 3);
        let clusters: Vec<_> = stats.with_prefix("cluster.").collect();
        assert_eq!(clusters, [("cluster.a.rq", 3), ("cluster.b.rq", 1)]);
    }

    #[test]
    fn missing_envoy_binary_says_how_to_install_it() {
        let err = locate_envoy(Some("/nonexistent/envoy".into()), Path::new("/"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("run ./build.sh"), "{err}");
    }
}
