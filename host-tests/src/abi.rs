//! Numeric values of proxy-wasm ABI 0.2.1, as the guest SDKs and Envoy use them.

/// `WasmResult` values returned by every hostcall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Status {
    Ok = 0,
    NotFound = 1,
    BadArgument = 2,
    SerializationFailure = 3,
    ParseFailure = 4,
    BadExpression = 5,
    InvalidMemoryAccess = 6,
    Empty = 7,
    CasMismatch = 8,
    ResultMismatch = 9,
    InternalFailure = 10,
    BrokenConnection = 11,
    Unimplemented = 12,
}

impl Status {
    pub fn code(self) -> u32 {
        self as u32
    }
}

pub mod map {
    pub const REQUEST_HEADERS: u32 = 0;
    pub const REQUEST_TRAILERS: u32 = 1;
    pub const RESPONSE_HEADERS: u32 = 2;
    pub const RESPONSE_TRAILERS: u32 = 3;
    pub const GRPC_INITIAL_METADATA: u32 = 4;
    pub const GRPC_TRAILING_METADATA: u32 = 5;
    pub const CALL_RESPONSE_HEADERS: u32 = 6;
    pub const CALL_RESPONSE_TRAILERS: u32 = 7;
}

pub mod buffer {
    pub const REQUEST_BODY: u32 = 0;
    pub const RESPONSE_BODY: u32 = 1;
    pub const DOWNSTREAM_DATA: u32 = 2;
    pub const UPSTREAM_DATA: u32 = 3;
    pub const CALL_RESPONSE_BODY: u32 = 4;
    pub const GRPC_RECEIVE: u32 = 5;
    pub const VM_CONFIGURATION: u32 = 6;
    pub const PLUGIN_CONFIGURATION: u32 = 7;
    pub const CALL_DATA: u32 = 8;
}

pub mod stream {
    pub const REQUEST: u32 = 0;
    pub const RESPONSE: u32 = 1;
    pub const DOWNSTREAM: u32 = 2;
    pub const UPSTREAM: u32 = 3;
}

/// Values a header/data/trailer callback returns. Envoy turns a headers `Pause` into
/// StopAllIterationAndWatermark, so body callbacks wait for the continue.
pub mod action {
    pub const CONTINUE: u32 = 0;
    pub const PAUSE: u32 = 1;
}

/// Log levels, shared by `proxy_log` and the harness's log records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LogLevel {
    Trace = 0,
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
    Critical = 5,
}

impl LogLevel {
    pub fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            0 => Self::Trace,
            1 => Self::Debug,
            2 => Self::Info,
            3 => Self::Warn,
            4 => Self::Error,
            5 => Self::Critical,
            _ => return None,
        })
    }
}

/// Metric kinds of `proxy_define_metric`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricType {
    Counter,
    Gauge,
    Histogram,
}

impl MetricType {
    pub fn from_u32(v: u32) -> Option<Self> {
        match v {
            0 => Some(Self::Counter),
            1 => Some(Self::Gauge),
            2 => Some(Self::Histogram),
            _ => None,
        }
    }
}

/// Serialises header pairs in the ABI's map format: count, (key len, value len)*, then each
/// key and value followed by a NUL.
pub fn encode_map(pairs: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut size = 4 + pairs.len() * 8;
    for (k, v) in pairs {
        size += k.len() + v.len() + 2;
    }
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k);
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

/// Parses the ABI's map format; `None` when the bytes do not describe a well-formed map.
pub fn decode_map(bytes: &[u8]) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    let word = |at: usize| -> Option<usize> {
        let b = bytes.get(at..at + 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let count = word(0)?;
    // Each pair needs at least 10 bytes: refuse counts the buffer cannot hold.
    if count > bytes.len() / 10 + 1 {
        return None;
    }
    let mut sizes = Vec::with_capacity(count);
    for i in 0..count {
        sizes.push((word(4 + i * 8)?, word(8 + i * 8)?));
    }
    let mut at = 4 + count * 8;
    let mut pairs = Vec::with_capacity(count);
    for (kl, vl) in sizes {
        let k = bytes.get(at..at.checked_add(kl)?)?.to_vec();
        at = at.checked_add(kl + 1)?;
        let v = bytes.get(at..at.checked_add(vl)?)?.to_vec();
        at = at.checked_add(vl + 1)?;
        pairs.push((k, v));
    }
    if at > bytes.len() {
        return None;
    }
    Some(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_round_trips_and_rejects_truncation() {
        let pairs = vec![
            (b":path".to_vec(), b"/a".to_vec()),
            (b"x".to_vec(), Vec::new()),
        ];
        let bytes = encode_map(&pairs);
        assert_eq!(decode_map(&bytes).unwrap(), pairs);
        assert!(decode_map(&bytes[..bytes.len() - 3]).is_none());
        assert!(decode_map(&[0xff, 0xff, 0xff, 0x7f]).is_none());
    }
}
