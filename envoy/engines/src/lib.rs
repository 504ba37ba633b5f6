//! The real engines the bundle's tests run against, never mocks: Redis (`redis-server`), an
//! etcd cluster (`etcd`) and an OCI registry (`docker-registry`), all Debian packages that
//! `./build.sh test` installs. Each starts on loopback ports no other test holds, answers its
//! readiness check before `start` returns, and is stopped by its guard when dropped, also when
//! the test fails. Fault injection is by signal, as an outage looks from outside: `pause`
//! (SIGSTOP: the engine hangs, connections stay open), `resume`, and `kill` (SIGKILL).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// A free loopback port: bound, read, released. Another process may take it before it is
/// used again, so engines that must be told their port retry with a new one.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A child process that is killed and reaped when dropped. Its output goes to a log file, which
/// `log()` returns for a failure message.
pub struct Process {
    child: Child,
    log: PathBuf,
}

impl Process {
    /// Starts `program` with `args`, its stdout and stderr appended to `log`.
    pub fn spawn(program: &str, args: &[String], log: &Path) -> Result<Process> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| {
                format!("starting {program} (its Debian package; ./build.sh test installs it)")
            })?;
        Ok(Process {
            child,
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status();
    }

    /// SIGSTOP: the process hangs with its sockets open, like an engine stuck on a disk.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after `pause`.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// SIGTERM, then waits up to five seconds for a clean exit.
    pub fn terminate(&mut self) {
        self.resume();
        self.signal("-TERM");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && !self.exited() {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }

    /// SIGKILL, and reaps it.
    pub fn kill(&mut self) {
        self.resume();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The last lines of its log.
    pub fn log(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

fn wait_for(what: &str, timeout: Duration, mut ready: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if ready()? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{what} was not ready after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// One HTTP/1.1 request to a loopback port, answered as (status, body); for readiness checks
/// and admin calls, not for traffic under test.
pub fn http(port: u16, method: &str, path: &str, body: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no HTTP status in {raw:?}"))?;
    let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((status, dechunk(body)))
}

/// A chunked body's data (etcd's gateway answers chunked); other bodies unchanged.
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    loop {
        let Some((size, after)) = rest.split_once("\r\n") else {
            return body.to_string();
        };
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            return body.to_string();
        };
        if n == 0 {
            return out;
        }
        let Some(chunk) = after.get(..n) else {
            return body.to_string();
        };
        out.push_str(chunk);
        rest = after.get(n + 2..).unwrap_or("");
    }
}

/// `redis-server` on a loopback port, without persistence.
pub struct Redis {
    process: Process,
    port: u16,
    dir: tempfile::TempDir,
}

fn redis_pings(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

impl Redis {
    pub fn start() -> Result<Redis> {
        let mut last = None;
        for _ in 0..5 {
            match Redis::start_on(free_port()?) {
                Ok(r) => return Ok(r),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("redis-server did not start")))
    }

    /// On a given port: to bring a killed Redis back where its clients look for it.
    pub fn start_on(port: u16) -> Result<Redis> {
        let dir = tempfile::tempdir()?;
        let args: Vec<String> = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &dir.path().display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut process = Process::spawn("redis-server", &args, &dir.path().join("redis.log"))?;
        let ready = wait_for("redis-server", Duration::from_secs(5), || {
            if process.exited() {
                bail!("redis-server exited: {}", process.log());
            }
            Ok(redis_pings(port))
        });
        ready?;
        Ok(Redis { process, port, dir })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn process(&mut self) -> &mut Process {
        &mut self.process
    }

    /// Where its files are (its log: `redis.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// A `docker-registry` (the CNCF distribution registry) on a loopback port it picks itself.
pub struct Registry {
    _process: Process,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Registry {
    pub fn start() -> Result<Registry> {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog: {{level: info}}\nstorage: {{filesystem: {{rootdirectory: {}}}}}\n\
                 http: {{addr: \"127.0.0.1:0\"}}\n",
                dir.path().join("data").display()
            ),
        )?;
        let log = dir.path().join("registry.log");
        let mut process = Process::spawn(
            "docker-registry",
            &["serve".to_string(), config.display().to_string()],
            &log,
        )?;
        // It logs the port it bound: "listening on 127.0.0.1:PORT".
        let mut port = 0;
        wait_for("docker-registry", Duration::from_secs(10), || {
            if process.exited() {
                bail!("docker-registry exited: {}", process.log());
            }
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(rest) = text.split("listening on 127.0.0.1:").nth(1) {
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                port = digits.parse().unwrap_or(0);
            }
            Ok(port > 0)
        })?;
        Ok(Registry {
            _process: process,
            port,
            _dir: dir,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

/// One member of an [`Etcd`] cluster.
pub struct EtcdMember {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    args: Vec<String>,
    log: PathBuf,
    process: Option<Process>,
}

impl EtcdMember {
    /// Its process, while it runs.
    pub fn process(&mut self) -> Option<&mut Process> {
        self.process.as_mut()
    }

    /// SIGKILL: the member is gone, its data kept for `restart`.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }

    /// Starts it again with its data: it rejoins the cluster.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.process = Some(Process::spawn("etcd", &self.args, &self.log)?);
        let port = self.client_port;
        wait_for("etcd member", Duration::from_secs(15), || {
            Ok(etcd_healthy(port))
        })
    }

    fn status(&self) -> Result<Value> {
        let (_, body) = http(self.client_port, "POST", "/v3/maintenance/status", "{}")?;
        Ok(serde_json::from_str(&body)?)
    }
}

fn etcd_healthy(port: u16) -> bool {
    matches!(http(port, "GET", "/health", ""), Ok((200, body)) if body.contains("\"true\""))
}

/// An etcd cluster of n members on loopback, each with its own data directory.
pub struct Etcd {
    pub members: Vec<EtcdMember>,
    _dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts `n` members and returns once every one answers `GET /health`.
    pub fn start(n: usize) -> Result<Etcd> {
        let mut last = None;
        for _ in 0..3 {
            match Etcd::try_start(n) {
                Ok(e) => return Ok(e),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("etcd did not start")))
    }

    fn try_start(n: usize) -> Result<Etcd> {
        let dir = tempfile::tempdir()?;
        let mut ports = Vec::new();
        for _ in 0..n {
            ports.push((free_port()?, free_port()?));
        }
        let cluster: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect();
        let token = format!("edge-{}-{}", std::process::id(), ports[0].0);
        let mut members = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let name = format!("m{i}");
            let args: Vec<String> = vec![
                format!("--name={name}"),
                format!("--data-dir={}", dir.path().join(&name).display()),
                format!("--listen-client-urls=http://127.0.0.1:{client}"),
                format!("--advertise-client-urls=http://127.0.0.1:{client}"),
                format!("--listen-peer-urls=http://127.0.0.1:{peer}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"),
                format!("--initial-cluster={}", cluster.join(",")),
                format!("--initial-cluster-token={token}"),
                "--initial-cluster-state=new".into(),
                "--heartbeat-interval=50".into(),
                "--election-timeout=500".into(),
                "--log-level=warn".into(),
            ];
            let log = dir.path().join(format!("{name}.log"));
            let process = Some(Process::spawn("etcd", &args, &log)?);
            members.push(EtcdMember {
                name,
                client_port: *client,
                peer_port: *peer,
                args,
                log,
                process,
            });
        }
        let mut etcd = Etcd { members, _dir: dir };
        for m in &mut etcd.members {
            let port = m.client_port;
            let process = m.process.as_mut().context("etcd member")?;
            wait_for("etcd member", Duration::from_secs(15), || {
                if process.exited() {
                    bail!("etcd exited: {}", process.log());
                }
                Ok(etcd_healthy(port))
            })?;
        }
        Ok(etcd)
    }

    /// The client ports of the members, for an Envoy cluster of them.
    pub fn client_ports(&self) -> Vec<u16> {
        self.members.iter().map(|m| m.client_port).collect()
    }

    /// The index of the current leader, as the running members report it.
    pub fn leader(&self) -> Result<usize> {
        for m in self.members.iter().filter(|m| m.process.is_some()) {
            let Ok(status) = m.status() else { continue };
            let leader = status["leader"].as_str().unwrap_or_default().to_string();
            for (i, other) in self.members.iter().enumerate() {
                if other.process.is_none() {
                    continue;
                }
                if let Ok(s) = other.status() {
                    if s["header"]["member_id"].as_str() == Some(leader.as_str()) {
                        return Ok(i);
                    }
                }
            }
        }
        bail!("no running member reports a leader")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_are_joined_and_plain_ones_kept() {
        assert_eq!(dechunk("5\r\nhello\r\n1\r\n!\r\n0\r\n\r\n"), "hello!");
        assert_eq!(dechunk("{\"health\":\"true\"}"), "{\"health\":\"true\"}");
    }

    #[test]
    fn redis_answers_and_a_paused_redis_hangs_until_resumed() -> Result<()> {
        let mut redis = Redis::start()?;
        assert!(redis_pings(redis.port()));
        redis.process().pause();
        assert!(!redis_pings(redis.port()), "a paused Redis does not answer");
        redis.process().resume();
        assert!(redis_pings(redis.port()));
        let port = redis.port();
        drop(redis);
        assert!(!redis_pings(port), "the guard stopped it");
        Ok(())
    }

    #[test]
    fn an_etcd_cluster_elects_a_leader_and_survives_losing_it() -> Result<()> {
        let mut etcd = Etcd::start(3)?;
        let leader = etcd.leader()?;
        let port = etcd.members[(leader + 1) % 3].client_port;
        let put = r#"{"key":"YQ==","value":"Yg=="}"#;
        assert_eq!(http(port, "POST", "/v3/kv/put", put)?.0, 200);
        etcd.members[leader].kill();
        // The two left elect a new leader and take writes again.
        wait_for("a new leader", Duration::from_secs(10), || {
            Ok(matches!(etcd.leader(), Ok(l) if l != leader))
        })?;
        let (status, body) = http(port, "POST", "/v3/kv/range", r#"{"key":"YQ=="}"#)?;
        assert_eq!(status, 200);
        assert!(body.contains("Yg=="), "{body}");
        etcd.members[leader].restart()?;
        Ok(())
    }
}
