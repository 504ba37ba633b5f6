//! RFC 9457 `application/problem+json` bodies, the one error format every plugin answers with.

use serde_json::{Map, Value};

pub const CONTENT_TYPE: &str = "application/problem+json";

/// A problem body with `type`, `title`, `status`, `detail` and any extension members.
pub fn problem_json(
    kind: &str,
    title: &str,
    status: u32,
    detail: &str,
    extra: Map<String, Value>,
) -> Vec<u8> {
    let mut m = Map::new();
    m.insert("type".into(), kind.into());
    m.insert("title".into(), title.into());
    m.insert("status".into(), status.into());
    m.insert("detail".into(), detail.into());
    m.extend(extra);
    serde_json::to_vec(&Value::Object(m)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn has_the_standard_members_and_extensions() {
        let mut extra = serde_json::Map::new();
        extra.insert("violated-policies".into(), serde_json::json!(["a"]));
        let body = super::problem_json("about:blank", "Too Many Requests", 429, "slow down", extra);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["status"], 429);
        assert_eq!(v["title"], "Too Many Requests");
        assert_eq!(v["violated-policies"][0], "a");
    }
}
