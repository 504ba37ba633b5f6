//! HTTP/2 for scenario files: [`GrpcServer`], the scripted gRPC server behind a scenario's
//! `grpc: true` callout clusters, and [`send`], the client of `protocol: h2` steps (prior
//! knowledge, which Envoy's `codec_type: AUTO` accepts).
//!
//! Both answer as the harness's scenario runner does (`host_tests::scenario`): a declared
//! method answers its `{grpc_status, grpc_message, body}` after its `delay`, an undeclared one
//! is gRPC's UNIMPLEMENTED (12, `unknown method`).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, TcpListener as StdListener};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use host_tests::scenario::{grpc_message_on_the_wire, parse_duration, CallAnswer, UNKNOWN_METHOD};
use socket2::{Domain, Socket, Type};
use tokio::sync::oneshot;

/// One call the server received: its `:method`, `:path` and the message (unframed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrpcCall {
    pub method: String,
    pub path: String,
    pub message: Vec<u8>,
}

struct Shared {
    answers: BTreeMap<String, CallAnswer>,
    calls: Mutex<Vec<GrpcCall>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A scripted gRPC server on an ephemeral port of 127.0.0.1 (HTTP/2 without TLS). Stops on
/// drop: the listener closes and every call in progress ends, even one in a scripted delay.
pub struct GrpcServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl GrpcServer {
    /// Serves `answers`, keyed by `/package.Service/Method`.
    pub fn start(answers: BTreeMap<String, CallAnswer>) -> Result<GrpcServer> {
        let listener = StdListener::bind("127.0.0.1:0").context("binding the gRPC server")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            answers,
            calls: Mutex::default(),
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (stop, stopped) = oneshot::channel();
        let served = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("grpc-{}", addr.port()))
            .spawn(move || {
                // Dropping the runtime at the end drops every connection and call task.
                runtime.block_on(accept_loop(listener, served, stopped));
            })?;
        Ok(GrpcServer {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Every call received so far, in arrival order.
    pub fn calls(&self) -> Vec<GrpcCall> {
        lock(&self.shared.calls).clone()
    }

    pub fn clear(&self) {
        lock(&self.shared.calls).clear();
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(
    listener: StdListener,
    shared: Arc<Shared>,
    mut stopped: oneshot::Receiver<()>,
) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => {
                if let Ok((tcp, _)) = accepted {
                    tokio::spawn(serve_connection(tcp, Arc::clone(&shared)));
                }
            }
        }
    }
}

async fn serve_connection(tcp: tokio::net::TcpStream, shared: Arc<Shared>) {
    let Ok(mut connection) = h2::server::handshake(tcp).await else {
        return;
    };
    while let Some(Ok((request, respond))) = connection.accept().await {
        tokio::spawn(answer(request, respond, Arc::clone(&shared)));
    }
}

/// Reads a whole body, giving the window back as it goes.
async fn read_body(body: &mut RecvStream) -> std::result::Result<Vec<u8>, h2::Error> {
    let mut out = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// The messages of a gRPC body, each after its 5-byte prefix, joined.
fn unframe(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some((head, rest)) = body.split_first_chunk::<5>() {
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let take = len.min(rest.len());
        out.extend_from_slice(rest.get(..take).unwrap_or_default());
        body = rest.get(take..).unwrap_or_default();
    }
    out
}

fn frame(message: &[u8]) -> Bytes {
    let mut framed = Vec::with_capacity(message.len() + 5);
    framed.push(0);
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(message);
    Bytes::from(framed)
}

fn grpc_head() -> http::response::Builder {
    http::Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
}

async fn answer(
    request: http::Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    shared: Arc<Shared>,
) {
    let method = request.method().to_string();
    let path = request.uri().path().to_string();
    let mut body = request.into_body();
    let Ok(message) = read_body(&mut body).await else {
        // The caller gave up (Envoy's timeout, a cancel) before sending the whole call.
        return;
    };
    lock(&shared.calls).push(GrpcCall {
        method,
        path: path.clone(),
        message: unframe(&message),
    });
    let (status, text) = match shared.answers.get(&path) {
        None => (UNKNOWN_METHOD.0, UNKNOWN_METHOD.1.to_string()),
        Some(a) => {
            let delay = a.delay.as_deref().map(parse_duration);
            if let Some(Ok(d)) = delay {
                tokio::time::sleep(d).await;
            }
            if a.reset {
                respond.send_reset(h2::Reason::INTERNAL_ERROR);
                return;
            }
            if a.grpc_status == 0 {
                let _ = reply(&mut respond, &a.body).await;
                return;
            }
            (a.grpc_status, a.grpc_message.clone())
        }
    };
    // A failed call is trailers-only: one HEADERS frame that ends the stream.
    let mut head = grpc_head().header("grpc-status", status.to_string());
    if !text.is_empty() {
        head = head.header("grpc-message", grpc_message_on_the_wire(&text));
    }
    if let Ok(head) = head.body(()) {
        let _ = respond.send_response(head, true);
    }
}

/// A successful call: headers, the message, then `grpc-status: 0` in the trailers.
async fn reply(respond: &mut SendResponse<Bytes>, message: &str) -> Result<()> {
    let head = grpc_head().body(())?;
    let mut stream = respond.send_response(head, false)?;
    stream.send_data(frame(message.as_bytes()), false)?;
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    stream.send_trailers(trailers)?;
    Ok(())
}

/// What an HTTP/2 client got: the status and headers (none if the stream was reset before
/// them), the body, the trailers, and whether the stream was reset after the headers.
#[derive(Clone, Debug, Default)]
pub struct H2Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub trailers: Vec<(String, String)>,
    pub reset: bool,
}

impl H2Response {
    /// A header's first value, from the headers, else the trailers (where a gRPC server puts
    /// `grpc-status` when the call has a body).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .chain(&self.trailers)
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// An HTTP/2 request: `pieces` are the body's DATA frames, written a little apart so each
/// reaches the proxy on its own; a `host` header given replaces `authority`.
#[derive(Clone, Copy, Debug)]
pub struct H2Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub authority: &'a str,
    pub headers: &'a [(&'a str, &'a str)],
    pub pieces: &'a [&'a [u8]],
}

/// Sends one request on its own connection (from `from`, default 127.0.0.1) to `listener`.
pub fn send(
    listener: SocketAddr,
    from: Option<IpAddr>,
    req: &H2Request<'_>,
    timeout: Duration,
) -> Result<H2Response> {
    let H2Request {
        method,
        path,
        authority,
        headers,
        pieces,
    } = *req;
    let socket = Socket::new(Domain::for_address(listener), Type::STREAM, None)?;
    if let Some(ip) = from {
        socket.bind(&SocketAddr::new(ip, 0).into())?;
    }
    socket
        .connect_timeout(&listener.into(), timeout)
        .with_context(|| format!("connecting to {listener}"))?;
    socket.set_nonblocking(true)?;
    let tcp: std::net::TcpStream = socket.into();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let authority = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("host"))
        .map_or(authority, |(_, v)| *v);
    let mut request = http::Request::builder()
        .method(method)
        .uri(format!("http://{authority}{path}"));
    for (name, value) in headers
        .iter()
        .filter(|(n, _)| !n.eq_ignore_ascii_case("host"))
    {
        request = request.header(name.to_ascii_lowercase(), *value);
    }
    let request = request
        .body(())
        .with_context(|| format!("an HTTP/2 request {method} {path}"))?;
    let pieces: Vec<Bytes> = pieces
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| Bytes::copy_from_slice(p))
        .collect();
    runtime.block_on(async move {
        tokio::time::timeout(timeout, exchange(tcp, request, pieces))
            .await
            .with_context(|| format!("no HTTP/2 answer within {timeout:?}"))?
    })
}

