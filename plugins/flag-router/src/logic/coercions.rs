//! JavaScript's conversions as json-logic-js applies them: truthiness, `==` and `===`, `<`,
//! `String(v)`, `Number(v)`, `parseFloat` and `substr`.

use alloc::borrow::Cow;
use alloc::format;
use alloc::string::String;
use alloc::string::ToString;
use alloc::vec::Vec;
use serde_json::Value;

/// JsonLogic truthiness: `false`, `null`, `0`, `""` and `[]` are false.
pub(super) fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(_) => true,
    }
}

/// JavaScript `===`: arrays and objects are compared by reference in JavaScript, so never equal.
pub(super) fn strict_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(_) | Value::Object(_), _) => false,
        _ => a == b,
    }
}

/// JavaScript `==`.
pub(super) fn loose_eq(a: &Value, b: &Value) -> bool {
    use Value::{Array, Null, Object};
    match (a, b) {
        (Null, Null) => true,
        (Null, _) | (_, Null) | (Array(_) | Object(_), Array(_) | Object(_)) => false,
        (Array(_) | Object(_), _) => loose_eq(&Value::String(js_string(a)), b),
        (_, Array(_) | Object(_)) => loose_eq(a, &Value::String(js_string(b))),
        (Value::String(x), Value::String(y)) => x == y,
        _ => to_number(a) == to_number(b),
    }
}

/// JavaScript `<` (or `<=`): strings compare as strings, anything else as numbers.
pub(super) fn less(a: &Value, b: &Value, or_eq: bool) -> bool {
    // Lists and objects compare as their text; strings as they are, without a copy.
    fn text(v: &Value) -> Option<Cow<'_, str>> {
        match v {
            Value::String(_) | Value::Array(_) | Value::Object(_) => Some(js_str(v)),
            _ => None,
        }
    }
    if let (Some(x), Some(y)) = (text(a), text(b)) {
        return if or_eq { x <= y } else { x < y };
    }
    let (x, y) = (to_number(a), to_number(b));
    if or_eq {
        x <= y
    } else {
        x < y
    }
}

/// JavaScript `String(v)`.
pub(super) fn js_string(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => js_number(n.as_f64().unwrap_or(f64::NAN)),
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(join_part).collect::<Vec<_>>().join(","),
        Value::Object(_) => "[object Object]".into(),
    }
}

/// `String(v)`, borrowing a string.
pub(super) fn js_str(v: &Value) -> Cow<'_, str> {
    match v {
        Value::String(s) => Cow::Borrowed(s),
        other => Cow::Owned(js_string(other)),
    }
}

/// An element as `Array.prototype.join` writes it: `null` is empty.
pub(super) fn join_part(v: &Value) -> String {
    if v.is_null() {
        String::new()
    } else {
        js_string(v)
    }
}

/// Beyond this every finite f64 is whole.
const ALL_WHOLE: f64 = 4_503_599_627_370_496.0; // 2^52

/// `f.fract() == 0.0`, which core lacks (the modules are `no_std`): false for NaN and ±∞.
pub(super) fn is_whole(f: f64) -> bool {
    f.is_finite() && (f.abs() >= ALL_WHOLE || (f as i64) as f64 == f)
}

/// `f.trunc()`, JavaScript's `Math.trunc`: toward zero, keeping the sign of a zero.
pub(super) fn trunc(f: f64) -> f64 {
    if !f.is_finite() || f.abs() >= ALL_WHOLE {
        return f;
    }
    ((f as i64) as f64).copysign(f)
}

