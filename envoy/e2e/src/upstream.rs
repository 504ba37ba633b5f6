//! A scriptable HTTP/1.1 server standing in for the application (and the flag file server)
//! behind Envoy. It records every request so tests can assert on what Envoy forwarded, and its
//! answers can be changed while Envoy is running, e.g. to serve a new flag document.

use std::collections::HashMap;
use std::io::{BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::http::{self, Framing};

/// One request as the upstream received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedRequest {
    pub method: String,
    /// The request target as sent, query string included.
    pub path: String,
    /// Header fields in arrival order, names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RecordedRequest {
    /// First value of a header, name compared case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        http::header(&self.headers, name)
    }

    /// The body as text (lossy), for assertions on JSON or plain bodies.
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The path without its query string.
    pub fn path_only(&self) -> &str {
        path_only(&self.path)
    }
}

/// How the upstream answers requests to one route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Script {
    pub status: u16,
    /// Sent as given. `content-length` is added unless present here or the body is chunked.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Wait this long after reading the request before answering (or resetting).
    pub delay: Duration,
    /// Abort the connection with a TCP RST instead of answering.
    pub reset: bool,
    /// Send the body with chunked encoding in this many pieces, pausing between them.
    pub chunks: Option<(usize, Duration)>,
}

impl Script {
    /// An answer with `status` and an empty body.
    pub fn status(status: u16) -> Script {
        Script {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            delay: Duration::ZERO,
            reset: false,
            chunks: None,
        }
    }

    /// A 200 with a JSON body.
    pub fn json(body: impl Into<String>) -> Script {
        Script::status(200)
            .with_header("content-type", "application/json")
            .with_body(body.into())
    }

    /// A 200 with a plain-text body.
    pub fn text(body: impl Into<String>) -> Script {
        Script::status(200)
            .with_header("content-type", "text/plain")
            .with_body(body.into())
    }

    /// Reset the connection without answering, as a crashed backend would.
    pub fn reset() -> Script {
        Script {
            reset: true,
            ..Script::status(200)
        }
    }

    pub fn with_status(mut self, status: u16) -> Script {
        self.status = status;
        self
    }

    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Script {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn with_body(mut self, body: impl Into<Vec<u8>>) -> Script {
        self.body = body.into();
        self
    }

    pub fn with_delay(mut self, delay: Duration) -> Script {
        self.delay = delay;
        self
    }

    /// Stream the body in `pieces` chunks with `pause` between them (to test streaming filters).
    pub fn chunked(mut self, pieces: usize, pause: Duration) -> Script {
        self.chunks = Some((pieces.max(1), pause));
        self
    }

    /// What unscripted paths get: a body naming the request, so a test can tell that the
    /// request reached the upstream and which path it had.
    pub fn echo(method: &str, path: &str) -> Script {
        Script::text(format!("upstream saw {method} {path}"))
    }
}

/// Answers computed per request (see [`TestUpstream::respond_with`]); `None` falls back to the
/// routes.
type Responder = Arc<dyn Fn(&RecordedRequest) -> Option<Script> + Send + Sync>;

/// The test server. Stops on drop: the listener closes and every connection thread ends, even
/// one in the middle of a scripted delay.
pub struct TestUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
    /// Keeps the port bound for the upstream's whole life (see [`HeldPort`]).
    hold: socket2::Socket,
    /// The listening socket itself, so stopping can end its listening state. Closing our
    /// descriptor is not enough: a child another test is forking at that moment holds a copy
    /// until its `exec`, and the port would still accept.
    listening: socket2::Socket,
}

/// A port a stopped upstream keeps: bound but not listening, so every connection to it is
/// refused, and no other socket on the machine can be given it (an ephemeral bind never
/// shares a port bound with `SO_REUSEPORT`). [`TestUpstream::start_held`] serves on it again.
pub struct HeldPort {
    addr: SocketAddr,
    socket: socket2::Socket,
}

