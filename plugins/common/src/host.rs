//! The few hostcall translations every plugin's glue needs, written once.

use crate::request::{client_ip, RequestView};
use proxy_wasm::hostcalls;
use proxy_wasm::types::MapType;
use std::time::UNIX_EPOCH;

/// The request being filtered, read through hostcalls. Valid only during
/// `on_http_request_headers` (Envoy refuses request-header reads later on).
pub struct HostRequest;

impl RequestView for HostRequest {
    fn header(&self, name: &str) -> Option<Vec<u8>> {
        hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name)
            .ok()
            .flatten()
    }
    fn method(&self) -> Vec<u8> {
        self.header(":method").unwrap_or_default()
    }
    fn raw_path(&self) -> Vec<u8> {
        self.header(":path").unwrap_or_default()
    }
    fn client_ip(&self) -> Option<String> {
        let raw = hostcalls::get_property(vec!["source", "address"]).ok()??;
        client_ip(&String::from_utf8_lossy(&raw))
    }
}

/// The host's wall clock in nanoseconds since the epoch (0 if the host cannot say).
pub fn now_ns() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .and_then(|d| u64::try_from(d.as_nanos()).ok())
        .unwrap_or(0)
}

/// The plugin's configuration bytes (empty when none was given).
pub fn plugin_configuration() -> Vec<u8> {
    hostcalls::get_buffer(
        proxy_wasm::types::BufferType::PluginConfiguration,
        0,
        usize::MAX,
    )
    .ok()
    .flatten()
    .unwrap_or_default()
}

/// Follows Envoy's log level for the `wasm` component (read at configure time), so debug
/// lines cost nothing unless Envoy would print them.
pub fn follow_host_log_level() {
    if let Ok(level) = hostcalls::get_log_level() {
        proxy_wasm::set_log_level(level);
    }
}

/// The filter's `root_id` (empty when not configured).
pub fn root_id() -> String {
    hostcalls::get_property(vec!["plugin_root_id"])
        .ok()
        .flatten()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}
