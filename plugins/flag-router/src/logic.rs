//! JsonLogic with flagd's operators (`fractional`, `sem_ver`, `starts_with`, `ends_with`) and
//! `$ref` to a flag file's `$evaluators`, compiled once per flag definition and evaluated per
//! request.
//!
//! Core operators coerce like json-logic-js (JavaScript's `==`, `<`, `+`, string conversion);
//! flagd's operators follow flagd's Go evaluator, which answers `null` for bad operands, so an
//! `if` around them takes its else branch exactly as it would in flagd. What is wrong in the flag
//! file itself (unknown operator, fixed arity, a literal that can never be a version or a
//! distribution, a `$ref` cycle) fails at compile time instead. Compilation bounds depth and node
//! count, so a hostile flag file can neither overflow the stack nor explode through `$ref`s.
//!
//! One `enum Node` and one `ev` match keep the wasm module small; evaluation borrows literals
//! and context values (`Cow`) instead of cloning them.

use serde_json::{Map, Value};
use std::borrow::Cow;
use std::cmp::Ordering;

/// Deepest nesting of operations and arrays, `$ref`s included. Evaluation recurses once per
/// level, so this bounds the stack whatever the flag file says.
const MAX_DEPTH: usize = 64;
/// Most nodes one expression may compile to after `$ref` expansion (a chain of evaluators that
/// each use the next twice would otherwise double per link).
const MAX_NODES: usize = 100_000;
const MANY: usize = usize::MAX;
const SEMVER_OPS: [&str; 8] = ["=", "!=", "<", "<=", ">", ">=", "^", "~"];
static NULL: Value = Value::Null;

/// A compiled JsonLogic expression.
#[derive(Debug)]
pub struct Expr(Node);

#[derive(Debug)]
enum Node {
    Lit(Value),
    /// An array with at least one operation inside (all-literal arrays are `Lit`).
    List(Vec<Node>),
    Op(Op, Vec<Node>),
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    Var,
    If,
    And,
    Or,
    Not,
    Truthy,
    Eq,
    Ne,
    StrictEq,
    StrictNe,
    Lt,
    Le,
    Gt,
    Ge,
    In,
    Cat,
    Substr,
    Add,
    Sub,
    Mul,
    Div,
    Mod,
    Min,
    Max,
    Merge,
    Missing,
    MissingSome,
    Map,
    Filter,
    Reduce,
    All,
    Some,
    None,
    StartsWith,
    EndsWith,
    SemVer,
    Fractional,
}

/// Operator name, operator, least and most arguments.
const OPS: &[(&str, Op, usize, usize)] = &[
    ("var", Op::Var, 0, 2),
    ("if", Op::If, 0, MANY),
    ("?:", Op::If, 0, MANY),
    ("and", Op::And, 1, MANY),
    ("or", Op::Or, 1, MANY),
    ("!", Op::Not, 1, 1),
    ("!!", Op::Truthy, 1, 1),
    ("==", Op::Eq, 2, 2),
    ("!=", Op::Ne, 2, 2),
    ("===", Op::StrictEq, 2, 2),
    ("!==", Op::StrictNe, 2, 2),
    ("<", Op::Lt, 2, 3),
    ("<=", Op::Le, 2, 3),
    (">", Op::Gt, 2, 2),
    (">=", Op::Ge, 2, 2),
    ("in", Op::In, 2, 2),
    ("cat", Op::Cat, 0, MANY),
    ("substr", Op::Substr, 2, 3),
    ("+", Op::Add, 0, MANY),
    ("-", Op::Sub, 1, 2),
    ("*", Op::Mul, 1, MANY),
    ("/", Op::Div, 2, 2),
    ("%", Op::Mod, 2, 2),
    ("min", Op::Min, 0, MANY),
    ("max", Op::Max, 0, MANY),
    ("merge", Op::Merge, 0, MANY),
    ("missing", Op::Missing, 0, MANY),
    ("missing_some", Op::MissingSome, 2, 2),
    ("map", Op::Map, 2, 2),
    ("filter", Op::Filter, 2, 2),
    ("reduce", Op::Reduce, 2, 3),
    ("all", Op::All, 2, 2),
    ("some", Op::Some, 2, 2),
    ("none", Op::None, 2, 2),
    ("starts_with", Op::StartsWith, 2, 2),
    ("ends_with", Op::EndsWith, 2, 2),
    ("sem_ver", Op::SemVer, 3, 3),
    ("fractional", Op::Fractional, 1, MANY),
];