impl HeldPort {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

fn reusable(addr: &SocketAddr) -> Result<socket2::Socket> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(*addr),
        socket2::Type::STREAM,
        None,
    )?;
    s.set_reuse_port(true)?;
    Ok(s)
}

struct Shared {
    requests: Mutex<Vec<RecordedRequest>>,
    /// (pattern, script); a pattern ending in `*` is a prefix.
    routes: Mutex<Vec<(String, Script)>>,
    responder: Mutex<Option<Responder>>,
    stopping: Mutex<bool>,
    /// Signalled on stop so scripted delays end at once.
    stop_signal: Condvar,
    /// A clone of each open connection, so stopping can unblock threads waiting in `read`.
    open: Mutex<HashMap<u64, TcpStream>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    next_id: AtomicU64,
}

/// Locks ignoring poisoning: a panicking connection thread must not take the whole rig down.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn path_only(target: &str) -> &str {
    target.split_once('?').map_or(target, |(p, _)| p)
}

impl TestUpstream {
    /// Starts listening on an ephemeral port of 127.0.0.1.
    pub fn start() -> Result<TestUpstream> {
        TestUpstream::start_on("127.0.0.1:0")
    }

    /// Starts listening on a given address, e.g. the fixed `127.0.0.1:18080` of the demo.
    pub fn start_on(addr: impl ToSocketAddrs + std::fmt::Debug) -> Result<TestUpstream> {
        let wanted = addr
            .to_socket_addrs()?
            .next()
            .with_context(|| format!("{addr:?} names no address"))?;
        let hold = reusable(&wanted)?;
        hold.bind(&wanted.into())
            .with_context(|| format!("binding the test upstream to {addr:?}"))?;
        let bound = hold
            .local_addr()?
            .as_socket()
            .context("the test upstream's address")?;
        TestUpstream::start_held(HeldPort {
            addr: bound,
            socket: hold,
        })
    }

