//! JsonLogic with flagd's operators (`fractional`, `sem_ver`, `starts_with`, `ends_with`) and
//! `$ref` to a flag file's `$evaluators`, compiled once per flag definition and evaluated per
//! request.
//!
//! Core operators coerce like json-logic-js (JavaScript's `==`, `<`, `+`, string conversion);
//! flagd's operators follow flagd's Go evaluator, which answers `null` for bad operands (a wrong
//! count, an unknown `sem_ver` comparison, a version that does not parse), so an `if` around
//! them takes its else branch exactly as it would in flagd. What flagd itself cannot evaluate
//! (an unknown operator, a JsonLogic operator's fixed arity, a malformed `fractional`
//! distribution, a `$ref` cycle) fails at compile time instead. Compilation bounds depth and node
//! count, so a hostile flag file can neither overflow the stack nor explode through `$ref`s.
//!
//! One `enum Node` and one `ev` match keep the wasm module small; evaluation borrows literals
//! and context values (`Cow`) instead of cloning them.
//!
//! By concern: `compile` checks a rule and builds its tree, `evaluate` runs it within a
//! budget, `coercions` are JavaScript's conversions, `semver` and `fractional` are flagd's
//! operators, and `hashing` is the murmur3 that `fractional` buckets with.

mod coercions;
mod compile;
mod evaluate;
mod fractional;
mod hashing;
mod semver;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
pub use hashing::murmur3_32;

use compile::Compiler;
pub use compile::MAX_NODES;
use evaluate::{ev, Budget, BUDGET};
use serde_json::{Map, Value};

/// Deepest nesting of operations and arrays, `$ref`s included. Evaluation recurses once per
/// level, so this bounds the stack whatever the flag file says.
const MAX_DEPTH: usize = 64;
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
    /// budget of steps and built values (`BUDGET`).
    pub fn eval(&self, data: &Value) -> Result<Value, String> {
        let b = Budget(core::cell::Cell::new(BUDGET), core::cell::Cell::new(0));
        let v = ev(&self.0, data, &b).into_owned();
        if b.exhausted() {
            return Err(format!(
                "evaluation stopped after {BUDGET} steps (a rule that loops over or builds large lists)"
            ));
        }
        Ok(v)
    }
}

/// What the submodules' tests share: compiling and running rules against a context.
#[cfg(test)]
mod testing {
    use super::*;
    use alloc::string::ToString;

    pub(super) fn compile(logic: &Value) -> Result<Expr, String> {
        Expr::compile(logic, &Map::new())
    }

    pub(super) fn run(logic: Value, data: &Value) -> Value {
        let expr = compile(&logic).unwrap_or_else(|e| panic!("{logic}: {e}"));
        expr.eval(data).unwrap()
    }

    /// Checks `(logic, expected)` pairs against one context.
    pub(super) fn table(data: Value, cases: &[(Value, Value)]) {
        for (logic, want) in cases {
            assert_eq!(&run(logic.clone(), &data), want, "{logic} with {data}");
        }
    }

    pub(super) fn compile_err(logic: Value) -> String {
        compile(&logic).expect_err(&logic.to_string())
    }
}