impl Expr {
    /// Compiles `logic`, resolving `{"$ref": "name"}` against flagd's `$evaluators` map (refs may
    /// nest; a cycle is an error). An unknown operator, a wrong number of arguments where it is
    /// fixed, a malformed `fractional` or `sem_ver`, an object with more than one key, nesting
    /// deeper than 64 levels or more than 100,000 nodes after `$ref` expansion is an error, with
    /// a message naming the operator (e.g. `unknown operator "regex"`).
    pub fn compile(logic: &Value, evaluators: &Map<String, Value>) -> Result<Expr, String> {
        Expr::compile_within(logic, evaluators, &mut 0)
    }

    /// [`Expr::compile`] with `nodes` compiled so far counting toward the 100,000: a flag set
    /// shares one budget, so a file of many flags that each `$ref` a large evaluator cannot
    /// expand to millions of nodes on every worker.
    pub fn compile_within(
        logic: &Value,
        evaluators: &Map<String, Value>,
        nodes: &mut usize,
    ) -> Result<Expr, String> {
        let mut c = Compiler {
            evaluators,
            refs: Vec::new(),
            nodes: *nodes,
        };
        let r = c.node(logic, 0).map(Expr);
        *nodes = c.nodes;
        r
    }

    /// Evaluates against `data`, the evaluation context object. flagd puts the targeting key at
    /// `data["targetingKey"]`, and flag key and timestamp at `data["$flagd"]["flagKey"]` and
    /// `data["$flagd"]["timestamp"]` (unix seconds).
    ///
    /// Like flagd, an operator given operands it cannot use (`sem_ver` on a non-version,
    /// `fractional` without a targeting key) yields `null`, and arithmetic that JSON cannot
    /// represent (`1/0`) is `null` too. The one error is a rule that spends more than its
    /// budget of steps and built values (see [`BUDGET`]).
    pub fn eval(&self, data: &Value) -> Result<Value, String> {
        let b = Budget(std::cell::Cell::new(BUDGET));
        let v = ev(&self.0, data, &b).into_owned();
        if b.exhausted() {
            return Err(format!(
                "evaluation stopped after {BUDGET} steps (a rule that loops over or builds large lists)"
            ));
        }
        Ok(v)
    }
}

struct Compiler<'e> {
    evaluators: &'e Map<String, Value>,
    /// `$ref`s being expanded, outermost first, for cycle detection.
    refs: Vec<String>,
    nodes: usize,
}