async fn exchange(
    tcp: std::net::TcpStream,
    request: http::Request<()>,
    pieces: Vec<Bytes>,
) -> Result<H2Response> {
    let tcp = tokio::net::TcpStream::from_std(tcp)?;
    let (client, connection) = h2::client::handshake(tcp)
        .await
        .context("the HTTP/2 handshake")?;
    let driver = tokio::spawn(connection);
    let mut client = client.ready().await.context("the HTTP/2 connection")?;
    let (response, mut body) = client
        .send_request(request, pieces.is_empty())
        .context("sending the HTTP/2 request")?;
    let last = pieces.len();
    for (i, piece) in pieces.into_iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        body.reserve_capacity(piece.len());
        body.send_data(piece, i + 1 == last)
            .context("sending the HTTP/2 request body")?;
    }
    let Ok(response) = response.await else {
        // Reset before any headers (a plugin closed the stream): no status, no headers.
        driver.abort();
        return Ok(H2Response::default());
    };
    let pairs = |map: &http::HeaderMap| -> Vec<(String, String)> {
        map.iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect()
    };
    let mut out = H2Response {
        status: response.status().as_u16(),
        headers: pairs(response.headers()),
        ..H2Response::default()
    };
    let mut stream = response.into_body();
    match read_body(&mut stream).await {
        Ok(body) => out.body = body,
        Err(_) => out.reset = true,
    }
    if !out.reset {
        match stream.trailers().await {
            Ok(Some(trailers)) => out.trailers = pairs(&trailers),
            Ok(None) => {}
            Err(_) => out.reset = true,
        }
    }
    driver.abort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answers(yaml: &str) -> BTreeMap<String, CallAnswer> {
        serde_json::from_value(serde_json::from_str(yaml).unwrap()).unwrap()
    }

    fn call(server: &GrpcServer, path: &str, message: &[u8]) -> H2Response {
        let framed = frame(message);
        let req = H2Request {
            method: "POST",
            path,
            authority: "grpc",
            headers: &[("content-type", "application/grpc"), ("te", "trailers")],
            pieces: &[&framed],
        };
        send(
            SocketAddr::from(([127, 0, 0, 1], server.port())),
            None,
            &req,
            Duration::from_secs(5),
        )
        .unwrap()
    }

    #[test]
    fn the_server_answers_each_method_as_scripted() {
        let server = GrpcServer::start(answers(
            r#"{"/a.S/Ok": {"body": "pong"}, "/a.S/No": {"grpc_status": 7, "grpc_message": "denied ä"}}"#,
        ))
        .unwrap();
        let ok = call(&server, "/a.S/Ok", b"ping");
        assert_eq!(ok.status, 200);
        assert_eq!(ok.header("content-type"), Some("application/grpc"));
        assert_eq!(ok.body, frame(b"pong").to_vec());
        assert_eq!(ok.trailers, vec![("grpc-status".into(), "0".into())]);

        let no = call(&server, "/a.S/No", b"");
        assert_eq!(no.header("grpc-status"), Some("7"));
        assert_eq!(no.header("grpc-message"), Some("denied %C3%A4"));
        assert!(no.body.is_empty() && no.trailers.is_empty());

        let unknown = call(&server, "/a.S/Other", b"x");
        assert_eq!(unknown.header("grpc-status"), Some("12"));
        assert_eq!(unknown.header("grpc-message"), Some("unknown method"));

        let seen: Vec<(String, Vec<u8>)> = server
            .calls()
            .into_iter()
            .map(|c| (c.path, c.message))
            .collect();
        assert_eq!(
            seen,
            vec![
                ("/a.S/Ok".into(), b"ping".to_vec()),
                ("/a.S/No".into(), Vec::new()),
                ("/a.S/Other".into(), b"x".to_vec()),
            ]
        );
    }

    #[test]
    fn a_reset_method_resets_the_stream_and_drop_ends_a_delay() {
        let server = GrpcServer::start(answers(
            r#"{"/a.S/Reset": {"reset": true}, "/a.S/Slow": {"delay": "60s"}}"#,
        ))
        .unwrap();
        let reset = call(&server, "/a.S/Reset", b"");
        assert_eq!(reset.status, 0, "{reset:?}");
        let port = server.port();
        let slow = std::thread::spawn(move || {
            let req = H2Request {
                method: "POST",
                path: "/a.S/Slow",
                authority: "grpc",
                headers: &[("content-type", "application/grpc")],
                pieces: &[b"\0\0\0\0\0"],
            };
            send(
                SocketAddr::from(([127, 0, 0, 1], port)),
                None,
                &req,
                Duration::from_secs(30),
            )
        });
        crate::wait_until(Duration::from_secs(5), "the slow call", || {
            Ok((!server.calls().is_empty()).then_some(()))
        })
        .unwrap();
        let begun = std::time::Instant::now();
        drop(server);
        // The connection ends with the server: the client's answer is an error or a reset.
        let got = slow.join().unwrap();
        assert!(got.map_or(true, |r| r.status == 0 || r.reset));
        assert!(begun.elapsed() < Duration::from_secs(10));
    }
}
