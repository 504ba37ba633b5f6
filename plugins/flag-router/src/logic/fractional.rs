//! flagd's `fractional`: a bucketing value hashed onto weighted variants.

use super::hashing::murmur3_32;
use super::NULL;
use alloc::borrow::Cow;
use alloc::format;
use alloc::string::String;
use serde_json::Value;

/// Literal distributions of `fractional` must match flagd's schema: `[variant]` or
/// `[variant, weight]` with a whole weight of at most 2^31-1. A negative weight is allowed and
/// counts as 0, as flagd clamps it.
pub(super) fn check_fractional(args: &[Value]) -> Result<(), String> {
    let first = args.first();
    if first.is_some_and(|b| b.is_number() || b.is_boolean()) {
        return Err(format!(
            "fractional[0]: the bucketing value must be a string or an expression, not {}",
            edge_json::to_text(first.unwrap_or(&NULL))
        ));
    }
    let skip = usize::from(!first.is_some_and(Value::is_array));
    for (i, d) in args.iter().enumerate().skip(skip) {
        let ok = match d {
            Value::Object(_) => true,
            Value::Array(d) => {
                (1..=2).contains(&d.len())
                    && !d.first().is_some_and(Value::is_array)
                    && match d.get(1) {
                        None | Some(Value::Object(_)) => true,
                        Some(Value::Number(n)) => n.as_f64().is_some_and(|w| {
                            super::coercions::is_whole(w)
                                && (f64::from(i32::MIN)..=f64::from(i32::MAX)).contains(&w)
                        }),
                        Some(_) => false,
                    }
            }
            _ => false,
        };
        if !ok {
            return Err(format!(
                "fractional[{i}]: expected [variant] or [variant, weight] with a whole weight \
                 of at most 2147483647, got {}",
                edge_json::to_text(d)
            ));
        }
    }
    Ok(())
}