/// JavaScript's `Number.prototype.toString()`: `1` not `1.0`, plain from 1e-6 up to 1e21 and
/// exponents (`1e+21`, `1e-7`) outside. The shortest round-trip digits come from serde_json's
/// formatter, which the module carries anyway (core's float formatting would add its own).
pub(super) fn js_number(f: f64) -> String {
    if is_whole(f) && f.abs() < 9.0e15 {
        return (f as i64).to_string();
    }
    if !f.is_finite() {
        let s = if f.is_nan() { "NaN" } else { "Infinity" };
        return if f < 0.0 { format!("-{s}") } else { s.into() };
    }
    // serde_json writes `-d.ddd`, `ddd.0` or `d.ddde±x`: take sign, digits and exponent apart.
    let text = edge_json::to_text(&Value::from(f));
    let (sign, body) = text
        .strip_prefix('-')
        .map_or(("", text.as_str()), |b| ("-", b));
    let (mantissa, exp) = body.split_once(['e', 'E']).unwrap_or((body, "0"));
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let all: String = int.chars().chain(frac.chars()).collect();
    let digits = all.trim_start_matches('0');
    // The decimal point sits after `point` digits (negative: that many zeros before them).
    let point =
        int.len() as i64 + exp.parse::<i64>().unwrap_or(0) - (all.len() - digits.len()) as i64;
    let digits = digits.trim_end_matches('0');
    let k = digits.len() as i64;
    let zeros = |n: i64| "0".repeat(n.max(0) as usize);
    let body = if (k..=21).contains(&point) {
        format!("{digits}{}", zeros(point - k))
    } else if (1..=21).contains(&point) {
        let (a, b) = digits
            .split_at_checked(point as usize)
            .unwrap_or((digits, ""));
        format!("{a}.{b}")
    } else if (-5..=0).contains(&point) {
        format!("0.{}{digits}", zeros(-point))
    } else {
        let (a, b) = digits.split_at_checked(1).unwrap_or((digits, ""));
        let dot = if b.is_empty() { "" } else { "." };
        let e = point - 1;
        format!("{a}{dot}{b}e{}{e}", if e < 0 { "" } else { "+" })
    };
    format!("{sign}{body}")
}

/// A JSON number for an arithmetic result: whole numbers as integers, NaN and ±Infinity (which
/// JSON cannot hold) as `null`.
pub(super) fn num(f: f64) -> Value {
    if is_whole(f) && f.abs() < 9.0e15 {
        Value::from(f as i64)
    } else {
        Value::from(f)
    }
}

/// JavaScript `Number(v)`.
pub(super) fn to_number(v: &Value) -> f64 {
    let s = match v {
        Value::Null => return 0.0,
        Value::Bool(b) => return f64::from(u8::from(*b)),
        Value::Number(n) => return n.as_f64().unwrap_or(f64::NAN),
        Value::String(s) => s.trim(),
        _ => return to_number(&Value::String(js_string(v))),
    };
    if s.is_empty() {
        return 0.0;
    }
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16).map_or(f64::NAN, |h| h as f64);
    }
    match float_prefix(s) {
        (f, len) if len == s.len() => f,
        _ => f64::NAN,
    }
}

/// JavaScript `parseFloat(v)`: the longest decimal prefix, NaN without one.
pub(super) fn parse_float(v: &Value) -> f64 {
    match v {
        Value::Number(n) => n.as_f64().unwrap_or(f64::NAN),
        _ => float_prefix(js_str(v).trim_start()).0,
    }
}