impl Compiler<'_> {
    fn node(&mut self, v: &Value, depth: usize) -> Result<Node, String> {
        if depth >= MAX_DEPTH {
            return Err(format!(
                "expression nested more than {MAX_DEPTH} levels deep"
            ));
        }
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(format!(
                "expressions have more than {MAX_NODES} nodes after $ref expansion"
            ));
        }
        let (name, arg) = match v {
            Value::Array(items) => {
                let nodes = self.all(items, depth)?;
                if !nodes.iter().all(|n| matches!(n, Node::Lit(_))) {
                    return Ok(Node::List(nodes));
                }
                let lits = nodes.into_iter().filter_map(|n| match n {
                    Node::Lit(v) => Some(v),
                    _ => None,
                });
                return Ok(Node::Lit(Value::Array(lits.collect())));
            }
            Value::Object(m) if m.len() > 1 => {
                let keys: Vec<&str> = m.keys().map(String::as_str).collect();
                return Err(format!(
                    "an operation is an object with one key, found keys {keys:?}"
                ));
            }
            Value::Object(m) => match m.iter().next() {
                Some(kv) => kv,
                None => return Ok(Node::Lit(v.clone())),
            },
            _ => return Ok(Node::Lit(v.clone())),
        };
        if name == "$ref" {
            return self.reference(arg, depth);
        }
        let Some(&(_, op, min, max)) = OPS.iter().find(|o| o.0 == name) else {
            return Err(format!("unknown operator \"{name}\""));
        };
        // As in json-logic-js, a lone argument needs no array: {"var": "a"} is {"var": ["a"]}.
        let args = match arg {
            Value::Array(a) => a.as_slice(),
            one => std::slice::from_ref(one),
        };
        if args.len() < min || args.len() > max {
            let want = match (min, max) {
                (a, b) if a == b => a.to_string(),
                (a, MANY) => format!("at least {a}"),
                (a, b) => format!("{a} or {b}"),
            };
            return Err(format!(
                "operator \"{name}\" takes {want} arguments, got {}",
                args.len()
            ));
        }
        match op {
            Op::SemVer => check_sem_ver(args)?,
            Op::Fractional => check_fractional(args)?,
            _ => {}
        }
        Ok(Node::Op(op, self.all(args, depth)?))
    }

    fn all(&mut self, items: &[Value], depth: usize) -> Result<Vec<Node>, String> {
        items.iter().map(|i| self.node(i, depth + 1)).collect()
    }

    fn reference(&mut self, arg: &Value, depth: usize) -> Result<Node, String> {
        let Value::String(name) = arg else {
            return Err(format!("$ref must name an evaluator, not {arg}"));
        };
        if self.refs.contains(name) {
            return Err(format!("$ref cycle: {} -> {name}", self.refs.join(" -> ")));
        }
        let evaluators = self.evaluators;
        let Some(target) = evaluators.get(name) else {
            return Err(format!("$ref to unknown evaluator \"{name}\""));
        };
        self.refs.push(name.clone());
        let node = self.node(target, depth + 1);
        self.refs.pop();
        node.map_err(|e| format!("in $evaluators.{name}: {e}"))
    }
}

/// Literal operands of `sem_ver` must be what flagd could ever accept; expressions are checked
/// when evaluated.
fn check_sem_ver(args: &[Value]) -> Result<(), String> {
    if let Some(op) = args.get(1).filter(|v| !v.is_object()) {
        if !op.as_str().is_some_and(|o| SEMVER_OPS.contains(&o)) {
            return Err(format!(
                "sem_ver: unknown comparison {op} (use one of {SEMVER_OPS:?})"
            ));
        }
    }
    for v in [args.first(), args.get(2)].into_iter().flatten() {
        if !v.is_object() && version_text(v).as_deref().and_then(parse_version).is_none() {
            return Err(format!("sem_ver: {v} is not a semantic version"));
        }
    }
    Ok(())
}

/// Literal distributions of `fractional` must match flagd's schema: `[variant]` or
/// `[variant, weight]` with a whole weight in 0..=2^31-1.
fn check_fractional(args: &[Value]) -> Result<(), String> {
    let first = args.first();
    if first.is_some_and(|b| b.is_number() || b.is_boolean()) {
        return Err(format!(
            "fractional[0]: the bucketing value must be a string or an expression, not {}",
            first.unwrap_or(&NULL)
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
                            w.fract() == 0.0 && (0.0..=f64::from(i32::MAX)).contains(&w)
                        }),
                        Some(_) => false,
                    }
            }
            _ => false,
        };
        if !ok {
            return Err(format!(
                "fractional[{i}]: expected [variant] or [variant, weight] with a whole weight \
                 from 0 to 2147483647, got {d}"
            ));
        }
    }
    Ok(())
}

