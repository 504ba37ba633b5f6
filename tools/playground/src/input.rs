//! Reading the functions' JSON inputs: forgiving where the page leaves a field out, precise
//! in the error when a field has the wrong shape.

use serde_json::Value;

pub fn str_of<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

pub fn u64_of(v: &Value, key: &str) -> Result<Option<u64>, String> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(n) => n
            .as_u64()
            .or_else(|| n.as_str().and_then(|s| s.trim().parse().ok()))
            .map(Some)
            .ok_or_else(|| format!("{key}: expected a whole number ≥ 0")),
    }
}

/// A configuration given as JSON text (as Envoy's `value` holds it) or as an object.
pub fn text_of(v: &Value, key: &str) -> Option<String> {
    match v.get(key)? {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// Headers as `[[name, value], ...]` or `{name: value}`, names lower-cased.
pub fn headers_of(v: &Value, key: &str) -> Result<Vec<(String, String)>, String> {
    let pair = |k: &str, v: &Value| -> Result<(String, String), String> {
        let value = match v {
            Value::String(s) => s.clone(),
            Value::Number(_) | Value::Bool(_) => v.to_string(),
            _ => return Err(format!("{key}: the value of {k} must be text")),
        };
        Ok((k.trim().to_ascii_lowercase(), value))
    };
    match v.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Object(m)) => m.iter().map(|(k, v)| pair(k, v)).collect(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item.as_array().map(Vec::as_slice) {
                Some([Value::String(k), v]) => pair(k, v),
                _ => Err(format!("{key}: each header is [name, value]")),
            })
            .filter(|h| !matches!(h, Ok((k, _)) if k.is_empty()))
            .collect(),
        Some(_) => Err(format!("{key}: expected [[name, value], ...]")),
    }
}