/// The longest prefix of `s` that is a JavaScript decimal literal (or `Infinity`), and its length.
/// The digits are rewritten as JSON and read by serde_json's number parser, the one that reads
/// the flag file (core's float parser would add its own tables to the module); a value beyond
/// f64 range is NaN here where JavaScript says Infinity.
fn float_prefix(s: &str) -> (f64, usize) {
    let b = s.as_bytes();
    let digits = |i: usize| {
        b.get(i..)
            .map_or(0, |r| r.iter().take_while(|c| c.is_ascii_digit()).count())
    };
    let neg = b.first() == Some(&b'-');
    let mut i = usize::from(neg || b.first() == Some(&b'+'));
    if s.get(i..).is_some_and(|r| r.starts_with("Infinity")) {
        let inf = if neg {
            f64::NEG_INFINITY
        } else {
            f64::INFINITY
        };
        return (inf, i + 8);
    }
    let int = s.get(i..i + digits(i)).unwrap_or("");
    i += int.len();
    let mut frac = "";
    if b.get(i) == Some(&b'.') {
        frac = s.get(i + 1..i + 1 + digits(i + 1)).unwrap_or("");
        if !int.is_empty() || !frac.is_empty() {
            i += 1 + frac.len();
        }
    }
    if int.is_empty() && frac.is_empty() {
        return (f64::NAN, 0);
    }
    let int = match int.trim_start_matches('0') {
        "" => "0",
        t => t,
    };
    let mut json = format!("{}{int}", if neg { "-" } else { "" });
    if !frac.is_empty() {
        json = format!("{json}.{frac}");
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        let j = i + 1 + usize::from(matches!(b.get(i + 1), Some(b'+' | b'-')));
        let exp = digits(j);
        if exp > 0 {
            json.push_str(s.get(i..j + exp).unwrap_or(""));
            i = j + exp;
        }
    }
    // edge-json's parser: a `Number` parsed here would compile a second one.
    let f = edge_json::from_slice(json.as_bytes())
        .ok()
        .and_then(|n| n.as_f64());
    (f.unwrap_or(f64::NAN), i)
}

