//! Compiling a rule: operators and their arity, `$ref` expansion within the depth and node
//! bounds, and the literal checks of flagd's operators.

use super::fractional::check_fractional;
use super::{Node, Op, MAX_DEPTH};
use alloc::format;
use alloc::string::String;
use alloc::string::ToString;
use alloc::vec::Vec;
use serde_json::{Map, Value};

/// Most nodes one expression may compile to after `$ref` expansion (a chain of evaluators that
/// each use the next twice would otherwise double per link).
pub const MAX_NODES: usize = 100_000;
const MANY: usize = usize::MAX;

/// Operator name, operator, least and most arguments.
pub(super) const OPS: &[(&str, Op, usize, usize)] = &[
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
    // flagd's own operators take any number of operands and answer `null` for a wrong one,
    // as flagd does, so a rule around them takes its else branch instead of failing the file.
    ("starts_with", Op::StartsWith, 0, MANY),
    ("ends_with", Op::EndsWith, 0, MANY),
    ("sem_ver", Op::SemVer, 0, MANY),
    ("fractional", Op::Fractional, 1, MANY),
];

pub(super) struct Compiler<'e> {
    pub(super) evaluators: &'e Map<String, Value>,
    /// `$ref`s being expanded, outermost first, for cycle detection.
    pub(super) refs: Vec<String>,
    pub(super) nodes: usize,
}

impl Compiler<'_> {
    pub(super) fn node(&mut self, v: &Value, depth: usize) -> Result<Node, String> {
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
                let keys: Vec<String> = m.keys().map(|k| format!("\"{k}\"")).collect();
                return Err(format!(
                    "an operation is an object with one key, found keys [{}]",
                    keys.join(", ")
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
            one => core::slice::from_ref(one),
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
        if op == Op::Fractional {
            check_fractional(args)?;
        }
        Ok(Node::Op(op, self.all(args, depth)?))
    }

    fn all(&mut self, items: &[Value], depth: usize) -> Result<Vec<Node>, String> {
        items.iter().map(|i| self.node(i, depth + 1)).collect()
    }

    fn reference(&mut self, arg: &Value, depth: usize) -> Result<Node, String> {
        let Value::String(name) = arg else {
            return Err(format!(
                "$ref must name an evaluator, not {}",
                edge_json::to_text(arg)
            ));
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

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::Expr;
    use alloc::format;
    use serde_json::{json, Map, Value};

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
}
