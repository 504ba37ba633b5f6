//! Evaluating a compiled rule against a request's context, every step and every value built
//! paid for from one budget.

use super::coercions::{
    join_part, js_str, less, loose_eq, num, parse_float, strict_eq, substr, to_number, truthy,
};
use super::fractional::fractional;
use super::semver::sem_ver;
use super::{Node, Op, MAX_DEPTH, NULL};
use alloc::borrow::Cow;
use alloc::vec;
use alloc::vec::Vec;
use serde_json::{Map, Value};

pub(super) fn arg<'v>(v: &'v [Cow<'_, Value>], i: usize) -> &'v Value {
    v.get(i).map_or(&NULL, |c| c)
}

/// What one evaluation may spend: every node evaluated costs a step, and every array
/// element or 8 string bytes an operator builds costs one more. A flag file can nest `map`s or
/// double a list in a `reduce`; the budget turns that into an error instead of exhausting
/// memory (a trap in Envoy).
/// The second cell counts the elements the array operators have visited, which the budget's
/// steps cannot show once they are gone.
pub(super) struct Budget(
    pub(super) core::cell::Cell<u64>,
    pub(super) core::cell::Cell<u64>,
);

/// Steps per evaluation: far above any real targeting rule (the fractional rollouts in
/// flagd's test vectors take under 50), far below what would strain a worker.
pub(super) const BUDGET: u64 = 50_000;

impl Budget {
    /// Spends `n`; false once the budget is gone.
    fn spend(&self, n: usize) -> bool {
        let left = self.0.get();
        let n = u64::try_from(n).unwrap_or(u64::MAX);
        self.0.set(left.saturating_sub(n));
        left >= n
    }

    fn spend_u64(&self, n: u64) -> bool {
        let left = self.0.get();
        self.0.set(left.saturating_sub(n));
        left >= n
    }

    pub(super) fn exhausted(&self) -> bool {
        self.0.get() == 0
    }

    /// Whether a value costing `n` can still be built: checked *before* an operator copies
    /// its operands (a `cat` of many references to one large header would otherwise allocate
    /// gigabytes before its cost is charged, and a failed allocation traps the VM). A value
    /// that cannot be afforded ends the evaluation.
    fn affords(&self, n: u64) -> bool {
        if n > self.0.get() {
            self.0.set(0);
            return false;
        }
        true
    }
}

/// What an operator's result costs: every element and member at any depth, plus string bytes
/// / 8 (nested lists are copied whole, so a rule that wraps or doubles a list must pay for all
/// of it). Counted without recursion and only up to `limit`; a result nested deeper than
/// `MAX_DEPTH` costs more than any budget, so it can never reach a printer or a drop that
/// would recurse through it.
#[inline]
pub(super) fn size(v: &Value, limit: u64) -> u64 {
    // Most results are scalars: priced where they are, with no call.
    match v {
        Value::Array(_) | Value::Object(_) => size_of_tree(v, limit),
        Value::String(s) => (s.len() / 8) as u64,
        _ => 0,
    }
}

fn size_of_tree(v: &Value, limit: u64) -> u64 {
    let mut total = 0u64;
    let mut stack = vec![(v, 0usize)];
    while let Some((v, depth)) = stack.pop() {
        if depth > MAX_DEPTH || total > limit {
            return u64::MAX;
        }
        match v {
            // Checked before the children are queued, so a large value costs its limit, not
            // its length.
            Value::Array(a) => {
                total = total.saturating_add(a.len() as u64);
                if total > limit {
                    return u64::MAX;
                }
                stack.extend(a.iter().map(|x| (x, depth + 1)));
            }
            Value::Object(m) => {
                total = total.saturating_add(m.len() as u64);
                if total > limit {
                    return u64::MAX;
                }
                stack.extend(m.values().map(|x| (x, depth + 1)));
            }
            Value::String(s) => total = total.saturating_add((s.len() / 8) as u64),
            _ => {}
        }
    }
    total
}

pub(super) fn ev<'a>(n: &'a Node, data: &'a Value, b: &Budget) -> Cow<'a, Value> {
    if !b.spend(1) {
        return Cow::Borrowed(&NULL);
    }
    let out = ev_node(n, data, b);
    // Only what this operator built is charged: data it merely points at is the context's.
    let built = match &out {
        Cow::Owned(v) => size(v, b.0.get()),
        Cow::Borrowed(_) => 0,
    };
    if !b.spend_u64(built) {
        return Cow::Borrowed(&NULL);
    }
    out
}

fn ev_node<'a>(n: &'a Node, data: &'a Value, b: &Budget) -> Cow<'a, Value> {
    let (op, args) = match n {
        Node::Lit(v) => return Cow::Borrowed(v),
        Node::List(items) => {
            let mut out = Vec::with_capacity(items.len());
            let mut cost = 0u64;
            for i in items {
                let v = ev(i, data, b);
                cost = cost.saturating_add(1).saturating_add(size(&v, b.0.get()));
                if !b.affords(cost) {
                    return Cow::Borrowed(&NULL);
                }
                out.push(v.into_owned());
            }
            return Cow::Owned(Value::Array(out));
        }
        Node::Op(op, args) => (*op, args.as_slice()),
    };
    // Operators that choose what to evaluate, or evaluate against other data.
    match op {
        Op::If => {
            let mut rest = args;
            while let [cond, then, tail @ ..] = rest {
                if truthy(&ev(cond, data, b)) {
                    return ev(then, data, b);
                }
                rest = tail;
            }
            return rest
                .first()
                .map_or(Cow::Borrowed(&NULL), |e| ev(e, data, b));
        }
        Op::And | Op::Or => {
            let mut last = Cow::Borrowed(&NULL);
            for a in args {
                last = ev(a, data, b);
                if truthy(&last) != (op == Op::And) {
                    break;
                }
            }
            return last;
        }
        Op::Var => {
            let path = args.first().map(|p| ev(p, data, b));
            // The path is read (and a non-string one written out) on every lookup.
            if !b.spend_u64(path.as_deref().map_or(0, |p| size(p, b.0.get()))) {
                return Cow::Borrowed(&NULL);
            }
            return match lookup(data, path.as_deref().unwrap_or(&NULL)) {
                Some(v) => Cow::Borrowed(v),
                None => args.get(1).map_or(Cow::Borrowed(&NULL), |d| ev(d, data, b)),
            };
        }
        // Array operators see each element as their data; a non-array is an empty list.
        Op::Map | Op::Filter | Op::Reduce | Op::All | Op::Some | Op::None => {
            let (Some(list), Some(logic)) = (args.first(), args.get(1)) else {
                return Cow::Borrowed(&NULL);
            };
            let list = ev(list, data, b);
            let items = list.as_array().map_or(&[][..], Vec::as_slice);
            // Once the budget is gone every step is null: stop iterating rather than walk
            // (and for `reduce`, copy) the rest of a long list for nothing.
            let test = |v: &Value| truthy(&ev(logic, v, b));
            let live = || {
                b.1.set(b.1.get().saturating_add(1));
                !b.exhausted()
            };
            return Cow::Owned(match op {
                Op::Map => {
                    let mut out = Vec::with_capacity(items.len());
                    for v in items.iter().take_while(|_| live()) {
                        let r = ev(logic, v, b);
                        // A borrowed result is copied into the list: charge the copy first.
                        if let Cow::Borrowed(x) = &r {
                            if !b.spend_u64(size(x, b.0.get())) {
                                return Cow::Borrowed(&NULL);
                            }
                        }
                        out.push(r.into_owned());
                    }
                    Value::Array(out)
                }
                Op::Filter => Value::Array(
                    items
                        .iter()
                        .take_while(|_| live())
                        .filter(|v| test(v))
                        .cloned()
                        .collect(),
                ),
                Op::All => {
                    Value::Bool(!items.is_empty() && items.iter().take_while(|_| live()).all(test))
                }
                Op::Some => Value::Bool(items.iter().take_while(|_| live()).any(test)),
                Op::None => Value::Bool(!items.iter().take_while(|_| live()).any(test)),
                _ => {
                    let init = args
                        .get(2)
                        .map_or(Value::Null, |i| ev(i, data, b).into_owned());
                    items.iter().take_while(|_| live()).fold(init, |acc, cur| {
                        let mut scope = Map::new();
                        scope.insert("current".into(), cur.clone());
                        scope.insert("accumulator".into(), acc);
                        let scope = Value::Object(scope);
                        let next = ev(logic, &scope, b);
                        // Carrying a borrowed accumulator over copies it: charge the copy.
                        if let Cow::Borrowed(v) = &next {
                            if !b.spend_u64(size(v, b.0.get())) {
                                return Value::Null;
                            }
                        }
                        next.into_owned()
                    })
                }
            });
        }
        _ => {}
    }
    // Most operators take at most three operands: those are evaluated into an array on the
    // stack, which saves an allocation per operator on every request.
    let mut few = [
        Cow::Borrowed(&NULL),
        Cow::Borrowed(&NULL),
        Cow::Borrowed(&NULL),
    ];
    let many: Vec<Cow<Value>>;
    let v: &[Cow<Value>] = if args.len() <= few.len() {
        for (slot, a) in few.iter_mut().zip(args) {
            *slot = ev(a, data, b);
        }
        few.get(..args.len()).unwrap_or_default()
    } else {
        many = args.iter().map(|a| ev(a, data, b)).collect();
        &many
    };
    // Every operator reads its operands, and many copy or write them out as text (`cat`,
    // `merge`, comparisons of lists, `in`): their size is spent before any of that, so a
    // large value used many times (in a `some` over a long list) cannot outrun the budget.
    let cost = v.iter().fold(0u64, |t, c| {
        t.saturating_add(1).saturating_add(size(c, b.0.get()))
    });
    if !b.spend_u64(cost) {
        return Cow::Borrowed(&NULL);
    }
    let (x, y) = (arg(v, 0), arg(v, 1));
    Cow::Owned(match op {
        Op::Not => Value::Bool(!truthy(x)),
        Op::Truthy => Value::Bool(truthy(x)),
        Op::Eq => Value::Bool(loose_eq(x, y)),
        Op::Ne => Value::Bool(!loose_eq(x, y)),
        Op::StrictEq => Value::Bool(strict_eq(x, y)),
        Op::StrictNe => Value::Bool(!strict_eq(x, y)),
        Op::Lt | Op::Le => {
            let or_eq = op == Op::Le;
            Value::Bool(less(x, y, or_eq) && (v.len() < 3 || less(y, arg(v, 2), or_eq)))
        }
        Op::Gt => Value::Bool(less(y, x, false)),
        Op::Ge => Value::Bool(less(y, x, true)),
        Op::In => Value::Bool(match y {
            Value::String(s) => !s.is_empty() && occurs(s.as_bytes(), js_str(x).as_bytes()),
            Value::Array(a) => a.iter().any(|e| strict_eq(x, e)),
            _ => false,
        }),
        Op::Cat => Value::String(v.iter().map(|c| join_part(c)).collect()),
        Op::Substr => substr(x, y, v.get(2).map(|c| &**c)),
        Op::Add => num(v.iter().map(|c| parse_float(c)).sum()),
        Op::Mul => num(v.iter().map(|c| parse_float(c)).product()),
        Op::Sub if v.len() < 2 => num(-to_number(x)),
        Op::Sub => num(to_number(x) - to_number(y)),
        Op::Div => num(to_number(x) / to_number(y)),
        Op::Mod => num(to_number(x) % to_number(y)),
        // Math.min/max: NaN wins, and no arguments give ±Infinity (null here).
        Op::Min | Op::Max => {
            let max = op == Op::Max;
            let init = if max {
                f64::NEG_INFINITY
            } else {
                f64::INFINITY
            };
            let pick = |a: f64, b: f64| {
                let better = if max { b > a } else { b < a };
                if better || b.is_nan() {
                    b
                } else {
                    a
                }
            };
            num(v.iter().map(|c| to_number(c)).fold(init, pick))
        }
        Op::Merge => Value::Array(
            v.iter()
                .flat_map(|c| match &**c {
                    Value::Array(a) => a.clone(),
                    other => vec![other.clone()],
                })
                .collect(),
        ),
        Op::Missing => {
            let keys: Vec<&Value> = match x {
                Value::Array(a) => a.iter().collect(),
                _ => v.iter().map(|c| &**c).collect(),
            };
            Value::Array(missing(data, &keys))
        }
        Op::MissingSome => {
            let keys: Vec<&Value> = match y {
                Value::Array(a) => a.iter().collect(),
                other => vec![other],
            };
            let gone = missing(data, &keys);
            if (keys.len() - gone.len()) as f64 >= to_number(x) {
                Value::Array(Vec::new())
            } else {
                Value::Array(gone)
            }
        }
        // flagd answers null for anything but two strings.
        Op::StartsWith | Op::EndsWith => match (x, y) {
            _ if v.len() != 2 => Value::Null,
            (Value::String(s), Value::String(p)) if op == Op::StartsWith => {
                Value::Bool(s.starts_with(p.as_str()))
            }
            (Value::String(s), Value::String(p)) => Value::Bool(s.ends_with(p.as_str())),
            _ => Value::Null,
        },
        Op::SemVer if v.len() == 3 => sem_ver(x, y, arg(v, 2)),
        Op::Fractional => fractional(v, data).unwrap_or(Value::Null),
        _ => Value::Null,
    })
}

/// `var`: `null` or `""` is the whole context; otherwise a dotted path through objects and
/// array indices. `None` when any step is missing (the value `null` is found, not missing).
fn lookup<'a>(data: &'a Value, path: &Value) -> Option<&'a Value> {
    let key = match path {
        Value::Null => return Some(data),
        other => js_str(other),
    };
    if key.is_empty() {
        return Some(data);
    }
    key.split('.').try_fold(data, |d, step| match d {
        Value::Object(m) => m.get(step),
        Value::Array(a) => {
            let canonical = step == "0" || !step.starts_with('0');
            let i = step
                .parse::<usize>()
                .ok()
                .filter(|_| canonical && !step.starts_with('+'));
            i.and_then(|i| a.get(i))
        }
        _ => None,
    })
}