/// json-logic-js `substr`: JavaScript's `String.prototype.substr`, plus a negative length that
/// leaves that many characters off the end. Counts characters (JavaScript counts UTF-16 units).
pub(super) fn substr(src: &Value, start: &Value, len: Option<&Value>) -> Value {
    let int = |v: &Value| {
        let f = to_number(v);
        if f.is_nan() {
            0.0
        } else {
            trunc(f)
        }
    };
    let s = js_string(src);
    let n = s.chars().count() as f64;
    let start = match int(start) {
        st if st < 0.0 => (n + st).max(0.0),
        st => st.min(n),
    };
    let rest = n - start;
    let take = match len.map(int) {
        None => rest,
        Some(l) if l < 0.0 => (rest + l).max(0.0),
        Some(l) => l.min(rest),
    };
    Value::String(s.chars().skip(start as usize).take(take as usize).collect())
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::{is_whole, trunc};
    use serde_json::json;

    /// The modules' own `fract() == 0.0` and `trunc()` (core has neither) agree with std's.
    #[test]
    fn whole_numbers_and_truncation_match_std() {
        let cases = [
            0.0,
            -0.0,
            0.5,
            -0.5,
            1.0,
            -1.0,
            2.75,
            -2.75,
            1e15 + 0.5,
            4503599627370495.5,
            4503599627370496.0,
            -4503599627370497.0,
            1e300,
            -1e-300,
            f64::MAX,
            f64::MIN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
        ];
        for f in cases {
            assert_eq!(is_whole(f), f.fract() == 0.0, "{f}");
            let (ours, std) = (trunc(f), f.trunc());
            assert!(
                ours.to_bits() == std.to_bits() || (ours.is_nan() && std.is_nan()),
                "{f}: {ours} against {std}"
            );
        }
    }

    #[test]
    fn loose_equality_coerces_like_javascript() {
        table(
            json!({}),
            &[
                (json!({"==": [1, 1]}), json!(true)),
                (json!({"==": [1, 1.0]}), json!(true)),
                (json!({"==": [1, "1"]}), json!(true)),
                (json!({"==": [" 1 ", 1]}), json!(true)),
                (json!({"==": ["0x10", 16]}), json!(true)),
                (json!({"==": [0, false]}), json!(true)),
                (json!({"==": ["", 0]}), json!(true)),
                (json!({"==": [true, "1"]}), json!(true)),
                (json!({"==": [true, "true"]}), json!(false)),
                (json!({"==": [null, null]}), json!(true)),
                (json!({"==": [null, false]}), json!(false)),
                (json!({"==": [null, 0]}), json!(false)),
                (json!({"==": ["abc", "abc"]}), json!(true)),
                (json!({"==": ["abc", "ABC"]}), json!(false)),
                (json!({"==": ["1e3", 1000]}), json!(true)),
                (json!({"==": ["1x", 1]}), json!(false)),
                (json!({"==": ["+.5e1", 5]}), json!(true)),
                (json!({"==": ["5.", 5]}), json!(true)),
                (json!({"==": ["00012", 12]}), json!(true)),
                (json!({"==": ["-0x10", -16]}), json!(false)),
                (json!({"==": ["1_000", 1000]}), json!(false)),
                (json!({"==": ["inf", {"var": "nope"}]}), json!(false)),
                (json!({"==": [[1], "1"]}), json!(true)),
                (json!({"==": [[1, 2], "1,2"]}), json!(true)),
                (json!({"==": [[], false]}), json!(true)),
                (json!({"==": [[1], [1]]}), json!(false)),
                (
                    json!({"==": [{"var": "o"}, "[object Object]"]}),
                    json!(false),
                ),
                (json!({"!=": [1, "2"]}), json!(true)),
                (json!({"!=": [1, "1"]}), json!(false)),
            ],
        );
        let data = json!({"o": {"k": 1}});
        assert_eq!(
            run(json!({"==": [{"var": "o"}, "[object Object]"]}), &data),
            json!(true)
        );
    }

    #[test]
    fn strict_equality_needs_same_type() {
        table(
            json!({}),
            &[
                (json!({"===": [1, 1.0]}), json!(true)),
                (json!({"===": [1, "1"]}), json!(false)),
                (json!({"===": [null, null]}), json!(true)),
                (json!({"===": [false, 0]}), json!(false)),
                (json!({"===": ["a", "a"]}), json!(true)),
                (json!({"===": [[1], [1]]}), json!(false)),
                (json!({"!==": [1, "1"]}), json!(true)),
                (json!({"!==": ["a", "a"]}), json!(false)),
            ],
        );
    }

    #[test]
    fn not_and_double_not_use_jsonlogic_truthiness() {
        let falsy = [json!(false), json!(null), json!(0), json!(""), json!([])];
        let truthy = [
            json!(true),
            json!(1),
            json!(-0.5),
            json!("0"),
            json!([0]),
            json!({}),
        ];
        for v in falsy {
            assert_eq!(run(json!({"!!": [v]}), &json!({})), json!(false), "{v}");
            assert_eq!(run(json!({"!": [v]}), &json!({})), json!(true), "{v}");
        }
        for v in truthy {
            assert_eq!(run(json!({"!!": [v]}), &json!({})), json!(true), "{v}");
            assert_eq!(run(json!({"!": [v]}), &json!({})), json!(false), "{v}");
        }
        assert_eq!(run(json!({"!": {"var": "x"}}), &json!({})), json!(true));
    }

    #[test]
    fn comparisons_coerce_and_support_between() {
        table(
            json!({"age": "42"}),
            &[
                (json!({"<": [1, 2]}), json!(true)),
                (json!({"<": [2, 1]}), json!(false)),
                (json!({"<": ["10", "9"]}), json!(true)),
                (json!({"<": [10, "9"]}), json!(false)),
                (json!({"<": ["a", "b"]}), json!(true)),
                (json!({"<": [null, 1]}), json!(true)),
                (json!({"<": ["abc", 1]}), json!(false)),
                (json!({">=": ["abc", 1]}), json!(false)),
                (json!({"<": [1, 2, 3]}), json!(true)),
                (json!({"<": [1, 1, 3]}), json!(false)),
                (json!({"<=": [1, 1, 3]}), json!(true)),
                (json!({"<=": [1, 4, 3]}), json!(false)),
                (json!({"<=": [2, 2]}), json!(true)),
                (json!({">": [2, "1"]}), json!(true)),
                (json!({">": [1, 1]}), json!(false)),
                (json!({">=": [1, 1]}), json!(true)),
                (json!({">": [[2], 1]}), json!(true)),
                (json!({">": [{"var": "age"}, 18]}), json!(true)),
                (json!({"<": [true, 2]}), json!(true)),
            ],
        );
    }

    #[test]
    fn cat_writes_values_like_javascript() {
        table(
            json!({"name": "ann"}),
            &[
                (json!({"cat": ["I love ", "pie"]}), json!("I love pie")),
                (json!({"cat": ["hi ", {"var": "name"}]}), json!("hi ann")),
                (
                    json!({"cat": [1, 1.5, true, null, [1, [2, null]]]}),
                    json!("11.5true1,2,"),
                ),
                (json!({"cat": [1.0, -0.0, 100]}), json!("10100")),
                (
                    json!({"cat": [{"+": [0.1, 0.2]}]}),
                    json!("0.30000000000000004"),
                ),
                (
                    json!({"cat": [1e21, " ", 1e-7, " ", 1.5e-7, " ", 0.000001]}),
                    json!("1e+21 1e-7 1.5e-7 0.000001"),
                ),
                (
                    json!({"cat": [123456789012.0, " ", 2.5e20]}),
                    json!("123456789012 250000000000000000000"),
                ),
                (
                    json!({"cat": [9.5e15, " ", 1.5e16, " ", 0.000123, " ", -1.5e-7, " ", 1e300]}),
                    json!("9500000000000000 15000000000000000 0.000123 -1.5e-7 1e+300"),
                ),
                (
                    json!({"cat": [-2.5, " ", 123.456, " ", -1e21]}),
                    json!("-2.5 123.456 -1e+21"),
                ),
                (json!({"cat": "solo"}), json!("solo")),
                (json!({"cat": []}), json!("")),
            ],
        );
    }

    #[test]
    fn substr_handles_negative_start_and_length() {
        table(
            json!({}),
            &[
                (json!({"substr": ["jsonlogic", 4]}), json!("logic")),
                (json!({"substr": ["jsonlogic", -5]}), json!("logic")),
                (json!({"substr": ["jsonlogic", 1, 3]}), json!("son")),
                (json!({"substr": ["jsonlogic", 4, -2]}), json!("log")),
                (json!({"substr": ["jsonlogic", -5, -10]}), json!("")),
                (json!({"substr": ["jsonlogic", 20]}), json!("")),
                (json!({"substr": ["jsonlogic", -20, 4]}), json!("json")),
                (json!({"substr": ["jsonlogic", "2", "2"]}), json!("on")),
                (json!({"substr": ["jsonlogic", 0, null]}), json!("")),
                (json!({"substr": ["héllo", 1, 3]}), json!("éll")),
                (json!({"substr": [12345, 1, 2]}), json!("23")),
                (json!({"substr": [null, 0, 2]}), json!("nu")),
            ],
        );
    }

    #[test]
    fn arithmetic_coerces_and_unrepresentable_results_are_null() {
        table(
            json!({"n": "4"}),
            &[
                (json!({"+": [1, 2]}), json!(3)),
                (json!({"+": [1, "2", "3.5px"]}), json!(6.5)),
                (json!({"+": []}), json!(0)),
                (json!({"+": "3"}), json!(3)),
                (json!({"+": [1, "x"]}), json!(null)),
                (json!({"+": [1, null]}), json!(null)),
                (json!({"-": [5, 2]}), json!(3)),
                (json!({"-": ["5", "2"]}), json!(3)),
                (json!({"-": 2}), json!(-2)),
                (json!({"-": [{"var": "n"}]}), json!(-4)),
                (json!({"*": [2, "3"]}), json!(6)),
                (json!({"*": [2, 3, 0.5]}), json!(3)),
                (json!({"/": [7, 2]}), json!(3.5)),
                (json!({"/": [1, 0]}), json!(null)),
                (json!({"%": [7, 3]}), json!(1)),
                (json!({"%": [-7, 3]}), json!(-1)),
                (json!({"%": [{"var": "n"}, 3]}), json!(1)),
                (json!({"min": [1, "-2", 3]}), json!(-2)),
                (json!({"max": [1, "12", 3]}), json!(12)),
                (json!({"max": [1, "x"]}), json!(null)),
                (json!({"min": []}), json!(null)),
                (
                    json!({"+": [9007199254740993u64, 0]}),
                    json!(9007199254740992.0),
                ),
            ],
        );
    }
}
