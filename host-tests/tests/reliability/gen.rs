//! Seeded generation of fuzz cases: request lifecycles and configs as plain data, so that a
//! failing case can be saved as JSON and replayed as a regression test.

use host_tests::Upstream;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// SplitMix64: tiny, fast, and the same sequence on every machine for a seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// A header value: mostly printable, sometimes obs-text (not UTF-8), sometimes very long.
pub fn value(rng: &mut Rng) -> Vec<u8> {
    let len = match rng.below(10) {
        0 => 0,
        1 => rng.range(1000, 9000) as usize,
        _ => rng.range(1, 24) as usize,
    };
    let binary = rng.chance(20);
    (0..len)
        .map(|_| {
            if binary && rng.chance(30) {
                rng.range(0x80, 0xff) as u8
            } else if rng.chance(3) {
                b'\t'
            } else {
                rng.range(0x20, 0x7e) as u8
            }
        })
        .collect()
}

/// A header name Envoy's codec accepts (lower-case token characters).
pub fn name(rng: &mut Rng) -> Vec<u8> {
    const T: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789-_!#$%&'*+.^`|~";
    let len = if rng.chance(5) {
        rng.range(100, 400)
    } else {
        rng.range(1, 16)
    };
    (0..len).map(|_| *rng.pick(T)).collect()
}

pub fn body(rng: &mut Rng, max: u64) -> Vec<Vec<u8>> {
    let total = match rng.below(8) {
        0 => 0,
        1 => rng.range(max / 2, max * 2),
        _ => rng.range(1, 64),
    } as usize;
    let bytes: Vec<u8> = (0..total).map(|_| rng.next() as u8).collect();
    let pieces = rng.range(1, 6) as usize;
    let size = bytes.len().div_ceil(pieces).max(1);
    bytes.chunks(size).map(<[u8]>::to_vec).collect()
}

pub fn client(rng: &mut Rng) -> String {
    match rng.below(4) {
        0 => format!("[2001:db8::{:x}]:4000", rng.below(50)),
        1 => format!("[::ffff:10.0.0.{}]:4000", rng.below(4)),
        _ => format!(
            "10.0.{}.{}:{}",
            rng.below(3),
            rng.below(10),
            rng.range(1024, 65535)
        ),
    }
}

/// One request as data.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Req {
    pub method: String,
    pub path: String,
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
    pub chunks: Vec<Vec<u8>>,
    pub from: String,
}

impl Req {
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == name.as_bytes())
            .map(|(_, v)| v.as_slice())
    }
    pub fn to_request(&self) -> host_tests::Request {
        let mut r = host_tests::Request::new(&self.method, &self.path)
            .chunks(self.chunks.clone())
            .from(&self.from);
        for (k, v) in &self.headers {
            r = r.header_bytes(k, v);
        }
        r
    }
}

/// How the application answers one request.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Up {
    Respond {
        status: u16,
        headers: Vec<(String, String)>,
        chunks: Vec<Vec<u8>>,
        delay_ms: u64,
    },
    Reset,
    Refused,
    Hang,
}

impl Up {
    /// The harness upstream's answer: a response ends its body with `token`, so that a kept or
    /// replayed answer is told from a fresh one (the harness sets `content-length` itself).
    pub fn answer(self, token: &str) -> Upstream {
        match self {
            Up::Reset => Upstream::Reset,
            Up::Refused => Upstream::Refused,
            Up::Hang => Upstream::Hang,
            Up::Respond {
                status,
                headers,
                mut chunks,
                delay_ms,
            } => {
                match chunks.last_mut() {
                    Some(last) => last.extend_from_slice(token.as_bytes()),
                    None => chunks.push(token.as_bytes().to_vec()),
                }
                let mut u = Upstream::status(status).chunks(chunks);
                for (k, v) in &headers {
                    if k != "content-length" {
                        u = u.header(k, v);
                    }
                }
                u.delay(Duration::from_millis(delay_ms))
            }
        }
    }
}

pub fn upstream(rng: &mut Rng, header_pool: &[(&str, &[&str])]) -> Up {
    match rng.below(20) {
        0 => Up::Reset,
        1 => Up::Refused,
        2 => Up::Hang,
        _ => {
            let status = *rng.pick(&[
                200, 200, 200, 201, 204, 206, 301, 404, 409, 429, 500, 502, 503, 504,
            ]);
            let mut headers = Vec::new();
            for (name, values) in header_pool {
                if rng.chance(35) {
                    headers.push((name.to_string(), rng.pick(values).to_string()));
                }
            }
            let delay_ms = if rng.chance(10) {
                rng.range(1, 20_000)
            } else {
                0
            };
            Up::Respond {
                status,
                headers,
                chunks: body(rng, 4096),
                delay_ms,
            }
        }
    }
}

/// One step of a lifecycle sequence.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Op {
    Send(Req, Up),
    /// Two requests in flight at once on both workers, interleaved at callback boundaries by
    /// the schedule's bits.
    Pair(Req, Req, Up, u64),
    /// The client goes away after this many callbacks.
    Abort(Req, Up, u32),
    /// The clock jumps.
    Advance(u64),
}

/// A whole case: a plugin, its configuration text and the lifecycles.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Case {
    pub plugin: String,
    pub seed: u64,
    pub config: String,
    pub ops: Vec<Op>,
}

/// Breaks a valid JSON config in one random way (or, rarely, leaves it valid).
pub fn mutate(rng: &mut Rng, config: &serde_json::Value) -> String {
    let mut v = config.clone();
    match rng.below(6) {
        0 => {
            let text = v.to_string();
            let cut = rng.below(text.len() as u64) as usize;
            return text.get(..cut).unwrap_or("").to_string();
        }
        1 => {
            let bytes: Vec<u8> = (0..rng.range(0, 40)).map(|_| rng.next() as u8).collect();
            return String::from_utf8_lossy(&bytes).into_owned();
        }
        _ => {
            let mut paths = Vec::new();
            collect_paths(&v, &mut Vec::new(), &mut paths);
            if let Some(path) = paths.get(rng.below(paths.len() as u64) as usize).cloned() {
                if let Some(node) = node_at(&mut v, &path) {
                    *node = match rng.below(7) {
                        0 => serde_json::json!(null),
                        1 => serde_json::json!(-1),
                        2 => serde_json::json!("7 fortnights"),
                        3 => serde_json::json!([]),
                        4 => serde_json::json!({"unknownField": true}),
                        5 => serde_json::json!(1e300),
                        _ => serde_json::json!(u64::MAX),
                    };
                }
            }
        }
    }
    v.to_string()
}

fn collect_paths(v: &serde_json::Value, at: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    out.push(at.clone());
    match v {
        serde_json::Value::Object(m) => {
            for (k, c) in m {
                at.push(k.clone());
                collect_paths(c, at, out);
                at.pop();
            }
        }
        serde_json::Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                at.push(i.to_string());
                collect_paths(c, at, out);
                at.pop();
            }
        }
        _ => {}
    }
}

fn node_at<'a>(v: &'a mut serde_json::Value, path: &[String]) -> Option<&'a mut serde_json::Value> {
    let mut cur = v;
    for p in path {
        cur = match cur {
            serde_json::Value::Object(m) => m.get_mut(p)?,
            serde_json::Value::Array(a) => a.get_mut(p.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}