fn arg<'v>(v: &'v [Cow<'_, Value>], i: usize) -> &'v Value {
    v.get(i).map_or(&NULL, |c| c)
}

/// What one evaluation may spend: every node evaluated costs a step, and every array
/// element or 8 string bytes an operator builds costs one more. A flag file can nest `map`s or
/// double a list in a `reduce`; the budget turns that into an error instead of exhausting
/// memory (a trap in Envoy).
struct Budget(std::cell::Cell<u64>);

/// Steps per evaluation: far above any real targeting rule (the fractional rollouts in
/// flagd's test vectors take under 50), far below what would strain a worker.
const BUDGET: u64 = 50_000;

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

    fn exhausted(&self) -> bool {
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
fn size(v: &Value, limit: u64) -> u64 {
    // Most results are scalars: no walk.
    match v {
        Value::Array(_) | Value::Object(_) => {}
        Value::String(s) => return (s.len() / 8) as u64,
        _ => return 0,
    }
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

fn ev<'a>(n: &'a Node, data: &'a Value, b: &Budget) -> Cow<'a, Value> {
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
            let test = |v: &Value| truthy(&ev(logic, v, b));
            return Cow::Owned(match op {
                Op::Map => {
                    let mut out = Vec::with_capacity(items.len());
                    for v in items {
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
                Op::Filter => Value::Array(items.iter().filter(|v| test(v)).cloned().collect()),
                Op::All => Value::Bool(!items.is_empty() && items.iter().all(test)),
                Op::Some => Value::Bool(items.iter().any(test)),
                Op::None => Value::Bool(!items.iter().any(test)),
                _ => {
                    let init = args
                        .get(2)
                        .map_or(Value::Null, |i| ev(i, data, b).into_owned());
                    items.iter().fold(init, |acc, cur| {
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
    let v: Vec<Cow<Value>> = args.iter().map(|a| ev(a, data, b)).collect();
    // Every operator reads its operands, and many copy or write them out as text (`cat`,
    // `merge`, comparisons of lists, `in`): their size is spent before any of that, so a
    // large value used many times (in a `some` over a long list) cannot outrun the budget.
    let cost = v.iter().fold(0u64, |t, c| {
        t.saturating_add(1).saturating_add(size(c, b.0.get()))
    });
    if !b.spend_u64(cost) {
        return Cow::Borrowed(&NULL);
    }
    let (x, y) = (arg(&v, 0), arg(&v, 1));
    Cow::Owned(match op {
        Op::Not => Value::Bool(!truthy(x)),
        Op::Truthy => Value::Bool(truthy(x)),
        Op::Eq => Value::Bool(loose_eq(x, y)),
        Op::Ne => Value::Bool(!loose_eq(x, y)),
        Op::StrictEq => Value::Bool(strict_eq(x, y)),
        Op::StrictNe => Value::Bool(!strict_eq(x, y)),
        Op::Lt | Op::Le => {
            let or_eq = op == Op::Le;
            Value::Bool(less(x, y, or_eq) && (v.len() < 3 || less(y, arg(&v, 2), or_eq)))
        }
        Op::Gt => Value::Bool(less(y, x, false)),
        Op::Ge => Value::Bool(less(y, x, true)),
        Op::In => Value::Bool(match y {
            Value::String(s) => !s.is_empty() && s.contains(js_str(x).as_ref()),
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
        Op::StartsWith | Op::EndsWith => match (x, y) {
            (Value::String(s), Value::String(p)) if op == Op::StartsWith => {
                Value::Bool(s.starts_with(p.as_str()))
            }
            (Value::String(s), Value::String(p)) => Value::Bool(s.ends_with(p.as_str())),
            _ => Value::Null,
        },
        Op::SemVer => sem_ver(x, y, arg(&v, 2)),
        Op::Fractional => fractional(&v, data).unwrap_or(Value::Null),
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

/// JsonLogic truthiness: `false`, `null`, `0`, `""` and `[]` are false.
fn truthy(v: &Value) -> bool {
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
fn strict_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(_) | Value::Object(_), _) => false,
        _ => a == b,
    }
}

/// JavaScript `==`.
fn loose_eq(a: &Value, b: &Value) -> bool {
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
fn less(a: &Value, b: &Value, or_eq: bool) -> bool {
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
fn js_string(v: &Value) -> String {
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
fn js_str(v: &Value) -> Cow<'_, str> {
    match v {
        Value::String(s) => Cow::Borrowed(s),
        other => Cow::Owned(js_string(other)),
    }
}

/// An element as `Array.prototype.join` writes it: `null` is empty.
fn join_part(v: &Value) -> String {
    if v.is_null() {
        String::new()
    } else {
        js_string(v)
    }
}

/// JavaScript's `Number.prototype.toString()`: `1` not `1.0`, plain from 1e-6 up to 1e21 and
/// exponents (`1e+21`, `1e-7`) outside. The shortest round-trip digits come from serde_json's
/// formatter, which the module carries anyway (core's float formatting would add its own).
fn js_number(f: f64) -> String {
    if f.fract() == 0.0 && f.abs() < 9.0e15 {
        return (f as i64).to_string();
    }
    if !f.is_finite() {
        let s = if f.is_nan() { "NaN" } else { "Infinity" };
        return if f < 0.0 { format!("-{s}") } else { s.into() };
    }
    // serde_json writes `-d.ddd`, `ddd.0` or `d.ddde±x`: take sign, digits and exponent apart.
    let text = Value::from(f).to_string();
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
fn num(f: f64) -> Value {
    if f.fract() == 0.0 && f.abs() < 9.0e15 {
        Value::from(f as i64)
    } else {
        Value::from(f)
    }
}

/// JavaScript `Number(v)`.
fn to_number(v: &Value) -> f64 {
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
fn parse_float(v: &Value) -> f64 {
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
    let f = json
        .parse::<serde_json::Number>()
        .ok()
        .and_then(|n| n.as_f64());
    (f.unwrap_or(f64::NAN), i)
}

/// json-logic-js `substr`: JavaScript's `String.prototype.substr`, plus a negative length that
/// leaves that many characters off the end. Counts characters (JavaScript counts UTF-16 units).
fn substr(src: &Value, start: &Value, len: Option<&Value>) -> Value {
    let int = |v: &Value| {
        let f = to_number(v);
        if f.is_nan() {
            0.0
        } else {
            f.trunc()
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
fn sem_ver(a: &Value, op: &Value, b: &Value) -> Value {
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

/// flagd `fractional` over its evaluated arguments; `None` (so `null`) wherever flagd's Go
/// evaluator logs an error and returns nil.
fn fractional(v: &[Cow<'_, Value>], data: &Value) -> Option<Value> {
    let by_targeting_key = || {
        let key = data
            .get("targetingKey")?
            .as_str()
            .filter(|k| !k.is_empty())?;
        let flag = data.get("$flagd").and_then(|f| f.get("flagKey"));
        Some(Cow::Owned(format!(
            "{}{key}",
            flag.and_then(Value::as_str).unwrap_or("")
        )))
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
    let whole = w.fract() == 0.0 && w <= f64::from(i32::MAX);
    whole.then_some((variant, w.max(0.0) as u64))
}

/// murmur3 x86 32-bit, for fractional bucketing.
pub fn murmur3_32(bytes: &[u8], seed: u32) -> u32 {
    let mix = |k: u32| {
        k.wrapping_mul(0xcc9e_2d51)
            .rotate_left(15)
            .wrapping_mul(0x1b87_3593)
    };
    let le = |c: &[u8]| c.iter().rev().fold(0u32, |k, &b| k << 8 | u32::from(b));
    let mut chunks = bytes.chunks_exact(4);
    let mut h = seed;
    for c in &mut chunks {
        h ^= mix(le(c));
        h = h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64);
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        h ^= mix(le(tail));
    }
    h ^= bytes.len() as u32;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn compile(logic: &Value) -> Result<Expr, String> {
        Expr::compile(logic, &Map::new())
    }

    fn run(logic: Value, data: &Value) -> Value {
        let expr = compile(&logic).unwrap_or_else(|e| panic!("{logic}: {e}"));
        expr.eval(data).unwrap()
    }

    /// Checks `(logic, expected)` pairs against one context.
    fn table(data: Value, cases: &[(Value, Value)]) {
        for (logic, want) in cases {
            assert_eq!(&run(logic.clone(), &data), want, "{logic} with {data}");
        }
    }

    fn compile_err(logic: Value) -> String {
        compile(&logic).expect_err(&logic.to_string())
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
    fn malformed_sem_ver_fails_at_compile() {
        for (logic, part) in [
            (
                json!({"sem_ver": ["1.0.0", "=>", "1.0.0"]}),
                "unknown comparison",
            ),
            (
                json!({"sem_ver": ["1.0.0", 1, "1.0.0"]}),
                "unknown comparison",
            ),
            (
                json!({"sem_ver": ["1.0.0.0", "=", {"var": "v"}]}),
                "not a semantic version",
            ),
            (
                json!({"sem_ver": [{"var": "v"}, "=", "x1"]}),
                "not a semantic version",
            ),
            (
                json!({"sem_ver": [true, "=", "1.0.0"]}),
                "not a semantic version",
            ),
            (
                json!({"sem_ver": ["1.0.0", "="]}),
                "takes 3 arguments, got 2",
            ),
        ] {
            let e = compile_err(logic.clone());
            assert!(e.contains("sem_ver") && e.contains(part), "{logic}: {e}");
        }
        assert!(compile(&json!({"sem_ver": [{"var": "v"}, {"var": "op"}, "v2"]})).is_ok());
    }

    #[test]
    fn fractional_matches_flagd_vectors() {
        let vectors: Value = serde_json::from_str(include_str!(
            "../tests/fixtures/flagd-fractional-vectors.json"
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
            json!({"fractional": [{"var": "b"}, ["a", -1]]}),
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
    fn refs_resolve_nested_evaluators() {
        let evaluators = json!({
            "isAdmin": {"starts_with": [{"var": "email"}, "admin@"]},
            "adminOrBeta": {"or": [{"$ref": "isAdmin"}, {"var": "beta"}]},
            "split": [["on", 1]]
        });
        let evaluators = evaluators.as_object().unwrap();
        let logic = json!({"if": [{"$ref": "adminOrBeta"}, "on", "off"]});
        let expr = Expr::compile(&logic, evaluators).unwrap();
        assert_eq!(
            expr.eval(&json!({"email": "admin@x"})).unwrap(),
            json!("on")
        );
        assert_eq!(
            expr.eval(&json!({"email": "ann@x", "beta": true})).unwrap(),
            json!("on")
        );
        assert_eq!(expr.eval(&json!({"email": "ann@x"})).unwrap(), json!("off"));
        // The same evaluator twice is not a cycle.
        let twice = json!({"and": [{"$ref": "isAdmin"}, {"$ref": "isAdmin"}]});
        assert!(Expr::compile(&twice, evaluators).is_ok());
        // A reference can stand for a literal too.
        let lit = Expr::compile(&json!({"$ref": "split"}), evaluators).unwrap();
        assert_eq!(lit.eval(&json!({})).unwrap(), json!([["on", 1]]));
    }

    #[test]
    fn ref_cycles_and_unknown_refs_fail_at_compile() {
        let evaluators = json!({
            "a": {"!": {"$ref": "b"}},
            "b": {"and": [true, {"$ref": "a"}]},
            "me": {"$ref": "me"},
            "bad": {"regex": ["x", "y"]}
        });
        let evaluators = evaluators.as_object().unwrap();
        let e = |logic: Value| Expr::compile(&logic, evaluators).unwrap_err();
        assert!(e(json!({"$ref": "a"})).contains("$ref cycle: a -> b -> a"));
        assert!(e(json!({"$ref": "me"})).contains("$ref cycle: me -> me"));
        assert!(e(json!({"$ref": "nope"})).contains("unknown evaluator \"nope\""));
        assert!(e(json!({"$ref": 1})).contains("$ref must name an evaluator"));
        let bad = e(json!({"!": {"$ref": "bad"}}));
        assert_eq!(bad, "in $evaluators.bad: unknown operator \"regex\"");
    }

    #[test]
    fn ref_expansion_that_explodes_is_refused() {
        let mut evaluators = Map::new();
        for i in 0..30 {
            let next = json!({"$ref": format!("e{}", i + 1)});
            evaluators.insert(format!("e{i}"), json!({"or": [next.clone(), next]}));
        }
        evaluators.insert("e30".into(), json!(true));
        let e = Expr::compile(&json!({"$ref": "e0"}), &evaluators).unwrap_err();
        assert!(e.contains("more than 100000 nodes"), "{e}");
        // A short chain is fine.
        assert!(Expr::compile(&json!({"$ref": "e25"}), &evaluators).is_ok());
    }

    #[test]
    fn unknown_operators_bad_arity_and_multi_key_objects_fail_at_compile() {
        assert_eq!(
            compile_err(json!({"regex": ["a", "b"]})),
            "unknown operator \"regex\""
        );
        assert_eq!(
            compile_err(json!({"if": [true, {"log": "x"}]})),
            "unknown operator \"log\""
        );
        assert_eq!(
            compile_err(json!({"==": [1, 2, 3]})),
            "operator \"==\" takes 2 arguments, got 3"
        );
        assert_eq!(
            compile_err(json!({"<": [1]})),
            "operator \"<\" takes 2 or 3 arguments, got 1"
        );
        assert_eq!(
            compile_err(json!({"and": []})),
            "operator \"and\" takes at least 1 arguments, got 0"
        );
        assert!(compile_err(json!({"var": "a", "if": []})).contains("one key"));
        assert!(compile_err(json!([1, {"nope": 1}])).contains("\"nope\""));
    }

    #[test]
    fn nesting_deeper_than_the_limit_fails_at_compile_without_overflowing() {
        let nest = |levels: usize| (0..levels).fold(json!(true), |inner, _| json!({"!": inner}));
        assert_eq!(run(nest(63), &json!({})), json!(false));
        assert!(compile_err(nest(64)).contains("nested more than 64 levels"));
        assert!(compile_err(nest(1_000)).contains("nested more than 64 levels"));
        let arrays = (0..100).fold(json!(1), |inner, _| json!([inner]));
        assert!(compile_err(arrays).contains("nested"));
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

    #[test]
    fn murmur3_matches_known_answers() {
        let cases: [(&[u8], u32, u32); 11] = [
            (b"", 0, 0),
            (b"", 1, 0x514e_28b7),
            (b"", 0xffff_ffff, 0x81f1_6f39),
            (&[0, 0, 0, 0], 0, 0x2362_f9de),
            (b"aaaa", 0x9747_b28c, 0x5a97_808a),
            (b"abc", 0, 0xb3dd_93fa),
            (b"hello", 0, 0x248b_fa47),
            (b"Hello, world!", 0x9747_b28c, 0x2488_4cba),
            (
                b"The quick brown fox jumps over the lazy dog",
                0,
                0x2e4f_f723,
            ),
            (
                b"The quick brown fox jumps over the lazy dog",
                0x9747_b28c,
                0x2fa8_26cd,
            ),
            (&[0xff], 0, 0xfd6c_f10d),
        ];
        for (bytes, seed, want) in cases {
            assert_eq!(murmur3_32(bytes, seed), want, "{bytes:?} seed {seed:#x}");
        }
    }
}
