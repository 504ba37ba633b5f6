//! Durations as users write them in plugin configs: `"250ms"`, `"60s"`, `"5m"`, `"24h"`.

use alloc::format;
use alloc::string::String;
use core::time::Duration;

/// Parses `<integer><unit>` with unit `ms`, `s`, `m` or `h`. Zero is allowed; callers that need a
/// positive duration check it where the field is known.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("\"{text}\" has no unit (use ms, s, m or h)"))?;
    let (digits, unit) = t.split_at(split);
    if digits.is_empty() {
        return Err(format!("\"{text}\" must start with a whole number"));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("\"{text}\" is too large"))?;
    let ms_per = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => {
            return Err(format!(
                "\"{text}\" has unknown unit \"{unit}\" (use ms, s, m or h)"
            ))
        }
    };
    n.checked_mul(ms_per)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("\"{text}\" is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_unit() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn rejects_what_a_user_could_mistype_with_a_reason() {
        assert!(parse_duration("60").unwrap_err().contains("no unit"));
        assert!(parse_duration("1.5s").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("s").unwrap_err().contains("whole number"));
        assert!(parse_duration("10d")
            .unwrap_err()
            .contains("unknown unit \"d\""));
        assert!(parse_duration("-1s").unwrap_err().contains("whole number"));
        assert!(parse_duration("99999999999999999999h")
            .unwrap_err()
            .contains("too large"));
        assert!(parse_duration("9999999999999999h")
            .unwrap_err()
            .contains("too large"));
    }
}
