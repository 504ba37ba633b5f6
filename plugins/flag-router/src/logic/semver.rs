//! flagd's `sem_ver`: versions as Go's `golang.org/x/mod/semver` reads them, compared with
//! semantic versioning precedence.

use super::coercions::js_number;
use alloc::borrow::Cow;
use core::cmp::Ordering;
use serde_json::Value;

/// A version's text as flagd reads it: strings as they are, numbers printed (`1.2`).
fn version_text(v: &Value) -> Option<Cow<'_, str>> {
    match v {
        Value::String(s) => Some(Cow::Borrowed(s)),
        Value::Number(n) => n.as_f64().map(|f| Cow::Owned(js_number(f))),
        _ => None,
    }
}

/// A semantic version as Go's `golang.org/x/mod/semver` (which flagd uses) accepts it: an
/// optional `v`/`V`, `MAJOR[.MINOR[.PATCH]]` (missing parts are 0), and with all three parts an
/// optional `-pre.release` and `+build`.
struct Version<'a> {
    core: [&'a str; 3],
    /// Empty for a release.
    pre: &'a str,
}

fn parse_version(s: &str) -> Option<Version<'_>> {
    let is_num = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    let canonical = |p: &str| is_num(p) && (p.len() == 1 || !p.starts_with('0'));
    let ident =
        |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    let s = s.strip_prefix(['v', 'V']).unwrap_or(s);
    let (rest, build) = s.split_once('+').map_or((s, None), |(r, b)| (r, Some(b)));
    let (core, pre) = rest
        .split_once('-')
        .map_or((rest, None), |(c, p)| (c, Some(p)));
    let mut parts = core.split('.');
    let major = parts.next().filter(|p| canonical(p))?;
    let minor = parts.next();
    let patch = parts.next();
    let full = patch.is_some();
    if parts.next().is_some()
        || ![minor, patch].into_iter().flatten().all(canonical)
        || (!full && (pre.is_some() || build.is_some()))
        || !pre.is_none_or(|p| {
            p.split('.')
                .all(|i| ident(i) && (!is_num(i) || canonical(i)))
        })
        || !build.is_none_or(|b| b.split('.').all(ident))
    {
        return None;
    }
    Some(Version {
        core: [major, minor.unwrap_or("0"), patch.unwrap_or("0")],
        pre: pre.unwrap_or(""),
    })
}