/// flagd `fractional` over its evaluated arguments; `None` (so `null`) wherever flagd's Go
/// evaluator logs an error and returns nil.
pub(super) fn fractional(v: &[Cow<'_, Value>], data: &Value) -> Option<Value> {
    let by_targeting_key = || {
        let key = data
            .get("targetingKey")?
            .as_str()
            .filter(|k| !k.is_empty())?;
        let flag = data
            .get("$flagd")
            .and_then(|f| f.get("flagKey"))
            .and_then(Value::as_str)
            .unwrap_or("");
        // Pushed, not `format!`ted: this runs on every request of a rollout.
        let mut joined = String::with_capacity(flag.len() + key.len());
        joined.push_str(flag);
        joined.push_str(key);
        Some(Cow::Owned(joined))
    };
    let (first, rest) = v.split_first()?;
    let (bucket_by, dists) = match &**first {
        Value::String(s) => (Cow::Borrowed(s.as_str()), rest),
        Value::Null => (by_targeting_key()?, rest),
        _ => (by_targeting_key()?, v),
    };
    let mut total = 0u64;
    for d in dists {
        total += entry(d)?.1;
    }
    if total == 0 || total > i32::MAX as u64 {
        return None;
    }
    let point = (u64::from(murmur3_32(bucket_by.as_bytes(), 0)) * total) >> 32;
    let mut end = 0;
    dists.iter().find_map(|d| {
        let (variant, w) = entry(d)?;
        end += w;
        (point < end).then(|| variant.clone())
    })
}

/// A distribution `[variant, weight?]` as (variant, weight); flagd clamps a computed negative
/// weight to 0 and rejects fractions and weights above 2^31-1.
fn entry(d: &Value) -> Option<(&Value, u64)> {
    let d = d.as_array()?;
    let variant = d.first().filter(|v| !v.is_array() && !v.is_object())?;
    let w = match d.get(1) {
        None | Some(Value::Null) => 1.0,
        Some(w) => w.as_f64()?,
    };
    let whole = super::coercions::is_whole(w) && w <= f64::from(i32::MAX);
    whole.then_some((variant, w.max(0.0) as u64))
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use alloc::format;
    use alloc::vec;
    use serde_json::{json, Value};

    #[test]
    fn fractional_matches_flagd_vectors() {
        let vectors: Value = serde_json::from_str(include_str!(
            "../../tests/fixtures/flagd-fractional-vectors.json"
        ))
        .unwrap();
        let mut args = vec![json!({"var": "b"})];
        args.extend(vectors["variants"].as_array().unwrap().iter().cloned());
        let expr = compile(&json!({ "fractional": args })).unwrap();
        let cases = vectors["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 8);
        for case in cases {
            let got = expr.eval(&json!({"b": case["bucketBy"]})).unwrap();
            assert_eq!(got, case["expect"], "{case}");
        }
    }

    #[test]
    fn fractional_without_bucketing_value_uses_flag_key_and_targeting_key() {
        let split = json!([["red", 25], ["blue", 25], ["green", 25], ["yellow", 25]]);
        let shorthand = compile(&json!({ "fractional": split })).unwrap();
        let ctx = |tk: Value| json!({"targetingKey": tk, "$flagd": {"flagKey": "headerColor"}});
        // Same cases as the vectors: "headerColor" + targeting key.
        for (tk, want) in [
            ("rachel@faas.com", "blue"),
            ("monica@faas.com", "yellow"),
            ("joey@faas.com", "red"),
            ("ross@faas.com", "blue"),
        ] {
            assert_eq!(
                shorthand.eval(&ctx(json!(tk))).unwrap(),
                json!(want),
                "{tk}"
            );
        }
        for tk in [json!(null), json!(""), json!(5)] {
            assert_eq!(
                shorthand.eval(&ctx(tk.clone())).unwrap(),
                json!(null),
                "{tk}"
            );
        }
        assert_eq!(shorthand.eval(&json!({})).unwrap(), json!(null));
        // A bucketing expression that yields null falls back to the targeting key too.
        let mut args = vec![json!({"var": "email"})];
        args.extend(split.as_array().unwrap().iter().cloned());
        let fallback = compile(&json!({ "fractional": args })).unwrap();
        let data = ctx(json!("joey@faas.com"));
        assert_eq!(fallback.eval(&data).unwrap(), json!("red"));
        // A seed prefix as flagd's docs show it, with cat.
        let seeded = json!({"fractional": [
            {"cat": ["my-seed", {"var": "targetingKey"}]},
            ["red", 25], ["blue", 25], ["green", 25], ["yellow", 25]]});
        assert_eq!(run(seeded, &data), json!("blue"));
    }

    #[test]
    fn fractional_weights_default_clamp_and_reject() {
        let data = |w: Value| json!({"b": "some-user", "w": w});
        let sole = json!({"fractional": [{"var": "b"}, ["a"], ["b", 0]]});
        assert_eq!(run(sole, &data(json!(0))), json!("a"));
        let zero = json!({"fractional": [{"var": "b"}, ["a", 0], ["b", 0]]});
        assert_eq!(run(zero, &data(json!(0))), json!(null));
        let only_bucket = json!({"fractional": [{"var": "b"}]});
        assert_eq!(run(only_bucket, &data(json!(0))), json!(null));
        let computed = json!({"fractional": [{"var": "b"}, ["a", {"var": "w"}], ["b", 1]]});
        assert_eq!(run(computed.clone(), &data(json!(-5))), json!("b"));
        assert_eq!(run(computed.clone(), &data(json!(1.5))), json!(null));
        assert_eq!(run(computed.clone(), &data(json!("7"))), json!(null));
        assert_eq!(run(computed.clone(), &data(json!(2147483647))), json!(null));
        assert_eq!(
            run(computed.clone(), &data(json!(null))),
            run(computed, &data(json!(1)))
        );
        let typed = json!({"fractional": [{"var": "b"}, [true, 1]]});
        assert_eq!(run(typed, &data(json!(0))), json!(true));
        let number_bucket = json!({"fractional": [{"var": "w"}, ["a", 1]]});
        assert_eq!(run(number_bucket, &data(json!(3))), json!(null));
    }

    #[test]
    fn fractional_splits_users_by_weight() {
        let expr = compile(&json!({"fractional": [{"var": "b"}, ["a", 30], ["b", 70]]})).unwrap();
        let a = (0..10_000)
            .filter(|i| expr.eval(&json!({"b": format!("user-{i}")})).unwrap() == json!("a"))
            .count();
        assert!(
            (2_800..3_200).contains(&a),
            "{a} of 10000 in the 30% bucket"
        );
        // Equal unweighted variants each get about a third.
        let expr = compile(&json!({"fractional": [{"var": "b"}, ["x"], ["y"], ["z"]]})).unwrap();
        let x = (0..9_000)
            .filter(|i| expr.eval(&json!({"b": format!("u{i}")})).unwrap() == json!("x"))
            .count();
        assert!((2_700..3_300).contains(&x), "{x} of 9000");
    }

    #[test]
    fn malformed_fractional_fails_at_compile() {
        for logic in [
            json!({"fractional": []}),
            json!({"fractional": [{"var": "b"}, []]}),
            json!({"fractional": [{"var": "b"}, ["a", 1, 2]]}),
            json!({"fractional": [{"var": "b"}, ["a", "5"]]}),
            json!({"fractional": [{"var": "b"}, ["a", 1.5]]}),
            json!({"fractional": [{"var": "b"}, ["a", null]]}),
            json!({"fractional": [{"var": "b"}, ["a", 2147483648u64]]}),
            json!({"fractional": [{"var": "b"}, "a"]}),
            json!({"fractional": [{"var": "b"}, [["a"], 1]]}),
            json!({"fractional": [["a", 1], "b"]}),
            json!({"fractional": [7, ["a", 1]]}),
        ] {
            let e = compile_err(logic.clone());
            assert!(e.contains("fractional"), "{logic}: {e}");
        }
        // Expressions are checked when evaluated.
        assert!(
            compile(&json!({"fractional": [{"var": "b"}, {"var": "d"}, [{"var": "v"}]]})).is_ok()
        );
        assert!(compile(&json!({"fractional": ["constant", ["a", 1]]})).is_ok());
    }

    #[test]
    fn a_negative_weight_counts_as_zero_like_flagd() {
        // flagd clamps a negative weight to 0: every user lands in "b".
        let rule = json!({"fractional": [{"var": "u"}, ["a", -50], ["b", 50]]});
        for u in ["u1", "u2", "u3", "u4", "u5", "u6", "u7", "u8"] {
            assert_eq!(run(rule.clone(), &json!({"u": u})), json!("b"), "{u}");
        }
        // All weights at 0 (after clamping): null, so the default variant.
        let none = json!({"fractional": [{"var": "u"}, ["a", -1], ["b", 0]]});
        assert_eq!(run(none, &json!({"u": "u1"})), json!(null));
    }
}
