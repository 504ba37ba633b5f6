//! The flag router's evaluation budget, natively: a rule that loops over a long list with
//! `map`, `filter`, `reduce`, `all`, `some` or `none` stops once its 50,000 steps are spent,
//! so it costs a bounded time per request however long the list. Fails (exit 1) when one does
//! not stop or takes more than a loose bound. Prints one line per operator.

use flag_router::logic::Expr;
use serde_json::{json, Map, Value};
use std::time::Instant;

/// The median per evaluation: far above the ~1 ms a spent budget takes and far below the ~20 ms a
/// `reduce` over 100,000 items took when it kept iterating.
const BOUND_MS: f64 = 10.0;

fn main() {
    let long: Vec<Value> = (0..200_000).map(|i| json!(i)).collect();
    let data = json!({ "xs": long });
    let literal: Vec<Value> = (0..90_000).map(|i| json!(i)).collect();
    let cases = [
        (
            "reduce over 200,000 items",
            json!({"reduce": [{"var": "xs"}, {"+": [{"var": "accumulator"}, {"var": "current"}]}, 0]}),
        ),
        (
            "map over 200,000 items",
            json!({"map": [{"var": "xs"}, {"+": [{"var": ""}, 1]}]}),
        ),
        (
            "filter over 200,000 items",
            json!({"filter": [{"var": "xs"}, {">": [{"var": ""}, -1]}]}),
        ),
        (
            "all over 200,000 items",
            json!({"all": [{"var": "xs"}, {">": [{"var": ""}, -1]}]}),
        ),
        (
            "some over 200,000 items",
            json!({"some": [{"var": "xs"}, {"<": [{"var": ""}, -1]}]}),
        ),
        (
            "none over 200,000 items",
            json!({"none": [{"var": "xs"}, {"<": [{"var": ""}, -1]}]}),
        ),
        (
            "reduce (90,000-item literal)",
            json!({"reduce": [literal, {"+": [{"var": "accumulator"}, {"var": "current"}]}, 0]}),
        ),
    ];
    let mut failed = false;
    for (name, logic) in cases {
        let expr = match Expr::compile(&logic, &Map::new()) {
            Ok(e) => e,
            Err(e) => {
                println!("flag budget: {name}: does not compile: {e}");
                failed = true;
                continue;
            }
        };
        // Warm: the first run also faults in the pages of the context.
        let _ = expr.eval(&data);
        let runs = 30;
        let mut times = Vec::with_capacity(runs);
        let mut stopped = true;
        for _ in 0..runs {
            let t = Instant::now();
            let r = expr.eval(&data);
            times.push(t.elapsed().as_secs_f64() * 1e3);
            stopped &= r.is_err_and(|e| e.contains("stopped after 50000 steps"));
        }
        times.sort_by(f64::total_cmp);
        let median = times[runs / 2];
        let worst = times[runs - 1];
        // The median: a shared machine's scheduler can stall any single run.
        let ok = stopped && median <= BOUND_MS;
        failed |= !ok;
        println!(
            "flag budget: {name:<36} stopped after 50,000 steps: {stopped}; \
             {median:.3} ms median, {worst:.3} ms worst per evaluation (median bound {BOUND_MS} ms){}",
            if ok { "" } else { "  FAILED" }
        );
    }
    if failed {
        std::process::exit(1);
    }
}