/// Numeric identifiers without leading zeros compare by length, then digit by digit.
fn cmp_numeric(a: &str, b: &str) -> Ordering {
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

/// Semantic versioning 2.0 precedence (build metadata ignored).
fn cmp_version(x: &Version<'_>, y: &Version<'_>) -> Ordering {
    let core = x.core.iter().zip(&y.core).map(|(a, b)| cmp_numeric(a, b));
    let core = core.fold(Ordering::Equal, Ordering::then);
    core.then_with(|| match (x.pre, y.pre) {
        ("", "") => Ordering::Equal,
        ("", _) => Ordering::Greater,
        (_, "") => Ordering::Less,
        (a, b) => {
            let is_num = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
            let (mut i, mut j) = (a.split('.'), b.split('.'));
            loop {
                let o = match (i.next(), j.next()) {
                    (None, None) => return Ordering::Equal,
                    (None, _) => return Ordering::Less,
                    (_, None) => return Ordering::Greater,
                    (Some(p), Some(q)) => match (is_num(p), is_num(q)) {
                        (true, true) => cmp_numeric(p, q),
                        (true, false) => Ordering::Less,
                        (false, true) => Ordering::Greater,
                        _ => p.cmp(q),
                    },
                };
                if o.is_ne() {
                    return o;
                }
            }
        }
    })
}

/// flagd `sem_ver`: `[version, op, version]`; `^` matches the major version and `~` major and
/// minor, whichever side is newer (as flagd does). `null` when either side is not a version.
pub(super) fn sem_ver(a: &Value, op: &Value, b: &Value) -> Value {
    let (Some(a), Some(b)) = (version_text(a), version_text(b)) else {
        return Value::Null;
    };
    let (Some(x), Some(y)) = (parse_version(&a), parse_version(&b)) else {
        return Value::Null;
    };
    let ord = cmp_version(&x, &y);
    let same = |n: usize| x.core.iter().zip(&y.core).take(n).all(|(p, q)| p == q);
    Value::Bool(match op.as_str().unwrap_or("") {
        "=" => ord.is_eq(),
        "!=" => ord.is_ne(),
        "<" => ord.is_lt(),
        "<=" => ord.is_le(),
        ">" => ord.is_gt(),
        ">=" => ord.is_ge(),
        "^" => same(1),
        "~" => same(2),
        _ => return Value::Null,
    })
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use serde_json::{json, Value};

    #[test]
    fn sem_ver_compares_with_semver_precedence() {
        let t = |a: Value, op: &str, b: Value| run(json!({"sem_ver": [a, op, b]}), &json!({}));
        let yes = [
            ("1.2.3", "=", "1.2.3"),
            ("v1.2.3", "=", "1.2.3"),
            ("V1.2.3", "=", "v1.2.3"),
            ("1.2", "=", "1.2.0"),
            ("1", "=", "1.0.0"),
            ("1.0.0+build.5", "=", "1.0.0"),
            ("1.2.3", "!=", "1.2.4"),
            ("1.2.3", "<", "1.2.4"),
            ("1.2.3", "<=", "1.2.3"),
            ("1.10.0", ">", "1.9.0"),
            ("10.0.0", ">", "9.99.99"),
            ("2.0.0", ">=", "2.0.0"),
            ("100000000000000000000.0.0", ">", "99999999999999999999.0.0"),
            // The semver 2.0 pre-release chain.
            ("1.0.0-alpha", "<", "1.0.0-alpha.1"),
            ("1.0.0-alpha.1", "<", "1.0.0-alpha.beta"),
            ("1.0.0-alpha.beta", "<", "1.0.0-beta"),
            ("1.0.0-beta", "<", "1.0.0-beta.2"),
            ("1.0.0-beta.2", "<", "1.0.0-beta.11"),
            ("1.0.0-beta.11", "<", "1.0.0-rc.1"),
            ("1.0.0-rc.1", "<", "1.0.0"),
            ("1.0.0-x-y", ">", "1.0.0-x"),
            // flagd: `^` matches the major and `~` major.minor, in either direction.
            ("1.2.3", "^", "1.5.6"),
            ("1.5.6", "^", "1.2.3"),
            ("1.2.3", "~", "1.2.6"),
            ("1.2.3-alpha", "~", "1.2.0"),
        ];
        for (a, op, b) in yes {
            assert_eq!(t(json!(a), op, json!(b)), json!(true), "{a} {op} {b}");
        }
        let no = [
            ("1.2.3", "=", "1.2.4"),
            ("1.2.3", ">", "1.2.3"),
            ("1.0.0", "<", "1.0.0-rc.1"),
            ("2.2.3", "^", "1.2.3"),
            ("1.3.3", "~", "1.2.6"),
            ("1.0.0+a", "<", "1.0.0+b"),
        ];
        for (a, op, b) in no {
            assert_eq!(t(json!(a), op, json!(b)), json!(false), "{a} {op} {b}");
        }
        assert_eq!(t(json!(1.2), "=", json!("1.2")), json!(true));
        assert_eq!(t(json!(2), ">", json!("1.9.9")), json!(true));
    }

    #[test]
    fn sem_ver_on_a_non_version_is_null_like_flagd() {
        let rule = json!({"sem_ver": [{"var": "v"}, ">=", "1.0.0"]});
        for v in [
            json!("01.0.0"),
            json!("1.2.3.4"),
            json!("1.2-pre"),
            json!("1.0.0-"),
            json!("1.0.0-01"),
            json!("1.0.0+"),
            json!("1.0.0-a..b"),
            json!("vv1.0.0"),
            json!("1.0.0 "),
            json!("latest"),
            json!(true),
            json!(null),
            json!([1]),
        ] {
            assert_eq!(run(rule.clone(), &json!({"v": v})), json!(null), "{v}");
        }
        assert_eq!(run(rule.clone(), &json!({})), json!(null));
        // An expression operator that is not a comparison is null too.
        let op = json!({"sem_ver": ["1.0.0", {"var": "op"}, "1.0.0"]});
        assert_eq!(run(op, &json!({"op": "=="})), json!(null));
        // Falsy: an `if` takes its else branch, as in flagd.
        let guarded = json!({"if": [rule, "new", "old"]});
        assert_eq!(run(guarded.clone(), &json!({"v": "bogus"})), json!("old"));
        assert_eq!(run(guarded, &json!({"v": "1.4.0"})), json!("new"));
    }

    #[test]
    fn malformed_sem_ver_is_null_like_flagd_not_a_load_error() {
        // flagd evaluates each of these to null: an `if` takes its else branch, and a
        // flag whose targeting is null gets its defaultVariant.
        for logic in [
            json!({"sem_ver": ["1.0.0", "===", "1.0.0"]}),
            json!({"sem_ver": ["1.0.0", "=>", "1.0.0"]}),
            json!({"sem_ver": ["1.0.0", 1, "1.0.0"]}),
            json!({"sem_ver": ["2.0.0.0", "=", "2.0.0"]}),
            json!({"sem_ver": ["invalid", "=", "1.0.0"]}),
            json!({"sem_ver": [true, "=", "1.0.0"]}),
            json!({"sem_ver": ["1.0.0", "="]}),
            json!({"sem_ver": ["1.0.0", "=", "1.0.0", "1.0.0"]}),
            json!({"sem_ver": []}),
            json!({"sem_ver": "1.0.0"}),
        ] {
            assert_eq!(run(logic.clone(), &json!({})), json!(null), "{logic}");
            let guarded = json!({"if": [logic.clone(), "new", "old"]});
            assert_eq!(run(guarded, &json!({})), json!("old"), "{logic}");
        }
    }
}