/// The keys whose `var` lookup is missing, `null` or `""`.
fn missing(data: &Value, keys: &[&Value]) -> Vec<Value> {
    keys.iter()
        .filter(|k| lookup(data, k).is_none_or(|v| v.is_null() || v.as_str() == Some("")))
        .map(|k| (*k).clone())
        .collect()
}

/// Whether `needle` occurs in `hay`, in time linear in both (Knuth-Morris-Pratt): both may come
/// from the request, and a quadratic search would let a client spend the VM's time. Not
/// `str::contains`: its two-way searcher is 2.5 KB of the module.
fn occurs(hay: &[u8], needle: &[u8]) -> bool {
    if needle.is_empty() {
        return true;
    }
    // border[i]: the length of the longest proper prefix of needle[..=i] that ends it.
    let mut border = vec![0usize; needle.len()];
    let step = |mut k: usize, c: u8, border: &[usize]| {
        while k > 0 && needle.get(k) != Some(&c) {
            k = border.get(k - 1).copied().unwrap_or(0);
        }
        k + usize::from(needle.get(k) == Some(&c))
    };
    let mut k = 0;
    for (i, &c) in needle.iter().enumerate().skip(1) {
        k = step(k, c, &border);
        if let Some(b) = border.get_mut(i) {
            *b = k;
        }
    }
    let mut k = 0;
    for &c in hay {
        k = step(k, c, &border);
        if k == needle.len() {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::super::compile::OPS;
    use super::super::testing::*;
    use super::super::Expr;
    use super::{ev, occurs, Budget, BUDGET};
    use alloc::format;
    use alloc::vec;
    use alloc::vec::Vec;
    use core::cell::Cell;
    use serde_json::{json, Map, Value};

    #[test]
    fn a_substring_is_found_where_str_contains_finds_it() {
        let words = [
            "", "a", "aa", "ab", "aab", "abab", "abaab", "ba", "bab", "aaab",
        ];
        for hay in words
            .iter()
            .flat_map(|a| words.iter().map(move |b| format!("{a}{b}{a}")))
        {
            for needle in words
                .iter()
                .flat_map(|a| words.iter().map(move |b| format!("{b}{a}")))
            {
                assert_eq!(
                    occurs(hay.as_bytes(), needle.as_bytes()),
                    hay.contains(&needle),
                    "{needle:?} in {hay:?}"
                );
            }
        }
    }

    #[test]
    fn looping_operators_stop_once_the_budget_is_spent() {
        let long: Vec<Value> = (0..200_000).map(|i| json!(i)).collect();
        let data = json!({ "xs": long });
        for logic in [
            json!({"reduce": [{"var": "xs"}, {"+": [{"var": "accumulator"}, {"var": "current"}]}, 0]}),
            json!({"map": [{"var": "xs"}, {"+": [{"var": ""}, 1]}]}),
            json!({"filter": [{"var": "xs"}, {">": [{"var": ""}, -1]}]}),
            json!({"all": [{"var": "xs"}, {">": [{"var": ""}, -1]}]}),
            json!({"some": [{"var": "xs"}, {"<": [{"var": ""}, -1]}]}),
            json!({"none": [{"var": "xs"}, {"<": [{"var": ""}, -1]}]}),
        ] {
            let expr = compile(&logic).unwrap();
            let b = Budget(Cell::new(BUDGET), Cell::new(0));
            let _ = ev(&expr.0, &data, &b);
            assert!(
                b.exhausted(),
                "{logic} fits the budget: the test proves nothing"
            );
            assert!(
                b.1.get() <= BUDGET,
                "{logic} visited {} of 200,000 elements after its budget of {BUDGET} was spent",
                b.1.get()
            );
            assert!(expr.eval(&data).is_err(), "{logic}");
        }
    }

    #[test]
    fn starts_with_and_ends_with_need_two_strings_else_null_like_flagd() {
        table(
            json!({"email": "ann@example.com"}),
            &[
                (
                    json!({"starts_with": [{"var": "email"}, "ann"]}),
                    json!(true),
                ),
                (
                    json!({"ends_with": [{"var": "email"}, ".com"]}),
                    json!(true),
                ),
                (json!({"starts_with": [{"var": "email"}]}), json!(null)),
                (json!({"ends_with": "ann@example.com"}), json!(null)),
                (
                    json!({"starts_with": [{"var": "email"}, "a", "b"]}),
                    json!(null),
                ),
                (json!({"ends_with": [{"var": "email"}, 7]}), json!(null)),
                (
                    json!({"if": [{"starts_with": "x"}, "on", "off"]}),
                    json!("off"),
                ),
            ],
        );
    }

    #[test]
    fn literals_evaluate_to_themselves_and_arrays_element_wise() {
        table(
            json!({"a": 5}),
            &[
                (json!(1), json!(1)),
                (json!("s"), json!("s")),
                (json!(true), json!(true)),
                (json!(null), json!(null)),
                (json!({}), json!({})),
                (json!([1, "x", [2]]), json!([1, "x", [2]])),
                (json!([1, {"var": "a"}, [{"var": "a"}]]), json!([1, 5, [5]])),
            ],
        );
    }

    #[test]
    fn var_reads_paths_indices_defaults_and_whole_data() {
        let data = json!({
            "a": {"b": "deep"}, "list": ["x", "y"], "n": null, "0": "zero", "k": "a",
            "targetingKey": "user-1", "$flagd": {"flagKey": "color", "timestamp": 1700000000}
        });
        table(
            data.clone(),
            &[
                (json!({"var": "a.b"}), json!("deep")),
                (json!({"var": ["a.b"]}), json!("deep")),
                (json!({"var": ["a.x", "dflt"]}), json!("dflt")),
                (json!({"var": "a.x"}), json!(null)),
                (json!({"var": "a.b.c"}), json!(null)),
                (json!({"var": "list.1"}), json!("y")),
                (json!({"var": "list.2"}), json!(null)),
                (json!({"var": "list.01"}), json!(null)),
                (json!({"var": ["n", "dflt"]}), json!(null)),
                (json!({"var": 0}), json!("zero")),
                (json!({"var": {"cat": [{"var": "k"}, ".b"]}}), json!("deep")),
                (json!({"var": ["missing", {"var": "a.b"}]}), json!("deep")),
                (json!({"var": "$flagd.flagKey"}), json!("color")),
                (json!({"var": "$flagd.timestamp"}), json!(1700000000)),
                (json!({"var": "targetingKey"}), json!("user-1")),
                (json!({"var": ""}), data.clone()),
                (json!({"var": null}), data.clone()),
                (json!({"var": []}), data.clone()),
            ],
        );
        assert_eq!(run(json!({"var": "a"}), &json!(null)), json!(null));
        assert_eq!(run(json!({"var": "1"}), &json!([3, 4])), json!(4));
    }

    #[test]
    fn if_picks_the_first_truthy_branch() {
        table(
            json!({"x": 0}),
            &[
                (json!({"if": [true, "a"]}), json!("a")),
                (json!({"if": [false, "a"]}), json!(null)),
                (json!({"if": [false, "a", "b"]}), json!("b")),
                (json!({"if": [{"var": "x"}, "a", "b"]}), json!("b")),
                (json!({"if": [false, 1, true, 2, 3]}), json!(2)),
                (json!({"if": [false, 1, false, 2, 3]}), json!(3)),
                (json!({"if": [false, 1, false, 2]}), json!(null)),
                (json!({"if": []}), json!(null)),
                (json!({"if": "only"}), json!("only")),
                (json!({"?:": [[], "a", "b"]}), json!("b")),
                (json!({"?:": [[0], "a", "b"]}), json!("a")),
            ],
        );
    }

    #[test]
    fn and_or_short_circuit_and_return_the_deciding_value() {
        table(
            json!({"x": "yes"}),
            &[
                (json!({"and": [true, 1, "a"]}), json!("a")),
                (json!({"and": [true, 0, "a"]}), json!(0)),
                (json!({"and": [{"var": "x"}, ""]}), json!("")),
                (json!({"and": [false]}), json!(false)),
                (json!({"or": [0, "", "x"]}), json!("x")),
                (json!({"or": [0, ""]}), json!("")),
                (json!({"or": [null, {"var": "x"}, "later"]}), json!("yes")),
                (json!({"or": [[], [1]]}), json!([1])),
            ],
        );
    }

    #[test]
    fn in_is_substring_or_strict_membership() {
        table(
            json!({"email": "ann@example.com"}),
            &[
                (json!({"in": ["Spring", "Springfield"]}), json!(true)),
                (json!({"in": ["Fall", "Springfield"]}), json!(false)),
                (json!({"in": ["example", {"var": "email"}]}), json!(true)),
                (
                    json!({"in": [{"var": "email"}, ["ann@example.com", "b"]]}),
                    json!(true),
                ),
                (json!({"in": ["x", ["a", "b"]]}), json!(false)),
                (json!({"in": [1, [1, 2]]}), json!(true)),
                (json!({"in": ["1", [1, 2]]}), json!(false)),
                (json!({"in": [1, "a1"]}), json!(true)),
                (json!({"in": ["", ""]}), json!(false)),
                (json!({"in": ["a", null]}), json!(false)),
                (json!({"in": ["a", {"var": "nope"}]}), json!(false)),
                (json!({"in": [null, "nullable"]}), json!(true)),
            ],
        );
    }

    #[test]
    fn merge_flattens_one_level() {
        table(
            json!({"xs": [3, 4]}),
            &[
                (json!({"merge": [1, [2, 3], [[4]]]}), json!([1, 2, 3, [4]])),
                (json!({"merge": [{"var": "xs"}, null]}), json!([3, 4, null])),
                (json!({"merge": []}), json!([])),
            ],
        );
    }

    #[test]
    fn missing_and_missing_some_list_absent_or_empty_keys() {
        table(
            json!({"a": 1, "b": {"c": ""}, "d": null, "e": 0}),
            &[
                (
                    json!({"missing": ["a", "b.c", "d", "e", "z"]}),
                    json!(["b.c", "d", "z"]),
                ),
                (json!({"missing": "z"}), json!(["z"])),
                (json!({"missing": {"merge": ["a", "y"]}}), json!(["y"])),
                (json!({"missing": []}), json!([])),
                (json!({"missing_some": [1, ["a", "z"]]}), json!([])),
                (
                    json!({"missing_some": [2, ["a", "z", "y"]]}),
                    json!(["z", "y"]),
                ),
                (json!({"missing_some": [0, ["z"]]}), json!([])),
            ],
        );
    }

    #[test]
    fn array_operators_evaluate_logic_per_element() {
        table(
            json!({"xs": [1, 2, 3], "none": [], "s": "str"}),
            &[
                (
                    json!({"map": [{"var": "xs"}, {"*": [{"var": ""}, 2]}]}),
                    json!([2, 4, 6]),
                ),
                (json!({"map": [{"var": "s"}, 1]}), json!([])),
                (
                    json!({"filter": [{"var": "xs"}, {">": [{"var": ""}, 1]}]}),
                    json!([2, 3]),
                ),
                (
                    json!({"reduce": [{"var": "xs"},
                        {"+": [{"var": "current"}, {"var": "accumulator"}]}, 10]}),
                    json!(16),
                ),
                (json!({"reduce": [{"var": "none"}, 1, 7]}), json!(7)),
                (
                    json!({"reduce": [{"var": "xs"}, {"var": "current"}]}),
                    json!(3),
                ),
                (
                    json!({"all": [{"var": "xs"}, {">": [{"var": ""}, 0]}]}),
                    json!(true),
                ),
                (
                    json!({"all": [{"var": "xs"}, {">": [{"var": ""}, 1]}]}),
                    json!(false),
                ),
                (json!({"all": [{"var": "none"}, true]}), json!(false)),
                (json!({"all": [{"var": "s"}, true]}), json!(false)),
                (
                    json!({"some": [{"var": "xs"}, {"==": [{"var": ""}, 2]}]}),
                    json!(true),
                ),
                (json!({"some": [{"var": "none"}, true]}), json!(false)),
                (
                    json!({"none": [{"var": "xs"}, {"==": [{"var": ""}, 5]}]}),
                    json!(true),
                ),
                (
                    json!({"none": [{"var": "xs"}, {"==": [{"var": ""}, 2]}]}),
                    json!(false),
                ),
            ],
        );
    }

    #[test]
    fn starts_with_and_ends_with_need_two_strings() {
        table(
            json!({"email": "user@faas.com", "n": 12}),
            &[
                (
                    json!({"starts_with": [{"var": "email"}, "user@faas"]}),
                    json!(true),
                ),
                (
                    json!({"starts_with": [{"var": "email"}, "faas"]}),
                    json!(false),
                ),
                (
                    json!({"ends_with": [{"var": "email"}, "faas.com"]}),
                    json!(true),
                ),
                (
                    json!({"ends_with": [{"var": "email"}, "user"]}),
                    json!(false),
                ),
                (json!({"starts_with": [{"var": "email"}, ""]}), json!(true)),
                // flagd returns null (falsy) when an operand is not a string.
                (json!({"starts_with": [{"var": "n"}, "1"]}), json!(null)),
                (json!({"ends_with": [{"var": "missing"}, "x"]}), json!(null)),
                (
                    json!({"if": [{"ends_with": [{"var": "n"}, "2"]}, "y", "n"]}),
                    json!("n"),
                ),
            ],
        );
    }

    #[test]
    fn rules_that_explode_at_evaluation_time_stop_with_an_error() {
        let doubling = json!({"reduce": [
            (0..40).collect::<Vec<_>>(),
            {"merge": [{"var": "accumulator"}, {"var": "accumulator"}]},
            [0]
        ]});
        let cat = json!({"reduce": [
            (0..40).collect::<Vec<_>>(),
            {"cat": [{"var": "accumulator"}, {"var": "accumulator"}]},
            "xxxxxxxx"
        ]});
        let list: Vec<u32> = (0..1000).collect();
        let nested = json!({"map": [list, {"map": [list, {"map": [list, {"+": [1, 1]}]}]}]});
        // Nested doubling: each round is a 2-element list of the previous one, so the top
        // level stays short while the copies double.
        let nested_doubling = json!({"reduce": [
            (0..40).collect::<Vec<_>>(),
            [{"var": "accumulator"}, {"var": "accumulator"}],
            0
        ]});
        // A single wrap per step: thousands of levels, which printing or dropping would
        // recurse through.
        let deep = json!({"reduce": [
            (0..5000).collect::<Vec<_>>(),
            [{"var": "accumulator"}],
            0
        ]});
        for rule in [doubling, cat, nested, nested_doubling, deep] {
            let expr = Expr::compile(&rule, &Map::new()).unwrap();
            let err = expr.eval(&json!({})).unwrap_err();
            assert!(err.contains("steps"), "{err}");
        }
        // A long but reasonable rule is unaffected.
        let fine = json!({"reduce": [(0..1000).collect::<Vec<_>>(), {"+": [{"var": "accumulator"}, 1]}, 0]});
        let expr = Expr::compile(&fine, &Map::new()).unwrap();
        assert_eq!(expr.eval(&json!({})).unwrap(), json!(1000));
    }

    #[test]
    fn copies_of_a_large_value_are_refused_before_they_are_built() {
        // 20,000 references to a 4 MiB header: 80 GB if built, which would abort the process.
        let data = json!({"tier": "x".repeat(4 << 20), "list": vec![0; 1 << 20]});
        for op in ["cat", "merge"] {
            let var = if op == "cat" { "tier" } else { "list" };
            let rule = json!({ op: vec![json!({"var": var}); 20_000] });
            let err = Expr::compile(&rule, &Map::new())
                .unwrap()
                .eval(&data)
                .unwrap_err();
            assert!(err.contains("steps"), "{op}: {err}");
        }
        let list = json!(vec![json!({"var": "tier"}); 20_000]);
        let err = Expr::compile(&list, &Map::new())
            .unwrap()
            .eval(&data)
            .unwrap_err();
        assert!(err.contains("steps"), "{err}");
        // A map whose rule yields one large literal would copy it once per element.
        let map = json!({"map": [vec![0; 20_000], "x".repeat(4 << 20)]});
        let err = Expr::compile(&map, &Map::new())
            .unwrap()
            .eval(&json!({}))
            .unwrap_err();
        assert!(err.contains("steps"), "{err}");
        // Reading is paid for too: one comparison of a value larger than the whole budget
        // ends the evaluation, so a loop cannot compare it thousands of times.
        for op in ["<", "in", "==", "+"] {
            let rule = json!({ op: ["x".repeat(500_000), "a"] });
            let err = Expr::compile(&rule, &Map::new())
                .unwrap()
                .eval(&json!({}))
                .unwrap_err();
            assert!(err.contains("steps"), "{op}: {err}");
        }
        // A short cat of a header of usual size is fine.
        let two = json!({"cat": [{"var": "tier"}, "!"]});
        let v = Expr::compile(&two, &Map::new())
            .unwrap()
            .eval(&json!({"tier": "x".repeat(60_000)}))
            .unwrap();
        assert_eq!(v.as_str().map(str::len), Some(60_001));
    }

    #[test]
    fn every_operator_survives_hostile_operands() {
        let samples = [
            json!(null),
            json!(true),
            json!(-1.5),
            json!(""),
            json!("1.2.3"),
            json!([]),
            json!([1, "a", null]),
            json!({"var": "o"}),
        ];
        let data = json!({"o": {"k": [1, {"x": null}]}, "targetingKey": 7});
        for &(name, _, min, max) in OPS {
            for n in min..=max.min(3) {
                let count = samples.len().pow(n as u32);
                for pick in 0..count {
                    let args: Vec<Value> = (0..n)
                        .map(|i| {
                            samples[pick / samples.len().pow(i as u32) % samples.len()].clone()
                        })
                        .collect();
                    let logic = json!({ name: args });
                    if let Ok(expr) = compile(&logic) {
                        expr.eval(&data).unwrap();
                    }
                }
            }
        }
    }
}