    /// Serves again on a port kept by [`TestUpstream::stop_keeping_port`].
    pub fn start_held(held: HeldPort) -> Result<TestUpstream> {
        let addr = held.addr;
        let socket = reusable(&addr)?;
        socket
            .bind(&addr.into())
            .with_context(|| format!("listening on {addr} again"))?;
        socket.listen(1024)?;
        let listening = socket.try_clone()?;
        let listener: TcpListener = socket.into();
        let shared = Arc::new(Shared {
            requests: Mutex::default(),
            routes: Mutex::default(),
            responder: Mutex::default(),
            stopping: Mutex::new(false),
            stop_signal: Condvar::new(),
            open: Mutex::default(),
            workers: Mutex::default(),
            next_id: AtomicU64::new(0),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name(format!("upstream-{}", addr.port()))
                .spawn(move || accept_loop(&listener, &shared))?
        };
        Ok(TestUpstream {
            addr,
            shared,
            acceptor: Some(acceptor),
            hold: held.socket,
            listening,
        })
    }

    /// Stops serving but keeps the port: connections to it are refused until the
    /// [`HeldPort`] is served again or dropped.
    pub fn stop_keeping_port(self) -> Result<HeldPort> {
        let held = HeldPort {
            addr: self.addr,
            // The same socket: the port stays bound after the upstream's own handle closes.
            socket: self.hold.try_clone()?,
        };
        drop(self);
        Ok(held)
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port><path>`, for calling the upstream directly.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Sets (or replaces) the answer for a route. `pattern` is a path matched exactly (ignoring
    /// the query string unless the pattern has one), or a prefix when it ends with `*`
    /// (`/api/*`); an exact match wins over prefixes, and the longest prefix wins among them.
    /// Takes effect for the next request, also on open connections.
    pub fn route(&self, pattern: impl Into<String>, script: Script) {
        let pattern = pattern.into();
        let mut routes = lock(&self.shared.routes);
        match routes.iter_mut().find(|(p, _)| *p == pattern) {
            Some(slot) => slot.1 = script,
            None => routes.push((pattern, script)),
        }
    }

    /// Computes answers per request: `respond` sees each request (body included) before the
    /// routes do, and its `Some(script)` is the answer; `None` leaves the request to the routes.
    /// For behaviour a fixed script cannot express, such as generated ids or state changed by
    /// earlier requests. Replaces any previous responder; takes effect for the next request.
    pub fn respond_with(
        &self,
        respond: impl Fn(&RecordedRequest) -> Option<Script> + Send + Sync + 'static,
    ) {
        *lock(&self.shared.responder) = Some(Arc::new(respond));
    }

    /// Removes a route, so its path gets the default echo answer again.
    pub fn unroute(&self, pattern: &str) {
        lock(&self.shared.routes).retain(|(p, _)| p != pattern);
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.requests).clone()
    }

    /// Requests whose path equals `path`, with or without the query string.
    pub fn requests_to(&self, path: &str) -> Vec<RecordedRequest> {
        lock(&self.shared.requests)
            .iter()
            .filter(|r| r.path == path || r.path_only() == path)
            .cloned()
            .collect()
    }

    /// Forgets the recorded requests (routes stay).
    pub fn clear(&self) {
        lock(&self.shared.requests).clear();
    }

    /// Waits until at least `count` requests to `path` arrived, e.g. a plugin's background
    /// fetch, and returns them.
    pub fn wait_for_requests_to(
        &self,
        path: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<RecordedRequest>> {
        crate::wait_until(
            timeout,
            &format!("{count} request(s) to {path} at the upstream"),
            || {
                let seen = self.requests_to(path);
                Ok((seen.len() >= count).then_some(seen))
            },
        )
    }
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        *lock(&self.shared.stopping) = true;
        self.shared.stop_signal.notify_all();
        // Shutting a listening socket down ends its listening state for every descriptor of
        // it, and wakes the blocked `accept`. Where that is refused, a connection wakes it;
        // if that fails too, leave the acceptor detached rather than hang the test.
        let woken = self.listening.shutdown(Shutdown::Both).is_ok()
            || TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)).is_ok();
        if woken {
            if let Some(acceptor) = self.acceptor.take() {
                let _ = acceptor.join();
            }
        }
        for stream in lock(&self.shared.open).values() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        let workers = std::mem::take(&mut *lock(&self.shared.workers));
        for worker in workers {
            let _ = worker.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.is_stopping() {
            break;
        }
        let Ok(stream) = stream else { continue };
        let Ok(tracked) = stream.try_clone() else {
            continue;
        };
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&shared.open).insert(id, tracked);
        let worker = {
            let shared = Arc::clone(shared);
            thread::spawn(move || {
                let _ = serve_connection(stream, &shared);
                // Dropping the last handle closes the socket (with RST if `reset` set linger 0).
                lock(&shared.open).remove(&id);
            })
        };
        let mut workers = lock(&shared.workers);
        workers.retain(|w| !w.is_finished());
        workers.push(worker);
    }
}

impl Shared {
    fn is_stopping(&self) -> bool {
        *lock(&self.stopping)
    }

    /// Sleeps for `d` unless the server stops first; returns whether it is still running.
    fn pause(&self, d: Duration) -> bool {
        let stopping = lock(&self.stopping);
        let (stopping, _) = self
            .stop_signal
            .wait_timeout_while(stopping, d, |stopping| !*stopping)
            .unwrap_or_else(PoisonError::into_inner);
        !*stopping
    }

    fn script_for(&self, method: &str, target: &str) -> Script {
        let path = path_only(target);
        let routes = lock(&self.routes);
        let exact = routes
            .iter()
            .find(|(p, _)| p == target || p == path)
            .map(|(_, s)| s);
        let prefix = || {
            routes
                .iter()
                .filter_map(|(p, s)| {
                    let prefix = p.strip_suffix('*')?;
                    path.starts_with(prefix).then_some((prefix.len(), s))
                })
                .max_by_key(|(len, _)| *len)
                .map(|(_, s)| s)
        };
        exact
            .or_else(prefix)
            .cloned()
            .unwrap_or_else(|| Script::echo(method, target))
    }
}

/// Serves requests on one connection until the peer closes it, asks to, or a script resets it.
fn serve_connection(stream: TcpStream, shared: &Shared) -> Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    while let Some(head) = http::read_head(&mut reader)? {
        let mut parts = head.start_line.split_whitespace();
        let (method, path, version) = (
            parts.next().unwrap_or_default().to_string(),
            parts.next().unwrap_or_default().to_string(),
            parts.next().unwrap_or_default().to_string(),
        );
        if head.has_token("expect", "100-continue") {
            writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        let body = http::read_body(&mut reader, Framing::of_request(&head)?)?;
        let keep_alive = version == "HTTP/1.1" && !head.has_token("connection", "close");
        let request = RecordedRequest {
            method,
            path,
            headers: head.headers,
            body,
        };
        // Cloned out so a slow responder never holds the lock.
        let responder = lock(&shared.responder).clone();
        let script = responder
            .and_then(|respond| respond(&request))
            .unwrap_or_else(|| shared.script_for(&request.method, &request.path));
        let method = request.method.clone();
        lock(&shared.requests).push(request);
        if !script.delay.is_zero() && !shared.pause(script.delay) {
            return Ok(());
        }
        if script.reset {
            socket2::SockRef::from(&writer).set_linger(Some(Duration::ZERO))?;
            return Ok(());
        }
        if !write_response(&mut writer, &script, &method, shared)? || !keep_alive {
            return Ok(());
        }
    }
    Ok(())
}

/// Writes the scripted answer; returns false when the server stopped half-way.
fn write_response(
    w: &mut TcpStream,
    script: &Script,
    method: &str,
    shared: &Shared,
) -> Result<bool> {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\n",
        script.status,
        http::reason(script.status)
    );
    for (name, value) in &script.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    let has_length = http::header(&script.headers, "content-length").is_some();
    if script.chunks.is_some() {
        head.push_str("transfer-encoding: chunked\r\n");
    } else if !has_length {
        head.push_str(&format!("content-length: {}\r\n", script.body.len()));
    }
    head.push_str("\r\n");
    let with_body = !method.eq_ignore_ascii_case("HEAD");
    match script.chunks {
        None => {
            let mut out = head.into_bytes();
            if with_body {
                out.extend_from_slice(&script.body);
            }
            w.write_all(&out)?;
        }
        Some((pieces, pause)) => {
            w.write_all(head.as_bytes())?;
            if with_body {
                let size = script.body.len().div_ceil(pieces).max(1);
                for (i, piece) in script.body.chunks(size).enumerate() {
                    if i > 0 && !shared.pause(pause) {
                        return Ok(false);
                    }
                    http::write_chunk(w, piece)?;
                }
                http::write_last_chunk(w)?;
            }
        }
    }
    Ok(true)
}

/// Routing is the part of the upstream with real rules, so it is checked without sockets.
#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Shared {
        Shared {
            requests: Mutex::default(),
            routes: Mutex::default(),
            responder: Mutex::default(),
            stopping: Mutex::new(false),
            stop_signal: Condvar::new(),
            open: Mutex::default(),
            workers: Mutex::default(),
            next_id: AtomicU64::new(0),
        }
    }

    #[test]
    fn exact_route_beats_prefix_and_longest_prefix_wins() {
        let s = shared();
        lock(&s.routes).extend([
            ("/api/*".to_string(), Script::status(201)),
            ("/api/v2/*".to_string(), Script::status(202)),
            ("/api/v2/x".to_string(), Script::status(203)),
        ]);
        assert_eq!(s.script_for("GET", "/api/v1/x").status, 201);
        assert_eq!(s.script_for("GET", "/api/v2/y?q=1").status, 202);
        assert_eq!(s.script_for("GET", "/api/v2/x?q=1").status, 203);
        assert_eq!(
            s.script_for("GET", "/other").body,
            b"upstream saw GET /other"
        );
    }
}
